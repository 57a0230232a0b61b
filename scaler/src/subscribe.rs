//! `surge.v1.Metrics/Subscribe`: the merged per-service figures, streamed as reports are merged.
//! Each subscriber has its own task and feed slot: when its client reads slowly, the task waits
//! on the client's stream while the slot keeps only the newest tick, so the client then gets the
//! newest figures and `missed`; ingest and other subscribers never wait for it.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use surge_proto::v1::{
    metrics_server::Metrics, LatencyPercentiles, MetricsUpdate, ServiceMetrics, SubscribeRequest,
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

use crate::{
    feed::Taken,
    keda::metadata::unknown_service,
    state::Shared,
    view::{snapshot, ServiceView},
};

pub struct MetricsService {
    shared: Arc<Shared>,
}

impl MetricsService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<MetricsUpdate, Status>> + Send>>;

/// One service's figures on the wire.
// TODO(issue 7): CPU, memory and held connections (new ServiceMetrics fields) once ingest has them.
pub fn service_metrics(v: &ServiceView) -> ServiceMetrics {
    let f = &v.figures;
    ServiceMetrics {
        service: v.name.clone(),
        reported: v.reported,
        requests_total: f.requests_total,
        responses_total: f.responses_total,
        request_rate: f.request_rate,
        in_flight: f.in_flight,
        concurrency: f.concurrency,
        rx_bytes_total: f.rx_bytes_total,
        tx_bytes_total: f.tx_bytes_total,
        latency_seconds_sum: f.latency_seconds_sum,
        latency: v.latency.map(|l| LatencyPercentiles {
            p50_ms: l.p50_ms,
            p90_ms: l.p90_ms,
            p99_ms: l.p99_ms,
        }),
        nodes: u32::try_from(f.nodes).unwrap_or(u32::MAX),
        resets: f.resets,
        latency_buckets: f.latency_buckets.clone(),
    }
}

fn update(shared: &Shared, filter: &[String], taken: Taken) -> MetricsUpdate {
    let now = shared.clock.now();
    let services = snapshot(shared)
        .services
        .iter()
        .filter(|v| filter.is_empty() || filter.contains(&v.name))
        .map(service_metrics)
        .collect();
    MetricsUpdate {
        seq: taken.tick.seq,
        missed: taken.missed,
        scaler_time_ms: u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        services,
    }
}

#[tonic::async_trait]
impl Metrics for MetricsService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<UpdateStream>, Status> {
        let req = request.into_inner();
        let known: Vec<String> = self.shared.catalog.specs().into_iter().map(|s| s.name).collect();
        if let Some(bad) = req.services.iter().find(|s| !known.contains(s)) {
            return Err(unknown_service(bad, &known).into());
        }
        let min_interval = Duration::from_millis(u64::from(req.min_interval_ms));
        let shared = Arc::clone(&self.shared);
        let sub = shared.feed.subscribe(min_interval);
        tracing::info!(services = ?req.services, min_interval_ms = req.min_interval_ms, "subscriber joined");
        // One message in flight: while the client is slow, newer ticks wait in the slot.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let wait = async {
                    sub.changed().await;
                    let early = sub.due().saturating_sub(shared.clock.now());
                    if !early.is_zero() {
                        tokio::time::sleep(early).await;
                    }
                };
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = wait => {}
                }
                let Some(taken) = sub.take(shared.clock.now()) else {
                    continue;
                };
                if taken.missed > 0 {
                    tracing::debug!(
                        missed = taken.missed,
                        seq = taken.tick.seq,
                        "slow subscriber missed updates"
                    );
                }
                if tx.send(Ok(update(&shared, &req.services, taken))).await.is_err() {
                    break;
                }
            }
            tracing::info!(services = ?req.services, "subscriber left");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
