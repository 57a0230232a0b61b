//! Holds connections to a service that has no ready replica, in the connection's path only while
//! it is cold. The kernel's connect hook sends such connections to this holder (one listening
//! port per held service). The holder accepts them and reports the demand at once. It buffers
//! what clients send (bounded: a full buffer stops reading, so the client is slowed down and no
//! byte is dropped). As soon as a replica is ready, it connects there, writes the buffer and
//! relays both ways (`relay`), until the connection can leave the path ([`exit`]: HTTP/1 and
//! HTTP/2) or ends. After the hold timeout an HTTP/1 or HTTP/2 (gRPC too) client gets `503`
//! with `Retry-After`, and any other client is closed.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Notify},
    time::Instant,
};

pub mod exit;
pub mod refusal;
mod relay;
pub mod waits;
pub use waits::WaitHistogram;

/// The accept queue of a holder's listener (the kernel caps it at net.core.somaxconn). A burst
/// of cold clients arrives at once: with the usual 128, most of a burst of 1,000 would have
/// their SYN dropped and retried a second later.
pub const BACKLOG: u32 = 4096;

/// A holder's listening socket on `addr`, with a deep accept queue.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A holder's IPv6 listener beside its IPv4 one: `[::1]` on the same port, for connections from
/// outside that arrive over IPv6 (sk_lookup gives a connection only to a socket of its family).
pub fn listen_v6_beside(port: u16) -> std::io::Result<TcpListener> {
    listen(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)))
}

/// Holder settings.
#[derive(Debug, Clone, Copy)]
pub struct HoldConfig {
    /// How long a connection waits for a ready replica (KEDA's interceptor waits 20 s).
    pub timeout: Duration,
    /// Bytes buffered per connection before the holder stops reading from it.
    pub buffer: usize,
    /// The Retry-After seconds told to HTTP clients that timed out.
    pub retry_after: u32,
}

impl Default for HoldConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(20),
            buffer: 64 * 1024,
            retry_after: 1,
        }
    }
}

/// What the holder counted; read by the report.
#[derive(Debug, Default)]
pub struct HoldStats {
    /// Connections waiting now (not those already handed to a replica and being relayed).
    pub held_now: AtomicUsize,
    /// Held connections handed to a replica whose relay is still going on.
    pub relaying_now: AtomicUsize,
    /// Connections ever held.
    pub held_total: AtomicU64,
    /// Held connections handed to a replica.
    pub forwarded_total: AtomicU64,
    /// Held connections that timed out (503 or closed).
    pub timeouts_total: AtomicU64,
    /// Sum of the time connections were held until forwarded, microseconds.
    pub held_micros_sum: AtomicU64,
    /// How long every held connection waited (accept to forward, timeout or end), recorded
    /// once per connection before `held_now` drops.
    pub waits: WaitHistogram,
    /// Relayed connections whose client was told to reconnect, and that ended (see [`exit`]):
    /// their next requests go straight to a replica.
    pub left_path_total: AtomicU64,
}

/// Why a held connection ended without being relayed.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("no replica became ready within {0:?}")]
    Timeout(Duration),
    #[error("connecting to replica {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// One held service: its listener, the ready replicas it forwards to, and its counters.
pub struct Holder {
    listener: TcpListener,
    /// Its other listeners on the same port: IPv6 loopback, where the host has IPv6, and the
    /// node address, where pods connect from their own network namespaces.
    more: Vec<TcpListener>,
    /// Which listener is asked first at the next accept: each in turn, so none starves.
    first: std::sync::atomic::AtomicUsize,
    backends: watch::Receiver<Vec<SocketAddr>>,
    config: HoldConfig,
    stats: Arc<HoldStats>,
    /// Told whenever a connection arrives, so the agent reports demand at once.
    demand: Arc<Notify>,
    /// Also counts the connections in hand (held or relayed) here, if given.
    in_hand: Option<Arc<AtomicUsize>>,
    /// Turns true when the agent stops: relayed clients are told to reconnect.
    stopping: watch::Receiver<bool>,
}

impl Holder {
    pub fn new(
        listener: TcpListener,
        backends: watch::Receiver<Vec<SocketAddr>>,
        config: HoldConfig,
        demand: Arc<Notify>,
    ) -> Self {
        Self {
            listener,
            more: Vec::new(),
            first: AtomicUsize::new(0),
            backends,
            config,
            stats: Arc::default(),
            demand,
            in_hand: None,
            stopping: watch::channel(false).1,
        }
    }

    /// Tells relayed clients to reconnect (where their protocol allows it while requests are
    /// open: HTTP/2) once `stopping` turns true.
    pub fn stopping_on(mut self, stopping: watch::Receiver<bool>) -> Self {
        self.stopping = stopping;
        self
    }

    /// Also counts each connection in `gauge` from its accept to its end (relay included).
    pub fn counted_in(mut self, gauge: Arc<AtomicUsize>) -> Self {
        self.in_hand = Some(gauge);
        self
    }

    /// Also accepts on `listener` (the same port on another address).
    pub fn also_on(mut self, listener: TcpListener) -> Self {
        self.more.push(listener);
        self
    }

    /// The next connection on any listener.
    async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        if self.more.is_empty() {
            return self.listener.accept().await;
        }
        std::future::poll_fn(|cx| {
            let n = 1 + self.more.len();
            let first = self.first.fetch_add(1, Ordering::Relaxed);
            for i in 0..n {
                let l = match (first + i) % n {
                    0 => &self.listener,
                    k => &self.more[k - 1],
                };
                if let std::task::Poll::Ready(r) = l.poll_accept(cx) {
                    return std::task::Poll::Ready(r);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }

    pub fn stats(&self) -> Arc<HoldStats> {
        Arc::clone(&self.stats)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts and serves held connections until the task is dropped.
    pub async fn run(self) {
        let next = Arc::new(AtomicUsize::new(0));
        loop {
            let (client, peer) = match self.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "holder accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let accepted = Instant::now();
            // A relay passes each read on at once: Nagle's algorithm would hold a small write
            // (an HTTP/2 frame after the one before) until the client's delayed ACK, 40 ms.
            let _ = client.set_nodelay(true);
            self.stats.held_total.fetch_add(1, Ordering::Relaxed);
            self.stats.held_now.fetch_add(1, Ordering::Relaxed);
            if let Some(gauge) = &self.in_hand {
                gauge.fetch_add(1, Ordering::AcqRel);
            }
            self.demand.notify_one();
            let (backends, config, stats, next, in_hand, stopping) = (
                self.backends.clone(),
                self.config,
                Arc::clone(&self.stats),
                Arc::clone(&next),
                self.in_hand.clone(),
                self.stopping.clone(),
            );
            tokio::spawn(async move {
                let result = hold(client, accepted, backends, config, &stats, &next, stopping).await;
                if let Some(gauge) = in_hand {
                    gauge.fetch_sub(1, Ordering::AcqRel);
                }
                if let Err(e) = result {
                    tracing::debug!(client = %peer, error = %e, "held connection ended");
                }
            });
        }
    }
}

/// Serves one held connection: buffer until a replica is ready or the timeout, then relay. The
/// wait is recorded once, however it ends.
async fn hold(
    mut client: TcpStream,
    accepted: Instant,
    backends: watch::Receiver<Vec<SocketAddr>>,
    config: HoldConfig,
    stats: &HoldStats,
    next: &AtomicUsize,
    stopping: watch::Receiver<bool>,
) -> Result<(), HoldError> {
    let forwarded = forward(&mut client, accepted, backends, config, stats, next).await;
    stats.waits.record(accepted.elapsed());
    stats.held_now.fetch_sub(1, Ordering::Release);
    let (upstream, sent) = forwarded?;
    stats.relaying_now.fetch_add(1, Ordering::Relaxed);
    let relayed = relay::relay(client, upstream, &sent, stopping).await;
    stats.relaying_now.fetch_sub(1, Ordering::Relaxed);
    if relayed? == relay::Ended::LeftThePath {
        stats.left_path_total.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Buffers what the client sends until a replica is ready, connects there and writes the
/// buffer (returned with the connection); after the timeout, answers the client and gives up.
async fn forward(
    client: &mut TcpStream,
    started: Instant,
    mut backends: watch::Receiver<Vec<SocketAddr>>,
    config: HoldConfig,
    stats: &HoldStats,
    next: &AtomicUsize,
) -> Result<(TcpStream, Vec<u8>), HoldError> {
    let deadline = started + config.timeout;
    // Reads go straight into the buffer, which grows as bytes come (most requests fit in its
    // first 4 KiB): a held connection costs what its client sent, not a fixed scratch area.
    let mut buffer = Vec::with_capacity(config.buffer.min(4096));
    let mut client_done = false;
    let backend = loop {
        if let Some(addr) = pick(&backends.borrow_and_update(), next) {
            break addr;
        }
        let room = config.buffer.saturating_sub(buffer.len());
        if room > 0 && buffer.len() == buffer.capacity() {
            buffer.reserve(room.min(16 * 1024));
        }
        tokio::select! {
            // Read only while there is room: a full buffer leaves the bytes in the kernel and
            // the client's window closes (backpressure, nothing dropped).
            n = read_at_most(client, &mut buffer, room), if room > 0 && !client_done => {
                if n? == 0 {
                    client_done = true;
                }
            }
            changed = backends.changed() => {
                if changed.is_err() {
                    return Err(HoldError::Timeout(config.timeout));
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                stats.timeouts_total.fetch_add(1, Ordering::Relaxed);
                answer_timeout(client, &buffer, config.retry_after).await;
                return Err(HoldError::Timeout(config.timeout));
            }
        }
    };
    let mut upstream = TcpStream::connect(backend)
        .await
        .map_err(|source| HoldError::Connect {
            addr: backend,
            source,
        })?;
    let _ = upstream.set_nodelay(true);
    upstream.write_all(&buffer).await?;
    stats.forwarded_total.fetch_add(1, Ordering::Relaxed);
    stats
        .held_micros_sum
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    if client_done {
        upstream.shutdown().await?;
    }
    Ok((upstream, buffer))
}

/// Reads what the client sent, at most `room` bytes, onto the end of `buffer`.
async fn read_at_most(client: &mut TcpStream, buffer: &mut Vec<u8>, room: usize) -> std::io::Result<usize> {
    client.take(room as u64).read_buf(buffer).await
}

/// Round robin over the ready replicas.
fn pick(backends: &[SocketAddr], next: &AtomicUsize) -> Option<SocketAddr> {
    if backends.is_empty() {
        return None;
    }
    Some(backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()])
}

/// Tells a client that timed out why, as far as its protocol allows (see [`refusal`]), then
/// closes the connection.
async fn answer_timeout(client: &mut TcpStream, buffer: &[u8], retry_after: u32) {
    if let Some(answer) = refusal::timeout_answer(buffer, retry_after) {
        let _ = client.write_all(&answer).await;
    }
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests;
