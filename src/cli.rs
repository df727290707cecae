//! The command line: `serve`, `validate`, `check` and the `token` dev helpers.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::attributes::{HttpRequest, parse_source_ip};
use crate::audit::AuditLog;
use crate::authn::api_key::{NewKey, create_key};
use crate::authn::mint::{MintRequest, SigningKey};
use crate::config::Config;
use crate::engine::Engine;
use crate::ext_authz::http_status;
use crate::server;

/// Portcullis: an Envoy ext_authz server enforcing JWT bearer tokens with Cedar policies.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    /// Application log format (logs go to standard error; decisions to the audit sink).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "PORTCULLIS_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Application log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the ext_authz gRPC server.
    Serve(ServeArgs),
    /// Load the config, keys and policies, validate strictly, print every problem.
    Validate(ConfigArg),
    /// Decide one request offline and explain the decision.
    Check(CheckArgs),
    /// Route tools.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// Run the policy tests in `<policies>/tests/*.toml`.
    Test(ConfigArg),
    /// Development tokens (for trying things out only).
    #[command(subcommand)]
    Token(TokenCommand),
    /// API keys for machine clients.
    #[command(subcommand, name = "apikey")]
    ApiKey(ApiKeyCommand),
}

/// `routes` subcommands.
#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    /// Write `[[routes]]` and the Cedar schema's actions from an OpenAPI 3 document.
    FromOpenapi(FromOpenApiArgs),
}

/// Arguments of `routes from-openapi`.
#[derive(Debug, Args)]
pub struct FromOpenApiArgs {
    /// The OpenAPI 3.0/3.1 document (YAML or JSON).
    spec: PathBuf,
    /// Write the `[[routes]]` tables here (default: standard output).
    #[arg(long)]
    routes_out: Option<PathBuf>,
    /// Write the Cedar schema here (default: standard output).
    #[arg(long)]
    schema_out: Option<PathBuf>,
    /// Principal types of every action (repeatable).
    #[arg(long = "principal-type", default_values_t = ["User".to_string(), "Client".to_string(), "Workload".to_string()])]
    principal_types: Vec<String>,
    /// Emit only the actions, not the entity and record types.
    #[arg(long)]
    no_base_types: bool,
}

/// `apikey` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key: prints it once, appends only its hash to the key file.
    Create(ApiKeyCreateArgs),
}

/// Arguments of `apikey create`.
#[derive(Debug, Args)]
pub struct ApiKeyCreateArgs {
    /// The key file; defaults to `[api_keys] file` of `--config`.
    #[arg(long, required_unless_present = "config")]
    file: Option<PathBuf>,
    /// Take the key file from this configuration.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Key id (public; part of the key).
    #[arg(long)]
    id: String,
    /// Cedar principal id (default: the key id).
    #[arg(long)]
    principal: Option<String>,
    /// Granted scope (repeatable).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Granted role (repeatable).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Lifetime, e.g. `30d`.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    expires: Duration,
}

/// `--config FILE`.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The TOML configuration file.
    #[arg(long, short, env = "PORTCULLIS_CONFIG")]
    pub config: PathBuf,
}

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Override `[server] listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

/// Arguments of `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The bearer token (omit to check an anonymous request).
    #[arg(long)]
    token: Option<String>,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// HTTP path, query string allowed.
    #[arg(long)]
    path: String,
    /// Extra request header `name:value` (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// Host of the request.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Client address, for policies on `context.http.source_ip`.
    #[arg(long)]
    source_ip: Option<String>,
    /// The mTLS peer's identity (e.g. a SPIFFE ID), as Envoy would report it.
    #[arg(long)]
    peer: Option<String>,
    /// Also print the Cedar request built: principal and parents, action,
    /// resource and context.
    #[arg(long)]
    explain: bool,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Sign a short-lived token with a local private key. For trying things out only.
    Mint(MintArgs),
    /// Print the JWKS (public key) for a local private key.
    Jwks(KeyArgs),
}

/// A local private key.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// PEM private key (e.g. examples/quickstart/dev-key.pem).
    #[arg(long)]
    key: PathBuf,
    /// Signature algorithm of the key.
    #[arg(long, default_value = "ES256")]
    alg: String,
    /// Key id; defaults to the key's RFC 7638 thumbprint, as in the quickstart JWKS.
    #[arg(long)]
    kid: Option<String>,
}

/// Arguments of `token mint`.
#[derive(Debug, Args)]
pub struct MintArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// `sub` claim.
    #[arg(long)]
    sub: String,
    /// Scope (repeatable), joined into the `scope` claim.
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Role (repeatable), into the `roles` claim.
    #[arg(long = "role")]
    roles: Vec<String>,
    /// `iss` claim.
    #[arg(long, default_value = "https://auth.example.test")]
    iss: String,
    /// `aud` claim.
    #[arg(long, default_value = "orders-api")]
    aud: String,
    /// Lifetime (`exp - iat`).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Validate(args) => validate(&args.config).await,
        Command::Check(args) => check(args).await,
        Command::Test(args) => policy_test(&args.config).await,
        Command::Routes(RoutesCommand::FromOpenapi(args)) => from_openapi(args),
        Command::Token(TokenCommand::Mint(args)) => mint(args),
        Command::ApiKey(ApiKeyCommand::Create(args)) => create_api_key(args),
        Command::Token(TokenCommand::Jwks(args)) => {
            let key = signing_key(&args)?;
            println!("{}", serde_json::to_string_pretty(&key.public_jwks())?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_engine(config: &Config) -> anyhow::Result<Engine> {
    Engine::from_config(config).map_err(|e| anyhow::anyhow!("the configuration is not valid:\n{e}"))
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config.config)?;
    let listen = args.listen.unwrap_or(config.server.listen);
    let audit = match &config.audit.file {
        Some(path) => AuditLog::file(path)
            .with_context(|| format!("cannot open audit file {}", path.display()))?,
        None => AuditLog::stdout(),
    };
    let running = server::start(listen, audit).await?;
    tracing::info!(addr = %running.local_addr(), "listening (NOT_SERVING until policies and keys load)");

    let engine = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Engine::from_config(&config)).await?
    };
    let engine = match engine {
        Ok(engine) => engine,
        Err(e) => {
            for problem in &e.problems {
                tracing::error!("{problem}");
            }
            running.shutdown(config.server.shutdown_grace).await?;
            bail!(
                "refusing to serve: {} problem(s) in the configuration",
                e.problems.len()
            );
        }
    };
    for warning in &engine.policies().warnings {
        tracing::warn!("{warning}");
    }
    // Remote keys refresh in the background for the life of the process; health
    // stays NOT_SERVING until every issuer has a key set.
    let background = engine.spawn_background();
    let mut waited = 0u32;
    while !engine.is_ready() {
        if waited.is_multiple_of(50) {
            tracing::warn!("waiting for the keys of every issuer (NOT_SERVING meanwhile)");
        }
        waited += 1;
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            _ = server::shutdown_signal() => {
                background.iter().for_each(|t| t.abort());
                running.shutdown(config.server.shutdown_grace).await?;
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    tracing::info!(
        policies = engine.policies().len(),
        dir = %config.policies.dir.display(),
        "policies and keys loaded; SERVING"
    );
    running.state().install(engine).await;

    server::shutdown_signal().await;
    tracing::info!("shutting down: NOT_SERVING, finishing in-flight checks");
    running.shutdown(config.server.shutdown_grace).await?;
    background.iter().for_each(|t| t.abort());
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn validate(path: &Path) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    match Engine::from_config(&config) {
        Ok(engine) => {
            let fetch_problems = engine.fetch_remote_keys_once().await;
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

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config.config)?;
    let engine = load_engine(&config)?;
    for problem in engine.fetch_remote_keys_once().await {
        eprintln!("warning: {problem}");
    }
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
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("--header must be NAME:VALUE, found {header:?}"))?;
        http.headers
            .insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    if let Some(token) = &args.token {
        http.headers
            .insert("authorization".into(), format!("Bearer {token}"));
    }
    http.peer_principal = args.peer.clone();
    let (decision, cedar_request) = if args.explain {
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
    writeln!(out, "decision:  {shown}")?;
    writeln!(
        out,
        "status:    {}",
        http_status(decision.effective_verdict())
    )?;
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
    if args.explain {
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

fn from_openapi(args: FromOpenApiArgs) -> anyhow::Result<ExitCode> {
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

async fn policy_test(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let engine = load_engine(&config)?;
    let key = crate::policy_tests::test_signing_key()?;
    engine
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

fn create_api_key(args: ApiKeyCreateArgs) -> anyhow::Result<ExitCode> {
    let settings = match &args.config {
        Some(config) => Some(
            Config::load(config)?
                .api_keys
                .context("the configuration has no [api_keys] section")?,
        ),
        None => None,
    };
    if let Some(settings) = &settings
        && args.expires > settings.max_lifetime
    {
        bail!(
            "--expires {} exceeds [api_keys] max_lifetime {}: the key would be refused",
            humantime::format_duration(args.expires),
            humantime::format_duration(settings.max_lifetime)
        );
    }
    let file = match (&args.file, settings) {
        (Some(file), _) => file.clone(),
        (None, Some(settings)) => settings.file,
        (None, None) => bail!("give --file or --config"),
    };
    let key = create_key(
        &file,
        NewKey {
            id: args.id.clone(),
            principal: args.principal,
            scopes: args.scopes,
            roles: args.roles,
            lifetime: Some(args.expires),
        },
    )?;
    eprintln!(
        "created API key {:?} in {} (only its hash is stored; this is the only time the key is shown):",
        args.id,
        file.display()
    );
    println!("{key}");
    Ok(ExitCode::SUCCESS)
}

fn signing_key(args: &KeyArgs) -> anyhow::Result<SigningKey> {
    let pem = std::fs::read(&args.key)
        .with_context(|| format!("cannot read key file {}", args.key.display()))?;
    let alg = args
        .alg
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown algorithm {:?}", args.alg))?;
    Ok(SigningKey::from_pem(&pem, alg, args.kid.clone())?)
}

fn mint(args: MintArgs) -> anyhow::Result<ExitCode> {
    let key = signing_key(&args.key)?;
    let token = key.mint(&MintRequest {
        issuer: args.iss,
        audience: args.aud,
        subject: args.sub,
        scopes: args.scopes,
        roles: args.roles,
        lifetime: args.ttl,
        extra_claims: Default::default(),
    })?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}
