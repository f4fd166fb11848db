//! ground-image: the programs of the images a test-ground node runs besides picotun, which it
//! imports from tarballs (scripts/build-node-images) instead of pulling them:
//!
//!   pause       the pod sandbox (registry.k8s.io/pause)
//!   http-echo   the examples' echo server (docker.io/hashicorp/http-echo)
//!
//! The mode is the program's name (the images install it as /pause and /http-echo) or, under any
//! other name, the first argument: `ground-image http-echo -text=hi`.

mod echo;
mod http;
mod pause;
mod proxy;
mod signals;

use std::path::Path;
use std::process::ExitCode;

const MODES: &str = "pause | http-echo";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let name = args.first().and_then(|a| Path::new(a).file_name()).and_then(|n| n.to_str()).unwrap_or_default();
    let (mode, rest) = match name {
        "pause" | "http-echo" => (name, &args[1..]),
        _ => (args.get(1).map_or("", String::as_str), args.get(2..).unwrap_or_default()),
    };
    match mode {
        "pause" => pause::run(rest),
        "http-echo" => echo::run(rest),
        "-V" | "--version" => {
            println!("ground-image {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        "" | "-h" | "--help" => {
            eprintln!("usage: ground-image {MODES} [ARGS...] (or run it as pause or http-echo)");
            if mode.is_empty() { ExitCode::from(2) } else { ExitCode::SUCCESS }
        }
        other => {
            eprintln!("ground-image: unknown mode {other:?}: {MODES}");
            ExitCode::from(2)
        }
    }
}
