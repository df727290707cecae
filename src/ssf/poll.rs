//! The RFC 8936 poll client: `POST <poll_url>` with the `ack`s of the SETs
//! applied since the last request, the `setErrs` of those refused,
//! `maxEvents` and `returnImmediately: true`; the answer's `sets` are
//! processed and acknowledged in the next request.
//!
//! It polls again at once while the transmitter has more (`moreAvailable`)
//! or the last answer held SETs, else after `poll_interval`; after an error
//! (transport, status, body, or a SET the store could not take) it waits
//! with a capped exponential backoff. Acknowledgements not delivered yet are
//! kept for the next request; a SET that was not applied is not
//! acknowledged, so the transmitter delivers it again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::set::MAX_SET_BYTES;
use super::{Failure, Processor};
use crate::authn::keys::read_limited;

/// The longest wait after repeated errors.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The largest poll response read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// What the poll loop needs.
#[derive(Debug)]
pub struct Poller {
    /// The HTTPS client (`[ssf.remote]` settings).
    pub client: reqwest::Client,
    /// The transmitter's poll endpoint.
    pub url: String,
    /// The bearer token presented, when configured.
    pub token: Option<String>,
    /// `maxEvents`.
    pub max_events: u32,
    /// The wait after an answer without SETs.
    pub interval: Duration,
    /// Applies the SETs.
    pub processor: Arc<Processor>,
}

#[derive(Deserialize)]
struct PollResponse {
    #[serde(default)]
    sets: BTreeMap<String, Value>,
    #[serde(default, rename = "moreAvailable")]
    more_available: bool,
}

/// What one request sends and what its answer asks next.
#[derive(Debug, Default)]
struct Pending {
    ack: Vec<String>,
    set_errs: Map<String, Value>,
}

impl Pending {
    fn body(&self, max_events: u32) -> Value {
        let mut body = json!({
            "ack": self.ack,
            "maxEvents": max_events,
            "returnImmediately": true,
        });
        if !self.set_errs.is_empty()
            && let Some(object) = body.as_object_mut()
        {
            object.insert("setErrs".into(), Value::Object(self.set_errs.clone()));
        }
        body
    }
}

/// How the last round went.
enum Next {
    /// More SETs are waiting: poll again at once.
    Now,
    /// Nothing came: wait `poll_interval`.
    Idle,
    /// Something failed: back off.
    Backoff,
}

/// Polls until the task is aborted.
pub async fn run(poller: Poller) {
    let mut pending = Pending::default();
    let mut backoff = Duration::from_secs(1);
    loop {
        match round(&poller, &mut pending).await {
            Next::Now => {
                backoff = Duration::from_secs(1);
            }
            Next::Idle => {
                backoff = Duration::from_secs(1);
                tokio::time::sleep(poller.interval).await;
            }
            Next::Backoff => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF.max(poller.interval));
            }
        }
    }
}

/// One request and the processing of its answer.
async fn round(poller: &Poller, pending: &mut Pending) -> Next {
    let mut request = poller
        .client
        .post(&poller.url)
        .header("accept", "application/json")
        .json(&pending.body(poller.max_events));
    if let Some(token) = &poller.token {
        request = request.bearer_auth(token);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(error = %e.without_url(), "Shared Signals poll failed");
            return Next::Backoff;
        }
    };
    let status = response.status();
    if !status.is_success() {
        tracing::warn!(%status, "Shared Signals poll answered an error");
        return Next::Backoff;
    }
    let limit = (poller.max_events as usize)
        .saturating_mul(MAX_SET_BYTES + 1024)
        .saturating_add(64 * 1024)
        .min(MAX_RESPONSE_BYTES);
    let body = match read_limited(response, limit).await {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!(error = %e, "Shared Signals poll: unreadable answer");
            return Next::Backoff;
        }
    };
    // The transmitter answered: the acknowledgements it was sent are delivered.
    pending.ack.clear();
    pending.set_errs.clear();
    let answer: PollResponse = match serde_json::from_slice(&body) {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e, "Shared Signals poll: the answer is not a poll response");
            return Next::Backoff;
        }
    };
    let received = answer.sets.len();
    let mut failed = false;
    for (jti, set) in answer.sets {
        let Some(set) = set.as_str() else {
            pending.set_errs.insert(
                jti,
                json!({"err": "invalid_request", "description": "the SET is not a string"}),
            );
            continue;
        };
        match poller.processor.process(set).await {
            Ok(_) => pending.ack.push(jti),
            Err(Failure::Refused(e)) => {
                pending.set_errs.insert(
                    jti,
                    json!({"err": e.code.as_str(), "description": e.description}),
                );
            }
            Err(Failure::Unavailable(_)) => failed = true,
        }
    }
    if received > 0 {
        tracing::debug!(
            received,
            acknowledged = pending.ack.len(),
            refused = pending.set_errs.len(),
            "Shared Signals poll"
        );
    }
    if failed {
        Next::Backoff
    } else if answer.more_available || received > 0 {
        Next::Now
    } else {
        Next::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_body_carries_acks_and_errors() {
        let mut pending = Pending::default();
        assert_eq!(
            pending.body(10),
            json!({"ack": [], "maxEvents": 10, "returnImmediately": true})
        );
        pending.ack.push("a".into());
        pending.set_errs.insert(
            "b".into(),
            json!({"err": "invalid_key", "description": "x"}),
        );
        let body = pending.body(5);
        assert_eq!(body["ack"], json!(["a"]));
        assert_eq!(body["setErrs"]["b"]["err"], "invalid_key");
    }
}
