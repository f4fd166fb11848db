//! The webhook configuration deploy/ ships, read from the files users apply: the tests that
//! register a webhook of their own (pointed at a loopback address, scoped to their namespaces)
//! take its matchConditions from here, so what they prove is what ships. Included by `#[path]`
//! from tests/integration and tests/node.

use std::path::PathBuf;

use serde_json::Value;

const CONFIGURATION: &str = "deploy/base/webhook-configuration.yaml";
const ROUTE_BACKENDS: &str = "deploy/components/inject-route-backends/kustomization.yaml";

fn read_yaml(path: &str) -> Value {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

/// The shipped webhook (the configuration's only one), as the JSON the apiserver takes.
pub fn shipped_webhook() -> Value {
    let config = read_yaml(CONFIGURATION);
    let webhooks = config["webhooks"].as_array().unwrap_or_else(|| panic!("{CONFIGURATION} has no webhooks"));
    assert_eq!(webhooks.len(), 1, "{CONFIGURATION}: one webhook expected");
    webhooks[0].clone()
}

/// The names of the matchConditions deploy/components/inject-route-backends removes: its
/// JSON patch on the webhook configuration checks each one's name (`test`) before it removes it.
pub fn removed_for_route_backends() -> Vec<String> {
    let component = read_yaml(ROUTE_BACKENDS);
    let mut removed = Vec::new();
    let patches = component["patches"].as_array().unwrap_or_else(|| panic!("{ROUTE_BACKENDS} has no patches"));
    for patch in patches.iter().filter(|p| p["target"]["kind"] == "MutatingWebhookConfiguration") {
        let ops: Value = serde_saphyr::from_str(patch["patch"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{ROUTE_BACKENDS}: the webhook configuration's patch is not YAML: {e}"));
        let ops = ops.as_array().unwrap_or_else(|| panic!("{ROUTE_BACKENDS}: a JSON patch (a list of ops) expected"));
        for op in ops.iter().filter(|op| op["op"] == "remove") {
            let path = op["path"].as_str().unwrap_or_default();
            assert!(path.starts_with("/webhooks/0/matchConditions/"), "{ROUTE_BACKENDS} removes {path}");
            let name = ops
                .iter()
                .find(|t| t["op"] == "test" && t["path"].as_str() == Some(&format!("{path}/name")))
                .and_then(|t| t["value"].as_str())
                .unwrap_or_else(|| panic!("{ROUTE_BACKENDS}: no `test` of {path}/name before it is removed"));
            removed.push(name.to_string());
        }
    }
    assert!(!removed.is_empty(), "{ROUTE_BACKENDS} removes no matchCondition");
    removed
}

/// The shipped matchConditions; with `route_backends` (the webhook runs with
/// --inject-route-backends), without those the inject-route-backends component removes.
pub fn shipped_match_conditions(route_backends: bool) -> Value {
    let conditions = shipped_webhook()["matchConditions"].clone();
    let all = conditions.as_array().unwrap_or_else(|| panic!("{CONFIGURATION} has no matchConditions"));
    let removed = if route_backends { removed_for_route_backends() } else { Vec::new() };
    for name in &removed {
        assert!(all.iter().any(|c| c["name"] == name.as_str()), "the component removes {name}, which is not shipped");
    }
    let kept = all.iter().filter(|c| !removed.iter().any(|r| c["name"] == r.as_str())).cloned().collect();
    Value::Array(kept)
}
