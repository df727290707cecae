//! The policy author's commands: `validate` (configuration and policies),
//! `test` (the policy test cases) and `routes from-openapi`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{FromOpenApiArgs, load_engine};
use crate::config::Config;
use crate::engine::Engine;

pub(super) async fn validate(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let engine = Engine::from_config(&config).map_err(|e| e.problems);
    // The Shared Signals receiver and the AuthZEN API are not part of the
    // engine: checked beside it.
    let mut side_problems = config
        .ssf
        .as_ref()
        .map(crate::ssf::validate)
        .unwrap_or_default();
    side_problems.extend(
        config
            .authzen
            .as_ref()
            .map(crate::authzen::validate)
            .unwrap_or_default(),
    );
    let engine = match (engine, side_problems.is_empty()) {
        (Ok(engine), true) => Ok(engine),
        (Ok(_), false) => Err(crate::engine::LoadError {
            problems: side_problems,
        }),
        (Err(mut problems), _) => {
            problems.extend(side_problems);
            Err(crate::engine::LoadError { problems })
        }
    };
    match engine {
        Ok(engine) => {
            let fetch_problems = engine.authenticator().fetch_remote_keys_once().await;
            for problem in &fetch_problems {
                eprintln!("error: {problem}");
            }
            if !fetch_problems.is_empty() {
                eprintln!("{} problem(s) found", fetch_problems.len());
                return Ok(ExitCode::FAILURE);
            }
            for warning in &engine.policies().warnings {
                eprintln!("warning: {warning}");
            }
            println!(
                "ok: {} policies, {} issuer(s), {} route(s) valid",
                engine.policies().len(),
                config.issuers.len(),
                config.routes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            for problem in &e.problems {
                eprintln!("error: {problem}");
            }
            eprintln!("{} problem(s) found", e.problems.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

pub(super) fn from_openapi(args: FromOpenApiArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("cannot read {}", args.spec.display()))?;
    let operations = crate::openapi::operations(&text)?;
    let routes = crate::openapi::routes_toml(&operations);
    let schema =
        crate::openapi::cedar_schema(&operations, &args.principal_types, !args.no_base_types);
    match &args.routes_out {
        Some(path) => std::fs::write(path, &routes)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{routes}"),
    }
    match &args.schema_out {
        Some(path) => std::fs::write(path, &schema)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{schema}"),
    }
    eprintln!("{} operation(s) imported", operations.len());
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn policy_test(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let engine = load_engine(&config)?;
    let key = crate::policy_tests::test_signing_key()?;
    engine
        .authenticator()
        .trust_test_key(&key)
        .map_err(|e| anyhow::anyhow!("cannot trust the test key: {e}"))?;
    let report = crate::policy_tests::run(&engine, &key, &config.policies.dir).await?;
    let mut out = std::io::stdout().lock();
    for case in &report.cases {
        match &case.failure {
            None => writeln!(out, "ok    {}", case.name)?,
            Some(diff) => writeln!(
                out,
                "FAIL  {}
{diff}",
                case.name
            )?,
        }
    }
    let failed = report.cases.iter().filter(|c| c.failure.is_some()).count();
    writeln!(
        out,
        "\n{} case(s), {} passed, {failed} failed",
        report.cases.len(),
        report.cases.len() - failed
    )?;
    if !report.unexercised.is_empty() {
        writeln!(
            out,
            "policies no case exercised: {}",
            report.unexercised.join(", ")
        )?;
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
