//! `fulcrum-agent`: reports a real server's load and its service's response time to the directors.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fulcrum_agent::config::{AgentConfig, Overrides};

/// Exit code for a configuration that was refused (as sysexits' EX_CONFIG).
const EXIT_BAD_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(name = "fulcrum-agent", version, about = "Fulcrum real-server agent")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    overrides: Overrides,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration (file and flags) and exit: 0 when valid, 78 when not.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match AgentConfig::load(&cli.overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if matches!(cli.command, Some(Command::CheckConfig)) {
        println!(
            "configuration ok: agent {} for {} reporting to {} director(s)",
            config.name,
            config.real_server,
            config.directors.len()
        );
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    // Two threads: sampling, probing and a few QUIC links need no more, and the agent shares its host.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fulcrum_agent::daemon::run_until_stopped(&cli.overrides, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
