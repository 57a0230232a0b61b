//! The agent's stream to the scaler: a Hello, then a Report every interval; watch sets come back.
//! When the scaler is away the agent retries with backoff and keeps counting in the kernel: the
//! counters are cumulative, so the first report after reconnecting carries everything.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use surge_proto::v1::{
    agent_link_client::AgentLinkClient, agent_message, scaler_command, AgentMessage, Hello, Report, WatchSet,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    backoff::Backoff, clock::Clock, config::Settings, holder::HoldConfig, holding::Holders, node::Node, pods,
};

/// This node's pods by service, from the Kubernetes source (k8s.rs); `None` outside Kubernetes.
pub type LocalPods = Option<watch::Receiver<pods::View>>;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("scaler address {0:?} is not a valid URI")]
    Address(String),
    #[error("cannot reach the scaler: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the scaler refused the stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the scaler closed the stream")]
    Closed,
    #[error("reading the kernel counters failed: {0}")]
    Read(String),
}

/// Identity and sequence of this agent process, kept across reconnections.
pub struct Instance {
    pub node: String,
    pub id: u64,
    seq: u64,
}

impl Instance {
    pub fn new(node: String, id: u64) -> Self {
        Self { node, id, seq: 0 }
    }
}

/// Runs until `shutdown` turns true: connects, streams, reconnects with backoff. The scaler's
/// watch set, with `local` pods added, is what the kernel watches; a change of either applies at
/// once, also while the scaler is away. After `shutdown`, it goes on as before while the holders
/// still have connections in hand (held, or handed to a replica and relayed), for at most the
/// drain timeout: a restarted agent lets held clients get their answer rather than a reset.
pub async fn run(
    settings: Settings,
    node: Arc<Mutex<Node>>,
    clock: Arc<dyn Clock>,
    mut instance: Instance,
    mut shutdown: watch::Receiver<bool>,
    local: LocalPods,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let steering = node.lock().ok().and_then(|mut n| n.take_steering());
    let mut holders = Holders::new(
        HoldConfig {
            timeout: settings.hold_timeout,
            buffer: settings.hold_buffer,
            ..HoldConfig::default()
        },
        steering,
        settings.node_ip,
    );
    let mut watching = Watching { scaler: None, local };
    let in_hand = holders.in_hand();
    let stopping = holders.stopping();
    let stop = async {
        let _ = shutdown.changed().await;
        stopping.send_replace(true);
        drain(&in_hand, settings.drain_timeout).await;
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            result = session(&settings, &node, &clock, &mut instance, &mut backoff, &mut holders, &mut watching) => {
                if let Err(e) = result {
                    tracing::warn!(scaler = %settings.scaler, error = %e, "scaler link down; retrying");
                }
            }
            () = &mut stop => return,
        }
        let sleep = tokio::time::sleep(backoff.next_delay(rand::random::<f64>()));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                () = &mut stop => return,
                () = local_changed(&mut watching.local) => {
                    if let Err(e) = watching.apply(&node, &mut holders).await {
                        tracing::warn!(error = %e, "applying this node's pods failed");
                    }
                }
            }
        }
    }
}

/// Waits until the holders have no connection in hand, or `timeout` has passed.
async fn drain(in_hand: &AtomicUsize, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let left = in_hand.load(Ordering::Acquire);
    if left == 0 {
        return;
    }
    tracing::info!(connections = left, timeout = ?timeout, "stopping once the held connections are answered");
    loop {
        let left = in_hand.load(Ordering::Acquire);
        if left == 0 {
            tracing::info!("every held connection answered");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(connections = left, "drain timeout: these connections are cut");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the kernel is told to watch: the scaler's last watch set and this node's pods.
struct Watching {
    scaler: Option<WatchSet>,
    local: LocalPods,
}

impl Watching {
    /// Applies the scaler's set with the local pods added; before the first set, nothing.
    async fn apply(&mut self, node: &Arc<Mutex<Node>>, holders: &mut Holders) -> Result<(), LinkError> {
        let Some(scaler) = &self.scaler else { return Ok(()) };
        let set = match self.local.as_mut() {
            Some(rx) => pods::merge(scaler, &rx.borrow_and_update()),
            None => scaler.clone(),
        };
        let node = Arc::clone(node);
        let generation = set.generation;
        let ports = holders.sync(&set).await;
        let applied = tokio::task::spawn_blocking(move || {
            node.lock()
                .map_err(|e| e.to_string())?
                .apply(&set, &ports)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| LinkError::Read(e.to_string()));
        holders.hand_over();
        match applied? {
            Ok(()) => tracing::debug!(generation, "applied watch set"),
            Err(e) => tracing::error!(generation, error = %e, "rejected watch set; keeping the previous one"),
        }
        Ok(())
    }
}

/// Resolves when the local pods change; never without a Kubernetes source (or once it is gone).
async fn local_changed(local: &mut LocalPods) {
    if let Some(rx) = local {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

async fn session(
    settings: &Settings,
    node: &Arc<Mutex<Node>>,
    clock: &Arc<dyn Clock>,
    instance: &mut Instance,
    backoff: &mut Backoff,
    holders: &mut Holders,
    watching: &mut Watching,
) -> Result<(), LinkError> {
    let demand = holders.demand();
    let endpoint = tonic::transport::Endpoint::from_shared(settings.scaler.clone())
        .map_err(|_| LinkError::Address(settings.scaler.clone()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await?;
    let mut client = AgentLinkClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(4);
    let hello = Hello {
        node: instance.node.clone(),
        instance_id: instance.id,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Hello(hello)),
    })
    .await
    .map_err(|_| LinkError::Closed)?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(scaler = %settings.scaler, node = %instance.node, "connected to the scaler");
    backoff.reset();

    let mut tick = tokio::time::interval(settings.report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(cmd) = msg? else { return Err(LinkError::Closed) };
                if let Some(scaler_command::Body::Watch(set)) = cmd.body {
                    watching.scaler = Some(set);
                    watching.apply(node, holders).await?;
                }
            }
            () = local_changed(&mut watching.local) => watching.apply(node, holders).await?,
            // A connection was just held: the scaler hears of the demand now, not at the next tick.
            _ = demand.notified() => {
                let report = read_report(node, clock, instance, holders).await?;
                if tx.try_send(AgentMessage { body: Some(agent_message::Body::Report(report)) }).is_err() {
                    tracing::warn!("scaler is slow; demand report skipped");
                }
            }
            _ = tick.tick() => {
                let report = read_report(node, clock, instance, holders).await?;
                match tx.try_send(AgentMessage { body: Some(agent_message::Body::Report(report)) }) {
                    Ok(()) => {}
                    // The counters are cumulative: a skipped report loses nothing.
                    Err(mpsc::error::TrySendError::Full(_)) => tracing::warn!("scaler is slow; report skipped"),
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(LinkError::Closed),
                }
            }
        }
    }
}

async fn read_report(
    node: &Arc<Mutex<Node>>,
    clock: &Arc<dyn Clock>,
    instance: &mut Instance,
    holders: &Holders,
) -> Result<Report, LinkError> {
    let node = Arc::clone(node);
    let clock2 = Arc::clone(clock);
    let ((monotonic_ns, services), balancers) = tokio::task::spawn_blocking(move || {
        let mut node = node.lock().map_err(|e| e.to_string())?;
        let read = node
            .read_all(|| clock2.monotonic_ns())
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((read, node.balancers().map_err(|e| e.to_string())?))
    })
    .await
    .map_err(|e| LinkError::Read(e.to_string()))?
    .map_err(LinkError::Read)?;
    let mut services = services;
    holders.fill(&mut services);
    instance.seq += 1;
    Ok(Report {
        seq: instance.seq,
        monotonic_ns,
        unix_ms: clock.unix_ms(),
        services,
        balancers,
    })
}
