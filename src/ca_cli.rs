//! `picotun ca create|import`: the SSH CA the webhook signs each sidecar's certificate with, as a
//! Secret manifest for picotun's namespace (stdout, for `kubectl apply`), and what the pico.sh
//! account admin registers (stderr). The private key is written to stdout inside the manifest and
//! nowhere else: not to stderr, not to a file, not to a log.

use std::path::PathBuf;

use base64::Engine;

use crate::sshca::{SshCa, TUNS_PRINCIPAL};

#[derive(Clone, Debug, clap::Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub action: CaAction,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum CaAction {
    /// Makes a new ed25519 CA and prints its Secret manifest.
    Create(SecretArgs),
    /// Prints the Secret manifest for your own CA key (an unencrypted OpenSSH ed25519 private key).
    Import {
        /// The CA's private key file (e.g. from `ssh-keygen -t ed25519 -N '' -f ca`).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(Clone, Debug, clap::Args)]
pub struct SecretArgs {
    /// picotun's namespace (where the webhook runs and mounts the Secret).
    #[arg(long, default_value = "pico-sh-system")]
    pub namespace: String,
    /// The Secret's name.
    #[arg(long, default_value = "picotun-ssh-ca")]
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CaCliError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
}

/// What the command prints: the manifest (stdout) and the instructions (stderr).
pub struct Printed {
    pub manifest: String,
    pub instructions: String,
}

pub fn run(args: &CaArgs) -> Result<Printed, CaCliError> {
    match &args.action {
        CaAction::Create(secret) => Ok(print(&SshCa::generate("picotun-ssh-ca"), secret, true)),
        CaAction::Import { key, secret } => {
            let text = std::fs::read_to_string(key).map_err(|source| CaCliError::Read { path: key.clone(), source })?;
            let ca =
                SshCa::from_openssh(&text).map_err(|e| CaCliError::Key { path: key.clone(), reason: e.to_string() })?;
            Ok(print(&ca, secret, false))
        }
    }
}

/// The Secret for `ca` and what to tell the user.
pub fn print(ca: &SshCa, secret: &SecretArgs, created: bool) -> Printed {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let manifest = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret.name,
            "namespace": secret.namespace,
            "labels": {"app.kubernetes.io/name": "picotun"},
        },
        "type": "Opaque",
        "data": {"ca": b64(&ca.to_openssh()), "ca.pub": b64(&ca.public_line())},
    });
    let manifest = serde_saphyr::to_string(&manifest).expect("a JSON value is YAML");
    let what = if created { "a new ed25519 SSH CA" } else { "your SSH CA" };
    let instructions = format!(
        "picotun ca: the Secret {ns}/{name} for {what} ({fingerprint}) is on stdout. Apply it with\n\
         \n    picotun ca {cmd} | kubectl apply --server-side -f -\n\
         \n(server-side: kubectl keeps no copy of the key in a last-applied annotation). The webhook reads it\n\
         from /etc/picotun/ssh-ca and signs each sidecar's own key with it: principal {TUNS_PRINCIPAL},\n\
         key id namespace/pod, valid for hours.\n\
         \nThen register the CA's public key with pico.sh, once, as the account admin: add this line to the\n\
         account's Public Keys in the pico TUI (ssh pico.sh):\n\
         \n    {public}\n\
         \nCertificates signed by it with the principal {TUNS_PRINCIPAL} open tunnels and nothing else of the\n\
         account; their key id shows in pico's access logs. Keep the private key only in that Secret.\n",
        ns = secret.namespace,
        name = secret.name,
        fingerprint = ca.fingerprint(),
        cmd = if created { "create".to_string() } else { "import --key FILE".to_string() },
        public = ca.public_line(),
    );
    Printed { manifest, instructions }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> SecretArgs {
        SecretArgs { namespace: "pico-sh-system".into(), name: "picotun-ssh-ca".into() }
    }

    fn decode(manifest: &str) -> (serde_json::Value, SshCa, String) {
        let doc: serde_json::Value = serde_saphyr::from_str(manifest).unwrap();
        let field = |k: &str| {
            let b = base64::engine::general_purpose::STANDARD.decode(doc["data"][k].as_str().unwrap()).unwrap();
            String::from_utf8(b).unwrap()
        };
        let ca = SshCa::from_openssh(&field("ca")).unwrap();
        let public = field("ca.pub");
        (doc, ca, public)
    }

    #[test]
    fn create_prints_a_secret_holding_the_key_and_its_public_line() {
        let ca = SshCa::from_seed(&[6; 32], "picotun-ssh-ca");
        let printed = print(&ca, &secret(), true);
        let (doc, again, public) = decode(&printed.manifest);
        assert_eq!(doc["kind"], "Secret");
        assert_eq!(doc["metadata"]["name"], "picotun-ssh-ca");
        assert_eq!(doc["metadata"]["namespace"], "pico-sh-system");
        assert_eq!(doc["metadata"]["labels"]["app.kubernetes.io/name"], "picotun");
        assert_eq!(again.public_line(), ca.public_line(), "the key round-trips");
        assert_eq!(public, ca.public_line());
        // The instructions carry the public line and how to register it, never the key.
        let text = &printed.instructions;
        assert!(text.contains(&ca.public_line()) && text.contains("ssh pico.sh") && text.contains("tuns"), "{text}");
        assert!(text.contains("kubectl apply"), "{text}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        let key_b64 = doc["data"]["ca"].as_str().unwrap();
        assert!(!text.contains(key_b64) && !text.contains(&ca.to_openssh()));
        // Other names and namespaces.
        let other = print(&ca, &SecretArgs { namespace: "tunnels".into(), name: "my-ca".into() }, true);
        let (doc, _, _) = decode(&other.manifest);
        assert_eq!(
            (doc["metadata"]["namespace"].as_str(), doc["metadata"]["name"].as_str()),
            (Some("tunnels"), Some("my-ca"))
        );
    }

    #[test]
    fn two_creates_make_two_cas() {
        let args = CaArgs { action: CaAction::Create(secret()) };
        let a = decode(&run(&args).unwrap().manifest).1;
        let b = decode(&run(&args).unwrap().manifest).1;
        assert_ne!(a.public_line(), b.public_line());
    }

    #[test]
    fn import_takes_the_users_key_and_refuses_others_without_quoting_them() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SshCa::from_seed(&[7; 32], "my-ca");
        let path = dir.path().join("ca");
        std::fs::write(&path, ca.to_openssh()).unwrap();
        let import = |key: &std::path::Path| CaArgs { action: CaAction::Import { key: key.into(), secret: secret() } };
        let printed = run(&import(&path)).unwrap();
        assert_eq!(decode(&printed.manifest).1.public_line(), ca.public_line());
        assert!(printed.instructions.contains("your SSH CA"));

        let broken = dir.path().join("broken");
        std::fs::write(
            &broken,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = run(&import(&broken)).err().unwrap().to_string();
        assert!(err.contains("not an unencrypted OpenSSH ed25519 private key") && !err.contains("c2VjcmV0"), "{err}");
        let err = run(&import(&dir.path().join("missing"))).err().unwrap().to_string();
        assert!(err.contains("cannot read"), "{err}");
    }
}
