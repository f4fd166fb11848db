//! `pause`: the pod sandbox, as registry.k8s.io/pause is. It holds the pod's namespaces open:
//! it does nothing until SIGTERM or SIGINT, then exits 0. Meanwhile it reaps every child that
//! exits (with a shared PID namespace, the pod's orphans are re-parented to it).

use crate::signals::{self, Blocked, SIGCHLD, SIGINT, SIGTERM};
use std::process::ExitCode;

pub fn run(args: &[String]) -> ExitCode {
    if args.first().map(String::as_str) == Some("-v") {
        println!("pause (picotun ground-image {})", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let blocked = match Blocked::block(&[SIGINT, SIGTERM, SIGCHLD]) {
        Ok(blocked) => blocked,
        Err(error) => {
            eprintln!("pause: blocking signals: {error}");
            return ExitCode::FAILURE;
        }
    };
    if std::process::id() != 1 {
        eprintln!("Warning: pause should be the first process");
    }
    // Children that exited before SIGCHLD was blocked would otherwise wait for the next one.
    signals::reap_children();
    loop {
        match blocked.wait() {
            Ok(SIGCHLD) => {
                signals::reap_children();
            }
            Ok(signal) => {
                eprintln!("Shutting down, got signal: {}", signals::name(signal));
                return ExitCode::SUCCESS;
            }
            Err(error) => {
                eprintln!("pause: sigwait: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
}
