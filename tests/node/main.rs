//! Tests on the test ground's real node: a kubelet, containerd and runc run the pods the tests
//! create -- the injected sidecar included -- and sish, what tuns.sh runs, carries the tunnels.
//! A test binary of its own, so its one ground (with the node) is not shared with the kwok-only
//! tests of `integration`. Like those, every test here is `#[ignore = "needs the test ground"]`
//! and `scripts/test` runs them with `--include-ignored`.

mod certificates;
mod faults;
mod ground;
mod pods;
mod server_options;
mod support;
mod tls_passthrough;
mod walkthroughs;
