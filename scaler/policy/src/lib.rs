//! Surge's policy core: a policy, observations and a clock in; a desired replica count with its reason out.
//!
//! Nothing here reads a clock, a file or the process environment: time is a [`Timestamp`]
//! parameter, files arrive as text, the environment through [`env::EnvSource`].

pub mod activation;
pub mod annotations;
pub mod config;
pub mod decision;
pub mod engine;
pub mod env;
pub mod hpa;
pub mod knative;
pub mod kpa;
pub mod metric;
#[cfg(feature = "cli")]
pub mod plot;
pub mod rules;
pub mod simulate;
pub mod spec;
pub mod store;
pub mod time;
pub mod trace;
pub mod validate;
pub mod window;

pub use config::{Algorithm, Defaults, Policy};
pub use decision::{Decision, Limit, Mode};
pub use engine::{Engine, Replicas, Sample};
pub use metric::{Metric, MetricType};
pub use time::Timestamp;
pub use validate::{parse_policy, PolicyError, ValidationError, ValidationErrors};
