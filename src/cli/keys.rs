//! Key material for development and operations: `apikey create` (a new key
//! appended to the key file) and `token mint` / `token jwks` (development
//! tokens and the JWKS to verify them).

use std::process::ExitCode;

use anyhow::{Context as _, bail};

use super::{ApiKeyCreateArgs, KeyArgs, MintArgs};
use crate::authn::api_key::{NewKey, create_key};
use crate::authn::mint::{MintRequest, SigningKey};
use crate::config::Config;

pub(super) fn create_api_key(args: ApiKeyCreateArgs) -> anyhow::Result<ExitCode> {
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

pub(super) fn signing_key(args: &KeyArgs) -> anyhow::Result<SigningKey> {
    let pem = std::fs::read(&args.key)
        .with_context(|| format!("cannot read key file {}", args.key.display()))?;
    let alg = args
        .alg
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown algorithm {:?}", args.alg))?;
    Ok(SigningKey::from_pem(&pem, alg, args.kid.clone())?)
}

pub(super) fn mint(args: MintArgs) -> anyhow::Result<ExitCode> {
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
