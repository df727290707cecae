//! OpenID Shared Signals receiver: Security Event Tokens (CAEP, RISC) pushed
//! (RFC 8935, [`push`]) or polled (RFC 8936, [`poll`]) from one transmitter
//! become revocations in the [`RevocationStore`].
//!
//! - [`set`] verifies a SET (signature with the transmitter's JWKS, `typ`,
//!   `iss`, `aud`, `iat`, `jti`, `events`) and maps each event's subject to
//!   revocation [`Target`]s;
//! - [`Processor`] applies them: one `revoke_many` per revoking event, with
//!   the reason `ssf <event> jti=<SET jti>`. A SET is acknowledged (push:
//!   `202`; poll: its `jti` in the next `ack`) only once every revocation it
//!   asks for is journaled; a store error leaves it unacknowledged, for the
//!   transmitter to deliver again. Revocations are idempotent, and recently
//!   applied `jti`s are remembered, so a duplicate is harmless;
//! - [`Receiver`] checks the `[ssf]` configuration and starts the push
//!   listener, the poll loop, the key refresh and, with a
//!   `verification_interval`, the verification requests;
//! - [`stream`] is the client of the transmitter's stream management
//!   endpoints (metadata, status, subjects, verification), used by that task
//!   and by `portcullis ssf`.

pub mod poll;
pub mod push;
pub mod set;
pub mod stream;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::Algorithm;
use tokio::task::JoinHandle;

use crate::authn::jwks::is_accepted_algorithm;
use crate::authn::keys::IssuerKeys;
use crate::config::{IssuerConfig, SsfConfig};
use crate::revocation::{RevocationError, RevocationStore, Target};
use crate::state::ServerState;
use set::{EventKind, Rejection, SetError, Verifier};

/// Applied `jti`s remembered, so that a duplicate skips the work.
const SEEN_CAPACITY: u64 = 100_000;
/// How long an applied `jti` is remembered.
const SEEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Errors of the `[ssf]` configuration or of starting the receiver.
#[derive(Debug, thiserror::Error)]
pub enum SsfError {
    /// The `[ssf]` section is not usable; each problem is listed.
    #[error("invalid [ssf] configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The push listener could not be bound.
    #[error("cannot listen on [ssf] push_listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The problems of an `[ssf]` section, none when it is usable (what
/// [`Receiver::new`] refuses), stream management settings included. Token
/// files are read, the CA file too.
pub fn validate(config: &SsfConfig) -> Vec<String> {
    match Receiver::new(config) {
        Ok(_) => Vec::new(),
        Err(SsfError::Config(problems)) => problems,
        Err(e) => vec![e.to_string()],
    }
}

fn read_token(path: &std::path::Path, key: &str, problems: &mut Vec<String>) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            if token.is_empty() {
                problems.push(format!("[ssf] {key} {} is empty", path.display()));
                None
            } else {
                Some(token.to_owned())
            }
        }
        Err(e) => {
            problems.push(format!("[ssf] {key} {}: {e}", path.display()));
            None
        }
    }
}

/// The keys source of the transmitter, built as an issuer's.
fn issuer_keys(config: &SsfConfig) -> Result<IssuerKeys, String> {
    let mut issuer: IssuerConfig = serde_json::from_value(serde_json::json!({
        "issuer": config.issuer,
        "audiences": [config.audience],
        "jwks_file": config.jwks_file,
        "jwks_uri": config.jwks_uri,
        "algorithms": config.algorithms,
    }))
    .map_err(|e| e.to_string())?;
    issuer.remote = config.remote.clone();
    IssuerKeys::from_config(&issuer).map_err(|e| e.to_string())
}

/// A checked `[ssf]` section, ready to start.
#[derive(Debug)]
pub struct Receiver {
    config: SsfConfig,
    keys: Arc<IssuerKeys>,
    algorithms: Vec<Algorithm>,
    push_token: Option<String>,
    poll_token: Option<String>,
    poll_client: Option<reqwest::Client>,
    /// The verification requests' client, when `verification_interval` > 0.
    management: Option<stream::ManagementClient>,
}

impl Receiver {
    /// Checks `config` (every problem listed): `issuer` and `audience` set;
    /// exactly one of `jwks_file` (read now) and `jwks_uri` (HTTPS); known,
    /// accepted `algorithms`; `push_listen` or `poll_url` (HTTPS) set;
    /// `push_path` starting with `/`; token files readable and not empty;
    /// `poll_max_events` and `poll_interval` above zero; the stream
    /// management settings consistent ([`stream::problems`]).
    pub fn new(config: &SsfConfig) -> Result<Receiver, SsfError> {
        let mut problems = Vec::new();
        if config.issuer.is_empty() {
            problems.push("[ssf] issuer must not be empty".to_owned());
        }
        if config.audience.is_empty() {
            problems.push("[ssf] audience must not be empty".to_owned());
        }
        match (&config.jwks_file, &config.jwks_uri) {
            (Some(_), Some(_)) | (None, None) => {
                problems.push("[ssf] needs exactly one of jwks_file and jwks_uri".to_owned())
            }
            (None, Some(uri)) if !uri.starts_with("https://") => {
                problems.push("[ssf] jwks_uri must be an https:// URL".to_owned())
            }
            _ => {}
        }
        let mut algorithms = Vec::new();
        for name in &config.algorithms {
            match name.parse::<Algorithm>() {
                Ok(alg) if is_accepted_algorithm(alg) => algorithms.push(alg),
                _ => problems.push(format!("[ssf] algorithms: {name:?} is not accepted")),
            }
        }
        if config.algorithms.is_empty() {
            problems.push("[ssf] algorithms must not be empty".to_owned());
        }
        if config.push_listen.is_none() && config.poll_url.is_none() {
            problems.push(
                "[ssf] needs push_listen or poll_url (or both): nothing would receive events"
                    .to_owned(),
            );
        }
        if !config.push_path.starts_with('/') {
            problems.push("[ssf] push_path must start with /".to_owned());
        }
        if config.push_token_file.is_some() && config.push_listen.is_none() {
            problems.push("[ssf] push_token_file is set without push_listen".to_owned());
        }
        let push_token = config
            .push_token_file
            .as_deref()
            .and_then(|p| read_token(p, "push_token_file", &mut problems));
        let poll_token = config
            .poll_token_file
            .as_deref()
            .and_then(|p| read_token(p, "poll_token_file", &mut problems));
        if config.poll_token_file.is_some() && config.poll_url.is_none() {
            problems.push("[ssf] poll_token_file is set without poll_url".to_owned());
        }
        let mut poll_client = None;
        if let Some(url) = &config.poll_url {
            if !url.starts_with("https://") || reqwest::Url::parse(url).is_err() {
                problems.push("[ssf] poll_url must be an https:// URL".to_owned());
            }
            if config.poll_max_events == 0 {
                problems.push("[ssf] poll_max_events must be at least 1".to_owned());
            }
            if config.poll_interval.is_zero() {
                problems.push("[ssf] poll_interval must be above zero".to_owned());
            }
            match crate::authn::keys::http_client(&config.issuer, &config.remote) {
                Ok(client) => poll_client = Some(client),
                Err(e) => problems.push(format!("[ssf] {e}")),
            }
        }
        problems.extend(stream::problems(config));
        let mut management = None;
        if !config.verification_interval.is_zero() && problems.is_empty() {
            match stream::ManagementClient::new(config) {
                Ok(client) => management = Some(client),
                Err(e) => problems.push(e.to_string()),
            }
        }
        let keys = if problems.is_empty() {
            match issuer_keys(config) {
                Ok(keys) => Some(keys),
                Err(e) => {
                    problems.push(format!("[ssf] transmitter keys: {e}"));
                    None
                }
            }
        } else {
            None
        };
        match keys {
            Some(keys) if problems.is_empty() => Ok(Receiver {
                config: config.clone(),
                keys: Arc::new(keys),
                algorithms,
                push_token,
                poll_token,
                poll_client,
                management,
            }),
            _ => Err(SsfError::Config(problems)),
        }
    }

    /// Starts receiving into `store`, counting events in `state`'s metrics:
    /// binds the push listener (when `push_listen` is set), starts the poll
    /// loop (when `poll_url` is set), the key refresh (remote keys) and the
    /// verification requests (when `verification_interval` is above zero).
    /// Returns the tasks; aborting them stops the receiver.
    pub async fn start(
        self,
        store: Arc<RevocationStore>,
        state: Arc<ServerState>,
    ) -> Result<Vec<JoinHandle<()>>, SsfError> {
        let verification = self
            .management
            .is_some()
            .then(|| Arc::new(stream::Verification::default()));
        let processor = Arc::new(Processor {
            verifier: Verifier {
                issuer: self.config.issuer.clone(),
                audience: self.config.audience.clone(),
                algorithms: self.algorithms,
                keys: self.keys.clone(),
                leeway: i64::try_from(self.config.leeway.as_secs()).unwrap_or(i64::MAX),
            },
            store,
            state: state.clone(),
            verification: verification.clone(),
            seen: moka::sync::Cache::builder()
                .max_capacity(SEEN_CAPACITY)
                .time_to_live(SEEN_TTL)
                .build(),
        });
        let mut tasks = Vec::new();
        if let Some(addr) = self.config.push_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| SsfError::Bind { addr, source })?;
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %bound, path = %self.config.push_path, "Shared Signals push endpoint listening");
            tasks.push(tokio::spawn(push::serve(
                listener,
                push::Endpoint {
                    path: self.config.push_path.clone(),
                    token: self.push_token,
                    processor: processor.clone(),
                },
            )));
        }
        if self.keys.is_remote() {
            tasks.push(tokio::spawn(self.keys.clone().refresh_forever()));
        }
        if let (Some(url), Some(client)) = (self.config.poll_url.clone(), self.poll_client) {
            tracing::info!(interval = ?self.config.poll_interval, "Shared Signals poll client started");
            tasks.push(tokio::spawn(poll::run(poll::Poller {
                client,
                url,
                token: self.poll_token,
                max_events: self.config.poll_max_events,
                interval: self.config.poll_interval,
                processor,
            })));
        }
        if let (Some(client), Some(verification)) = (self.management, verification) {
            let interval = self.config.verification_interval;
            tracing::info!(
                ?interval,
                url = client.configuration_url(),
                "Shared Signals stream verification started"
            );
            tasks.push(tokio::spawn(stream::run_verification(
                client,
                interval,
                verification,
                state,
            )));
        }
        Ok(tasks)
    }
}

/// What became of a SET that was not refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// Its revocations are in force and journaled (at least one).
    Applied,
    /// Nothing to revoke (verification, other event types, subjects that
    /// name nothing revocable): acknowledged.
    Ignored,
    /// Its `jti` was applied recently: nothing done again.
    Duplicate,
}

/// Why a SET is not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The SET is bad: tell the transmitter (it is not applied, ever).
    Refused(SetError),
    /// Keys not loaded, or the store refused to write: not acknowledged, to
    /// be delivered again.
    Unavailable(String),
}

/// Verifies SETs and applies them to the store.
#[derive(Debug)]
pub struct Processor {
    verifier: Verifier,
    store: Arc<RevocationStore>,
    state: Arc<ServerState>,
    /// The verification asked for, when the receiver asks.
    verification: Option<Arc<stream::Verification>>,
    seen: moka::sync::Cache<String, ()>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// At most `max` bytes of `s`, cut on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Processor {
    /// Counts a verification event against the one asked for (`ignored`
    /// when the receiver asks for none). Never revokes anything.
    fn verified(&self, jti: &str, event: &set::Event) {
        let state = event.state.as_deref().map(|s| truncated(s, 256));
        let outcome = match &self.verification {
            Some(verification) => verification.observe(event.state.as_deref()),
            None => "ignored",
        };
        self.state
            .metrics()
            .record_ssf_event("verification", outcome);
        if outcome == "unexpected" {
            tracing::warn!(
                jti,
                state,
                "Shared Signals: a verification event this receiver did not ask for (or asked for too long ago)"
            );
        } else {
            tracing::info!(jti, state, outcome, "Shared Signals: verification event");
        }
    }

    /// Logs and counts a stream status change; paused or disabled is a
    /// warning: revocations no longer flow.
    fn stream_updated(&self, jti: &str, event: &set::Event) {
        let outcome = match event.status.as_deref() {
            Some("enabled") => "enabled",
            Some("paused") => "paused",
            Some("disabled") => "disabled",
            _ => "unknown",
        };
        self.state
            .metrics()
            .record_ssf_event("stream-updated", outcome);
        let reason = event.reason.as_deref().map(|r| truncated(r, 256));
        match outcome {
            "enabled" => {
                tracing::info!(
                    jti,
                    status = outcome,
                    reason,
                    "Shared Signals: the transmitter enabled the stream"
                );
            }
            "unknown" => {
                tracing::warn!(
                    jti,
                    reason,
                    "Shared Signals: stream-updated event without a known status"
                );
            }
            _ => {
                tracing::warn!(
                    jti,
                    status = outcome,
                    reason,
                    "Shared Signals: the transmitter {outcome} the stream: revocation events no longer arrive"
                );
            }
        }
    }

    /// Verifies `set` and applies its events; `Ok` means acknowledge it.
    pub async fn process(&self, set: &str) -> Result<Processed, Failure> {
        let metrics = self.state.metrics();
        let verified = match self.verifier.verify(set, unix_now()).await {
            Ok(verified) => verified,
            Err(Rejection::Refused(e)) => {
                metrics.record_ssf_event("unverified", "refused");
                tracing::warn!(err = e.code.as_str(), description = %e.description, "Shared Signals: SET refused");
                return Err(Failure::Refused(e));
            }
            Err(Rejection::Unavailable(reason)) => {
                tracing::warn!(%reason, "Shared Signals: SET not processed; the transmitter will deliver it again");
                return Err(Failure::Unavailable(reason));
            }
        };
        let jti = verified.jti.as_str();
        if self.seen.contains_key(jti) {
            tracing::debug!(jti, "Shared Signals: duplicate SET, already applied");
            return Ok(Processed::Duplicate);
        }
        let mut applied = false;
        for event in &verified.events {
            let label = event.kind.label();
            match event.kind {
                EventKind::Verification => {
                    self.verified(jti, event);
                    continue;
                }
                EventKind::StreamUpdated => {
                    self.stream_updated(jti, event);
                    continue;
                }
                _ => {}
            }
            if !event.unmapped.is_empty() {
                tracing::info!(jti, event = %event.event_type, unmapped = ?event.unmapped, "Shared Signals: subject identifiers that name nothing revocable are ignored");
            }
            let targets: Vec<(Target, Option<i64>)> = event
                .targets
                .iter()
                .filter(|target| match self.store.check_target(target, None) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::info!(jti, event = %event.event_type, kind = target.kind(), reason = %e, "Shared Signals: target not revoked");
                        false
                    }
                })
                .map(|target| (target.clone(), None))
                .collect();
            if !matches!(event.kind, EventKind::Revoking(_)) || targets.is_empty() {
                tracing::info!(jti, event = %event.event_type, "Shared Signals: event acknowledged, nothing revoked");
                metrics.record_ssf_event(label, "ignored");
                continue;
            }
            let kinds: Vec<&str> = targets.iter().map(|(t, _)| t.kind()).collect();
            let reason = format!("ssf {label} jti={}", truncated(jti, 256));
            match self.store.revoke_many(targets, reason).await {
                Ok(done) => {
                    applied = true;
                    metrics.record_ssf_event(label, "applied");
                    tracing::info!(jti, event = %event.event_type, targets = ?kinds, synced = done.first().is_some_and(|d| d.synced), "Shared Signals: revoked");
                }
                Err(RevocationError::Invalid(reason)) => {
                    // Cannot happen after `check_target`; acknowledged.
                    tracing::warn!(jti, event = %event.event_type, %reason, "Shared Signals: revocation refused as invalid");
                    metrics.record_ssf_event(label, "ignored");
                }
                Err(e) => {
                    tracing::warn!(jti, event = %event.event_type, error = %e, "Shared Signals: revocation not applied; the SET is not acknowledged");
                    return Err(Failure::Unavailable(e.to_string()));
                }
            }
        }
        self.seen.insert(verified.jti.clone(), ());
        Ok(if applied {
            Processed::Applied
        } else {
            Processed::Ignored
        })
    }
}
