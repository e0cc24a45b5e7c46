//! Vectorised elementwise and row-wise work around the large matmuls: exact-erf GELU, LayerNorm
//! (optionally fused with a residual add), in-place adds.
//!
//! Each operation is written once as plain Rust that LLVM vectorises, and compiled three times:
//! for AVX-512, for AVX2+FMA and for the baseline target; the best the CPU has is picked at run
//! time (the same detection as the matmul kernels: `crate::cpu`). Large inputs are split across
//! the rayon pool. The GELU lives with the shared math (the GEMM applies it too).

use crate::cpu::multiversion;
use crate::math::{exp_approx, CHUNK};
use rayon::prelude::*;

pub use crate::math::gelu_erf_inplace;

#[inline(always)]
fn add_body(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

multiversion!(fn add_serial(dst: &mut [f32], src: &[f32]) => add_body);

/// `dst += src` elementwise. Panics if the lengths differ.
pub fn add_inplace(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_inplace: lengths differ");
    if dst.len() <= CHUNK {
        add_serial(dst, src);
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| add_serial(d, s));
    }
}

/// Sum of a slice with 16 independent lanes (vectorises).
#[inline(always)]
fn sum16(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    it.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

#[inline(always)]
fn ln_rows_body(x: &[f32], dim: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let mut dev = vec![0f32; dim];
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean = sum16(xr) / dim as f32;
        for (d, &v) in dev.iter_mut().zip(xr) {
            *d = v - mean;
        }
        let mut lanes = [0f32; 16];
        let mut it = dev.chunks_exact(16);
        for c in &mut it {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += v * v;
            }
        }
        let ss = it.remainder().iter().map(|v| v * v).sum::<f32>() + lanes.iter().sum::<f32>();
        let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
        for (((o, &d), &g), &b) in or.iter_mut().zip(&dev).zip(gamma).zip(beta) {
            *o = d * inv * g + b;
        }
    }
}

multiversion!(
    fn ln_rows_serial(x: &[f32], dim: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) => ln_rows_body
);

/// LayerNorm over rows of `dim`: `out = (x − mean) / √(var + eps) · gamma + beta`, two-pass
/// statistics in f32. Panics on length mismatches (callers check shapes).
pub fn layer_norm(x: &[f32], dim: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    assert!(dim > 0, "layer_norm: dim 0");
    assert_eq!(x.len() % dim, 0, "layer_norm: x not whole rows");
    assert_eq!(x.len(), out.len(), "layer_norm: out length");
    assert_eq!(gamma.len(), dim, "layer_norm: gamma length");
    assert_eq!(beta.len(), dim, "layer_norm: beta length");
    let rows_per = (CHUNK / dim).max(1);
    if x.len() <= CHUNK {
        ln_rows_serial(x, dim, gamma, beta, eps, out);
    } else {
        out.par_chunks_mut(rows_per * dim)
            .zip(x.par_chunks(rows_per * dim))
            .for_each(|(o, xi)| ln_rows_serial(xi, dim, gamma, beta, eps, o));
    }
}

#[inline(always)]
fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for (l, v) in lanes.iter_mut().zip(c) {
            let d = v - mean;
            *l += d * d;
        }
    }
    it.remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum::<f32>()
        + lanes.iter().sum::<f32>()
}

/// Statistics of one group: mean and variance, two passes; partial sums of ≤ 4096 elements in
/// f32 lanes, combined in f64.
#[inline(always)]
fn group_stats_body(g: &[f32]) -> (f64, f64) {
    let len = g.len().max(1) as f64;
    let s: f64 = g.chunks(4096).map(|c| sum16(c) as f64).sum();
    let mean = s / len;
    let ss: f64 = g
        .chunks(4096)
        .map(|c| sum_sq_dev(c, mean as f32) as f64)
        .sum();
    (mean, ss / len)
}

multiversion!(fn group_stats_v(g: &[f32], out: &mut (f64, f64)) => group_stats_into);

#[inline(always)]
fn group_stats_into(g: &[f32], out: &mut (f64, f64)) {
    *out = group_stats_body(g);
}

/// `x · sigmoid(x)` without overflow for any sign: e = e^(−|x|) ≤ 1.
#[inline(always)]
fn silu_one(y: f32) -> f32 {
    let e = exp_approx(-y.abs());
    let r = 1.0 / (1.0 + e);
    let sig = if y >= 0.0 { r } else { e * r };
    y * sig
}

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_one(g) * u;
    }
}

multiversion!(fn silu_mul_v(gate: &[f32], up: &[f32], out: &mut [f32]) => silu_mul_body);

/// `out[r, j] = silu(gu[r, j]) · gu[r, inter + j]`: a gated MLP's activation on its fused
/// `[gate | up]` product `[rows, 2 · inter]`, into `out` `[rows, inter]`, rows in parallel.
pub fn silu_mul(gu: &[f32], inter: usize, out: &mut [f32]) {
    assert!(
        inter > 0 && gu.len() == 2 * out.len() && out.len().is_multiple_of(inter),
        "silu_mul: {} gate|up values for {} outputs of width {inter}",
        gu.len(),
        out.len()
    );
    out.par_chunks_mut(inter)
        .zip(gu.par_chunks(2 * inter))
        .for_each(|(o, g)| silu_mul_v(&g[..inter], &g[inter..], o));
}

#[inline(always)]
fn affine_body(x: &mut [f32], a: f32, b: f32, silu: bool) {
    if silu {
        for v in x.iter_mut() {
            *v = silu_one(*v * a + b);
        }
    } else {
        for v in x.iter_mut() {
            *v = *v * a + b;
        }
    }
}

multiversion!(fn affine_v(x: &mut [f32], a: f32, b: f32, silu: bool) => affine_body);

/// `GroupNorm(groups, eps)` with per-channel `gamma`/`beta`, then SiLU when `silu`, in place on
/// an NCHW buffer of `n` images × `c` channels × `hw` pixels; groups run in parallel.
/// Panics on length mismatches (callers check shapes).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_act(
    x: &mut [f32],
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
) {
    assert!(
        groups > 0 && c.is_multiple_of(groups),
        "group_norm_act: groups"
    );
    assert_eq!(x.len(), n * c * hw, "group_norm_act: x length");
    assert_eq!(gamma.len(), c, "group_norm_act: gamma length");
    assert_eq!(beta.len(), c, "group_norm_act: beta length");
    let cpg = c / groups;
    if x.is_empty() {
        return;
    }
    x.par_chunks_mut(cpg * hw).enumerate().for_each(|(gi, g)| {
        let mut st = (0f64, 0f64);
        group_stats_v(g, &mut st);
        let (mean, var) = st;
        let inv = 1.0 / (var.max(0.0) + eps).sqrt();
        let c0 = (gi % groups) * cpg;
        for (ci, chan) in g.chunks_mut(hw).enumerate() {
            let gm = gamma[c0 + ci] as f64;
            let a = (gm * inv) as f32;
            let b = (beta[c0 + ci] as f64 - mean * gm * inv) as f32;
            affine_v(chan, a, b, silu);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gated activation against `g / (1 + e^-g) · u` in f64, at large |g| of both signs
    /// (no overflow) and on ragged widths (vector bodies and tails).
    #[test]
    fn silu_mul_matches_f64() {
        for inter in [1, 7, 16, 37] {
            let rows = 3;
            let gu: Vec<f32> = (0..rows * 2 * inter)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * if i % 5 == 0 { 2.0 } else { 0.2 })
                .collect();
            let mut out = vec![f32::NAN; rows * inter];
            silu_mul(&gu, inter, &mut out);
            for r in 0..rows {
                for j in 0..inter {
                    let (g, u) = (
                        gu[r * 2 * inter + j] as f64,
                        gu[r * 2 * inter + inter + j] as f64,
                    );
                    let want = g / (1.0 + (-g).exp()) * u;
                    let got = out[r * inter + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "inter {inter} r{r} j{j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn layer_norm_matches_f64() {
        for (rows, dim) in [(1, 1), (3, 17), (40, 1024), (5, 33)] {
            let x: Vec<f32> = (0..rows * dim)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.07 + 3.0)
                .collect();
            let g: Vec<f32> = (0..dim).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..dim).map(|i| (i % 3) as f32 * 0.2 - 0.2).collect();
            let mut out = vec![0f32; rows * dim];
            layer_norm(&x, dim, &g, &b, 1e-6, &mut out);
            for r in 0..rows {
                let xr = &x[r * dim..(r + 1) * dim];
                let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
                let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
                for i in 0..dim {
                    let want =
                        (xr[i] as f64 - mean) / (var + 1e-6).sqrt() * g[i] as f64 + b[i] as f64;
                    let got = out[r * dim + i] as f64;
                    assert!((got - want).abs() < 2e-5, "r{r} i{i}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn group_norm_silu_matches_f64() {
        let (n, c, hw, groups) = (2, 8, 37, 4);
        let x: Vec<f32> = (0..n * c * hw)
            .map(|i| ((i * 29 % 97) as f32 - 40.0) * 0.3 + 2.0)
            .collect();
        let g: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.2).collect();
        let b: Vec<f32> = (0..c).map(|i| i as f32 * 0.3 - 1.0).collect();
        for silu in [false, true] {
            let mut y = x.clone();
            group_norm_act(&mut y, n, c, hw, groups, &g, &b, 1e-6, silu);
            let cpg = c / groups;
            for img in 0..n {
                for gr in 0..groups {
                    let base = (img * c + gr * cpg) * hw;
                    let v = &x[base..base + cpg * hw];
                    let mean = v.iter().map(|&t| t as f64).sum::<f64>() / v.len() as f64;
                    let var =
                        v.iter().map(|&t| (t as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
                    for (i, &t) in v.iter().enumerate() {
                        let ch = gr * cpg + i / hw;
                        let mut want =
                            (t as f64 - mean) / (var + 1e-6).sqrt() * g[ch] as f64 + b[ch] as f64;
                        if silu {
                            want /= 1.0 + (-want).exp();
                        }
                        let got = y[base + i] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * want.abs().max(1.0),
                            "{got} vs {want}"
                        );
                    }
                }
            }
        }
        // Extreme inputs stay finite and saturate like x·sigmoid(x).
        let mut e = vec![-1e6f32, 1e6, -100.0, 100.0];
        affine_v(&mut e, 1.0, 0.0, true);
        assert!(e[0] <= 0.0 && e[0].abs() < 1e-30);
        assert_eq!(e[1], 1e6);
        assert!(e[2].abs() < 1e-30 && (e[3] - 100.0).abs() < 1e-4);
    }

    #[test]
    fn add_inplace_adds() {
        let mut a: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..100_000).map(|i| 2.0 * i as f32).collect();
        add_inplace(&mut a, &b);
        assert!(a.iter().enumerate().all(|(i, &v)| v == 3.0 * i as f32));
    }
}
