//! Calls Portcullis' `Check` from a service, exactly as Envoy does: the
//! `envoy-types` client and an `AttributeContext` with the request's method,
//! path, host, headers and peer address.
//!
//! Against the quickstart (`portcullis serve --config examples/quickstart/portcullis.toml`):
//!
//! ```sh
//! export PORTCULLIS_TOKEN=$(portcullis token mint --key examples/quickstart/dev-key.pem --sub alice --scope orders:read)
//! cargo run --example check_client -- 127.0.0.1:9191
//! ```
//!
//! Arguments: `[ADDR] [TOKEN]`; the address defaults to `127.0.0.1:9191`, the
//! token to `$PORTCULLIS_TOKEN`.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address as EnvoyAddress, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::value::Kind;

fn peer(ip: &str, port: u32) -> Peer {
    Peer {
        address: Some(EnvoyAddress {
            address: Some(Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// The `CheckRequest` Envoy sends for `method path` with a bearer token.
fn check_request(method: &str, path: &str, token: &str) -> CheckRequest {
    // Envoy sends the pseudo-headers and the request headers, lower-cased.
    let headers = HashMap::from([
        (":method".to_owned(), method.to_owned()),
        (":path".to_owned(), path.to_owned()),
        (":authority".to_owned(), "orders.example.test".to_owned()),
        (":scheme".to_owned(), "https".to_owned()),
        ("authorization".to_owned(), format!("Bearer {token}")),
        ("user-agent".to_owned(), "check-client-example".to_owned()),
    ]);
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.1.2.3", 40000)),
            destination: Some(peer("10.0.0.10", 8080)),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "example-1".into(),
                    method: method.into(),
                    path: path.into(),
                    host: "orders.example.test".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            // What a route's `context_extensions` would add.
            context_extensions: HashMap::from([(
                "portcullis.mode".to_owned(),
                "enforce".to_owned(),
            )]),
            ..Default::default()
        }),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9191".into());
    let token = match args
        .next()
        .or_else(|| std::env::var("PORTCULLIS_TOKEN").ok())
    {
        Some(token) => token,
        None => return Err("give a token as the second argument or in PORTCULLIS_TOKEN".into()),
    };
    let mut client = AuthorizationClient::connect(format!("http://{addr}")).await?;
    for (method, path) in [("GET", "/orders/42"), ("POST", "/orders")] {
        let response = client
            .check(check_request(method, path, &token))
            .await?
            .into_inner();
        // The HTTP status Envoy would answer, and Portcullis' metadata.
        let status = match &response.http_response {
            Some(HttpResponse::OkResponse(_)) => 200,
            Some(HttpResponse::DeniedResponse(denied)) => {
                denied.status.as_ref().map_or(403, |s| s.code)
            }
            _ => 0,
        };
        let metadata = response.dynamic_metadata.unwrap_or_default();
        let text = |key: &str| match metadata.fields.get(key).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) => s.clone(),
            Some(Kind::ListValue(list)) => list
                .values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.as_str()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join(","),
            _ => String::new(),
        };
        println!(
            "{method} {path} -> {status} {} policies=[{}] decision_id={}",
            text("reason"),
            text("policies"),
            text("decision_id")
        );
    }
    Ok(())
}
