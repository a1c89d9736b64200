//! The deploy files agree with the code: the Kubernetes manifests' probe
//! paths and ports are what the service answers on, their settings parse with
//! the service's own configuration rules, the objects point at each other, and
//! every metric the Grafana dashboard queries is one `/metrics` exposes.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::*;
use serde_norway::Value;

fn manifests() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir("deploy/k8s").expect("deploy/k8s") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let doc: Value =
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let kind = doc["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no kind", path.display()))
            .to_string();
        out.insert(kind, doc);
    }
    out
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_manifests_match_the_code() {
    let m = manifests();
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Job",
    ] {
        assert!(m.contains_key(kind), "a {kind} manifest");
    }
    let dep = &m["Deployment"];
    let name = s(&dep["metadata"]["name"]);
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&dep["spec"]["selector"]["matchLabels"], labels);
    let container = &dep["spec"]["template"]["spec"]["containers"][0];

    // Settings: every variable is one the service reads, and every value parses.
    let env: BTreeMap<String, String> = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| {
            let v = e["value"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| "postgres://from-secret@db/ingest".into());
            (s(&e["name"]).to_string(), v)
        })
        .collect();
    let config =
        ingest::config::Config::from_lookup(|k| env.get(k).cloned()).expect("manifest env parses");
    assert!(config.production, "JSON logs in the cluster");
    let port = config.port;
    assert_eq!(
        container["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(port))
    );

    // Shutdown fits in the termination grace period.
    let grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace") as u128
        * 1000;
    assert!(
        grace > (config.shutdown_timeout + config.shutdown_grace + ingest::ABORT_GRACE).as_millis(),
        "terminationGracePeriodSeconds must exceed SHUTDOWN_GRACE_MS + SHUTDOWN_TIMEOUT_MS + the 5 s abort grace"
    );

    // Probes and metrics: on ADMIN_PORT, which the service answers them on.
    let admin = config.admin_port;
    assert_ne!(admin, 0, "the operator views are kept off the public port");
    assert_eq!(
        container["ports"][1]["containerPort"].as_u64(),
        Some(u64::from(admin))
    );
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let app = TestApp::builder()
        .campaigns(&campaigns(1, 1))
        .setting("HOST", "127.0.0.1")
        .setting("ADMIN_PORT", free)
        .start()
        .await;
    let admin_url = |path: &str| format!("http://127.0.0.1:{free}{path}");
    for (probe, want) in [
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/livez"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(s(&get["path"]), want, "{probe}");
        assert_eq!(get["port"].as_u64(), Some(u64::from(admin)), "{probe} port");
        let r = app.http.get(admin_url(want)).send().await.expect("probe");
        assert_eq!(r.status(), 200, "{probe} answers 200 on a healthy service");
    }
    let ann = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(s(&ann["prometheus.io/path"]), "/metrics");
    assert_eq!(
        app.http
            .get(admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .status(),
        200
    );
    assert_eq!(s(&ann["prometheus.io/port"]), admin.to_string());

    // The other objects point at the Deployment.
    let svc = &m["Service"];
    assert_eq!(&svc["spec"]["selector"], labels);
    let targets: Vec<Option<u64>> = svc["spec"]["ports"]
        .as_sequence()
        .expect("service ports")
        .iter()
        .map(|p| p["targetPort"].as_u64())
        .collect();
    assert_eq!(
        targets,
        vec![Some(u64::from(port))],
        "the public Service exposes the main port only"
    );
    assert_eq!(
        &m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        labels
    );
    let hpa = &m["HorizontalPodAutoscaler"]["spec"];
    assert_eq!(s(&hpa["scaleTargetRef"]["name"]), name);
    assert_eq!(s(&hpa["scaleTargetRef"]["kind"]), "Deployment");
    let job = &m["Job"]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        job["args"]
            .as_sequence()
            .map(|a| a.iter().map(s).collect::<Vec<_>>()),
        Some(vec!["migrate"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_on_the_dashboard_is_exposed() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("deploy/grafana/ingest-dashboard.json").expect("dashboard"),
    )
    .expect("json");
    let app = TestApp::spawn(&campaigns(1, 1)).await;
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    let exposed: HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let mut checked = 0;
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("ingest_") {
                    assert!(
                        exposed.contains(word),
                        "dashboard queries {word}, which /metrics does not expose"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 15, "checked {checked} metric references");
}
