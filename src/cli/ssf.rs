//! `ssf status|add-subject|remove-subject|verify`: the transmitter's stream
//! management endpoints, as the receiver configured in `[ssf]` reaches them.

use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{AddSubjectArgs, ConfigArg, SsfCommand, SubjectArgs, VerifyArgs};
use crate::config::Config;
use crate::ssf::stream::{ManagementClient, Metadata, fresh_state};

pub(super) async fn run(command: SsfCommand) -> anyhow::Result<ExitCode> {
    match command {
        SsfCommand::Status(args) => status(&args).await,
        SsfCommand::AddSubject(args) => add_subject(args).await,
        SsfCommand::RemoveSubject(args) => remove_subject(args).await,
        SsfCommand::Verify(args) => verify(args).await,
    }
}

/// The client of `[ssf]` in `--config`, with the transmitter's metadata.
async fn connect(args: &ConfigArg) -> anyhow::Result<(ManagementClient, Metadata)> {
    let config = Config::load(&args.config)?;
    let ssf = config
        .ssf
        .as_ref()
        .with_context(|| format!("{} has no [ssf] section", args.config.display()))?;
    let client = ManagementClient::new(ssf)?;
    let metadata = client
        .metadata()
        .await
        .with_context(|| format!("reading {}", client.configuration_url()))?;
    Ok((client, metadata))
}

async fn status(args: &ConfigArg) -> anyhow::Result<ExitCode> {
    let (client, metadata) = connect(args).await?;
    let status = client.status(&metadata).await?;
    let stream_id = status.stream_id.as_deref().unwrap_or(client.stream_id()?);
    println!("stream {stream_id}: {}", status.status);
    if let Some(reason) = &status.reason {
        println!("reason: {reason}");
    }
    // Only an enabled stream delivers events: anything else fails a check.
    Ok(if status.status == "enabled" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The subject identifier (RFC 9493) the options name.
fn subject(args: &SubjectArgs) -> anyhow::Result<Value> {
    if let Some(email) = &args.email {
        return Ok(json!({"format": "email", "email": email}));
    }
    if let Some([iss, sub]) = args.iss_sub.as_deref() {
        return Ok(json!({"format": "iss_sub", "iss": iss, "sub": sub}));
    }
    if let Some(id) = &args.opaque {
        return Ok(json!({"format": "opaque", "id": id}));
    }
    if let Some(text) = &args.subject_json {
        let subject: Value = serde_json::from_str(text).context("--subject-json is not JSON")?;
        crate::ssf::stream::check_subject(&subject)?;
        return Ok(subject);
    }
    anyhow::bail!("name a subject: --email, --iss-sub ISS SUB, --opaque or --subject-json")
}

async fn add_subject(args: AddSubjectArgs) -> anyhow::Result<ExitCode> {
    let subject = subject(&args.subject)?;
    let (client, metadata) = connect(&args.subject.config).await?;
    client
        .add_subject(&metadata, &subject, !args.unverified)
        .await?;
    println!("added to stream {}: {subject}", client.stream_id()?);
    Ok(ExitCode::SUCCESS)
}

async fn remove_subject(args: SubjectArgs) -> anyhow::Result<ExitCode> {
    let subject = subject(&args)?;
    let (client, metadata) = connect(&args.config).await?;
    client.remove_subject(&metadata, &subject).await?;
    println!("removed from stream {}: {subject}", client.stream_id()?);
    Ok(ExitCode::SUCCESS)
}

async fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let state = match args.state {
        Some(state) => state,
        None => fresh_state().context("no random state available")?,
    };
    let (client, metadata) = connect(&args.config).await?;
    client.request_verification(&metadata, &state).await?;
    println!(
        "verification requested on stream {}: state {state}",
        client.stream_id()?
    );
    Ok(ExitCode::SUCCESS)
}
