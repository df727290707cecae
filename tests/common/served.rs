//! The `portcullis serve` binary as users run it, on a free loopback port, with
//! JSON logs read back by the test: started, waited for until SERVING, and
//! stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use serde_json::Value;
use tonic::transport::Channel;

use super::{Fixture, Outcome, outcome, path_arg, wait_for};

pub struct Served {
    child: Option<Child>,
    /// The gRPC listener (ext_authz, health).
    pub addr: SocketAddr,
    /// The metrics listener, when configured.
    pub metrics: Option<SocketAddr>,
    /// The admin listener, when configured.
    pub admin: Option<SocketAddr>,
    client: Option<AuthorizationClient<Channel>>,
    /// A channel to the gRPC listener.
    pub channel: Channel,
    /// Every JSON log line so far.
    pub logs: Arc<Mutex<Vec<Value>>>,
}

/// The `addr` field of the first line in `logs` whose message starts with
/// `message`.
fn addr_logged(logs: &Mutex<Vec<Value>>, message: &str) -> Option<SocketAddr> {
    logs.lock()
        .unwrap()
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .and_then(|l| l["fields"]["addr"].as_str().map(|a| a.parse().unwrap()))
}

impl Served {
    /// Starts `portcullis serve` on `fx` with JSON logs, waits until SERVING.
    pub async fn start(fx: &Fixture, env: &[(&str, &str)]) -> Served {
        Self::start_config(&fx.config_path(), env).await
    }

    /// The same with the configuration file `config`.
    pub async fn start_config(config: &Path, env: &[(&str, &str)]) -> Served {
        Self::start_tls(config, env, None).await
    }

    /// [`Served::start_config`], connecting over TLS with `tls` (the
    /// configuration has `[server.tls]`).
    pub async fn start_tls(
        config: &Path,
        env: &[(&str, &str)],
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Served {
        let mut served = Self::launch_tls(config, env, tls).await;
        served.wait_serving().await;
        // The admin API starts once the engine has loaded.
        served.metrics = served.addr_logged("metrics endpoint listening");
        served.admin = served.addr_logged("admin API listening");
        served
    }

    /// The `addr` field of the first log line whose message starts with `message`.
    pub fn addr_logged(&self, message: &str) -> Option<SocketAddr> {
        addr_logged(&self.logs, message)
    }

    /// Starts `portcullis serve` on `config` and returns once its gRPC listener
    /// is bound (health still NOT_SERVING until policies and keys load).
    pub async fn launch(config: &Path, env: &[(&str, &str)]) -> Served {
        Self::launch_tls(config, env, None).await
    }

    /// [`Served::launch`], connecting over TLS with `tls` when given.
    pub async fn launch_tls(
        config: &Path,
        env: &[(&str, &str)],
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Served {
        let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command
            .args(["serve", "--config", &path_arg(config)])
            .args(["--log-format", "json"])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(Vec::<Value>::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        wait_for("the gRPC listener", || {
            addr_logged(&logs, "listening").is_some()
        })
        .await;
        let grpc: SocketAddr = addr_logged(&logs, "listening").unwrap();
        let channel = match tls {
            None => Channel::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
            Some(tls) => super::pki::connect(grpc, tls).await.unwrap(),
        };
        let metrics = addr_logged(&logs, "metrics endpoint listening");
        Served {
            child: Some(child),
            addr: grpc,
            metrics,
            admin: None,
            client: Some(AuthorizationClient::new(channel.clone())),
            channel,
            logs,
        }
    }

    /// What the health service says of ext_authz now.
    pub async fn health(&self) -> i32 {
        tonic_health::pb::health_client::HealthClient::new(self.channel.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: portcullis::server::AUTHORIZATION_SERVICE.into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or_default()
    }

    /// Waits until health reports SERVING.
    pub async fn wait_serving(&self) {
        for attempt in 0.. {
            if self.health().await
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return;
            }
            assert!(attempt < 400, "server did not become SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM and returns at once (the server drains, then stops).
    pub fn sigterm(&self) {
        let child = self.child.as_ref().expect("running");
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    }

    /// Waits for the process to exit on its own and returns its status.
    pub async fn wait_exit(mut self) -> ExitStatus {
        drop(self.client.take());
        let mut child = self.child.take().expect("running");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = None;
    }

    /// One `Check` over the gRPC channel.
    pub async fn check(&self, request: tonic::Request<CheckRequest>) -> Outcome {
        outcome(
            &self
                .client
                .clone()
                .expect("running")
                .check(request)
                .await
                .expect("Check RPC succeeds")
                .into_inner(),
        )
    }

    /// SIGTERM, then the exit status (success expected).
    pub async fn stop(mut self) {
        // Envoy closes its connection when it sees GOAWAY; so does this client.
        drop(self.client.take());
        self.sigterm();
        let status = self.wait_exit().await;
        assert!(status.success(), "exit status {status:?}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
        }
    }
}
