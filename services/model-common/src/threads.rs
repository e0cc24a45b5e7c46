//! The tensor-math threads: rayon's global pool, which the kernels and candle share.

/// Builds the global pool with its threads named `janus-math-N`, sized as rayon sizes it
/// (`RAYON_NUM_THREADS`, else every core). Without a name a pool thread takes the name of the
/// thread that created it, often an async runtime worker (`tokio-rt-worker`), and `top -H` or
/// `perf` of a server then shows the model's work under the runtime's name. Call before any
/// tensor math; a pool that already exists is kept as it is.
pub fn name_math_threads() {
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("janus-math-{i}"))
        .build_global()
    {
        tracing::debug!("the math pool was already built: {e}");
    }
}
