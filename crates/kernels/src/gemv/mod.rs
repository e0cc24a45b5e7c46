//! The decode GEMV: [`linear_rows`], a few activation rows times a big weight matrix.
//!
//! In LLM decoding `m` = 1..32 activation rows meet a weight matrix of tens to hundreds of MB, so
//! the product is bound by how fast the weights stream from memory. `linear_rows` reads each
//! weight row once for all `m` activation rows, widens bf16 to f32 on the fly, accumulates in
//! f32, and splits the output features across the global rayon pool.
//!
//! Two SIMD strategies (AVX-512 and AVX2 instantiate the same template):
//! - m ≤ 2 ("direct"): one weight row at a time against all m x rows, read straight from the
//!   caller's buffers. One weight stream per thread: streaming several rows that sit k·4 bytes
//!   apart (8 KiB at k = 2048) made them collide in the same L1 sets and measured slower.
//! - m > 2 ("packed"): x is packed into MR-row panels once; each group of NR weight rows is
//!   widened, one k-block at a time, into a small buffer that stays in L1 while every x panel
//!   passes over it, with NR×MR register tiles and vector accumulators carried across
//!   k-blocks. The next weight block is prefetched while the tiles run, so DRAM and FMAs
//!   overlap.

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::cpu::{self, Level};
use rayon::prelude::*;

/// Weight storage for `linear_rows`: row-major [n_out, k].
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    /// f32 weights.
    F32(&'a [f32]),
    /// bf16 weights, widened to f32 while multiplying.
    Bf16(&'a [half::bf16]),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }
}

/// `out[r * n + j] = sum_i x[r * k + i] * w[j * k + i]` (+ `bias[j]` if given), for r < m, j < n. f32 accumulation.
/// Panics only on slice-length mismatch (callers guarantee shapes); validate with assert! at the top.
pub fn linear_rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    check_shapes(x, m, k, &w, n, bias, out);
    run(cpu::level(), x, m, k, w, n, bias, out);
}

/// `linear_rows` forced onto the portable path, for tests and benchmarks.
#[doc(hidden)]
pub fn linear_rows_scalar(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    check_shapes(x, m, k, &w, n, bias, out);
    run(Level::Scalar, x, m, k, w, n, bias, out);
}

/// `linear_rows` on a named path ("avx512", "avx2", "scalar"); false, doing nothing, if this CPU lacks it.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn linear_rows_on(
    path: &str,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> bool {
    check_shapes(x, m, k, &w, n, bias, out);
    let lvl =
        Level::from_name(path).unwrap_or_else(|| panic!("linear_rows_on: unknown path {path:?}"));
    if !cpu::supported(lvl) {
        return false;
    }
    run(lvl, x, m, k, w, n, bias, out);
    true
}

/// Which SIMD path is in use ("avx512", "avx2", "scalar"), for logs and benchmarks.
pub fn simd_level() -> &'static str {
    cpu::level().name()
}

fn check_shapes(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &[f32],
) {
    assert_eq!(x.len(), m * k, "linear_rows: x.len() != m * k");
    assert_eq!(w.len(), n * k, "linear_rows: w.len() != n * k");
    assert_eq!(out.len(), m * n, "linear_rows: out.len() != m * n");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear_rows: bias.len() != n");
    }
}

/// Runs on the given path; shapes already checked, and `lvl` supported by this CPU.
#[allow(clippy::too_many_arguments)]
fn run(
    lvl: Level,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    match lvl {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass only levels that `cpu::supported` confirmed (avx512f detected).
        Level::Avx512 => unsafe { x86::avx512::linear(x, m, k, w, n, bias, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (avx2 and fma detected).
        Level::Avx2 => unsafe { x86::avx2::linear(x, m, k, w, n, bias, out) },
        _ => scalar::linear(x, m, k, w, n, bias, out),
    }
}

/// Calls `f(j0, j1)` over disjoint ranges covering `0..n`, in parallel when worth it.
///
/// The paths hand `out` to the tasks as a [`crate::sync::SendPtr`]: every task writes only the
/// columns `j0..j1` of its own chunk of output features (elements `r * n + j` for `j` in that
/// range), the chunks are disjoint, and nothing reads `out` while the tasks run, so no element
/// is touched by two threads; `out` is exclusively borrowed for the whole call, which outlives
/// the tasks (rayon joins them before returning).
pub(crate) fn for_each_stripe(m: usize, n: usize, k: usize, f: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    // 64–256 output features per task: enough tasks for 2–16 threads to balance, few enough
    // that per-task overhead is noise. A multiple of 4 keeps weight-row groups whole.
    let chunk = n.div_ceil(threads * 4).clamp(64, 256).div_ceil(4) * 4;
    // Below ~64K multiply-adds rayon's hand-off costs more than it saves.
    if threads == 1 || n <= chunk || m * n * k < (1 << 16) {
        f(0, n);
    } else {
        (0..n.div_ceil(chunk))
            .into_par_iter()
            .for_each(|c| f(c * chunk, ((c + 1) * chunk).min(n)));
    }
}

/// A weight (or cached key/value) element type: f32 or bf16, widened to f32 without a branch
/// so the loops reading it vectorise.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// The element as f32 (exact for both types).
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: widening is a shift, exact, NaN payloads included.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}
