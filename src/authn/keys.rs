//! Where an issuer's keys come from: a local JWKS file, or a remote JWKS (given
//! directly or found through OpenID Connect discovery) refreshed in the background.
//!
//! The request path only reads the current [`KeySet`] snapshot. The one exception
//! is a token whose `kid` is unknown: it triggers at most one refresh at a time per
//! issuer (single flight), no more often than `refresh_min`, and every request
//! waiting for it shares its result.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use serde::Deserialize;

use super::jwks::{JwksError, KeySet, VerificationKey};
use crate::config::{IssuerConfig, RemoteKeysConfig};

/// Errors fetching remote keys or discovery documents.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The HTTP client could not be built (bad CA file).
    #[error("HTTP client for {issuer}: {reason}")]
    Client {
        /// The issuer.
        issuer: String,
        /// What went wrong.
        reason: String,
    },
    /// The request failed, timed out, or answered a non-2xx status.
    #[error("fetching {url}: {reason}")]
    Http {
        /// The URL fetched.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The discovery document lacks the needed field or names another issuer.
    #[error("discovery document {url}: {reason}")]
    Discovery {
        /// The discovery URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The JWKS is unusable.
    #[error("JWKS {url}: {source}")]
    Jwks {
        /// The JWKS URL.
        url: String,
        /// Why the key set was refused.
        source: JwksError,
    },
}

/// The largest JWKS or OIDC discovery document read (1 MiB): real ones are a
/// few KiB, and an identity provider (or whoever answers in its name) must not
/// be able to make us buffer without bound.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Why a response body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body (or its announced `Content-Length`) is longer than the limit.
    #[error("the response body is larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The connection failed or timed out while reading.
    #[error("reading the response body: {0}")]
    Read(String),
}

/// Reads `response`'s body, at most `limit` bytes. It is read chunk by chunk
/// and refused as soon as it passes the limit, whatever `Content-Length`
/// says (a larger announced length is refused before reading).
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    let too_large = BodyError::TooLarge { limit };
    if response
        .content_length()
        .is_some_and(|announced| announced > limit as u64)
    {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BodyError::Read(e.without_url().to_string()))?
    {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Counters an operator (and the metrics endpoint) reads.
#[derive(Debug, Default)]
pub struct KeyStats {
    /// Successful fetches.
    pub refreshes: AtomicU64,
    /// Failed fetches.
    pub failures: AtomicU64,
    /// Fetches triggered by an unknown `kid`.
    pub unknown_kid_refreshes: AtomicU64,
}

/// Where the endpoints of a remote issuer are.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// The JWKS URL.
    pub jwks_uri: Option<String>,
    /// The RFC 7662 introspection endpoint, when discovery names one.
    pub introspection_endpoint: Option<String>,
}

#[derive(Debug)]
struct Remote {
    client: reqwest::Client,
    settings: RemoteKeysConfig,
    configured_jwks_uri: Option<String>,
    discovery: bool,
    endpoints: ArcSwapOption<Endpoints>,
    /// Serialises unknown-kid refreshes; holds when the last one started.
    refresh_gate: tokio::sync::Mutex<Option<Instant>>,
    /// Unix seconds of the last successful fetch.
    last_success: AtomicU64,
}

/// The keys of one issuer and how they are kept fresh.
#[derive(Debug)]
pub struct IssuerKeys {
    issuer: String,
    current: ArcSwapOption<KeySet>,
    generation: AtomicU64,
    remote: Option<Remote>,
    /// Fetch counters.
    pub stats: KeyStats,
}

#[derive(Deserialize)]
struct DiscoveryDocument {
    issuer: Option<String>,
    jwks_uri: Option<String>,
    introspection_endpoint: Option<String>,
}

/// The endpoints an OpenID Connect discovery document of `issuer` names, or
/// why it is refused: it must be JSON, name this very issuer (Discovery 1.0
/// section 4.3) and an `https` `jwks_uri`.
fn parse_discovery(body: &[u8], issuer: &str) -> Result<Endpoints, String> {
    let doc: DiscoveryDocument = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if doc.issuer.as_deref() != Some(issuer) {
        return Err(format!(
            "issuer {:?} does not match the configured {issuer:?}",
            doc.issuer
        ));
    }
    let jwks_uri = doc
        .jwks_uri
        .filter(|u| u.starts_with("https://"))
        .ok_or_else(|| "no https jwks_uri".to_owned())?;
    Ok(Endpoints {
        jwks_uri: Some(jwks_uri),
        introspection_endpoint: doc.introspection_endpoint,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Builds the HTTP client for an issuer: rustls, connect and total timeouts, the
/// system roots plus an optional private CA.
pub fn http_client(
    issuer: &str,
    settings: &RemoteKeysConfig,
) -> Result<reqwest::Client, FetchError> {
    let client_error = |reason: String| FetchError::Client {
        issuer: issuer.to_owned(),
        reason,
    };
    let mut builder = reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.timeout)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca_file) = &settings.ca_file {
        let pem = std::fs::read(ca_file)
            .map_err(|e| client_error(format!("cannot read ca_file {}: {e}", ca_file.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| client_error(format!("ca_file {}: {e}", ca_file.display())))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().map_err(|e| client_error(e.to_string()))
}

impl IssuerKeys {
    /// Keys for `config`: a local file is read now (an error is returned); remote
    /// keys start empty until [`IssuerKeys::refresh`] succeeds.
    pub fn from_config(config: &IssuerConfig) -> Result<IssuerKeys, KeysError> {
        let remote = if config.jwks_uri.is_some() || config.discovery {
            Some(Remote {
                client: http_client(&config.issuer, &config.remote)?,
                settings: config.remote.clone(),
                configured_jwks_uri: config.jwks_uri.clone(),
                discovery: config.discovery,
                endpoints: ArcSwapOption::empty(),
                refresh_gate: tokio::sync::Mutex::new(None),
                last_success: AtomicU64::new(0),
            })
        } else {
            None
        };
        let current = match &config.jwks_file {
            Some(path) => Some(Arc::new(KeySet::from_file(path)?)),
            None => None,
        };
        Ok(IssuerKeys {
            issuer: config.issuer.clone(),
            current: ArcSwapOption::new(current),
            generation: AtomicU64::new(0),
            remote,
            stats: KeyStats::default(),
        })
    }

    /// The current key set, if any. Remote keys older than `max_staleness` (every
    /// refresh failing) are no longer served: tokens then fail closed.
    pub fn get(&self) -> Option<Arc<KeySet>> {
        if let Some(remote) = &self.remote {
            let last = remote.last_success.load(Ordering::Acquire);
            if last == 0
                || unix_now().saturating_sub(last) > remote.settings.max_staleness.as_secs()
            {
                return None;
            }
        }
        self.current.load_full()
    }

    /// Adds a key to the current set (for `portcullis test`, whose throw-away
    /// key signs the test tokens; `serve` never calls this). Marks remote keys
    /// fresh so that an offline test run works.
    pub fn add_key(&self, kid: &str, key: VerificationKey) {
        let current = self.current.load_full().unwrap_or_default();
        self.current
            .store(Some(Arc::new(current.with_key(kid, key))));
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(remote) = &self.remote {
            remote.last_success.store(unix_now(), Ordering::Release);
        }
    }

    /// True once keys are available (local file, or a first successful fetch).
    pub fn is_ready(&self) -> bool {
        self.get().is_some()
    }

    /// True for keys fetched over HTTPS.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Changes each time a new key set is installed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The discovered (or configured) endpoints, after the first fetch.
    pub fn endpoints(&self) -> Option<Arc<Endpoints>> {
        self.remote.as_ref().and_then(|r| r.endpoints.load_full())
    }

    /// Fetches the remote JWKS now (after discovery if configured) and installs
    /// it. Returns how long to wait before the next refresh: the response's
    /// `Cache-Control: max-age` bounded by `refresh_min`/`refresh_max`.
    #[tracing::instrument(level = "debug", name = "jwks_fetch", skip_all, fields(issuer = %self.issuer, ok = tracing::field::Empty))]
    pub async fn refresh(&self) -> Result<Duration, FetchError> {
        let Some(remote) = &self.remote else {
            return Ok(Duration::MAX);
        };
        let result = self.fetch(remote).await;
        tracing::Span::current().record("ok", result.is_ok());
        match &result {
            Ok(_) => {
                self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(issuer = %self.issuer, error = %e, "key refresh failed; keeping the last good key set");
            }
        }
        result
    }

    async fn fetch(&self, remote: &Remote) -> Result<Duration, FetchError> {
        let endpoints = match remote.endpoints.load_full() {
            Some(endpoints) => endpoints,
            None => {
                let endpoints = Arc::new(self.resolve_endpoints(remote).await?);
                remote.endpoints.store(Some(endpoints.clone()));
                endpoints
            }
        };
        let url = endpoints
            .jwks_uri
            .clone()
            .ok_or_else(|| FetchError::Discovery {
                url: self.discovery_url(),
                reason: "no jwks_uri".into(),
            })?;
        let http_error = |reason: String| FetchError::Http {
            url: url.clone(),
            reason,
        };
        let response = get_ok(
            &remote.client,
            &url,
            "application/jwk-set+json, application/json",
        )
        .await?;
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_max_age);
        let body = read_limited(response, MAX_DOCUMENT_BYTES)
            .await
            .map_err(|e| http_error(e.to_string()))?;
        let body =
            std::str::from_utf8(&body).map_err(|_| http_error("the body is not UTF-8".into()))?;
        let keys = KeySet::from_json_lenient(body).map_err(|source| FetchError::Jwks {
            url: url.clone(),
            source,
        })?;
        tracing::info!(issuer = %self.issuer, keys = keys.len(), "key set refreshed");
        self.current.store(Some(Arc::new(keys)));
        self.generation.fetch_add(1, Ordering::AcqRel);
        remote.last_success.store(unix_now(), Ordering::Release);
        let settings = &remote.settings;
        Ok(max_age
            .unwrap_or(settings.refresh)
            .clamp(settings.refresh_min, settings.refresh_max))
    }

    fn discovery_url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        )
    }

    async fn resolve_endpoints(&self, remote: &Remote) -> Result<Endpoints, FetchError> {
        if !remote.discovery {
            return Ok(Endpoints {
                jwks_uri: remote.configured_jwks_uri.clone(),
                introspection_endpoint: None,
            });
        }
        let url = self.discovery_url();
        let discovery_error = |reason: String| FetchError::Discovery {
            url: url.clone(),
            reason,
        };
        let response = get_ok(&remote.client, &url, "application/json").await?;
        let body = read_limited(response, MAX_DOCUMENT_BYTES)
            .await
            .map_err(|e| discovery_error(e.to_string()))?;
        parse_discovery(&body, &self.issuer).map_err(discovery_error)
    }

    /// Called when a token names a `kid` not in `seen_generation`'s key set.
    /// Refreshes at most once per `refresh_min` per issuer; concurrent callers
    /// wait for the one refresh in flight instead of starting their own.
    pub async fn refresh_for_unknown_kid(&self, seen_generation: u64) {
        let Some(remote) = &self.remote else {
            return;
        };
        let mut last_started = remote.refresh_gate.lock().await;
        if self.generation() != seen_generation {
            return; // Someone refreshed while we waited: look again.
        }
        if last_started.is_some_and(|t| t.elapsed() < remote.settings.refresh_min) {
            return;
        }
        *last_started = Some(Instant::now());
        self.stats
            .unknown_kid_refreshes
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.refresh().await;
    }

    /// Refreshes forever on the period the server asks for; after a failure,
    /// retries with capped exponential backoff and jitter (from 1 s to
    /// `refresh_min`, `backon`), so that instances do not retry in lock step.
    pub async fn refresh_forever(self: Arc<Self>) {
        let Some(remote) = &self.remote else {
            return;
        };
        let cap = remote.settings.refresh_min.max(Duration::from_secs(1));
        let retries = || {
            backon::BackoffBuilder::build(
                backon::ExponentialBuilder::new()
                    .with_min_delay(Duration::from_secs(1))
                    .with_max_delay(cap)
                    .with_jitter()
                    .without_max_times(),
            )
        };
        let mut backoff = retries();
        loop {
            let wait = match self.refresh().await {
                Ok(period) => {
                    backoff = retries();
                    period
                }
                // Jitter adds up to the delay again, never past the cap.
                Err(_) => backoff.next().unwrap_or(cap).min(cap),
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Errors building an issuer's key source.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The local JWKS file is unusable.
    #[error(transparent)]
    Jwks(#[from] JwksError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// GET `url`; a transport error or a non-2xx status is a [`FetchError::Http`].
async fn get_ok(
    client: &reqwest::Client,
    url: &str,
    accept: &str,
) -> Result<reqwest::Response, FetchError> {
    let http_error = |reason: String| FetchError::Http {
        url: url.to_owned(),
        reason,
    };
    let response = client
        .get(url)
        .header("accept", accept)
        .send()
        .await
        .map_err(|e| http_error(e.without_url().to_string()))?;
    if !response.status().is_success() {
        return Err(http_error(format!("status {}", response.status())));
    }
    Ok(response)
}

/// `max-age=N` of a `Cache-Control` header; `no-store`/`no-cache` mean 0.
fn parse_max_age(value: &str) -> Option<Duration> {
    let mut max_age = None;
    for directive in value.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(seconds) = lower.strip_prefix("max-age=") {
            max_age = seconds
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    max_age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_parsed() {
        assert_eq!(
            parse_max_age("public, max-age=600"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(parse_max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(parse_max_age("public"), None);
        assert_eq!(parse_max_age("max-age=abc"), None);
    }
}

/// Fuzz target of the discovery document (see [`crate::fuzz`]). Oracle: no
/// panic, and endpoints only from a document naming this issuer and an
/// `https` `jwks_uri`.
#[cfg(test)]
mod fuzz {
    use serde_json::Value;

    use super::*;
    use crate::fuzz::{Target, bytes, run};

    #[test]
    fn fuzz_discovery_document() {
        let issuer = "https://idp.test";
        let seeds = bytes([
            r#"{"issuer":"https://idp.test","jwks_uri":"https://idp.test/jwks","introspection_endpoint":"https://idp.test/introspect"}"#,
            r#"{"issuer":"https://idp.test/","jwks_uri":"http://idp.test/jwks"}"#,
            r#"{"issuer":"https://idp.test","jwks_uri":"https://idp.test/jwks","issuer":"https://evil.test"}"#,
        ]);
        let dictionary = bytes([
            r#""issuer":"https://idp.test""#,
            r#""jwks_uri":"https://x""#,
            "https://",
            "http://",
            "null",
            "[]",
            ",",
            "\"",
            "\\u0000",
            "/",
        ]);
        run(
            Target {
                name: "discovery_document",
                seeds,
                dictionary,
                cases: 6000,
            },
            |body| {
                if let Ok(endpoints) = parse_discovery(body, issuer) {
                    // Lossy: serde skips unknown members without checking
                    // their UTF-8, and so may this document.
                    let doc: Value =
                        serde_json::from_str(&String::from_utf8_lossy(body)).unwrap_or_default();
                    assert_eq!(doc.get("issuer").and_then(Value::as_str), Some(issuer));
                    assert!(
                        endpoints
                            .jwks_uri
                            .is_some_and(|u| u.starts_with("https://"))
                    );
                }
            },
        );
    }
}
