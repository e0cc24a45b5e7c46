//! CPU kernels: decode-shaped matrix products (a few activation rows times a big weight matrix,
//! this file), large-M products with packing ([`gemm`]), attention ([`attention`]) and the
//! elementwise work around them ([`elementwise`]).
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

pub mod attention;
pub mod elementwise;
pub mod gemm;
pub mod winograd;

use rayon::prelude::*;
use std::sync::OnceLock;

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
    run(level(), x, m, k, w, n, bias, out);
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
    let lvl = match path {
        "avx512" => Level::Avx512,
        "avx2" => Level::Avx2,
        "scalar" => Level::Scalar,
        _ => panic!("linear_rows_on: unknown path {path:?}"),
    };
    if !supported(lvl) {
        return false;
    }
    run(lvl, x, m, k, w, n, bias, out);
    true
}

/// Which SIMD path is in use ("avx512", "avx2", "scalar"), for logs and benchmarks.
pub fn simd_level() -> &'static str {
    match level() {
        Level::Avx512 => "avx512",
        Level::Avx2 => "avx2",
        Level::Scalar => "scalar",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
    Scalar,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        [Level::Avx512, Level::Avx2]
            .into_iter()
            .find(|&l| supported(l))
            .unwrap_or(Level::Scalar)
    })
}

#[cfg(target_arch = "x86_64")]
fn supported(l: Level) -> bool {
    match l {
        Level::Avx512 => is_x86_feature_detected!("avx512f"),
        Level::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        Level::Scalar => true,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn supported(l: Level) -> bool {
    l == Level::Scalar
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
        // SAFETY: callers pass only levels that `supported` confirmed (avx512f detected).
        Level::Avx512 => unsafe { x86::avx512::linear(x, m, k, w, n, bias, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (avx2 and fma detected).
        Level::Avx2 => unsafe { x86::avx2::linear(x, m, k, w, n, bias, out) },
        _ => scalar::linear(x, m, k, w, n, bias, out),
    }
}

/// Raw pointer to `out` that may cross threads.
///
/// Every parallel task writes only the columns `j0..j1` of its own chunk of output features
/// (elements `r * n + j` for `j` in that range), the chunks are disjoint, and nothing reads
/// `out` while the tasks run, so no element is touched by two threads; `out` is exclusively
/// borrowed for the whole call, which outlives the tasks (rayon joins them before returning).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: see the type's comment: tasks write disjoint elements of a buffer that outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above; the pointer value itself is only copied between threads.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method rather than `.0` so closures capture the whole Send wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Calls `f(j0, j1)` over disjoint ranges covering `0..n`, in parallel when worth it.
fn for_each_stripe(m: usize, n: usize, k: usize, f: impl Fn(usize, usize) + Sync) {
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

/// A weight element type: f32 or bf16.
trait Elem: Copy + Send + Sync + 'static {
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

/// Portable path: plain Rust written so LLVM vectorises the dot products.
mod scalar {
    use super::{for_each_stripe, Elem, OutPtr, Weights};

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
        let mut s =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
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
        let ptr = OutPtr(out.as_mut_ptr());
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
        out: OutPtr,
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
                // j belongs to this task alone (see OutPtr).
                unsafe { *out.get().add(r * n + j) = v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// The direct and packed kernels, written once over a vector type. The invoking module
    /// provides `V` (vector of f32), `W` (lanes), `NR`×`MR` (packed register tile), and
    /// `#[target_feature]` helpers `zero`, `add`, `fma`, `hsum`, `loadu`, `storeu`, `load_bf16`.
    macro_rules! simd_kernels {
        ($feat:literal) => {
            use crate::{for_each_stripe, Elem, OutPtr, Weights};
            use half::bf16;

            /// Row counts up to which the direct (unpacked, one weight row at a time) path runs.
            /// Beyond 2 the x rows (m·k·4 bytes) outgrow L1 at k = 2048 and every weight
            /// vector drags m x vectors in from L2; the packed path keeps both in L1.
            const DIRECT_MAX: usize = 2;
            /// k-block of the packed path: NR rows × KB f32 of weights (8 KiB) stay in L1.
            const KB: usize = 512;
            const _: () = assert!(KB % W == 0 && MR <= 4 && NR >= 1);

            /// Loads W weights of one dtype as f32 lanes.
            trait Load {
                type E: Elem;
                /// Prefetch the next weight block into L1 (else L2). bf16 blocks are half the
                /// bytes and fit L1 beside the packed block and x panel; f32 ones measured
                /// faster left in L2 (into L1 they evict the data the tiles are using).
                const PREFETCH_L1: bool;
                /// # Safety
                /// The CPU has this module's features and `p` is valid for W elements.
                unsafe fn load(p: *const Self::E) -> V;
            }

            struct LoadF32;
            struct LoadBf16;

            impl Load for LoadF32 {
                type E = f32;
                const PREFETCH_L1: bool = false;
                #[inline]
                #[target_feature(enable = $feat)]
                unsafe fn load(p: *const f32) -> V {
                    // SAFETY: forwarded contract.
                    unsafe { loadu(p) }
                }
            }

            impl Load for LoadBf16 {
                type E = bf16;
                const PREFETCH_L1: bool = true;
                #[inline]
                #[target_feature(enable = $feat)]
                unsafe fn load(p: *const bf16) -> V {
                    // SAFETY: forwarded contract.
                    unsafe { load_bf16(p) }
                }
            }

            /// The whole product on this path.
            ///
            /// # Safety
            /// The CPU has this module's features; shapes are as `linear_rows` checks, m, n ≥ 1.
            pub(crate) unsafe fn linear(
                x: &[f32],
                m: usize,
                k: usize,
                w: Weights<'_>,
                n: usize,
                bias: Option<&[f32]>,
                out: &mut [f32],
            ) {
                let ptr = OutPtr(out.as_mut_ptr());
                if m <= DIRECT_MAX {
                    for_each_stripe(m, n, k, |j0, j1| {
                        // SAFETY: features per this fn's contract; shapes checked; columns
                        // j0..j1 of `out` belong to this task (see OutPtr).
                        unsafe {
                            match w {
                                Weights::F32(w) => {
                                    direct::<LoadF32>(x, m, k, w, n, bias, ptr.get(), j0, j1)
                                }
                                Weights::Bf16(w) => {
                                    direct::<LoadBf16>(x, m, k, w, n, bias, ptr.get(), j0, j1)
                                }
                            }
                        }
                    });
                } else {
                    let xp = pack_x(x, m, k);
                    for_each_stripe(m, n, k, |j0, j1| {
                        // SAFETY: as above; `xp` is `x` packed by `pack_x`.
                        unsafe {
                            match w {
                                Weights::F32(w) => {
                                    packed::<LoadF32>(&xp, m, k, w, n, bias, ptr.get(), j0, j1)
                                }
                                Weights::Bf16(w) => {
                                    packed::<LoadBf16>(&xp, m, k, w, n, bias, ptr.get(), j0, j1)
                                }
                            }
                        }
                    });
                }
            }

            /// Direct path, columns `j0..j1`: dispatches on m so the row loop is monomorphised.
            ///
            /// # Safety
            /// The CPU has this module's features; 1 ≤ m ≤ DIRECT_MAX; shapes as checked;
            /// `out` is the m×n output whose columns j0..j1 belong to this call.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $feat)]
            unsafe fn direct<L: Load>(
                x: &[f32],
                m: usize,
                k: usize,
                w: &[L::E],
                n: usize,
                bias: Option<&[f32]>,
                out: *mut f32,
                j0: usize,
                j1: usize,
            ) {
                // SAFETY: forwarded contract; MR matches m.
                unsafe {
                    // U independent accumulators per x row hide FMA latency when m is small.
                    match m {
                        1 => direct_rows::<L, 1, 4>(x, k, w, n, bias, out, j0, j1),
                        2 => direct_rows::<L, 2, 2>(x, k, w, n, bias, out, j0, j1),
                        _ => unreachable!("direct path with m = {m}"),
                    }
                }
            }

            /// out[r][j] for r < R, j in j0..j1: each weight row is read once, from memory,
            /// and multiplied into all R x rows (which stay in L1/L2).
            ///
            /// # Safety
            /// As for `direct`, with `x.len() == R * k`.
            #[allow(clippy::too_many_arguments)]
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn direct_rows<L: Load, const R: usize, const U: usize>(
                x: &[f32],
                k: usize,
                w: &[L::E],
                n: usize,
                bias: Option<&[f32]>,
                out: *mut f32,
                j0: usize,
                j1: usize,
            ) {
                debug_assert!(x.len() == R * k && w.len() >= j1 * k);
                let xp = x.as_ptr();
                for j in j0..j1 {
                    let wr = &w[j * k..(j + 1) * k];
                    let wp = wr.as_ptr();
                    let mut acc = [[zero(); R]; U];
                    let mut i = 0;
                    while i + U * W <= k {
                        for (u, acc_u) in acc.iter_mut().enumerate() {
                            let o = i + u * W;
                            // SAFETY: o + W <= k: W weights of row j and of each x row.
                            let wv = unsafe { L::load(wp.add(o)) };
                            for (r, a) in acc_u.iter_mut().enumerate() {
                                *a = fma(wv, unsafe { loadu(xp.add(r * k + o)) }, *a);
                            }
                        }
                        i += U * W;
                    }
                    while i + W <= k {
                        // SAFETY: i + W <= k, as above.
                        let wv = unsafe { L::load(wp.add(i)) };
                        for (r, a) in acc[0].iter_mut().enumerate() {
                            *a = fma(wv, unsafe { loadu(xp.add(r * k + i)) }, *a);
                        }
                        i += W;
                    }
                    let b = bias.map_or(0.0, |b| b[j]);
                    for r in 0..R {
                        let mut v = acc[0][r];
                        for acc_u in &acc[1..] {
                            v = add(v, acc_u[r]);
                        }
                        let mut s = hsum(v);
                        // k % W tail; real models have k a multiple of 64, so this is rare.
                        for t in i..k {
                            s += x[r * k + t] * wr[t].to_f32();
                        }
                        // SAFETY: r < m, j < n: inside `out`, in this call's columns.
                        unsafe { *out.add(r * n + j) = s + b };
                    }
                }
            }

            /// Length of a packed row: k rounded up to whole vectors (the pad is zeros).
            fn padded(k: usize) -> usize {
                k.div_ceil(W) * W
            }

            /// x packed into panels of MR rows (the last may be shorter): panel at rows
            /// r0..r0+mr starts at r0·kp and holds vector i of row r at (i·mr + r)·W, so a
            /// tile reads one contiguous stream.
            fn pack_x(x: &[f32], m: usize, k: usize) -> Vec<f32> {
                let kp = padded(k);
                let mut xp = vec![0.0f32; m * kp];
                let mut r0 = 0;
                while r0 < m {
                    let mr = MR.min(m - r0);
                    let panel = &mut xp[r0 * kp..(r0 + mr) * kp];
                    for r in 0..mr {
                        for (i, &v) in x[(r0 + r) * k..(r0 + r + 1) * k].iter().enumerate() {
                            panel[((i / W) * mr + r) * W + i % W] = v;
                        }
                    }
                    r0 += mr;
                }
                xp
            }

            /// Packed path, columns `j0..j1`: for each group of NR weight rows and each
            /// k-block, widen the block into L1 and run every x panel over it, carrying the
            /// vector accumulators between k-blocks in `vacc`.
            ///
            /// # Safety
            /// The CPU has this module's features; `xp == pack_x(x, m, k)`; shapes as
            /// checked; `out` is the m×n output whose columns j0..j1 belong to this call.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $feat)]
            unsafe fn packed<L: Load>(
                xp: &[f32],
                m: usize,
                k: usize,
                w: &[L::E],
                n: usize,
                bias: Option<&[f32]>,
                out: *mut f32,
                j0: usize,
                j1: usize,
            ) {
                let kp = padded(k);
                let panels = m.div_ceil(MR);
                let nkb = kp.div_ceil(KB).max(1);
                let mut wb = vec![0.0f32; NR * KB];
                let mut vacc = vec![zero(); panels * NR * MR];
                let mut j = j0;
                while j < j1 {
                    // Leftover rows (fewer than NR) go one at a time.
                    let nr = if j1 - j >= NR { NR } else { 1 };
                    for kb in 0..nkb {
                        let i0 = kb * KB;
                        let steps = (kp.min(i0 + KB) - i0) / W;
                        // The block packed after this one: same rows' next k-block, else the
                        // next row group's first block (none past this call's columns).
                        let next = if kb + 1 < nkb {
                            Block { j, nr, i0: i0 + KB }
                        } else {
                            let nr2 = if j1 - j - nr >= NR {
                                NR
                            } else {
                                (j1 - j - nr).min(1)
                            };
                            Block {
                                j: j + nr,
                                nr: nr2,
                                i0: 0,
                            }
                        };
                        // SAFETY: rows j..j+nr < n exist; wb holds NR·KB ≥ nr·steps·W.
                        unsafe { pack_w::<L>(w, k, Block { j, nr, i0 }, steps, next, &mut wb) };
                        let mut r0 = 0;
                        for p in 0..panels {
                            let mr = MR.min(m - r0);
                            // SAFETY: the panel's block starts at r0·kp + i0·mr and spans
                            // steps·mr·W floats inside xp; wb holds steps·nr·W packed floats;
                            // vacc has NR·MR vectors per panel.
                            unsafe {
                                let xb = xp.as_ptr().add(r0 * kp + i0 * mr);
                                let acc = vacc.as_mut_ptr().add(p * NR * MR);
                                let wb = wb.as_ptr();
                                match (nr, mr) {
                                    (NR, 4) => tile::<NR, 4>(xb, wb, steps, acc),
                                    (NR, 3) => tile::<NR, 3>(xb, wb, steps, acc),
                                    (NR, 2) => tile::<NR, 2>(xb, wb, steps, acc),
                                    (NR, 1) => tile::<NR, 1>(xb, wb, steps, acc),
                                    (1, 4) => tile::<1, 4>(xb, wb, steps, acc),
                                    (1, 3) => tile::<1, 3>(xb, wb, steps, acc),
                                    (1, 2) => tile::<1, 2>(xb, wb, steps, acc),
                                    (1, 1) => tile::<1, 1>(xb, wb, steps, acc),
                                    _ => unreachable!("tile {nr}x{mr}"),
                                }
                            }
                            r0 += mr;
                        }
                    }
                    // Reduce the accumulators of rows j..j+nr and reset them for the next group.
                    let mut r0 = 0;
                    for p in 0..panels {
                        let mr = MR.min(m - r0);
                        let acc = &mut vacc[p * NR * MR..][..nr * mr];
                        for a in 0..nr {
                            let b = bias.map_or(0.0, |b| b[j + a]);
                            for r in 0..mr {
                                let v = hsum(acc[a * mr + r]);
                                // SAFETY: row r0 + r < m, column j + a < j1 ≤ n: inside `out`
                                // and in this call's columns.
                                unsafe { *out.add((r0 + r) * n + j + a) = v + b };
                            }
                        }
                        acc.fill(zero());
                        r0 += mr;
                    }
                    j += nr;
                }
            }

            /// Weight rows j..j+nr from column i0 (a multiple of W).
            #[derive(Clone, Copy)]
            struct Block {
                j: usize,
                nr: usize,
                i0: usize,
            }

            /// Widens `blk`'s `steps` vectors per row into `wb` as [step][row][W] (zeros past
            /// k), prefetching `next` so its memory loads overlap the tiles run on this block.
            ///
            /// Without the prefetch this loop stalls on DRAM in bursts while the tiles run with
            /// no loads in flight; dropping it measured ~1.2–1.5x slower at m = 4..16.
            ///
            /// # Safety
            /// The CPU has this module's features; rows blk.j..blk.j+blk.nr exist in `w`;
            /// `wb.len() >= blk.nr * steps * W`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn pack_w<L: Load>(
                w: &[L::E],
                k: usize,
                blk: Block,
                steps: usize,
                next: Block,
                wb: &mut [f32],
            ) {
                debug_assert!(wb.len() >= blk.nr * steps * W && w.len() >= (blk.j + blk.nr) * k);
                // One prefetch per 64-byte line: every `per_line` vectors of W elements.
                let per_line = (64 / (W * std::mem::size_of::<L::E>())).max(1);
                for a in 0..blk.nr {
                    let row = &w[(blk.j + a) * k..(blk.j + a + 1) * k];
                    let prow = (next.j + a) * k;
                    for s in 0..steps {
                        let i = blk.i0 + s * W;
                        let d = (s * blk.nr + a) * W;
                        if s % per_line == 0 && a < next.nr && next.i0 + s * W < k {
                            // Inside row next.j + a < n, so inside `w`; prefetch never faults.
                            let p = w.as_ptr().wrapping_add(prow + next.i0 + s * W) as *const u8;
                            prefetch(p, L::PREFETCH_L1);
                        }
                        if i + W <= k {
                            // SAFETY: W elements from i are inside the row; d + W <= wb.len().
                            unsafe { storeu(wb.as_mut_ptr().add(d), L::load(row.as_ptr().add(i))) };
                        } else {
                            for t in 0..W {
                                wb[d + t] = row.get(i + t).map_or(0.0, |v| v.to_f32());
                            }
                        }
                    }
                }
            }

            /// A C×R tile over one k-block: C packed weight rows × R x rows, C·R accumulators
            /// in registers, carried in `acc` ([C][R] vectors) between k-blocks. Each step loads
            /// R x vectors and C weight vectors for C·R FMAs.
            ///
            /// # Safety
            /// The CPU has this module's features; `x` is valid for steps·R·W floats laid out
            /// [step][R][W], `w` for steps·C·W floats laid out [step][C][W], `acc` for C·R vectors.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile<const C: usize, const R: usize>(
                x: *const f32,
                w: *const f32,
                steps: usize,
                acc: *mut V,
            ) {
                // Kept free of branches around the loop: with them LLVM shuffled and spilled
                // accumulators inside it.
                let mut c = [[zero(); R]; C];
                for (a, ca) in c.iter_mut().enumerate() {
                    for (r, v) in ca.iter_mut().enumerate() {
                        // SAFETY: a·R + r < C·R vectors at acc.
                        *v = unsafe { *acc.add(a * R + r) };
                    }
                }
                for s in 0..steps {
                    let mut xv = [zero(); R];
                    for (r, v) in xv.iter_mut().enumerate() {
                        // SAFETY: (s·R + r + 1)·W ≤ steps·R·W floats of the x block.
                        *v = unsafe { loadu(x.add((s * R + r) * W)) };
                    }
                    for (a, ca) in c.iter_mut().enumerate() {
                        // SAFETY: (s·C + a + 1)·W ≤ steps·C·W floats of the weight block.
                        let wv = unsafe { loadu(w.add((s * C + a) * W)) };
                        for (r, v) in ca.iter_mut().enumerate() {
                            *v = fma(wv, xv[r], *v);
                        }
                    }
                }
                for (a, ca) in c.iter().enumerate() {
                    for (r, &v) in ca.iter().enumerate() {
                        // SAFETY: a·R + r < C·R vectors at acc.
                        unsafe { *acc.add(a * R + r) = v };
                    }
                }
            }
        };
    }

    pub(crate) mod avx512 {
        use std::arch::x86_64::*;

        type V = __m512;
        const W: usize = 16;
        // 4 weight rows × 4 x rows: 16 accumulators + 4 x + 1 w of the 32 zmm registers.
        const NR: usize = 4;
        const MR: usize = 4;

        /// Hint that the line at `p` is needed soon, into L1 if `l1` else into L2. Never faults.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn prefetch(p: *const u8, l1: bool) {
            if l1 {
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
            } else {
                _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
            }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn zero() -> V {
            _mm512_setzero_ps()
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn add(a: V, b: V) -> V {
            _mm512_add_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn fma(a: V, b: V, c: V) -> V {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn hsum(v: V) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        /// # Safety
        /// `p` valid for 16 f32 reads.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn loadu(p: *const f32) -> V {
            // SAFETY: contract above; unaligned load.
            unsafe { _mm512_loadu_ps(p) }
        }
        /// # Safety
        /// `p` valid for 16 f32 writes.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn storeu(p: *mut f32, v: V) {
            // SAFETY: contract above; unaligned store.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        /// # Safety
        /// `p` valid for 16 bf16 (32 bytes) reads.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_bf16(p: *const half::bf16) -> V {
            // SAFETY: contract above; unaligned load.
            let h = unsafe { _mm256_loadu_si256(p as *const __m256i) };
            // Zero-extend each u16 to u32 and shift it into the high half: the exact f32.
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }

        simd_kernels!("avx512f");
    }

    pub(crate) mod avx2 {
        use std::arch::x86_64::*;

        type V = __m256;
        const W: usize = 8;
        // 4 weight rows × 2 x rows: 8 accumulators + 2 x + 1 w of the 16 ymm registers.
        const NR: usize = 4;
        const MR: usize = 2;

        /// Hint that the line at `p` is needed soon, into L1 if `l1` else into L2. Never faults.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn prefetch(p: *const u8, l1: bool) {
            if l1 {
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
            } else {
                _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn zero() -> V {
            _mm256_setzero_ps()
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn add(a: V, b: V) -> V {
            _mm256_add_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn fma(a: V, b: V, c: V) -> V {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn hsum(v: V) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
        /// # Safety
        /// `p` valid for 8 f32 reads.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn loadu(p: *const f32) -> V {
            // SAFETY: contract above; unaligned load.
            unsafe { _mm256_loadu_ps(p) }
        }
        /// # Safety
        /// `p` valid for 8 f32 writes.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn storeu(p: *mut f32, v: V) {
            // SAFETY: contract above; unaligned store.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        /// # Safety
        /// `p` valid for 8 bf16 (16 bytes) reads.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_bf16(p: *const half::bf16) -> V {
            // SAFETY: contract above; unaligned load.
            let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }

        simd_kernels!("avx2,fma");
    }
}
