//! `portcullis test`: policy tests that live beside the policies.
//!
//! Each `*.toml` file in `<policies>/tests/` holds `[[case]]`s: the claims of a
//! token (signed on the fly with a throw-away key the test engine alone trusts,
//! so the whole pipeline runs: token rules, routes, mapping, policies), or no
//! token with a workload identity, an HTTP request, and the expected outcome.
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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::attributes::{HttpRequest, parse_source_ip};
use crate::authn::mint::SigningKey;
use crate::decision::{Decision, DenyReason, Verdict};
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
    /// The mTLS peer's identity (e.g. a SPIFFE ID).
    #[serde(default)]
    workload: Option<String>,
    expect: String,
    #[serde(default)]
    policies: Option<Vec<String>>,
}

fn default_method() -> String {
    "GET".into()
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

/// The result of a run.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Every case, in file order.
    pub cases: Vec<CaseResult>,
    /// Policies no case had as a determining policy.
    pub unexercised: Vec<String>,
}

impl Report {
    /// True when every case passed (and there was at least one).
    pub(crate) fn passed(&self) -> bool {
        !self.cases.is_empty() && self.cases.iter().all(|c| c.failure.is_none())
    }
}

/// Runs every test file in `<policy dir>/tests/` against `engine`, which must
/// have been given [`test_signing_key`]'s key with [`Engine::trust_test_key`].
pub(crate) async fn run(
    engine: &Engine,
    key: &SigningKey,
    policy_dir: &Path,
) -> Result<Report, PolicyTestError> {
    let dir = policy_dir.join("tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| PolicyTestError::File {
            path: dir.clone(),
            message: format!("cannot list test files: {e}"),
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut report = Report::default();
    let mut exercised = BTreeSet::new();
    for path in files {
        let file_error = |message: String| PolicyTestError::File {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| file_error(e.to_string()))?;
        let file: TestFile = toml::from_str(&text).map_err(|e| file_error(e.to_string()))?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for case in file.cases {
            let name = format!("{file_name}: {}", case.name);
            let expected = Expected::parse(&case.expect).ok_or_else(|| {
                file_error(format!(
                    "case {:?}: expect must be allow, deny, 400, 401 or 401:<reason>, found {:?}",
                    case.name, case.expect
                ))
            })?;
            let request = build_request(engine, key, &case).map_err(file_error)?;
            let decision = engine.decide(&request).await;
            exercised.extend(decision.policies.iter().cloned());
            let failure = compare(&expected, case.policies.as_deref(), &decision);
            report.cases.push(CaseResult { name, failure });
        }
    }
    let mut all: Vec<String> = engine
        .policies()
        .policies
        .policies()
        .map(|p| p.id().to_string())
        .collect();
    all.sort();
    report.unexercised = all
        .into_iter()
        .filter(|id| !exercised.contains(id))
        .collect();
    Ok(report)
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let mut full = Map::new();
        full.insert("iss".into(), json!(issuer.issuer));
        full.insert("aud".into(), json!(issuer.audiences.first()));
        full.insert("iat".into(), json!(now));
        full.insert("exp".into(), json!(now + 300));
        // Relative times: `exp = "-60"` means 60 seconds ago.
        for (name, value) in claims {
            let value = match (name.as_str(), value) {
                ("exp" | "iat" | "nbf", Value::String(offset)) => {
                    let offset: i64 = offset.parse().map_err(|_| {
                        format!(
                            "case {:?}: {name} offset {offset:?} is not a number",
                            case.name
                        )
                    })?;
                    json!(now + offset)
                }
                _ => value.clone(),
            };
            full.insert(name.clone(), value);
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
