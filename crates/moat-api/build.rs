//! Compiles proto/moat/v1 with protox (pure Rust, no system protoc) and generates tonic code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read as the script runs, not as it was compiled: cargo may reuse a script compiled for a
    // checkout of the same crate elsewhere (a git worktree sharing the target directory).
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "moat/v1/identity.proto",
        "moat/v1/mesh.proto",
        "moat/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .codec_path("crate::Codec")
        .compile_fds(fds)?;
    Ok(())
}
