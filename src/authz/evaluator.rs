//! The evaluation stage: from an identity and the request's facts to a
//! [`PolicyOutcome`].
//!
//! ```text
//! route ─▶ request facts ─▶ decision key ─▶ decision cache ─▶ Cedar request ─▶ sliced evaluation
//! ```
//! One [`Evaluator`] holds one policy folder's generation: routes, the
//! mapping, the store and its index, and the decision cache. A policy reload
//! builds a new one; nothing of the serving one changes.

use std::path::PathBuf;
use std::sync::Arc;

use cedar_policy::{Authorizer, EntityUid};
use tracing::field::Empty;

use super::decision_cache::DecisionCache;
use super::mapping::{
    CedarMapping, DirectError, DirectRequest, KeyFields, MappingError, RequestFacts, SchemaCheck,
};
use super::policy_store::PolicyStore;
use super::routes::{RouteMatch, RouteTable};
use super::{PolicyOutcome, conformance, evaluate};
use crate::attributes::HttpRequest;
use crate::authn::VerifiedToken;
use crate::config::{Config, Mode};

/// Routes, mapping, policies and the decision cache of one policy generation.
#[derive(Debug)]
pub struct Evaluator {
    routes: RouteTable,
    store: PolicyStore,
    mapping: CedarMapping,
    /// The context fields the decision key covers: those the store's policies
    /// can read.
    decision_fields: KeyFields,
    authorizer: Authorizer,
    default_action: Option<String>,
    decisions: DecisionCache,
    mode: Mode,
}

impl Evaluator {
    /// Loads the routes and the policy folder of `config` for requests of
    /// `principal_types`, and checks every action against the schema (see
    /// [`conformance`]). Every problem is returned, one line each.
    pub fn from_config(config: &Config, principal_types: &[String]) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let routes = RouteTable::new(&config.routes)
            .map_err(|e| problems.push(e.to_string()))
            .ok();
        let store = PolicyStore::load(&config.policies.dir)
            .map_err(|e| problems.extend(e.diagnostics.iter().map(ToString::to_string)))
            .ok();
        let mapping = CedarMapping::new(
            &config.application.name,
            principal_types.iter().map(String::as_str),
        )
        .map_err(|e| problems.push(format!("application: {e}")))
        .ok();
        let (Some(routes), Some(store), Some(mut mapping)) = (routes, store, mapping) else {
            return Err(problems);
        };
        let policy_dir: PathBuf = config.policies.dir.clone();
        let default_action = config.application.default_action.clone();
        let problems = conformance::check_actions(
            &mut mapping,
            &store,
            &routes,
            default_action.as_deref(),
            principal_types,
            &policy_dir,
        );
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Evaluator {
            routes,
            decision_fields: KeyFields::of(&store.context_reads),
            store,
            mapping,
            authorizer: Authorizer::new(),
            default_action,
            decisions: DecisionCache::new(&config.cache),
            mode: config.application.mode,
        })
    }

    /// Warnings, with file and line, for policies that name only actions no
    /// route (nor `default_action`) maps to: `Check` can never reach them,
    /// only `IsAuthorized` and AuthZEN questions can. Policies on any action,
    /// or on an action group, are not judged.
    pub fn unrouted_policies(&self) -> Vec<String> {
        let routed: std::collections::HashSet<cedar_policy::EntityUid> = self
            .routes
            .actions()
            .map(|(action, _)| self.mapping.action(action))
            .chain(self.default_action.iter().map(|a| self.mapping.action(a)))
            .collect();
        let schema = &self.store.schema;
        let groups: std::collections::HashSet<&cedar_policy::EntityUid> =
            schema.action_groups().collect();
        let mut warnings = Vec::new();
        for policy in self.store.policies.policies() {
            let named: Vec<cedar_policy::EntityUid> = match policy.action_constraint() {
                cedar_policy::ActionConstraint::Any => continue,
                cedar_policy::ActionConstraint::Eq(uid) => vec![uid],
                cedar_policy::ActionConstraint::In(uids) => uids,
            };
            if named
                .iter()
                .any(|uid| routed.contains(uid) || groups.contains(uid))
            {
                continue;
            }
            let id = policy.id().to_string();
            // A linked policy's text is its template's.
            let place = self
                .store
                .location(policy.template_id().unwrap_or(policy.id()));
            let actions: Vec<String> = named.iter().map(ToString::to_string).collect();
            warnings.push(format!(
                "{place}: policy {id:?} names only actions no route maps to ({}): Check never reaches it, only IsAuthorized and AuthZEN questions",
                actions.join(", ")
            ));
        }
        warnings
    }

    /// Warnings, with file and line, for each scope a policy tests for
    /// (see [`PolicyStore::scopes_tested`]) that no issuer declares in
    /// `[[issuers]] scopes`; `granted` comes from [`declared_scopes`]. Routes
    /// name no scopes: a route needs a scope only through its policies.
    pub fn undeclared_scopes(&self, granted: &std::collections::BTreeSet<String>) -> Vec<String> {
        self.store
            .scopes_tested()
            .into_iter()
            .filter(|test| !granted.contains(&test.scope))
            .map(|test| {
                format!(
                    "{}: policy {:?} tests for scope {:?}, which no issuer's `scopes` declares: no token can carry it",
                    self.store.location(&test.policy),
                    test.policy.to_string(),
                    test.scope
                )
            })
            .collect()
    }

    /// Warnings, with file and line, for each `forbid` that overrides no
    /// permit (see [`PolicyStore::shadowed_forbids`]): default deny already
    /// denies every request it matches, so it changes no decision (only
    /// which policy a deny names).
    pub fn shadowed_forbids(&self) -> Vec<String> {
        self.store
            .shadowed_forbids()
            .into_iter()
            .map(|forbid| {
                let reasons: Vec<String> = forbid
                    .actions
                    .iter()
                    .map(|(action, why)| format!("{why} {action}"))
                    .collect();
                format!(
                    "{}: forbid {:?} overrides no permit: {}",
                    self.store.location(&forbid.policy),
                    forbid.policy.to_string(),
                    reasons.join("; ")
                )
            })
            .collect()
    }

    /// The loaded policy folder.
    pub fn policies(&self) -> &PolicyStore {
        &self.store
    }

    /// The decision cache (statistics, tests).
    pub fn decision_cache(&self) -> &DecisionCache {
        &self.decisions
    }

    /// The global enforcement mode (`[application] mode`).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The route `http` matches, if any.
    pub fn route<'a>(&'a self, http: &'a HttpRequest) -> Option<RouteMatch<'a>> {
        self.routes.find(&http.method, http.path_without_query())
    }

    /// The enforcement mode of a request's policy decision: Envoy's
    /// `context_extensions` `portcullis.mode`, else the route's, else the global.
    pub fn policy_mode(&self, http: &HttpRequest) -> Mode {
        if let Some(mode) = http
            .context_extensions
            .get("portcullis.mode")
            .and_then(|m| Mode::parse(m))
        {
            return mode;
        }
        self.route(http).and_then(|r| r.mode).unwrap_or(self.mode)
    }

    /// What the mapping reads besides the identity: the route's action (or the
    /// default action) and path parameters, the trusted peer identity, and the
    /// mTLS caller. `None` when no route matches and there is no default.
    pub fn request_facts<'a>(
        &'a self,
        http: &'a HttpRequest,
        route: &'a Option<RouteMatch<'a>>,
        trusted_peer: Option<&'a str>,
    ) -> Option<RequestFacts<'a>> {
        let (action, path_params) = match (route, &self.default_action) {
            (Some(route), _) => (route.action, route.params.as_slice()),
            (None, Some(default)) => (default.as_str(), &[][..]),
            (None, None) => return None,
        };
        Some(RequestFacts {
            http,
            action,
            path_params,
            workload: trusted_peer,
            caller: http.caller.as_deref(),
        })
    }

    /// The principal's entity id, or why the identity does not fit the schema.
    pub fn principal(&self, token: &VerifiedToken) -> Result<EntityUid, MappingError> {
        self.mapping.principal(token)
    }

    /// The action's full Cedar name, as the audit line records it.
    pub fn action_name(&self, action: &str) -> String {
        self.mapping.action_name(action)
    }

    /// The application entity's name (the resource of `Check` decisions).
    pub fn application_name(&self) -> &str {
        self.mapping.application_name()
    }

    /// Policy evaluation through the decision cache.
    pub fn evaluate(
        &self,
        token: &VerifiedToken,
        facts: RequestFacts<'_>,
    ) -> Result<Arc<PolicyOutcome>, MappingError> {
        let key = self.decisions.is_enabled().then(|| {
            self.mapping
                .decision_key(&self.decision_fields, token, facts)
        });
        if let Some(key) = &key {
            let lookup = tracing::debug_span!("cache_lookup", cache = "decision", hit = Empty);
            let hit = lookup.in_scope(|| self.decisions.get(key));
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
            self.decisions.insert(key, outcome.clone());
        }
        Ok(outcome)
    }

    /// A direct request's evaluation through the decision cache (its keys
    /// have their own domain, see [`CedarMapping::direct_decision_key`]). A
    /// request that fails validation is never cached, so a hit was valid.
    pub fn evaluate_direct(
        &self,
        token: &VerifiedToken,
        request: &DirectRequest,
    ) -> Result<Arc<PolicyOutcome>, DirectError> {
        let key = self
            .decisions
            .is_enabled()
            .then(|| self.mapping.direct_decision_key(token, request));
        if let Some(hit) = key.as_ref().and_then(|k| self.decisions.get(k)) {
            return Ok(hit);
        }
        let input = self.mapping.build_direct(&self.store, token, request)?;
        let outcome = Arc::new(evaluate(&self.authorizer, &self.store, &input));
        if let Some(key) = key {
            self.decisions.insert(key, outcome.clone());
        }
        Ok(outcome)
    }

    /// The Cedar request built for `token` and `facts` (principal with its
    /// parents, action, resource, context) as JSON, validated against the
    /// schema; `None` when it does not build. For `check --explain`.
    pub fn explain(
        &self,
        token: &VerifiedToken,
        facts: RequestFacts<'_>,
    ) -> Option<serde_json::Value> {
        let input = self
            .mapping
            .build(&self.store, token, facts, SchemaCheck::Validate)
            .ok()?;
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
        Some(serde_json::json!({
            "principal": input.principal.to_string(),
            "principal_parents": parents,
            "action": input.action.to_string(),
            "resource": input.resource.to_string(),
            "context": context,
        }))
    }
}

/// The scopes tokens can carry, when the configuration says: the union of
/// `[[issuers]] scopes`, if every issuer (JWT or introspection) declares
/// them. `None` (nothing to judge against) when an issuer does not declare
/// them, when there is no issuer, or when API keys are configured (a key
/// can be created with any scope at any time).
pub fn declared_scopes(config: &Config) -> Option<std::collections::BTreeSet<String>> {
    if config.issuers.is_empty() || config.api_keys.is_some() {
        return None;
    }
    let mut granted = std::collections::BTreeSet::new();
    for issuer in &config.issuers {
        granted.extend(issuer.scopes.as_ref()?.iter().cloned());
    }
    Some(granted)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::authn::{CredentialKind, VerifiedToken};
    use crate::test_setup::{NOW, request, setup};

    fn evaluator(application: &str) -> Evaluator {
        let setup = setup(application);
        Evaluator::from_config(&setup.config, &["User".to_owned()]).unwrap()
    }

    fn alice(scopes: &[&str]) -> VerifiedToken {
        VerifiedToken {
            issuer: "https://idp.test".into(),
            subject: "alice".into(),
            principal_type: "User".into(),
            principal_id: "alice".into(),
            jti: Some("t1".into()),
            issued_at: NOW - 10,
            expires_at: NOW + 600,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            roles: vec![],
            client_id: None,
            key_id: "k1".into(),
            api_key_id: None,
            credential: CredentialKind::Jwt,
            binding: None,
            status: None,
            claims: Vec::new(),
        }
    }

    #[test]
    fn routes_give_the_action_and_path_parameters() {
        let evaluator = evaluator("");
        let http = request("/orders/7", None);
        let route = evaluator.route(&http);
        let facts = evaluator
            .request_facts(&http, &route, None)
            .expect("routed");
        assert_eq!(facts.action, "get /orders/{id}");
        assert_eq!(facts.path_params, [("id".to_owned(), "7".to_owned())]);
        let stray = request("/invoices", None);
        let none = evaluator.route(&stray);
        assert!(evaluator.request_facts(&stray, &none, None).is_none());
    }

    #[test]
    fn a_decision_is_evaluated_once_then_served_from_the_decision_cache() {
        let evaluator = evaluator("");
        let http = request("/orders/7", None);
        let route = evaluator.route(&http);
        let facts = || evaluator.request_facts(&http, &route, None).unwrap();
        let reader = alice(&["orders:read"]);
        let first = evaluator.evaluate(&reader, facts()).unwrap();
        assert!(first.allowed);
        assert_eq!(&*first.policies, ["orders-read".to_owned()]);
        let again = evaluator.evaluate(&reader, facts()).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the cached outcome");
        assert_eq!(evaluator.decision_cache().len(), 1);
        // Another scope is another decision.
        let writer = evaluator
            .evaluate(&alice(&["orders:write"]), facts())
            .unwrap();
        assert!(!writer.allowed);
        assert_eq!(evaluator.decision_cache().len(), 2);
    }

    #[test]
    fn envoys_mode_overrides_the_route_which_overrides_the_global_mode() {
        let evaluator = evaluator("mode = \"dry-run\"");
        let mut http = request("/orders/7", None);
        assert_eq!(evaluator.policy_mode(&http), Mode::DryRun);
        http.context_extensions
            .insert("portcullis.mode".into(), "enforce".into());
        assert_eq!(evaluator.policy_mode(&http), Mode::Enforce);
    }
}
