//! `fulcrumctl`: control a running director through its Unix socket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use fulcrum_director::agents::AgentView;
use fulcrum_director::config::DEFAULT_CONTROL_SOCKET;
use fulcrum_director::control::{call, Request, Response};
use fulcrum_protocol::{ProbeFailure, ProbeOutcome, FULL_SCALE_BP};

#[derive(Debug, Parser)]
#[command(name = "fulcrumctl", version, about = "Control a running Fulcrum director")]
struct Cli {
    /// The director's control socket.
    #[arg(long, short, global = true, default_value = DEFAULT_CONTROL_SOCKET, env = "FULCRUM_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The agents the director has heard from and their latest reports.
    Agents {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    match cli.command {
        Command::Agents { json } => match runtime.block_on(call(&cli.socket, &Request::Agents))? {
            Response::Agents { agents } if json => println!("{}", serde_json::to_string_pretty(&agents)?),
            Response::Agents { agents } => print!("{}", agents_table(&agents)),
            Response::Error { message } => bail!("the director refused: {message}"),
        },
    }
    Ok(())
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
