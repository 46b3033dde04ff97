//! Link-time settings for the sidecar binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=startup.order");
    // Pack the executable's relative relocations (DT_RELR): a position-independent Rust binary
    // carries hundreds of KiB of them, which the loader reads into every sidecar's memory at
    // start. Needs glibc 2.36+ and binutils 2.38+; other targets link as before.
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    // Put the functions a sidecar runs from start to idle side by side at the front of the
    // code (`startup.order`, written by `bench/scripts/startup-order`). The kernel maps code
    // into a process in whole stretches around each page it touches (64 KiB or more), so with
    // start-up code spread over the whole binary an idle sidecar has nearly all of it resident;
    // packed, it has about what it ran (decision 39 in docs/decisions.md). Only with rust-lld,
    // the linker Rust uses for this target (GNU ld has no such option; the musl image links as
    // before), and only in optimised builds, the ones deployed and measured. A name this build
    // does not have is skipped: it costs memory, never correctness.
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let lld = target == "x86_64-unknown-linux-gnu" && !flags.contains("linker-features=-lld");
    if lld && profile == "release" {
        let order = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
            .join("startup.order");
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
