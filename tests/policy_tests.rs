//! `portcullis test`: the shipped policy tests pass, a wrong expectation fails
//! with a readable diff, and unexercised policies are reported.

mod common;

use common::*;

#[test]
fn the_shipped_policy_tests_pass() {
    let config = repo_root().join("examples/quickstart/portcullis.toml");
    let out = portcullis(&["test", "--config", &path_arg(&config)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 failed"), "{stdout}");
    assert!(!stdout.contains("policies no case exercised"), "{stdout}");
}

#[test]
fn a_wrong_expectation_fails_with_a_diff() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.path("policies/tests")).unwrap();
    std::fs::write(
        fx.path("policies/tests/wrong.toml"),
        r#"
[[case]]
name = "readers may delete (wrong on purpose)"
method = "DELETE"
path = "/orders/7"
claims = { sub = "alice", scope = "orders:read" }
expect = "allow"

[[case]]
name = "right about the policy, wrong about its id"
path = "/orders"
claims = { sub = "alice", scope = "orders:read" }
expect = "allow"
policies = ["orders-list"]
"#,
    )
    .unwrap();
    let out = portcullis(&["test", "--config", &path_arg(&fx.config_path())]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL  wrong.toml: readers may delete (wrong on purpose)"),
        "{stdout}"
    );
    assert!(stdout.contains("expected: allow"), "{stdout}");
    assert!(
        stdout.contains("actual:   deny (403) (policy_denied)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("expected policies: [\"orders-list\"]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("actual policies:   [\"orders-read\"]"),
        "{stdout}"
    );
    assert!(stdout.contains("2 case(s), 0 passed, 2 failed"), "{stdout}");
    assert!(
        stdout.contains(
            "policies no case exercised: block-test-net-3, orders-delete-admin, orders-write"
        ),
        "{stdout}"
    );
}
