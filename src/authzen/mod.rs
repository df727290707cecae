//! The OpenID AuthZEN Authorization API 1.0 (`[authzen]`): a policy decision
//! point for enforcement points that speak AuthZEN, deciding with the same
//! engine, decision cache and audit log as `IsAuthorized`.
//!
//! - `POST /access/v1/evaluation`: one decision;
//! - `POST /access/v1/evaluations`: several, with defaults and the
//!   `execute_all`, `deny_on_first_deny` and `permit_on_first_permit`
//!   semantics;
//! - `GET /.well-known/authzen-configuration`: the metadata document.
//!
//! [`model`] turns request bodies into the engine's direct requests (the
//! subject is the principal, asserted by the authenticated caller) and
//! decisions into AuthZEN decision objects; [`http`] is the HTTP/1.1 and
//! HTTP/2 listener: caller authentication (the bearer token of `token_file`,
//! compared in constant time, or a client certificate chained to
//! `[authzen.tls] client_ca_file`), limits, errors and `X-Request-ID`.

pub mod http;
pub mod model;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::AuthzenConfig;
use crate::state::ServerState;
use crate::tls::ServerTls;

/// The `[authzen]` section, checked and loaded (token read, certificates
/// loaded), ready to serve: built before anything answers, so that a bad
/// section stops the start.
pub struct Authzen {
    settings: http::Settings,
    tls: Option<Arc<ServerTls>>,
}

impl std::fmt::Debug for Authzen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token (not even its digest).
        f.debug_struct("Authzen")
            .field("token", &self.settings.token.is_some())
            .field("tls", &self.tls)
            .field("base_url", &self.settings.base_url)
            .finish()
    }
}

impl Authzen {
    /// Reads `token_file` and loads the TLS files. Every problem is listed:
    /// no caller authentication method, an unreadable or empty token file, a
    /// `base_url` that is not an absolute http(s) URL without query or
    /// fragment, certificates that do not load.
    pub fn prepare(config: &AuthzenConfig) -> Result<Authzen, Vec<String>> {
        let mut problems = Vec::new();
        let client_ca = config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some());
        if config.token_file.is_none() && !client_ca {
            problems.push(
                "[authzen] needs a caller authentication method: token_file, or [authzen.tls] client_ca_file (or both)"
                    .to_owned(),
            );
        }
        let token = match &config.token_file {
            None => None,
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) if text.trim().is_empty() => {
                    problems.push(format!("[authzen] token_file {} is empty", path.display()));
                    None
                }
                Ok(text) => Some(crate::digest::sha256(text.trim().as_bytes())),
                Err(e) => {
                    problems.push(format!("[authzen] token_file {}: {e}", path.display()));
                    None
                }
            },
        };
        let base_url = match &config.base_url {
            None => None,
            Some(url) => match check_base_url(url) {
                Ok(url) => Some(url),
                Err(e) => {
                    problems.push(format!("[authzen] base_url {url:?}: {e}"));
                    None
                }
            },
        };
        let tls = match config.tls.as_ref().map(ServerTls::load_http).transpose() {
            Ok(tls) => tls,
            Err(e) => {
                problems.push(format!("cannot load [authzen.tls]: {e}"));
                None
            }
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Authzen {
            settings: http::Settings {
                token,
                client_certificates: tls
                    .as_ref()
                    .is_some_and(|t| t.requires_client_certificates()),
                https: tls.is_some(),
                base_url,
            },
            tls,
        })
    }

    /// Serves the API on `listener`, deciding with the engine installed in
    /// `state` (503 until there is one). Returns the tasks to track: the
    /// listener's and the certificate reload's; aborting them stops the API
    /// (open connections included).
    pub fn start(self, listener: TcpListener, state: Arc<ServerState>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let Some(tls) = &self.tls {
            tasks.push(tls.clone().watch("authzen"));
        }
        match listener.local_addr() {
            Ok(addr) => tracing::info!(
                %addr,
                tls = self.tls.is_some(),
                mtls = self.settings.client_certificates,
                "AuthZEN API listening (POST /access/v1/evaluation, /access/v1/evaluations)"
            ),
            Err(e) => tracing::warn!(error = %e, "AuthZEN API listening (address unknown)"),
        }
        tasks.push(http::serve(listener, self.tls, self.settings, state));
        tasks
    }
}

/// The problems of an `[authzen]` section (`portcullis validate`); empty when
/// it would start.
pub fn validate(config: &AuthzenConfig) -> Vec<String> {
    Authzen::prepare(config).err().unwrap_or_default()
}

/// `base_url` without a trailing `/`, when it is `http(s)://host[/path]`.
fn check_base_url(url: &str) -> Result<String, &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must start with https:// (or http://)")?;
    if rest.contains(['?', '#']) {
        return Err("must have no query or fragment");
    }
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || !host.bytes().all(http::is_host_byte) {
        return Err("must name a host");
    }
    if url
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("must not contain spaces or control characters");
    }
    Ok(url.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> AuthzenConfig {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn a_caller_authentication_method_is_required() {
        let problems = validate(&config("listen = \"127.0.0.1:0\""));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("token_file"), "{problems:?}");

        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "  s3cret\n").unwrap();
        let ok = config(&format!(
            "listen = \"127.0.0.1:0\"\ntoken_file = {:?}\nbase_url = \"https://pdp.example.com/\"",
            token.display().to_string()
        ));
        let prepared = Authzen::prepare(&ok).unwrap();
        assert_eq!(
            prepared.settings.base_url.as_deref(),
            Some("https://pdp.example.com")
        );
        assert!(!format!("{prepared:?}").contains("s3cret"));

        std::fs::write(&token, "\n").unwrap();
        let problems = validate(&ok);
        assert!(problems[0].contains("is empty"), "{problems:?}");
    }

    #[test]
    fn base_urls_are_checked() {
        assert_eq!(
            check_base_url("https://pdp.example.com/authz/").unwrap(),
            "https://pdp.example.com/authz"
        );
        assert!(check_base_url("pdp.example.com").is_err());
        assert!(check_base_url("https://pdp.example.com/?tenant=1").is_err());
        assert!(check_base_url("https:///x").is_err());
    }
}
