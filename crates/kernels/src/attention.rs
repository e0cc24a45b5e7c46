//! Multi-head scaled-dot-product attention on the CPU, heads in parallel.
//!
//! candle's batched matmul is slow at attention shapes (head dim 64–128 is a thin inner
//! dimension) and its softmax calls `expf` per element. Here each head runs `QKᵀ` and `PV` through
//! the packed GEMM ([`crate::gemm`]; decode-shaped queries use plain dot products), and the
//! softmax uses a vectorisable `exp`.

use crate::gemm::{gemm, BRef, GemmOpts, MatRef};
use rayon::prelude::*;

/// Shapes and strides of one attention call; all tensors are f32.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Independent (batch × head) problems.
    pub heads: usize,
    /// Queries per head.
    pub q_len: usize,
    /// Keys/values per head.
    pub kv_len: usize,
    /// Head width.
    pub dim: usize,
    /// Distance between consecutive heads' keys (and values) in elements (≥ kv_len · dim), so a
    /// pre-allocated KV cache can be read in place.
    pub kv_head_stride: usize,
    /// Consecutive heads sharing one additive mask (the heads of one batch row).
    pub heads_per_mask: usize,
}

/// `out[h] = softmax(q[h] · k[h]ᵀ · scale + mask[h / heads_per_mask]) · v[h]`.
///
/// `q` and `out` are `[heads, q_len, dim]`; `k`, `v` hold head `h` at `h · kv_head_stride` as
/// `[kv_len, dim]`; `mask` (optional) is `[heads / heads_per_mask, q_len, kv_len]`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
    scale: f32,
    mask: Option<&[f32]>,
    out: &mut [f32],
) {
    let AttnShape {
        heads,
        q_len,
        kv_len,
        dim,
        kv_head_stride,
        heads_per_mask,
    } = shape;
    assert_eq!(q.len(), heads * q_len * dim, "q shape");
    assert_eq!(out.len(), heads * q_len * dim, "out shape");
    assert!(kv_head_stride >= kv_len * dim, "kv stride");
    if heads == 0 || q_len == 0 {
        return;
    }
    assert!(
        k.len() >= (heads - 1) * kv_head_stride + kv_len * dim,
        "k shape"
    );
    assert!(
        v.len() >= (heads - 1) * kv_head_stride + kv_len * dim,
        "v shape"
    );
    if let Some(m) = mask {
        assert!(
            heads_per_mask > 0 && heads % heads_per_mask == 0,
            "heads_per_mask"
        );
        assert_eq!(
            m.len(),
            heads / heads_per_mask * q_len * kv_len,
            "mask shape"
        );
    }
    out.par_chunks_mut(q_len * dim)
        .enumerate()
        .for_each(|(h, o)| {
            let qh = &q[h * q_len * dim..(h + 1) * q_len * dim];
            let kh = &k[h * kv_head_stride..h * kv_head_stride + kv_len * dim];
            let vh = &v[h * kv_head_stride..h * kv_head_stride + kv_len * dim];
            let mut scores = vec![0f32; q_len * kv_len];
            // Decode steps have one query per head: plain dot products and a weighted row sum beat
            // the matmul kernel (no V transpose, no nested parallelism for a few µs of work).
            let small = q_len <= SMALL_Q;
            if small {
                for (i, srow) in scores.chunks_mut(kv_len).enumerate() {
                    let qi = &qh[i * dim..(i + 1) * dim];
                    for (s, kj) in srow.iter_mut().zip(kh.chunks(dim)) {
                        *s = dot(qi, kj);
                    }
                }
            } else {
                // Q·Kᵀ on the packed GEMM: K's rows are Kᵀ's columns.
                gemm(
                    MatRef::row_major(qh, q_len, dim),
                    BRef::F32(MatRef::transposed(kh, dim, kv_len)),
                    &mut scores,
                    kv_len,
                    &GemmOpts::default(),
                )
                .expect("attention: shapes checked above");
            }
            let mh = mask.map(|m| {
                let g = h / heads_per_mask;
                &m[g * q_len * kv_len..(g + 1) * q_len * kv_len]
            });
            for (i, row) in scores.chunks_mut(kv_len).enumerate() {
                let mrow = mh.map(|m| &m[i * kv_len..(i + 1) * kv_len]);
                softmax_row(row, scale, mrow);
            }
            if small {
                o.fill(0.0);
                for (i, orow) in o.chunks_mut(dim).enumerate() {
                    for (&p, vj) in scores[i * kv_len..(i + 1) * kv_len]
                        .iter()
                        .zip(vh.chunks(dim))
                    {
                        for (acc, &x) in orow.iter_mut().zip(vj) {
                            *acc += p * x;
                        }
                    }
                }
                return;
            }
            // P·V on the packed GEMM (V read in place, row-major [kv_len, dim]).
            gemm(
                MatRef::row_major(&scores, q_len, kv_len),
                BRef::F32(MatRef::row_major(vh, kv_len, dim)),
                o,
                dim,
                &GemmOpts::default(),
            )
            .expect("attention: shapes checked above");
        });
}

/// Queries per head up to which the decode-shaped path is used.
const SMALL_Q: usize = 4;

/// Dot product with 16 independent lanes (vectorises; one running sum would not).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// In-place `softmax(row · scale + mask)`. Reductions use 16 independent lanes so the compiler
/// vectorises them (a single running max/sum is a serial dependency chain).
#[inline(always)]
fn softmax_row_body(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    match mask {
        Some(m) => row
            .iter_mut()
            .zip(m)
            .for_each(|(x, &b)| *x = *x * scale + b),
        None => row.iter_mut().for_each(|x| *x *= scale),
    }
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|x| *x = exp_approx(*x - max));
    let mut sums = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in sums.iter_mut().zip(c) {
            *l += x;
        }
    }
    let sum: f32 = chunks.remainder().iter().sum::<f32>() + sums.iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

crate::elementwise::multiversion!(
    /// [`softmax_row_body`] compiled for the best SIMD level of this CPU.
    fn softmax_row(row: &mut [f32], scale: f32, mask: Option<&[f32]>) => softmax_row_body
);

/// `e^x` for x ≤ 0 with relative error below 2e-7, written without calls or branches so loops
/// over it vectorise. Inputs below −87 give 0 (as `expf` underflows there).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.max(-87.0);
    // e^x = 2^n · e^r, n = round(x / ln 2), r = x − n·ln 2 ∈ [−ln2/2, ln2/2]; ln 2 split in a
    // short high part and a correction (Cody–Waite) so r keeps full precision for large |x|.
    // Round to nearest by the 1.5·2²³ trick: `f32::round` is a libm call that blocks vectorising.
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) for the kernels' tests.
    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let rel = ((exp_approx(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        let floor = (-87f32).exp();
        assert!(((exp_approx(-1000.0) - floor) / floor).abs() < 5e-7);
    }

    #[test]
    fn matches_naive_attention_with_mask_and_strides() {
        // Both paths: a decode-shaped query count and a prefill-shaped one.
        for q_len in [1, 3, 5] {
            check_against_naive(q_len);
        }
    }

    fn check_against_naive(q_len: usize) {
        let (heads, kv_len, dim, stride) = (6, 9, 20, 12 * 20);
        let mut s = 7u64;
        let q: Vec<f32> = (0..heads * q_len * dim).map(|_| lcg(&mut s)).collect();
        let k: Vec<f32> = (0..heads * stride).map(|_| lcg(&mut s)).collect();
        let v: Vec<f32> = (0..heads * stride).map(|_| lcg(&mut s)).collect();
        let mask: Vec<f32> = (0..2 * q_len * kv_len)
            .map(|i| if i % 7 == 3 { -1e30 } else { 0.0 })
            .collect();
        let shape = AttnShape {
            heads,
            q_len,
            kv_len,
            dim,
            kv_head_stride: stride,
            heads_per_mask: 3,
        };
        let mut out = vec![0f32; heads * q_len * dim];
        attention(&q, &k, &v, shape, 0.25, Some(&mask), &mut out);
        for h in 0..heads {
            for i in 0..q_len {
                let mut w: Vec<f64> = (0..kv_len)
                    .map(|j| {
                        let dot: f64 = (0..dim)
                            .map(|d| {
                                q[(h * q_len + i) * dim + d] as f64
                                    * k[h * stride + j * dim + d] as f64
                            })
                            .sum();
                        dot * 0.25 + mask[((h / 3) * q_len + i) * kv_len + j] as f64
                    })
                    .collect();
                let max = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                w.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f64 = w.iter().sum();
                for d in 0..dim {
                    let want: f64 = (0..kv_len)
                        .map(|j| w[j] / sum * v[h * stride + j * dim + d] as f64)
                        .sum();
                    let got = out[(h * q_len + i) * dim + d] as f64;
                    assert!((got - want).abs() < 1e-5, "h{h} i{i} d{d}: {got} vs {want}");
                }
            }
        }
    }
}
