//! The admin gRPC API (`portcullis.admin.v1.Admin`): revoke credentials, list the
//! revocations in force, report status.
//!
//! It has its own listener (`[admin] listen`), never the Envoy-facing one. Every
//! call, reflection included, needs `authorization: Bearer <admin token>`
//! metadata; the token is compared in constant time (both sides are hashed with
//! SHA-256 first, so not even its length leaks). Anything else is refused with
//! UNAUTHENTICATED, and the presented value is never logged or echoed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::config::Secret;
use crate::reload::RunningConfig;
use crate::revocation::{self, RevocationError, RevocationStore, Target, unix_now};
use crate::state::ServerState;

/// The generated admin API types, client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("portcullis.admin.v1");

    /// Encoded descriptors of the admin API, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/admin_descriptor.bin"));
}

use pb::admin_server::{Admin, AdminServer};

/// Errors starting or running the admin listener.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (admin): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// gRPC reflection could not be set up.
    #[error("cannot build the admin reflection service: {0}")]
    Reflection(String),
    /// The transport failed.
    #[error("admin gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The server task panicked or was cancelled.
    #[error("admin server task: {0}")]
    Task(String),
}

/// Most targets one `RevokeBatch` call may carry; more are refused with
/// INVALID_ARGUMENT. Large lists are sent in several calls (the CLI sends
/// [`crate::cli::REVOKE_BATCH_SIZE`] at a time).
pub const MAX_BATCH_TARGETS: usize = 10_000;

/// Largest admin request accepted: a full `RevokeBatch` of identifiers at
/// their longest fits (gRPC's default, 4 MiB, would not).
pub const MAX_ADMIN_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// Checks the admin credential of every call.
#[derive(Clone)]
pub struct AdminAuth {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth(<redacted>)")
    }
}

impl AdminAuth {
    /// Accepts calls bearing `token`.
    pub fn new(token: &Secret) -> AdminAuth {
        AdminAuth {
            digest: crate::digest::sha256(token.expose().as_bytes()),
        }
    }

    /// True if `authorization` is `Bearer <the admin token>`.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some((scheme, token)) = value
            .iter()
            .position(|b| *b == b' ')
            .map(|i| (&value[..i], &value[i + 1..]))
        else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return false;
        }
        bool::from(crate::digest::sha256(token.trim_ascii()).ct_eq(&self.digest))
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        if self.accepts(header) {
            Ok(request)
        } else {
            let peer = crate::tls::PeerInfo::of(&request);
            tracing::warn!(
                peer = ?peer.and_then(|p| p.remote_addr),
                caller = peer.and_then(|p| p.caller.as_deref()).unwrap_or(""),
                "admin call refused: missing or wrong admin credential"
            );
            Err(Status::unauthenticated(
                "admin credential required: authorization: Bearer <admin token>",
            ))
        }
    }
}

/// The `portcullis.admin.v1.Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    store: Arc<RevocationStore>,
    state: Arc<ServerState>,
    config: Arc<RunningConfig>,
}

impl AdminService {
    /// A service over `store`, reporting (and reloading, with `config`) the
    /// engine installed in `state`.
    pub fn new(
        store: Arc<RevocationStore>,
        state: Arc<ServerState>,
        config: Arc<RunningConfig>,
    ) -> AdminService {
        AdminService {
            store,
            state,
            config,
        }
    }
}

fn target_from_pb(target: Option<pb::Target>) -> Result<(Target, Option<i64>), Status> {
    use pb::target::Kind;
    let kind = target.and_then(|t| t.kind).ok_or_else(|| {
        Status::invalid_argument(
            "a target (jti, sub, kid, client, issuer or API key id) is required",
        )
    })?;
    Ok(match kind {
        Kind::Token(t) => (
            Target::Token {
                jti: t.jti,
                issuer: Some(t.issuer).filter(|i| !i.is_empty()),
            },
            t.expires_at,
        ),
        Kind::Subject(s) => (
            Target::Subject {
                sub: s.sub,
                issued_before: s.issued_before.unwrap_or_else(unix_now),
            },
            None,
        ),
        Kind::KeyId(kid) => (
            Target::Key {
                kid,
                issued_before: None,
            },
            None,
        ),
        Kind::ClientId(client_id) => (
            Target::Client {
                client_id,
                issued_before: None,
            },
            None,
        ),
        Kind::Key(k) => (
            Target::Key {
                kid: k.kid,
                issued_before: k.issued_before,
            },
            None,
        ),
        Kind::Client(c) => (
            Target::Client {
                client_id: c.client_id,
                issued_before: c.issued_before,
            },
            None,
        ),
        Kind::Issuer(i) => (
            Target::Issuer {
                issuer: i.issuer,
                issued_before: i.issued_before.unwrap_or_else(unix_now),
            },
            None,
        ),
        Kind::ApiKeyId(api_key_id) => (Target::ApiKey { api_key_id }, None),
    })
}

/// The gRPC status of a refused revocation.
fn revocation_status(e: RevocationError) -> Status {
    match e {
        RevocationError::Invalid(_) => Status::invalid_argument(e.to_string()),
        RevocationError::Full { .. } | RevocationError::QueueFull { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

fn target_to_pb(target: &Target) -> pb::Target {
    use pb::target::Kind;
    let kind = match target {
        Target::Token { jti, issuer } => Kind::Token(pb::TokenTarget {
            jti: jti.clone(),
            issuer: issuer.clone().unwrap_or_default(),
            expires_at: None,
        }),
        Target::Subject { sub, issued_before } => Kind::Subject(pb::SubjectTarget {
            sub: sub.clone(),
            issued_before: Some(*issued_before),
        }),
        Target::Key {
            kid,
            issued_before: None,
        } => Kind::KeyId(kid.clone()),
        Target::Key {
            kid,
            issued_before: Some(cutoff),
        } => Kind::Key(pb::KeyTarget {
            kid: kid.clone(),
            issued_before: Some(*cutoff),
        }),
        Target::Client {
            client_id,
            issued_before: None,
        } => Kind::ClientId(client_id.clone()),
        Target::Client {
            client_id,
            issued_before: Some(cutoff),
        } => Kind::Client(pb::ClientTarget {
            client_id: client_id.clone(),
            issued_before: Some(*cutoff),
        }),
        Target::Issuer {
            issuer,
            issued_before,
        } => Kind::Issuer(pb::IssuerTarget {
            issuer: issuer.clone(),
            issued_before: Some(*issued_before),
        }),
        Target::ApiKey { api_key_id } => Kind::ApiKeyId(api_key_id.clone()),
    };
    pb::Target { kind: Some(kind) }
}

/// The wire form of an entry.
pub fn revocation_to_pb(r: &revocation::Revocation) -> pb::Revocation {
    pb::Revocation {
        target: Some(target_to_pb(&r.target)),
        created_at: r.created_at,
        expires_at: r.expires_at,
        reason: r.reason.clone(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let request = request.into_inner();
        let (target, token_exp) = target_from_pb(request.target)?;
        let kind = target.kind();
        let done = self
            .store
            .revoke(target, token_exp, request.reason)
            .await
            .map_err(revocation_status)?;
        tracing::info!(
            kind,
            expires_at = done.revocation.expires_at,
            synced = done.synced,
            "revocation recorded"
        );
        Ok(Response::new(pb::RevokeResponse {
            revocation: Some(revocation_to_pb(&done.revocation)),
            synced: done.synced,
        }))
    }

    async fn revoke_batch(
        &self,
        request: Request<pb::RevokeBatchRequest>,
    ) -> Result<Response<pb::RevokeBatchResponse>, Status> {
        let request = request.into_inner();
        let count = request.targets.len();
        if count == 0 {
            return Err(Status::invalid_argument("at least one target is required"));
        }
        if count > MAX_BATCH_TARGETS {
            return Err(Status::invalid_argument(format!(
                "{count} targets: at most {MAX_BATCH_TARGETS} per call; send them in several calls"
            )));
        }
        // Every target is checked before any is applied; an error names the
        // target by its index (the messages name fields, never their values).
        let mut targets = Vec::with_capacity(count);
        for (i, target) in request.targets.into_iter().enumerate() {
            let at = |e: Status| Status::invalid_argument(format!("targets[{i}]: {}", e.message()));
            let (target, token_exp) = target_from_pb(Some(target)).map_err(at)?;
            self.store
                .check_target(&target, token_exp)
                .map_err(|e| at(revocation_status(e)))?;
            targets.push((target, token_exp));
        }
        let done = self
            .store
            .revoke_many(targets, request.reason)
            .await
            .map_err(revocation_status)?;
        let synced = done.iter().filter(|d| d.synced).count();
        let queued = if self.store.mode() == revocation::Mode::Redis {
            done.len() - synced
        } else {
            0
        };
        tracing::info!(
            count = done.len(),
            synced,
            queued,
            "revocations recorded (batch)"
        );
        Ok(Response::new(pb::RevokeBatchResponse {
            revocations: done
                .iter()
                .map(|d| revocation_to_pb(&d.revocation))
                .collect(),
            synced: synced as u64,
            queued: queued as u64,
        }))
    }

    async fn list_revocations(
        &self,
        _request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        Ok(Response::new(pb::ListRevocationsResponse {
            revocations: self.store.list().iter().map(revocation_to_pb).collect(),
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let status = self.store.status();
        let reloads = self.state.reload_stats();
        Ok(Response::new(pb::StatusResponse {
            revocations: status.revocations as u64,
            mode: match status.mode {
                revocation::Mode::Embedded => "embedded".into(),
                revocation::Mode::Redis => "redis".into(),
            },
            redis: status.redis.as_str().into(),
            pending_writes: status.pending_writes as u64,
            policies: self.state.engine().map_or(0, |e| e.policies().len() as u64),
            policy_generation: self.state.engine().map_or(0, |e| e.generation()),
            policy_digest: self
                .state
                .engine()
                .map(|e| e.policies().digest.to_string())
                .unwrap_or_default(),
            reloads: reloads.reloads.load(Ordering::Relaxed),
            reload_failures: reloads.failures.load(Ordering::Relaxed),
            last_reload_error: reloads
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_default(),
            credential_verifications: self.state.engine().map_or(0, |e| {
                e.authenticator()
                    .counters()
                    .credentials
                    .load(Ordering::Relaxed)
            }),
            signature_verifications: self.state.engine().map_or(0, |e| {
                e.authenticator()
                    .counters()
                    .signatures
                    .load(Ordering::Relaxed)
            }),
        }))
    }

    async fn reload_policies(
        &self,
        _request: Request<pb::ReloadPoliciesRequest>,
    ) -> Result<Response<pb::ReloadPoliciesResponse>, Status> {
        let result = crate::reload::reload_once(&self.state, &self.config).await;
        let engine = self.state.engine();
        let (reloaded, error) = match result {
            Ok(_) => (true, String::new()),
            Err(crate::reload::ReloadError::NotServing) => {
                return Err(Status::unavailable("no policy set is serving yet"));
            }
            Err(e) => (false, e.to_string()),
        };
        Ok(Response::new(pb::ReloadPoliciesResponse {
            reloaded,
            generation: engine.as_ref().map_or(0, |e| e.generation()),
            digest: engine
                .map(|e| e.policies().digest.to_string())
                .unwrap_or_default(),
            error,
        }))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let request = request.into_inner();
        let engine = self
            .state
            .engine()
            .ok_or_else(|| Status::unavailable("no policy set is serving yet"))?;
        if request.path.is_empty() {
            return Err(Status::invalid_argument("path is required"));
        }
        let source_ip = match request.source_ip.as_str() {
            "" => None,
            ip => Some(
                crate::attributes::parse_source_ip(ip)
                    .ok_or_else(|| Status::invalid_argument("source_ip is not an IP address"))?,
            ),
        };
        let http = crate::attributes::HttpRequest {
            method: if request.method.is_empty() {
                "GET".into()
            } else {
                request.method.to_ascii_uppercase()
            },
            path: request.path,
            host: request.host,
            scheme: "https".into(),
            headers: request
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            source_ip,
            peer_principal: (!request.peer.is_empty()).then_some(request.peer),
            ..Default::default()
        };
        let (decision, cedar) = engine.explain(&http).await;
        Ok(Response::new(pb::ExplainResponse {
            decision: if decision.effective_verdict().is_allow() {
                "allow".into()
            } else {
                "deny".into()
            },
            http_status: decision.effective_verdict().http_status().into(),
            reason: decision.verdict.class().into(),
            principal: decision.principal.unwrap_or_default(),
            action: decision.action.unwrap_or_default(),
            resource: decision.resource.unwrap_or_default(),
            policies: decision.policies.to_vec(),
            errors: decision.errors,
            cedar_request_json: cedar.map(|c| c.to_string()).unwrap_or_default(),
            policy_generation: decision.policy_generation,
        }))
    }
}

/// A running admin listener.
#[derive(Debug)]
pub struct RunningAdmin {
    local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningAdmin {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits up to `grace` for calls in flight.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), AdminError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let abort = self.task.abort_handle();
        match tokio::time::timeout(grace, self.task).await {
            Ok(Ok(result)) => result.map_err(AdminError::from),
            Ok(Err(e)) => Err(AdminError::Task(e.to_string())),
            Err(_) => {
                abort.abort();
                Ok(())
            }
        }
    }
}

/// Binds `addr` and serves the admin API (and its reflection), every call
/// requiring `token`. Plaintext; see [`start_with_tls`].
pub async fn start(
    addr: SocketAddr,
    token: &Secret,
    store: Arc<RevocationStore>,
    state: Arc<ServerState>,
    config: crate::config::Config,
) -> Result<RunningAdmin, AdminError> {
    start_with_tls(addr, token, store, state, config, None).await
}

/// [`start`], over TLS (mTLS with a client CA) when `tls` is given.
pub(crate) async fn start_with_tls(
    addr: SocketAddr,
    token: &Secret,
    store: Arc<RevocationStore>,
    state: Arc<ServerState>,
    config: crate::config::Config,
    tls: Option<Arc<crate::tls::ServerTls>>,
) -> Result<RunningAdmin, AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    start_on(
        listener,
        token,
        store,
        state,
        Arc::new(RunningConfig::fixed(config)),
        tls,
    )
}

/// [`start_with_tls`] on a listener the caller bound.
pub(crate) fn start_on(
    listener: TcpListener,
    token: &Secret,
    store: Arc<RevocationStore>,
    state: Arc<ServerState>,
    config: Arc<RunningConfig>,
    tls: Option<Arc<crate::tls::ServerTls>>,
) -> Result<RunningAdmin, AdminError> {
    let local_addr = listener.local_addr().map_err(|source| AdminError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let auth = AdminAuth::new(token);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AdminError::Reflection(e.to_string()))?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(InterceptedService::new(reflection, auth.clone()))
        .add_service(InterceptedService::new(
            AdminServer::new(AdminService::new(store, state, config))
                .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES),
            auth,
        ));
    let incoming = crate::tls::incoming(listener, tls, "admin");
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = shutdown_rx.await;
    }));
    Ok(RunningAdmin {
        local_addr,
        shutdown: Some(shutdown_tx),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let auth = AdminAuth::new(&Secret::new("0123456789abcdef"));
        assert!(auth.accepts(Some(b"Bearer 0123456789abcdef")));
        assert!(auth.accepts(Some(b"bearer 0123456789abcdef")));
        assert!(!auth.accepts(None));
        assert!(!auth.accepts(Some(b"Bearer")));
        assert!(!auth.accepts(Some(b"Bearer 0123456789abcdeX")));
        assert!(!auth.accepts(Some(b"Bearer 0123456789abcdef0")));
        assert!(!auth.accepts(Some(b"Basic 0123456789abcdef")));
        assert!(!auth.accepts(Some(b"0123456789abcdef")));
        assert!(!format!("{auth:?}").contains("0123"));
    }
}

/// Fuzz targets of the admin API (see [`crate::fuzz`]): its bearer check, and
/// `RevokeBatch` requests (protobuf bytes) through the real service over a
/// store. Oracle: no panic, no hang; the admin token is accepted only as
/// itself; a request either fails with nothing applied or every revocation it
/// acknowledges is in force, listed, unexpired and refuses a token it
/// matches.
#[cfg(test)]
mod fuzz {
    use prost::Message;

    use super::*;
    use crate::authn::VerifiedToken;
    use crate::fuzz::{Target as FuzzTarget, bytes, run};
    use crate::revocation::backend::MemoryBackend;
    use crate::revocation::{Lifetimes, Revocation, test_support};
    use crate::test_setup::setup;

    #[test]
    fn fuzz_admin_bearer() {
        let secret = "0123456789abcdef0123456789abcdef";
        let auth = AdminAuth::new(&Secret::new(secret));
        run(
            FuzzTarget {
                name: "admin_bearer",
                seeds: bytes([format!("Bearer {secret}"), format!("bearer  {secret}")]),
                dictionary: bytes(["Bearer ", " ", "\t", "0", "f", "\0"]),
                cases: 20_000,
            },
            |input| {
                if auth.accepts(Some(input)) {
                    let text = String::from_utf8_lossy(input);
                    let mut parts = text.split_ascii_whitespace();
                    assert!(
                        parts
                            .next()
                            .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
                    );
                    assert_eq!(parts.next(), Some(secret));
                    assert_eq!(parts.next(), None);
                }
            },
        );
    }

    /// A token the revocation `entry` must refuse, if its target can say.
    fn matching_token(entry: &Revocation) -> Option<VerifiedToken> {
        let mut token = test_support::token();
        token.issued_at = entry.created_at - 1;
        token.expires_at = entry.created_at + 60;
        match &entry.target {
            revocation::Target::Token { jti, issuer } => {
                token.jti = Some(jti.clone());
                if let Some(issuer) = issuer {
                    token.issuer = issuer.clone();
                }
            }
            revocation::Target::Subject { sub, issued_before } => {
                token.subject = sub.clone();
                token.issued_at = (*issued_before).min(token.issued_at);
            }
            _ => return None,
        }
        Some(token)
    }

    #[test]
    fn fuzz_admin_revoke_batch() {
        let runtime = crate::fuzz::runtime();
        let setup = setup("");
        let lifetimes = Lifetimes {
            max_lifetime: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            api_key_lifetime: Duration::ZERO,
        };
        let store = runtime
            .block_on(RevocationStore::open_with(
                &crate::config::RevocationConfig::default(),
                lifetimes,
                Arc::new(MemoryBackend::new()),
            ))
            .unwrap();
        let state = Arc::new(ServerState::new(
            crate::audit::AuditLog::stdout(),
            tonic_health::server::health_reporter().0,
            &[""],
        ));
        let service = AdminService::new(
            store.clone(),
            state,
            Arc::new(RunningConfig::fixed(setup.config.clone())),
        );
        let now = unix_now();
        let target = |kind: pb::target::Kind| pb::Target { kind: Some(kind) };
        let seed = pb::RevokeBatchRequest {
            targets: vec![
                target(pb::target::Kind::Token(pb::TokenTarget {
                    jti: "leaked-1".into(),
                    issuer: "https://iss".into(),
                    expires_at: Some(now + 600),
                })),
                target(pb::target::Kind::Subject(pb::SubjectTarget {
                    sub: "mallory".into(),
                    issued_before: Some(now),
                })),
                target(pb::target::Kind::KeyId("k-old".into())),
                target(pb::target::Kind::Client(pb::ClientTarget {
                    client_id: "web".into(),
                    issued_before: Some(now - 5),
                })),
                target(pb::target::Kind::Issuer(pb::IssuerTarget {
                    issuer: "https://iss".into(),
                    issued_before: Some(now - 3600),
                })),
                target(pb::target::Kind::ApiKeyId("ci-job".into())),
            ],
            reason: "breach".into(),
        };
        let dictionary = bytes([
            &now.to_le_bytes()[..],
            &i64::MAX.to_le_bytes(),
            &i64::MIN.to_le_bytes(),
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"https://iss",
            b"\xff\xff\xff\xff\x0f",
        ]);
        let mut acknowledged = 0u64;
        run(
            FuzzTarget {
                name: "admin_revoke_batch",
                seeds: vec![seed.encode_to_vec()],
                dictionary,
                cases: 3000,
            },
            |input| {
                let Ok(request) = pb::RevokeBatchRequest::decode(input) else {
                    return;
                };
                let before = store.list().len();
                let answer = runtime.block_on(service.revoke_batch(Request::new(request)));
                let Ok(answer) = answer else {
                    // Refused: nothing applied (entries only expire meanwhile).
                    assert!(store.list().len() <= before);
                    return;
                };
                let listed = store.list();
                for done in &answer.get_ref().revocations {
                    acknowledged += 1;
                    let target = done
                        .target
                        .clone()
                        .and_then(|t| target_from_pb(Some(t)).ok());
                    let entry = listed
                        .iter()
                        .find(|e| Some(&e.target) == target.as_ref().map(|(t, _)| t))
                        .expect("acknowledged but not listed");
                    assert!(entry.expires_at > entry.created_at, "already expired");
                    if let Some(token) = matching_token(entry) {
                        assert!(
                            store.check(&token, entry.created_at).is_err(),
                            "acknowledged but not enforced: {entry:?}"
                        );
                    }
                }
            },
        );
        assert!(acknowledged > 0, "some revocations were acknowledged");
    }
}
