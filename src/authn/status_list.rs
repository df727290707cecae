//! OAuth Token Status List (draft-ietf-oauth-status-list): fetching, caching
//! and reading the lists that tokens' `status.status_list` claims point to.
//! (Being written.)

/// A token's `status.status_list` claim: which entry of which list holds its status.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatusReference {
    /// `uri`: where the Status List Token is fetched.
    pub uri: String,
    /// `idx`: the token's entry in the list.
    pub idx: u64,
}
