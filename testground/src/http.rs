//! Minimal HTTP over TCP for probes and backends: enough to prove a request crossed a tunnel,
//! with no client library between the test and the bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// `GET path` to `addr` with the given Host header (HTTP/1.1 with `Connection: close`: some
/// proxies answer HTTP/1.0 with 400), bounded to 10 seconds.
pub async fn get(addr: &str, host: &str, path: &str) -> std::io::Result<Response> {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: picotun-testground\r\nConnection: close\r\n\r\n");
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_response(&raw)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("GET http://{host}{path} via {addr}")))?
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {text:.200}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let headers =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    Ok(Response { status, headers, body: body.to_string() })
}

/// A local HTTP app: answers every request with `hello from <name>` and counts requests.
/// Stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> std::io::Result<Backend> {
        Self::start_on(0, name).await
    }

    /// On a given loopback port (0: any).
    pub async fn start_on(port: u16, name: &str) -> std::io::Result<Backend> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let body = format!("hello from {name}\n");
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let body = body.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    // Read the request head; the content does not matter.
                    let mut buf = vec![0u8; 8192];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(Backend { addr, name: name.to_string(), requests, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The body every response carries.
    pub fn greeting(&self) -> String {
        format!("hello from {}\n", self.name)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_headers_and_body() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\nX-A: b\r\n\r\nnope").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-a"), Some("b"));
        assert_eq!(r.body, "nope");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_err());
    }

    #[tokio::test]
    async fn backend_answers_and_counts() {
        let b = Backend::start("unit").await.unwrap();
        let r = get(&b.addr.to_string(), "x", "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hello from unit\n"));
        assert_eq!(b.requests(), 1);
    }
}
