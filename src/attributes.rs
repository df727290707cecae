//! The pipeline's input: the attributes of the HTTP request being authorized,
//! independent of how they reached us (Envoy's `CheckRequest`, the CLI, a test).

use std::collections::HashMap;
use std::net::IpAddr;

/// The HTTP request a decision is made for.
///
/// Its `Debug` shows header names but never their values (`authorization`,
/// cookies and API keys are among them), nor the query string.
#[derive(Clone, Default)]
pub struct HttpRequest {
    /// Upper-case HTTP method, e.g. `GET`.
    pub method: String,
    /// Request path as sent, possibly with a query string.
    pub path: String,
    /// The `host` / `:authority` of the request.
    pub host: String,
    /// `http` or `https`.
    pub scheme: String,
    /// Request headers with lower-case names.
    pub headers: HashMap<String, String>,
    /// Address of the downstream client, IPv4-mapped IPv6 addresses normalised to IPv4.
    pub source_ip: Option<IpAddr>,
    /// The mTLS peer's identity (e.g. a SPIFFE ID) as the proxy reports it.
    pub peer_principal: Option<String>,
    /// The downstream client's certificate as Envoy reports it
    /// (`include_peer_certificate`): URL-encoded PEM. For certificate-bound tokens.
    pub peer_certificate: Option<String>,
    /// Per-route settings from Envoy's `context_extensions` (e.g. `portcullis.mode`).
    pub context_extensions: HashMap<String, String>,
    /// The mTLS identity of the connection that asked (Envoy), set by the
    /// adapter from the connection, never from the request's content.
    pub caller: Option<std::sync::Arc<str>>,
}

impl std::fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut header_names: Vec<&str> = self.headers.keys().map(String::as_str).collect();
        header_names.sort_unstable();
        let path = self.path_without_query();
        let path = if path.len() < self.path.len() {
            format!("{path}?<redacted>")
        } else {
            path.to_owned()
        };
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("path", &path)
            .field("host", &self.host)
            .field("scheme", &self.scheme)
            .field("header_names", &header_names)
            .field("source_ip", &self.source_ip)
            .field("peer_principal", &self.peer_principal)
            .field("peer_certificate", &self.peer_certificate.is_some())
            .field("context_extensions", &self.context_extensions)
            .field("caller", &self.caller)
            .finish()
    }
}

impl HttpRequest {
    /// The path without its query string or fragment.
    pub fn path_without_query(&self) -> &str {
        let end = self.path.find(['?', '#']).unwrap_or(self.path.len());
        &self.path[..end]
    }

    /// A header value by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Parses a peer address, turning `::ffff:a.b.c.d` into `a.b.c.d` so that Cedar's
/// `ip("10.0.0.0/8")` ranges match clients of dual-stack listeners.
pub fn parse_source_ip(text: &str) -> Option<IpAddr> {
    let ip: IpAddr = text.trim().parse().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_fragment_are_stripped() {
        let mut req = HttpRequest {
            path: "/orders/7?x=1".into(),
            ..Default::default()
        };
        assert_eq!(req.path_without_query(), "/orders/7");
        req.path = "/orders#frag".into();
        assert_eq!(req.path_without_query(), "/orders");
        req.path = "/orders".into();
        assert_eq!(req.path_without_query(), "/orders");
    }

    /// Header values (credentials among them) and the query string never
    /// appear in `Debug` output, pretty or not; header names do.
    #[test]
    fn debug_never_shows_header_values() {
        let marker = "MARKER-s3cr3t-91c2";
        let req = HttpRequest {
            method: "GET".into(),
            path: format!("/orders/7?api_key={marker}"),
            headers: [
                ("authorization", format!("Bearer {marker}")),
                ("cookie", format!("session={marker}")),
                ("x-api-key", format!("pck_ci_{marker}")),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            ..Default::default()
        };
        for shown in [format!("{req:?}"), format!("{req:#?}")] {
            assert!(!shown.contains(marker), "{shown}");
            assert!(shown.contains("authorization") && shown.contains("x-api-key"));
            assert!(shown.contains("/orders/7?<redacted>"), "{shown}");
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_normalised() {
        assert_eq!(
            parse_source_ip("::ffff:10.1.2.3").unwrap().to_string(),
            "10.1.2.3"
        );
        assert_eq!(
            parse_source_ip("2001:db8::1").unwrap().to_string(),
            "2001:db8::1"
        );
        assert!(parse_source_ip("not an ip").is_none());
    }
}
