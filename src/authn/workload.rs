//! Workload identity: the SPIFFE ID of an mTLS peer, as Envoy reports it in
//! `attributes.source.principal`, turned into a principal on routes that allow it.

use super::{CredentialKind, VerifiedToken};
use crate::config::WorkloadConfig;

/// Accepted workload identities.
#[derive(Debug, Clone)]
pub struct WorkloadIdentities {
    principal_type: String,
    trust_domains: Vec<String>,
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
        }
    }

    /// The identity of a peer whose SPIFFE ID is in an accepted trust domain.
    pub fn identity(&self, peer_principal: &str) -> Option<VerifiedToken> {
        let domain = spiffe_trust_domain(peer_principal)?;
        if !self.trust_domains.iter().any(|d| d == &domain) {
            return None;
        }
        Some(VerifiedToken {
            issuer: "workload".into(),
            subject: peer_principal.to_owned(),
            principal_type: self.principal_type.clone(),
            principal_id: peer_principal.to_owned(),
            jti: None,
            issued_at: 0,
            expires_at: 0,
            scopes: Vec::new(),
            roles: Vec::new(),
            client_id: None,
            key_id: String::new(),
            api_key_id: None,
            credential: CredentialKind::Workload,
        })
    }
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
        };
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
