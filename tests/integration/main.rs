//! One integration-test binary (one link step). Tests that need the test ground are
//! `#[ignore = "needs the test ground"]`: plain `cargo test` stays fast and hermetic, and
//! `scripts/test` runs everything with `--include-ignored` after building the ground.

mod cert_manager;
mod certificate_endpoint;

mod agent;
mod certificates;
mod chart;
mod controller;
mod deploy;
mod docs;
mod ground;
mod lease;
mod report;
mod silent_server;
mod support;
mod tunnel_servers;
mod webhook;
