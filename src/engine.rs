//! The decision pipeline: HTTP request attributes in, [`Decision`] out.
//!
//! ```text
//! attributes ─▶ credential ─▶ identity ─▶ route ─▶ cedar request ─▶ evaluation ─▶ Decision
//! ```
//! Each stage's failure is a typed [`DenyReason`]; nothing here knows about gRPC,
//! Envoy or HTTP status codes (see [`crate::ext_authz`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cedar_policy::Authorizer;

use crate::attributes::HttpRequest;
use crate::authn::credential::bearer_token;
use crate::authn::jwt::{Issuer, IssuerSet};
use crate::authn::{TokenError, VerifiedToken};
use crate::authz::mapping::{CedarMapping, RequestFacts};
use crate::authz::policy_store::PolicyStore;
use crate::authz::routes::{RouteTable, is_canonical_path};
use crate::authz::{PolicyOutcome, evaluate};
use crate::config::{Config, ResponseConfig};
use crate::decision::{BadRequest, Decision, DenyReason, Verdict};
use crate::revocation::RevocationStore;

/// Everything wrong with a configuration, keys and policy folder, all at once.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct LoadError {
    /// One line per problem, with file and line when known.
    pub problems: Vec<String>,
}

/// A loaded engine: keys, routes and policies, immutable once built.
#[derive(Debug)]
pub struct Engine {
    issuers: IssuerSet,
    routes: RouteTable,
    store: PolicyStore,
    mapping: CedarMapping,
    authorizer: Authorizer,
    default_action: Option<String>,
    response: ResponseConfig,
    policy_dir: PathBuf,
    realm: String,
    revocations: Option<Arc<RevocationStore>>,
}

impl Engine {
    /// Loads keys and policies named by `config` and checks that every route's
    /// action exists in the schema and that the requests we build conform to it.
    pub fn from_config(config: &Config) -> Result<Engine, LoadError> {
        let mut problems = Vec::new();
        let mut issuers = Vec::new();
        for issuer in &config.issuers {
            match Issuer::from_config(issuer) {
                Ok(loaded) => issuers.push(loaded),
                Err(e) => problems.push(format!("issuer {}: {e}", issuer.issuer)),
            }
        }
        let routes = RouteTable::new(&config.routes)
            .map_err(|e| problems.push(e.to_string()))
            .ok();
        let store = PolicyStore::load(&config.policies.dir)
            .map_err(|e| problems.extend(e.diagnostics.iter().map(ToString::to_string)))
            .ok();
        let mapping = CedarMapping::new(&config.application.name)
            .map_err(|e| problems.push(format!("application.name: {e}")))
            .ok();
        let (Some(routes), Some(store), Some(mapping)) = (routes, store, mapping) else {
            return Err(LoadError { problems });
        };
        if !problems.is_empty() {
            return Err(LoadError { problems });
        }
        let engine = Engine {
            issuers: IssuerSet::new(issuers),
            routes,
            store,
            mapping,
            authorizer: Authorizer::new(),
            default_action: config.application.default_action.clone(),
            response: config.response.clone(),
            policy_dir: config.policies.dir.clone(),
            realm: config.application.name.clone(),
            revocations: None,
        };
        let problems = engine.check_actions_against_schema();
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

    /// Every route action must be declared in the schema, and the context we build
    /// for it (with and without the optional token claims) must conform.
    fn check_actions_against_schema(&self) -> Vec<String> {
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
            // Once with every optional attribute present, once with none.
            for optional in [true, false] {
                let http = HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    host: "probe".into(),
                    scheme: "https".into(),
                    source_ip: optional.then(|| [127, 0, 0, 1].into()),
                    ..Default::default()
                };
                let facts = RequestFacts {
                    http: &http,
                    action: &action,
                    path_params: &path_params,
                };
                if let Err(e) = self
                    .mapping
                    .build(&self.store, &probe_token(optional), facts)
                {
                    problems.push(format!("{}: action {action:?}: {e}", schema_file.display()));
                    break;
                }
            }
        }
        problems
    }

    /// Decides `http` now.
    pub fn decide(&self, http: &HttpRequest) -> Decision {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        self.decide_at(http, now)
    }

    /// Decides `http` as if the clock read `now` (seconds since the epoch).
    pub fn decide_at(&self, http: &HttpRequest, now: i64) -> Decision {
        let started = Instant::now();
        let mut decision = Decision::new(&http.method, http.path_without_query());
        decision.verdict = match self.run(http, now, &mut decision) {
            Ok(()) => Verdict::Allow,
            Err(reason) => Verdict::Deny(reason),
        };
        decision.elapsed = started.elapsed();
        decision
    }

    fn run(&self, http: &HttpRequest, now: i64, decision: &mut Decision) -> Result<(), DenyReason> {
        if http.method.is_empty() || http.path.is_empty() {
            return Err(DenyReason::BadRequest(BadRequest::MissingMethodOrPath));
        }
        let path = http.path_without_query();
        if !is_canonical_path(path) {
            return Err(DenyReason::BadRequest(BadRequest::NonCanonicalPath));
        }

        let token = self.authenticate(http, now)?;
        decision.subject = Some(token.subject.clone());
        decision.principal = Some(self.mapping.principal(&token).to_string());
        decision.issuer = Some(token.issuer.clone());
        decision.jti = token.jti.clone();
        // Revocation comes before anything else that uses the identity.
        if let Some(revocations) = &self.revocations
            && revocations.check(&token, now).is_err()
        {
            return Err(DenyReason::Unauthenticated(TokenError::Revoked));
        }

        let route = self.routes.find(&http.method, path);
        let (action, params) = match (&route, &self.default_action) {
            (Some(route), _) => (route.action, route.params.as_slice()),
            (None, Some(default)) => (default.as_str(), &[][..]),
            (None, None) => return Err(DenyReason::NoRoute),
        };
        decision.action = Some(self.mapping.action(action).to_string());
        decision.resource = Some(self.mapping.application().to_string());

        let facts = RequestFacts {
            http,
            action,
            path_params: params,
        };
        let input = self
            .mapping
            .build(&self.store, &token, facts)
            .map_err(|e| {
                decision.errors.push(e.to_string());
                DenyReason::SchemaMismatch
            })?;
        let PolicyOutcome {
            allowed,
            policies,
            errors,
        } = evaluate(&self.authorizer, &self.store, &input);
        decision.policies = policies;
        let had_errors = !errors.is_empty();
        decision.errors = errors;
        match (allowed, had_errors) {
            (true, _) => Ok(()),
            (false, true) => Err(DenyReason::PolicyError),
            (false, false) => Err(DenyReason::PolicyDenied),
        }
    }

    fn authenticate(&self, http: &HttpRequest, now: i64) -> Result<VerifiedToken, DenyReason> {
        let token =
            bearer_token(http.header("authorization")).map_err(DenyReason::Unauthenticated)?;
        self.issuers
            .verify(token, now)
            .map_err(|e: TokenError| DenyReason::Unauthenticated(e))
    }
}

/// A token shaped like real ones, for checking the mapping against the schema.
fn probe_token(with_optional_claims: bool) -> VerifiedToken {
    VerifiedToken {
        issuer: "probe".into(),
        subject: "probe".into(),
        jti: with_optional_claims.then(|| "probe".into()),
        issued_at: 0,
        expires_at: 0,
        scopes: vec!["probe".into()],
        roles: vec!["probe".into()],
        client_id: with_optional_claims.then(|| "probe".into()),
        key_id: "probe".into(),
        api_key_id: None,
    }
}
