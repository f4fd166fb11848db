//! The webhook's HTTPS server, run once per listener (--listen for the apiserver's /mutate,
//! --agent-listen for the sidecars' /report and /certificate, each with its own connection
//! cap): every injected pod can reach the one and the apiserver must reach the other, so it
//! bounds what a client can hold and drains on SIGTERM.
//!
//! ```text
//! accept ─► open < --max-connections? ─yes─► TLS handshake (--tls-handshake-timeout)
//!              │ no                           ─► HTTP/1.1 or h2; headers within --header-read-timeout,
//!              ▼                                 no request for --idle-timeout closes the connection,
//!        wait for a slot (at most as many        bodies within --body-read-timeout (the handlers)
//!        waiting as the cap, each up to the
//!        handshake timeout), else closed
//!
//! SIGTERM ─► /ready 503 ─► still serving for --drain-delay (endpoints drop the pod) ─► stop
//!            accepting ─► connections finish their requests and close (h2: GOAWAY), up to
//!            --shutdown-timeout ─► exit 0
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ReasonLabels;

/// The server's bounds, from the flags.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub tls_handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_delay: Duration,
    pub shutdown_timeout: Duration,
}

/// What the server counts.
#[derive(Clone, Default)]
pub struct ServerMetrics {
    pub(super) accepted: Counter,
    pub(super) open: Gauge,
    pub(super) waiting: Gauge,
    pub(super) in_flight: Gauge,
    pub(super) closed: Family<ReasonLabels, Counter>,
}

impl ServerMetrics {
    pub fn register(registry: &mut Registry) -> ServerMetrics {
        let m = ServerMetrics::default();
        let r = registry.sub_registry_with_prefix("picotun_webhook");
        r.register(
            "connections",
            "TCP connections accepted (the apiserver reuses them when it can)",
            m.accepted.clone(),
        );
        r.register("open_connections", "Connections being served (at most --max-connections)", m.open.clone());
        r.register(
            "waiting_connections",
            "Connections accepted over --max-connections, waiting for a slot",
            m.waiting.clone(),
        );
        r.register("requests_in_flight", "HTTPS requests being answered", m.in_flight.clone());
        r.register(
            "connections_closed",
            "Connections the server closed, by reason (over_capacity, handshake_timeout, handshake_failed, \
             header_timeout, idle, draining)",
            m.closed.clone(),
        );
        m
    }

    fn closed(&self, reason: &str) {
        self.closed.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
    }
}

/// Serves `app` over TLS on `listener` until `shutdown`, then drains (see the module doc).
/// `draining` turns true at SIGTERM (the admin port's /ready follows it).
pub async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    limits: Limits,
    metrics: ServerMetrics,
    shutdown: CancellationToken,
    draining: Arc<AtomicBool>,
) {
    let listen = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let queue = Arc::new(Semaphore::new(max));
    let stop = CancellationToken::new();
    let mut drain_until: Option<Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: back off a little rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled(), if drain_until.is_none() => {
                draining.store(true, Ordering::SeqCst);
                info!(%listen, drain_delay = ?limits.drain_delay, "shutting down: /ready is 503; serving on while endpoints drop this pod");
                drain_until = Some(Instant::now() + limits.drain_delay);
                continue;
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(Instant::now)), if drain_until.is_some() => break,
        };
        metrics.accepted.inc();
        // Answers are small and latency is all that matters: no Nagle.
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            acceptor: acceptor.clone(),
            app: app.clone(),
            limits: limits.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                tokio::spawn(conn.serve(tcp, peer, slot));
            }
            Err(_) => match queue.clone().try_acquire_owned() {
                Ok(place) => {
                    let slots = slots.clone();
                    tokio::spawn(async move {
                        conn.metrics.waiting.inc();
                        let wait = tokio::time::timeout(conn.limits.tls_handshake_timeout, slots.acquire_owned());
                        let slot = tokio::select! {
                            s = wait => s.ok().and_then(Result::ok),
                            _ = conn.stop.cancelled() => None,
                        };
                        conn.metrics.waiting.dec();
                        drop(place);
                        match slot {
                            Some(slot) => conn.serve(tcp, peer, slot).await,
                            None => {
                                debug!(%peer, "no connection slot came free; closed");
                                conn.metrics.closed("over_capacity");
                            }
                        }
                    });
                }
                Err(_) => {
                    debug!(%peer, max, "over the connection cap with as many waiting; closed");
                    metrics.closed("over_capacity");
                }
            },
        }
    }
    drop(listener);
    let open = max - slots.available_permits();
    info!(%listen, open, timeout = ?limits.shutdown_timeout, "stopped accepting; finishing requests in flight");
    stop.cancel();
    match tokio::time::timeout(limits.shutdown_timeout, slots.acquire_many(max as u32)).await {
        Ok(_) => info!(%listen, "every connection closed"),
        Err(_) => warn!(
            %listen,
            open = max - slots.available_permits(),
            "connections still open after --shutdown-timeout; closing them"
        ),
    }
}

/// One connection's share of the server.
struct Conn {
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    limits: Limits,
    metrics: ServerMetrics,
    stop: CancellationToken,
}

/// When a connection last had nothing to do, and how much it is doing.
struct Activity {
    in_flight: AtomicUsize,
    served: AtomicU64,
    idle_since: Mutex<Instant>,
}

struct InFlight {
    activity: Arc<Activity>,
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.activity.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.activity.served.fetch_add(1, Ordering::SeqCst);
        self.activity.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.gauge.dec();
    }
}

impl Activity {
    fn start(self: &Arc<Self>, gauge: &Gauge) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        gauge.inc();
        InFlight { activity: self.clone(), gauge: gauge.clone() }
    }

    /// Resolves once no request has been in flight for the limit: the header timeout until the
    /// first request, the idle timeout after.
    async fn idle(&self, limits: &Limits) {
        loop {
            let limit =
                if self.served.load(Ordering::SeqCst) == 0 { limits.header_read_timeout } else { limits.idle_timeout };
            let since = *self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
            if self.in_flight.load(Ordering::SeqCst) == 0 && since.elapsed() >= limit {
                return;
            }
            let wake = if self.in_flight.load(Ordering::SeqCst) > 0 { Instant::now() + limit } else { since + limit };
            tokio::time::sleep_until(wake).await;
        }
    }
}

impl Conn {
    async fn serve(self, tcp: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit) {
        let _slot = slot;
        self.metrics.open.inc();
        struct Open(Gauge);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        let _open = Open(self.metrics.open.clone());
        let handshake = tokio::time::timeout(self.limits.tls_handshake_timeout, self.acceptor.accept(tcp));
        let tls = tokio::select! {
            r = handshake => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    self.metrics.closed("handshake_failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake not finished in time");
                    self.metrics.closed("handshake_timeout");
                    return;
                }
            },
            _ = self.stop.cancelled() => {
                self.metrics.closed("draining");
                return;
            }
        };
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
        });
        let service = {
            let activity = activity.clone();
            let gauge = self.metrics.in_flight.clone();
            let inner = hyper_util::service::TowerToHyperService::new(self.app.clone());
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let guard = activity.start(&gauge);
                let answer = hyper::service::Service::call(&inner, req);
                async move {
                    let response = answer.await;
                    drop(guard);
                    response
                }
            })
        };
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(self.limits.header_read_timeout);
        builder.http2().timer(TokioTimer::new()).max_concurrent_streams(64);
        let connection = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(connection);
        let mut stopping = false;
        loop {
            tokio::select! {
                done = connection.as_mut() => {
                    if let Err(e) = done {
                        let timeout = e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout);
                        if timeout {
                            debug!(%peer, "request headers not received in time; closed");
                            self.metrics.closed("header_timeout");
                        } else {
                            debug!(%peer, error = %e, "connection ended with an error");
                        }
                    }
                    return;
                }
                _ = self.stop.cancelled(), if !stopping => {
                    // Finish what is in flight, then close (h2: GOAWAY).
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
                _ = activity.idle(&self.limits), if !stopping => {
                    // Before any request: headers that never came (any protocol); after: idle.
                    let first = activity.served.load(Ordering::SeqCst) == 0;
                    debug!(%peer, first, "no request in time; closed");
                    self.metrics.closed(if first { "header_timeout" } else { "idle" });
                    return;
                }
            }
        }
    }
}
