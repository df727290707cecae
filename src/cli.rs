//! The command line: `serve`, `validate`, `check`, the admin API clients
//! (`revoke`, `revocations`, `status`) and the `token` dev helpers.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::admin::pb;
use crate::attributes::{HttpRequest, parse_source_ip};
use crate::authn::api_key::{NewKey, create_key};
use crate::authn::mint::{MintRequest, SigningKey};
use crate::config::{Config, Secret};
use crate::engine::Engine;
use crate::server;

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
        Command::Check(args) => match args.server.clone() {
            Some(server) => check_remote(&server, args).await,
            None => check(args).await,
        },
        Command::Revoke(args) => revoke(args).await,
        Command::Revocations(args) => revocations(args).await,
        Command::Status(args) => status(args).await,
        Command::Reload(args) => reload(args).await,
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
    // First, and one listener for every phase: a SIGTERM at any point from here
    // on is kept until a phase awaits it, never lost nor fatal.
    let shutdown = crate::serve::Shutdown::from_signals(server::ShutdownSignals::new()?);
    let config = crate::reload::RunningConfig::load(&args.config.config)?;
    let listeners = crate::serve::Listeners::bind(&config.current(), args.listen).await?;
    crate::serve::serve(config, listeners, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Adds `authorization: Bearer <admin token>` (marked sensitive) to every call.
#[derive(Clone)]
struct AdminCredential(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for AdminCredential {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type AdminClient = pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AdminCredential>,
>;

/// The admin API's address as a URL, and the TLS settings to reach it:
/// `https://` or `--admin-ca` means TLS; plaintext is refused unless every
/// address the host names is a loopback one (then the URL names that address,
/// so the check and the connection see the same one).
async fn admin_endpoint(
    args: &AdminArgs,
) -> anyhow::Result<(String, Option<tonic::transport::ClientTlsConfig>)> {
    let (scheme, rest) = match args.admin.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest.to_owned()),
        None if args.admin_ca.is_some() => ("https".to_owned(), args.admin.clone()),
        None => ("http".to_owned(), args.admin.clone()),
    };
    let uri: tonic::codegen::http::Uri = format!("{scheme}://{rest}")
        .parse()
        .with_context(|| format!("invalid --admin address {:?}", args.admin))?;
    let host = uri
        .host()
        .with_context(|| format!("--admin {:?} names no host", args.admin))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    match scheme.as_str() {
        "https" => {
            let ca = args.admin_ca.as_ref().context(
                "an https:// admin address needs --admin-ca (the CA of the admin listener's certificate)",
            )?;
            let ca = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name(args.admin_server_name.clone().unwrap_or(host));
            if let (Some(cert), Some(key)) = (&args.admin_cert, &args.admin_key) {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?;
                let key =
                    std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
                tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            Ok((format!("https://{rest}"), Some(tls)))
        }
        "http" => {
            if args.admin_cert.is_some() {
                bail!("--admin-cert needs TLS: give --admin-ca or an https:// address");
            }
            let port = uri.port_u16().unwrap_or(80);
            let addresses: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .with_context(|| format!("cannot resolve the admin host {host:?}"))?
                    .collect();
            match addresses.first() {
                Some(first) if addresses.iter().all(|a| a.ip().is_loopback()) => {
                    Ok((format!("http://{first}"), None))
                }
                _ => bail!(
                    "refusing to send the admin token in plaintext to {host:?}, which is not a \
                     loopback address: use TLS (--admin-ca, and an https:// address), or reach \
                     the admin listener on loopback"
                ),
            }
        }
        other => bail!("--admin: unknown scheme {other:?} (http or https)"),
    }
}

async fn admin_client(args: &AdminArgs) -> anyhow::Result<AdminClient> {
    let (url, tls) = admin_endpoint(args).await?;
    let mut endpoint = tonic::transport::Channel::from_shared(url.clone())
        .with_context(|| format!("invalid --admin address {:?}", args.admin))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .context("invalid TLS settings for the admin API")?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot connect to the admin API at {url}"))?;
    let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {}", args.admin_token.expose())
            .parse()
            .map_err(|_| anyhow::anyhow!("the admin token must be printable ASCII"))?;
    value.set_sensitive(true);
    Ok(pb::admin_client::AdminClient::with_interceptor(
        channel,
        AdminCredential(value),
    ))
}

fn admin_error(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unauthenticated => anyhow::anyhow!(
            "the admin API refused the credential: check --admin-token or PORTCULLIS_ADMIN_TOKEN"
        ),
        code => anyhow::anyhow!("admin API: {code:?}: {}", status.message()),
    }
}

fn rfc3339(secs: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

fn parse_cutoff(text: &str) -> anyhow::Result<Option<i64>> {
    if text.eq_ignore_ascii_case("now") {
        return Ok(None);
    }
    let time = humantime::parse_rfc3339_weak(text).with_context(|| {
        format!("--before must be RFC 3339 (e.g. 2026-11-29T10:00:00Z) or now, found {text:?}")
    })?;
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    Ok(Some(secs))
}

/// `"id" (issued at or before <time>)`, or `"id"` without a cut-off.
fn cutoff_described(id: &str, issued_before: Option<i64>) -> String {
    match issued_before {
        Some(cutoff) => format!("{id:?} (issued at or before {})", rfc3339(cutoff)),
        None => format!("{id:?}"),
    }
}

/// A cut-off given as RFC 3339 or `now`, in seconds since the epoch.
fn cutoff_or_now(text: &str) -> anyhow::Result<i64> {
    Ok(parse_cutoff(text)?.unwrap_or_else(crate::revocation::unix_now))
}

fn describe_target(target: Option<&pb::Target>) -> (&'static str, String) {
    use pb::target::Kind;
    match target.and_then(|t| t.kind.as_ref()) {
        Some(Kind::Token(t)) if t.issuer.is_empty() => ("jti", format!("{:?} (any issuer)", t.jti)),
        Some(Kind::Token(t)) => ("jti", format!("{:?} (issuer {:?})", t.jti, t.issuer)),
        Some(Kind::Subject(s)) => (
            "sub",
            format!(
                "{:?} (issued at or before {})",
                s.sub,
                rfc3339(s.issued_before.unwrap_or_default())
            ),
        ),
        Some(Kind::KeyId(kid)) => ("kid", format!("{kid:?}")),
        Some(Kind::ClientId(client)) => ("client", format!("{client:?}")),
        Some(Kind::Key(k)) => ("kid", cutoff_described(&k.kid, k.issued_before)),
        Some(Kind::Client(c)) => ("client", cutoff_described(&c.client_id, c.issued_before)),
        Some(Kind::Issuer(i)) => ("iss", cutoff_described(&i.issuer, i.issued_before)),
        Some(Kind::ApiKeyId(id)) => ("api_key", format!("{id:?}")),
        None => ("?", String::new()),
    }
}

/// Targets per `RevokeBatch` call sent by `revoke --from-file`.
pub const REVOKE_BATCH_SIZE: usize = 1000;

/// One target of a `--from-file` list, with its line number (from 1).
#[derive(Debug, Clone, PartialEq)]
pub struct ListedTarget {
    /// The line it was read from.
    pub line: usize,
    /// The target.
    pub target: pb::Target,
}

/// Parses a `--from-file` list: one target per line, `#` comments and blank
/// lines ignored. Returns every target, or a message for every bad line
/// (`line N: ...`), which names the problem, never an identifier's value.
pub fn parse_target_list(text: &str) -> Result<Vec<ListedTarget>, Vec<String>> {
    let mut targets = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = strip_comment(raw).trim();
        if content.is_empty() {
            continue;
        }
        match parse_target_line(content) {
            Ok(kind) => targets.push(ListedTarget {
                line,
                target: pb::Target { kind: Some(kind) },
            }),
            Err(message) => errors.push(format!("line {line}: {message}")),
        }
    }
    if errors.is_empty() {
        Ok(targets)
    } else {
        Err(errors)
    }
}

/// `line` up to its comment: a `#` at its start or after a space or tab (an
/// identifier may contain `#`).
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let at = (0..bytes.len())
        .find(|&i| bytes[i] == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()));
    at.map_or(line, |i| &line[..i])
}

/// One line of a `--from-file` list (comment and blanks removed).
fn parse_target_line(content: &str) -> Result<pb::target::Kind, String> {
    use pb::target::Kind;
    let mut words = content.split_whitespace();
    let kind = words.next().unwrap_or_default();
    let allowed: &[&str] = match kind {
        "jti" => &["issuer", "exp"],
        "sub" | "kid" | "client" | "issuer" => &["before"],
        "api_key" => &[],
        _ => {
            return Err(
                "unknown target kind: expected jti, sub, kid, client, issuer or api_key first"
                    .into(),
            );
        }
    };
    let id = words
        .next()
        .filter(|id| !id.contains('='))
        .ok_or_else(|| format!("{kind} needs an identifier after it"))?;
    if id.len() > crate::revocation::MAX_ID_BYTES {
        return Err(format!(
            "the {kind} is longer than {} bytes",
            crate::revocation::MAX_ID_BYTES
        ));
    }
    let mut options: Vec<(&str, &str)> = Vec::new();
    for word in words {
        let Some((name, value)) = word.split_once('=') else {
            return Err(format!(
                "unexpected word after the {kind} (identifiers cannot contain spaces; options are name=value)"
            ));
        };
        if !allowed.contains(&name) {
            return Err(if allowed.is_empty() {
                format!("{kind} takes no option")
            } else {
                format!(
                    "unknown option for {kind}: expected {}",
                    allowed.join("=, ") + "="
                )
            });
        }
        if options.iter().any(|(n, _)| *n == name) {
            return Err(format!("{name}= given twice"));
        }
        if value.is_empty() {
            return Err(format!("{name}= needs a value"));
        }
        options.push((name, value));
    }
    let option = |name: &str| options.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    // `before=`: absent, `now` (None: the server's now) or a time.
    let before = |text: Option<&str>| match text {
        None => Ok(None),
        Some(text) => parse_cutoff(text)
            .map_err(|_| "before= must be RFC 3339 (e.g. 2026-11-29T10:00:00Z) or now".to_owned()),
    };
    Ok(match kind {
        "jti" => {
            let issuer = option("issuer").unwrap_or_default();
            if issuer.len() > crate::revocation::MAX_ID_BYTES {
                return Err(format!(
                    "the issuer is longer than {} bytes",
                    crate::revocation::MAX_ID_BYTES
                ));
            }
            let expires_at = option("exp")
                .map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| "exp= must be seconds since the epoch".to_owned())
                })
                .transpose()?;
            Kind::Token(pb::TokenTarget {
                jti: id.to_owned(),
                issuer: issuer.to_owned(),
                expires_at,
            })
        }
        "sub" => Kind::Subject(pb::SubjectTarget {
            sub: id.to_owned(),
            issued_before: before(option("before"))?,
        }),
        "kid" => match before(option("before"))? {
            None if option("before").is_none() => Kind::KeyId(id.to_owned()),
            cutoff => Kind::Key(pb::KeyTarget {
                kid: id.to_owned(),
                issued_before: Some(cutoff.unwrap_or_else(crate::revocation::unix_now)),
            }),
        },
        "client" => match before(option("before"))? {
            None if option("before").is_none() => Kind::ClientId(id.to_owned()),
            cutoff => Kind::Client(pb::ClientTarget {
                client_id: id.to_owned(),
                issued_before: Some(cutoff.unwrap_or_else(crate::revocation::unix_now)),
            }),
        },
        "issuer" => Kind::Issuer(pb::IssuerTarget {
            issuer: id.to_owned(),
            issued_before: before(option("before"))?,
        }),
        _ => Kind::ApiKeyId(id.to_owned()),
    })
}

/// `revoke --from-file`: the whole list checked first, then sent in batches.
async fn revoke_from_file(
    admin: &AdminArgs,
    path: &Path,
    reason: String,
) -> anyhow::Result<ExitCode> {
    let (name, text) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the target list from standard input")?;
        ("standard input".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        (path.display().to_string(), text)
    };
    let targets = match parse_target_list(&text) {
        Ok(targets) => targets,
        Err(errors) => {
            for error in &errors {
                eprintln!("{name}: {error}");
            }
            bail!("{name}: {} bad line(s); nothing was revoked", errors.len());
        }
    };
    if targets.is_empty() {
        bail!("{name} lists no target; nothing was revoked");
    }
    let total = targets.len();
    let mut client = admin_client(admin)
        .await?
        .max_decoding_message_size(crate::admin::MAX_ADMIN_MESSAGE_BYTES);
    let (mut revoked, mut synced, mut queued) = (0usize, 0u64, 0u64);
    for batch in targets.chunks(REVOKE_BATCH_SIZE) {
        let request = pb::RevokeBatchRequest {
            targets: batch.iter().map(|t| t.target.clone()).collect(),
            reason: reason.clone(),
        };
        let response = match client.revoke_batch(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let line = batch_error_line(&status, batch)
                    .map(|line| format!(" (line {line})"))
                    .unwrap_or_default();
                return Err(admin_error(status).context(format!(
                    "a batch was refused{line}: {revoked} of {total} target(s) were revoked before it (they stay revoked), the rest were not"
                )));
            }
        };
        revoked += response.revocations.len();
        synced += response.synced;
        queued += response.queued;
        if total > REVOKE_BATCH_SIZE {
            eprintln!("revoked {revoked}/{total}");
        }
    }
    println!("revoked:  {revoked} target(s) from {name}");
    if synced == 0 && queued == 0 {
        println!("redis:    not written: embedded mode (this instance only)");
    } else {
        println!(
            "redis:    {synced} written and published, {queued} queued until Redis is back (see `portcullis status`)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The line of the target a refused batch names (`targets[i]: ...`).
fn batch_error_line(status: &tonic::Status, batch: &[ListedTarget]) -> Option<usize> {
    let rest = status.message().strip_prefix("targets[")?;
    let (index, _) = rest.split_once(']')?;
    batch.get(index.parse::<usize>().ok()?).map(|t| t.line)
}

async fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    use pb::target::Kind;
    if args.before.is_some()
        && (args.jti.is_some() || args.api_key.is_some() || args.from_file.is_some())
    {
        bail!(
            "--before goes with --sub, --kid, --client or --all-from-issuer (in a file: before= on the line)"
        );
    }
    if let Some(path) = &args.from_file {
        return revoke_from_file(&args.admin, path, args.reason).await;
    }
    let kind = if let Some(jti) = args.jti {
        Kind::Token(pb::TokenTarget {
            jti,
            issuer: args.issuer.unwrap_or_default(),
            expires_at: args.exp,
        })
    } else if let Some(sub) = args.sub {
        Kind::Subject(pb::SubjectTarget {
            sub,
            issued_before: parse_cutoff(args.before.as_deref().unwrap_or("now"))?,
        })
    } else if let Some(kid) = args.kid {
        match &args.before {
            None => Kind::KeyId(kid),
            Some(text) => Kind::Key(pb::KeyTarget {
                kid,
                issued_before: Some(cutoff_or_now(text)?),
            }),
        }
    } else if let Some(client) = args.client {
        match &args.before {
            None => Kind::ClientId(client),
            Some(text) => Kind::Client(pb::ClientTarget {
                client_id: client,
                issued_before: Some(cutoff_or_now(text)?),
            }),
        }
    } else if let Some(issuer) = args.all_from_issuer {
        Kind::Issuer(pb::IssuerTarget {
            issuer,
            issued_before: parse_cutoff(args.before.as_deref().unwrap_or("now"))?,
        })
    } else if let Some(id) = args.api_key {
        Kind::ApiKeyId(id)
    } else {
        bail!("one of --jti, --sub, --kid, --client, --all-from-issuer, --api-key is required");
    };
    let mut client = admin_client(&args.admin).await?;
    let response = client
        .revoke(pb::RevokeRequest {
            target: Some(pb::Target { kind: Some(kind) }),
            reason: args.reason,
        })
        .await
        .map_err(admin_error)?
        .into_inner();
    let entry = response.revocation.unwrap_or_default();
    let (kind, target) = describe_target(entry.target.as_ref());
    println!("revoked:  {kind} {target}");
    println!("expires:  {}", rfc3339(entry.expires_at));
    println!(
        "redis:    {}",
        if response.synced {
            "written and published"
        } else {
            "not written: embedded mode, or queued until Redis is back (see `portcullis status`)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

async fn revocations(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let mut client = admin_client(&args).await?;
    let list = client
        .list_revocations(pb::ListRevocationsRequest {})
        .await
        .map_err(admin_error)?
        .into_inner()
        .revocations;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<8} {:<21} {:<21} TARGET [REASON]",
        "KIND", "CREATED", "EXPIRES"
    )?;
    for entry in &list {
        let (kind, target) = describe_target(entry.target.as_ref());
        let reason = if entry.reason.is_empty() {
            String::new()
        } else {
            format!(" [{}]", entry.reason)
        };
        writeln!(
            out,
            "{kind:<8} {:<21} {:<21} {target}{reason}",
            rfc3339(entry.created_at),
            rfc3339(entry.expires_at)
        )?;
    }
    writeln!(out, "{} revocation(s)", list.len())?;
    Ok(ExitCode::SUCCESS)
}

async fn status(args: AdminArgs) -> anyhow::Result<ExitCode> {
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

async fn reload(args: AdminArgs) -> anyhow::Result<ExitCode> {
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

fn request_from_args(args: CheckArgs) -> anyhow::Result<HttpRequest> {
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
    for (position, header) in args.headers.iter().enumerate() {
        // The argument is never repeated: it may be a credential missing its name.
        let (name, value) = header
            .split_once(':')
            .filter(|(name, _)| !name.trim().is_empty())
            .with_context(|| {
                format!(
                    "--header must be NAME:VALUE; --header number {} is not (its value is not shown)",
                    position + 1
                )
            })?;
        http.headers
            .insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    if let Some(token) = &args.token {
        http.headers
            .insert("authorization".into(), format!("Bearer {token}"));
    }
    http.peer_principal = args.peer.clone();
    Ok(http)
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = args.config.clone() else {
        bail!("--config (or PORTCULLIS_CONFIG) is required unless --server is given");
    };
    let config = Config::load(&path)?;
    let engine = load_engine(&config)?;
    for problem in engine.authenticator().fetch_remote_keys_once().await {
        eprintln!("warning: {problem}");
    }
    let explain = args.explain;
    let http = request_from_args(args)?;
    let (decision, cedar_request) = if explain {
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
        decision.effective_verdict().http_status()
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
    if explain {
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

/// `check --server`: the same request, sent to a running server's `Check`.
async fn check_remote(server: &str, args: CheckArgs) -> anyhow::Result<ExitCode> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::core::v3::{Address as EnvoyAddress, SocketAddress};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest as EnvoyHttp, Peer, Request as EnvoyRequest,
    };
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use envoy_types::pb::google::protobuf::value::Kind;

    let http = request_from_args(args)?;
    let mut headers = http.headers.clone();
    headers.insert(":method".into(), http.method.clone());
    headers.insert(":path".into(), http.path.clone());
    headers.insert(":authority".into(), http.host.clone());
    let source = http.source_ip.map(|ip| Peer {
        address: Some(EnvoyAddress {
            address: Some(Address::SocketAddress(SocketAddress {
                address: ip.to_string(),
                port_specifier: Some(PortSpecifier::PortValue(0)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    });
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            source,
            request: Some(EnvoyRequest {
                http: Some(EnvoyHttp {
                    method: http.method.clone(),
                    path: http.path.clone(),
                    host: http.host.clone(),
                    scheme: http.scheme.clone(),
                    protocol: "HTTP/1.1".into(),
                    headers: headers.into_iter().collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .with_context(|| format!("invalid --server address {server:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let response = AuthorizationClient::new(channel)
        .check(request)
        .await
        .map_err(|status| {
            anyhow::anyhow!("Check failed: {:?}: {}", status.code(), status.message())
        })?
        .into_inner();
    let field = |name: &str| {
        response
            .dynamic_metadata
            .as_ref()
            .and_then(|m| m.fields.get(name))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "(none)".into())
    };
    let (allowed, status) = match &response.http_response {
        Some(HttpResponse::OkResponse(_)) => (true, 200),
        Some(HttpResponse::DeniedResponse(denied)) => {
            (false, denied.status.as_ref().map_or(403, |s| s.code))
        }
        _ => (false, 403),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "decision:  {}", if allowed { "allow" } else { "deny" })?;
    writeln!(out, "status:    {status}")?;
    writeln!(out, "reason:    {}", field("reason"))?;
    writeln!(out, "principal: {}", field("principal"))?;
    writeln!(
        out,
        "id:        {} (the server's audit line)",
        field("decision_id")
    )?;
    Ok(if allowed {
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

#[cfg(test)]
mod tests {
    use super::*;
    use pb::target::Kind;

    #[test]
    fn target_lists_are_parsed_line_by_line() {
        let text = "# incident 42\n\
                    jti abc-1\n\
                    \n\
                    jti abc#2 issuer=https://idp.example.com exp=1900000000 # stolen\n\
                    \tsub alice before=2026-11-29T10:00:00Z\n\
                    sub bob before=now\n\
                    kid k1\n\
                    client web-app\n\
                    api_key key-7\n";
        let targets = parse_target_list(text).unwrap();
        let lines: Vec<usize> = targets.iter().map(|t| t.line).collect();
        assert_eq!(lines, [2, 4, 5, 6, 7, 8, 9]);
        let kinds: Vec<Kind> = targets
            .into_iter()
            .map(|t| t.target.kind.unwrap())
            .collect();
        assert_eq!(
            kinds[1],
            Kind::Token(pb::TokenTarget {
                jti: "abc#2".into(),
                issuer: "https://idp.example.com".into(),
                expires_at: Some(1_900_000_000),
            })
        );
        assert_eq!(
            kinds[2],
            Kind::Subject(pb::SubjectTarget {
                sub: "alice".into(),
                issued_before: Some(1_795_946_400),
            })
        );
        assert_eq!(
            kinds[3],
            Kind::Subject(pb::SubjectTarget {
                sub: "bob".into(),
                issued_before: None,
            })
        );
        assert_eq!(kinds[6], Kind::ApiKeyId("key-7".into()));
    }

    #[test]
    fn every_bad_line_is_reported_without_its_values() {
        let text = "jti ok\n\
                    token secret-value-1\n\
                    jti\n\
                    jti secret-value-2 exp=soon\n\
                    sub secret-value-3 before=yesterday\n\
                    kid secret-value-4 issuer=x\n\
                    jti secret-value-5 extra\n\
                    jti secret-value-6 exp=1 exp=2\n\
                    client secret-value-7\n";
        let errors = parse_target_list(text).unwrap_err();
        let lines: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                "line 2", "line 3", "line 4", "line 5", "line 6", "line 7", "line 8"
            ]
        );
        for error in &errors {
            assert!(!error.contains("secret"), "{error}");
        }
        let long = format!("jti {}\n", "x".repeat(crate::revocation::MAX_ID_BYTES + 1));
        assert_eq!(parse_target_list(&long).unwrap_err().len(), 1);
    }
}
