//! End-to-end: a director's QUIC agent listener and agents in separate network namespaces, probing real nginx.
//!
//! Needs root (network namespaces); fails loudly without it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fulcrum_protocol::stream::{read_frame, write_frame};
use fulcrum_protocol::{
    AgentMessage, DirectorMessage, Hello, RejectReason, VersionRange, HELLO_VERSION, PROTOCOL_VERSION,
};
use fulcrum_tests::{in_netns, require_root, wait_until, workspace_bin, ChildGuard, Host, Testbed};
use serde_json::Value;

const INTERVAL_MS: u64 = 500;
const AGENT_PORT: u16 = 7946;
const DIRECTOR_IP: &str = "10.0.0.2";
const POLL: Duration = Duration::from_millis(50);

/// A cluster CA and the certificates the tests use, made by `fulcrum-director certs`.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(agents: &[&str]) -> Result<Pki> {
        let dir = tempfile::tempdir()?;
        certs(&["ca", "--dir", path_str(dir.path())?])?;
        certs(&["issue", "--dir", path_str(dir.path())?, "--role", "director", "--name", "d1", "--ip", DIRECTOR_IP])?;
        for agent in agents {
            certs(&["issue", "--dir", path_str(dir.path())?, "--role", "agent", "--name", agent])?;
        }
        Ok(Pki { dir })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("non-UTF-8 temp path")
}

fn certs(args: &[&str]) -> Result<()> {
    let out = Command::new(workspace_bin("fulcrum-director")).arg("certs").args(args).output()?;
    if !out.status.success() {
        bail!("certs {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A director and its config in the `dir1` namespace.
struct Director {
    config: PathBuf,
    socket: PathBuf,
    process: Option<ChildGuard>,
}

impl Director {
    fn configure(work: &Path, pki: &Pki, servers: &[&str]) -> Result<(PathBuf, PathBuf)> {
        let socket = work.join("director.sock");
        let mut text = format!(
            "name = \"d1\"\n\n[agents]\nlisten = \"{DIRECTOR_IP}:{AGENT_PORT}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[control]\nsocket = \"{}\"\n\n[metrics]\nlisten = \"{DIRECTOR_IP}:9469\"\n\n[[service]]\nvip = \"10.0.0.100\"\nport = 80\n",
            pki.path("ca.pem").display(),
            pki.path("d1.pem").display(),
            pki.path("d1.key").display(),
            socket.display()
        );
        for server in servers {
            text.push_str(&format!("\n[[service.server]]\naddress = \"{server}\"\n"));
        }
        let config = work.join("director.toml");
        std::fs::write(&config, text)?;
        Ok((config, socket))
    }

    fn start(host: &Host, config: PathBuf, socket: PathBuf) -> Result<Director> {
        let mut command = Command::new(workspace_bin("fulcrum-director"));
        command.args(["run", "--config"]).arg(&config).env("RUST_LOG", "info");
        let process = host.spawn(command)?;
        let mut director = Director { config, socket, process: Some(process) };
        director.wait_ready(host)?;
        Ok(director)
    }

    fn wait_ready(&mut self, host: &Host) -> Result<()> {
        host.wait_udp_listening(AGENT_PORT, Duration::from_secs(10))?;
        let socket = self.socket.clone();
        let process = self.process.as_mut().context("director not running")?;
        wait_until("the director's control socket", Duration::from_secs(10), POLL, || {
            if !process.is_running()? {
                return Err(fulcrum_tests::abort_wait(anyhow::anyhow!("director exited: {}", process.output_tails())));
            }
            Ok(fulcrumctl_agents(&socket).is_ok())
        })
    }

    fn restart(&mut self, host: &Host) -> Result<()> {
        if let Some(mut old) = self.process.take() {
            let status = old.terminate(Duration::from_secs(10))?;
            assert!(status.success(), "director exited with {status} on SIGTERM: {}", old.output_tails());
        }
        let restarted = Director::start(host, self.config.clone(), self.socket.clone())?;
        *self = restarted;
        Ok(())
    }

    fn agents(&self) -> Result<Vec<Value>> {
        fulcrumctl_agents(&self.socket)
    }

    fn agent(&self, server: &str) -> Result<Option<Value>> {
        Ok(self.agents()?.into_iter().find(|a| a["real_server"] == server))
    }
}

fn fulcrumctl_agents(socket: &Path) -> Result<Vec<Value>> {
    let out =
        Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(socket).args(["agents", "--json"]).output()?;
    if !out.status.success() {
        bail!("fulcrumctl agents: {}", String::from_utf8_lossy(&out.stderr));
    }
    let agents: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    Ok(agents)
}

/// Starts an agent from a config file; `extra` flags override it.
fn start_agent(
    host: &Host,
    work: &Path,
    pki_dir: &Path,
    name: &str,
    probe: &str,
    extra: &[&str],
) -> Result<ChildGuard> {
    let config = work.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "name = \"{name}\"\nreal_server = \"{ip}\"\nports = [80]\ninterval_ms = {INTERVAL_MS}\n\n[[director]]\nname = \"d1\"\naddress = \"{DIRECTOR_IP}:{AGENT_PORT}\"\n\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{name}.pem\"\nkey = \"{d}/{name}.key\"\n\n[probe]\nkind = \"{probe}\"\npath = \"/health\"\n\n[metrics]\nlisten = \"{ip}:9470\"\n",
            ip = host.ip(),
            d = pki_dir.display(),
        ),
    )?;
    let mut command = Command::new(workspace_bin("fulcrum-agent"));
    command.arg("--config").arg(&config).args(extra).env("RUST_LOG", "info");
    let check = host.run(&[
        workspace_bin("fulcrum-agent").to_str().context("bin path")?,
        "check-config",
        "--config",
        path_str(&config)?,
    ])?;
    assert!(check.contains("configuration ok"), "{check}");
    host.spawn(command)
}

fn report_count(agent: &Value) -> u64 {
    agent["reports"].as_u64().unwrap_or(0)
}

/// The scraped value of one metric series, if present.
fn metric(host: &Host, series: &str) -> Result<Option<f64>> {
    let text = host.curl(&format!("http://{DIRECTOR_IP}:9469/metrics"), &[])?;
    Ok(fulcrum_tests::metric_sum(&text, series))
}

#[test]
fn agents_report_within_two_intervals_and_reconnect_after_a_director_restart() -> Result<()> {
    require_root();
    let bed = Testbed::new("agents")?;
    let dir1 = bed.add_host("dir1", &format!("{DIRECTOR_IP}/24"))?;
    let web1 = bed.add_host("web1", "10.0.0.11/24")?;
    let web2 = bed.add_host("web2", "10.0.0.12/24")?;
    let pki = Pki::new(&["web1", "web2"])?;
    let work = tempfile::tempdir()?;
    let (config, socket) = Director::configure(work.path(), &pki, &["10.0.0.11", "10.0.0.12"])?;
    let mut director = Director::start(&dir1, config, socket)?;
    let _nginx1 = web1.start_nginx(80)?;
    let _nginx2 = web2.start_nginx(80)?;

    let _agent1 = start_agent(&web1, work.path(), pki.dir.path(), "web1", "http", &[])?;
    // web2 overrides the file's probe kind with a flag.
    let mut agent2 = start_agent(&web2, work.path(), pki.dir.path(), "web2", "http", &["--probe-kind", "tcp"])?;

    // Both agents connected and reporting (a second report is needed for a CPU delta).
    let agents = wait_until("reports from both agents", Duration::from_secs(15), POLL, || {
        let agents = director.agents()?;
        let ready = agents.len() == 2
            && agents
                .iter()
                .all(|a| a["connected"] == true && report_count(a) >= 2 && !a["last_report"]["cpu"].is_null());
        Ok(ready.then_some(agents))
    })?;
    for agent in &agents {
        let age = agent["report_age_ms"].as_u64().context("report age")?;
        assert!(
            age <= 2 * INTERVAL_MS,
            "the newest report of {} is {age} ms old: more than two intervals",
            agent["agent_name"]
        );
        let report = &agent["last_report"];
        assert_eq!(report["cpu"]["source"], "ProcStat");
        assert!(report["cpu"]["busy_bp"].as_u64().context("cpu")? <= 10_000);
        assert!(report["memory"]["total_bytes"].as_u64().context("memory")? > 0);
        assert!(report["probe"]["smoothed_us"].as_u64().is_some(), "a smoothed response time: {report}");
        assert_eq!(agent["protocol_version"], PROTOCOL_VERSION);
    }
    let web1_view = director.agent("10.0.0.11")?.context("web1 listed")?;
    assert_eq!(web1_view["agent_name"], "web1");
    assert_eq!(web1_view["last_report"]["probe"]["kind"], "Http");
    assert_eq!(web1_view["last_report"]["probe"]["last"]["Ok"]["http_status"], 200, "{web1_view}");
    let web2_view = director.agent("10.0.0.12")?.context("web2 listed")?;
    assert_eq!(web2_view["last_report"]["probe"]["kind"], "Tcp");
    assert!(web2_view["last_report"]["probe"]["last"]["Ok"]["connect_us"].is_u64(), "{web2_view}");

    // The same values are metrics, and the table is readable.
    let cpu = metric(&dir1, "fulcrum_server_cpu_ratio{server=\"10.0.0.11\"}")?.context("cpu metric")?;
    assert!((0.0..=1.0).contains(&cpu));
    assert!(metric(&dir1, "fulcrum_server_report_age_seconds{server=\"10.0.0.12\"}")?.is_some());
    let table =
        Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(&director.socket).arg("agents").output()?;
    let table = String::from_utf8(table.stdout)?;
    assert!(table.starts_with("RealServer") && table.contains("web1") && table.contains("web2"), "{table}");

    // The agent's own endpoint counts what it sent.
    let agent_metrics = web1.curl("http://10.0.0.11:9470/metrics", &[])?;
    assert!(agent_metrics.contains("fulcrum_agent_reports_sent_total{director=\"d1\"}"), "{agent_metrics}");

    // Restart the director: its registry starts empty and both agents come back by themselves.
    director.restart(&dir1)?;
    wait_until("both agents reconnected to the restarted director", Duration::from_secs(30), POLL, || {
        let agents = director.agents()?;
        Ok(agents.len() == 2 && agents.iter().all(|a| a["connected"] == true && report_count(a) >= 1))
    })?;
    let reconnects = web1.curl("http://10.0.0.11:9470/metrics", &[])?;
    assert!(reconnects.contains("fulcrum_agent_reconnects_total{director=\"d1\"}"), "{reconnects}");

    // SIGTERM: the agent says goodbye and exits cleanly.
    let status = agent2.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "agent exited with {status}: {}", agent2.output_tails());
    let web2_view = wait_until("web2 marked disconnected", Duration::from_secs(10), POLL, || {
        Ok(director.agent("10.0.0.12")?.filter(|a| a["connected"] == false))
    })?;
    assert_eq!(web2_view["disconnect_reason"], "goodbye", "{web2_view}");
    assert!(agent2.stderr().contains("said goodbye"), "{}", agent2.output_tails());
    // web1 is unaffected.
    let before = report_count(&director.agent("10.0.0.11")?.context("web1")?);
    wait_until("web1 still reporting", Duration::from_secs(5), POLL, || {
        Ok(report_count(&director.agent("10.0.0.11")?.context("web1")?) > before)
    })?;
    Ok(())
}

#[test]
fn a_foreign_ca_a_false_name_an_unknown_server_and_garbage_are_refused_without_disturbing_others() -> Result<()> {
    require_root();
    let bed = Testbed::new("agentsbad")?;
    let dir1 = bed.add_host("dir1", &format!("{DIRECTOR_IP}/24"))?;
    let web1 = bed.add_host("web1", "10.0.0.11/24")?;
    let rogue = bed.add_host("rogue", "10.0.0.13/24")?;
    let raw = bed.add_host("raw", "10.0.0.14/24")?;
    let pki = Pki::new(&["web1", "raw"])?;
    // Another cluster's CA, issuing a certificate with a name this cluster would accept.
    let foreign = Pki::new(&["rogue"])?;
    let work = tempfile::tempdir()?;
    let (config, socket) = Director::configure(work.path(), &pki, &["10.0.0.11", "10.0.0.13", "10.0.0.14"])?;
    let director = Director::start(&dir1, config, socket)?;
    let _nginx = web1.start_nginx(80)?;
    let _agent1 = start_agent(&web1, work.path(), pki.dir.path(), "web1", "tcp", &[])?;
    wait_until("web1 reporting", Duration::from_secs(15), POLL, || {
        Ok(director.agent("10.0.0.11")?.is_some_and(|a| report_count(&a) >= 1))
    })?;

    // An agent whose certificate comes from another CA fails the TLS handshake.
    let rogue_agent = start_agent(&rogue, work.path(), foreign.dir.path(), "rogue", "tcp", &[])?;
    wait_until("the foreign-CA agent refused", Duration::from_secs(15), POLL, || {
        Ok(metric(&dir1, "fulcrum_agent_rejections_total{reason=\"handshake\"}")?.is_some_and(|n| n >= 1.0))
    })?;
    assert!(director.agent("10.0.0.13")?.is_none(), "the foreign agent must never be registered");
    drop(rogue_agent);

    // A raw client with a valid certificate for "raw" tries its luck.
    let ca = pki.path("ca.pem");
    let cert = pki.path("raw.pem");
    let key = pki.path("raw.key");
    let director_addr: SocketAddr = format!("{DIRECTOR_IP}:{AGENT_PORT}").parse()?;
    let outcomes = in_netns(raw.netns(), move || -> Result<Vec<String>> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async move {
            let tls = fulcrum_agent::transport::TlsFiles::read(&ca, &cert, &key)?;
            let client = fulcrum_agent::transport::client_config(&tls)?;
            let mut outcomes = Vec::new();
            // The name in the Hello is not the certificate's.
            outcomes.push(hello_outcome(&client, director_addr, hello("web1", "10.0.0.14"), None).await?);
            // The certificate's name, but a real server the director does not have.
            outcomes.push(hello_outcome(&client, director_addr, hello("raw", "10.0.0.99"), None).await?);
            // A proper Hello, then garbage where a report should be.
            outcomes.push(
                hello_outcome(&client, director_addr, hello("raw", "10.0.0.14"), Some(b"GET / HTTP/1.1\r\n\r\n"))
                    .await?,
            );
            // Garbage instead of a Hello.
            outcomes.push(garbage_first(&client, director_addr).await?);
            Ok(outcomes)
        })
    })?;
    assert_eq!(outcomes[0], format!("{:?}", RejectReason::NameMismatch));
    assert_eq!(outcomes[1], format!("{:?}", RejectReason::UnknownRealServer));
    assert!(outcomes[2].starts_with("closed with code 2"), "{}", outcomes[2]);
    assert!(outcomes[2].contains("bad frame magic"), "{}", outcomes[2]);
    assert!(outcomes[3].starts_with("closed with code 2"), "{}", outcomes[3]);

    // Only those connections were closed: web1 is still connected and reporting.
    let before = report_count(&director.agent("10.0.0.11")?.context("web1")?);
    wait_until("web1 still reporting after the garbage", Duration::from_secs(5), POLL, || {
        let web1 = director.agent("10.0.0.11")?.context("web1")?;
        Ok(web1["connected"] == true && report_count(&web1) > before)
    })?;
    let raw_view = director.agent("10.0.0.14")?.context("the raw client was welcomed once")?;
    assert_eq!(raw_view["connected"], false);
    assert!(raw_view["disconnect_reason"].as_str().is_some_and(|r| r.starts_with("protocol error")), "{raw_view}");
    for reason in ["name_mismatch", "unknown_real_server", "malformed_frame"] {
        let series = format!("fulcrum_agent_rejections_total{{reason=\"{reason}\"}}");
        assert!(metric(&dir1, &series)?.is_some_and(|n| n >= 1.0), "{series} counted");
    }
    Ok(())
}

fn hello(name: &str, server: &str) -> Hello {
    Hello {
        agent_name: name.into(),
        versions: VersionRange::SUPPORTED,
        real_server: server.parse().expect("test address"),
        ports: vec![80],
        software: "raw-test".into(),
    }
}

async fn connect(client: &quinn::ClientConfig, director: SocketAddr) -> Result<quinn::Connection> {
    let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    endpoint.set_default_client_config(client.clone());
    Ok(endpoint.connect(director, "d1")?.await?)
}

fn close_description(error: quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            format!("closed with code {}: {}", close.error_code, String::from_utf8_lossy(&close.reason))
        }
        other => format!("{other}"),
    }
}

/// Sends `hello`, then `then` if given; returns the Reject reason, or how the connection was closed.
async fn hello_outcome(
    client: &quinn::ClientConfig,
    director: SocketAddr,
    hello: Hello,
    then: Option<&[u8]>,
) -> Result<String> {
    let connection = connect(client, director).await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let mut buf = Vec::new();
    write_frame(&mut send, HELLO_VERSION, &AgentMessage::Hello(hello), &mut buf).await?;
    match read_frame::<DirectorMessage, _>(&mut recv, &mut buf).await?.map(|f| f.message) {
        Some(DirectorMessage::Reject(reject)) => return Ok(format!("{:?}", reject.reason)),
        Some(DirectorMessage::Welcome(_)) => {}
        other => bail!("unexpected answer {other:?}"),
    }
    let garbage = then.context("welcomed, but no garbage to send")?;
    send.write_all(garbage).await?;
    Ok(close_description(connection.closed().await))
}

async fn garbage_first(client: &quinn::ClientConfig, director: SocketAddr) -> Result<String> {
    let connection = connect(client, director).await?;
    let (mut send, _recv) = connection.open_bi().await?;
    send.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]).await?;
    Ok(close_description(connection.closed().await))
}

#[test]
fn sighup_applies_a_good_config_and_refuses_a_bad_one_without_stopping() -> Result<()> {
    require_root();
    let bed = Testbed::new("agentshup")?;
    let dir1 = bed.add_host("dir1", &format!("{DIRECTOR_IP}/24"))?;
    let web1 = bed.add_host("web1", "10.0.0.11/24")?;
    let pki = Pki::new(&["web1"])?;
    let work = tempfile::tempdir()?;
    let (config, socket) = Director::configure(work.path(), &pki, &["10.0.0.11"])?;
    let director = Director::start(&dir1, config, socket)?;
    let _nginx = web1.start_nginx(80)?;
    let mut agent = start_agent(&web1, work.path(), pki.dir.path(), "web1", "tcp", &[])?;
    wait_until("web1 reporting", Duration::from_secs(15), POLL, || {
        Ok(director.agent("10.0.0.11")?.is_some_and(|a| report_count(&a) >= 1))
    })?;
    let agent_config = work.path().join("web1.toml");
    let original = std::fs::read_to_string(&agent_config)?;

    // A valid change: the agent says goodbye, reconnects and reports at the new interval.
    std::fs::write(&agent_config, original.replace(&format!("interval_ms = {INTERVAL_MS}"), "interval_ms = 250"))?;
    agent.signal("HUP")?;
    let view = wait_until("web1 reconnected with the new config", Duration::from_secs(15), POLL, || {
        Ok(director
            .agent("10.0.0.11")?
            .filter(|a| a["connections"] == 2 && a["connected"] == true && report_count(a) >= 1))
    })?;
    wait_until("a report of the new interval", Duration::from_secs(10), POLL, || {
        Ok(director.agent("10.0.0.11")?.is_some_and(|a| a["last_report"]["interval_ms"] == 250))
    })?;
    assert!(agent.is_running()?, "{view}");

    // A bad change: refused, logged, and the agent keeps reporting on the running config.
    std::fs::write(&agent_config, original.replace("interval_ms", "intervall_ms"))?;
    agent.signal("HUP")?;
    agent.wait_for_output("configuration refused", Duration::from_secs(10))?;
    assert!(agent.stderr().contains("intervall_ms"), "the refusal names the key: {}", agent.output_tails());
    let before = report_count(&director.agent("10.0.0.11")?.context("web1")?);
    wait_until("web1 still reporting", Duration::from_secs(10), POLL, || {
        let web1 = director.agent("10.0.0.11")?.context("web1")?;
        Ok(web1["connections"] == 2 && report_count(&web1) > before)
    })?;

    // A configuration that parses but cannot run (its cgroup does not exist) is refused the same way, before
    // the goodbyes, rather than ending the agent.
    let running = original.replace(&format!("interval_ms = {INTERVAL_MS}"), "interval_ms = 250");
    let no_cgroup = format!("{running}\n[cpu]\nsource = \"cgroup\"\ncgroup = \"fulcrum-no-such-cgroup\"\n");
    std::fs::write(&agent_config, no_cgroup)?;
    agent.signal("HUP")?;
    agent.wait_for_output("locating the cgroup", Duration::from_secs(10))?;
    let before = report_count(&director.agent("10.0.0.11")?.context("web1")?);
    wait_until("web1 reporting on the running config", Duration::from_secs(10), POLL, || {
        let web1 = director.agent("10.0.0.11")?.context("web1")?;
        Ok(web1["connections"] == 2 && report_count(&web1) > before)
    })?;
    assert!(agent.is_running()?, "{}", agent.output_tails());

    // A certificate renewed in place changes no path in the configuration; a SIGHUP still loads it.
    std::fs::write(&agent_config, &running)?;
    let cert = pki.dir.path().join("web1.pem");
    let mut renewed = std::fs::read_to_string(&cert)?;
    renewed.push('\n');
    std::fs::write(&cert, renewed)?;
    agent.signal("HUP")?;
    agent.wait_for_output("the TLS files changed", Duration::from_secs(10))?;
    wait_until("web1 reconnected with the renewed certificate", Duration::from_secs(15), POLL, || {
        Ok(director.agent("10.0.0.11")?.is_some_and(|a| a["connections"] == 3 && a["connected"] == true))
    })?;
    Ok(())
}
