//! Support for Surge's end-to-end tests: starting the real programs, a raw HTTP client, load.

pub mod browser;
pub mod harness;
pub mod http_client;
pub mod kernel_cost;
pub mod kube_env;
pub mod load;
pub mod netns;
pub mod prometheus;
pub mod raw_tcp;
pub mod wrk;

/// The sample service's gRPC echo protocol (`proto/echo.proto`).
pub mod echo {
    tonic::include_proto!("surge.sample.v1");
}
