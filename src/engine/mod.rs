//! The decision pipeline: HTTP request attributes in, [`Decision`] out.
//!
//! ```text
//! attributes ─▶ credential stage (authn::authenticator) ─▶ evaluation stage (authz::evaluator) ─▶ Decision
//! ```
//! The engine only sequences the two stages, records what each established in
//! the [`Decision`], and applies dry-run. Each stage's failure is a typed
//! [`DenyReason`]; nothing here knows about gRPC, Envoy or HTTP status codes
//! (see [`crate::ext_authz`]). Building an engine from the configuration is in
//! [`build`].

mod build;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use build::LoadError;

use crate::answer::profile::ResponseProfiles;
use crate::attributes::HttpRequest;
use crate::authn::authenticator::Authenticator;
pub use crate::authn::authenticator::{Authentication, CredentialCounters};
use crate::authn::credential::PresentedCredential;
use crate::authn::sender_constraint::SenderConstraints;
use crate::authn::{TokenBinding, TokenError, VerifiedToken};
use crate::authz::evaluator::Evaluator;
use crate::authz::mapping::{DirectError, DirectRequest};
use crate::authz::policy_store::PolicyStore;
use crate::authz::routes::is_canonical_path;
use crate::config::{Mode, ResponseConfig};
use crate::decision::{BadRequest, Decision, DecisionInputs, DenyReason, Verdict};
use crate::revocation::RevocationStore;

/// A loaded engine: the credential stage, one policy generation's evaluator,
/// and the settings of the answer. Immutable once built.
#[derive(Debug)]
pub struct Engine {
    /// Shared with the engines reloaded from this one.
    authenticator: Arc<Authenticator>,
    /// Shared with the engines reloaded from this one (the DPoP replay
    /// cache must outlive a policy reload).
    sender: Arc<SenderConstraints>,
    evaluator: Evaluator,
    /// The `[[responses]]` profiles, bound to this generation's policies.
    responses: Arc<ResponseProfiles>,
    /// `[audit] record_inputs`: decisions carry their inputs.
    record_inputs: bool,
    response: ResponseConfig,
    realm: String,
    token_mode: Mode,
    generation: u64,
}

/// The method recorded in the decision (and audit line) of a direct request.
pub const DIRECT_METHOD: &str = "IsAuthorized";

/// Copies the identity `authentication` established into `decision` and
/// returns it, or the deny reason.
fn record_identity<'a>(
    authentication: &'a Authentication,
    decision: &mut Decision,
) -> Result<&'a VerifiedToken, DenyReason> {
    if let Some(token) = &authentication.token {
        decision.credential = Some(token.credential.as_str());
        decision.binding = token.binding.as_ref().map(TokenBinding::kind);
        decision.subject = Some(token.subject.clone());
        decision.issuer = Some(token.issuer.clone());
        decision.jti = token.jti.clone();
        decision.api_key_id = token.api_key_id.clone();
    }
    match (&authentication.token, authentication.refusal) {
        (_, Some(refusal)) => Err(DenyReason::Unauthenticated(refusal)),
        (Some(token), None) => Ok(token),
        (None, None) => Err(DenyReason::Unauthenticated(TokenError::Missing)),
    }
}

/// Seconds since the epoch.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

impl Engine {
    /// Checks every authenticated credential against `store` (shared with the
    /// admin API and, through Redis, with other instances).
    pub fn with_revocations(self, store: Arc<RevocationStore>) -> Engine {
        self.authenticator.set_revocations(store);
        self
    }

    /// The credential stage.
    pub fn authenticator(&self) -> &Arc<Authenticator> {
        &self.authenticator
    }

    /// The evaluation stage of this policy generation.
    pub fn evaluator(&self) -> &Evaluator {
        &self.evaluator
    }

    /// The policy-set generation: 1 at start, one more per successful reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The loaded policy folder.
    pub fn policies(&self) -> &PolicyStore {
        self.evaluator.policies()
    }

    /// The `realm` of `WWW-Authenticate` challenges: the application name.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// What allow responses add to the upstream request.
    pub fn response_config(&self) -> &ResponseConfig {
        &self.response
    }

    /// The answer to `decision` with this engine's response settings; with no
    /// engine loaded yet, the defaults (a 503 for every request).
    pub fn answer(engine: Option<&Engine>, decision: &Decision) -> crate::answer::Answer {
        match engine {
            Some(engine) => {
                let mut answer = crate::answer::answer(
                    decision,
                    &engine.response,
                    &engine.realm,
                    engine.authenticator.api_key_header(),
                );
                crate::answer::add_dpop_nonce(&mut answer, decision, || {
                    engine.sender.fresh_dpop_nonce(unix_now())
                });
                answer
            }
            None => crate::answer::answer(decision, &ResponseConfig::default(), "", None),
        }
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
        let route = self.evaluator.route(http);
        let allow_workload = route.as_ref().is_some_and(|r| r.allow_workload);
        let token = match self
            .authenticator
            .presented_credential(http, allow_workload)
        {
            Ok(credential) => self.authenticator.verify(credential, unix_now()).await,
            Err(e) => Err(e),
        };
        let Ok(token) = token else {
            return (decision, None);
        };
        let trusted_peer = self.authenticator.trusted_peer(http);
        let explained = self
            .evaluator
            .request_facts(http, &route, trusted_peer)
            .and_then(|facts| self.evaluator.explain(&token, facts));
        (decision, explained)
    }

    /// Decides `http` now.
    pub async fn decide(&self, http: &HttpRequest) -> Decision {
        self.decide_at(http, unix_now()).await
    }

    /// Decides `http` as if the clock read `now` (seconds since the epoch).
    pub async fn decide_at(&self, http: &HttpRequest, now: i64) -> Decision {
        let started = Instant::now();
        let mut decision = self.new_decision(&http.method, http.path_without_query());
        decision.verdict = match self.run(http, now, &mut decision).await {
            Ok(()) => Verdict::Allow,
            Err(reason) => Verdict::Deny(reason),
        };
        decision.dry_run = self.is_dry_run(decision.verdict, || self.evaluator.policy_mode(http));
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
        let mut decision = self.new_decision(DIRECT_METHOD, "");
        decision.verdict = match self.run_direct(authentication, request, &mut decision) {
            Ok(()) => Verdict::Allow,
            Err(DirectStop::Deny(reason)) => Verdict::Deny(reason),
            Err(DirectStop::Invalid(e)) => return Err(e),
        };
        decision.dry_run = self.is_dry_run(decision.verdict, || self.evaluator.mode());
        decision.elapsed = started.elapsed();
        Ok(decision)
    }

    fn new_decision(&self, method: &str, path: &str) -> Decision {
        let mut decision = Decision::new(method, path);
        decision.policy_generation = self.generation;
        decision.policy_digest = Some(self.evaluator.policies().digest.clone());
        decision
    }

    /// `Check`: request checks, credential stage, route, evaluation stage.
    async fn run(
        &self,
        http: &HttpRequest,
        now: i64,
        decision: &mut Decision,
    ) -> Result<(), DenyReason> {
        if http.method.is_empty() || http.path.is_empty() {
            return Err(DenyReason::BadRequest(BadRequest::MissingMethodOrPath));
        }
        if !is_canonical_path(http.path_without_query()) {
            return Err(DenyReason::BadRequest(BadRequest::NonCanonicalPath));
        }
        let route = self.evaluator.route(http);

        let allow_workload = route.as_ref().is_some_and(|r| r.allow_workload);
        let credential = self
            .authenticator
            .presented_credential(http, allow_workload)
            .map_err(DenyReason::Unauthenticated)?;
        let authentication = self.authenticator.authenticate(credential, now).await;
        let token = record_identity(&authentication, decision)?;
        // Per request, after the (cached) verification: a proof is for one
        // request, a certificate for one connection.
        let access_token = match credential {
            PresentedCredential::Bearer(token) => Some(token),
            _ => None,
        };
        let route_requires = route
            .as_ref()
            .map(|r| r.require_sender_constraint)
            .unwrap_or_default();
        self.sender
            .check(http, token, access_token, route_requires, now)
            .await
            .map_err(DenyReason::Unauthenticated)?;
        let principal = self.evaluator.principal(token).map_err(|e| {
            decision.errors.push(e.to_string());
            DenyReason::SchemaMismatch
        })?;
        decision.principal = Some(principal.to_string());

        // Authenticated first, so an anonymous caller learns nothing about routes.
        let trusted_peer = self.authenticator.trusted_peer(http);
        let facts = self
            .evaluator
            .request_facts(http, &route, trusted_peer)
            .ok_or(DenyReason::NoRoute)?;
        decision.action = Some(self.evaluator.action_name(facts.action));
        decision.resource = Some(self.evaluator.application_name().to_owned());
        if self.record_inputs {
            decision.inputs = Some(Box::new(DecisionInputs {
                principal_type: token.principal_type.clone(),
                principal_id: token.principal_id.clone(),
                roles: token.roles.clone(),
                scopes: token.scopes.clone(),
                iat: token.issued_at,
                exp: token.expires_at,
                client_id: token.client_id.clone(),
                host: http.host.clone(),
                scheme: http.scheme.clone(),
                source_ip: http.source_ip.map(|ip| ip.to_string()),
                workload: facts.workload.map(str::to_owned),
            }));
        }
        let outcome = self.evaluator.evaluate(token, facts).map_err(|e| {
            decision.errors.push(e.to_string());
            DenyReason::SchemaMismatch
        })?;
        decision.policies = outcome.policies.clone();
        decision.errors = outcome.errors.clone();
        let verdict = match (outcome.allowed, !outcome.errors.is_empty()) {
            (true, _) => Ok(()),
            (false, true) => Err(DenyReason::PolicyError),
            (false, false) => Err(DenyReason::PolicyDenied),
        };
        if !self.responses.is_empty() && matches!(verdict, Ok(()) | Err(DenyReason::PolicyDenied)) {
            decision.shaping = self
                .responses
                .render(
                    route.as_ref().and_then(|r| r.response),
                    &decision.policies,
                    verdict.is_ok(),
                    token,
                    &decision.id,
                )
                .map(Arc::new);
        }
        verdict
    }

    /// `IsAuthorized`: the established identity, then the evaluation stage.
    fn run_direct(
        &self,
        authentication: &Authentication,
        request: &DirectRequest,
        decision: &mut Decision,
    ) -> Result<(), DirectStop> {
        let token = record_identity(authentication, decision)?;
        self.sender
            .check_without_request(token)
            .map_err(DenyReason::Unauthenticated)?;
        let principal = self.evaluator.principal(token).map_err(|e| {
            decision.errors.push(e.to_string());
            DenyReason::SchemaMismatch
        })?;
        decision.principal = Some(principal.to_string());
        decision.action = Some(self.evaluator.action_name(&request.action));
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
            .evaluator
            .evaluate_direct(token, request)
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
            // A revocation is an operator's explicit order, a status list
            // entry the issuer's: enforced in every mode.
            Verdict::Deny(DenyReason::Unauthenticated(
                TokenError::Revoked | TokenError::StatusNotValid,
            )) => false,
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

#[cfg(test)]
mod tests;
