//! The command line: `serve`, `validate`, `check`, the admin API clients
//! (`revoke`, `revocations`, `status`), the Shared Signals stream management
//! commands (`ssf`) and the `token` dev helpers.
//!
//! This file holds the argument types and the dispatch; each command's
//! implementation lives in the file named after its concern.

mod admin_client;
mod check;
mod keys;
mod policy;
mod replay;
mod revoke;
mod ssf;
mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, Secret};
use crate::engine::Engine;
use crate::server;

pub use revoke::{ListedTarget, REVOKE_BATCH_SIZE, parse_target_list};

/// Portcullis: an Envoy ext_authz server that verifies JWTs, opaque tokens, API keys and SPIFFE identities, then enforces Cedar policies.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    /// Application log format (logs go to standard error; decisions to the audit
    /// sink). Default: `[telemetry] log_format` of the served configuration, else plain.
    #[arg(long, global = true, value_enum, env = "PORTCULLIS_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The configuration `serve` is given, read early for its `[telemetry]`
    /// table (log format, trace export). `None` for other commands, and when
    /// it cannot be read: `serve` then reports the problem itself.
    pub fn served_config(&self) -> Option<Config> {
        match &self.command {
            Command::Serve(args) => Config::load(&args.config.config).ok(),
            _ => None,
        }
    }

    /// The application log format: `--log-format`, else `[telemetry]
    /// log_format` of `config`, else plain.
    pub fn log_format(&self, config: Option<&Config>) -> LogFormat {
        if let Some(format) = self.log_format {
            return format;
        }
        match config.and_then(|c| c.telemetry.log_format.as_deref()) {
            Some("json") => LogFormat::Json,
            _ => LogFormat::Plain,
        }
    }
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
    /// Re-decide recorded decisions with proposed policies and report what would change.
    Replay(ReplayArgs),
    /// Revoke a credential on a running server (through its admin API).
    Revoke(RevokeArgs),
    /// List the revocations in force on a running server.
    Revocations(AdminArgs),
    /// Show a running server's revocation count, Redis link and policies.
    Status(AdminArgs),
    /// Reload a running server's configuration file and policy folder now (as SIGHUP does).
    Reload(AdminArgs),
    /// Route tools.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// Run the policy tests in `<policies>/tests/` (`*.toml`, `*.yaml`, `*.yml`) and report policy coverage.
    Test(TestArgs),
    /// Development tokens (for trying things out only).
    #[command(subcommand)]
    Token(TokenCommand),
    /// API keys for machine clients.
    #[command(subcommand, name = "apikey")]
    ApiKey(ApiKeyCommand),
    /// Shared Signals stream management at the transmitter (`[ssf]`): the stream, its status, subjects, verification.
    #[command(subcommand)]
    Ssf(SsfCommand),
}

/// `ssf` subcommands.
#[derive(Debug, Subcommand)]
pub enum SsfCommand {
    /// Print the stream's status at the transmitter (exit 1 unless enabled).
    Status(ConfigArg),
    /// Add a subject to the stream.
    AddSubject(AddSubjectArgs),
    /// Remove a subject from the stream.
    RemoveSubject(SubjectArgs),
    /// Ask the transmitter to send a verification event.
    Verify(VerifyArgs),
    /// Create the receiver's stream at the transmitter, as `[ssf]` describes it; prints its stream_id.
    CreateStream(CreateStreamArgs),
    /// Print a stream's configuration at the transmitter (JSON).
    GetStream(GetStreamArgs),
    /// Change the stream's requested events or description, or replace its configuration.
    UpdateStream(UpdateStreamArgs),
    /// Delete the stream at the transmitter.
    DeleteStream(DeleteStreamArgs),
}

/// Arguments of `ssf create-stream`.
#[derive(Debug, Args)]
pub struct CreateStreamArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Push delivery (needed when `push_listen` is set): the public https:// URL that reaches the push endpoint.
    #[arg(long, value_name = "URL")]
    push_url: Option<String>,
    /// The stream's description, for the transmitter's operators.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Create a stream although `[ssf] stream_id` is set (a second stream).
    #[arg(long)]
    force: bool,
}

/// Which stream: `--stream-id`, else `[ssf] stream_id`.
#[derive(Debug, Args)]
pub struct StreamIdArg {
    /// The stream to manage, instead of `[ssf] stream_id`.
    #[arg(long, value_name = "ID")]
    stream_id: Option<String>,
}

/// Arguments of `ssf get-stream`.
#[derive(Debug, Args)]
pub struct GetStreamArgs {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    stream: StreamIdArg,
    /// Every stream of this receiver at the transmitter.
    #[arg(long, conflicts_with = "stream_id")]
    all: bool,
}

/// Arguments of `ssf update-stream`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["event", "receiver_events", "description", "replace"])
))]
pub struct UpdateStreamArgs {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    stream: StreamIdArg,
    /// Set `events_requested` to these event type URIs (repeatable).
    #[arg(long, value_name = "URI", conflicts_with = "receiver_events")]
    event: Vec<String>,
    /// Set `events_requested` to the event types Portcullis acts on (as `create-stream` does).
    #[arg(long)]
    receiver_events: bool,
    /// Set the stream's description.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// PUT the whole configuration `create-stream` would send (delivery from `[ssf]`, the push token), instead of a PATCH.
    #[arg(long, conflicts_with_all = ["event"])]
    replace: bool,
    /// With `--replace` and push delivery: the public https:// URL of the push endpoint.
    #[arg(long, value_name = "URL", requires = "replace")]
    push_url: Option<String>,
}

/// Arguments of `ssf delete-stream`.
#[derive(Debug, Args)]
pub struct DeleteStreamArgs {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    stream: StreamIdArg,
    /// Confirm: the transmitter stops sending events for the stream.
    #[arg(long)]
    yes: bool,
}

/// A subject identifier (RFC 9493), by one of the options.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("subject")
        .required(true)
        .args(["email", "iss_sub", "opaque", "subject_json"])
))]
pub struct SubjectArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// `{"format": "email", "email": EMAIL}`.
    #[arg(long)]
    email: Option<String>,
    /// `{"format": "iss_sub", "iss": ISS, "sub": SUB}`.
    #[arg(long, num_args = 2, value_names = ["ISS", "SUB"])]
    iss_sub: Option<Vec<String>>,
    /// `{"format": "opaque", "id": ID}`.
    #[arg(long, value_name = "ID")]
    opaque: Option<String>,
    /// Any subject identifier, or an SSF complex subject, as JSON.
    #[arg(long, value_name = "JSON")]
    subject_json: Option<String>,
}

/// Arguments of `ssf add-subject`.
#[derive(Debug, Args)]
pub struct AddSubjectArgs {
    #[command(flatten)]
    subject: SubjectArgs,
    /// Send `"verified": false`: the subject was not verified by the receiver.
    #[arg(long)]
    unverified: bool,
}

/// Arguments of `ssf verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The `state` the verification event must carry (default: fresh random).
    #[arg(long)]
    state: Option<String>,
}

/// `routes` subcommands.
#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    /// Write `[[routes]]` and the Cedar schema's actions from an OpenAPI 3 document.
    FromOpenapi(FromOpenApiArgs),
}

/// Arguments of `test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Also print per policy the number of cases it determined and its `file:line`, then the uncovered policies.
    #[arg(long)]
    coverage: bool,
    /// Write the coverage as JSON to this file (`-`: standard output).
    #[arg(long, value_name = "FILE")]
    coverage_json: Option<PathBuf>,
    /// Fail (exit code 1) when fewer than this percentage of the policies determined a decision.
    #[arg(long, value_name = "PCT", value_parser = parse_percent)]
    min_coverage: Option<f64>,
}

fn parse_percent(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("not a number: {text:?}"))?;
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("must be between 0 and 100, found {value}"))
    }
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

/// How to reach a server's admin API.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Admin listener (`[admin] listen`), e.g. `127.0.0.1:9192`.
    #[arg(long = "admin", value_name = "ADDR", env = "PORTCULLIS_ADMIN")]
    pub admin: String,
    /// The admin token. Prefer the environment variable: other users can read
    /// command lines.
    #[arg(
        long,
        env = "PORTCULLIS_ADMIN_TOKEN",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub admin_token: Secret,
    /// CA certificate (PEM) that the admin listener's certificate chains to.
    /// Given (or with an `https://` address), the CLI speaks TLS. Plaintext is
    /// only used to a loopback address: the admin token never crosses a
    /// network in the clear.
    #[arg(long, value_name = "FILE", env = "PORTCULLIS_ADMIN_CA")]
    pub admin_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an admin listener that requires mTLS.
    #[arg(
        long,
        value_name = "FILE",
        env = "PORTCULLIS_ADMIN_CERT",
        requires = "admin_key"
    )]
    pub admin_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "PORTCULLIS_ADMIN_KEY",
        requires = "admin_cert"
    )]
    pub admin_key: Option<PathBuf>,
    /// The name the admin listener's certificate must carry, when it is not
    /// the host of `--admin` (e.g. connecting by IP address).
    #[arg(long, value_name = "NAME")]
    pub admin_server_name: Option<String>,
}

fn parse_secret(value: &str) -> Result<Secret, String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(Secret::new(value))
}

/// Arguments of `revoke`: exactly one target, or a file of targets.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("target")
        .required(true)
        .args(["jti", "sub", "kid", "client", "all_from_issuer", "api_key", "from_file"])
))]
pub struct RevokeArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Revoke every target listed in FILE (`-`: standard input), one per line:
    /// `jti <id> [issuer=<iss>] [exp=<unix>]`, `sub <sub> [before=<rfc3339|now>]`,
    /// `kid <kid> [before=...]`, `client <id> [before=...]`,
    /// `issuer <iss> [before=...]` or `api_key <id>`; `#` comments and blank
    /// lines are ignored. The whole file is checked before anything is sent,
    /// then sent in batches of 1,000.
    #[arg(long, value_name = "FILE")]
    from_file: Option<PathBuf>,
    /// One token, by its `jti` claim.
    #[arg(long)]
    jti: Option<String>,
    /// With `--jti`: only that issuer's token (default: any issuer).
    #[arg(long, requires = "jti")]
    issuer: Option<String>,
    /// With `--jti`: the token's `exp` (seconds since the epoch), so the entry
    /// expires with the token.
    #[arg(long, requires = "jti", value_name = "UNIX_SECONDS")]
    exp: Option<i64>,
    /// Every token of a subject (`sub`) issued up to `--before`.
    #[arg(long)]
    sub: Option<String>,
    /// The cut-off, RFC 3339 (e.g. `2026-11-29T10:00:00Z`) or `now`: only
    /// tokens issued (`iat`) at or before it. With `--sub` and
    /// `--all-from-issuer` the default is now; with `--kid` and `--client`
    /// the default is every token, whenever issued.
    #[arg(long, value_name = "RFC3339|now")]
    before: Option<String>,
    /// Every token signed by the key with this `kid` (issued up to `--before`).
    #[arg(long)]
    kid: Option<String>,
    /// Every token of this client, `client_id` or `azp` (issued up to
    /// `--before`).
    #[arg(long)]
    client: Option<String>,
    /// Every token of this issuer (`iss`) issued up to `--before`, default now:
    /// one entry that logs everyone out.
    #[arg(long, value_name = "ISS")]
    all_from_issuer: Option<String>,
    /// Every request authenticated by this API key id.
    #[arg(long)]
    api_key: Option<String>,
    /// Free text kept with the entry.
    #[arg(long, default_value = "")]
    reason: String,
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
    /// The TOML configuration file (decide offline with its engine).
    #[arg(
        long,
        short,
        env = "PORTCULLIS_CONFIG",
        required_unless_present = "server"
    )]
    config: Option<PathBuf>,
    /// Ask a running server instead (its Envoy-facing listener, e.g.
    /// `127.0.0.1:9191`), over the real `Check` RPC as Envoy would: the answer
    /// then reflects that server's revocations. `--config` is not used.
    #[arg(long, value_name = "ADDR")]
    server: Option<String>,
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

/// Arguments of `replay`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("input").required(true).args(["requests", "audit"])))]
pub struct ReplayArgs {
    /// The TOML configuration file (its routes, application and key file).
    #[arg(long, short, env = "PORTCULLIS_CONFIG")]
    config: PathBuf,
    /// The proposed policy folder (default: the configuration's `[policies] dir`).
    #[arg(long, value_name = "DIR")]
    policies: Option<PathBuf>,
    /// Recorded decision inputs, one JSON object per line (exact replay).
    #[arg(long, value_name = "FILE")]
    requests: Option<PathBuf>,
    /// Audit lines: only API-key and workload decisions are re-decided.
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
    /// Examples shown per action and per policy.
    #[arg(long, value_name = "N", default_value_t = 3)]
    examples: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Exit 0 even when a denied decision would now be allowed.
    #[arg(long)]
    allow_opened: bool,
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
        Command::Validate(args) => policy::validate(&args.config).await,
        Command::Check(args) => match args.server.clone() {
            Some(server) => check::check_remote(&server, args).await,
            None => check::check(args).await,
        },
        Command::Replay(args) => replay::replay(args),
        Command::Revoke(args) => revoke::revoke(args).await,
        Command::Revocations(args) => revoke::revocations(args).await,
        Command::Status(args) => status::status(args).await,
        Command::Reload(args) => status::reload(args).await,
        Command::Test(args) => policy::policy_test(args).await,
        Command::Routes(RoutesCommand::FromOpenapi(args)) => policy::from_openapi(args),
        Command::Token(TokenCommand::Mint(args)) => keys::mint(args),
        Command::ApiKey(ApiKeyCommand::Create(args)) => keys::create_api_key(args),
        Command::Ssf(command) => ssf::run(command).await,
        Command::Token(TokenCommand::Jwks(args)) => {
            let key = keys::signing_key(&args)?;
            println!("{}", serde_json::to_string_pretty(&key.public_jwks())?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_engine(config: &Config) -> anyhow::Result<Engine> {
    Engine::from_config(config).map_err(|e| anyhow::anyhow!("the configuration is not valid:\n{e}"))
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // First, and one listener for every phase: a SIGTERM at any point from here
    // on is kept until a phase awaits it, never lost nor fatal.
    let shutdown = crate::serve::Shutdown::from_signals(server::ShutdownSignals::new()?);
    let config = crate::reload::RunningConfig::load(&args.config.config)?;
    let listeners = crate::serve::Listeners::bind(&config.current(), args.listen).await?;
    crate::serve::serve(config, listeners, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
