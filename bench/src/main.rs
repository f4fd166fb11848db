//! `loadgen`: the measuring half of picotun's benchmarks. Plain TCP on loopback only.
//!
//! ```text
//! loadgen apps SINK SOURCE ECHO        the "app": a sink, a source and an echo server
//! loadgen delay LISTEN UPSTREAM MS     a TCP relay adding MS milliseconds each way
//! loadgen measure KIND ADDR [ARGS]     one measurement, printed as a number
//!     in ADDR MiB [STREAMS]            throughput into the app (MB/s)
//!     out ADDR MiB [STREAMS]           throughput out of the app (MB/s)
//!     rtt ADDR COUNT                   small-message round trips: "p50 p99" in microseconds
//!     setup ADDR COUNT                 new connection to first echoed byte: "p50 p99" in microseconds
//! loadgen admission ADDR CA BODY CONCURRENCY SECONDS [RATE]
//!                                      POST BODY to https://ADDR/mutate over keep-alive TLS
//!                                      connections (CA verifies the server), closed loop or paced
//!                                      at RATE requests/s in total: "rps p50_us p99_us errors"
//! loadgen noop-webhook LISTEN CERT KEY [TOUCH_NAMESPACE]
//!                                      an admission webhook that answers every AdmissionReview
//!                                      "allowed", no patch, over TLS (HTTP/1.1 keep-alive, as
//!                                      picotun's webhook is served to the apiserver): the floor
//!                                      bench/src/podcreate.rs measures injection against. Pods
//!                                      in TOUCH_NAMESPACE get the smallest patch instead (one
//!                                      label): what the apiserver charges for any change
//! ```
//! The source app sends as many bytes as the first 8 bytes (big-endian) it reads ask for.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const MIB: u64 = 1024 * 1024;

fn usage() -> ! {
    eprintln!(
        "usage: loadgen apps SINK SOURCE ECHO | delay LISTEN UPSTREAM MS | measure in|out|rtt|setup ADDR N [STREAMS] \
         | admission ADDR CA BODY CONCURRENCY SECONDS [RATE] | noop-webhook LISTEN CERT KEY [TOUCH_NAMESPACE]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["apps", sink, source, echo] => apps(sink, source, echo).await,
        ["delay", listen, upstream, ms] => {
            delay(listen, upstream, Duration::from_millis(ms.parse().unwrap_or_else(|_| usage()))).await
        }
        ["admission", addr, ca, body, concurrency, seconds, rest @ ..] => {
            let rate: Option<f64> = rest.first().map(|r| r.parse().unwrap_or_else(|_| usage()));
            let (rps, p50, p99, errors) = admission(
                addr,
                ca,
                body,
                concurrency.parse().unwrap_or_else(|_| usage()),
                Duration::from_secs(seconds.parse().unwrap_or_else(|_| usage())),
                rate,
            )
            .await;
            println!("{rps:.0} {p50} {p99} {errors}");
        }
        ["noop-webhook", listen_addr, cert, key] => noop_webhook(listen_addr, cert, key, None).await,
        ["noop-webhook", listen_addr, cert, key, touch] => noop_webhook(listen_addr, cert, key, Some(touch)).await,
        ["measure", kind, addr, n, rest @ ..] => {
            let n: u64 = n.parse().unwrap_or_else(|_| usage());
            let streams: usize = rest.first().map(|s| s.parse().unwrap_or_else(|_| usage())).unwrap_or(1);
            match *kind {
                "in" => println!("{:.1}", throughput(addr, n * MIB, streams, true).await),
                "out" => println!("{:.1}", throughput(addr, n * MIB, streams, false).await),
                "rtt" => {
                    let (p50, p99) = rtt(addr, n as usize).await;
                    println!("{p50} {p99}")
                }
                "setup" => {
                    let (p50, p99) = setup(addr, n as usize).await;
                    println!("{p50} {p99}")
                }
                _ => usage(),
            }
        }
        _ => usage(),
    }
}

async fn listen(addr: &str) -> TcpListener {
    TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

async fn apps(sink: &str, source: &str, echo: &str) {
    let (sink, source, echo) = (listen(sink).await, listen(source).await, listen(echo).await);
    let sink = tokio::spawn(async move {
        while let Ok((mut s, _)) = sink.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    let source = tokio::spawn(async move {
        while let Ok((mut s, _)) = source.accept().await {
            tokio::spawn(async move {
                let mut want = [0u8; 8];
                if s.read_exact(&mut want).await.is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(want);
                let buf = vec![b'x'; 256 * 1024];
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    let echo = tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let _ = tokio::join!(sink, source, echo);
}

/// Adds `one_way` latency in each direction without limiting bandwidth: every chunk is stamped on
/// arrival and written once its time has come.
async fn delay(listen_addr: &str, upstream: &str, one_way: Duration) {
    let listener = listen(listen_addr).await;
    while let Ok((client, _)) = listener.accept().await {
        let upstream = upstream.to_string();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(delayed_copy(cr, sw, one_way));
            tokio::spawn(delayed_copy(sr, cw, one_way));
        });
    }
}

async fn delayed_copy(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    one_way: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 || tx.send((Instant::now() + one_way, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// MB/s (10^6 bytes) moving `bytes` over `streams` connections at once.
async fn throughput(addr: &str, bytes: u64, streams: usize, into_app: bool) -> f64 {
    let per_stream = bytes / streams as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let addr = addr.to_string();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(&addr).await.expect("connect");
                if into_app {
                    let buf = vec![b'x'; 256 * 1024];
                    let mut left = per_stream;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        s.write_all(&buf[..n]).await.expect("write");
                        left -= n as u64;
                    }
                    s.shutdown().await.expect("shutdown");
                    let mut got = [0u8; 8];
                    s.read_exact(&mut got).await.expect("the sink's count");
                    assert_eq!(u64::from_be_bytes(got), per_stream, "the app received everything");
                } else {
                    s.write_all(&per_stream.to_be_bytes()).await.expect("request");
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut total = 0u64;
                    loop {
                        let n = s.read(&mut buf).await.expect("read");
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    assert_eq!(total, per_stream, "received everything the app sent");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("stream");
    }
    (per_stream * streams as u64) as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn percentiles(mut samples: Vec<u128>) -> (u128, u128) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

async fn rtt(addr: &str, count: usize) -> (u128, u128) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + 50 {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        if i >= 50 {
            samples.push(t.elapsed().as_micros()); // the first 50 warm up
        }
    }
    percentiles(samples)
}

async fn setup(addr: &str, count: usize) -> (u128, u128) {
    let mut samples = VecDeque::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        samples.push_back(t.elapsed().as_micros());
    }
    percentiles(samples.into())
}

async fn admission(
    addr: &str,
    ca_file: &str,
    body_file: &str,
    concurrency: usize,
    duration: Duration,
    rate: Option<f64>,
) -> (f64, u128, u128, usize) {
    use std::sync::Arc;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_pem = std::fs::read(ca_file).expect("CA file");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca_pem) {
        let cert: rustls::pki_types::CertificateDer<'static> = cert.expect("CA PEM");
        roots.add(cert).expect("CA certificate");
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let body = std::fs::read(body_file).expect("body file");
    let mut request = format!(
        "POST /mutate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let request = Arc::new(request);
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let connector = connector.clone();
            let request = request.clone();
            let addr = addr.to_string();
            tokio::spawn(async move {
                let tcp = TcpStream::connect(&addr).await.expect("connect");
                tcp.set_nodelay(true).unwrap();
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let mut tls = connector.connect(name, tcp).await.expect("TLS");
                let mut samples = Vec::new();
                let mut errors = 0usize;
                let interval = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r));
                let mut i = 0u32;
                let mut reader = Reader::new();
                while Instant::now() < deadline {
                    if let Some(iv) = interval {
                        // Workers are spread over the interval so the total rate is even.
                        let due = start + iv * i + iv.mul_f64(w as f64 / concurrency as f64);
                        tokio::time::sleep_until(due.into()).await;
                        i += 1;
                    }
                    let t = Instant::now();
                    tls.write_all(&request).await.expect("write");
                    let (head, _) = read_message(&mut tls, &mut reader).await.expect("server closed the connection");
                    if !head.starts_with("HTTP/1.1 200") {
                        errors += 1;
                    }
                    samples.push(t.elapsed().as_micros());
                }
                (samples, errors)
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (s, e) = w.await.expect("worker");
        samples.extend(s);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let count = samples.len();
    let (p50, p99) = percentiles(samples);
    (count as f64 / elapsed, p50, p99, errors)
}

/// A connection's read side: bytes read past one HTTP/1.1 message stay for the next.
struct Reader {
    pending: Vec<u8>,
    buf: Vec<u8>,
}

impl Reader {
    fn new() -> Reader {
        Reader { pending: Vec::new(), buf: vec![0u8; 64 * 1024] }
    }
}

/// One HTTP/1.1 message from `stream`: its head (request or status line and headers) and its
/// body, by Content-Length or chunked. None when the peer closes the connection first.
async fn read_message<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    reader: &mut Reader,
) -> Option<(String, Vec<u8>)> {
    let Reader { pending, buf } = reader;
    let mut fill = async |pending: &mut Vec<u8>| -> Option<()> {
        let n = stream.read(buf).await.ok()?;
        (n > 0).then(|| pending.extend_from_slice(&buf[..n]))
    };
    let head_end = loop {
        if let Some(pos) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        fill(pending).await?;
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).to_string();
    pending.drain(..head_end);
    let lower = head.to_ascii_lowercase();
    let header = |name: &str| lower.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
    let mut body = Vec::new();
    if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        loop {
            let line_end = loop {
                if let Some(pos) = pending.windows(2).position(|w| w == b"\r\n") {
                    break pos;
                }
                fill(pending).await?;
            };
            let size_text = String::from_utf8_lossy(&pending[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).ok()?;
            // The chunk and its CRLF (the last, empty chunk: the final CRLF; no trailers expected).
            while pending.len() < line_end + 2 + size + 2 {
                fill(pending).await?;
            }
            body.extend_from_slice(&pending[line_end + 2..line_end + 2 + size]);
            pending.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else {
        let length = header("content-length:").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        while pending.len() < length {
            fill(pending).await?;
        }
        body.extend(pending.drain(..length));
    }
    Some((head, body))
}

/// `noop-webhook`: answers every AdmissionReview "allowed" with no patch -- the least any
/// webhook can do (read the request, echo its uid). Says on stdout when the apiserver opens a
/// connection and after the first answer, so the benchmark knows it is called and over how many
/// connections. A pod in `touch_namespace` gets one label added instead: the least any webhook
/// that changes a pod can ask of the apiserver, which then applies a patch and, because the pod
/// changed, runs its own mutating plugins over it a second time (admission re-invocation).
async fn noop_webhook(listen_addr: &str, cert: &str, key: &str, touch_namespace: Option<&str>) {
    use base64::Engine;
    use rustls::pki_types::pem::PemObject;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .unwrap_or_else(|e| panic!("certificate {cert}: {e}"));
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("key {key}: {e}"));
    let config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).expect("TLS");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = listen(listen_addr).await;
    let answered = Arc::new(AtomicBool::new(false));
    let touched = Arc::new(AtomicBool::new(false));
    let touch_namespace: Arc<Option<String>> = Arc::new(touch_namespace.map(str::to_string));
    // `bench-touched: "1"`, base64 of the JSON patch.
    let touch_patch = base64::engine::general_purpose::STANDARD
        .encode(br#"[{"op":"add","path":"/metadata/labels/bench-touched","value":"1"}]"#);
    while let Ok((tcp, peer)) = listener.accept().await {
        println!("noop-webhook: connection from {peer}");
        let (acceptor, answered, touched) = (acceptor.clone(), answered.clone(), touched.clone());
        let (touch_namespace, touch_patch) = (touch_namespace.clone(), touch_patch.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
            let mut reader = Reader::new();
            while let Some((_, body)) = read_message(&mut tls, &mut reader).await {
                let review = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
                let uid = review["request"]["uid"].as_str().unwrap_or_default();
                let touch = touch_namespace.as_deref().is_some_and(|ns| review["request"]["namespace"] == ns);
                let mut response = serde_json::json!({"uid": uid, "allowed": true});
                if touch {
                    response["patchType"] = "JSONPatch".into();
                    response["patch"] = touch_patch.as_str().into();
                }
                let answer = serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": response})
                .to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                    answer.len()
                );
                if tls.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                if !answered.swap(true, Ordering::Relaxed) {
                    println!("noop-webhook: answered its first admission request");
                }
                if touch && !touched.swap(true, Ordering::Relaxed) {
                    println!("noop-webhook: patched its first pod");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_messages_by_length_and_chunked_one_after_another() {
        let wire = b"POST /mutate HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
            POST /mutate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n\
            HTTP/1.1 200 OK\r\n\r\n";
        let (mut stream, mut reader) = (&wire[..], Reader::new());
        let (head, body) = read_message(&mut stream, &mut reader).await.unwrap();
        assert!(head.starts_with("POST /mutate"));
        assert_eq!(body, b"hello");
        assert_eq!(read_message(&mut stream, &mut reader).await.unwrap().1, b"abcde");
        let (head, body) = read_message(&mut stream, &mut reader).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200") && body.is_empty());
        assert!(read_message(&mut stream, &mut reader).await.is_none(), "closed");
        let (mut cut, mut reader) = (&b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nshort"[..], Reader::new());
        assert!(read_message(&mut cut, &mut reader).await.is_none(), "closed before the body ends");
    }
}
