//! Multi-head scaled-dot-product attention on the CPU, heads in parallel.
//!
//! candle's batched matmul is slow at attention shapes (head dim 64–128 is a thin inner
//! dimension) and its softmax calls `expf` per element. Here each head runs `QKᵀ` and `PV` through
//! the packed GEMM ([`crate::gemm`]; decode-shaped queries use plain dot products), and the
//! softmax uses a vectorisable `exp`.

use crate::cpu::multiversion;
use crate::gemm::{gemm, BRef, GemmOpts, MatRef, Precision};
use crate::gemv::Elem;
use crate::stream;
use crate::sync::{with_f32_scratch, SendPtr};
use half::bf16;
use rayon::prelude::*;

pub use crate::math::exp_approx;

/// Where one operand's rows lie in its slice: row `i` of head `h` starts at `h · head + i · row`
/// and holds `dim` consecutive values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    /// Distance between consecutive heads' first rows, in elements.
    pub head: usize,
    /// Distance between consecutive rows of one head, in elements.
    pub row: usize,
}

/// Keys or values: f32, or bf16 as a bf16 KV cache holds them (read in place, exactly widened
/// where a product multiplies in f32).
#[derive(Debug, Clone, Copy)]
pub enum Kv<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// bf16 elements.
    Bf16(&'a [bf16]),
}

impl<'a> Kv<'a> {
    fn len(self) -> usize {
        match self {
            Kv::F32(x) => x.len(),
            Kv::Bf16(x) => x.len(),
        }
    }

    /// The elements from `at` on.
    fn from(self, at: usize) -> Self {
        match self {
            Kv::F32(x) => Kv::F32(&x[at..]),
            Kv::Bf16(x) => Kv::Bf16(&x[at..]),
        }
    }

    /// A GEMM operand over these elements: `(i, j)` at `i · rs + j · cs`.
    fn mat(self, rows: usize, cols: usize, rs: usize, cs: usize) -> BRef<'a> {
        match self {
            Kv::F32(data) => BRef::F32(MatRef {
                data,
                rows,
                cols,
                rs,
                cs,
            }),
            Kv::Bf16(data) => BRef::Bf16(MatRef {
                data,
                rows,
                cols,
                rs,
                cs,
            }),
        }
    }

    /// `Σ q[d] · self[at + d]` in f32.
    #[inline(always)]
    fn dot(self, q: &[f32], at: usize) -> f32 {
        match self {
            Kv::F32(x) => dot(q, &x[at..at + q.len()]),
            Kv::Bf16(x) => dot(q, &x[at..at + q.len()]),
        }
    }

    /// Asks for the `n` elements [`stream::AHEAD`] bytes past element `at` to be brought into
    /// the cache, so a pass over rows one after another finds them there (a hint).
    #[inline(always)]
    fn prefetch_ahead(self, at: usize, n: usize) {
        let (p, size) = match self {
            Kv::F32(x) => (x.as_ptr() as *const u8, 4),
            Kv::Bf16(x) => (x.as_ptr() as *const u8, 2),
        };
        let row = p.wrapping_add(at * size);
        for line in (0..n * size).step_by(64) {
            stream::prefetch_ahead(row.wrapping_add(line));
        }
    }

    /// `acc[d] += p · self[at + d]`.
    #[inline(always)]
    fn axpy(self, p: f32, at: usize, acc: &mut [f32]) {
        let n = acc.len();
        match self {
            Kv::F32(x) => axpy(p, &x[at..at + n], acc),
            Kv::Bf16(x) => axpy(p, &x[at..at + n], acc),
        }
    }
}

/// Shapes and layouts of one attention call (q, mask and output f32; k and v f32 or bf16).
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
    /// Consecutive heads sharing one additive mask (the heads of one batch row).
    pub heads_per_mask: usize,
    /// Layout of the queries.
    pub q: Strides,
    /// Layout of the keys and of the values (a pre-allocated KV cache read in place, or the
    /// k and v thirds of a fused qkv product).
    pub kv: Strides,
    /// Layout of the output.
    pub out: Strides,
    /// Precision of the two products (`Bf16`: q, k, the probabilities and v rounded to bf16,
    /// accumulated in f32). The softmax is f32 either way.
    pub precision: Precision,
}

impl AttnShape {
    /// q and out `[heads, q_len, dim]`; k and v `[kv_len, dim]` per head, heads
    /// `kv_head_stride` elements apart; f32 products.
    pub fn packed(
        heads: usize,
        q_len: usize,
        kv_len: usize,
        dim: usize,
        kv_head_stride: usize,
        heads_per_mask: usize,
    ) -> Self {
        let per_head = Strides {
            head: q_len * dim,
            row: dim,
        };
        Self {
            heads,
            q_len,
            kv_len,
            dim,
            heads_per_mask,
            q: per_head,
            kv: Strides {
                head: kv_head_stride,
                row: dim,
            },
            out: per_head,
            precision: Precision::F32,
        }
    }
}

/// Elements an operand of `heads × rows` rows of `dim` needs under `st`.
fn span(st: Strides, heads: usize, rows: usize, dim: usize) -> usize {
    (heads - 1) * st.head + (rows - 1) * st.row + dim
}

/// `out[h] = softmax(q[h] · k[h]ᵀ · scale + mask[h / heads_per_mask]) · v[h]`, each operand laid
/// out per its [`Strides`]; `mask` (optional) is `[heads / heads_per_mask, q_len, kv_len]`.
///
/// Panics if an operand is shorter than its layout needs, or if the output layout lets two
/// heads' rows overlap.
pub fn attention(
    q: &[f32],
    k: Kv<'_>,
    v: Kv<'_>,
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
        heads_per_mask,
        q: qs,
        kv: kvs,
        out: os,
        precision,
    } = shape;
    if heads == 0 || q_len == 0 {
        return;
    }
    assert!(kv_len > 0 && dim > 0, "attention over no keys");
    assert!(q.len() >= span(qs, heads, q_len, dim), "q shape");
    assert!(k.len() >= span(kvs, heads, kv_len, dim), "k shape");
    assert!(v.len() >= span(kvs, heads, kv_len, dim), "v shape");
    assert!(out.len() >= span(os, heads, q_len, dim), "out shape");
    // Heads' output rows must be disjoint: heads one after another (each a block of rows), or
    // rows one after another (each holding every head's slot side by side).
    let head_major = os.row >= dim && os.head >= span(os, 1, q_len, dim);
    let row_major = os.head >= dim && os.row >= span(Strides { row: 0, ..os }, heads, 1, dim);
    assert!(
        head_major || row_major,
        "out rows of different heads overlap"
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
    let optr = SendPtr::new(out);
    // Heads run in parallel; each head's products run serially inside its task once there
    // are enough heads to occupy the pool.
    let serial = heads >= rayon::current_num_threads();
    let opts = GemmOpts {
        precision,
        serial,
        ..Default::default()
    };
    (0..heads).into_par_iter().for_each(|h| {
        let qh = &q[h * qs.head..];
        let kh = k.from(h * kvs.head);
        let vh = v.from(h * kvs.head);
        let mh = mask.map(|m| {
            let g = h / heads_per_mask;
            &m[g * q_len * kv_len..(g + 1) * q_len * kv_len]
        });
        with_f32_scratch(q_len * kv_len + q_len * dim, |buf| {
            let (scores, o) = buf.split_at_mut(q_len * kv_len);
            // Decode steps have one query per head: plain dot products and a weighted row sum
            // beat the matmul kernel (no V transpose, no nested parallelism for a few µs of
            // work). They multiply in f32 whatever the precision.
            let small = q_len <= SMALL_Q;
            if small {
                decode_scores(qh, qs.row, kh, kvs.row, dim, kv_len, scores);
            } else {
                // Q·Kᵀ on the packed GEMM: K's rows are Kᵀ's columns.
                let kt = kh.mat(dim, kv_len, 1, kvs.row);
                gemm(strided(qh, q_len, dim, qs.row), kt, scores, kv_len, &opts)
                    .expect("attention: shapes checked above");
            }
            for (i, row) in scores.chunks_mut(kv_len).enumerate() {
                let mrow = mh.map(|m| &m[i * kv_len..(i + 1) * kv_len]);
                softmax_row(row, scale, mrow);
            }
            if small {
                decode_values(scores, kv_len, vh, kvs.row, dim, o);
            } else {
                // P·V on the packed GEMM (V read in place).
                gemm(
                    MatRef::row_major(scores, q_len, kv_len),
                    vh.mat(kv_len, dim, kvs.row, 1),
                    o,
                    dim,
                    &opts,
                )
                .expect("attention: shapes checked above");
            }
            for (i, orow) in o.chunks(dim).enumerate() {
                // SAFETY: `out` spans every head's rows (asserted above) and outlives the
                // parallel loop; rows of different heads are disjoint (asserted above), so
                // this task is the only writer of these `dim` elements.
                unsafe {
                    let dst = optr.ptr().add(h * os.head + i * os.row);
                    std::ptr::copy_nonoverlapping(orow.as_ptr(), dst, dim);
                }
            }
        })
    });
}

/// The decode path's scores: `scores[i · kv_len + j] = q_i · k_j` for the queries in `qh`
/// (rows `q_row` apart, `dim` wide) and the `kv_len` keys in `kh` (rows `kv_row` apart), as
/// many queries as `scores` holds rows of `kv_len`.
#[inline(always)]
fn decode_scores_body(
    qh: &[f32],
    q_row: usize,
    kh: Kv<'_>,
    kv_row: usize,
    dim: usize,
    kv_len: usize,
    scores: &mut [f32],
) {
    for (i, srow) in scores.chunks_mut(kv_len).enumerate() {
        let qi = &qh[i * q_row..i * q_row + dim];
        for (j, s) in srow.iter_mut().enumerate() {
            kh.prefetch_ahead(j * kv_row, dim);
            *s = kh.dot(qi, j * kv_row);
        }
    }
}

multiversion!(
    /// [`decode_scores_body`] compiled for the best SIMD level of this CPU.
    fn decode_scores(
        qh: &[f32],
        q_row: usize,
        kh: Kv<'_>,
        kv_row: usize,
        dim: usize,
        kv_len: usize,
        scores: &mut [f32]
    ) => decode_scores_body
);

/// The decode path's output: `o_i = Σ_j p[i · kv_len + j] · v_j` for each `dim`-wide row of
/// `o`, the values in `vh` rows `kv_row` apart.
#[inline(always)]
fn decode_values_body(
    p: &[f32],
    kv_len: usize,
    vh: Kv<'_>,
    kv_row: usize,
    dim: usize,
    o: &mut [f32],
) {
    o.fill(0.0);
    for (i, orow) in o.chunks_mut(dim).enumerate() {
        for (j, &pj) in p[i * kv_len..(i + 1) * kv_len].iter().enumerate() {
            vh.prefetch_ahead(j * kv_row, dim);
            vh.axpy(pj, j * kv_row, orow);
        }
    }
}

multiversion!(
    /// [`decode_values_body`] compiled for the best SIMD level of this CPU.
    fn decode_values(
        p: &[f32],
        kv_len: usize,
        vh: Kv<'_>,
        kv_row: usize,
        dim: usize,
        o: &mut [f32]
    ) => decode_values_body
);

/// `rows × cols` with rows `rs` apart and contiguous columns.
fn strided(data: &[f32], rows: usize, cols: usize, rs: usize) -> MatRef<'_, f32> {
    MatRef {
        data,
        rows,
        cols,
        rs,
        cs: 1,
    }
}

/// Queries per head up to which the decode-shaped path is used.
const SMALL_Q: usize = 4;

/// Dot product with 16 independent lanes (vectorises; one running sum would not); `b` f32 or
/// bf16 (widened exactly).
#[inline(always)]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y.to_f32())
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l].to_f32();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `acc[d] += p · x[d]`, `x` f32 or bf16 (widened exactly).
#[inline(always)]
fn axpy<T: Elem>(p: f32, x: &[T], acc: &mut [f32]) {
    acc.iter_mut()
        .zip(x)
        .for_each(|(a, &x)| *a += p * x.to_f32());
}

/// In-place `softmax(row · scale + mask)`. Reductions use 16 independent lanes so the compiler
/// vectorises them (a single running max/sum is a serial dependency chain).
#[inline(always)]
fn softmax_row_body(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    // Without a mask a positive scale is folded into the exponent (it keeps the max in place),
    // saving a pass; with a mask the scaled, masked scores are written first.
    let s = match mask {
        Some(m) => {
            row.iter_mut()
                .zip(m)
                .for_each(|(x, &b)| *x = *x * scale + b);
            1.0
        }
        None if scale > 0.0 => scale,
        None => {
            row.iter_mut().for_each(|x| *x *= scale);
            1.0
        }
    };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            // A plain comparison is one `vmaxps`; `f32::max`'s NaN rule costs two more per vector.
            *l = if x > *l { x } else { *l };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    // e^((x − max)·s), summed as it is written.
    let mut sums = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (l, x) in sums.iter_mut().zip(c) {
            *x = exp_approx((*x - max) * s);
            *l += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_approx((*x - max) * s);
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

multiversion!(
    /// [`softmax_row_body`] compiled for the best SIMD level of this CPU.
    fn softmax_row(row: &mut [f32], scale: f32, mask: Option<&[f32]>) => softmax_row_body
);

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::lcg;

    #[test]
    fn matches_naive_attention_with_mask_and_strides() {
        // Both paths: a decode-shaped query count and a prefill-shaped one.
        for q_len in [1, 3, 5] {
            check_against_naive(q_len);
        }
    }

    /// A fused qkv layout (each row `[q | k | v]` with heads side by side), the output written
    /// into heads' slots of `[q_len, heads · dim]` rows, in both precisions: f32 against an f64
    /// reference, bf16 against the same reference computed from bf16-rounded q, k, v and
    /// probabilities.
    #[test]
    fn fused_qkv_layout_in_both_precisions() {
        let round = |x: f32| half::bf16::from_f32(x).to_f32() as f64;
        let exact = |x: f32| x as f64;
        for q_len in [2, 37] {
            let (heads, dim) = (3, 20);
            let (w, n) = (heads * dim, q_len);
            let mut s = 11u64;
            let qkv: Vec<f32> = (0..n * 3 * w).map(|_| lcg(&mut s) * 2.0).collect();
            for precision in [Precision::F32, Precision::Bf16] {
                let st = |row| Strides { head: dim, row };
                let shape = AttnShape {
                    heads,
                    q_len: n,
                    kv_len: n,
                    dim,
                    heads_per_mask: heads,
                    q: st(3 * w),
                    kv: st(3 * w),
                    out: st(w),
                    precision,
                };
                let mut out = vec![f32::NAN; n * w];
                attention(
                    &qkv,
                    Kv::F32(&qkv[w..]),
                    Kv::F32(&qkv[2 * w..]),
                    shape,
                    0.3,
                    None,
                    &mut out,
                );
                // The decode-shaped path (q_len ≤ SMALL_Q) multiplies in f32 in any precision.
                let r: &dyn Fn(f32) -> f64 = if precision == Precision::Bf16 && q_len > SMALL_Q {
                    &round
                } else {
                    &exact
                };
                let mut worst = 0f64;
                for h in 0..heads {
                    let at =
                        |i: usize, part: usize, d: usize| qkv[i * 3 * w + part * w + h * dim + d];
                    for i in 0..n {
                        let mut p: Vec<f64> = (0..n)
                            .map(|j| {
                                (0..dim)
                                    .map(|d| r(at(i, 0, d)) * r(at(j, 1, d)))
                                    .sum::<f64>()
                                    * 0.3
                            })
                            .collect();
                        let max = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        p.iter_mut().for_each(|x| *x = (*x - max).exp());
                        let sum: f64 = p.iter().sum();
                        for d in 0..dim {
                            let want: f64 = (0..n)
                                .map(|j| r((p[j] / sum) as f32) * r(at(j, 2, d)))
                                .sum();
                            let got = out[i * w + h * dim + d] as f64;
                            worst = worst.max((got - want).abs());
                        }
                    }
                }
                assert!(worst < 1e-4, "q_len {q_len} {precision:?}: worst {worst}");
            }
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
        let shape = AttnShape::packed(heads, q_len, kv_len, dim, stride, 3);
        let mut out = vec![0f32; heads * q_len * dim];
        attention(
            &q,
            Kv::F32(&k),
            Kv::F32(&v),
            shape,
            0.25,
            Some(&mask),
            &mut out,
        );
        // The same keys and values rounded to bf16 give, read as bf16, exactly what their
        // widened f32 copies give, in either precision (on both the dot-product and the GEMM
        // paths).
        let r = |x: &Vec<f32>| -> Vec<half::bf16> {
            x.iter().map(|&x| half::bf16::from_f32(x)).collect()
        };
        let (kb, vb) = (r(&k), r(&v));
        let w = |x: &Vec<half::bf16>| -> Vec<f32> { x.iter().map(|x| x.to_f32()).collect() };
        let (kw, vw) = (w(&kb), w(&vb));
        for precision in [Precision::F32, Precision::Bf16] {
            let shape = AttnShape { precision, ..shape };
            let run = |k, v| {
                let mut o = vec![0f32; out.len()];
                attention(&q, k, v, shape, 0.25, Some(&mask), &mut o);
                o
            };
            let want = run(Kv::F32(&kw), Kv::F32(&vw));
            let got = run(Kv::Bf16(&kb), Kv::Bf16(&vb));
            assert_eq!(got, want, "q_len {q_len} {precision:?}");
        }
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
