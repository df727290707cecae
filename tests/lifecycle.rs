//! Health, reflection, shutdown and the command line, as an operator meets them.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const AUTHZ: &str = "envoy.service.auth.v3.Authorization";

#[tokio::test]
async fn health_is_not_serving_until_policies_and_keys_load() {
    let fx = Fixture::new();
    let running = fx.serve_unloaded().await;
    let state = running.state().clone();
    let server = TestServer::connect(running).await;

    for service in ["", AUTHZ] {
        assert_eq!(
            health_of(&server.channel, service).await,
            ServingStatus::NotServing as i32
        );
    }
    // Before load, Check denies with 503 / UNAVAILABLE, and says why in the audit line.
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 503);
    assert_eq!(out.grpc_code, 14);
    assert_eq!(out.header("retry-after"), Some("1"));
    assert_eq!(fx.audit_line(&out.decision_id)["reason"], "not_ready");

    state
        .install(portcullis::engine::Engine::from_config(&fx.config()).unwrap())
        .await;
    for service in ["", AUTHZ] {
        assert_eq!(
            health_of(&server.channel, service).await,
            ServingStatus::Serving as i32
        );
    }
    let out = outcome(
        &server
            .check(envoy_request("GET", "/orders", Some(&token)))
            .await,
    );
    assert_eq!(out.http_status, 200);
}

/// The drain before a shutdown: health turns NOT_SERVING at once, checks are
/// still answered (allowed as before) until the drain period ends or is cut
/// short.
#[tokio::test]
async fn drain_reports_not_serving_while_checks_are_still_answered() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let token = fx.es256().token("alice", &["orders:read"], &[]);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let draining = {
        let running = &server.running;
        async move {
            running
                .drain(Duration::from_secs(600), async {
                    let _ = released.await;
                })
                .await
        }
    };
    let probe = async {
        // Drain has begun once health says so; checks are still allowed.
        for attempt in 0.. {
            if health_of(&server.channel, AUTHZ).await == ServingStatus::NotServing as i32 {
                break;
            }
            assert!(attempt < 200, "health never turned NOT_SERVING");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..5 {
            let allowed = outcome(
                &server
                    .check(envoy_request("GET", "/orders/7", Some(&token)))
                    .await,
            );
            assert_eq!(allowed.http_status, 200);
        }
        release.send(()).unwrap();
    };
    let (cut_short, ()) = tokio::join!(draining, probe);
    assert!(
        cut_short,
        "the drain ends when told to, not after its period"
    );

    // A zero drain period returns at once, also reporting NOT_SERVING.
    let other = fx.serve().await;
    assert!(
        !other
            .running
            .drain(Duration::ZERO, std::future::pending())
            .await
    );
    assert_eq!(
        health_of(&other.channel, AUTHZ).await,
        ServingStatus::NotServing as i32
    );
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let fx = Fixture::new();
    let server = fx.serve().await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(server.channel.clone())
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&AUTHZ.to_string()), "{names:?}");
}

#[tokio::test]
async fn validate_accepts_the_quickstart_and_reports_strict_errors_with_file_and_line() {
    let quickstart = repo_root().join("examples/quickstart/portcullis.toml");
    let ok = portcullis(&["validate", "--config", &path_arg(&quickstart)]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok: 4 policies"));

    let fx = Fixture::new();
    // `jti` is optional in the schema: strict validation demands a `has` check.
    std::fs::write(
        fx.path("policies/extra.cedar"),
        "// fine\npermit(principal, action, resource);\n\n@id(\"unsafe-jti\")\npermit(principal, action, resource)\nwhen { context.token.jti == \"abc\" };\n",
    )
    .unwrap();
    let bad = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("extra.cedar:6:"), "{stderr}");
    assert!(stderr.contains("unsafe-jti"), "{stderr}");

    // The server refuses to start on the same set.
    let serve = portcullis(&["serve", "--config", &path_arg(&fx.config_path())]);
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("extra.cedar:6:"));
}

#[tokio::test]
async fn validate_reports_routes_missing_from_the_schema() {
    let fx = Fixture::new();
    let mut config = std::fs::read_to_string(fx.config_path()).unwrap();
    config.push_str("\n[[routes]]\nmethod = \"PATCH\"\npath = \"/orders/{id}\"\n");
    std::fs::write(fx.config_path(), config).unwrap();
    let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"patch /orders/{id}\" (from a route or default_action) is not declared"),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_explains_allow_and_deny_offline() {
    let quickstart = repo_root().join("examples/quickstart");
    let key = path_arg(&quickstart.join("dev-key.pem"));
    let config = path_arg(&quickstart.join("portcullis.toml"));
    let minted = portcullis(&[
        "token",
        "mint",
        "--key",
        &key,
        "--sub",
        "alice",
        "--scope",
        "orders:read",
    ]);
    assert!(minted.status.success());
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();

    let allow = portcullis(&[
        "check",
        "--config",
        &config,
        "--token",
        &token,
        "--method",
        "GET",
        "--path",
        "/orders/7",
    ]);
    let stdout = String::from_utf8_lossy(&allow.stdout);
    assert_eq!(allow.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("decision:  allow"), "{stdout}");
    assert!(stdout.contains("principal: User::\"alice\""), "{stdout}");
    assert!(
        stdout.contains("action:    Action::\"get /orders/{id}\""),
        "{stdout}"
    );
    assert!(stdout.contains("policies:  orders-read"), "{stdout}");

    let deny = portcullis(&[
        "check",
        "--config",
        &config,
        "--token",
        &token,
        "--method",
        "DELETE",
        "--path",
        "/orders/7",
    ]);
    let stdout = String::from_utf8_lossy(&deny.stdout);
    assert_eq!(deny.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("decision:  deny"), "{stdout}");
    assert!(stdout.contains("status:    403"), "{stdout}");
    assert!(stdout.contains("reason:    policy_denied"), "{stdout}");

    let explained = portcullis(&[
        "check",
        "--config",
        &config,
        "--token",
        &token,
        "--path",
        "/orders/7?x=1",
        "--source-ip",
        "::ffff:10.0.0.3",
        "--explain",
    ]);
    let stdout = String::from_utf8_lossy(&explained.stdout);
    let json_start =
        stdout.find("cedar request:\n").expect("explain output") + "cedar request:\n".len();
    let request: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!(request["principal"], "User::\"alice\"");
    assert_eq!(request["action"], "Action::\"get /orders/{id}\"");
    assert_eq!(request["context"]["path_params"]["id"], "7");
    assert_eq!(request["context"]["http"]["path"], "/orders/7");
    assert_eq!(
        request["context"]["http"]["source_ip"]["__extn"]["arg"],
        "10.0.0.3"
    );
    assert_eq!(
        request["context"]["token"]["scopes"],
        serde_json::json!(["orders:read"])
    );

    let anonymous = portcullis(&["check", "--config", &config, "--path", "/orders"]);
    let stdout = String::from_utf8_lossy(&anonymous.stdout);
    assert!(stdout.contains("status:    401"), "{stdout}");
    assert!(stdout.contains("reason:    missing_token"), "{stdout}");
}

/// The quickstart as a user runs it: `serve`, a minted token, then SIGTERM.
#[tokio::test]
async fn quickstart_binary_serves_and_stops_gracefully_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let quickstart = repo_root().join("examples/quickstart");
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "serve",
            "--config",
            &path_arg(&quickstart.join("portcullis.toml")),
            "--listen",
            &listen,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let channel = {
        let mut attempt = 0;
        loop {
            let endpoint =
                tonic::transport::Channel::from_shared(format!("http://{listen}")).unwrap();
            match endpoint.connect().await {
                Ok(channel)
                    if health_of(&channel, AUTHZ).await == ServingStatus::Serving as i32 =>
                {
                    break channel;
                }
                _ if attempt < 200 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => panic!("server did not become SERVING"),
            }
        }
    };
    let minted = portcullis(&[
        "token",
        "mint",
        "--key",
        &path_arg(&quickstart.join("dev-key.pem")),
        "--sub",
        "alice",
        "--scope",
        "orders:read",
    ]);
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    let client =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel,
        );
    let allowed = outcome(
        &client
            .clone()
            .check(envoy_request("GET", "/orders/7", Some(&token)))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(allowed.http_status, 200);
    let denied = outcome(
        &client
            .clone()
            .check(envoy_request("POST", "/orders", Some(&token)))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(denied.http_status, 403);

    // Envoy closes its connection when it sees GOAWAY; so does this client.
    drop(client);
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (status, mut child) = tokio::task::spawn_blocking(move || (child.wait(), child))
        .await
        .unwrap();
    let status = status.unwrap();
    assert!(status.success(), "exit status {status:?}");

    // The audit lines went to stdout, one per decision, without the token.
    let stdout: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    assert_eq!(stdout.len(), 2, "{stdout:?}");
    assert!(stdout.iter().all(|l| !l.contains(&token)));
    let stderr: Vec<String> = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    assert!(stderr.iter().any(|l| l.contains("stopped")), "{stderr:?}");
}

/// Whether a log line's message starts with `prefix`.
fn logged(served: &served::Served, prefix: &str) -> bool {
    served.logs.lock().unwrap().iter().any(|l| {
        l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(prefix))
    })
}

/// Waits for `served` to exit on its own and returns its status; a process
/// still running after a generous deadline is killed and the test fails (a
/// wait for an event, not a timing assertion).
async fn exits_by_itself(served: served::Served) -> std::process::ExitStatus {
    let pid = served.pid();
    match tokio::time::timeout(Duration::from_secs(60), served.wait_exit()).await {
        Ok(status) => status,
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("the server did not exit after the signal (was it lost?)");
        }
    }
}

/// SIGTERM as soon as the listener is bound, before the engine and keys are
/// there: a clean stop (exit 0), not a death by the signal's default action.
#[tokio::test]
async fn sigterm_right_after_binding_stops_cleanly() {
    let idp = idp::TestIdp::start().await;
    let fx = Fixture::new();
    waiting_for_keys(&fx, &idp);
    let served = served::Served::launch(&fx.config_path(), &[]).await;
    served.sigterm();
    let status = exits_by_itself(served).await;
    assert!(status.success(), "exit status {status:?}");
}

/// SIGTERM while `serve` waits for an issuer's keys stops it cleanly.
#[tokio::test]
async fn sigterm_while_waiting_for_keys_stops_cleanly() {
    let idp = idp::TestIdp::start().await;
    let fx = Fixture::new();
    waiting_for_keys(&fx, &idp);
    let served = served::Served::launch(&fx.config_path(), &[]).await;
    wait_for("the wait for keys", || {
        logged(&served, "waiting for the keys of every issuer")
    })
    .await;
    assert_ne!(served.health().await, ServingStatus::Serving as i32);
    served.sigterm();
    let status = exits_by_itself(served).await;
    assert!(status.success(), "exit status {status:?}");
}

/// After the first signal the drain runs (here for an hour); a second signal
/// cuts it short and the process stops cleanly.
#[tokio::test]
async fn a_second_signal_cuts_the_drain_short() {
    let fx = Fixture::new();
    let config = std::fs::read_to_string(fx.config_path())
        .unwrap()
        .replace("[server]\n", "[server]\ndrain_period = \"1h\"\n");
    std::fs::write(fx.config_path(), config).unwrap();
    let served = served::Served::start(&fx, &[]).await;
    served.sigterm();
    wait_for("the drain to start", || logged(&served, "shutting down")).await;
    served.sigterm();
    let logs = served.logs.clone();
    let status = exits_by_itself(served).await;
    assert!(status.success(), "exit status {status:?}");
    let logs = logs.lock().unwrap();
    assert!(
        logs.iter()
            .any(|l| l["fields"]["message"] == "drain cut short by a second signal"),
        "{logs:?}"
    );
}
