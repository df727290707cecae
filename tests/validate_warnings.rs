//! `portcullis validate` warns, with file and line, about a scope no issuer
//! declares and a `forbid` no permit could be overridden by; warnings do not
//! fail validate. Runs the real binary on the fixtures in
//! `tests/data/validate-warnings/`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/validate-warnings")
        .join(name)
}

/// Exit status and the warning lines of `portcullis validate --config <config>`.
fn validate(config: &Path) -> (bool, Vec<String>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["validate", "--config"])
        .arg(config)
        .output()
        .expect("run portcullis validate");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let warnings = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .map(str::to_owned)
        .collect();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), warnings, stdout + &stderr)
}

/// The 1-based line of the first line of `file` starting with `start`.
fn line_of(file: &Path, start: &str) -> usize {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines().position(|l| l.starts_with(start)).unwrap() + 1
}

#[test]
fn an_undeclared_scope_and_a_shadowed_forbid_are_warned_with_file_and_line() {
    let (ok, warnings, output) = validate(&fixture("portcullis.toml"));
    assert!(ok, "warnings do not fail validate:\n{output}");
    assert!(output.contains("ok: 5 policies"), "{output}");
    let policies = fixture("policies/orders.cedar");
    let write = line_of(&policies, "@id(\"orders-write\")");
    let reports = line_of(
        &policies,
        "forbid (principal, action == Action::\"get /reports\"",
    );
    assert_eq!(
        warnings,
        vec![
            format!(
                "warning: {}:{write}: policy \"orders-write\" tests for scope \"orders:wirte\", which no issuer's `scopes` declares: no token can carry it",
                policies.display()
            ),
            format!(
                "warning: {}:{reports}: forbid \"orders.cedar#4\" overrides no permit: no permit applies to action Action::\"get /reports\"",
                policies.display()
            ),
        ],
        "{output}"
    );
}

#[test]
fn a_clean_configuration_with_declared_scopes_prints_no_warning() {
    let (ok, warnings, output) = validate(&fixture("clean.toml"));
    assert!(ok, "{output}");
    assert!(output.contains("ok: 4 policies"), "{output}");
    assert!(warnings.is_empty(), "{output}");
}

#[test]
fn scopes_are_judged_only_when_every_issuer_declares_them_and_there_are_no_api_keys() {
    let text = std::fs::read_to_string(fixture("portcullis.toml"))
        .unwrap()
        .replace(
            "dir = \"policies\"",
            &format!("dir = {:?}", fixture("policies").display().to_string()),
        )
        .replace(
            "jwks_file = \"jwks.json\"",
            &format!(
                "jwks_file = {:?}",
                fixture("jwks.json").display().to_string()
            ),
        );
    let dir = tempfile::tempdir().unwrap();
    let undeclared_issuer = format!(
        "{text}\n[[issuers]]\nissuer = \"https://other.example.test\"\naudiences = [\"orders-api\"]\njwks_file = {:?}\n",
        fixture("jwks.json").display().to_string()
    );
    // Keys can be created with any scope at any time.
    let api_keys_file = dir.path().join("keys.toml");
    std::fs::write(&api_keys_file, "").unwrap();
    let with_api_keys = format!("{text}\n[api_keys]\nfile = {api_keys_file:?}\n");
    for (name, config) in [
        ("undeclared", undeclared_issuer),
        ("api-keys", with_api_keys),
    ] {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let (ok, warnings, output) = validate(&path);
        assert!(ok, "{name}: {output}");
        assert_eq!(warnings.len(), 1, "{name}: only the forbid: {output}");
        assert!(
            warnings[0].contains("overrides no permit"),
            "{name}: {output}"
        );
    }
}
