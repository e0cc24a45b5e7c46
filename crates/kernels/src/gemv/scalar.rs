//! Portable path: plain Rust written so LLVM vectorises the dot products.

use super::{for_each_stripe, Elem, Weights};
use crate::sync::SendPtr;

/// Lanes of independent partial sums; lets LLVM vectorise without reassociating floats.
const LANES: usize = 8;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    let mut acc = [0.0f32; LANES];
    for (pa, pb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += pa[l] * pb[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (p, q) in ta.iter().zip(tb) {
        s += p * q;
    }
    s
}

pub(super) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let ptr = SendPtr::new(out);
    for_each_stripe(m, n, k, |j0, j1| match w {
        Weights::F32(w) => stripe(x, m, k, w, n, bias, ptr, j0, j1),
        Weights::Bf16(w) => stripe(x, m, k, w, n, bias, ptr, j0, j1),
    });
}

/// Columns `j0..j1` of `out` for all `m` rows.
#[allow(clippy::too_many_arguments)]
fn stripe<E: Elem>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[E],
    n: usize,
    bias: Option<&[f32]>,
    out: SendPtr,
    j0: usize,
    j1: usize,
) {
    let mut wide = vec![0.0f32; k];
    for j in j0..j1 {
        // Widen the weight row once and reuse it for every activation row.
        for (d, s) in wide.iter_mut().zip(&w[j * k..(j + 1) * k]) {
            *d = s.to_f32();
        }
        let b = bias.map_or(0.0, |b| b[j]);
        for r in 0..m {
            let v = dot(&x[r * k..(r + 1) * k], &wide) + b;
            // SAFETY: r < m and j < n index inside the m×n buffer behind `out`, and column
            // j belongs to this task alone (see `for_each_stripe`).
            unsafe { *out.ptr().add(r * n + j) = v };
        }
    }
}
