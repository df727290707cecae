//! The TOML configuration file: serde types, defaults, validation and path resolution.
//!
//! Unknown keys are rejected, durations are strings such as `"30s"` or `"1h"`, and
//! relative paths resolve against the folder holding the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Errors raised while reading or checking the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file we tried to read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the expected shape.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file we parsed.
        path: PathBuf,
        /// What was expected and what was found, with line and column.
        message: String,
    },
    /// The file parsed but a value is not acceptable.
    #[error("invalid config file {path}: {message}")]
    Invalid {
        /// The file we checked.
        path: PathBuf,
        /// The offending key and why.
        message: String,
    },
}

/// The whole configuration of one Portcullis instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Envoy-facing gRPC listener.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where the Cedar schema, policies and entities live.
    pub policies: PoliciesConfig,
    /// The protected application (the Cedar resource).
    pub application: ApplicationConfig,
    /// Trusted token issuers.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// Opaque API keys for machine clients.
    #[serde(default)]
    pub api_keys: Option<ApiKeysConfig>,
    /// Workload (SPIFFE) identities of mTLS peers.
    #[serde(default)]
    pub workload: Option<WorkloadConfig>,
    /// HTTP routes mapped to Cedar actions.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// What an allow response adds to the upstream request.
    #[serde(default)]
    pub response: ResponseConfig,
    /// Named response profiles, applied by a route's `response` or a
    /// policy's `@response("<name>")` annotation.
    #[serde(default)]
    pub responses: Vec<ResponseProfileConfig>,
    /// The decision log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The revocation set: local journal, optional Redis.
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// The admin API; absent means the admin API is off.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Verified-token and decision caches.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Traces (OTLP) and metrics (Prometheus); both off by default.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Sender-constrained tokens: DPoP proofs (RFC 9449) and certificate-bound
    /// tokens (RFC 8705).
    #[serde(default)]
    pub sender_constraint: SenderConstraintConfig,
    /// Token Status List checks (`status.status_list` claims).
    #[serde(default)]
    pub status_list: StatusListConfig,
    /// The Shared Signals (CAEP/RISC) receiver; absent means off.
    #[serde(default)]
    pub ssf: Option<SsfConfig>,
    /// The HTTP authorization listener (Envoy's `http_service` mode, forward
    /// auth); absent means off.
    #[serde(default)]
    pub http_authz: Option<HttpAuthzConfig>,
    /// The OpenID AuthZEN Authorization API listener; absent means off.
    #[serde(default)]
    pub authzen: Option<AuthzenConfig>,
}

/// `[http_authz]`: a plain-HTTP listener that decides requests described in
/// HTTP rather than in an ext_authz `CheckRequest`: Envoy's ext_authz filter
/// in `http_service` mode (the original request's method, path, and headers)
/// and forward-auth proxies (`X-Forwarded-Method`, `-Proto`, `-Host`, `-Uri`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthzConfig {
    /// Address of the listener.
    pub listen: SocketAddr,
    /// The `path_prefix` Envoy's `http_service` puts before the original
    /// path; removed before deciding. Empty: none.
    #[serde(default)]
    pub path_prefix: String,
    /// Path of forward-auth requests, whose original request is described by
    /// `X-Forwarded-*` headers.
    #[serde(default = "default_forward_auth_path")]
    pub forward_auth_path: String,
}

fn default_forward_auth_path() -> String {
    "/forward-auth".to_owned()
}

/// `[authzen]`: the OpenID AuthZEN Authorization API 1.0 (`POST
/// /access/v1/evaluation`, `/access/v1/evaluations`, and the metadata at
/// `/.well-known/authzen-configuration`). Callers (policy enforcement points)
/// authenticate with the bearer token of `token_file`, or with a client
/// certificate when `tls.client_ca_file` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzenConfig {
    /// Address of the listener.
    pub listen: SocketAddr,
    /// File holding the bearer token callers present.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// TLS on the listener; with `client_ca_file`, callers may authenticate
    /// with a client certificate instead of the token.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The URL this API is reached at, as published in the metadata
    /// (`policy_decision_point` and the endpoints). Unset: built from the
    /// request's `Host`.
    #[serde(default)]
    pub base_url: Option<String>,
}

/// Every field of an audit line (docs/reference/audit-line.md), for
/// `[telemetry] decision_log_mask`; `src/audit.rs` tests that every field it
/// writes is here.
pub const AUDIT_FIELDS: &[&str] = &[
    "type",
    "ts_ms",
    "decision_id",
    "outcome",
    "dry_run",
    "would",
    "status",
    "reason",
    "failed_check",
    "principal",
    "action",
    "resource",
    "policies",
    "errors",
    "issuer",
    "jti",
    "credential",
    "binding",
    "response",
    "inputs",
    "api_key_id",
    "caller",
    "method",
    "path",
    "policy_generation",
    "policy_digest",
    "latency_us",
    "trace_id",
    "span_id",
];

/// `[telemetry]`: OpenTelemetry trace export and the Prometheus endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector URL, `http://` only (e.g. `http://127.0.0.1:4317`);
    /// unset exports no span.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute of exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Further resource attributes (`deployment.environment`, `service.namespace`, ...).
    #[serde(default)]
    pub resource_attributes: std::collections::BTreeMap<String, String>,
    /// Fraction of new traces sampled (0.0 to 1.0); a caller's sampling decision,
    /// carried in `traceparent`, is followed (parent-based).
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
    /// Address of the plain-HTTP Prometheus endpoint (`GET /metrics`); unset is off.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Application log format when `--log-format` is not given: `plain` or `json`.
    #[serde(default)]
    pub log_format: Option<String>,
    /// Also send each decision (audit) record as an OTLP log record to
    /// `otlp_endpoint`, batched off the request path.
    #[serde(default)]
    pub decision_logs: bool,
    /// Most decision log records waiting for export.
    #[serde(default = "default_decision_log_queue")]
    pub decision_log_queue: usize,
    /// What a full export queue does: `drop` (the record is counted and
    /// dropped; the audit line is still written) or `block` (the request
    /// waits for room).
    #[serde(default = "default_decision_log_overflow")]
    pub decision_log_overflow: String,
    /// Audit fields replaced by `"masked"` in exported records (e.g.
    /// `principal`, `path`).
    #[serde(default)]
    pub decision_log_mask: Vec<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: default_service_name(),
            resource_attributes: Default::default(),
            sampling_ratio: default_sampling_ratio(),
            metrics_listen: None,
            log_format: None,
            decision_logs: false,
            decision_log_queue: default_decision_log_queue(),
            decision_log_overflow: default_decision_log_overflow(),
            decision_log_mask: Vec::new(),
        }
    }
}

fn default_decision_log_queue() -> usize {
    8192
}

fn default_decision_log_overflow() -> String {
    "drop".to_owned()
}

fn default_service_name() -> String {
    "portcullis".to_owned()
}

fn default_sampling_ratio() -> f64 {
    1.0
}

/// `[cache]`: the verified-token and decision caches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Cache verified JWTs (keyed by a digest of the token).
    #[serde(default = "default_true")]
    pub tokens: bool,
    /// Most tokens kept.
    #[serde(default = "default_token_capacity")]
    pub token_capacity: u64,
    /// Longest a verified token is reused (it is never reused past its `exp`).
    #[serde(default = "default_token_ttl", deserialize_with = "de_duration")]
    pub token_ttl_max: Duration,
    /// Cache policy decisions.
    #[serde(default = "default_true")]
    pub decisions: bool,
    /// Memory bound of the decision cache, in approximate bytes.
    #[serde(default = "default_decision_bytes")]
    pub decision_max_bytes: u64,
    /// Longest a decision is reused.
    #[serde(default = "default_decision_ttl", deserialize_with = "de_duration")]
    pub decision_ttl_max: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            tokens: true,
            token_capacity: default_token_capacity(),
            token_ttl_max: default_token_ttl(),
            decisions: true,
            decision_max_bytes: default_decision_bytes(),
            decision_ttl_max: default_decision_ttl(),
        }
    }
}

/// A secret string (admin token, Redis URL with a password): never printed by
/// `Debug`, and zeroed in memory when dropped (`secrecy`).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(secrecy::SecretString::from(value.into()))
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(&self.0)
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `[revocation]`: where revocations are kept and how instances share them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// Folder of the append-only journal (`revocations.log`).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// `redis://` or `rediss://` URL: shared mode. Unset: embedded mode.
    #[serde(default)]
    pub redis_url: Option<Secret>,
    /// The name of an environment variable holding `redis_url` (e.g. from a
    /// Kubernetes Secret), read when the configuration is loaded.
    #[serde(default)]
    pub redis_url_env: Option<String>,
    /// Without Redis at start: wait for it, or serve on the local journal.
    #[serde(default)]
    pub startup: StartupMode,
    /// Prefix of the Redis key and channel, so deployments can share one Redis.
    #[serde(default = "default_redis_prefix")]
    pub redis_prefix: String,
    /// Most entries in force; a local revoke beyond it is refused (entries
    /// from other instances are still accepted, and counted).
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Most local revocations waiting to be written to Redis; a revoke beyond
    /// it (Redis unreachable for long) is refused, not applied.
    #[serde(default = "default_max_pending_writes")]
    pub max_pending_writes: usize,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            redis_url: None,
            redis_url_env: None,
            startup: StartupMode::default(),
            redis_prefix: default_redis_prefix(),
            max_entries: default_max_entries(),
            max_pending_writes: default_max_pending_writes(),
        }
    }
}

/// The default `[revocation] max_entries`.
pub const DEFAULT_MAX_REVOCATIONS: usize = 1_000_000;

/// The default `[revocation] max_pending_writes`.
pub const DEFAULT_MAX_PENDING_WRITES: usize = 10_000;

fn default_max_entries() -> usize {
    DEFAULT_MAX_REVOCATIONS
}

fn default_max_pending_writes() -> usize {
    DEFAULT_MAX_PENDING_WRITES
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

fn default_redis_prefix() -> String {
    "portcullis".to_owned()
}

/// What `serve` does when Redis is unreachable at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartupMode {
    /// Stay NOT_SERVING until the first full sync with Redis.
    #[default]
    Wait,
    /// Serve at once on the local journal; sync when Redis answers.
    Local,
}

/// `[admin]`: the admin gRPC listener and its credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (never the Envoy-facing one).
    pub listen: SocketAddr,
    /// The admin bearer token, inline.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the admin token (surrounding whitespace is ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The name of an environment variable holding the admin token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// TLS (and with `client_ca_file`, mTLS) on the admin listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Allows a plaintext admin listener on a non-loopback address (the admin
    /// token would cross the network in the clear). Off: such a listener is
    /// refused at load.
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// Shortest accepted admin token.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

impl AdminConfig {
    /// Reads the admin token from wherever the configuration says it is.
    pub fn resolve_token(&self) -> Result<Secret, String> {
        let token = match (&self.token, &self.token_file, &self.token_env) {
            (Some(token), None, None) => token.expose().to_owned(),
            (None, Some(file), None) => std::fs::read_to_string(file)
                .map_err(|e| format!("admin.token_file {}: {e}", file.display()))?
                .trim()
                .to_owned(),
            (None, None, Some(var)) => std::env::var(var)
                .map_err(|_| format!("admin.token_env: environment variable {var} is not set"))?
                .trim()
                .to_owned(),
            _ => return Err("[admin] needs exactly one of token, token_file, token_env".into()),
        };
        if token.len() < MIN_ADMIN_TOKEN_BYTES {
            return Err(format!(
                "the admin token must be at least {MIN_ADMIN_TOKEN_BYTES} bytes long"
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the admin token must not contain whitespace".into());
        }
        Ok(Secret::new(token))
    }
}

fn default_true() -> bool {
    true
}

fn default_token_capacity() -> u64 {
    100_000
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(300)
}

fn default_decision_bytes() -> u64 {
    64 * 1024 * 1024
}

fn default_decision_ttl() -> Duration {
    Duration::from_secs(60)
}

/// `[server]`: the Envoy-facing listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the gRPC listener serving ext_authz, health and reflection.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How long, after SIGTERM/SIGINT, the listener keeps answering checks while
    /// health reports NOT_SERVING, so that Envoy's health checks and Kubernetes'
    /// endpoint removal take this instance out of rotation before it closes.
    #[serde(default = "default_drain_period", deserialize_with = "de_duration")]
    pub drain_period: Duration,
    /// How long shutdown waits for in-flight checks and open connections to finish.
    #[serde(default = "default_shutdown_grace", deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// TLS (and with `client_ca_file`, mTLS) on this listener; plaintext when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            drain_period: default_drain_period(),
            shutdown_grace: default_shutdown_grace(),
            tls: None,
        }
    }
}

/// How long a revoked credential can stay valid, from the issuers' rules
/// ([`Config::token_lifetimes`]); `crate::revocation` derives entry expiries
/// from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Longest `exp - iat` any issuer accepts.
    pub max_lifetime: Duration,
    /// Largest clock-skew leeway any issuer tolerates.
    pub leeway: Duration,
    /// Longest an API key can be valid (`[api_keys] max_lifetime`; zero
    /// without API keys).
    pub api_key_lifetime: Duration,
}

/// The prefix of every API key (`pck_<id>_<secret>`). Here, not in
/// `crate::authn::api_key`, so that the configuration's checks (an
/// introspection `token_prefixes` entry must not claim API keys) need no
/// other module.
pub const API_KEY_PREFIX: &str = "pck_";

/// `[server.tls]`, `[admin.tls]`: a listener's certificate, key and optional
/// client CA, all PEM files, reloaded when their content changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain (leaf first).
    pub cert_file: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates that client certificates must chain to. Set: every
    /// client must present one (mTLS). Unset: no client certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are read again to pick up a rotation.
    #[serde(
        default = "default_tls_reload_interval",
        deserialize_with = "de_duration"
    )]
    pub reload_interval: Duration,
}

fn default_tls_reload_interval() -> Duration {
    Duration::from_secs(10)
}

impl TlsConfig {
    fn resolve_paths(&mut self, resolve: impl Fn(&mut PathBuf)) {
        resolve(&mut self.cert_file);
        resolve(&mut self.key_file);
        if let Some(file) = &mut self.client_ca_file {
            resolve(file);
        }
    }

    fn check(&self, section: &str) -> Result<(), String> {
        if self.reload_interval < Duration::from_millis(100) {
            return Err(format!("{section}.reload_interval must be at least 100ms"));
        }
        Ok(())
    }
}

fn default_drain_period() -> Duration {
    Duration::from_secs(5)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9191))
}

/// `[policies]`: the policy folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesConfig {
    /// Folder with `*.cedarschema`, `*.cedar` and an optional `entities.json`.
    pub dir: PathBuf,
    /// Watch the folder and reload on change (SIGHUP always reloads).
    #[serde(default = "default_true")]
    pub watch: bool,
    /// How often the folder is checked for changes.
    #[serde(default = "default_watch_interval", deserialize_with = "de_duration")]
    pub watch_interval: Duration,
}

fn default_watch_interval() -> Duration {
    Duration::from_secs(1)
}

/// `[application]`: the protected application.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationConfig {
    /// The id of the Cedar resource `Application::"<name>"`.
    pub name: String,
    /// Cedar action id used for requests that match no route. Unset (the default)
    /// means such requests are denied with 403 before any policy runs.
    #[serde(default)]
    pub default_action: Option<String>,
    /// `enforce` (default) or `dry-run`: policy denies are logged and counted
    /// as would-deny, but the request is allowed.
    #[serde(default)]
    pub mode: Mode,
    /// The same for credential failures (401s), separately.
    #[serde(default)]
    pub token_mode: Mode,
}

/// Enforce decisions, or only log what would have been denied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Denies are denied.
    #[default]
    Enforce,
    /// Denies are logged as would-deny and allowed.
    DryRun,
}

impl Mode {
    /// Parses `enforce` / `dry-run` (as in Envoy `context_extensions`).
    pub fn parse(text: &str) -> Option<Mode> {
        match text.trim() {
            "enforce" => Some(Mode::Enforce),
            "dry-run" => Some(Mode::DryRun),
            _ => None,
        }
    }
}

/// `[[issuers]]`: one trusted token issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` claim value.
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// Local JWKS file holding the issuer's public keys.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Remote JWKS, fetched over HTTPS and refreshed in the background.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Find `jwks_uri` (and the introspection endpoint) through OpenID Connect
    /// discovery at `<issuer>/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery: bool,
    /// Signature algorithms accepted from this issuer (a subset of the strong ones).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Claims every token must carry, besides `exp` and `iat`.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Required `typ` header, e.g. `at+jwt` (RFC 9068); unset accepts any.
    #[serde(default)]
    pub token_type: Option<String>,
    /// Cedar entity type of this issuer's principals, e.g. `User` or `Client`.
    #[serde(default = "default_principal_type")]
    pub principal_type: String,
    /// Claim holding the principal id, e.g. `sub` or `client_id`.
    #[serde(default = "default_principal_claim")]
    pub principal_claim: String,
    /// Remote key refresh and HTTP settings.
    #[serde(default)]
    pub remote: RemoteKeysConfig,
    /// RFC 7662 introspection of opaque tokens.
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
    /// Longest accepted `exp - iat`.
    #[serde(default = "default_max_lifetime", deserialize_with = "de_duration")]
    pub max_token_lifetime: Duration,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway", deserialize_with = "de_duration")]
    pub leeway: Duration,
    /// Claim holding the caller's roles (dotted path allowed, e.g. `realm_access.roles`).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Proof of possession every token of this issuer must carry: `none`,
    /// `dpop`, `mtls` or `any`. A bound token is checked whatever this says.
    #[serde(default)]
    pub require_sender_constraint: SenderConstraint,
    /// The scopes this issuer can grant, when declared: `portcullis validate`
    /// warns about policies testing for a scope no issuer grants.
    /// Unset: not declared (no warning). Tokens are not checked against it.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
}

/// `[issuers.remote]`: how remote keys are fetched and refreshed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteKeysConfig {
    /// Refresh period when the response has no `Cache-Control: max-age`.
    #[serde(default = "default_refresh", deserialize_with = "de_duration")]
    pub refresh: Duration,
    /// Lower bound of the refresh period (also the unknown-`kid` refresh rate limit).
    #[serde(default = "default_refresh_min", deserialize_with = "de_duration")]
    pub refresh_min: Duration,
    /// Upper bound of the refresh period.
    #[serde(default = "default_refresh_max", deserialize_with = "de_duration")]
    pub refresh_max: Duration,
    /// How long the last good key set keeps serving while refreshes fail.
    #[serde(default = "default_max_staleness", deserialize_with = "de_duration")]
    pub max_staleness: Duration,
    /// TCP+TLS connect timeout.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Whole-request timeout.
    #[serde(default = "default_http_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Extra PEM root certificate(s) to trust (a private CA), besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Default for RemoteKeysConfig {
    fn default() -> Self {
        Self {
            refresh: default_refresh(),
            refresh_min: default_refresh_min(),
            refresh_max: default_refresh_max(),
            max_staleness: default_max_staleness(),
            connect_timeout: default_connect_timeout(),
            timeout: default_http_timeout(),
            ca_file: None,
        }
    }
}

/// `[issuers.introspection]`: RFC 7662 token introspection for opaque tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// The endpoint; unset with `discovery = true` takes `introspection_endpoint`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Client id for HTTP Basic authentication to the endpoint.
    pub client_id: String,
    /// File holding the client secret (kept out of the config file).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Longest time an active result is reused (bounded by the token's `exp`).
    #[serde(
        default = "default_introspection_cache",
        deserialize_with = "de_duration"
    )]
    pub cache_max: Duration,
    /// Opaque tokens starting with one of these go to this issuer, and only
    /// those. Unset: this issuer takes every opaque token, which is allowed
    /// only when it is the one issuer with introspection.
    #[serde(default)]
    pub token_prefixes: Option<Vec<String>>,
    /// How long a refusal (`active: false`, or an answer failing our checks
    /// other than `nbf`) is reused; zero disables. Failed calls are never kept.
    #[serde(
        default = "default_introspection_negative_cache",
        deserialize_with = "de_duration"
    )]
    pub negative_cache: Duration,
    /// Most calls in flight to this endpoint at once; more wait for a turn
    /// within the `[issuers.remote] timeout`.
    #[serde(default = "default_introspection_max_concurrent")]
    pub max_concurrent: u32,
}

impl IntrospectionConfig {
    /// The configured token prefixes (none when unset).
    pub fn prefixes(&self) -> &[String] {
        self.token_prefixes.as_deref().unwrap_or_default()
    }
}

fn default_algorithms() -> Vec<String> {
    [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ]
    .map(String::from)
    .to_vec()
}

fn default_principal_type() -> String {
    "User".to_owned()
}

fn default_principal_claim() -> String {
    "sub".to_owned()
}

fn default_refresh() -> Duration {
    Duration::from_secs(300)
}

fn default_refresh_min() -> Duration {
    Duration::from_secs(30)
}

fn default_refresh_max() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_staleness() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_introspection_cache() -> Duration {
    Duration::from_secs(60)
}

/// RFC 6750's b64token alphabet (as `crate::authn::credential` checks it): a
/// token prefix outside it could never match a presented token.
fn is_b64token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '+' | '/' | '=')
}

fn default_introspection_negative_cache() -> Duration {
    Duration::from_secs(10)
}

fn default_introspection_max_concurrent() -> u32 {
    64
}

fn default_max_lifetime() -> Duration {
    Duration::from_secs(3600)
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_roles_claim() -> String {
    "roles".to_owned()
}

/// `[[routes]]`: one HTTP route template and the Cedar action it maps to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path template with `{param}` segments, e.g. `/orders/{id}`.
    pub path: String,
    /// Cedar action id; defaults to `"<lower-case method> <path>"`.
    #[serde(default)]
    pub action: Option<String>,
    /// A request without credential from an mTLS peer with a SPIFFE identity is
    /// decided with `Workload::"<spiffe id>"` as principal (needs `[workload]`).
    #[serde(default)]
    pub allow_workload: bool,
    /// Overrides `[application] mode` for this route's policy decisions.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Proof of possession a token must carry on this route (on top of its
    /// issuer's requirement): `none`, `dpop`, `mtls` or `any`.
    #[serde(default)]
    pub require_sender_constraint: Option<SenderConstraint>,
    /// The `[[responses]]` profile applied to this route's allows and policy
    /// denies.
    #[serde(default)]
    pub response: Option<String>,
}

/// `[[responses]]`: what an allow changes on the upstream request and the
/// client's response, and what a policy deny answers. Applied by a route's
/// `response` and by the determining policies' `@response("<name>")`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseProfileConfig {
    /// The profile's name, as routes and annotations refer to it.
    pub name: String,
    /// On allow: headers set on the upstream request; values are templates
    /// over the verified identity (`{subject}`, `{claims.tenant}`, ...).
    #[serde(default)]
    pub upstream_headers: std::collections::BTreeMap<String, String>,
    /// On allow: headers removed from the upstream request.
    #[serde(default)]
    pub remove_upstream_headers: Vec<String>,
    /// On allow: query parameters set on the upstream request (templates).
    #[serde(default)]
    pub set_query: std::collections::BTreeMap<String, String>,
    /// On allow: query parameters removed from the upstream request.
    #[serde(default)]
    pub remove_query: Vec<String>,
    /// On allow and on a policy deny: headers added to the client's
    /// response (static values).
    #[serde(default)]
    pub client_headers: std::collections::BTreeMap<String, String>,
    /// On a policy deny: the HTTP status (400 to 599), answered with an RFC
    /// 9457 `application/problem+json` body.
    #[serde(default)]
    pub deny_status: Option<u16>,
    /// The problem's `title`.
    #[serde(default)]
    pub deny_title: Option<String>,
    /// The problem's `detail`.
    #[serde(default)]
    pub deny_detail: Option<String>,
    /// The problem's `type` (a URI).
    #[serde(default)]
    pub deny_type: Option<String>,
}

impl Config {
    /// The claim names the response profiles' templates read
    /// (`{claims.<name>}`), so the credential stage keeps them.
    pub fn response_claims(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .responses
            .iter()
            .flat_map(|p| p.upstream_headers.values().chain(p.set_query.values()))
            .flat_map(|template| {
                template
                    .split('{')
                    .skip(1)
                    .filter_map(|rest| rest.split_once('}'))
                    .filter_map(|(var, _)| var.trim().strip_prefix("claims."))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Which proof of possession a token must carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SenderConstraint {
    /// Bearer tokens are accepted (bound tokens are still checked).
    #[default]
    None,
    /// Only DPoP-bound tokens (`cnf.jkt`) with a valid proof.
    Dpop,
    /// Only certificate-bound tokens (`cnf["x5t#S256"]`) over the bound certificate.
    Mtls,
    /// A DPoP-bound or certificate-bound token; bearer tokens are refused.
    Any,
}

impl SenderConstraint {
    /// The configuration and audit-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SenderConstraint::None => "none",
            SenderConstraint::Dpop => "dpop",
            SenderConstraint::Mtls => "mtls",
            SenderConstraint::Any => "any",
        }
    }
}

/// `[sender_constraint]`: how DPoP proofs and client certificates are checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConstraintConfig {
    /// Signature algorithms accepted for DPoP proofs (asymmetric only).
    #[serde(default = "default_dpop_algorithms")]
    pub dpop_algorithms: Vec<String>,
    /// Oldest accepted proof: `iat` no more than this before now.
    #[serde(default = "default_dpop_max_age", deserialize_with = "de_duration")]
    pub dpop_max_age: Duration,
    /// Clock skew tolerated on a proof's `iat` in the future.
    #[serde(default = "default_dpop_clock_skew", deserialize_with = "de_duration")]
    pub dpop_clock_skew: Duration,
    /// Most proof `jti`s remembered by one instance (replay cache); a proof is
    /// refused when the cache cannot remember it (fail closed).
    #[serde(default = "default_dpop_replay_entries")]
    pub dpop_replay_entries: u64,
    /// A header carrying the client certificate from a trusted proxy hop,
    /// in Envoy's `x-forwarded-client-cert` format, used when Envoy reports
    /// no peer certificate of its own. Unset: only Envoy's peer certificate.
    #[serde(default)]
    pub client_certificate_header: Option<String>,
    /// Require a server-issued nonce in every DPoP proof (RFC 9449 section
    /// 9): a proof without a valid one is refused with `use_dpop_nonce` and
    /// the answer carries a fresh `DPoP-Nonce`.
    #[serde(default)]
    pub dpop_nonce: bool,
    /// How long an issued nonce is accepted.
    #[serde(
        default = "default_dpop_nonce_lifetime",
        deserialize_with = "de_duration"
    )]
    pub dpop_nonce_lifetime: Duration,
    /// File holding the secret nonces are derived from (at least 32 bytes),
    /// shared by every instance so a nonce issued by one is accepted by the
    /// others. Unset: a random secret per process (one instance only).
    #[serde(default)]
    pub dpop_nonce_secret_file: Option<PathBuf>,
}

impl Default for SenderConstraintConfig {
    fn default() -> Self {
        Self {
            dpop_algorithms: default_dpop_algorithms(),
            dpop_max_age: default_dpop_max_age(),
            dpop_clock_skew: default_dpop_clock_skew(),
            dpop_replay_entries: default_dpop_replay_entries(),
            client_certificate_header: None,
            dpop_nonce: false,
            dpop_nonce_lifetime: default_dpop_nonce_lifetime(),
            dpop_nonce_secret_file: None,
        }
    }
}

fn default_dpop_nonce_lifetime() -> Duration {
    Duration::from_secs(300)
}

fn default_dpop_algorithms() -> Vec<String> {
    ["ES256", "ES384", "EdDSA", "PS256", "RS256"]
        .into_iter()
        .map(str::to_owned)
        .collect()
}
fn default_dpop_max_age() -> Duration {
    Duration::from_secs(60)
}
fn default_dpop_clock_skew() -> Duration {
    Duration::from_secs(5)
}
fn default_dpop_replay_entries() -> u64 {
    1_000_000
}

/// `[status_list]`: checks of tokens that carry a `status.status_list` claim
/// (OAuth Token Status List). The list is fetched with the issuer's `remote`
/// HTTP settings (HTTPS only, `ca_file`, timeouts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusListConfig {
    /// Check status-list claims; off accepts such tokens without a check.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long a fetched list is used when it names no `ttl` (never past its `exp`).
    #[serde(default = "default_status_list_ttl", deserialize_with = "de_duration")]
    pub default_ttl: Duration,
    /// Shortest interval between two fetches of one list.
    #[serde(
        default = "default_status_list_min_refresh",
        deserialize_with = "de_duration"
    )]
    pub min_refresh: Duration,
    /// How long past its validity a list keeps answering while refreshes fail
    /// (at most 1 hour); then its tokens are refused.
    #[serde(default, deserialize_with = "de_duration")]
    pub grace: Duration,
    /// Largest status-list response accepted (bytes).
    #[serde(default = "default_status_list_max_bytes")]
    pub max_list_bytes: usize,
    /// Largest decompressed list accepted (bytes).
    #[serde(default = "default_status_list_max_decompressed")]
    pub max_decompressed_bytes: usize,
    /// Most lists kept at once.
    #[serde(default = "default_status_list_max_lists")]
    pub max_lists: u64,
}

impl Default for StatusListConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default_ttl: default_status_list_ttl(),
            min_refresh: default_status_list_min_refresh(),
            grace: Duration::ZERO,
            max_list_bytes: default_status_list_max_bytes(),
            max_decompressed_bytes: default_status_list_max_decompressed(),
            max_lists: default_status_list_max_lists(),
        }
    }
}

fn default_status_list_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_status_list_min_refresh() -> Duration {
    Duration::from_secs(10)
}
fn default_status_list_max_bytes() -> usize {
    1024 * 1024
}
fn default_status_list_max_decompressed() -> usize {
    16 * 1024 * 1024
}
fn default_status_list_max_lists() -> u64 {
    1000
}

/// `[ssf]`: receiver of Security Event Tokens (OpenID Shared Signals: CAEP
/// and RISC events) from one transmitter, pushed (RFC 8935) and/or polled
/// (RFC 8936). The events become revocations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfConfig {
    /// The transmitter's `iss`, exactly.
    pub issuer: String,
    /// The `aud` the SETs must name (this receiver).
    pub audience: String,
    /// Local JWKS file with the transmitter's public keys.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The transmitter's remote JWKS (HTTPS).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Signature algorithms accepted on SETs.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Remote key and HTTP settings (also used by the poll client).
    #[serde(default)]
    pub remote: RemoteKeysConfig,
    /// Address of the push endpoint's plain HTTP listener; unset: no push.
    #[serde(default)]
    pub push_listen: Option<SocketAddr>,
    /// Path of the push endpoint.
    #[serde(default = "default_ssf_push_path")]
    pub push_path: String,
    /// File holding the bearer token the transmitter presents on pushes;
    /// unset accepts pushes without one (the SET signature still decides).
    #[serde(default)]
    pub push_token_file: Option<PathBuf>,
    /// The transmitter's poll endpoint (HTTPS); unset: no polling.
    #[serde(default)]
    pub poll_url: Option<String>,
    /// File holding the bearer token presented to the poll endpoint.
    #[serde(default)]
    pub poll_token_file: Option<PathBuf>,
    /// Time between polls when the last poll returned nothing.
    #[serde(
        default = "default_ssf_poll_interval",
        deserialize_with = "de_duration"
    )]
    pub poll_interval: Duration,
    /// Most SETs asked for per poll (`maxEvents`).
    #[serde(default = "default_ssf_poll_max_events")]
    pub poll_max_events: u32,
    /// Clock skew tolerated on a SET's `iat`.
    #[serde(default = "default_leeway", deserialize_with = "de_duration")]
    pub leeway: Duration,
    /// The transmitter's configuration metadata (HTTPS), where its stream
    /// management endpoints are found. Unset:
    /// `<issuer>/.well-known/ssf-configuration` when stream management is used.
    #[serde(default)]
    pub configuration_url: Option<String>,
    /// The id of the stream this receiver reads (the transmitter's `stream_id`).
    #[serde(default)]
    pub stream_id: Option<String>,
    /// File holding the bearer token presented to the transmitter's stream
    /// management endpoints (status, add/remove subject, verification).
    #[serde(default)]
    pub management_token_file: Option<PathBuf>,
    /// How often the receiver asks the transmitter for a verification event
    /// and checks that it arrives; zero (the default) asks never.
    #[serde(default, deserialize_with = "de_duration")]
    pub verification_interval: Duration,
}

fn default_ssf_push_path() -> String {
    "/ssf/events".to_owned()
}
fn default_ssf_poll_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_ssf_poll_max_events() -> u32 {
    100
}

/// `[api_keys]`: opaque keys for machine clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    /// The key file (hashes only), re-read when it changes.
    pub file: PathBuf,
    /// Header carrying the key besides `Authorization: Bearer`, e.g. `x-api-key`.
    #[serde(default)]
    pub header: Option<String>,
    /// Cedar entity type of API-key principals.
    #[serde(default = "default_client_type")]
    pub principal_type: String,
    /// How often the key file is checked for changes.
    #[serde(default = "default_reload_interval", deserialize_with = "de_duration")]
    pub reload_interval: Duration,
    /// Longest accepted key lifetime (`expires - created`); keys without an
    /// expiry or living longer are refused.
    #[serde(default = "default_api_key_lifetime", deserialize_with = "de_duration")]
    pub max_lifetime: Duration,
}

fn default_api_key_lifetime() -> Duration {
    Duration::from_secs(90 * 24 * 3600)
}

fn default_client_type() -> String {
    "Client".to_owned()
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(2)
}

/// `[workload]`: identities of mTLS peers, as Envoy reports them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Cedar entity type of workload principals.
    #[serde(default = "default_workload_type")]
    pub principal_type: String,
    /// Accepted SPIFFE trust domains, e.g. `cluster.local`.
    pub trust_domains: Vec<String>,
    /// mTLS identities of the callers (SPIFFE IDs, or certificate subjects)
    /// allowed to assert a workload identity in `IsAuthorized`'s
    /// `credential.workload_identity`. Empty: no caller may.
    #[serde(default)]
    pub asserting_callers: Vec<String>,
}

fn default_workload_type() -> String {
    "Workload".to_owned()
}

impl RouteConfig {
    /// The Cedar action id this route maps to.
    pub fn action_id(&self) -> String {
        self.action
            .clone()
            .unwrap_or_else(|| format!("{} {}", self.method.to_ascii_lowercase(), self.path))
    }
}

/// `[response]`: what an allow adds to or removes from the upstream request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseConfig {
    /// Header carrying the authenticated principal id to the upstream; empty disables it.
    #[serde(default = "default_subject_header")]
    pub subject_header: String,
    /// Remove the `authorization` header before the request reaches the upstream.
    #[serde(default)]
    pub remove_authorization: bool,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        Self {
            subject_header: default_subject_header(),
            remove_authorization: false,
        }
    }
}

fn default_subject_header() -> String {
    "x-portcullis-subject".to_owned()
}

/// `[audit]`: the decision log.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File to append decision lines to; unset writes them to standard output.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// How long decision lines gather before one write (milliseconds; default
    /// 2). `0` writes each line before its response is sent.
    #[serde(default)]
    pub flush_interval_ms: Option<u64>,
    /// Also record, in each `Check` decision line, the identity and request
    /// facts policies can read (`inputs`: scopes, roles, times, host,
    /// scheme, source address...; never the token), so `portcullis replay`
    /// can re-decide it exactly.
    #[serde(default)]
    pub record_inputs: bool,
}

/// The default `[audit] flush_interval_ms`.
pub const DEFAULT_AUDIT_FLUSH_INTERVAL_MS: u64 = 2;

/// The longest `[audit] flush_interval_ms` accepted: lines must reach the
/// file while they are news.
pub const MAX_AUDIT_FLUSH_INTERVAL_MS: u64 = 1000;

impl AuditConfig {
    /// The batching interval of the decision log (zero: write-through).
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(
            self.flush_interval_ms
                .unwrap_or(DEFAULT_AUDIT_FLUSH_INTERVAL_MS),
        )
    }
}

/// A Cedar entity type name: an identifier, optionally namespaced (`A::B`).
pub fn check_entity_type(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.split("::").all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a Cedar entity type name"))
    }
}

/// The longest configured duration accepted: 100 years (of 365.25 days).
/// Durations are added to each other, to instants and to Unix times, and
/// converted to signed seconds; below this bound none of that can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Parses a humantime duration string such as `"30s"`, `"5m"` or `"1h 30m"`,
/// at most [`MAX_DURATION`].
fn de_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    let duration = humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "expected a duration such as \"30s\" or \"1h\", found {text:?}: {e}"
        ))
    })?;
    if duration > MAX_DURATION {
        return Err(serde::de::Error::custom(format!(
            "the duration {text:?} is too long: at most 100 years is accepted"
        )));
    }
    Ok(duration)
}

/// Keys whose values are secrets (`[admin] token`, `[revocation] redis_url`,
/// which may hold a password): never repeated in an error message.
const SECRET_KEYS: &[&str] = &["token", "redis_url"];

/// A TOML error as line, column and what is wrong, without the source line
/// that `toml`'s own message quotes (it may be `token = "..."`), and with the
/// value of every secret key in the file cut out of the message, in case the
/// parser repeated it ("invalid type: integer `123`").
fn parse_error_message(text: &str, error: &toml::de::Error) -> String {
    let mut message = error.message().trim().to_owned();
    let mut secrets = secret_values(text);
    // Longest first, so a value is not left half-redacted by a shorter one.
    secrets.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for secret in secrets {
        message = message.replace(&secret, "<redacted>");
    }
    match error.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            format!("TOML error at line {line}, column {column}: {message}")
        }
        None => format!("TOML error: {message}"),
    }
}

/// The raw value texts of [`SECRET_KEYS`] in `text`, found line by line, so
/// that this works on a file too broken to parse: `key = value` (bare, dotted
/// `admin.token` or inside an inline table), with and without its quotes.
fn secret_values(text: &str) -> Vec<String> {
    let mut values = Vec::new();
    for line in text.lines() {
        for key in SECRET_KEYS {
            let mut from = 0;
            while let Some(found) = line[from..].find(key) {
                let start = from + found;
                from = start + key.len();
                let boundary = line[..start]
                    .chars()
                    .next_back()
                    .is_none_or(|c| c.is_whitespace() || matches!(c, '.' | '{' | ',' | '"'));
                let rest = line[from..].trim_start_matches(['"', ' ', '\t']);
                let Some(value) = rest.strip_prefix('=').filter(|_| boundary) else {
                    continue;
                };
                let raw = value.trim();
                let unquoted = raw.trim_start_matches(['"', '\'']);
                // Up to the closing quote (or the end of the line, if unclosed).
                let inner = unquoted.split(['"', '\'']).next().unwrap_or(unquoted);
                for candidate in [raw, unquoted, inner] {
                    if !candidate.is_empty() {
                        values.push(candidate.to_owned());
                    }
                }
            }
        }
    }
    values
}

impl Config {
    /// Reads, parses, resolves and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, path, base)
    }

    /// Parses configuration text; relative paths resolve against `base_dir`.
    /// `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: &Path, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: parse_error_message(text, &e),
        })?;
        config.resolve_paths(base_dir);
        config
            .resolve_env()
            .map_err(|message| ConfigError::Invalid {
                path: origin.to_owned(),
                message,
            })?;
        config.check().map_err(|message| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Values named by `*_env` keys that are needed before serving.
    fn resolve_env(&mut self) -> Result<(), String> {
        let revocation = &mut self.revocation;
        if let Some(var) = &revocation.redis_url_env {
            if revocation.redis_url.is_some() {
                return Err("[revocation] needs at most one of redis_url, redis_url_env".into());
            }
            let url = std::env::var(var).map_err(|_| {
                format!("revocation.redis_url_env: environment variable {var} is not set")
            })?;
            revocation.redis_url = Some(Secret::new(url.trim()));
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.policies.dir);
        for issuer in &mut self.issuers {
            if let Some(file) = &mut issuer.jwks_file {
                resolve(file);
            }
            if let Some(file) = &mut issuer.remote.ca_file {
                resolve(file);
            }
            if let Some(file) = issuer
                .introspection
                .as_mut()
                .and_then(|i| i.client_secret_file.as_mut())
            {
                resolve(file);
            }
        }
        if let Some(file) = &mut self.audit.file {
            resolve(file);
        }
        if let Some(api_keys) = &mut self.api_keys {
            resolve(&mut api_keys.file);
        }
        resolve(&mut self.revocation.data_dir);
        if let Some(file) = self.admin.as_mut().and_then(|a| a.token_file.as_mut()) {
            resolve(file);
        }
        if let Some(tls) = &mut self.server.tls {
            tls.resolve_paths(resolve);
        }
        if let Some(tls) = self.admin.as_mut().and_then(|a| a.tls.as_mut()) {
            tls.resolve_paths(resolve);
        }
        if let Some(file) = &mut self.sender_constraint.dpop_nonce_secret_file {
            resolve(file);
        }
        if let Some(ssf) = &mut self.ssf {
            for file in [
                &mut ssf.jwks_file,
                &mut ssf.push_token_file,
                &mut ssf.poll_token_file,
                &mut ssf.management_token_file,
                &mut ssf.remote.ca_file,
            ]
            .into_iter()
            .flatten()
            {
                resolve(file);
            }
        }
        if let Some(authzen) = &mut self.authzen {
            if let Some(file) = &mut authzen.token_file {
                resolve(file);
            }
            if let Some(tls) = &mut authzen.tls {
                tls.resolve_paths(resolve);
            }
        }
    }

    /// The longest token lifetime and leeway over all issuers: how long a
    /// revoked credential could otherwise stay valid.
    pub fn token_lifetimes(&self) -> Lifetimes {
        Lifetimes {
            max_lifetime: self
                .issuers
                .iter()
                .map(|i| i.max_token_lifetime)
                .max()
                .unwrap_or_default(),
            leeway: self
                .issuers
                .iter()
                .map(|i| i.leeway)
                .max()
                .unwrap_or_default(),
            api_key_lifetime: self
                .api_keys
                .as_ref()
                .map(|k| k.max_lifetime)
                .unwrap_or_default(),
        }
    }

    /// Every opaque token can go to one introspecting issuer at most: with
    /// several, each declares `token_prefixes`, and no prefix of one issuer is
    /// a prefix of another's (the token would belong to both).
    fn check_introspection_routing(&self) -> Result<(), String> {
        let introspecting: Vec<(usize, &IssuerConfig, &IntrospectionConfig)> = self
            .issuers
            .iter()
            .enumerate()
            .filter_map(|(i, issuer)| Some((i, issuer, issuer.introspection.as_ref()?)))
            .collect();
        for &(i, _, introspection) in &introspecting {
            let key = format!("issuers[{i}].introspection.token_prefixes");
            if introspection
                .token_prefixes
                .as_ref()
                .is_some_and(Vec::is_empty)
            {
                return Err(format!(
                    "{key} must list at least one prefix (leave it out for the one issuer that takes every opaque token)"
                ));
            }
            for prefix in introspection.prefixes() {
                if prefix.is_empty() {
                    return Err(format!("{key} must not contain an empty prefix"));
                }
                if let Some(bad) = prefix.chars().find(|c| !is_b64token_char(*c)) {
                    return Err(format!(
                        "{key}: {prefix:?} contains {bad:?}, which no bearer token can contain (allowed: A-Z a-z 0-9 - . _ ~ + / =)"
                    ));
                }
                if prefix.starts_with(API_KEY_PREFIX) || API_KEY_PREFIX.starts_with(prefix.as_str())
                {
                    return Err(format!(
                        "{key}: {prefix:?} overlaps {:?}, the API key prefix (such tokens are API keys, never introspected)",
                        API_KEY_PREFIX
                    ));
                }
            }
        }
        if introspecting.len() > 1
            && let Some(&(i, issuer, _)) = introspecting
                .iter()
                .find(|(_, _, introspection)| introspection.token_prefixes.is_none())
        {
            return Err(format!(
                "issuers[{i}].introspection needs token_prefixes: {} issuers introspect opaque tokens, so each must say which tokens are its own (issuer {:?} has none)",
                introspecting.len(),
                issuer.issuer
            ));
        }
        for (n, &(i, first, a)) in introspecting.iter().enumerate() {
            for &(j, second, b) in &introspecting[n + 1..] {
                for pa in a.prefixes() {
                    for pb in b.prefixes() {
                        if pa.starts_with(pb.as_str()) || pb.starts_with(pa.as_str()) {
                            return Err(format!(
                                "issuers[{i}].introspection.token_prefixes {pa:?} (issuer {:?}) and issuers[{j}].introspection.token_prefixes {pb:?} (issuer {:?}) overlap: a token starting with the longer one would belong to both",
                                first.issuer, second.issuer
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The whole configuration's checks, section by section; the first problem
    /// found is the one reported, so the order below is part of the behaviour.
    fn check(&self) -> Result<(), String> {
        self.check_application()?;
        self.check_issuers_present()?;
        self.check_audit()?;
        self.check_issuers()?;
        self.check_introspection_routing()?;
        self.check_routes()?;
        self.check_api_keys()?;
        self.check_workload()?;
        self.check_server_tls()?;
        self.check_admin_listener()?;
        self.check_workload_routes()?;
        self.check_policies()?;
        self.check_response()?;
        self.revocation.check()?;
        self.check_admin_token()?;
        self.telemetry.check(&self.server.listen)
    }

    /// `[application]`: a name.
    fn check_application(&self) -> Result<(), String> {
        if self.application.name.is_empty() {
            return Err("application.name must not be empty".into());
        }
        Ok(())
    }

    /// `[[issuers]]`: at least one.
    fn check_issuers_present(&self) -> Result<(), String> {
        if self.issuers.is_empty() {
            return Err("at least one [[issuers]] entry is required".into());
        }
        Ok(())
    }

    /// `[audit]`: the flush interval's bound.
    fn check_audit(&self) -> Result<(), String> {
        if let Some(ms) = self.audit.flush_interval_ms
            && ms > MAX_AUDIT_FLUSH_INTERVAL_MS
        {
            return Err(format!(
                "audit.flush_interval_ms = {ms} is above the maximum of {MAX_AUDIT_FLUSH_INTERVAL_MS}"
            ));
        }
        Ok(())
    }

    /// `[[issuers]]`: each entry, and no issuer twice.
    fn check_issuers(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, issuer) in self.issuers.iter().enumerate() {
            if !issuer.issuer.is_empty() && !seen.insert(issuer.issuer.as_str()) {
                return Err(format!(
                    "issuers[{i}].issuer {:?} is configured twice",
                    issuer.issuer
                ));
            }
            issuer.check(i)?;
        }
        Ok(())
    }

    /// `[[routes]]`: each entry.
    fn check_routes(&self) -> Result<(), String> {
        for (i, route) in self.routes.iter().enumerate() {
            route.check(i)?;
        }
        Ok(())
    }

    /// `[api_keys]`, when present.
    fn check_api_keys(&self) -> Result<(), String> {
        if let Some(api_keys) = &self.api_keys {
            api_keys.check()?;
        }
        Ok(())
    }

    /// `[workload]`, when present (it needs mTLS on the server listener).
    fn check_workload(&self) -> Result<(), String> {
        if let Some(workload) = &self.workload {
            let mtls = self
                .server
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca_file.is_some());
            workload.check(mtls)?;
        }
        Ok(())
    }

    /// `[server.tls]`, when present.
    fn check_server_tls(&self) -> Result<(), String> {
        if let Some(tls) = &self.server.tls {
            tls.check("server.tls")?;
        }
        Ok(())
    }

    /// `[admin]`'s listener: `[admin.tls]`, and no plaintext off loopback
    /// unless allowed.
    fn check_admin_listener(&self) -> Result<(), String> {
        if let Some(admin) = &self.admin {
            if let Some(tls) = &admin.tls {
                tls.check("admin.tls")?;
            }
            if admin.tls.is_none() && !admin.allow_plaintext && !admin.listen.ip().is_loopback() {
                return Err(format!(
                    "[admin] listen = \"{}\" is not a loopback address and the admin listener has no TLS: \
                     the admin token would cross the network in the clear. Configure [admin.tls], \
                     listen on loopback, or set [admin] allow_plaintext = true",
                    admin.listen
                ));
            }
        }
        Ok(())
    }

    /// `[[routes]] allow_workload` needs a `[workload]` section.
    fn check_workload_routes(&self) -> Result<(), String> {
        if self.workload.is_none()
            && let Some(i) = self.routes.iter().position(|r| r.allow_workload)
        {
            return Err(format!(
                "routes[{i}].allow_workload needs a [workload] section"
            ));
        }
        Ok(())
    }

    /// `[policies]`: the watch interval's floor.
    fn check_policies(&self) -> Result<(), String> {
        if self.policies.watch_interval < Duration::from_millis(100) {
            return Err("policies.watch_interval must be at least 100ms".into());
        }
        Ok(())
    }

    /// `[response]`: the subject header's name.
    fn check_response(&self) -> Result<(), String> {
        let header = &self.response.subject_header;
        if !header.is_empty()
            && !header
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "response.subject_header must be a lower-case header name, found {header:?}"
            ));
        }
        Ok(())
    }

    /// `[admin]`'s token (exactly one source), and a listener apart from the
    /// server's.
    fn check_admin_token(&self) -> Result<(), String> {
        if let Some(admin) = &self.admin {
            let set = [
                admin.token.is_some(),
                admin.token_file.is_some(),
                admin.token_env.is_some(),
            ];
            if set.iter().filter(|s| **s).count() != 1 {
                return Err("[admin] needs exactly one of token, token_file, token_env".into());
            }
            if admin.listen == self.server.listen && admin.listen.port() != 0 {
                return Err(format!(
                    "admin.listen must differ from server.listen (the Envoy-facing listener), both are {}",
                    admin.listen
                ));
            }
        }
        Ok(())
    }
}

impl IssuerConfig {
    /// The checks of one `[[issuers]]` entry, the `i`-th.
    fn check(&self, i: usize) -> Result<(), String> {
        if self.issuer.is_empty() {
            return Err(format!("issuers[{i}].issuer must not be empty"));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return Err(format!(
                "issuers[{i}].audiences must list at least one non-empty audience"
            ));
        }
        if self.max_token_lifetime.is_zero() {
            return Err(format!(
                "issuers[{i}].max_token_lifetime must be greater than zero"
            ));
        }
        if self.roles_claim.is_empty() {
            return Err(format!("issuers[{i}].roles_claim must not be empty"));
        }
        let sources = usize::from(self.jwks_file.is_some())
            + usize::from(self.jwks_uri.is_some())
            + usize::from(self.discovery);
        if sources > 1 {
            return Err(format!(
                "issuers[{i}]: give one of jwks_file, jwks_uri or discovery = true, not several"
            ));
        }
        if sources == 0 && self.introspection.is_none() {
            return Err(format!(
                "issuers[{i}]: keys are needed: set jwks_file, jwks_uri or discovery = true (or configure introspection)"
            ));
        }
        if let Some(uri) = &self.jwks_uri
            && !uri.starts_with("https://")
        {
            return Err(format!(
                "issuers[{i}].jwks_uri must be an https:// URL, found {uri:?}"
            ));
        }
        if self.discovery && !self.issuer.starts_with("https://") {
            return Err(format!(
                "issuers[{i}]: discovery needs an https:// issuer, found {:?}",
                self.issuer
            ));
        }
        for alg in &self.algorithms {
            if !default_algorithms().contains(alg) {
                return Err(format!(
                    "issuers[{i}].algorithms: {alg:?} is not accepted (allowed: {})",
                    default_algorithms().join(", ")
                ));
            }
        }
        if self.algorithms.is_empty() {
            return Err(format!("issuers[{i}].algorithms must not be empty"));
        }
        check_entity_type(&self.principal_type)
            .map_err(|e| format!("issuers[{i}].principal_type: {e}"))?;
        let remote = &self.remote;
        if remote.refresh_min > remote.refresh_max {
            return Err(format!(
                "issuers[{i}].remote: refresh_min must not exceed refresh_max"
            ));
        }
        if let Some(introspection) = &self.introspection {
            if introspection.endpoint.is_none() && !self.discovery {
                return Err(format!(
                    "issuers[{i}].introspection.endpoint is required without discovery"
                ));
            }
            if let Some(endpoint) = &introspection.endpoint
                && !endpoint.starts_with("https://")
            {
                return Err(format!(
                    "issuers[{i}].introspection.endpoint must be an https:// URL, found {endpoint:?}"
                ));
            }
            if introspection.client_secret_file.is_none()
                && introspection.client_secret_env.is_none()
            {
                return Err(format!(
                    "issuers[{i}].introspection needs client_secret_file or client_secret_env"
                ));
            }
            if introspection.max_concurrent == 0 {
                return Err(format!(
                    "issuers[{i}].introspection.max_concurrent must be at least 1"
                ));
            }
        }
        Ok(())
    }
}

impl RouteConfig {
    /// The checks of one `[[routes]]` entry, the `i`-th.
    fn check(&self, i: usize) -> Result<(), String> {
        let route = self;
        let method_ok =
            !route.method.is_empty() && route.method.bytes().all(|b| b.is_ascii_uppercase());
        if !method_ok {
            return Err(format!(
                "routes[{i}].method must be an upper-case HTTP method such as \"GET\", found {:?}",
                route.method
            ));
        }
        if !route.path.starts_with('/') {
            return Err(format!(
                "routes[{i}].path must start with '/', found {:?}",
                route.path
            ));
        }
        Ok(())
    }
}

impl ApiKeysConfig {
    fn check(&self) -> Result<(), String> {
        check_entity_type(&self.principal_type)
            .map_err(|e| format!("api_keys.principal_type: {e}"))?;
        if let Some(header) = &self.header
            && (header.is_empty() || header.bytes().any(|b| b.is_ascii_uppercase()))
        {
            return Err(format!(
                "api_keys.header must be a lower-case header name, found {header:?}"
            ));
        }
        Ok(())
    }
}

impl WorkloadConfig {
    /// `mtls`: the listener asks for client certificates.
    fn check(&self, mtls: bool) -> Result<(), String> {
        check_entity_type(&self.principal_type)
            .map_err(|e| format!("workload.principal_type: {e}"))?;
        if self.trust_domains.is_empty() {
            return Err("workload.trust_domains must list at least one trust domain".into());
        }
        if let Some(i) = self
            .asserting_callers
            .iter()
            .position(|c| c.trim().is_empty())
        {
            return Err(format!("workload.asserting_callers[{i}] is empty"));
        }
        if !self.asserting_callers.is_empty() && !mtls {
            return Err("workload.asserting_callers needs mTLS on the listener: \
                 [server.tls] with client_ca_file"
                .into());
        }
        Ok(())
    }
}

impl RevocationConfig {
    fn check(&self) -> Result<(), String> {
        let prefix = &self.redis_prefix;
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace()) {
            return Err(format!(
                "revocation.redis_prefix must be non-empty without whitespace, found {prefix:?}"
            ));
        }
        if self.max_entries == 0 {
            return Err("revocation.max_entries must be at least 1".into());
        }
        if self.max_pending_writes == 0 {
            return Err("revocation.max_pending_writes must be at least 1".into());
        }
        Ok(())
    }
}

impl TelemetryConfig {
    fn check(&self, grpc_listen: &SocketAddr) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "telemetry.sampling_ratio must be between 0.0 and 1.0, found {}",
                self.sampling_ratio
            ));
        }
        if self.service_name.is_empty() {
            return Err("telemetry.service_name must not be empty".into());
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !endpoint.starts_with("http://")
        {
            // No TLS client for the exporter is built in: a collector agent on
            // the host or in the pod forwards over TLS.
            return Err(format!(
                "telemetry.otlp_endpoint must be an http:// URL (a collector agent on the host or in the pod; TLS to the collector is not supported), found {endpoint:?}"
            ));
        }
        if let Some(metrics) = &self.metrics_listen
            && metrics == grpc_listen
            && metrics.port() != 0
        {
            return Err(format!(
                "telemetry.metrics_listen must differ from server.listen, both are {metrics}"
            ));
        }
        if self.decision_logs && self.otlp_endpoint.is_none() {
            return Err("telemetry.decision_logs needs telemetry.otlp_endpoint".into());
        }
        if self.decision_log_queue == 0 {
            return Err("telemetry.decision_log_queue must be at least 1".into());
        }
        if !matches!(self.decision_log_overflow.as_str(), "drop" | "block") {
            return Err(format!(
                "telemetry.decision_log_overflow must be \"drop\" or \"block\", found {:?}",
                self.decision_log_overflow
            ));
        }
        if let Some(unknown) = self
            .decision_log_mask
            .iter()
            .find(|f| !AUDIT_FIELDS.contains(&f.as_str()))
        {
            return Err(format!(
                "telemetry.decision_log_mask: {unknown:?} is not an audit line field (see docs/reference/audit-line.md)"
            ));
        }
        match self.log_format.as_deref() {
            None | Some("plain") | Some("json") => Ok(()),
            Some(other) => Err(format!(
                "telemetry.log_format must be \"plain\" or \"json\", found {other:?}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[policies]
dir = "policies"
[application]
name = "orders"
[[issuers]]
issuer = "https://auth.example.test"
audiences = ["orders-api"]
jwks_file = "jwks.json"
max_token_lifetime = "15m"
[[routes]]
method = "GET"
path = "/orders/{id}"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), Path::new("/etc/portcullis"))
    }

    #[test]
    fn defaults_and_relative_paths() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:9191");
        assert_eq!(
            config.policies.dir,
            PathBuf::from("/etc/portcullis/policies")
        );
        let issuer = &config.issuers[0];
        assert_eq!(
            issuer.jwks_file,
            Some(PathBuf::from("/etc/portcullis/jwks.json"))
        );
        assert_eq!(issuer.principal_type, "User");
        assert_eq!(issuer.principal_claim, "sub");
        assert_eq!(issuer.max_token_lifetime, Duration::from_secs(900));
        assert_eq!(issuer.leeway, Duration::from_secs(30));
        assert_eq!(issuer.roles_claim, "roles");
        assert_eq!(config.routes[0].action_id(), "get /orders/{id}");
        assert_eq!(config.response.subject_header, "x-portcullis-subject");
        assert_eq!(
            config.revocation.data_dir,
            PathBuf::from("/etc/portcullis/data")
        );
        assert!(config.revocation.redis_url.is_none());
        assert_eq!(config.revocation.startup, StartupMode::Wait);
        assert!(config.admin.is_none());
    }

    #[test]
    fn server_drain_period_defaults_to_5_s_and_reads_durations() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.server.drain_period, Duration::from_secs(5));
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
        let config = parse(&format!("[server]\ndrain_period = \"0s\"\n{MINIMAL}")).unwrap();
        assert_eq!(config.server.drain_period, Duration::ZERO);
        let err = parse(&format!("[server]\ndrain_period = \"soon\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
    }

    /// A file that does not parse is reported by line and column, never with
    /// its source text: the broken line may hold the admin token or a Redis
    /// password.
    #[test]
    fn parse_errors_never_repeat_secret_values() {
        let marker = "MARKER-s3cr3t-7f3a";
        let broken = [
            format!("{MINIMAL}[admin]\nlisten = \"127.0.0.1:9192\"\ntoken = \"{marker}\" oops\n"),
            format!("{MINIMAL}[admin]\nlisten = \"127.0.0.1:9192\"\ntoken = \"{marker}\n"),
            format!("{MINIMAL}[admin]\nlisten = \"127.0.0.1:9192\"\ntoken = {marker}\n"),
            format!("{MINIMAL}[admin]\ntoken = \"{marker}\"\nlisten = 127.0.0.1\n"),
            format!(
                "{MINIMAL}[admin]\nlisten = \"127.0.0.1:9192\"\ntoken = 1234{}\n",
                5678
            ),
            format!("{MINIMAL}[revocation]\nredis_url = \"redis://:{marker}@db:6379\" x\n"),
            format!("{MINIMAL}admin = {{ listen = \"127.0.0.1:9192\", token = \"{marker}\" ]\n"),
            format!("{MINIMAL}[admin]\nlisten = \"127.0.0.1:9192\"\n\"token\" = \"{marker}\" !\n"),
        ];
        for text in &broken {
            let err = parse(text).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(shown.contains("line "), "{shown}");
            assert!(!shown.contains(marker), "{shown}");
            assert!(!shown.contains("12345678"), "{shown}");
        }
    }

    /// Durations that would overflow once added or converted to signed
    /// seconds (a leeway past `i64::MAX` seconds used to wrap negative) are
    /// refused at load, naming the value; 100 years is still accepted.
    #[test]
    fn durations_beyond_100_years_are_refused_at_load() {
        let config = parse(&format!("[server]\ndrain_period = \"100y\"\n{MINIMAL}")).unwrap();
        assert_eq!(config.server.drain_period, MAX_DURATION);
        for value in ["101y", "300000000000y"] {
            for text in [
                format!("[server]\ndrain_period = \"{value}\"\n{MINIMAL}"),
                MINIMAL.replace(
                    "max_token_lifetime = \"15m\"",
                    &format!("leeway = \"{value}\""),
                ),
                MINIMAL.replace("\"15m\"", &format!("\"{value}\"")),
            ] {
                let err = parse(&text).unwrap_err().to_string();
                assert!(err.contains("too long") && err.contains(value), "{err}");
            }
        }
    }

    #[test]
    fn revocation_caps_default_to_a_million_entries_and_ten_thousand_pending_writes() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.revocation.max_entries, 1_000_000);
        assert_eq!(config.revocation.max_pending_writes, 10_000);
        let set = parse(&format!(
            "{MINIMAL}[revocation]\nmax_entries = 5\nmax_pending_writes = 2\n"
        ))
        .unwrap();
        assert_eq!(set.revocation.max_entries, 5);
        assert_eq!(set.revocation.max_pending_writes, 2);
        let err = parse(&format!("{MINIMAL}[revocation]\nmax_entries = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("revocation.max_entries"), "{err}");
    }

    #[test]
    fn audit_flush_interval_defaults_to_2_ms_and_is_bounded() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.audit.flush_interval(), Duration::from_millis(2));
        let through = parse(&format!("{MINIMAL}[audit]\nflush_interval_ms = 0\n")).unwrap();
        assert_eq!(through.audit.flush_interval(), Duration::ZERO);
        let err = parse(&format!("{MINIMAL}[audit]\nflush_interval_ms = 1001\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("audit.flush_interval_ms = 1001"), "{err}");
    }

    #[test]
    fn admin_and_revocation_sections() {
        let text = format!(
            "{MINIMAL}\n[revocation]\nredis_url = \"redis://:hunter2@127.0.0.1:6379\"\nstartup = \"local\"\n[admin]\nlisten = \"127.0.0.1:9192\"\ntoken = \"0123456789abcdef0123\"\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.revocation.startup, StartupMode::Local);
        let admin = config.admin.as_ref().unwrap();
        assert_eq!(
            admin.resolve_token().unwrap().expose(),
            "0123456789abcdef0123"
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("0123456789abcdef0123"), "{debug}");

        let short = text.replace("0123456789abcdef0123", "short");
        let err = parse(&short).unwrap().admin.unwrap().resolve_token();
        assert!(err.unwrap_err().contains("at least 16"));
        let same = text.replace("127.0.0.1:9192", "127.0.0.1:9191");
        assert!(
            parse(&same)
                .unwrap_err()
                .to_string()
                .contains("admin.listen")
        );
        let two = text.replace("[admin]\n", "[admin]\ntoken_env = \"X\"\n");
        assert!(parse(&two).unwrap_err().to_string().contains("exactly one"));
    }

    #[test]
    fn telemetry_section() {
        let off = parse(MINIMAL).unwrap().telemetry;
        assert!(off.otlp_endpoint.is_none() && off.metrics_listen.is_none());
        assert_eq!(off.service_name, "portcullis");
        assert_eq!(off.sampling_ratio, 1.0);
        let on = parse(&format!(
            "{MINIMAL}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\nservice_name = \"authz\"\nresource_attributes = {{ \"deployment.environment\" = \"prod\" }}\nsampling_ratio = 0.25\nmetrics_listen = \"127.0.0.1:9464\"\nlog_format = \"json\"\n"
        ))
        .unwrap()
        .telemetry;
        assert_eq!(on.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(on.resource_attributes["deployment.environment"], "prod");
        assert_eq!(on.sampling_ratio, 0.25);
        assert_eq!(on.metrics_listen.unwrap().port(), 9464);
        for (bad, expected) in [
            ("sampling_ratio = 1.5", "sampling_ratio"),
            ("otlp_endpoint = \"127.0.0.1:4317\"", "otlp_endpoint"),
            ("otlp_endpoint = \"https://collector:4317\"", "TLS"),
            ("log_format = \"xml\"", "log_format"),
            ("metrics_listen = \"127.0.0.1:9191\"", "metrics_listen"),
            ("otlp_endpiont = \"http://x\"", "otlp_endpiont"),
        ] {
            let err = parse(&format!("{MINIMAL}\n[telemetry]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = MINIMAL.replace("name = \"orders\"", "name = \"orders\"\ncolour = \"red\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_value() {
        let text = MINIMAL.replace("\"15m\"", "\"fortnight\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("fortnight"), "{err}");
    }

    #[test]
    fn lower_case_method_is_rejected() {
        let text = MINIMAL.replace("method = \"GET\"", "method = \"get\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("routes[0].method"), "{err}");
    }

    #[test]
    fn issuers_are_required() {
        let text = MINIMAL.split("[[issuers]]").next().unwrap().to_owned();
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("issuers"), "{err}");
    }

    /// MINIMAL plus introspecting issuers, one per `(host, extra)`: `extra`
    /// goes into its `[issuers.introspection]` table.
    fn with_introspecting(issuers: &[(&str, &str)]) -> String {
        let mut text = MINIMAL.to_owned();
        for (host, extra) in issuers {
            text.push_str(&format!(
                "[[issuers]]\nissuer = \"https://{host}\"\naudiences = [\"orders-api\"]\n\
                 [issuers.introspection]\nendpoint = \"https://{host}/introspect\"\n\
                 client_id = \"portcullis\"\nclient_secret_env = \"SECRET\"\n{extra}\n"
            ));
        }
        text
    }

    #[test]
    fn introspection_defaults() {
        let config = parse(&with_introspecting(&[("a.test", "")])).unwrap();
        let introspection = config.issuers[1].introspection.as_ref().unwrap();
        assert_eq!(introspection.token_prefixes, None);
        assert!(introspection.prefixes().is_empty());
        assert_eq!(introspection.negative_cache, Duration::from_secs(10));
        assert_eq!(introspection.max_concurrent, 64);
        assert_eq!(introspection.cache_max, Duration::from_secs(60));

        let config = parse(&with_introspecting(&[(
            "a.test",
            "token_prefixes = [\"at_\"]\nnegative_cache = \"0s\"\nmax_concurrent = 1",
        )]))
        .unwrap();
        let introspection = config.issuers[1].introspection.as_ref().unwrap();
        assert_eq!(introspection.prefixes(), ["at_"]);
        assert!(introspection.negative_cache.is_zero());
        assert_eq!(introspection.max_concurrent, 1);
    }

    #[test]
    fn one_introspecting_issuer_may_take_every_opaque_token() {
        assert!(parse(&with_introspecting(&[("a.test", "")])).is_ok());
        assert!(
            parse(&with_introspecting(&[(
                "a.test",
                "token_prefixes = [\"a_\"]"
            )]))
            .is_ok()
        );
    }

    #[test]
    fn several_introspecting_issuers_each_need_token_prefixes() {
        let err = parse(&with_introspecting(&[("a.test", ""), ("b.test", "")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("issuers[1].introspection needs token_prefixes"),
            "{err}"
        );
        assert!(err.contains("https://a.test"), "{err}");
        let err = parse(&with_introspecting(&[
            ("a.test", "token_prefixes = [\"a_\"]"),
            ("b.test", ""),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("issuers[2].introspection needs token_prefixes"),
            "{err}"
        );
        assert!(err.contains("https://b.test"), "{err}");
        assert!(
            parse(&with_introspecting(&[
                ("a.test", "token_prefixes = [\"a_\"]"),
                ("b.test", "token_prefixes = [\"b_\", \"bb.\"]"),
            ]))
            .is_ok()
        );
    }

    #[test]
    fn overlapping_prefixes_of_two_issuers_are_an_error_naming_both() {
        for (a, b) in [("at_", "at_"), ("at_", "at_x"), ("at_x", "at")] {
            let err = parse(&with_introspecting(&[
                ("a.test", &format!("token_prefixes = [\"zz\", \"{a}\"]")),
                ("b.test", &format!("token_prefixes = [\"{b}\"]")),
            ]))
            .unwrap_err()
            .to_string();
            assert!(err.contains("overlap"), "{err}");
            assert!(err.contains("https://a.test"), "{err}");
            assert!(err.contains("https://b.test"), "{err}");
            assert!(err.contains(&format!("{a:?}")), "{err}");
        }
        // Overlaps within one issuer are harmless: the token is its own anyway.
        assert!(
            parse(&with_introspecting(&[
                ("a.test", "token_prefixes = [\"at_\", \"at_x\"]"),
                ("b.test", "token_prefixes = [\"bt_\"]"),
            ]))
            .is_ok()
        );
    }

    #[test]
    fn unusable_prefixes_and_limits_are_errors() {
        let cases = [
            ("token_prefixes = []", "must list at least one prefix"),
            (
                "token_prefixes = [\"\"]",
                "must not contain an empty prefix",
            ),
            ("token_prefixes = [\"a b\"]", "no bearer token can contain"),
            ("token_prefixes = [\"pck_live\"]", "API key prefix"),
            ("token_prefixes = [\"pc\"]", "API key prefix"),
            ("max_concurrent = 0", "max_concurrent must be at least 1"),
            ("max_concurrent = -1", "integer `-1`"),
            ("negative_cache = \"soon\"", "soon"),
        ];
        for (extra, expected) in cases {
            let err = parse(&with_introspecting(&[("a.test", extra)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{extra}: {err}");
        }
    }
}

/// Fuzz target of the configuration file (see [`crate::fuzz`]): the shipped
/// quickstart configuration, mutated. Oracle: no panic, no hang; a file that
/// loads keeps the token rules this server never relaxes (every issuer with
/// an audience and a bounded token lifetime).
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz::{Target, bytes, run};

    #[test]
    fn fuzz_config_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let quickstart =
            std::fs::read_to_string(root.join("examples/quickstart/portcullis.toml")).unwrap();
        let otel = std::fs::read_to_string(root.join("examples/otel/portcullis.toml")).unwrap();
        let dictionary = bytes([
            "[[issuers]]\n",
            "[[routes]]\n",
            "[revocation]\n",
            "[admin]\n",
            "[telemetry]\n",
            "[api_keys]\n",
            "[issuers.introspection]\n",
            "audiences = []\n",
            "max_token_lifetime = \"0s\"\n",
            "max_token_lifetime = \"100y\"\n",
            "leeway = \"1h\"\n",
            "algorithms = [\"HS256\"]\n",
            "algorithms = [\"none\"]\n",
            "issuer = \"\"\n",
            "mode = \"dry-run\"\n",
            "\"${PORTCULLIS_X}\"",
            "=",
            "\"",
            "\n",
            "[",
            "]",
            "#",
        ]);
        let base = root.join("examples/quickstart");
        let origin = base.join("portcullis.toml");
        assert!(
            Config::from_toml(&quickstart, &origin, &base).is_ok(),
            "the seed loads, so that the oracle is exercised"
        );
        run(
            Target {
                name: "config_file",
                seeds: bytes([quickstart, otel]),
                dictionary,
                cases: 3000,
            },
            |input| {
                let text = String::from_utf8_lossy(input);
                let origin = base.join("portcullis.toml");
                if let Ok(config) = Config::from_toml(&text, &origin, &base) {
                    for issuer in &config.issuers {
                        assert!(!issuer.audiences.is_empty(), "an issuer without audience");
                        assert!(
                            !issuer.max_token_lifetime.is_zero(),
                            "an issuer without a lifetime bound"
                        );
                    }
                }
            },
        );
    }
}
