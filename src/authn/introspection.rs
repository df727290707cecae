//! RFC 7662 token introspection for opaque (non-JWT) tokens.
//!
//! The only network call on the request path, so it is guarded on every side:
//!
//! - **Selection.** An opaque token goes to one issuer only: the one whose
//!   `token_prefixes` it starts with, or the single introspecting issuer when
//!   it declares none ([`select`]). A token no issuer claims is refused
//!   without any call; one issuer's tokens are never shown to another.
//! - **Caches.** An active result is reused until the smaller of the token's
//!   `exp` and `cache_max`; a lasting refusal (`active: false`, or an answer
//!   failing our checks) for `negative_cache`. Both are keyed by a SHA-256
//!   digest of the token (never the token). Failed calls are never cached.
//! - **Single flight.** Concurrent checks of the same token at the same issuer
//!   share one call; if it fails, they all fail (closed).
//! - **Cap.** At most `max_concurrent` calls per issuer are in flight; a call
//!   waits for a turn within the issuer's HTTP `timeout`, which bounds the
//!   wait and the call together, then fails closed.
//!
//! A failing or slow endpoint denies: fail closed, with its own reason class.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{OnceCell, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::claims::{binding, check_lifetime, numeric_date, roles, scopes, secs_i64, string_claim};
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

/// Most entries of each introspection cache (active and refused results).
const CACHE_CAPACITY: u64 = 100_000;

#[derive(Clone)]
struct Cached {
    token: VerifiedToken,
    valid_until: i64,
}

/// What one introspection concluded about one token.
type Outcome = Result<VerifiedToken, TokenError>;

/// The lookups in flight, by token digest: concurrent checks of one token
/// share the first one's call instead of making their own.
#[derive(Default)]
struct Flights {
    map: Mutex<HashMap<[u8; 32], Flight>>,
}

/// One lookup in flight and how many checks are waiting on it.
struct Flight {
    outcome: Arc<OnceCell<Outcome>>,
    waiting: usize,
}

/// A check's place on a [`Flight`]; the flight is forgotten when its last
/// check leaves (done, failed or cancelled), so a failed outcome reaches only
/// the checks that were waiting for it (and any that joined in the instant
/// before they left), never a later one. The map holds one entry per token
/// being checked right now: it is bounded by the requests in progress.
struct Seat<'a> {
    flights: &'a Flights,
    digest: [u8; 32],
    outcome: Arc<OnceCell<Outcome>>,
}

impl Flights {
    /// Joins the flight of `digest`, starting one if there is none.
    fn join(&self, digest: [u8; 32]) -> Seat<'_> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let flight = map.entry(digest).or_insert_with(|| Flight {
            outcome: Arc::default(),
            waiting: 0,
        });
        flight.waiting += 1;
        Seat {
            flights: self,
            digest,
            outcome: flight.outcome.clone(),
        }
    }

    /// Lookups in flight (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        let mut map = self
            .flights
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // While a seat exists its flight stays in the map, so this is ours.
        if let Some(flight) = map.get_mut(&self.digest) {
            flight.waiting = flight.waiting.saturating_sub(1);
            if flight.waiting == 0 {
                map.remove(&self.digest);
            }
        }
    }
}

/// A permit of `permits`, waited for until `deadline`: `None` when none came
/// in time (or the semaphore is closed).
async fn permit_until(permits: &Semaphore, deadline: Instant) -> Option<SemaphorePermit<'_>> {
    tokio::time::timeout_at(deadline, permits.acquire())
        .await
        .ok()
        .and_then(Result::ok)
}

/// True for a refusal that a later answer about the same token cannot turn
/// into an acceptance while a negative cache entry lives: every refusal of an
/// answer except `not_yet_valid`, which time alone cures.
fn is_lasting_refusal(error: TokenError) -> bool {
    !matches!(
        error,
        TokenError::NotYetValid | TokenError::IntrospectionFailed
    )
}

/// The index of the introspector that owns an opaque `token`, given each
/// introspector's token prefixes: the one with the longest prefix the token
/// starts with (configuration forbids overlaps between issuers, so there is
/// at most one), else the only introspector if it has no prefixes. `None`:
/// no issuer introspects this token.
pub fn select_index(prefixes: &[&[String]], token: &str) -> Option<usize> {
    let matched = prefixes
        .iter()
        .enumerate()
        .filter_map(|(index, own)| {
            own.iter()
                .filter(|prefix| !prefix.is_empty() && token.starts_with(prefix.as_str()))
                .map(String::len)
                .max()
                .map(|len| (len, index))
        })
        .max_by_key(|(len, _)| *len);
    match (matched, prefixes) {
        (Some((_, index)), _) => Some(index),
        (None, [[]]) => Some(0),
        (None, _) => None,
    }
}

/// The introspector of `introspectors` that owns an opaque `token` (see
/// [`select_index`]); `None` when none does, and then no call is made.
pub fn select<'a>(
    introspectors: &[&'a Arc<Introspector>],
    token: &str,
) -> Option<&'a Arc<Introspector>> {
    let prefixes: Vec<&[String]> = introspectors
        .iter()
        .map(|i| i.token_prefixes.as_slice())
        .collect();
    select_index(&prefixes, token).and_then(|index| introspectors.get(index).copied())
}

/// Introspects opaque tokens at one issuer's endpoint.
pub struct Introspector {
    client: reqwest::Client,
    endpoint: Option<String>,
    client_id: String,
    client_secret: String,
    cache: moka::sync::Cache<[u8; 32], Arc<Cached>>,
    cache_max: Duration,
    refused: Option<moka::sync::Cache<[u8; 32], TokenError>>,
    flights: Flights,
    permits: Semaphore,
    timeout: Duration,
    token_prefixes: Vec<String>,
    issuer: String,
    rules: ResponseRules,
    keys: Arc<IssuerKeys>,
}

/// What an introspection answer is checked against and mapped with: one
/// issuer's token rules. Shared by the introspector and `portcullis test`'s
/// introspected-token cases, so both judge an answer the same way.
#[derive(Debug, Clone)]
pub(crate) struct ResponseRules {
    issuer: String,
    audiences: Vec<String>,
    leeway: i64,
    max_lifetime: Duration,
    roles_claim: String,
    principal_type: String,
    principal_claim: String,
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client secret stays out of debug output.
        f.debug_struct("Introspector")
            .field("issuer", &self.issuer)
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field("token_prefixes", &self.token_prefixes)
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
                .max_capacity(CACHE_CAPACITY)
                .time_to_live(settings.cache_max)
                .build(),
            cache_max: settings.cache_max,
            refused: (!settings.negative_cache.is_zero()).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(CACHE_CAPACITY)
                    .time_to_live(settings.negative_cache)
                    .build()
            }),
            flights: Flights::default(),
            permits: Semaphore::new(
                usize::try_from(settings.max_concurrent)
                    .unwrap_or(usize::MAX)
                    .clamp(1, Semaphore::MAX_PERMITS),
            ),
            timeout: config.remote.timeout,
            token_prefixes: settings.prefixes().to_vec(),
            issuer: config.issuer.clone(),
            rules: ResponseRules::from_config(config),
            keys,
        }))
    }

    /// Introspects `token`: from the caches when they answer, else by one
    /// call shared with every concurrent check of the same token.
    #[tracing::instrument(level = "debug", name = "introspection", skip_all, fields(issuer = %self.issuer, cache_hit = tracing::field::Empty))]
    pub async fn introspect(&self, token: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        let digest = token_digest(token);
        if let Some(cached) = self.cached(&digest, now) {
            tracing::Span::current().record("cache_hit", true);
            return cached;
        }
        tracing::Span::current().record("cache_hit", false);
        let seat = self.flights.join(digest);
        seat.outcome
            .get_or_init(|| self.lookup(token, digest, now))
            .await
            .clone()
    }

    /// A cached active result still valid at `now`, or a cached refusal.
    fn cached(&self, digest: &[u8; 32], now: i64) -> Option<Outcome> {
        if let Some(hit) = self.cache.get(digest)
            && hit.valid_until > now
        {
            return Some(Ok(hit.token.clone()));
        }
        self.refused.as_ref()?.get(digest).map(Err)
    }

    /// The lookup a flight runs: the caches once more (a flight that just
    /// landed may have filled them), then the call, whose answer is cached.
    async fn lookup(&self, token: &str, digest: [u8; 32], now: i64) -> Outcome {
        if let Some(cached) = self.cached(&digest, now) {
            return cached;
        }
        let response = self.call(token).await?;
        match self.verify_response(&response, now) {
            Ok(verified) => {
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
            Err(refusal) => {
                if let Some(refused) = &self.refused
                    && is_lasting_refusal(refusal)
                {
                    refused.insert(digest, refusal);
                }
                Err(refusal)
            }
        }
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
        // The issuer's timeout bounds the wait for a turn and the call together.
        let deadline = Instant::now() + self.timeout;
        let Some(_permit) = permit_until(&self.permits, deadline).await else {
            tracing::warn!(issuer = %self.issuer, "no introspection call slot within the timeout (max_concurrent reached)");
            return Err(TokenError::IntrospectionFailed);
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            tracing::warn!(issuer = %self.issuer, "introspection timeout spent waiting for a call slot");
            return Err(TokenError::IntrospectionFailed);
        }
        let response = self
            .client
            .post(&endpoint)
            .timeout(remaining)
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
        self.rules.verify(response, now)
    }
}

impl ResponseRules {
    /// The rules of `config`'s issuer.
    pub(crate) fn from_config(config: &IssuerConfig) -> ResponseRules {
        ResponseRules {
            issuer: config.issuer.clone(),
            audiences: config.audiences.clone(),
            leeway: secs_i64(config.leeway),
            max_lifetime: config.max_token_lifetime,
            roles_claim: config.roles_claim.clone(),
            principal_type: config.principal_type.clone(),
            principal_claim: config.principal_claim.clone(),
        }
    }

    /// Checks an introspection answer at `now` and maps it to an identity.
    pub(crate) fn verify(&self, response: &Value, now: i64) -> Result<VerifiedToken, TokenError> {
        if response.get("active").and_then(Value::as_bool) != Some(true) {
            return Err(TokenError::InactiveToken);
        }
        // `iss` is optional in RFC 7662; present, it must be this issuer, as a
        // string (an array or a number is not "absent").
        match response.get("iss") {
            None | Some(Value::Null) => {}
            Some(Value::String(iss)) if *iss == self.issuer => {}
            Some(_) => return Err(TokenError::UnknownIssuer),
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
            // RFC 8705 §3.2 and RFC 9449 §6.2: the answer carries the binding.
            binding: binding(response)?,
            // The endpoint itself is the token's status.
            status: None,
            claims: Vec::new(),
        })
    }
}

/// SHA-256 of a credential: the only form in which one is kept.
pub fn token_digest(token: &str) -> [u8; 32] {
    crate::digest::sha256(token.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(prefixes: &[&str]) -> Vec<String> {
        prefixes.iter().map(|p| (*p).to_owned()).collect()
    }

    #[test]
    fn a_token_goes_to_the_issuer_owning_its_prefix_only() {
        let a = owned(&["a_", "alpha."]);
        let b = owned(&["b_"]);
        let sets: [&[String]; 2] = [&a, &b];
        assert_eq!(select_index(&sets, "a_123"), Some(0));
        assert_eq!(select_index(&sets, "alpha.xyz"), Some(0));
        assert_eq!(select_index(&sets, "b_123"), Some(1));
        // No prefix matches: nobody is asked.
        assert_eq!(select_index(&sets, "c_123"), None);
        assert_eq!(
            select_index(&sets, "A_123"),
            None,
            "prefixes are case-sensitive"
        );
        assert_eq!(select_index(&sets, "alpha"), None);
    }

    #[test]
    fn the_longest_prefix_wins_if_prefixes_ever_overlap() {
        let a = owned(&["at_"]);
        let b = owned(&["at_long_"]);
        let sets: [&[String]; 2] = [&a, &b];
        assert_eq!(select_index(&sets, "at_long_1"), Some(1));
        assert_eq!(select_index(&sets, "at_short"), Some(0));
    }

    #[test]
    fn a_single_introspector_without_prefixes_takes_every_opaque_token() {
        let none: Vec<String> = Vec::new();
        assert_eq!(select_index(&[&none], "anything"), Some(0));
        // With prefixes it takes only its own.
        let a = owned(&["a_"]);
        assert_eq!(select_index(&[&a], "a_1"), Some(0));
        assert_eq!(select_index(&[&a], "anything"), None);
        // Several, one without prefixes (configuration forbids it): that one
        // takes nothing rather than everything.
        let sets: [&[String]; 2] = [&none, &a];
        assert_eq!(select_index(&sets, "anything"), None);
        assert_eq!(select_index(&sets, "a_1"), Some(1));
        // No introspector at all.
        assert_eq!(select_index(&[], "anything"), None);
        // An empty prefix (configuration forbids it) matches nothing.
        let empty = owned(&[""]);
        assert_eq!(select_index(&[&empty, &a], "x"), None);
    }

    #[test]
    fn checks_of_one_token_share_a_flight_until_the_last_leaves() {
        let flights = Flights::default();
        let first = flights.join([1; 32]);
        let second = flights.join([1; 32]);
        let other = flights.join([2; 32]);
        assert!(Arc::ptr_eq(&first.outcome, &second.outcome));
        assert!(!Arc::ptr_eq(&first.outcome, &other.outcome));
        assert_eq!(flights.len(), 2);
        drop(first);
        assert_eq!(flights.len(), 2, "one check still waits on it");
        let third = flights.join([1; 32]);
        assert!(Arc::ptr_eq(&second.outcome, &third.outcome));
        drop(second);
        drop(third);
        drop(other);
        assert_eq!(flights.len(), 0);
        // A new flight starts fresh: a failure is never handed to later checks.
        let fresh = flights.join([1; 32]);
        assert!(fresh.outcome.get().is_none());
    }

    #[tokio::test]
    async fn a_failed_flight_fails_every_waiter_and_is_not_reused() {
        let flights = Flights::default();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let lookup = || async {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::task::yield_now().await;
            Err::<VerifiedToken, _>(TokenError::IntrospectionFailed)
        };
        let seats: Vec<Seat<'_>> = (0..3).map(|_| flights.join([7; 32])).collect();
        let outcomes = tokio::join!(
            seats[0].outcome.get_or_init(lookup),
            seats[1].outcome.get_or_init(lookup),
            seats[2].outcome.get_or_init(lookup),
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        for outcome in [outcomes.0, outcomes.1, outcomes.2] {
            assert!(matches!(outcome, Err(TokenError::IntrospectionFailed)));
        }
        drop(seats);
        let again = flights.join([7; 32]);
        again.outcome.get_or_init(lookup).await.as_ref().err();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_call_slot_is_waited_for_until_the_deadline_only() {
        let full = Semaphore::new(0);
        assert!(permit_until(&full, Instant::now()).await.is_none());
        let one = Semaphore::new(1);
        let held = permit_until(&one, Instant::now() + Duration::from_secs(60)).await;
        assert!(held.is_some());
        assert!(permit_until(&one, Instant::now()).await.is_none());
        drop(held);
        assert!(permit_until(&one, Instant::now()).await.is_some());
    }

    #[test]
    fn refusals_are_cached_but_failures_and_not_yet_valid_are_not() {
        for lasting in [
            TokenError::InactiveToken,
            TokenError::WrongAudience,
            TokenError::UnknownIssuer,
            TokenError::Expired,
            TokenError::LifetimeTooLong,
            TokenError::MissingClaim,
            TokenError::Malformed,
        ] {
            assert!(is_lasting_refusal(lasting), "{lasting:?}");
        }
        assert!(!is_lasting_refusal(TokenError::IntrospectionFailed));
        assert!(!is_lasting_refusal(TokenError::NotYetValid));
    }
}

/// Fuzz target of the introspection response (see [`crate::fuzz`]): the JSON
/// body an introspection endpoint answers, mutated. Oracle: no panic, and an
/// identity only from an active response of this issuer, for us, unexpired,
/// naming its principal.
#[cfg(test)]
mod fuzz {
    use serde_json::{Value, json};

    use std::sync::Arc;

    use crate::authn::TokenError;
    use crate::authn::introspection::Introspector;
    use crate::engine::Engine;
    use crate::fuzz::{Target, bytes, run};
    use crate::test_setup::{NOW, Setup, setup_with};

    /// Found by `fuzz_introspection_response`: an `iss` that is not a string
    /// skipped the issuer check.
    #[test]
    fn an_issuer_that_is_not_a_string_is_refused() {
        let (_dir, introspector, _) = introspector();
        for iss in [
            json!(["x", "https://idp.test"]),
            json!(1),
            json!({"iss": "https://idp.test"}),
        ] {
            let response = json!({
                "active": true, "iss": iss, "aud": "orders-api", "sub": "alice",
                "iat": NOW - 10, "exp": NOW + 600,
            });
            assert_eq!(
                introspector.verify_response(&response, NOW).err(),
                Some(TokenError::UnknownIssuer),
                "{response}"
            );
        }
        let absent = json!({ "active": true, "sub": "alice", "exp": NOW + 600 });
        assert!(introspector.verify_response(&absent, NOW).is_ok());
    }

    /// An introspector of `https://idp.test` built from a real configuration,
    /// and the issuer's leeway.
    fn introspector() -> (Setup, Arc<Introspector>, i64) {
        let setup = setup_with(
            "",
            r#"
[issuers.introspection]
endpoint = "https://idp.test/introspect"
client_id = "portcullis"
client_secret_file = "secret"
"#,
            &[("secret", "s3cret")],
        );
        let leeway = setup.config.issuers[0].leeway.as_secs() as i64;
        let engine = Engine::from_config(&setup.config).unwrap();
        let introspector = engine.authenticator().issuers().introspectors()[0].clone();
        (setup, introspector, leeway)
    }

    #[test]
    fn fuzz_introspection_response() {
        let (_dir, introspector, leeway) = introspector();
        let response = |extra: Value| {
            let mut body = json!({
                "active": true, "iss": "https://idp.test", "aud": "orders-api",
                "sub": "alice", "scope": "orders:read", "client_id": "c1",
                "iat": NOW - 10, "exp": NOW + 600, "jti": "o1",
            });
            if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
                body.extend(extra.clone());
            }
            body.to_string()
        };
        let seeds = bytes([
            response(json!({})),
            response(json!({ "aud": ["x", "orders-api"], "nbf": NOW - 1, "roles": ["admin"] })),
            response(json!({ "active": false })),
            response(json!({ "exp": null, "iat": null })),
            r#"{"active":true}"#.to_owned(),
        ]);
        let dictionary = bytes([
            r#""active":"true""#,
            r#""active":1"#,
            r#""iss":"https://evil.test""#,
            r#""aud":"other""#,
            r#""aud":[]"#,
            r#""exp":1e300"#,
            r#""exp":-1"#,
            r#""sub":"""#,
            r#""sub":["a"]"#,
            r#""scope":["a"]"#,
            "true",
            "false",
            "null",
            ",",
            "\"",
            "{}",
        ]);
        run(
            Target {
                name: "introspection_response",
                seeds,
                dictionary,
                cases: 8000,
            },
            |body| {
                let Ok(value) = serde_json::from_slice::<Value>(body) else {
                    return;
                };
                let Ok(token) = introspector.verify_response(&value, NOW) else {
                    return;
                };
                let field = |name: &str| value.get(name);
                assert_eq!(field("active"), Some(&json!(true)), "inactive accepted");
                assert!(
                    field("iss").is_none_or(|i| i == "https://idp.test"),
                    "foreign issuer accepted"
                );
                assert!(
                    field("exp")
                        .and_then(Value::as_f64)
                        .is_none_or(|exp| exp > (NOW - leeway) as f64),
                    "expired accepted"
                );
                assert!(
                    match field("aud") {
                        None | Some(Value::Null) => true,
                        Some(Value::String(a)) => a == "orders-api",
                        Some(Value::Array(a)) => a.iter().any(|a| a == "orders-api"),
                        Some(_) => false,
                    },
                    "foreign audience accepted"
                );
                assert!(!token.principal_id.is_empty());
            },
        );
    }
}
