//! What of the request context the policies can read, found in their text.
//!
//! The decision cache is keyed by everything a decision depends on. A request's
//! context carries the HTTP request, the path parameters and the token's
//! claims, but policies usually read a few of them (the quickstart reads
//! `context.token.scopes` and `context.http.source_ip`). Keying on fields no
//! policy reads would only split equal decisions across keys, so
//! [`super::mapping::CedarMapping::decision_key`] hashes only the context
//! fields these reads cover.
//!
//! The analysis walks each static policy and each template in Cedar's JSON
//! form (links share their template's body). Every use of `context` must be
//! the start of an attribute chain: `context.a.b` reads `a.b`, and
//! `context.a has b` reads `a.b` (its presence, and so its value too, to stay
//! on the safe side). Any other use of `context` (the whole record compared,
//! passed to a function, or indexed by a computed key) reads everything.

use std::collections::BTreeSet;

use cedar_policy::PolicySet;
use serde_json::Value;

/// The context paths policies can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextReads {
    /// Some use of `context` could read anything: key on all of it.
    All,
    /// Attribute paths from `context`, e.g. `["token", "scopes"]`.
    Paths(BTreeSet<Vec<String>>),
}

impl ContextReads {
    /// The reads of every static policy and template of `policies`. A policy
    /// that cannot be turned into JSON counts as reading everything.
    pub fn of(policies: &PolicySet) -> ContextReads {
        let mut paths = BTreeSet::new();
        let bodies = policies
            .policies()
            .filter(|p| p.is_static())
            .map(|p| p.to_json().ok())
            .chain(policies.templates().map(|t| t.to_json().ok()));
        for body in bodies {
            match body {
                Some(json) if collect(&json, &mut paths) => {}
                _ => return ContextReads::All,
            }
        }
        ContextReads::Paths(paths)
    }

    /// Whether a policy can read the context field at `field` (or anything
    /// inside it, or a record around it).
    pub fn covers(&self, field: &[&str]) -> bool {
        match self {
            ContextReads::All => true,
            ContextReads::Paths(paths) => paths
                .iter()
                .any(|path| path.iter().zip(field).all(|(read, wanted)| read == wanted)),
        }
    }
}

/// Adds the context paths `json` reads to `paths`; false if it uses `context`
/// other than as the start of an attribute chain.
fn collect(json: &Value, paths: &mut BTreeSet<Vec<String>>) -> bool {
    match json {
        Value::Object(map) => {
            if map.len() == 1 {
                if let Some(Value::String(var)) = map.get("Var") {
                    return var != "context";
                }
                for op in [".", "has"] {
                    if let Some(Value::Object(access)) = map.get(op)
                        && let (Some(left), Some(Value::String(attr))) =
                            (access.get("left"), access.get("attr"))
                    {
                        return match context_chain(left) {
                            Some(mut path) => {
                                path.push(attr.clone());
                                paths.insert(path);
                                true
                            }
                            None => collect(left, paths),
                        };
                    }
                }
            }
            map.values().all(|v| collect(v, paths))
        }
        Value::Array(items) => items.iter().all(|v| collect(v, paths)),
        _ => true,
    }
}

/// `context` → `[]`, `context.a.b` → `["a", "b"]`; anything else → `None`.
fn context_chain(json: &Value) -> Option<Vec<String>> {
    let map = json.as_object()?;
    if map.len() != 1 {
        return None;
    }
    if let Some(Value::String(var)) = map.get("Var") {
        return (var == "context").then(Vec::new);
    }
    let access = map.get(".")?.as_object()?;
    let mut path = context_chain(access.get("left")?)?;
    path.push(access.get("attr")?.as_str()?.to_owned());
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn reads(src: &str) -> ContextReads {
        ContextReads::of(&PolicySet::from_str(src).unwrap())
    }

    fn paths(list: &[&[&str]]) -> ContextReads {
        ContextReads::Paths(
            list.iter()
                .map(|p| p.iter().map(|s| s.to_string()).collect())
                .collect(),
        )
    }

    #[test]
    fn attribute_chains_and_has_are_read_paths() {
        let found = reads(
            r#"
            permit(principal, action, resource) when { context.token.scopes.contains("a") };
            forbid(principal, action, resource) when {
              context.http has source_ip && context.http.source_ip.isInRange(ip("10.0.0.0/8"))
            };
            permit(principal == ?principal, action, resource) when { context.path_params.id == "1" };
            "#,
        );
        assert_eq!(
            found,
            paths(&[
                &["http", "source_ip"],
                &["path_params", "id"],
                &["token", "scopes"]
            ])
        );
        assert!(found.covers(&["token", "scopes"]));
        assert!(found.covers(&["path_params"]));
        assert!(!found.covers(&["http", "path"]));
        assert!(!found.covers(&["token", "jti"]));
        assert!(!found.covers(&["workload"]));
    }

    #[test]
    fn a_record_read_whole_covers_its_fields() {
        let found = reads(
            r#"permit(principal, action, resource) when { context.http == {"method": "GET"} };"#,
        );
        assert!(found.covers(&["http", "path"]));
        assert!(!found.covers(&["token", "scopes"]));
    }

    #[test]
    fn any_other_use_of_context_reads_everything() {
        for body in [
            r#"context == {}"#,
            r#"context has http"#,
            r#"[context].contains({})"#,
            r#"(if true then context else {"a": 1}).a == 1"#,
        ] {
            let found = reads(&format!(
                "permit(principal, action, resource) when {{ {body} }};"
            ));
            // `context has http` names a path; the others can read anything.
            if body == "context has http" {
                assert_eq!(found, paths(&[&["http"]]), "{body}");
            } else {
                assert_eq!(found, ContextReads::All, "{body}");
            }
        }
    }

    #[test]
    fn policies_without_context_read_nothing() {
        let found = reads(
            r#"permit(principal in Role::"admin", action, resource) when { principal.name == "context" };"#,
        );
        assert_eq!(found, paths(&[]));
        assert!(!found.covers(&["http", "method"]));
    }
}
