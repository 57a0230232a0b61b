//! surge-agent: measures per-service traffic in the kernel and streams it to the scaler.

pub mod attribution;
pub mod backends;
pub mod backoff;
pub mod bytesize;
pub mod cgroups;
pub mod clock;
pub mod config;
pub mod holder;
pub mod holding;
pub mod k8s;
pub mod kernel;
pub mod limits;
pub mod link;
pub mod node;
pub mod pins;
pub mod pods;
pub mod preflight;
pub mod report;
pub mod steer;
