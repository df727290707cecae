//! The service-facing adapter (`portcullis.v1.Authorizer`): `IsAuthorized` and
//! `BatchIsAuthorized` to the engine's direct requests, [`Decision`] to their
//! responses. With [`crate::ext_authz`], the only module that knows
//! `tonic::Status`.
//!
//! Both calls run the same pipeline as `Check`: the credential stage
//! ([`Engine::authenticate_credential`]: token rules, verified-token cache,
//! revocation) once per call, then the evaluation stage
//! ([`Engine::decide_direct`]: decision cache, Cedar) per request, and each
//! decision is accounted for by [`ServerState::account`] (audit line, metrics,
//! span attributes) as `Check`'s are. Spans join the caller's trace from the
//! gRPC metadata's `traceparent`; a batch has one span, with a child per
//! decision.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prost_types::value::Kind;
use serde_json::Value;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::authn::TokenError;
use crate::authn::credential::PresentedCredential;
use crate::authz::mapping::{DirectEntity, DirectError, DirectRequest};
use crate::decision::Decision;
use crate::engine::Engine;
use crate::state::ServerState;
use crate::telemetry::traces::{RequestSpan, remote_parent};
use crate::tls::PeerInfo;

/// The generated `portcullis.v1` types, client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("portcullis.v1");

    /// Encoded descriptors of the Authorizer API, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/authorizer_descriptor.bin"));
}

use pb::authorizer_server::Authorizer;

/// The fully qualified service name, as health and reflection report it.
pub const AUTHORIZER_SERVICE: &str = "portcullis.v1.Authorizer";

/// Most requests one `BatchIsAuthorized` call may carry.
pub const MAX_BATCH: usize = 100;

/// The audit line's `method` for decisions of a batch.
pub const BATCH_METHOD: &str = "BatchIsAuthorized";

/// A request field the adapter could not turn into a direct request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `requests[3].context_json`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }

    fn within(self, prefix: &str) -> FieldError {
        FieldError {
            field: format!("{prefix}{}", self.field),
            message: self.message,
        }
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

fn direct_error(e: DirectError, prefix: &str) -> Status {
    match e {
        DirectError::Invalid { field, message } => {
            Status::invalid_argument(format!("{prefix}{field}: {message}"))
        }
        // decide_direct turns these into denies; here only for completeness.
        DirectError::Principal(e) => Status::invalid_argument(format!("{prefix}credential: {e}")),
    }
}

/// The `portcullis.v1.Authorizer` service.
#[derive(Debug, Clone)]
pub struct AuthorizerService {
    state: Arc<ServerState>,
}

impl AuthorizerService {
    /// A service deciding with the engine installed in `state`.
    pub fn new(state: Arc<ServerState>) -> AuthorizerService {
        AuthorizerService { state }
    }

    fn engine(&self) -> Result<Arc<Engine>, Status> {
        // Fail closed before policies and keys load, as Check does (503).
        self.state
            .engine()
            .ok_or_else(|| Status::unavailable("policies and keys are not loaded yet"))
    }

    /// Accounts for one decision exactly as `Check` does: audit line,
    /// metrics and span attributes, from the same [`Decision`].
    fn account(&self, decision: &Decision, span: &RequestSpan) {
        let status = decision.effective_verdict().http_status();
        self.state
            .account_in_span(decision, status, span, "is_authorized");
    }
}

/// The caller's trace context from the gRPC metadata.
fn caller_span<T>(operation: &str, request: &Request<T>) -> RequestSpan {
    let metadata = request.metadata();
    let parent = remote_parent(|name| metadata.get(name).and_then(|v| v.to_str().ok()));
    RequestSpan::start(operation, parent)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[tonic::async_trait]
impl Authorizer for AuthorizerService {
    async fn is_authorized(
        &self,
        request: Request<pb::IsAuthorizedRequest>,
    ) -> Result<Response<pb::IsAuthorizedResponse>, Status> {
        let span = caller_span("portcullis.is_authorized", &request);
        let caller = caller_identity(&request);
        let request = request.into_inner();
        let mut direct = direct_request(
            request.action,
            request.resource,
            request.context_kind.map(ContextInput::from),
            request.entities,
        )?;
        direct.caller = caller.clone();
        let engine = self.engine()?;
        // No decision that cannot be logged (fail closed).
        self.state
            .audit_ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let credential = presented(
            request.credential.as_ref(),
            engine
                .authenticator()
                .may_assert_workload(caller.as_deref()),
        );
        let authentication = engine
            .authenticator()
            .authenticate(credential, unix_now())
            .instrument(span.span().clone())
            .await;
        let mut decision = span
            .span()
            .in_scope(|| engine.decide_direct(&authentication, &direct))
            .map_err(|e| direct_error(e, ""))?;
        decision.caller = caller;
        self.account(&decision, &span);
        Ok(Response::new(response(&decision)))
    }

    async fn batch_is_authorized(
        &self,
        request: Request<pb::BatchIsAuthorizedRequest>,
    ) -> Result<Response<pb::BatchIsAuthorizedResponse>, Status> {
        let batch_span = caller_span("portcullis.batch_is_authorized", &request);
        let caller = caller_identity(&request);
        let request = request.into_inner();
        if request.requests.is_empty() || request.requests.len() > MAX_BATCH {
            return Err(FieldError::new(
                "requests",
                format!(
                    "between 1 and {MAX_BATCH} requests are allowed, got {}",
                    request.requests.len()
                ),
            )
            .into());
        }
        let mut directs = Vec::with_capacity(request.requests.len());
        for (i, item) in request.requests.into_iter().enumerate() {
            let direct = direct_request(
                item.action,
                item.resource,
                item.context_kind.map(|c| match c {
                    pb::authorization_request::ContextKind::Context(s) => ContextInput::Struct(s),
                    pb::authorization_request::ContextKind::ContextJson(j) => ContextInput::Json(j),
                }),
                item.entities,
            )
            .map_err(|e| e.within(&format!("requests[{i}].")))?;
            let direct = DirectRequest {
                caller: caller.clone(),
                ..direct
            };
            directs.push(direct);
        }
        let engine = self.engine()?;
        // No decision that cannot be logged (fail closed).
        self.state
            .audit_ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        // The credential stage runs once for the whole batch.
        let credential = presented(
            request.credential.as_ref(),
            engine
                .authenticator()
                .may_assert_workload(caller.as_deref()),
        );
        let authentication = engine
            .authenticator()
            .authenticate(credential, unix_now())
            .instrument(batch_span.span().clone())
            .await;
        // Decide every request before accounting for any: an invalid one fails
        // the call whole, and no audit line claims a decision nobody received.
        let mut decisions = Vec::with_capacity(directs.len());
        for (i, direct) in directs.iter().enumerate() {
            // Each decision has its own span, a child of the batch's.
            let span = batch_span
                .span()
                .in_scope(|| RequestSpan::start("portcullis.is_authorized", None));
            let mut decision = span
                .span()
                .in_scope(|| engine.decide_direct(&authentication, direct))
                .map_err(|e| direct_error(e, &format!("requests[{i}].")))?;
            decision.method = BATCH_METHOD.to_owned();
            decision.caller = caller.clone();
            decisions.push((decision, span));
        }
        for (decision, span) in &decisions {
            self.account(decision, span);
        }
        Ok(Response::new(pb::BatchIsAuthorizedResponse {
            results: decisions.iter().map(|(d, _)| response(d)).collect(),
        }))
    }
}

/// The mTLS identity of the connection a request came on, if any.
fn caller_identity<T>(request: &Request<T>) -> Option<Arc<str>> {
    PeerInfo::of(request).and_then(|peer| peer.caller.clone())
}

/// The credential as the engine takes it; an empty value is no credential. A
/// workload identity counts only when the caller may assert one
/// (`may_assert_workload`): otherwise anyone reaching the port could ask
/// decisions as any trusted workload.
fn presented(
    credential: Option<&pb::Credential>,
    may_assert_workload: bool,
) -> PresentedCredential<'_> {
    use pb::credential::Kind as C;
    match credential.and_then(|c| c.kind.as_ref()) {
        Some(C::AccessToken(t)) if !t.trim().is_empty() => PresentedCredential::Bearer(t.trim()),
        Some(C::ApiKey(k)) if !k.trim().is_empty() => PresentedCredential::ApiKey(k.trim()),
        Some(C::WorkloadIdentity(w)) if !w.trim().is_empty() => {
            if may_assert_workload {
                PresentedCredential::Workload(w.trim())
            } else {
                PresentedCredential::Refused(TokenError::UntrustedCaller)
            }
        }
        _ => PresentedCredential::None,
    }
}

/// The decision as the service receives it.
pub fn response(decision: &Decision) -> pb::IsAuthorizedResponse {
    let verdict = decision.effective_verdict();
    pb::IsAuthorizedResponse {
        decision: if verdict.is_allow() {
            pb::Decision::Allow
        } else {
            pb::Decision::Deny
        } as i32,
        determining_policies: decision.policies.to_vec(),
        errors: decision.errors.clone(),
        decision_id: decision.id.clone(),
        reason: decision.verdict.class().to_owned(),
        principal: decision.principal.clone().unwrap_or_default(),
        dry_run: decision.dry_run,
    }
}

/// A context as sent: a `Struct` or JSON text.
#[derive(Debug)]
pub enum ContextInput {
    /// `google.protobuf.Struct`.
    Struct(prost_types::Struct),
    /// JSON text.
    Json(String),
}

impl From<pb::is_authorized_request::ContextKind> for ContextInput {
    fn from(kind: pb::is_authorized_request::ContextKind) -> ContextInput {
        match kind {
            pb::is_authorized_request::ContextKind::Context(s) => ContextInput::Struct(s),
            pb::is_authorized_request::ContextKind::ContextJson(j) => ContextInput::Json(j),
        }
    }
}

/// Turns the fields of one request into the engine's [`DirectRequest`];
/// anything structurally wrong is a [`FieldError`] naming the field. (Whether
/// it fits the schema is the engine's check.)
pub fn direct_request(
    action: String,
    resource: Option<pb::Entity>,
    context: Option<ContextInput>,
    entities: Vec<pb::Entity>,
) -> Result<DirectRequest, FieldError> {
    if action.is_empty() {
        return Err(FieldError::new("action", "is required"));
    }
    let resource = resource.ok_or_else(|| FieldError::new("resource", "is required"))?;
    let resource = entity(resource).map_err(|e| e.within("resource."))?;
    let context = match context {
        None => serde_json::Map::new(),
        Some(ContextInput::Struct(s)) => {
            struct_to_json(&s).map_err(|e| FieldError::new(format!("context{}", e.0), e.1))?
        }
        Some(ContextInput::Json(text)) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(FieldError::new("context_json", "is not a JSON object")),
            Err(e) => {
                return Err(FieldError::new(
                    "context_json",
                    format!("is not valid JSON: {e}"),
                ));
            }
        },
    };
    let entities = entities
        .into_iter()
        .enumerate()
        .map(|(i, e)| entity(e).map_err(|e| e.within(&format!("entities[{i}]."))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DirectRequest {
        action,
        resource,
        context,
        entities,
        caller: None,
    })
}

fn entity(e: pb::Entity) -> Result<DirectEntity, FieldError> {
    if e.r#type.is_empty() {
        return Err(FieldError::new("type", "is required"));
    }
    if e.id.is_empty() {
        return Err(FieldError::new("id", "is required"));
    }
    let attributes = match &e.attributes {
        Some(s) => struct_to_json(s)
            .map_err(|err| FieldError::new(format!("attributes{}", err.0), err.1))?,
        None => serde_json::Map::new(),
    };
    let mut parents = Vec::with_capacity(e.parents.len());
    for (i, p) in e.parents.into_iter().enumerate() {
        if p.r#type.is_empty() || p.id.is_empty() {
            return Err(FieldError::new(
                format!("parents[{i}]"),
                "type and id are required",
            ));
        }
        parents.push((p.r#type, p.id));
    }
    Ok(DirectEntity {
        entity_type: e.r#type,
        id: e.id,
        attributes,
        parents,
    })
}

/// A `Struct` as a JSON object. Whole numbers become integers (Cedar has
/// Longs, not floats); an error carries the path below the struct.
fn struct_to_json(
    s: &prost_types::Struct,
) -> Result<serde_json::Map<String, Value>, (String, String)> {
    s.fields
        .iter()
        .map(|(k, v)| {
            value_to_json(v)
                .map(|json| (k.clone(), json))
                .map_err(|(path, m)| (format!(".{k}{path}"), m))
        })
        .collect()
}

fn value_to_json(v: &prost_types::Value) -> Result<Value, (String, String)> {
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            // 2^53: beyond it a double no longer holds every integer exactly.
            const EXACT: f64 = 9_007_199_254_740_992.0;
            if n.is_finite() && n.fract() == 0.0 && n.abs() <= EXACT {
                Value::from(*n as i64)
            } else if let Some(number) = serde_json::Number::from_f64(*n) {
                Value::Number(number)
            } else {
                return Err((String::new(), "is not a finite number".into()));
            }
        }
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)?),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .iter()
                .enumerate()
                .map(|(i, v)| value_to_json(v).map_err(|(p, m)| (format!("[{i}]{p}"), m)))
                .collect::<Result<_, _>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(n: f64) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    #[test]
    fn whole_numbers_become_integers_and_errors_name_the_field() {
        let mut s = prost_types::Struct::default();
        s.fields.insert("n".into(), number(42.0));
        s.fields.insert("f".into(), number(1.5));
        let json = struct_to_json(&s).unwrap();
        assert_eq!(json["n"], Value::from(42i64));
        assert!(json["f"].is_f64());
        s.fields.insert("bad".into(), number(f64::NAN));
        assert_eq!(
            struct_to_json(&s).unwrap_err(),
            (".bad".to_owned(), "is not a finite number".to_owned())
        );
    }

    #[test]
    fn structural_errors_name_the_field() {
        let err = direct_request("".into(), None, None, vec![]).unwrap_err();
        assert_eq!(err.field, "action");
        let err = direct_request("a".into(), None, None, vec![]).unwrap_err();
        assert_eq!(err.field, "resource");
        let resource = pb::Entity {
            r#type: "Application".into(),
            id: "orders".into(),
            ..Default::default()
        };
        let err = direct_request(
            "a".into(),
            Some(resource.clone()),
            Some(ContextInput::Json("[1]".into())),
            vec![],
        )
        .unwrap_err();
        assert_eq!(err.field, "context_json");
        let err = direct_request(
            "a".into(),
            Some(resource),
            None,
            vec![pb::Entity::default()],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "entities[0].type: is required");
    }

    #[test]
    fn credentials_are_never_printed() {
        let c = pb::Credential {
            kind: Some(pb::credential::Kind::AccessToken(
                "secret.token.value".into(),
            )),
        };
        assert!(!format!("{:?}", presented(Some(&c), true)).contains("secret"));
    }

    /// A workload identity is a credential only from a caller allowed to
    /// assert one; tokens and keys do not depend on the caller.
    #[test]
    fn workload_identities_need_a_caller_allowed_to_assert_them() {
        let id = "spiffe://cluster.local/ns/shop/sa/checkout";
        let workload = pb::Credential {
            kind: Some(pb::credential::Kind::WorkloadIdentity(id.into())),
        };
        assert_eq!(
            presented(Some(&workload), true),
            PresentedCredential::Workload(id)
        );
        assert_eq!(
            presented(Some(&workload), false),
            PresentedCredential::Refused(TokenError::UntrustedCaller)
        );
        let token = pb::Credential {
            kind: Some(pb::credential::Kind::AccessToken("t".into())),
        };
        assert_eq!(
            presented(Some(&token), false),
            PresentedCredential::Bearer("t")
        );
    }
}

/// Fuzz targets of the `IsAuthorized` request mapping and the decision behind
/// it (see [`crate::fuzz`]): protobuf bytes, and the request's fields one per
/// line. Oracle: no panic, and an allow only for a valid token asking one of
/// the actions the shipped policies grant, on `Application::"orders"`.
#[cfg(test)]
mod fuzz {
    use prost::Message;
    use serde_json::json;

    use super::*;
    use crate::decision::Verdict;
    use crate::fuzz::{Target, bytes, run};
    use crate::test_setup::{NOW, Setup, setup};

    const GRANTED: [&str; 4] = [
        "get /orders",
        "get /orders/{id}",
        "post /orders",
        "delete /orders/{id}",
    ];

    struct Subject {
        _setup: Setup,
        engine: Engine,
        runtime: tokio::runtime::Runtime,
        valid: Vec<String>,
    }

    fn subject() -> Subject {
        let setup = setup("");
        let engine = Engine::from_config(&setup.config).unwrap();
        let runtime = crate::fuzz::runtime();
        let valid = vec![
            setup.token("orders:read", NOW - 10, NOW + 600),
            setup
                .key
                .sign_claims(&json!({
                    "iss": "https://idp.test", "aud": "orders-api", "sub": "root",
                    "scope": "orders:read orders:write", "roles": ["admin"],
                    "iat": NOW - 10, "exp": NOW + 600,
                }))
                .unwrap(),
        ];
        Subject {
            _setup: setup,
            engine,
            runtime,
            valid,
        }
    }

    impl Subject {
        /// Maps and decides `request` as the service does; true for an allow.
        fn allows(&self, request: pb::IsAuthorizedRequest) -> bool {
            let Ok(direct) = direct_request(
                request.action,
                request.resource,
                request.context_kind.map(ContextInput::from),
                request.entities,
            ) else {
                return false;
            };
            let authentication = self.runtime.block_on(
                self.engine
                    .authenticator()
                    .authenticate(presented(request.credential.as_ref(), false), NOW),
            );
            match self.engine.decide_direct(&authentication, &direct) {
                Ok(decision) => {
                    let allowed = response(&decision).decision == pb::Decision::Allow as i32;
                    assert_eq!(allowed, decision.verdict == Verdict::Allow);
                    if allowed {
                        assert!(
                            GRANTED.contains(&direct.action.as_str()),
                            "allowed action {:?}",
                            direct.action
                        );
                    }
                    allowed
                }
                Err(_) => false,
            }
        }

        fn assert_sound(&self, request: pb::IsAuthorizedRequest) {
            let token = match request.credential.as_ref().and_then(|c| c.kind.as_ref()) {
                Some(pb::credential::Kind::AccessToken(t)) => Some(t.trim().to_owned()),
                _ => None,
            };
            let resource = request
                .resource
                .as_ref()
                .map(|r| (r.r#type.clone(), r.id.clone()));
            if self.allows(request) {
                assert!(
                    token.is_some_and(|t| self.valid.contains(&t)),
                    "allowed without a valid token"
                );
                assert_eq!(
                    resource,
                    Some(("Application".to_owned(), "orders".to_owned())),
                    "allowed on another resource"
                );
            }
        }
    }

    fn request(token: &str, action: &str, context: &str) -> pb::IsAuthorizedRequest {
        pb::IsAuthorizedRequest {
            credential: Some(pb::Credential {
                kind: Some(pb::credential::Kind::AccessToken(token.into())),
            }),
            action: action.into(),
            resource: Some(pb::Entity {
                r#type: "Application".into(),
                id: "orders".into(),
                ..Default::default()
            }),
            context_kind: Some(pb::is_authorized_request::ContextKind::ContextJson(
                context.into(),
            )),
            entities: vec![],
        }
    }

    const CONTEXT: &str = r#"{"http":{"method":"GET","path":"/orders/7","host":"orders.test","scheme":"https","source_ip":{"__extn":{"fn":"ip","arg":"10.1.2.3"}}},"path_params":{"id":"7"}}"#;

    fn dictionary(subject: &Subject) -> Vec<Vec<u8>> {
        let mut words = bytes([
            "get /orders",
            "get /orders/{id}",
            "post /orders",
            "delete /orders/{id}",
            "Application",
            "orders",
            "Action::",
            "Role",
            "admin",
            r#"{"__entity":{"type":"Role","id":"admin"}}"#,
            r#""__extn""#,
            "203.0.113.9",
            "::ffff:203.0.113.9",
            "{",
            "}",
            ",",
            "\"",
            "\n",
        ]);
        words.extend(subject.valid.iter().map(|t| t.as_bytes().to_vec()));
        words
    }

    #[test]
    fn fuzz_is_authorized_protobuf() {
        let subject = subject();
        assert!(
            subject.allows(request(&subject.valid[0], "get /orders/{id}", CONTEXT)),
            "the first seed is an allow, so that the oracle is exercised"
        );
        let seeds = vec![
            request(&subject.valid[0], "get /orders/{id}", CONTEXT).encode_to_vec(),
            request(&subject.valid[1], "delete /orders/{id}", CONTEXT).encode_to_vec(),
            request("pck_x_00", "get /orders", "{}").encode_to_vec(),
            pb::IsAuthorizedRequest::default().encode_to_vec(),
        ];
        run(
            Target {
                name: "is_authorized_protobuf",
                seeds,
                dictionary: dictionary(&subject),
                cases: 4000,
            },
            |input| {
                if let Ok(request) = pb::IsAuthorizedRequest::decode(input) {
                    subject.assert_sound(request);
                }
            },
        );
    }

    /// Token, action, resource type, resource id and context JSON, one per
    /// line, so that mutations land inside fields.
    #[test]
    fn fuzz_is_authorized_fields() {
        let subject = subject();
        let line = |token: &str, action: &str, context: &str| {
            format!("{token}\n{action}\nApplication\norders\n{context}")
        };
        let seeds = bytes([
            line(&subject.valid[0], "get /orders/{id}", CONTEXT),
            line(&subject.valid[1], "post /orders", CONTEXT),
            line(&subject.valid[0], "delete /orders/{id}", "{}"),
        ]);
        run(
            Target {
                name: "is_authorized_fields",
                seeds,
                dictionary: dictionary(&subject),
                cases: 4000,
            },
            |input| {
                let text = String::from_utf8_lossy(input);
                let mut fields = text.splitn(5, '\n');
                let mut next = || fields.next().unwrap_or("").to_owned();
                let (token, action, kind, id, context) = (next(), next(), next(), next(), next());
                let mut request = request(&token, &action, &context);
                request.resource = Some(pb::Entity {
                    r#type: kind,
                    id,
                    ..Default::default()
                });
                let request =
                    pb::IsAuthorizedRequest::decode(request.encode_to_vec().as_slice()).unwrap();
                subject.assert_sound(request);
            },
        );
    }
}
