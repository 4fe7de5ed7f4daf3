//! The shipped Grafana dashboard against real Prometheus (Debian package `prometheus`): a director pair and
//! two agents on the testbed, scraped with the shipped `grafana/prometheus.yml` (only the scrape interval
//! shortened), and EVERY panel query of `grafana/dashboards/fulcrum-overview.json` run through Prometheus's
//! HTTP API: each must parse, and return data unless its metric is in [`METRICS_NOT_YET_EXPORTED`].
//!
//! Needs root (network namespaces); fails loudly without it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use fulcrum_tests::{require_root, wait_until, workspace_bin, ChildGuard, Host, Pki, Testbed};
use serde_json::Value;

/// Metrics the dashboard shows that this test's lab cannot produce; their panels are listed rather than
/// failed. A metric listed here that IS exported fails the test, so the list cannot go stale. Empty: every
/// panel must return data.
const METRICS_NOT_YET_EXPORTED: &[&str] = &[];

const VIP: &str = "10.0.0.100";
const PROMETHEUS: &str = "10.0.0.5:9090";
const POLL: Duration = Duration::from_millis(200);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn promtool_accepts_the_shipped_scrape_config() -> Result<()> {
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(repo_file("grafana/prometheus.yml"))
        .output()
        .context("running promtool (Debian package `prometheus`; scripts/test.sh installs it)")?;
    assert!(
        out.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Every `fulcrum_…` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("fulcrum_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// (panel title, expression) for every target of every panel, with the dashboard's variables at "all".
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title =
                    format!("{} [{}]", panel["title"].as_str().unwrap_or("?"), target["refId"].as_str().unwrap_or("?"));
                queries.push((title, expr.replace("$director", ".*")));
            }
        }
    }
    queries
}

fn query(mon: &Host, expr: &str) -> Result<Value> {
    let out = mon.run(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-G",
        &format!("http://{PROMETHEUS}/api/v1/query"),
        "--data-urlencode",
        &format!("query={expr}"),
    ])?;
    let answer: Value = serde_json::from_str(&out).with_context(|| format!("Prometheus answered {out:?}"))?;
    Ok(answer)
}

/// A member of the director pair: forwarding (DR), heartbeats (`[ha]`), connection sync (`[sync]`) and HTTP
/// health checks, so that every metric family the dashboard reads is exported.
fn directors_config(pki: &Pki, work: &Path, name: &str, ip: &str, peer: &str, node_id: u32) -> Result<PathBuf> {
    let socket = work.join(format!("{name}.sock"));
    let (ha_key, sync_key) = (work.join("ha.key"), work.join("sync.key"));
    for (key, text) in
        [(&ha_key, "prometheus test pair heartbeat key 0123"), (&sync_key, "prometheus test sync key 0123456789")]
    {
        std::fs::write(key, text)?;
        std::fs::set_permissions(key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    let mut text = format!(
        "name = \"{name}\"\n\n[agents]\nlisten = \"{ip}:7946\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[control]\nsocket = \"{socket}\"\n\n[metrics]\nlisten = \"{ip}:9469\"\n\n[dataplane]\ninterface = \"eth0\"\nworkers = 1\nring_frames = 64\nconnection_capacity = 4096\n\n[ha]\nnode_id = {node_id}\npriority = {priority}\nkey_file = \"{ha_key}\"\ninit_hold_ms = 1000\n\n[[ha.path]]\nlocal = \"{ip}:7947\"\npeer = \"{peer}:7947\"\n\n[sync]\nlisten = \"{ip}:7950\"\npeer = \"{peer}:7950\"\nkey_file = \"{sync_key}\"\n",
        ca = pki.path("ca.pem").display(),
        cert = pki.path(&format!("{name}.pem")).display(),
        key = pki.path(&format!("{name}.key")).display(),
        socket = socket.display(),
        priority = 300 - 100 * node_id,
        ha_key = ha_key.display(),
        sync_key = sync_key.display(),
    );
    text.push_str(&format!(
        "\n[[service]]\nvip = \"{VIP}\"\nport = 80\nscheduler = \"rr\"\n\n[service.health]\nkind = \"http\"\ninterval_ms = 500\ntimeout_ms = 400\nslow_start_s = 0\n"
    ));
    for server in ["10.0.0.11", "10.0.0.12"] {
        text.push_str(&format!("\n[[service.server]]\naddress = \"{server}\"\nforward = \"dr\"\n"));
    }
    let path = work.join(format!("{name}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn spawn_director(host: &Host, config: &Path) -> Result<ChildGuard> {
    let mut command = Command::new(workspace_bin("fulcrum-director"));
    command.args(["run", "--config"]).arg(config);
    let mut process = host.spawn(command)?;
    process.wait_for_output("accepting agents", Duration::from_secs(15))?;
    Ok(process)
}

#[test]
fn every_dashboard_panel_query_parses_and_returns_data_from_real_prometheus() -> Result<()> {
    require_root();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file("grafana/dashboards/fulcrum-overview.json"))?)?;
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 20, "the dashboard has only {} queries", queries.len());

    // Every metric the dashboard uses is documented for users.
    let readme = std::fs::read_to_string(repo_file("README.md"))?;
    for (title, expr) in &queries {
        for name in metric_names(expr) {
            assert!(readme.contains(&format!("`{name}")), "{name} (panel {title}) is not in README.md's metric table");
        }
    }

    let bed = Testbed::new("prom")?;
    let d1 = bed.add_host("d1", "10.0.0.2/24")?;
    let d2 = bed.add_host("d2", "10.0.0.3/24")?;
    let mon = bed.add_host("mon", "10.0.0.5/24")?;
    let client = bed.add_host("client", "10.0.0.21/24")?;
    let pki = Pki::new(&[("d1", "10.0.0.2".parse()?), ("d2", "10.0.0.3".parse()?)], &["web1", "web2"])?;
    let work = tempfile::tempdir()?;

    let mut servers = Vec::new();
    for (name, ip) in [("web1", "10.0.0.11"), ("web2", "10.0.0.12")] {
        let host = bed.add_host(name, &format!("{ip}/24"))?;
        host.accept_vip_for_dr(VIP)?;
        let nginx = host.start_nginx(80)?;
        servers.push((host, nginx, name, ip));
    }
    // A pair: d1 (higher priority) becomes MASTER and forwards, d2 is its BACKUP receiving the sync stream.
    let _d1 = spawn_director(&d1, &directors_config(&pki, work.path(), "d1", "10.0.0.2", "10.0.0.3", 1)?)?;
    let _d2 = spawn_director(&d2, &directors_config(&pki, work.path(), "d2", "10.0.0.3", "10.0.0.2", 2)?)?;
    let mut agents = Vec::new();
    for (host, _, name, ip) in &servers {
        let config = work.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\nreal_server = \"{ip}\"\nports = [80]\ninterval_ms = 500\n\n[[director]]\nname = \"d1\"\naddress = \"10.0.0.2:7946\"\n\n[[director]]\nname = \"d2\"\naddress = \"10.0.0.3:7946\"\n\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{name}.pem\"\nkey = \"{d}/{name}.key\"\n\n[metrics]\nlisten = \"{ip}:9470\"\n",
                d = pki.dir().display()
            ),
        )?;
        let mut command = Command::new(workspace_bin("fulcrum-agent"));
        command.arg("--config").arg(&config);
        agents.push(host.spawn(command)?);
    }
    // Some traffic through the VIP, so the traffic panels have something to show.
    wait_until("the VIP answering", Duration::from_secs(20), POLL, || {
        Ok(client.curl(&format!("http://{VIP}/"), &["--max-time", "2"]).is_ok())
    })?;
    for _ in 0..20 {
        client.curl(&format!("http://{VIP}/"), &[])?;
    }

    // The shipped scrape config, verbatim but for a 1 s interval.
    let shipped = std::fs::read_to_string(repo_file("grafana/prometheus.yml"))?;
    assert!(shipped.contains("scrape_interval: 15s"), "the shipped config's interval changed; update this test");
    let config = work.path().join("prometheus.yml");
    std::fs::write(&config, shipped.replace("scrape_interval: 15s", "scrape_interval: 1s"))?;
    let mut command = Command::new("prometheus");
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", work.path().join("tsdb").display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"));
    let mut prometheus = mon.spawn(command)?;

    // All four targets (two directors, two agents) up, each scraped a few times (rates need two samples).
    wait_until("Prometheus scraping every target a few times", Duration::from_secs(60), POLL, || {
        if let Some(status) = prometheus.try_wait()? {
            return Err(fulcrum_tests::abort_wait(anyhow::anyhow!(
                "prometheus exited with {status}: {}",
                prometheus.output_tails()
            )));
        }
        let Ok(answer) = query(&mon, "min(count_over_time(up[1m])) >= 4 and count(up == 1) == 4") else {
            return Ok(false);
        };
        Ok(answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty()))
    })?;
    // The agents' reports have reached both directors (their series exist).
    wait_until("report series on both directors", Duration::from_secs(30), POLL, || {
        let answer = query(&mon, "count(fulcrum_server_report_age_seconds) == 4")?;
        Ok(answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty()))
    })?;

    let names = query(&mon, "group by (__name__) ({__name__=~\"fulcrum_.+\"})")?;
    let exported: BTreeSet<String> = names["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_string))
        .collect();
    let stale: Vec<_> = METRICS_NOT_YET_EXPORTED.iter().filter(|m| exported.contains(**m)).collect();
    assert!(stale.is_empty(), "{stale:?} are exported now: remove them from METRICS_NOT_YET_EXPORTED");

    let mut failures = Vec::new();
    let mut pending = Vec::new();
    for (title, expr) in &queries {
        let answer = query(&mon, expr)?;
        if answer["status"] != "success" {
            failures.push(format!("{title}: `{expr}` does not evaluate: {}", answer["error"]));
            continue;
        }
        if answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
            continue;
        }
        let missing: Vec<String> =
            metric_names(expr).into_iter().filter(|m| METRICS_NOT_YET_EXPORTED.contains(&m.as_str())).collect();
        if missing.is_empty() {
            failures.push(format!("{title}: `{expr}` returned no data"));
        } else {
            pending.push(format!("{title} (needs {})", missing.join(", ")));
        }
    }
    eprintln!("{} panel queries; {} lack data until these metrics are merged:", queries.len(), pending.len());
    for panel in &pending {
        eprintln!("  {panel}");
    }
    assert!(failures.is_empty(), "panel queries failed:\n{}", failures.join("\n"));
    Ok(())
}
