//! One Portcullis instance in-process, wired as `serve` wires it: the main
//! listener (ext_authz, Authorizer), the admin listener and the revocation
//! store, with the audit log in a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portcullis::admin::pb::admin_client::AdminClient;
use portcullis::admin::{self as admin_api, RunningAdmin};
use portcullis::audit::AuditLog;
use portcullis::config::Config;
use portcullis::engine::Engine;
use portcullis::revocation::RevocationStore;
use portcullis::server;
use tonic::transport::Channel;

use super::TestServer;

/// A running instance with its admin API.
pub struct AdminInstance {
    /// The main listener and a client of it.
    pub server: TestServer,
    /// The admin listener.
    pub admin: RunningAdmin,
    /// The revocation store the engine checks and the admin API writes.
    pub store: Arc<RevocationStore>,
    /// The audit log file.
    pub audit: PathBuf,
}

impl AdminInstance {
    /// Starts the instance `config_path` describes (it must have `[admin]`),
    /// auditing to `audit`.
    pub async fn start(config_path: &Path, audit: PathBuf) -> AdminInstance {
        let config = Config::load(config_path).unwrap();
        let store = RevocationStore::open(&config.revocation, config.token_lifetimes())
            .await
            .unwrap();
        let running = server::start(
            "127.0.0.1:0".parse().unwrap(),
            AuditLog::file(&audit).unwrap(),
        )
        .await
        .unwrap();
        let engine = Engine::from_config(&config)
            .unwrap()
            .with_revocations(store.clone());
        running.state().install(engine).await;
        let admin_config = config.admin.as_ref().unwrap();
        let admin = admin_api::start(
            admin_config.listen,
            &admin_config.resolve_token().unwrap(),
            store.clone(),
            running.state().clone(),
            config.clone(),
        )
        .await
        .unwrap();
        AdminInstance {
            server: TestServer::connect(running).await,
            admin,
            store,
            audit,
        }
    }

    /// Stops both listeners and the store (flushing its journal).
    pub async fn stop(self) {
        self.admin.shutdown(Duration::from_secs(5)).await.unwrap();
        drop(self.server.client);
        drop(self.server.channel);
        self.server
            .running
            .shutdown(Duration::from_secs(5))
            .await
            .unwrap();
        self.store.shutdown().await;
    }

    /// A client of the admin API (calls need the admin token).
    pub async fn admin(&self) -> AdminClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.admin.local_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        AdminClient::new(channel)
    }
}
