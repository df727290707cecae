//! Many issuers with their own rules, and workload (SPIFFE) identities, through
//! the real `Check` RPC.

mod common;

use common::*;
use serde_json::json;

const MACHINES: &str = "https://machines.example.test";

impl Fixture {
    fn edit_config(&self, from: &str, to: &str) {
        let config = std::fs::read_to_string(self.config_path()).unwrap();
        assert!(config.contains(from), "config lacks {from:?}");
        std::fs::write(self.config_path(), config.replacen(from, to, 1)).unwrap();
    }
}

/// A second issuer for machine tokens: principal `Client::"<client_id>"`.
fn with_machine_issuer(fx: &Fixture, machine_key: &TestKey, extra: &str) {
    let jwks = json!({ "keys": [machine_key.public_jwk()] });
    std::fs::write(fx.path("machines.json"), jwks.to_string()).unwrap();
    // Issuer tables must precede [[routes]] only by TOML rules of arrays of
    // tables, which accept any order; append at the end.
    fx.append_config(&format!(
        r#"
[[issuers]]
issuer = "{MACHINES}"
audiences = ["orders-machines"]
jwks_file = "machines.json"
max_token_lifetime = "5m"
principal_type = "Client"
principal_claim = "client_id"
algorithms = ["ES256"]
{extra}
"#
    ));
}

fn machine_claims(client_id: &str) -> serde_json::Value {
    let now = now();
    json!({
        "iss": MACHINES,
        "aud": "orders-machines",
        "client_id": client_id,
        "iat": now,
        "exp": now + 120,
        "scope": "orders:read",
    })
}

#[tokio::test]
async fn two_issuers_with_their_own_audiences_and_principal_types() {
    let fx = Fixture::new();
    let machine_key = TestKey::es256();
    with_machine_issuer(&fx, &machine_key, "");
    let server = fx.serve().await;

    // A machine token: principal Client::"billing", no `sub` needed.
    let token = machine_key.sign(&machine_claims("billing"));
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 200);
    assert_eq!(out.metadata["principal"], "Client::\"billing\"");

    // The user issuer's audience is not the machine issuer's.
    let mut wrong_aud = machine_claims("billing");
    wrong_aud["aud"] = json!("orders-api");
    let out = outcome(
        &server
            .check(envoy_request(
                "GET",
                "/orders",
                Some(&machine_key.sign(&wrong_aud)),
            ))
            .await,
    );
    assert_eq!(fx.audit_line(&out.decision_id)["reason"], "wrong_audience");

    // Keys are per issuer: the user issuer's key cannot sign machine tokens.
    let cross = fx.es256().sign(&machine_claims("billing"));
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders", Some(&cross)))
            .await,
    );
    assert_eq!(fx.audit_line(&out.decision_id)["reason"], "unknown_key");

    // Per-issuer lifetime: 5 minutes here, 1 hour for users.
    let mut long = machine_claims("billing");
    long["exp"] = json!(now() + 600);
    let out = outcome(
        &server
            .check(envoy_request(
                "GET",
                "/orders",
                Some(&machine_key.sign(&long)),
            ))
            .await,
    );
    assert_eq!(
        fx.audit_line(&out.decision_id)["reason"],
        "lifetime_too_long"
    );

    // No client_id: the principal claim is missing.
    let mut anonymous = machine_claims("billing");
    anonymous.as_object_mut().unwrap().remove("client_id");
    let out = outcome(
        &server
            .check(envoy_request(
                "GET",
                "/orders",
                Some(&machine_key.sign(&anonymous)),
            ))
            .await,
    );
    assert_eq!(fx.audit_line(&out.decision_id)["reason"], "missing_claim");

    // Users still work.
    let user = fx.es256().token("alice", &["orders:read"], &[]);
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders", Some(&user)))
            .await,
    );
    assert_eq!(out.metadata["principal"], "User::\"alice\"");
}

#[tokio::test]
async fn per_issuer_algorithms_token_type_and_required_claims() {
    let fx = Fixture::new();
    let machine_key = TestKey::es256();
    let rsa_machine_key = TestKey::rs256();
    let jwks = json!({ "keys": [machine_key.public_jwk(), rsa_machine_key.public_jwk()] });
    with_machine_issuer(
        &fx,
        &machine_key,
        "token_type = \"at+jwt\"\nrequired_claims = [\"jti\"]",
    );
    std::fs::write(fx.path("machines.json"), jwks.to_string()).unwrap();
    let server = fx.serve().await;

    let sign_at_jwt = |key: &TestKey, claims: &serde_json::Value, typ: &str| {
        let mut header = jsonwebtoken::Header::new(key.algorithm);
        header.kid = Some(key.kid().to_owned());
        header.typ = Some(typ.to_owned());
        let encoding = match key.algorithm {
            jsonwebtoken::Algorithm::ES256 => {
                jsonwebtoken::EncodingKey::from_ec_pem(key.pem.as_bytes())
            }
            _ => jsonwebtoken::EncodingKey::from_rsa_pem(key.pem.as_bytes()),
        }
        .unwrap();
        jsonwebtoken::encode(&header, claims, &encoding).unwrap()
    };
    let mut claims = machine_claims("billing");
    claims["jti"] = json!("m-1");

    let ok = sign_at_jwt(&machine_key, &claims, "at+jwt");
    assert_eq!(
        outcome(
            &server
                .check(envoy_request("GET", "/orders", Some(&ok)))
                .await
        )
        .http_status,
        200
    );
    let media_type = sign_at_jwt(&machine_key, &claims, "application/at+jwt");
    assert_eq!(
        outcome(
            &server
                .check(envoy_request("GET", "/orders", Some(&media_type)))
                .await
        )
        .http_status,
        200
    );

    let cases = [
        (
            sign_at_jwt(&machine_key, &claims, "JWT"),
            "wrong_token_type",
        ),
        // RS256 is a strong algorithm, but this issuer only accepts ES256.
        (
            sign_at_jwt(&rsa_machine_key, &claims, "at+jwt"),
            "unsupported_algorithm",
        ),
        (
            sign_at_jwt(&machine_key, &machine_claims("billing"), "at+jwt"),
            "missing_claim",
        ),
    ];
    for (token, reason) in cases {
        let out = outcome(
            &server
                .check(envoy_request("GET", "/orders", Some(&token)))
                .await,
        );
        assert_eq!(out.http_status, 401, "{reason}");
        assert_eq!(fx.audit_line(&out.decision_id)["reason"], reason);
    }
}

const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";

fn workload_request(
    method: &str,
    path: &str,
    spiffe_id: &str,
    token: Option<&str>,
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    let mut request = envoy_request(method, path, token);
    request
        .attributes
        .as_mut()
        .unwrap()
        .source
        .as_mut()
        .unwrap()
        .principal = spiffe_id.into();
    request
}

#[tokio::test]
async fn spiffe_workloads_are_principals_on_routes_that_allow_them() {
    let fx = Fixture::new();
    fx.edit_config(
        "method = \"GET\"\npath = \"/orders\"\n",
        "method = \"GET\"\npath = \"/orders\"\nallow_workload = true\n",
    );
    fx.append_config("\n[workload]\ntrust_domains = [\"cluster.local\"]\n");
    std::fs::write(
        fx.path("policies/workloads.cedar"),
        format!(
            "@id(\"checkout-lists-orders\")\npermit (principal == Workload::\"{CHECKOUT}\", action == Action::\"get /orders\", resource);\n\n\
             @id(\"writes-only-from-checkout\")\nforbid (principal, action == Action::\"post /orders\", resource)\nunless {{ context has workload && context.workload == \"{CHECKOUT}\" }};\n"
        ),
    )
    .unwrap();
    let server = fx.serve().await;

    // Allowed by policy, with no token at all.
    let out = outcome(
        &server
            .check(workload_request("GET", "/orders", CHECKOUT, None))
            .await,
    );
    assert_eq!(out.http_status, 200);
    assert_eq!(
        out.metadata["principal"],
        format!("Workload::\"{CHECKOUT}\"")
    );
    assert_eq!(fx.audit_line(&out.decision_id)["credential"], "workload");

    // Another workload of the trust domain: authenticated, but no policy permits it.
    let other = "spiffe://cluster.local/ns/shop/sa/cart";
    let out = outcome(
        &server
            .check(workload_request("GET", "/orders", other, None))
            .await,
    );
    assert_eq!(out.http_status, 403);
    assert_eq!(fx.audit_line(&out.decision_id)["reason"], "policy_denied");

    // A foreign trust domain is no identity at all.
    let foreign = "spiffe://evil.example/ns/shop/sa/checkout";
    let out = outcome(
        &server
            .check(workload_request("GET", "/orders", foreign, None))
            .await,
    );
    assert_eq!(out.http_status, 401);

    // Routes that do not allow workloads still need a credential.
    let out = outcome(
        &server
            .check(workload_request("GET", "/orders/7", CHECKOUT, None))
            .await,
    );
    assert_eq!(out.http_status, 401);

    // With a token, the peer identity is in the context: writes only via checkout.
    let writer = fx.es256().token("bob", &["orders:write"], &[]);
    let via_checkout = outcome(
        &server
            .check(workload_request("POST", "/orders", CHECKOUT, Some(&writer)))
            .await,
    );
    assert_eq!(via_checkout.http_status, 200);
    let direct = outcome(
        &server
            .check(envoy_request("POST", "/orders", Some(&writer)))
            .await,
    );
    assert_eq!(direct.http_status, 403);
    assert_eq!(
        direct.metadata["policies"],
        json!(["writes-only-from-checkout"])
    );
}

#[tokio::test]
async fn principals_of_a_type_an_action_does_not_declare_are_denied_unevaluated() {
    let fx = Fixture::new();
    let machine_key = TestKey::es256();
    with_machine_issuer(&fx, &machine_key, "");
    // "get /orders" (the first action of the schema) applies to users only now.
    let schema_path = fx.path("policies/orders.cedarschema");
    let schema = std::fs::read_to_string(&schema_path).unwrap();
    std::fs::write(
        &schema_path,
        schema.replacen(
            "principal: [User, Client, Workload]",
            "principal: [User]",
            1,
        ),
    )
    .unwrap();
    let server = fx.serve().await;
    // "orders-read" permits any principal with the scope; a Client must still not
    // get in through an action the schema does not give it.
    let token = machine_key.sign(&machine_claims("billing"));
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 403);
    assert_eq!(fx.audit_line(&out.decision_id)["reason"], "schema_mismatch");
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders/7", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 200);
}

/// Envoy with `include_peer_certificate` but no verified `source.principal`:
/// the SPIFFE ID comes from the certificate's URI SAN.
#[tokio::test]
async fn spiffe_id_is_read_from_the_peer_certificate() {
    let fx = Fixture::new();
    fx.edit_config(
        "method = \"GET\"\npath = \"/orders\"\n",
        "method = \"GET\"\npath = \"/orders\"\nallow_workload = true\n",
    );
    fx.append_config("\n[workload]\ntrust_domains = [\"cluster.local\"]\n");
    std::fs::write(
        fx.path("policies/workloads.cedar"),
        format!("permit (principal == Workload::\"{CHECKOUT}\", action == Action::\"get /orders\", resource);\n"),
    )
    .unwrap();
    let server = fx.serve().await;

    let certificate = |uri: &str| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        percent_encoding::utf8_percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let with_certificate = |uri: &str| {
        let mut request = envoy_request("GET", "/orders", None);
        request
            .attributes
            .as_mut()
            .unwrap()
            .source
            .as_mut()
            .unwrap()
            .certificate = certificate(uri);
        request
    };
    let out = outcome(&server.check(with_certificate(CHECKOUT)).await);
    assert_eq!(out.http_status, 200);
    assert_eq!(
        out.metadata["principal"],
        format!("Workload::\"{CHECKOUT}\"")
    );
    let out = outcome(
        &server
            .check(with_certificate("spiffe://cluster.local/ns/shop/sa/cart"))
            .await,
    );
    assert_eq!(out.http_status, 403);
    let out = outcome(
        &server
            .check(with_certificate(
                "spiffe://evil.example/ns/shop/sa/checkout",
            ))
            .await,
    );
    assert_eq!(out.http_status, 401);
}
