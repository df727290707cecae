//! DPoP replay refusal across instances: two verifiers sharing one real
//! `redis-server` (started by the test harness). A proof accepted by one
//! instance is refused as a replay by the other, and with Redis down every
//! proof is refused (fail closed).

#[path = "common/redis.rs"]
mod redis_harness;

use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use portcullis::authn::dpop::{
    DpopError, DpopVerifier, ProofRequest, jwk_thumbprint, redis_client,
};
use portcullis::config::{Secret, SenderConstraintConfig};
use redis_harness::RedisServer;
use serde_json::{Value, json};

const NOW: i64 = 1_800_000_000;
const TOKEN: &str = "an-access-token";

/// A fresh P-256 proof key: its signing key, public JWK and thumbprint.
struct ProofKey {
    key: EncodingKey,
    jwk: Value,
    jkt: String,
}

impl ProofKey {
    fn generate() -> ProofKey {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let key = EncodingKey::from_ec_der(pkcs8.as_ref());
        let jwk =
            serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap()).unwrap();
        let jkt = jwk_thumbprint(&jwk).unwrap();
        ProofKey { key, jwk, jkt }
    }

    /// A valid proof for [`request`] with this `jti`.
    fn proof(&self, jti: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk});
        let ath = b64.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            TOKEN.as_bytes(),
        ));
        let claims = json!({
            "jti": jti,
            "htm": "GET",
            "htu": "https://api.example.com/things",
            "iat": NOW,
            "ath": ath,
        });
        let message = format!(
            "{}.{}",
            b64.encode(serde_json::to_vec(&header).unwrap()),
            b64.encode(serde_json::to_vec(&claims).unwrap())
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &self.key, Algorithm::ES256).unwrap();
        format!("{message}.{signature}")
    }
}

fn request(jkt: &str) -> ProofRequest<'_> {
    ProofRequest {
        method: "GET",
        scheme: "https",
        authority: "api.example.com",
        path: "/things?x=1",
        access_token: TOKEN,
        expected_jkt: jkt,
    }
}

/// An instance's verifier, sharing replays through the Redis at `url`.
fn instance(url: &str) -> DpopVerifier {
    let client = redis_client(&Secret::new(url)).unwrap();
    DpopVerifier::new(&SenderConstraintConfig::default())
        .unwrap()
        .with_shared_replay(client, "portcullis-test:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_accepted_by_one_instance_is_a_replay_at_another() {
    let redis = RedisServer::start();
    let (a, b) = (instance(&redis.url()), instance(&redis.url()));
    let key = ProofKey::generate();

    let proof = key.proof("first");
    let verified = a.verify(&proof, &request(&key.jkt), NOW).await.unwrap();
    assert_eq!(verified.jkt, key.jkt);
    assert_eq!(
        b.verify(&proof, &request(&key.jkt), NOW).await,
        Err(DpopError::Replayed)
    );
    // The same jti under a fresh signature is the same proof.
    assert_eq!(
        b.verify(&key.proof("first"), &request(&key.jkt), NOW).await,
        Err(DpopError::Replayed)
    );

    // Each instance accepts new proofs; the other then refuses them.
    let second = key.proof("second");
    assert!(b.verify(&second, &request(&key.jkt), NOW).await.is_ok());
    assert_eq!(
        a.verify(&second, &request(&key.jkt), NOW).await,
        Err(DpopError::Replayed)
    );

    // The key is namespaced and expires with the replay window (65 s by default).
    let keys = redis
        .command(&["KEYS", "portcullis-test:dpop:*"])
        .unwrap_or_default();
    assert!(keys.starts_with("*2\r\n"), "{keys:?}");
    let name = keys.lines().nth(2).unwrap_or_default().to_owned();
    let ttl = redis.command(&["PTTL", &name]).unwrap_or_default();
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap_or(-1);
    assert!((1..=65_000).contains(&ttl), "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed() {
    let mut redis = RedisServer::start();
    let (connected, fresh) = (instance(&redis.url()), instance(&redis.url()));
    let key = ProofKey::generate();
    assert!(
        connected
            .verify(&key.proof("before"), &request(&key.jkt), NOW)
            .await
            .is_ok()
    );

    redis.stop();
    // An instance whose connection broke, and one that never connected.
    for verifier in [&connected, &fresh] {
        let started = std::time::Instant::now();
        assert_eq!(
            verifier
                .verify(&key.proof(&uuid()), &request(&key.jkt), NOW)
                .await,
            Err(DpopError::ReplayCheckFailed)
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    // Back up: the instances reconnect by themselves.
    redis.restart();
    for verifier in [&connected, &fresh] {
        assert!(
            verifier
                .verify(&key.proof(&uuid()), &request(&key.jkt), NOW)
                .await
                .is_ok()
        );
    }
}

fn uuid() -> String {
    uuid::Uuid::now_v7().to_string()
}
