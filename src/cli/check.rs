//! `check`: one request decided locally from a configuration, or sent to a
//! running server's `Check` (`--server`); the request is built from the
//! arguments in one place.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{CheckArgs, load_engine};
use crate::attributes::{HttpRequest, parse_source_ip};
use crate::config::Config;
use crate::engine::Engine;

fn request_from_args(args: CheckArgs) -> anyhow::Result<HttpRequest> {
    let mut http = HttpRequest {
        method: args.method.to_ascii_uppercase(),
        path: args.path,
        host: args.host,
        scheme: "https".into(),
        source_ip: match &args.source_ip {
            Some(ip) => {
                Some(parse_source_ip(ip).with_context(|| format!("invalid --source-ip {ip:?}"))?)
            }
            None => None,
        },
        ..Default::default()
    };
    for (position, header) in args.headers.iter().enumerate() {
        // The argument is never repeated: it may be a credential missing its name.
        let (name, value) = header
            .split_once(':')
            .filter(|(name, _)| !name.trim().is_empty())
            .with_context(|| {
                format!(
                    "--header must be NAME:VALUE; --header number {} is not (its value is not shown)",
                    position + 1
                )
            })?;
        http.headers
            .insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    if let Some(token) = &args.token {
        http.headers
            .insert("authorization".into(), format!("Bearer {token}"));
    }
    http.peer_principal = args.peer.clone();
    Ok(http)
}

pub(super) async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = args.config.clone() else {
        bail!("--config (or PORTCULLIS_CONFIG) is required unless --server is given");
    };
    let config = Config::load(&path)?;
    let engine = load_engine(&config)?;
    for problem in engine.authenticator().fetch_remote_keys_once().await {
        eprintln!("warning: {problem}");
    }
    let explain = args.explain;
    let http = request_from_args(args)?;
    let (decision, cedar_request) = if explain {
        engine.explain(&http).await
    } else {
        (engine.decide(&http).await, None)
    };
    let list = |items: &[String]| {
        if items.is_empty() {
            "(none)".to_owned()
        } else {
            items.join(", ")
        }
    };
    let mut out = std::io::stdout().lock();
    let shown = match (decision.dry_run, decision.verdict.is_allow()) {
        (true, _) => "allow (dry-run: would deny)",
        (false, true) => "allow",
        (false, false) => "deny",
    };
    let answer = Engine::answer(Some(&engine), &decision);
    writeln!(out, "decision:  {shown}")?;
    writeln!(out, "status:    {}", answer.status)?;
    writeln!(out, "reason:    {}", decision.verdict.class())?;
    writeln!(
        out,
        "principal: {}",
        decision.principal.as_deref().unwrap_or("(none)")
    )?;
    writeln!(
        out,
        "action:    {}",
        decision.action.as_deref().unwrap_or("(none)")
    )?;
    writeln!(
        out,
        "resource:  {}",
        decision.resource.as_deref().unwrap_or("(none)")
    )?;
    writeln!(out, "policies:  {}", list(&decision.policies))?;
    writeln!(out, "errors:    {}", list(&decision.errors))?;
    if explain {
        let pairs = |items: &[(String, String)]| {
            if items.is_empty() {
                "(none)".to_owned()
            } else {
                items
                    .iter()
                    .map(|(name, value)| format!("{name}: {value}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        };
        let profiles = decision
            .shaping
            .as_ref()
            .map(|s| s.profiles.clone())
            .unwrap_or_default();
        writeln!(out, "response:")?;
        writeln!(out, "  profiles:               {}", list(&profiles))?;
        if answer.is_allow() {
            writeln!(
                out,
                "  upstream headers set:   {}",
                pairs(&answer.upstream_headers)
            )?;
            writeln!(
                out,
                "  upstream headers removed: {}",
                list(&answer.upstream_headers_to_remove)
            )?;
            writeln!(
                out,
                "  query set:              {}",
                pairs(&answer.query_to_set)
            )?;
            writeln!(
                out,
                "  query removed:          {}",
                list(&answer.query_to_remove)
            )?;
            writeln!(
                out,
                "  client headers:         {}",
                pairs(&answer.client_headers)
            )?;
        } else {
            writeln!(
                out,
                "  headers:                {}",
                pairs(&answer.client_headers)
            )?;
            writeln!(out, "  body:                   {}", answer.body)?;
        }
        match cedar_request {
            Some(request) => writeln!(
                out,
                "cedar request:\n{}",
                serde_json::to_string_pretty(&request)?
            )?,
            None => writeln!(
                out,
                "cedar request: (none: the request was refused before policies ran)"
            )?,
        }
    }
    Ok(if decision.effective_verdict().is_allow() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `check --server`: the same request, sent to a running server's `Check`.
pub(super) async fn check_remote(server: &str, args: CheckArgs) -> anyhow::Result<ExitCode> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::core::v3::{Address as EnvoyAddress, SocketAddress};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest as EnvoyHttp, Peer, Request as EnvoyRequest,
    };
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use envoy_types::pb::google::protobuf::value::Kind;

    let http = request_from_args(args)?;
    let mut headers = http.headers.clone();
    headers.insert(":method".into(), http.method.clone());
    headers.insert(":path".into(), http.path.clone());
    headers.insert(":authority".into(), http.host.clone());
    let source = http.source_ip.map(|ip| Peer {
        address: Some(EnvoyAddress {
            address: Some(Address::SocketAddress(SocketAddress {
                address: ip.to_string(),
                port_specifier: Some(PortSpecifier::PortValue(0)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    });
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            source,
            request: Some(EnvoyRequest {
                http: Some(EnvoyHttp {
                    method: http.method.clone(),
                    path: http.path.clone(),
                    host: http.host.clone(),
                    scheme: http.scheme.clone(),
                    protocol: "HTTP/1.1".into(),
                    headers: headers.into_iter().collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .with_context(|| format!("invalid --server address {server:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let response = AuthorizationClient::new(channel)
        .check(request)
        .await
        .map_err(|status| {
            anyhow::anyhow!("Check failed: {:?}: {}", status.code(), status.message())
        })?
        .into_inner();
    let field = |name: &str| {
        response
            .dynamic_metadata
            .as_ref()
            .and_then(|m| m.fields.get(name))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "(none)".into())
    };
    let (allowed, status) = match &response.http_response {
        Some(HttpResponse::OkResponse(_)) => (true, 200),
        Some(HttpResponse::DeniedResponse(denied)) => {
            (false, denied.status.as_ref().map_or(403, |s| s.code))
        }
        _ => (false, 403),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "decision:  {}", if allowed { "allow" } else { "deny" })?;
    writeln!(out, "status:    {status}")?;
    writeln!(out, "reason:    {}", field("reason"))?;
    writeln!(out, "principal: {}", field("principal"))?;
    writeln!(
        out,
        "id:        {} (the server's audit line)",
        field("decision_id")
    )?;
    Ok(if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
