//! Benchmarks live in the `[[bench]]` targets; see README.md. What several of them share:

/// The runtime the load-generating benches drive their clients on (two workers: the machine's
/// cores).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot start the bench runtime: {e}"))
}

/// The `p` quantile (0..=1) of `sorted`, which must not be empty.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}
