//! The policy author's commands: `validate` (configuration and policies),
//! `test` (the policy test cases) and `routes from-openapi`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{FromOpenApiArgs, TestArgs, load_engine};
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
            for warning in engine.evaluator().unrouted_policies() {
                eprintln!("warning: {warning}");
            }
            if let Some(granted) = crate::authz::evaluator::declared_scopes(&config) {
                for warning in engine.evaluator().undeclared_scopes(&granted) {
                    eprintln!("warning: {warning}");
                }
            }
            for warning in engine.evaluator().shadowed_forbids() {
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

pub(super) async fn policy_test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config.config)?;
    let engine = load_engine(&config)?;
    let key = crate::policy_tests::test_signing_key()?;
    engine
        .authenticator()
        .trust_test_key(&key)
        .map_err(|e| anyhow::anyhow!("cannot trust the test key: {e}"))?;
    let report = crate::policy_tests::run(&engine, &key, &config).await?;
    let mut out = std::io::stdout().lock();
    for case in &report.cases {
        match &case.failure {
            None => writeln!(out, "ok    {}", case.name)?,
            Some(diff) => writeln!(out, "FAIL  {}\n{diff}", case.name)?,
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
    writeln!(out, "{}", report.coverage_line())?;
    if args.coverage {
        writeln!(out, "cases determined per policy:")?;
        for policy in &report.coverage {
            writeln!(
                out,
                "  {:>4}  {}  {}",
                policy.cases,
                policy.id,
                policy.location()
            )?;
        }
        let uncovered: Vec<_> = report.coverage.iter().filter(|p| p.cases == 0).collect();
        if !uncovered.is_empty() {
            writeln!(out, "uncovered policies:")?;
            for policy in uncovered {
                writeln!(out, "  {}  {}", policy.location(), policy.id)?;
            }
        }
    }
    if let Some(path) = &args.coverage_json {
        let json = serde_json::to_string_pretty(&report.coverage_json())?;
        if path.as_os_str() == "-" {
            writeln!(out, "{json}")?;
        } else {
            std::fs::write(path, format!("{json}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    let mut ok = report.passed();
    if let Some(min) = args.min_coverage
        && !report.coverage_at_least(min)
    {
        writeln!(
            out,
            "coverage below the minimum: --min-coverage {min}% not reached"
        )?;
        ok = false;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
