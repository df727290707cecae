//! The composition root: builds every part from a [`Config`] and serves it on
//! listeners the caller bound, until the caller asks it to stop.
//!
//! `portcullis serve` is this function behind argument parsing and the
//! process's signals; tests and embedders call it directly (in-process, on
//! `127.0.0.1:0` listeners) and stop it by cancelling a token. The start-up
//! order is the one operators see in the log:
//!
//! 1. the gRPC listener answers at once, health NOT_SERVING, and the metrics
//!    endpoint with it;
//! 2. the configuration is built into an engine (every problem listed, none
//!    served);
//! 3. remote keys are fetched (NOT_SERVING until every issuer has keys);
//! 4. the revocation store opens (journal, and Redis in shared mode);
//! 5. the admin API starts, the engine is installed: SERVING; the policy
//!    watcher starts.
//!
//! A stop request at any step ends the start cleanly. After start, a stop
//! request drains (NOT_SERVING while still answering for
//! `[server] drain_period`; a second request cuts it short), closes the
//! listeners, flushes the audit log and closes the revocation store.
//!
//! Every background task (key refresh, policy watcher, certificate reload)
//! runs in one [`TaskTracker`] and stops with one [`CancellationToken`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::audit::AuditLog;
use crate::config::Config;
use crate::engine::Engine;
use crate::reload::RunningConfig;
use crate::revocation::RevocationStore;
use crate::server::{self, ShutdownSignals};
use crate::telemetry::metrics;
use crate::tls::ServerTls;

/// Errors that stop [`serve`]. None of them carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        /// `grpc`, `admin` or `metrics`.
        listener: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration names two listeners on one address.
    #[error("{0}")]
    Listeners(String),
    /// The configuration does not build into an engine; each problem is
    /// listed (and logged).
    #[error("refusing to serve: {} problem(s) in the configuration:\n{}", .0.len(), .0.join("\n"))]
    Config(Vec<String>),
    /// A part could not be started (audit writer, certificates, admin token,
    /// revocation store, a listener's task).
    #[error("{0}")]
    Start(String),
    /// The gRPC server failed.
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// The admin API failed.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// The metrics endpoint failed.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// The listeners [`serve`] answers on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// Envoy's ext_authz, the Authorizer, health and reflection.
    pub grpc: TcpListener,
    /// The admin API (`[admin] listen`), when configured.
    pub admin: Option<TcpListener>,
    /// `GET /metrics` (`[telemetry] metrics_listen`), when configured.
    pub metrics: Option<TcpListener>,
    /// The HTTP authorization listener (`[http_authz] listen`), when configured.
    pub http_authz: Option<TcpListener>,
    /// The AuthZEN API (`[authzen] listen`), when configured.
    pub authzen: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses `config` names; `grpc` replaces `[server] listen`
    /// (the `--listen` flag). Two listeners on one fixed address are refused.
    pub async fn bind(config: &Config, grpc: Option<SocketAddr>) -> Result<Listeners, ServeError> {
        let grpc_addr = grpc.unwrap_or(config.server.listen);
        let admin_addr = config.admin.as_ref().map(|a| a.listen);
        let metrics_addr = config.telemetry.metrics_listen;
        let fixed = |a: &SocketAddr| a.port() != 0;
        if let Some(admin) = admin_addr
            && admin == grpc_addr
            && fixed(&admin)
        {
            return Err(ServeError::Listeners(format!(
                "[admin] listen must differ from the Envoy-facing listener, both are {admin}"
            )));
        }
        async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    listener,
                    addr,
                    source,
                })
        }
        Ok(Listeners {
            grpc: bind("grpc", grpc_addr).await?,
            admin: match admin_addr {
                Some(addr) => Some(bind("admin", addr).await?),
                None => None,
            },
            metrics: match metrics_addr {
                Some(addr) => Some(bind("metrics", addr).await?),
                None => None,
            },
            http_authz: match config.http_authz.as_ref().map(|h| h.listen) {
                Some(addr) => Some(bind("http_authz", addr).await?),
                None => None,
            },
            authzen: match config.authzen.as_ref().map(|a| a.listen) {
                Some(addr) => Some(bind("authzen", addr).await?),
                None => None,
            },
        })
    }

    /// The bound gRPC address (with the port the system chose for `:0`).
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The bound admin address, when there is an admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound metrics address, when there is a metrics listener.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound HTTP authorization address, when configured.
    pub fn http_authz_addr(&self) -> Option<SocketAddr> {
        self.http_authz.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound AuthZEN address, when configured.
    pub fn authzen_addr(&self) -> Option<SocketAddr> {
        self.authzen.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// How [`serve`] is asked to stop: cancelling `stop` starts the graceful stop
/// (drain, then close); cancelling `now` as well cuts the drain short.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Begin the graceful stop.
    pub stop: CancellationToken,
    /// End the drain period early.
    pub now: CancellationToken,
}

impl Shutdown {
    /// Two fresh tokens, nothing cancelled.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Asks for the graceful stop (the first signal).
    pub fn request(&self) {
        if self.stop.is_cancelled() {
            self.now.cancel();
        }
        self.stop.cancel();
    }

    /// Driven by the process's SIGTERM/SIGINT: the first starts the graceful
    /// stop, the second cuts the drain short.
    pub fn from_signals(mut signals: ShutdownSignals) -> Shutdown {
        let shutdown = Shutdown::new();
        let driven = shutdown.clone();
        tokio::spawn(async move {
            signals.recv().await;
            driven.request();
            signals.recv().await;
            driven.request();
        });
        shutdown
    }
}

/// Runs `future` unless `stop` is cancelled first (then `None`).
async fn unless_stopped<T>(stop: &CancellationToken, future: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        value = future => Some(value),
        _ = stop.cancelled() => None,
    }
}

/// Builds every part from `config` and serves on `listeners` until `shutdown`
/// asks to stop (reloads read `config`'s file again, when it has one).
/// Returns once everything has stopped and the audit log is flushed; a stop
/// request during start-up ends it cleanly (`Ok`).
pub async fn serve(
    config: RunningConfig,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let running_config = Arc::new(config);
    let config = running_config.current();
    let Listeners {
        grpc,
        admin: admin_listener,
        metrics: metrics_listener,
        http_authz: http_authz_listener,
        authzen: authzen_listener,
    } = listeners;
    let grace = config.server.shutdown_grace;
    let audit = match &config.audit.file {
        Some(path) => AuditLog::file(path).map_err(|e| {
            ServeError::Start(format!("cannot open audit file {}: {e}", path.display()))
        })?,
        None => AuditLog::stdout(),
    }
    .batched(config.audit.flush_interval())
    .map_err(|e| ServeError::Start(format!("cannot start the audit writer: {e}")))?;
    // [telemetry] decision_logs: each audit line also exported as an OTLP log
    // record; flushed once the gRPC server has stopped taking decisions.
    let (audit, decision_logs) =
        match crate::telemetry::decision_logs::DecisionLogs::start(&config.telemetry)
            .map_err(|e| ServeError::Start(e.to_string()))?
        {
            Some((logs, export)) => (audit.with_decision_logs(logs), Some(export)),
            None => (audit, None),
        };
    let admin_token = match &config.admin {
        Some(admin) => Some(
            admin
                .resolve_token()
                .map_err(|e| ServeError::Start(format!("invalid [admin] configuration: {e}")))?,
        ),
        None => None,
    };
    // The Shared Signals receiver is checked now; it starts with the store.
    let ssf = match &config.ssf {
        Some(ssf) => {
            Some(crate::ssf::Receiver::new(ssf).map_err(|e| ServeError::Start(e.to_string()))?)
        }
        None => None,
    };
    // [authzen]: token and certificates are read now; it starts with the store.
    let authzen = config
        .authzen
        .as_ref()
        .map(crate::authzen::Authzen::prepare)
        .transpose()
        .map_err(|problems| {
            ServeError::Start(format!("invalid [authzen]: {}", problems.join("; ")))
        })?;
    // Certificates are read before anything answers: a bad file stops the start.
    let load_tls = |tls: Option<&crate::config::TlsConfig>, section: &str| {
        tls.map(|t| {
            ServerTls::load(t)
                .map_err(|e| ServeError::Start(format!("cannot load [{section}]: {e}")))
        })
        .transpose()
    };
    let server_tls = load_tls(config.server.tls.as_ref(), "server.tls")?;
    let admin_tls = load_tls(
        config.admin.as_ref().and_then(|a| a.tls.as_ref()),
        "admin.tls",
    )?;

    // One token and one tracker for every background task.
    let background = CancellationToken::new();
    let tasks = TaskTracker::new();
    let track = |handle: tokio::task::JoinHandle<()>| {
        let cancelled = background.clone();
        tasks.spawn(async move {
            let abort = handle.abort_handle();
            tokio::select! {
                _ = handle => {}
                _ = cancelled.cancelled() => abort.abort(),
            }
        });
    };
    for (tls, name) in [(&server_tls, "grpc"), (&admin_tls, "admin")] {
        if let Some(tls) = tls {
            track(tls.clone().watch(name));
        }
    }

    let running = server::start_on(grpc, audit, server_tls.clone()).await?;
    tracing::info!(
        addr = %running.local_addr(),
        tls = server_tls.is_some(),
        mtls = server_tls.as_ref().is_some_and(|t| t.requires_client_certificates()),
        "listening (NOT_SERVING until policies and keys load)"
    );
    let metrics = match metrics_listener {
        Some(listener) => match metrics::serve_on(listener, running.state().clone()) {
            Ok(metrics) => {
                tracing::info!(addr = %metrics.local_addr(), "metrics endpoint listening (GET /metrics)");
                Some(metrics)
            }
            Err(e) => {
                stop_background(&background, &tasks).await;
                running.shutdown(grace).await?;
                return Err(e.into());
            }
        },
        None => None,
    };
    // Stops what has started so far, in reverse order.
    let abandon = |running: server::RunningServer, metrics: Option<metrics::MetricsServer>| {
        let background = background.clone();
        let tasks = tasks.clone();
        async move {
            stop_background(&background, &tasks).await;
            running.shutdown(grace).await?;
            if let Some(metrics) = metrics {
                metrics.shutdown().await;
            }
            Ok::<(), ServeError>(())
        }
    };

    let built = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Engine::from_config(&config)).await
    };
    let engine = match built {
        Ok(Ok(engine)) => engine,
        Ok(Err(e)) => {
            for problem in &e.problems {
                tracing::error!("{problem}");
            }
            abandon(running, metrics).await?;
            return Err(ServeError::Config(e.problems));
        }
        Err(e) => {
            abandon(running, metrics).await?;
            return Err(ServeError::Start(format!("building the engine: {e}")));
        }
    };
    for warning in &engine.policies().warnings {
        tracing::warn!("{warning}");
    }
    // Remote keys refresh in the background for the life of the server; health
    // stays NOT_SERVING until every issuer has a key set.
    for task in engine.authenticator().spawn_background() {
        track(task);
    }
    let keys_ready = async {
        let mut waited = 0u32;
        while !engine.authenticator().is_ready() {
            if waited.is_multiple_of(50) {
                tracing::warn!("waiting for the keys of every issuer (NOT_SERVING meanwhile)");
            }
            waited += 1;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    if unless_stopped(&shutdown.stop, keys_ready).await.is_none() {
        tracing::info!("shutting down before the keys of every issuer were loaded");
        return abandon(running, metrics).await;
    }

    // Revocations: the journal, and Redis in shared mode (which may wait for it).
    let opened = unless_stopped(
        &shutdown.stop,
        RevocationStore::open(&config.revocation, config.token_lifetimes()),
    )
    .await;
    let store = match opened {
        None => {
            tracing::info!("shutting down before the revocation store was ready");
            return abandon(running, metrics).await;
        }
        Some(Err(e)) => {
            abandon(running, metrics).await?;
            return Err(ServeError::Start(format!(
                "cannot open the revocation store: {e}"
            )));
        }
        Some(Ok(store)) => store,
    };
    let admin = match (admin_listener, &admin_token) {
        (Some(listener), Some(token)) => {
            match admin::start_on(
                listener,
                token,
                store.clone(),
                running.state().clone(),
                running_config.clone(),
                admin_tls.clone(),
            ) {
                Ok(admin) => {
                    tracing::info!(addr = %admin.local_addr(), "admin API listening");
                    Some(admin)
                }
                Err(e) => {
                    store.shutdown().await;
                    abandon(running, metrics).await?;
                    return Err(e.into());
                }
            }
        }
        _ => None,
    };
    // Shared Signals events become revocations in the store.
    if let Some(receiver) = ssf {
        match receiver.start(store.clone(), running.state().clone()).await {
            Ok(receiver_tasks) => {
                for task in receiver_tasks {
                    track(task);
                }
            }
            Err(e) => {
                if let Some(admin) = admin
                    && let Err(e) = admin.shutdown(grace).await
                {
                    tracing::warn!(error = %e, "admin listener did not stop cleanly");
                }
                store.shutdown().await;
                abandon(running, metrics).await?;
                return Err(ServeError::Start(e.to_string()));
            }
        }
    }

    // [http_authz]: Envoy's http_service mode and forward auth, through the
    // engine in `running.state()`; stops with the background tasks.
    if let (Some(listener), Some(http_authz)) = (http_authz_listener, &config.http_authz) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "http_authz listening (Envoy http_service and forward auth)");
        }
        track(crate::http_authz::spawn(
            listener,
            http_authz,
            running.state().clone(),
        ));
    }
    // [authzen]: the AuthZEN API, through the same engine (src/authzen/);
    // stops with the background tasks.
    if let (Some(listener), Some(authzen)) = (authzen_listener, authzen) {
        for task in authzen.start(listener, running.state().clone()) {
            track(task);
        }
    }

    tracing::info!(
        policies = engine.policies().len(),
        dir = %config.policies.dir.display(),
        "policies and keys loaded; SERVING"
    );
    running
        .state()
        .install(engine.with_revocations(store.clone()))
        .await;
    track(tokio::spawn(crate::reload::watch(
        running.state().clone(),
        running_config.clone(),
    )));

    shutdown.stop.cancelled().await;
    let drain = config.server.drain_period;
    tracing::info!(
        drain_period = ?drain,
        "shutting down: NOT_SERVING, still answering checks for the drain period (a second signal ends it)"
    );
    if running.drain(drain, shutdown.now.cancelled()).await {
        tracing::info!("drain cut short by a second signal");
    }
    tracing::info!("drained: closing the listener, finishing in-flight checks");
    if let Some(admin) = admin
        && let Err(e) = admin.shutdown(grace).await
    {
        tracing::warn!(error = %e, "admin listener did not stop cleanly");
    }
    stop_background(&background, &tasks).await;
    running.shutdown(grace).await?;
    // Every decision is queued by now (the HTTP doors stopped with the
    // background tasks, the gRPC server just above).
    if let Some(decision_logs) = decision_logs {
        decision_logs
            .shutdown(crate::telemetry::decision_logs::FLUSH_TIMEOUT)
            .await;
    }
    if let Some(metrics) = metrics {
        metrics.shutdown().await;
    }
    store.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Cancels every background task and waits until each has stopped.
async fn stop_background(background: &CancellationToken, tasks: &TaskTracker) {
    background.cancel();
    tasks.close();
    tasks.wait().await;
}

/// The addresses of a server started by [`spawn`].
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// The gRPC listener.
    pub grpc: SocketAddr,
    /// The admin API, when configured.
    pub admin: Option<SocketAddr>,
    /// The metrics endpoint, when configured.
    pub metrics: Option<SocketAddr>,
    /// The HTTP authorization listener, when configured.
    pub http_authz: Option<SocketAddr>,
    /// The AuthZEN API, when configured.
    pub authzen: Option<SocketAddr>,
}

/// Binds `config`'s listeners and runs [`serve`] on a task: the addresses it
/// answers on, the [`Shutdown`] that stops it, and its outcome. `config` is a
/// [`Config`] (reloads read the policy folder again) or a [`RunningConfig`]
/// read from a file (reloads read the file again too).
pub async fn spawn(
    config: impl Into<RunningConfig>,
) -> Result<
    (
        Addresses,
        Shutdown,
        tokio::task::JoinHandle<Result<(), ServeError>>,
    ),
    ServeError,
> {
    let config = config.into();
    let current = config.current();
    let listeners = Listeners::bind(&current, None).await?;
    let addresses = Addresses {
        grpc: listeners.grpc_addr().map_err(|source| ServeError::Bind {
            listener: "grpc",
            addr: current.server.listen,
            source,
        })?,
        admin: listeners.admin_addr(),
        metrics: listeners.metrics_addr(),
        http_authz: listeners.http_authz_addr(),
        authzen: listeners.authzen_addr(),
    };
    let shutdown = Shutdown::new();
    let task = tokio::spawn(serve(config, listeners, shutdown.clone()));
    Ok((addresses, shutdown, task))
}
