//! Portcullis: an Envoy `ext_authz` v3 server that authenticates bearer tokens and
//! authorizes each request with Cedar policies.
//!
//! The decision pipeline, one module per stage:
//! [`attributes`] → [`authn`] → [`authz`] → [`decision`], orchestrated by
//! [`engine`]; [`ext_authz`] adapts it to Envoy and [`authorizer`] to services
//! asking directly (`IsAuthorized`), [`server`] serves both, [`audit`]
//! records every decision, [`config`] and [`cli`] are the operator's surface.
//! [`revocation`] holds the revoked credentials the engine checks right after
//! authentication; [`admin`] is the admin gRPC API that manages them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod admin;
pub mod answer;
pub mod attributes;
pub mod audit;
pub mod authn;
pub mod authorizer;
pub mod authz;
pub mod authzen;
pub mod cli;
pub mod config;
pub mod decision;
pub(crate) mod digest;
pub mod engine;
pub(crate) mod ext_authz;
#[cfg(test)]
pub(crate) mod fuzz;
pub(crate) mod http_authz;
pub(crate) mod http_listener;
pub(crate) mod openapi;
pub(crate) mod policy_tests;
pub mod reload;
pub mod replay;
pub mod revocation;
pub mod serve;
pub mod server;
pub(crate) mod settle;
pub mod ssf;
pub mod state;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod test_setup;
pub(crate) mod tls;
