//! A Security Event Token (RFC 8417) verified as OpenID Shared Signals says,
//! and what its events ask to revoke.
//!
//! The checks, in order, each with the RFC 8935 §2.3 error code a refusal
//! carries: the compact JWS shape and header (`typ` `secevent+jwt`, with or
//! without `application/`; no `crit`) → `invalid_request`; the algorithm
//! (accepted, configured, the key's pinned one) and the `kid` (a key of the
//! transmitter) → `invalid_key`; the signature → `authentication_failed`;
//! `iss` → `invalid_issuer`; `aud` → `invalid_audience`; `iat`, `exp` (when
//! present), `jti`, `events` → `invalid_request`.

use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use crate::authn::jwks::is_accepted_algorithm;
use crate::authn::jwt::JoseHeader;
use crate::authn::keys::IssuerKeys;
use crate::revocation::{MAX_ID_BYTES, Target};

/// The largest SET accepted (pushed or polled), in bytes.
pub const MAX_SET_BYTES: usize = 64 * 1024;

const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";
const RISC: &str = "https://schemas.openid.net/secevent/risc/event-type/";
const SSF: &str = "https://schemas.openid.net/secevent/ssf/event-type/";

/// The RFC 8935 §2.3 error codes a refused SET is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request (or the SET) is malformed.
    InvalidRequest,
    /// The signing key or algorithm is not acceptable.
    InvalidKey,
    /// `iss` is not the transmitter's.
    InvalidIssuer,
    /// `aud` does not name this receiver.
    InvalidAudience,
    /// The signature does not verify: the SET's origin is not authenticated.
    AuthenticationFailed,
}

impl ErrorCode {
    /// The code as the RFC spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::InvalidIssuer => "invalid_issuer",
            ErrorCode::InvalidAudience => "invalid_audience",
            ErrorCode::AuthenticationFailed => "authentication_failed",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a SET was refused. The description never quotes the SET.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {description}")]
pub struct SetError {
    /// The RFC 8935 error code.
    pub code: ErrorCode,
    /// A human-readable reason.
    pub description: String,
}

fn refuse(code: ErrorCode, description: impl Into<String>) -> SetError {
    SetError {
        code,
        description: description.into(),
    }
}

/// Why a SET could not be verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The SET is bad: refused for good (never applied).
    Refused(SetError),
    /// The transmitter's keys are not loaded yet: try again later.
    Unavailable(String),
}

impl From<SetError> for Rejection {
    fn from(e: SetError) -> Self {
        Rejection::Refused(e)
    }
}

/// What an event type asks of this receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Revoke what the subject names; the short name of the event type.
    Revoking(&'static str),
    /// A stream verification event: matched against the receiver's request
    /// (its `state`), never a revocation.
    Verification,
    /// The transmitter changed the stream's status (`enabled`, `paused`,
    /// `disabled`): logged and counted, never a revocation.
    StreamUpdated,
    /// Any other event type: acknowledged only.
    Other,
}

impl EventKind {
    /// The event type's short name, for metrics and revocation reasons.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Revoking(name) => name,
            EventKind::Verification => "verification",
            EventKind::StreamUpdated => "stream-updated",
            EventKind::Other => "other",
        }
    }
}

/// The kind of an event type URI.
pub fn classify(event_type: &str) -> EventKind {
    if let Some(name) = event_type.strip_prefix(CAEP) {
        match name {
            "session-revoked" => return EventKind::Revoking("session-revoked"),
            "credential-change" => return EventKind::Revoking("credential-change"),
            _ => {}
        }
    }
    if let Some(name) = event_type.strip_prefix(RISC) {
        match name {
            "account-disabled" => return EventKind::Revoking("account-disabled"),
            "account-purged" => return EventKind::Revoking("account-purged"),
            "account-credential-change-required" => {
                return EventKind::Revoking("account-credential-change-required");
            }
            "sessions-revoked" => return EventKind::Revoking("sessions-revoked"),
            _ => {}
        }
    }
    match event_type.strip_prefix(SSF) {
        Some("verification") => return EventKind::Verification,
        Some("stream-updated") => return EventKind::StreamUpdated,
        _ => {}
    }
    EventKind::Other
}

/// One event of a verified SET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event type URI, as sent.
    pub event_type: String,
    /// What it asks of us.
    pub kind: EventKind,
    /// What to revoke (empty unless [`EventKind::Revoking`]).
    pub targets: Vec<Target>,
    /// Subject identifiers (or members) that name nothing revocable, by
    /// format (`email`, `phone_number`, ...), for the log.
    pub unmapped: Vec<String>,
    /// The `state` of a verification event (SSF 1.0 §8.1.4.1), when it is a
    /// string.
    pub state: Option<String>,
    /// The `status` of a stream-updated event (SSF 1.0 §8.1.5), when it is a
    /// string.
    pub status: Option<String>,
    /// The `reason` of a stream-updated event, when it is a string.
    pub reason: Option<String>,
}

/// A verified SET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSet {
    /// Its `jti`.
    pub jti: String,
    /// Its `iat`.
    pub issued_at: i64,
    /// Its events, each member of `events`.
    pub events: Vec<Event>,
}

/// Verifies SETs of one transmitter.
#[derive(Debug)]
pub struct Verifier {
    /// The transmitter's `iss`.
    pub issuer: String,
    /// This receiver's `aud`.
    pub audience: String,
    /// Accepted algorithms.
    pub algorithms: Vec<Algorithm>,
    /// The transmitter's keys.
    pub keys: Arc<IssuerKeys>,
    /// Clock skew tolerated on `iat` and `exp`, seconds.
    pub leeway: i64,
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, SetError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| {
            refuse(
                ErrorCode::InvalidRequest,
                format!("{what} is not base64url"),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|_| {
        refuse(
            ErrorCode::InvalidRequest,
            format!("{what} is not a JSON object"),
        )
    })
}

/// A NumericDate claim: `None` when absent, an error when not a number.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, SetError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_i64()
            .or_else(|| value.as_f64().map(|f| f.floor() as i64))
            .map(Some)
            .ok_or_else(|| refuse(ErrorCode::InvalidRequest, format!("{name} is not a number"))),
    }
}

impl Verifier {
    /// Verifies `set` at `now` (seconds since the epoch).
    pub async fn verify(&self, set: &str, now: i64) -> Result<VerifiedSet, Rejection> {
        let invalid = |d: &str| refuse(ErrorCode::InvalidRequest, d);
        if set.len() > MAX_SET_BYTES {
            return Err(invalid("the SET is larger than 64 KiB").into());
        }
        let mut parts = set.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "not a compact JWS (three parts; encrypted SETs are not supported)",
            )
            .into());
        };
        if payload_b64.is_empty() || signature_b64.is_empty() {
            return Err(invalid("unsigned SET").into());
        }
        let header: JoseHeader = decode_json(header_b64, "the JOSE header")?;
        let typ = header.typ.as_deref().unwrap_or_default();
        let typ = typ
            .get(..12)
            .filter(|p| p.eq_ignore_ascii_case("application/"))
            .map_or(typ, |_| &typ[12..]);
        if !typ.eq_ignore_ascii_case("secevent+jwt") {
            return Err(invalid("the header typ must be secevent+jwt").into());
        }
        if header.crit.is_some() {
            return Err(invalid("critical header parameters are not supported").into());
        }
        let alg: Algorithm = header
            .alg
            .parse()
            .map_err(|_| refuse(ErrorCode::InvalidKey, "unknown signature algorithm"))?;
        if !is_accepted_algorithm(alg) || !self.algorithms.contains(&alg) {
            return Err(refuse(ErrorCode::InvalidKey, "signature algorithm not accepted").into());
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| refuse(ErrorCode::InvalidKey, "the header has no kid"))?;
        let mut keys = self.keys.get();
        if keys.as_ref().is_none_or(|k| k.get(kid).is_none()) {
            // A new kid may mean the transmitter rotated: one rate-limited refresh.
            self.keys
                .refresh_for_unknown_kid(self.keys.generation())
                .await;
            keys = self.keys.get();
        }
        let Some(keys) = keys else {
            return Err(Rejection::Unavailable(
                "the transmitter's keys are not loaded".into(),
            ));
        };
        let key = keys
            .get(kid)
            .ok_or_else(|| refuse(ErrorCode::InvalidKey, "unknown kid"))?;
        if key.algorithm != alg {
            return Err(refuse(ErrorCode::InvalidKey, "the algorithm is not the key's").into());
        }
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims::<&str>(&[]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(set, &key.key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidRsaKey(_) => refuse(
                    ErrorCode::AuthenticationFailed,
                    "the signature does not verify with the transmitter's key",
                ),
                _ => invalid("the SET cannot be decoded"),
            })?
            .claims;
        self.check_claims(claims, now).map_err(Rejection::Refused)
    }

    fn check_claims(&self, claims: Map<String, Value>, now: i64) -> Result<VerifiedSet, SetError> {
        let invalid = |d: &str| refuse(ErrorCode::InvalidRequest, d);
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(refuse(
                ErrorCode::InvalidIssuer,
                "iss is not the configured transmitter",
            ));
        }
        let audience_ok = match claims.get("aud") {
            Some(Value::String(aud)) => *aud == self.audience,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(&self.audience)),
            _ => false,
        };
        if !audience_ok {
            return Err(refuse(
                ErrorCode::InvalidAudience,
                "aud does not name this receiver",
            ));
        }
        let issued_at = numeric_date(&claims, "iat")?.ok_or_else(|| invalid("iat is required"))?;
        if issued_at > now.saturating_add(self.leeway) {
            return Err(invalid("iat is in the future"));
        }
        if let Some(exp) = numeric_date(&claims, "exp")?
            && now > exp.saturating_add(self.leeway)
        {
            return Err(invalid("the SET has expired"));
        }
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty())
            .ok_or_else(|| invalid("jti is required"))?;
        if jti.len() > MAX_ID_BYTES {
            return Err(invalid("jti is too long"));
        }
        let events = claims
            .get("events")
            .and_then(Value::as_object)
            .filter(|e| !e.is_empty())
            .ok_or_else(|| invalid("events must be a non-empty object"))?;
        let sub_id = claims.get("sub_id");
        let mut parsed = Vec::with_capacity(events.len());
        for (event_type, payload) in events {
            let payload = payload
                .as_object()
                .ok_or_else(|| invalid("each event's payload must be an object"))?;
            let kind = classify(event_type);
            let mut event = Event {
                event_type: event_type.clone(),
                kind,
                targets: Vec::new(),
                unmapped: Vec::new(),
                state: None,
                status: None,
                reason: None,
            };
            let text = |name: &str| payload.get(name).and_then(Value::as_str).map(str::to_owned);
            match kind {
                EventKind::Verification => event.state = text("state"),
                EventKind::StreamUpdated => {
                    event.status = text("status");
                    event.reason = text("reason");
                }
                _ => {}
            }
            if matches!(kind, EventKind::Revoking(_)) {
                // CAEP/RISC put the subject in the event; SSF 1.0 in `sub_id`.
                let cut_off = numeric_date(payload, "event_timestamp")?
                    .unwrap_or(issued_at)
                    .min(now.saturating_add(self.leeway));
                match payload.get("subject").or(sub_id) {
                    Some(subject) => subject_targets(subject, cut_off, &mut event),
                    None => event.unmapped.push("no subject".into()),
                }
            }
            parsed.push(event);
        }
        Ok(VerifiedSet {
            jti: jti.to_owned(),
            issued_at,
            events: parsed,
        })
    }
}

fn string_member<'a>(value: &'a Value, name: &str) -> Option<&'a str> {
    value
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// What a subject identifier (RFC 9493) or an SSF complex subject revokes.
fn subject_targets(subject: &Value, cut_off: i64, event: &mut Event) {
    if !subject.is_object() {
        event.unmapped.push("malformed subject".into());
        return;
    }
    if subject.get("format").is_some() {
        simple_subject(subject, cut_off, event, true);
        return;
    }
    // A complex subject: the members together name one principal. The user
    // (and a session that is a token) are revoked; an application alone is
    // revoked as a client, never when a user or session narrows it (that
    // would revoke every user of the client).
    let mut narrowed = false;
    for member in ["user", "session"] {
        if let Some(value) = subject.get(member) {
            narrowed = true;
            let before = event.targets.len();
            simple_subject(value, cut_off, event, true);
            if member == "session" {
                // Only a `jwt_id` session names a token; drop a session
                // revoked as a subject (an opaque session id is not a `sub`).
                let kept: Vec<Target> = event
                    .targets
                    .drain(before..)
                    .filter(|t| matches!(t, Target::Token { .. }))
                    .collect();
                if kept.is_empty() {
                    event.unmapped.push("session".into());
                }
                event.targets.extend(kept);
            }
        }
    }
    if let Some(application) = subject.get("application") {
        let client_id = string_member(application, "client_id").or_else(|| {
            (string_member(application, "format") == Some("opaque"))
                .then(|| string_member(application, "id"))
                .flatten()
        });
        match client_id {
            Some(client_id) if !narrowed => event.targets.push(Target::Client {
                client_id: client_id.to_owned(),
                issued_before: Some(cut_off),
            }),
            Some(_) => {}
            None => event.unmapped.push("application".into()),
        }
    }
    for member in ["device", "tenant", "org_unit", "group"] {
        if subject.get(member).is_some() && !narrowed {
            event.unmapped.push(member.into());
        }
    }
    if !narrowed && subject.get("application").is_none() && event.targets.is_empty() {
        event.unmapped.push("complex subject without user".into());
    }
}

/// One RFC 9493 subject identifier.
fn simple_subject(subject: &Value, cut_off: i64, event: &mut Event, aliases_allowed: bool) {
    let format = string_member(subject, "format").unwrap_or("none");
    let target = match format {
        "iss_sub" => string_member(subject, "sub").map(|sub| Target::Subject {
            sub: sub.to_owned(),
            issued_before: cut_off,
        }),
        "opaque" => string_member(subject, "id").map(|sub| Target::Subject {
            sub: sub.to_owned(),
            issued_before: cut_off,
        }),
        "jwt_id" => string_member(subject, "jti").map(|jti| Target::Token {
            jti: jti.to_owned(),
            issuer: string_member(subject, "iss").map(str::to_owned),
        }),
        "aliases" if aliases_allowed => {
            match subject.get("identifiers").and_then(Value::as_array) {
                Some(identifiers) => {
                    for identifier in identifiers {
                        simple_subject(identifier, cut_off, event, false);
                    }
                }
                None => event.unmapped.push("aliases".into()),
            }
            return;
        }
        _ => None,
    };
    match target {
        Some(target) => event.targets.push(target),
        None => event.unmapped.push(format.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(subject: Value) -> Event {
        let mut event = Event {
            event_type: String::new(),
            kind: EventKind::Revoking("session-revoked"),
            targets: Vec::new(),
            unmapped: Vec::new(),
            state: None,
            status: None,
            reason: None,
        };
        subject_targets(&subject, 100, &mut event);
        event
    }

    #[test]
    fn event_types_are_classified() {
        assert_eq!(
            classify("https://schemas.openid.net/secevent/caep/event-type/session-revoked"),
            EventKind::Revoking("session-revoked")
        );
        assert_eq!(
            classify("https://schemas.openid.net/secevent/risc/event-type/account-purged"),
            EventKind::Revoking("account-purged")
        );
        assert_eq!(
            classify("https://schemas.openid.net/secevent/ssf/event-type/verification"),
            EventKind::Verification
        );
        assert_eq!(
            classify("https://schemas.openid.net/secevent/ssf/event-type/stream-updated"),
            EventKind::StreamUpdated
        );
        assert_eq!(
            classify("https://schemas.openid.net/secevent/caep/event-type/token-claims-change"),
            EventKind::Other
        );
    }

    #[test]
    fn subject_formats_map_to_targets() {
        let sub = |s: &str| Target::Subject {
            sub: s.into(),
            issued_before: 100,
        };
        assert_eq!(
            event(json!({"format": "iss_sub", "iss": "https://i", "sub": "alice"})).targets,
            vec![sub("alice")]
        );
        assert_eq!(
            event(json!({"format": "opaque", "id": "bob"})).targets,
            vec![sub("bob")]
        );
        assert_eq!(
            event(json!({"format": "jwt_id", "iss": "https://i", "jti": "j1"})).targets,
            vec![Target::Token {
                jti: "j1".into(),
                issuer: Some("https://i".into())
            }]
        );
        let email = event(json!({"format": "email", "email": "a@b.test"}));
        assert!(email.targets.is_empty());
        assert_eq!(email.unmapped, vec!["email".to_owned()]);
        let aliases = event(json!({"format": "aliases", "identifiers": [
            {"format": "email", "email": "a@b.test"},
            {"format": "opaque", "id": "carol"}
        ]}));
        assert_eq!(aliases.targets, vec![sub("carol")]);
    }

    #[test]
    fn complex_subjects_revoke_the_user_session_or_lone_application() {
        let complex = event(json!({
            "user": {"format": "iss_sub", "iss": "https://i", "sub": "alice"},
            "session": {"format": "jwt_id", "iss": "https://i", "jti": "s1"},
            "application": {"format": "opaque", "id": "web"}
        }));
        assert_eq!(complex.targets.len(), 2);
        assert!(
            !complex
                .targets
                .iter()
                .any(|t| matches!(t, Target::Client { .. }))
        );
        let app = event(json!({"application": {"format": "opaque", "id": "web"}}));
        assert_eq!(
            app.targets,
            vec![Target::Client {
                client_id: "web".into(),
                issued_before: Some(100)
            }]
        );
        let opaque_session = event(json!({"session": {"format": "opaque", "id": "x"}}));
        assert!(opaque_session.targets.is_empty());
    }
}
