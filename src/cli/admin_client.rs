//! Reaching the admin API from the command line: the endpoint (TLS, or
//! plaintext to loopback only), the bearer credential on every call, and the
//! admin API's errors as messages.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::AdminArgs;
use crate::admin::pb;

/// Adds `authorization: Bearer <admin token>` (marked sensitive) to every call.
#[derive(Clone)]
pub(super) struct AdminCredential(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

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

pub(super) type AdminClient = pb::admin_client::AdminClient<
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

pub(super) async fn admin_client(args: &AdminArgs) -> anyhow::Result<AdminClient> {
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

pub(super) fn admin_error(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unauthenticated => anyhow::anyhow!(
            "the admin API refused the credential: check --admin-token or PORTCULLIS_ADMIN_TOKEN"
        ),
        code => anyhow::anyhow!("admin API: {code:?}: {}", status.message()),
    }
}
