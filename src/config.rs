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
    /// HTTP routes mapped to Cedar actions.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// What an allow response adds to the upstream request.
    #[serde(default)]
    pub response: ResponseConfig,
    /// The decision log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The revocation set: local journal, optional Redis.
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// The admin API; absent means the admin API is off.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
}

/// A secret string (admin token, Redis URL with a password): never printed by
/// `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

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
    /// Without Redis at start: wait for it, or serve on the local journal.
    #[serde(default)]
    pub startup: StartupMode,
    /// Prefix of the Redis key and channel, so deployments can share one Redis.
    #[serde(default = "default_redis_prefix")]
    pub redis_prefix: String,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            redis_url: None,
            startup: StartupMode::default(),
            redis_prefix: default_redis_prefix(),
        }
    }
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
        Ok(Secret(token))
    }
}

/// `[server]`: the Envoy-facing listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the gRPC listener serving ext_authz, health and reflection.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight checks and open connections to finish.
    #[serde(default = "default_shutdown_grace", deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
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
    pub jwks_file: PathBuf,
    /// Longest accepted `exp - iat`.
    #[serde(default = "default_max_lifetime", deserialize_with = "de_duration")]
    pub max_token_lifetime: Duration,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway", deserialize_with = "de_duration")]
    pub leeway: Duration,
    /// Claim holding the caller's roles (dotted path allowed, e.g. `realm_access.roles`).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
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
}

/// Parses a humantime duration string such as `"30s"`, `"5m"` or `"1h 30m"`.
fn de_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "expected a duration such as \"30s\" or \"1h\", found {text:?}: {e}"
        ))
    })
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
            message: e.to_string(),
        })?;
        config.resolve_paths(base_dir);
        config.check().map_err(|message| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.policies.dir);
        for issuer in &mut self.issuers {
            resolve(&mut issuer.jwks_file);
        }
        if let Some(file) = &mut self.audit.file {
            resolve(file);
        }
        resolve(&mut self.revocation.data_dir);
        if let Some(file) = self.admin.as_mut().and_then(|a| a.token_file.as_mut()) {
            resolve(file);
        }
    }

    /// The longest token lifetime and leeway over all issuers: how long a
    /// revoked credential could otherwise stay valid.
    pub fn token_lifetimes(&self) -> crate::revocation::Lifetimes {
        crate::revocation::Lifetimes {
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
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.application.name.is_empty() {
            return Err("application.name must not be empty".into());
        }
        if self.issuers.is_empty() {
            return Err("at least one [[issuers]] entry is required".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, issuer) in self.issuers.iter().enumerate() {
            if issuer.issuer.is_empty() {
                return Err(format!("issuers[{i}].issuer must not be empty"));
            }
            if !seen.insert(issuer.issuer.as_str()) {
                return Err(format!(
                    "issuers[{i}].issuer {:?} is configured twice",
                    issuer.issuer
                ));
            }
            if issuer.audiences.is_empty() || issuer.audiences.iter().any(String::is_empty) {
                return Err(format!(
                    "issuers[{i}].audiences must list at least one non-empty audience"
                ));
            }
            if issuer.max_token_lifetime.is_zero() {
                return Err(format!(
                    "issuers[{i}].max_token_lifetime must be greater than zero"
                ));
            }
            if issuer.roles_claim.is_empty() {
                return Err(format!("issuers[{i}].roles_claim must not be empty"));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
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
        }
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
        let prefix = &self.revocation.redis_prefix;
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace()) {
            return Err(format!(
                "revocation.redis_prefix must be non-empty without whitespace, found {prefix:?}"
            ));
        }
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
        assert_eq!(issuer.jwks_file, PathBuf::from("/etc/portcullis/jwks.json"));
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
}
