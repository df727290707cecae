//! The accept loop of the small plain-HTTP/1.1 listeners (the HTTP
//! authorization mode, the Shared Signals push endpoint): a bounded number of
//! connections, a deadline for each request head, a bounded head buffer. The
//! caller supplies the request handler.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// Largest buffered request head (and, for hyper, read buffer).
    pub max_buf_size: usize,
}

/// Serves `listener` with `handle` until the task running it is aborted
/// (which also ends open connections). `name` names the listener in logs.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    limits: Limits,
    name: &'static str,
    handle: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, listener = name, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let response = handle(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            // A caller that hangs up mid-response is not our problem.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_buf_size)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}
