//! surge-scaler: merges the agents' streams, applies policies, serves metrics and APIs.

pub mod actuator;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod control;
pub mod feed;
pub mod grpc;
pub mod http;
pub mod ingest;
pub mod k8s;
pub mod keda;
pub mod latency;
pub mod local;
pub mod metrics;
pub mod observations;
pub mod page;
pub mod policies;
pub mod sources;
pub mod state;
pub mod subscribe;
#[cfg(test)]
mod test_support;
pub mod view;
