//! The agents' gRPC stream: a Hello, then reports in; the current watch set out at once and again
//! whenever it changes. A stream ends when the agent goes; its totals stay counted.

use std::{pin::Pin, sync::Arc};

use surge_proto::v1::{
    agent_link_server::AgentLink, agent_message, scaler_command, AgentMessage, ScalerCommand,
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

use crate::state::Shared;

pub struct AgentLinkService {
    shared: Arc<Shared>,
}

impl AgentLinkService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<ScalerCommand, Status>> + Send>>;

#[tonic::async_trait]
impl AgentLink for AgentLinkService {
    type StreamStream = CommandStream;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<CommandStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.body) {
            Some(agent_message::Body::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a stream must be a Hello",
                ))
            }
        };
        if hello.node.is_empty() {
            return Err(Status::invalid_argument("Hello.node must not be empty"));
        }
        let shared = Arc::clone(&self.shared);
        shared
            .ingest()
            .connected(&hello.node, hello.instance_id, shared.clock.now());
        tracing::info!(node = %hello.node, instance = hello.instance_id, version = %hello.version, "agent connected");

        let (tx, rx) = mpsc::channel(4);
        let mut watch = shared.catalog.subscribe();
        tokio::spawn(async move {
            let node = hello.node;
            let instance = hello.instance_id;
            let mut send_watch = true;
            loop {
                if send_watch {
                    let set = watch.borrow_and_update().clone();
                    let cmd = ScalerCommand {
                        body: Some(scaler_command::Body::Watch(set)),
                    };
                    if tx.send(Ok(cmd)).await.is_err() {
                        break;
                    }
                    send_watch = false;
                }
                tokio::select! {
                    changed = watch.changed() => match changed {
                        Ok(()) => send_watch = true,
                        Err(_) => break,
                    },
                    msg = inbound.message() => match msg {
                        Ok(Some(AgentMessage { body: Some(agent_message::Body::Report(r)) })) => {
                            let now = shared.clock.now();
                            let lag_ms = (shared.clock.unix_ms() - r.unix_ms).max(0) as u64;
                            let mut ingest = shared.ingest();
                            ingest.record(&node, instance, &r, now);
                            if r.unix_ms > 0 {
                                ingest.report_lag(&node, std::time::Duration::from_millis(lag_ms));
                            }
                            drop(ingest);
                            shared.local.record(&node, &r.balancers, now);
                            shared.feed.publish(now);
                        }
                        Ok(Some(_)) => tracing::warn!(node = %node, "ignoring an unexpected message"),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(node = %node, error = %e, "agent stream failed");
                            break;
                        }
                    },
                }
            }
            shared.ingest().disconnected(&node, instance);
            tracing::info!(node = %node, instance, "agent disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
