//! TLS and mTLS on the gRPC and admin listeners of `portcullis serve`, with
//! certificates made in the test: who may connect, what the caller's identity
//! does (audit line, workload assertions in `IsAuthorized`), certificate
//! rotation under traffic, and the CLI's refusal to send the admin token in
//! the clear.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::pki::{CertifiedKey, TestCa, client_tls, connect};
use common::served::Served;
use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::authorizer::pb;
use tonic::transport::Channel;

const ENVOY_ID: &str = "spiffe://cluster.local/ns/mesh/sa/envoy";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/mesh/sa/gateway";
const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

/// The PKI of one test: the server's CA and certificate, the CA of client
/// certificates, and the files the configuration names.
struct Pki {
    server_ca: TestCa,
    client_ca: TestCa,
}

impl Pki {
    /// Writes `server.crt`, `server.key` and `client-ca.crt` into `fx`.
    fn new(fx: &Fixture) -> Pki {
        let pki = Pki {
            server_ca: TestCa::new("Portcullis test server CA"),
            client_ca: TestCa::new("Portcullis test client CA"),
        };
        pki.server_ca
            .server()
            .write(&fx.path("server.crt"), &fx.path("server.key"));
        std::fs::write(fx.path("client-ca.crt"), &pki.client_ca.pem).unwrap();
        pki
    }

    fn client(&self, spiffe_id: &str) -> CertifiedKey {
        self.client_ca.client("client", Some(spiffe_id))
    }

    /// `portcullis serve` on `fx`, its channel an mTLS client as `spiffe_id`.
    async fn serve_as(&self, fx: &Fixture, spiffe_id: &str) -> Served {
        let identity = self.client(spiffe_id);
        Served::start_tls(
            &fx.config_path(),
            &[],
            Some(client_tls(&self.server_ca.pem, Some(&identity))),
        )
        .await
    }

    /// A new mTLS connection to `addr` as `spiffe_id`.
    async fn connect_as(&self, addr: std::net::SocketAddr, spiffe_id: &str) -> Channel {
        connect(
            addr,
            client_tls(&self.server_ca.pem, Some(&self.client(spiffe_id))),
        )
        .await
        .unwrap()
    }
}

/// `[server.tls]` (with the client CA: mTLS) and a file audit log.
fn tls_config(mtls: bool) -> String {
    let ca = if mtls {
        "client_ca_file = \"client-ca.crt\"\n"
    } else {
        ""
    };
    format!(
        "\n[server.tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n{ca}reload_interval = \"100ms\"\n\n[audit]\nfile = \"audit.log\"\nflush_interval_ms = 0\n"
    )
}

async fn check_on(channel: &Channel, token: &str) -> Result<Outcome, tonic::Status> {
    AuthorizationClient::new(channel.clone())
        .check(envoy_request("GET", "/orders/7", Some(token)))
        .await
        .map(|r| outcome(&r.into_inner()))
}

/// With a client CA, only clients presenting a certificate chained to it get
/// an answer; the caller's SPIFFE ID is in the audit line of its decisions.
#[tokio::test]
async fn mtls_admits_only_clients_of_the_client_ca_and_records_the_caller() {
    let fx = Fixture::new();
    let pki = Pki::new(&fx);
    fx.append_config(&tls_config(true));
    let served = pki.serve_as(&fx, ENVOY_ID).await;
    let envoy = pki.client(ENVOY_ID);
    let token = fx.es256().token("alice", &["orders:read"], &[]);

    let out = check_on(&served.channel, &token).await.unwrap();
    assert_eq!(out.http_status, 200);
    let line = fx.audit_line(&out.decision_id);
    assert_eq!(line["caller"], ENVOY_ID, "{line}");

    // A certificate with no SPIFFE ID is known by its subject.
    let plain_subject = pki.client_ca.client("billing-batch", None);
    let channel = connect(
        served.addr,
        client_tls(&pki.server_ca.pem, Some(&plain_subject)),
    )
    .await
    .unwrap();
    let out = check_on(&channel, &token).await.unwrap();
    assert_eq!(
        fx.audit_line(&out.decision_id)["caller"],
        "CN=billing-batch"
    );

    // Refused: no client certificate, one from another CA, and plaintext.
    let stranger = TestCa::new("someone else").client("intruder", Some(ENVOY_ID));
    for (what, tls) in [
        (
            "no client certificate",
            client_tls(&pki.server_ca.pem, None),
        ),
        (
            "a client certificate of another CA",
            client_tls(&pki.server_ca.pem, Some(&stranger)),
        ),
    ] {
        let answered = match connect(served.addr, tls).await {
            Ok(channel) => check_on(&channel, &token).await.is_ok(),
            Err(_) => false,
        };
        assert!(!answered, "{what} got an answer");
    }
    let plaintext = Channel::from_shared(format!("http://{}", served.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        assert!(
            check_on(&channel, &token).await.is_err(),
            "plaintext answered"
        );
    }
    // The server trusts only its own client CA: the server certificate's CA
    // is not a client CA, and the client does not trust a stranger's server.
    assert!(
        connect(served.addr, client_tls(&TestCa::new("x").pem, Some(&envoy)))
            .await
            .is_err()
    );
    served.stop().await;
}

/// The certificate files are replaced while a client keeps sending checks on
/// one connection: that connection never fails, and new connections get the
/// new certificate (trusted by the new CA only) without a restart.
#[tokio::test]
async fn certificates_rotate_under_traffic_without_a_dropped_request() {
    let fx = Fixture::new();
    let pki = Pki::new(&fx);
    fx.append_config(&tls_config(true));
    let served = pki.serve_as(&fx, ENVOY_ID).await;
    let envoy = pki.client(ENVOY_ID);
    let token = fx.es256().token("alice", &["orders:read"], &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (channel, token) = (served.channel.clone(), token.clone());
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match check_on(&channel, &token).await {
                    Ok(out) if out.http_status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        })
    };
    wait_for("traffic before the rotation", || {
        ok.load(Ordering::SeqCst) > 20
    })
    .await;

    // cert-manager renews the certificate, here from a new CA.
    let new_ca = TestCa::new("Portcullis rotated server CA");
    new_ca
        .server()
        .write(&fx.path("server.crt"), &fx.path("server.key"));
    let mut rotated = false;
    for _ in 0..600 {
        if connect(served.addr, client_tls(&new_ca.pem, Some(&envoy)))
            .await
            .is_ok()
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the new certificate was never served");
    let after_rotation = ok.load(Ordering::SeqCst);
    wait_for("traffic after the rotation", || {
        ok.load(Ordering::SeqCst) > after_rotation + 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed");

    // New connections no longer get the old certificate.
    assert!(
        connect(served.addr, client_tls(&pki.server_ca.pem, Some(&envoy)))
            .await
            .is_err()
    );
    // A broken rotation (a key that is not PEM) keeps the certificate in
    // force and says so.
    std::fs::write(fx.path("server.key"), "not a key\n").unwrap();
    wait_for("the failed reload to be logged", || {
        served.logs.lock().unwrap().iter().any(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("TLS reload failed"))
        })
    })
    .await;
    let channel = connect(served.addr, client_tls(&new_ca.pem, Some(&envoy)))
        .await
        .unwrap();
    assert_eq!(check_on(&channel, &token).await.unwrap().http_status, 200);
    served.stop().await;
}

fn workload_request(id: &str) -> pb::IsAuthorizedRequest {
    pb::IsAuthorizedRequest {
        credential: Some(pb::Credential {
            kind: Some(pb::credential::Kind::WorkloadIdentity(id.into())),
        }),
        action: "get /orders".into(),
        resource: Some(pb::Entity {
            r#type: "Application".into(),
            id: "orders".into(),
            ..Default::default()
        }),
        context_kind: Some(pb::is_authorized_request::ContextKind::ContextJson(
            serde_json::json!({
                "http": { "method": "GET", "path": "/orders", "host": "orders.example.test", "scheme": "https" },
                "path_params": {},
            })
            .to_string(),
        )),
        ..Default::default()
    }
}

async fn is_authorized(channel: &Channel, id: &str) -> pb::IsAuthorizedResponse {
    pb::authorizer_client::AuthorizerClient::new(channel.clone())
        .is_authorized(workload_request(id))
        .await
        .unwrap()
        .into_inner()
}

/// Only an mTLS caller named in `[workload] asserting_callers` may ask
/// `IsAuthorized` as a workload; any other caller's assertion is a deny
/// (`untrusted_caller`), however trusted the asserted identity.
#[tokio::test]
async fn only_allowed_mtls_callers_may_assert_a_workload_identity() {
    let fx = Fixture::new();
    let pki = Pki::new(&fx);
    fx.append_config(&format!(
        "\n[workload]\ntrust_domains = [\"cluster.local\"]\nasserting_callers = [\"{GATEWAY_ID}\"]\n{}",
        tls_config(true)
    ));
    std::fs::write(
        fx.path("policies/workloads.cedar"),
        format!(
            "@id(\"checkout-lists-orders\")\npermit (principal == Workload::\"{CHECKOUT}\", action == Action::\"get /orders\", resource);\n"
        ),
    )
    .unwrap();
    let served = pki.serve_as(&fx, GATEWAY_ID).await;

    let out = is_authorized(&served.channel, CHECKOUT).await;
    assert_eq!(out.decision, pb::Decision::Allow as i32, "{out:?}");
    assert_eq!(out.principal, format!("Workload::\"{CHECKOUT}\""));
    let line = fx.audit_line(&out.decision_id);
    assert_eq!(line["caller"], GATEWAY_ID, "{line}");
    assert_eq!(line["credential"], "workload");

    // Another client of the same CA is authenticated, but may not assert.
    let other = pki.connect_as(served.addr, CHECKOUT).await;
    let out = is_authorized(&other, CHECKOUT).await;
    assert_eq!(out.decision, pb::Decision::Deny as i32);
    assert_eq!(out.reason, "untrusted_caller");
    assert_eq!(out.principal, "");
    served.stop().await;
}

/// `asserting_callers` without mTLS on the listener is refused at load: no
/// caller could ever be identified.
#[test]
fn asserting_callers_need_mtls() {
    let fx = Fixture::new();
    fx.append_config(&format!(
        "\n[workload]\ntrust_domains = [\"cluster.local\"]\nasserting_callers = [\"{GATEWAY_ID}\"]\n"
    ));
    let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("asserting_callers needs mTLS"), "{stderr}");
}

/// A plaintext admin listener on a non-loopback address is refused unless
/// explicitly allowed.
#[test]
fn a_non_loopback_plaintext_admin_listener_is_refused() {
    let fx = Fixture::new();
    let admin = format!("\n[admin]\nlisten = \"0.0.0.0:0\"\ntoken = \"{ADMIN_TOKEN}\"\n");
    fx.append_config(&admin);
    let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    assert!(!stderr.contains(ADMIN_TOKEN), "{stderr}");

    fx.append_config("allow_plaintext = true\n");
    let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The admin listener over TLS, driven by the CLI as an operator would; the
/// CLI never sends the admin token in plaintext to a non-loopback address.
#[tokio::test]
async fn the_cli_reaches_a_tls_admin_listener_and_never_sends_the_token_in_the_clear() {
    let fx = Fixture::new();
    let pki = Pki::new(&fx);
    fx.append_config(&format!(
        "\n[revocation]\ndata_dir = \"data\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\n[admin.tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n"
    ));
    std::fs::write(fx.path("server-ca.crt"), &pki.server_ca.pem).unwrap();
    let served = Served::start(&fx, &[]).await;
    let admin = served.admin.expect("admin listener");
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(args)
            .env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("PORTCULLIS_ADMIN")
            .env_remove("PORTCULLIS_ADMIN_CA")
            .output()
            .unwrap()
    };
    let ca = path_arg(&fx.path("server-ca.crt"));
    let https = format!("https://{admin}");
    let out = cli(&["status", "--admin", &https, "--admin-ca", &ca]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `--admin-ca` alone means TLS too.
    let out = cli(&["status", "--admin", &admin.to_string(), "--admin-ca", &ca]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // https without a CA to check the server against: refused before connecting.
    let out = cli(&["status", "--admin", &https]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-ca"));

    // Plaintext to a non-loopback address: refused, nothing sent.
    for address in [
        "192.0.2.10:9192",
        "http://192.0.2.10:9192",
        "[2001:db8::1]:9192",
    ] {
        let out = cli(&["status", "--admin", address]);
        assert!(!out.status.success(), "{address}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("refusing to send the admin token in plaintext"),
            "{address}: {stderr}"
        );
        assert!(!stderr.contains(ADMIN_TOKEN));
    }
    served.stop().await;
}

/// Policies read the mTLS caller as `context.caller` where the action's
/// context declares `caller?: String`. The decision cache keys on it: the
/// same token and request from two callers get each their own decision, in
/// either order.
#[tokio::test]
async fn policies_see_the_caller_and_the_decision_cache_keeps_callers_apart() {
    let fx = Fixture::new();
    let pki = Pki::new(&fx);
    fx.append_config(&tls_config(true));
    let schema = std::fs::read_dir(fx.path("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cedarschema"))
        .unwrap();
    let text = std::fs::read_to_string(&schema).unwrap();
    assert!(text.contains("workload?: String"));
    std::fs::write(
        &schema,
        text.replace("workload?: String", "workload?: String, caller?: String"),
    )
    .unwrap();
    std::fs::write(
        fx.path("policies/callers.cedar"),
        format!(
            "@id(\"only-through-envoy\")\nforbid (principal, action, resource)\nunless {{ context has caller && context.caller == \"{ENVOY_ID}\" }};\n"
        ),
    )
    .unwrap();
    let served = pki.serve_as(&fx, ENVOY_ID).await;
    let other = pki.connect_as(served.addr, GATEWAY_ID).await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    for _ in 0..2 {
        let out = check_on(&other, &token).await.unwrap();
        assert_eq!(out.http_status, 403);
        assert_eq!(fx.audit_line(&out.decision_id)["reason"], "policy_denied");
        let out = check_on(&served.channel, &token).await.unwrap();
        assert_eq!(out.http_status, 200);
    }

    // `IsAuthorized` sees the caller the same way, and a service cannot set it.
    let direct = |channel: &Channel, context: serde_json::Value| {
        let channel = channel.clone();
        let token = token.clone();
        async move {
            pb::authorizer_client::AuthorizerClient::new(channel)
                .is_authorized(pb::IsAuthorizedRequest {
                    credential: Some(pb::Credential {
                        kind: Some(pb::credential::Kind::AccessToken(token)),
                    }),
                    action: "get /orders".into(),
                    resource: Some(pb::Entity {
                        r#type: "Application".into(),
                        id: "orders".into(),
                        ..Default::default()
                    }),
                    context_kind: Some(pb::is_authorized_request::ContextKind::ContextJson(
                        context.to_string(),
                    )),
                    ..Default::default()
                })
                .await
        }
    };
    let context = serde_json::json!({
        "http": { "method": "GET", "path": "/orders", "host": "h", "scheme": "https" },
        "path_params": {},
    });
    let allowed = direct(&served.channel, context.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.decision, pb::Decision::Allow as i32, "{allowed:?}");
    let denied = direct(&other, context.clone()).await.unwrap().into_inner();
    assert_eq!(denied.reason, "policy_denied");
    let mut forged = context;
    forged["caller"] = serde_json::json!(ENVOY_ID);
    let refused = direct(&other, forged).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("context.caller"), "{refused:?}");
    served.stop().await;
}
