//! The load-time check that lets the request path skip schema validation.
//!
//! Every route action (and the default action) must be declared in the
//! schema, and the requests the mapping builds for it must conform: for each
//! configured principal type (with and without roles) and with every optional
//! attribute present, then absent. The shapes that conform are recorded in the
//! mapping; on the request path any other shape is denied (`schema_mismatch`)
//! without evaluating. Actions whose context also accepts `workload` (or
//! `caller`) get the peer identity (or the mTLS caller) in it, and those whose
//! `token` record accepts `binding` get how the token is bound.

use std::path::Path;

use super::mapping::{CedarMapping, RequestFacts, SchemaCheck};
use super::policy_store::PolicyStore;
use super::routes::RouteTable;
use crate::attributes::HttpRequest;
use crate::authn::{CredentialKind, VerifiedToken};

/// Probes every action of `routes` (and `default_action`) against the schema of
/// `store`, recording in `mapping` the shapes that conform. Returns the
/// problems, one line each, naming the schema files of `policy_dir`.
pub fn check_actions(
    mapping: &mut CedarMapping,
    store: &PolicyStore,
    routes: &RouteTable,
    default_action: Option<&str>,
    principal_types: &[String],
    policy_dir: &Path,
) -> Vec<String> {
    let mut problems = Vec::new();
    let declared: Vec<_> = store.schema.actions().cloned().collect();
    let mut actions: Vec<(String, Vec<String>)> = routes
        .actions()
        .map(|(a, params)| (a.to_owned(), params))
        .collect();
    if let Some(default) = default_action {
        actions.push((default.to_owned(), Vec::new()));
    }
    let schema_file = policy_dir.join("*.cedarschema");
    for (action, params) in actions {
        if !declared.contains(&mapping.action(&action)) {
            problems.push(format!(
                "{}: action {action:?} (from a route or default_action) is not declared in the schema",
                schema_file.display()
            ));
            continue;
        }
        let path_params: Vec<(String, String)> = params
            .into_iter()
            .map(|p| (p, "probe".to_owned()))
            .collect();
        let conforms = |mapping: &CedarMapping,
                        ty: &str,
                        roles: bool,
                        workload: bool,
                        caller: bool,
                        binding: bool| {
            [true, false].into_iter().try_for_each(|optional| {
                let http = probe_request(optional);
                let facts = RequestFacts {
                    http: &http,
                    action: &action,
                    path_params: &path_params,
                    workload: (optional && workload).then_some("spiffe://probe/probe"),
                    caller: (optional && caller).then_some("spiffe://probe/caller"),
                };
                let mut token = probe_token(ty, roles, optional);
                if optional && binding {
                    token.binding = Some(crate::authn::TokenBinding::Dpop {
                        jkt: "probe".into(),
                    });
                }
                mapping
                    .build(store, &token, facts, SchemaCheck::Validate)
                    .map(drop)
            })
        };
        let mut first_error = None;
        let mut any = false;
        for ty in principal_types {
            for roles in [false, true] {
                match conforms(mapping, ty, roles, false, false, false) {
                    Ok(()) => {
                        any = true;
                        mapping.allow_shape(&action, ty, roles);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        if !any {
            if let Some(e) = first_error {
                problems.push(format!("{}: action {action:?}: {e}", schema_file.display()));
            }
            continue;
        }
        let mut with_workload = mapping.clone();
        with_workload.enable_workload_context(&action);
        if principal_types
            .iter()
            .any(|ty| conforms(&with_workload, ty, false, true, false, false).is_ok())
        {
            mapping.enable_workload_context(&action);
        }
        let mut with_caller = mapping.clone();
        with_caller.enable_caller_context(&action);
        if principal_types
            .iter()
            .any(|ty| conforms(&with_caller, ty, false, false, true, false).is_ok())
        {
            mapping.enable_caller_context(&action);
        }
        let mut with_binding = mapping.clone();
        with_binding.enable_binding_context(&action);
        if principal_types
            .iter()
            .any(|ty| conforms(&with_binding, ty, false, false, false, true).is_ok())
        {
            mapping.enable_binding_context(&action);
        }
    }
    problems
}

fn probe_request(with_optional_attributes: bool) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        path: "/".into(),
        host: "probe".into(),
        scheme: "https".into(),
        source_ip: with_optional_attributes.then(|| [127, 0, 0, 1].into()),
        ..Default::default()
    }
}

/// A token shaped like real ones, for checking the mapping against the schema.
fn probe_token(principal_type: &str, roles: bool, with_optional_claims: bool) -> VerifiedToken {
    VerifiedToken {
        issuer: "probe".into(),
        subject: "probe".into(),
        principal_type: principal_type.into(),
        principal_id: "probe".into(),
        jti: with_optional_claims.then(|| "probe".into()),
        issued_at: 0,
        expires_at: 0,
        scopes: vec!["probe".into()],
        roles: if roles {
            vec!["probe".into()]
        } else {
            Vec::new()
        },
        client_id: with_optional_claims.then(|| "probe".into()),
        key_id: "probe".into(),
        api_key_id: None,
        credential: CredentialKind::Jwt,
        binding: None,
        status: None,
        claims: Vec::new(),
    }
}
