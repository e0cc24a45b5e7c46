//! What the kernel benchmarks share: their `BENCH_*` environment settings and the median of
//! their samples.

// Each benchmark uses only some of these.
#![allow(dead_code)]

/// The number in environment variable `name`, if it is set and parses.
pub fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

/// The comma-separated numbers in environment variable `name`, or `default` when it is unset.
pub fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
