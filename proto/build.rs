//! Generates the Rust code for Surge's protocols from `surge/v1/*.proto` (needs `protoc`: the
//! setup script installs Debian's `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["surge/v1/agent.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["."])?;
    Ok(())
}
