//! The loopback identity provider of `tests/common/idp.rs`, checked over real
//! HTTPS with a client that trusts only its CA file.

mod common;

use std::time::Duration;

use common::idp::TestIdp;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn client_trusting(idp: &TestIdp) -> reqwest::Client {
    let pem = std::fs::read(idp.ca_file()).unwrap();
    let ca = reqwest::Certificate::from_pem(&pem).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .https_only(true)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn get_json(client: &reqwest::Client, url: &str) -> (StatusCode, Option<String>, Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status();
    let cache_control = response
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, cache_control, body)
}

#[tokio::test]
async fn discovery_names_the_idps_own_endpoints() {
    let idp = TestIdp::start().await;
    assert!(idp.issuer().starts_with("https://127.0.0.1:"));
    let client = client_trusting(&idp);

    let (status, _, doc) = get_json(&client, &idp.discovery_uri()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["issuer"], idp.issuer());
    assert_eq!(doc["jwks_uri"], idp.jwks_uri());
    assert_eq!(doc["introspection_endpoint"], idp.introspection_uri());
    assert_eq!(idp.discovery_fetches(), 1);
    assert_eq!(
        format!("{}/.well-known/openid-configuration", idp.issuer()),
        idp.discovery_uri()
    );

    idp.set_discovery(Some(json!({"issuer": "https://elsewhere.test"})));
    let (_, _, doc) = get_json(&client, &idp.discovery_uri()).await;
    assert_eq!(doc["issuer"], "https://elsewhere.test");
}

#[tokio::test]
async fn jwks_serves_what_was_set_with_cache_control_and_counts() {
    let idp = TestIdp::start().await;
    let client = client_trusting(&idp);
    assert_eq!(idp.jwks_uri(), format!("{}/jwks", idp.issuer()));

    let (status, cache_control, doc) = get_json(&client, &idp.jwks_uri()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cache_control, None);
    assert_eq!(doc, json!({"keys": []}));

    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]});
    idp.set_jwks(jwks.clone());
    idp.set_max_age(Some(300));
    let (status, cache_control, doc) = get_json(&client, &idp.jwks_uri()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cache_control.as_deref(), Some("public, max-age=300"));
    assert_eq!(doc, jwks);
    assert_eq!(idp.jwks_fetches(), 2);

    // The certificate also names `localhost`.
    let localhost = idp.jwks_uri().replace("127.0.0.1", "localhost");
    let (status, _, doc) = get_json(&client, &localhost).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc, jwks);
}

#[tokio::test]
async fn introspection_requires_client_credentials_and_answers_per_token() {
    let idp = TestIdp::start().await;
    let client = client_trusting(&idp);
    idp.set_client_credentials("portcullis", "s3cret");
    let active =
        json!({"active": true, "sub": "svc-a", "scope": "orders:read", "exp": 4102444800u64});
    idp.set_introspection("opaque-1", active.clone());

    let post = |token: &str, auth: Option<(&str, &str)>| {
        let mut request = client
            .post(idp.introspection_uri())
            .form(&[("token", token)]);
        if let Some((id, secret)) = auth {
            request = request.basic_auth(id, Some(secret));
        }
        request.send()
    };

    let response = post("opaque-1", None).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("www-authenticate"));
    let response = post("opaque-1", Some(("portcullis", "wrong")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let response = post("opaque-1", Some(("portcullis", "s3cret")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), active);

    let response = post("opaque-2", Some(("portcullis", "s3cret")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"active": false})
    );

    let response = client
        .post(idp.introspection_uri())
        .basic_auth("portcullis", Some("s3cret"))
        .form(&[("token_type_hint", "access_token")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    assert_eq!(idp.introspection_calls(), 5);
}

#[tokio::test]
async fn down_answers_503_everywhere_until_back_up() {
    let idp = TestIdp::start().await;
    let client = client_trusting(&idp);
    idp.set_down(true);
    for url in [idp.discovery_uri(), idp.jwks_uri()] {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{url}");
    }
    let response = client
        .post(idp.introspection_uri())
        .form(&[("token", "t")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(idp.jwks_fetches(), 1, "a 503 still counts as a fetch");

    idp.set_down(false);
    let (status, _, _) = get_json(&client, &idp.jwks_uri()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_slow_idp_times_the_client_out() {
    let idp = TestIdp::start().await;
    idp.set_delay(Some(Duration::from_secs(5)));
    let pem = std::fs::read(idp.ca_file()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = client.get(idp.jwks_uri()).send().await.unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused() {
    let idp = TestIdp::start().await;
    // Trusts another, unrelated test CA only.
    let other = TestIdp::start().await;
    let client = client_trusting(&other);
    let error = client.get(idp.jwks_uri()).send().await.unwrap_err();
    assert!(error.is_connect(), "{error:?}");
    assert_eq!(idp.jwks_fetches(), 0);
}

#[tokio::test]
async fn a_dropped_idp_answers_nobody_not_even_on_kept_alive_connections() {
    let idp = TestIdp::start().await;
    let client = client_trusting(&idp);
    let url = idp.jwks_uri();
    let (status, _, _) = get_json(&client, &url).await;
    assert_eq!(status, StatusCode::OK);
    drop(idp);
    // Give the aborted tasks a moment to close their sockets; the assertion does
    // not depend on it (a refused or reset connection is an error either way).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(client.get(&url).send().await.is_err());
}
