//! Link-time settings for the sidecar binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Pack the executable's relative relocations (DT_RELR): a position-independent Rust binary
    // carries hundreds of KiB of them, which the loader reads into every sidecar's memory at
    // start. Needs glibc 2.36+ and binutils 2.38+; other targets link as before.
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
