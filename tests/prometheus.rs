//! The monitoring that ships in `deploy/`: the alert rules, unit-tested with
//! `promtool test rules`; the Grafana dashboard's queries, checked with
//! `promtool check rules`; and a real Prometheus scraping a real
//! `portcullis serve` (with a remote issuer, Redis and decision logs, so that
//! every metric appears), checked through Prometheus' HTTP API against the metrics
//! reference and the rules.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package
//! (`scripts/test` installs it), found on `PATH` or through
//! `PORTCULLIS_PROMTOOL` / `PORTCULLIS_PROMETHEUS`. Without them the tests
//! fail, saying how to install them: a skipped test would hide a missing
//! install step.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::idp::TestIdp;
use common::{Fixture, envoy_request, health_of, jwks_of, outcome, repo_root};
use redis_harness::RedisServer;
use serde_json::Value;

/// The Grafana variables of the dashboard and what stands for them in a
/// plain PromQL check (a range for the interval variables, "any" for the
/// label variables).
const DASHBOARD_VARIABLES: [(&str, &str); 6] = [
    ("$__rate_interval", "1m"),
    ("$__interval", "1m"),
    ("$__range", "1h"),
    ("${datasource}", ".*"),
    ("$job", ".*"),
    ("$instance", ".*"),
];

/// Documented metrics this test's configuration cannot make appear, and why.
const EXPECTED_ABSENT: [(&str, &str); 1] = [(
    "portcullis_ssf_events_total",
    "a series appears with the first Shared Signals event received; no transmitter here",
)];

/// `name` from `env` or `PATH`; fails the test, saying how to install it,
/// when it is missing.
fn tool(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "\n\n*** {name} is not installed (or not on PATH; {env} may name it). ***\n\
             These tests run Prometheus' own tools. Install them, e.g.:\n  \
             Debian/Ubuntu: sudo apt-get install -y --no-install-recommends prometheus\n\
             (scripts/test and .ci/run install it.)\n\n"
        )
    })
}

fn promtool() -> PathBuf {
    tool("promtool", "PORTCULLIS_PROMTOOL")
}

/// Runs promtool with `args`; panics with its output unless it succeeds.
fn run_promtool(args: &[&str]) -> String {
    let output = Command::new(promtool())
        .args(args)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The `.yaml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .yaml file in {}", dir.display());
    files
}

fn rule_files() -> Vec<PathBuf> {
    yaml_files(&repo_root().join("deploy/prometheus"))
}

fn read_yaml(path: &Path) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every alert name of the shipped rule files.
fn alert_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in rule_files() {
        let yaml = read_yaml(&file);
        for group in yaml["groups"].as_sequence().unwrap() {
            for rule in group["rules"].as_sequence().unwrap() {
                if let Some(name) = rule["alert"].as_str() {
                    names.insert(name.to_owned());
                }
            }
        }
    }
    names
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_is_tested_and_has_a_runbook() {
    let files = rule_files();
    let mut args = vec!["check", "rules"];
    args.extend(files.iter().map(|p| path_str(p)));
    run_promtool(&args);

    let tests = yaml_files(&repo_root().join("deploy/prometheus/tests"));
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(|p| path_str(p)));
    let text = run_promtool(&args);
    assert!(text.contains("SUCCESS"), "{text}");

    // Each alert has a case where it fires and one where it must stay silent.
    let alerts = alert_names();
    assert!(alerts.len() >= 10, "{alerts:?}");
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for file in &tests {
        let yaml = read_yaml(file);
        for test in yaml["tests"].as_sequence().unwrap() {
            for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = case["alertname"].as_str().unwrap().to_owned();
                match case["exp_alerts"].as_sequence() {
                    Some(expected) if !expected.is_empty() => fires.insert(name),
                    _ => silent.insert(name),
                };
            }
        }
    }
    for alert in &alerts {
        assert!(fires.contains(alert), "no test case where {alert} fires");
        assert!(
            silent.contains(alert),
            "no test case where {alert} must not fire"
        );
    }

    // The rules read only documented metrics (a typo in a rule and in its
    // test series alike would pass promtool and never fire).
    let documented = documented_metrics();
    for file in &files {
        for name in metric_names(&std::fs::read_to_string(file).unwrap()) {
            assert!(
                documented.contains_key(documented_base(&documented, &name)),
                "{} reads {name}, which docs/reference/metrics.md does not document",
                file.display()
            );
        }
    }

    // Each alert has its runbook entry, the anchor its rule links to.
    let runbook = std::fs::read_to_string(repo_root().join("docs/operations/alerts.md")).unwrap();
    for alert in &alerts {
        assert!(
            runbook.contains(&format!("\n### {alert}\n")),
            "docs/operations/alerts.md has no `### {alert}` runbook entry"
        );
    }
}

/// Every `expr` of the dashboard's panels (rows' panels included).
fn dashboard_exprs() -> Vec<String> {
    fn walk(panels: &Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_owned());
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let path = repo_root().join("deploy/grafana/portcullis.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], &mut exprs);
    exprs
}

/// The expression with Grafana's variables replaced by plain PromQL.
fn plain_promql(expr: &str) -> String {
    let mut plain = expr.to_owned();
    for (variable, value) in DASHBOARD_VARIABLES {
        plain = plain.replace(variable, value);
    }
    assert!(!plain.contains('$'), "unknown Grafana variable in {expr}");
    plain
}

/// The `portcullis_` metric names an expression reads (not recording rules
/// such as `job:portcullis_check_slow:ratio_rate5m`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    let mut at = 0;
    while let Some(found) = expr[at..].find("portcullis_") {
        let start = at + found;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            names.insert(expr[start..end].to_owned());
        }
        at = end;
    }
    names
}

#[test]
fn dashboard_queries_are_valid_promql_over_documented_metrics() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "{} queries", exprs.len());

    // promtool parses each query as a recording rule's expression.
    let rules = serde_json::json!({
        "groups": [{
            "name": "dashboard",
            "rules": exprs.iter().enumerate().map(|(i, e)| serde_json::json!({
                "record": format!("dashboard:query_{i}"),
                "expr": plain_promql(e),
            })).collect::<Vec<_>>(),
        }]
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&file, rules.to_string()).unwrap(); // JSON is YAML
    let text = run_promtool(&["check", "rules", path_str(&file)]);
    assert!(
        text.contains(&format!("{} rules found", exprs.len())),
        "{text}"
    );

    // And reads only metrics the reference documents (a typo reads nothing).
    let documented = documented_metrics();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(
                documented.contains_key(documented_base(&documented, &name)),
                "the dashboard reads {name}, which docs/reference/metrics.md does not document"
            );
        }
    }
}

/// The documented metric a series name belongs to: a histogram's for its
/// `_bucket`, `_count` and `_sum` series, else the name itself.
fn documented_base<'a>(documented: &BTreeMap<String, Documented>, name: &'a str) -> &'a str {
    ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|b| documented.get(*b).is_some_and(|m| m.kind == "histogram"))
        .unwrap_or(name)
}

/// A metric as docs/reference/metrics.md documents it.
#[derive(Debug)]
struct Documented {
    kind: String,
    labels: BTreeSet<String>,
}

/// The metrics table of docs/reference/metrics.md: name → type and label
/// names (the backquoted words of the Labels column outside parentheses,
/// which list values).
fn documented_metrics() -> BTreeMap<String, Documented> {
    let text = std::fs::read_to_string(repo_root().join("docs/reference/metrics.md")).unwrap();
    let mut metrics = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `portcullis_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_owned();
        let kind = cells[2].to_owned();
        let mut depth = 0;
        let mut outside = String::new();
        for c in cells[3].chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => outside.push(c),
                _ => {}
            }
        }
        let labels = outside
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        metrics.insert(name, Documented { kind, labels });
    }
    assert!(metrics.len() >= 20, "{metrics:?}");
    metrics
}

/// A child process killed when the test ends, whatever its outcome.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What is awaited, and a log file read only when the wait fails.
struct LogOf<'a>(&'a str, &'a Path);

impl std::fmt::Display for LogOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let log = std::fs::read_to_string(self.1).unwrap_or_default();
        write!(f, "{}; {}:\n{log}", self.0, self.1.display())
    }
}

/// Prometheus' HTTP API at `base`.
struct PrometheusApi {
    base: String,
    http: reqwest::Client,
}

impl PrometheusApi {
    /// `GET path` (with its query string), the JSON answer whatever its status.
    async fn get(&self, path: &str) -> Option<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// An instant query (POSTed, so that no encoding is needed); the answer.
    async fn query(&self, query: &str) -> Value {
        self.http
            .post(format!("{}/api/v1/query", self.base))
            .form(&[("query", query)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The result vector of a query that must succeed.
    async fn vector(&self, query: &str) -> Vec<Value> {
        let answer = self.query(query).await;
        assert_eq!(answer["status"], "success", "{query}: {answer}");
        answer["data"]["result"].as_array().unwrap().clone()
    }
}

/// Polls `probe` every 250 ms until it returns something; panics after a
/// generous bound (a wait for an event, not a timing assertion).
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: impl std::fmt::Display,
    mut probe: impl FnMut() -> F,
) -> T {
    for _ in 0..240 {
        if let Some(value) = probe().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_every_documented_metric_and_evaluates_every_rule() {
    let prometheus = tool("prometheus", "PORTCULLIS_PROMETHEUS");
    let redis = RedisServer::start();
    // A remote issuer, so that the key refresh metrics exist.
    let idp = TestIdp::start().await;
    // A collector for the spans; decision logs go there too, so that their
    // metrics exist (it serves no logs service: those exports count as
    // failures, which is all this test needs).
    let (_collector, otlp) = common::otlp::Collector::start().await;
    let fx = Fixture::new();
    idp.set_jwks(jwks_of(&[fx.es256()]));

    let listen = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    fx.append_config(&format!(
        r#"
[[issuers]]
issuer = "{issuer}"
audiences = ["orders-api"]
jwks_uri = "{jwks}"
[issuers.remote]
ca_file = "{ca}"

[revocation]
data_dir = "{data}"
redis_url = "{redis}"

[telemetry]
metrics_listen = "{metrics}"
otlp_endpoint = "http://{otlp}"
decision_logs = true
"#,
        issuer = idp.issuer(),
        jwks = idp.jwks_uri(),
        ca = idp.ca_file().display(),
        data = fx.path("data").display(),
        redis = redis.url(),
    ));
    let audit = fx.audit_path();
    let _portcullis = Reaped(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["serve", "--config", path_str(&fx.config_path())])
            .args(["--listen", &listen])
            .stdout(std::fs::File::create(&audit).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let channel = eventually("portcullis serve SERVING", || async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
            .ok()?;
        (health_of(&channel, "").await == 1).then_some(channel)
    })
    .await;

    // Traffic: allowed, denied by policy, refused for the credential.
    let client =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel,
        );
    let reader = fx.es256().token("alice", &["orders:read"], &[]);
    let cases = [
        ("GET", "/orders/7", Some(reader.as_str()), 200),
        ("GET", "/orders/7", Some(reader.as_str()), 200),
        ("POST", "/orders", Some(reader.as_str()), 403),
        ("GET", "/orders", None, 401),
        ("GET", "/orders", Some("not.a.token"), 401),
    ];
    for (method, path, token, status) in cases {
        let response = client
            .clone()
            .check(envoy_request(method, path, token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(outcome(&response).http_status, status, "{method} {path}");
    }

    // Prometheus, scraping it every second and evaluating the shipped rules.
    let dir = tempfile::tempdir().unwrap();
    let rule_paths: Vec<String> = rule_files()
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: portcullis\n    static_configs:\n      - targets: [\"{metrics}\"]\n",
            rule_paths.join(", ")
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let _prometheus = Reaped(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let api = PrometheusApi {
        base: format!("http://{web}"),
        http: reqwest::Client::new(),
    };

    // Scraped once every decision is in. (Prometheus' own log is shown if
    // that never happens.)
    let decided = cases.len().to_string();
    let log = dir.path().join("prometheus.log");
    let waiting = LogOf("Prometheus to scrape the decisions", &log);
    eventually(waiting, || async {
        let answer = api
            .get("/api/v1/query?query=sum(portcullis_decisions_total)")
            .await?;
        let value = answer["data"]["result"][0]["value"][1].as_str()?.to_owned();
        (value == decided).then_some(())
    })
    .await;
    let up = api.vector(r#"up{job="portcullis"}"#).await;
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0]["value"][1], "1");

    // What Prometheus holds agrees with the traffic.
    let mut by_outcome = BTreeMap::new();
    for sample in api
        .vector("sum by (outcome, reason) (portcullis_decisions_total)")
        .await
    {
        let labels = &sample["metric"];
        by_outcome.insert(
            format!(
                "{}/{}",
                labels["outcome"].as_str().unwrap(),
                labels["reason"].as_str().unwrap()
            ),
            sample["value"][1].as_str().unwrap().to_owned(),
        );
    }
    assert_eq!(
        by_outcome.get("allow/allowed").map(String::as_str),
        Some("2"),
        "{by_outcome:?}"
    );
    assert_eq!(
        by_outcome.get("deny/policy_denied").map(String::as_str),
        Some("1"),
        "{by_outcome:?}"
    );
    assert_eq!(
        by_outcome.get("deny/missing_token").map(String::as_str),
        Some("1"),
        "{by_outcome:?}"
    );

    // Every documented metric exists with its documented labels, and every
    // scraped metric is documented.
    let series = api
        .get("/api/v1/series?match[]=%7B__name__%3D~%22portcullis_.%2A%22%7D")
        .await
        .expect("series answer");
    assert_eq!(series["status"], "success", "{series}");
    let mut scraped: BTreeMap<String, BTreeSet<BTreeSet<String>>> = BTreeMap::new();
    for labels in series["data"].as_array().unwrap() {
        let labels = labels.as_object().unwrap();
        let name = labels["__name__"].as_str().unwrap().to_owned();
        let names = labels
            .keys()
            .filter(|k| !matches!(k.as_str(), "__name__" | "job" | "instance"))
            .cloned()
            .collect();
        scraped.entry(name).or_default().insert(names);
    }
    let documented = documented_metrics();
    let absent: BTreeMap<&str, &str> = EXPECTED_ABSENT.into_iter().collect();
    let mut problems = Vec::new();
    let mut expected_series = BTreeSet::new();
    for (name, doc) in &documented {
        if let Some(reason) = absent.get(name.as_str()) {
            if scraped.contains_key(name) {
                problems.push(format!(
                    "{name} is listed as absent ({reason}) but was scraped"
                ));
            }
            expected_series.insert(name.clone());
            continue;
        }
        let wanted: Vec<(String, BTreeSet<String>)> = if doc.kind == "histogram" {
            let mut with_le = doc.labels.clone();
            with_le.insert("le".to_owned());
            vec![
                (format!("{name}_bucket"), with_le),
                (format!("{name}_count"), doc.labels.clone()),
                (format!("{name}_sum"), doc.labels.clone()),
            ]
        } else {
            vec![(name.clone(), doc.labels.clone())]
        };
        for (series_name, labels) in wanted {
            match scraped.get(&series_name) {
                None => problems.push(format!(
                    "{series_name} is documented but Prometheus has no series"
                )),
                Some(sets) if sets.iter().any(|s| s != &labels) => problems.push(format!(
                    "{series_name} has label names {sets:?}, documented {labels:?}"
                )),
                Some(_) => {}
            }
            expected_series.insert(series_name);
        }
    }
    for name in scraped.keys() {
        if !expected_series.contains(name) {
            problems.push(format!(
                "{name} is scraped but not in docs/reference/metrics.md"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The rule groups are loaded and healthy once each has been evaluated.
    let mut groups_in_files = BTreeSet::new();
    for file in rule_files() {
        for group in read_yaml(&file)["groups"].as_sequence().unwrap() {
            groups_in_files.insert(group["name"].as_str().unwrap().to_owned());
        }
    }
    let groups = eventually("every rule group evaluated", || async {
        let answer = api.get("/api/v1/rules").await?;
        let groups = answer["data"]["groups"].as_array()?.clone();
        let evaluated = groups.iter().all(|g| {
            g["rules"].as_array().is_some_and(|rules| {
                rules.iter().all(|r| {
                    !r["lastEvaluation"]
                        .as_str()
                        .unwrap_or("0001")
                        .starts_with("0001")
                })
            })
        });
        (groups.len() == groups_in_files.len() && evaluated).then_some(groups)
    })
    .await;
    let mut alerts = BTreeSet::new();
    for group in &groups {
        assert!(
            groups_in_files.contains(group["name"].as_str().unwrap()),
            "{group}"
        );
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "rule not healthy: {rule}");
            // And each expression evaluates on its own against live data.
            let query = rule["query"].as_str().unwrap();
            api.vector(query).await;
            if rule["type"] == "alerting" {
                alerts.insert(rule["name"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(alerts, alert_names());

    // An alert fires for real: a policy change the server rejects makes
    // PortcullisPolicyReloadFailing fire from the scraped counter.
    std::fs::write(
        fx.path("policies").join("broken.cedar"),
        "permit(principal,",
    )
    .unwrap();
    let firing = eventually("PortcullisPolicyReloadFailing to fire", || async {
        let answer = api.get("/api/v1/alerts").await?;
        answer["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| {
                a["labels"]["alertname"] == "PortcullisPolicyReloadFailing"
                    && a["state"] == "firing"
            })
            .cloned()
    })
    .await;
    assert_eq!(firing["labels"]["job"], "portcullis", "{firing}");
    assert_eq!(firing["labels"]["severity"], "warning", "{firing}");
    let others: Vec<Value> = api.get("/api/v1/alerts").await.expect("alerts")["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] != "PortcullisPolicyReloadFailing")
        .cloned()
        .collect();
    assert!(
        others.is_empty(),
        "no other alert should be pending or firing: {others:?}"
    );

    // Every dashboard query evaluates.
    for expr in dashboard_exprs() {
        api.vector(&plain_promql(&expr)).await;
    }

    // More traffic, now that Prometheus watches: the recording rules turn
    // the histogram's increase into the latency objective's ratio (none of
    // these decisions came near 25.6 ms), and the dashboard's rate panel
    // shows the allows.
    for _ in 0..5 {
        let response = client
            .clone()
            .check(envoy_request("GET", "/orders/7", Some(&reader)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(outcome(&response).http_status, 200);
    }
    eventually(
        "the slow-decision ratio recorded from the new traffic",
        || async {
            let answer = api.query("job:portcullis_check_slow:ratio_rate5m").await;
            let sample = &answer["data"]["result"][0];
            (sample["metric"]["job"] == "portcullis" && sample["value"][1] == "0").then_some(())
        },
    )
    .await;
    let panel = api
        .vector(&plain_promql(
            r#"sum by (outcome) (rate(portcullis_decisions_total{job=~"$job", instance=~"$instance"}[$__rate_interval]))"#,
        ))
        .await;
    assert!(
        panel
            .iter()
            .any(|s| s["metric"]["outcome"] == "allow" && s["value"][1] != "0"),
        "{panel:?}"
    );
}
