//! Generates the demo's gRPC code (protox; no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read as the script runs (see moat-api's build script).
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("payments.proto").display()
    );
    let fds = protox::compile(["payments.proto"], [&root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
