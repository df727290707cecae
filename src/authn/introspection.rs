//! RFC 7662 token introspection for opaque (non-JWT) tokens.
//!
//! The only network call on the request path, so its results are cached: an active
//! result until the smaller of the token's `exp` and `cache_max`, keyed by a
//! SHA-256 digest of the token (never the token). A failing or slow endpoint
//! denies: fail closed, with its own reason class.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest;
use serde_json::Value;

use super::jwt::{check_lifetime, numeric_date, roles, scopes, secs_i64, string_claim};
use super::keys::{FetchError, IssuerKeys, http_client, read_limited};
use super::{CredentialKind, TokenError, VerifiedToken};
use crate::config::IssuerConfig;

/// The largest introspection answer read (64 KiB): an RFC 7662 answer is a
/// small JSON object; a larger one is a failed call.
pub const MAX_INTROSPECTION_BYTES: usize = 64 * 1024;

/// Errors setting up introspection.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectionSetupError {
    /// The client secret could not be read.
    #[error("introspection client secret for {issuer}: {reason}")]
    Secret {
        /// The issuer.
        issuer: String,
        /// What went wrong (never the secret).
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] FetchError),
}

#[derive(Clone)]
struct Cached {
    token: VerifiedToken,
    valid_until: i64,
}

/// Introspects opaque tokens at one issuer's endpoint.
pub struct Introspector {
    client: reqwest::Client,
    endpoint: Option<String>,
    client_id: String,
    client_secret: String,
    cache: moka::sync::Cache<[u8; 32], Arc<Cached>>,
    cache_max: Duration,
    issuer: String,
    audiences: Vec<String>,
    leeway: i64,
    max_lifetime: Duration,
    roles_claim: String,
    principal_type: String,
    principal_claim: String,
    keys: Arc<IssuerKeys>,
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client secret stays out of debug output.
        f.debug_struct("Introspector")
            .field("issuer", &self.issuer)
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Introspector {
    /// Builds the introspector of `config` (which must have `[introspection]`);
    /// `keys` supplies the discovered endpoint when none is configured.
    pub fn from_config(
        config: &IssuerConfig,
        keys: Arc<IssuerKeys>,
    ) -> Result<Option<Introspector>, IntrospectionSetupError> {
        let Some(settings) = &config.introspection else {
            return Ok(None);
        };
        let secret_error = |reason: String| IntrospectionSetupError::Secret {
            issuer: config.issuer.clone(),
            reason,
        };
        let client_secret = match (&settings.client_secret_file, &settings.client_secret_env) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|e| secret_error(format!("cannot read {}: {e}", path.display())))?
                .trim()
                .to_owned(),
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| secret_error(format!("environment variable {var} is not set")))?,
            (None, None) => return Err(secret_error("no client secret configured".into())),
        };
        Ok(Some(Introspector {
            client: http_client(&config.issuer, &config.remote)?,
            endpoint: settings.endpoint.clone(),
            client_id: settings.client_id.clone(),
            client_secret,
            cache: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.cache_max)
                .build(),
            cache_max: settings.cache_max,
            issuer: config.issuer.clone(),
            audiences: config.audiences.clone(),
            leeway: secs_i64(config.leeway),
            max_lifetime: config.max_token_lifetime,
            roles_claim: config.roles_claim.clone(),
            principal_type: config.principal_type.clone(),
            principal_claim: config.principal_claim.clone(),
            keys,
        }))
    }

    /// Introspects `token` (served from the cache when fresh).
    #[tracing::instrument(level = "debug", name = "introspection", skip_all, fields(issuer = %self.issuer, cache_hit = tracing::field::Empty))]
    pub async fn introspect(&self, token: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        let digest = token_digest(token);
        if let Some(hit) = self.cache.get(&digest)
            && hit.valid_until > now
        {
            tracing::Span::current().record("cache_hit", true);
            return Ok(hit.token.clone());
        }
        tracing::Span::current().record("cache_hit", false);
        let response = self.call(token).await?;
        let verified = self.verify_response(&response, now)?;
        let bound = now.saturating_add(secs_i64(self.cache_max));
        let valid_until = match verified.expires_at {
            0 => bound,
            exp => exp.min(bound),
        };
        self.cache.insert(
            digest,
            Arc::new(Cached {
                token: verified.clone(),
                valid_until,
            }),
        );
        Ok(verified)
    }

    async fn call(&self, token: &str) -> Result<Value, TokenError> {
        let endpoint = self.endpoint.clone().or_else(|| {
            self.keys
                .endpoints()
                .and_then(|e| e.introspection_endpoint.clone())
        });
        let Some(endpoint) = endpoint else {
            tracing::warn!(issuer = %self.issuer, "no introspection endpoint known yet");
            return Err(TokenError::IntrospectionFailed);
        };
        let response = self
            .client
            .post(&endpoint)
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .header("accept", "application/json")
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(issuer = %self.issuer, error = %e.without_url(), "introspection call failed");
                TokenError::IntrospectionFailed
            })?;
        if !response.status().is_success() {
            tracing::warn!(issuer = %self.issuer, status = %response.status(), "introspection endpoint refused");
            return Err(TokenError::IntrospectionFailed);
        }
        let body = read_limited(response, MAX_INTROSPECTION_BYTES)
            .await
            .map_err(|e| {
                tracing::warn!(issuer = %self.issuer, error = %e, "introspection response not read");
                TokenError::IntrospectionFailed
            })?;
        serde_json::from_slice::<Value>(&body).map_err(|e| {
            tracing::warn!(issuer = %self.issuer, error = %e, "introspection response is not JSON");
            TokenError::IntrospectionFailed
        })
    }

    fn verify_response(&self, response: &Value, now: i64) -> Result<VerifiedToken, TokenError> {
        if response.get("active").and_then(Value::as_bool) != Some(true) {
            return Err(TokenError::InactiveToken);
        }
        if let Some(iss) = response.get("iss").and_then(Value::as_str)
            && iss != self.issuer
        {
            return Err(TokenError::UnknownIssuer);
        }
        let exp = numeric_date(response, "exp")?;
        let iat = numeric_date(response, "iat")?;
        if let Some(exp) = exp
            && exp <= now.saturating_sub(self.leeway)
        {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = numeric_date(response, "nbf")?
            && nbf > now.saturating_add(self.leeway)
        {
            return Err(TokenError::NotYetValid);
        }
        if let (Some(exp), Some(iat)) = (exp, iat) {
            check_lifetime(exp, iat, self.max_lifetime)?;
        }
        // `aud` is optional in RFC 7662; when present it must name us.
        match response.get("aud") {
            None | Some(Value::Null) => {}
            Some(Value::String(aud)) if self.audiences.contains(aud) => {}
            Some(Value::Array(auds))
                if auds
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.audiences.iter().any(|ours| ours == a)) => {}
            Some(_) => return Err(TokenError::WrongAudience),
        }
        let principal_id = string_claim(response, &self.principal_claim)
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::MissingClaim)?;
        Ok(VerifiedToken {
            issuer: self.issuer.clone(),
            subject: string_claim(response, "sub").unwrap_or_else(|| principal_id.clone()),
            principal_type: self.principal_type.clone(),
            principal_id,
            jti: string_claim(response, "jti"),
            issued_at: iat.unwrap_or_default(),
            expires_at: exp.unwrap_or_default(),
            scopes: scopes(response),
            roles: roles(response, &self.roles_claim),
            client_id: string_claim(response, "client_id")
                .or_else(|| string_claim(response, "azp")),
            key_id: String::new(),
            api_key_id: None,
            credential: CredentialKind::Introspected,
        })
    }
}

/// SHA-256 of a credential: the only form in which one is kept.
pub fn token_digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}
