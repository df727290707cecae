//! `portcullis test`: the shipped policy tests pass, a wrong expectation fails
//! with a readable diff, unexercised policies are reported, coverage is
//! counted, printed, written as JSON and enforced by `--min-coverage`, YAML
//! test files run, and API-key, workload and introspection cases are decided
//! as those credentials are.

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
    assert!(
        stdout.contains("coverage: 4 of 4 policies determined a decision (100.0%)"),
        "{stdout}"
    );
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

/// A copy of the quickstart whose only test file is `name` with `text`.
fn fixture_with_tests(name: &str, text: &str) -> Fixture {
    let fx = Fixture::new();
    std::fs::create_dir(fx.path("policies/tests")).unwrap();
    std::fs::write(fx.path("policies/tests").join(name), text).unwrap();
    fx
}

/// Two of the quickstart's four policies determine a decision.
const HALF_COVERED: &str = r#"
[[case]]
name = "readers read"
path = "/orders/7"
claims = { sub = "alice", scope = "orders:read" }
expect = "allow"

[[case]]
name = "readers list"
path = "/orders"
claims = { sub = "alice", scope = "orders:read" }
expect = "allow"

[[case]]
name = "the blocked network"
path = "/orders"
source_ip = "203.0.113.9"
claims = { sub = "alice", scope = "orders:read" }
expect = "deny"
"#;

#[test]
fn coverage_lists_the_uncovered_policies_with_their_lines() {
    let fx = fixture_with_tests("half.toml", HALF_COVERED);
    let config = path_arg(&fx.config_path());
    let out = portcullis(&["test", "--config", &config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("coverage: 2 of 4 policies determined a decision (50.0%)"),
        "{stdout}"
    );
    assert!(!stdout.contains("uncovered policies:"), "{stdout}");

    let out = portcullis(&["test", "--config", &config, "--coverage"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let uncovered = stdout
        .split("uncovered policies:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no uncovered list: {stdout}"));
    let lines: Vec<&str> = uncovered.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        [
            "orders.cedar:20  orders-delete-admin",
            "orders.cedar:11  orders-write"
        ],
        "{stdout}"
    );
    // Per policy: the number of cases it determined, and where it is.
    assert!(
        stdout.contains("2  orders-read  orders.cedar:2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1  block-test-net-3  orders.cedar:28"),
        "{stdout}"
    );
    assert!(
        stdout.contains("0  orders-write  orders.cedar:11"),
        "{stdout}"
    );
}

#[test]
fn min_coverage_passes_at_the_threshold_and_fails_below_it() {
    let fx = fixture_with_tests("half.toml", HALF_COVERED);
    let config = path_arg(&fx.config_path());
    let out = portcullis(&["test", "--config", &config, "--min-coverage", "50"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("below the minimum"), "{stdout}");

    let out = portcullis(&["test", "--config", &config, "--min-coverage", "75"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("3 case(s), 3 passed, 0 failed"), "{stdout}");
    assert!(
        stdout.contains("coverage below the minimum: --min-coverage 75% not reached"),
        "{stdout}"
    );

    let out = portcullis(&["test", "--config", &config, "--min-coverage", "150"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("between 0 and 100"));
}

#[test]
fn coverage_json_is_written_to_a_file() {
    let fx = fixture_with_tests("half.toml", HALF_COVERED);
    let json_path = fx.path("coverage.json");
    let out = portcullis(&[
        "test",
        "--config",
        &path_arg(&fx.config_path()),
        "--coverage-json",
        &path_arg(&json_path),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json["covered"], 2);
    assert_eq!(json["total"], 4);
    assert_eq!(json["percent"], 50.0);
    assert_eq!(
        json["uncovered"],
        serde_json::json!(["orders-delete-admin", "orders-write"])
    );
    let read = json["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "orders-read")
        .unwrap();
    assert_eq!(read["file"], "orders.cedar");
    assert_eq!(read["line"], 2);
    assert_eq!(read["cases"], 2);
}

#[test]
fn yaml_test_files_run_like_toml_ones() {
    let fx = fixture_with_tests(
        "orders.yaml",
        r#"
case:
  - name: readers read
    path: /orders/7
    claims: { sub: alice, scope: "orders:read" }
    expect: allow
    policies: [orders-read]
  - name: readers cannot delete
    method: DELETE
    path: /orders/7
    claims:
      sub: alice
      scope: "orders:read"
    expect: deny
    policies: []
  - name: expired
    path: /orders
    claims: { sub: alice, scope: "orders:read", iat: "-900", exp: "-120" }
    expect: "401:expired"
  - name: no token, status code unquoted
    path: /orders
    expect: 401
  - name: API keys are refused where none are configured
    path: /orders
    api_key: { id: ci, principal: ci-bot, scopes: ["orders:read"] }
    expect: "401:unknown_api_key"
"#,
    );
    std::fs::write(
        fx.path("policies/tests/more.yml"),
        "case:\n  - name: writers write\n    method: POST\n    path: /orders\n    claims: { sub: bob, scope: \"orders:write\" }\n    expect: allow\n",
    )
    .unwrap();
    let out = portcullis(&["test", "--config", &path_arg(&fx.config_path())]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("ok    orders.yaml: readers read"),
        "{stdout}"
    );
    assert!(stdout.contains("ok    more.yml: writers write"), "{stdout}");
    assert!(stdout.contains("6 case(s), 6 passed, 0 failed"), "{stdout}");
    assert!(
        stdout.contains("coverage: 2 of 4 policies determined a decision (50.0%)"),
        "{stdout}"
    );
}

#[test]
fn a_bad_yaml_file_is_named_and_exits_2() {
    let fx = fixture_with_tests(
        "bad.yaml",
        "case:\n  - name: typo\n    path: /orders\n    claimz: { sub: alice }\n    expect: allow\n",
    );
    let out = portcullis(&["test", "--config", &path_arg(&fx.config_path())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(stderr.contains("claimz"), "{stderr}");
}

/// The quickstart plus API keys, workloads on `GET /orders`, an
/// introspection-only issuer, and policies for a client and a workload (one
/// of them template-linked).
fn every_credential_fixture(tests: &str) -> Fixture {
    let fx = fixture_with_tests("credentials.toml", tests);
    let config = std::fs::read_to_string(fx.config_path()).unwrap();
    let config = config.replacen(
        "method = \"GET\"\npath = \"/orders\"\n",
        "method = \"GET\"\npath = \"/orders\"\nallow_workload = true\n",
        1,
    );
    assert!(config.contains("allow_workload = true"));
    std::fs::write(fx.config_path(), config).unwrap();
    std::fs::write(fx.path("keys.toml"), "").unwrap();
    std::fs::write(fx.path("client-secret"), "s3cret\n").unwrap();
    fx.append_config(&format!(
        r#"
[api_keys]
file = "{}"

[workload]
trust_domains = ["cluster.local"]

[[issuers]]
issuer = "https://opaque.example.test"
audiences = ["orders-api"]
roles_claim = "roles"

[issuers.introspection]
endpoint = "https://opaque.example.test/introspect"
client_id = "portcullis"
client_secret_file = "{}"
"#,
        fx.path("keys.toml").display(),
        fx.path("client-secret").display()
    ));
    std::fs::write(
        fx.path("policies/credentials.cedar"),
        r#"
// The checkout service lists orders.
@id("checkout-lists")
permit (
  principal == Workload::"spiffe://cluster.local/ns/shop/sa/checkout",
  action == Action::"get /orders",
  resource
);

@id("client-reads")
permit (principal == ?principal, action == Action::"get /orders/{id}", resource);
"#,
    )
    .unwrap();
    std::fs::write(
        fx.path("policies/links.json"),
        r#"[{"id": "ci-bot-reads", "template": "client-reads",
             "values": {"?principal": {"type": "Client", "id": "ci-bot"}}}]"#,
    )
    .unwrap();
    fx
}

#[test]
fn api_key_workload_and_introspected_cases_are_decided_as_those_credentials() {
    let fx = every_credential_fixture(
        r#"
[[case]]
name = "an API key with the read scope lists"
path = "/orders"
api_key = { id = "reporting", principal = "reporter", scopes = ["orders:read"] }
expect = "allow"
policies = ["orders-read"]

[[case]]
name = "the CI key reads one order through its linked policy"
path = "/orders/7"
api_key = { id = "ci", principal = "ci-bot" }
expect = "allow"
policies = ["ci-bot-reads"]

[[case]]
name = "the CI key cannot create"
method = "POST"
path = "/orders"
api_key = { id = "ci", principal = "ci-bot", roles = ["deployer"] }
expect = "deny"
policies = []

[[case]]
name = "the blocked network refuses an API key too"
path = "/orders"
source_ip = "203.0.113.9"
api_key = { id = "reporting", principal = "reporter", scopes = ["orders:read"] }
expect = "deny"
policies = ["block-test-net-3"]

[[case]]
name = "the checkout workload lists orders"
path = "/orders"
workload = "spiffe://cluster.local/ns/shop/sa/checkout"
expect = "allow"
policies = ["checkout-lists"]

[[case]]
name = "another workload may not"
path = "/orders"
workload = "spiffe://cluster.local/ns/shop/sa/other"
expect = "deny"
policies = []

[[case]]
name = "a workload is no identity where the route does not allow it"
path = "/orders/7"
workload = "spiffe://cluster.local/ns/shop/sa/checkout"
expect = "401"

[[case]]
name = "an untrusted trust domain is no identity"
path = "/orders"
workload = "spiffe://elsewhere.test/ns/shop/sa/checkout"
expect = "401"

[[case]]
name = "an introspected reader lists"
path = "/orders"
introspection = { sub = "alice", scope = "orders:read", client_id = "shop-web" }
expect = "allow"
policies = ["orders-read"]

[[case]]
name = "an introspected admin deletes"
method = "DELETE"
path = "/orders/7"
introspection = { sub = "root", roles = ["admin"] }
expect = "allow"
policies = ["orders-delete-admin"]

[[case]]
name = "an introspected reader cannot create"
method = "POST"
path = "/orders"
introspection = { sub = "alice", scope = "orders:read" }
expect = "deny"
policies = []

[[case]]
name = "an inactive token"
path = "/orders"
introspection = { active = false }
expect = "401:inactive_token"

[[case]]
name = "an expired introspected token"
path = "/orders"
introspection = { sub = "alice", scope = "orders:read", iat = "-900", exp = "-120" }
expect = "401:expired"

[[case]]
name = "another audience"
path = "/orders"
introspection = { sub = "alice", scope = "orders:read", aud = "billing-api" }
expect = "401:wrong_audience"
"#,
    );
    let out = portcullis(&[
        "test",
        "--config",
        &path_arg(&fx.config_path()),
        "--coverage",
        "--coverage-json",
        "-",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("14 case(s), 14 passed, 0 failed"),
        "{stdout}"
    );
    // Six policies, one template-linked: orders-write is the one left.
    assert!(
        stdout.contains("coverage: 5 of 6 policies determined a decision (83.3%)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1  ci-bot-reads  credentials.cedar:10"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1  checkout-lists  credentials.cedar:3"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find("{\n").unwrap()..]).unwrap();
    assert_eq!(json["uncovered"], serde_json::json!(["orders-write"]));
    let linked = json["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "ci-bot-reads")
        .unwrap();
    assert_eq!(linked["template"], "client-reads");
}

#[test]
fn a_case_with_two_credentials_is_refused() {
    let fx = every_credential_fixture(
        r#"
[[case]]
name = "both"
path = "/orders"
claims = { sub = "alice" }
api_key = { id = "ci", principal = "ci-bot" }
expect = "allow"
"#,
    );
    let out = portcullis(&["test", "--config", &path_arg(&fx.config_path())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("give at most one of claims, api_key and introspection"),
        "{stderr}"
    );
}

#[test]
fn validate_warns_about_policies_no_route_can_reach() {
    let fx = Fixture::new();
    let schema = fx.path("policies/orders.cedarschema");
    let mut text = std::fs::read_to_string(&schema).unwrap();
    text.push_str(
        "\naction \"export orders\" appliesTo {\n  principal: [User],\n  resource: [Application],\n  context: { http: Http, path_params: {}, token: Token },\n};\n",
    );
    std::fs::write(&schema, text).unwrap();
    std::fs::write(
        fx.path("policies/export.cedar"),
        "// Exports are asked for by the reporting service only.\n@id(\"export-admins\")\npermit (principal in Role::\"admin\", action == Action::\"export orders\", resource);\n",
    )
    .unwrap();
    let out = portcullis(&["validate", "--config", &path_arg(&fx.config_path())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning is not an error: {stderr}");
    assert!(
        stderr.contains("export.cedar:2: policy \"export-admins\" names only actions no route maps to (Action::\"export orders\")"),
        "{stderr}"
    );
    // The shipped policies all sit on routed actions: no such warning.
    let quiet = portcullis(&[
        "validate",
        "--config",
        &path_arg(&Fixture::new().config_path()),
    ]);
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("no route maps to"));
}
