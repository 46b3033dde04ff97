//! Cross-process end-to-end scenarios; see the `[[test]]` targets in Cargo.toml.
