//! The integration kit as its users meet it: the Rust and Python client
//! examples run against the real `portcullis serve` on the quickstart
//! configuration; the Envoy configuration parses into Envoy's own `Bootstrap`
//! message; the Kubernetes and Istio manifests parse and carry what the README
//! promises.
//!
//! Python comes from `PORTCULLIS_PYTHON`, else `target/pyenv/bin/python`, which
//! `scripts/test` creates with `examples/python/requirements.txt`. Without it
//! these tests fail and say how to get it: they never skip.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{path_arg, repo_root};
use serde_json::Value;

/// `portcullis serve` on a copy of the quickstart, on a free loopback port.
struct Quickstart {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Quickstart {
    fn start() -> Quickstart {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&repo_root().join("examples/quickstart"), dir.path());
        let config = dir.path().join("portcullis.toml");
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["serve", "--config", &path_arg(&config)])
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The log says where it listens, then when it serves.
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut addr = None;
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("portcullis serve logs that it is serving");
            if let Some(rest) = line.split("addr=").nth(1).filter(|_| addr.is_none()) {
                addr = Some(rest.split_whitespace().next().unwrap().to_owned());
            }
            if line.contains("SERVING policies=") {
                break;
            }
        }
        Quickstart {
            child,
            addr: addr.expect("listening address in the log"),
            dir,
        }
    }

    /// `portcullis token mint` with the quickstart's demo key.
    fn token(&self, scopes: &[&str]) -> String {
        let key = path_arg(&self.dir.path().join("dev-key.pem"));
        let mut args = vec!["token", "mint", "--key", &key, "--sub", "alice"];
        for scope in scopes {
            args.extend(["--scope", scope]);
        }
        let out = common::portcullis(&args);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            // The quickstart's own revocation journal stays behind.
            if path.file_name().is_some_and(|n| n != "data") {
                copy_dir(&path, &target);
            }
        } else {
            std::fs::copy(&path, target).unwrap();
        }
    }
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A built cargo example (`cargo test --all-targets` builds them; a test run
/// of this file alone builds them here).
fn example(name: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_portcullis"));
    let path = bin.parent().unwrap().join("examples").join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--example", name])
            .current_dir(repo_root())
            .status()
            .unwrap();
        assert!(status.success(), "cargo build --example {name}");
    }
    path
}

/// The Python of the examples, with their requirements installed.
fn python() -> PathBuf {
    let python = std::env::var_os("PORTCULLIS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/pyenv/bin/python"));
    let probe = Command::new(&python)
        .args([
            "-c",
            "import grpc, grpc_tools, yaml, envoy.service.auth.v3.external_auth_pb2",
        ])
        .output();
    match probe {
        Ok(out) if out.status.success() => python,
        other => panic!(
            "no Python with examples/python/requirements.txt at {} ({other:?}).\n\
             Run scripts/test (it creates target/pyenv), or set PORTCULLIS_PYTHON to a \
             python3 with `pip install -r examples/python/requirements.txt`.",
            python.display()
        ),
    }
}

fn run_python(args: &[&str], token: &str) -> Output {
    Command::new(python())
        .args(args)
        .env("PORTCULLIS_TOKEN", token)
        .current_dir(repo_root())
        .output()
        .unwrap()
}

/// What every `Check` example prints for alice with `orders:read`.
fn assert_check_output(out: &str) {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("GET /orders/42 -> 200 allowed policies=[orders-read] decision_id="),
        "{out}"
    );
    assert!(
        lines[1].starts_with("POST /orders -> 403 policy_denied policies=[] decision_id="),
        "{out}"
    );
}

/// What every `IsAuthorized` example prints for alice with `orders:read`.
fn assert_is_authorized_output(out: &str) {
    let expected = [
        "IsAuthorized get /orders/{id}: ALLOW reason=allowed policies=[orders-read] principal=User::\"alice\"",
        "button list: ALLOW reason=allowed",
        "button view: ALLOW reason=allowed",
        "button create: DENY reason=policy_denied",
        "button delete: DENY reason=policy_denied",
    ];
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..expected.len()], expected, "{out}");
}

#[test]
fn rust_and_python_examples_run_against_the_quickstart() {
    let python = python(); // fail first, and clearly, without Python
    let quickstart = Quickstart::start();
    let token = quickstart.token(&["orders:read"]);
    let addr = quickstart.addr.as_str();

    let rust_check = Command::new(example("check_client"))
        .arg(addr)
        .env("PORTCULLIS_TOKEN", &token)
        .output()
        .unwrap();
    assert_check_output(&stdout_of(&rust_check));
    let rust_direct = Command::new(example("is_authorized"))
        .args([addr, &token])
        .output()
        .unwrap();
    assert_is_authorized_output(&stdout_of(&rust_direct));

    let py_check = run_python(&["examples/python/check_client.py", addr], &token);
    assert_check_output(&stdout_of(&py_check));
    let py_direct = run_python(&["examples/python/is_authorized.py", addr], &token);
    let out = stdout_of(&py_direct);
    assert_is_authorized_output(&out);
    assert!(
        out.contains(
            "invalid request: INVALID_ARGUMENT: resource.type: entity type \"Invoice\" is not in the schema"
        ),
        "{out}"
    );
    assert!(python.exists());
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every document of a multi-document YAML file.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

#[test]
fn the_envoy_config_parses_into_envoys_bootstrap() {
    let validate = |path: &Path| {
        Command::new(python())
            .arg("examples/envoy/validate_config.py")
            .arg(path)
            .current_dir(repo_root())
            .output()
            .unwrap()
    };
    let envoy = repo_root().join("examples/envoy/envoy.yaml");
    let parsed: Value = serde_json::from_str(&stdout_of(&validate(&envoy))).unwrap();
    assert!(parsed["static_resources"]["clusters"].is_array());

    // The checker is strict: a misspelt field or a wrong type fails.
    let text = std::fs::read_to_string(&envoy).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (from, to, complaint) in [
        (
            "failure_mode_allow: false",
            "failure_mode_alow: false",
            "no field named \"failure_mode_alow\"",
        ),
        ("port_value: 9191", "port_value: nine", "port_value"),
        (
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Rooter",
            "Rooter",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let out = validate(&broken);
        assert!(!out.status.success(), "{to} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(complaint), "{stderr}");
    }

    // What the README promises of it.
    let config = yaml("examples/envoy/envoy.yaml");
    let hcm = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let ext_authz = &hcm["http_filters"][0];
    assert_eq!(ext_authz["name"], "envoy.filters.http.ext_authz");
    assert_eq!(hcm["http_filters"][1]["name"], "envoy.filters.http.router");
    let ext_authz = &ext_authz["typed_config"];
    assert_eq!(ext_authz["transport_api_version"], "V3");
    assert_eq!(ext_authz["failure_mode_allow"], false);
    assert_eq!(ext_authz["include_peer_certificate"], true);
    assert_eq!(
        ext_authz["grpc_service"]["envoy_grpc"]["cluster_name"],
        "portcullis"
    );
    assert!(ext_authz["grpc_service"]["timeout"].is_string());
    let routes = &hcm["route_config"]["virtual_hosts"][0]["routes"];
    let per_route =
        |i: usize| &routes[i]["typed_per_filter_config"]["envoy.filters.http.ext_authz"];
    assert_eq!(routes[0]["match"]["path"], "/healthz");
    assert_eq!(per_route(0)["disabled"], true);
    // The catch-all sets no `portcullis.mode`: that would override every
    // route's `mode` in portcullis.toml (a `dry-run` route would enforce).
    assert_eq!(routes[1]["match"]["prefix"], "/");
    assert!(per_route(1).is_null(), "{}", routes[1]);
    let clusters = config["static_resources"]["clusters"].as_array().unwrap();
    let portcullis = clusters.iter().find(|c| c["name"] == "portcullis").unwrap();
    assert!(
        portcullis["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            ["http2_protocol_options"]
            .is_object()
    );
    assert_eq!(
        portcullis["health_checks"][0]["grpc_health_check"]["service_name"],
        "envoy.service.auth.v3.Authorization"
    );
    assert!(clusters.iter().any(|c| c["name"] == "orders"), "upstream");
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn the_kubernetes_manifests_carry_the_required_fields() {
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("deploy/kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        let name = path
            .strip_prefix(repo_root())
            .unwrap()
            .display()
            .to_string();
        docs.extend(yaml_documents(&name));
    }
    for doc in &docs {
        assert!(
            doc["apiVersion"].is_string() && doc["kind"].is_string(),
            "{doc}"
        );
        assert!(doc["metadata"]["name"].is_string(), "{doc}");
    }

    let deployment = find(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"][kind][resource].is_string(),
                "{kind}.{resource}"
            );
        }
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["grpc"]["port"], 9191, "{probe}");
    }
    assert_eq!(
        container["readinessProbe"]["grpc"]["service"],
        "envoy.service.auth.v3.Authorization"
    );
    // Secrets come from a Secret, by reference.
    let env = container["env"].as_array().unwrap();
    for var in ["PORTCULLIS_ADMIN_TOKEN", "PORTCULLIS_REDIS_URL"] {
        let entry = env.iter().find(|e| e["name"] == var).unwrap();
        assert_eq!(
            entry["valueFrom"]["secretKeyRef"]["name"], "portcullis-secrets",
            "{var}"
        );
    }
    let ports: Vec<i64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ports,
        [9191, 9464],
        "gRPC and metrics are declared; the admin port (loopback only) is not"
    );

    // The Service exposes gRPC only, never the admin API.
    let service = find(&docs, "Service");
    let service_ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(service_ports.len(), 1);
    assert_eq!(service_ports[0]["port"], 9191);
    assert_eq!(service_ports[0]["appProtocol"], "grpc");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["template"]["metadata"]["labels"]
    );

    let pdb = find(&docs, "PodDisruptionBudget");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let hpa = find(&docs, "HorizontalPodAutoscaler");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert!(hpa["spec"]["minReplicas"].as_i64().unwrap() >= 2);

    // The ConfigMap's configuration is one Portcullis accepts, and keeps the
    // admin API on loopback and the secrets out.
    let configs: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ConfigMap").collect();
    let config_map = configs
        .iter()
        .find(|c| c["data"]["portcullis.toml"].is_string())
        .unwrap();
    let policies = configs
        .iter()
        .find(|c| c["data"]["orders.cedar"].is_string())
        .unwrap();
    let toml = config_map["data"]["portcullis.toml"].as_str().unwrap();
    assert!(toml.contains("listen = \"127.0.0.1:9192\""));
    assert!(toml.contains("token_env = \"PORTCULLIS_ADMIN_TOKEN\""));
    assert!(toml.contains("redis_url_env = \"PORTCULLIS_REDIS_URL\""));
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir(&policy_dir).unwrap();
    for (name, text) in policies["data"].as_object().unwrap() {
        std::fs::write(policy_dir.join(name), text.as_str().unwrap()).unwrap();
    }
    let local = toml
        .replace("/etc/portcullis/policies", &path_arg(&policy_dir))
        .replace("/var/lib/portcullis", &path_arg(&dir.path().join("data")));
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, local).unwrap();
    let loaded = portcullis::config::Config::from_toml(
        &std::fs::read_to_string(&config).unwrap(),
        &config,
        dir.path(),
    );
    // The variables are unset here: the configuration is read as far as them...
    let err = loaded.unwrap_err().to_string();
    assert!(err.contains("PORTCULLIS_REDIS_URL is not set"), "{err}");
    // ...and with the secrets inline, it loads, and so do its policies and routes.
    let inline = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "redis_url_env = \"PORTCULLIS_REDIS_URL\"",
            "redis_url = \"redis://127.0.0.1:6379\"",
        )
        .replace(
            "token_env = \"PORTCULLIS_ADMIN_TOKEN\"",
            "token = \"0123456789abcdef0123\"",
        );
    let loaded = portcullis::config::Config::from_toml(&inline, &config, dir.path())
        .unwrap_or_else(|e| panic!("the ConfigMap's portcullis.toml: {e}"));
    if let Err(e) = portcullis::engine::Engine::from_config(&loaded) {
        panic!("the ConfigMap's configuration and policies: {e}");
    }
    // The metrics listener is where the pod annotations tell Prometheus to look.
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    let metrics = loaded
        .telemetry
        .metrics_listen
        .expect("metrics_listen is set");
    assert_eq!(
        annotations["prometheus.io/port"],
        metrics.port().to_string().as_str()
    );
    let store = portcullis::authz::policy_store::PolicyStore::load(&policy_dir)
        .unwrap_or_else(|e| panic!("the ConfigMap's policies: {e:?}"));
    assert_eq!(store.len(), 3);
}

/// Every Kubernetes manifest passes `kubernetes-validate --strict` (the
/// Kubernetes API's own schemas, shipped in the PyPI package, offline). The
/// Istio resources are custom resources it has no schema for; the test below
/// checks their fields.
#[test]
fn the_kubernetes_manifests_pass_kubernetes_validate() {
    let validator = python().with_file_name("kubernetes-validate");
    assert!(
        validator.is_file(),
        "no {}: run scripts/test (it installs examples/python/requirements.txt)",
        validator.display()
    );
    let manifests: Vec<PathBuf> = std::fs::read_dir(repo_root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(manifests.len() >= 5, "{manifests:?}");
    let out = Command::new(&validator)
        .args(["--strict", "--quiet"])
        .args(&manifests)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The validator does catch a misspelt field.
    let dir = tempfile::tempdir().unwrap();
    let deployment = std::fs::read_to_string(repo_root().join("deploy/kubernetes/deployment.yaml"))
        .unwrap()
        .replace(
            "terminationGracePeriodSeconds",
            "terminationGracePeriodSecond",
        );
    let broken = dir.path().join("deployment.yaml");
    std::fs::write(&broken, deployment).unwrap();
    let out = Command::new(&validator)
        .args(["--strict", "--quiet"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt field passed");
}

#[test]
fn the_istio_manifests_register_portcullis_as_a_custom_provider() {
    let mesh = yaml("deploy/istio/mesh-config.yaml");
    let provider = &mesh["spec"]["meshConfig"]["extensionProviders"][0];
    assert_eq!(provider["name"], "portcullis");
    let grpc = &provider["envoyExtAuthzGrpc"];
    assert_eq!(grpc["service"], "portcullis.portcullis.svc.cluster.local");
    assert_eq!(grpc["port"], 9191);
    assert!(grpc["timeout"].is_string());
    assert_eq!(grpc["failOpen"], false);

    let policy = yaml("deploy/istio/authorization-policy.yaml");
    assert_eq!(policy["apiVersion"], "security.istio.io/v1");
    assert_eq!(policy["kind"], "AuthorizationPolicy");
    assert_eq!(policy["spec"]["action"], "CUSTOM");
    assert_eq!(policy["spec"]["provider"]["name"], provider["name"]);
    assert!(policy["spec"]["selector"]["matchLabels"].is_object());

    // The provider points at the Service of deploy/kubernetes.
    let service = yaml_documents("deploy/kubernetes/service.yaml");
    let service = &service[0];
    let fqdn = format!(
        "{}.{}.svc.cluster.local",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap()
    );
    assert_eq!(grpc["service"], fqdn.as_str());
    assert_eq!(grpc["port"], service["spec"]["ports"][0]["port"]);
}
