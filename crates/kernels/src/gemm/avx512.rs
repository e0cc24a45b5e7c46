//! The AVX-512 micro-kernels: f32 (`Avx512`, 12 × 32) and bf16 pairs (`Avx512Bf16`,
//! `vdpbf16ps`), each with row-count variants for partial panels.

use super::kernel::{bf16_bits, pack_f32, Kernel};
use super::Precision;
use crate::stream::prefetch_at;
use std::arch::x86_64::*;

pub(super) struct Avx512;
pub(super) struct Avx512Bf16;

// SAFETY: `kernel` requires avx512f, which `drive::<Avx512>` callers guarantee.
unsafe impl Kernel for Avx512 {
    type P = f32;
    const MR: usize = 12;
    const NR: usize = 32;
    const KP: usize = 1;
    fn pack(vals: [f32; 2], round: bool) -> f32 {
        pack_f32(vals, round)
    }
    unsafe fn kernel(
        steps: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        // SAFETY: forwarded contract (avx512f present, pointers valid).
        unsafe { k512::<12>(steps, a, b, c, ldc, add) }
    }
    unsafe fn kernel_rows(
        rows: usize,
        steps: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) -> bool {
        // SAFETY: forwarded contract (avx512f present, pointers valid for `rows` rows).
        unsafe { by_rows!(rows, k512(steps, a, b, c, ldc, add)) }
    }
}

/// `$f::<R>(args)` for R = `$rows` in 1..=11, true; false for any other row count.
macro_rules! by_rows {
    ($rows:expr, $f:ident($($arg:expr),*)) => {
        match $rows {
            1 => { $f::<1>($($arg),*); true }
            2 => { $f::<2>($($arg),*); true }
            3 => { $f::<3>($($arg),*); true }
            4 => { $f::<4>($($arg),*); true }
            5 => { $f::<5>($($arg),*); true }
            6 => { $f::<6>($($arg),*); true }
            7 => { $f::<7>($($arg),*); true }
            8 => { $f::<8>($($arg),*); true }
            9 => { $f::<9>($($arg),*); true }
            10 => { $f::<10>($($arg),*); true }
            11 => { $f::<11>($($arg),*); true }
            _ => false,
        }
    };
}
use by_rows;

/// R × 32 f32 tile (R ≤ 12; 12 is the full tile: 24 zmm accumulators), two B vectors and
/// R broadcasts per k step. The A micro-panel has 12 values per step whatever R.
///
/// # Safety
/// avx512f present; `a` valid for steps·12 floats, `b` for steps·32, `c` for R rows of 32
/// floats `ldc` apart.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn k512<const R: usize>(
    steps: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let pf = steps.saturating_sub(C_PREFETCH_STEPS);
    for s in 0..steps {
        if s.wrapping_sub(pf) < R {
            // SAFETY: row s − pf < R of the C tile (valid memory, per the contract).
            unsafe { prefetch_row(c.add((s - pf) * ldc)) };
        }
        prefetch_b(b.wrapping_add(s * 32) as *const u8);
        // SAFETY: s < steps: within the packed B micro-panel and A micro-panel.
        unsafe {
            let b0 = _mm512_loadu_ps(b.add(s * 32));
            let b1 = _mm512_loadu_ps(b.add(s * 32 + 16));
            let ar = a.add(s * 12);
            for (r, accr) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ar.add(r));
                accr[0] = _mm512_fmadd_ps(av, b0, accr[0]);
                accr[1] = _mm512_fmadd_ps(av, b1, accr[1]);
            }
        }
    }
    // SAFETY: forwarded contract (`c` valid for R rows of 32 floats `ldc` apart).
    unsafe { store_tile512(&acc, c, ldc, add) }
}

/// k steps before a tile's end at which its block of C starts being prefetched, one row
/// per step. C is touched once per k-block and is by then out of L1 (often out of L2);
/// without this `store_tile512` waits for its lines. About 2 000 cycles ahead: long enough
/// for an L3 or DRAM fetch, short enough that the B stream does not evict the lines again.
/// Prefetching the whole tile at one step was slower than a row per step: the burst holds
/// the L1 miss buffers the B stream needs. At the prefill and vision shapes (variants
/// interleaved in one process, 2 threads, best and mean of 6–8) a row per step was 3–7 %
/// faster than no prefetch in f32 and 0–4 % with bf16 products; the whole-tile burst was
/// in between.
const C_PREFETCH_STEPS: usize = 96;

/// Bytes ahead of the B step being multiplied at which the kernels ask for B's lines (the
/// step's two lines each step). With few rows on a prepacked weight (a batched generation
/// step: 16–32 rows) B streams from memory while the kernel is busy with its products, and
/// the hardware prefetcher alone leaves that pass at half the memory's rate. On a Zen 5 pair
/// of cores at the Janus-Pro-1B layer shapes (distances interleaved in one process by a
/// temporary build, medians of 15; docs/benchmarks.md, "Batched generation steps"), bf16
/// products at 16 rows went from 381–400 to 646–685 GFLOP/s with 8 KiB (512 B: 467–502;
/// 4 KiB: 572–617; 16 KiB: 602–719), f32 at 16 rows from 251–260 to 362–381; 1–4 rows and
/// the 698-row prefill were unchanged within the noise.
const B_AHEAD: usize = 8192;

/// Asks for the two lines of the 128-byte B step [`B_AHEAD`] bytes past `b`.
#[inline(always)]
fn prefetch_b(b: *const u8) {
    prefetch_at(b, B_AHEAD);
    prefetch_at(b, B_AHEAD + 64);
}

/// Prefetches the lines of one 32-float row of a C tile into L1.
///
/// # Safety
/// avx512f present (for inlining into the kernels); `p` points at 32 floats (prefetches
/// never fault, but the addresses are computed with `add`).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn prefetch_row(p: *const f32) {
    // SAFETY: 32 floats = 128 bytes from `p`: two lines when 64-byte aligned, three
    // otherwise (bytes 0, 64 and 124 lie in all of them).
    unsafe {
        let p = p as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(p);
        _mm_prefetch::<_MM_HINT_T0>(p.add(64));
        _mm_prefetch::<_MM_HINT_T0>(p.add(124));
    }
}

/// Adds (or, `add` false, stores) an R × 32 tile of accumulators into C.
///
/// # Safety
/// avx512f present; `c` valid for R rows of 32 floats `ldc` apart.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_tile512<const R: usize>(
    acc: &[[__m512; 2]; R],
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    for (r, accr) in acc.iter().enumerate() {
        // SAFETY: row r < R of the C tile, 32 floats.
        unsafe {
            let p = c.add(r * ldc);
            if add {
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), accr[0]));
                _mm512_storeu_ps(
                    p.add(16),
                    _mm512_add_ps(_mm512_loadu_ps(p.add(16)), accr[1]),
                );
            } else {
                _mm512_storeu_ps(p, accr[0]);
                _mm512_storeu_ps(p.add(16), accr[1]);
            }
        }
    }
}

// SAFETY: `kernel` requires avx512f and avx512bf16, which `drive::<Avx512Bf16>` callers
// guarantee.
unsafe impl Kernel for Avx512Bf16 {
    /// A pair of bf16 along k: low half k = 2s, high half k = 2s + 1.
    type P = u32;
    const MR: usize = 12;
    const NR: usize = 32;
    const KP: usize = 2;
    fn round_bf16(_: Precision) -> bool {
        true
    }
    fn pack(vals: [f32; 2], _round: bool) -> u32 {
        bf16_bits(vals[0]) | (bf16_bits(vals[1]) << 16)
    }
    unsafe fn kernel(
        steps: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        // SAFETY: forwarded contract (avx512f + avx512bf16 present, pointers valid).
        unsafe { k512bf16::<12>(steps, a, b, c, ldc, add) }
    }
    unsafe fn kernel_rows(
        rows: usize,
        steps: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) -> bool {
        // SAFETY: forwarded contract (avx512f + avx512bf16 present, pointers valid for
        // `rows` rows).
        unsafe { by_rows!(rows, k512bf16(steps, a, b, c, ldc, add)) }
    }
}

/// R × 32 tile (R ≤ 12) of bf16-pair dot products (`vdpbf16ps`), f32 accumulators; the A
/// micro-panel has 12 pairs per step whatever R.
///
/// # Safety
/// avx512f and avx512bf16 present; `a` valid for steps·12 pairs, `b` for steps·32 pairs,
/// `c` for R rows of 32 floats `ldc` apart.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn k512bf16<const R: usize>(
    steps: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let pf = steps.saturating_sub(C_PREFETCH_STEPS);
    let mut s = 0;
    if R <= SPLIT_ROWS {
        // Few rows: 2·R dependent `vdpbf16ps` chains would wait on their latency (a decode
        // step is one row), so odd steps accumulate apart and the two sets add at the end.
        let mut odd = [[_mm512_setzero_ps(); 2]; R];
        while s + 1 < steps {
            // SAFETY: s + 1 < steps (forwarded contract).
            unsafe {
                bf16_step(s, pf, a, b, c, ldc, &mut acc);
                bf16_step(s + 1, pf, a, b, c, ldc, &mut odd);
            }
            s += 2;
        }
        for (accr, oddr) in acc.iter_mut().zip(&odd) {
            accr[0] = _mm512_add_ps(accr[0], oddr[0]);
            accr[1] = _mm512_add_ps(accr[1], oddr[1]);
        }
    }
    while s < steps {
        // SAFETY: s < steps (forwarded contract).
        unsafe { bf16_step(s, pf, a, b, c, ldc, &mut acc) };
        s += 1;
    }
    // SAFETY: forwarded contract (`c` valid for 12 rows of 32 floats `ldc` apart).
    unsafe { store_tile512(&acc, c, ldc, add) }
}

/// Row counts up to which [`k512bf16`] keeps two accumulator sets.
const SPLIT_ROWS: usize = 4;

/// Step `s` of [`k512bf16`]: the R × 32 tile's products with pair s of A and B, and the
/// prefetch of C row s − `pf` when it is one of the tile's.
///
/// # Safety
/// As [`k512bf16`], and s < steps.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_step<const R: usize>(
    s: usize,
    pf: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    acc: &mut [[__m512; 2]; R],
) {
    if s.wrapping_sub(pf) < R {
        // SAFETY: row s − pf < R of the C tile (valid memory, per the contract).
        unsafe { prefetch_row(c.add((s - pf) * ldc)) };
    }
    prefetch_b(b.wrapping_add(s * 32) as *const u8);
    // SAFETY: s < steps: within the packed micro-panels. The transmutes reinterpret 512 bits
    // of bf16 pairs as the bf16 vector type (same size, any bits valid).
    unsafe {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(s * 32) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(s * 32 + 16) as *const _));
        let ar = a.add(s * 12);
        for (r, accr) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(r) as i32));
            accr[0] = _mm512_dpbf16_ps(accr[0], av, b0);
            accr[1] = _mm512_dpbf16_ps(accr[1], av, b1);
        }
    }
}
