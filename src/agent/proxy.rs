//! One visitor connection: a `forwarded-tcpip` channel relayed to the app's local port.
//!
//! russh stalls the *whole* SSH connection (keepalive replies included) when any channel's
//! incoming buffer is full, and it refills a channel's receive window when data arrives, not when
//! it is consumed -- so SSH flow control cannot hold back a visitor whose app is not reading. The
//! relay therefore never lets the channel wait on the app: a reader task drains the channel at
//! once into a bounded per-connection buffer, a writer task feeds the app from it, and a
//! connection whose app leaves more than `max_buffered` bytes unread for longer than
//! `STALL_GRACE` is closed (reason `app_stalled`) instead of stalling every other connection of
//! the pod.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use russh::client::Msg;
use russh::{Channel, ChannelMsg, ChannelOpenFailure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use crate::agent::state::{AgentState, Direction};

/// How a connection to the app is relayed.
#[derive(Clone, Debug)]
pub struct Relay {
    pub tunnel: String,
    pub target: SocketAddr,
    pub max_buffered: usize,
    pub connect_timeout: Duration,
}

/// The size of one read from the app.
const CHUNK: usize = 32 * 1024;

/// After the visitor's side closed: how long the app may take to read what is still buffered for
/// it before the connection is closed anyway (an app that never reads must not keep it forever).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the app may leave `max_buffered` bytes unread before its connection is cut. A
/// reading app falls that far behind for a moment whenever it is not scheduled: at 500 MB/s,
/// 4 MiB is 8 ms, less than one time slice on a busy node. Meanwhile russh's per-channel queue
/// holds what arrives (`channel_buffer_size` messages), so the session loop does not wait.
const STALL_GRACE: Duration = Duration::from_secs(1);

/// The bytes received from the visitor and not yet written to the app, counted in bytes: SSH
/// messages range from a few bytes to a whole packet, so a count of messages would cut a
/// connection of small messages long before its bytes reach the limit (and let large ones
/// past it).
#[derive(Default)]
struct Buffered {
    held: AtomicUsize,
    /// Woken whenever the writer hands bytes to the app.
    room: tokio::sync::Notify,
}

impl Buffered {
    /// Takes `n` more bytes; false (and nothing taken) when that would exceed `max`.
    fn take(&self, n: usize, max: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| held.checked_add(n).filter(|t| *t <= max))
            .is_ok()
    }

    /// Takes `n` more bytes, waiting up to `grace` for the writer to make room; false when the
    /// app did not read enough within it.
    async fn take_within(&self, n: usize, max: usize, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            // Registered before the check, so a release between the two is not missed.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.take(n, max) {
                return true;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return false;
            }
        }
    }

    fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
        self.room.notify_waiters();
    }
}

/// Dials the app first, then accepts or rejects the channel, then relays until both sides are
/// done. Runs in its own task; never blocks the SSH session loop.
pub async fn serve(
    channel: Channel<Msg>,
    reply: russh::client::ChannelOpenHandle,
    relay: Relay,
    originator: String,
    state: Arc<AgentState>,
) {
    let span = info_span!("conn", tunnel = %relay.tunnel, from = %originator);
    async move {
        let tcp = match tokio::time::timeout(relay.connect_timeout, TcpStream::connect(relay.target)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                warn!(target = %relay.target, error = %e, "the app refused the connection; rejecting the channel");
                state.metrics.error("app_refused");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            }
            Err(_) => {
                warn!(target = %relay.target, "the app did not accept within {:?}; rejecting the channel", relay.connect_timeout);
                state.metrics.error("app_timeout");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        reply.accept().await;
        state.connection_opened(&relay.tunnel);
        debug!("connection opened");
        let outcome = pump(channel, tcp, &relay, &state).await;
        state.connection_closed(&relay.tunnel);
        match outcome {
            Outcome::Done => debug!("connection closed"),
            Outcome::AppStalled => {
                warn!(max_buffered = relay.max_buffered, "the app stopped reading; closed this connection so others keep flowing");
                state.metrics.error("app_stalled");
            }
        }
    }
    .instrument(span)
    .await
}

/// Writes every chunk, with vectored writes.
async fn write_batch(w: &mut tokio::net::tcp::OwnedWriteHalf, chunks: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = chunks.iter().map(|c| std::io::IoSlice::new(c)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

enum Outcome {
    Done,
    AppStalled,
}

async fn pump(channel: Channel<Msg>, tcp: TcpStream, relay: &Relay, state: &Arc<AgentState>) -> Outcome {
    let (mut from_ssh, to_ssh) = channel.split();
    let to_ssh = Arc::new(to_ssh);
    let (mut from_app, mut to_app) = tcp.into_split();
    // Unbounded as a queue, bounded in bytes by `buffered`.
    let (buf_tx, mut buf_rx) = mpsc::unbounded_channel::<Bytes>();
    let buffered = Arc::new(Buffered::default());
    let max_buffered = relay.max_buffered;

    // Visitor -> app, part 1: drain the channel at once, whatever the app does.
    let tunnel = relay.tunnel.clone();
    let st = state.clone();
    let held = buffered.clone();
    // Returns with the sender dropped: the writer then ends once it has written everything.
    let mut drain = tokio::spawn(async move {
        let mut buf_tx = Some(buf_tx);
        loop {
            match from_ssh.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    st.add_bytes(&tunnel, Direction::In, data.len() as u64);
                    let Some(tx) = &buf_tx else { continue };
                    if !held.take(data.len(), max_buffered)
                        && !held.take_within(data.len(), max_buffered, STALL_GRACE).await
                    {
                        return Outcome::AppStalled;
                    }
                    if let Err(mpsc::error::SendError(data)) = tx.send(data) {
                        // The app side is gone; keep draining until the channel closes.
                        held.release(data.len());
                        buf_tx = None;
                    }
                }
                // The visitor finished sending: let the writer flush, then half-close the app.
                Some(ChannelMsg::Eof) => buf_tx = None,
                Some(ChannelMsg::Close) | None => return Outcome::Done,
                Some(_) => {}
            }
        }
    });

    // Visitor -> app, part 2: write what was drained; shut down the app's read side at EOF.
    // Chunks queued together go out in one write: fewer syscalls per byte under load.
    let mut write_app = tokio::spawn(async move {
        let mut batch: Vec<Bytes> = Vec::with_capacity(16);
        while let Some(first) = buf_rx.recv().await {
            batch.push(first);
            while batch.len() < 16 {
                match buf_rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let written = write_batch(&mut to_app, &batch).await;
            buffered.release(batch.iter().map(Bytes::len).sum());
            if written.is_err() {
                return;
            }
            batch.clear();
        }
        // Everything the visitor sent is written: now the app may see the end.
        let _ = to_app.shutdown().await;
    });

    // App -> visitor: the channel's write side waits for the visitor's window, not the session.
    let tunnel = relay.tunnel.clone();
    let st = state.clone();
    let writer = to_ssh.clone();
    let mut read_app = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from_app.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = writer.eof().await;
                    return;
                }
                Ok(n) => {
                    st.add_bytes(&tunnel, Direction::Out, n as u64);
                    if writer.data_bytes(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
    });

    // Done when the channel closes (both sides' EOFs exchanged, or the server/visitor closed),
    // or when the app closed its side and everything it sent is out. Either way both ends are
    // then closed fully, so nothing lingers half-open.
    let mut outcome = None;
    tokio::select! {
        res = &mut drain => { outcome = Some(res.unwrap_or(Outcome::Done)); }
        _ = &mut read_app => {
            // The app finished; give the visitor's side a moment to finish too, then close.
            if let Ok(res) = tokio::time::timeout(Duration::from_secs(5), &mut drain).await {
                outcome = Some(res.unwrap_or(Outcome::Done));
            }
        }
    }
    drain.abort();
    match outcome {
        // The drain ended (its sender dropped): the bytes it took from the visitor are still
        // owed to the app. Write them before the app's side is shut down, or a visitor whose
        // close overtakes a slow app loses the end of what it sent.
        Some(Outcome::Done) => {
            if tokio::time::timeout(FLUSH_TIMEOUT, &mut write_app).await.is_err() {
                debug!("the app did not read the rest within {FLUSH_TIMEOUT:?}; closing");
            }
        }
        // Over the limit, or the visitor's side still open after the app finished: cut.
        Some(Outcome::AppStalled) | None => {}
    }
    write_app.abort();
    read_app.abort();
    let _ = to_ssh.close().await;
    outcome.unwrap_or(Outcome::Done)
}
