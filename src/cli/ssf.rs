//! `ssf status|add-subject|remove-subject|verify|create-stream|get-stream|
//! update-stream|delete-stream`: the transmitter's stream management
//! endpoints, as the receiver configured in `[ssf]` reaches them.

use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{
    AddSubjectArgs, ConfigArg, CreateStreamArgs, DeleteStreamArgs, GetStreamArgs, SsfCommand,
    StreamIdArg, SubjectArgs, UpdateStreamArgs, VerifyArgs,
};
use crate::config::{Config, SsfConfig};
use crate::ssf::stream::{
    ManagementClient, Metadata, POLL_DELIVERY, RECEIVER_EVENTS, StreamConfiguration, StreamRequest,
    fresh_state,
};

pub(super) async fn run(command: SsfCommand) -> anyhow::Result<ExitCode> {
    match command {
        SsfCommand::Status(args) => status(&args).await,
        SsfCommand::AddSubject(args) => add_subject(args).await,
        SsfCommand::RemoveSubject(args) => remove_subject(args).await,
        SsfCommand::Verify(args) => verify(args).await,
        SsfCommand::CreateStream(args) => create_stream(args).await,
        SsfCommand::GetStream(args) => get_stream(args).await,
        SsfCommand::UpdateStream(args) => update_stream(args).await,
        SsfCommand::DeleteStream(args) => delete_stream(args).await,
    }
}

/// The `[ssf]` section of `--config`.
fn ssf_config(args: &ConfigArg) -> anyhow::Result<SsfConfig> {
    let config = Config::load(&args.config)?;
    config
        .ssf
        .with_context(|| format!("{} has no [ssf] section", args.config.display()))
}

/// The client of `[ssf]` in `--config`, with the transmitter's metadata.
async fn connect(args: &ConfigArg) -> anyhow::Result<(ManagementClient, Metadata)> {
    let ssf = ssf_config(args)?;
    connect_with(&ssf).await
}

async fn connect_with(ssf: &SsfConfig) -> anyhow::Result<(ManagementClient, Metadata)> {
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

/// `--stream-id`, else `[ssf] stream_id`.
fn chosen_stream<'a>(
    arg: &'a StreamIdArg,
    client: &'a ManagementClient,
) -> anyhow::Result<&'a str> {
    match &arg.stream_id {
        Some(id) if id.is_empty() => anyhow::bail!("--stream-id must not be empty"),
        Some(id) => Ok(id),
        None => Ok(client.stream_id()?),
    }
}

/// Warns (stderr) about the events Portcullis acts on that the transmitter
/// says it will not deliver, each with what is lost.
fn warn_undelivered(stream: &StreamConfiguration) {
    if stream.events_delivered.is_none() {
        eprintln!(
            "warning: the transmitter does not say which events it delivers (no events_delivered)"
        );
    }
    for event in stream.undelivered() {
        let lost = match crate::ssf::set::classify(event) {
            crate::ssf::set::EventKind::Verification => "verification requests will go unanswered",
            crate::ssf::set::EventKind::StreamUpdated => {
                "a paused or disabled stream will not be reported"
            }
            _ => "revocations of that kind will not arrive",
        };
        eprintln!("warning: the transmitter will not deliver {event}: {lost}");
    }
}

/// The transmitter's text with control characters replaced: it must not
/// drive the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `text` as a TOML string, to paste into `[ssf]`.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

fn pretty(value: &Value) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)?)
}

async fn create_stream(args: CreateStreamArgs) -> anyhow::Result<ExitCode> {
    let ssf = ssf_config(&args.config)?;
    // One receiver, one stream: a second one would deliver every event twice.
    if let Some(existing) = &ssf.stream_id
        && !args.force
    {
        anyhow::bail!(
            "[ssf] stream_id is already set ({existing}): a new stream would be a second one; \
             delete that one (ssf delete-stream) or give --force"
        );
    }
    let request = StreamRequest::from_config(&ssf, args.push_url.as_deref(), args.description)?;
    let (client, metadata) = connect_with(&ssf).await?;
    let stream = client.create_stream(&metadata, &request).await?;
    println!("created stream {}", printable(&stream.stream_id));
    match &stream.events_delivered {
        Some(events) if events.is_empty() => println!("events delivered: none"),
        Some(events) => {
            println!("events delivered:");
            for event in events {
                println!("  {}", printable(event));
            }
        }
        None => {}
    }
    warn_undelivered(&stream);
    println!("add to [ssf] in {}:", args.config.config.display());
    println!("stream_id = {}", toml_string(&stream.stream_id));
    if request.method() == POLL_DELIVERY {
        match &stream.endpoint_url {
            Some(url) => {
                println!("poll_url = {}", toml_string(url));
                if !url.starts_with("https://") {
                    eprintln!(
                        "warning: the poll endpoint_url is not https://: [ssf] poll_url refuses it"
                    );
                }
            }
            None => eprintln!(
                "warning: the transmitter gave no delivery endpoint_url to poll: ask its operators for [ssf] poll_url"
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn get_stream(args: GetStreamArgs) -> anyhow::Result<ExitCode> {
    let (client, metadata) = connect(&args.config).await?;
    let stream_id = if args.all {
        None
    } else {
        Some(chosen_stream(&args.stream, &client)?)
    };
    let streams = client.get_streams(&metadata, stream_id).await?;
    let printed: Value = if args.all {
        Value::Array(streams.into_iter().map(|s| s.redacted).collect())
    } else {
        streams
            .into_iter()
            .next()
            .map(|s| s.redacted)
            .context("the transmitter answered no stream configuration")?
    };
    println!("{}", pretty(&printed)?);
    Ok(ExitCode::SUCCESS)
}

async fn update_stream(args: UpdateStreamArgs) -> anyhow::Result<ExitCode> {
    let ssf = ssf_config(&args.config)?;
    let (client, metadata) = connect_with(&ssf).await?;
    let stream_id = chosen_stream(&args.stream, &client)?.to_owned();
    let stream = if args.replace {
        let request = StreamRequest::from_config(&ssf, args.push_url.as_deref(), args.description)?;
        client
            .replace_stream(&metadata, &stream_id, &request)
            .await?
    } else {
        let mut changes = json!({});
        if args.receiver_events {
            changes["events_requested"] = json!(RECEIVER_EVENTS);
        } else if !args.event.is_empty() {
            changes["events_requested"] = json!(args.event);
        }
        if let Some(description) = &args.description {
            changes["description"] = json!(description);
        }
        client.update_stream(&metadata, &stream_id, changes).await?
    };
    println!("updated stream {stream_id}:");
    println!("{}", pretty(&stream.redacted)?);
    warn_undelivered(&stream);
    Ok(ExitCode::SUCCESS)
}

async fn delete_stream(args: DeleteStreamArgs) -> anyhow::Result<ExitCode> {
    let ssf = ssf_config(&args.config)?;
    let stream_id = match (&args.stream.stream_id, &ssf.stream_id) {
        (Some(id), _) | (None, Some(id)) => id.clone(),
        (None, None) => {
            anyhow::bail!("[ssf] stream_id is not set: which stream to delete (--stream-id)")
        }
    };
    // Checked before the transmitter is contacted: nothing is deleted by accident.
    if !args.yes {
        anyhow::bail!(
            "deleting stream {stream_id} stops its events (revocations included): give --yes to confirm"
        );
    }
    let (client, metadata) = connect_with(&ssf).await?;
    client.delete_stream(&metadata, &stream_id).await?;
    println!("deleted stream {stream_id}");
    if ssf.stream_id.as_deref() == Some(&stream_id) {
        println!(
            "remove stream_id from [ssf] in {}",
            args.config.config.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
