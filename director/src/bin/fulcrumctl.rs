//! `fulcrumctl`: control a running director through its Unix socket.

use std::path::PathBuf;
use std::process::ExitCode;

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use fulcrum_director::agents::AgentView;
use fulcrum_director::config::{ForwardMethod, Protocol, RealServerConfig, Scheduler, DEFAULT_CONTROL_SOCKET};
use fulcrum_director::control::{call, Request, Response};
use fulcrum_director::control_plane::{Edit, ServiceKey, ServiceView};
use fulcrum_director::ha::runtime::{state_name, HaCommand, HaView};
use fulcrum_protocol::{ProbeFailure, ProbeOutcome, FULL_SCALE_BP};

#[derive(Debug, Parser)]
#[command(name = "fulcrumctl", version, about = "Control a running Fulcrum director")]
struct Cli {
    /// The director's control socket.
    #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET, env = "FULCRUM_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Services and real servers, like `ipvsadm -L -n`: forwarding method, configured and effective weight,
    /// active and inactive connections, and what each server's agent reports.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The agents the director has heard from and their latest reports.
    Agents {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add, edit or delete a virtual service.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Add, edit, drain or delete a real server.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Connection sync with the peer director: connections up, records sent, received, applied, dropped.
    Sync {
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// The director pair: state, peer, heartbeats; hand mastership over or take it.
    Ha {
        #[command(subcommand)]
        command: HaSubcommand,
    },
}

#[derive(Debug, Subcommand)]
enum HaSubcommand {
    /// This director's state, its peer and the heartbeat counters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Take mastership (make-before-break) and keep it until `demote` or `release`.
    Promote {
        #[arg(long)]
        json: bool,
    },
    /// Hand mastership to the peer (make-before-break) and stay BACKUP until `promote` or `release`.
    Demote {
        #[arg(long)]
        json: bool,
    },
    /// End a promotion or demotion: back to automatic behaviour.
    Release {
        #[arg(long)]
        json: bool,
    },
}

impl HaSubcommand {
    fn command(&self) -> HaCommand {
        match self {
            HaSubcommand::Status { .. } => HaCommand::Status,
            HaSubcommand::Promote { .. } => HaCommand::Promote,
            HaSubcommand::Demote { .. } => HaCommand::Demote,
            HaSubcommand::Release { .. } => HaCommand::Release,
        }
    }

    fn json(&self) -> bool {
        match self {
            HaSubcommand::Status { json }
            | HaSubcommand::Promote { json }
            | HaSubcommand::Demote { json }
            | HaSubcommand::Release { json } => *json,
        }
    }
}

#[derive(Debug, Args)]
struct ServiceArg {
    /// The virtual service, VIP:PORT.
    service: SocketAddr,
    /// The service is UDP (default TCP).
    #[arg(long)]
    udp: bool,
}

impl ServiceArg {
    fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: self.service.ip(),
            port: self.service.port(),
            protocol: if self.udp { Protocol::Udp } else { Protocol::Tcp },
        }
    }
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    Add {
        #[command(flatten)]
        service: ServiceArg,
        #[arg(long, short, value_enum, default_value = "wlc")]
        scheduler: Scheduler,
        /// Persistence timeout in seconds (0: none).
        #[arg(long, short, default_value_t = 0)]
        persistence: u32,
        #[arg(long)]
        sloppy: bool,
    },
    Edit {
        #[command(flatten)]
        service: ServiceArg,
        #[arg(long, short, value_enum)]
        scheduler: Option<Scheduler>,
        #[arg(long, short)]
        persistence: Option<u32>,
        #[arg(long)]
        sloppy: Option<bool>,
    },
    Del {
        #[command(flatten)]
        service: ServiceArg,
    },
}

#[derive(Debug, Args)]
struct ServerArg {
    #[command(flatten)]
    service: ServiceArg,
    /// The real server, ADDRESS or ADDRESS:PORT (the port defaults to the service's).
    server: String,
}

impl ServerArg {
    fn address(&self) -> Result<(IpAddr, Option<u16>)> {
        if let Ok(address) = self.server.parse::<IpAddr>() {
            return Ok((address, None));
        }
        let with_port: SocketAddr =
            self.server.parse().with_context(|| format!("{:?} is not ADDRESS or ADDRESS:PORT", self.server))?;
        Ok((with_port.ip(), Some(with_port.port())))
    }
}

#[derive(Debug, Subcommand)]
enum ServerCommand {
    Add {
        #[command(flatten)]
        server: ServerArg,
        #[arg(long, short, default_value_t = 1)]
        weight: u32,
        #[arg(long, short = 'm', value_enum, default_value = "dr")]
        forward: ForwardMethod,
    },
    Edit {
        #[command(flatten)]
        server: ServerArg,
        #[arg(long, short)]
        weight: Option<u32>,
        #[arg(long, short = 'm', value_enum)]
        forward: Option<ForwardMethod>,
    },
    /// Weight 0: no new connections, established ones continue.
    Drain {
        #[command(flatten)]
        server: ServerArg,
    },
    Del {
        #[command(flatten)]
        server: ServerArg,
        /// Also drop its connections at once (otherwise they continue until they end).
        #[arg(long)]
        purge: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fulcrumctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ask = |request: Request| runtime.block_on(call(&cli.socket, &request));
    let response = match &cli.command {
        Command::List { .. } => ask(Request::List)?,
        Command::Agents { .. } => ask(Request::Agents)?,
        Command::Service(command) => ask(Request::Edit { edit: service_edit(command) })?,
        Command::Server(command) => ask(Request::Edit { edit: server_edit(command)? })?,
        Command::Sync { .. } => ask(Request::Sync)?,
        Command::Ha { command } => ask(Request::Ha { ha: command.command() })?,
    };
    let json = match &cli.command {
        Command::List { json } | Command::Agents { json } | Command::Sync { json } => *json,
        Command::Ha { command } => command.json(),
        Command::Service(_) | Command::Server(_) => false,
    };
    match response {
        Response::Agents { agents } if json => println!("{}", serde_json::to_string_pretty(&agents)?),
        Response::Agents { agents } => print!("{}", agents_table(&agents)),
        Response::Services { services } if json => println!("{}", serde_json::to_string_pretty(&services)?),
        Response::Services { services } => print!("{}", services_table(&services)),
        Response::Done { message } => println!("{message}"),
        Response::Sync { status } if json => println!("{}", serde_json::to_string_pretty(&status)?),
        Response::Sync { status } => println!(
            "sync: sending {} receiving {}; records sent {} received {} applied {} dropped {}; full tables sent {} received {}; lag {:.3} s",
            if status.sending_connected { "up" } else { "down" },
            if status.receiving_connected { "up" } else { "down" },
            status.records_sent,
            status.records_received,
            status.records_applied,
            status.records_dropped,
            status.full_tables_sent,
            status.full_tables_received,
            status.lag_seconds,
        ),
        Response::Ha { ha } if json => println!("{}", serde_json::to_string_pretty(&ha)?),
        Response::Ha { ha } => print!("{}", ha_table(&ha)),
        Response::Error { message } => bail!("the director refused: {message}"),
    }
    Ok(())
}

fn service_edit(command: &ServiceCommand) -> Edit {
    match command {
        ServiceCommand::Add { service, scheduler, persistence, sloppy } => Edit::ServiceAdd {
            service: service.key(),
            scheduler: *scheduler,
            persistence_s: *persistence,
            sloppy: *sloppy,
        },
        ServiceCommand::Edit { service, scheduler, persistence, sloppy } => Edit::ServiceEdit {
            service: service.key(),
            scheduler: *scheduler,
            persistence_s: *persistence,
            sloppy: *sloppy,
        },
        ServiceCommand::Del { service } => Edit::ServiceDel { service: service.key() },
    }
}

fn server_edit(command: &ServerCommand) -> Result<Edit> {
    Ok(match command {
        ServerCommand::Add { server, weight, forward } => {
            let (address, port) = server.address()?;
            Edit::ServerAdd {
                service: server.service.key(),
                server: RealServerConfig { address, port, weight: *weight, forward: *forward },
            }
        }
        ServerCommand::Edit { server, weight, forward } => {
            let (address, port) = server.address()?;
            Edit::ServerEdit { service: server.service.key(), address, port, weight: *weight, forward: *forward }
        }
        ServerCommand::Drain { server } => {
            let (address, port) = server.address()?;
            Edit::ServerEdit { service: server.service.key(), address, port, weight: Some(0), forward: None }
        }
        ServerCommand::Del { server, purge } => {
            let (address, port) = server.address()?;
            Edit::ServerDel { service: server.service.key(), address, port, purge: *purge }
        }
    })
}

fn forward_name(forward: ForwardMethod) -> &'static str {
    // ipvsadm's names.
    match forward {
        ForwardMethod::Dr => "Route",
        ForwardMethod::Nat => "Masq",
        ForwardMethod::Tun => "Tunnel",
    }
}

fn services_table(services: &[ServiceView]) -> String {
    let mut out = format!("Fulcrum {} virtual servers\n", env!("CARGO_PKG_VERSION"));
    out.push_str("Prot LocalAddress:Port Scheduler Flags\n");
    out.push_str(&format!(
        "  -> {:<22} {:<7} {:>6} {:>9} {:>10} {:>9} {:>6} {:>9} {:>8} {}\n",
        "RemoteAddress:Port",
        "Forward",
        "Weight",
        "Effective",
        "ActiveConn",
        "InActConn",
        "CPU%",
        "Resp(ms)",
        "Age(ms)",
        "Health"
    ));
    for service in services {
        let key = service.service;
        let proto = match key.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        let mut flags = Vec::new();
        if service.persistence_s > 0 {
            flags.push(format!("persistent {}", service.persistence_s));
        }
        if service.sloppy {
            flags.push("sloppy".to_string());
        }
        out.push_str(&format!("{proto}  {}:{} {} {}\n", key.vip, key.port, service.scheduler, flags.join(" ")));
        for server in &service.servers {
            let dash = || "-".to_string();
            out.push_str(&format!(
                "  -> {:<22} {:<7} {:>6} {:>9} {:>10} {:>9} {:>6} {:>9} {:>8} {}\n",
                format!("{}:{}", server.address, server.port),
                forward_name(server.forward),
                server.weight,
                server.effective_weight,
                server.active_connections,
                server.inactive_connections,
                server.cpu_bp.map_or_else(dash, |bp| format!("{:.1}", f64::from(bp) / 100.0)),
                server.response_time_us.map_or_else(dash, |us| format!("{:.2}", f64::from(us) / 1000.0)),
                server.report_age_ms.map_or_else(dash, |ms| ms.to_string()),
                server.health,
            ));
        }
    }
    out
}

fn ha_table(view: &HaView) -> String {
    let status = &view.status;
    let ms = |d: std::time::Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let mut manual = Vec::new();
    if status.demoted {
        manual.push("demoted");
    }
    if status.promoted {
        manual.push("promoted");
    }
    let mut out = String::new();
    out.push_str(&format!(
        "{:<6} {:>8} {:>8} {:<7} {:<8} {:>10} {:>9} {:<9} {}\n",
        "Node", "NodeId", "Priority", "State", "Serving", "Period(ms)", "Tolerance", "Manual", "Boot"
    ));
    out.push_str(&format!(
        "{:<6} {:>8} {:>8} {:<7} {:<8} {:>10} {:>9} {:<9} {:016x}\n",
        "self",
        status.node_id,
        status.priority,
        state_name(status.state).to_uppercase(),
        if view.serving { "yes" } else { "no" },
        ms(status.period),
        status.tolerance,
        if manual.is_empty() { "-".to_string() } else { manual.join(",") },
        status.boot_id,
    ));
    match &status.peer {
        Some(peer) => {
            let mut flags = Vec::new();
            if peer.demoted {
                flags.push("demoted");
            }
            if peer.promoted {
                flags.push("promoted");
            }
            out.push_str(&format!(
                "{:<6} {:>8} {:>8} {:<7} {:<8} {:>10} {:>9} {:<9} {:016x}\n",
                "peer",
                peer.node_id,
                peer.priority,
                state_name(peer.state).to_uppercase(),
                if peer.alive { "alive" } else { "dead" },
                ms(peer.period),
                peer.tolerance,
                if flags.is_empty() { "-".to_string() } else { flags.join(",") },
                peer.boot_id,
            ));
            out.push_str(&format!(
                "peer deadline {} ms after its last heartbeat, jitter {:.2} ms, {} heartbeats received\n",
                ms(peer.deadline),
                peer.jitter_us as f64 / 1000.0,
                peer.received
            ));
        }
        None => out.push_str("peer   never heard\n"),
    }
    let c = &status.counters;
    out.push_str(&format!(
        "heartbeats sent {} received {} rejected {}; transitions {} failovers {} peer lost {}\n",
        c.sent,
        c.received,
        c.rejected.total(),
        c.transitions,
        c.failovers,
        c.peer_lost
    ));
    let r = &c.rejected;
    if r.total() > 0 {
        out.push_str(&format!(
            "rejected: bad_mac {} replayed {} duplicate {} stale_boot {} unverified_boot {} bad_length {} \
             bad_version {} malformed {} own_node_id {} bad_path {}\n",
            r.bad_mac,
            r.replayed,
            r.duplicate,
            r.stale_boot,
            r.unverified_boot,
            r.bad_length,
            r.bad_version,
            r.malformed,
            r.own_node_id,
            r.bad_path
        ));
    }
    out.push_str(&format!(
        "reported loss {:.2}%{}; tiebreaker checks {} (unreachable {}); send errors {}\n",
        status.reported_loss * 100.0,
        if status.degraded { " (degraded: faster heartbeats)" } else { "" },
        view.shell.tiebreaker_checks,
        view.shell.tiebreaker_unreachable,
        view.shell.send_errors
    ));
    for path in &view.paths {
        out.push_str(&format!("path {path}\n"));
    }
    if !view.tiebreakers.is_empty() {
        out.push_str(&format!("tiebreakers {}\n", view.tiebreakers.join(" ")));
    }
    out
}

fn agents_table(agents: &[AgentView]) -> String {
    let mut out = format!(
        "{:<16} {:<16} {:<6} {:>6} {:>9} {:<10} {:>6} {:>8} {:>8}\n",
        "RealServer", "Agent", "State", "CPU%", "Resp(ms)", "Probe", "Conns", "Age(ms)", "Reports"
    );
    for agent in agents {
        let report = agent.last_report.as_ref();
        let cpu = report
            .and_then(|r| r.cpu)
            .map_or("-".to_string(), |c| format!("{:.1}", f64::from(c.busy_bp) * 100.0 / f64::from(FULL_SCALE_BP)));
        let resp = report
            .and_then(|r| r.probe.smoothed_us)
            .map_or("-".to_string(), |us| format!("{:.2}", f64::from(us) / 1000.0));
        let probe = report.map_or("-".to_string(), |r| match r.probe.last {
            ProbeOutcome::Pending => "pending".to_string(),
            ProbeOutcome::Ok(_) => "ok".to_string(),
            ProbeOutcome::Failed(failure) => match failure {
                ProbeFailure::ConnectRefused => "refused".to_string(),
                ProbeFailure::Timeout => "timeout".to_string(),
                ProbeFailure::Network => "net-error".to_string(),
                ProbeFailure::BadResponse => "not-http".to_string(),
                ProbeFailure::HttpStatus(status) => format!("http-{status}"),
            },
        });
        let conns = report.map_or("-".to_string(), |r| r.established_connections.to_string());
        let age = agent.report_age_ms.map_or("-".to_string(), |a| a.to_string());
        out.push_str(&format!(
            "{:<16} {:<16} {:<6} {:>6} {:>9} {:<10} {:>6} {:>8} {:>8}\n",
            agent.real_server.to_string(),
            agent.agent_name,
            if agent.connected { "up" } else { "down" },
            cpu,
            resp,
            probe,
            conns,
            age,
            agent.reports
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks a command's definition (unique short options, …) only when it runs: check them all here.
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
