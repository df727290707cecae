//! What the stages' unit tests share: a real configuration around the shipped
//! policies, with a throw-away ES256 issuer key and one route.

use std::collections::HashMap;

use serde_json::json;

use crate::attributes::HttpRequest;
use crate::authn::mint::SigningKey;
use crate::config::Config;

/// A fixed "now" for tests that need no real clock (2030).
pub(crate) const NOW: i64 = 1_900_000_000;

/// A configuration in a temporary folder and the issuer's signing key.
pub(crate) struct Setup {
    _dir: tempfile::TempDir,
    /// The loaded configuration.
    pub(crate) config: Config,
    /// The issuer's ES256 key (`kid` `k1`).
    pub(crate) key: SigningKey,
}

/// A config around the shipped policies; `application` lines go under
/// `[application]`.
pub(crate) fn setup(application: &str) -> Setup {
    setup_with(application, "", &[])
}

/// [`setup`], with `issuer` lines appended to the issuer's table (its
/// sub-tables too, e.g. `[issuers.introspection]`) and `files` (name, text)
/// written beside the configuration before it loads.
pub(crate) fn setup_with(application: &str, issuer: &str, files: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let key = SigningKey::generate_es256(Some("k1".into())).unwrap();
    std::fs::write(
        dir.path().join("jwks.json"),
        serde_json::to_string(&key.public_jwks()).unwrap(),
    )
    .unwrap();
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[policies]
dir = "{policies}"
watch = false

[application]
name = "orders"
{application}

[[issuers]]
issuer = "https://idp.test"
audiences = ["orders-api"]
jwks_file = "jwks.json"
max_token_lifetime = "1h"
roles_claim = "roles"
{issuer}

[[routes]]
method = "GET"
path = "/orders/{{id}}"
"#
    );
    std::fs::write(dir.path().join("portcullis.toml"), toml).unwrap();
    let config = Config::load(&dir.path().join("portcullis.toml")).unwrap();
    Setup {
        _dir: dir,
        config,
        key,
    }
}

impl Setup {
    /// A token of `alice` (`jti` `t1`) with `scope`, issued at `iat`.
    pub(crate) fn token(&self, scope: &str, iat: i64, exp: i64) -> String {
        self.key
            .sign_claims(&json!({
                "iss": "https://idp.test",
                "aud": "orders-api",
                "sub": "alice",
                "jti": "t1",
                "scope": scope,
                "iat": iat,
                "exp": exp,
            }))
            .unwrap()
    }
}

/// `GET path` with the token as a bearer credential.
pub(crate) fn request(path: &str, token: Option<&str>) -> HttpRequest {
    let mut headers = HashMap::new();
    if let Some(token) = token {
        headers.insert("authorization".to_owned(), format!("Bearer {token}"));
    }
    HttpRequest {
        method: "GET".into(),
        path: path.into(),
        host: "orders.test".into(),
        scheme: "https".into(),
        headers,
        ..Default::default()
    }
}
