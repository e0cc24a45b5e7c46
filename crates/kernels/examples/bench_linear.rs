//! Times `linear_rows` at decode shapes and prints one JSON line per case.
//!
//! Run: `cargo run --release -p janus-kernels --example bench_linear`
//! (set RAYON_NUM_THREADS to pin the thread count, BENCH_RUNS to change the sample count,
//! BENCH_M=1,2 to pick row counts, BENCH_SHAPE=16384x2048 to pick one n x k shape,
//! BENCH_PATH=avx2 to force a path).

use half::bf16;
use janus_kernels::{linear_rows, linear_rows_on, simd_level, Weights};
use std::time::Instant;

mod common;
use common::median;

/// `linear_rows` without bias, or the forced path when one is named.
fn lin(
    path: Option<&str>,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    out: &mut [f32],
) {
    match path {
        None => linear_rows(x, m, k, w, n, None, out),
        Some(p) => assert!(
            linear_rows_on(p, x, m, k, w, n, None, out),
            "path {p} unsupported here"
        ),
    }
}

fn main() {
    let runs = common::env_usize("BENCH_RUNS").unwrap_or(20);
    // BENCH_M="1,2" narrows the row counts while iterating on one case.
    let ms = common::env_list("BENCH_M", &[1, 2, 8, 16, 32]);
    let shapes = [
        (2048usize, 2048usize),
        (5632, 2048),
        (2048, 5632),
        (16384, 2048),
    ];
    // BENCH_SHAPE=16384x2048 (n x k) narrows the shapes.
    let only: Option<(usize, usize)> = std::env::var("BENCH_SHAPE").ok().and_then(|s| {
        let (n, k) = s.split_once('x')?;
        Some((n.trim().parse().ok()?, k.trim().parse().ok()?))
    });
    // BENCH_PATH=avx2 (or scalar, avx512) times a forced path instead of the detected one.
    let path = std::env::var("BENCH_PATH").ok();
    let shown = path.clone().unwrap_or_else(|| simd_level().to_string());
    eprintln!(
        "simd={shown} threads={} runs={runs}",
        rayon::current_num_threads()
    );
    for &(n, k) in shapes.iter().filter(|s| only.is_none_or(|o| o == **s)) {
        // Deterministic, cheap fill; values don't matter for timing but keep them finite.
        let w32: Vec<f32> = (0..n * k)
            .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
            .collect();
        let wbf: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        for &m in &ms {
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
            let mut out = vec![0.0f32; m * n];
            for (dtype, weights, bytes) in [
                ("f32", Weights::F32(&w32), n * k * 4),
                ("bf16", Weights::Bf16(&wbf), n * k * 2),
            ] {
                for _ in 0..3 {
                    lin(path.as_deref(), &x, m, k, weights, n, &mut out);
                }
                let times: Vec<f64> = (0..runs)
                    .map(|_| {
                        let t = Instant::now();
                        lin(path.as_deref(), &x, m, k, weights, n, &mut out);
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
                let s = median(times);
                std::hint::black_box(&out);
                println!(
                    "{{\"m\":{m},\"n\":{n},\"k\":{k},\"dtype\":\"{dtype}\",\"ms\":{:.4},\"best_ms\":{:.4},\"weight_gbps\":{:.2},\"gflops\":{:.1}}}",
                    s * 1e3,
                    best * 1e3,
                    bytes as f64 / s / 1e9,
                    2.0 * (m * n * k) as f64 / s / 1e9
                );
            }
        }
    }
}
