//! Stream management, receiver side (OpenID Shared Signals Framework 1.0
//! §7 and §8.1): the transmitter's configuration metadata, the stream's
//! status, adding and removing subjects, and verification.
//!
//! - [`ManagementClient`] reads the transmitter's metadata
//!   (`/.well-known/ssf-configuration`, its `issuer` must be `[ssf] issuer`
//!   exactly) and calls the endpoints it names, over HTTPS only (the
//!   `[ssf.remote]` client settings), with the management bearer token;
//! - the stream itself is created, read, updated and deleted at the
//!   metadata's `configuration_endpoint` (SSF 1.0 §8.1.1): [`StreamRequest`]
//!   is what the receiver asks for (derived from `[ssf]`), and every answer
//!   is checked into a [`StreamConfiguration`];
//! - [`Verification`] remembers the `state` of the verification event the
//!   receiver asked for, so that the one that arrives (pushed or polled) is
//!   matched against it; [`run_verification`] asks for one every
//!   `verification_interval` and counts what came of the previous request.
//!
//! The management token is never logged nor put in an error.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::authn::keys::{http_client, read_limited};
use crate::config::{Secret, SsfConfig};
use crate::state::ServerState;

/// The largest metadata or status answer read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The shortest `verification_interval` accepted (other than zero).
pub const MIN_VERIFICATION_INTERVAL: Duration = Duration::from_secs(1);
/// States of earlier verification requests remembered, to tell a late event
/// from one nobody asked for.
const PAST_STATES: usize = 16;
/// The name of the metadata call, in errors.
const METADATA: &str = "transmitter configuration";
/// The longest part of a transmitter's error answer quoted in an error.
const MAX_QUOTED: usize = 200;
/// The name of the stream configuration calls, in errors.
const CONFIGURATION: &str = "stream configuration";
/// Push delivery (RFC 8935): the transmitter POSTs to the receiver.
pub const PUSH_DELIVERY: &str = "urn:ietf:rfc:8935";
/// Poll delivery (RFC 8936): the receiver polls the transmitter.
pub const POLL_DELIVERY: &str = "urn:ietf:rfc:8936";
/// The event types this receiver acts on, which `ssf create-stream` asks
/// for: the revoking ones ([`super::set::classify`]), verification and
/// stream-updated. Others would only be acknowledged.
pub const RECEIVER_EVENTS: [&str; 8] = [
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked",
    "https://schemas.openid.net/secevent/caep/event-type/credential-change",
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled",
    "https://schemas.openid.net/secevent/risc/event-type/account-purged",
    "https://schemas.openid.net/secevent/risc/event-type/account-credential-change-required",
    "https://schemas.openid.net/secevent/risc/event-type/sessions-revoked",
    "https://schemas.openid.net/secevent/ssf/event-type/verification",
    "https://schemas.openid.net/secevent/ssf/event-type/stream-updated",
];
/// What a receiver stands for in a stream configuration the CLI prints.
const REDACTED: &str = "(redacted)";

/// Why a stream management call failed. Never carries the management token.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The `[ssf]` section cannot be used for stream management.
    #[error("[ssf] stream management is not configured: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The transmitter could not be reached, or its answer not read.
    #[error("{what}: the transmitter could not be reached: {reason}")]
    Transport {
        /// The call.
        what: &'static str,
        /// The transport error.
        reason: String,
    },
    /// The transmitter answered with an error status.
    #[error("{what}: the transmitter answered {status}{}{detail}", hint(what, *.status))]
    Status {
        /// The call.
        what: &'static str,
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body, when there was one (`: ...`).
        detail: String,
    },
    /// The answer is not what SSF says it should be.
    #[error("{what}: the transmitter's answer is not valid: {reason}")]
    Invalid {
        /// The call.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The metadata names another issuer than `[ssf] issuer`.
    #[error(
        "the transmitter's configuration names issuer {found:?}, not [ssf] issuer {expected:?}: refused"
    )]
    IssuerMismatch {
        /// `[ssf] issuer`.
        expected: String,
        /// The metadata's `issuer`.
        found: String,
    },
    /// The metadata does not name the endpoint a call needs.
    #[error("the transmitter's configuration has no {0}: it does not offer this")]
    NoEndpoint(&'static str),
    /// The transmitter does not offer what the receiver would ask for.
    #[error("the transmitter does not offer {0}")]
    Unsupported(String),
    /// An endpoint of the metadata is not an `https://` URL.
    #[error("the transmitter's {what} {url:?} is not an https:// URL: refused")]
    NotHttps {
        /// Which endpoint.
        what: &'static str,
        /// The URL.
        url: String,
    },
}

/// What a few statuses mean, in the management API's terms.
fn hint(what: &str, status: u16) -> &'static str {
    match status {
        404 if what == METADATA => {
            " (no SSF configuration metadata there: check [ssf] configuration_url or issuer)"
        }
        401 => " (the management token is missing or refused)",
        403 => " (the management token may not do this)",
        404 => " (no such stream, or no such subject)",
        429 => " (too many requests: try again later)",
        _ => "",
    }
}

/// The transmitter's configuration metadata (SSF 1.0 §7.1), the members the
/// receiver uses; others are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The transmitter's issuer; must be `[ssf] issuer` exactly.
    pub issuer: String,
    /// The transmitter's JWKS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The delivery methods offered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivery_methods_supported: Vec<String>,
    /// Stream configuration (create, read, update, delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration_endpoint: Option<String>,
    /// Stream status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_endpoint: Option<String>,
    /// Adding a subject to a stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_subject_endpoint: Option<String>,
    /// Removing a subject from a stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_subject_endpoint: Option<String>,
    /// Asking for a verification event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_endpoint: Option<String>,
}

/// A stream's status (SSF 1.0 §8.1.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StreamStatus {
    /// The stream, as the transmitter names it.
    #[serde(default)]
    pub stream_id: Option<String>,
    /// `enabled`, `paused` or `disabled`.
    pub status: String,
    /// Why, when the transmitter says.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Is any stream management key set (so that management must be usable)?
fn management_configured(config: &SsfConfig) -> bool {
    config.configuration_url.is_some()
        || config.stream_id.is_some()
        || config.management_token_file.is_some()
        || !config.verification_interval.is_zero()
}

fn is_https_url(url: &str) -> bool {
    url.starts_with("https://") && reqwest::Url::parse(url).is_ok()
}

/// Where the transmitter's metadata is: `configuration_url`, else the
/// issuer with `/.well-known/ssf-configuration` inserted between its host
/// and its path (SSF 1.0 §7.2; `<issuer>/.well-known/ssf-configuration` for
/// an issuer without a path).
pub fn configuration_url(config: &SsfConfig) -> Result<String, String> {
    if let Some(url) = &config.configuration_url {
        return if is_https_url(url) {
            Ok(url.clone())
        } else {
            Err("[ssf] configuration_url must be an https:// URL".to_owned())
        };
    }
    let unusable = || {
        "[ssf] configuration_url is unset and issuer is not an https:// URL to find \
         /.well-known/ssf-configuration at: set configuration_url"
            .to_owned()
    };
    let issuer = reqwest::Url::parse(&config.issuer).map_err(|_| unusable())?;
    if issuer.scheme() != "https" || issuer.query().is_some() || issuer.fragment().is_some() {
        return Err(unusable());
    }
    let path = issuer.path().trim_end_matches('/').to_owned();
    let mut url = issuer;
    url.set_path(&format!("/.well-known/ssf-configuration{path}"));
    Ok(url.to_string())
}

/// The stream management problems of `config` (none when management is not
/// configured, or usable). Reads the management token file.
pub fn problems(config: &SsfConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if !management_configured(config) {
        return problems;
    }
    if let Err(e) = configuration_url(config) {
        problems.push(e);
    }
    if config.stream_id.as_deref() == Some("") {
        problems.push("[ssf] stream_id must not be empty".to_owned());
    }
    if let Some(path) = &config.management_token_file {
        super::read_token(path, "management_token_file", &mut problems);
    }
    let interval = config.verification_interval;
    if !interval.is_zero() {
        if config.stream_id.is_none() {
            problems.push(
                "[ssf] verification_interval is set without stream_id: the verification \
                 events are asked for a stream"
                    .to_owned(),
            );
        }
        if interval < MIN_VERIFICATION_INTERVAL {
            problems
                .push("[ssf] verification_interval must be at least 1s (or 0s: never)".to_owned());
        }
        if config.push_listen.is_none()
            && config.poll_url.is_some()
            && interval <= config.poll_interval
        {
            problems.push(
                "[ssf] verification_interval must be longer than poll_interval: a polled \
                 verification event arrives up to poll_interval after it is sent"
                    .to_owned(),
            );
        }
    }
    problems
}

/// A client of the transmitter's stream management endpoints.
pub struct ManagementClient {
    client: reqwest::Client,
    configuration_url: String,
    issuer: String,
    audience: String,
    token: Option<Secret>,
    stream_id: Option<String>,
}

impl std::fmt::Debug for ManagementClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementClient")
            .field("configuration_url", &self.configuration_url)
            .field("issuer", &self.issuer)
            .field("token", &self.token)
            .field("stream_id", &self.stream_id)
            .finish()
    }
}

/// The start of an error answer, one line, for the error message.
fn quoted(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let mut out: String = text
        .chars()
        .take(MAX_QUOTED)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > MAX_QUOTED {
        out.push_str("...");
    }
    format!(": {out}")
}

impl ManagementClient {
    /// A client for `config`'s transmitter. Refused when [`problems`] finds
    /// any, or the HTTPS client cannot be built.
    pub fn new(config: &SsfConfig) -> Result<ManagementClient, StreamError> {
        let mut problems = problems(config);
        let configuration_url = match configuration_url(config) {
            Ok(url) => url,
            Err(e) => {
                if !problems.contains(&e) {
                    problems.push(e);
                }
                String::new()
            }
        };
        let mut ignored = Vec::new();
        let token = config
            .management_token_file
            .as_deref()
            .and_then(|path| super::read_token(path, "management_token_file", &mut ignored))
            .map(Secret::new);
        let client = match http_client(&config.issuer, &config.remote) {
            Ok(client) => Some(client),
            Err(e) => {
                problems.push(format!("[ssf] {e}"));
                None
            }
        };
        match client {
            Some(client) if problems.is_empty() => Ok(ManagementClient {
                client,
                configuration_url,
                issuer: config.issuer.clone(),
                audience: config.audience.clone(),
                token,
                stream_id: config.stream_id.clone(),
            }),
            _ => Err(StreamError::Config(problems)),
        }
    }

    /// Where the metadata is read.
    pub fn configuration_url(&self) -> &str {
        &self.configuration_url
    }

    /// `[ssf] stream_id`, which every call but [`ManagementClient::metadata`]
    /// needs.
    pub fn stream_id(&self) -> Result<&str, StreamError> {
        self.stream_id.as_deref().ok_or_else(|| {
            StreamError::Config(vec![
                "[ssf] stream_id is not set: which stream to manage".to_owned(),
            ])
        })
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = request.header("accept", "application/json");
        match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    /// Sends `request`; the body of a 2xx answer (at most
    /// [`MAX_RESPONSE_BYTES`]), else [`StreamError::Status`].
    async fn send(
        &self,
        what: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, StreamError> {
        let transport = |reason: String| StreamError::Transport { what, reason };
        let response = self
            .authorized(request)
            .send()
            .await
            .map_err(|e| transport(e.without_url().to_string()))?;
        let status = response.status();
        let body = read_limited(response, MAX_RESPONSE_BYTES).await;
        if !status.is_success() {
            return Err(StreamError::Status {
                what,
                status: status.as_u16(),
                detail: body.map(|b| quoted(&b)).unwrap_or_default(),
            });
        }
        body.map_err(|e| transport(e.to_string()))
    }

    /// Reads the transmitter's metadata and checks its `issuer`.
    pub async fn metadata(&self) -> Result<Metadata, StreamError> {
        let what = METADATA;
        let body = self
            .send(what, self.client.get(&self.configuration_url))
            .await?;
        let metadata: Metadata =
            serde_json::from_slice(&body).map_err(|e| StreamError::Invalid {
                what,
                reason: e.to_string(),
            })?;
        if metadata.issuer != self.issuer {
            return Err(StreamError::IssuerMismatch {
                expected: self.issuer.clone(),
                found: metadata.issuer,
            });
        }
        Ok(metadata)
    }

    /// Asks for the stream's status.
    pub async fn status(&self, metadata: &Metadata) -> Result<StreamStatus, StreamError> {
        let what = "stream status";
        let stream_id = self.stream_id()?;
        let mut url = reqwest::Url::parse(endpoint(
            metadata.status_endpoint.as_deref(),
            "status_endpoint",
        )?)
        .map_err(|e| StreamError::Invalid {
            what,
            reason: e.to_string(),
        })?;
        url.query_pairs_mut().append_pair("stream_id", stream_id);
        let body = self.send(what, self.client.get(url)).await?;
        serde_json::from_slice(&body).map_err(|e| StreamError::Invalid {
            what,
            reason: e.to_string(),
        })
    }

    /// Adds `subject` (an RFC 9493 subject identifier) to the stream;
    /// `verified` says whether the receiver verified it (SSF 1.0 §8.1.3.2).
    pub async fn add_subject(
        &self,
        metadata: &Metadata,
        subject: &Value,
        verified: bool,
    ) -> Result<(), StreamError> {
        check_subject(subject)?;
        let url = endpoint(
            metadata.add_subject_endpoint.as_deref(),
            "add_subject_endpoint",
        )?;
        let body =
            json!({"stream_id": self.stream_id()?, "subject": subject, "verified": verified});
        self.send("add subject", self.client.post(url).json(&body))
            .await
            .map(drop)
    }

    /// Removes `subject` from the stream.
    pub async fn remove_subject(
        &self,
        metadata: &Metadata,
        subject: &Value,
    ) -> Result<(), StreamError> {
        check_subject(subject)?;
        let url = endpoint(
            metadata.remove_subject_endpoint.as_deref(),
            "remove_subject_endpoint",
        )?;
        let body = json!({"stream_id": self.stream_id()?, "subject": subject});
        self.send("remove subject", self.client.post(url).json(&body))
            .await
            .map(drop)
    }

    /// Asks the transmitter to send a verification event carrying `state`.
    pub async fn request_verification(
        &self,
        metadata: &Metadata,
        state: &str,
    ) -> Result<(), StreamError> {
        let url = endpoint(
            metadata.verification_endpoint.as_deref(),
            "verification_endpoint",
        )?;
        let body = json!({"stream_id": self.stream_id()?, "state": state});
        self.send("verification request", self.client.post(url).json(&body))
            .await
            .map(drop)
    }
}

/// How the receiver asks for its stream's events (SSF 1.0 §8.1.1 `delivery`).
pub enum Delivery {
    /// RFC 8935: the transmitter POSTs each SET to `endpoint_url`, with
    /// `authorization` as the `Authorization` header when set.
    Push {
        /// The receiver's public push URL.
        endpoint_url: String,
        /// `Bearer <push_token_file>`, a secret.
        authorization: Option<Secret>,
    },
    /// RFC 8936: the transmitter gives the URL to poll in its answer.
    Poll,
}

/// The receiver-supplied properties of a new stream (SSF 1.0 §8.1.1.1),
/// derived from `[ssf]` by [`StreamRequest::from_config`]. Its `Debug`
/// leaves out the push authorization header.
pub struct StreamRequest {
    /// How events are delivered.
    pub delivery: Delivery,
    /// The event types asked for.
    pub events_requested: Vec<String>,
    /// A description for the transmitter's operators, when given.
    pub description: Option<String>,
}

impl std::fmt::Debug for StreamRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamRequest")
            .field("method", &self.method())
            .field("events_requested", &self.events_requested)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl StreamRequest {
    /// The request `[ssf]` implies: push delivery to `push_url` when
    /// `push_listen` is set (`push_listen` is a local address behind TLS,
    /// so the public URL must be given; with `push_token_file`, the
    /// transmitter is told to send `Bearer <token>`), else poll delivery;
    /// the events [`RECEIVER_EVENTS`].
    pub fn from_config(
        config: &SsfConfig,
        push_url: Option<&str>,
        description: Option<String>,
    ) -> Result<StreamRequest, StreamError> {
        let mut problems = Vec::new();
        let delivery = match (&config.push_listen, push_url) {
            (Some(_), Some(url)) => {
                if !is_https_url(url) {
                    problems.push(format!(
                        "--push-url {url:?} must be an https:// URL (the public address of the push endpoint, behind TLS)"
                    ));
                }
                let authorization = config
                    .push_token_file
                    .as_deref()
                    .and_then(|path| super::read_token(path, "push_token_file", &mut problems))
                    .map(|token| Secret::new(format!("Bearer {token}")));
                Delivery::Push {
                    endpoint_url: url.to_owned(),
                    authorization,
                }
            }
            (Some(listen), None) => {
                problems.push(format!(
                    "push_listen is set ({listen}): push delivery needs the public https:// URL the                      transmitter pushes to, which reaches that listener through TLS (--push-url)"
                ));
                Delivery::Poll
            }
            (None, Some(_)) => {
                problems.push(
                    "--push-url is given but push_listen is not set: nothing would receive the                      pushed events (set push_listen, or leave out --push-url for poll delivery)"
                        .to_owned(),
                );
                Delivery::Poll
            }
            (None, None) => Delivery::Poll,
        };
        if problems.is_empty() {
            Ok(StreamRequest {
                delivery,
                events_requested: RECEIVER_EVENTS.iter().map(|e| (*e).to_owned()).collect(),
                description,
            })
        } else {
            Err(StreamError::Config(problems))
        }
    }

    /// The delivery method's URN.
    pub fn method(&self) -> &'static str {
        match self.delivery {
            Delivery::Push { .. } => PUSH_DELIVERY,
            Delivery::Poll => POLL_DELIVERY,
        }
    }

    /// The JSON body: holds the push authorization header, never printed.
    fn body(&self) -> Value {
        let mut delivery = json!({"method": self.method()});
        if let Delivery::Push {
            endpoint_url,
            authorization,
        } = &self.delivery
        {
            delivery["endpoint_url"] = json!(endpoint_url);
            if let Some(authorization) = authorization {
                delivery["authorization_header"] = json!(authorization.expose());
            }
        }
        let mut body = json!({"delivery": delivery, "events_requested": self.events_requested});
        if let Some(description) = &self.description {
            body["description"] = json!(description);
        }
        body
    }
}

/// A stream configuration the transmitter answered (SSF 1.0 §8.1.1),
/// checked: a JSON object with a `stream_id`; `iss` and `aud`, when present,
/// name `[ssf] issuer` and `audience`; the members read have their types.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfiguration {
    /// The stream's id.
    pub stream_id: String,
    /// The event types the transmitter will send (`None`: it does not say).
    pub events_delivered: Option<Vec<String>>,
    /// `delivery.method`, when given.
    pub delivery_method: Option<String>,
    /// `delivery.endpoint_url`: for poll delivery, the URL to poll.
    pub endpoint_url: Option<String>,
    /// The whole answer, with `delivery.authorization_header` redacted: the
    /// transmitter may echo the push token back.
    pub redacted: Value,
}

impl StreamConfiguration {
    /// Of [`RECEIVER_EVENTS`], those the transmitter says it will not
    /// deliver (none when it does not say).
    pub fn undelivered(&self) -> Vec<&'static str> {
        match &self.events_delivered {
            Some(delivered) => RECEIVER_EVENTS
                .iter()
                .copied()
                .filter(|e| !delivered.iter().any(|d| d == e))
                .collect(),
            None => Vec::new(),
        }
    }
}

/// Checks one stream configuration `value` of `[ssf] issuer` and
/// `audience`.
fn stream_configuration(
    mut value: Value,
    issuer: &str,
    audience: &str,
) -> Result<StreamConfiguration, String> {
    let object = value
        .as_object_mut()
        .ok_or("a stream configuration is a JSON object")?;
    let stream_id = match object.get("stream_id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(_) => return Err("stream_id must be a non-empty string".to_owned()),
        None => return Err("stream_id is missing".to_owned()),
    };
    // Once the id is known, every reason names it: a stream that was
    // created but refused must be found to be deleted.
    let refused = |reason: String| format!("{reason} (stream {stream_id})");
    if let Some(delivery) = object.get_mut("delivery") {
        let delivery = delivery
            .as_object_mut()
            .ok_or_else(|| refused("delivery must be an object".to_owned()))?;
        if delivery.contains_key("authorization_header") {
            delivery.insert("authorization_header".to_owned(), json!(REDACTED));
        }
    }
    match object.get("iss") {
        None => {}
        Some(Value::String(iss)) if iss == issuer => {}
        Some(iss) => {
            return Err(refused(format!(
                "iss {iss} is not [ssf] issuer {issuer:?}: SETs of this stream would be refused"
            )));
        }
    }
    match object.get("aud") {
        None => {}
        Some(Value::String(aud)) if aud == audience => {}
        Some(Value::Array(auds)) if auds.iter().any(|a| a.as_str() == Some(audience)) => {}
        Some(aud) => {
            return Err(refused(format!(
                "aud {aud} does not name [ssf] audience {audience:?}: SETs of this stream would be refused"
            )));
        }
    }
    let strings = |key: &str| -> Result<Option<Vec<String>>, String> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| refused(format!("{key} must be an array of strings"))),
            Some(_) => Err(refused(format!("{key} must be an array of strings"))),
        }
    };
    let events_delivered = strings("events_delivered")?;
    let delivery = object.get("delivery");
    let text = |key: &str| -> Result<Option<String>, String> {
        match delivery.and_then(|d| d.get(key)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(refused(format!("delivery.{key} must be a string"))),
        }
    };
    let delivery_method = text("method")?;
    let endpoint_url = text("endpoint_url")?;
    Ok(StreamConfiguration {
        stream_id,
        events_delivered,
        delivery_method,
        endpoint_url,
        redacted: value,
    })
}

impl ManagementClient {
    /// The metadata's `configuration_endpoint`, with `stream_id` as the
    /// query when given.
    fn configuration_endpoint(
        metadata: &Metadata,
        stream_id: Option<&str>,
    ) -> Result<reqwest::Url, StreamError> {
        let url = endpoint(
            metadata.configuration_endpoint.as_deref(),
            "configuration_endpoint",
        )?;
        let mut url = reqwest::Url::parse(url).map_err(|e| StreamError::Invalid {
            what: METADATA,
            reason: format!("configuration_endpoint: {e}"),
        })?;
        if let Some(stream_id) = stream_id {
            url.query_pairs_mut().append_pair("stream_id", stream_id);
        }
        Ok(url)
    }

    /// Parses and checks one stream configuration answer.
    fn configuration(&self, body: &[u8]) -> Result<StreamConfiguration, StreamError> {
        let invalid = |reason: String| StreamError::Invalid {
            what: CONFIGURATION,
            reason,
        };
        let value: Value = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
        stream_configuration(value, &self.issuer, &self.audience).map_err(invalid)
    }

    /// Creates the receiver's stream (`POST configuration_endpoint`):
    /// refused before anything is sent when the metadata lists delivery
    /// methods without the one asked for.
    pub async fn create_stream(
        &self,
        metadata: &Metadata,
        request: &StreamRequest,
    ) -> Result<StreamConfiguration, StreamError> {
        let url = Self::configuration_endpoint(metadata, None)?;
        let method = request.method();
        if !metadata.delivery_methods_supported.is_empty()
            && !metadata
                .delivery_methods_supported
                .iter()
                .any(|m| m == method)
        {
            return Err(StreamError::Unsupported(format!(
                "the delivery method {method} (it lists {}): {}",
                metadata.delivery_methods_supported.join(", "),
                if method == PUSH_DELIVERY {
                    "unset push_listen to poll"
                } else {
                    "set push_listen and give --push-url to be pushed to"
                }
            )));
        }
        let body = self
            .send(CONFIGURATION, self.client.post(url).json(&request.body()))
            .await?;
        self.configuration(&body)
    }

    /// Reads the configuration of `stream_id`, or of every stream of the
    /// receiver (an array, or one object, in the answer).
    pub async fn get_streams(
        &self,
        metadata: &Metadata,
        stream_id: Option<&str>,
    ) -> Result<Vec<StreamConfiguration>, StreamError> {
        let url = Self::configuration_endpoint(metadata, stream_id)?;
        let body = self.send(CONFIGURATION, self.client.get(url)).await?;
        let invalid = |reason: String| StreamError::Invalid {
            what: CONFIGURATION,
            reason,
        };
        let value: Value = serde_json::from_slice(&body).map_err(|e| invalid(e.to_string()))?;
        let items = match (value, stream_id) {
            (Value::Array(items), None) => items,
            (value @ Value::Object(_), _) => vec![value],
            (Value::Array(_), Some(_)) => {
                return Err(invalid(
                    "an array was answered for one stream_id".to_owned(),
                ));
            }
            _ => {
                return Err(invalid(
                    "a stream configuration is a JSON object (an array of them for all streams)"
                        .to_owned(),
                ));
            }
        };
        let streams = items
            .into_iter()
            .map(|item| stream_configuration(item, &self.issuer, &self.audience))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        if let Some(wanted) = stream_id
            && let Some(other) = streams.iter().find(|s| s.stream_id != wanted)
        {
            return Err(invalid(format!(
                "it is the configuration of stream {}, not {wanted}",
                other.stream_id
            )));
        }
        Ok(streams)
    }

    /// Updates `stream_id` with the members of `changes` (`PATCH`), such
    /// as `events_requested` and `description`.
    pub async fn update_stream(
        &self,
        metadata: &Metadata,
        stream_id: &str,
        changes: Value,
    ) -> Result<StreamConfiguration, StreamError> {
        self.change_stream(metadata, stream_id, changes, false)
            .await
    }

    /// Replaces the receiver-supplied properties of `stream_id` with
    /// `request` (`PUT`): a new push URL or push token reaches the
    /// transmitter this way.
    pub async fn replace_stream(
        &self,
        metadata: &Metadata,
        stream_id: &str,
        request: &StreamRequest,
    ) -> Result<StreamConfiguration, StreamError> {
        self.change_stream(metadata, stream_id, request.body(), true)
            .await
    }

    async fn change_stream(
        &self,
        metadata: &Metadata,
        stream_id: &str,
        changes: Value,
        replace: bool,
    ) -> Result<StreamConfiguration, StreamError> {
        let url = Self::configuration_endpoint(metadata, None)?;
        let mut body = changes;
        body["stream_id"] = json!(stream_id);
        let request = if replace {
            self.client.put(url)
        } else {
            self.client.patch(url)
        };
        let answer = self.send(CONFIGURATION, request.json(&body)).await?;
        let configuration = self.configuration(&answer)?;
        if configuration.stream_id != stream_id {
            return Err(StreamError::Invalid {
                what: CONFIGURATION,
                reason: format!(
                    "it is the configuration of stream {}, not {stream_id}",
                    configuration.stream_id
                ),
            });
        }
        Ok(configuration)
    }

    /// Deletes `stream_id` (`DELETE configuration_endpoint?stream_id=`).
    pub async fn delete_stream(
        &self,
        metadata: &Metadata,
        stream_id: &str,
    ) -> Result<(), StreamError> {
        let url = Self::configuration_endpoint(metadata, Some(stream_id))?;
        self.send(CONFIGURATION, self.client.delete(url))
            .await
            .map(drop)
    }
}

/// An endpoint of the metadata, present and `https://`.
fn endpoint<'a>(url: Option<&'a str>, what: &'static str) -> Result<&'a str, StreamError> {
    let url = url.ok_or(StreamError::NoEndpoint(what))?;
    if is_https_url(url) {
        Ok(url)
    } else {
        Err(StreamError::NotHttps {
            what,
            url: url.to_owned(),
        })
    }
}

/// A subject identifier is a JSON object with a string `format` (RFC 9493),
/// or an SSF complex subject (an object of such objects).
pub fn check_subject(subject: &Value) -> Result<(), StreamError> {
    let invalid = |reason: &str| StreamError::Invalid {
        what: "subject",
        reason: reason.to_owned(),
    };
    let object = subject
        .as_object()
        .ok_or_else(|| invalid("a subject identifier is a JSON object"))?;
    match object.get("format") {
        Some(Value::String(format)) if !format.is_empty() => Ok(()),
        Some(_) => Err(invalid("format must be a non-empty string")),
        None if !object.is_empty() && object.values().all(|v| check_subject(v).is_ok()) => Ok(()),
        None => Err(invalid(
            "a subject identifier needs a format (or is a complex subject of identifiers)",
        )),
    }
}

/// A fresh verification `state`: 128 random bits, hex.
pub fn fresh_state() -> Option<String> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).ok()?;
    Some(hex::encode(bytes))
}

/// The verification the receiver asked for, and the ones before it.
#[derive(Debug, Default)]
pub struct Verification {
    rounds: Mutex<Rounds>,
}

#[derive(Debug, Default)]
struct Rounds {
    /// The state of the outstanding request, and whether its event arrived.
    current: Option<(String, bool)>,
    /// States of closed rounds, newest last.
    past: VecDeque<String>,
}

impl Verification {
    fn rounds(&self) -> std::sync::MutexGuard<'_, Rounds> {
        // A panic elsewhere cannot leave the two fields inconsistent.
        self.rounds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A verification event with `state` arrived: the outcome counted,
    /// `verified` (the one asked for), `ignored` (it again), `late` (one of
    /// an earlier request, after its round ended) or `unexpected`.
    pub fn observe(&self, state: Option<&str>) -> &'static str {
        let mut rounds = self.rounds();
        let Some(state) = state else {
            return "unexpected";
        };
        if let Some((current, arrived)) = &mut rounds.current
            && current == state
        {
            return if std::mem::replace(arrived, true) {
                "ignored"
            } else {
                "verified"
            };
        }
        if rounds.past.iter().any(|s| s == state) {
            "late"
        } else {
            "unexpected"
        }
    }

    /// Starts a round expecting `state`; returns whether the previous
    /// round's event arrived (`None` when there was none).
    pub fn begin(&self, state: String) -> Option<bool> {
        let mut rounds = self.rounds();
        let previous = rounds.current.replace((state, false));
        previous.map(|(state, arrived)| {
            if rounds.past.len() == PAST_STATES {
                rounds.past.pop_front();
            }
            rounds.past.push_back(state);
            arrived
        })
    }

    /// Ends the current round (its request failed); returns whether its
    /// event had arrived anyway.
    pub fn end(&self) -> Option<bool> {
        let mut rounds = self.rounds();
        let previous = rounds.current.take();
        previous.map(|(state, arrived)| {
            if rounds.past.len() == PAST_STATES {
                rounds.past.pop_front();
            }
            rounds.past.push_back(state);
            arrived
        })
    }
}

/// Asks for a verification event every `interval` until the task is
/// aborted: each request carries a fresh `state`; the event answering it
/// must arrive before the next request, else the round is counted `missed`
/// (and logged as a warning). A request that fails is counted
/// `request_failed` and the metadata is read again for the next one.
pub async fn run_verification(
    client: ManagementClient,
    interval: Duration,
    verification: Arc<Verification>,
    state: Arc<ServerState>,
) {
    let metrics = state.metrics();
    let mut metadata: Option<Metadata> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(fresh) = fresh_state() else {
            tracing::warn!("Shared Signals verification: no random state; skipped");
            continue;
        };
        if verification.begin(fresh.clone()) == Some(false) {
            metrics.record_ssf_event("verification", "missed");
            tracing::warn!(
                interval = ?interval,
                "Shared Signals verification: the transmitter did not deliver the verification event asked for; events may not be flowing"
            );
        }
        let result = match &metadata {
            Some(metadata) => client.request_verification(metadata, &fresh).await,
            None => match client.metadata().await {
                Ok(fetched) => {
                    let result = client.request_verification(&fetched, &fresh).await;
                    metadata = Some(fetched);
                    result
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                tracing::debug!(state = %fresh, "Shared Signals verification requested");
            }
            Err(e) => {
                // Nothing can arrive for a request not made: not `missed`.
                verification.end();
                metadata = None;
                metrics.record_ssf_event("verification", "request_failed");
                tracing::warn!(error = %e, "Shared Signals verification request failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> SsfConfig {
        toml::from_str(&format!(
            "issuer = \"https://idp.example.test\"\naudience = \"a\"\n{text}"
        ))
        .unwrap()
    }

    #[test]
    fn the_configuration_url_defaults_to_the_issuers_well_known() {
        assert_eq!(
            configuration_url(&config("")).unwrap(),
            "https://idp.example.test/.well-known/ssf-configuration"
        );
        let mut with_path = config("");
        with_path.issuer = "https://idp.example.test/tenant/1/".into();
        assert_eq!(
            configuration_url(&with_path).unwrap(),
            "https://idp.example.test/.well-known/ssf-configuration/tenant/1"
        );
        let mut plain = config("");
        plain.issuer = "http://idp.example.test".into();
        assert!(configuration_url(&plain).is_err());
        assert!(configuration_url(&config("configuration_url = \"http://x.test/c\"")).is_err());
        assert_eq!(
            configuration_url(&config("configuration_url = \"https://x.test/c\"")).unwrap(),
            "https://x.test/c"
        );
    }

    #[test]
    fn inconsistent_management_settings_are_problems() {
        assert!(problems(&config("")).is_empty());
        let text = problems(&config("verification_interval = \"30s\"")).join("\n");
        assert!(text.contains("without stream_id"), "{text}");
        let text = problems(&config(
            "stream_id = \"s\"\nverification_interval = \"500ms\"",
        ))
        .join("\n");
        assert!(text.contains("at least 1s"), "{text}");
        let text = problems(&config(
            "stream_id = \"s\"\nverification_interval = \"5s\"\npoll_url = \"https://p.test/\"\npoll_interval = \"10s\"",
        ))
        .join("\n");
        assert!(text.contains("longer than poll_interval"), "{text}");
        assert!(
            problems(&config(
                "stream_id = \"s\"\nverification_interval = \"30s\""
            ))
            .is_empty()
        );
        let text = problems(&config("stream_id = \"\"")).join("\n");
        assert!(text.contains("must not be empty"), "{text}");
    }

    #[test]
    fn verification_rounds_tell_verified_late_and_unexpected() {
        let v = Verification::default();
        assert_eq!(v.observe(Some("a")), "unexpected");
        assert_eq!(v.begin("a".into()), None);
        assert_eq!(v.observe(None), "unexpected");
        assert_eq!(v.observe(Some("a")), "verified");
        assert_eq!(v.observe(Some("a")), "ignored");
        assert_eq!(v.begin("b".into()), Some(true));
        assert_eq!(v.observe(Some("a")), "late");
        assert_eq!(v.begin("c".into()), Some(false));
        assert_eq!(v.end(), Some(false));
        assert_eq!(v.observe(Some("c")), "late");
    }

    #[test]
    fn subjects_need_a_format() {
        assert!(check_subject(&json!({"format": "email", "email": "a@b.test"})).is_ok());
        assert!(check_subject(&json!({"user": {"format": "opaque", "id": "u"}})).is_ok());
        assert!(check_subject(&json!({"email": "a@b.test"})).is_err());
        assert!(check_subject(&json!("alice")).is_err());
        assert!(check_subject(&json!({})).is_err());
    }

    #[test]
    fn error_answers_are_quoted_on_one_short_line() {
        assert_eq!(quoted(b""), "");
        assert_eq!(quoted(b"bad\nrequest"), ": bad request");
        assert!(quoted(&[b'x'; 500]).ends_with("..."));
    }

    #[test]
    fn the_requested_events_are_the_ones_the_receiver_acts_on() {
        use super::super::set::{EventKind, classify};
        for event in RECEIVER_EVENTS {
            assert_ne!(classify(event), EventKind::Other, "{event}");
        }
        let revoking = RECEIVER_EVENTS
            .iter()
            .filter(|e| matches!(classify(e), EventKind::Revoking(_)))
            .count();
        assert_eq!(revoking, 6);
    }

    #[test]
    fn the_push_authorization_is_sent_but_never_debug_printed() {
        let dir = std::env::temp_dir().join(format!("ssf-stream-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("push-token");
        std::fs::write(&token, "push-secret-123\n").unwrap();
        let mut push = config("push_listen = \"127.0.0.1:8088\"");
        push.push_token_file = Some(token);
        let request =
            StreamRequest::from_config(&push, Some("https://authz.test/ssf/events"), None).unwrap();
        assert_eq!(
            request.body()["delivery"],
            json!({"method": PUSH_DELIVERY, "endpoint_url": "https://authz.test/ssf/events",
                   "authorization_header": "Bearer push-secret-123"})
        );
        assert!(!format!("{request:?}").contains("push-secret"));
        // Push without its public URL, or with a plain one: refused.
        assert!(StreamRequest::from_config(&push, None, None).is_err());
        assert!(StreamRequest::from_config(&push, Some("http://authz.test/e"), None).is_err());
        // Without push_listen: poll, and a push URL makes no sense.
        let poll = config("");
        let request = StreamRequest::from_config(&poll, None, Some("d".into())).unwrap();
        assert_eq!(request.body()["delivery"], json!({"method": POLL_DELIVERY}));
        assert_eq!(request.body()["description"], "d");
        assert!(StreamRequest::from_config(&poll, Some("https://a.test/e"), None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stream_configurations_are_checked_and_redacted() {
        let check = |v: Value| stream_configuration(v, "https://tx.test", "rx");
        let ok = check(json!({
            "stream_id": "s1", "iss": "https://tx.test", "aud": ["other", "rx"],
            "delivery": {"method": POLL_DELIVERY, "endpoint_url": "https://tx.test/poll",
                         "authorization_header": "Bearer secret"},
            "events_delivered": [RECEIVER_EVENTS[0]],
        }))
        .unwrap();
        assert_eq!(ok.stream_id, "s1");
        assert_eq!(ok.endpoint_url.as_deref(), Some("https://tx.test/poll"));
        assert_eq!(ok.redacted["delivery"]["authorization_header"], REDACTED);
        assert_eq!(ok.undelivered().len(), RECEIVER_EVENTS.len() - 1);
        assert!(
            check(json!({"stream_id": "s"}))
                .unwrap()
                .undelivered()
                .is_empty()
        );
        for (bad, expected) in [
            (json!([]), "JSON object"),
            (json!({"events_delivered": []}), "stream_id is missing"),
            (json!({"stream_id": 3}), "non-empty string"),
            (
                json!({"stream_id": "s", "iss": "https://evil.test"}),
                "(stream s)",
            ),
            (json!({"stream_id": "s", "aud": "other"}), "audience"),
            (
                json!({"stream_id": "s", "events_delivered": "all"}),
                "array of strings",
            ),
            (
                json!({"stream_id": "s", "delivery": "push"}),
                "delivery must be an object",
            ),
        ] {
            let e = check(bad.clone()).unwrap_err();
            assert!(e.contains(expected), "{bad}: {e}");
        }
    }
}
