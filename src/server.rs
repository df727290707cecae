//! The gRPC listener: ext_authz, the service-facing Authorizer, health and
//! reflection on one port, with graceful shutdown.
//!
//! The listener is bound and answering health checks (NOT_SERVING) before the
//! engine is loaded; [`ServerState::install`] publishes an engine and flips health
//! to SERVING. Shutdown flips health back to NOT_SERVING first, then lets in-flight
//! checks finish. While the audit log cannot take decisions (its writer stopped
//! or its sink fails) health is NOT_SERVING too, and checks fail closed
//! ([`ServerState::audit_ready`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::audit::AuditLog;
use crate::authorizer::{AUTHORIZER_SERVICE, AuthorizerService};
use crate::ext_authz::CheckService;
pub use crate::state::ServerState;
use crate::tls::ServerTls;

/// The fully qualified name of Envoy's authorization service, as health reports it.
pub const AUTHORIZATION_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// What health reports on: the server as a whole and each decision service.
const HEALTH_SERVICES: &[&str] = &["", AUTHORIZATION_SERVICE, AUTHORIZER_SERVICE];

/// Encoded descriptors of Envoy's ext_authz protos, compiled by `build.rs`.
const ENVOY_AUTH_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_auth_descriptor.bin"));

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// gRPC reflection could not be set up.
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The SIGTERM/SIGINT listeners could not be installed.
    #[error("cannot listen for shutdown signals: {0}")]
    Signals(std::io::Error),
    /// The server task panicked or was cancelled.
    #[error("server task: {0}")]
    Task(String),
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    state: Arc<ServerState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    /// The bound address (useful when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The shared state, to install an engine.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Drains before a shutdown: reports NOT_SERVING, so that health-checking
    /// callers (Envoy's active health checks, Kubernetes readiness) take this
    /// instance out of rotation, while it keeps answering every check, for
    /// `period` or until `stop_now` resolves. Returns whether `stop_now` cut
    /// the drain short.
    ///
    /// Without it, closing the listener as soon as the signal arrives fails the
    /// checks that callers still send here until their next health check.
    pub async fn drain(&self, period: Duration, stop_now: impl Future<Output = ()>) -> bool {
        self.state.stop_serving().await;
        if period.is_zero() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => false,
            _ = stop_now => true,
        }
    }

    /// Reports NOT_SERVING, stops accepting, and waits up to `grace` for in-flight
    /// checks and open connections to finish; then stops regardless, so a client
    /// that never closes its connection cannot hold the process up.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), ServerError> {
        self.state.stop_serving().await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let abort = self.task.abort_handle();
        let state = self.state.clone();
        let result = match tokio::time::timeout(grace, self.wait()).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "connections still open after the shutdown grace period; closing them"
                );
                abort.abort();
                Ok(())
            }
        };
        // Every decision made is in the audit log before shutdown returns.
        let flushed = tokio::task::spawn_blocking(move || state.audit().flush()).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot flush the audit log"),
            Err(e) => tracing::error!(error = %e, "cannot flush the audit log"),
        }
        result
    }

    /// Waits until the server stops on its own (a transport error).
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(result) => result.map_err(ServerError::from),
            Err(e) => Err(ServerError::Task(e.to_string())),
        }
    }
}

/// Binds `addr` and starts serving ext_authz and the Authorizer (answering
/// UNAVAILABLE until an engine is installed), health (NOT_SERVING until then)
/// and reflection.
pub async fn start(addr: SocketAddr, audit: AuditLog) -> Result<RunningServer, ServerError> {
    start_with_tls(addr, audit, None).await
}

/// [`start`], over TLS (mTLS with a client CA) when `tls` is given.
pub(crate) async fn start_with_tls(
    addr: SocketAddr,
    audit: AuditLog,
    tls: Option<Arc<ServerTls>>,
) -> Result<RunningServer, ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    start_on(listener, audit, tls).await
}

/// [`start_with_tls`] on a listener the caller bound.
pub(crate) async fn start_on(
    listener: TcpListener,
    audit: AuditLog,
    tls: Option<Arc<ServerTls>>,
) -> Result<RunningServer, ServerError> {
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;

    let (health, health_service) = tonic_health::server::health_reporter();
    let state = Arc::new(ServerState::new(audit, health, HEALTH_SERVICES));
    state.set_health(ServingStatus::NotServing).await;
    // The health hook of the audit log: a writer that stops or a sink that
    // fails turns every service NOT_SERVING, and back when it writes again.
    // Holds the state weakly: the task ends with it.
    let mut writer_up = state.audit().writer_up();
    let watched = Arc::downgrade(&state);
    tokio::spawn(async move {
        while writer_up.changed().await.is_ok() {
            let up = *writer_up.borrow_and_update();
            let Some(state) = watched.upgrade() else {
                return;
            };
            if !up {
                tracing::error!("audit log unavailable: reporting NOT_SERVING");
            }
            state.refresh_health().await;
        }
    });

    // Both reflection versions: older grpcurl releases only speak v1alpha.
    let reflection_builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(crate::authorizer::pb::FILE_DESCRIPTOR_SET);
        if ENVOY_AUTH_DESCRIPTORS.is_empty() {
            builder
        } else {
            builder.register_encoded_file_descriptor_set(ENVOY_AUTH_DESCRIPTORS)
        }
    };
    let reflection_error =
        |e: tonic_reflection::server::Error| ServerError::Reflection(e.to_string());
    let reflection_v1 = reflection_builder().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(reflection_error)?;

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AuthorizationServer::new(CheckService::new(state.clone())))
        .add_service(
            crate::authorizer::pb::authorizer_server::AuthorizerServer::new(
                AuthorizerService::new(state.clone()),
            ),
        );
    // Plaintext or TLS; every request carries the peer's `PeerInfo`.
    let incoming = crate::tls::incoming(listener, tls, "grpc");
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = shutdown_rx.await;
    }));
    Ok(RunningServer {
        local_addr,
        state,
        shutdown: Some(shutdown_tx),
        task,
    })
}

/// SIGTERM and SIGINT (Ctrl-C), listened to from [`ShutdownSignals::new`] on
/// for as long as the value lives.
///
/// One listener for the whole life of the process: a signal that arrives while
/// nothing awaits [`ShutdownSignals::recv`] (between two polls, during a log
/// write, while the drain is being set up) is kept and returned by the next
/// `recv`. A listener recreated for each wait would lose it: Tokio delivers a
/// signal only to the listeners that exist when it arrives.
#[derive(Debug)]
pub struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Starts listening for SIGTERM and SIGINT. From now on neither signal
    /// ends the process by its default action; call this as early as possible.
    pub fn new() -> Result<ShutdownSignals, ServerError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignals {
                terminate: signal(SignalKind::terminate()).map_err(ServerError::Signals)?,
                interrupt: signal(SignalKind::interrupt()).map_err(ServerError::Signals)?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(ShutdownSignals {})
        }
    }

    /// Resolves on the next SIGTERM or SIGINT not yet returned, including one
    /// that arrived before this call. Cancel-safe: dropping the future (as
    /// `tokio::select!` does when another branch wins) loses no signal.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => {}
                _ = self.interrupt.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            // Ctrl-C only, and only while awaited: no persistent listener here.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// Sends `signal` (`-TERM`, `-INT`) to this test process.
    fn raise(signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    async fn received(signals: &mut ShutdownSignals) {
        tokio::time::timeout(Duration::from_secs(30), signals.recv())
            .await
            .expect("the signal was kept until recv");
    }

    /// Signals that arrive while nothing awaits `recv` (the window a listener
    /// recreated per wait loses) are returned by the next `recv`, each one.
    #[tokio::test]
    async fn signals_arriving_while_nobody_waits_are_kept() {
        let mut signals = ShutdownSignals::new().unwrap();
        raise("-TERM");
        // The runtime dispatches the signal meanwhile, with no `recv` pending.
        tokio::time::sleep(Duration::from_millis(300)).await;
        received(&mut signals).await;

        // A `recv` dropped unfinished (a lost `select!` race) loses nothing.
        tokio::select! {
            _ = signals.recv() => panic!("no signal was sent"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        raise("-INT");
        tokio::time::sleep(Duration::from_millis(300)).await;
        received(&mut signals).await;
    }
}
