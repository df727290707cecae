//! From a verified identity and an HTTP request to a schema-checked Cedar request.
//!
//! The convention follows API-linked policy stores:
//! - principal `User::"<sub>"` (the issuer's `principal_type` and `principal_claim`),
//!   its parents `Role::"<role>"` for each role claim value;
//! - action `Action::"<lower-case method> <route template>"` (or the route's `action`);
//! - resource `Application::"<application.name>"`;
//! - context `{ http, path_params, token, workload? }` (see `docs/guides/policies/cedar-mapping.md` for the types).
//!
//! Services asking directly (`IsAuthorized`) name the action, resource, context
//! and extra entities themselves: [`CedarMapping::build_direct`]. Their principal
//! and `context.token` come from the credential exactly as for Check.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request,
    RequestValidationError, RestrictedExpression,
};
use serde_json::Value;

use super::context_reads::ContextReads;
use super::policy_store::PolicyStore;
use crate::attributes::HttpRequest;
use crate::authn::VerifiedToken;

/// Entity type of token subjects.
pub const USER_TYPE: &str = "User";
/// Entity type of roles (parents of users).
pub const ROLE_TYPE: &str = "Role";
/// Entity type of the protected application.
pub const APPLICATION_TYPE: &str = "Application";
/// Entity type of actions.
pub const ACTION_TYPE: &str = "Action";

/// The request does not fit the schema (a configuration problem, so a deny).
#[derive(Debug, Clone, thiserror::Error)]
pub enum MappingError {
    /// An entity id or type could not be built.
    #[error("cannot build entity: {0}")]
    Entity(String),
    /// The context or request does not conform to the schema.
    #[error("request does not conform to the schema: {0}")]
    Request(String),
}

/// A Cedar request with the entities it is evaluated against.
#[derive(Debug, Clone)]
pub struct CedarInput {
    /// The schema-checked request.
    pub request: Request,
    /// Static entities plus the principal, its roles and the application
    /// (shared: the same principal with the same roles gets the same set).
    pub entities: Arc<Entities>,
    /// The principal, for the audit line.
    pub principal: EntityUid,
    /// The action, for the audit line.
    pub action: EntityUid,
    /// The resource, for the audit line.
    pub resource: EntityUid,
}

/// The parts of a request the mapping reads besides the token.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The HTTP request.
    pub http: &'a HttpRequest,
    /// The Cedar action id.
    pub action: &'a str,
    /// Path parameters of the matched route.
    pub path_params: &'a [(String, String)],
    /// The mTLS peer's identity, when it is a trusted workload.
    pub workload: Option<&'a str>,
    /// The mTLS identity of the connection that asked (Envoy, or a service),
    /// when there is one.
    pub caller: Option<&'a str>,
}

/// Every attribute of the context that [`CedarMapping::build`] makes, in one
/// list: the Cedar context and the decision key both walk [`CONTEXT_FIELDS`]
/// and read each value through [`ContextField::value`], so the key covers
/// exactly what a policy could read, and a field added here reaches both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContextField {
    Method,
    Path,
    Host,
    Scheme,
    SourceIp,
    PathParams,
    Iss,
    Iat,
    Exp,
    Scopes,
    Jti,
    ClientId,
    Binding,
    Workload,
    Caller,
}

/// The context of a `Check` request, in the order it is built and hashed.
const CONTEXT_FIELDS: [ContextField; 15] = [
    ContextField::Method,
    ContextField::Path,
    ContextField::Host,
    ContextField::Scheme,
    ContextField::SourceIp,
    ContextField::PathParams,
    ContextField::Iss,
    ContextField::Iat,
    ContextField::Exp,
    ContextField::Scopes,
    ContextField::Jti,
    ContextField::ClientId,
    ContextField::Binding,
    ContextField::Workload,
    ContextField::Caller,
];

/// The records of the context that hold attributes of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// `context.http`.
    Http,
    /// `context.token`.
    Token,
}

/// A context attribute's value for one request, before it becomes a Cedar
/// expression (or bytes of the decision key).
enum FieldValue<'a> {
    Str(&'a str),
    Long(i64),
    Ip(IpAddr),
    Strings(&'a [String]),
    Params(&'a [(String, String)]),
    /// An optional attribute that this request does not have.
    Absent,
}

impl ContextField {
    /// Where the attribute sits in the context: its record (`http`,
    /// `token`, or none for a top-level attribute) and its name.
    fn place(self) -> (Option<Record>, &'static str) {
        match self {
            ContextField::Method => (Some(Record::Http), "method"),
            ContextField::Path => (Some(Record::Http), "path"),
            ContextField::Host => (Some(Record::Http), "host"),
            ContextField::Scheme => (Some(Record::Http), "scheme"),
            ContextField::SourceIp => (Some(Record::Http), "source_ip"),
            ContextField::PathParams => (None, "path_params"),
            ContextField::Iss => (Some(Record::Token), "iss"),
            ContextField::Iat => (Some(Record::Token), "iat"),
            ContextField::Exp => (Some(Record::Token), "exp"),
            ContextField::Scopes => (Some(Record::Token), "scopes"),
            ContextField::Jti => (Some(Record::Token), "jti"),
            ContextField::ClientId => (Some(Record::Token), "client_id"),
            ContextField::Binding => (Some(Record::Token), "binding"),
            ContextField::Workload => (None, "workload"),
            ContextField::Caller => (None, "caller"),
        }
    }

    /// Does a policy that reads what `reads` lists read this attribute?
    fn read_by(self, reads: &ContextReads) -> bool {
        match self.place() {
            (Some(Record::Http), name) => reads.covers(&["http", name]),
            (Some(Record::Token), name) => reads.covers(&["token", name]),
            (None, name) => reads.covers(&[name]),
        }
    }

    /// The attribute's value in a request. `workload` and `caller` are
    /// already filtered to the actions whose context declares them.
    fn value<'a>(
        self,
        token: &'a VerifiedToken,
        facts: &RequestFacts<'a>,
        declared: Declared<'a>,
    ) -> FieldValue<'a> {
        let http = facts.http;
        let optional = |value: Option<&'a str>| value.map_or(FieldValue::Absent, FieldValue::Str);
        match self {
            ContextField::Method => FieldValue::Str(&http.method),
            ContextField::Path => FieldValue::Str(http.path_without_query()),
            ContextField::Host => FieldValue::Str(&http.host),
            ContextField::Scheme => FieldValue::Str(&http.scheme),
            ContextField::SourceIp => http.source_ip.map_or(FieldValue::Absent, FieldValue::Ip),
            ContextField::PathParams => FieldValue::Params(facts.path_params),
            ContextField::Iss => FieldValue::Str(&token.issuer),
            ContextField::Iat => FieldValue::Long(token.issued_at),
            ContextField::Exp => FieldValue::Long(token.expires_at),
            ContextField::Scopes => FieldValue::Strings(&token.scopes),
            ContextField::Jti => optional(token.jti.as_deref()),
            ContextField::ClientId => optional(token.client_id.as_deref()),
            ContextField::Binding => optional(declared.binding),
            ContextField::Workload => optional(declared.workload),
            ContextField::Caller => optional(declared.caller),
        }
    }
}

/// The optional context attributes that only actions whose context type
/// declares them carry, already filtered for the request's action.
#[derive(Debug, Clone, Copy, Default)]
struct Declared<'a> {
    /// The trusted workload identity (`workload`).
    workload: Option<&'a str>,
    /// The mTLS caller (`caller`).
    caller: Option<&'a str>,
    /// How the token is bound (`token.binding`: `dpop` or `mtls`).
    binding: Option<&'a str>,
}

impl FieldValue<'_> {
    /// Adds the value to a decision key: presence first, so that an absent
    /// attribute never hashes like a present one.
    fn hash_into(&self, digest: &mut DecisionKey) {
        match self {
            FieldValue::Absent => digest.option(None),
            FieldValue::Str(s) => digest.option(Some(s.as_bytes())),
            FieldValue::Long(n) => digest.option(Some(&n.to_be_bytes())),
            // The address's octets (4 or 16 bytes).
            FieldValue::Ip(IpAddr::V4(ip)) => digest.option(Some(&ip.octets())),
            FieldValue::Ip(IpAddr::V6(ip)) => digest.option(Some(&ip.octets())),
            FieldValue::Strings(items) => {
                digest.option(Some(&[]));
                digest.list(items.iter().map(|s| s.as_bytes()));
            }
            FieldValue::Params(params) => {
                digest.option(Some(&[]));
                digest.list(
                    params
                        .iter()
                        .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()]),
                );
            }
        }
    }
}

/// The context fields that the decision key covers: those some policy can
/// read (see [`super::context_reads`]). Worked out once per policy set, so the
/// request path only tests bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyFields {
    /// Bit `i` set: `CONTEXT_FIELDS[i]` counts.
    bits: u32,
}

impl KeyFields {
    /// The fields `reads` covers.
    pub fn of(reads: &ContextReads) -> KeyFields {
        let bits = CONTEXT_FIELDS
            .iter()
            .enumerate()
            .filter(|(_, field)| field.read_by(reads))
            .fold(0, |bits, (i, _)| bits | 1 << i);
        KeyFields { bits }
    }

    fn covers(&self, index: usize) -> bool {
        self.bits & (1 << index) != 0
    }
}

/// Whether [`CedarMapping::build`] validates what it builds against the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaCheck {
    /// Validate entities and context (load-time probes: tens of µs each).
    Validate,
    /// Skip validation on the request path: every shape `build` can produce for
    /// an action (optional attributes present or absent, the route's path
    /// parameters) was validated by the load-time probes, so repeating it per
    /// request only costs time.
    TrustShape,
}

/// Builds Cedar requests for one application.
#[derive(Debug, Clone)]
pub struct CedarMapping {
    principal_types: HashMap<String, EntityTypeName>,
    role_type: EntityTypeName,
    action_type: EntityTypeName,
    application: EntityUid,
    /// Actions whose context type declares `workload?: String`.
    workload_actions: HashSet<String>,
    /// Actions whose context type declares `caller?: String`.
    caller_actions: HashSet<String>,
    /// Actions whose `token` record declares `binding?: String`.
    binding_actions: HashSet<String>,
    /// Per action, the principal types the schema accepts, and whether they may
    /// have `Role` parents; established by load-time probes.
    shapes: HashMap<String, HashMap<String, bool>>,
    /// `ip("…")` expressions of recent source addresses. Cedar's
    /// `RestrictedExpression::new_ip` parses the name `ip` with its policy
    /// parser on every call (microseconds); a clone is cheap, and source
    /// addresses repeat.
    source_ips: moka::sync::Cache<IpAddr, RestrictedExpression>,
    /// The entities of recent principals: `entities.json`'s with the principal
    /// (and its token's roles) and the application added. Cedar's
    /// `upsert_entities` copies the whole set and recomputes its transitive
    /// closure, so this is built once per principal and role set, not per
    /// request. A mapping belongs to one policy-store load, so a reload starts
    /// afresh. Weighed by entity count, so a large `entities.json` keeps fewer.
    principal_entities: moka::sync::Cache<PrincipalKey, Arc<Entities>>,
    /// Principal entity sets built on a cache miss (single-flight: concurrent
    /// first requests of one principal build its set once). Shared by clones.
    principal_entity_builds: Arc<std::sync::atomic::AtomicU64>,
    /// `Application::"<name>"`, formatted once (Cedar's `Display` escapes).
    application_name: String,
    /// `Action::"<id>"` of every action a route or the default can name,
    /// formatted once at load (see [`CedarMapping::allow_shape`]).
    action_names: HashMap<String, String>,
}

/// How many source-address expressions [`CedarMapping`] keeps.
const SOURCE_IP_CACHE_ENTRIES: u64 = 8192;

/// How many entities (summed over every cached principal's set) the
/// per-principal entity cache holds: 100,000 principals of the quickstart, or
/// 23 principals of a 43,000-entity `entities.json`.
const PRINCIPAL_ENTITY_BUDGET: u64 = 1_000_000;

/// What a principal's entity set depends on besides the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PrincipalKey {
    principal_type: String,
    principal_id: String,
    /// Sorted, without duplicates.
    roles: Vec<String>,
}

impl PrincipalKey {
    fn of(token: &VerifiedToken) -> PrincipalKey {
        let mut roles = token.roles.clone();
        roles.sort_unstable();
        roles.dedup();
        PrincipalKey {
            principal_type: token.principal_type.clone(),
            principal_id: token.principal_id.clone(),
            roles,
        }
    }
}

impl CedarMapping {
    /// A mapping whose resource is `Application::"<application>"` and whose
    /// principals are of the given entity types (parsed once, here).
    pub fn new<'a>(
        application: &str,
        principal_types: impl IntoIterator<Item = &'a str>,
    ) -> Result<CedarMapping, MappingError> {
        let name = |n: &str| {
            EntityTypeName::from_str(n).map_err(|e| MappingError::Entity(format!("{n:?}: {e}")))
        };
        let application_type = name(APPLICATION_TYPE)?;
        let mut types = HashMap::new();
        for ty in principal_types {
            types.insert(ty.to_owned(), name(ty)?);
        }
        let application =
            EntityUid::from_type_name_and_id(application_type, EntityId::new(application));
        Ok(CedarMapping {
            application_name: application.to_string(),
            action_names: HashMap::new(),
            principal_types: types,
            role_type: name(ROLE_TYPE)?,
            action_type: name(ACTION_TYPE)?,
            application,
            workload_actions: HashSet::new(),
            caller_actions: HashSet::new(),
            binding_actions: HashSet::new(),
            shapes: HashMap::new(),
            source_ips: moka::sync::Cache::new(SOURCE_IP_CACHE_ENTRIES),
            principal_entities: moka::sync::Cache::builder()
                .max_capacity(PRINCIPAL_ENTITY_BUDGET)
                .weigher(|_, entities: &Arc<Entities>| {
                    u32::try_from(entities.len()).unwrap_or(u32::MAX).max(1)
                })
                .build(),
            principal_entity_builds: Arc::default(),
        })
    }

    /// How many principal entity sets were built on a cache miss since this
    /// mapping was made (validated load-time probes are not counted).
    pub fn principal_entity_builds(&self) -> u64 {
        self.principal_entity_builds
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that requests for `action` by `principal_type` conform to the schema
    /// (with `Role` parents too when `with_roles`).
    pub fn allow_shape(&mut self, action: &str, principal_type: &str, with_roles: bool) {
        if !self.action_names.contains_key(action) {
            let name = self.action(action).to_string();
            self.action_names.insert(action.to_owned(), name);
        }
        let roles_ok = self
            .shapes
            .entry(action.to_owned())
            .or_default()
            .entry(principal_type.to_owned())
            .or_insert(false);
        *roles_ok |= with_roles;
    }

    /// Declares that `action`'s context carries the peer's `workload` identity.
    pub fn enable_workload_context(&mut self, action: &str) {
        self.workload_actions.insert(action.to_owned());
    }

    /// Declares that `action`'s context carries the mTLS `caller` identity.
    pub fn enable_caller_context(&mut self, action: &str) {
        self.caller_actions.insert(action.to_owned());
    }

    /// Declares that `action`'s `token` record carries the token's `binding`.
    pub fn enable_binding_context(&mut self, action: &str) {
        self.binding_actions.insert(action.to_owned());
    }

    /// The caller identity `action`'s context carries, if it declares one.
    fn caller_for<'a>(&self, caller: Option<&'a str>, action: &str) -> Option<&'a str> {
        caller.filter(|_| self.caller_actions.contains(action))
    }

    /// The principal uid of an identity, e.g. `User::"alice"`.
    pub fn principal(&self, token: &VerifiedToken) -> Result<EntityUid, MappingError> {
        let ty = match self.principal_types.get(&token.principal_type) {
            Some(ty) => ty.clone(),
            None => EntityTypeName::from_str(&token.principal_type)
                .map_err(|e| MappingError::Entity(e.to_string()))?,
        };
        Ok(EntityUid::from_type_name_and_id(
            ty,
            EntityId::new(&token.principal_id),
        ))
    }

    /// `Application::"<name>"`, as the audit line names the resource.
    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// `Action::"<id>"`, as the audit line names the action (preformatted for
    /// the actions known at load).
    pub fn action_name(&self, action: &str) -> String {
        match self.action_names.get(action) {
            Some(name) => name.clone(),
            None => self.action(action).to_string(),
        }
    }

    /// The action uid of an action id.
    pub fn action(&self, action: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.action_type.clone(), EntityId::new(action))
    }

    /// A digest of every input [`CedarMapping::build`] reads that the policies
    /// can see, so two requests with the same key get the same decision (the
    /// decision cache's key). The identity (principal, roles) and the action
    /// always count; a context field counts when `fields` says a policy can
    /// read it. Which fields count is fixed for a policy set, and a decision
    /// cache belongs to one. The context fields come from the same list and
    /// the same values as the context itself ([`CONTEXT_FIELDS`]).
    pub fn decision_key(
        &self,
        fields: &KeyFields,
        token: &VerifiedToken,
        facts: RequestFacts<'_>,
    ) -> [u8; 32] {
        let mut digest = DecisionKey::default();
        digest.field(token.principal_type.as_bytes());
        digest.field(token.principal_id.as_bytes());
        let mut roles: Vec<&str> = token.roles.iter().map(String::as_str).collect();
        roles.sort_unstable();
        roles.dedup();
        digest.list(roles.iter().map(|r| r.as_bytes()));
        digest.field(facts.action.as_bytes());
        let declared = self.declared(token, &facts);
        for (i, field) in CONTEXT_FIELDS.iter().enumerate() {
            if fields.covers(i) {
                field.value(token, &facts, declared).hash_into(&mut digest);
            }
        }
        digest.finish()
    }

    /// The trusted workload, the mTLS caller and the token's binding, each
    /// only for the actions whose context type declares it.
    fn declared<'a>(&self, token: &'a VerifiedToken, facts: &RequestFacts<'a>) -> Declared<'a> {
        let workload = facts
            .workload
            .filter(|_| self.workload_actions.contains(facts.action));
        let binding = token
            .binding
            .as_ref()
            .map(crate::authn::TokenBinding::kind)
            .filter(|_| self.binding_actions.contains(facts.action));
        Declared {
            workload,
            caller: self.caller_for(facts.caller, facts.action),
            binding,
        }
    }

    /// The Cedar `ip("…")` expression of a source address, from the cache.
    fn source_ip(&self, ip: IpAddr) -> RestrictedExpression {
        self.source_ips
            .get_with(ip, || RestrictedExpression::new_ip(ip.to_string()))
    }

    /// Builds the schema-checked request and its entities.
    pub fn build(
        &self,
        store: &PolicyStore,
        token: &VerifiedToken,
        facts: RequestFacts<'_>,
        check: SchemaCheck,
    ) -> Result<CedarInput, MappingError> {
        let schema = match check {
            SchemaCheck::Validate => Some(&store.schema),
            SchemaCheck::TrustShape => {
                let shape = self
                    .shapes
                    .get(facts.action)
                    .and_then(|types| types.get(&token.principal_type));
                match shape {
                    Some(roles_ok) if *roles_ok || token.roles.is_empty() => None,
                    Some(_) => {
                        return Err(MappingError::Request(format!(
                            "{} principals have no Role parents in the schema",
                            token.principal_type
                        )));
                    }
                    None => {
                        return Err(MappingError::Request(format!(
                            "action {:?} does not apply to {} principals",
                            facts.action, token.principal_type
                        )));
                    }
                }
            }
        };
        let principal = self.principal(token)?;
        let action = self.action(facts.action);
        let resource = self.application.clone();

        let entities = match schema {
            // Load-time probes validate what they build; nothing is shared.
            Some(schema) => {
                Arc::new(self.entities_with_principal(store, token, &principal, Some(schema))?)
            }
            None => {
                // Single-flight: concurrent misses of one principal wait for
                // one build (Cedar recomputes the closure of the whole set, so
                // a burst of first requests must not each pay for it). An
                // error is not cached; every waiter gets it.
                self.principal_entities
                    .try_get_with(PrincipalKey::of(token), || {
                        self.principal_entity_builds
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.entities_with_principal(store, token, &principal, None)
                            .map(Arc::new)
                    })
                    .map_err(|e| MappingError::clone(&e))?
            }
        };

        let declared = self.declared(token, &facts);
        let context = Context::from_pairs(context_pairs(token, &facts, declared, |ip| {
            self.source_ip(ip)
        })?)
        .map_err(|e| MappingError::Request(e.to_string()))?;
        let request = Request::new(
            principal.clone(),
            action.clone(),
            resource.clone(),
            context,
            schema,
        )
        .map_err(|e| MappingError::Request(e.to_string()))?;
        Ok(CedarInput {
            request,
            entities,
            principal,
            action,
            resource,
        })
    }
}

impl CedarMapping {
    /// `entities.json`'s entities with the principal, its roles and the
    /// application added (validated against `schema` when given).
    fn entities_with_principal(
        &self,
        store: &PolicyStore,
        token: &VerifiedToken,
        principal: &EntityUid,
        schema: Option<&cedar_policy::Schema>,
    ) -> Result<Entities, MappingError> {
        let mut added = self.principal_entities(store, token, principal)?;
        if store.entities.get(&self.application).is_none() {
            added.push(Entity::new_no_attrs(
                self.application.clone(),
                HashSet::new(),
            ));
        }
        store
            .entities
            .clone()
            .upsert_entities(added, schema)
            .map_err(|e| MappingError::Request(e.to_string()))
    }

    /// The `Role` entities of the token's roles (unless `entities.json` defines
    /// them) and the principal entity with those roles as parents. A principal
    /// described in `entities.json` keeps its attributes and parents and also
    /// gains the token's roles. Shared by [`CedarMapping::build`] and
    /// [`CedarMapping::build_direct`], so both see the same principal.
    fn principal_entities(
        &self,
        store: &PolicyStore,
        token: &VerifiedToken,
        principal: &EntityUid,
    ) -> Result<Vec<Entity>, MappingError> {
        let roles = self.role_uids(token);
        let mut added: Vec<Entity> = roles
            .iter()
            .filter(|uid| store.entities.get(uid).is_none())
            .map(|uid| Entity::new_no_attrs(uid.clone(), HashSet::new()))
            .collect();
        added.push(match store.entities.get(principal) {
            Some(known) => {
                let (uid, attrs, mut parents) = known.clone().into_inner();
                parents.extend(roles);
                Entity::new(uid, attrs, parents).map_err(|e| MappingError::Entity(e.to_string()))?
            }
            None => Entity::new_no_attrs(principal.clone(), roles),
        });
        Ok(added)
    }

    fn role_uids(&self, token: &VerifiedToken) -> HashSet<EntityUid> {
        token
            .roles
            .iter()
            .map(|r| EntityUid::from_type_name_and_id(self.role_type.clone(), EntityId::new(r)))
            .collect()
    }

    /// The decision-cache key of a direct request: a digest of the identity
    /// (as in [`CedarMapping::decision_key`]), the action, and the canonical
    /// JSON of the resource, the context and the extra entities. It starts with
    /// its own domain tag, so it can never equal the key of a `Check` request.
    /// Keep in step with [`CedarMapping::build_direct`].
    pub fn direct_decision_key(&self, token: &VerifiedToken, request: &DirectRequest) -> [u8; 32] {
        let mut digest = DecisionKey::default();
        // NUL cannot start a Cedar type name, the first field of Check keys.
        digest.field(b"\0portcullis.direct.v1");
        digest.field(token.principal_type.as_bytes());
        digest.field(token.principal_id.as_bytes());
        let mut roles: Vec<&str> = token.roles.iter().map(String::as_str).collect();
        roles.sort_unstable();
        roles.dedup();
        digest.list(roles.iter().map(|r| r.as_bytes()));
        digest.field(canonical_json(&token_json(token)).as_bytes());
        digest.option(
            self.direct_workload(token, &request.action)
                .map(str::as_bytes),
        );
        digest.option(
            self.caller_for(request.caller.as_deref(), &request.action)
                .map(str::as_bytes),
        );
        digest.field(request.action.as_bytes());
        digest.field(canonical_json(&request.resource.to_json()).as_bytes());
        digest.field(canonical_json(&Value::Object(request.context.clone())).as_bytes());
        digest.list(
            request
                .entities
                .iter()
                .map(|e| canonical_json(&e.to_json()).into_bytes())
                .collect::<Vec<_>>()
                .iter()
                .map(Vec::as_slice),
        );
        digest.finish()
    }

    /// The workload identity a direct request's context carries: the
    /// credential's own SPIFFE ID, for actions whose context declares it.
    fn direct_workload<'a>(&self, token: &'a VerifiedToken, action: &str) -> Option<&'a str> {
        (token.credential == crate::authn::CredentialKind::Workload
            && self.workload_actions.contains(action))
        .then_some(token.principal_id.as_str())
    }

    /// Builds the schema-validated Cedar request of an explicit question from
    /// a service (`IsAuthorized`): the principal and its parents come from the
    /// verified token exactly as in [`CedarMapping::build`]; the action, the
    /// resource (with its attributes and parents), the context and any extra
    /// entities come from the request and are all validated against the
    /// schema. `context.token` (and `context.workload` where the action
    /// declares it) is set from the credential, never by the caller.
    ///
    /// Errors name the offending field of the request ([`DirectError::Invalid`]),
    /// except a principal the schema does not accept for the action, which is
    /// the credential's doing and denied as for `Check`
    /// ([`DirectError::Principal`]).
    pub fn build_direct(
        &self,
        store: &PolicyStore,
        token: &VerifiedToken,
        request: &DirectRequest,
    ) -> Result<CedarInput, DirectError> {
        let schema = &store.schema;
        let action = self.action(&request.action);
        if !schema.actions().any(|a| a == &action) {
            return Err(invalid(
                "action",
                format!("action {:?} is not declared in the schema", request.action),
            ));
        }
        let resource_type = schema_type(schema, &request.resource.entity_type)
            .map_err(|m| invalid("resource.type", m))?;
        let applies: Vec<String> = schema
            .resources_for_action(&action)
            .map(|types| types.map(ToString::to_string).collect())
            .unwrap_or_default();
        if !applies.contains(&resource_type.to_string()) {
            return Err(invalid(
                "resource.type",
                format!(
                    "action {:?} does not apply to resources of type {:?} (it applies to: {})",
                    request.action,
                    request.resource.entity_type,
                    applies.join(", ")
                ),
            ));
        }
        let resource =
            EntityUid::from_type_name_and_id(resource_type, EntityId::new(&request.resource.id));

        // The principal: as for Check, a type the action does not accept, or
        // roles on a type without Role parents, is a deny, not a bad request.
        let principal = self.principal(token).map_err(DirectError::Principal)?;
        let principal_ok = schema
            .principals_for_action(&action)
            .is_some_and(|mut types| types.any(|t| t == principal.type_name()));
        if !principal_ok {
            return Err(DirectError::Principal(MappingError::Request(format!(
                "action {:?} does not apply to {} principals",
                request.action, token.principal_type
            ))));
        }
        if !token.roles.is_empty()
            && !schema
                .ancestors(principal.type_name())
                .is_some_and(|mut types| types.any(|t| t == &self.role_type))
        {
            return Err(DirectError::Principal(MappingError::Request(format!(
                "{} principals have no Role parents in the schema",
                token.principal_type
            ))));
        }
        let mut added = self
            .principal_entities(store, token, &principal)
            .map_err(DirectError::Principal)?;
        // Entities the caller may not define: the principal and its roles (they
        // come from the credential), and whatever the policy folder defines.
        let mut reserved: HashSet<EntityUid> = self.role_uids(token);
        reserved.insert(principal.clone());

        let resource_has_data =
            !request.resource.attributes.is_empty() || !request.resource.parents.is_empty();
        if reserved.contains(&resource) || store.entities.get(&resource).is_some() {
            if resource_has_data {
                return Err(invalid(
                    "resource",
                    format!(
                        "{resource} is defined by the credential or the policy folder; send only its type and id"
                    ),
                ));
            }
        } else {
            let entity = Entity::from_json_value(request.resource.to_json(), Some(schema))
                .map_err(|e| invalid("resource", e.to_string()))?;
            added.push(entity);
        }
        reserved.insert(resource.clone());

        for (i, extra) in request.entities.iter().enumerate() {
            let field = format!("entities[{i}]");
            let ty = schema_type(schema, &extra.entity_type)
                .map_err(|m| invalid(&format!("{field}.type"), m))?;
            let uid = EntityUid::from_type_name_and_id(ty, EntityId::new(&extra.id));
            if reserved.contains(&uid) || store.entities.get(&uid).is_some() {
                return Err(invalid(
                    &field,
                    format!(
                        "{uid} may not be sent: it is the principal, one of its roles, the resource, or defined by the policy folder"
                    ),
                ));
            }
            let entity = Entity::from_json_value(extra.to_json(), Some(schema))
                .map_err(|e| invalid(&field, e.to_string()))?;
            reserved.insert(uid);
            added.push(entity);
        }
        let entities = store
            .entities
            .clone()
            .upsert_entities(added, Some(schema))
            .map_err(|e| invalid("entities", e.to_string()))?;

        let mut context = request.context.clone();
        for reserved_key in ["token", "workload", "caller"] {
            if context.contains_key(reserved_key) {
                return Err(invalid(
                    &format!("context.{reserved_key}"),
                    "is set by Portcullis from the verified credential".into(),
                ));
            }
        }
        context.insert("token".into(), token_json(token));
        if let Some(workload) = self.direct_workload(token, &request.action) {
            context.insert("workload".into(), Value::String(workload.to_owned()));
        }
        if let Some(caller) = self.caller_for(request.caller.as_deref(), &request.action) {
            context.insert("caller".into(), Value::String(caller.to_owned()));
        }
        let context = Context::from_json_value(Value::Object(context), Some((schema, &action)))
            .map_err(|e| invalid("context", e.to_string()))?;
        let request = Request::new(
            principal.clone(),
            action.clone(),
            resource.clone(),
            context,
            Some(schema),
        )
        .map_err(|e| match e {
            // Cedar's message prints the whole context, `token` included: say
            // what is wrong without echoing it.
            RequestValidationError::InvalidContext(_)
            | RequestValidationError::TypeOfContext(_) => invalid(
                "context",
                format!(
                    "does not match the context type of {action} in the schema (check the attribute names and types)"
                ),
            ),
            RequestValidationError::UndeclaredResourceType(_)
            | RequestValidationError::InvalidResourceType(_)
            | RequestValidationError::InvalidEnumEntity(_) => invalid("resource", e.to_string()),
            RequestValidationError::UndeclaredAction(_)
            | RequestValidationError::ExternalAction(_) => invalid("action", e.to_string()),
            _ => DirectError::Principal(MappingError::Request(e.to_string())),
        })?;
        Ok(CedarInput {
            request,
            entities: Arc::new(entities),
            principal,
            action,
            resource,
        })
    }
}

/// An explicit authorization question from a service: "may the credential's
/// principal do `action` on `resource`?" (the `IsAuthorized` call).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirectRequest {
    /// The action id, e.g. `get /orders/{id}` (of type `Action`).
    pub action: String,
    /// The resource, with its attributes and parents.
    pub resource: DirectEntity,
    /// The context, except `token`, `workload` and `caller`, which Portcullis sets.
    pub context: serde_json::Map<String, Value>,
    /// Further entities the policies may read (e.g. the resource's parents).
    pub entities: Vec<DirectEntity>,
    /// The mTLS identity of the service that asked, set by the adapter from
    /// the connection (never from the request).
    pub caller: Option<std::sync::Arc<str>>,
}

/// An entity as a service describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirectEntity {
    /// Entity type, e.g. `Application` or `Orders::Order`.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// Attributes, in Cedar's JSON entity format (extension values and entity
    /// references may be written implicitly: the schema tells their type).
    pub attributes: serde_json::Map<String, Value>,
    /// Parents, as (type, id).
    pub parents: Vec<(String, String)>,
}

impl DirectEntity {
    /// Cedar's JSON entity format: `{"uid":..., "attrs":..., "parents":[...]}`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "uid": { "type": self.entity_type, "id": self.id },
            "attrs": Value::Object(self.attributes.clone()),
            "parents": self
                .parents
                .iter()
                .map(|(ty, id)| serde_json::json!({ "type": ty, "id": id }))
                .collect::<Vec<_>>(),
        })
    }
}

/// Why a direct request cannot be evaluated.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DirectError {
    /// A field of the request is wrong: the caller's mistake. `field` is the
    /// path of the field in the request, e.g. `resource.type`.
    #[error("{field}: {message}")]
    Invalid {
        /// The offending field, e.g. `context` or `entities[2].type`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The credential's principal does not fit the action in the schema: a
    /// deny (`schema_mismatch`), as for `Check`.
    #[error(transparent)]
    Principal(MappingError),
}

fn invalid(field: &str, message: String) -> DirectError {
    DirectError::Invalid {
        field: field.to_owned(),
        message,
    }
}

/// An entity type named by a request: well-formed and declared in the schema.
fn schema_type(schema: &cedar_policy::Schema, name: &str) -> Result<EntityTypeName, String> {
    if name.is_empty() {
        return Err("is required".into());
    }
    let ty = EntityTypeName::from_str(name)
        .map_err(|_| format!("{name:?} is not a valid entity type name"))?;
    if schema.entity_types().any(|t| t == &ty) {
        Ok(ty)
    } else {
        Err(format!("entity type {name:?} is not in the schema"))
    }
}

/// `context.token` of a direct request, as [`context_pairs`] builds it for Check.
fn token_json(token: &VerifiedToken) -> Value {
    let mut record = serde_json::json!({
        "iss": token.issuer,
        "iat": token.issued_at,
        "exp": token.expires_at,
        "scopes": token.scopes,
    });
    if let Some(map) = record.as_object_mut() {
        if let Some(jti) = &token.jti {
            map.insert("jti".into(), Value::String(jti.clone()));
        }
        if let Some(client_id) = &token.client_id {
            map.insert("client_id".into(), Value::String(client_id.clone()));
        }
    }
    record
}

/// JSON with object keys sorted at every level, so equal values hash equally
/// whatever order the caller (or serde_json's map type) put the keys in.
fn canonical_json(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    write(item, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// Unambiguous hashing: every field is length-prefixed.
type DecisionKey = crate::digest::FieldDigest;

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn record(
    pairs: Vec<(String, RestrictedExpression)>,
) -> Result<RestrictedExpression, MappingError> {
    RestrictedExpression::new_record(pairs).map_err(|e| MappingError::Request(e.to_string()))
}

fn context_pairs(
    token: &VerifiedToken,
    facts: &RequestFacts<'_>,
    declared: Declared<'_>,
    mut source_ip: impl FnMut(IpAddr) -> RestrictedExpression,
) -> Result<Vec<(String, RestrictedExpression)>, MappingError> {
    let mut http = Vec::new();
    let mut token_attrs = Vec::new();
    let mut pairs = Vec::new();
    for field in CONTEXT_FIELDS {
        let value = match field.value(token, facts, declared) {
            FieldValue::Absent => continue,
            FieldValue::Str(s) => string(s),
            FieldValue::Long(n) => RestrictedExpression::new_long(n),
            FieldValue::Ip(ip) => source_ip(ip),
            FieldValue::Strings(items) => {
                RestrictedExpression::new_set(items.iter().map(|s| string(s)))
            }
            FieldValue::Params(params) => {
                record(params.iter().map(|(k, v)| (k.clone(), string(v))).collect())?
            }
        };
        let (record, name) = field.place();
        let attribute = (name.to_owned(), value);
        match record {
            Some(Record::Http) => http.push(attribute),
            Some(Record::Token) => token_attrs.push(attribute),
            None => pairs.push(attribute),
        }
    }
    pairs.push(("http".to_owned(), record(http)?));
    pairs.push(("token".to_owned(), record(token_attrs)?));
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quickstart() -> (PolicyStore, CedarMapping) {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/policies");
        let store = PolicyStore::load(&dir).unwrap();
        let mut mapping = CedarMapping::new("orders", ["User"]).unwrap();
        mapping.allow_shape("get /orders", "User", true);
        (store, mapping)
    }

    fn token(sub: &str, roles: &[&str]) -> VerifiedToken {
        VerifiedToken {
            issuer: "https://issuer.test".into(),
            subject: sub.into(),
            principal_type: "User".into(),
            principal_id: sub.into(),
            jti: None,
            issued_at: 1_900_000_000,
            expires_at: 2_000_000_000,
            scopes: vec!["orders:read".into()],
            roles: roles.iter().map(|r| r.to_string()).collect(),
            client_id: None,
            key_id: "k1".into(),
            api_key_id: None,
            credential: crate::authn::CredentialKind::Jwt,
            binding: None,
            status: None,
            claims: Vec::new(),
        }
    }

    /// One field list: for each context attribute, a decision key that
    /// covers it tells two requests apart that differ only there, and a key
    /// that covers nothing does not; and the built context holds exactly the
    /// attributes of [`CONTEXT_FIELDS`].
    #[test]
    fn the_decision_key_and_the_context_come_from_one_field_list() {
        let mut mapping = CedarMapping::new("orders", ["User"]).unwrap();
        mapping.enable_workload_context("get /orders");
        mapping.enable_caller_context("get /orders");
        mapping.enable_binding_context("get /orders");
        let base_http = HttpRequest {
            method: "GET".into(),
            path: "/orders?x=1".into(),
            host: "api.test".into(),
            scheme: "https".into(),
            source_ip: Some("192.0.2.1".parse().unwrap()),
            ..Default::default()
        };
        let mut base_token = token("alice", &["admin"]);
        base_token.jti = Some("j1".into());
        base_token.client_id = Some("c1".into());
        base_token.binding = Some(crate::authn::TokenBinding::Dpop { jkt: "k".into() });
        let params = vec![("id".to_owned(), "7".to_owned())];
        let key = |fields: KeyFields,
                   http: &HttpRequest,
                   token: &VerifiedToken,
                   params: &[(String, String)],
                   workload: Option<&str>,
                   caller: Option<&str>| {
            let facts = RequestFacts {
                http,
                action: "get /orders",
                path_params: params,
                workload,
                caller,
            };
            mapping.decision_key(&fields, token, facts)
        };
        let base_key = |fields| {
            let (workload, caller) = (Some("spiffe://a/w"), Some("spiffe://a/c"));
            key(fields, &base_http, &base_token, &params, workload, caller)
        };
        for (i, field) in CONTEXT_FIELDS.iter().enumerate() {
            let mut http = base_http.clone();
            let mut token = base_token.clone();
            let mut params = params.clone();
            let (mut workload, mut caller) = (Some("spiffe://a/w"), Some("spiffe://a/c"));
            match field {
                ContextField::Method => http.method = "POST".into(),
                ContextField::Path => http.path = "/orders/1".into(),
                ContextField::Host => http.host = "other.test".into(),
                ContextField::Scheme => http.scheme = "http".into(),
                ContextField::SourceIp => http.source_ip = None,
                ContextField::PathParams => params[0].1 = "8".into(),
                ContextField::Iss => token.issuer = "https://other.test".into(),
                ContextField::Iat => token.issued_at += 1,
                ContextField::Exp => token.expires_at += 1,
                ContextField::Scopes => token.scopes.push("orders:write".into()),
                ContextField::Jti => token.jti = None,
                ContextField::ClientId => token.client_id = Some("c2".into()),
                ContextField::Binding => {
                    token.binding = Some(crate::authn::TokenBinding::Mtls {
                        x5t_s256: "t".into(),
                    })
                }
                ContextField::Workload => workload = None,
                ContextField::Caller => caller = Some("spiffe://a/other"),
            }
            let changed = |fields| key(fields, &http, &token, &params, workload, caller);
            let only = KeyFields { bits: 1 << i };
            assert_ne!(base_key(only), changed(only), "{field:?}");
            let none = KeyFields { bits: 0 };
            assert_eq!(base_key(none), changed(none), "{field:?}");
        }

        let facts = RequestFacts {
            http: &base_http,
            action: "get /orders",
            path_params: &params,
            workload: Some("spiffe://a/w"),
            caller: Some("spiffe://a/c"),
        };
        let declared = mapping.declared(&base_token, &facts);
        let pairs = context_pairs(&base_token, &facts, declared, |ip| {
            RestrictedExpression::new_ip(ip.to_string())
        })
        .unwrap();
        let mut top: Vec<&str> = pairs.iter().map(|(name, _)| name.as_str()).collect();
        top.sort_unstable();
        assert_eq!(top, ["caller", "http", "path_params", "token", "workload"]);
        let context = Context::from_pairs(pairs).unwrap();
        let json = context.to_json_value().unwrap();
        for field in CONTEXT_FIELDS {
            let found = match field.place() {
                (Some(Record::Http), name) => json["http"].get(name).is_some(),
                (Some(Record::Token), name) => json["token"].get(name).is_some(),
                (None, name) => json.get(name).is_some(),
            };
            assert!(found, "{field:?} missing from {json}");
        }
    }

    fn entities(
        store: &PolicyStore,
        mapping: &CedarMapping,
        token: &VerifiedToken,
        check: SchemaCheck,
    ) -> Arc<Entities> {
        let http = HttpRequest {
            method: "GET".into(),
            path: "/orders".into(),
            ..Default::default()
        };
        let facts = RequestFacts {
            http: &http,
            action: "get /orders",
            path_params: &[],
            workload: None,
            caller: None,
        };
        mapping.build(store, token, facts, check).unwrap().entities
    }

    #[test]
    fn principal_entities_are_shared_per_principal_and_role_set_and_equal_a_fresh_build() {
        let (store, mapping) = quickstart();
        let alice = token("alice", &["clerk", "auditor"]);
        let first = entities(&store, &mapping, &alice, SchemaCheck::TrustShape);
        // Same principal, same roles in another order: the same shared set.
        let again = entities(
            &store,
            &mapping,
            &token("alice", &["auditor", "clerk", "clerk"]),
            SchemaCheck::TrustShape,
        );
        assert!(Arc::ptr_eq(&first, &again));
        // ...equal to what a validated, uncached build makes.
        let fresh = entities(&store, &mapping, &alice, SchemaCheck::Validate);
        assert!(!Arc::ptr_eq(&first, &fresh));
        assert!(first.deep_eq(&fresh));

        // Another role set, or another principal: another set.
        let clerk_only = entities(
            &store,
            &mapping,
            &token("alice", &["clerk"]),
            SchemaCheck::TrustShape,
        );
        assert!(!first.deep_eq(&clerk_only));
        let alice_uid = EntityUid::from_str(r#"User::"alice""#).unwrap();
        let auditor = EntityUid::from_str(r#"Role::"auditor""#).unwrap();
        assert!(first.is_ancestor_of(&auditor, &alice_uid));
        assert!(!clerk_only.is_ancestor_of(&auditor, &alice_uid));
        let bob = entities(
            &store,
            &mapping,
            &token("bob", &["clerk", "auditor"]),
            SchemaCheck::TrustShape,
        );
        assert!(bob.get(&alice_uid).is_none());
    }

    /// Concurrent first requests of one principal used to each build its
    /// entity set (get, miss, build, insert): a burst paid the closure
    /// computation once per request. Now one builds, the others wait for it.
    #[test]
    fn concurrent_first_requests_of_a_principal_build_its_entities_once() {
        let (store, mapping) = quickstart();
        let threads = 8;
        let principals = 20;
        let barrier = std::sync::Barrier::new(threads);
        for round in 0..principals {
            let sub = format!("user{round}");
            let sets: Vec<Arc<Entities>> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..threads)
                    .map(|_| {
                        let (store, mapping, barrier, sub) = (&store, &mapping, &barrier, &sub);
                        s.spawn(move || {
                            let first = token(sub, &["clerk", "auditor"]);
                            barrier.wait();
                            entities(store, mapping, &first, SchemaCheck::TrustShape)
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            assert!(sets.iter().all(|set| Arc::ptr_eq(set, &sets[0])));
        }
        assert_eq!(
            mapping.principal_entity_builds(),
            principals,
            "one build per principal, however many asked at once"
        );
        // A repeat (roles in another order) is no build.
        let again = token("user0", &["auditor", "clerk"]);
        entities(&store, &mapping, &again, SchemaCheck::TrustShape);
        assert_eq!(mapping.principal_entity_builds(), principals);
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[2,{"d":1,"c":2}],"x":"s"}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a":{"x":"s","y":[2,{"c":2,"d":1}]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"x":"s","y":[2,{"c":2,"d":1}]},"b":1}"#
        );
    }
}
