//! OAuth Token Status List (draft-ietf-oauth-status-list): fetching, caching
//! and reading the lists that tokens' `status.status_list` claims point to.
//!
//! A token that names `{"idx": i, "uri": u}` is checked against entry `i` of
//! the Status List Token served at `u`:
//!
//! - the list is fetched with the token issuer's HTTP settings (HTTPS only,
//!   its `ca_file`, its timeouts), at most `max_list_bytes` read;
//! - it must be a JWT with `typ` `statuslist+jwt`, signed by a key of that
//!   same issuer (the key set that verifies its access tokens, with the key's
//!   pinned algorithm, one the issuer accepts), with `sub` equal to `u`,
//!   `iss` equal to the token's issuer, an `iat`, no past `exp`, and a
//!   `status_list` of `bits` (1, 2, 4 or 8) and `lst` (base64url of the
//!   zlib-compressed entries), never inflated past `max_decompressed_bytes`;
//! - entries are packed least-significant bit first; only `0` (VALID) passes.
//!
//! Lists are cached per (issuer, URI): fresh until `min(exp, fetched + ttl)`
//! (`ttl` from the list, else `default_ttl`, never below `min_refresh`). A
//! stale list is refreshed by one request while the others for the same list
//! wait for it; fetches of one list are at least `min_refresh` apart. While
//! refreshes fail, the last good copy answers until its validity plus
//! `grace`, then the tokens depending on it are refused (fail closed).

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

pub use super::StatusReference;
use super::claims::{numeric_date, secs_i64};
use super::jwks::is_accepted_algorithm;
use super::jwt::{Issuer, IssuerSet, JoseHeader};
use super::keys::{BodyError, FetchError, http_client, read_limited};
use super::{TokenError, VerifiedToken};
use crate::config::Config;

/// The media type asked for (`Accept`) and the `typ` required (without its
/// `application/` prefix) of a Status List Token.
pub const MEDIA_TYPE: &str = "application/statuslist+jwt";

/// The longest `[status_list] grace` accepted.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);

/// The status of an entry that lets its token through. (1 is INVALID, 2
/// SUSPENDED, 3 and others application-specific: all refused.)
pub const VALID: u8 = 0;

/// Why the status-list checks could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StatusListError {
    /// `grace` is longer than [`MAX_GRACE`].
    #[error("[status_list] grace of {0:?} is too long: at most 1h is accepted")]
    GraceTooLong(Duration),
    /// An issuer's HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] FetchError),
}

/// Why a Status List Token was not installed. Logged (with the list's URI,
/// never a token), never told to the caller: the caller sees
/// `token_status_unavailable` once no good copy is left.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The token's issuer is not configured (any more).
    #[error("issuer is not configured")]
    UnknownIssuer,
    /// The request failed, timed out or answered a non-2xx status.
    #[error("fetching the list: {0}")]
    Http(String),
    /// The body could not be read, or is larger than `max_list_bytes`.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The Status List Token does not verify or breaks a rule.
    #[error("status list token refused: {0}")]
    Invalid(&'static str),
    /// The decompressed list is larger than `max_decompressed_bytes`.
    #[error("the decompressed list is larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

impl ListError {
    /// The `outcome` label of `portcullis_status_list_fetches_total`.
    fn outcome(&self) -> &'static str {
        match self {
            ListError::Http(_) | ListError::Body(BodyError::Read(_)) => "unreachable",
            _ => "invalid",
        }
    }
}

/// A decoded status list: `bits` per entry, packed least-significant bit
/// first within each byte (entry 0 in the lowest bits of byte 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusList {
    bits: u8,
    bytes: Vec<u8>,
}

impl StatusList {
    /// A list of `bits`-bit entries (1, 2, 4 or 8) over `bytes`.
    pub fn new(bits: u8, bytes: Vec<u8>) -> Result<StatusList, ListError> {
        if !matches!(bits, 1 | 2 | 4 | 8) {
            return Err(ListError::Invalid("bits is not 1, 2, 4 or 8"));
        }
        Ok(StatusList { bits, bytes })
    }

    /// Decodes a `status_list` claim's `lst` (base64url of zlib/DEFLATE
    /// bytes), inflating at most `max_decompressed` bytes.
    pub fn decode(bits: u8, lst: &str, max_decompressed: usize) -> Result<StatusList, ListError> {
        let compressed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(lst.trim_end_matches('='))
            .map_err(|_| ListError::Invalid("lst is not base64url"))?;
        StatusList::new(bits, inflate_limited(&compressed, max_decompressed)?)
    }

    /// The status of entry `idx`, or `None` beyond the list.
    pub fn get(&self, idx: u64) -> Option<u8> {
        let bits = u64::from(self.bits);
        let position = idx.checked_mul(bits)?;
        let byte = *self.bytes.get(usize::try_from(position / 8).ok()?)?;
        let mask = u8::MAX >> (8 - self.bits);
        Some((byte >> (position % 8)) & mask)
    }

    /// How many entries the list holds.
    pub fn len(&self) -> u64 {
        (self.bytes.len() as u64).saturating_mul(8) / u64::from(self.bits)
    }

    /// True for a list without entries.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Inflates zlib (RFC 1950) data, refusing it as soon as it passes `limit`
/// bytes: at most `limit` bytes (plus a fixed 8 KiB buffer) are ever
/// allocated, whatever the compressed data claims.
pub fn inflate_limited(compressed: &[u8], limit: usize) -> Result<Vec<u8>, ListError> {
    let mut decoder = flate2::read::ZlibDecoder::new(compressed);
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let read = decoder
            .read(&mut chunk)
            .map_err(|_| ListError::Invalid("lst is not zlib data"))?;
        if read == 0 {
            return Ok(out);
        }
        let needed = out.len().saturating_add(read);
        if needed > limit {
            return Err(ListError::TooLarge { limit });
        }
        if needed > out.capacity() {
            // Grow by doubling, but never past the limit.
            let target = out.capacity().saturating_mul(2).clamp(needed, limit);
            out.reserve_exact(target - out.len());
        }
        out.extend_from_slice(&chunk[..read]);
    }
}

/// A verified list and until when it is fresh (unix seconds).
#[derive(Debug)]
struct CachedList {
    list: StatusList,
    fresh_until: i64,
}

/// One cached list: the last good copy, and the gate that makes refreshes
/// single-flight (it holds when the last fetch started).
#[derive(Debug, Default)]
struct Slot {
    current: ArcSwapOption<CachedList>,
    last_attempt: tokio::sync::Mutex<Option<i64>>,
}

/// Fetches of Status List Tokens, by outcome.
#[derive(Debug, Default)]
pub struct StatusListStats {
    /// Lists fetched, verified and installed.
    pub ok: AtomicU64,
    /// Fetches that failed: connection, timeout, non-2xx answer.
    pub unreachable: AtomicU64,
    /// Lists fetched but refused: too large, bad signature, wrong claims...
    pub invalid: AtomicU64,
}

/// The `[status_list]` checks: one HTTP client per issuer, a cache of lists.
pub struct StatusLists {
    enabled: bool,
    clients: HashMap<String, reqwest::Client>,
    slots: moka::sync::Cache<(String, String), Arc<Slot>>,
    default_ttl: i64,
    min_refresh: i64,
    grace: i64,
    max_list_bytes: usize,
    max_decompressed_bytes: usize,
    /// Fetch counters.
    pub stats: StatusListStats,
}

impl std::fmt::Debug for StatusLists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusLists")
            .field("enabled", &self.enabled)
            .field("lists", &self.slots.entry_count())
            .finish_non_exhaustive()
    }
}

/// Whole seconds, rounded up (a `500ms` setting is one second, not zero).
fn secs_ceil(duration: Duration) -> i64 {
    let whole = secs_i64(duration);
    if duration.subsec_nanos() > 0 {
        whole.saturating_add(1)
    } else {
        whole
    }
}

impl StatusLists {
    /// The checks `config` asks for. A `grace` longer than [`MAX_GRACE`] is
    /// refused; each issuer gets its HTTP client (`[issuers.remote]`).
    pub fn from_config(config: &Config) -> Result<StatusLists, StatusListError> {
        let settings = &config.status_list;
        if settings.grace > MAX_GRACE {
            return Err(StatusListError::GraceTooLong(settings.grace));
        }
        let mut clients = HashMap::new();
        if settings.enabled {
            for issuer in &config.issuers {
                clients.insert(
                    issuer.issuer.clone(),
                    http_client(&issuer.issuer, &issuer.remote)?,
                );
            }
        }
        Ok(StatusLists {
            enabled: settings.enabled,
            clients,
            slots: moka::sync::Cache::new(settings.max_lists),
            default_ttl: secs_ceil(settings.default_ttl),
            min_refresh: secs_ceil(settings.min_refresh),
            grace: secs_ceil(settings.grace),
            max_list_bytes: settings.max_list_bytes,
            max_decompressed_bytes: settings.max_decompressed_bytes,
            stats: StatusListStats::default(),
        })
    }

    /// True when `[status_list] enabled`.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Checks `token` against its status list at `now` (unix seconds): `Ok`
    /// for a token without a `status.status_list` claim (or when the checks
    /// are off) and for a VALID entry; [`TokenError::StatusNotValid`] for any
    /// other status or an index beyond the list;
    /// [`TokenError::StatusUnavailable`] when no usable copy of the list is
    /// left.
    pub async fn check(
        &self,
        issuers: &IssuerSet,
        token: &VerifiedToken,
        now: i64,
    ) -> Result<(), TokenError> {
        if !self.enabled {
            return Ok(());
        }
        let Some(reference) = &token.status else {
            return Ok(());
        };
        let list = self
            .list(issuers, &token.issuer, &reference.uri, now)
            .await?;
        match list.list.get(reference.idx) {
            Some(VALID) => Ok(()),
            _ => Err(TokenError::StatusNotValid),
        }
    }

    /// The list at `uri` of `issuer`, from the cache or fetched now.
    async fn list(
        &self,
        issuers: &IssuerSet,
        issuer: &str,
        uri: &str,
        now: i64,
    ) -> Result<Arc<CachedList>, TokenError> {
        let slot = self
            .slots
            .get_with((issuer.to_owned(), uri.to_owned()), Default::default);
        let fresh = |slot: &Slot| {
            slot.current
                .load_full()
                .filter(|cached| now < cached.fresh_until)
        };
        if let Some(cached) = fresh(&slot) {
            return Ok(cached);
        }
        // Single flight: one request refreshes, the others wait for it here.
        let mut last_attempt = slot.last_attempt.lock().await;
        if let Some(cached) = fresh(&slot) {
            return Ok(cached);
        }
        let may_fetch = last_attempt.is_none_or(|at| {
            // (A clock that went back allows a fetch rather than none for long.)
            now < at || now >= at.saturating_add(self.min_refresh)
        });
        if may_fetch {
            *last_attempt = Some(now);
            match self.fetch(issuers, issuer, uri, now).await {
                Ok(cached) => {
                    self.stats.ok.fetch_add(1, Ordering::Relaxed);
                    let cached = Arc::new(cached);
                    slot.current.store(Some(cached.clone()));
                    return Ok(cached);
                }
                Err(e) => {
                    let counter = match e.outcome() {
                        "unreachable" => &self.stats.unreachable,
                        _ => &self.stats.invalid,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%issuer, %uri, error = %e, "status list refresh failed; keeping the last good copy while it is valid");
                }
            }
        }
        drop(last_attempt);
        match slot.current.load_full() {
            Some(cached) if now < cached.fresh_until.saturating_add(self.grace) => Ok(cached),
            _ => Err(TokenError::StatusUnavailable),
        }
    }

    /// Fetches and verifies the Status List Token at `uri` for `issuer`.
    async fn fetch(
        &self,
        issuers: &IssuerSet,
        issuer: &str,
        uri: &str,
        now: i64,
    ) -> Result<CachedList, ListError> {
        let issuer = issuers
            .iter()
            .find(|i| i.issuer == issuer)
            .ok_or(ListError::UnknownIssuer)?;
        let client = self
            .clients
            .get(&issuer.issuer)
            .ok_or(ListError::UnknownIssuer)?;
        let response = client
            .get(uri)
            .header(reqwest::header::ACCEPT, MEDIA_TYPE)
            .send()
            .await
            .map_err(|e| ListError::Http(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(ListError::Http(format!("answered {}", response.status())));
        }
        let body = read_limited(response, self.max_list_bytes).await?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| ListError::Invalid("the body is not text"))?
            .trim();
        let claims = verify_list_token(issuer, text, uri, now).await?;
        self.read_claims(&claims, now)
    }

    /// The list and its freshness from verified claims.
    fn read_claims(&self, claims: &Value, now: i64) -> Result<CachedList, ListError> {
        let body = claims
            .get("status_list")
            .ok_or(ListError::Invalid("no status_list claim"))?;
        let bits = body
            .get("bits")
            .and_then(Value::as_u64)
            .and_then(|bits| u8::try_from(bits).ok())
            .ok_or(ListError::Invalid("status_list.bits is not 1, 2, 4 or 8"))?;
        let lst = body
            .get("lst")
            .and_then(Value::as_str)
            .ok_or(ListError::Invalid("status_list.lst is not a string"))?;
        let list = StatusList::decode(bits, lst, self.max_decompressed_bytes)?;
        let ttl = match claims.get("ttl") {
            None | Some(Value::Null) => self.default_ttl,
            // A positive number of seconds (a fraction counts as a whole second).
            Some(ttl) => ttl
                .as_f64()
                .filter(|ttl| ttl.is_finite() && *ttl > 0.0)
                .map(|ttl| ttl.ceil().min(i64::MAX as f64) as i64)
                .ok_or(ListError::Invalid("ttl is not a positive number"))?,
        };
        let mut fresh_until = now.saturating_add(ttl.max(self.min_refresh));
        let exp =
            numeric_date(claims, "exp").map_err(|_| ListError::Invalid("exp is malformed"))?;
        if let Some(exp) = exp {
            fresh_until = fresh_until.min(exp);
        }
        Ok(CachedList { list, fresh_until })
    }
}

/// Verifies a Status List Token with `issuer`'s keys and returns its claims:
/// `typ` `statuslist+jwt`, an algorithm the issuer accepts and the key is
/// pinned to, a valid signature, `sub` = `uri`, `iss` = the issuer, `iat`
/// present and not in the future (beyond the issuer's leeway), `exp` (if
/// any) not past.
async fn verify_list_token(
    issuer: &Issuer,
    token: &str,
    uri: &str,
    now: i64,
) -> Result<Value, ListError> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ListError::Invalid("not a compact JWS"));
    };
    let header: JoseHeader = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header_b64)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(ListError::Invalid("malformed header"))?;
    let typ = header.typ.as_deref().unwrap_or_default();
    let typ = typ.strip_prefix("application/").unwrap_or(typ);
    if !typ.eq_ignore_ascii_case("statuslist+jwt") {
        return Err(ListError::Invalid("typ is not statuslist+jwt"));
    }
    if header.crit.is_some() {
        return Err(ListError::Invalid("unsupported critical header"));
    }
    let alg: Algorithm = header
        .alg
        .parse()
        .map_err(|_| ListError::Invalid("unknown algorithm"))?;
    if !is_accepted_algorithm(alg) || !issuer.algorithms.contains(&alg) {
        return Err(ListError::Invalid("algorithm not accepted from the issuer"));
    }
    let kid = header.kid.as_deref().ok_or(ListError::Invalid("no kid"))?;
    let generation = issuer.keys.generation();
    let keys = match issuer.keys.get() {
        Some(keys) if keys.get(kid).is_some() => keys,
        _ => {
            // Maybe a key the issuer just published: one shared, rate-limited refresh.
            issuer.keys.refresh_for_unknown_kid(generation).await;
            issuer
                .keys
                .get()
                .ok_or(ListError::Invalid("the issuer has no keys"))?
        }
    };
    let key = keys.get(kid).ok_or(ListError::Invalid("unknown kid"))?;
    if key.algorithm != alg {
        return Err(ListError::Invalid("algorithm does not match the key"));
    }
    let mut validation = Validation::new(key.algorithm);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.set_required_spec_claims::<&str>(&[]);
    let claims = jsonwebtoken::decode::<Value>(token, &key.key, &validation)
        .map_err(|_| ListError::Invalid("signature does not verify"))?
        .claims;
    if claims.get("sub").and_then(Value::as_str) != Some(uri) {
        return Err(ListError::Invalid("sub is not the list's URI"));
    }
    if claims.get("iss").and_then(Value::as_str) != Some(issuer.issuer.as_str()) {
        return Err(ListError::Invalid("iss is not the token's issuer"));
    }
    let malformed = |_| ListError::Invalid("malformed time claim");
    let iat = numeric_date(&claims, "iat")
        .map_err(malformed)?
        .ok_or(ListError::Invalid("no iat"))?;
    if iat > now.saturating_add(secs_i64(issuer.leeway)) {
        return Err(ListError::Invalid("iat is in the future"));
    }
    if numeric_date(&claims, "exp")
        .map_err(malformed)?
        .is_some_and(|exp| exp <= now)
    {
        return Err(ListError::Invalid("the list expired"));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn zlib(bytes: &[u8]) -> Vec<u8> {
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// Packs `statuses` as the draft does: `bits` each, least-significant first.
    fn pack(bits: u8, statuses: &[u8]) -> Vec<u8> {
        let per_byte = 8 / usize::from(bits);
        let mut bytes = vec![0u8; statuses.len().div_ceil(per_byte)];
        for (idx, status) in statuses.iter().enumerate() {
            bytes[idx / per_byte] |= status << ((idx % per_byte) * usize::from(bits));
        }
        bytes
    }

    #[test]
    fn the_drafts_one_bit_example_reads_back() {
        // draft-ietf-oauth-status-list, "Status List with 1-bit entries".
        let list = StatusList::decode(1, "eNrbuRgAAhcBXQ", 1024).unwrap();
        assert_eq!(list.bytes, vec![0xB9, 0xA3]);
        let expected = [1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1];
        for (idx, status) in expected.iter().enumerate() {
            assert_eq!(list.get(idx as u64), Some(*status), "idx {idx}");
        }
        assert_eq!(list.len(), 16);
        assert_eq!(list.get(16), None);
    }

    #[test]
    fn the_drafts_two_bit_example_reads_back() {
        // draft-ietf-oauth-status-list, "Status List with 2-bit entries".
        let list = StatusList::decode(2, "eNo76fITAAPfAgc", 1024).unwrap();
        assert_eq!(list.bytes, vec![0xC9, 0x44, 0xF9]);
        let expected = [1, 2, 0, 3, 0, 1, 0, 1, 1, 2, 3, 3];
        for (idx, status) in expected.iter().enumerate() {
            assert_eq!(list.get(idx as u64), Some(*status), "idx {idx}");
        }
    }

    #[test]
    fn every_width_packs_least_significant_first() {
        for bits in [1u8, 2, 4, 8] {
            let max = u8::MAX >> (8 - bits);
            let statuses: Vec<u8> = (0..64u32).map(|i| (i * 7 % 256) as u8 & max).collect();
            let packed = pack(bits, &statuses);
            let list = StatusList::new(bits, packed.clone()).unwrap();
            for (idx, status) in statuses.iter().enumerate() {
                assert_eq!(list.get(idx as u64), Some(*status), "bits {bits} idx {idx}");
            }
            assert_eq!(list.len(), (packed.len() * 8 / usize::from(bits)) as u64);
            assert_eq!(list.get(list.len()), None, "bits {bits}: beyond the list");
            // Through base64url and zlib, as served.
            let lst = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(zlib(&packed));
            assert_eq!(StatusList::decode(bits, &lst, 1024).unwrap(), list);
        }
        // Entry 0 of a one-byte 4-bit list is the low nibble.
        let list = StatusList::new(4, vec![0x21]).unwrap();
        assert_eq!(
            (list.get(0), list.get(1), list.get(2)),
            (Some(1), Some(2), None)
        );
        let list = StatusList::new(8, vec![0, 3]).unwrap();
        assert_eq!((list.get(0), list.get(1)), (Some(0), Some(3)));
    }

    #[test]
    fn odd_widths_and_huge_indexes_are_refused() {
        for bits in [0u8, 3, 5, 16] {
            assert!(StatusList::new(bits, vec![0]).is_err(), "bits {bits}");
        }
        let list = StatusList::new(8, vec![0; 4]).unwrap();
        assert_eq!(list.get(u64::MAX), None);
        assert_eq!(list.get(u64::MAX / 8 + 1), None);
    }

    #[test]
    fn a_zlib_bomb_is_refused_at_the_limit() {
        // 64 MiB of zeros compress to ~64 KiB; the limit is 1 MiB.
        let bomb = zlib(&vec![0u8; 64 * 1024 * 1024]);
        assert!(bomb.len() < 100 * 1024);
        let limit = 1024 * 1024;
        assert!(matches!(
            inflate_limited(&bomb, limit),
            Err(ListError::TooLarge { limit: 1048576 })
        ));
        // Exactly at the limit is fine, and never over-allocated.
        let exact = inflate_limited(&zlib(&vec![0u8; limit]), limit).unwrap();
        assert_eq!(exact.len(), limit);
        assert!(exact.capacity() <= limit);
        assert!(inflate_limited(b"not zlib", limit).is_err());
        let lst = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bomb);
        assert!(matches!(
            StatusList::decode(1, &lst, limit),
            Err(ListError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_grace_over_an_hour_is_refused() {
        let mut config = crate::test_setup::setup("").config;
        config.status_list.grace = Duration::from_secs(3601);
        assert!(matches!(
            StatusLists::from_config(&config),
            Err(StatusListError::GraceTooLong(_))
        ));
        config.status_list.grace = MAX_GRACE;
        assert!(StatusLists::from_config(&config).is_ok());
    }

    #[test]
    fn freshness_is_the_earliest_of_exp_and_ttl_never_below_min_refresh() {
        let mut config = crate::test_setup::setup("").config;
        config.status_list.default_ttl = Duration::from_secs(300);
        config.status_list.min_refresh = Duration::from_millis(10_500);
        let lists = StatusLists::from_config(&config).unwrap();
        let lst = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(zlib(&[0]));
        let claims = |extra: Value| {
            let mut claims = serde_json::json!({"status_list": {"bits": 1, "lst": lst}});
            if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
                claims.extend(extra.clone());
            }
            claims
        };
        let fresh = |extra| lists.read_claims(&claims(extra), 1000).unwrap().fresh_until;
        assert_eq!(fresh(serde_json::json!({})), 1300);
        assert_eq!(fresh(serde_json::json!({"ttl": 60})), 1060);
        assert_eq!(
            fresh(serde_json::json!({"ttl": 1})),
            1011,
            "raised to min_refresh"
        );
        assert_eq!(fresh(serde_json::json!({"ttl": 60, "exp": 1030})), 1030);
        assert!(
            lists
                .read_claims(&claims(serde_json::json!({"ttl": "60"})), 1000)
                .is_err()
        );
        assert!(
            lists
                .read_claims(&claims(serde_json::json!({"ttl": -1})), 1000)
                .is_err()
        );
        assert_eq!(fresh(serde_json::json!({"ttl": 30.2})), 1031);
        assert_eq!(fresh(serde_json::json!({"ttl": 1e300})), i64::MAX);
        for ttl in [serde_json::json!(0), serde_json::json!(-0.5)] {
            assert!(
                lists
                    .read_claims(&claims(serde_json::json!({ "ttl": ttl })), 1000)
                    .is_err()
            );
        }
    }
}
