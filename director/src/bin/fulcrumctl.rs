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
    };
    let json = matches!(cli.command, Command::List { json: true } | Command::Agents { json: true });
    match response {
        Response::Agents { agents } if json => println!("{}", serde_json::to_string_pretty(&agents)?),
        Response::Agents { agents } => print!("{}", agents_table(&agents)),
        Response::Services { services } if json => println!("{}", serde_json::to_string_pretty(&services)?),
        Response::Services { services } => print!("{}", services_table(&services)),
        Response::Done { message } => println!("{message}"),
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
