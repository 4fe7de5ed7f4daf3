//! `fulcrum-director`: the director daemon, its config checker and its certificate tool.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fulcrum_director::agents::{AgentListener, AgentRegistry};
use fulcrum_director::certs::{self, Role};
use fulcrum_director::config::{DirectorConfig, DEFAULT_CONFIG_PATH};
use fulcrum_director::control::{ControlServer, Handles};
use fulcrum_director::control_plane::ControlPlane;
use fulcrum_director::dataplane::{counters, Dataplane};
use fulcrum_director::demo;
use fulcrum_director::ha::runtime::HaRuntime;
use fulcrum_director::metrics_endpoint;
use fulcrum_director::sd_notify::{self, Watchdog};
use fulcrum_director::sync;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// Exit code for a configuration that was refused (as sysexits' EX_CONFIG).
const EXIT_BAD_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(name = "fulcrum-director", version, about = "Fulcrum layer-4 load-balancing director")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the director daemon.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (0 when valid).
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Create the cluster CA and issue director and agent certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Build a throw-away playground of network namespaces (two directors, three real servers with agents, a
    /// client), show live what the directors see, kill the active one half-way; needs root.
    Demo {
        /// How long the load runs; the active director is killed half-way.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Requests per second the client aims at (the three servers together serve 280).
        #[arg(long, default_value_t = 180)]
        rate: u32,
        /// Concurrent client connections.
        #[arg(long, default_value_t = 24)]
        clients: u32,
    },
    /// The demo's real server: a minimal HTTP/1.1 responder of limited capacity (started by `demo`).
    DemoServer {
        #[arg(long, default_value = "0.0.0.0:80")]
        listen: std::net::SocketAddr,
        /// Name it answers with (`served by NAME`).
        #[arg(long)]
        name: String,
        /// Time each request takes.
        #[arg(long, default_value_t = 20)]
        service_time_ms: u64,
        /// Requests served at once; more wait for a slot.
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a cluster CA: `ca.pem` and `ca.key` (mode 0600) in DIR.
    Ca {
        #[arg(long, default_value = "/etc/fulcrum/pki")]
        dir: PathBuf,
        /// Common name of the CA certificate.
        #[arg(long, default_value = "Fulcrum cluster CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (every certificate it issued becomes invalid).
        #[arg(long)]
        force: bool,
    },
    /// Issue `NAME.pem` and `NAME.key` (mode 0600) in DIR, signed by the CA there.
    Issue {
        #[arg(long, default_value = "/etc/fulcrum/pki")]
        dir: PathBuf,
        #[arg(long, value_enum)]
        role: Role,
        /// The holder's name (a DNS name): the agent's `name`, or the director's `name` as agents address it.
        #[arg(long)]
        name: String,
        /// An IP address to add as a subject-alternative name (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[arg(long, default_value_t = 825)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Run { config } => run_daemon(&config),
        Command::CheckConfig { config } => match DirectorConfig::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Demo { seconds, rate, clients } => {
            match demo::run(&demo::DemoOptions { seconds, rate, clients }) {
                Ok(demo::Outcome::Finished) => ExitCode::SUCCESS,
                // As a shell reports a command ended by SIGINT.
                Ok(demo::Outcome::Interrupted) => ExitCode::from(130),
                Err(e) => {
                    eprintln!("demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::DemoServer { listen, name, service_time_ms, concurrency } => {
            let capacity = demo::http::Capacity { service_time: Duration::from_millis(service_time_ms), concurrency };
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| {
                    runtime.block_on(async {
                        let listener =
                            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
                        demo::http::serve(listener, name, capacity).await
                    })
                });
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo-server: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Certs(command) => match run_certs(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn run_certs(command: CertsCommand) -> Result<()> {
    let issued = match command {
        CertsCommand::Ca { dir, name, days, force } => certs::create_ca(&dir, &name, days, force)?,
        CertsCommand::Issue { dir, role, name, ips, days, force } => {
            certs::issue(&dir, role, &name, &ips, days, force)?
        }
    };
    println!("wrote {} and {}", issued.cert.display(), issued.key.display());
    Ok(())
}

fn run_daemon(path: &Path) -> ExitCode {
    let config = match DirectorConfig::load(path) {
        Ok(config) => config,
        Err(e) => {
            error!("{e}");
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon(path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn daemon(path: &Path, config: DirectorConfig) -> Result<()> {
    let metrics = metrics_endpoint::install_recorder()?;
    metrics::gauge!("fulcrum_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let registry = AgentRegistry::default();
    let workers = config.dataplane.as_ref().map_or(1, |d| d.workers as usize);
    let (control_plane, config_rx) = ControlPlane::new(config.clone(), workers);
    let control_plane = Arc::new(control_plane);

    let (sync_shared, sync_workers, sync_task) = start_sync_hub(&config);
    let dataplane = match &config.dataplane {
        // A member of a pair starts not serving (INIT): the HA task decides.
        Some(dataplane) => Some(Arc::new(Dataplane::start_with_sync(
            dataplane,
            control_plane.table(),
            config.ha.is_none(),
            sync_workers,
        )?)),
        None => None,
    };
    let _sync_task = match (&config.sync, sync_task) {
        (Some(section), Some(ports)) => {
            let settings = section.settings().map_err(|e| anyhow::anyhow!("sync.key_file: {e}"))?;
            Some(
                sync::runtime::start(settings, ports)
                    .await
                    .with_context(|| format!("starting sync on {}", section.listen))?,
            )
        }
        _ => None,
    };
    let (ha_task, ha) = match (&config.ha, &dataplane) {
        (Some(section), Some(dataplane)) => {
            let (mut runtime, handle) = HaRuntime::bind(section, Arc::clone(dataplane)).await?;
            if let Some(sync) = &sync_shared {
                // Failing back before the peer's connection table is here would drop its connections.
                runtime.hold_preemption_until_synced(Arc::clone(sync));
            }
            (Some(tokio::spawn(runtime.run())), Some(handle))
        }
        _ => (None, None),
    };
    // Every publication may change the VIP set the steering program must know.
    let follow_task = dataplane.as_ref().map(|dataplane| {
        let (dataplane, table, mut changes) = (Arc::clone(dataplane), control_plane.table(), config_rx.clone());
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                dataplane.follow(&table.load());
            }
        })
    });
    // Dynamic feedback and health checks: the one writer of effective weights after start.
    let feedback_task =
        fulcrum_director::feedback_runtime::spawn(Arc::clone(&control_plane), config_rx.clone(), registry.clone());
    let listener = AgentListener::bind(config_rx, registry.clone())?;
    let control = ControlServer::bind(
        &config.control.socket,
        Handles {
            agents: registry.clone(),
            control: Arc::clone(&control_plane),
            ha: ha.clone(),
            sync: sync_shared.clone(),
        },
    )?;
    info!(name = %config.name, socket = %config.control.socket.display(), "director running");

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let endpoint = listener.local_addr()?;
    let listener = Arc::new(listener);
    let accept = tokio::spawn({
        let listener = Arc::clone(&listener);
        async move { listener.run().await }
    });
    let control_task = tokio::spawn(control.run());
    let metrics_task = config.metrics.listen.map(|listen| {
        let registry = registry.clone();
        let (dataplane, table, ha) = (dataplane.clone(), control_plane.table(), ha.clone());
        let sync_shared = sync_shared.clone();
        let collect: metrics_endpoint::Collector = Arc::new(move || {
            registry.publish_metrics(Instant::now());
            if let Some(ha) = &ha {
                ha.publish_metrics();
            }
            if let Some(sync) = &sync_shared {
                sync.publish();
            }
            if let Some(dataplane) = &dataplane {
                counters::publish(&dataplane.counters, &table.load());
            }
        });
        tokio::spawn(metrics_endpoint::serve(listen, metrics, collect))
    });
    info!(%endpoint, "accepting agents");
    sd_notify::notify(&[sd_notify::State::Ready]);

    // The main loop feeds systemd's watchdog itself, so a loop that is stuck gets the director restarted.
    let mut watchdog = Watchdog::from_env();
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = watchdog.due() => watchdog.feed(),
            _ = sighup.recv() => {
                sd_notify::notify(&[sd_notify::State::Reloading]);
                reload(path, &control_plane);
                sd_notify::notify(&[sd_notify::State::Ready]);
            }
        }
    }
    info!("shutting down");
    sd_notify::notify(&[sd_notify::State::Stopping]);
    if let Some(ha) = &ha {
        // A MASTER hands over to its peer first, so a planned stop loses no traffic.
        match ha.hand_over(std::time::Duration::from_secs(3)).await {
            Ok(()) => info!("HA: handed over (or nothing to hand over)"),
            Err(e) => warn!("HA: stopping without a handover: {e:#}"),
        }
    }
    listener.close();
    feedback_task.abort();
    let _ = feedback_task.await;
    accept.abort();
    control_task.abort();
    if let Some(task) = &metrics_task {
        task.abort();
    }
    if let Some(task) = follow_task {
        task.abort();
    }
    if let Some(task) = ha_task {
        task.abort();
        let _ = task.await;
    }
    // Dropping the control task removes the socket file.
    let _ = control_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    if let Some(dataplane) = dataplane.and_then(|d| Arc::try_unwrap(d).ok()) {
        dataplane.stop();
    }
    Ok(())
}

/// The rings between the workers and the sync task, when `[sync]` is configured (with a data plane).
type SyncParts = (Option<Arc<sync::SyncShared>>, Option<(Vec<sync::WorkerPort>, Duration)>, Option<sync::TaskPorts>);

fn start_sync_hub(config: &DirectorConfig) -> SyncParts {
    let (Some(section), Some(dataplane)) = (&config.sync, &config.dataplane) else { return (None, None, None) };
    let (shared, workers, task) = sync::hub(dataplane.workers as usize, section.ring_records as usize);
    let refresh = Duration::from_secs(section.refresh_s.into());
    (Some(shared), Some((workers, refresh)), Some(task))
}

/// Re-reads the config. A bad file is refused and the running config stays.
fn reload(path: &Path, control_plane: &ControlPlane) {
    match DirectorConfig::load(path) {
        Ok(new) => {
            let old = control_plane.config();
            if new.agents != old.agents
                || new.control != old.control
                || new.metrics != old.metrics
                || new.name != old.name
                || new.ha != old.ha
            {
                warn!(
                    "listener, control, metrics, name and [ha] settings change only on restart; services were reloaded"
                );
            }
            if new.sync != old.sync {
                warn!("[sync] settings change only on restart");
            }
            control_plane.replace(new);
            info!(config = %path.display(), "configuration reloaded");
        }
        Err(e) => error!("reload refused, the running configuration stays: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks a command's definition (unique short options, …) only when it runs: check it here.
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
