//! Policy hot reload under a steady stream of Check calls: 100 swaps, valid and
//! invalid mixed. Every decision is made by exactly one valid set (its audit line
//! names the set's digest, and the outcome is that set's), no call fails, and an
//! invalid set never serves.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use portcullis::reload::reload_once;

/// Set A lets readers read; set B forbids everyone everything.
const SET_A: &str = "@id(\"read\")\npermit (principal, action == Action::\"get /orders/{id}\", resource)\nwhen { context.token.scopes.contains(\"orders:read\") };\n";
const SET_B: &str = "@id(\"read\")\npermit (principal, action == Action::\"get /orders/{id}\", resource)\nwhen { context.token.scopes.contains(\"orders:read\") };\n@id(\"lockdown\")\nforbid (principal, action, resource);\n";
/// Syntax error on purpose.
const BROKEN: &str =
    "@id(\"read\")\npermit (principal, action == Action::\"get /orders/{id}\" resource);\n";
/// Valid syntax, fails strict validation (unknown attribute).
const INVALID: &str = "@id(\"read\")\npermit (principal, action, resource) when { context.token.colour == \"red\" };\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_under_load_never_mix_sets_or_fail_a_call() {
    let fx = Fixture::new();
    let policy_file = fx.path("policies/orders.cedar");
    std::fs::write(&policy_file, SET_A).unwrap();
    let server = fx.serve().await;
    let state = server.running.state().clone();
    let config = portcullis::reload::RunningConfig::fixed(fx.config());
    let token = fx.es256().token("alice", &["orders:read"], &[]);

    // Expected outcome per digest of each set that ever served.
    let mut expected: HashMap<String, u16> = HashMap::new();
    expected.insert(state.engine().unwrap().policies().digest.to_string(), 200);

    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut client = server.client.clone();
        let stop = stop.clone();
        let token = token.clone();
        streams.push(tokio::spawn(async move {
            let mut calls = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let response = client
                    .check(envoy_request("GET", "/orders/7", Some(&token)))
                    .await
                    .expect("no Check call fails during reloads");
                assert!(response.into_inner().http_response.is_some());
                calls += 1;
            }
            calls
        }));
    }

    let mut generation = state.engine().unwrap().generation();
    for i in 0..100 {
        let (text, valid, status) = match i % 4 {
            0 => (SET_B, true, 403),
            1 => (BROKEN, false, 0),
            2 => (SET_A, true, 200),
            _ => (INVALID, false, 0),
        };
        std::fs::write(&policy_file, text).unwrap();
        let result = reload_once(&state, &config).await;
        let engine = state.engine().unwrap();
        if valid {
            assert_eq!(result.unwrap(), generation + 1, "swap {i}");
            generation += 1;
            expected.insert(engine.policies().digest.to_string(), status);
        } else {
            assert!(result.is_err(), "swap {i}: an invalid set was accepted");
            assert_eq!(
                engine.generation(),
                generation,
                "swap {i}: the old set must keep serving"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for stream in streams {
        calls += stream.await.unwrap();
    }
    assert!(calls > 100, "only {calls} calls during the swaps");
    let stats = state.reload_stats();
    assert_eq!(stats.reloads.load(Ordering::Relaxed), 50);
    assert_eq!(stats.failures.load(Ordering::Relaxed), 50);

    // Every decision names a set that was valid, and has that set's outcome.
    let lines = fx.audit_lines();
    assert!(lines.len() as u32 >= calls);
    let mut per_set: HashMap<&str, usize> = HashMap::new();
    for line in &lines {
        let digest = line["policy_digest"].as_str().unwrap();
        let want = expected
            .get(digest)
            .unwrap_or_else(|| panic!("decision made by an unknown (invalid?) set {digest}"));
        assert_eq!(line["status"].as_u64().unwrap() as u16, *want, "{line}");
        *per_set.entry(digest).or_default() += 1;
    }
    assert!(
        per_set.len() >= 2,
        "the stream never saw a swap: {per_set:?}"
    );
}

/// A server on `fx` with `policies/orders.cedar` holding set A (returned)
/// and the policy watch running every `interval_ms`.
async fn watched(
    fx: &Fixture,
    interval_ms: u64,
) -> (
    std::path::PathBuf,
    TestServer,
    Arc<portcullis::state::ServerState>,
    tokio::task::JoinHandle<()>,
) {
    let policy_file = fx.path("policies/orders.cedar");
    std::fs::write(&policy_file, SET_A).unwrap();
    let server = fx.serve().await;
    let state = server.running.state().clone();
    let mut config = fx.config();
    config.policies.watch_interval = std::time::Duration::from_millis(interval_ms);
    let watcher = tokio::spawn(portcullis::reload::watch(
        state.clone(),
        Arc::new(portcullis::reload::RunningConfig::fixed(config)),
    ));
    (policy_file, server, state, watcher)
}

#[tokio::test]
async fn the_folder_is_watched() {
    let fx = Fixture::new();
    let (policy_file, server, state, watcher) = watched(&fx, 50).await;
    let stats = state.reload_stats();
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let status = |server: &TestServer| {
        let request = envoy_request("GET", "/orders/7", Some(&token));
        let client = server.client.clone();
        async move {
            let mut client = client;
            outcome(&client.check(request).await.unwrap().into_inner()).http_status
        }
    };
    assert_eq!(status(&server).await, 200);

    // Break the file: the old set keeps answering, and the error is recorded.
    std::fs::write(&policy_file, BROKEN).unwrap();
    wait_for("the broken change to be rejected", || {
        stats.failures.load(Ordering::Relaxed) > 0
    })
    .await;
    assert_eq!(status(&server).await, 200);
    let error = stats.last_error.lock().unwrap().clone().unwrap();
    assert!(error.contains("orders.cedar:2:"), "{error}");

    // A good edit goes live.
    std::fs::write(&policy_file, SET_B).unwrap();
    wait_for("the new set", || stats.reloads.load(Ordering::Relaxed) > 0).await;
    assert_eq!(status(&server).await, 403);
    assert!(stats.last_error.lock().unwrap().is_none());
    watcher.abort();
}

/// Writers that truncate and then write (`std::fs::write`, `echo … >`) pass
/// through an empty file. The watch must never load it: forty rewrites of the
/// same content, each with a pause between truncating and writing, leave the
/// set in force untouched (a reload that finds the same content swaps
/// nothing, so any reload here means an empty or partial file was loaded).
#[tokio::test]
async fn a_file_caught_mid_write_is_never_loaded() {
    use std::io::Write as _;
    let fx = Fixture::new();
    let (policy_file, _server, state, watcher) = watched(&fx, 100).await;
    let stats = state.reload_stats();
    for _ in 0..40 {
        let mut file = std::fs::File::create(&policy_file).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(15)).await;
        file.write_all(SET_A.as_bytes()).unwrap();
        drop(file);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    // Let the watch look at the final file (settled) before counting.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.reloads.load(Ordering::Relaxed),
        0,
        "a truncated policy file was loaded"
    );
    // The watch is alive: a real change goes live.
    std::fs::write(&policy_file, SET_B).unwrap();
    wait_for("the new set", || stats.reloads.load(Ordering::Relaxed) > 0).await;
    watcher.abort();
}

const ADMIN_TOKEN: &str = "hot-reload-admin-token-0123456789";

fn authorized<T>(message: T) -> tonic::Request<T> {
    with_bearer(message, ADMIN_TOKEN)
}

/// The admin API: ReloadPolicies, Status (with the rejected change's error) and
/// Explain, on the admin listener with the admin token.
#[tokio::test]
async fn admin_reload_status_and_explain() {
    use portcullis::admin::pb;
    let fx = Fixture::new();
    fx.append_config(&format!(
        "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\n[revocation]\ndata_dir = \"data\"\n"
    ));
    let policy_file = fx.path("policies/orders.cedar");
    std::fs::write(&policy_file, SET_A).unwrap();
    let server = fx.serve().await;
    let config = fx.config();
    let store =
        portcullis::revocation::RevocationStore::open(&config.revocation, config.token_lifetimes())
            .await
            .unwrap();
    let admin_config = config.admin.clone().unwrap();
    let admin = portcullis::admin::start(
        admin_config.listen,
        &admin_config.resolve_token().unwrap(),
        store.clone(),
        server.running.state().clone(),
        config.clone(),
    )
    .await
    .unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", admin.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::admin_client::AdminClient::new(channel);

    // A broken change: rejected, and Status says why.
    std::fs::write(&policy_file, BROKEN).unwrap();
    let reload = client
        .reload_policies(authorized(pb::ReloadPoliciesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(!reload.reloaded);
    assert_eq!(reload.generation, 1);
    assert!(reload.error.contains("orders.cedar:2:"), "{}", reload.error);
    let status = client
        .status(authorized(pb::StatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.policy_generation, status.reload_failures), (1, 1));
    assert!(
        status.last_reload_error.contains("orders.cedar:2:"),
        "{}",
        status.last_reload_error
    );

    // A good one goes live.
    std::fs::write(&policy_file, SET_B).unwrap();
    let reload = client
        .reload_policies(authorized(pb::ReloadPoliciesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(reload.reloaded, "{}", reload.error);
    assert_eq!(reload.generation, 2);
    let status = client
        .status(authorized(pb::StatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.policy_digest, reload.digest);
    assert!(status.last_reload_error.is_empty());

    // Explain one request against the serving set.
    let token = fx.es256().token("alice", &["orders:read"], &["staff"]);
    let mut headers = std::collections::HashMap::new();
    headers.insert("authorization".to_string(), format!("Bearer {token}"));
    let explained = client
        .explain(authorized(pb::ExplainRequest {
            method: "GET".into(),
            path: "/orders/7".into(),
            headers,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.decision, "deny");
    assert_eq!(explained.http_status, 403);
    assert_eq!(explained.policies, vec!["lockdown".to_string()]);
    assert_eq!(explained.policy_generation, 2);
    let cedar: serde_json::Value = serde_json::from_str(&explained.cedar_request_json).unwrap();
    assert_eq!(
        cedar["principal_parents"],
        serde_json::json!(["Role::\"staff\""])
    );
    assert_eq!(cedar["context"]["path_params"]["id"], "7");

    // Without the admin token, nothing.
    let refused = client
        .reload_policies(pb::ReloadPoliciesRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    admin
        .shutdown(std::time::Duration::from_secs(2))
        .await
        .unwrap();
    store.shutdown().await;
}
