//! `status` and `reload`: a running server's state, and a forced policy
//! reload, through the admin API.

use std::process::ExitCode;

use super::AdminArgs;
use super::admin_client::{admin_client, admin_error};
use crate::admin::pb;

pub(super) async fn status(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let mut client = admin_client(&args).await?;
    let status = client
        .status(pb::StatusRequest {})
        .await
        .map_err(admin_error)?
        .into_inner();
    println!("mode:           {}", status.mode);
    println!("redis:          {}", status.redis);
    println!("revocations:    {}", status.revocations);
    println!("pending writes: {}", status.pending_writes);
    println!("policies:       {}", status.policies);
    println!(
        "policy set:     generation {} digest {}",
        status.policy_generation, status.policy_digest
    );
    println!(
        "reloads:        {} ok, {} rejected",
        status.reloads, status.reload_failures
    );
    if !status.last_reload_error.is_empty() {
        println!("last rejected change:\n{}", status.last_reload_error);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn reload(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let mut client = admin_client(&args).await?;
    let reply = client
        .reload_policies(pb::ReloadPoliciesRequest {})
        .await
        .map_err(admin_error)?
        .into_inner();
    if reply.reloaded {
        println!(
            "reloaded: policy set generation {} digest {}",
            reply.generation, reply.digest
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{}", reply.error);
        eprintln!(
            "still serving generation {} digest {}",
            reply.generation, reply.digest
        );
        Ok(ExitCode::FAILURE)
    }
}
