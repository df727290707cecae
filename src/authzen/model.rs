//! AuthZEN request bodies in, the engine's [`DirectRequest`] out, and
//! decisions back to AuthZEN response objects.
//!
//! Parsing is by hand over [`serde_json::Value`], so every error names the
//! offending field (`evaluations[2].resource.id: is required`). Unknown
//! fields are ignored, as the specification asks; a member whose value is
//! `null` counts as absent.
//!
//! The mapping onto Cedar (see `docs/guides/authzen.md`):
//!
//! | AuthZEN | Cedar |
//! |---|---|
//! | `subject.type`, `subject.id` | principal `<Type>::"<id>"` |
//! | `action.name` | action `Action::"<name>"` |
//! | `resource.type`, `resource.id` | resource `<Type>::"<id>"` |
//! | `resource.properties` | the resource entity's attributes |
//! | `context` | the request context (beside `token`, set by Portcullis) |
//!
//! A `type` names a schema entity type: exactly, or else the one schema type
//! equal to it ignoring ASCII case (`user` is `User`); two such types are an
//! ambiguity, refused. `subject.properties` and `action.properties` have no
//! place in the Cedar request (the principal's attributes and parents come
//! from the policy folder's `entities.json`; actions carry no request
//! attributes) and are refused rather than ignored.

use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{EntityId, EntityTypeName, EntityUid, Schema};
use serde_json::{Map, Value, json};

use crate::authn::{CredentialKind, VerifiedToken};
use crate::authz::mapping::{ACTION_TYPE, DirectEntity, DirectError, DirectRequest};
use crate::decision::Decision;

/// Most evaluations one `evaluations` request may carry (as `BatchIsAuthorized`).
pub const MAX_EVALUATIONS: usize = crate::authorizer::MAX_BATCH;

/// The `issuer` of AuthZEN subjects: the audit line's `issuer`, and
/// `context.token.iss` for the policies.
pub const ISSUER: &str = "authzen";

/// A request (or one evaluation of it) that cannot be evaluated: 400, or a
/// `false` decision carrying the error inside an `evaluations` response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BadRequest {
    /// The path of the field, e.g. `evaluations[1].resource.type`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl BadRequest {
    fn new(field: impl Into<String>, message: impl Into<String>) -> BadRequest {
        BadRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    fn within(self, prefix: &str) -> BadRequest {
        BadRequest {
            field: if self.field.is_empty() {
                prefix.trim_end_matches('.').to_owned()
            } else {
                format!("{prefix}{}", self.field)
            },
            message: self.message,
        }
    }
}

/// A subject or resource: `type`, `id`, `properties`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    /// `type`, as sent.
    pub entity_type: String,
    /// `id`.
    pub id: String,
    /// `properties` (members with a `null` value left out).
    pub properties: Map<String, Value>,
}

/// An action: `name`, `properties`.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// `name`.
    pub name: String,
    /// `properties` (members with a `null` value left out).
    pub properties: Map<String, Value>,
}

/// One complete access evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The subject.
    pub subject: Entity,
    /// The action.
    pub action: Action,
    /// The resource.
    pub resource: Entity,
    /// The context (empty when absent).
    pub context: Map<String, Value>,
}

/// `options.evaluations_semantic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Semantic {
    /// Every evaluation, every result (the default).
    #[default]
    ExecuteAll,
    /// Stop after the first deny (or error), like `&&`.
    DenyOnFirstDeny,
    /// Stop after the first permit, like `||`.
    PermitOnFirstPermit,
}

impl Semantic {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Semantic::ExecuteAll => "execute_all",
            Semantic::DenyOnFirstDeny => "deny_on_first_deny",
            Semantic::PermitOnFirstPermit => "permit_on_first_permit",
        }
    }
}

/// An `evaluations` request.
#[derive(Debug, Clone, PartialEq)]
pub enum Evaluations {
    /// No (or an empty) `evaluations` array: a single evaluation, answered
    /// as the `evaluation` endpoint answers.
    Single(Box<Evaluation>),
    /// The evaluations with the defaults applied, each complete or the
    /// reason it is not.
    Many {
        /// How to run them.
        semantic: Semantic,
        /// In request order.
        items: Vec<Result<Evaluation, BadRequest>>,
    },
}

/// A member of `object`, `None` when absent or `null`.
fn member<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|v| !v.is_null())
}

fn object<'a>(value: &'a Value, field: &str) -> Result<&'a Map<String, Value>, BadRequest> {
    value
        .as_object()
        .ok_or_else(|| BadRequest::new(field, "must be a JSON object"))
}

fn string(object: &Map<String, Value>, key: &str, prefix: &str) -> Result<String, BadRequest> {
    match member(object, key) {
        None => Err(BadRequest::new(format!("{prefix}{key}"), "is required")),
        Some(Value::String(s)) if s.is_empty() => Err(BadRequest::new(
            format!("{prefix}{key}"),
            "must not be empty",
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(BadRequest::new(
            format!("{prefix}{key}"),
            "must be a string",
        )),
    }
}

fn properties(object: &Map<String, Value>, prefix: &str) -> Result<Map<String, Value>, BadRequest> {
    match member(object, "properties") {
        None => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()),
        Some(_) => Err(BadRequest::new(
            format!("{prefix}properties"),
            "must be a JSON object",
        )),
    }
}

fn entity(value: &Value, field: &str) -> Result<Entity, BadRequest> {
    let prefix = format!("{field}.");
    let map = object(value, field)?;
    Ok(Entity {
        entity_type: string(map, "type", &prefix)?,
        id: string(map, "id", &prefix)?,
        properties: properties(map, &prefix)?,
    })
}

fn action(value: &Value) -> Result<Action, BadRequest> {
    let map = object(value, "action")?;
    Ok(Action {
        name: string(map, "name", "action.")?,
        properties: properties(map, "action.")?,
    })
}

fn context(value: Option<&Value>) -> Result<Map<String, Value>, BadRequest> {
    match value {
        None => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map.clone()),
        Some(_) => Err(BadRequest::new("context", "must be a JSON object")),
    }
}

/// The four members of an evaluation, as sent (each may be absent).
#[derive(Debug, Clone, Copy, Default)]
struct Members<'a> {
    subject: Option<&'a Value>,
    action: Option<&'a Value>,
    resource: Option<&'a Value>,
    context: Option<&'a Value>,
}

impl<'a> Members<'a> {
    fn of(map: &'a Map<String, Value>) -> Members<'a> {
        Members {
            subject: member(map, "subject"),
            action: member(map, "action"),
            resource: member(map, "resource"),
            context: member(map, "context"),
        }
    }

    /// `self`, with `defaults` for what it lacks (a member replaces its
    /// default whole; objects are not merged).
    fn or(self, defaults: Members<'a>) -> Members<'a> {
        Members {
            subject: self.subject.or(defaults.subject),
            action: self.action.or(defaults.action),
            resource: self.resource.or(defaults.resource),
            context: self.context.or(defaults.context),
        }
    }

    fn evaluation(self) -> Result<Evaluation, BadRequest> {
        let required = |v: Option<&'a Value>, field: &str| {
            v.ok_or_else(|| BadRequest::new(field, "is required"))
        };
        Ok(Evaluation {
            subject: entity(required(self.subject, "subject")?, "subject")?,
            action: action(required(self.action, "action")?)?,
            resource: entity(required(self.resource, "resource")?, "resource")?,
            context: context(self.context)?,
        })
    }
}

/// The body of `POST /access/v1/evaluation`.
pub fn parse_evaluation(body: &Value) -> Result<Evaluation, BadRequest> {
    let map = object(body, "request body")?;
    Members::of(map).evaluation()
}

/// The body of `POST /access/v1/evaluations`. Errors of the whole payload
/// (not an object, `evaluations` not an array or too long, an unknown
/// semantic) are `Err`; an evaluation that is incomplete after the defaults
/// is an `Err` item.
pub fn parse_evaluations(body: &Value) -> Result<Evaluations, BadRequest> {
    let map = object(body, "request body")?;
    let defaults = Members::of(map);
    let semantic = match member(map, "options") {
        None => Semantic::default(),
        Some(options) => {
            let options = object(options, "options")?;
            match member(options, "evaluations_semantic") {
                None => Semantic::default(),
                Some(Value::String(s)) => match s.as_str() {
                    "execute_all" => Semantic::ExecuteAll,
                    "deny_on_first_deny" => Semantic::DenyOnFirstDeny,
                    "permit_on_first_permit" => Semantic::PermitOnFirstPermit,
                    other => {
                        return Err(BadRequest::new(
                            "options.evaluations_semantic",
                            format!(
                                "{other:?} is not one of execute_all, deny_on_first_deny, permit_on_first_permit"
                            ),
                        ));
                    }
                },
                Some(_) => {
                    return Err(BadRequest::new(
                        "options.evaluations_semantic",
                        "must be a string",
                    ));
                }
            }
        }
    };
    let items = match member(map, "evaluations") {
        None => &[][..],
        Some(Value::Array(items)) => items.as_slice(),
        Some(_) => return Err(BadRequest::new("evaluations", "must be an array")),
    };
    if items.is_empty() {
        return defaults
            .evaluation()
            .map(|e| Evaluations::Single(Box::new(e)));
    }
    if items.len() > MAX_EVALUATIONS {
        return Err(BadRequest::new(
            "evaluations",
            format!(
                "at most {MAX_EVALUATIONS} evaluations are allowed, got {}",
                items.len()
            ),
        ));
    }
    let items = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = format!("evaluations[{i}].");
            let item = object(item, "").map_err(|e| e.within(&prefix))?;
            Members::of(item)
                .or(defaults)
                .evaluation()
                .map_err(|e| e.within(&prefix))
        })
        .collect();
    Ok(Evaluations::Many { semantic, items })
}

/// The schema entity type `name` stands for: the type of that name, or else
/// the only one equal to it ignoring ASCII case.
pub fn schema_type(schema: &Schema, name: &str, field: &str) -> Result<EntityTypeName, BadRequest> {
    if let Ok(exact) = EntityTypeName::from_str(name)
        && schema.entity_types().any(|t| t == &exact)
    {
        return Ok(exact);
    }
    let mut folded = schema
        .entity_types()
        .filter(|t| t.to_string().eq_ignore_ascii_case(name));
    match (folded.next(), folded.next()) {
        (Some(one), None) => Ok(one.clone()),
        (Some(a), Some(b)) => Err(BadRequest::new(
            field,
            format!(
                "{name:?} matches more than one schema entity type ({a}, {b}); use the exact name"
            ),
        )),
        (None, _) => Err(BadRequest::new(
            field,
            format!("no entity type {name:?} in the schema"),
        )),
    }
}

/// The engine's question for `evaluation`, and the identity it is asked for:
/// the subject, asserted by the authenticated caller (`caller`, its mTLS
/// identity, if any). Everything that cannot fit the schema's shape is
/// refused here or by the engine, never decided.
pub fn direct(
    schema: &Schema,
    evaluation: &Evaluation,
    caller: Option<Arc<str>>,
) -> Result<(VerifiedToken, DirectRequest), BadRequest> {
    if !evaluation.subject.properties.is_empty() {
        return Err(BadRequest::new(
            "subject.properties",
            "are not supported: the principal's attributes and roles come from the policy folder (entities.json); send the subject's type and id only",
        ));
    }
    if !evaluation.action.properties.is_empty() {
        return Err(BadRequest::new(
            "action.properties",
            "are not supported: Cedar actions carry no request attributes; send them in context",
        ));
    }
    let action_type = EntityTypeName::from_str(ACTION_TYPE)
        .map_err(|e| BadRequest::new("action.name", e.to_string()))?;
    let action_uid =
        EntityUid::from_type_name_and_id(action_type, EntityId::new(&evaluation.action.name));
    if !schema.actions().any(|a| a == &action_uid) {
        return Err(BadRequest::new(
            "action.name",
            format!(
                "action {:?} is not declared in the schema",
                evaluation.action.name
            ),
        ));
    }
    let principal_type = schema_type(schema, &evaluation.subject.entity_type, "subject.type")?;
    let accepted: Vec<String> = schema
        .principals_for_action(&action_uid)
        .map(|types| types.map(ToString::to_string).collect())
        .unwrap_or_default();
    if !accepted.contains(&principal_type.to_string()) {
        return Err(BadRequest::new(
            "subject.type",
            format!(
                "action {:?} does not apply to subjects of type {principal_type} (it applies to: {})",
                evaluation.action.name,
                accepted.join(", ")
            ),
        ));
    }
    let resource_type = schema_type(schema, &evaluation.resource.entity_type, "resource.type")?;
    // Asserted by the authenticated caller: not bound, nothing to verify.
    let identity = VerifiedToken::principal_only(
        ISSUER,
        &principal_type.to_string(),
        &evaluation.subject.id,
        CredentialKind::Authzen,
    );
    let request = DirectRequest {
        action: evaluation.action.name.clone(),
        resource: DirectEntity {
            entity_type: resource_type.to_string(),
            id: evaluation.resource.id.clone(),
            attributes: evaluation.resource.properties.clone(),
            parents: Vec::new(),
        },
        context: evaluation.context.clone(),
        entities: Vec::new(),
        caller,
    };
    Ok((identity, request))
}

/// What the engine refused, in AuthZEN's field names. `resource` is where
/// Cedar found the resource's properties wrong.
pub fn engine_error(e: DirectError) -> BadRequest {
    match e {
        DirectError::Invalid { field, message } => {
            let field = match field.as_str() {
                "resource" => "resource.properties".to_owned(),
                _ => field,
            };
            BadRequest::new(field, message)
        }
        DirectError::Principal(e) => BadRequest::new("subject", e.to_string()),
    }
}

/// The AuthZEN decision object of `decision`: `decision` as enforced (a
/// dry-run deny is `true`), and a `context` with the decision id (the audit
/// line's) and the reason class.
pub fn decision_json(decision: &Decision) -> Value {
    let mut context = json!({
        "decision_id": decision.id,
        "reason": decision.verdict.class(),
    });
    if decision.dry_run
        && let Some(map) = context.as_object_mut()
    {
        map.insert("dry_run".into(), Value::Bool(true));
    }
    json!({
        "decision": decision.effective_verdict().is_allow(),
        "context": context,
    })
}

/// The closed decision of an evaluation that could not be evaluated.
pub fn error_json(e: &BadRequest) -> Value {
    json!({
        "decision": false,
        "context": {
            "reason": "bad_request",
            "error": { "status": 400, "message": e.to_string() },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let err = parse_evaluation(&json!({"subject": {"type": "user"}})).unwrap_err();
        assert_eq!(err.to_string(), "subject.id: is required");
        let err = parse_evaluation(&json!([])).unwrap_err();
        assert_eq!(err.field, "request body");
        let err = parse_evaluation(&json!({
            "subject": {"type": "user", "id": "a"},
            "action": {"name": 3},
            "resource": {"type": "doc", "id": "1"},
        }))
        .unwrap_err();
        assert_eq!(err.to_string(), "action.name: must be a string");
    }

    #[test]
    fn defaults_fill_in_and_items_override_them() {
        let body = json!({
            "subject": {"type": "user", "id": "alice"},
            "action": {"name": "read"},
            "context": {"time": "now"},
            "options": {"evaluations_semantic": "permit_on_first_permit", "other": 1},
            "evaluations": [
                {"resource": {"type": "doc", "id": "1"}},
                {"action": {"name": "edit"}, "resource": {"type": "doc", "id": "2"}, "context": {}},
                {},
                "x",
            ],
        });
        let Evaluations::Many { semantic, items } = parse_evaluations(&body).unwrap() else {
            panic!("a batch");
        };
        assert_eq!(semantic, Semantic::PermitOnFirstPermit);
        let first = items[0].as_ref().unwrap();
        assert_eq!(first.subject.id, "alice");
        assert_eq!(first.action.name, "read");
        assert_eq!(first.context["time"], "now");
        let second = items[1].as_ref().unwrap();
        assert_eq!(second.action.name, "edit");
        assert!(second.context.is_empty());
        assert_eq!(
            items[2].as_ref().unwrap_err().to_string(),
            "evaluations[2].resource: is required"
        );
        assert_eq!(
            items[3].as_ref().unwrap_err().to_string(),
            "evaluations[3]: must be a JSON object"
        );
    }

    #[test]
    fn an_empty_batch_is_a_single_evaluation_and_bad_options_are_refused() {
        let single = json!({
            "subject": {"type": "user", "id": "alice"},
            "action": {"name": "read"},
            "resource": {"type": "doc", "id": "1"},
            "evaluations": [],
        });
        assert!(matches!(
            parse_evaluations(&single).unwrap(),
            Evaluations::Single(_)
        ));
        let bad = json!({"options": {"evaluations_semantic": "all"}, "evaluations": [{}]});
        assert_eq!(
            parse_evaluations(&bad).unwrap_err().field,
            "options.evaluations_semantic"
        );
        let many = json!({"evaluations": vec![json!({}); MAX_EVALUATIONS + 1]});
        assert_eq!(parse_evaluations(&many).unwrap_err().field, "evaluations");
    }
}
