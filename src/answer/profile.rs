//! Responses driven by policy: the `[[responses]]` profiles, checked and
//! compiled when the configuration and policies load, and rendered for a
//! decision into a [`Shaping`] that [`crate::answer`] applies.
//!
//! A profile applies when the matched route names it (`[[routes]] response`)
//! or when a determining policy carries `@response("<name>")`: on an allow,
//! the route's profile then each determining `permit`'s, later ones
//! overriding a header of the same name; on a policy deny, the first
//! determining `forbid`'s profile that says how to deny, else the route's.
//!
//! Values sent upstream are templates over the verified identity only
//! (`{subject}`, `{principal_id}`, `{principal_type}`, `{issuer}`,
//! `{client_id}`, `{scopes}`, `{roles}`, `{credential}`, `{decision_id}`,
//! `{claims.<name>}`), never over the request's own content, and no variable
//! can carry the credential itself. Header names that carry credentials
//! (`authorization`, `cookie`, the API-key header) cannot be set.

use std::collections::HashMap;
use std::sync::Arc;

use crate::authn::VerifiedToken;
use crate::authz::policy_store::PolicyStore;
use crate::config::{Config, ResponseProfileConfig};
use crate::decision::{DenyProblem, Shaping};

/// Longest template or static value, in bytes.
const MAX_VALUE_BYTES: usize = 4096;
/// Longest problem `title`, `detail` or `type`, in bytes.
const MAX_PROBLEM_BYTES: usize = 1024;

/// Headers a profile may not set: hop-by-hop, pseudo, or credentials.
const FORBIDDEN_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "content-length",
];

/// The compiled profiles of one configuration and policy set.
#[derive(Debug, Default)]
pub struct ResponseProfiles {
    by_name: HashMap<String, Arc<Profile>>,
    /// Policy id → the profile its `@response` annotation names.
    by_policy: HashMap<String, Arc<Profile>>,
}

#[derive(Debug)]
struct Profile {
    name: String,
    upstream_headers: Vec<(String, Template)>,
    remove_upstream_headers: Vec<String>,
    set_query: Vec<(String, Template)>,
    remove_query: Vec<String>,
    client_headers: Vec<(String, String)>,
    deny: Option<DenyProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Var {
    Subject,
    PrincipalId,
    PrincipalType,
    Issuer,
    ClientId,
    Scopes,
    Roles,
    Credential,
    DecisionId,
    Claim(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Part>);

impl Template {
    fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("{text:?}: unclosed {{"))?;
            let name = after[..close].trim();
            let var = match name {
                "subject" => Var::Subject,
                "principal_id" => Var::PrincipalId,
                "principal_type" => Var::PrincipalType,
                "issuer" => Var::Issuer,
                "client_id" => Var::ClientId,
                "scopes" => Var::Scopes,
                "roles" => Var::Roles,
                "credential" => Var::Credential,
                "decision_id" => Var::DecisionId,
                other => match other.strip_prefix("claims.") {
                    Some(claim) if is_claim_name(claim) => Var::Claim(claim.to_owned()),
                    _ => {
                        return Err(format!(
                            "{text:?}: unknown variable {{{other}}} (known: subject, principal_id, principal_type, issuer, client_id, scopes, roles, credential, decision_id, claims.<name>)"
                        ));
                    }
                },
            };
            parts.push(Part::Var(var));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?}: unopened }}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template(parts))
    }

    /// The value for `token`, or `None` when a variable has no value (a
    /// claim the token lacks) or the result is not a valid header value.
    fn render(&self, token: &VerifiedToken, decision_id: &str) -> Option<String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Var(var) => match var {
                    Var::Subject => out.push_str(&token.subject),
                    Var::PrincipalId => out.push_str(&token.principal_id),
                    Var::PrincipalType => out.push_str(&token.principal_type),
                    Var::Issuer => out.push_str(&token.issuer),
                    Var::ClientId => out.push_str(token.client_id.as_deref()?),
                    Var::Scopes => out.push_str(&token.scopes.join(" ")),
                    Var::Roles => out.push_str(&token.roles.join(",")),
                    Var::Credential => out.push_str(token.credential.as_str()),
                    Var::DecisionId => out.push_str(decision_id),
                    Var::Claim(name) => {
                        let (_, value) = token.claims.iter().find(|(n, _)| n == name)?;
                        out.push_str(value);
                    }
                },
            }
        }
        is_header_value(&out).then_some(out)
    }
}

fn is_claim_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.'))
}

/// RFC 9110 field-name (token characters), lower case.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Visible ASCII and spaces only: no CR, LF, NUL or other controls.
fn is_header_value(value: &str) -> bool {
    value.len() <= MAX_VALUE_BYTES
        && value
            .bytes()
            .all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b))
}

fn is_query_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| (0x21..0x7f).contains(&b) && !matches!(b, b'&' | b'=' | b'#' | b'?'))
}

impl ResponseProfiles {
    /// Compiles `config`'s `[[responses]]` and checks the routes' and the
    /// policies' references to them. Every problem is returned, one line each.
    pub fn load(config: &Config, store: &PolicyStore) -> Result<ResponseProfiles, Vec<String>> {
        let mut problems = Vec::new();
        let mut by_name = HashMap::new();
        let api_key_header = config
            .api_keys
            .as_ref()
            .and_then(|k| k.header.as_deref())
            .map(str::to_ascii_lowercase);
        let mut reserved: Vec<&str> = FORBIDDEN_HEADERS.to_vec();
        if let Some(header) = &api_key_header {
            reserved.push(header);
        }
        if !config.response.subject_header.is_empty() {
            reserved.push(&config.response.subject_header);
        }
        for profile in &config.responses {
            match compile(profile, &reserved) {
                Ok(compiled) => {
                    if by_name
                        .insert(profile.name.clone(), Arc::new(compiled))
                        .is_some()
                    {
                        problems.push(format!(
                            "[[responses]] name {:?} is defined twice",
                            profile.name
                        ));
                    }
                }
                Err(errors) => problems.extend(
                    errors
                        .into_iter()
                        .map(|e| format!("[[responses]] {:?}: {e}", profile.name)),
                ),
            }
        }
        for route in &config.routes {
            if let Some(name) = &route.response
                && !by_name.contains_key(name)
            {
                problems.push(format!(
                    "[[routes]] {} {}: response {name:?} names no [[responses]] profile",
                    route.method, route.path
                ));
            }
        }
        let mut by_policy = HashMap::new();
        for policy in store.policies.policies() {
            if let Some(name) = policy.annotation("response") {
                let id = policy.id().to_string();
                match by_name.get(name) {
                    Some(profile) => {
                        by_policy.insert(id, Arc::clone(profile));
                    }
                    None => {
                        let file = store
                            .policy_files
                            .get(policy.id())
                            .map(|f| f.display().to_string())
                            .unwrap_or_default();
                        problems.push(format!(
                            "{file}: policy {id:?}: @response({name:?}) names no [[responses]] profile"
                        ));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(ResponseProfiles { by_name, by_policy })
        } else {
            Err(problems)
        }
    }

    /// No profile is configured: nothing to render, ever.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The shaping of a decision for `token`: `route` is the matched route's
    /// profile name, `policies` the determining policies, `allowed` the
    /// verdict (for a deny, only a policy deny is shaped). `None` when no
    /// profile applies.
    pub fn render(
        &self,
        route: Option<&str>,
        policies: &[String],
        allowed: bool,
        token: &VerifiedToken,
        decision_id: &str,
    ) -> Option<Shaping> {
        if self.is_empty() {
            return None;
        }
        let route = route.and_then(|name| self.by_name.get(name));
        let from_policies = policies.iter().filter_map(|id| self.by_policy.get(id));
        let mut applied: Vec<&Arc<Profile>> = route.into_iter().collect();
        // On a deny the determining policies are forbids; on an allow, permits.
        applied.extend(from_policies);
        if applied.is_empty() {
            return None;
        }
        let mut shaping = Shaping {
            profiles: applied.iter().map(|p| p.name.clone()).collect(),
            ..Shaping::default()
        };
        // The allow side: also what a dry-run deny's allow carries.
        let allow_side: Vec<&Arc<Profile>> = if allowed {
            applied.clone()
        } else {
            route.into_iter().collect()
        };
        for profile in &allow_side {
            for (name, template) in &profile.upstream_headers {
                if let Some(value) = template.render(token, decision_id) {
                    set(&mut shaping.upstream_headers, name, value);
                }
            }
            for name in &profile.remove_upstream_headers {
                if !shaping.remove_upstream_headers.contains(name) {
                    shaping.remove_upstream_headers.push(name.clone());
                }
            }
            for (name, template) in &profile.set_query {
                if let Some(value) = template.render(token, decision_id) {
                    set(&mut shaping.set_query, name, value);
                }
            }
            for name in &profile.remove_query {
                if !shaping.remove_query.contains(name) {
                    shaping.remove_query.push(name.clone());
                }
            }
        }
        for profile in &applied {
            for (name, value) in &profile.client_headers {
                set(&mut shaping.client_headers, name, value.clone());
            }
        }
        if !allowed {
            // The first forbid that says how to deny, else the route's.
            shaping.deny = applied
                .iter()
                .skip(usize::from(route.is_some()))
                .chain(route.iter())
                .find_map(|p| p.deny.clone());
        }
        Some(shaping)
    }
}

fn set(list: &mut Vec<(String, String)>, name: &str, value: String) {
    match list.iter_mut().find(|(n, _)| n == name) {
        Some(entry) => entry.1 = value,
        None => list.push((name.to_owned(), value)),
    }
}

fn compile(config: &ResponseProfileConfig, reserved: &[&str]) -> Result<Profile, Vec<String>> {
    let mut problems = Vec::new();
    if config.name.is_empty() {
        problems.push("name is empty".to_owned());
    }
    let header_name = |name: &str, what: &str, problems: &mut Vec<String>| {
        if !is_header_name(name) {
            problems.push(format!("{what} {name:?} is not a lower-case header name"));
            false
        } else {
            true
        }
    };
    let mut upstream_headers = Vec::new();
    for (name, value) in &config.upstream_headers {
        if !header_name(name, "upstream_headers", &mut problems) {
            continue;
        }
        if reserved.contains(&name.as_str()) {
            problems.push(format!(
                "upstream_headers {name:?} may not be set by a response profile (credentials, hop-by-hop and the identity header are Portcullis' own)"
            ));
            continue;
        }
        match check_static_text(value).and_then(|()| Template::parse(value)) {
            Ok(template) => upstream_headers.push((name.clone(), template)),
            Err(e) => problems.push(format!("upstream_headers {name:?}: {e}")),
        }
    }
    for name in &config.remove_upstream_headers {
        header_name(name, "remove_upstream_headers", &mut problems);
    }
    let mut set_query = Vec::new();
    for (name, value) in &config.set_query {
        if !is_query_name(name) {
            problems.push(format!("set_query {name:?} is not a query parameter name"));
            continue;
        }
        match check_static_text(value).and_then(|()| Template::parse(value)) {
            Ok(template) => set_query.push((name.clone(), template)),
            Err(e) => problems.push(format!("set_query {name:?}: {e}")),
        }
    }
    for name in &config.remove_query {
        if !is_query_name(name) {
            problems.push(format!(
                "remove_query {name:?} is not a query parameter name"
            ));
        }
    }
    let mut client_headers = Vec::new();
    for (name, value) in &config.client_headers {
        if !header_name(name, "client_headers", &mut problems) {
            continue;
        }
        if FORBIDDEN_HEADERS.contains(&name.as_str())
            || name == "www-authenticate"
            || name == "content-type"
        {
            problems.push(format!(
                "client_headers {name:?} may not be set by a response profile"
            ));
            continue;
        }
        if value.contains(['{', '}']) {
            problems.push(format!(
                "client_headers {name:?}: values sent to the client are static (no {{variables}})"
            ));
            continue;
        }
        match check_static_text(value) {
            Ok(()) => client_headers.push((name.clone(), value.clone())),
            Err(e) => problems.push(format!("client_headers {name:?}: {e}")),
        }
    }
    let deny = if config.deny_status.is_some()
        || config.deny_title.is_some()
        || config.deny_detail.is_some()
        || config.deny_type.is_some()
    {
        let status = config.deny_status.unwrap_or(403);
        if !(400..=599).contains(&status) {
            problems.push(format!("deny_status {status} is not between 400 and 599"));
        }
        for (field, value) in [
            ("deny_title", &config.deny_title),
            ("deny_detail", &config.deny_detail),
            ("deny_type", &config.deny_type),
        ] {
            if let Some(value) = value
                && (value.len() > MAX_PROBLEM_BYTES || value.chars().any(char::is_control))
            {
                problems.push(format!(
                    "{field} must be at most {MAX_PROBLEM_BYTES} bytes without control characters"
                ));
            }
        }
        Some(DenyProblem {
            status,
            title: config.deny_title.clone(),
            detail: config.deny_detail.clone(),
            problem_type: config.deny_type.clone(),
        })
    } else {
        None
    };
    if problems.is_empty() {
        Ok(Profile {
            name: config.name.clone(),
            upstream_headers,
            remove_upstream_headers: config.remove_upstream_headers.clone(),
            set_query,
            remove_query: config.remove_query.clone(),
            client_headers,
            deny,
        })
    } else {
        Err(problems)
    }
}

fn check_static_text(value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!("longer than {MAX_VALUE_BYTES} bytes"));
    }
    if !is_header_value(value) {
        return Err("holds a control character (CR, LF, NUL...) or non-ASCII".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::CredentialKind;

    fn token() -> VerifiedToken {
        VerifiedToken {
            scopes: vec!["a".into(), "b".into()],
            roles: vec!["admin".into()],
            claims: vec![
                ("tenant".into(), "acme".into()),
                ("evil".into(), "x\r\ninjected: 1".into()),
            ],
            ..VerifiedToken::principal_only(
                "https://idp.test",
                "User",
                "alice",
                CredentialKind::Jwt,
            )
        }
    }

    #[test]
    fn templates_render_identity_values_and_skip_what_is_missing_or_unsafe() {
        let t = Template::parse("{claims.tenant}/{subject} ({roles}) [{scopes}]").unwrap();
        assert_eq!(
            t.render(&token(), "d1").as_deref(),
            Some("acme/alice (admin) [a b]")
        );
        // A claim the token lacks, or a client_id it lacks: no header.
        assert_eq!(
            Template::parse("{claims.org}")
                .unwrap()
                .render(&token(), "d"),
            None
        );
        assert_eq!(
            Template::parse("{client_id}")
                .unwrap()
                .render(&token(), "d"),
            None
        );
        // A claim holding CR/LF never becomes a header value.
        assert_eq!(
            Template::parse("{claims.evil}")
                .unwrap()
                .render(&token(), "d"),
            None
        );
        assert!(Template::parse("{token}").is_err());
        assert!(Template::parse("{header.authorization}").is_err());
        assert!(Template::parse("{subject").is_err());
        assert!(Template::parse("subject}").is_err());
    }

    fn profile(toml_text: &str) -> Result<Profile, Vec<String>> {
        let config: ResponseProfileConfig =
            toml::from_str(&format!("name = \"p\"\n{toml_text}")).unwrap();
        compile(&config, FORBIDDEN_HEADERS)
    }

    #[test]
    fn profiles_that_could_leak_a_credential_or_break_http_are_refused() {
        for bad in [
            "upstream_headers = { authorization = \"{subject}\" }",
            "upstream_headers = { cookie = \"x\" }",
            "upstream_headers = { \"X-Upper\" = \"x\" }",
            "upstream_headers = { \"x-a\" = \"line\\r\\nbreak\" }",
            "upstream_headers = { \"x-a\" = \"{request.path}\" }",
            "client_headers = { \"x-a\" = \"{subject}\" }",
            "client_headers = { \"www-authenticate\" = \"x\" }",
            "set_query = { \"a&b\" = \"x\" }",
            "deny_status = 200",
            "deny_title = \"a\\nb\"",
        ] {
            assert!(profile(bad).is_err(), "{bad} was accepted");
        }
        assert!(
            profile("upstream_headers = { \"x-tenant\" = \"{claims.tenant}\" }\nremove_upstream_headers = [\"cookie\"]\nset_query = { tenant = \"{claims.tenant}\" }\nclient_headers = { \"cache-control\" = \"no-store\" }\ndeny_status = 404")
                .is_ok()
        );
    }
}
