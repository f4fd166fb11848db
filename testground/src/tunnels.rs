//! Real SSH tunnel servers on loopback: OpenSSH sshd, sandhole and sish, each with a generated
//! host key (so clients can pin it) and a set of authorized client keys. They can be killed and
//! restarted on the same ports for fault tests. sshd can also trust an SSH CA
//! ([`TunnelServer::start_sshd`] with [`SshdOptions`]): certificates it signed log in when they
//! carry an accepted principal (`tuns`, as on pico.sh). Stock sish and sandhole take keys only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::process::{self, Proc};
use crate::{Error, Result, bins, free_port, wait_for, write_file};

/// The test domain under which sish and sandhole serve HTTP names.
pub const SISH_DOMAIN: &str = "tuns.test";
pub const SANDHOLE_DOMAIN: &str = "sandhole.test";

/// An SSH key pair made with ssh-keygen (OpenSSH format).
#[derive(Clone, Debug)]
pub struct SshClientKey {
    pub private_key: PathBuf,
    pub public_line: String,
}

impl SshClientKey {
    /// Generates a key of `kind` (`ed25519`, `ecdsa`, `rsa`) at `dir/name`.
    pub fn generate(dir: &Path, name: &str, kind: &str) -> Result<SshClientKey> {
        let private_key = dir.join(name);
        ssh_keygen(&private_key, kind, name)?;
        let pub_path = private_key.with_extension("pub");
        let public_line = std::fs::read_to_string(&pub_path).map_err(|e| Error::io(&pub_path, e))?.trim().to_string();
        Ok(SshClientKey { private_key, public_line })
    }
}

fn ssh_keygen(path: &Path, kind: &str, comment: &str) -> Result<()> {
    // ssh-keygen asks before overwriting; a key at this path is always ours to replace.
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", comment, "-f"])
        .arg(path)
        .status()
        .map_err(|e| Error::Spawn { name: "ssh-keygen (package openssh-client)".into(), source: e })?;
    if !status.success() {
        return Err(Error::Setup(format!("ssh-keygen -t {kind} -f {} failed: {status}", path.display())));
    }
    Ok(())
}

/// What an OpenSSH sshd accepts besides its authorized keys (the default: nothing else).
#[derive(Clone, Debug, Default)]
pub struct SshdOptions {
    /// CA public key lines (`ssh-ed25519 AAAA...`) for `TrustedUserCAKeys`: user certificates
    /// they signed log in, within their validity. Empty: keys only.
    pub trusted_user_ca_keys: Vec<String>,
    /// With CA keys: the principals the login user accepts (`AuthorizedPrincipalsFile`); a
    /// certificate must carry one of them. Empty means `tuns`, pico.sh's tunnels-only principal.
    pub authorized_principals: Vec<String>,
}

/// The principal pico.sh grants tunnels to.
pub const TUNS_PRINCIPAL: &str = "tuns";

/// Which server, with its options.
#[derive(Clone, Debug)]
pub enum ServerKind {
    /// OpenSSH sshd: public TCP ports only, no names, no session text. Keys only unless started
    /// with [`TunnelServer::start_sshd`].
    Sshd,
    /// sandhole: HTTP names under [`SANDHOLE_DOMAIN`], public TCP ports; load-balances names
    /// unless told otherwise (`--load-balancing=deny|replace`).
    Sandhole(SandholeOptions),
    /// sish, the software behind tuns.sh: HTTP names `<name>-<user>.tuns.test` (stock sish puts
    /// the user last; tuns.sh first), public TCP ports; load balancing off unless asked for.
    Sish(SishOptions),
}

/// Extra sandhole flags, e.g. `--load-balancing=deny` (one holder per name).
#[derive(Clone, Debug, Default)]
pub struct SandholeOptions {
    pub extra_args: Vec<String>,
}

/// sish's server-side switches that change what clients see.
#[derive(Clone, Debug, Default)]
pub struct SishOptions {
    /// `--http-load-balancer --tcp-load-balancer --sni-load-balancer --alias-load-balancer`:
    /// several connections asking for one name share it round-robin. Off (as on tuns.sh), a
    /// later connection asking for a name or port that is held gets a random one instead, with
    /// `The subdomain ... is unavailable. Assigning a random subdomain.`
    pub load_balancer: bool,
    /// Anything else, passed through verbatim (later flags win).
    pub extra_args: Vec<String>,
}

/// sish's flags for a loopback server that behaves like tuns.sh. Names as in sish's own
/// `--help` (github.com/antoniomika/sish at 9609e83); sish's defaults noted where they differ.
fn sish_args(ssh_port: u16, http_port: u16, keys_dir: &Path, private_keys: &Path, opts: &SishOptions) -> Vec<String> {
    let mut args = vec![
        format!("--ssh-address=127.0.0.1:{ssh_port}"),
        format!("--http-address=127.0.0.1:{http_port}"),
        "--https=false".into(),
        format!("--domain={SISH_DOMAIN}"),
        // Public-key authentication only, against the keys in this directory.
        format!("--authentication-keys-directory={}", keys_dir.display()),
        format!("--private-keys-directory={}", private_keys.display()),
        // Requested names, ports and aliases are honoured (sish's defaults are all `true`:
        // every forward would get a random one).
        "--bind-random-subdomains=false".into(),
        "--bind-random-ports=false".into(),
        "--bind-random-aliases=false".into(),
        // Port 443 as well as sish's default 1024-65535: an SNI-proxied (TLS passthrough) forward
        // asks for the HTTPS port, as on tuns.sh; the ground runs as root, so it can bind it.
        "--port-bind-range=0,443,1024-65535".into(),
        // The user in the name, as on tuns.sh. Stock sish appends it: `{name}-{user}`; tuns.sh
        // documents `{user}-{name}`.
        "--append-user-to-subdomain=true".into(),
        "--append-user-to-subdomain-separator=-".into(),
        // Every public TCP listener on loopback, whatever bind address a client sends.
        "--tcp-address=127.0.0.1".into(),
        "--force-tcp-address=true".into(),
        // The per-connection options tuns.sh documents (`sni-proxy=true`, `tcp-alias=true`,
        // `proxy-protocol=1|2`), each gated by a server flag.
        "--sni-proxy=true".into(),
        "--tcp-aliases=true".into(),
        "--proxy-protocol=true".into(),
        "--proxy-protocol-version=userdefined".into(),
        // No DNS lookups, no HTML templates from a relative path, no redirect of the root domain
        // to github.com, no log file in /tmp: logs go to stdout (the server's log file here).
        "--verify-dns=false".into(),
        "--load-templates=false".into(),
        "--redirect-root=false".into(),
        "--log-to-file=false".into(),
        "--log-to-stdout=true".into(),
    ];
    for lb in ["http", "tcp", "sni", "alias"] {
        args.push(format!("--{lb}-load-balancer={}", opts.load_balancer));
    }
    args
}

/// A running tunnel server.
pub struct TunnelServer {
    kind: ServerKind,
    dir: PathBuf,
    ssh_port: u16,
    http_port: Option<u16>,
    host_key_public: String,
    known_hosts: PathBuf,
    command: (PathBuf, Vec<String>),
    proc: Option<Proc>,
    starts: u32,
}

impl TunnelServer {
    /// Starts `kind` on free loopback ports, accepting `authorized` client keys.
    pub async fn start(kind: ServerKind, authorized: &[&SshClientKey]) -> Result<TunnelServer> {
        Self::start_with(kind, authorized, &SshdOptions::default()).await
    }

    /// Starts OpenSSH sshd accepting `authorized` keys and, with `options`, certificates.
    pub async fn start_sshd(options: &SshdOptions, authorized: &[&SshClientKey]) -> Result<TunnelServer> {
        Self::start_with(ServerKind::Sshd, authorized, options).await
    }

    async fn start_with(kind: ServerKind, authorized: &[&SshClientKey], sshd: &SshdOptions) -> Result<TunnelServer> {
        // The ports are picked free and bound by the server a moment later. `free_port` picks
        // them where neither port-0 listeners nor outgoing connections land, and never twice in
        // this process; a process elsewhere binding the same port explicitly in between is still
        // possible. That server's own message is all there is to tell it by (it is another
        // program's log), and only that is retried, on fresh ports.
        let mut attempt = 1;
        loop {
            match Self::start_once(kind.clone(), authorized, sshd).await {
                Err(e) if attempt < 3 && e.to_string().to_lowercase().contains("address already in use") => {
                    attempt += 1
                }
                result => return result,
            }
        }
    }

    async fn start_once(kind: ServerKind, authorized: &[&SshClientKey], sshd: &SshdOptions) -> Result<TunnelServer> {
        let name = kind.name();
        let dir = tempfile::Builder::new()
            .prefix(&format!("picotun-{name}-"))
            .tempdir()
            .map_err(|e| Error::io(&std::env::temp_dir(), e))?
            .keep();
        process::remove_at_exit(&dir);
        let host_key = dir.join("host_ed25519");
        ssh_keygen(&host_key, "ed25519", name)?;
        let host_pub_path = host_key.with_extension("pub");
        let host_key_public = {
            let line = std::fs::read_to_string(&host_pub_path).map_err(|e| Error::io(&host_pub_path, e))?;
            // "ssh-ed25519 AAAA... comment" -> "ssh-ed25519 AAAA..."
            line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
        };
        let keys_dir = dir.join("authorized");
        std::fs::create_dir_all(&keys_dir).map_err(|e| Error::io(&keys_dir, e))?;
        let authorized_keys: String = authorized.iter().map(|k| format!("{}\n", k.public_line)).collect();
        for (i, key) in authorized.iter().enumerate() {
            write_file(&keys_dir.join(format!("client{i}.pub")), format!("{}\n", key.public_line))?;
        }
        let ssh_port = free_port();
        let known_hosts = dir.join("known_hosts");
        write_file(&known_hosts, format!("[127.0.0.1]:{ssh_port} {host_key_public}\n"))?;

        let (command, http_port) = match &kind {
            ServerKind::Sshd => {
                let config = dir.join("sshd_config");
                let authorized_file = dir.join("authorized_keys");
                write_file(&authorized_file, &authorized_keys)?;
                let mut text = sshd_config(ssh_port, &host_key, &authorized_file);
                if !sshd.trusted_user_ca_keys.is_empty() {
                    let cas = dir.join("trusted_user_ca_keys");
                    write_file(&cas, sshd.trusted_user_ca_keys.iter().map(|l| format!("{l}\n")).collect::<String>())?;
                    let principals = dir.join("authorized_principals");
                    let list = if sshd.authorized_principals.is_empty() {
                        vec![TUNS_PRINCIPAL.to_string()]
                    } else {
                        sshd.authorized_principals.clone()
                    };
                    write_file(&principals, list.iter().map(|p| format!("{p}\n")).collect::<String>())?;
                    text.push_str(&format!(
                        "# User certificates signed by these CAs, carrying one of these principals.\n\
                         TrustedUserCAKeys {}\n\
                         AuthorizedPrincipalsFile {}\n",
                        cas.display(),
                        principals.display()
                    ));
                }
                write_file(&config, text)?;
                // sshd refuses to start as root without its privilege-separation directory.
                if nix::unistd::geteuid().is_root() {
                    let _ = std::fs::create_dir_all("/run/sshd");
                }
                let args = vec!["-D".into(), "-e".into(), "-f".into(), config.display().to_string()];
                ((bins::sshd()?, args), None)
            }
            ServerKind::Sandhole(opts) => {
                let http_port = free_port();
                let admin_keys = dir.join("admin-keys");
                let certs = dir.join("certificates");
                for d in [&admin_keys, &certs] {
                    std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
                }
                let args = vec![
                    format!("--domain={SANDHOLE_DOMAIN}"),
                    "--listen-address=127.0.0.1".into(),
                    format!("--ssh-port={ssh_port}"),
                    format!("--http-port={http_port}"),
                    format!("--https-port={}", free_port()),
                    format!("--user-keys-directory={}", keys_dir.display()),
                    format!("--admin-keys-directory={}", admin_keys.display()),
                    format!("--certificates-directory={}", certs.display()),
                    format!("--private-key-file={}", host_key.display()),
                    "--bind-hostnames=none".into(),
                    "--allow-requested-subdomains".into(),
                    "--allow-requested-ports".into(),
                    "--disable-https".into(),
                    "--disable-udp".into(),
                ];
                let mut args = args;
                args.extend(opts.extra_args.iter().cloned());
                ((bins::bin("sandhole")?, args), Some(http_port))
            }
            ServerKind::Sish(opts) => {
                let http_port = free_port();
                let private_keys = dir.join("private-keys");
                std::fs::create_dir_all(&private_keys).map_err(|e| Error::io(&private_keys, e))?;
                std::fs::copy(&host_key, private_keys.join("ssh_key")).map_err(|e| Error::io(&host_key, e))?;
                let mut args = sish_args(ssh_port, http_port, &keys_dir, &private_keys, opts);
                args.extend(opts.extra_args.iter().cloned());
                let sish = bins::bin("sish").map_err(|_| Error::MissingBinary {
                    name: "sish".into(),
                    dir: bins::bin_dir(),
                    hint: ". sish is what tuns.sh runs, and every test that stands for tuns.sh needs it: \
                           `scripts/build-testground` builds it from the source tarball \
                           sish-9609e83.tar.gz (in $PICOTUN_THIRD_PARTY or ../shared/third_party; \
                           github.com/antoniomika/sish at commit 9609e83), or else with `go install` \
                           where the Go module proxy serves github.com/antoniomika/sish"
                        .into(),
                })?;
                ((sish, args), Some(http_port))
            }
        };
        let mut server = TunnelServer {
            kind,
            dir,
            ssh_port,
            http_port,
            host_key_public,
            known_hosts,
            command,
            proc: None,
            starts: 0,
        };
        server.restart().await?;
        Ok(server)
    }

    /// (Re)starts the server on the same ports with the same keys, and waits until it answers
    /// SSH (and HTTP, where it serves HTTP). Stops it first if it is running.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(2));
        }
        self.starts += 1;
        let mut cmd = Command::new(&self.command.0);
        cmd.args(&self.command.1).current_dir(&self.dir);
        if let ServerKind::Sish(_) = self.kind {
            // sish makes a unix socket per forward with os.CreateTemp("", ...): keep them in the
            // server's directory, which goes when the test does, even after a SIGKILL.
            let tmp = self.dir.join("tmp");
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            cmd.env("TMPDIR", &tmp);
        }
        let log = self.dir.join(format!("{}.log", self.kind.name()));
        let mut proc = Proc::spawn(self.kind.name(), cmd, &log)?;
        let ssh_port = self.ssh_port;
        let res = wait_for(
            &format!("{} to answer SSH on 127.0.0.1:{ssh_port}", self.kind.name()),
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                let running = proc.check_running().map_err(|e| e.to_string());
                async move {
                    running?;
                    ssh_banner(ssh_port).await.map(Some)
                }
            },
        )
        .await;
        if let Err(e) = res {
            return Err(proc.check_running().err().unwrap_or(e));
        }
        if let Some(http_port) = self.http_port {
            wait_for("HTTP port", Duration::from_secs(10), Duration::from_millis(50), || async move {
                TcpStream::connect(("127.0.0.1", http_port)).await.map(|_| Some(())).map_err(|e| e.to_string())
            })
            .await?;
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// Replaces the authorized client keys: sshd reads its file at each login; sish and sandhole
    /// watch their directory (give them a moment).
    pub fn set_authorized_keys(&self, authorized: &[&SshClientKey]) -> Result<()> {
        match self.kind {
            ServerKind::Sshd => {
                let file = self.dir.join("authorized_keys");
                let tmp = self.dir.join("authorized_keys.tmp");
                write_file(&tmp, authorized.iter().map(|k| format!("{}\n", k.public_line)).collect::<String>())?;
                std::fs::rename(&tmp, &file).map_err(|e| Error::io(&file, e))
            }
            _ => {
                let keys_dir = self.dir.join("authorized");
                for entry in std::fs::read_dir(&keys_dir).map_err(|e| Error::io(&keys_dir, e))?.flatten() {
                    let _ = std::fs::remove_file(entry.path());
                }
                for (i, key) in authorized.iter().enumerate() {
                    write_file(&keys_dir.join(format!("client{i}.pub")), format!("{}\n", key.public_line))?;
                }
                Ok(())
            }
        }
    }

    /// SIGKILLs the server (a crash). `restart` brings it back.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn kind(&self) -> &ServerKind {
        &self.kind
    }

    pub fn ssh_port(&self) -> u16 {
        self.ssh_port
    }

    /// `127.0.0.1:<ssh port>`
    pub fn ssh_addr(&self) -> String {
        format!("127.0.0.1:{}", self.ssh_port)
    }

    /// The port serving HTTP names (sish, sandhole).
    pub fn http_port(&self) -> Option<u16> {
        self.http_port
    }

    /// The server's host key, `ssh-ed25519 AAAA...`.
    pub fn host_key(&self) -> &str {
        &self.host_key_public
    }

    /// A known_hosts file pinning the host key for `[127.0.0.1]:<ssh port>`.
    pub fn known_hosts(&self) -> &Path {
        &self.known_hosts
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.dir.join(format!("{}.log", self.kind.name())), lines)
    }

    /// The public host name a forward requesting `name` gets on this server, for `user`.
    pub fn http_host(&self, user: &str, name: &str) -> String {
        match self.kind {
            // What stock sish prints with --append-user-to-subdomain (tuns.sh: `{user}-{name}`).
            ServerKind::Sish(_) => format!("{name}-{user}.{SISH_DOMAIN}"),
            ServerKind::Sandhole(_) => format!("{name}.{SANDHOLE_DOMAIN}"),
            ServerKind::Sshd => name.to_string(),
        }
    }

    /// The user to log in as: any name for sish and sandhole; a real account for sshd.
    pub fn login_user(&self, wanted: &str) -> String {
        match self.kind {
            ServerKind::Sshd => nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| "root".into()),
            _ => wanted.to_string(),
        }
    }

    /// An OpenSSH client that holds the remote forward `spec` (`-R spec`) open, with the host key
    /// pinned, exactly one identity offered, and failure to forward fatal. Its output goes to
    /// `<server dir>/<log_name>.log`.
    pub fn ssh_forward(&self, key: &SshClientKey, user: &str, spec: &str, log_name: &str) -> Result<Proc> {
        self.ssh_forward_as(key, None, user, spec, log_name)
    }

    /// [`TunnelServer::ssh_forward`] authenticating with `certificate` (an OpenSSH certificate
    /// file for `key`) instead of the plain key.
    pub fn ssh_forward_with_certificate(
        &self,
        key: &SshClientKey,
        certificate: &Path,
        user: &str,
        spec: &str,
        log_name: &str,
    ) -> Result<Proc> {
        self.ssh_forward_as(key, Some(certificate), user, spec, log_name)
    }

    fn ssh_forward_as(
        &self,
        key: &SshClientKey,
        certificate: Option<&Path>,
        user: &str,
        spec: &str,
        log_name: &str,
    ) -> Result<Proc> {
        let mut cmd = Command::new("ssh");
        cmd.args(["-N", "-T", "-p", &self.ssh_port.to_string(), "-i"]).arg(&key.private_key);
        if let Some(cert) = certificate {
            cmd.arg("-o").arg(format!("CertificateFile={}", cert.display()));
        }
        cmd.args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes"])
            .args(["-o", "ServerAliveInterval=5", "-o", "LogLevel=VERBOSE", "-F", "/dev/null"])
            .args(["-R", spec])
            .arg(format!("{}@127.0.0.1", self.login_user(user)));
        Proc::spawn("ssh", cmd, &self.dir.join(format!("{log_name}.log")))
    }
}

impl ServerKind {
    pub fn name(&self) -> &'static str {
        match self {
            ServerKind::Sshd => "sshd",
            ServerKind::Sandhole(_) => "sandhole",
            ServerKind::Sish(_) => "sish",
        }
    }
}

/// Reads the SSH identification line a server sends first.
async fn ssh_banner(port: u16) -> std::result::Result<(), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .map_err(|_| "no SSH banner within 2s".to_string())?
        .map_err(|e| e.to_string())?;
    if buf[..n].starts_with(b"SSH-2.0") {
        Ok(())
    } else {
        Err(format!("unexpected banner {:?}", String::from_utf8_lossy(&buf[..n])))
    }
}

fn sshd_config(port: u16, host_key: &Path, authorized_keys: &Path) -> String {
    format!(
        "# sshd as a plain tunnel provider: remote forwards only, on loopback.\n\
         Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {host_key}\n\
         PidFile none\n\
         AuthorizedKeysFile {authorized_keys}\n\
         StrictModes no\n\
         UsePAM no\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         AllowTcpForwarding remote\n\
         GatewayPorts clientspecified\n\
         PermitListen any\n\
         PermitOpen none\n\
         PermitTTY no\n\
         X11Forwarding no\n\
         AllowAgentForwarding no\n\
         ClientAliveInterval 5\n\
         ClientAliveCountMax 2\n\
         LogLevel VERBOSE\n",
        host_key = host_key.display(),
        authorized_keys = authorized_keys.display(),
    )
}

/// A fresh free port for a public TCP forward, paired with the spec OpenSSH's `-R` takes for it
/// on each server: sish and sandhole bind `localhost`, sshd binds 127.0.0.1.
pub fn public_tcp_spec(kind: &ServerKind, local_port: u16) -> (u16, String) {
    let public = free_port();
    let bind = match kind {
        ServerKind::Sshd => "127.0.0.1",
        _ => "localhost",
    };
    (public, format!("{bind}:{public}:127.0.0.1:{local_port}"))
}
