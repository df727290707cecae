//! `portcullis replay`: what a policy change would do to recorded decisions.
//!
//! Each recorded decision is re-decided with a proposed policy folder and
//! compared with the verdict it had: unchanged, allow → deny (access closed)
//! or deny → allow (access opened). Two inputs:
//!
//! - **recorded requests** ([`Format::Requests`]): one JSON object per line
//!   holding everything the policies can read (the identity's type, id,
//!   roles, scopes, `iss`, `iat`, `exp`... and the request's method, path,
//!   host, scheme, source address). Replay from these is exact.
//! - **audit lines** ([`Format::Audit`]): the decision log lacks the token's
//!   claims and the request's host, scheme and address. Only API-key and
//!   workload credentials are re-decided from it (their identity is the
//!   key file's entry, or the SPIFFE ID alone); and when the proposed
//!   policies read a field the line lacks, the report says how many records
//!   were re-decided without it ([`Report::inexact`]). JWT, introspected
//!   and AuthZEN decisions are skipped, never guessed.
//!
//! Re-deciding runs the evaluation stage exactly as a live `Check` runs it
//! once the credential stage has established the identity (see
//! `Engine::run`): route, principal, request facts, then
//! [`Evaluator::evaluate`] (sliced Cedar evaluation through the decision
//! cache). Only the credential stage is left out: the recorded identity
//! stands for it. The result is the policy verdict; enforcement modes
//! (dry-run) are not applied, on either side: a recorded dry-run would-deny
//! counts as a deny.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::attributes::HttpRequest;
use crate::authn::{CredentialKind, TokenBinding, VerifiedToken};
use crate::authz::evaluator::Evaluator;
use crate::authz::routes::is_canonical_path;
use crate::config::Config;

/// Malformed lines whose number and error the report keeps (all are counted).
pub const MAX_MALFORMED_LISTED: usize = 100;

/// What a file of recorded decisions holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Recorded decision inputs (`--requests`): exact.
    Requests,
    /// Audit lines (`--audit`): API-key and workload credentials only.
    Audit,
}

/// A recorded verdict: what the policies said (a dry-run would-deny is a deny).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Allow,
    Deny,
}

/// One line of a `--requests` file. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct RecordedRequest {
    #[serde(default)]
    decision_id: Option<String>,
    outcome: Outcome,
    #[serde(default)]
    dry_run: bool,
    principal_type: String,
    principal_id: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    issuer: String,
    #[serde(default)]
    jti: Option<String>,
    iat: i64,
    exp: i64,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    credential: Option<String>,
    #[serde(default)]
    api_key_id: Option<String>,
    #[serde(default)]
    binding: Option<String>,
    method: String,
    path: String,
    host: String,
    #[serde(default = "https")]
    scheme: String,
    #[serde(default)]
    source_ip: Option<IpAddr>,
    #[serde(default)]
    workload: Option<String>,
    #[serde(default)]
    caller: Option<String>,
}

fn https() -> String {
    "https".to_owned()
}

/// The fields of an audit line replay reads. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct AuditLine {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    decision_id: Option<String>,
    outcome: Outcome,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    credential: Option<String>,
    #[serde(default)]
    api_key_id: Option<String>,
    #[serde(default)]
    caller: Option<String>,
    method: String,
    path: String,
}

/// An API key's identity as the key file holds it now.
#[derive(Debug, Clone, Deserialize)]
struct KeyEntry {
    id: String,
    principal: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    created: String,
    #[serde(default)]
    expires: Option<String>,
}

#[derive(Debug, Deserialize)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

/// The API keys of the configuration's key file, by id: the identity an
/// audit line's `api_key_id` stands for (as the file holds it now).
#[derive(Debug, Default)]
pub struct ApiKeyIdentities {
    keys: HashMap<String, VerifiedToken>,
}

impl ApiKeyIdentities {
    /// Reads `[api_keys] file` of `config`; empty without `[api_keys]`.
    pub fn load(config: &Config) -> Result<ApiKeyIdentities, String> {
        let Some(api_keys) = &config.api_keys else {
            return Ok(ApiKeyIdentities::default());
        };
        let path = &api_keys.file;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the API key file {}: {e}", path.display()))?;
        ApiKeyIdentities::from_toml(&text, &api_keys.principal_type, path)
    }

    fn from_toml(
        text: &str,
        principal_type: &str,
        path: &Path,
    ) -> Result<ApiKeyIdentities, String> {
        let file: KeyFile = toml::from_str(text)
            .map_err(|e| format!("the API key file {} is not valid: {e}", path.display()))?;
        let time = |value: &str| -> Option<i64> {
            let time = humantime::parse_rfc3339_weak(value).ok()?;
            let secs = time.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
            i64::try_from(secs).ok()
        };
        let mut keys = HashMap::new();
        for entry in file.keys {
            let token = VerifiedToken {
                issuer: "api-key".into(),
                subject: entry.principal.clone(),
                principal_type: principal_type.to_owned(),
                principal_id: entry.principal,
                jti: None,
                issued_at: time(&entry.created).unwrap_or_default(),
                expires_at: entry.expires.as_deref().and_then(time).unwrap_or_default(),
                scopes: entry.scopes,
                roles: entry.roles,
                client_id: None,
                key_id: String::new(),
                api_key_id: Some(entry.id.clone()),
                credential: CredentialKind::ApiKey,
                binding: None,
                status: None,
                claims: Vec::new(),
            };
            keys.insert(entry.id, token);
        }
        Ok(ApiKeyIdentities { keys })
    }
}

/// A recorded decision ready to be re-decided.
struct Replayable {
    decision_id: Option<String>,
    old: Outcome,
    token: VerifiedToken,
    http: HttpRequest,
    /// The trusted mTLS peer (`context.workload`).
    workload: Option<String>,
    /// Context fields the record does not hold (audit lines).
    missing: &'static [Field],
}

/// A context field, as `context_reads` paths name it.
type Field = &'static [&'static str];

const HOST: Field = &["http", "host"];
const SCHEME: Field = &["http", "scheme"];
const SOURCE_IP: Field = &["http", "source_ip"];
const WORKLOAD: Field = &["workload"];

/// What an audit line of a workload credential lacks.
const WORKLOAD_MISSING: &[Field] = &[HOST, SCHEME, SOURCE_IP];
/// What an audit line of an API key lacks (the key file supplies the
/// identity; a trusted mTLS peer beside the key is not recorded).
const API_KEY_MISSING: &[Field] = &[HOST, SCHEME, SOURCE_IP, WORKLOAD];

/// How one line ended.
enum Parsed {
    Record(Box<Replayable>),
    /// Valid, but not re-decided: why.
    Skip(&'static str),
    Malformed(String),
}

fn parse_request(line: &str) -> Parsed {
    let r: RecordedRequest = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return Parsed::Malformed(e.to_string()),
    };
    let credential = match r.credential.as_deref() {
        None | Some("jwt") => CredentialKind::Jwt,
        Some("introspection") => CredentialKind::Introspected,
        Some("api_key") => CredentialKind::ApiKey,
        Some("workload") => CredentialKind::Workload,
        Some("authzen") => CredentialKind::Authzen,
        Some(other) => return Parsed::Malformed(format!("unknown credential {other:?}")),
    };
    let binding = match r.binding.as_deref() {
        None => None,
        // Only the kind reaches the policies (`context.token.binding`).
        Some("dpop") => Some(TokenBinding::Dpop { jkt: String::new() }),
        Some("mtls") => Some(TokenBinding::Mtls {
            x5t_s256: String::new(),
        }),
        Some(other) => return Parsed::Malformed(format!("unknown binding {other:?}")),
    };
    let token = VerifiedToken {
        issuer: r.issuer,
        subject: r.principal_id.clone(),
        principal_type: r.principal_type,
        principal_id: r.principal_id,
        jti: r.jti,
        issued_at: r.iat,
        expires_at: r.exp,
        scopes: r.scopes,
        roles: r.roles,
        client_id: r.client_id,
        key_id: String::new(),
        api_key_id: r.api_key_id,
        credential,
        binding,
        status: None,
        claims: Vec::new(),
    };
    let http = HttpRequest {
        method: r.method,
        path: r.path,
        host: r.host,
        scheme: r.scheme,
        source_ip: r.source_ip,
        caller: r.caller.map(Into::into),
        ..HttpRequest::default()
    };
    Parsed::Record(Box::new(Replayable {
        decision_id: r.decision_id,
        old: if r.dry_run { Outcome::Deny } else { r.outcome },
        token,
        http,
        workload: r.workload,
        missing: &[],
    }))
}

fn parse_audit(line: &str, api_keys: &ApiKeyIdentities) -> Parsed {
    // A line with `inputs` (`[audit] record_inputs`) holds a whole record:
    // it is replayed exactly, whatever the credential.
    if let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_str(line)
        && let Some(serde_json::Value::Object(inputs)) = fields.remove("inputs")
    {
        fields.extend(inputs);
        return parse_request(&serde_json::Value::Object(fields).to_string());
    }
    let a: AuditLine = match serde_json::from_str(line) {
        Ok(a) => a,
        Err(e) => return Parsed::Malformed(e.to_string()),
    };
    if a.kind.as_deref().is_some_and(|k| k != "decision") {
        return Parsed::Skip("not a decision line");
    }
    if a.path.is_empty() {
        return Parsed::Skip("service API question (its request is not recorded)");
    }
    let Some(principal) = a.principal else {
        return Parsed::Skip("stopped before the policies (credential or request refused)");
    };
    let uid: cedar_policy::EntityUid = match principal.parse() {
        Ok(uid) => uid,
        Err(e) => return Parsed::Malformed(format!("principal: {e}")),
    };
    let principal_type = uid.type_name().to_string();
    let principal_id = uid.id().unescaped().to_owned();
    let (token, workload, missing) = match a.credential.as_deref() {
        Some("workload") => {
            let token = VerifiedToken::principal_only(
                "workload",
                &principal_type,
                &principal_id,
                CredentialKind::Workload,
            );
            (token, Some(principal_id), WORKLOAD_MISSING)
        }
        Some("api_key") => {
            let Some(token) = a.api_key_id.as_deref().and_then(|id| api_keys.keys.get(id)) else {
                return Parsed::Skip("API key not in the key file");
            };
            let mut token = token.clone();
            // The type the decision had (the key file has the id only).
            token.principal_type = principal_type;
            (token, None, API_KEY_MISSING)
        }
        Some("jwt" | "introspection" | "authzen") => {
            return Parsed::Skip("token claims are not in the audit line (use --requests)");
        }
        _ => return Parsed::Skip("no credential recorded"),
    };
    let http = HttpRequest {
        method: a.method,
        path: a.path,
        caller: a.caller.map(Into::into),
        ..HttpRequest::default()
    };
    Parsed::Record(Box::new(Replayable {
        decision_id: a.decision_id,
        old: if a.dry_run { Outcome::Deny } else { a.outcome },
        token,
        http,
        workload,
        missing,
    }))
}

/// A verdict of the proposed policies.
struct NewDecision {
    allowed: bool,
    action: Option<String>,
    /// The determining policies, or what decided instead:
    /// `(no permit)`, `(no route)`, `(schema mismatch)`, `(policy error)`.
    decided_by: Vec<String>,
}

/// The evaluation stage of `Engine::run`, for an identity already
/// established: route, principal, request facts, evaluation.
fn redecide(evaluator: &Evaluator, record: &Replayable) -> NewDecision {
    let deny = |action: Option<String>, why: &str| NewDecision {
        allowed: false,
        action,
        decided_by: vec![why.to_owned()],
    };
    let http = &record.http;
    let route = evaluator.route(http);
    if evaluator.principal(&record.token).is_err() {
        return deny(None, "(schema mismatch)");
    }
    let Some(facts) = evaluator.request_facts(http, &route, record.workload.as_deref()) else {
        return deny(None, "(no route)");
    };
    let action = evaluator.action_name(facts.action);
    match evaluator.evaluate(&record.token, facts) {
        Err(_) => deny(Some(action), "(schema mismatch)"),
        Ok(outcome) if outcome.allowed => NewDecision {
            allowed: true,
            action: Some(action),
            decided_by: outcome.policies.to_vec(),
        },
        Ok(outcome) if !outcome.errors.is_empty() => deny(Some(action), "(policy error)"),
        Ok(outcome) if outcome.policies.is_empty() => deny(Some(action), "(no permit)"),
        Ok(outcome) => NewDecision {
            allowed: false,
            action: Some(action),
            decided_by: outcome.policies.to_vec(),
        },
    }
}

/// One changed decision, as the report shows it (never a token).
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// Line of the input file (from 1).
    pub line: usize,
    /// The recorded decision's id, if the record has one.
    pub decision_id: Option<String>,
    /// The principal's Cedar uid.
    pub principal: String,
    /// The action's Cedar uid (`null` when no route matched).
    pub action: Option<String>,
    /// HTTP method.
    pub method: String,
    /// HTTP path, without the query string.
    pub path: String,
    /// What decided now: determining policy ids, or `(no permit)`...
    pub decided_by: Vec<String>,
}

/// Changed decisions sharing an action or a determining policy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Group {
    /// How many.
    pub count: u64,
    /// Up to the requested number of examples.
    pub examples: Vec<Example>,
}

/// Decisions that changed one way.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Change {
    /// How many.
    pub count: u64,
    /// By the action's Cedar uid (`(no route)` when none).
    pub by_action: BTreeMap<String, Group>,
    /// By the new determining policy (a decision counts under each of its
    /// policies), or `(no permit)`, `(no route)`, `(schema mismatch)`,
    /// `(policy error)` when no policy determined a deny.
    pub by_policy: BTreeMap<String, Group>,
}

impl Change {
    fn add(&mut self, example: Example, max_examples: usize) {
        self.count += 1;
        let push = |group: &mut Group| {
            group.count += 1;
            if group.examples.len() < max_examples {
                group.examples.push(example.clone());
            }
        };
        let action = example.action.as_deref().unwrap_or("(no route)").to_owned();
        push(self.by_action.entry(action).or_default());
        for policy in &example.decided_by {
            push(self.by_policy.entry(policy.clone()).or_default());
        }
    }
}

/// A line that could not be read.
#[derive(Debug, Clone, Serialize)]
pub struct Malformed {
    /// Line number (from 1).
    pub line: usize,
    /// Why.
    pub error: String,
}

/// Records re-decided without a field the proposed policies read.
#[derive(Debug, Clone, Serialize)]
pub struct Inexact {
    /// How many records.
    pub records: u64,
    /// The context fields they lack that some policy reads, e.g. `http.source_ip`.
    pub fields: Vec<String>,
}

/// What a replay found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What the input held.
    pub format: Format,
    /// Non-empty lines read.
    pub lines: u64,
    /// Records re-decided.
    pub replayed: u64,
    /// Same verdict as recorded.
    pub unchanged: u64,
    /// Allowed before, denied now (access closed).
    pub allow_to_deny: Change,
    /// Denied before, allowed now (access opened).
    pub deny_to_allow: Change,
    /// Valid lines not re-decided, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Lines that could not be read (counted; the first
    /// [`MAX_MALFORMED_LISTED`] listed).
    pub malformed: u64,
    /// The first malformed lines.
    pub malformed_lines: Vec<Malformed>,
    /// Audit-line records re-decided without a field the policies read.
    pub inexact: Option<Inexact>,
    /// Time spent reading and re-deciding, in seconds.
    pub seconds: f64,
    /// Records re-decided per second.
    pub records_per_second: f64,
}

/// Re-decides every record of `input` with `evaluator` (the proposed
/// policies). Lines that cannot be read are counted and listed, never fatal.
pub fn replay(
    evaluator: &Evaluator,
    input: impl BufRead,
    format: Format,
    api_keys: &ApiKeyIdentities,
    max_examples: usize,
) -> std::io::Result<Report> {
    let started = Instant::now();
    let reads = &evaluator.policies().context_reads;
    let mut report = Report {
        format,
        lines: 0,
        replayed: 0,
        unchanged: 0,
        allow_to_deny: Change::default(),
        deny_to_allow: Change::default(),
        skipped: BTreeMap::new(),
        malformed: 0,
        malformed_lines: Vec::new(),
        inexact: None,
        seconds: 0.0,
        records_per_second: 0.0,
    };
    let mut inexact_records = 0u64;
    let mut inexact_fields: Vec<String> = Vec::new();
    for (index, line) in input.lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        report.lines += 1;
        let number = index + 1;
        let parsed = match format {
            Format::Requests => parse_request(line),
            Format::Audit => parse_audit(line, api_keys),
        };
        let record = match parsed {
            Parsed::Record(record) => record,
            Parsed::Skip(why) => {
                *report.skipped.entry(why.to_owned()).or_default() += 1;
                continue;
            }
            Parsed::Malformed(error) => {
                report.malformed += 1;
                if report.malformed_lines.len() < MAX_MALFORMED_LISTED {
                    report.malformed_lines.push(Malformed {
                        line: number,
                        error,
                    });
                }
                continue;
            }
        };
        // Refused before the credential stage, whatever the policies say.
        if record.http.method.is_empty() || !is_canonical_path(record.http.path_without_query()) {
            *report
                .skipped
                .entry("bad request (refused before the policies)".to_owned())
                .or_default() += 1;
            continue;
        }
        let read_missing: Vec<String> = record
            .missing
            .iter()
            .filter(|field| reads.covers(field))
            .map(|field| field.join("."))
            .collect();
        if !read_missing.is_empty() {
            inexact_records += 1;
            for field in read_missing {
                if !inexact_fields.contains(&field) {
                    inexact_fields.push(field);
                }
            }
        }
        let new = redecide(evaluator, &record);
        report.replayed += 1;
        let change = match (record.old, new.allowed) {
            (Outcome::Allow, false) => &mut report.allow_to_deny,
            (Outcome::Deny, true) => &mut report.deny_to_allow,
            _ => {
                report.unchanged += 1;
                continue;
            }
        };
        let principal = evaluator
            .principal(&record.token)
            .map(|p| p.to_string())
            .unwrap_or_else(|_| {
                format!(
                    "{}::{:?}",
                    record.token.principal_type, record.token.principal_id
                )
            });
        let example = Example {
            line: number,
            decision_id: record.decision_id.clone(),
            principal,
            action: new.action,
            method: record.http.method.clone(),
            path: record.http.path_without_query().to_owned(),
            decided_by: new.decided_by,
        };
        change.add(example, max_examples);
    }
    if inexact_records > 0 {
        inexact_fields.sort();
        report.inexact = Some(Inexact {
            records: inexact_records,
            fields: inexact_fields,
        });
    }
    let elapsed = started.elapsed();
    report.seconds = elapsed.as_secs_f64();
    report.records_per_second = rate(report.replayed, elapsed);
    Ok(report)
}

fn rate(records: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        records as f64 / seconds
    } else {
        0.0
    }
}

impl Report {
    /// The human summary.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "replayed {} record(s) of {} line(s) in {:.3} s ({:.0} records/s)",
            self.replayed, self.lines, self.seconds, self.records_per_second
        );
        let _ = writeln!(out, "unchanged:     {}", self.unchanged);
        let _ = writeln!(out, "allow -> deny: {}", self.allow_to_deny.count);
        let _ = writeln!(out, "deny -> allow: {}", self.deny_to_allow.count);
        for (name, change) in [
            ("allow -> deny", &self.allow_to_deny),
            ("deny -> allow", &self.deny_to_allow),
        ] {
            if change.count == 0 {
                continue;
            }
            let _ = writeln!(out, "\n{name} by action:");
            write_groups(&mut out, &change.by_action);
            let _ = writeln!(out, "{name} by new determining policy:");
            write_groups(&mut out, &change.by_policy);
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "\nnot re-decided:");
            for (why, count) in &self.skipped {
                let _ = writeln!(out, "  {count:>8}  {why}");
            }
        }
        if let Some(inexact) = &self.inexact {
            let _ = writeln!(
                out,
                "\nINEXACT: {} record(s) were re-decided without {}, which the proposed \
                 policies read and the audit line does not record (replay --requests for an \
                 exact answer)",
                inexact.records,
                inexact.fields.join(", ")
            );
        }
        if self.malformed > 0 {
            let _ = writeln!(out, "\nmalformed: {} line(s)", self.malformed);
            for m in &self.malformed_lines {
                let _ = writeln!(out, "  line {}: {}", m.line, m.error);
            }
            if self.malformed > self.malformed_lines.len() as u64 {
                let _ = writeln!(
                    out,
                    "  ... {} more",
                    self.malformed - self.malformed_lines.len() as u64
                );
            }
        }
        out
    }
}

fn write_groups(out: &mut String, groups: &BTreeMap<String, Group>) {
    use std::fmt::Write as _;
    for (name, group) in groups {
        let _ = writeln!(out, "  {:>8}  {name}", group.count);
        for e in &group.examples {
            let _ = writeln!(
                out,
                "            e.g. line {}: {} {} {} -> {}{}",
                e.line,
                e.principal,
                e.method,
                e.path,
                e.decided_by.join(", "),
                e.decision_id
                    .as_deref()
                    .map(|id| format!(" (decision {id})"))
                    .unwrap_or_default()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_identities_come_from_the_key_file() {
        let keys = ApiKeyIdentities::from_toml(
            r#"[[keys]]
id = "ci-bot"
hash = "sha256:00"
principal = "ci"
scopes = ["orders:read"]
roles = ["bots"]
created = "2026-01-01T00:00:00Z"
"#,
            "Client",
            Path::new("keys.toml"),
        )
        .unwrap();
        let token = &keys.keys["ci-bot"];
        assert_eq!(token.principal_id, "ci");
        assert_eq!(token.scopes, ["orders:read"]);
        assert_eq!(token.roles, ["bots"]);
        assert_eq!(token.issued_at, 1_767_225_600);
        assert_eq!(token.issuer, "api-key");
    }

    #[test]
    fn audit_lines_of_jwts_are_skipped_not_guessed() {
        let line = r#"{"type":"decision","outcome":"allow","principal":"User::\"alice\"","credential":"jwt","method":"GET","path":"/orders"}"#;
        assert!(matches!(
            parse_audit(line, &ApiKeyIdentities::default()),
            Parsed::Skip(_)
        ));
        let workload = r#"{"type":"decision","outcome":"deny","dry_run":false,"principal":"Workload::\"spiffe://c/ns/a\"","credential":"workload","method":"GET","path":"/orders"}"#;
        let Parsed::Record(record) = parse_audit(workload, &ApiKeyIdentities::default()) else {
            panic!("workload lines are replayable");
        };
        assert_eq!(record.token.principal_id, "spiffe://c/ns/a");
        assert_eq!(record.workload.as_deref(), Some("spiffe://c/ns/a"));
        assert_eq!(record.old, Outcome::Deny);
    }
}
