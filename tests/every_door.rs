//! One pipeline, every door: the same question asked through Envoy's gRPC
//! `Check`, Envoy's HTTP (`http_service`) mode, forward auth, the service API
//! (`IsAuthorized`) and AuthZEN gets the same answer, from one `serve` with all
//! its listeners, and the doors share one decision cache.

mod common;

use common::*;
use portcullis::authorizer::pb::authorizer_client::AuthorizerClient;
use portcullis::authorizer::pb::{
    self, Credential, Entity, IsAuthorizedRequest, credential, is_authorized_request,
};
use portcullis::serve;
use serde_json::{Value, json};
use tonic::transport::Channel;

const AUTHZEN_TOKEN: &str = "pep-token-0123456789abcdef";
const HOST: &str = "orders.example.test";

/// The action and context `Check` builds for `method path` from `ip`.
fn question(method: &str, path: &str, ip: &str) -> (String, Value) {
    let (template, params) = match path.strip_prefix("/orders/") {
        Some(id) => ("/orders/{id}", json!({ "id": id })),
        None => ("/orders", json!({})),
    };
    let context = json!({
        "http": {
            "method": method,
            "path": path,
            "host": HOST,
            "scheme": "https",
            "source_ip": { "__extn": { "fn": "ip", "arg": ip } },
        },
        "path_params": params,
    });
    (
        format!("{} {template}", method.to_ascii_lowercase()),
        context,
    )
}

/// One HTTP/1.1 request to `addr`; the status.
async fn http_status(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> u16 {
    common::envoy::send(addr, method, path, headers)
        .await
        .unwrap()
        .status
}

async fn decision_cache_hits(metrics: std::net::SocketAddr) -> f64 {
    scrape_metrics(metrics)
        .await
        .lines()
        .find(|l| l.starts_with("portcullis_cache_hits_total{cache=\"decision\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_question_gets_the_same_answer_through_every_door() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    // carol is an admin through entities.json, so AuthZEN (whose subjects
    // carry no token) and the token doors see the same principal.
    std::fs::write(
        fx.path("policies/entities.json"),
        r#"[{"uid":{"type":"User","id":"carol"},"attrs":{},"parents":[{"type":"Role","id":"admin"}]},{"uid":{"type":"Role","id":"admin"},"attrs":{},"parents":[]}]"#,
    )
    .unwrap();
    std::fs::write(fx.path("authzen.token"), AUTHZEN_TOKEN).unwrap();
    fx.append_config(&format!(
        "\n[audit]\nfile = \"{}\"\n\n[telemetry]\nmetrics_listen = \"127.0.0.1:0\"\n\n[http_authz]\nlisten = \"127.0.0.1:0\"\n\n[authzen]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"authzen.token\"\n",
        fx.audit_path().display()
    ));
    let (addresses, shutdown, task) =
        serve::spawn(portcullis::reload::RunningConfig::load(&fx.config_path()).unwrap())
            .await
            .unwrap();
    let channel = Channel::from_shared(format!("http://{}", addresses.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let check_client =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel.clone(),
        );
    let mut authorizer = AuthorizerClient::new(channel);
    let http_authz = addresses
        .http_authz
        .expect("the HTTP authorization listener");
    let authzen = addresses.authzen.expect("the AuthZEN listener");
    let metrics = addresses.metrics.expect("the metrics listener");
    // Serving once the engine is in: a Check answers other than 503.
    wait_for_async_serving(&check_client).await;

    let key = fx.es256();
    let users = [
        ("alice", key.token("alice", &["orders:read"], &[])),
        ("bob", key.token("bob", &["orders:write"], &[])),
        ("carol", key.token("carol", &[], &[])),
        ("dave", key.token("dave", &[], &[])),
    ];
    let http = reqwest::Client::new();
    let mut compared = 0;
    let mut hits_through_http = 0.0;
    for (user, token) in &users {
        let bearer = format!("Bearer {token}");
        for (method, path) in [
            ("GET", "/orders"),
            ("GET", "/orders/7"),
            ("POST", "/orders"),
            ("DELETE", "/orders/7"),
        ] {
            for ip in ["10.1.2.3", "203.0.113.9"] {
                let what = format!("{user}: {method} {path} from {ip}");
                // Envoy's gRPC Check.
                let mut check = envoy_request(method, path, Some(token));
                check.attributes.as_mut().unwrap().source = Some(peer(ip));
                let check = outcome(
                    &check_client
                        .clone()
                        .check(check)
                        .await
                        .unwrap()
                        .into_inner(),
                );

                // Envoy's HTTP mode, as Envoy sends it (client address and
                // scheme in the headers Envoy sets).
                let before = decision_cache_hits(metrics).await;
                let envoy_http = http_status(
                    http_authz,
                    method,
                    path,
                    &[
                        ("host", HOST),
                        ("authorization", &bearer),
                        ("x-forwarded-proto", "https"),
                        ("x-forwarded-for", ip),
                    ],
                )
                .await;
                hits_through_http += decision_cache_hits(metrics).await - before;

                // Forward auth.
                let forward = http_status(
                    http_authz,
                    "GET",
                    "/forward-auth",
                    &[
                        ("host", "portcullis.internal"),
                        ("authorization", &bearer),
                        ("x-forwarded-method", method),
                        ("x-forwarded-proto", "https"),
                        ("x-forwarded-host", HOST),
                        ("x-forwarded-uri", path),
                        ("x-forwarded-for", ip),
                    ],
                )
                .await;

                // The service API.
                let (action, context) = question(method, path, ip);
                let direct = authorizer
                    .is_authorized(IsAuthorizedRequest {
                        credential: Some(Credential {
                            kind: Some(credential::Kind::AccessToken(token.clone())),
                        }),
                        action: action.clone(),
                        resource: Some(Entity {
                            r#type: "Application".into(),
                            id: "orders".into(),
                            ..Default::default()
                        }),
                        context_kind: Some(is_authorized_request::ContextKind::ContextJson(
                            context.to_string(),
                        )),
                        entities: vec![],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let direct_allows =
                    pb::Decision::try_from(direct.decision).unwrap() == pb::Decision::Allow;

                assert_eq!(envoy_http as i32, check.http_status, "HTTP mode, {what}");
                assert_eq!(forward as i32, check.http_status, "forward auth, {what}");
                assert_eq!(
                    direct_allows,
                    check.http_status == 200,
                    "IsAuthorized, {what}"
                );
                assert_eq!(check.metadata["reason"], direct.reason.as_str(), "{what}");

                // AuthZEN asserts the subject instead of presenting a token,
                // so it asks the same question where policies decide on the
                // principal alone: deleting (admins only, from anywhere but
                // the blocked network).
                if method == "DELETE" && token_has_no_scopes(user) {
                    let answer: Value = http
                        .post(format!("http://{authzen}/access/v1/evaluation"))
                        .bearer_auth(AUTHZEN_TOKEN)
                        .json(&json!({
                            "subject": { "type": "User", "id": user },
                            "action": { "name": action },
                            "resource": { "type": "Application", "id": "orders" },
                            "context": context,
                        }))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    assert_eq!(
                        answer["decision"],
                        check.http_status == 200,
                        "AuthZEN, {what}: {answer}"
                    );
                    compared += 1;
                }
                compared += 3;
            }
        }
    }
    assert_eq!(compared, 4 * 4 * 2 * 3 + 4);
    // Questions Check had just decided were answered from the same cache.
    assert!(
        hits_through_http > 0.0,
        "the HTTP mode never hit the decision cache Check filled"
    );

    shutdown.request();
    shutdown.request();
    task.await.unwrap().unwrap();
}

fn token_has_no_scopes(user: &str) -> bool {
    matches!(user, "carol" | "dave")
}

async fn wait_for_async_serving(
    client: &envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<
        Channel,
    >,
) {
    for _ in 0..600 {
        let out = outcome(
            &client
                .clone()
                .check(envoy_request("GET", "/orders", None))
                .await
                .unwrap()
                .into_inner(),
        );
        if out.http_status != 503 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("never served");
}
