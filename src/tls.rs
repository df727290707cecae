//! TLS and mTLS for the gRPC listeners (the ext_authz/Authorizer listener and
//! the admin listener), with certificates that reload when their files change.
//!
//! Each listener runs its own accept loop ([`incoming`]): a TCP connection is
//! handed to tonic as it is (plaintext) or after a TLS handshake made with the
//! [`ServerTls`] configuration current at that moment. A reload swaps that
//! configuration atomically ([`ServerTls::reload`]), so new connections get
//! the new certificate while open connections keep the session they have: no
//! restart, nothing dropped. cert-manager and Kubernetes rotate a secret by
//! replacing its files; [`ServerTls::watch`] notices by content, every
//! `reload_interval`.
//!
//! With a client CA the listener requires a client certificate chained to it
//! (mTLS). The caller's identity, the certificate's SPIFFE ID (its one
//! `spiffe://` URI SAN) or else its subject, travels with every request of the
//! connection as [`PeerInfo`], for the adapters: the audit line records it and
//! `IsAuthorized` lets only configured callers assert a workload identity.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsConfig;

/// Longest a TLS handshake may take before the connection is closed: a peer
/// that connects and says nothing must not hold a slot.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS handshakes in progress at once per listener; further connections
/// wait in the kernel's backlog until one finishes.
pub(crate) const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// Why a TLS configuration was not loaded. Never holds key material: only
/// which file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file does not hold what it should (PEM certificates, one private key).
    #[error("{path}: {message}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the combination (e.g. the key does not match the
    /// certificate, or the client CA is not a usable trust anchor).
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The server side of TLS for one listener: the configuration in force, and
/// the files it came from.
pub(crate) struct ServerTls {
    files: TlsConfig,
    /// The ALPN protocols offered: `h2` for gRPC, also `http/1.1` for the
    /// HTTP listeners.
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<rustls::ServerConfig>,
    /// SHA-256 over the three files' bytes as last loaded.
    loaded: Mutex<[u8; 32]>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.files.cert_file)
            .field("key_file", &self.files.key_file)
            .field("client_ca_file", &self.files.client_ca_file)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate chain, key and optional client CA named by `files`.
    pub(crate) fn load(files: &TlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        // gRPC is HTTP/2.
        Self::load_with_alpn(files, vec![b"h2".to_vec()])
    }

    /// [`Self::load`] for an HTTP listener: HTTP/2 and HTTP/1.1 offered.
    pub(crate) fn load_http(files: &TlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        Self::load_with_alpn(files, vec![b"h2".to_vec(), b"http/1.1".to_vec()])
    }

    fn load_with_alpn(files: &TlsConfig, alpn: Vec<Vec<u8>>) -> Result<Arc<ServerTls>, TlsError> {
        let (config, digest) = build(files, &alpn)?;
        Ok(Arc::new(ServerTls {
            files: files.clone(),
            alpn,
            current: ArcSwap::from_pointee(config),
            loaded: Mutex::new(digest),
        }))
    }

    /// Whether clients must present a certificate chained to the client CA.
    pub(crate) fn requires_client_certificates(&self) -> bool {
        self.files.client_ca_file.is_some()
    }

    /// Reads the files again; when their content changed, new connections use
    /// them from now on. Returns whether it changed. On an error the
    /// configuration in force stays (a half-written rotation is retried at
    /// the next call).
    pub(crate) fn reload(&self) -> Result<bool, TlsError> {
        let digest = files_digest(&self.files)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if *loaded == digest {
            return Ok(false);
        }
        let (config, digest) = build(&self.files, &self.alpn)?;
        self.current.store(Arc::new(config));
        *loaded = digest;
        Ok(true)
    }

    /// Checks the files every `reload_interval` until aborted; `listener`
    /// names the listener in the log lines.
    pub(crate) fn watch(self: Arc<Self>, listener: &'static str) -> tokio::task::JoinHandle<()> {
        let interval = self.files.reload_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let tls = self.clone();
                match tokio::task::spawn_blocking(move || tls.reload()).await {
                    Ok(Ok(true)) => {
                        tracing::info!(listener, "TLS certificate reloaded: new connections use it")
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::warn!(
                        listener,
                        error = %e,
                        "TLS reload failed; keeping the certificate in force"
                    ),
                    Err(e) => tracing::warn!(listener, error = %e, "TLS reload task failed"),
                }
            }
        })
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn files_digest(files: &TlsConfig) -> Result<[u8; 32], TlsError> {
    let mut digest = crate::digest::FieldDigest::default();
    for path in [Some(&files.cert_file), Some(&files.key_file)]
        .into_iter()
        .chain([files.client_ca_file.as_ref()])
        .flatten()
    {
        digest.field(&read(path)?);
    }
    Ok(digest.finish())
}

fn certificates(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Content {
            path: path.to_owned(),
            message: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            path: path.to_owned(),
            message: "no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
        });
    }
    Ok(certs)
}

/// The rustls configuration from `files`, and the digest of what was read.
fn build(
    files: &TlsConfig,
    alpn: &[Vec<u8>],
) -> Result<(rustls::ServerConfig, [u8; 32]), TlsError> {
    // Digest first, then read: a file replaced in between is seen as changed
    // at the next reload, never as loaded when it was not.
    let digest = files_digest(files)?;
    let chain = certificates(&files.cert_file, &read(&files.cert_file)?)?;
    // The key's parse error is not shown: it could quote key material.
    let key =
        PrivateKeyDer::from_pem_slice(&read(&files.key_file)?).map_err(|_| TlsError::Content {
            path: files.key_file.clone(),
            message: "no PEM private key (PKCS#8, PKCS#1 or SEC1) found".into(),
        })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &files.client_ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in certificates(ca_file, &read(ca_file)?)? {
                roots.add(certificate).map_err(|e| TlsError::Content {
                    path: ca_file.clone(),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = alpn.to_vec();
    Ok((config, digest))
}

/// Who is at the other end of a connection, as every request on it sees it
/// (`request.extensions().get::<PeerInfo>()` in a tonic handler).
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerInfo {
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
    /// The mTLS caller's identity: the SPIFFE ID of its certificate (the one
    /// `spiffe://` URI SAN), or else the certificate's subject
    /// (RFC 4514, e.g. `CN=envoy,O=mesh`). `None` over plaintext or TLS
    /// without a client certificate.
    pub caller: Option<Arc<str>>,
}

impl PeerInfo {
    /// The peer of a tonic request, when it came through [`incoming`].
    pub(crate) fn of<T>(request: &tonic::Request<T>) -> Option<&PeerInfo> {
        request.extensions().get::<PeerInfo>()
    }
}

/// The caller identity of a DER certificate: see [`PeerInfo::caller`].
pub(crate) fn caller_identity(certificate: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(certificate).ok()?;
    let spiffe: Vec<&str> = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|names| {
            names
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri)
                        if uri.starts_with("spiffe://") =>
                    {
                        Some(*uri)
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match spiffe.as_slice() {
        [one] => Some((*one).to_owned()),
        // Several SPIFFE IDs name no one workload: not an identity.
        [_, _, ..] => None,
        [] => {
            let subject = certificate.subject().to_string();
            (!subject.is_empty()).then_some(subject)
        }
    }
}

/// One accepted connection: plaintext or TLS.
pub(crate) enum Connection {
    /// Plaintext TCP.
    Plain(TcpStream, PeerInfo),
    /// TLS over TCP, handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Connection::Plain(_, peer) | Connection::Tls(_, peer) => peer.clone(),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Plain(s, _) => s.is_write_vectored(),
            Connection::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Connection::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of `listener` for tonic's `serve_with_incoming*`: as they
/// are, or after a TLS handshake with `tls`. Handshakes run concurrently
/// (at most [`MAX_CONCURRENT_HANDSHAKES`], each within [`HANDSHAKE_TIMEOUT`]),
/// so a slow peer never holds up the others. The listener closes when tonic
/// drops the stream (at shutdown).
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    name: &'static str,
) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel::<io::Result<Connection>>(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
            };
            let (stream, remote_addr) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // As `Server::serve` would: a response written in several pieces
            // must not wait ~40 ms on Nagle.
            let _ = stream.set_nodelay(true);
            let peer = PeerInfo {
                remote_addr: Some(remote_addr),
                caller: None,
            };
            let Some(tls) = &tls else {
                if tx.send(Ok(Connection::Plain(stream, peer))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let caller = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|leaf| caller_identity(leaf))
                            .map(Arc::from);
                        let peer = PeerInfo { caller, ..peer };
                        let _ = tx.send(Ok(Connection::Tls(Box::new(stream), peer))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(
                        listener = name,
                        peer = %remote_addr,
                        error = %e,
                        "TLS handshake failed"
                    ),
                    Err(_) => tracing::debug!(
                        listener = name,
                        peer = %remote_addr,
                        "TLS handshake timed out"
                    ),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn certificate(common_name: &str, uris: &[&str]) -> (Vec<u8>, String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        let cert = params.self_signed(&key).unwrap();
        (cert.der().to_vec(), cert.pem(), key.serialize_pem())
    }

    #[test]
    fn the_caller_is_the_one_spiffe_id_or_else_the_subject() {
        let id = "spiffe://cluster.local/ns/mesh/sa/envoy";
        let (der, _, _) = certificate("envoy", &[id, "https://example.test/x"]);
        assert_eq!(caller_identity(&der).as_deref(), Some(id));
        let (der, _, _) = certificate("billing", &[]);
        assert_eq!(caller_identity(&der).as_deref(), Some("CN=billing"));
        let (der, _, _) = certificate("two", &[id, "spiffe://cluster.local/ns/x/sa/y"]);
        assert_eq!(caller_identity(&der), None);
        assert_eq!(caller_identity(b"not a certificate"), None);
    }

    fn files(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            client_ca_file: None,
            reload_interval: Duration::from_secs(1),
        }
    }

    /// A reload applies changed files, ignores unchanged ones, and keeps the
    /// configuration in force when the new files don't load; the error never
    /// quotes the key file.
    #[test]
    fn reloads_apply_changes_and_keep_the_last_good_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let write = |pem: &str, key: &str| {
            std::fs::write(&files.cert_file, pem).unwrap();
            std::fs::write(&files.key_file, key).unwrap();
        };
        let (_, pem, key) = certificate("one", &[]);
        write(&pem, &key);
        let tls = ServerTls::load(&files).unwrap();
        let first = tls.current.load_full();
        assert!(!tls.reload().unwrap());
        assert!(Arc::ptr_eq(&first, &tls.current.load_full()));

        let (_, pem, key) = certificate("two", &[]);
        write(&pem, &key);
        assert!(tls.reload().unwrap());
        let second = tls.current.load_full();
        assert!(!Arc::ptr_eq(&first, &second));

        let secret = "-----BEGIN PRIVATE KEY-----\nMARKER-s3cr3t\n-----END PRIVATE KEY-----\n";
        write(&pem, secret);
        let err = tls.reload().unwrap_err().to_string();
        assert!(!err.contains("MARKER"), "{err}");
        assert!(err.contains("tls.key"), "{err}");
        assert!(Arc::ptr_eq(&second, &tls.current.load_full()));

        // A key of another certificate does not load either.
        let (_, _, other_key) = certificate("three", &[]);
        write(&pem, &other_key);
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&second, &tls.current.load_full()));

        std::fs::remove_file(&files.cert_file).unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::Read { .. })));
        assert!(ServerTls::load(&files).is_err());
    }
}
