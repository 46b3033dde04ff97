//! Benchmarks live in the `[[bench]]` targets; see README.md.
