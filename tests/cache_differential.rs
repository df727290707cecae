//! "A cache never changes a decision": long random streams of requests, token
//! expiries (the clock moves, also backwards), revocations (by jti, subject and
//! key) and policy swaps, decided by engines with caches on and off; every
//! decision must be identical.

mod common;

use common::*;
use portcullis::attributes::HttpRequest;
use portcullis::engine::Engine;
use portcullis::revocation::{RevocationStore, Target};
use serde_json::json;
use std::sync::Arc;

/// A small deterministic PRNG (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn engines(fx: &Fixture) -> (Engine, Engine) {
    let mut cached = fx.config();
    cached.cache.tokens = true;
    cached.cache.decisions = true;
    let mut uncached = fx.config();
    uncached.cache.tokens = false;
    uncached.cache.decisions = false;
    (
        Engine::from_config(&cached).unwrap(),
        Engine::from_config(&uncached).unwrap(),
    )
}

/// Extra policies that read the context, so caching keyed on too little would show.
const EXTRA: &str = r#"
@id("no-order-13")
forbid (principal, action == Action::"get /orders/{id}", resource)
when { context.path_params.id == "13" };

@id("hosts")
forbid (principal, action, resource) when { context.http.host == "blocked.example.test" };

@id("jti-x")
forbid (principal, action, resource) when { context.token has jti && context.token.jti == "x" };
"#;

#[tokio::test]
async fn caches_never_change_a_decision() {
    let set_a = Fixture::new();
    std::fs::write(set_a.path("policies/extra.cedar"), EXTRA).unwrap();
    // Set B: same keys, different policies (reads allowed only for admins).
    let set_b = Fixture::with_keys(vec![]);
    std::fs::copy(set_a.path("jwks.json"), set_b.path("jwks.json")).unwrap();
    std::fs::write(
        set_b.path("policies/orders.cedar"),
        "@id(\"admins-only\")\npermit (principal in Role::\"admin\", action, resource);\n",
    )
    .unwrap();
    // One revocation store (embedded, journaled) checked by all four engines:
    // a revocation is a fact every engine must enforce, caches or not.
    set_a.append_config("\n[revocation]\ndata_dir = \"data\"\n");
    let config = set_a.config();
    let revocations = RevocationStore::open(&config.revocation, config.token_lifetimes())
        .await
        .unwrap();
    let with = |(cached, plain): (Engine, Engine)| {
        (
            cached.with_revocations(Arc::clone(&revocations)),
            plain.with_revocations(Arc::clone(&revocations)),
        )
    };
    let (a_cached, a_plain) = with(engines(&set_a));
    let (b_cached, b_plain) = with(engines(&set_b));

    let start = now();
    let key = set_a.es256();
    let mut tokens: Vec<Option<String>> = vec![None, Some("garbage".into())];
    for i in 0..40 {
        let mut c = claims(
            &format!("user{}", i % 7),
            &[["orders:read"], ["orders:write"]][i % 2],
            if i % 5 == 0 { &["admin"] } else { &[] },
        );
        c["iat"] = json!(start + (i as i64 % 4) * 30 - 60);
        c["exp"] = json!(start + 300 + (i as i64) * 30);
        if i % 6 == 0 {
            c["nbf"] = json!(start + 100);
        }
        // Half the tokens carry a jti (revocable one by one); the others share
        // decision-cache entries between tokens of the same user.
        if i % 9 == 0 {
            c["jti"] = json!("x");
        } else if i % 2 == 0 {
            c["jti"] = json!(format!("t{i}"));
        }
        tokens.push(Some(set_a.keys[i % 3].sign(&c)));
    }
    tokens.push(Some(key.impostor_of().token(
        "mallory",
        &["orders:read"],
        &["admin"],
    )));
    let routes = [
        ("GET", "/orders"),
        ("GET", "/orders/7"),
        ("GET", "/orders/13"),
        ("GET", "/orders/13?x=1"),
        ("POST", "/orders"),
        ("DELETE", "/orders/9"),
        ("GET", "/nowhere"),
        ("GET", "/orders/../x"),
    ];
    let hosts = ["orders.example.test", "blocked.example.test"];
    let ips = [None, Some("10.0.0.1"), Some("203.0.113.7")];

    let mut rng = Rng(0x5eed_cafe_f00d_1234);
    let mut clock = start;
    let mut use_b = false;
    let mut compared = 0;
    let mut revoked = 0;
    for step in 0..6000 {
        match rng.below(1000) {
            0..=29 => use_b = !use_b,                  // policy swap
            30..=69 => clock += rng.below(120) as i64, // time passes
            70..=79 => clock -= rng.below(100) as i64, // and a clock skews back
            80..=84 => clock = start,                  // replay the window
            // Revocations: one token, every token of a subject issued so far,
            // and (once, late) every token of one signing key.
            85..=89 => {
                let jti = format!("t{}", 2 * rng.below(20));
                revocations
                    .revoke(Target::Token { jti, issuer: None }, None, "test".into())
                    .await
                    .unwrap();
            }
            90 => {
                let sub = format!("user{}", rng.below(3));
                revocations
                    .revoke(
                        Target::Subject {
                            sub,
                            issued_before: clock - 30,
                        },
                        None,
                        "test".into(),
                    )
                    .await
                    .unwrap();
            }
            91 if step > 4500 => {
                let kid = set_a.keys[2].kid().to_owned();
                revocations
                    .revoke(
                        Target::Key {
                            kid,
                            issued_before: None,
                        },
                        None,
                        "test".into(),
                    )
                    .await
                    .unwrap();
            }
            _ => {}
        }
        let (method, path) = *rng.pick(&routes);
        let mut http = HttpRequest {
            method: method.into(),
            path: path.into(),
            host: (*rng.pick(&hosts)).into(),
            scheme: "https".into(),
            source_ip: rng.pick(&ips).map(|ip| ip.parse().unwrap()),
            ..Default::default()
        };
        if let Some(token) = rng.pick(&tokens) {
            http.headers
                .insert("authorization".into(), format!("Bearer {token}"));
        }
        let (cached, plain) = if use_b {
            (&b_cached, &b_plain)
        } else {
            (&a_cached, &a_plain)
        };
        let got = cached.decide_at(&http, clock).await;
        let want = plain.decide_at(&http, clock).await;
        assert_eq!(
            (
                got.verdict,
                &got.principal,
                &got.action,
                &got.policies,
                &got.errors
            ),
            (
                want.verdict,
                &want.principal,
                &want.action,
                &want.policies,
                &want.errors
            ),
            "step {step}: {method} {path} at {clock}"
        );
        compared += 1;
        if got.verdict.class() == "revoked" {
            revoked += 1;
        }
    }
    assert_eq!(compared, 6000);
    // Revocations landed on tokens the caches had seen.
    assert!(revoked > 100, "only {revoked} revoked decisions");
    // The caches were really used, or the comparison proves nothing.
    use std::sync::atomic::Ordering::Relaxed;
    let token_hits = |e: &Engine| e.authenticator().token_cache().hits.load(Relaxed);
    let decision_hits = a_cached.evaluator().decision_cache().hits.load(Relaxed);
    assert!(token_hits(&a_cached) > 500, "{}", token_hits(&a_cached));
    assert!(decision_hits > 200, "{decision_hits}");
    assert_eq!(token_hits(&a_plain), 0);
}

/// The same for direct (`IsAuthorized`) requests: random identities, actions,
/// contexts and extra attributes through engines with caches on and off.
#[tokio::test]
async fn caches_never_change_a_direct_decision() {
    use portcullis::authz::mapping::{DirectEntity, DirectRequest};
    let fx = Fixture::new();
    std::fs::write(fx.path("policies/extra.cedar"), EXTRA).unwrap();
    let (cached, uncached) = engines(&fx);
    let key = fx.es256();
    let tokens = [
        key.token("alice", &["orders:read"], &[]),
        key.token("bob", &["orders:write"], &["admin"]),
        key.token("carol", &[], &[]),
        key.sign(&{
            let mut c = claims("dave", &["orders:read"], &[]);
            c["jti"] = json!("x");
            c
        }),
    ];
    let mut rng = Rng(0x5eed_1234);
    let now = now();
    let mut allowed = 0;
    for _ in 0..2000 {
        let token = rng.pick(&tokens);
        let (method, template) = *rng.pick(&[
            ("GET", "/orders"),
            ("GET", "/orders/{id}"),
            ("POST", "/orders"),
            ("DELETE", "/orders/{id}"),
        ]);
        let id = rng.pick(&["7", "13"]).to_string();
        let host = *rng.pick(&["orders.example.test", "blocked.example.test"]);
        let params = if template.contains("{id}") {
            json!({ "id": id })
        } else {
            json!({})
        };
        let context = json!({
            "http": { "method": method, "path": template.replace("{id}", &id), "host": host, "scheme": "https" },
            "path_params": params,
        });
        let request = DirectRequest {
            caller: None,
            action: format!("{} {template}", method.to_ascii_lowercase()),
            resource: DirectEntity {
                entity_type: "Application".into(),
                id: "orders".into(),
                ..Default::default()
            },
            context: context.as_object().unwrap().clone(),
            entities: Vec::new(),
        };
        let credential = portcullis::authn::credential::PresentedCredential::Bearer(token);
        let a = cached.authenticator().authenticate(credential, now).await;
        let b = uncached.authenticator().authenticate(credential, now).await;
        let a = cached.decide_direct(&a, &request).unwrap();
        let b = uncached.decide_direct(&b, &request).unwrap();
        assert_eq!(
            (a.verdict, &a.policies, &a.errors, &a.principal),
            (b.verdict, &b.policies, &b.errors, &b.principal),
            "{request:?}"
        );
        allowed += usize::from(a.verdict.is_allow());
    }
    assert!(
        allowed > 100 && allowed < 1900,
        "{allowed} allowed: a varied stream"
    );
    assert!(
        cached
            .evaluator()
            .decision_cache()
            .hits
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// The decision key covers only the context the policies can read: with the
/// quickstart's policies (they read `token.scopes` and `http.source_ip`), two
/// order ids or two hosts share one cached decision; once a policy reads
/// `path_params.id`, each id has its own.
#[tokio::test]
async fn decisions_are_shared_across_context_fields_no_policy_reads() {
    let hits = |engine: &Engine| {
        engine
            .evaluator()
            .decision_cache()
            .hits
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let request = |token: &str, path: &str, host: &str, ip: &str| {
        let mut http = HttpRequest {
            method: "GET".into(),
            path: path.into(),
            host: host.into(),
            scheme: "https".into(),
            source_ip: Some(ip.parse().unwrap()),
            ..Default::default()
        };
        http.headers
            .insert("authorization".into(), format!("Bearer {token}"));
        http
    };

    let quickstart = Fixture::new();
    let (engine, _) = engines(&quickstart);
    let token = quickstart.es256().token("alice", &["orders:read"], &[]);
    let first = engine
        .decide(&request(&token, "/orders/1", "a.example.test", "10.0.0.1"))
        .await;
    assert!(first.verdict.is_allow());
    assert_eq!(hits(&engine), 0);
    let other_id = engine
        .decide(&request(&token, "/orders/2", "b.example.test", "10.0.0.1"))
        .await;
    assert!(other_id.verdict.is_allow());
    assert_eq!(hits(&engine), 1, "id and host are read by no policy");
    // The source address is read (the blocked-network forbid): a new key.
    engine
        .decide(&request(&token, "/orders/2", "b.example.test", "10.0.0.2"))
        .await;
    assert_eq!(hits(&engine), 1, "source_ip is read");

    let reads_ids = Fixture::new();
    std::fs::write(reads_ids.path("policies/extra.cedar"), EXTRA).unwrap();
    let (engine, _) = engines(&reads_ids);
    let token = reads_ids.es256().token("alice", &["orders:read"], &[]);
    let seven = engine
        .decide(&request(&token, "/orders/7", "a.example.test", "10.0.0.1"))
        .await;
    let thirteen = engine
        .decide(&request(&token, "/orders/13", "a.example.test", "10.0.0.1"))
        .await;
    assert!(seven.verdict.is_allow());
    assert!(!thirteen.verdict.is_allow(), "the id-13 forbid applies");
    assert_eq!(hits(&engine), 0, "path_params.id is read");
}
