#![forbid(unsafe_code)]

use clap::Parser;
use picotun::cli::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    picotun::telemetry::init(&cli.log_filter, cli.log_format);
    let shutdown = match picotun::shutdown::on_signal() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("picotun: cannot install signal handlers: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Agent(args) => picotun::agent::run(args, shutdown).await.map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("picotun: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
