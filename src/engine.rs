//! The decision pipeline: HTTP request attributes in, [`Decision`] out.
//!
//! ```text
//! attributes ─▶ credential ─▶ identity ─▶ route ─▶ cedar request ─▶ evaluation ─▶ Decision
//! ```
//! Each stage's failure is a typed [`DenyReason`]; nothing here knows about gRPC,
//! Envoy or HTTP status codes (see [`crate::ext_authz`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cedar_policy::Authorizer;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::attributes::HttpRequest;
use crate::authn::api_key::{ReloadingApiKeyStore, is_api_key};
use crate::authn::credential::{PresentedCredential, bearer_token};
use crate::authn::introspection::{self, token_digest};
use crate::authn::jwks::VerificationKey;
use crate::authn::jwt::{Issuer, IssuerSet};
use crate::authn::mint::SigningKey;
use crate::authn::workload::WorkloadIdentities;
use crate::authn::{CredentialKind, MAX_TOKEN_BYTES, TokenError, VerifiedToken};
use crate::authz::mapping::{
    CedarMapping, DirectError, DirectRequest, KeyFields, MappingError, RequestFacts, SchemaCheck,
};
use crate::authz::policy_store::PolicyStore;
use crate::authz::routes::{RouteMatch, RouteTable, is_canonical_path};
use crate::authz::{PolicyOutcome, evaluate};
use crate::cache::{CachedToken, Caches};
use crate::config::{ApiKeysConfig, Config, Mode, ResponseConfig};
use crate::decision::{BadRequest, Decision, DenyReason, Verdict};
use crate::revocation::RevocationStore;

/// Everything wrong with a configuration, keys and policy folder, all at once.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct LoadError {
    /// One line per problem, with file and line when known.
    pub problems: Vec<String>,
}

/// The API key store and its settings.
#[derive(Debug, Clone)]
struct ApiKeys {
    store: Arc<ReloadingApiKeyStore>,
    settings: ApiKeysConfig,
}

/// A loaded engine: keys, routes and policies, immutable once built.
#[derive(Debug)]
pub struct Engine {
    issuers: IssuerSet,
    api_keys: Option<ApiKeys>,
    workload: Option<WorkloadIdentities>,
    routes: RouteTable,
    store: PolicyStore,
    mapping: CedarMapping,
    /// The context fields the decision key covers: those the store's policies
    /// can read.
    decision_fields: KeyFields,
    authorizer: Authorizer,
    default_action: Option<String>,
    response: ResponseConfig,
    policy_dir: PathBuf,
    realm: String,
    caches: Caches,
    mode: Mode,
    token_mode: Mode,
    revocations: Option<Arc<RevocationStore>>,
    generation: u64,
    counters: Arc<CredentialCounters>,
}

/// How often credentials were verified: shared by an engine and the engines
/// reloaded from it, so the numbers cover the process's life.
#[derive(Debug, Default)]
pub struct CredentialCounters {
    /// Runs of the credential stage (one per `Check`, one per `IsAuthorized`,
    /// one per `BatchIsAuthorized` whatever its size, one per `explain`).
    pub credentials: std::sync::atomic::AtomicU64,
    /// JWT signatures actually verified (verified-token cache misses).
    pub signatures: std::sync::atomic::AtomicU64,
}

/// What the credential stage established; computed once per call and shared
/// by every decision of a batch.
#[derive(Debug, Clone)]
pub struct Authentication {
    /// The verified identity; also kept when it is revoked, for the audit line.
    /// Shared with the verified-token cache, not copied out of it.
    pub token: Option<Arc<VerifiedToken>>,
    /// Why the credential is refused, if it is.
    pub refusal: Option<TokenError>,
}

impl Authentication {
    /// Copies the identity into `decision` and returns it, or the deny reason.
    fn record(&self, decision: &mut Decision) -> Result<&VerifiedToken, DenyReason> {
        if let Some(token) = &self.token {
            decision.credential = Some(token.credential.as_str());
            decision.subject = Some(token.subject.clone());
            decision.issuer = Some(token.issuer.clone());
            decision.jti = token.jti.clone();
            decision.api_key_id = token.api_key_id.clone();
        }
        match (&self.token, self.refusal) {
            (_, Some(refusal)) => Err(DenyReason::Unauthenticated(refusal)),
            (Some(token), None) => Ok(token),
            (None, None) => Err(DenyReason::Unauthenticated(TokenError::Missing)),
        }
    }
}

/// The method recorded in the decision (and audit line) of a direct request.
pub const DIRECT_METHOD: &str = "IsAuthorized";

impl Engine {
    /// Loads keys and policies named by `config` and checks that every route's
    /// action exists in the schema and that the requests we build conform to it.
    pub fn from_config(config: &Config) -> Result<Engine, LoadError> {
        Self::build(config, None)
    }

    /// A new engine with the policy folder read again: issuers and their keys,
    /// API keys and revocations are shared with `self`, the caches start empty,
    /// and the generation is one more. Nothing of `self` changes, so a reload
    /// that fails leaves the serving engine as it was.
    pub fn reload_policies(&self, config: &Config) -> Result<Engine, LoadError> {
        Self::build(config, Some(self))
    }

    fn build(config: &Config, previous: Option<&Engine>) -> Result<Engine, LoadError> {
        let mut problems = Vec::new();
        let mut issuers = Vec::new();
        if previous.is_none() {
            for issuer in &config.issuers {
                match Issuer::from_config(issuer) {
                    Ok(loaded) => issuers.push(loaded),
                    Err(e) => problems.push(format!("issuer {}: {e}", issuer.issuer)),
                }
            }
        }
        let routes = RouteTable::new(&config.routes)
            .map_err(|e| problems.push(e.to_string()))
            .ok();
        let store = PolicyStore::load(&config.policies.dir)
            .map_err(|e| problems.extend(e.diagnostics.iter().map(ToString::to_string)))
            .ok();
        let mut principal_types: Vec<String> = config
            .issuers
            .iter()
            .map(|i| i.principal_type.clone())
            .chain(config.api_keys.iter().map(|k| k.principal_type.clone()))
            .chain(config.workload.iter().map(|w| w.principal_type.clone()))
            .collect();
        principal_types.sort();
        principal_types.dedup();
        let mapping = CedarMapping::new(
            &config.application.name,
            principal_types.iter().map(String::as_str),
        )
        .map_err(|e| problems.push(format!("application: {e}")))
        .ok();
        let (Some(routes), Some(store), Some(mapping)) = (routes, store, mapping) else {
            return Err(LoadError { problems });
        };
        if !problems.is_empty() {
            return Err(LoadError { problems });
        }
        let api_keys = match (&config.api_keys, previous) {
            (_, Some(previous)) => previous.api_keys.clone(),
            (None, None) => None,
            (Some(settings), None) => match ReloadingApiKeyStore::load(&settings.file) {
                Ok(store) => Some(ApiKeys {
                    store: Arc::new(store),
                    settings: settings.clone(),
                }),
                Err(e) => {
                    problems.push(format!("api_keys: {e}"));
                    None
                }
            },
        };
        if !problems.is_empty() {
            return Err(LoadError { problems });
        }
        let mut engine = Engine {
            issuers: match previous {
                Some(previous) => previous.issuers.clone(),
                None => IssuerSet::new(issuers),
            },
            api_keys,
            workload: config
                .workload
                .as_ref()
                .map(WorkloadIdentities::from_config),
            routes,
            decision_fields: KeyFields::of(&store.context_reads),
            store,
            mapping,
            authorizer: Authorizer::new(),
            default_action: config.application.default_action.clone(),
            response: config.response.clone(),
            policy_dir: config.policies.dir.clone(),
            realm: config.application.name.clone(),
            caches: Caches::new(&config.cache),
            mode: config.application.mode,
            token_mode: config.application.token_mode,
            revocations: previous.and_then(|p| p.revocations.clone()),
            generation: previous.map_or(1, |p| p.generation + 1),
            counters: previous.map(|p| p.counters.clone()).unwrap_or_default(),
        };
        let problems = engine.check_actions_against_schema(&principal_types);
        if problems.is_empty() {
            Ok(engine)
        } else {
            Err(LoadError { problems })
        }
    }

    /// Checks every authenticated credential against `store` (shared with the
    /// admin API and, through Redis, with other instances).
    pub fn with_revocations(mut self, store: Arc<RevocationStore>) -> Engine {
        self.revocations = Some(store);
        self
    }

    /// The revocation store checked after authentication, if any.
    pub fn revocations(&self) -> Option<&Arc<RevocationStore>> {
        self.revocations.as_ref()
    }

    /// The policy-set generation: 1 at start, one more per successful reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The loaded policy folder.
    pub fn policies(&self) -> &PolicyStore {
        &self.store
    }

    /// The `realm` of `WWW-Authenticate` challenges: the application name.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// What allow responses add to the upstream request.
    pub fn response_config(&self) -> &ResponseConfig {
        &self.response
    }

    /// Every route action must be declared in the schema, and the requests we
    /// build for it must conform: for each configured principal type (with and
    /// without roles) and with every optional attribute present, then absent.
    /// The shapes that conform are recorded; on the request path any other shape
    /// is denied (`schema_mismatch`) without evaluating, which is what lets the
    /// request path skip per-request validation. Actions whose context also
    /// accepts `workload` get the peer identity in it.
    fn check_actions_against_schema(&mut self, principal_types: &[String]) -> Vec<String> {
        let mut problems = Vec::new();
        let declared: Vec<_> = self.store.schema.actions().cloned().collect();
        let mut actions: Vec<(String, Vec<String>)> = self
            .routes
            .actions()
            .map(|(a, params)| (a.to_owned(), params))
            .collect();
        if let Some(default) = &self.default_action {
            actions.push((default.clone(), Vec::new()));
        }
        let schema_file = self.policy_dir.join("*.cedarschema");
        for (action, params) in actions {
            if !declared.contains(&self.mapping.action(&action)) {
                problems.push(format!(
                    "{}: action {action:?} (from a route or default_action) is not declared in the schema",
                    schema_file.display()
                ));
                continue;
            }
            let path_params: Vec<(String, String)> = params
                .into_iter()
                .map(|p| (p, "probe".to_owned()))
                .collect();
            let conforms =
                |mapping: &CedarMapping, ty: &str, roles: bool, workload: bool, caller: bool| {
                    [true, false].into_iter().try_for_each(|optional| {
                        let http = probe_request(optional);
                        let facts = RequestFacts {
                            http: &http,
                            action: &action,
                            path_params: &path_params,
                            workload: (optional && workload).then_some("spiffe://probe/probe"),
                            caller: (optional && caller).then_some("spiffe://probe/caller"),
                        };
                        let token = probe_token(ty, roles, optional);
                        mapping
                            .build(&self.store, &token, facts, SchemaCheck::Validate)
                            .map(drop)
                    })
                };
            let mut first_error = None;
            let mut any = false;
            for ty in principal_types {
                for roles in [false, true] {
                    match conforms(&self.mapping, ty, roles, false, false) {
                        Ok(()) => {
                            any = true;
                            self.mapping.allow_shape(&action, ty, roles);
                        }
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            if !any {
                if let Some(e) = first_error {
                    problems.push(format!("{}: action {action:?}: {e}", schema_file.display()));
                }
                continue;
            }
            let mut with_workload = self.mapping.clone();
            with_workload.enable_workload_context(&action);
            if principal_types
                .iter()
                .any(|ty| conforms(&with_workload, ty, false, true, false).is_ok())
            {
                self.mapping.enable_workload_context(&action);
            }
            let mut with_caller = self.mapping.clone();
            with_caller.enable_caller_context(&action);
            if principal_types
                .iter()
                .any(|ty| conforms(&with_caller, ty, false, false, true).is_ok())
            {
                self.mapping.enable_caller_context(&action);
            }
        }
        problems
    }

    /// Starts the engine's background work: refreshing remote keys, watching the
    /// API key file. Abort the handles to stop it.
    pub fn spawn_background(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks: Vec<_> = self
            .issuers
            .iter()
            .filter(|i| i.keys.is_remote())
            .map(|i| tokio::spawn(i.keys.clone().refresh_forever()))
            .collect();
        tasks.extend(
            self.api_keys
                .as_ref()
                .map(|k| k.store.spawn_watch(k.settings.reload_interval)),
        );
        tasks
    }

    /// True when every issuer has keys: the engine may then serve.
    pub fn is_ready(&self) -> bool {
        self.issuers.keys_ready()
    }

    /// Makes every issuer trust `key` (for `portcullis test` only: it signs the
    /// test cases' tokens with a throw-away key; `serve` never calls this).
    pub fn trust_test_key(&self, key: &SigningKey) -> Result<(), String> {
        let jwk = &key.public_jwks().keys[0];
        let decoding = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        for issuer in self.issuers.iter() {
            issuer.keys.add_key(
                key.kid(),
                VerificationKey {
                    algorithm: jsonwebtoken::Algorithm::ES256,
                    key: decoding.clone(),
                },
            );
        }
        Ok(())
    }

    /// The header API keys may arrive in, if configured.
    pub fn api_key_header(&self) -> Option<&str> {
        self.api_keys.as_ref()?.settings.header.as_deref()
    }

    /// Whether the mTLS caller `caller` may assert a workload identity in a
    /// direct request (`[workload] asserting_callers`).
    pub fn may_assert_workload(&self, caller: Option<&str>) -> bool {
        self.workload.as_ref().is_some_and(|w| w.may_assert(caller))
    }

    /// The trusted issuers (for key refresh and readiness).
    pub fn issuers(&self) -> &IssuerSet {
        &self.issuers
    }

    /// Fetches the keys of every remote issuer once (for the offline commands).
    pub async fn fetch_remote_keys_once(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for issuer in self.issuers.iter().filter(|i| i.keys.is_remote()) {
            if let Err(e) = issuer.keys.refresh().await {
                problems.push(format!("issuer {}: {e}", issuer.issuer));
            }
        }
        problems
    }

    /// Decides `http` now and also returns the Cedar request that was built for
    /// it (principal with its parents, action, resource, context) as JSON, when
    /// the pipeline got that far. For `check --explain` and the admin `Explain`
    /// call. The request is rebuilt (and validated against the schema) for the
    /// explanation; the credential is checked a second time for it.
    pub async fn explain(&self, http: &HttpRequest) -> (Decision, Option<serde_json::Value>) {
        let decision = self.decide(http).await;
        if decision.action.is_none() {
            return (decision, None);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let path = http.path_without_query();
        let route = self.routes.find(&http.method, path);
        let allow_workload = route.as_ref().is_some_and(|r| r.allow_workload);
        let Ok(token) = self.authenticate(http, allow_workload, now).await else {
            return (decision, None);
        };
        let Some(facts) = self.request_facts(http, &route) else {
            return (decision, None);
        };
        let built = self
            .mapping
            .build(&self.store, &token, facts, SchemaCheck::Validate);
        let explained = built.ok().map(|input| {
            let parents: Vec<String> = input
                .entities
                .ancestors(&input.principal)
                .map(|ancestors| ancestors.map(ToString::to_string).collect())
                .unwrap_or_default();
            let context = input
                .request
                .context()
                .and_then(|c| c.to_json_value().ok())
                .unwrap_or_default();
            serde_json::json!({
                "principal": input.principal.to_string(),
                "principal_parents": parents,
                "action": input.action.to_string(),
                "resource": input.resource.to_string(),
                "context": context,
            })
        });
        (decision, explained)
    }

    /// The enforcement mode of a request's policy decision: Envoy's
    /// `context_extensions` `portcullis.mode`, else the route's, else the global.
    fn policy_mode(&self, http: &HttpRequest) -> Mode {
        if let Some(mode) = http
            .context_extensions
            .get("portcullis.mode")
            .and_then(|m| Mode::parse(m))
        {
            return mode;
        }
        self.routes
            .find(&http.method, http.path_without_query())
            .and_then(|r| r.mode)
            .unwrap_or(self.mode)
    }

    /// Decides `http` now.
    pub async fn decide(&self, http: &HttpRequest) -> Decision {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        self.decide_at(http, now).await
    }

    /// Decides `http` as if the clock read `now` (seconds since the epoch).
    pub async fn decide_at(&self, http: &HttpRequest, now: i64) -> Decision {
        let started = Instant::now();
        let mut decision = Decision::new(&http.method, http.path_without_query());
        decision.policy_generation = self.generation;
        decision.policy_digest = Some(self.store.digest.clone());
        decision.verdict = match self.run(http, now, &mut decision).await {
            Ok(()) => Verdict::Allow,
            Err(reason) => Verdict::Deny(reason),
        };
        decision.dry_run = self.is_dry_run(decision.verdict, || self.policy_mode(http));
        decision.elapsed = started.elapsed();
        decision
    }

    /// Decides an explicit question from a service (`IsAuthorized`) for the
    /// identity the credential stage established, through the same
    /// evaluation stage as `Check` (decision cache, then
    /// [`crate::authz::evaluate`]). A batch authenticates once and calls this
    /// per request. An error is a request that does not fit the schema
    /// (unknown action, resource type, malformed context...): it names the
    /// field, and nothing is decided.
    pub fn decide_direct(
        &self,
        authentication: &Authentication,
        request: &DirectRequest,
    ) -> Result<Decision, DirectError> {
        let started = Instant::now();
        let mut decision = Decision::new(DIRECT_METHOD, "");
        decision.policy_generation = self.generation;
        decision.policy_digest = Some(self.store.digest.clone());
        decision.verdict = match self.run_direct(authentication, request, &mut decision) {
            Ok(()) => Verdict::Allow,
            Err(DirectStop::Deny(reason)) => Verdict::Deny(reason),
            Err(DirectStop::Invalid(e)) => return Err(e),
        };
        decision.dry_run = self.is_dry_run(decision.verdict, || self.mode);
        decision.elapsed = started.elapsed();
        Ok(decision)
    }

    fn run_direct(
        &self,
        authentication: &Authentication,
        request: &DirectRequest,
        decision: &mut Decision,
    ) -> Result<(), DirectStop> {
        let token = authentication.record(decision)?;
        let principal = self.mapping.principal(token).map_err(|e| {
            decision.errors.push(e.to_string());
            DenyReason::SchemaMismatch
        })?;
        decision.principal = Some(principal.to_string());
        decision.action = Some(self.mapping.action_name(&request.action));
        decision.resource = std::str::FromStr::from_str(&request.resource.entity_type)
            .ok()
            .map(|ty| {
                cedar_policy::EntityUid::from_type_name_and_id(
                    ty,
                    cedar_policy::EntityId::new(&request.resource.id),
                )
                .to_string()
            });
        let outcome = self
            .evaluate_direct_cached(token, request)
            .map_err(|e| match e {
                DirectError::Principal(mismatch) => {
                    decision.errors.push(mismatch.to_string());
                    DirectStop::Deny(DenyReason::SchemaMismatch)
                }
                invalid @ DirectError::Invalid { .. } => DirectStop::Invalid(invalid),
            })?;
        decision.policies = outcome.policies.clone();
        decision.errors = outcome.errors.clone();
        match (outcome.allowed, !outcome.errors.is_empty()) {
            (true, _) => Ok(()),
            (false, true) => Err(DenyReason::PolicyError.into()),
            (false, false) => Err(DenyReason::PolicyDenied.into()),
        }
    }

    /// Whether dry-run turns this deny into an allow: `token_mode` for
    /// credential failures, the policy mode for policy denies.
    fn is_dry_run(&self, verdict: Verdict, policy_mode: impl FnOnce() -> Mode) -> bool {
        match verdict {
            // A revocation is an operator's explicit order: enforced in every mode.
            Verdict::Deny(DenyReason::Unauthenticated(TokenError::Revoked)) => false,
            Verdict::Deny(DenyReason::Unauthenticated(_)) => self.token_mode == Mode::DryRun,
            Verdict::Deny(
                DenyReason::PolicyDenied
                | DenyReason::PolicyError
                | DenyReason::NoRoute
                | DenyReason::SchemaMismatch,
            ) => policy_mode() == Mode::DryRun,
            _ => false,
        }
    }

    async fn run(
        &self,
        http: &HttpRequest,
        now: i64,
        decision: &mut Decision,
    ) -> Result<(), DenyReason> {
        if http.method.is_empty() || http.path.is_empty() {
            return Err(DenyReason::BadRequest(BadRequest::MissingMethodOrPath));
        }
        let path = http.path_without_query();
        if !is_canonical_path(path) {
            return Err(DenyReason::BadRequest(BadRequest::NonCanonicalPath));
        }
        let route = self.routes.find(&http.method, path);

        let allow_workload = route.as_ref().is_some_and(|r| r.allow_workload);
        let credential = self
            .presented_credential(http, allow_workload)
            .map_err(DenyReason::Unauthenticated)?;
        let authentication = self.authenticate_credential(credential, now).await;
        let token = authentication.record(decision)?;
        let principal = self.mapping.principal(token).map_err(|e| {
            decision.errors.push(e.to_string());
            DenyReason::SchemaMismatch
        })?;
        decision.principal = Some(principal.to_string());

        // Authenticated first, so an anonymous caller learns nothing about routes.
        let facts = self
            .request_facts(http, &route)
            .ok_or(DenyReason::NoRoute)?;
        decision.action = Some(self.mapping.action_name(facts.action));
        decision.resource = Some(self.mapping.application_name().to_owned());
        let outcome = self.evaluate_cached(token, facts).map_err(|e| {
            decision.errors.push(e.to_string());
            DenyReason::SchemaMismatch
        })?;
        decision.policies = outcome.policies.clone();
        decision.errors = outcome.errors.clone();
        let had_errors = !outcome.errors.is_empty();
        match (outcome.allowed, had_errors) {
            (true, _) => Ok(()),
            (false, true) => Err(DenyReason::PolicyError),
            (false, false) => Err(DenyReason::PolicyDenied),
        }
    }

    /// The credential stage, shared by `Check` and `IsAuthorized`: verifies the
    /// credential (through the verified-token cache), then checks revocation,
    /// right after authentication and before anything else uses the identity
    /// (and before any cached decision).
    pub async fn authenticate_credential(
        &self,
        credential: PresentedCredential<'_>,
        now: i64,
    ) -> Authentication {
        let token = match self.verify_credential(credential, now).await {
            Ok(token) => token,
            Err(refusal) => {
                return Authentication {
                    token: None,
                    refusal: Some(refusal),
                };
            }
        };
        let revoked = self
            .revocations
            .as_ref()
            .is_some_and(|revocations| revocations.check(&token, now).is_err());
        Authentication {
            token: Some(token),
            refusal: revoked.then_some(TokenError::Revoked),
        }
    }

    /// The credential of an HTTP request, in order: `Authorization: Bearer` (a
    /// JWT, an API key, or an opaque token to introspect), the API-key header,
    /// then (on routes that allow it, with no credential at all) the mTLS
    /// peer's workload identity.
    fn presented_credential<'a>(
        &self,
        http: &'a HttpRequest,
        allow_workload: bool,
    ) -> Result<PresentedCredential<'a>, TokenError> {
        let api_key_header = self
            .api_keys
            .as_ref()
            .and_then(|k| k.settings.header.as_deref())
            .and_then(|name| http.header(name));
        match (bearer_token(http.header("authorization")), api_key_header) {
            (Ok(token), _) => Ok(PresentedCredential::Bearer(token)),
            (Err(TokenError::Missing), Some(key)) => Ok(PresentedCredential::ApiKey(key.trim())),
            (Err(TokenError::Missing), None) => Ok(match &http.peer_principal {
                Some(peer) if allow_workload => PresentedCredential::Workload(peer),
                _ => PresentedCredential::None,
            }),
            (Err(e), _) => Err(e),
        }
    }

    /// Verifies an HTTP request's credential (no revocation check: for `explain`).
    async fn authenticate(
        &self,
        http: &HttpRequest,
        allow_workload: bool,
        now: i64,
    ) -> Result<Arc<VerifiedToken>, TokenError> {
        let credential = self.presented_credential(http, allow_workload)?;
        self.verify_credential(credential, now).await
    }

    /// Verifies a credential, whichever way it arrived.
    async fn verify_credential(
        &self,
        credential: PresentedCredential<'_>,
        now: i64,
    ) -> Result<Arc<VerifiedToken>, TokenError> {
        self.counters.credentials.fetch_add(1, Ordering::Relaxed);
        let token = match credential {
            PresentedCredential::None => return Err(TokenError::Missing),
            PresentedCredential::Refused(e) => return Err(e),
            PresentedCredential::Workload(peer) => {
                // Only a trust domain the configuration names is an identity.
                return self
                    .workload
                    .as_ref()
                    .and_then(|workload| workload.identity(peer))
                    .map(Arc::new)
                    .ok_or(TokenError::Missing);
            }
            PresentedCredential::ApiKey(key) => return self.verify_api_key(key, now).map(Arc::new),
            PresentedCredential::Bearer(token) => token,
        };
        // Checked before any parsing (bearer_token did for Check; IsAuthorized
        // hands the value over directly).
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        if is_api_key(token) {
            return self.verify_api_key(token, now).map(Arc::new);
        }
        if is_jwt_shaped(token) {
            return self.verify_jwt(token, now).await;
        }
        // An opaque token names no issuer: its prefix picks the one issuer that
        // introspects it (or the only introspecting issuer takes them all).
        // Never several: one issuer's tokens are not shown to another. A token
        // no issuer claims is refused without a call, and the reason says
        // nothing about which issuers exist.
        let introspectors = self.issuers.introspectors();
        let Some(introspector) = introspection::select(&introspectors, token) else {
            return Err(TokenError::Malformed);
        };
        introspector.introspect(token, now).await.map(Arc::new)
    }
}

impl Engine {
    /// What the mapping reads besides the identity: the route's action (or the
    /// default action) and path parameters, and the peer identity when it is a
    /// trusted workload. `None` when no route matches and there is no default.
    fn request_facts<'a>(
        &'a self,
        http: &'a HttpRequest,
        route: &'a Option<RouteMatch<'a>>,
    ) -> Option<RequestFacts<'a>> {
        let (action, path_params) = match (route, &self.default_action) {
            (Some(route), _) => (route.action, route.params.as_slice()),
            (None, Some(default)) => (default.as_str(), &[][..]),
            (None, None) => return None,
        };
        // Only a trusted peer identity reaches the policies.
        let workload = self.workload.as_ref().and_then(|w| {
            let peer = http.peer_principal.as_deref()?;
            w.identity(peer).map(|_| peer)
        });
        Some(RequestFacts {
            http,
            action,
            path_params,
            workload,
            caller: http.caller.as_deref(),
        })
    }

    /// Policy evaluation through the decision cache.
    fn evaluate_cached(
        &self,
        token: &VerifiedToken,
        facts: RequestFacts<'_>,
    ) -> Result<Arc<PolicyOutcome>, MappingError> {
        let key = self.caches.caches_decisions().then(|| {
            self.mapping
                .decision_key(&self.decision_fields, token, facts)
        });
        if let Some(key) = &key {
            let lookup = tracing::debug_span!("cache_lookup", cache = "decision", hit = Empty);
            let hit = lookup.in_scope(|| self.caches.decision(key));
            lookup.record("hit", hit.is_some());
            // On the request's span (the caller of `run`), for its attributes.
            tracing::Span::current().record("decision_cache_hit", hit.is_some());
            if let Some(hit) = hit {
                return Ok(hit);
            }
        }
        let evaluation = tracing::debug_span!("evaluate_policies", allowed = Empty);
        let outcome = evaluation.in_scope(|| {
            let input = self
                .mapping
                .build(&self.store, token, facts, SchemaCheck::TrustShape)?;
            Ok::<_, MappingError>(Arc::new(evaluate(&self.authorizer, &self.store, &input)))
        })?;
        evaluation.record("allowed", outcome.allowed);
        if let Some(key) = key {
            self.caches.remember_decision(key, outcome.clone());
        }
        Ok(outcome)
    }

    /// A direct request's evaluation through the decision cache (its keys
    /// have their own domain, see [`CedarMapping::direct_decision_key`]). A
    /// request that fails validation is never cached, so a hit was valid.
    fn evaluate_direct_cached(
        &self,
        token: &VerifiedToken,
        request: &DirectRequest,
    ) -> Result<Arc<PolicyOutcome>, DirectError> {
        let key = self
            .caches
            .caches_decisions()
            .then(|| self.mapping.direct_decision_key(token, request));
        if let Some(hit) = key.as_ref().and_then(|k| self.caches.decision(k)) {
            return Ok(hit);
        }
        let input = self.mapping.build_direct(&self.store, token, request)?;
        let outcome = Arc::new(evaluate(&self.authorizer, &self.store, &input));
        if let Some(key) = key {
            self.caches.remember_decision(key, outcome.clone());
        }
        Ok(outcome)
    }

    /// JWT verification through the verified-token cache.
    async fn verify_jwt(&self, token: &str, now: i64) -> Result<Arc<VerifiedToken>, TokenError> {
        let digest = token_digest(token);
        let lookup = tracing::debug_span!("cache_lookup", cache = "token", hit = Empty);
        let hit = lookup.in_scope(|| {
            self.caches
                .token(&digest, now, |iss| self.issuers.key_generation(iss))
        });
        lookup.record("hit", hit.is_some());
        // On the request's span (the caller of `run`), for its attributes.
        tracing::Span::current().record("token_cache_hit", hit.is_some());
        if let Some(hit) = hit {
            return Ok(hit);
        }
        self.counters.signatures.fetch_add(1, Ordering::Relaxed);
        let (verified, window) = self
            .issuers
            .verify_with_window(token, now)
            .instrument(tracing::debug_span!("verify_token", credential = "jwt"))
            .await?;
        let verified = Arc::new(verified);
        self.caches.remember_token(
            digest,
            CachedToken {
                token: verified.clone(),
                key_generation: window.key_generation,
                valid_from: window.from,
                valid_until: window.until,
            },
        );
        Ok(verified)
    }

    /// The engine's caches (statistics, tests).
    pub fn caches(&self) -> &Caches {
        &self.caches
    }

    /// Credential and signature verification counts, over this engine and
    /// the engines it was reloaded from.
    pub fn credential_counters(&self) -> &CredentialCounters {
        &self.counters
    }

    fn verify_api_key(&self, key: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        let _span = tracing::debug_span!("verify_token", credential = "api_key").entered();
        let Some(api_keys) = &self.api_keys else {
            return Err(TokenError::UnknownApiKey);
        };
        if key.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let identity = api_keys.store.verify(key, now)?;
        // Short life applies to keys too: no expiry, or too long a one, is refused.
        let max = api_keys.settings.max_lifetime.as_secs() as i64;
        match identity.expires {
            Some(expires) if expires - identity.created <= max => {}
            _ => return Err(TokenError::LifetimeTooLong),
        }
        Ok(identity.into_verified(&api_keys.settings.principal_type))
    }
}

/// How a direct request stops short of an allow.
enum DirectStop {
    Deny(DenyReason),
    Invalid(DirectError),
}

impl From<DenyReason> for DirectStop {
    fn from(reason: DenyReason) -> Self {
        DirectStop::Deny(reason)
    }
}

/// Three dot-separated parts: a JWS compact serialization.
fn is_jwt_shaped(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

fn probe_request(with_optional_attributes: bool) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        path: "/".into(),
        host: "probe".into(),
        scheme: "https".into(),
        source_ip: with_optional_attributes.then(|| [127, 0, 0, 1].into()),
        ..Default::default()
    }
}

/// A token shaped like real ones, for checking the mapping against the schema.
fn probe_token(principal_type: &str, roles: bool, with_optional_claims: bool) -> VerifiedToken {
    VerifiedToken {
        issuer: "probe".into(),
        subject: "probe".into(),
        principal_type: principal_type.into(),
        principal_id: "probe".into(),
        jti: with_optional_claims.then(|| "probe".into()),
        issued_at: 0,
        expires_at: 0,
        scopes: vec!["probe".into()],
        roles: if roles {
            vec!["probe".into()]
        } else {
            Vec::new()
        },
        client_id: with_optional_claims.then(|| "probe".into()),
        key_id: "probe".into(),
        api_key_id: None,
        credential: CredentialKind::Jwt,
    }
}
