//! Workload identity: the SPIFFE ID of an mTLS peer, as Envoy reports it in
//! `attributes.source.principal`, turned into a principal on routes that allow it.

use super::{CredentialKind, VerifiedToken};
use crate::config::WorkloadConfig;

/// Accepted workload identities.
#[derive(Debug, Clone)]
pub struct WorkloadIdentities {
    principal_type: String,
    trust_domains: Vec<String>,
    asserting_callers: Vec<String>,
}

impl WorkloadIdentities {
    /// From the `[workload]` section.
    pub fn from_config(config: &WorkloadConfig) -> WorkloadIdentities {
        WorkloadIdentities {
            principal_type: config.principal_type.clone(),
            trust_domains: config
                .trust_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            asserting_callers: config
                .asserting_callers
                .iter()
                .map(|c| c.trim().to_owned())
                .collect(),
        }
    }

    /// Whether the mTLS caller `caller` (see `crate::tls::PeerInfo::caller`)
    /// may assert a workload identity in `IsAuthorized`: only one named in
    /// `[workload] asserting_callers`, compared exactly. Without mTLS there
    /// is no caller, and no one may.
    pub fn may_assert(&self, caller: Option<&str>) -> bool {
        caller.is_some_and(|caller| self.asserting_callers.iter().any(|c| c == caller))
    }

    /// The identity of a peer whose SPIFFE ID is in an accepted trust domain.
    pub fn identity(&self, peer_principal: &str) -> Option<VerifiedToken> {
        let domain = spiffe_trust_domain(peer_principal)?;
        if !self.trust_domains.iter().any(|d| d == &domain) {
            return None;
        }
        Some(VerifiedToken::principal_only(
            "workload",
            &self.principal_type,
            peer_principal,
            CredentialKind::Workload,
        ))
    }
}

/// The SPIFFE ID (URI SAN `spiffe://...`) of a peer certificate as Envoy sends
/// it with `include_peer_certificate`: URL-encoded PEM. `None` if there is not
/// exactly one SPIFFE URI (an X.509-SVID has one).
pub fn spiffe_id_from_certificate(url_encoded_pem: &str) -> Option<String> {
    let pem = percent_encoding::percent_decode_str(url_encoded_pem)
        .decode_utf8()
        .ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let certificate = pem.parse_x509().ok()?;
    let names = certificate.subject_alternative_name().ok()??;
    let mut spiffe = names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                Some((*uri).to_owned())
            }
            _ => None,
        });
    let first = spiffe.next()?;
    spiffe.next().is_none().then_some(first)
}

/// The lower-cased trust domain of a well-formed SPIFFE ID
/// (`spiffe://<trust-domain>/<path>`, no query, fragment, port or user info).
pub fn spiffe_trust_domain(id: &str) -> Option<String> {
    let rest = id.strip_prefix("spiffe://")?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    let path_ok = !path.contains(['?', '#']) && !path.split('/').any(|s| s == "." || s == "..");
    (domain_ok && path_ok).then(|| domain.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains_are_checked() {
        let ids = WorkloadIdentities {
            principal_type: "Workload".into(),
            trust_domains: vec!["cluster.local".into()],
            asserting_callers: vec!["spiffe://cluster.local/ns/mesh/sa/gateway".into()],
        };
        assert!(ids.may_assert(Some("spiffe://cluster.local/ns/mesh/sa/gateway")));
        assert!(!ids.may_assert(Some("spiffe://cluster.local/ns/mesh/sa/other")));
        assert!(!ids.may_assert(Some("spiffe://cluster.local/ns/mesh/sa/gateway/x")));
        assert!(!ids.may_assert(None));
        let ok = ids
            .identity("spiffe://cluster.local/ns/shop/sa/checkout")
            .unwrap();
        assert_eq!(
            ok.principal_id,
            "spiffe://cluster.local/ns/shop/sa/checkout"
        );
        assert!(
            ids.identity("spiffe://evil.example/ns/shop/sa/checkout")
                .is_none()
        );
        assert!(ids.identity("https://cluster.local/x").is_none());
        assert!(ids.identity("spiffe://cluster.local:8443/x").is_none());
        assert!(ids.identity("spiffe://cluster.local/a/../b").is_none());
    }
}
