//! The OpenID AuthZEN Authorization API 1.0 (`[authzen]`), over real HTTP on
//! loopback against the server started in-process (`serve::spawn`): the
//! interop Todo scenario's published decisions, the three batch semantics,
//! the metadata document, caller authentication (bearer token, mTLS) and
//! malformed requests.
//!
//! The Todo policy folder is `tests/data/authzen-todo/` (our Cedar rendering
//! of the scenario's rules). The expected decisions,
//! `tests/data/authzen-todo-decisions.json`, are a verbatim copy of
//! `interop/authzen-todo-backend/test/decisions-authorization-api-1_0-02.json`
//! from the OpenID AuthZEN working group's repository
//! (github.com/openid/authzen, commit e287920): the 1.0 API's `evaluation`
//! and `evaluations` vectors.

mod common;

use std::time::Duration;

use common::pki::TestCa;
use common::*;
use portcullis::serve::{self, ServeError, Shutdown};
use reqwest::StatusCode;
use serde_json::{Value, json};

const TOKEN: &str = "pep-token-0123456789";
const RICK: &str = "CiRmZDA2MTRkMy1jMzlhLTQ3ODEtYjdiZC04Yjk2ZjVhNTEwMGQSBWxvY2Fs";
const MORTY: &str = "CiRmZDE2MTRkMy1jMzlhLTQ3ODEtYjdiZC04Yjk2ZjVhNTEwMGQSBWxvY2Fs";

/// A deployment of the Todo policy folder with `[authzen]`.
struct Pdp {
    fx: Fixture,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
    client: reqwest::Client,
    base: String,
}

/// The configuration: the Todo policy folder, one (unused) token issuer, the
/// audit log in the fixture, and `[authzen]` with `authzen` appended.
fn write_config(fx: &Fixture, authzen: &str) {
    std::fs::write(fx.path("authzen.token"), format!("{TOKEN}\n")).unwrap();
    let policies = repo_root().join("tests/data/authzen-todo");
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[policies]
dir = '{}'

[application]
name = "todo"

[[issuers]]
issuer = "https://auth.example.test"
audiences = ["todo"]
jwks_file = "jwks.json"

[audit]
file = "audit.log"

[authzen]
listen = "127.0.0.1:0"
{authzen}
"#,
        policies.display()
    );
    std::fs::write(fx.config_path(), config).unwrap();
}

impl Pdp {
    async fn start(authzen: &str) -> Pdp {
        Self::start_with(authzen, reqwest::Client::builder(), "http").await
    }

    async fn start_with(authzen: &str, client: reqwest::ClientBuilder, scheme: &str) -> Pdp {
        let fx = Fixture::new();
        write_config(&fx, authzen);
        let (addresses, shutdown, task) = serve::spawn(fx.config()).await.unwrap();
        let addr = addresses.authzen.expect("an AuthZEN listener");
        let host = match scheme {
            "https" => format!("localhost:{}", addr.port()),
            _ => addr.to_string(),
        };
        Pdp {
            fx,
            shutdown,
            task,
            client: client.timeout(Duration::from_secs(30)).build().unwrap(),
            base: format!("{scheme}://{host}"),
        }
    }

    /// Waits until the engine answers (503 before policies load).
    async fn ready(&self, token: Option<&str>) {
        for _ in 0..600 {
            let (status, _) = self
                .post_as(
                    "/access/v1/evaluation",
                    &todo(RICK, "can_read_todos"),
                    token,
                )
                .await;
            if status != StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(status, StatusCode::OK);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the AuthZEN API never answered");
    }

    async fn post_as(&self, path: &str, body: &Value, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post_as(path, body, Some(TOKEN)).await
    }

    /// Asks `body` at the single endpoint: the decision, after checking that
    /// the answer is a 200 with a boolean decision.
    async fn decide(&self, body: &Value) -> bool {
        let (status, answer) = self.post("/access/v1/evaluation", body).await;
        assert_eq!(status, StatusCode::OK, "{body}: {answer}");
        answer["decision"].as_bool().expect("a boolean decision")
    }

    async fn stop(self) -> Fixture {
        self.shutdown.request();
        self.shutdown.request();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("serve stops")
            .unwrap()
            .unwrap();
        self.fx
    }
}

fn todo(subject: &str, action: &str) -> Value {
    json!({
        "subject": {"type": "user", "id": subject},
        "action": {"name": action},
        "resource": {"type": "todo", "id": "todo-1"},
        "context": {},
    })
}

fn owned(owner: &str) -> Value {
    json!({"type": "todo", "id": format!("todo-of-{owner}"), "properties": {"ownerID": owner}})
}

fn decisions(answer: &Value) -> Vec<bool> {
    answer["evaluations"]
        .as_array()
        .expect("an evaluations array")
        .iter()
        .map(|d| d["decision"].as_bool().expect("a boolean decision"))
        .collect()
}

/// Every decision of the published Todo scenario (1.0), single and batch,
/// through the API; each is audited like an IsAuthorized decision.
#[tokio::test]
async fn the_interop_todo_scenario_decides_as_published() {
    let pdp = Pdp::start("token_file = \"authzen.token\"").await;
    pdp.ready(Some(TOKEN)).await;
    let vectors: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/data/authzen-todo-decisions.json"))
            .unwrap(),
    )
    .unwrap();
    let single = vectors["evaluation"].as_array().unwrap();
    assert_eq!(single.len(), 40);
    let mut decision_ids = Vec::new();
    for vector in single {
        let (status, answer) = pdp.post("/access/v1/evaluation", &vector["request"]).await;
        assert_eq!(status, StatusCode::OK, "{vector}: {answer}");
        assert_eq!(
            answer["decision"], vector["expected"],
            "{}: {answer}",
            vector["request"]
        );
        decision_ids.push(
            answer["context"]["decision_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let batches = vectors["evaluations"].as_array().unwrap();
    assert_eq!(batches.len(), 3);
    for vector in batches {
        let (status, answer) = pdp.post("/access/v1/evaluations", &vector["request"]).await;
        assert_eq!(status, StatusCode::OK, "{vector}: {answer}");
        let expected: Vec<bool> = vector["expected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["decision"].as_bool().unwrap())
            .collect();
        assert_eq!(decisions(&answer), expected, "{}", vector["request"]);
    }
    // An unknown subject has no role: denied, as it should be.
    assert!(!pdp.decide(&todo("nobody", "can_read_todos")).await);

    let fx = pdp.stop().await;
    let first = fx.audit_line(&decision_ids[0]);
    assert_eq!(first["outcome"], "allow", "{first}");
    assert_eq!(first["credential"], "authzen", "{first}");
    assert_eq!(first["issuer"], "authzen", "{first}");
    assert_eq!(first["method"], "AuthZEN.evaluation", "{first}");
    assert_eq!(first["principal"], format!("User::\"{RICK}\""), "{first}");
    assert_eq!(first["action"], "Action::\"can_read_user\"", "{first}");
    // The Todo vectors: 40 single and 6 batched decisions, each audited.
    let authzen_lines = fx
        .audit_lines()
        .into_iter()
        .filter(|l| l["credential"] == "authzen")
        .count();
    assert_eq!(
        authzen_lines,
        40 + 6 + 1 + 1,
        "with the readiness probe and the unknown subject"
    );
}

/// `execute_all` (the default), `deny_on_first_deny`, `permit_on_first_permit`,
/// defaults with overrides, an empty `evaluations` array, and an item that
/// cannot be evaluated (a closed decision carrying the error).
#[tokio::test]
async fn batch_semantics() {
    let pdp = Pdp::start("token_file = \"authzen.token\"").await;
    pdp.ready(Some(TOKEN)).await;
    let rick = "rick@the-citadel.com";
    let morty = "morty@the-citadel.com";
    // Morty (an editor) may update his own todos only.
    let batch = |semantic: Option<&str>, owners: &[&str]| {
        let mut body = json!({
            "subject": {"type": "user", "id": MORTY},
            "action": {"name": "can_update_todo"},
            "evaluations": owners.iter().map(|o| json!({"resource": owned(o)})).collect::<Vec<_>>(),
        });
        if let Some(semantic) = semantic {
            body["options"] = json!({"evaluations_semantic": semantic});
        }
        body
    };
    let path = "/access/v1/evaluations";

    let (status, all) = pdp.post(path, &batch(None, &[morty, rick, morty])).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(decisions(&all), [true, false, true]);
    assert!(all.get("decision").is_none(), "{all}");
    let (_, all) = pdp
        .post(path, &batch(Some("execute_all"), &[morty, rick, morty]))
        .await;
    assert_eq!(decisions(&all), [true, false, true]);

    let (_, and) = pdp
        .post(
            path,
            &batch(Some("deny_on_first_deny"), &[morty, rick, morty]),
        )
        .await;
    assert_eq!(decisions(&and), [true, false], "{and}");
    assert_eq!(
        and["evaluations"][1]["context"]["evaluations_semantic"],
        "deny_on_first_deny"
    );
    let (_, and) = pdp
        .post(path, &batch(Some("deny_on_first_deny"), &[morty, morty]))
        .await;
    assert_eq!(decisions(&and), [true, true], "no deny: every result");

    let (_, or) = pdp
        .post(
            path,
            &batch(Some("permit_on_first_permit"), &[rick, morty, rick]),
        )
        .await;
    assert_eq!(decisions(&or), [false, true], "{or}");
    let (_, or) = pdp
        .post(path, &batch(Some("permit_on_first_permit"), &[rick, rick]))
        .await;
    assert_eq!(decisions(&or), [false, false], "no permit: every result");

    // Item members override the defaults; the context default applies.
    let (status, mixed) = pdp
        .post(
            path,
            &json!({
                "subject": {"type": "user", "id": MORTY},
                "action": {"name": "can_delete_todo"},
                "context": {},
                "evaluations": [
                    {"resource": owned(rick)},
                    {"action": {"name": "can_create_todo"}, "resource": owned(rick)},
                    {"subject": {"type": "user", "id": RICK}, "resource": owned(morty)},
                ],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{mixed}");
    assert_eq!(decisions(&mixed), [false, true, true]);

    // An item that does not fit is a closed decision with the error; the
    // others are decided. Under deny_on_first_deny it stops the batch.
    let with_error = |semantic: &str| {
        json!({
            "subject": {"type": "user", "id": RICK},
            "action": {"name": "can_create_todo"},
            "options": {"evaluations_semantic": semantic},
            "evaluations": [
                {"resource": {"type": "todo", "id": "1"}},
                {"resource": {"type": "spaceship", "id": "1"}},
                {"resource": {"type": "todo", "id": "2"}},
            ],
        })
    };
    let (status, answer) = pdp.post(path, &with_error("execute_all")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(decisions(&answer), [true, false, true]);
    let error = &answer["evaluations"][1]["context"]["error"];
    assert_eq!(error["status"], 400, "{answer}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("evaluations[1].resource.type:"),
        "{answer}"
    );
    let (_, answer) = pdp.post(path, &with_error("deny_on_first_deny")).await;
    assert_eq!(decisions(&answer), [true, false]);

    // No evaluations: answered as the single endpoint answers.
    let mut single = todo(RICK, "can_create_todo");
    single["evaluations"] = json!([]);
    let (status, answer) = pdp.post(path, &single).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["decision"], true, "{answer}");
    pdp.stop().await;
}

/// The metadata document, built from the request's Host, and `X-Request-ID`
/// echoed on every answer.
#[tokio::test]
async fn metadata_and_request_ids() {
    let pdp = Pdp::start("token_file = \"authzen.token\"").await;
    let response = pdp
        .client
        .get(format!("{}/.well-known/authzen-configuration", pdp.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let metadata: Value = response.json().await.unwrap();
    assert_eq!(
        metadata,
        json!({
            "policy_decision_point": pdp.base,
            "access_evaluation_endpoint": format!("{}/access/v1/evaluation", pdp.base),
            "access_evaluations_endpoint": format!("{}/access/v1/evaluations", pdp.base),
        })
    );
    pdp.ready(Some(TOKEN)).await;
    for (token, status) in [
        (Some(TOKEN), StatusCode::OK),
        (None, StatusCode::UNAUTHORIZED),
    ] {
        let mut request = pdp
            .client
            .post(format!("{}/access/v1/evaluation", pdp.base))
            .header("x-request-id", "bfe9eb29-ab87-4ca3-be83-a1d5d8305716")
            .json(&todo(RICK, "can_read_todos"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["x-request-id"],
            "bfe9eb29-ab87-4ca3-be83-a1d5d8305716"
        );
    }
    pdp.stop().await;
}

/// The bearer token of `token_file`: none or a wrong one is a 401 (with a
/// challenge), the right one (any scheme case) is served.
#[tokio::test]
async fn callers_authenticate_with_the_token() {
    let pdp = Pdp::start("token_file = \"authzen.token\"").await;
    pdp.ready(Some(TOKEN)).await;
    let body = todo(RICK, "can_read_todos");
    let path = "/access/v1/evaluation";
    for token in [None, Some("wrong"), Some("pep-token-012345678"), Some("")] {
        let (status, answer) = pdp.post_as(path, &body, token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {answer}");
    }
    let response = pdp
        .client
        .post(format!("{}{path}", pdp.base))
        .header("authorization", "Basic cGVwOnRva2Vu")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let response = pdp
        .client
        .post(format!("{}/access/v1/evaluations", pdp.base))
        .json(&json!({"evaluations": [body.clone()]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = pdp
        .client
        .post(format!("{}{path}", pdp.base))
        .header("authorization", format!("bearer {TOKEN}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, answer) = pdp.post(path, &body).await;
    assert_eq!(
        (status, &answer["decision"]),
        (StatusCode::OK, &json!(true))
    );
    pdp.stop().await;
}

/// With `[authzen.tls] client_ca_file`, a caller with a certificate chained
/// to it is served without a token; one without a certificate is not
/// served. The metadata publishes `base_url`.
#[tokio::test]
async fn mtls_callers_need_no_token() {
    let ca = TestCa::new("authzen-callers");
    let fx_dir = tempfile::tempdir().unwrap();
    let dir = fx_dir.path();
    ca.server()
        .write(&dir.join("tls.crt"), &dir.join("tls.key"));
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let authzen = format!(
        "base_url = \"https://pdp.example.test/\"\n\n[authzen.tls]\ncert_file = '{}'\nkey_file = '{}'\nclient_ca_file = '{}'\n",
        dir.join("tls.crt").display(),
        dir.join("tls.key").display(),
        dir.join("ca.pem").display()
    );
    let pep = ca.client("pep", Some("spiffe://example.test/pep"));
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", pep.cert_pem, pep.key_pem).as_bytes()).unwrap();
    let trust = || reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap();
    let pdp = Pdp::start_with(
        &authzen,
        reqwest::Client::builder()
            .tls_certs_only([trust()])
            .identity(identity),
        "https",
    )
    .await;
    pdp.ready(None).await;
    assert!(pdp.decide(&todo(MORTY, "can_create_todo")).await);
    let (status, answer) = pdp
        .post_as(
            "/access/v1/evaluation",
            &todo(MORTY, "can_create_todo"),
            None,
        )
        .await;
    assert_eq!(
        (status, &answer["decision"]),
        (StatusCode::OK, &json!(true))
    );

    let metadata: Value = pdp
        .client
        .get(format!("{}/.well-known/authzen-configuration", pdp.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        metadata["policy_decision_point"],
        "https://pdp.example.test"
    );
    assert_eq!(
        metadata["access_evaluations_endpoint"],
        "https://pdp.example.test/access/v1/evaluations"
    );

    // No client certificate: no connection, whatever the token.
    let anonymous = reqwest::Client::builder()
        .tls_certs_only([trust()])
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let refused = anonymous
        .post(format!("{}/access/v1/evaluation", pdp.base))
        .bearer_auth(TOKEN)
        .json(&todo(MORTY, "can_create_todo"))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let fx = pdp.stop().await;
    let line = fx
        .audit_lines()
        .into_iter()
        .find(|l| l["credential"] == "authzen" && l["action"] == "Action::\"can_create_todo\"")
        .expect("an audit line");
    assert_eq!(line["caller"], "spiffe://example.test/pep", "{line}");
}

/// Malformed or ill-fitting requests are refused (400, 404, 405, 413, 415)
/// and nothing is allowed.
#[tokio::test]
async fn malformed_requests_are_refused_and_nothing_is_allowed() {
    let pdp = Pdp::start("token_file = \"authzen.token\"").await;
    pdp.ready(Some(TOKEN)).await;
    let path = "/access/v1/evaluation";
    let raw = |body: &'static str, content_type: &'static str| {
        pdp.client
            .post(format!("{}{path}", pdp.base))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    for body in ["{", "", "[1,2]", "\"x\"", "{\"subject\": }"] {
        let response = raw(body, "application/json").await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    let response = raw("{}", "text/plain").await.unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let good = todo(RICK, "can_create_todo");
    assert!(pdp.decide(&good).await);
    // `good` with the member at `pointer` set (its parent must exist).
    let with = |pointer: &str, value: Value| {
        let mut body = good.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        body.pointer_mut(parent)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .insert(key.to_owned(), value);
        body
    };
    let mut without_subject = good.clone();
    without_subject.as_object_mut().unwrap().remove("subject");
    let cases: Vec<(Value, &str)> = vec![
        (without_subject, "subject: is required"),
        (with("/subject/id", json!("")), "subject.id"),
        (with("/subject/id", json!(7)), "subject.id"),
        (with("/subject/type", json!("spaceship")), "subject.type"),
        (with("/subject/type", json!("todo")), "subject.type"),
        (with("/action/name", json!("can_fly")), "action.name"),
        (with("/resource/type", json!("spaceship")), "resource.type"),
        (with("/resource/type", json!("user")), "resource.type"),
        (with("/context", json!([1])), "context"),
        (with("/context", json!({"unknown": 1})), "context"),
        (
            with("/context", json!({"token": {"iss": "x"}})),
            "context.token",
        ),
        (
            with("/resource/properties", json!({"ownerID": 5})),
            "resource.properties",
        ),
        (
            with("/resource/properties", json!({"color": "red"})),
            "resource.properties",
        ),
        (
            with("/subject/properties", json!({"roles": ["admin"]})),
            "subject.properties",
        ),
        (
            with("/action/properties", json!({"method": "GET"})),
            "action.properties",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = pdp.post(path, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let message = answer.as_str().unwrap_or_default();
        assert!(message.starts_with(field), "{body}: {message}");
    }
    // A whole-payload problem of a batch is a 400 too.
    for body in [
        json!({"evaluations": {}}),
        json!({"evaluations": [good.clone()], "options": {"evaluations_semantic": "any"}}),
        json!({"evaluations": vec![good.clone(); 101]}),
    ] {
        let (status, answer) = pdp.post("/access/v1/evaluations", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    }
    // Over 64 KiB.
    let mut huge = good.clone();
    huge["context"] = json!({"padding": "x".repeat(70 * 1024)});
    let (status, _) = pdp.post(path, &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Other methods and paths.
    let get = pdp
        .client
        .get(format!("{}{path}", pdp.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers()["allow"], "POST");
    let (status, _) = pdp.post("/access/v1/search/subject", &good).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let post_metadata = pdp.post("/.well-known/authzen-configuration", &good).await;
    assert_eq!(post_metadata.0, StatusCode::METHOD_NOT_ALLOWED);

    // Only the readiness probe and the one good request were decided.
    let fx = pdp.stop().await;
    let decided: Vec<Value> = fx
        .audit_lines()
        .into_iter()
        .filter(|l| l["credential"] == "authzen")
        .collect();
    assert_eq!(decided.len(), 2, "{decided:?}");
}

/// `[authzen]` without a caller authentication method is refused at start.
#[tokio::test]
async fn a_section_without_caller_authentication_is_refused() {
    let fx = Fixture::new();
    write_config(&fx, "");
    let refused = match serve::spawn(fx.config()).await {
        Err(e) => e,
        Ok((_, _, task)) => tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("serve stops")
            .unwrap()
            .unwrap_err(),
    };
    let message = refused.to_string();
    assert!(message.contains("[authzen]"), "{message}");
    assert!(message.contains("token_file"), "{message}");
}
