//! One holder per balanced service (holder.rs), kept in step with the watch set: started when a
//! service gets a service address, told its ready replicas whenever they change, stopped when
//! the service goes. Holders live across scaler reconnections, so held clients keep waiting.
//! Each holder's listener is also in the sk_lookup program's socket map (steer.rs), so
//! connections from outside the host to a service at zero are held too.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use surge_proto::v1::{ServiceCounters, WatchSet};
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};

use crate::{
    holder::{HoldConfig, HoldStats, Holder},
    steer::Steering,
};

struct Held {
    port: u16,
    backends: watch::Sender<Vec<SocketAddr>>,
    stats: Arc<HoldStats>,
    task: JoinHandle<()>,
}

pub struct Holders {
    config: HoldConfig,
    /// Told when any holder accepts a connection: the agent then reports at once.
    demand: Arc<Notify>,
    by_service: HashMap<String, Held>,
    /// Where connections from outside are steered; none when sk_lookup is not attached.
    steering: Option<Steering>,
    /// Connections the holders have in hand (held, or handed over and relayed), all services.
    in_hand: Arc<AtomicUsize>,
    /// Where pods reach the holders (`--node-ip`): each also listens there, on its own port.
    node_ip: Option<IpAddr>,
    /// Ready backends not yet handed to their holders: see [`Holders::hand_over`].
    pending: Vec<(String, Vec<SocketAddr>)>,
    /// Turned true when the agent stops: see [`Holders::stopping`].
    stopping: Arc<watch::Sender<bool>>,
}

/// Tries for a loopback port that is free on the node address too.
const PORT_TRIES: usize = 8;

impl Holders {
    pub fn new(config: HoldConfig, steering: Option<Steering>, node_ip: Option<IpAddr>) -> Self {
        Self {
            config,
            demand: Arc::new(Notify::new()),
            by_service: HashMap::new(),
            steering,
            pending: Vec::new(),
            in_hand: Arc::default(),
            node_ip,
            stopping: Arc::new(watch::channel(false).0),
        }
    }

    /// Sent `true` when the agent stops: every holder's relayed clients are told to reconnect
    /// at the next chance their protocol gives (HTTP/2: a graceful `GOAWAY` even while streams
    /// are open), so the drain ends sooner and cuts fewer connections.
    pub fn stopping(&self) -> Arc<watch::Sender<bool>> {
        Arc::clone(&self.stopping)
    }

    /// A holder's loopback listener and, with a node address, its listener there on the same
    /// port (a loopback port may be taken on the node address: another is tried).
    fn listen(&self) -> std::io::Result<(u16, tokio::net::TcpListener, Option<tokio::net::TcpListener>)> {
        let mut last = None;
        for _ in 0..PORT_TRIES {
            let listener = crate::holder::listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let port = listener.local_addr()?.port();
            let Some(ip) = self.node_ip else {
                return Ok((port, listener, None));
            };
            match crate::holder::listen(SocketAddr::new(ip, port)) {
                Ok(on_node) => return Ok((port, listener, Some(on_node))),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
                Err(e) => {
                    // This host's own clients are still held.
                    tracing::warn!(node_ip = %ip, port, error = %e, "no holder listener on the node address: other network namespaces' connections are not held");
                    return Ok((port, listener, None));
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrInUse)))
    }

    /// How many connections the holders have in hand, kept up to date by them: a stopping agent
    /// waits for it to reach 0.
    pub fn in_hand(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.in_hand)
    }

    pub fn demand(&self) -> Arc<Notify> {
        Arc::clone(&self.demand)
    }

    /// Starts, updates and stops holders for `set`; returns each balanced service's holder port.
    pub async fn sync(&mut self, set: &WatchSet) -> HashMap<String, u16> {
        self.pending.clear();
        let mut ports = HashMap::new();
        let mut keep = Vec::new();
        for s in set.services.iter().filter(|s| s.service_address.is_some()) {
            let backends: Vec<SocketAddr> = s
                .backends
                .iter()
                .filter_map(|b| {
                    b.ip.parse::<IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, b.port as u16))
                })
                .collect();
            if !self.by_service.contains_key(&s.name) {
                match self.listen() {
                    Ok((port, listener, on_node)) => {
                        let listener6 = match crate::holder::listen_v6_beside(port) {
                            Ok(l) => Some(l),
                            Err(e) => {
                                tracing::warn!(service = %s.name, port, error = %e, "no IPv6 holder listener: IPv6 connections from outside are not held");
                                None
                            }
                        };
                        if let Some(steering) = &mut self.steering {
                            steering.hold(port, &listener, listener6.as_ref());
                        }
                        let (tx, rx) = watch::channel(backends.clone());
                        let mut holder = Holder::new(listener, rx, self.config, Arc::clone(&self.demand))
                            .counted_in(Arc::clone(&self.in_hand))
                            .stopping_on(self.stopping.subscribe());
                        for l in listener6.into_iter().chain(on_node) {
                            holder = holder.also_on(l);
                        }
                        let stats = holder.stats();
                        let task = tokio::spawn(holder.run());
                        tracing::info!(service = %s.name, port, "holding connections while the service has no ready replica");
                        self.by_service.insert(
                            s.name.clone(),
                            Held {
                                port,
                                backends: tx,
                                stats,
                                task,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(service = %s.name, error = %e, "cannot start a holder");
                        continue;
                    }
                }
            }
            if let Some(h) = self.by_service.get(&s.name) {
                // A service losing its backends stops forwarding now; one gaining them is told
                // after the kernel map sends new connects to them (`hand_over`), so that a held
                // client that gets its answer and reconnects is not held again.
                if backends.is_empty() {
                    h.backends.send_if_modified(|current| {
                        let changed = !current.is_empty();
                        current.clear();
                        changed
                    });
                } else {
                    self.pending.push((s.name.clone(), backends.clone()));
                }
                ports.insert(s.name.clone(), h.port);
                keep.push(s.name.clone());
            }
        }
        let steering = &mut self.steering;
        if let Some(s) = steering.as_mut() {
            s.set_ports(
                set.services
                    .iter()
                    .filter(|s| keep.contains(&s.name))
                    .filter_map(|s| s.service_address.as_ref())
                    .filter_map(|a| u16::try_from(a.port).ok())
                    .collect(),
            );
        }
        self.by_service.retain(|name, h| {
            let kept = keep.contains(name);
            if !kept {
                if let Some(s) = steering.as_mut() {
                    s.release(h.port);
                }
                h.task.abort();
            }
            kept
        });
        ports
    }

    /// Gives the holders the ready backends of the last [`Holders::sync`]; called once the
    /// kernel map has them (or has refused the set: held clients are still best forwarded).
    pub fn hand_over(&mut self) {
        for (name, backends) in self.pending.drain(..) {
            if let Some(h) = self.by_service.get(&name) {
                h.backends.send_if_modified(|current| {
                    let changed = *current != backends;
                    *current = backends;
                    changed
                });
            }
        }
    }

    /// Adds each service's holding figures to its wire counters.
    pub fn fill(&self, services: &mut [ServiceCounters]) {
        for c in services {
            if let Some(h) = self.by_service.get(&c.service) {
                let s = &h.stats;
                // Acquire: every connection no longer counted here has recorded its wait.
                c.held_now = s.held_now.load(Ordering::Acquire) as u64;
                c.relayed_now = s.relaying_now.load(Ordering::Relaxed) as u64;
                c.held_total = s.held_total.load(Ordering::Relaxed);
                c.hold_timeouts = s.timeouts_total.load(Ordering::Relaxed);
                c.held_forwarded = s.forwarded_total.load(Ordering::Relaxed);
                c.held_left_path = s.left_path_total.load(Ordering::Relaxed);
                c.held_seconds_sum = s.held_micros_sum.load(Ordering::Relaxed) as f64 / 1e6;
                (c.hold_duration_buckets, c.hold_duration_seconds_sum) = s.waits.snapshot();
            }
        }
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for h in self.by_service.values() {
            h.task.abort();
        }
    }
}
