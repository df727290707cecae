//! `portcullis test`: policy tests that live beside the policies.
//!
//! Each `*.toml`, `*.yaml` or `*.yml` file in `<policies>/tests/` holds
//! `[[case]]`s (YAML: a `case:` list, same fields): the claims of a token
//! (signed on the fly with a throw-away key the test engine alone trusts, so
//! the whole pipeline runs: token rules, routes, mapping, policies), an API
//! key's identity, an introspection response, or no credential with a workload
//! identity; an HTTP request; and the expected outcome.
//!
//! API-key and introspection cases skip the credential check itself (there is
//! no key file entry nor endpoint to ask): the identity is built as the
//! credential stage builds it ([`ApiKeyIdentity::into_verified`], or the
//! introspection response rules), then the same route, mapping and policy
//! evaluation as a real request decides it (see [`decide_identity`]).
//!
//! After the run, [`Report::coverage`] tells, for every policy and
//! template-linked policy, how many cases it determined.
//!
//! ```toml
//! [[case]]
//! name = "readers read"
//! method = "GET"
//! path = "/orders/7"
//! claims = { sub = "alice", scope = "orders:read" }
//! expect = "allow"               # or "deny" (403), or "401" / "401:expired"
//! policies = ["orders-read"]     # optional: the determining policies
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::attributes::{HttpRequest, parse_source_ip};
use crate::authn::api_key::ApiKeyIdentity;
use crate::authn::introspection::ResponseRules;
use crate::authn::mint::SigningKey;
use crate::authn::{TokenError, VerifiedToken};
use crate::authz::policy_store::annotation_line;
use crate::authz::routes::is_canonical_path;
use crate::config::{Config, IssuerConfig};
use crate::decision::{BadRequest, Decision, DenyReason, Verdict};
use crate::engine::Engine;

/// Errors reading test files (a failing case is not an error: see [`Report`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PolicyTestError {
    /// A test file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The test file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The throw-away signing key could not be made.
    #[error("cannot make the test signing key: {0}")]
    Key(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default, rename = "case")]
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default = "default_method")]
    method: String,
    path: String,
    /// Token claims, merged over defaults (first issuer, its first audience,
    /// issued now, valid five minutes). Absent: no token.
    #[serde(default)]
    claims: Option<Map<String, Value>>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    source_ip: Option<String>,
    /// An API key's identity, as the key file gives it. Exclusive with
    /// `claims` and `introspection`.
    #[serde(default)]
    api_key: Option<ApiKeyCase>,
    /// The claims of an introspection response (RFC 7662), merged over
    /// defaults (`active`, the introspecting issuer, issued now, valid five
    /// minutes). Exclusive with `claims` and `api_key`.
    #[serde(default)]
    introspection: Option<Map<String, Value>>,
    /// The mTLS peer's identity (e.g. a SPIFFE ID).
    #[serde(default)]
    workload: Option<String>,
    expect: ExpectText,
    #[serde(default)]
    policies: Option<Vec<String>>,
}

fn default_method() -> String {
    "GET".into()
}

/// `expect`: a string, or (unquoted in YAML) a status code.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ExpectText {
    Text(String),
    Code(u16),
}

impl ExpectText {
    fn text(&self) -> String {
        match self {
            ExpectText::Text(text) => text.clone(),
            ExpectText::Code(code) => code.to_string(),
        }
    }
}

/// The identity an API key grants: the fields of its key file entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyCase {
    id: String,
    principal: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// What a case expects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    Allow,
    Forbidden,
    Unauthenticated(Option<String>),
    BadRequest,
}

impl Expected {
    fn parse(text: &str) -> Option<Expected> {
        match text.trim() {
            "allow" => Some(Expected::Allow),
            "deny" | "403" => Some(Expected::Forbidden),
            "400" => Some(Expected::BadRequest),
            "401" => Some(Expected::Unauthenticated(None)),
            other => other
                .strip_prefix("401:")
                .map(|reason| Expected::Unauthenticated(Some(reason.trim().to_owned()))),
        }
    }

    fn matches(&self, verdict: Verdict) -> bool {
        match (self, verdict) {
            (Expected::Allow, Verdict::Allow) => true,
            (Expected::BadRequest, Verdict::Deny(DenyReason::BadRequest(_))) => true,
            (Expected::Unauthenticated(reason), Verdict::Deny(DenyReason::Unauthenticated(e))) => {
                reason.as_deref().is_none_or(|r| r == e.class())
            }
            (Expected::Forbidden, Verdict::Deny(reason)) => !matches!(
                reason,
                DenyReason::Unauthenticated(_) | DenyReason::BadRequest(_)
            ),
            _ => false,
        }
    }
}

/// The result of one case.
#[derive(Debug)]
pub(crate) struct CaseResult {
    /// `file: name`.
    pub name: String,
    /// `None` if it passed, else a readable expected/actual diff.
    pub failure: Option<String>,
}

/// How often one policy determined a case's decision.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct PolicyCoverage {
    /// The policy id (a template-linked policy's own id).
    pub id: String,
    /// The file of its text (a linked policy: its template's), relative to
    /// the policy folder.
    pub file: Option<String>,
    /// The line of its `@id("...")` annotation in that file, when it has one.
    pub line: Option<usize>,
    /// The template, for a template-linked policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The number of cases whose decision it determined (allow or deny).
    pub cases: usize,
}

impl PolicyCoverage {
    /// `file:line`, `file`, or `?`.
    pub(crate) fn location(&self) -> String {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => format!("{file}:{line}"),
            (Some(file), None) => file.clone(),
            (None, _) => "?".into(),
        }
    }
}

/// The result of a run.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Every case, in file order.
    pub cases: Vec<CaseResult>,
    /// Policies no case had as a determining policy.
    pub unexercised: Vec<String>,
    /// Every policy and template-linked policy, by id.
    pub coverage: Vec<PolicyCoverage>,
}

impl Report {
    /// True when every case passed (and there was at least one).
    pub(crate) fn passed(&self) -> bool {
        !self.cases.is_empty() && self.cases.iter().all(|c| c.failure.is_none())
    }

    /// Policies that determined at least one decision.
    pub(crate) fn covered(&self) -> usize {
        self.coverage.iter().filter(|p| p.cases > 0).count()
    }

    /// Coverage in tenths of a percent, rounded down (no policy: 100%).
    pub(crate) fn coverage_permille(&self) -> u64 {
        match self.coverage.len() {
            0 => 1000,
            total => (self.covered() as u64 * 1000) / total as u64,
        }
    }

    /// `coverage: N of M policies determined a decision (P%)`.
    pub(crate) fn coverage_line(&self) -> String {
        let permille = self.coverage_permille();
        format!(
            "coverage: {} of {} policies determined a decision ({}.{}%)",
            self.covered(),
            self.coverage.len(),
            permille / 10,
            permille % 10
        )
    }

    /// True when coverage is at least `percent` (compared exactly).
    pub(crate) fn coverage_at_least(&self, percent: f64) -> bool {
        let total = self.coverage.len();
        total == 0 || self.covered() as f64 * 100.0 >= percent * total as f64
    }

    /// The coverage as JSON: totals and every policy.
    pub(crate) fn coverage_json(&self) -> Value {
        let permille = self.coverage_permille();
        json!({
            "covered": self.covered(),
            "total": self.coverage.len(),
            "percent": permille as f64 / 10.0,
            "policies": self.coverage,
            "uncovered": self
                .coverage
                .iter()
                .filter(|p| p.cases == 0)
                .map(|p| p.id.clone())
                .collect::<Vec<_>>(),
        })
    }
}

/// Runs every test file in `<policy dir>/tests/` against `engine`, built from
/// `config` and given [`test_signing_key`]'s key with
/// [`crate::authn::authenticator::Authenticator::trust_test_key`].
pub(crate) async fn run(
    engine: &Engine,
    key: &SigningKey,
    config: &Config,
) -> Result<Report, PolicyTestError> {
    let policy_dir = &config.policies.dir;
    let dir = policy_dir.join("tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| PolicyTestError::File {
            path: dir.clone(),
            message: format!("cannot list test files: {e}"),
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "toml" || e == "yaml" || e == "yml")
        })
        .collect();
    files.sort();
    let mut report = Report::default();
    let mut determined: BTreeMap<String, usize> = BTreeMap::new();
    for path in files {
        let file_error = |message: String| PolicyTestError::File {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| file_error(e.to_string()))?;
        let file: TestFile = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| file_error(e.to_string()))?
        } else {
            serde_yaml_ng::from_str(&text).map_err(|e| file_error(e.to_string()))?
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for case in file.cases {
            let name = format!("{file_name}: {}", case.name);
            let expect = case.expect.text();
            let expected = Expected::parse(&expect).ok_or_else(|| {
                file_error(format!(
                    "case {:?}: expect must be allow, deny, 400, 401 or 401:<reason>, found {:?}",
                    case.name, expect
                ))
            })?;
            let credentials = [
                case.claims.is_some(),
                case.api_key.is_some(),
                case.introspection.is_some(),
            ];
            if credentials.into_iter().filter(|given| *given).count() > 1 {
                return Err(file_error(format!(
                    "case {:?}: give at most one of claims, api_key and introspection",
                    case.name
                )));
            }
            let request = build_request(engine, key, &case).map_err(file_error)?;
            let decision = if let Some(api_key) = &case.api_key {
                let token = api_key_identity(config, api_key);
                decide_identity(engine, &request, token)
            } else if let Some(response) = &case.introspection {
                let token = introspected_identity(config, response, &case.name, unix_now())
                    .map_err(file_error)?;
                decide_identity(engine, &request, token)
            } else {
                engine.decide(&request).await
            };
            for id in decision.policies.iter() {
                *determined.entry(id.clone()).or_default() += 1;
            }
            let failure = compare(&expected, case.policies.as_deref(), &decision);
            report.cases.push(CaseResult { name, failure });
        }
    }
    report.coverage = coverage(engine, policy_dir, &determined);
    report.unexercised = report
        .coverage
        .iter()
        .filter(|p| p.cases == 0)
        .map(|p| p.id.clone())
        .collect();
    Ok(report)
}

/// Every policy and template-linked policy of the folder, sorted by id, with
/// the number of cases it determined and where its text is: the line of its
/// `@id("...")` annotation, found by searching the file's text (Cedar's API
/// gives a parsed policy no source location). A policy without `@id` (named
/// `<file>#<n>`) gets its file alone.
fn coverage(
    engine: &Engine,
    policy_dir: &Path,
    determined: &BTreeMap<String, usize>,
) -> Vec<PolicyCoverage> {
    let store = engine.policies();
    let mut texts: BTreeMap<PathBuf, Option<String>> = BTreeMap::new();
    let mut out: Vec<PolicyCoverage> = store
        .policies
        .policies()
        .map(|policy| {
            let id = policy.id().to_string();
            let template = policy.template_id().map(ToString::to_string);
            // A linked policy's text is its template's.
            let source_id = policy.template_id().unwrap_or(policy.id());
            let path = store.policy_files.get(source_id);
            let line = path.and_then(|path| {
                let text = texts
                    .entry(path.clone())
                    .or_insert_with(|| std::fs::read_to_string(path).ok());
                annotation_line(text.as_deref()?, source_id.as_ref())
            });
            let file = path.map(|path| {
                path.strip_prefix(policy_dir)
                    .unwrap_or(path)
                    .display()
                    .to_string()
            });
            PolicyCoverage {
                cases: determined.get(&id).copied().unwrap_or_default(),
                id,
                file,
                line,
                template,
            }
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Seconds since the epoch.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The identity a valid key with this key file entry grants, as
/// [`ApiKeyIdentity::into_verified`] makes it for `[api_keys]
/// principal_type`; without `[api_keys]`, refused as a real key would be.
fn api_key_identity(config: &Config, case: &ApiKeyCase) -> Result<VerifiedToken, TokenError> {
    let settings = config.api_keys.as_ref().ok_or(TokenError::UnknownApiKey)?;
    let now = unix_now();
    let identity = ApiKeyIdentity {
        id: case.id.clone(),
        principal: case.principal.clone(),
        scopes: case.scopes.clone(),
        roles: case.roles.clone(),
        created: now,
        expires: Some(now + 300),
    };
    Ok(identity.into_verified(&settings.principal_type))
}

/// The identity an introspection response vouches for. The issuer is the one
/// the response's `iss` names, else the introspecting issuer whose `issuer`
/// sorts first. The response is checked and mapped by the introspector's own
/// rules (`active`, `iss`, `exp`/`nbf` with leeway, lifetime, `aud`, principal
/// claim, scopes, roles, `client_id`, `cnf`).
fn introspected_identity(
    config: &Config,
    claims: &Map<String, Value>,
    case: &str,
    now: i64,
) -> Result<Result<VerifiedToken, TokenError>, String> {
    let mut introspecting: Vec<&IssuerConfig> = config
        .issuers
        .iter()
        .filter(|i| i.introspection.is_some())
        .collect();
    introspecting.sort_by(|a, b| a.issuer.cmp(&b.issuer));
    let issuer = match claims.get("iss").and_then(Value::as_str) {
        Some(iss) => introspecting.into_iter().find(|i| i.issuer == iss),
        None => introspecting.into_iter().next(),
    }
    .ok_or_else(|| format!("case {case:?}: no issuer with [introspection] for this response"))?;
    let mut response = Map::new();
    response.insert("active".into(), json!(true));
    response.insert("iss".into(), json!(issuer.issuer));
    response.insert("iat".into(), json!(now));
    response.insert("exp".into(), json!(now + 300));
    for (name, value) in claims {
        response.insert(name.clone(), relative_time(name, value, now, case)?);
    }
    Ok(ResponseRules::from_config(issuer).verify(&Value::Object(response), now))
}

/// Decides `http` for an identity the credential stage would have
/// established, with the same steps as `Engine::decide` after it: request
/// checks, principal mapping, route and request facts (with the trusted mTLS
/// peer), then policy evaluation. Not run: revocation, status lists and sender
/// constraints (a test identity has none of them), and response profiles.
fn decide_identity(
    engine: &Engine,
    http: &HttpRequest,
    token: Result<VerifiedToken, TokenError>,
) -> Decision {
    let mut decision = Decision::new(&http.method, http.path_without_query());
    decision.verdict = match decide_identity_stages(engine, http, token, &mut decision) {
        Ok(()) => Verdict::Allow,
        Err(reason) => Verdict::Deny(reason),
    };
    decision
}

fn decide_identity_stages(
    engine: &Engine,
    http: &HttpRequest,
    token: Result<VerifiedToken, TokenError>,
    decision: &mut Decision,
) -> Result<(), DenyReason> {
    if http.method.is_empty() || http.path.is_empty() {
        return Err(DenyReason::BadRequest(BadRequest::MissingMethodOrPath));
    }
    if !is_canonical_path(http.path_without_query()) {
        return Err(DenyReason::BadRequest(BadRequest::NonCanonicalPath));
    }
    let token = token.map_err(DenyReason::Unauthenticated)?;
    decision.credential = Some(token.credential.as_str());
    decision.subject = Some(token.subject.clone());
    decision.issuer = Some(token.issuer.clone());
    decision.api_key_id = token.api_key_id.clone();
    let evaluator = engine.evaluator();
    let principal = evaluator.principal(&token).map_err(|e| {
        decision.errors.push(e.to_string());
        DenyReason::SchemaMismatch
    })?;
    decision.principal = Some(principal.to_string());
    let route = evaluator.route(http);
    let trusted_peer = engine.authenticator().trusted_peer(http);
    let facts = evaluator
        .request_facts(http, &route, trusted_peer)
        .ok_or(DenyReason::NoRoute)?;
    decision.action = Some(evaluator.action_name(facts.action));
    let outcome = evaluator.evaluate(&token, facts).map_err(|e| {
        decision.errors.push(e.to_string());
        DenyReason::SchemaMismatch
    })?;
    decision.policies = outcome.policies.clone();
    decision.errors = outcome.errors.clone();
    match (outcome.allowed, !outcome.errors.is_empty()) {
        (true, _) => Ok(()),
        (false, true) => Err(DenyReason::PolicyError),
        (false, false) => Err(DenyReason::PolicyDenied),
    }
}

/// `exp`, `iat` and `nbf` given as strings are offsets in seconds from now.
fn relative_time(name: &str, value: &Value, now: i64, case: &str) -> Result<Value, String> {
    match (name, value) {
        ("exp" | "iat" | "nbf", Value::String(offset)) => {
            let offset: i64 = offset
                .parse()
                .map_err(|_| format!("case {case:?}: {name} offset {offset:?} is not a number"))?;
            Ok(json!(now + offset))
        }
        _ => Ok(value.clone()),
    }
}

fn compare(
    expected: &Expected,
    policies: Option<&[String]>,
    decision: &Decision,
) -> Option<String> {
    let mut problems = Vec::new();
    if !expected.matches(decision.verdict) {
        problems.push(format!(
            "  expected: {}\n  actual:   {} ({})",
            describe_expected(expected),
            describe_verdict(decision.verdict),
            decision.verdict.class()
        ));
    }
    if let Some(want) = policies {
        let mut want = want.to_vec();
        want.sort();
        if *want != *decision.policies {
            problems.push(format!(
                "  expected policies: {want:?}\n  actual policies:   {:?}",
                decision.policies
            ));
        }
    }
    if !decision.errors.is_empty() {
        problems.push(format!("  evaluation errors: {:?}", decision.errors));
    }
    (!problems.is_empty()).then(|| problems.join("\n"))
}

fn describe_expected(expected: &Expected) -> String {
    match expected {
        Expected::Allow => "allow".into(),
        Expected::Forbidden => "deny (403)".into(),
        Expected::BadRequest => "400".into(),
        Expected::Unauthenticated(None) => "401".into(),
        Expected::Unauthenticated(Some(reason)) => format!("401 {reason}"),
    }
}

fn describe_verdict(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny(DenyReason::Unauthenticated(_)) => "401",
        Verdict::Deny(DenyReason::BadRequest(_)) => "400",
        Verdict::Deny(_) => "deny (403)",
    }
}

fn build_request(engine: &Engine, key: &SigningKey, case: &Case) -> Result<HttpRequest, String> {
    let mut http = HttpRequest {
        method: case.method.to_ascii_uppercase(),
        path: case.path.clone(),
        host: case.host.clone().unwrap_or_else(|| "localhost".into()),
        scheme: "https".into(),
        peer_principal: case.workload.clone(),
        ..Default::default()
    };
    if let Some(ip) = &case.source_ip {
        http.source_ip = Some(
            parse_source_ip(ip)
                .ok_or_else(|| format!("case {:?}: bad source_ip {ip:?}", case.name))?,
        );
    }
    for (name, value) in &case.headers {
        http.headers
            .insert(name.to_ascii_lowercase(), value.clone());
    }
    if let Some(claims) = &case.claims {
        let issuer = engine
            .authenticator()
            .issuers()
            .iter()
            .min_by(|a, b| a.issuer.cmp(&b.issuer))
            .ok_or("no issuer configured")?;
        let now = unix_now();
        let mut full = Map::new();
        full.insert("iss".into(), json!(issuer.issuer));
        full.insert("aud".into(), json!(issuer.audiences.first()));
        full.insert("iat".into(), json!(now));
        full.insert("exp".into(), json!(now + 300));
        // Relative times: `exp = "-60"` means 60 seconds ago.
        for (name, value) in claims {
            full.insert(name.clone(), relative_time(name, value, now, &case.name)?);
        }
        let token = key
            .sign_claims(&Value::Object(full))
            .map_err(|e| e.to_string())?;
        http.headers
            .insert("authorization".into(), format!("Bearer {token}"));
    }
    Ok(http)
}

/// A fresh ES256 key (kid `portcullis-test`) for signing test tokens.
pub(crate) fn test_signing_key() -> Result<SigningKey, PolicyTestError> {
    SigningKey::generate_es256(Some(TEST_KID.into()))
        .map_err(|e| PolicyTestError::Key(e.to_string()))
}

/// The `kid` of the throw-away test key.
pub(crate) const TEST_KID: &str = "portcullis-test";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_of_a_policy_is_that_of_its_id_annotation() {
        let text = "// x\n@id(\"a\")\npermit (principal, action, resource);\n\n@id( \"b\" ) @reason(\"c\")\nforbid (principal, action, resource);\n";
        assert_eq!(annotation_line(text, "a"), Some(2));
        assert_eq!(annotation_line(text, "b"), Some(5));
        assert_eq!(annotation_line(text, "c"), None);
        assert_eq!(annotation_line(text, "orders.cedar#0"), None);
    }

    fn report(cases: &[usize]) -> Report {
        Report {
            coverage: cases
                .iter()
                .enumerate()
                .map(|(i, cases)| PolicyCoverage {
                    id: format!("p{i}"),
                    file: None,
                    line: None,
                    template: None,
                    cases: *cases,
                })
                .collect(),
            ..Report::default()
        }
    }

    #[test]
    fn coverage_is_rounded_down_for_display_and_compared_exactly() {
        let two_of_three = report(&[1, 0, 4]);
        assert_eq!(
            two_of_three.coverage_line(),
            "coverage: 2 of 3 policies determined a decision (66.6%)"
        );
        assert!(two_of_three.coverage_at_least(66.0));
        assert!(!two_of_three.coverage_at_least(66.7));
        assert!(report(&[]).coverage_at_least(100.0));
        assert_eq!(
            report(&[]).coverage_line(),
            "coverage: 0 of 0 policies determined a decision (100.0%)"
        );
        assert_eq!(report(&[0]).coverage_json()["uncovered"], json!(["p0"]));
    }
}
