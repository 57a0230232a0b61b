//! KEDA's external-scaler protocol (`externalscaler.ExternalScaler`), so a ScaledObject's
//! `external` or `external-push` trigger scales on Surge's metrics. `scalerMetadata` names the
//! service, the metric and the target (see `metadata`); values are the ones /api/v1/services shows.

pub mod metadata;

use std::{pin::Pin, sync::Arc, time::Duration};

use surge_proto::externalscaler::{
    external_scaler_server::ExternalScaler, GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse,
    IsActiveResponse, MetricSpec, MetricValue, ScaledObjectRef,
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

use crate::{
    state::Shared,
    view::{snapshot, ServiceView},
};
use metadata::{MetadataError, Trigger};

/// StreamIsActive re-checks at least this often, so a node that goes silent (no more reports)
/// still deactivates.
const RECHECK: Duration = Duration::from_secs(1);

pub struct ExternalScalerService {
    shared: Arc<Shared>,
}

impl ExternalScalerService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn known(shared: &Shared) -> Vec<String> {
    shared.catalog.specs().into_iter().map(|s| s.name).collect()
}

fn trigger(shared: &Shared, r: Option<&ScaledObjectRef>) -> Result<Trigger, Status> {
    let empty = Default::default();
    let md = r.map_or(&empty, |r| &r.scaler_metadata);
    Ok(metadata::parse(md, &known(shared))?)
}

/// The trigger's service as of now; NOT_FOUND if it stopped being declared.
fn current(shared: &Shared, t: &Trigger) -> Result<ServiceView, Status> {
    snapshot(shared)
        .services
        .into_iter()
        .find(|v| v.name == t.service)
        .ok_or_else(|| metadata::unknown_service(&t.service, &known(shared)).into())
}

fn is_active(t: &Trigger, v: &ServiceView) -> bool {
    t.metric.value(v) > t.activation_threshold
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for ExternalScalerService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let t = trigger(&self.shared, Some(request.get_ref()))?;
        let v = current(&self.shared, &t)?;
        Ok(Response::new(IsActiveResponse {
            result: is_active(&t, &v),
        }))
    }

    type StreamIsActiveStream = ActiveStream;

    /// The current state at once, then every change (activation and deactivation) as soon as the
    /// report that causes it is merged.
    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<ActiveStream>, Status> {
        let t = trigger(&self.shared, Some(request.get_ref()))?;
        current(&self.shared, &t)?;
        let shared = Arc::clone(&self.shared);
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let sub = shared.feed.subscribe(Duration::ZERO);
            let mut last = None;
            loop {
                sub.take(shared.clock.now());
                let update = current(&shared, &t).map(|v| is_active(&t, &v));
                let failed = update.is_err();
                if let Ok(active) = update {
                    if last == Some(active) {
                        tokio::select! {
                            _ = tx.closed() => break,
                            _ = tokio::time::timeout(RECHECK, sub.changed()) => {}
                        }
                        continue;
                    }
                    last = Some(active);
                    tracing::debug!(service = %t.service, metric = t.metric.name(), active, "activity changed");
                }
                if tx
                    .send(update.map(|result| IsActiveResponse { result }))
                    .await
                    .is_err()
                    || failed
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let t = trigger(&self.shared, Some(request.get_ref()))?;
        let target = t.target.ok_or(MetadataError::MissingTarget)?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: t.metric_name(),
                // The deprecated integer field, for older KEDA releases (never 0: KEDA rejects it).
                target_size: (target.round() as i64).max(1),
                target_size_float: target,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.get_ref();
        let t = trigger(&self.shared, req.scaled_object_ref.as_ref())?;
        let v = current(&self.shared, &t)?;
        let value = t.metric.value(&v);
        // KEDA asks with the name GetMetricSpec gave (its index prefix removed); answer with it.
        let metric_name = if req.metric_name.is_empty() {
            t.metric_name()
        } else {
            req.metric_name.clone()
        };
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name,
                metric_value: value.round() as i64,
                metric_value_float: value,
            }],
        }))
    }
}

#[cfg(test)]
mod tests;
