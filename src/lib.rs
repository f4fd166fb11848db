//! picotun: expose Kubernetes workloads to the internet through pico.sh SSH tunnels.
//!
//! One binary, three modes -- `webhook` (injects the tunnel sidecar), `controller` (routes to
//! tunnels, status back) and `agent` (the sidecar). See docs/ARCHITECTURE.md.
// One audited exception: agent::pageout's madvise call (the only unsafe block).
#![deny(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod apiserver;
pub mod ca_cli;
pub mod certs;
pub mod cli;
pub mod controller;
pub mod core;
pub mod resolve;
pub mod shutdown;
pub mod sshca;
pub mod telemetry;
pub mod webhook;

/// The version this binary was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod layering {
    use std::path::Path;

    /// Every `.rs` file under `src/<dir>`, with its text.
    fn sources(dir: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut todo = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir)];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    todo.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        out
    }

    /// Defect 14 of issue 12: data flows one way -- core <- resolve <- apiserver <- webhook /
    /// controller, and the agent beside them on core only. A layer that imports one above it fails
    /// here with the file and the import.
    #[test]
    fn layers_import_downwards_only() {
        let rules: [(&str, &[&str]); 5] = [
            ("core", &["crate::resolve", "crate::apiserver", "crate::webhook", "crate::controller", "crate::agent"]),
            ("resolve", &["crate::apiserver", "crate::webhook", "crate::controller", "crate::agent"]),
            ("apiserver", &["crate::webhook", "crate::controller", "crate::agent"]),
            ("agent", &["crate::resolve", "crate::apiserver", "crate::webhook", "crate::controller"]),
            ("webhook", &["crate::controller", "crate::agent"]),
        ];
        let mut wrong = Vec::new();
        for (dir, forbidden) in rules {
            for (file, text) in sources(dir) {
                for f in forbidden {
                    if text.contains(f) {
                        wrong.push(format!("{file} uses {f}"));
                    }
                }
            }
        }
        // controller/ may use the webhook's nothing either.
        for (file, text) in sources("controller") {
            if text.contains("crate::webhook") || text.contains("crate::agent") {
                wrong.push(format!("{file} uses the webhook or the agent"));
            }
        }
        assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
    }

    /// Only the layers that talk to the apiserver hold a client.
    #[test]
    fn pure_layers_hold_no_kubernetes_client() {
        for dir in ["core", "resolve"] {
            for (file, text) in sources(dir) {
                for needle in ["kube::Client", "kube::api::Api", "Api::<", "Api::namespaced", "Api::all"] {
                    assert!(!text.contains(needle), "{file} is meant to be pure but uses {needle}");
                }
            }
        }
    }
}
