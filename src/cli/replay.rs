//! `replay`: re-decide recorded decisions with a proposed policy folder and
//! report what changed (see [`crate::replay`]).

use std::fs::File;
use std::io::{BufReader, Write as _};
use std::process::ExitCode;

use anyhow::Context as _;

use super::{ReplayArgs, load_engine};
use crate::config::Config;
use crate::replay::{ApiKeyIdentities, Format};

pub(super) fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(&args.config)?;
    if let Some(dir) = &args.policies {
        config.policies.dir = dir.clone();
    }
    let engine = load_engine(&config)?;
    let (path, format) = match (&args.requests, &args.audit) {
        (Some(path), _) => (path, Format::Requests),
        (None, Some(path)) => (path, Format::Audit),
        (None, None) => anyhow::bail!("give --requests FILE or --audit FILE"),
    };
    let api_keys = match format {
        Format::Audit => ApiKeyIdentities::load(&config).map_err(anyhow::Error::msg)?,
        Format::Requests => ApiKeyIdentities::default(),
    };
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let report = crate::replay::replay(
        engine.evaluator(),
        BufReader::new(file),
        format,
        &api_keys,
        args.examples,
    )
    .with_context(|| format!("cannot read {}", path.display()))?;
    let opened = report.deny_to_allow.count > 0;
    let mut text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report.text()
    };
    if !args.json {
        text += &format!(
            "policies: {} ({} policies, digest {})\n",
            config.policies.dir.display(),
            engine.policies().len(),
            engine.policies().digest
        );
        if opened && !args.allow_opened {
            text += &format!(
                "access opened for {} decision(s): exit status 1 (--allow-opened accepts it)\n",
                report.deny_to_allow.count
            );
        }
    }
    // A closed pipe (`| head`) is not an error worth a panic.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok(if opened && !args.allow_opened {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
