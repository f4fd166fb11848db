#![forbid(unsafe_code)]

use clap::Parser;
use picotun::cli::{Cli, Command};

/// The image's binary is static musl, whose malloc costs the relay a third of its throughput.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    picotun::telemetry::init(&cli.log_filter, cli.log_format);
    // The agent is a sidecar moving bytes between two sockets: one thread keeps every hand-off
    // on the same core (no cross-thread wake-ups) and its memory small.
    let runtime = match &cli.command {
        Command::Agent(_) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Command::Inject(args) => {
            return match picotun::webhook::inject_cli::run(args) {
                Ok(out) => {
                    print!("{out}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("picotun inject: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Certs(args) => {
            return match picotun::certs::generate(args) {
                Ok(bundle) => {
                    eprintln!("wrote ca.crt, ca.key, tls.crt, tls.key to {}; caBundle:", args.out_dir.display());
                    println!("{bundle}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("picotun certs: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Ca(args) => {
            return match picotun::ca_cli::run(args) {
                Ok(printed) => {
                    // The manifest (holding the private key) to stdout only, for a pipe to kubectl.
                    print!("{}", printed.manifest);
                    eprint!("{}", printed.instructions);
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("picotun ca: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Webhook(_) | Command::Controller(_) => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()
        }
        Command::Explain(_) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("picotun: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> std::process::ExitCode {
    let shutdown = match picotun::shutdown::on_signal() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("picotun: cannot install signal handlers: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Agent(args) => picotun::agent::run(args, shutdown).await.map_err(anyhow::Error::from),
        Command::Webhook(args) => picotun::webhook::run(*args, shutdown).await.map_err(anyhow::Error::from),
        Command::Controller(args) => picotun::controller::run(args, shutdown).await.map_err(anyhow::Error::from),
        Command::Explain(args) => match picotun::webhook::explain::run(&args).await {
            Ok(text) => {
                print!("{text}");
                Ok(())
            }
            Err(e) => Err(anyhow::Error::from(e)),
        },
        Command::Inject(_) | Command::Certs(_) | Command::Ca(_) => unreachable!("handled before the runtime starts"),
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
