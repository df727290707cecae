//! Asks Portcullis directly from a service: `IsAuthorized` for one action, and
//! `BatchIsAuthorized` for the buttons a UI may show, verifying the token once.
//!
//! Against the quickstart (`portcullis serve --config examples/quickstart/portcullis.toml`):
//!
//! ```sh
//! export PORTCULLIS_TOKEN=$(portcullis token mint --key examples/quickstart/dev-key.pem --sub alice --scope orders:read)
//! cargo run --example is_authorized -- 127.0.0.1:9191
//! ```
//!
//! Arguments: `[ADDR] [TOKEN]`; the address defaults to `127.0.0.1:9191`, the
//! token to `$PORTCULLIS_TOKEN`. Here the client types come from this crate; in
//! your own service, compile `proto/portcullis/v1/authorizer.proto` with
//! `tonic-prost-build` (or any gRPC code generator).

use portcullis::authorizer::pb::authorizer_client::AuthorizerClient;
use portcullis::authorizer::pb::{
    AuthorizationRequest, BatchIsAuthorizedRequest, Credential, Decision, Entity,
    IsAuthorizedRequest, authorization_request, credential, is_authorized_request,
};
use serde_json::json;

/// The quickstart's resource: the whole orders application.
fn orders() -> Option<Entity> {
    Some(Entity {
        r#type: "Application".into(),
        id: "orders".into(),
        ..Default::default()
    })
}

/// The context the quickstart schema asks for (Portcullis adds `token`).
fn context(method: &str, path: &str, params: serde_json::Value) -> String {
    json!({
        "http": { "method": method, "path": path, "host": "orders.example.test", "scheme": "https" },
        "path_params": params,
    })
    .to_string()
}

fn verdict(decision: i32) -> &'static str {
    match Decision::try_from(decision) {
        Ok(Decision::Allow) => "ALLOW",
        _ => "DENY",
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
    let credential = Some(Credential {
        kind: Some(credential::Kind::AccessToken(token)),
    });
    let mut client = AuthorizerClient::connect(format!("http://{addr}")).await?;

    // May this caller read order 42?
    let answer = client
        .is_authorized(IsAuthorizedRequest {
            credential: credential.clone(),
            action: "get /orders/{id}".into(),
            resource: orders(),
            context_kind: Some(is_authorized_request::ContextKind::ContextJson(context(
                "GET",
                "/orders/42",
                json!({ "id": "42" }),
            ))),
            entities: vec![],
        })
        .await?
        .into_inner();
    println!(
        "IsAuthorized get /orders/{{id}}: {} reason={} policies=[{}] principal={}",
        verdict(answer.decision),
        answer.reason,
        answer.determining_policies.join(","),
        answer.principal
    );

    // Which buttons may the UI show? One call, one token verification.
    let buttons = [
        ("list", "get /orders", "GET", "/orders", json!({})),
        (
            "view",
            "get /orders/{id}",
            "GET",
            "/orders/42",
            json!({ "id": "42" }),
        ),
        ("create", "post /orders", "POST", "/orders", json!({})),
        (
            "delete",
            "delete /orders/{id}",
            "DELETE",
            "/orders/42",
            json!({ "id": "42" }),
        ),
    ];
    let batch =
        client
            .batch_is_authorized(BatchIsAuthorizedRequest {
                credential,
                requests: buttons
                    .iter()
                    .map(|(_, action, method, path, params)| AuthorizationRequest {
                        action: (*action).into(),
                        resource: orders(),
                        context_kind: Some(authorization_request::ContextKind::ContextJson(
                            context(method, path, params.clone()),
                        )),
                        entities: vec![],
                    })
                    .collect(),
            })
            .await?
            .into_inner();
    for ((button, ..), result) in buttons.iter().zip(&batch.results) {
        println!(
            "button {button}: {} reason={}",
            verdict(result.decision),
            result.reason
        );
    }
    Ok(())
}
