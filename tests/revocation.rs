//! Revocation, as operators and Envoy meet it: real servers over real gRPC on
//! loopback, a real `redis-server` started by the test, the admin API and CLI.
//!
//! Propagation is awaited by polling with a generous deadline; timing goals live
//! in `benches/revocation_propagation.rs`.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use portcullis::admin::pb::admin_client::AdminClient;
use portcullis::admin::pb::{self, target::Kind};
use redis_harness::{RedisServer, TcpProxy};
use serde_json::Value;
use tonic::transport::Channel;

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const KEY: &str = "portcullis:revocations";

/// One Portcullis instance in-process, with its admin API and revocation store.
type Instance = common::instance::AdminInstance;

/// Starts the instance `config_path` describes, auditing next to it.
async fn start_instance(config_path: &Path) -> Instance {
    Instance::start(config_path, config_path.with_extension("audit.log")).await
}

impl Instance {
    async fn revoke(&self, kind: Kind) -> pb::RevokeResponse {
        let mut request = tonic::Request::new(pb::RevokeRequest {
            target: Some(pb::Target { kind: Some(kind) }),
            reason: "test".into(),
        });
        authorize(&mut request, ADMIN_TOKEN);
        self.admin()
            .await
            .revoke(request)
            .await
            .unwrap()
            .into_inner()
    }

    /// `Revoke`, with the gRPC status when it is refused.
    async fn try_revoke(&self, kind: Kind) -> Result<pb::RevokeResponse, tonic::Status> {
        let mut request = tonic::Request::new(pb::RevokeRequest {
            target: Some(pb::Target { kind: Some(kind) }),
            reason: "test".into(),
        });
        authorize(&mut request, ADMIN_TOKEN);
        self.admin()
            .await
            .revoke(request)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn status(&self) -> pb::StatusResponse {
        let mut request = tonic::Request::new(pb::StatusRequest {});
        authorize(&mut request, ADMIN_TOKEN);
        self.admin()
            .await
            .status(request)
            .await
            .unwrap()
            .into_inner()
    }

    async fn list(&self) -> Vec<pb::Revocation> {
        let mut request = tonic::Request::new(pb::ListRevocationsRequest {});
        authorize(&mut request, ADMIN_TOKEN);
        self.admin()
            .await
            .list_revocations(request)
            .await
            .unwrap()
            .into_inner()
            .revocations
    }

    /// The decision for `GET /orders/1` with `token`, through the real Check RPC.
    async fn check(&self, token: &str) -> Outcome {
        outcome(
            &self
                .server
                .check(envoy_request("GET", "/orders/1", Some(token)))
                .await,
        )
    }

    async fn assert_allowed(&self, token: &str) {
        let out = self.check(token).await;
        assert_eq!(out.http_status, 200, "{out:?}");
    }

    async fn assert_revoked(&self, token: &str) {
        let out = self.check(token).await;
        assert_revoked(&out);
    }

    /// Polls until `token` is denied as revoked (generous deadline: this is not
    /// a timing assertion).
    async fn eventually_revoked(&self, token: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.check(token).await;
            if out.http_status == 401 {
                assert_revoked(&out);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "token still {} after 30s",
                out.http_status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn eventually_status(&self, what: &str, ok: impl Fn(&pb::StatusResponse) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status().await;
            if ok(&status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "status never became {what}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn assert_revoked(out: &Outcome) {
    assert_eq!(out.http_status, 401, "{out:?}");
    assert_eq!(out.grpc_code, 16, "{out:?}");
    assert_eq!(out.metadata["reason"], "revoked", "{out:?}");
    assert_eq!(out.body["error"], "invalid_token", "{out:?}");
    let challenge = out.header("www-authenticate").unwrap();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
}

fn authorize<T>(request: &mut tonic::Request<T>, token: &str) {
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh jti.
fn jti() -> String {
    format!(
        "jti-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// A token allowed on `GET /orders/1`, with its own jti; `edit` adjusts claims.
fn token(key: &TestKey, sub: &str, edit: impl FnOnce(&mut Value)) -> (String, String) {
    let mut claims = claims(sub, &["orders:read"], &[]);
    let id = jti();
    claims["jti"] = Value::from(id.clone());
    claims["client_id"] = Value::from("web-app");
    edit(&mut claims);
    (key.sign(&claims), id)
}

/// Writes an instance configuration next to the fixture's policies.
fn instance_config(fx: &Fixture, name: &str, extra: &str) -> PathBuf {
    let base = std::fs::read_to_string(fx.config_path()).unwrap();
    let text =
        format!("{base}\n{extra}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n");
    let path = fx.path(&format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn shared(data_dir: &str, redis_url: &str, startup: &str) -> String {
    format!(
        "[revocation]\ndata_dir = \"{data_dir}\"\nredis_url = \"{redis_url}\"\nstartup = \"{startup}\"\n"
    )
}

/// An instance named `name` sharing revocations through `redis_url`, waiting
/// for its first sync, with its own data directory.
async fn shared_instance(fx: &Fixture, name: &str, redis_url: &str) -> Instance {
    let data_dir = format!("data-{name}");
    start_instance(&instance_config(
        fx,
        name,
        &shared(&data_dir, redis_url, "wait"),
    ))
    .await
}

fn two_keys() -> Fixture {
    Fixture::with_keys(vec![TestKey::es256(), TestKey::es256()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_instance_is_enforced_by_the_other() {
    let redis = RedisServer::start();
    let fx = two_keys();
    let a = shared_instance(&fx, "a", &redis.url()).await;
    let b = shared_instance(&fx, "b", &redis.url()).await;
    let (k1, k2) = (&fx.keys[0], &fx.keys[1]);

    let (by_jti, jti_1) = token(k1, "alice", |_| {});
    let (alice_other, _) = token(k1, "alice", |_| {});
    let now = now();
    let (bob_old, _) = token(k1, "bob", |c| c["iat"] = Value::from(now - 20));
    let (bob_new, _) = token(k1, "bob", |_| {});
    let (by_kid, _) = token(k2, "carol", |_| {});
    let (dave, _) = token(k1, "dave", |c| c["client_id"] = Value::from("cli"));
    for t in [&by_jti, &alice_other, &bob_old, &bob_new, &by_kid, &dave] {
        b.assert_allowed(t).await;
    }

    // By jti (scoped to the issuer): only that token.
    let done = a
        .revoke(Kind::Token(pb::TokenTarget {
            jti: jti_1,
            issuer: ISSUER.into(),
            expires_at: None,
        }))
        .await;
    assert!(done.synced, "written to Redis");
    a.assert_revoked(&by_jti).await;
    b.eventually_revoked(&by_jti).await;
    b.assert_allowed(&alice_other).await;

    // By subject, with a cut-off: tokens issued after it still work.
    a.revoke(Kind::Subject(pb::SubjectTarget {
        sub: "bob".into(),
        issued_before: Some(now - 10),
    }))
    .await;
    b.eventually_revoked(&bob_old).await;
    b.assert_allowed(&bob_new).await;

    // By key: every token that key signed, none of the other key's.
    a.revoke(Kind::KeyId(k2.kid().to_owned())).await;
    b.eventually_revoked(&by_kid).await;
    b.assert_allowed(&alice_other).await;

    // By client.
    a.revoke(Kind::ClientId("cli".into())).await;
    b.eventually_revoked(&dave).await;
    b.assert_allowed(&alice_other).await;

    assert_eq!(b.list().await.len(), 4);
    let status = b.status().await;
    assert_eq!(
        (
            status.mode.as_str(),
            status.redis.as_str(),
            status.revocations,
            status.pending_writes,
            status.policies
        ),
        ("redis", "connected", 4, 0, 4)
    );
    assert_eq!(redis.zcard(KEY), 4);

    // The audit line names the reason, never the token.
    let audit = std::fs::read_to_string(fx.path("b.audit.log")).unwrap();
    assert!(audit.contains("\"reason\":\"revoked\""));
    assert!(!audit.contains(&by_jti));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_made_while_an_instance_is_cut_off_reach_it_on_reconnect() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port).await;
    let fx = two_keys();
    let a = shared_instance(&fx, "a", &redis.url()).await;
    let b = shared_instance(&fx, "b", &proxy.url()).await;
    let (t, id) = token(&fx.keys[0], "alice", |_| {});
    b.assert_allowed(&t).await;

    proxy.cut();
    b.eventually_status("disconnected", |s| s.redis == "disconnected")
        .await;
    let done = a
        .revoke(Kind::Token(pb::TokenTarget {
            jti: id,
            issuer: String::new(),
            expires_at: None,
        }))
        .await;
    assert!(done.synced);
    a.assert_revoked(&t).await;
    // B missed the publication: it cannot know yet.
    b.assert_allowed(&t).await;

    proxy.restore();
    b.eventually_revoked(&t).await;
    b.eventually_status("connected", |s| s.redis == "connected")
        .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_across_redis_and_instance_restarts() {
    let mut redis = RedisServer::start();
    let fx = two_keys();
    let a_config = instance_config(&fx, "a", &shared("data-a", &redis.url(), "wait"));
    let b_config = instance_config(&fx, "b", &shared("data-b", &redis.url(), "wait"));
    let a = start_instance(&a_config).await;
    let b = start_instance(&b_config).await;
    let (t1, id1) = token(&fx.keys[0], "alice", |_| {});
    let (t2, id2) = token(&fx.keys[0], "alice", |_| {});
    let by_jti = |jti: String| {
        Kind::Token(pb::TokenTarget {
            jti,
            issuer: String::new(),
            expires_at: None,
        })
    };

    assert!(a.revoke(by_jti(id1)).await.synced);
    b.eventually_revoked(&t1).await;

    // Redis goes away: known revocations stay enforced, a new one is enforced
    // locally at once and queued.
    redis.stop();
    a.eventually_status("disconnected", |s| s.redis == "disconnected")
        .await;
    b.assert_revoked(&t1).await;
    let queued = a.revoke(by_jti(id2)).await;
    assert!(!queued.synced);
    a.assert_revoked(&t2).await;
    assert_eq!(a.status().await.pending_writes, 1);

    // Redis is back (from its append-only file): the queue drains, B catches up.
    redis.restart();
    b.eventually_revoked(&t2).await;
    a.eventually_status("synced", |s| {
        s.redis == "connected" && s.pending_writes == 0
    })
    .await;
    assert_eq!(redis.zcard(KEY), 2);

    // Every instance stops; Redis crashes and restarts. A brand-new instance
    // with an empty journal learns both revocations from Redis alone.
    a.stop().await;
    b.stop().await;
    redis.restart();
    assert_eq!(redis.zcard(KEY), 2, "Redis persisted the revocations");
    let c_config = instance_config(&fx, "c", &shared("data-c", &redis.url(), "wait"));
    let c = start_instance(&c_config).await;
    c.assert_revoked(&t1).await;
    c.assert_revoked(&t2).await;
    c.stop().await;

    // An instance restarted while Redis is down still denies, from its journal
    // (startup = "local" serves on local state).
    redis.stop();
    let b_local = instance_config(&fx, "b-local", &shared("data-b", &redis.url(), "local"));
    let b = start_instance(&b_local).await;
    assert_eq!(b.status().await.redis, "connecting");
    b.assert_revoked(&t1).await;
    b.assert_revoked(&t2).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_once_no_token_they_match_can_be_valid() {
    let redis = RedisServer::start();
    let fx = two_keys();
    // Tokens live at most 2 seconds: entries expire 2 seconds after they are made.
    let short = std::fs::read_to_string(fx.config_path())
        .unwrap()
        .replace("max_token_lifetime = \"1h\"", "max_token_lifetime = \"2s\"")
        .replace("leeway = \"30s\"", "leeway = \"0s\"");
    std::fs::write(fx.config_path(), short).unwrap();
    let a = shared_instance(&fx, "a", &redis.url()).await;
    let key = &fx.keys[1];
    let lifetime = |c: &mut Value| c["exp"] = Value::from(c["iat"].as_i64().unwrap() + 2);

    let (t, _) = token(key, "alice", lifetime);
    a.assert_allowed(&t).await;
    let done = a.revoke(Kind::KeyId(key.kid().to_owned())).await;
    let entry = done.revocation.unwrap();
    assert_eq!(entry.expires_at - entry.created_at, 2);
    a.assert_revoked(&t).await;
    assert_eq!(a.list().await.len(), 1);

    let deadline = Instant::now() + Duration::from_secs(30);
    while !(a.list().await.is_empty() && redis.zcard(KEY) == 0) {
        assert!(Instant::now() < deadline, "entry never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.status().await.revocations, 0);
    // A token the key signs after the entry expired is accepted again.
    let (fresh, _) = token(key, "alice", lifetime);
    a.assert_allowed(&fresh).await;
    a.stop().await;

    // The journal dropped it too.
    let journal = std::fs::read_to_string(fx.path("data-a/revocations.log")).unwrap_or_default();
    let a = start_instance(&fx.path("a.toml")).await;
    assert!(a.list().await.is_empty(), "{journal}");
    a.stop().await;
}

#[tokio::test]
async fn the_admin_api_refuses_calls_without_the_admin_token() {
    let fx = Fixture::new();
    let inst = start_instance(&instance_config(
        &fx,
        "a",
        "[revocation]\ndata_dir = \"data\"",
    ))
    .await;
    let mut client = inst.admin().await;

    let anonymous = client.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    for wrong in [
        "Bearer wrong-token-0123456789",
        "Bearer test-admin-token-012345678",
        "Basic dGVzdA==",
        ADMIN_TOKEN,
    ] {
        let mut request = tonic::Request::new(pb::RevokeRequest {
            target: Some(pb::Target {
                kind: Some(Kind::KeyId("k".into())),
            }),
            reason: String::new(),
        });
        request
            .metadata_mut()
            .insert("authorization", wrong.parse().unwrap());
        let err = client.revoke(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong}");
        assert!(!err.message().contains(wrong));
    }
    assert!(
        inst.list().await.is_empty(),
        "refused calls changed nothing"
    );

    // Reflection on the admin listener needs the credential too.
    let reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            Channel::from_shared(format!("http://{}", inst.admin_addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
        .server_reflection_info(tokio_stream::iter(vec![
        tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
        },
    ]))
        .await;
    assert_eq!(reflection.unwrap_err().code(), tonic::Code::Unauthenticated);

    // The admin API is not served on the Envoy-facing listener.
    let mut on_envoy_port = AdminClient::new(inst.server.channel.clone());
    let mut request = tonic::Request::new(pb::StatusRequest {});
    authorize(&mut request, ADMIN_TOKEN);
    let err = on_envoy_port.status(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    // With the token: served.
    let status = inst.status().await;
    assert_eq!(
        (status.mode.as_str(), status.redis.as_str()),
        ("embedded", "disabled")
    );
    inst.stop().await;
}

/// Dry-run lets would-be denials through, but never a revoked credential.
#[tokio::test]
async fn revocations_are_enforced_even_in_dry_run() {
    let fx = Fixture::new();
    let text = std::fs::read_to_string(fx.config_path()).unwrap().replace(
        "name = \"orders\"",
        "name = \"orders\"\nmode = \"dry-run\"\ntoken_mode = \"dry-run\"",
    );
    std::fs::write(fx.config_path(), text).unwrap();
    let inst = start_instance(&instance_config(
        &fx,
        "a",
        "[revocation]\ndata_dir = \"data\"",
    ))
    .await;
    let (expired, _) = token(fx.es256(), "alice", |c| {
        c["exp"] = Value::from(now() - 3600);
        c["iat"] = Value::from(now() - 4000);
    });
    assert_eq!(
        inst.check(&expired).await.http_status,
        200,
        "dry-run lets an expired token through"
    );
    let (t, id) = token(fx.es256(), "alice", |_| {});
    inst.revoke(Kind::Token(pb::TokenTarget {
        jti: id,
        issuer: String::new(),
        expires_at: None,
    }))
    .await;
    inst.assert_revoked(&t).await;
    inst.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sigterm(mut child: std::process::Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(child.wait().unwrap().success());
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Embedded mode, as a user runs it: `serve`, `portcullis revoke`, a restart.
#[tokio::test]
async fn embedded_mode_persists_revocations_across_a_restart() {
    let fx = Fixture::new();
    let admin = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let base = std::fs::read_to_string(fx.config_path()).unwrap();
    let config = fx.path("serve.toml");
    std::fs::write(
        &config,
        format!("{base}\n[admin]\nlisten = \"{admin}\"\ntoken_env = \"PORTCULLIS_ADMIN_TOKEN\"\n"),
    )
    .unwrap();
    let (t, id) = token(fx.es256(), "alice", |_| {});
    let check = |listen: String, t: String| async move {
        let channel = Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(channel);
        outcome(
            &client
                .check(envoy_request("GET", "/orders/1", Some(&t)))
                .await
                .unwrap()
                .into_inner(),
        )
    };

    let server = spawn_serve_with_token(&config, &listen).await;
    assert_eq!(check(listen.clone(), t.clone()).await.http_status, 200);

    let (ok, _, stderr) = cli(&[
        "revoke",
        "--admin",
        &admin,
        "--jti",
        &id,
        "--admin-token",
        "wrong-token-0123456789",
    ]);
    assert!(!ok);
    assert!(stderr.contains("refused the credential"), "{stderr}");
    let (ok, stdout, stderr) = cli(&[
        "revoke",
        "--admin",
        &admin,
        "--jti",
        &id,
        "--reason",
        "laptop stolen",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("revoked:  jti"), "{stdout}");
    assert_revoked(&check(listen.clone(), t.clone()).await);
    let (ok, stdout, _) = cli(&[
        "check",
        "--server",
        &listen,
        "--token",
        &t,
        "--path",
        "/orders/1",
    ]);
    assert!(!ok);
    assert!(
        stdout.contains("status:    401") && stdout.contains("reason:    revoked"),
        "{stdout}"
    );
    let (ok, stdout, _) = cli(&["revocations", "--admin", &admin]);
    assert!(ok);
    assert!(
        stdout.contains(&id)
            && stdout.contains("laptop stolen")
            && stdout.contains("1 revocation(s)"),
        "{stdout}"
    );
    let (ok, stdout, _) = cli(&["status", "--admin", &admin]);
    assert!(ok);
    assert!(stdout.contains("mode:           embedded"), "{stdout}");
    assert!(stdout.contains("revocations:    1"), "{stdout}");
    sigterm(server);

    // Restarted: the journal under data/ still holds the revocation.
    assert!(fx.path("data/revocations.log").is_file());
    let server = spawn_serve_with_token(&config, &listen).await;
    assert_revoked(&check(listen.clone(), t.clone()).await);
    sigterm(server);
}

async fn wait_serving(listen: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
        {
            let health = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if health.is_ok_and(|h| h.into_inner().status == 1) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "serve never became SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the binary with the admin token in its environment; returns it once
/// the ext_authz listener reports SERVING.
async fn spawn_serve_with_token(config: &Path, listen: &str) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--config", &path_arg(config), "--listen", listen])
        .env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_serving(listen).await;
    child
}

/// The revocation count had no cap. Now a `Revoke` beyond `[revocation]
/// max_entries` is answered RESOURCE_EXHAUSTED, naming the cap and the key,
/// with nothing applied; entries from another instance are enforced past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revokes_beyond_max_entries_are_refused_while_peers_entries_are_still_enforced() {
    let redis = RedisServer::start();
    let fx = two_keys();
    let a = shared_instance(&fx, "a", &redis.url()).await;
    let b = start_instance(&instance_config(
        &fx,
        "b",
        &format!(
            "{}max_entries = 1\n",
            shared("data-b", &redis.url(), "wait")
        ),
    ))
    .await;
    let (c2, _) = token(&fx.keys[0], "alice", |c| c["client_id"] = Value::from("c2"));

    b.revoke(Kind::ClientId("c1".into())).await;
    let refused = b.try_revoke(Kind::ClientId("c2".into())).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("[revocation] max_entries")
            && refused.message().contains("not applied"),
        "{}",
        refused.message()
    );
    b.assert_allowed(&c2).await;
    assert_eq!(b.list().await.len(), 1, "nothing applied");
    assert_eq!(redis.zcard(KEY), 1, "nothing shared");

    // The same revocation made by a peer is enforced here, past the cap.
    a.revoke(Kind::ClientId("c2".into())).await;
    b.eventually_revoked(&c2).await;
    assert_eq!(b.list().await.len(), 2);
    a.stop().await;
    b.stop().await;
}

/// The queue of revocations waiting for Redis was unbounded. Now, with Redis
/// down, revocations up to `[revocation] max_pending_writes` are applied and
/// answered `synced: false`; the next is refused (RESOURCE_EXHAUSTED, not
/// applied); the queued one reaches Redis once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_revokes_beyond_max_pending_writes_are_refused_never_lost() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port).await;
    let fx = two_keys();
    let a = start_instance(&instance_config(
        &fx,
        "a",
        &format!(
            "{}max_pending_writes = 1\n",
            shared("data-a", &proxy.url(), "wait")
        ),
    ))
    .await;
    proxy.cut();
    a.eventually_status("disconnected", |s| s.redis == "disconnected")
        .await;
    let (c1, _) = token(&fx.keys[0], "alice", |c| c["client_id"] = Value::from("c1"));
    let (c2, _) = token(&fx.keys[0], "alice", |c| c["client_id"] = Value::from("c2"));

    let queued = a.revoke(Kind::ClientId("c1".into())).await;
    assert!(!queued.synced, "Redis is down: queued");
    a.assert_revoked(&c1).await;
    let refused = a.try_revoke(Kind::ClientId("c2".into())).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("[revocation] max_pending_writes"),
        "{}",
        refused.message()
    );
    a.assert_allowed(&c2).await;
    assert_eq!(a.status().await.pending_writes, 1);

    proxy.restore();
    a.eventually_status("synced", |s| {
        s.redis == "connected" && s.pending_writes == 0
    })
    .await;
    assert_eq!(redis.zcard(KEY), 1, "the queued revocation reached Redis");
    // Room again: the refused revocation can be made now.
    assert!(a.try_revoke(Kind::ClientId("c2".into())).await.is_ok());
    a.assert_revoked(&c2).await;
    a.stop().await;
}

impl Instance {
    /// `RevokeBatch` of `kinds`, with the gRPC status when it is refused.
    async fn try_revoke_batch(
        &self,
        kinds: Vec<Kind>,
    ) -> Result<pb::RevokeBatchResponse, tonic::Status> {
        let mut request = tonic::Request::new(pb::RevokeBatchRequest {
            targets: kinds
                .into_iter()
                .map(|kind| pb::Target { kind: Some(kind) })
                .collect(),
            reason: "incident".into(),
        });
        authorize(&mut request, ADMIN_TOKEN);
        self.admin()
            .await
            .revoke_batch(request)
            .await
            .map(tonic::Response::into_inner)
    }
}

fn by_jti(id: &str) -> Kind {
    Kind::Token(pb::TokenTarget {
        jti: id.into(),
        issuer: String::new(),
        expires_at: None,
    })
}

/// `RevokeBatch`: every target enforced; one invalid target refuses the
/// whole call (naming its index, never its value) with nothing applied; more
/// than the per-call cap is refused; the admin token is required.
#[tokio::test]
async fn a_batch_is_enforced_whole_or_not_at_all() {
    let fx = Fixture::new();
    let inst = start_instance(&instance_config(
        &fx,
        "a",
        "[revocation]\ndata_dir = \"data\"",
    ))
    .await;
    let (t1, id1) = token(fx.es256(), "alice", |_| {});
    let (t2, id2) = token(fx.es256(), "bob", |_| {});
    let (t3, _) = token(fx.es256(), "carol", |_| {});
    let (c2, _) = token(fx.es256(), "dave", |c| c["client_id"] = Value::from("c2"));

    // One invalid target: nothing applied, its index named, its value not.
    let secret = "s3cr3t-".repeat(200);
    let refused = inst
        .try_revoke_batch(vec![by_jti(&id1), by_jti(""), by_jti(&secret)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("targets[1]:"), "{refused:?}");
    let refused = inst
        .try_revoke_batch(vec![by_jti(&id1), by_jti(&id2), by_jti(&secret)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("targets[2]:"), "{refused:?}");
    assert!(!refused.message().contains("s3cr3t"), "{refused:?}");
    let expired = Kind::Token(pb::TokenTarget {
        jti: id2.clone(),
        issuer: String::new(),
        expires_at: Some(now() - 3600),
    });
    let refused = inst
        .try_revoke_batch(vec![by_jti(&id1), expired])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("targets[1]:"), "{refused:?}");
    let refused = inst
        .try_revoke_batch(vec![by_jti(&id1), Kind::ApiKeyId(String::new())])
        .await
        .unwrap_err();
    assert!(refused.message().starts_with("targets[1]:"), "{refused:?}");
    inst.assert_allowed(&t1).await;
    assert!(inst.list().await.is_empty(), "nothing applied");

    // The cap per call.
    let too_many = (0..=10_000).map(|i| by_jti(&format!("j{i}"))).collect();
    let refused = inst.try_revoke_batch(too_many).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("at most 10000"), "{refused:?}");
    let refused = inst.try_revoke_batch(Vec::new()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(inst.list().await.is_empty(), "nothing applied");

    // The admin token is required.
    let mut request = tonic::Request::new(pb::RevokeBatchRequest {
        targets: vec![pb::Target {
            kind: Some(by_jti(&id1)),
        }],
        reason: String::new(),
    });
    authorize(&mut request, "wrong-token-0123456789");
    let refused = inst.admin().await.revoke_batch(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    inst.assert_allowed(&t1).await;

    // A good batch, at the cap: every target in force at once.
    let exp = now() + 600;
    let mut kinds = vec![
        by_jti(&id1),
        Kind::Token(pb::TokenTarget {
            jti: id2,
            issuer: ISSUER.into(),
            expires_at: Some(exp),
        }),
        Kind::ClientId("c2".into()),
    ];
    kinds.extend((3..10_000).map(|i| by_jti(&format!("filler-{i}"))));
    let done = inst.try_revoke_batch(kinds).await.unwrap();
    assert_eq!(done.revocations.len(), 10_000);
    assert_eq!((done.synced, done.queued), (0, 0), "embedded mode");
    let leeway = fx.config().token_lifetimes().leeway.as_secs() as i64;
    assert_eq!(done.revocations[1].expires_at, exp + leeway, "exp + leeway");
    assert!(done.revocations.iter().all(|r| r.reason == "incident"));
    inst.assert_revoked(&t1).await;
    inst.assert_revoked(&t2).await;
    inst.assert_revoked(&c2).await;
    inst.assert_allowed(&t3).await;
    assert_eq!(inst.list().await.len(), 10_000);
    inst.stop().await;
}

/// Runs the binary with the admin token in its environment and `stdin`;
/// returns its exit code, stdout and stderr.
fn cli_with_stdin(args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `portcullis revoke --from-file` against a running server: a bad line
/// refuses the file (every bad line named) with nothing sent; a good file is
/// sent in batches with progress; `-` reads standard input; a batch refused
/// midway reports what was revoked before it and exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_revokes_a_file_of_targets_in_batches() {
    let fx = Fixture::new();
    let inst = start_instance(&instance_config(
        &fx,
        "a",
        "[revocation]\ndata_dir = \"data\"\nmax_entries = 4000",
    ))
    .await;
    let admin = inst.admin_addr.to_string();
    let (t1, id1) = token(fx.es256(), "alice", |_| {});
    let (t2, id2) = token(fx.es256(), "bob", |_| {});
    let (t3, _) = token(fx.es256(), "carol", |_| {});
    let (c2, _) = token(fx.es256(), "dave", |c| c["client_id"] = Value::from("c2"));
    let list = fx.path("targets.txt");
    let list_arg = path_arg(&list);
    let revoke = |file: &str, stdin: &str| {
        cli_with_stdin(
            &[
                "revoke",
                "--admin",
                &admin,
                "--from-file",
                file,
                "--reason",
                "incident 42",
            ],
            stdin,
        )
    };

    // Bad lines: all reported by number, nothing sent.
    std::fs::write(
        &list,
        format!("jti {id1}\nbogus secret-value\njti {id2} exp=soon\n# fine\nkid\n"),
    )
    .unwrap();
    let (code, _, stderr) = revoke(&list_arg, "");
    assert_eq!(code, Some(2), "{stderr}");
    for line in [
        "line 2:",
        "line 3:",
        "line 5:",
        "3 bad line(s)",
        "nothing was revoked",
    ] {
        assert!(stderr.contains(line), "{line}: {stderr}");
    }
    assert!(
        !stderr.contains("line 1:") && !stderr.contains("secret-value"),
        "{stderr}"
    );
    assert!(inst.list().await.is_empty(), "nothing sent");
    inst.assert_allowed(&t1).await;

    // --from-file and a single target are exclusive.
    let (code, _, _) = cli_with_stdin(
        &[
            "revoke",
            "--admin",
            &admin,
            "--from-file",
            &list_arg,
            "--jti",
            "x",
        ],
        "",
    );
    assert_eq!(code, Some(2));

    // A target the server refuses is reported by its line; nothing applied.
    std::fs::write(&list, format!("jti {id1}\n\njti {id2} exp=1\n")).unwrap();
    let (code, _, stderr) = revoke(&list_arg, "");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("(line 3)") && stderr.contains("0 of 2 target(s) were revoked"),
        "{stderr}"
    );
    assert!(inst.list().await.is_empty(), "nothing applied");

    // A good file: three batches, progress on stderr, a summary on stdout.
    let mut text = format!(
        "# incident 42\njti {id1}\njti {id2} issuer={ISSUER} exp={}\n\nclient c2   # the CI client\n",
        now() + 600
    );
    for i in 3..2500 {
        text.push_str(&format!("jti filler-{i}\n"));
    }
    std::fs::write(&list, text).unwrap();
    let (code, stdout, stderr) = revoke(&list_arg, "");
    assert_eq!(code, Some(0), "{stderr}");
    for progress in [
        "revoked 1000/2500",
        "revoked 2000/2500",
        "revoked 2500/2500",
    ] {
        assert!(stderr.contains(progress), "{stderr}");
    }
    assert!(stdout.contains("revoked:  2500 target(s)"), "{stdout}");
    assert!(stdout.contains("embedded mode"), "{stdout}");
    inst.assert_revoked(&t1).await;
    inst.assert_revoked(&t2).await;
    inst.assert_revoked(&c2).await;
    inst.assert_allowed(&t3).await;
    let entries = inst.list().await;
    assert_eq!(entries.len(), 2500);
    assert!(entries.iter().all(|e| e.reason == "incident 42"));

    // Standard input.
    let (code, stdout, stderr) = revoke("-", "sub carol\n");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("revoked:  1 target(s) from standard input"),
        "{stdout}"
    );
    assert!(stderr.is_empty(), "no progress for one batch: {stderr}");
    inst.assert_revoked(&t3).await;

    // Refused midway (max_entries = 4000): the first batch stays revoked.
    let text: String = (0..2000).map(|i| format!("jti more-{i}\n")).collect();
    std::fs::write(&list, text).unwrap();
    let (code, _, stderr) = revoke(&list_arg, "");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("1000 of 2000 target(s) were revoked before it")
            && stderr.contains("ResourceExhausted"),
        "{stderr}"
    );
    assert_eq!(inst.list().await.len(), 3501);
    inst.stop().await;
}

/// Transactions Redis has run (`EXEC` calls), from `INFO commandstats`.
fn exec_calls(redis: &RedisServer) -> i64 {
    let info = redis.command(&["INFO", "commandstats"]).unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_exec:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// With Redis: a batch made on one instance is enforced on the other, written
/// to Redis whole; with Redis down it is queued whole, and written once Redis
/// is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_one_instance_is_enforced_by_the_other() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port).await;
    let fx = two_keys();
    let a = shared_instance(&fx, "a", &proxy.url()).await;
    let b = shared_instance(&fx, "b", &redis.url()).await;
    let k1 = &fx.keys[0];
    let (t1, id1) = token(k1, "alice", |_| {});
    let (t2, id2) = token(k1, "bob", |_| {});
    let (t3, _) = token(k1, "carol", |_| {});
    let (by_kid, _) = token(&fx.keys[1], "erin", |_| {});

    let mut kinds = vec![
        by_jti(&id1),
        by_jti(&id2),
        Kind::KeyId(fx.keys[1].kid().to_owned()),
    ];
    kinds.extend((3..1000).map(|i| by_jti(&format!("filler-{i}"))));
    let execs = exec_calls(&redis);
    let done = a.try_revoke_batch(kinds).await.unwrap();
    assert_eq!((done.synced, done.queued), (1000, 0), "written to Redis");
    assert_eq!(redis.zcard(KEY), 1000);
    assert_eq!(
        exec_calls(&redis) - execs,
        1,
        "one MULTI/EXEC for the batch"
    );
    b.eventually_revoked(&t1).await;
    b.eventually_revoked(&t2).await;
    b.eventually_revoked(&by_kid).await;
    b.assert_allowed(&t3).await;
    b.eventually_status("holding the batch", |s| s.revocations == 1000)
        .await;

    // Redis unreachable from A: the batch is in force there and queued whole.
    proxy.cut();
    a.eventually_status("disconnected", |s| s.redis == "disconnected")
        .await;
    let done = a
        .try_revoke_batch(vec![
            Kind::Subject(pb::SubjectTarget {
                sub: "carol".into(),
                issued_before: None,
            }),
            by_jti("late-1"),
        ])
        .await
        .unwrap();
    assert_eq!((done.synced, done.queued), (0, 2), "queued");
    a.assert_revoked(&t3).await;
    assert_eq!(a.status().await.pending_writes, 2);
    proxy.restore();
    a.eventually_status("synced", |s| {
        s.redis == "connected" && s.pending_writes == 0
    })
    .await;
    b.eventually_revoked(&t3).await;
    assert_eq!(redis.zcard(KEY), 1002);
    a.stop().await;
    b.stop().await;
}

/// Cut-offs need one entry: every token an issuer issued up to a time ("log
/// everyone out"), a key's or a client's tokens up to a time ("distrust what
/// was issued before the breach"). Tokens issued after the cut-off pass; the
/// CLI and a `--from-file` line make the same entries; they survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_offs_revoke_what_was_issued_up_to_them_and_nothing_after() {
    let fx = Fixture::new();
    let config = instance_config(&fx, "a", "[revocation]\ndata_dir = \"data\"");
    let inst = start_instance(&config).await;
    let admin = inst.admin_addr.to_string();
    let key = fx.es256();
    let now = now();
    let issued_at = |iat: i64| {
        move |c: &mut Value| {
            c["iat"] = Value::from(iat);
            c["exp"] = Value::from(iat + 1800);
        }
    };
    let issuer = claims("x", &[], &[])["iss"].as_str().unwrap().to_owned();

    // The issuer, up to 10 minutes ago: an older token is refused, a newer
    // one passes.
    let (old, _) = token(key, "alice", issued_at(now - 900));
    let (new, _) = token(key, "alice", issued_at(now - 60));
    inst.assert_allowed(&old).await;
    let entry = inst
        .revoke(Kind::Issuer(pb::IssuerTarget {
            issuer: issuer.clone(),
            issued_before: Some(now - 600),
        }))
        .await
        .revocation
        .unwrap();
    // Kept until a token issued at the cut-off could have expired (1 h + 30 s).
    assert_eq!(entry.expires_at, now - 600 + 3600 + 30);
    let out = inst.check(&old).await;
    assert_revoked(&out);
    inst.assert_allowed(&new).await;
    // Another issuer's cut-off does not touch these tokens.
    inst.revoke(Kind::Issuer(pb::IssuerTarget {
        issuer: "https://other.example.test".into(),
        issued_before: None,
    }))
    .await;
    inst.assert_allowed(&new).await;

    // A client's tokens up to a time, through the CLI.
    let (web_old, _) = token(key, "bob", |c| {
        issued_at(now - 300)(c);
        c["client_id"] = Value::from("web");
    });
    let (web_new, _) = token(key, "bob", |c| {
        issued_at(now - 30)(c);
        c["client_id"] = Value::from("web");
    });
    let (ok, stdout, stderr) = cli(&[
        "revoke",
        "--admin",
        &admin,
        "--client",
        "web",
        "--before",
        &rfc3339_of(now - 60),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("client \"web\" (issued at or before"),
        "{stdout}"
    );
    inst.assert_revoked(&web_old).await;
    inst.assert_allowed(&web_new).await;

    // A key's tokens up to a time, from a file.
    let list = fx.path("cutoffs.txt");
    std::fs::write(
        &list,
        format!("kid {} before={}\n", key.kid(), rfc3339_of(now - 120)),
    )
    .unwrap();
    let (ok, _, stderr) = cli(&["revoke", "--admin", &admin, "--from-file", &path_arg(&list)]);
    assert!(ok, "{stderr}");
    let (key_old, _) = token(key, "carol", issued_at(now - 200));
    let (key_new, _) = token(key, "carol", issued_at(now - 30));
    inst.assert_revoked(&key_old).await;
    inst.assert_allowed(&key_new).await;
    let (ok, _, stderr) = cli(&["revoke", "--admin", &admin, "--jti", "x", "--before", "now"]);
    assert!(!ok && stderr.contains("--before goes with"), "{stderr}");

    // The cut-offs survive a restart (the journal keeps them).
    inst.stop().await;
    let inst = start_instance(&config).await;
    inst.assert_revoked(&old).await;
    inst.assert_revoked(&web_old).await;
    inst.assert_revoked(&key_old).await;
    inst.assert_allowed(&new).await;
    inst.assert_allowed(&key_new).await;
    let kinds: Vec<String> = inst
        .list()
        .await
        .iter()
        .map(|r| format!("{:?}", r.target))
        .collect();
    assert!(kinds.iter().any(|k| k.contains("Issuer(")), "{kinds:?}");
    assert!(kinds.iter().any(|k| k.contains("Client(")), "{kinds:?}");
    assert!(kinds.iter().any(|k| k.contains("Key(")), "{kinds:?}");
    inst.stop().await;
}

/// `secs` as RFC 3339 (UTC).
fn rfc3339_of(secs: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs as u64))
        .to_string()
}
