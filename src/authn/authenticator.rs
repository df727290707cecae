//! The credential stage: from what a request presents to a verified,
//! unrevoked identity.
//!
//! ```text
//! presented credential ─▶ verify (token cache, JWT / API key / introspection / workload) ─▶ revocation ─▶ Authentication
//! ```
//! One [`Authenticator`] is built at start from the issuers, API keys and
//! workload settings, and shared by every engine a policy reload builds: keys,
//! the verified-token cache, the revocation store and the counters outlive a
//! policy change.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing::field::Empty;

use super::api_key::{ReloadingApiKeyStore, is_api_key};
use super::credential::{PresentedCredential, bearer_token};
use super::introspection::{self, token_digest};
use super::jwks::VerificationKey;
use super::jwt::{Issuer, IssuerSet};
use super::mint::SigningKey;
use super::status_list::StatusLists;
use super::token_cache::{CachedToken, TokenCache};
use super::workload::WorkloadIdentities;
use super::{MAX_TOKEN_BYTES, TokenError, VerifiedToken};
use crate::attributes::HttpRequest;
use crate::config::{ApiKeysConfig, Config};
use crate::revocation::RevocationStore;

/// The API key store and its settings.
#[derive(Debug)]
struct ApiKeys {
    store: Arc<ReloadingApiKeyStore>,
    settings: ApiKeysConfig,
}

/// How often credentials were verified, over the process's life.
#[derive(Debug, Default)]
pub struct CredentialCounters {
    /// Runs of the credential stage (one per `Check`, one per `IsAuthorized`,
    /// one per `BatchIsAuthorized` whatever its size, one per `explain`).
    pub credentials: AtomicU64,
    /// JWT signatures actually verified (verified-token cache misses).
    pub signatures: AtomicU64,
}

/// What the credential stage established; computed once per call and shared
/// by every decision of a batch.
#[derive(Debug, Clone)]
pub struct Authentication {
    /// The verified identity; also kept when it is revoked, for the audit line.
    /// Shared with the verified-token cache, not copied out of it.
    pub token: Option<Arc<VerifiedToken>>,
    /// Why the credential is refused, if it is.
    pub refusal: Option<TokenError>,
}

/// Verifies credentials: trusted issuers and their keys, API keys, workload
/// identities, the verified-token cache and the revocation check.
#[derive(Debug)]
pub struct Authenticator {
    issuers: IssuerSet,
    api_keys: Option<ApiKeys>,
    workload: Option<WorkloadIdentities>,
    tokens: TokenCache,
    /// Set once, when the store is opened (the offline commands have none).
    revocations: OnceLock<Arc<RevocationStore>>,
    counters: CredentialCounters,
    /// `[status_list]`: checks of tokens' `status.status_list` claims, run
    /// on every call (a status can change while the verified token is cached).
    pub(crate) status_lists: StatusLists,
    /// Stops the background work of [`Self::spawn_background`] when this
    /// authenticator is dropped (replaced by a configuration reload).
    background: CancellationToken,
}

impl Drop for Authenticator {
    fn drop(&mut self) {
        self.background.cancel();
    }
}

impl Authenticator {
    /// Loads the issuers (local keys; remote ones are fetched by
    /// [`Self::spawn_background`]), the API key file and the workload settings
    /// of `config`. Every problem is returned, one line each.
    pub fn from_config(config: &Config) -> Result<Authenticator, Vec<String>> {
        let mut problems = Vec::new();
        let mut issuers = Vec::new();
        let captured_claims = config.response_claims();
        for issuer in &config.issuers {
            match Issuer::from_config(issuer) {
                Ok(mut loaded) => {
                    loaded.captured_claims = captured_claims.clone();
                    issuers.push(loaded)
                }
                Err(e) => problems.push(format!("issuer {}: {e}", issuer.issuer)),
            }
        }
        let api_keys = match &config.api_keys {
            None => None,
            Some(settings) => match ReloadingApiKeyStore::load(&settings.file) {
                Ok(store) => Some(ApiKeys {
                    store: Arc::new(store),
                    settings: settings.clone(),
                }),
                Err(e) => {
                    problems.push(format!("api_keys: {e}"));
                    None
                }
            },
        };
        let status_lists = match StatusLists::from_config(config) {
            Ok(lists) => Some(lists),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        };
        let Some(status_lists) = status_lists.filter(|_| problems.is_empty()) else {
            return Err(problems);
        };
        Ok(Authenticator {
            issuers: IssuerSet::new(issuers),
            api_keys,
            workload: config
                .workload
                .as_ref()
                .map(WorkloadIdentities::from_config),
            tokens: TokenCache::new(&config.cache),
            revocations: OnceLock::new(),
            counters: CredentialCounters::default(),
            status_lists,
            background: CancellationToken::new(),
        })
    }

    /// Checks every authenticated credential against `store` from now on.
    /// Only the first store given is used (one per process).
    pub fn set_revocations(&self, store: Arc<RevocationStore>) {
        if self.revocations.set(store).is_err() {
            tracing::debug!("revocation store already set; keeping the first");
        }
    }

    /// The revocation store checked after authentication, if any.
    pub fn revocations(&self) -> Option<&Arc<RevocationStore>> {
        self.revocations.get()
    }

    /// Starts the background work: refreshing remote keys, watching the API
    /// key file. It stops when this authenticator is dropped, or when the
    /// handles are aborted.
    pub fn spawn_background(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let until_dropped = |work: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
            let dropped = self.background.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = work => {}
                    _ = dropped.cancelled() => {}
                }
            })
        };
        let mut tasks: Vec<_> = self
            .issuers
            .iter()
            .filter(|i| i.keys.is_remote())
            .map(|i| until_dropped(Box::pin(i.keys.clone().refresh_forever())))
            .collect();
        if let Some(keys) = &self.api_keys {
            let watch = keys.store.spawn_watch(keys.settings.reload_interval);
            tasks.push(until_dropped(Box::pin(async move {
                let abort = watch.abort_handle();
                // Dropping this future (cancellation) must stop the watch too.
                let _stop = AbortOnDrop(abort);
                let _ = watch.await;
            })));
        }
        tasks
    }

    /// The issuers still without keys (what a start or a reload waits for).
    pub fn issuers_without_keys(&self) -> Vec<String> {
        self.issuers
            .iter()
            .filter(|i| i.keys.is_remote() && !i.keys.is_ready())
            .map(|i| i.issuer.clone())
            .collect()
    }

    /// Continues the counters of `previous` (replaced by a configuration
    /// reload), so that they count over the process's life.
    pub fn continue_counters(&self, previous: &Authenticator) {
        let carry = |to: &AtomicU64, from: &AtomicU64| {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        carry(&self.counters.credentials, &previous.counters.credentials);
        carry(&self.counters.signatures, &previous.counters.signatures);
        carry(&self.tokens.hits, &previous.tokens.hits);
        carry(&self.tokens.misses, &previous.tokens.misses);
    }

    /// True when every issuer has keys: the engine may then serve.
    pub fn is_ready(&self) -> bool {
        self.issuers.keys_ready()
    }

    /// Makes every issuer trust `key` (for `portcullis test` only: it signs the
    /// test cases' tokens with a throw-away key; `serve` never calls this).
    pub fn trust_test_key(&self, key: &SigningKey) -> Result<(), String> {
        let jwk = &key.public_jwks().keys[0];
        let decoding = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let verification = VerificationKey::new(jsonwebtoken::Algorithm::ES256, decoding)?;
        for issuer in self.issuers.iter() {
            issuer.keys.add_key(key.kid(), verification.clone());
        }
        Ok(())
    }

    /// The header API keys may arrive in, if configured.
    pub fn api_key_header(&self) -> Option<&str> {
        self.api_keys.as_ref()?.settings.header.as_deref()
    }

    /// Whether the mTLS caller `caller` may assert a workload identity in a
    /// direct request (`[workload] asserting_callers`).
    pub fn may_assert_workload(&self, caller: Option<&str>) -> bool {
        self.workload.as_ref().is_some_and(|w| w.may_assert(caller))
    }

    /// The request's mTLS peer identity when it is in a trusted trust domain
    /// (only such an identity reaches the policies).
    pub fn trusted_peer<'a>(&self, http: &'a HttpRequest) -> Option<&'a str> {
        let peer = http.peer_principal.as_deref()?;
        self.workload.as_ref()?.identity(peer).map(|_| peer)
    }

    /// The trusted issuers (for key refresh and readiness).
    pub fn issuers(&self) -> &IssuerSet {
        &self.issuers
    }

    /// Fetches the keys of every remote issuer once (for the offline commands).
    pub async fn fetch_remote_keys_once(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for issuer in self.issuers.iter().filter(|i| i.keys.is_remote()) {
            if let Err(e) = issuer.keys.refresh().await {
                problems.push(format!("issuer {}: {e}", issuer.issuer));
            }
        }
        problems
    }

    /// The verified-token cache (statistics, tests).
    pub fn token_cache(&self) -> &TokenCache {
        &self.tokens
    }

    /// Credential and signature verification counts.
    pub fn counters(&self) -> &CredentialCounters {
        &self.counters
    }

    /// The credential of an HTTP request, in order: `Authorization: Bearer` (a
    /// JWT, an API key, or an opaque token to introspect), the API-key header,
    /// then (on routes that allow it, with no credential at all) the mTLS
    /// peer's workload identity.
    pub fn presented_credential<'a>(
        &self,
        http: &'a HttpRequest,
        allow_workload: bool,
    ) -> Result<PresentedCredential<'a>, TokenError> {
        let api_key_header = self.api_key_header().and_then(|name| http.header(name));
        match (bearer_token(http.header("authorization")), api_key_header) {
            (Ok(token), _) => Ok(PresentedCredential::Bearer(token)),
            (Err(TokenError::Missing), Some(key)) => Ok(PresentedCredential::ApiKey(key.trim())),
            (Err(TokenError::Missing), None) => Ok(match &http.peer_principal {
                Some(peer) if allow_workload => PresentedCredential::Workload(peer),
                _ => PresentedCredential::None,
            }),
            (Err(e), _) => Err(e),
        }
    }

    /// The whole stage, shared by `Check` and `IsAuthorized`: verifies the
    /// credential (through the verified-token cache), then checks revocation,
    /// right after authentication and before anything else uses the identity
    /// (and before any cached decision).
    pub async fn authenticate(
        &self,
        credential: PresentedCredential<'_>,
        now: i64,
    ) -> Authentication {
        let token = match self.verify(credential, now).await {
            Ok(token) => token,
            Err(refusal) => {
                return Authentication {
                    token: None,
                    refusal: Some(refusal),
                };
            }
        };
        let revoked = self
            .revocations()
            .is_some_and(|revocations| revocations.check(&token, now).is_err());
        let mut refusal = revoked.then_some(TokenError::Revoked);
        // The token's status list, on every call: not cached with the token.
        if refusal.is_none() && token.status.is_some() && self.status_lists.enabled() {
            refusal = self
                .status_lists
                .check(&self.issuers, &token, now)
                .instrument(tracing::debug_span!("status_list_check"))
                .await
                .err();
        }
        Authentication {
            token: Some(token),
            refusal,
        }
    }

    /// Verifies a credential, whichever way it arrived, without the revocation
    /// check (for `explain`, which reports what the decision already did).
    pub async fn verify(
        &self,
        credential: PresentedCredential<'_>,
        now: i64,
    ) -> Result<Arc<VerifiedToken>, TokenError> {
        self.counters.credentials.fetch_add(1, Ordering::Relaxed);
        let token = match credential {
            PresentedCredential::None => return Err(TokenError::Missing),
            PresentedCredential::Refused(e) => return Err(e),
            PresentedCredential::Workload(peer) => {
                // Only a trust domain the configuration names is an identity.
                return self
                    .workload
                    .as_ref()
                    .and_then(|workload| workload.identity(peer))
                    .map(Arc::new)
                    .ok_or(TokenError::Missing);
            }
            PresentedCredential::ApiKey(key) => return self.verify_api_key(key, now).map(Arc::new),
            PresentedCredential::Bearer(token) => token,
        };
        // Checked before any parsing (bearer_token did for Check; IsAuthorized
        // hands the value over directly).
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        if is_api_key(token) {
            return self.verify_api_key(token, now).map(Arc::new);
        }
        if is_jwt_shaped(token) {
            return self.verify_jwt(token, now).await;
        }
        // An opaque token names no issuer: its prefix picks the one issuer that
        // introspects it (or the only introspecting issuer takes them all).
        // Never several: one issuer's tokens are not shown to another. A token
        // no issuer claims is refused without a call, and the reason says
        // nothing about which issuers exist.
        let introspectors = self.issuers.introspectors();
        let Some(introspector) = introspection::select(&introspectors, token) else {
            return Err(TokenError::Malformed);
        };
        introspector.introspect(token, now).await.map(Arc::new)
    }

    /// JWT verification through the verified-token cache.
    async fn verify_jwt(&self, token: &str, now: i64) -> Result<Arc<VerifiedToken>, TokenError> {
        let digest = token_digest(token);
        let lookup = tracing::debug_span!("cache_lookup", cache = "token", hit = Empty);
        let hit = lookup.in_scope(|| {
            self.tokens
                .get(&digest, now, |iss| self.issuers.key_generation(iss))
        });
        lookup.record("hit", hit.is_some());
        // On the request's span (the caller of `run`), for its attributes.
        tracing::Span::current().record("token_cache_hit", hit.is_some());
        if let Some(hit) = hit {
            return Ok(hit);
        }
        self.counters.signatures.fetch_add(1, Ordering::Relaxed);
        let (verified, window) = self
            .issuers
            .verify_with_window(token, now)
            .instrument(tracing::debug_span!("verify_token", credential = "jwt"))
            .await?;
        let verified = Arc::new(verified);
        self.tokens.insert(
            digest,
            CachedToken {
                token: verified.clone(),
                key_generation: window.key_generation,
                valid_from: window.from,
                valid_until: window.until,
            },
        );
        Ok(verified)
    }

    fn verify_api_key(&self, key: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        let _span = tracing::debug_span!("verify_token", credential = "api_key").entered();
        let Some(api_keys) = &self.api_keys else {
            return Err(TokenError::UnknownApiKey);
        };
        if key.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let identity = api_keys.store.verify(key, now)?;
        // Short life applies to keys too: no expiry, or too long a one, is refused.
        let max = api_keys.settings.max_lifetime.as_secs() as i64;
        match identity.expires {
            Some(expires) if expires - identity.created <= max => {}
            _ => return Err(TokenError::LifetimeTooLong),
        }
        Ok(identity.into_verified(&api_keys.settings.principal_type))
    }
}

/// Three dot-separated parts: a JWS compact serialization.
fn is_jwt_shaped(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::config::RevocationConfig;
    use crate::revocation::backend::MemoryBackend;
    use crate::revocation::{Target, unix_now};
    use crate::test_setup::{NOW, request, setup};

    #[test]
    fn the_credential_is_chosen_in_order_and_a_malformed_header_is_refused() {
        let setup = setup("");
        let authn = Authenticator::from_config(&setup.config).unwrap();
        let token = setup.token("orders:read", NOW - 10, NOW + 600);
        let bearer = request("/orders/7", Some(&token));
        assert!(matches!(
            authn.presented_credential(&bearer, true),
            Ok(PresentedCredential::Bearer(t)) if t == token
        ));
        let mut basic = request("/orders/7", None);
        basic
            .headers
            .insert("authorization".into(), "Basic YWxpY2U6cHc=".into());
        assert_eq!(
            authn.presented_credential(&basic, true).err(),
            Some(TokenError::NotBearer)
        );
        // A peer identity is a credential only where the route allows it.
        let mut peer = request("/orders/7", None);
        peer.peer_principal = Some("spiffe://example.org/ns/shop/sa/web".into());
        assert!(matches!(
            authn.presented_credential(&peer, false),
            Ok(PresentedCredential::None)
        ));
        assert!(matches!(
            authn.presented_credential(&peer, true),
            Ok(PresentedCredential::Workload(_))
        ));
    }

    #[tokio::test]
    async fn a_token_is_verified_once_then_served_from_the_cache() {
        let setup = setup("");
        let authn = Authenticator::from_config(&setup.config).unwrap();
        let token = setup.token("orders:read", NOW - 10, NOW + 600);
        let http = request("/orders/7", Some(&token));
        for _ in 0..3 {
            let credential = authn.presented_credential(&http, false).unwrap();
            let done = authn.authenticate(credential, NOW).await;
            assert!(done.refusal.is_none(), "{:?}", done.refusal);
            assert_eq!(done.token.expect("verified").subject, "alice");
        }
        assert_eq!(authn.counters().credentials.load(Relaxed), 3);
        assert_eq!(authn.counters().signatures.load(Relaxed), 1, "cache hits");
        // Expiry is judged on every call, cached or not.
        let credential = authn.presented_credential(&http, false).unwrap();
        let late = authn.authenticate(credential, NOW + 3600).await;
        assert_eq!(late.refusal, Some(TokenError::Expired));
    }

    #[tokio::test]
    async fn a_revoked_token_is_refused_and_keeps_its_identity_for_the_audit_line() {
        let setup = setup("");
        let authn = Authenticator::from_config(&setup.config).unwrap();
        let store = RevocationStore::open_with(
            &RevocationConfig::default(),
            setup.config.token_lifetimes(),
            Arc::new(MemoryBackend::new()),
        )
        .await
        .unwrap();
        authn.set_revocations(store.clone());
        let now = unix_now();
        let token = setup.token("orders:read", now - 10, now + 600);
        let http = request("/orders/7", Some(&token));
        let before = authn
            .authenticate(authn.presented_credential(&http, false).unwrap(), now)
            .await;
        assert!(before.refusal.is_none());

        let jti = Target::Token {
            jti: "t1".into(),
            issuer: None,
        };
        store.revoke(jti, None, String::new()).await.unwrap();
        // Revocation is checked after the cache: a cached token is refused too.
        let after = authn
            .authenticate(authn.presented_credential(&http, false).unwrap(), now)
            .await;
        assert_eq!(after.refusal, Some(TokenError::Revoked));
        assert_eq!(after.token.expect("identity kept").subject, "alice");
        store.shutdown().await;
    }
}

/// Fuzz targets of JWT parsing and verification (see [`crate::fuzz`]): whole
/// tokens mutated, and headers or claims mutated then signed with the
/// issuer's real key, so that mutations get past the signature. Oracle: no
/// panic, no hang, and a token is accepted only if it is one of the valid
/// tokens (whole tokens), or its header and claims meet every rule of
/// `docs/reference/token-rules.md` as read independently here.
#[cfg(test)]
mod fuzz {
    use base64::Engine as _;
    use serde_json::{Value, json};

    use super::*;
    use crate::engine::Engine;
    use crate::fuzz::{Target, bytes, run};
    use crate::test_setup::{NOW, Setup, setup};

    const HEADER: &str = r#"{"alg":"ES256","typ":"JWT","kid":"k1"}"#;

    struct Verifier {
        setup: Setup,
        engine: Engine,
        runtime: tokio::runtime::Runtime,
    }

    fn verifier() -> Verifier {
        let setup = setup("");
        let engine = Engine::from_config(&setup.config).unwrap();
        let runtime = crate::fuzz::runtime();
        Verifier {
            setup,
            engine,
            runtime,
        }
    }

    impl Verifier {
        fn accepts(&self, token: &str) -> bool {
            let authentication = self.runtime.block_on(
                self.engine
                    .authenticator()
                    .authenticate(PresentedCredential::Bearer(token), NOW),
            );
            assert_eq!(
                authentication.token.is_some(),
                authentication.refusal.is_none()
            );
            authentication.refusal.is_none()
        }

        /// The token rules, said independently: a JSON object header naming
        /// ES256 and no critical extension; claims with our issuer and
        /// audience, a subject, and numeric `iat`/`exp` meeting the clock,
        /// the leeway and the issuer's maximum lifetime.
        fn may_accept(&self, header: &[u8], claims: &[u8]) -> bool {
            let issuer = &self.setup.config.issuers[0];
            let leeway = issuer.leeway.as_secs() as i64;
            let max_lifetime = issuer.max_token_lifetime.as_secs() as i64;
            let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(header) else {
                return false;
            };
            let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(claims) else {
                return false;
            };
            let number = |name: &str| claims.get(name).and_then(Value::as_f64);
            let audience_ok = match claims.get("aud") {
                Some(Value::String(aud)) => aud == "orders-api",
                Some(Value::Array(auds)) => auds.iter().any(|a| a == "orders-api"),
                _ => false,
            };
            let times_ok = match (number("exp"), number("iat")) {
                (Some(exp), Some(iat)) => {
                    exp > (NOW - leeway) as f64
                        && iat <= (NOW + leeway) as f64
                        && exp - iat <= (max_lifetime + leeway) as f64
                        && number("nbf").is_none_or(|nbf| nbf <= (NOW + leeway) as f64)
                }
                _ => false,
            };
            header.get("alg") == Some(&json!("ES256"))
                && !header.contains_key("crit")
                && claims.get("iss") == Some(&json!("https://idp.test"))
                && audience_ok
                && claims
                    .get("sub")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
                && times_ok
        }
    }

    fn claims_text(extra: Value) -> String {
        let mut claims = json!({
            "iss": "https://idp.test", "aud": "orders-api", "sub": "alice", "jti": "t9",
            "scope": "orders:read", "iat": NOW - 10, "exp": NOW + 600,
        });
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            claims.extend(extra.clone());
        }
        claims.to_string()
    }

    fn dictionary() -> Vec<Vec<u8>> {
        bytes([
            r#""alg":"none""#,
            r#""alg":"HS256""#,
            r#""alg":"RS256""#,
            r#""alg":"ES384""#,
            r#""alg":"EdDSA""#,
            r#""kid":"k2""#,
            r#""kid":"../k1""#,
            r#""crit":["exp"]"#,
            r#""jku":"https://evil.test/jwks""#,
            r#""typ":"at+jwt""#,
            r#""aud":["other","orders-api"]"#,
            r#""aud":"other""#,
            r#""iss":"https://evil.test""#,
            r#""exp":1e20"#,
            r#""exp":-1"#,
            r#""exp":"2000000000""#,
            r#""iat":1.5"#,
            r#""nbf":99999999999"#,
            r#""sub":"""#,
            r#""sub":null"#,
            ",",
            "\"",
            "{}",
            "1900000000",
            "1900000600",
            "1899999990",
            "null",
            "true",
        ])
    }

    #[test]
    fn fuzz_jwt_whole_tokens() {
        let verifier = verifier();
        let key = &verifier.setup.key;
        let valid = [
            key.sign_raw(HEADER.as_bytes(), claims_text(json!({})).as_bytes()),
            verifier.setup.token("orders:read", NOW - 10, NOW + 600),
        ];
        for token in &valid {
            assert!(verifier.accepts(token), "the seeds are valid");
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = b64.encode(claims_text(json!({})));
        let mut seeds = bytes(&valid);
        seeds.extend(bytes([
            format!("{}.{claims}.", b64.encode(r#"{"alg":"none"}"#)),
            format!(
                "{}.{claims}.c2ln",
                b64.encode(r#"{"alg":"HS256","kid":"k1"}"#)
            ),
            format!("{}.{claims}", b64.encode(HEADER)),
        ]));
        let mut words = dictionary();
        words.extend(bytes([".", "=", "-", "_", "+", "/", "eyJ", "e30"]));
        for part in valid.iter().flat_map(|t| t.split('.')) {
            words.push(part.as_bytes().to_vec());
        }
        run(
            Target {
                name: "jwt_whole_tokens",
                seeds,
                dictionary: words,
                cases: 6000,
            },
            |input| {
                let Ok(token) = std::str::from_utf8(input) else {
                    return;
                };
                if verifier.accepts(token) {
                    assert!(valid.iter().any(|v| v == token), "accepted a mutated token");
                }
            },
        );
    }

    #[test]
    fn fuzz_jwt_signed_claims() {
        let verifier = verifier();
        let seeds = bytes([
            claims_text(json!({})),
            claims_text(json!({ "aud": ["a", "orders-api"], "nbf": NOW - 5, "roles": ["admin"] })),
            claims_text(json!({ "exp": NOW - 120 })),
            claims_text(json!({ "iat": NOW - 10, "exp": NOW + 3590 })),
        ]);
        run(
            Target {
                name: "jwt_signed_claims",
                seeds,
                dictionary: dictionary(),
                cases: 6000,
            },
            |claims| {
                let token = verifier.setup.key.sign_raw(HEADER.as_bytes(), claims);
                if verifier.accepts(&token) {
                    assert!(
                        verifier.may_accept(HEADER.as_bytes(), claims),
                        "accepted claims the rules refuse: {}",
                        String::from_utf8_lossy(claims)
                    );
                }
            },
        );
    }

    #[test]
    fn fuzz_jwt_signed_headers() {
        let verifier = verifier();
        let claims = claims_text(json!({}));
        let seeds = bytes([
            HEADER,
            r#"{"alg":"ES256","kid":"k1"}"#,
            r#"{"kid":"k1","alg":"ES256","typ":"at+jwt","cty":"x"}"#,
            r#"{"alg":"ES256","kid":"k1","crit":["exp"],"exp":1}"#,
            r#"{"alg":"ES256","kid":"k1","alg":"none"}"#,
        ]);
        run(
            Target {
                name: "jwt_signed_headers",
                seeds,
                dictionary: dictionary(),
                cases: 6000,
            },
            |header| {
                let token = verifier.setup.key.sign_raw(header, claims.as_bytes());
                if verifier.accepts(&token) {
                    assert!(
                        verifier.may_accept(header, claims.as_bytes()),
                        "accepted a header the rules refuse: {}",
                        String::from_utf8_lossy(header)
                    );
                }
            },
        );
    }
}
