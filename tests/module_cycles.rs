//! No new import cycle between the library's modules.
//!
//! Reads every file under `src/` (outside comments and the trailing
//! `#[cfg(test)]` module), collects the modules each one names through
//! `crate::` and `super::` paths, and finds the cycles between modules
//! (edges between a module and its own ancestors or descendants don't count:
//! a `mod.rs` holding what its children share is the intended shape). The
//! cycles that exist today are listed in `KNOWN_CYCLES`, to be removed one by
//! one; a cycle not on the list fails the test, and so does a listed one
//! that is gone (take it off the list).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Cycles that exist today, each as its sorted member modules.
const KNOWN_CYCLES: &[&[&str]] = &[];

/// The module path of a source file: `src/authn/jwt.rs` → `authn::jwt`,
/// `src/authn/mod.rs` → `authn`.
fn module_of(relative: &Path) -> Option<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop()?;
    let stem = file.strip_suffix(".rs")?;
    if parts.is_empty() && matches!(stem, "lib" | "main") {
        return None;
    }
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    Some(parts.join("::"))
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The path segments that follow each `prefix::` in `line`, e.g. for
/// `crate::authn::jwt::numeric_date` the segments `authn`, `jwt`,
/// `numeric_date`; a `{` group contributes each of its first segments.
fn paths_after(line: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(is_ident_char) {
            continue;
        }
        let mut segments = Vec::new();
        let mut grouped = false;
        let mut cursor = rest;
        loop {
            if let Some(group) = cursor.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|&c| is_ident_char(c))
                        .collect();
                    if !name.is_empty() {
                        let mut path = segments.clone();
                        path.push(name);
                        found.push(path);
                    }
                }
                grouped = true;
                break;
            }
            let name: String = cursor.chars().take_while(|&c| is_ident_char(c)).collect();
            if name.is_empty() {
                break;
            }
            cursor = &cursor[name.len()..];
            segments.push(name);
            match cursor.strip_prefix("::") {
                Some(next) => cursor = next,
                None => break,
            }
        }
        if !grouped && !segments.is_empty() {
            found.push(segments);
        }
    }
    found
}

/// The longest known module that `path` (segments from the crate root)
/// names.
fn resolve(path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|candidate| modules.contains(candidate))
}

fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

/// Tarjan's strongly connected components; returns those with two or more
/// members, each sorted.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: BTreeSet<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(targets) = s.edges.get(v) {
            for w in targets {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let low = s.low[v].min(s.low[w]);
                    s.low.insert(v, low);
                } else if s.on_stack.contains(w) {
                    let low = s.low[v].min(s.index[w]);
                    s.low.insert(v, low);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.insert(component);
            }
        }
    }
    let mut state = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: BTreeSet::new(),
    };
    for v in edges.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found
}

fn source_files(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, root, out);
        } else if let Some(module) = module_of(path.strip_prefix(root).unwrap()) {
            out.push((module, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// The module graph of `src/`, edges between unrelated modules only.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &files {
        edges.entry(module.clone()).or_default();
        let own: Vec<String> = module.split("::").map(str::to_owned).collect();
        for line in text.lines() {
            let line = line.trim_start();
            if line.starts_with("#[cfg(test)]") {
                break;
            }
            if line.starts_with("//") {
                continue;
            }
            let mut targets: Vec<Vec<String>> = paths_after(line, "crate::");
            // `super::x` from `a::b` (file `a/b.rs`) names `a::x`.
            for path in paths_after(line, "super::") {
                let mut full = own[..own.len().saturating_sub(1)].to_vec();
                full.extend(path);
                targets.push(full);
            }
            for target in targets {
                if let Some(target) = resolve(&target, &modules)
                    && !related(module, &target)
                {
                    edges.entry(module.clone()).or_default().insert(target);
                }
            }
        }
    }
    edges
}

#[test]
fn no_new_cycle_between_modules() {
    let graph = module_graph();
    assert!(
        graph.len() > 20,
        "the module graph looks empty: {:?}",
        graph.keys()
    );
    let found = cycles(&graph);
    let known: BTreeSet<Vec<String>> = KNOWN_CYCLES
        .iter()
        .map(|c| {
            let mut c: Vec<String> = c.iter().map(|m| (*m).to_owned()).collect();
            c.sort();
            c
        })
        .collect();
    let new: Vec<_> = found.difference(&known).collect();
    let gone: Vec<_> = known.difference(&found).collect();
    let show = |cycle: &Vec<String>| {
        cycle
            .iter()
            .map(|m| {
                let to: Vec<&String> = graph[m].iter().filter(|t| cycle.contains(t)).collect();
                format!("  {m} -> {to:?}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        new.is_empty(),
        "new import cycles between modules:\n{}",
        new.iter().map(|c| show(c)).collect::<Vec<_>>().join("\n\n")
    );
    assert!(
        gone.is_empty(),
        "these listed cycles are gone: take them off KNOWN_CYCLES: {gone:?}"
    );
}

#[test]
fn the_scanner_sees_crate_and_super_paths() {
    assert_eq!(
        paths_after("use crate::authn::{jwt, keys::Fetch};", "crate::"),
        vec![
            vec!["authn".to_owned(), "jwt".to_owned()],
            vec!["authn".to_owned(), "keys".to_owned()],
        ]
    );
    assert_eq!(
        paths_after("x(crate::config::Lifetimes { .. })", "crate::"),
        vec![vec!["config".to_owned(), "Lifetimes".to_owned()]]
    );
    assert!(paths_after("my_crate::x", "crate::").is_empty());
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    edges.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        cycles(&edges),
        BTreeSet::from([vec!["a".to_owned(), "b".to_owned()]])
    );
    assert!(related("authn", "authn::jwt"));
    assert!(!related("authn", "authz"));
    assert_eq!(
        module_of(Path::new("authn/mod.rs")).as_deref(),
        Some("authn")
    );
    assert_eq!(
        module_of(Path::new("authn/jwt.rs")).as_deref(),
        Some("authn::jwt")
    );
}
