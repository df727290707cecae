//! The pipeline over a real configuration: a throw-away ES256 key, the
//! shipped policies, one route.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::json;

use super::*;
use crate::test_setup::{NOW, request, setup};

#[tokio::test]
async fn each_stage_answers_with_its_own_reason() {
    let setup = setup("");
    let engine = Engine::from_config(&setup.config).unwrap();
    let reader = setup.token("orders:read", NOW - 10, NOW + 600);
    let writer = setup.token("orders:write", NOW - 10, NOW + 600);
    let expired = setup.token("orders:read", NOW - 1200, NOW - 600);

    let decide = |path: &'static str, token: Option<String>| {
        let engine = &engine;
        async move {
            engine
                .decide_at(&request(path, token.as_deref()), NOW)
                .await
        }
    };
    let allowed = decide("/orders/7", Some(reader.clone())).await;
    assert_eq!(allowed.verdict, Verdict::Allow);
    assert_eq!(allowed.subject.as_deref(), Some("alice"));
    assert_eq!(&*allowed.policies, ["orders-read".to_owned()]);
    assert_eq!(allowed.policy_generation, 1);

    let denied = decide("/orders/7", Some(writer.clone())).await;
    assert_eq!(denied.verdict, Verdict::Deny(DenyReason::PolicyDenied));

    let anonymous = decide("/orders/7", None).await;
    assert_eq!(
        anonymous.verdict,
        Verdict::Deny(DenyReason::Unauthenticated(TokenError::Missing))
    );
    let late = decide("/orders/7", Some(expired)).await;
    assert_eq!(
        late.verdict,
        Verdict::Deny(DenyReason::Unauthenticated(TokenError::Expired))
    );
    // No route: reported only to an authenticated caller.
    let unrouted = decide("/invoices", Some(reader.clone())).await;
    assert_eq!(unrouted.verdict, Verdict::Deny(DenyReason::NoRoute));
    let unrouted_anonymous = decide("/invoices", None).await;
    assert_eq!(
        unrouted_anonymous.verdict,
        Verdict::Deny(DenyReason::Unauthenticated(TokenError::Missing))
    );
    let dotted = decide("/orders/../admin", Some(reader)).await;
    assert_eq!(
        dotted.verdict,
        Verdict::Deny(DenyReason::BadRequest(BadRequest::NonCanonicalPath))
    );
}

#[tokio::test]
async fn a_policy_reload_keeps_the_credential_stage_and_starts_a_new_decision_cache() {
    let setup = setup("");
    let engine = Engine::from_config(&setup.config).unwrap();
    let token = setup.token("orders:read", NOW - 10, NOW + 600);
    let http = request("/orders/7", Some(&token));
    for _ in 0..2 {
        assert_eq!(engine.decide_at(&http, NOW).await.verdict, Verdict::Allow);
    }
    let tokens = engine.authenticator().token_cache();
    assert_eq!(tokens.hits.load(Relaxed), 1);
    assert_eq!(engine.evaluator().decision_cache().hits.load(Relaxed), 1);

    let reloaded = engine.reload_policies(&setup.config).unwrap();
    assert_eq!(reloaded.generation(), 2);
    assert!(Arc::ptr_eq(
        engine.authenticator(),
        reloaded.authenticator()
    ));
    let decision = reloaded.decide_at(&http, NOW).await;
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.policy_generation, 2);
    // The token was not verified again; the decision was evaluated again.
    assert_eq!(tokens.hits.load(Relaxed), 2);
    let counters = reloaded.authenticator().counters();
    assert_eq!(counters.signatures.load(Relaxed), 1);
    assert_eq!(counters.credentials.load(Relaxed), 3);
    let decisions = reloaded.evaluator().decision_cache();
    assert_eq!(
        (decisions.hits.load(Relaxed), decisions.misses.load(Relaxed)),
        (0, 1)
    );
}

#[tokio::test]
async fn a_broken_policy_folder_fails_the_reload_and_names_the_problem() {
    let setup = setup("");
    let engine = Engine::from_config(&setup.config).unwrap();
    let mut broken = setup.config.clone();
    let dir = tempfile::tempdir().unwrap();
    for file in ["orders.cedar", "orders.cedarschema"] {
        std::fs::copy(setup.config.policies.dir.join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(dir.path().join("broken.cedar"), "permit (principal, action").unwrap();
    broken.policies.dir = dir.path().to_path_buf();
    let error = engine.reload_policies(&broken).unwrap_err();
    assert!(
        error.problems.iter().any(|p| p.contains("broken.cedar")),
        "{error}"
    );
    assert_eq!(engine.generation(), 1);
}

#[tokio::test]
async fn dry_run_lets_denies_through_marked_but_never_a_revocation() {
    let setup = setup("mode = \"dry-run\"\ntoken_mode = \"dry-run\"");
    let engine = Engine::from_config(&setup.config).unwrap();
    let writer = setup.token("orders:write", NOW - 10, NOW + 600);
    let denied = engine
        .decide_at(&request("/orders/7", Some(&writer)), NOW)
        .await;
    assert_eq!(denied.verdict, Verdict::Deny(DenyReason::PolicyDenied));
    assert!(denied.dry_run);
    let anonymous = engine.decide_at(&request("/orders/7", None), NOW).await;
    assert!(anonymous.dry_run);

    let revoked = Authentication {
        token: None,
        refusal: Some(TokenError::Revoked),
    };
    let mut decision = Decision::new("GET", "/orders/7");
    let reason = record_identity(&revoked, &mut decision).unwrap_err();
    assert!(!engine.is_dry_run(Verdict::Deny(reason), || Mode::DryRun));
    // The issuer's own revocation, through its status list, neither.
    let status = DenyReason::Unauthenticated(TokenError::StatusNotValid);
    assert!(!engine.is_dry_run(Verdict::Deny(status), || Mode::DryRun));
    let expired = DenyReason::Unauthenticated(TokenError::Expired);
    assert!(engine.is_dry_run(Verdict::Deny(expired), || Mode::DryRun));
}

#[tokio::test]
async fn explain_shows_the_cedar_request_that_was_decided() {
    let setup = setup("");
    let engine = Engine::from_config(&setup.config).unwrap();
    let token = setup.token("orders:read", unix_now() - 10, unix_now() + 600);
    let (decision, explained) = engine.explain(&request("/orders/7", Some(&token))).await;
    assert_eq!(decision.verdict, Verdict::Allow);
    let explained = explained.expect("an explained request");
    assert_eq!(explained["action"], json!("Action::\"get /orders/{id}\""));
    assert_eq!(explained["resource"], json!("Application::\"orders\""));
    assert_eq!(explained["context"]["path_params"]["id"], json!("7"));
    // Nothing to explain for a caller without a credential.
    let (_, nothing) = engine.explain(&request("/orders/7", None)).await;
    assert!(nothing.is_none());
}

#[tokio::test]
async fn a_rebuild_makes_a_new_credential_stage_and_keeps_the_counters() {
    let setup = setup("");
    let engine = Engine::from_config(&setup.config).unwrap();
    let token = setup.token("orders:read", NOW - 10, NOW + 600);
    let http = request("/orders/7", Some(&token));
    assert_eq!(engine.decide_at(&http, NOW).await.verdict, Verdict::Allow);

    let rebuilt = engine.rebuild(&setup.config).unwrap();
    assert_eq!(rebuilt.generation(), 2);
    assert!(!Arc::ptr_eq(
        engine.authenticator(),
        rebuilt.authenticator()
    ));
    let counters = rebuilt.authenticator().counters();
    assert_eq!(counters.signatures.load(Relaxed), 1, "carried over");
    assert_eq!(rebuilt.decide_at(&http, NOW).await.verdict, Verdict::Allow);
    // A new verified-token cache: the token was verified again.
    assert_eq!(counters.signatures.load(Relaxed), 2);
    assert_eq!(
        rebuilt.authenticator().token_cache().misses.load(Relaxed),
        2
    );
}
