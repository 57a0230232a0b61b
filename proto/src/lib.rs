//! Surge's wire protocols. `surge.v1` is the first stable version; fields are only ever added,
//! never renumbered.

pub mod v1 {
    tonic::include_proto!("surge.v1");
}

/// KEDA's external-scaler protocol (package `externalscaler`), wire compatible with KEDA.
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}
