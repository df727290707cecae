//! One Portcullis instance in-process, started through the library's
//! `serve::spawn` exactly as `portcullis serve` starts (the main listener with
//! ext_authz and the Authorizer, the admin listener, the metrics endpoint, the
//! revocation store), with the audit log written through to a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use portcullis::admin::pb::admin_client::AdminClient;
use portcullis::config::Config;
use portcullis::serve::{self, ServeError, Shutdown};
use tonic::transport::Channel;

/// A client of the main listener.
pub struct Connected {
    /// ext_authz.
    pub client: AuthorizationClient<Channel>,
    /// The channel, for the other services (Authorizer, health, reflection).
    pub channel: Channel,
}

impl Connected {
    /// One ext_authz `Check`.
    pub async fn check(&self, request: CheckRequest) -> CheckResponse {
        self.client
            .clone()
            .check(request)
            .await
            .expect("Check RPC succeeds")
            .into_inner()
    }
}

/// A running instance with its admin API.
pub struct AdminInstance {
    /// A client of the main listener.
    pub server: Connected,
    /// The admin listener.
    pub admin_addr: SocketAddr,
    /// The metrics endpoint.
    pub metrics_addr: SocketAddr,
    /// The audit log file.
    pub audit: PathBuf,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl AdminInstance {
    /// Starts the instance `config_path` describes (it must have `[admin]`),
    /// auditing to `audit` (write-through, so that a test reads every line at
    /// once), with a metrics endpoint on a free port; returns once it serves.
    pub async fn start(config_path: &Path, audit: PathBuf) -> AdminInstance {
        let mut config = Config::load(config_path).unwrap();
        assert!(config.admin.is_some(), "the instance needs [admin]");
        config.audit.file = Some(audit.clone());
        config.audit.flush_interval_ms = Some(0);
        config.telemetry.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        let (addresses, shutdown, task) = serve::spawn(config).await.unwrap();
        let channel = Channel::from_shared(format!("http://{}", addresses.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        super::wait_for_health(&channel, 1).await;
        AdminInstance {
            server: Connected {
                client: AuthorizationClient::new(channel.clone()),
                channel,
            },
            admin_addr: addresses.admin.expect("[admin] listener"),
            metrics_addr: addresses.metrics.expect("metrics endpoint"),
            audit,
            shutdown,
            task,
        }
    }

    /// Stops it as SIGTERM twice does (no drain period; the listeners close,
    /// the store flushes its journal) and waits until everything has stopped.
    pub async fn stop(self) {
        drop(self.server);
        self.shutdown.stop.cancel();
        self.shutdown.now.cancel();
        self.task
            .await
            .expect("the serve task")
            .expect("serve stops cleanly");
    }

    /// A client of the admin API (calls need the admin token).
    pub async fn admin(&self) -> AdminClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.admin_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        AdminClient::new(channel)
    }

    /// A sample of the Prometheus text the metrics endpoint serves (e.g.
    /// `portcullis_signature_verifications_total`), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = super::scrape_metrics(self.metrics_addr).await;
        text.lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == sample).then(|| value.parse::<f64>().ok())?
            })
            .unwrap_or(0.0)
    }
}
