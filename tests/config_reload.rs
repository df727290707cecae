//! The whole configuration reloads, not only the policy folder: a changed
//! `portcullis.toml` is read again by the server's watcher, validated whole,
//! and swapped in (or rejected, the running configuration serving on).

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::reload::RunningConfig;
use portcullis::serve;
use tonic::transport::Channel;

/// A served quickstart whose configuration file is watched every 100 ms.
async fn served(
    fx: &Fixture,
) -> (
    serve::Addresses,
    serve::Shutdown,
    tokio::task::JoinHandle<Result<(), serve::ServeError>>,
    AuthorizationClient<Channel>,
) {
    edit_config(fx, |text| {
        text.replace(
            "dir = \"policies\"",
            "dir = \"policies\"\nwatch_interval = \"100ms\"",
        ) + &format!(
            "\n[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n\n[audit]\nfile = \"{}\"\n",
            fx.audit_path().display()
        )
    });
    let config = RunningConfig::load(&fx.config_path()).unwrap();
    let (addresses, shutdown, task) = serve::spawn(config).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", addresses.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    wait_for_health(&channel, 1).await;
    (addresses, shutdown, task, AuthorizationClient::new(channel))
}

fn edit_config(fx: &Fixture, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(fx.config_path()).unwrap();
    // A rename, so the watcher never reads a half-written file.
    let staged = fx.path("portcullis.toml.new");
    std::fs::write(&staged, edit(text)).unwrap();
    std::fs::rename(&staged, fx.config_path()).unwrap();
}

async fn check(client: &AuthorizationClient<Channel>, token: &str) -> Outcome {
    outcome(
        &client
            .clone()
            .check(envoy_request("GET", "/orders/7", Some(token)))
            .await
            .unwrap()
            .into_inner(),
    )
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let text = scrape_metrics(addr).await;
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Polls until `condition` holds for the outcome of a check with `token`.
async fn until(
    client: &AuthorizationClient<Channel>,
    token: &str,
    what: &str,
    condition: impl Fn(&Outcome) -> bool,
) -> Outcome {
    for _ in 0..600 {
        let out = check(client, token).await;
        if condition(&out) {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_new_issuer_and_response_settings_apply_without_a_restart() {
    let fx = Fixture::new();
    let (_addresses, shutdown, task, client) = served(&fx).await;
    let first = fx.es256().token("alice", &["orders:read"], &[]);
    let second_key = TestKey::es256();
    let mut claims = claims("bob", &["orders:read"], &[]);
    claims["iss"] = "https://second.example.test".into();
    let second = second_key.sign(&claims);
    std::fs::write(
        fx.path("second-jwks.json"),
        jwks_of(&[&second_key]).to_string(),
    )
    .unwrap();

    let before = check(&client, &first).await;
    assert_eq!(before.http_status, 200);
    assert_eq!(before.header("x-portcullis-subject"), Some("alice"));
    assert_eq!(check(&client, &second).await.http_status, 401);

    edit_config(&fx, |text| {
        text.replace("x-portcullis-subject", "x-caller")
            + r#"
[[issuers]]
issuer = "https://second.example.test"
audiences = ["orders-api"]
jwks_file = "second-jwks.json"
max_token_lifetime = "1h"
roles_claim = "roles"
"#
    });
    let after = until(&client, &second, "the second issuer", |o| {
        o.http_status == 200
    })
    .await;
    assert_eq!(after.header("x-caller"), Some("bob"));
    assert_eq!(after.header("x-portcullis-subject"), None);
    // The first issuer still works, under the new response settings.
    let first_after = check(&client, &first).await;
    assert_eq!(first_after.http_status, 200);
    assert_eq!(first_after.header("x-caller"), Some("alice"));

    shutdown.request();
    shutdown.request();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_invalid_configuration_is_rejected_whole_and_the_running_one_serves_on() {
    let fx = Fixture::new();
    let (addresses, shutdown, task, client) = served(&fx).await;
    let metrics = addresses.metrics.unwrap();
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    assert_eq!(check(&client, &token).await.http_status, 200);

    // Valid TOML, invalid configuration: a route with a new header name and
    // an issuer with no key source. Neither part may apply.
    edit_config(&fx, |text| {
        text.replace("x-portcullis-subject", "x-caller")
            + "\n[[issuers]]\nissuer = \"https://keyless.example.test\"\naudiences = [\"x\"]\n"
    });
    for _ in 0..600 {
        if metric(metrics, "portcullis_policy_reload_failures_total").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(metrics, "portcullis_policy_reload_failures_total").await,
        1.0
    );
    let still = check(&client, &token).await;
    assert_eq!(still.http_status, 200);
    assert_eq!(still.header("x-portcullis-subject"), Some("alice"));
    assert_eq!(still.header("x-caller"), None);

    // Fixed: the change applies.
    edit_config(&fx, |text| {
        text.replace(
            "\n[[issuers]]\nissuer = \"https://keyless.example.test\"\naudiences = [\"x\"]\n",
            "",
        )
    });
    until(&client, &token, "the fixed configuration", |o| {
        o.header("x-caller") == Some("alice")
    })
    .await;
    assert_eq!(
        metric(metrics, "portcullis_policy_reloads_total").await,
        1.0
    );

    shutdown.request();
    shutdown.request();
    task.await.unwrap().unwrap();
}

/// A reload that lets tokens live longer keeps revocations in force for as
/// long: an entry made before the change is extended, and one made after it
/// gets the new horizon. Without this, a revoked 20-hour token would be let in
/// again an hour after its revocation once `max_token_lifetime` was raised.
#[tokio::test]
async fn raising_token_lifetimes_by_reload_lengthens_revocations() {
    use portcullis::admin::pb;
    use portcullis::admin::pb::admin_client::AdminClient;
    const ADMIN_TOKEN: &str = "0123456789abcdef0123456789abcdef";

    let fx = Fixture::new();
    fx.append_config(&format!(
        "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n"
    ));
    let (addresses, shutdown, task, client) = served(&fx).await;
    let mut admin = AdminClient::connect(format!("http://{}", addresses.admin.unwrap()))
        .await
        .unwrap();
    fn authorized<T>(message: T) -> tonic::Request<T> {
        with_bearer(message, ADMIN_TOKEN)
    }
    let revoke_jti = |jti: &str| pb::RevokeRequest {
        target: Some(pb::Target {
            kind: Some(pb::target::Kind::Token(pb::TokenTarget {
                jti: jti.into(),
                issuer: String::new(),
                expires_at: None,
            })),
        }),
        reason: "test".into(),
    };
    let hour = 3600;
    let made_before = admin
        .revoke(authorized(revoke_jti("jti-before")))
        .await
        .unwrap()
        .into_inner()
        .revocation
        .unwrap();
    // The quickstart: 1 h lifetimes, 30 s leeway on both sides.
    assert!(
        made_before.expires_at <= now() + hour + 60 + 5,
        "{made_before:?}"
    );

    edit_config(&fx, |text| {
        assert!(text.contains("max_token_lifetime = \"1h\""));
        text.replace(
            "max_token_lifetime = \"1h\"",
            "max_token_lifetime = \"24h\"",
        )
    });
    let metrics = addresses.metrics.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(metrics, "portcullis_policy_reloads_total").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the change never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let made_after = admin
        .revoke(authorized(revoke_jti("jti-after")))
        .await
        .unwrap()
        .into_inner()
        .revocation
        .unwrap();
    assert!(made_after.expires_at >= now() + 24 * hour, "{made_after:?}");
    let listed = admin
        .list_revocations(authorized(pb::ListRevocationsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .revocations;
    let before_now = listed
        .iter()
        .filter(|r| format!("{:?}", r.target).contains("jti-before"))
        .map(|r| r.expires_at)
        .max()
        .unwrap();
    assert_eq!(before_now, made_before.expires_at + 23 * hour, "{listed:?}");

    // A 20-hour token with the jti revoked before the change: the new rules
    // accept its lifetime, the revocation still refuses it.
    let mut claims = claims("alice", &["orders:read"], &[]);
    let iat = now();
    claims["iat"] = iat.into();
    claims["exp"] = (iat + 20 * hour).into();
    claims["jti"] = "jti-before".into();
    let revoked = check(&client, &fx.es256().sign(&claims)).await;
    assert_eq!(revoked.http_status, 401, "{revoked:?}");
    assert_eq!(revoked.metadata["reason"], "revoked", "{revoked:?}");
    claims["jti"] = "jti-other".into();
    let allowed = check(&client, &fx.es256().sign(&claims)).await;
    assert_eq!(allowed.http_status, 200, "{allowed:?}");

    shutdown.request();
    shutdown.request();
    task.await.unwrap().unwrap();
}

/// The issuers' local key files reload too: a key added to `jwks.json` is
/// trusted, and a key removed from it (a leaked signing key) is refused,
/// without a restart and without touching `portcullis.toml`.
#[tokio::test]
async fn a_changed_local_key_file_is_reloaded() {
    let fx = Fixture::new();
    let (_addresses, shutdown, task, client) = served(&fx).await;
    let old = fx.es256();
    let old_token = old.token("alice", &["orders:read"], &[]);
    let new = TestKey::es256();
    let new_token = new.token("alice", &["orders:read"], &[]);
    assert_eq!(check(&client, &old_token).await.http_status, 200);
    let refused = check(&client, &new_token).await;
    assert_eq!(refused.http_status, 401, "{refused:?}");
    assert_eq!(refused.metadata["reason"], "unknown_key", "{refused:?}");

    // Rotate: the new key only. A rename, so no half-written file is read.
    let staged = fx.path("jwks.json.new");
    std::fs::write(&staged, jwks_of(&[&new]).to_string()).unwrap();
    std::fs::rename(&staged, fx.path("jwks.json")).unwrap();

    until(&client, &new_token, "the new key trusted", |o| {
        o.http_status == 200
    })
    .await;
    let old_now = check(&client, &old_token).await;
    assert_eq!(old_now.http_status, 401, "{old_now:?}");
    assert_eq!(old_now.metadata["reason"], "unknown_key", "{old_now:?}");

    shutdown.request();
    shutdown.request();
    task.await.unwrap().unwrap();
}
