//! TCP across the boundary between the host's network namespace and the real node's.
//!
//! The control plane, the tunnel servers and the test process live on the host's 127.0.0.1; the
//! kubelet, containerd and the pods live in a network namespace the ground made (see `node`). No
//! route, veth or NAT joins the two: a socket belongs to the namespace its creating thread was in
//! when it called socket(2), so a thread that enters the node's namespace with setns(2) can make
//! sockets there and hand them back. Two plumbings are built on that:
//!
//! - [`PortBridge`]: a listener inside the node's namespace (0.0.0.0:PORT there) whose
//!   connections are relayed to 127.0.0.1:PORT on the host -- how the kubelet reaches the
//!   apiserver and pods reach tunnel servers and webhooks.
//! - [`EgressProxy`]: an HTTP CONNECT proxy on a Unix socket, which the apiserver's
//!   `EgressSelectorConfiguration` uses for all its "cluster" traffic (kubelets for logs/exec,
//!   webhooks): loopback targets are dialled on the host, every other address inside the node's
//!   namespace.
//!
//! Each relayed connection gets two plain threads: this is test plumbing for a few hundred
//! connections, and threads keep it independent of whichever tokio runtime a test runs.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::{Error, Result};

/// An open handle on a network namespace (`/proc/PID/ns/net`), valid as long as it is held even
/// if the process it came from exits.
#[derive(Clone)]
pub struct Netns(Arc<File>);

impl Netns {
    pub fn of_pid(pid: u32) -> Result<Netns> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        File::open(&path).map(|f| Netns(Arc::new(f))).map_err(|e| Error::io(&path, e))
    }

    /// Runs `make` on a fresh thread that has entered this namespace; whatever sockets it
    /// creates belong to the namespace, wherever they are used afterwards.
    pub fn run<T: Send + 'static>(
        &self,
        make: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let ns = self.0.clone();
        std::thread::spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            make()
        })
        .join()
        .map_err(|_| std::io::Error::other("thread creating a socket in the node's network namespace panicked"))?
    }

    /// A TCP connection made from inside this namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.run(move || TcpStream::connect_timeout(&addr, timeout))
    }
}

/// Copies both ways until either side ends, then closes both fully (a half-closed relay would
/// keep the other side waiting forever).
fn splice(a: TcpStream, b: TcpStream) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let one_way = |mut from: TcpStream, mut to: TcpStream| {
        move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        }
    };
    let t = std::thread::spawn(one_way(a, b2));
    one_way(b, a2)();
    let _ = t.join();
}

/// Listens on 0.0.0.0:`port` inside a namespace and relays each connection to 127.0.0.1:`port`
/// on the host. Stops accepting when dropped.
pub struct PortBridge {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl PortBridge {
    pub fn start(ns: &Netns, port: u16) -> Result<PortBridge> {
        let listener = ns
            .run(move || TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
            .map_err(|e| Error::Setup(format!("listening on port {port} inside the node's network namespace: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || {
                    let target = SocketAddr::from(([127, 0, 0, 1], port));
                    if let Ok(host) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                        splice(conn, host);
                    }
                });
            }
        });
        Ok(PortBridge { port, stop })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The apiserver's way into the node: an HTTP CONNECT proxy on a Unix socket.
pub struct EgressProxy {
    socket: PathBuf,
    node: Arc<Mutex<Option<Netns>>>,
}

impl EgressProxy {
    pub fn start(socket: &Path) -> Result<EgressProxy> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|e| Error::io(socket, e))?;
        let node: Arc<Mutex<Option<Netns>>> = Arc::default();
        let node_ns = node.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let ns = node_ns.lock().unwrap_or_else(|p| p.into_inner()).clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve_connect(conn, ns) {
                        tracing::debug!(error = %e, "egress proxy connection failed");
                    }
                });
            }
        });
        Ok(EgressProxy { socket: socket.to_path_buf(), node })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// From now on, non-loopback targets are dialled inside `ns`.
    pub fn route_cluster_to(&self, ns: Option<Netns>) {
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = ns;
    }

    /// The apiserver's `--egress-selector-config-file` contents for this proxy.
    pub fn egress_selector_config(&self) -> String {
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n\
             - name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n      uds:\n        \
             udsName: {}\n",
            self.socket.display()
        )
    }
}

fn serve_connect(conn: UnixStream, node: Option<Netns>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Headers up to the blank line; the apiserver sends nothing after them before our reply.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut writer = conn.try_clone()?;
    let target = request_line
        .strip_prefix("CONNECT ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| t.parse::<SocketAddr>().ok());
    let Some(target) = target else {
        writer.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")?;
        return Ok(());
    };
    let dialled = if target.ip().is_loopback() {
        TcpStream::connect_timeout(&target, Duration::from_secs(10))
    } else if let Some(ns) = &node {
        ns.connect(target, Duration::from_secs(10))
    } else {
        Err(std::io::Error::other("no real node: nothing but loopback is reachable"))
    };
    let upstream = match dialled {
        Ok(s) => s,
        Err(e) => {
            writer.write_all(format!("HTTP/1.1 502 Bad Gateway\r\n\r\n{e}").as_bytes())?;
            return Ok(());
        }
    };
    writer.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    // Anything the reader buffered beyond the headers belongs to the tunnelled stream.
    let buffered = reader.buffer().to_vec();
    let mut up_w = upstream.try_clone()?;
    if !buffered.is_empty() {
        up_w.write_all(&buffered)?;
    }
    let mut up_r = upstream;
    let mut conn_r = reader.into_inner();
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut conn_r, &mut up_w);
        let _ = up_w.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_r, &mut writer);
    let _ = writer.shutdown(Shutdown::Write);
    let _ = t.join();
    Ok(())
}
