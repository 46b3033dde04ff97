//! Generates the test-only gRPC echo service (protox; no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("echo.proto").display()
    );
    let fds = protox::compile(["echo.proto"], [&root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
