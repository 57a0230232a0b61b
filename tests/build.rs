//! Generates the sample service's gRPC code from `proto/echo.proto` (needs `protoc`, like the
//! proto crate).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    tonic_prost_build::configure().compile_protos(&["proto/echo.proto"], &["proto"])?;
    Ok(())
}
