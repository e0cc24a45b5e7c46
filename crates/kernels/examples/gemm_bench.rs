//! GEMM microbenchmark: `janus_kernels::gemm` against candle's CPU matmul (the `gemm` crate) at
//! the large-M shapes of the vision tower, prefill and the VQ decoder, interleaved in one
//! process (best of N), so a noisy machine affects both alike.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p janus-kernels --example gemm_bench [iters]`
use candle_core::{Device, Tensor};
use janus_kernels::gemm::{gemm, BRef, GemmOpts, MatRef, Precision};
use std::time::Instant;

fn best(iters: usize, mut f: impl FnMut()) -> f64 {
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 * 1e-3 - 0.5)
        .collect()
}

fn main() -> candle_core::Result<()> {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dev = Device::Cpu;
    println!("GFLOP/s, best of {iters}; x·Wᵀ with W [n, k] row-major (Linear)");
    for &(m, k, n) in &[
        (576, 1024, 3072),
        (576, 4096, 1024),
        (698, 2048, 5632),
        (698, 5632, 2048),
    ] {
        let x = data(m * k, 1);
        let w = data(n * k, 2);
        let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let (xt, wt) = (
            Tensor::from_vec(x.clone(), (m, k), &dev)?,
            Tensor::from_vec(w.clone(), (n, k), &dev)?,
        );
        let mut c = vec![0f32; m * n];
        let gf = 2.0 * (m * n * k) as f64 / 1e9;
        let t_candle = best(iters, || {
            let _ = xt.matmul(&wt.t().unwrap()).unwrap();
        });
        let a = MatRef::row_major(&x, m, k);
        let run = |b: BRef<'_>, p: Precision, c: &mut [f32]| {
            let o = GemmOpts {
                precision: p,
                ..Default::default()
            };
            best(iters, || gemm(a, b, c, n, &o).unwrap())
        };
        let t_f32 = run(
            BRef::F32(MatRef::transposed(&w, k, n)),
            Precision::F32,
            &mut c,
        );
        let t_w16 = run(
            BRef::Bf16(MatRef::transposed(&wb, k, n)),
            Precision::F32,
            &mut c,
        );
        let t_bf = run(
            BRef::Bf16(MatRef::transposed(&wb, k, n)),
            Precision::Bf16,
            &mut c,
        );
        println!(
            "[{m}×{k}]×[{k}×{n}]: candle {:.0} | ours f32 {:.0} | ours bf16 weights {:.0} | ours bf16 products {:.0}",
            gf / t_candle, gf / t_f32, gf / t_w16, gf / t_bf
        );
    }
    println!("VQ 3×3 conv as W [cout, cin·9] × im2col [cin·9, h·w]");
    for &(c, cout, hw) in &[
        (128usize, 128usize, 384usize),
        (256, 256, 192),
        (512, 512, 48),
        (256, 128, 192),
        (128, 128, 48),
    ] {
        let (h, w) = (hw, hw);
        let img = data(c * h * w, 3);
        let wt = data(cout * c * 9, 4);
        let n = h * w;
        let gf = 2.0 * (cout * c * 9 * n) as f64 / 1e9;
        // The im2col matrix of the direct convolution (built outside the timing).
        let mut cols = vec![0f32; c * 9 * n];
        for q in 0..c * 9 {
            let (ci, ky, kx) = (q / 9, q % 9 / 3, q % 3);
            for y in 0..h {
                for x in 0..w {
                    let (sy, sx) = (y as isize + ky as isize - 1, x as isize + kx as isize - 1);
                    if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                        cols[q * n + y * w + x] = img[(ci * h + sy as usize) * w + sx as usize];
                    }
                }
            }
        }
        let (wtt, colt) = (
            Tensor::from_vec(wt.clone(), (cout, c * 9), &dev)?,
            Tensor::from_vec(cols.clone(), (c * 9, n), &dev)?,
        );
        let t_candle = best(iters, || {
            let _ = wtt.matmul(&colt).unwrap();
        });
        let mut out = vec![0f32; cout * n];
        let a = MatRef::row_major(&wt, cout, c * 9);
        // The direct convolution as one product over the prebuilt im2col matrix.
        let direct = |o: &GemmOpts<'_>, out: &mut [f32]| {
            best(iters, || {
                gemm(a, BRef::F32(MatRef::row_major(&cols, c * 9, n)), out, n, o).unwrap()
            })
        };
        let t_direct = direct(&GemmOpts::default(), &mut out);
        let o16 = GemmOpts {
            precision: Precision::Bf16,
            ..Default::default()
        };
        let t_bf = direct(&o16, &mut out);
        // Winograd F(2×2, 3×3): GFLOP/s counted as the direct convolution's (an effective rate).
        let wino = janus_kernels::winograd::Winograd3x3::new(&wt, cout, c, Precision::F32).unwrap();
        let t_wino = best(iters, || {
            wino.forward(&img, h, w, None, &mut out, false).unwrap()
        });
        let wino16 =
            janus_kernels::winograd::Winograd3x3::new(&wt, cout, c, Precision::Bf16).unwrap();
        let t_wino16 = best(iters, || {
            wino16.forward(&img, h, w, None, &mut out, false).unwrap()
        });
        println!(
            "cin {c} cout {cout} at {hw}²: candle (cols prebuilt) {:.0} | ours direct (cols prebuilt) {:.0} | ours direct bf16 products {:.0} | winograd {:.0} | winograd bf16 {:.0} (effective)",
            gf / t_candle, gf / t_direct, gf / t_bf, gf / t_wino, gf / t_wino16
        );
    }
    Ok(())
}
