//! The Gateway API (experimental channel, so TCPRoute exists) and cert-manager CRDs, read from the
//! Go module cache at the versions `testground/crds/go.mod` pins, applied server-side and waited
//! on until Established.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use crate::{Error, Result, bins, wait_for};

const CRDS_GO_MOD: &str = "testground/crds/go.mod";
const FIELD_MANAGER: &str = "picotun-testground";

/// Every CRD file the ground installs.
pub fn crd_files() -> Result<Vec<PathBuf>> {
    let gateway = bins::module_source(CRDS_GO_MOD, "sigs.k8s.io/gateway-api")?.join("config/crd/experimental");
    let cert_manager = bins::module_source(CRDS_GO_MOD, "github.com/cert-manager/cert-manager")?.join("deploy/crds");
    let mut files = Vec::new();
    for dir in [gateway, cert_manager] {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut yamls: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("kustomization.yaml"))
            .collect();
        yamls.sort();
        files.extend(yamls);
    }
    Ok(files)
}

/// The CustomResourceDefinitions in a (multi-document) YAML file. Other kinds are skipped: the
/// Gateway API's safe-upgrades ValidatingAdmissionPolicy only guards channel downgrades.
pub fn crds_in(path: &Path) -> Result<Vec<CustomResourceDefinition>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut crds = Vec::new();
    let mut bytes = text.as_bytes();
    for doc in serde_saphyr::read::<_, serde_json::Value>(&mut bytes) {
        let value = doc.map_err(|e| Error::Setup(format!("{}: not valid YAML: {e}", path.display())))?;
        if value.get("kind").and_then(|k| k.as_str()) == Some("CustomResourceDefinition") {
            crds.push(
                serde_json::from_value(value)
                    .map_err(|e| Error::Setup(format!("{}: not a CustomResourceDefinition: {e}", path.display())))?,
            );
        }
    }
    Ok(crds)
}

/// Applies every CRD and waits until all are Established.
pub async fn install_all(client: &Client) -> Result<Vec<String>> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for file in crd_files()? {
        for crd in crds_in(&file)? {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd)).await?;
            names.push(name);
        }
    }
    for name in &names {
        wait_for(&format!("CRD {name} Established"), Duration::from_secs(60), Duration::from_millis(100), || async {
            let crd = api.get(name).await.map_err(|e| e.to_string())?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"));
            Ok(established.then_some(()))
        })
        .await?;
    }
    Ok(names)
}
