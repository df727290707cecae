//! Route table: `(method, path)` to the Cedar action and the path parameters.

use std::collections::HashMap;

use crate::config::{Mode, RouteConfig, SenderConstraint};

/// Errors raised while building the route table.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The template is not valid or conflicts with another route.
    #[error("route {method} {path}: {reason}")]
    Invalid {
        /// The route's method.
        method: String,
        /// The route's path template.
        path: String,
        /// What is wrong (e.g. a conflicting template).
        reason: String,
    },
}

/// A matched route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch<'a> {
    /// The Cedar action id.
    pub action: &'a str,
    /// The route template that matched.
    pub template: &'a str,
    /// Path parameters by name, percent-decoded.
    pub params: Vec<(String, String)>,
    /// The route accepts an mTLS workload identity instead of a credential.
    pub allow_workload: bool,
    /// The route's own enforcement mode, if set.
    pub mode: Option<Mode>,
    /// The proof of possession the route requires (`none` when unset).
    pub require_sender_constraint: SenderConstraint,
    /// The route's `[[responses]]` profile, if it names one.
    pub response: Option<&'a str>,
}

struct Route {
    action: String,
    template: String,
    allow_workload: bool,
    mode: Option<Mode>,
    require_sender_constraint: SenderConstraint,
    response: Option<String>,
}

/// All configured routes, one matcher per method.
#[derive(Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    by_method: HashMap<String, matchit::Router<usize>>,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.routes.len())
            .finish()
    }
}

impl RouteTable {
    /// Builds the table; conflicting or malformed templates are errors.
    pub fn new(configs: &[RouteConfig]) -> Result<RouteTable, RouteError> {
        let mut table = RouteTable::default();
        for config in configs {
            let index = table.routes.len();
            table
                .by_method
                .entry(config.method.clone())
                .or_default()
                .insert(config.path.clone(), index)
                .map_err(|e| RouteError::Invalid {
                    method: config.method.clone(),
                    path: config.path.clone(),
                    reason: e.to_string(),
                })?;
            table.routes.push(Route {
                action: config.action_id(),
                template: config.path.clone(),
                allow_workload: config.allow_workload,
                mode: config.mode,
                require_sender_constraint: config.require_sender_constraint.unwrap_or_default(),
                response: config.response.clone(),
            });
        }
        Ok(table)
    }

    /// Matches a method and a path without query string.
    pub fn find(&self, method: &str, path: &str) -> Option<RouteMatch<'_>> {
        let matched = self.by_method.get(method)?.at(path).ok()?;
        let route = self.routes.get(*matched.value)?;
        let params = matched
            .params
            .iter()
            .map(|(name, value)| {
                let decoded = percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned();
                (name.to_owned(), decoded)
            })
            .collect();
        Some(RouteMatch {
            action: &route.action,
            template: &route.template,
            params,
            allow_workload: route.allow_workload,
            mode: route.mode,
            require_sender_constraint: route.require_sender_constraint,
            response: route.response.as_deref(),
        })
    }

    /// The action ids of all routes, with the parameter names of their templates.
    pub fn actions(&self) -> impl Iterator<Item = (&str, Vec<String>)> {
        self.routes
            .iter()
            .map(|r| (r.action.as_str(), template_params(&r.template)))
    }
}

/// Names of the `{param}` / `{*param}` segments of a template.
pub fn template_params(template: &str) -> Vec<String> {
    template
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| name.trim_start_matches('*').to_owned())
        .collect()
}

/// A path is canonical when it starts with `/`, has no empty segment (`//`),
/// no `.` or `..` segment (also not one hidden behind path parameters, as in
/// `..;x`, which servlet containers read as `..`), no `\`, no raw control
/// character, space or DEL, and no percent-encoded `/`, `\`, `.` or NUL: anything else could reach a different
/// handler upstream than the route it matches here. Such a path is refused
/// (400), never matched; a proxy that normalises paths first (Envoy's
/// `normalize_path`, `merge_slashes`) sends the canonical form instead.
pub fn is_canonical_path(path: &str) -> bool {
    if !path.starts_with('/') || path.contains('\\') || path.contains("//") {
        return false;
    }
    // A raw control character, space or DEL is never part of a URI path
    // (RFC 3986); an upstream may strip or split on it and see another path.
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if ["%2f", "%5c", "%2e", "%00", "\0"]
        .iter()
        .any(|bad| lower.contains(bad))
    {
        return false;
    }
    !path.split('/').any(|segment| {
        let name = segment.split(';').next().unwrap_or(segment);
        name == "." || name == ".."
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str) -> RouteConfig {
        RouteConfig {
            method: method.into(),
            path: path.into(),
            action: None,
            allow_workload: false,
            mode: None,
            require_sender_constraint: None,
            response: None,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(&[
            route("GET", "/orders"),
            route("GET", "/orders/{id}"),
            route("POST", "/orders"),
        ])
        .unwrap()
    }

    #[test]
    fn matches_template_and_params() {
        let t = table();
        let m = t.find("GET", "/orders/7").unwrap();
        assert_eq!(m.action, "get /orders/{id}");
        assert_eq!(m.params, vec![("id".to_string(), "7".to_string())]);
        assert_eq!(t.find("POST", "/orders").unwrap().action, "post /orders");
    }

    #[test]
    fn extra_segments_and_other_methods_do_not_match() {
        let t = table();
        assert!(t.find("GET", "/orders/7/extra").is_none());
        assert!(t.find("DELETE", "/orders/7").is_none());
        assert!(t.find("GET", "/order").is_none());
    }

    #[test]
    fn params_are_percent_decoded() {
        let m = table().find("GET", "/orders/a%20b").map(|m| m.params);
        assert_eq!(m, Some(vec![("id".into(), "a b".into())]));
    }

    #[test]
    fn conflicting_templates_are_rejected() {
        let err = RouteTable::new(&[route("GET", "/orders/{id}"), route("GET", "/orders/{oid}")]);
        assert!(err.is_err());
    }

    #[test]
    fn canonical_paths() {
        assert!(is_canonical_path("/orders/7"));
        assert!(!is_canonical_path("/orders/../admin"));
        assert!(!is_canonical_path("/orders/./7"));
        assert!(!is_canonical_path("/orders%2F7"));
        assert!(!is_canonical_path("/orders/%2e%2e/admin"));
        assert!(!is_canonical_path("orders"));
        assert!(!is_canonical_path("/orders/7%00"));
        // Raw control characters, space and DEL (found by the CheckRequest
        // fuzz target: `/orders/\u{1}7` was decided as `/orders/{id}`).
        for bad in [
            "/orders/\u{1}7",
            "/orders/7\t",
            "/orders/7\r\n",
            "/orders/ 7",
            "/orders/7\u{7f}",
        ] {
            assert!(!is_canonical_path(bad), "{bad:?}");
        }
        // Empty segments, and dot segments behind path parameters.
        assert!(!is_canonical_path("//orders/7"));
        assert!(!is_canonical_path("/orders//7"));
        assert!(!is_canonical_path("/orders/..;/admin"));
        assert!(!is_canonical_path("/orders/..;x=1"));
        assert!(!is_canonical_path("/orders/.;/7"));
        // Parameters on an ordinary segment and a trailing slash are fine.
        assert!(is_canonical_path("/orders/7;v=1"));
        assert!(is_canonical_path("/orders/"));
        assert!(is_canonical_path("/"));
    }

    #[test]
    fn template_param_names() {
        assert_eq!(template_params("/a/{id}/b/{*rest}"), vec!["id", "rest"]);
    }
}
