//! The systemd units and the daemons' side of `sd_notify(3)`.
//!
//! This machine runs no systemd as PID 1, so the service manager's end is played by a real unix datagram
//! socket named in `NOTIFY_SOCKET`, exactly as systemd hands it to a `Type=notify` service: the daemons must
//! say READY=1 when serving, WATCHDOG=1 at half `WATCHDOG_USEC`, RELOADING=1 then READY=1 around a SIGHUP
//! (a refused file included) and STOPPING=1 on SIGTERM. The unit files are checked by `systemd-analyze
//! verify`. Needs root (network namespaces).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fulcrum_tests::{require_root, workspace_bin, ChildGuard, Pki, Testbed};

const DIRECTOR_IP: &str = "10.0.0.2";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The service manager's end of `NOTIFY_SOCKET`: every datagram the daemon sends, in order.
struct ServiceManager {
    socket: UnixDatagram,
    path: PathBuf,
    heard: Vec<String>,
    _dir: tempfile::TempDir,
}

impl ServiceManager {
    fn new() -> Result<ServiceManager> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        Ok(ServiceManager { socket, path, heard: Vec::new(), _dir: dir })
    }

    /// Sets `NOTIFY_SOCKET` and a watchdog of `watchdog` on `command`, as systemd does for `Type=notify` with
    /// `WatchdogSec=`.
    fn supervise(&self, command: &mut Command, watchdog: Duration) {
        command.env("NOTIFY_SOCKET", &self.path).env("WATCHDOG_USEC", watchdog.as_micros().to_string());
    }

    /// Waits for the datagram `state` (each datagram is one or more `KEY=VALUE` lines); returns how many
    /// datagrams came before it since the last call. The deadline is a bound, not a pace: it returns as soon
    /// as the line arrives.
    fn expect(&mut self, state: &str, timeout: Duration, process: &mut ChildGuard) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{} never said {state:?} within {timeout:?}; it said {before:?}\n{}",
                    process.name(),
                    process.output_tails()
                );
            }
            self.socket.set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
            match self.socket.recv(&mut buffer) {
                Ok(n) => {
                    let datagram = String::from_utf8_lossy(&buffer[..n]).into_owned();
                    self.heard.push(datagram.clone());
                    if datagram.lines().any(|line| line == state) {
                        return Ok(before);
                    }
                    before.push(datagram);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if let Some(status) = process.try_wait()? {
                        bail!(
                            "{} exited with {status} before saying {state:?}\n{}",
                            process.name(),
                            process.output_tails()
                        );
                    }
                }
                Err(e) => return Err(e).context("reading the notify socket"),
            }
        }
    }
}

fn director_config(pki: &Pki, work: &Path, services: &str) -> String {
    format!(
        "name = \"d1\"\n\n[agents]\nlisten = \"{DIRECTOR_IP}:7946\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[control]\nsocket = \"{socket}\"\n\n[metrics]\nlisten = \"{DIRECTOR_IP}:9469\"\n{services}",
        ca = pki.path("ca.pem").display(),
        cert = pki.path("d1.pem").display(),
        key = pki.path("d1.key").display(),
        socket = work.join("director.sock").display(),
    )
}

const WEB: &str = "\n[[service]]\nvip = \"10.0.0.100\"\nport = 80\n\n[[service.server]]\naddress = \"10.0.0.11\"\n";

#[test]
fn unit_files_pass_systemd_analyze_verify() -> Result<()> {
    // `verify` also checks that every Exec command exists: point them at this build's binaries.
    let work = tempfile::tempdir()?;
    let bin_dir = workspace_bin("fulcrum-director").parent().context("binary directory")?.to_path_buf();
    let mut units = Vec::new();
    for unit in ["fulcrum-director.service", "fulcrum-agent.service"] {
        let text = std::fs::read_to_string(repo_file(&format!("systemd/{unit}")))?;
        for needed in ["Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes"] {
            assert!(text.contains(needed), "{unit} lacks {needed}");
        }
        let path = work.path().join(unit);
        std::fs::write(&path, text.replace("/usr/bin/", &format!("{}/", bin_dir.display())))?;
        units.push(path);
    }
    let director = std::fs::read_to_string(repo_file("systemd/fulcrum-director.service"))?;
    assert!(director.contains("\nCapabilityBoundingSet=CAP_NET_RAW CAP_NET_ADMIN\n"), "director capabilities");
    let agent = std::fs::read_to_string(repo_file("systemd/fulcrum-agent.service"))?;
    assert!(agent.contains("\nCapabilityBoundingSet=\n"), "the agent needs no capability");

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .context("running systemd-analyze (Debian package `systemd`; scripts/test.sh installs it)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {}\n{stderr}", out.status);
    Ok(())
}

#[test]
fn the_director_notifies_ready_feeds_the_watchdog_and_brackets_reloads() -> Result<()> {
    require_root();
    let bed = Testbed::new("sdnotify-d")?;
    let host = bed.add_host("dir1", &format!("{DIRECTOR_IP}/24"))?;
    let pki = Pki::new(&[("d1", DIRECTOR_IP.parse()?)], &[])?;
    let work = tempfile::tempdir()?;
    let config = work.path().join("director.toml");
    std::fs::write(&config, director_config(&pki, work.path(), WEB))?;

    let mut manager = ServiceManager::new()?;
    let mut command = Command::new(workspace_bin("fulcrum-director"));
    command.args(["run", "--config"]).arg(&config);
    manager.supervise(&mut command, Duration::from_millis(400));
    let mut director = host.spawn(command)?;

    manager.expect("READY=1", Duration::from_secs(15), &mut director)?;
    // READY=1 comes after the listeners are bound.
    assert!(host.udp_listening(7946)? && host.tcp_listening(9469)?, "READY=1 before the listeners");
    // WATCHDOG=1 every 200 ms (half of 400 ms): three in a row.
    for _ in 0..3 {
        let between = manager.expect("WATCHDOG=1", Duration::from_secs(2), &mut director)?;
        assert!(between.is_empty(), "unexpected notifications {between:?}");
    }

    // A good reload, then a refused one: both are bracketed by RELOADING=1 and READY=1.
    std::fs::write(&config, director_config(&pki, work.path(), &WEB.replace("10.0.0.11", "10.0.0.12")))?;
    director.signal("HUP")?;
    manager.expect("RELOADING=1", Duration::from_secs(5), &mut director)?;
    manager.expect("READY=1", Duration::from_secs(5), &mut director)?;
    director.wait_for_output("configuration reloaded", Duration::from_secs(5))?;
    std::fs::write(&config, "name = \"d1\"\nbogus = 1\n")?;
    director.signal("HUP")?;
    manager.expect("RELOADING=1", Duration::from_secs(5), &mut director)?;
    manager.expect("READY=1", Duration::from_secs(5), &mut director)?;
    director.wait_for_output("reload refused", Duration::from_secs(5))?;
    manager.expect("WATCHDOG=1", Duration::from_secs(2), &mut director)?;

    director.signal("TERM")?;
    manager.expect("STOPPING=1", Duration::from_secs(5), &mut director)?;
    let status = director.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "director exited with {status}");
    Ok(())
}

#[test]
fn the_agent_notifies_ready_feeds_the_watchdog_and_brackets_reloads() -> Result<()> {
    require_root();
    let bed = Testbed::new("sdnotify-a")?;
    let host = bed.add_host("web1", "10.0.0.11/24")?;
    let pki = Pki::new(&[("d1", DIRECTOR_IP.parse()?)], &["web1"])?;
    let work = tempfile::tempdir()?;
    let config = work.path().join("agent.toml");
    // No director is listening: the agent is ready anyway and keeps retrying in the background.
    let agent_config = |interval_ms: u32| {
        format!(
            "name = \"web1\"\nreal_server = \"10.0.0.11\"\nports = [80]\ninterval_ms = {interval_ms}\n\n[[director]]\nname = \"d1\"\naddress = \"{DIRECTOR_IP}:7946\"\n\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/web1.pem\"\nkey = \"{d}/web1.key\"\n",
            d = pki.dir().display()
        )
    };
    std::fs::write(&config, agent_config(500))?;

    let mut manager = ServiceManager::new()?;
    let mut command = Command::new(workspace_bin("fulcrum-agent"));
    command.arg("--config").arg(&config).arg("run");
    manager.supervise(&mut command, Duration::from_millis(400));
    let mut agent = host.spawn(command)?;

    manager.expect("READY=1", Duration::from_secs(15), &mut agent)?;
    for _ in 0..3 {
        let between = manager.expect("WATCHDOG=1", Duration::from_secs(2), &mut agent)?;
        assert!(between.is_empty(), "unexpected notifications {between:?}");
    }

    std::fs::write(&config, agent_config(1000))?;
    agent.signal("HUP")?;
    manager.expect("RELOADING=1", Duration::from_secs(5), &mut agent)?;
    manager.expect("READY=1", Duration::from_secs(10), &mut agent)?;
    agent.wait_for_output("configuration reloaded", Duration::from_secs(5))?;
    // The watchdog survives the restart of the run loop that a reload makes.
    manager.expect("WATCHDOG=1", Duration::from_secs(2), &mut agent)?;

    std::fs::write(&config, agent_config(10))?; // below the 50 ms floor: refused
    agent.signal("HUP")?;
    manager.expect("RELOADING=1", Duration::from_secs(5), &mut agent)?;
    manager.expect("READY=1", Duration::from_secs(5), &mut agent)?;
    agent.wait_for_output("configuration refused", Duration::from_secs(5))?;

    agent.signal("TERM")?;
    manager.expect("STOPPING=1", Duration::from_secs(10), &mut agent)?;
    let status = agent.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "agent exited with {status}");
    Ok(())
}
