//! `[audit] record_inputs`: decision lines written by the real server carry
//! what the policies could read, so `portcullis replay --audit` re-decides
//! JWT decisions exactly (without it they are skipped) and catches a policy
//! change that opens access.

mod common;

use common::*;
use serde_json::Value;

/// Runs `portcullis replay --json`; the report and the exit code.
fn replay(fx: &Fixture, policies: &std::path::Path) -> (Value, i32) {
    let out = portcullis(&[
        "replay",
        "--config",
        &path_arg(&fx.config_path()),
        "--audit",
        &path_arg(&fx.audit_path()),
        "--policies",
        &path_arg(policies),
        "--json",
    ]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.code().unwrap_or(-1))
}

async fn record_decisions(fx: &Fixture) {
    let server = fx.serve().await;
    let key = fx.es256();
    let asked = [
        (
            key.token("alice", &["orders:read"], &[]),
            "GET",
            "/orders/7",
            "10.1.2.3",
            200,
        ),
        (
            key.token("bob", &["orders:write"], &[]),
            "GET",
            "/orders/7",
            "10.1.2.3",
            403,
        ),
        (
            key.token("alice", &["orders:read"], &[]),
            "GET",
            "/orders/7",
            "203.0.113.9",
            403,
        ),
        (
            key.token("carol", &[], &["admin"]),
            "DELETE",
            "/orders/7",
            "10.1.2.3",
            200,
        ),
    ];
    for (token, method, path, ip, status) in asked {
        let mut request = envoy_request(method, path, Some(&token));
        request.attributes.as_mut().unwrap().source = Some(peer(ip));
        let out = outcome(&server.check(request).await);
        assert_eq!(out.http_status, status, "{method} {path} from {ip}");
    }
    // And one refused before the policies: nothing to replay.
    let out = outcome(&server.check(envoy_request("GET", "/orders/7", None)).await);
    assert_eq!(out.http_status, 401);
}

#[tokio::test]
async fn recorded_inputs_make_jwt_decisions_replayable_exactly() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    fx.append_config(&format!(
        "\n[audit]\nfile = \"{}\"\nrecord_inputs = true\n",
        fx.audit_path().display()
    ));
    record_decisions(&fx).await;
    let lines = fx.audit_lines();
    let allowed = lines.iter().find(|l| l["status"] == 200).unwrap();
    assert_eq!(
        allowed["inputs"]["scopes"],
        serde_json::json!(["orders:read"])
    );
    assert_eq!(allowed["inputs"]["source_ip"], "10.1.2.3");
    assert_eq!(
        lines.iter().find(|l| l["status"] == 401).unwrap()["inputs"],
        Value::Null
    );

    // The same policies: every recorded decision comes back unchanged.
    let (report, code) = replay(&fx, &fx.path("policies"));
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["replayed"], 4, "{report}");
    assert_eq!(report["unchanged"], 4, "{report}");
    assert_eq!(report["inexact"], Value::Null, "{report}");

    // A permit that lets anyone read an order: bob's denied read opens (the
    // blocked network's forbid still holds, since its address was recorded).
    let proposed = fx.path("proposed");
    std::fs::create_dir(&proposed).unwrap();
    for entry in std::fs::read_dir(fx.path("policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, proposed.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        proposed.join("open.cedar"),
        "@id(\"read-for-all\")\npermit (principal, action == Action::\"get /orders/{id}\", resource);\n",
    )
    .unwrap();
    let (report, code) = replay(&fx, &proposed);
    assert_eq!(code, 1, "opened access fails the run: {report}");
    assert_eq!(report["deny_to_allow"]["count"], 1, "{report}");
    assert_eq!(report["unchanged"], 3, "{report}");
}

#[tokio::test]
async fn without_recorded_inputs_jwt_decisions_are_skipped_not_guessed() {
    let fx = Fixture::with_keys(vec![TestKey::es256()]);
    fx.append_config(&format!(
        "\n[audit]\nfile = \"{}\"\n",
        fx.audit_path().display()
    ));
    record_decisions(&fx).await;
    assert!(fx.audit_lines().iter().all(|l| l["inputs"].is_null()));
    let (report, code) = replay(&fx, &fx.path("policies"));
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["replayed"], 0, "{report}");
}
