//! The agent's stream to the scaler: a Hello, then a Report every interval; watch sets come back.
//! When the scaler is away the agent retries with backoff and keeps counting in the kernel: the
//! counters are cumulative, so the first report after reconnecting carries everything.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use surge_proto::v1::{
    agent_link_client::AgentLinkClient, agent_message, scaler_command, AgentMessage, Hello, Report,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    backoff::Backoff, clock::Clock, config::Settings, holder::HoldConfig, holding::Holders, node::Node,
};

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

/// Runs until `shutdown` turns true: connects, streams, reconnects with backoff.
pub async fn run(
    settings: Settings,
    node: Arc<Mutex<Node>>,
    clock: Arc<dyn Clock>,
    mut instance: Instance,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut holders = Holders::new(HoldConfig {
        timeout: settings.hold_timeout,
        buffer: settings.hold_buffer,
        ..HoldConfig::default()
    });
    loop {
        tokio::select! {
            result = session(&settings, &node, &clock, &mut instance, &mut backoff, &mut holders) => {
                if let Err(e) = result {
                    tracing::warn!(scaler = %settings.scaler, error = %e, "scaler link down; retrying");
                }
            }
            _ = shutdown.changed() => return,
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn session(
    settings: &Settings,
    node: &Arc<Mutex<Node>>,
    clock: &Arc<dyn Clock>,
    instance: &mut Instance,
    backoff: &mut Backoff,
    holders: &mut Holders,
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
                    let node = Arc::clone(node);
                    let generation = set.generation;
                    let ports = holders.sync(&set).await;
                    let applied = tokio::task::spawn_blocking(move || node.lock().map_err(|e| e.to_string())?.apply(&set, &ports).map_err(|e| e.to_string()))
                        .await
                        .map_err(|e| LinkError::Read(e.to_string()))?;
                    match applied {
                        Ok(()) => tracing::debug!(generation, "applied watch set"),
                        Err(e) => tracing::error!(generation, error = %e, "rejected watch set; keeping the previous one"),
                    }
                }
            }
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
