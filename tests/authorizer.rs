//! The service-facing API (`portcullis.v1.Authorizer`) over real gRPC, against
//! the real server with the quickstart policies, in embedded revocation mode
//! with the admin API: allow, deny, credential failures, revocation, requests
//! that don't fit the schema, a batch verifying its token once, and agreement
//! with `Check` for equivalent requests.

mod common;

use std::time::Duration;

use common::*;
use portcullis::admin::pb::admin_client::AdminClient;
use portcullis::admin::pb::{self as admin_pb, target::Kind};
use portcullis::authorizer::pb::authorizer_client::AuthorizerClient;
use portcullis::authorizer::pb::{
    self, AuthorizationRequest, BatchIsAuthorizedRequest, Credential, Entity, IsAuthorizedRequest,
    IsAuthorizedResponse, authorization_request, credential, is_authorized_request,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// One instance wired as `serve` wires it: main listener (Check, Authorizer),
/// admin listener, embedded revocation store.
struct Instance {
    fx: Fixture,
    served: common::instance::AdminInstance,
}

impl Instance {
    /// A sample of the Prometheus text the metrics endpoint serves, e.g.
    /// `portcullis_signature_verifications_total`.
    async fn metric(&self, sample: &str) -> f64 {
        self.served.metric(sample).await
    }

    async fn start() -> Instance {
        Self::start_with(|_| {}).await
    }

    /// An instance whose fixture `edit` adjusts first (config, policies).
    async fn start_with(edit: impl FnOnce(&Fixture)) -> Instance {
        let fx = Fixture::with_keys(vec![TestKey::es256()]);
        edit(&fx);
        fx.append_config(&format!(
            "\n[revocation]\ndata_dir = \"data\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n"
        ));
        let served =
            common::instance::AdminInstance::start(&fx.config_path(), fx.audit_path()).await;
        Instance { fx, served }
    }

    async fn stop(self) {
        self.served.stop().await;
    }

    fn key(&self) -> &TestKey {
        self.fx.es256()
    }

    fn client(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::new(self.served.server.channel.clone())
    }

    async fn admin(&self) -> AdminClient<Channel> {
        self.served.admin().await
    }

    async fn status(&self) -> admin_pb::StatusResponse {
        let mut request = tonic::Request::new(admin_pb::StatusRequest {});
        authorize(&mut request);
        self.admin()
            .await
            .status(request)
            .await
            .unwrap()
            .into_inner()
    }

    async fn revoke_jti(&self, jti: &str) {
        let mut request = tonic::Request::new(admin_pb::RevokeRequest {
            target: Some(admin_pb::Target {
                kind: Some(Kind::Token(admin_pb::TokenTarget {
                    jti: jti.into(),
                    issuer: ISSUER.into(),
                    expires_at: None,
                })),
            }),
            reason: "test".into(),
        });
        authorize(&mut request);
        self.admin().await.revoke(request).await.unwrap();
    }

    async fn is_authorized(&self, request: IsAuthorizedRequest) -> IsAuthorizedResponse {
        self.client()
            .is_authorized(request)
            .await
            .expect("IsAuthorized succeeds")
            .into_inner()
    }

    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.served.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn audit_line(&self, decision_id: &str) -> Value {
        self.audit_lines()
            .into_iter()
            .find(|l| l["decision_id"] == decision_id)
            .unwrap_or_else(|| panic!("no audit line for {decision_id}"))
    }
}

fn authorize<T>(request: &mut tonic::Request<T>) {
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
}

fn bearer(token: &str) -> Option<Credential> {
    Some(Credential {
        kind: Some(credential::Kind::AccessToken(token.into())),
    })
}

fn orders() -> Option<Entity> {
    Some(Entity {
        r#type: "Application".into(),
        id: "orders".into(),
        ..Default::default()
    })
}

/// The action and context `Check` builds for `method path` from `source_ip`.
fn question(method: &str, path: &str, source_ip: &str) -> (String, Value) {
    let (template, params) = match path.strip_prefix("/orders/") {
        Some(id) => ("/orders/{id}", json!({ "id": id })),
        None => ("/orders", json!({})),
    };
    let action = format!("{} {template}", method.to_ascii_lowercase());
    let context = json!({
        "http": {
            "method": method,
            "path": path,
            "host": "orders.example.test",
            "scheme": "https",
            "source_ip": { "__extn": { "fn": "ip", "arg": source_ip } },
        },
        "path_params": params,
    });
    (action, context)
}

fn request(token: &str, method: &str, path: &str) -> IsAuthorizedRequest {
    let (action, context) = question(method, path, "10.1.2.3");
    IsAuthorizedRequest {
        credential: bearer(token),
        action,
        resource: orders(),
        context_kind: Some(is_authorized_request::ContextKind::ContextJson(
            context.to_string(),
        )),
        entities: vec![],
    }
}

fn batch_item(method: &str, path: &str) -> AuthorizationRequest {
    let (action, context) = question(method, path, "10.1.2.3");
    AuthorizationRequest {
        action,
        resource: orders(),
        context_kind: Some(authorization_request::ContextKind::ContextJson(
            context.to_string(),
        )),
        entities: vec![],
    }
}

fn decision(r: &IsAuthorizedResponse) -> pb::Decision {
    pb::Decision::try_from(r.decision).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_with_policies_and_audit_lines() {
    let it = Instance::start().await;
    let token = it.key().token("alice", &["orders:read"], &[]);

    let allowed = it.is_authorized(request(&token, "GET", "/orders/42")).await;
    assert_eq!(decision(&allowed), pb::Decision::Allow, "{allowed:?}");
    assert_eq!(allowed.determining_policies, ["orders-read"]);
    assert_eq!(allowed.reason, "allowed");
    assert_eq!(allowed.principal, "User::\"alice\"");
    assert!(allowed.errors.is_empty());
    let line = it.audit_line(&allowed.decision_id);
    assert_eq!(line["outcome"], "allow");
    assert_eq!(line["method"], "IsAuthorized");
    assert_eq!(line["action"], "Action::\"get /orders/{id}\"");
    assert_eq!(line["resource"], "Application::\"orders\"");
    assert_eq!(line["principal"], "User::\"alice\"");
    assert_eq!(line["credential"], "jwt");
    assert_eq!(line["policies"], json!(["orders-read"]));

    // alice may read but not create.
    let denied = it.is_authorized(request(&token, "POST", "/orders")).await;
    assert_eq!(decision(&denied), pb::Decision::Deny);
    assert_eq!(denied.reason, "policy_denied");
    assert!(denied.determining_policies.is_empty());
    assert_eq!(it.audit_line(&denied.decision_id)["status"], 403);

    // The forbid of the blocked network names itself; the context is a Struct.
    let (action, context) = question("GET", "/orders/42", "203.0.113.7");
    let blocked = it
        .is_authorized(IsAuthorizedRequest {
            credential: bearer(&token),
            action,
            resource: orders(),
            context_kind: Some(is_authorized_request::ContextKind::Context(to_struct(
                &context,
            ))),
            entities: vec![],
        })
        .await;
    assert_eq!(decision(&blocked), pb::Decision::Deny);
    assert_eq!(blocked.determining_policies, ["block-test-net-3"]);

    // The token never reaches the audit log.
    let audit = std::fs::read_to_string(&it.served.audit).unwrap();
    assert!(!audit.contains(&token));

    // Health reports the service; reflection lists it.
    let health =
        tonic_health::pb::health_client::HealthClient::new(it.served.server.channel.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: "portcullis.v1.Authorizer".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(health.status, 1, "SERVING");
    it.stop().await;
}

fn to_struct(value: &Value) -> prost_types::Struct {
    fn value_of(v: &Value) -> prost_types::Value {
        use prost_types::value::Kind;
        prost_types::Value {
            kind: Some(match v {
                Value::Null => Kind::NullValue(0),
                Value::Bool(b) => Kind::BoolValue(*b),
                Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
                Value::String(s) => Kind::StringValue(s.clone()),
                Value::Array(items) => Kind::ListValue(prost_types::ListValue {
                    values: items.iter().map(value_of).collect(),
                }),
                Value::Object(_) => Kind::StructValue(to_struct(v)),
            }),
        }
    }
    prost_types::Struct {
        fields: value
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), value_of(v)))
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_missing_and_revoked_credentials_are_denied_with_their_reason() {
    let it = Instance::start().await;
    let key = it.key();
    let now = now();

    let expired = key.sign(&{
        let mut c = claims("alice", &["orders:read"], &[]);
        c["iat"] = json!(now - 1000);
        c["exp"] = json!(now - 400);
        c
    });
    let impostor = key.impostor_of().token("alice", &["orders:read"], &[]);
    for (token, reason) in [
        (Some(expired.as_str()), "expired"),
        (Some(impostor.as_str()), "bad_signature"),
        (Some("not-a-token"), "malformed_token"),
        (None, "missing_token"),
    ] {
        let mut r = request(token.unwrap_or_default(), "GET", "/orders/42");
        if token.is_none() {
            r.credential = None;
        }
        let out = it.is_authorized(r).await;
        assert_eq!(decision(&out), pb::Decision::Deny, "{reason}: {out:?}");
        assert_eq!(out.reason, reason);
        assert_eq!(it.audit_line(&out.decision_id)["status"], 401);
    }

    // Revoked through the admin API: denied at once, single and batch alike.
    let mut c = claims("alice", &["orders:read"], &[]);
    c["jti"] = json!("jti-to-revoke");
    let token = key.sign(&c);
    let before = it.is_authorized(request(&token, "GET", "/orders/42")).await;
    assert_eq!(decision(&before), pb::Decision::Allow);
    it.revoke_jti("jti-to-revoke").await;
    let after = it.is_authorized(request(&token, "GET", "/orders/42")).await;
    assert_eq!(decision(&after), pb::Decision::Deny);
    assert_eq!(after.reason, "revoked");
    assert_eq!(after.principal, "", "no principal for a refused credential");
    let batch = it
        .client()
        .batch_is_authorized(BatchIsAuthorizedRequest {
            credential: bearer(&token),
            requests: vec![batch_item("GET", "/orders/1"), batch_item("GET", "/orders")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        batch
            .results
            .iter()
            .all(|r| r.reason == "revoked" && decision(r) == pb::Decision::Deny)
    );
    it.stop().await;
}

async fn invalid_argument(it: &Instance, r: IsAuthorizedRequest) -> String {
    let status = it.client().is_authorized(r).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status.message().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let it = Instance::start().await;
    let token = it.key().token("alice", &["orders:read"], &[]);
    let good = || request(&token, "GET", "/orders/42");

    let mut r = good();
    r.action = "fly /orders".into();
    let message = invalid_argument(&it, r).await;
    assert_eq!(
        message,
        "action: action \"fly /orders\" is not declared in the schema"
    );

    let mut r = good();
    r.resource = Some(Entity {
        r#type: "Foo".into(),
        id: "1".into(),
        ..Default::default()
    });
    assert_eq!(
        invalid_argument(&it, r).await,
        "resource.type: entity type \"Foo\" is not in the schema"
    );

    // A declared type the action does not apply to.
    let mut r = good();
    r.resource = Some(Entity {
        r#type: "Role".into(),
        id: "admin".into(),
        ..Default::default()
    });
    assert!(invalid_argument(&it, r).await.starts_with(
        "resource.type: action \"get /orders/{id}\" does not apply to resources of type \"Role\""
    ));

    // A context missing `path_params`, one with a wrong type, one not JSON.
    let mut r = good();
    r.context_kind = Some(is_authorized_request::ContextKind::ContextJson(
        json!({ "http": { "method": "GET", "path": "/", "host": "h", "scheme": "https" } })
            .to_string(),
    ));
    let message = invalid_argument(&it, r).await;
    assert!(message.starts_with("context: "), "{message}");
    let (action, mut context) = question("GET", "/orders/42", "10.0.0.1");
    context["http"]["method"] = json!(7);
    let mut r = good();
    r.action = action;
    r.context_kind = Some(is_authorized_request::ContextKind::ContextJson(
        context.to_string(),
    ));
    let message = invalid_argument(&it, r).await;
    assert!(message.starts_with("context: "), "{message}");
    let mut r = good();
    r.context_kind = Some(is_authorized_request::ContextKind::ContextJson("{".into()));
    assert!(
        invalid_argument(&it, r)
            .await
            .starts_with("context_json: is not valid JSON")
    );

    // Portcullis sets `context.token` itself: a caller cannot forge scopes.
    let (action, mut context) = question("POST", "/orders", "10.0.0.1");
    context["token"] = json!({ "iss": ISSUER, "iat": 0, "exp": 0, "scopes": ["orders:write"] });
    let mut r = good();
    r.action = action;
    r.context_kind = Some(is_authorized_request::ContextKind::ContextJson(
        context.to_string(),
    ));
    assert_eq!(
        invalid_argument(&it, r).await,
        "context.token: is set by Portcullis from the verified credential"
    );

    // Nor redefine the principal to give it roles.
    let mut r = good();
    r.entities = vec![Entity {
        r#type: "User".into(),
        id: "alice".into(),
        parents: vec![pb::EntityRef {
            r#type: "Role".into(),
            id: "admin".into(),
        }],
        ..Default::default()
    }];
    assert!(
        invalid_argument(&it, r)
            .await
            .starts_with("entities[0]: User::\"alice\" may not be sent")
    );

    // In a batch, the offending request is named and nothing is decided.
    let lines_before = it.audit_lines().len();
    let mut items: Vec<_> = (0..5)
        .map(|i| batch_item("GET", &format!("/orders/{i}")))
        .collect();
    items[3].resource = Some(Entity {
        r#type: "Foo".into(),
        id: "1".into(),
        ..Default::default()
    });
    let status = it
        .client()
        .batch_is_authorized(BatchIsAuthorizedRequest {
            credential: bearer(&token),
            requests: items,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "requests[3].resource.type: entity type \"Foo\" is not in the schema"
    );
    let status = it
        .client()
        .batch_is_authorized(BatchIsAuthorizedRequest {
            credential: bearer(&token),
            requests: (0..101).map(|_| batch_item("GET", "/orders")).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("requests: between 1 and 100"));
    assert_eq!(it.audit_lines().len(), lines_before, "no decision was made");
    it.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_100_verifies_its_token_once() {
    let it = Instance::start().await;
    let token = it
        .key()
        .token("bob", &["orders:read", "orders:write"], &["admin"]);
    let before = it.status().await;
    let signatures_before = it.metric("portcullis_signature_verifications_total").await;
    let allows_before = it
        .metric(r#"portcullis_decisions_total{outcome="allow",reason="allowed"}"#)
        .await;

    let methods = ["GET", "POST", "DELETE"];
    let items: Vec<(String, String)> = (0..100)
        .map(|i| {
            let method = methods[i % 3];
            let path = match method {
                "POST" => "/orders".to_owned(),
                _ => format!("/orders/{i}"),
            };
            (method.to_owned(), path)
        })
        .collect();
    let response = it
        .client()
        .batch_is_authorized(BatchIsAuthorizedRequest {
            credential: bearer(&token),
            requests: items.iter().map(|(m, p)| batch_item(m, p)).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results.len(), 100);
    assert!(
        response
            .results
            .iter()
            .all(|r| decision(r) == pb::Decision::Allow),
        "bob reads, writes and (as admin) deletes"
    );

    // One credential verification and one signature for 100 decisions...
    let after = it.status().await;
    assert_eq!(
        after.credential_verifications - before.credential_verifications,
        1
    );
    assert_eq!(
        after.signature_verifications - before.signature_verifications,
        1
    );
    // ...as the metrics say too, with 100 decisions counted...
    assert_eq!(
        it.metric("portcullis_signature_verifications_total").await - signatures_before,
        1.0
    );
    assert_eq!(
        it.metric(r#"portcullis_decisions_total{outcome="allow",reason="allowed"}"#)
            .await
            - allows_before,
        100.0
    );
    // ...and 100 audit lines, one per decision, in order.
    let lines: Vec<Value> = it
        .audit_lines()
        .into_iter()
        .filter(|l| l["method"] == "BatchIsAuthorized")
        .collect();
    assert_eq!(lines.len(), 100);
    for (line, result) in lines.iter().zip(&response.results) {
        assert_eq!(line["decision_id"], result.decision_id.as_str());
        assert_eq!(line["principal"], "User::\"bob\"");
    }

    // The same 100 one by one verify the credential 100 times (the token
    // cache saves the signatures).
    for (m, p) in &items {
        it.is_authorized(request(&token, m, p)).await;
    }
    let singles = it.status().await;
    assert_eq!(
        singles.credential_verifications - after.credential_verifications,
        100
    );
    assert_eq!(
        singles.signature_verifications,
        after.signature_verifications
    );
    it.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_agree_with_check_for_equivalent_requests() {
    let it = Instance::start().await;
    let key = it.key();
    let tokens = [
        key.token("alice", &["orders:read"], &[]),
        key.token("bob", &["orders:write"], &[]),
        key.token("carol", &[], &["admin"]),
        key.token("dave", &[], &[]),
    ];
    let mut compared = 0;
    for token in &tokens {
        for (method, path) in [
            ("GET", "/orders"),
            ("GET", "/orders/7"),
            ("POST", "/orders"),
            ("DELETE", "/orders/7"),
        ] {
            for ip in ["10.1.2.3", "203.0.113.9"] {
                // Twice: the second answers come from the caches.
                for _ in 0..2 {
                    let mut check = envoy_request(method, path, Some(token));
                    check.attributes.as_mut().unwrap().source = Some(peer(ip));
                    let check = outcome(&it.served.server.check(check).await);
                    let (action, context) = question(method, path, ip);
                    let direct = it
                        .is_authorized(IsAuthorizedRequest {
                            credential: bearer(token),
                            action,
                            resource: orders(),
                            context_kind: Some(is_authorized_request::ContextKind::ContextJson(
                                context.to_string(),
                            )),
                            entities: vec![],
                        })
                        .await;
                    let what = format!("{method} {path} from {ip}");
                    assert_eq!(
                        check.http_status == 200,
                        decision(&direct) == pb::Decision::Allow,
                        "{what}"
                    );
                    assert_eq!(check.metadata["reason"], direct.reason.as_str(), "{what}");
                    assert_eq!(
                        check.metadata["policies"],
                        json!(direct.determining_policies),
                        "{what}"
                    );
                    assert_eq!(
                        check.metadata["principal"],
                        direct.principal.as_str(),
                        "{what}"
                    );
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, 64);
    it.stop().await;
}

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identities_and_reflection() {
    let it = Instance::start_with(|fx| {
        fx.append_config("\n[workload]\ntrust_domains = [\"cluster.local\"]\n");
        std::fs::write(
            fx.path("policies/workloads.cedar"),
            format!(
                "@id(\"checkout-lists-orders\")\npermit (principal == Workload::\"{CHECKOUT}\", action == Action::\"get /orders\", resource)\n\
                 when {{ context has workload && context.workload == \"{CHECKOUT}\" }};\n"
            ),
        )
        .unwrap();
    })
    .await;
    let workload = |id: &str| {
        let mut r = request("", "GET", "/orders");
        r.credential = Some(Credential {
            kind: Some(credential::Kind::WorkloadIdentity(id.into())),
        });
        r
    };
    // Over plaintext no caller is identified, so no one may assert a workload
    // identity, however trusted its trust domain (tests/tls.rs has the mTLS
    // callers that may).
    for id in [CHECKOUT, "spiffe://evil.example/ns/shop/sa/checkout"] {
        let out = it.is_authorized(workload(id)).await;
        assert_eq!(decision(&out), pb::Decision::Deny, "{out:?}");
        assert_eq!(out.reason, "untrusted_caller");
        assert_eq!(out.principal, "");
        assert_eq!(
            it.audit_line(&out.decision_id)["reason"],
            "untrusted_caller"
        );
    }

    // Reflection lists the service and describes it (its file and imports).
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "portcullis.v1.Authorizer".into(),
            )),
        },
    ];
    let mut stream = ServerReflectionClient::new(it.served.server.channel.clone())
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"portcullis.v1.Authorizer".to_owned()),
        "{names:?}"
    );
    assert!(names.contains(&"envoy.service.auth.v3.Authorization".to_owned()));
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("unexpected reflection response");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    it.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_as_access_token_or_api_key() {
    let mut key = String::new();
    let it = Instance::start_with(|fx| {
        fx.append_config("\n[api_keys]\nfile = \"api-keys.toml\"\nheader = \"x-api-key\"\n");
        key = portcullis::authn::api_key::create_key(
            &fx.path("api-keys.toml"),
            portcullis::authn::api_key::NewKey {
                id: "ci-bot".into(),
                scopes: vec!["orders:read".into()],
                lifetime: Some(Duration::from_secs(86400)),
                ..Default::default()
            },
        )
        .unwrap();
    })
    .await;
    for kind in [
        credential::Kind::AccessToken(key.clone()),
        credential::Kind::ApiKey(key.clone()),
    ] {
        let mut r = request("", "GET", "/orders/1");
        r.credential = Some(Credential { kind: Some(kind) });
        let out = it.is_authorized(r).await;
        assert_eq!(decision(&out), pb::Decision::Allow, "{out:?}");
        assert_eq!(out.principal, "Client::\"ci-bot\"");
        assert_eq!(it.audit_line(&out.decision_id)["credential"], "api_key");
    }
    let mut r = request("", "GET", "/orders/1");
    let wrong = format!("{}0000", &key[..key.len() - 4]);
    r.credential = Some(Credential {
        kind: Some(credential::Kind::ApiKey(wrong)),
    });
    assert_eq!(it.is_authorized(r).await.reason, "unknown_api_key");
    assert!(
        !std::fs::read_to_string(&it.served.audit)
            .unwrap()
            .contains(&key)
    );
    it.stop().await;
}
