//! The docs stay true: every configuration key of the config types is in the
//! configuration reference, every command and option of the CLI is in the CLI
//! reference, every relative link of the Markdown files resolves (file and
//! heading), and every `portcullis` command shown in `docs/getting-started.md`
//! runs and prints what the page shows. (The audit line's fields are checked
//! against `docs/reference/audit-line.md` in `tests/observability.rs`.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::repo_root;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------
// Configuration keys

/// The fields of every `pub struct` in `src/config.rs`, by struct name, with
/// their types (`Option<..>`/`Vec<..>` kept).
fn config_structs(source: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut structs = BTreeMap::new();
    let mut current: Option<(String, Vec<(String, String)>)> = None;
    for line in source.lines() {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            if let Some(name) = rest.strip_suffix(" {") {
                current = Some((name.to_owned(), Vec::new()));
            }
            continue;
        }
        if line == "}" {
            if let Some((name, fields)) = current.take() {
                structs.insert(name, fields);
            }
            continue;
        }
        if let Some((_, fields)) = current.as_mut()
            && let Some(field) = line.strip_prefix("    pub ")
            && let Some((name, ty)) = field.split_once(": ")
        {
            fields.push((name.to_owned(), ty.trim_end_matches(',').to_owned()));
        }
    }
    structs
}

/// `[table] key` for every key reachable from `Config`, as the reference
/// writes them: `[server] listen`, `[server.tls] cert_file`,
/// `[[issuers]] issuer`, `[issuers.remote] jwks_uri`.
fn config_keys() -> BTreeSet<String> {
    let structs = config_structs(&read("src/config.rs"));
    let mut keys = BTreeSet::new();
    fn walk(
        structs: &BTreeMap<String, Vec<(String, String)>>,
        fields: &[(String, String)],
        table: &str,
        array: bool,
        keys: &mut BTreeSet<String>,
    ) {
        for (name, ty) in fields {
            let is_vec = ty.starts_with("Vec<");
            let inner = ty
                .trim_start_matches("Option<")
                .trim_start_matches("Vec<")
                .trim_end_matches('>');
            match structs.get(inner) {
                Some(nested) => {
                    let path = if table.is_empty() {
                        name.clone()
                    } else {
                        format!("{table}.{name}")
                    };
                    walk(structs, nested, &path, is_vec, keys);
                }
                None => {
                    let header = if array && !table.contains('.') {
                        format!("[[{table}]]")
                    } else {
                        format!("[{table}]")
                    };
                    keys.insert(format!("{header} {name}"));
                }
            }
        }
    }
    walk(&structs, &structs["Config"], "", false, &mut keys);
    keys
}

#[test]
fn every_configuration_key_is_in_the_reference() {
    let keys = config_keys();
    // The walk itself must see the tables it is meant to check.
    for sample in [
        "[server] listen",
        "[server.tls] cert_file",
        "[[issuers]] issuer",
        "[issuers.remote] refresh_min",
        "[cache] decision_max_bytes",
        "[[routes]] action",
    ] {
        assert!(keys.contains(sample), "{sample} not found in {keys:?}");
    }
    let reference = read("docs/reference/configuration.md");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|key| {
            // A row for the key itself, or a row naming several keys of one
            // table (`[admin.tls] cert_file, key_file`).
            !reference.contains(&format!("| `{key}`"))
                && !key.split_once(' ').is_some_and(|(table, name)| {
                    reference.lines().any(|line| {
                        line.starts_with(&format!("| `{table} "))
                            && line.split('|').nth(1).is_some_and(|cell| {
                                cell.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                                    .any(|word| word == name)
                            })
                    })
                })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "configuration keys missing from docs/reference/configuration.md: {missing:?}"
    );
}

// ---------------------------------------------------------------------------
// CLI

fn portcullis_help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands a help text lists under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// The long options a help text lists (without `--help` and `--version`).
fn long_options(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line
                .strip_prefix('-')
                .filter(|rest| !rest.starts_with('-'))
                .and_then(|rest| rest.split_once(", ").map(|(_, long)| long))
                .unwrap_or(line);
            let option = line.strip_prefix("--")?;
            let name: String = option
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty() && name != "help" && name != "version").then(|| format!("--{name}"))
        })
        .collect()
}

/// `option` appears as a whole word (`--kid` is not found in `--kids`).
fn mentions_option(text: &str, option: &str) -> bool {
    text.match_indices(option).any(|(at, _)| {
        text[at + option.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '-' || c == '_'))
    })
}

#[test]
fn every_command_and_option_is_in_the_cli_reference() {
    let reference = read("docs/reference/cli.md");
    let mut commands = Vec::new();
    for command in subcommands(&portcullis_help(&[])) {
        let nested = subcommands(&portcullis_help(&[&command]));
        if nested.is_empty() {
            commands.push(vec![command]);
        } else {
            commands.extend(nested.into_iter().map(|sub| vec![command.clone(), sub]));
        }
    }
    assert!(commands.len() >= 12, "too few commands found: {commands:?}");
    let mut missing = Vec::new();
    for command in &commands {
        // Each command is described under a bold code span that starts
        // with its name: **`revoke --admin ADDR TARGET ...`**.
        let line = format!("portcullis {}", command.join(" "));
        if !reference.contains(&format!("**`{}", command.join(" "))) {
            missing.push(line.clone());
        }
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        for option in long_options(&portcullis_help(&args)) {
            if !mentions_option(&reference, &option) {
                missing.push(format!("{line} {option}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "missing from docs/reference/cli.md: {missing:?}"
    );
}

// ---------------------------------------------------------------------------
// Links

fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let root = repo_root();
    let mut files: Vec<PathBuf> = [
        "README.md",
        "CONTRIBUTING.md",
        "SECURITY.md",
        "CHANGELOG.md",
    ]
    .iter()
    .map(|f| root.join(f))
    .collect();
    walk(&root.join("docs"), &mut files);
    files
}

/// GitHub's anchor for a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// `(text, target)` of every inline link outside code blocks and code spans.
fn links(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop code spans, which may hold `](` legitimately.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_owned());
                rest = &rest[end..];
            }
        }
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let files = markdown_files();
    assert!(files.len() > 20, "{files:?}");
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            if !resolved.exists() {
                broken.push(format!("{}: {target} (no such file)", file.display()));
                continue;
            }
            if !anchor.is_empty() && resolved.extension().is_some_and(|e| e == "md") {
                let heads = anchors(&std::fs::read_to_string(&resolved).unwrap());
                if !heads.contains(anchor) {
                    broken.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_short_and_names_the_two_commands() {
    let readme = read("README.md");
    assert!(readme.lines().count() <= 250, "README.md is over 250 lines");
    assert!(
        readme
            .contains("cargo run --release -- serve --config examples/quickstart/portcullis.toml")
    );
    assert!(readme.contains("scripts/test"));
    let cargo = read("Cargo.toml");
    let msrv = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version in Cargo.toml");
    assert!(
        readme.contains(&format!("Minimum Rust version: {}", msrv.trim_matches('"'))),
        "the README states another minimum Rust version than Cargo.toml's {msrv}"
    );
}

// ---------------------------------------------------------------------------
// Getting started

/// One `$ command` of a console block, its heredoc input if any, and the
/// output lines the page shows under it.
struct Shown {
    command: String,
    output: Vec<String>,
}

fn console_commands(text: &str) -> Vec<Shown> {
    let mut shown: Vec<Shown> = Vec::new();
    let mut in_console = false;
    let mut heredoc: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("```") {
            in_console = line == "```console";
            continue;
        }
        if !in_console {
            continue;
        }
        if let Some(end) = &heredoc {
            let last = shown.last_mut().unwrap();
            last.command.push('\n');
            last.command.push_str(line);
            if line == end {
                heredoc = None;
            }
            continue;
        }
        if let Some(command) = line.strip_prefix("$ ") {
            if let Some((_, marker)) = command.split_once("<<") {
                heredoc = Some(marker.trim().trim_matches('\'').to_owned());
            }
            shown.push(Shown {
                command: command.to_owned(),
                output: Vec::new(),
            });
        } else if let Some(last) = shown.last_mut() {
            last.output.push(line.to_owned());
        }
    }
    shown
}

#[test]
fn the_getting_started_commands_run_and_print_what_the_page_shows() {
    let page = read("docs/getting-started.md");
    let scratch = tempfile::tempdir().unwrap();
    let bin = scratch.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_portcullis"), bin.join("portcullis")).unwrap();
    let token = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "token",
            "mint",
            "--key",
            "examples/quickstart/dev-key.pem",
            "--sub",
            "alice",
            "--scope",
            "orders:read",
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let work = scratch.path().join("work");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut ran = 0;
    for shown in console_commands(&page) {
        // The demo and the requests through it need Envoy: tests/demo.rs runs
        // `scripts/demo --check`.
        let command = shown
            .command
            .replace("cargo run --release --", "portcullis");
        if command.starts_with("scripts/demo")
            || command.starts_with("curl")
            || command.starts_with(". target/demo")
        {
            continue;
        }
        let command = command.replace("/tmp/", &format!("{}/", work.display()));
        std::fs::create_dir_all(&work).unwrap();
        let out = Command::new("bash")
            .arg("-c")
            .arg(&command)
            .env("PATH", &path)
            .env("TOKEN", &token)
            .current_dir(repo_root())
            .output()
            .unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let printed: Vec<&str> = printed.lines().map(str::trim_end).collect();
        for expected in &shown.output {
            let expected = expected.replace("/tmp/", &format!("{}/", work.display()));
            if expected.trim() == "..." || expected.trim().is_empty() {
                continue;
            }
            assert!(
                printed.contains(&expected.trim_end()),
                "`{}` did not print {expected:?}; it printed:\n{}",
                shown.command,
                printed.join("\n")
            );
        }
        ran += 1;
    }
    assert!(ran >= 6, "only {ran} commands of getting-started.md ran");
}
