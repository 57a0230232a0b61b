//! Generates the Rust code for Surge's protocols from `surge/v1/*.proto`, and for KEDA's
//! external-scaler protocol from `externalscaler/` (needs `protoc`: the setup script installs
//! Debian's `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "surge/v1/agent.proto",
        "surge/v1/metrics.proto",
        "externalscaler/externalscaler.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["."])?;
    Ok(())
}
