//! SHA-256, the one digest Portcullis uses (aws-lc, the same library that
//! verifies signatures). Credentials are kept only as their digest (the
//! verified-token and introspection caches, API key hashes, the admin token);
//! content digests identify a policy set, TLS files and a decision's inputs.

use aws_lc_rs::digest::{Context, SHA256};

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&SHA256, bytes).as_ref());
    out
}

/// SHA-256 over a sequence of fields, each length-prefixed so that no two
/// different sequences hash the same bytes (`"ab", "c"` ≠ `"a", "bc"`).
pub(crate) struct FieldDigest(Context);

impl Default for FieldDigest {
    fn default() -> Self {
        FieldDigest(Context::new(&SHA256))
    }
}

impl FieldDigest {
    /// Adds one field.
    pub(crate) fn field(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
    }

    /// Adds a field that may be absent (absent ≠ empty).
    pub(crate) fn option(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            Some(bytes) => {
                self.0.update(&[1]);
                self.field(bytes);
            }
            None => self.0.update(&[0]),
        }
    }

    /// Adds a list of fields, then its length.
    pub(crate) fn list<'a>(&mut self, items: impl Iterator<Item = &'a [u8]>) {
        let mut count = 0u64;
        for item in items {
            self.field(item);
            count += 1;
        }
        self.0.update(&count.to_be_bytes());
    }

    /// The digest.
    pub(crate) fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_input() {
        // FIPS 180-2, appendix B.1.
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn fields_are_unambiguous() {
        let digest = |fields: &[&[u8]]| {
            let mut d = FieldDigest::default();
            for f in fields {
                d.field(f);
            }
            d.finish()
        };
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
        assert_ne!(digest(&[b""]), digest(&[]));
        let option = |o: Option<&[u8]>| {
            let mut d = FieldDigest::default();
            d.option(o);
            d.finish()
        };
        assert_ne!(option(None), option(Some(b"")));
        let list = |items: &[&[u8]], then: &[u8]| {
            let mut d = FieldDigest::default();
            d.list(items.iter().copied());
            d.field(then);
            d.finish()
        };
        assert_ne!(list(&[b"a"], b"b"), list(&[b"a", b"b"], b""));
    }
}
