//! Times decode-shaped attention (one query per head over a bf16 or f32 KV cache, as a
//! Janus-Pro-1B decode step has: 16 heads of 128) at a few context lengths; one JSON line per
//! case. The caches of 24 layers are cycled so they come from memory, as in a real step.
//!
//! Run: `cargo run --release -p janus-kernels --example bench_attention`
//! (BENCH_RUNS samples, BENCH_KV=700,2048 context lengths).

use half::bf16;
use janus_kernels::attention::{attention, AttnShape, Kv};
use std::time::Instant;

mod common;

const HEADS: usize = 16;
const DIM: usize = 128;
const LAYERS: usize = 24;

fn main() {
    let runs = common::env_usize("BENCH_RUNS").unwrap_or(15);
    let lens = common::env_list("BENCH_KV", &[100, 700, 2048]);
    for &t in &lens {
        let n = HEADS * t * DIM;
        let gen = |seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed) % 997) as f32 - 498.0) * 1e-3)
                .collect()
        };
        let kf: Vec<Vec<f32>> = (0..LAYERS).map(|l| gen(2 * l)).collect();
        let vf: Vec<Vec<f32>> = (0..LAYERS).map(|l| gen(2 * l + 1)).collect();
        let kb: Vec<Vec<bf16>> = kf
            .iter()
            .map(|x| x.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect();
        let vb: Vec<Vec<bf16>> = vf
            .iter()
            .map(|x| x.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect();
        let q: Vec<f32> = (0..HEADS * DIM)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.05)
            .collect();
        let mut out = vec![0f32; HEADS * DIM];
        let shape = AttnShape::packed(HEADS, 1, t, DIM, t * DIM, HEADS);
        let scale = 1.0 / (DIM as f32).sqrt();
        for (name, bytes) in [("bf16", 2usize), ("f32", 4)] {
            let mut samples = Vec::with_capacity(runs);
            for r in 0..runs + 2 {
                let start = Instant::now();
                for l in 0..LAYERS {
                    let (k, v) = match name {
                        "bf16" => (Kv::Bf16(&kb[l]), Kv::Bf16(&vb[l])),
                        _ => (Kv::F32(&kf[l]), Kv::F32(&vf[l])),
                    };
                    attention(&q, k, v, shape, scale, None, &mut out);
                }
                if r >= 2 {
                    samples.push(start.elapsed().as_secs_f64());
                }
            }
            let s = common::median(samples);
            println!(
                "{{\"kv_len\":{t},\"cache\":\"{name}\",\"layers\":{LAYERS},\"ms\":{:.3},\"cache_gbps\":{:.1}}}",
                s * 1e3,
                (2 * LAYERS * n * bytes) as f64 / s / 1e9
            );
        }
    }
}
