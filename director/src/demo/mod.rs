//! `fulcrum-director demo`: a throw-away playground of network namespaces on this machine — two directors,
//! three real servers of unequal capacity with their agents, and a client generating load — with a live
//! table of what the directors see. Half-way it kills the active director (SIGKILL) and shows the takeover
//! and the outage the client measured. Everything is torn down at the end, on Ctrl-C, on SIGTERM and on a
//! panic ([`netns::Playground`]'s `Drop`).
//!
//! Topology (one LAN, 10.0.0.0/24, a bridge in its own namespace; direct routing):
//!
//! ```text
//!   client 10.0.0.21 ── br0 ── d1 10.0.0.2, d2 10.0.0.3 (VIP 10.0.0.100:80, answered from userspace)
//!                        └──── rs1 10.0.0.11, rs2 .12, rs3 .13 (VIP on lo; demo HTTP server + fulcrum-agent)
//! ```

pub mod http;
pub mod netns;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::certs::{self, Role};
use crate::control::{call, Request, Response};
use crate::control_plane::ServiceView;
use crate::ha::runtime::{HaCommand, HaView};
use crate::ha::State;
use http::{Capacity, Load, LoadStats};
use netns::Playground;

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP_PORT: u16 = 80;
const CLIENT_CIDR: &str = "10.0.0.21/24";
const AGENT_PORT: u16 = 7946;
const METRICS_PORT: u16 = 9469;
const HEARTBEAT_PORT: u16 = 7947;
const SYNC_PORT: u16 = 7950;
/// Configured weight of every real server: equal, so that what differs is what the directors learn.
const WEIGHT: u32 = 100;
/// How long setup steps (a director starting, ARP resolution, the first answer) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A real server of the demo.
#[derive(Debug, Clone, Copy)]
struct RealServer {
    name: &'static str,
    ip: Ipv4Addr,
    capacity: Capacity,
}

/// Unequal capacities, 40, 80 and 160 requests/s: the same service time, so that an idle server of each kind
/// answers as fast, but 1, 2 and 4 requests at a time. What tells them apart is how they cope with load.
const REAL_SERVERS: [RealServer; 3] = [
    RealServer {
        name: "rs1",
        ip: Ipv4Addr::new(10, 0, 0, 11),
        capacity: Capacity { service_time: Duration::from_millis(25), concurrency: 1 },
    },
    RealServer {
        name: "rs2",
        ip: Ipv4Addr::new(10, 0, 0, 12),
        capacity: Capacity { service_time: Duration::from_millis(25), concurrency: 2 },
    },
    RealServer {
        name: "rs3",
        ip: Ipv4Addr::new(10, 0, 0, 13),
        capacity: Capacity { service_time: Duration::from_millis(25), concurrency: 4 },
    },
];

/// The two directors: name, address, HA node id and priority (d1 is preferred, so it starts as MASTER).
const DIRECTORS: [(&str, Ipv4Addr, u32, u32); 2] =
    [("d1", Ipv4Addr::new(10, 0, 0, 2), 1, 200), ("d2", Ipv4Addr::new(10, 0, 0, 3), 2, 100)];

/// `fulcrum-director demo` options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long the load runs; the active director is killed half-way.
    pub seconds: u64,
    /// Requests per second the client aims at (the servers together serve 280).
    pub rate: u32,
    /// Concurrent client connections.
    pub clients: u32,
}

/// How a demo run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Interrupted,
}

/// Runs the demo; the playground is gone when this returns (or unwinds).
pub fn run(options: &DemoOptions) -> Result<Outcome> {
    if options.seconds < 6 {
        bail!(
            "--seconds {}: the demo needs at least 6 seconds (half before the failover, half after)",
            options.seconds
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run_async(options))
}

/// One director of the playground.
#[derive(Debug)]
struct Director {
    name: &'static str,
    ip: Ipv4Addr,
    node_id: u32,
    priority: u32,
    peer: Ipv4Addr,
    netns: String,
    config: PathBuf,
    socket: PathBuf,
    /// Index in the playground's processes, once started.
    process: Option<usize>,
    killed: bool,
}

impl Director {
    fn metrics_url(&self) -> String {
        format!("http://{}:{METRICS_PORT}/metrics", self.ip)
    }
}

/// Set when SIGINT or SIGTERM arrives; every wait checks it.
#[derive(Clone, Default)]
struct Interrupt {
    flag: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Interrupt {
    fn install() -> Result<Interrupt> {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = Interrupt::default();
        let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let set = interrupt.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
            }
            set.flag.store(true, Ordering::SeqCst);
            set.notify.notify_waiters();
        });
        Ok(interrupt)
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// How often waits poll.
const POLL: Duration = Duration::from_millis(10);

/// Polls `check` every [`POLL`] until it returns true, failing after `timeout` or on an interrupt.
async fn wait_for(
    what: &str,
    timeout: Duration,
    interrupt: &Interrupt,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if interrupt.is_set() {
            return Ok(false);
        }
        if check()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn run_async(options: &DemoOptions) -> Result<Outcome> {
    let interrupt = Interrupt::install()?;
    let exe = std::env::current_exe().context("locating the fulcrum-director executable")?;
    let agent = exe.with_file_name("fulcrum-agent");
    if !agent.is_file() {
        bail!(
            "{} not found next to {}: build it with `cargo build --workspace --bins`",
            agent.display(),
            exe.display()
        );
    }

    println!("== building the playground (network namespaces fdemo{}-*)", std::process::id());
    let mut playground = Playground::new()?;
    let work = playground.work().to_path_buf();
    let client_ns = playground.add_host("client", CLIENT_CIDR)?;
    let mut directors = Vec::new();
    for (i, (name, ip, node_id, priority)) in DIRECTORS.into_iter().enumerate() {
        let netns = playground.add_host(name, &format!("{ip}/24"))?;
        let (config, socket) = (work.join(format!("{name}.toml")), work.join(format!("{name}.sock")));
        let peer = DIRECTORS[1 - i].1;
        directors.push(Director {
            name,
            ip,
            node_id,
            priority,
            peer,
            netns,
            config,
            socket,
            process: None,
            killed: false,
        });
    }
    write_key(&work.join("ha.key"))?;
    write_key(&work.join("sync.key"))?;
    let pki = work.join("pki");
    certs::create_ca(&pki, "Fulcrum demo CA", 2, false)?;
    for director in &directors {
        certs::issue(&pki, Role::Director, director.name, &[], 2, false)?;
    }
    for server in REAL_SERVERS {
        let netns = playground.add_host(server.name, &format!("{}/24", server.ip))?;
        playground.make_dr_real_server(&netns, VIP)?;
        certs::issue(&pki, Role::Agent, server.name, &[], 2, false)?;
        let capacity = server.capacity;
        let (service_time, concurrency) =
            (capacity.service_time.as_millis().to_string(), capacity.concurrency.to_string());
        let args = [
            "demo-server",
            "--listen",
            "0.0.0.0:80",
            "--name",
            server.name,
            "--service-time-ms",
            &service_time,
            "--concurrency",
            &concurrency,
        ];
        playground.spawn(&format!("{}-http", server.name), &netns, &exe, &args)?;
        let config = work.join(format!("{}-agent.toml", server.name));
        std::fs::write(&config, agent_config(server.name, server.ip, &pki))
            .with_context(|| format!("writing {}", config.display()))?;
    }
    for director in &directors {
        std::fs::write(&director.config, director_config(director, &pki, &work))
            .with_context(|| format!("writing {}", director.config.display()))?;
    }

    println!("== starting the director pair d1 (priority 200) and d2 (100), then the agents");
    for director in directors.iter_mut() {
        if !start_director(&mut playground, &exe, director, &interrupt).await? {
            return Ok(interrupted());
        }
    }
    let mut master = None;
    let elected = wait_for("the pair to elect a MASTER", SETUP_TIMEOUT, &interrupt, || {
        let states: Vec<Option<State>> =
            directors.iter().map(|d| ha_blocking(&d.socket).ok().map(|view| view.status.state)).collect();
        master = states.iter().position(|state| *state == Some(State::Master));
        Ok(master.is_some() && states.iter().all(|s| matches!(s, Some(State::Master | State::Backup))))
    })
    .await?;
    if !elected {
        return Ok(interrupted());
    }
    let active = master.context("no MASTER")?;
    println!("== {} is MASTER, {} BACKUP", directors[active].name, directors[1 - active].name);
    for server in REAL_SERVERS {
        let config = work.join(format!("{}-agent.toml", server.name));
        let config = config.to_str().context("the work directory's path is not UTF-8")?;
        playground.spawn(
            &format!("{}-agent", server.name),
            &playground.netns(server.name),
            &agent,
            &["--config", config],
        )?;
    }
    let resolved = wait_for("the MASTER to resolve every real server's MAC address", SETUP_TIMEOUT, &interrupt, || {
        Ok(list_blocking(&directors[active].socket)
            .map(|services| services.iter().all(|s| s.servers.iter().all(|server| server.mac.is_some())))
            .unwrap_or(false))
    })
    .await?;
    if !resolved {
        return Ok(interrupted());
    }

    // Load only once every server is checked healthy, so that no request meets an empty pool.
    let healthy = wait_for("the MASTER's health checks to pass", SETUP_TIMEOUT, &interrupt, || {
        Ok(list_blocking(&directors[active].socket)
            .map(|services| services.iter().all(|s| s.servers.iter().all(|server| server.health != "down")))
            .unwrap_or(false))
    })
    .await?;
    if !healthy {
        return Ok(interrupted());
    }
    let load = Load {
        target: SocketAddr::from((VIP, VIP_PORT)),
        clients: options.clients,
        rate: options.rate,
        stats: Arc::new(Mutex::new(LoadStats::default())),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let load_thread = http::spawn_in_netns(&client_ns, {
        let load = load.clone();
        move || load.run()
    })?;
    // Stops the load however this function ends, before the playground goes.
    let _stop_load = StopLoad { stop: Arc::clone(&load.stop), thread: Some(load_thread) };
    let answering =
        wait_for("the first answer through the VIP", SETUP_TIMEOUT, &interrupt, || Ok(load.stats().succeeded > 0))
            .await?;
    if !answering {
        return Ok(interrupted());
    }

    println!(
        "== load: {} req/s from {} clients to {VIP}:{VIP_PORT} for {} s; the MASTER is killed at {} s",
        options.rate,
        options.clients,
        options.seconds,
        options.seconds / 2
    );
    for director in &directors {
        println!(
            "   {} metrics: ip netns exec {} curl -s {}   control: fulcrumctl --socket {} list",
            director.name,
            director.netns,
            director.metrics_url(),
            director.socket.display()
        );
    }

    let start = Instant::now();
    let kill_at = start + Duration::from_secs(options.seconds / 2);
    let end = start + Duration::from_secs(options.seconds);
    let mut killed_at: Option<Instant> = None;
    let mut takeover_reported = false;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = interrupt.notify.notified() => {}
        }
        if interrupt.is_set() {
            return Ok(interrupted());
        }
        let now = Instant::now();
        if killed_at.is_none() && now >= kill_at {
            // The MASTER now (it may have changed, e.g. after a heartbeat loss on a very busy machine).
            let active = directors
                .iter()
                .position(|d| ha_blocking(&d.socket).is_ok_and(|view| view.status.state == State::Master))
                .unwrap_or(active);
            let index = directors[active].process.context("the active director has no process")?;
            let pid = playground.process(index).child.id();
            playground.process(index).child.kill().context("killing the active director")?;
            let _ = playground.process(index).child.wait();
            directors[active].killed = true;
            load.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).mark(now);
            killed_at = Some(now);
            println!(
                "\n== t={}s: kill -9 {} (pid {pid}), the MASTER",
                now.duration_since(start).as_secs(),
                directors[active].name
            );
            let survivor = &directors[1 - active];
            let promoted = wait_for(&format!("{} to become MASTER", survivor.name), SETUP_TIMEOUT, &interrupt, || {
                Ok(ha_blocking(&survivor.socket).is_ok_and(|view| view.status.state == State::Master))
            })
            .await?;
            if !promoted {
                return Ok(interrupted());
            }
            println!(
                "== {} is MASTER {} ms after the kill (its peer's heartbeats stopped; seen on its control socket)",
                survivor.name,
                now.elapsed().as_millis()
            );
        }
        for (i, director) in directors.iter().enumerate() {
            if let (Some(index), false) = (director.process, director.killed) {
                playground.check_running(index).with_context(|| format!("director {} (#{i})", director.name))?;
            }
        }
        let stats = load.stats();
        let views = directors_views(&directors).await;
        print!("{}", render(now.duration_since(start), &stats, &views, &directors));
        if let (Some(at), Some(back), Some(outage), false) =
            (killed_at, stats.first_success_after_mark, stats.outage_after_mark, takeover_reported)
        {
            takeover_reported = true;
            println!(
                "== takeover: outage {} ms (from the kill to the first answer to a request sent after it); longest \
                 gap between any two answers {} ms (answers already under way come straight from the servers)",
                back.duration_since(at).as_millis(),
                outage.as_millis()
            );
        }
        if now >= end {
            break;
        }
    }
    let stats = load.stats();
    let Some(at) = killed_at else { bail!("the run ended before the failover") };
    let (Some(outage), Some(back)) = (stats.outage_after_mark, stats.first_success_after_mark) else {
        bail!(
            "no takeover: the client got no answer in the {:.1} s after the active director was killed",
            Instant::now().duration_since(at).as_secs_f64()
        );
    };
    println!(
        "== done: {} requests answered, {} failed; failover outage {} ms (longest gap between answers {} ms at \
         the failover, {} ms since); tearing the playground down",
        stats.succeeded,
        stats.failed,
        back.duration_since(at).as_millis(),
        outage.as_millis(),
        stats.gaps.longest(Instant::now()).as_millis()
    );
    Ok(Outcome::Finished)
}

fn interrupted() -> Outcome {
    println!("\n== interrupted: tearing the playground down");
    Outcome::Interrupted
}

/// Stops the load generator and joins its thread when dropped.
struct StopLoad {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Drop for StopLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("demo: the load generator failed: {e:#}"),
                Err(_) => eprintln!("demo: the load generator panicked"),
            }
        }
    }
}

/// Starts a director and waits until its control socket answers; false when interrupted.
async fn start_director(
    playground: &mut Playground,
    exe: &Path,
    director: &mut Director,
    interrupt: &Interrupt,
) -> Result<bool> {
    let config = director.config.to_str().context("the work directory's path is not UTF-8")?;
    let index = playground.spawn(director.name, &director.netns, exe, &["run", "--config", config])?;
    director.process = Some(index);
    let socket = director.socket.clone();
    let name = director.name;
    wait_for(&format!("director {name}'s control socket"), SETUP_TIMEOUT, interrupt, || {
        playground.check_running(index)?;
        Ok(list_blocking(&socket).is_ok())
    })
    .await
}

/// `fulcrumctl list` from a synchronous check (a short-lived runtime on this thread is not allowed inside the
/// demo's runtime, so the socket is spoken to with std).
fn list_blocking(socket: &Path) -> Result<Vec<ServiceView>> {
    match ask_blocking(socket, &Request::List)? {
        Response::Services { services } => Ok(services),
        other => bail!("unexpected answer {other:?}"),
    }
}

fn ask_blocking(socket: &Path, request: &Request) -> Result<Response> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(serde_json::from_str(&reply)?)
}

/// `fulcrumctl ha status` from a synchronous check.
fn ha_blocking(socket: &Path) -> Result<HaView> {
    match ask_blocking(socket, &Request::Ha { ha: HaCommand::Status })? {
        Response::Ha { ha } => Ok(*ha),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// What one director said this second.
#[derive(Debug, Clone)]
enum DirectorView {
    NotStarted,
    Killed,
    Up { services: Vec<ServiceView>, ha: Option<Box<HaView>> },
    Unreachable(String),
}

async fn directors_views(directors: &[Director]) -> Vec<DirectorView> {
    let mut views = Vec::new();
    for director in directors {
        let view = if director.killed {
            DirectorView::Killed
        } else if director.process.is_none() {
            DirectorView::NotStarted
        } else {
            let ask = |request| tokio::time::timeout(Duration::from_millis(500), call(&director.socket, request));
            match (ask(&Request::List).await, ask(&Request::Ha { ha: HaCommand::Status }).await) {
                (Ok(Ok(Response::Services { services })), ha) => {
                    let ha = match ha {
                        Ok(Ok(Response::Ha { ha })) => Some(ha),
                        _ => None,
                    };
                    DirectorView::Up { services, ha }
                }
                (Ok(Ok(other)), _) => DirectorView::Unreachable(format!("unexpected answer {other:?}")),
                (Ok(Err(e)), _) => DirectorView::Unreachable(format!("{e:#}")),
                (Err(_), _) => DirectorView::Unreachable("no answer in 500 ms".into()),
            }
        };
        views.push(view);
    }
    views
}

/// One second of the live table. Pure, so that its layout is tested.
fn render(elapsed: Duration, stats: &LoadStats, views: &[DirectorView], directors: &[Director]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n-- t={:>3}s  client: {} answered, {} failed, longest gap between answers {} ms",
        elapsed.as_secs(),
        stats.succeeded,
        stats.failed,
        stats.gaps.longest(Instant::now()).as_millis()
    );
    let mut active = None;
    let mut serving = None;
    let mut states = Vec::new();
    for (director, view) in directors.iter().zip(views) {
        let state = match view {
            DirectorView::NotStarted => "standby (not started)".to_string(),
            DirectorView::Killed => "KILLED".to_string(),
            DirectorView::Unreachable(why) => format!("unreachable: {why}"),
            DirectorView::Up { services, ha: None } => {
                active = active.or(Some(services));
                serving = serving.or(Some(director));
                "standalone, serving".to_string()
            }
            DirectorView::Up { services, ha: Some(ha) } => {
                if ha.serving {
                    active = Some(services);
                    serving = Some(director);
                }
                let state = crate::ha::runtime::state_name(ha.status.state).to_uppercase();
                let peer = match &ha.status.peer {
                    Some(peer) if peer.alive => "peer alive",
                    _ => "peer lost",
                };
                format!(
                    "{state}{}, heartbeat every {} ms, {peer}",
                    if ha.serving { " serving the VIP" } else { "" },
                    ha.status.period.as_millis()
                )
            }
        };
        states.push(format!("{} {}: {state}", director.name, director.ip));
    }
    let _ = writeln!(out, "   directors: {}", states.join(" | "));
    let _ = writeln!(
        out,
        "   {:<14} {:>9} {:>6} {:>9} {:>6} {:>9} {:>6} {:>6} {:>7}  health",
        "server", "capacity", "weight", "effective", "CPU%", "resp(ms)", "active", "inact", "served"
    );
    let servers = active.and_then(|services| services.first()).map(|service| service.servers.as_slice());
    for server in REAL_SERVERS {
        let view = servers.and_then(|servers| servers.iter().find(|s| s.address == server.ip));
        let dash = || "-".to_string();
        let weight = view.map_or_else(dash, |v| v.weight.to_string());
        let effective = view.map_or_else(dash, |v| v.effective_weight.to_string());
        let cpu = view.and_then(|v| v.cpu_bp).map_or_else(dash, |bp| format!("{:.1}", f64::from(bp) / 100.0));
        let resp =
            view.and_then(|v| v.response_time_us).map_or_else(dash, |us| format!("{:.1}", f64::from(us) / 1000.0));
        let active_conns = view.map_or_else(dash, |v| v.active_connections.to_string());
        let inactive = view.map_or_else(dash, |v| v.inactive_connections.to_string());
        let served = stats.served_by.get(server.name).copied().unwrap_or(0);
        let health = view.map_or("-", |v| v.health.as_str());
        let _ = writeln!(
            out,
            "   {:<14} {:>9} {:>6} {:>9} {:>6} {:>9} {:>6} {:>6} {:>7}  {}",
            format!("{} {}", server.name, server.ip),
            format!("{:.0}/s", server.capacity.requests_per_second()),
            weight,
            effective,
            cpu,
            resp,
            active_conns,
            inactive,
            served,
            health
        );
    }
    if let Some(director) = serving {
        let _ = writeln!(out, "   metrics: ip netns exec {} curl -s {}", director.netns, director.metrics_url());
    }
    out
}

/// A key the pair shares (heartbeats, connection sync): 32 random bytes, readable by root only.
fn write_key(path: &Path) -> Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut key))
        .context("reading /dev/urandom")?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(&key))
        .with_context(|| format!("writing {}", path.display()))
}

/// A director's configuration: agents, control socket and metrics on its own address, the data plane on its
/// LAN interface, one direct-routing service, its side of the heartbeat pair and of the connection sync (keys
/// `ha.key` and `sync.key` in `keys`).
fn director_config(director: &Director, pki: &Path, keys: &Path) -> String {
    let mut config = format!(
        r#"name = "{name}"

[agents]
listen = "{ip}:{AGENT_PORT}"
ca = "{pki}/ca.pem"
cert = "{pki}/{name}.pem"
key = "{pki}/{name}.key"
report_interval_ms = 250

[control]
socket = "{socket}"

[metrics]
listen = "{ip}:{METRICS_PORT}"

[dataplane]
interface = "eth0"
workers = 1
ring_frames = 128
connection_capacity = 65536
busy_poll_us = 0

[dataplane.timeouts]
tcp_time_wait_s = 5

# The pair: heartbeats on the LAN. The period adapts to the load between 20 ms and 200 ms; three lost
# heartbeats are ridden out, the fourth fails over.
[ha]
node_id = {node_id}
priority = {priority}
key_file = "{key}"
period_min_ms = 20
period_max_ms = 200
tolerance = 3
init_hold_ms = 1000
high_load_pps = 2000
high_load_connections = 200

[[ha.path]]
local = "{ip}:{HEARTBEAT_PORT}"
peer = "{peer}:{HEARTBEAT_PORT}"

# Connection sync: the BACKUP keeps a copy of the MASTER's connection table, so connections open at the
# failover go on through the new MASTER.
[sync]
listen = "{ip}:{SYNC_PORT}"
peer = "{peer}:{SYNC_PORT}"
key_file = "{keys}/sync.key"
batch_ms = 5

[[service]]
vip = "{VIP}"
port = {VIP_PORT}
scheduler = "df"

# Weights follow the agents' reports. CPU is left out: the demo's real servers share this machine's CPUs, so
# their agents all report the same (host-wide) figure. What differs is how fast each one answers.
[service.feedback]
period_ms = 500
cpu = 0.0
pressure = 0.0
response_time = 0.7
connections = 0.3
half_life_ms = 2000
max_step = 0.15

[service.health]
kind = "http"
path = "/"
interval_ms = 1000
timeout_ms = 1000
slow_start_s = 3
"#,
        name = director.name,
        ip = director.ip,
        pki = pki.display(),
        socket = director.socket.display(),
        node_id = director.node_id,
        priority = director.priority,
        key = keys.join("ha.key").display(),
        keys = keys.display(),
        peer = director.peer,
    );
    for server in REAL_SERVERS {
        let _ =
            write!(config, "\n[[service.server]]\naddress = \"{}\"\nweight = {WEIGHT}\nforward = \"dr\"\n", server.ip);
    }
    config
}

/// An agent's configuration: reports to both directors, probes its server over HTTP.
fn agent_config(name: &str, ip: Ipv4Addr, pki: &Path) -> String {
    let mut config = format!(
        r#"name = "{name}"
real_server = "{ip}"
ports = [{VIP_PORT}]
interval_ms = 250

[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/{name}.pem"
key = "{pki}/{name}.key"

[probe]
kind = "http"
target = "127.0.0.1:{VIP_PORT}"
path = "/"
timeout_ms = 2000
"#,
        pki = pki.display(),
    );
    for (director, director_ip, _, _) in DIRECTORS {
        let _ = write!(config, "\n[[director]]\nname = \"{director}\"\naddress = \"{director_ip}:{AGENT_PORT}\"\n");
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DirectorConfig;

    fn directors(work: &Path) -> Vec<Director> {
        DIRECTORS
            .iter()
            .enumerate()
            .map(|(i, &(name, ip, node_id, priority))| Director {
                name,
                ip,
                node_id,
                priority,
                peer: DIRECTORS[1 - i].1,
                netns: format!("fdemo1-{name}"),
                config: work.join(format!("{name}.toml")),
                socket: work.join(format!("{name}.sock")),
                process: None,
                killed: false,
            })
            .collect()
    }

    #[test]
    fn the_generated_configurations_are_valid() {
        let work = tempfile::tempdir().unwrap();
        let pki = work.path().join("pki");
        write_key(&work.path().join("ha.key")).unwrap();
        write_key(&work.path().join("sync.key")).unwrap();
        certs::create_ca(&pki, "test", 1, false).unwrap();
        for director in directors(work.path()) {
            certs::issue(&pki, Role::Director, director.name, &[], 1, false).unwrap();
            let text = director_config(&director, &pki, work.path());
            let config = DirectorConfig::from_text(&director.config, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(config.services.len(), 1);
            assert_eq!(config.services[0].servers.len(), REAL_SERVERS.len());
            assert_eq!(config.ha.map(|ha| ha.node_id), Some(director.node_id));
            assert!(config.sync.is_some());
        }
        for server in REAL_SERVERS {
            certs::issue(&pki, Role::Agent, server.name, &[], 1, false).unwrap();
            let text = agent_config(server.name, server.ip, &pki);
            // The agent's own checks run when the demo starts it (tests/tests/demo.rs); here, the syntax.
            let config: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(config["director"].as_array().map(Vec::len), Some(DIRECTORS.len()));
        }
    }

    #[test]
    fn the_table_shows_each_server_and_both_directors() {
        let work = tempfile::tempdir().unwrap();
        let mut directors = directors(work.path());
        directors[0].killed = true;
        let mut stats = LoadStats { succeeded: 10, failed: 2, ..LoadStats::default() };
        stats.served_by.insert("rs2".into(), 7);
        let views = vec![DirectorView::Killed, DirectorView::Up { services: Vec::new(), ha: None }];
        let table = render(Duration::from_secs(7), &stats, &views, &directors);
        assert!(table.contains("metrics: ip netns exec fdemo1-d2 curl -s http://10.0.0.3:9469/metrics"), "{table}");
        assert!(table.contains("t=  7s  client: 10 answered, 2 failed"), "{table}");
        assert!(table.contains("d1 10.0.0.2: KILLED | d2 10.0.0.3: standalone, serving"), "{table}");
        let rs2 = table.lines().find(|l| l.contains("rs2 10.0.0.12")).unwrap();
        assert!(rs2.contains("80/s") && rs2.trim_end().ends_with(" 7  -"), "{rs2}");
    }
}
