//! An in-process SSH server that accepts any key and a session channel but never answers a
//! `tcpip-forward` request: the one fault of a tunnel server the real ones of the test ground
//! cannot produce (sish, sandhole and sshd always answer). Built on russh's server API.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use picotun_testground::SshClientKey;
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId};
use tokio::net::TcpListener;

/// What the server saw.
#[derive(Default)]
pub struct Seen {
    pub connections: AtomicUsize,
    pub forwards: AtomicUsize,
}

pub struct SilentServer {
    pub port: u16,
    /// `[127.0.0.1]:port key`, for the agent's --known-hosts.
    pub known_hosts: std::path::PathBuf,
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Handler {
    seen: Arc<Seen>,
}

impl server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_publickey(&mut self, _user: &str, _key: server::VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        _channel: ChannelId,
        _data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.seen.forwards.fetch_add(1, Ordering::SeqCst);
        // Never answer. (This also holds russh's session loop, so this server sends no keepalives
        // of its own; the test keeps the agent's keepalives out of its horizon instead.)
        std::future::pending().await
    }
}

impl SilentServer {
    pub async fn start() -> SilentServer {
        let dir = tempfile::tempdir().unwrap();
        let host_key = SshClientKey::generate(dir.path(), "host", "ed25519").unwrap();
        let key = russh::keys::load_secret_key(&host_key.private_key, None).unwrap();
        let config = Arc::new(server::Config {
            keys: vec![key],
            auth_rejection_time: std::time::Duration::from_millis(10),
            ..Default::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let known_hosts = dir.path().join("known_hosts");
        let public = host_key.public_line.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {public}\n")).unwrap();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                let (config, handler) = (config.clone(), Handler { seen: s.clone() });
                tokio::spawn(async move {
                    if let Ok(session) = server::run_stream(config, tcp, handler).await {
                        let _ = session.await;
                    }
                });
            }
        });
        SilentServer { port, known_hosts, seen, task, _dir: dir }
    }
}
