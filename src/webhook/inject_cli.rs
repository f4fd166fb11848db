//! `picotun inject -f FILE|-`: prints the injected version of Pods and workloads (multi-document
//! YAML) through the same code as the webhook -- for GitOps repositories and for review. What was
//! decided for each object, and any warning, goes to stderr.

use std::io::Read;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use serde_json::Value;

use crate::core::pod::{Decision, Workload};
use crate::webhook::inject;
use crate::webhook::{NativeSidecar, SidecarArgs};

#[derive(Clone, Debug, clap::Args)]
pub struct InjectArgs {
    /// The manifests to inject (`-` for standard input).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// The namespace of objects that name none.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// picotun's own namespace (never injected).
    #[arg(long, env = "POD_NAMESPACE", default_value = "pico-sh-system")]
    pub own_namespace: String,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] crate::webhook::SidecarConfigError),
    #[error("document {index}: not valid YAML: {reason}")]
    Yaml { index: usize, reason: String },
    #[error("document {index} ({what}): {reason}")]
    Object { index: usize, what: String, reason: String },
}

/// Where the pod template of each kind lives.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

pub fn run(args: &InjectArgs) -> Result<String, InjectError> {
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|source| InjectError::Read { path: args.file.clone(), source })?;
        s
    } else {
        std::fs::read_to_string(&args.file).map_err(|source| InjectError::Read { path: args.file.clone(), source })?
    };
    // Offline there is no apiserver to ask: native sidecars unless told otherwise. No ticket key
    // either: the webhook replaces a sidecar it did not inject (and tickets its own).
    let mut config = args.sidecar.inject_config(args.sidecar.native_sidecar != NativeSidecar::False)?;
    config.own_namespace = args.own_namespace.clone();
    inject_documents(&text, &args.namespace, &config)
}

/// Injects every document of a YAML stream; returns the new stream.
pub fn inject_documents(
    text: &str,
    default_namespace: &str,
    config: &inject::InjectConfig,
) -> Result<String, InjectError> {
    let mut out = Vec::new();
    // One document at a time (empty ones are skipped); the first broken one ends the stream.
    let mut bytes = text.as_bytes();
    for (index, doc) in serde_saphyr::read::<_, Value>(&mut bytes).enumerate() {
        let mut value = doc.map_err(|e| InjectError::Yaml { index, reason: e.to_string() })?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let name = value["metadata"]["name"].as_str().unwrap_or("<unnamed>").to_string();
        let what = format!("{kind}/{name}");
        let namespace = value["metadata"]["namespace"].as_str().unwrap_or(default_namespace).to_string();
        let err = |reason: String| InjectError::Object { index, what: what.clone(), reason };
        let outcome = if kind == "Pod" {
            let pod: Pod = serde_json::from_value(value.clone()).map_err(|e| err(e.to_string()))?;
            let outcome = inject::mutate(&pod, &namespace, None, &[], false, config);
            // Only an injected pod is written back (a skipped one may come back unchanged).
            if let (Decision::Inject { .. }, Some(p)) = (&outcome.decision, &outcome.pod) {
                value = serde_json::to_value(p).map_err(|e| err(e.to_string()))?;
            }
            Some(outcome)
        } else if let Some(path) = template_path(&kind) {
            let workload = Workload {
                reference: what.clone(),
                labels: serde_json::from_value(value["metadata"]["labels"].clone()).unwrap_or_default(),
                annotations: serde_json::from_value(value["metadata"]["annotations"].clone()).unwrap_or_default(),
            };
            let slot = path
                .iter()
                .try_fold(&mut value, |v, k| v.get_mut(*k))
                .ok_or_else(|| err("has no pod template".into()))?;
            let template: PodTemplateSpec = serde_json::from_value(slot.clone()).map_err(|e| err(e.to_string()))?;
            let pod = Pod { metadata: template.metadata.unwrap_or_default(), spec: template.spec, status: None };
            let outcome = inject::mutate(&pod, &namespace, Some(&workload), &[], false, config);
            if let (Decision::Inject { .. }, Some(p)) = (&outcome.decision, &outcome.pod) {
                let injected = PodTemplateSpec { metadata: Some(p.metadata.clone()), spec: p.spec.clone() };
                *slot = serde_json::to_value(injected).map_err(|e| err(e.to_string()))?;
            }
            Some(outcome)
        } else {
            None
        };
        match &outcome {
            Some(o) => {
                match &o.decision {
                    Decision::Inject { because } => {
                        eprintln!("{what}: injected ({because}; {} tunnels)", o.tunnels.len())
                    }
                    Decision::Skip { because, .. } => eprintln!("{what}: unchanged ({because})"),
                }
                for w in &o.warnings {
                    eprintln!("{what}: warning: {w}");
                }
            }
            None => eprintln!("{what}: unchanged (not a pod or workload)"),
        }
        out.push(serde_saphyr::to_string(&value).map_err(|e| err(e.to_string()))?);
    }
    Ok(out.join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template with its own volume named like picotun's is passed through unchanged (the
    /// warning goes to stderr), never written out as a pod the apiserver would reject.
    #[test]
    fn a_template_with_a_volume_named_like_picotuns_is_left_as_it_is() {
        let input = r#"
{apiVersion: apps/v1, kind: Deployment, metadata: {name: web, annotations: {tunnels.pico.sh/inject: "true"}},
 spec: {selector: {matchLabels: {app: web}}, template: {metadata: {labels: {app: web}}, spec: {
   containers: [{name: web, image: nginx}], volumes: [{name: picotun-tunnels, emptyDir: {}}]}}}}
"#;
        let out = inject_documents(input, "default", &inject::InjectConfig::default()).unwrap();
        let doc: Value = serde_saphyr::from_str(&out).unwrap();
        let want: Value = serde_saphyr::from_str(input).unwrap();
        assert_eq!(doc, want);
    }

    #[test]
    fn injects_workload_templates_and_passes_the_rest() {
        let input = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  annotations:
    tunnels.pico.sh/expose: "http:demo=8080"
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "@daily"
  jobTemplate:
    spec:
      template:
        metadata: {labels: {tunnels.pico.sh/inject: "true"}}
        spec: {restartPolicy: Never, containers: [{name: job, image: busybox}]}
"#;
        let out = inject_documents(input, "default", &inject::InjectConfig::default()).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["spec"]["template"]["spec"]["initContainers"][0]["name"], "picotun-agent");
        let tunnels =
            docs[0]["spec"]["template"]["metadata"]["annotations"]["tunnels.pico.sh/tunnels"].as_str().unwrap();
        assert!(tunnels.contains("\"host\":\"demo\""), "{tunnels}");
        assert_eq!(docs[1]["kind"], "Service");
        assert!(docs[1]["spec"].get("template").is_none());
        assert_eq!(
            docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][0]["restartPolicy"],
            "Always"
        );
        // Injecting the output again changes nothing.
        let again = inject_documents(&out, "default", &inject::InjectConfig::default()).unwrap();
        assert_eq!(again, out);
    }

    /// What kubectl (YAML 1.1) would read as another type stays a string on the way out, and
    /// nothing else changes on the way through.
    #[test]
    fn strings_that_look_like_other_types_stay_strings() {
        let input = r##"
apiVersion: v1
kind: ConfigMap
metadata: {name: quirks, annotations: {a: "yes", b: "on", c: "0755", d: "1e3", e: "~", f: "null", g: "", h: "8080", i: "true", j: "- x", k: "a: b", l: "#c", m: "multi\nline\n"}}
data: {n: "012", o: "0x1F", p: "1_000", q: "y", r: "NO", s: ".inf"}
"##;
        let out = inject_documents(input, "default", &inject::InjectConfig::default()).unwrap();
        let doc: Value = serde_saphyr::from_str(&out).unwrap();
        let want: Value = serde_saphyr::from_str(input).unwrap();
        assert_eq!(doc, want, "{out}");
        for (key, value) in want["metadata"]["annotations"].as_object().unwrap() {
            assert!(value.is_string(), "{key}: {value}");
        }
        // A YAML 1.1 reader takes an unquoted yes/on/y/NO/0755 for a bool or an octal number.
        for quirk in ["yes", "on", "y", "NO", "0755", "012", "~", "null"] {
            assert!(!out.contains(&format!(": {quirk}\n")), "{quirk} is written unquoted:\n{out}");
        }
    }

    #[test]
    fn broken_documents_are_named() {
        let err = inject_documents("kind: Pod\nspec: [", "default", &inject::InjectConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("document 0: not valid YAML"), "{err}");
        let err = inject_documents(
            "kind: Deployment\nmetadata: {name: x}\nspec: {}\n",
            "default",
            &inject::InjectConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("Deployment/x") && err.to_string().contains("no pod template"), "{err}");
    }
}
