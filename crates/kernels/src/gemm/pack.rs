//! Packing: A into panels of `MR` rows (`[k][MR]` each), B into micro-panels `NR` wide
//! (`[k][NR]`), from any strides, converting on the way (bf16 widened, or f32 rounded to bf16
//! or to bf16 pairs); contiguous runs through 8 × 8 register transposes on AVX-512 (`xpack`).

use super::kernel::Kernel;
use super::MatRef;
use half::bf16;
use rayon::prelude::*;

/// A B element type.
pub(super) trait Src: Copy {
    /// Whether the type is bf16 (else f32).
    const IS_BF16: bool;
    fn f(self) -> f32;
}
impl Src for f32 {
    const IS_BF16: bool = false;
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}
impl Src for bf16 {
    const IS_BF16: bool = true;
    #[inline(always)]
    fn f(self) -> f32 {
        self.to_f32()
    }
}

/// Packs `R = dst.len() / steps` source runs into `[steps][R]` packed elements: run `r` holds
/// the k values `s0·KP..` of one row of A or one column of B, contiguous in memory (`None`: a
/// zero row past the matrix). `kvalid` k values of each run exist; the rest pack as zeros.
///
/// Goes through an L1-resident tile of 8 packed steps per run, so the source is read in
/// contiguous runs and the panel written in contiguous rows (the strided column walk this
/// replaces missed L1 on every store).
fn pack_runs<K: Kernel, T: Src>(
    runs: &[Option<&[T]>],
    steps: usize,
    kvalid: usize,
    round: bool,
    dst: &mut [K::P],
) {
    #[cfg(target_arch = "x86_64")]
    {
        /// The same loops compiled with AVX-512 (conversions and moves vectorised).
        #[target_feature(enable = "avx512f")]
        fn v512<K: Kernel, T: Src>(
            runs: &[Option<&[T]>],
            steps: usize,
            kvalid: usize,
            round: bool,
            dst: &mut [K::P],
        ) {
            pack_runs_body::<K, T>(runs, steps, kvalid, round, dst)
        }
        if crate::cpu::level() == crate::cpu::Level::Avx512 {
            match xpack::form::<K, T>(round) {
                // SAFETY: the level was detected on this CPU (avx512f), and the form names
                // the kernel's packed element for this source.
                Some(xpack::Form::F32ToPairs) => {
                    // Only the bf16-pair kernel packs f32 to pairs; it runs only where the CPU
                    // has avx512bf16.
                    debug_assert!(crate::cpu::has_avx512bf16());
                    // SAFETY: as above, plus avx512bf16 (the kernel's own requirement).
                    return unsafe { xpack::runs_bf16::<K, T>(runs, steps, kvalid, round, dst) };
                }
                // SAFETY: as above.
                Some(f) => {
                    return unsafe { xpack::runs::<K, T>(f, runs, steps, kvalid, round, dst) }
                }
                None => {}
            }
            // SAFETY: the level was detected on this CPU (avx512f).
            return unsafe { v512::<K, T>(runs, steps, kvalid, round, dst) };
        }
    }
    pack_runs_body::<K, T>(runs, steps, kvalid, round, dst)
}

/// The packed element at packed step `t` of a row of A or column of B whose k-th value is
/// `get(k)`: its `KP` values from k = t·KP, zeros past `kvalid` values.
#[inline(always)]
fn pack_step<K: Kernel>(get: impl Fn(usize) -> f32, t: usize, kvalid: usize, round: bool) -> K::P {
    let mut vals = [0f32; 2];
    for (u, v) in vals.iter_mut().enumerate().take(K::KP) {
        let p = t * K::KP + u;
        if p < kvalid {
            *v = get(p);
        }
    }
    K::pack(vals, round)
}

/// [`pack_runs`] with 8 × 8 register transposes: every group of 8 runs, over the packed steps
/// whose 8-step tiles are whole, moves as eight 8-lane loads (converted to the packed element
/// on the way), a transpose, and eight stores; the rest goes element by element.
#[cfg(target_arch = "x86_64")]
mod xpack {
    use super::{pack_step, Kernel, Src};
    use std::arch::x86_64::*;

    /// How 8 packed elements load from a run as 8 32-bit lanes.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(super) enum Form {
        /// f32 source, f32 element, no rounding.
        F32,
        /// bf16 source widened to an f32 element.
        Bf16Widen,
        /// bf16 source, bf16-pair element: the pairs as they lie in memory.
        Bf16Pairs,
        /// f32 source rounded to bf16 pairs (`vcvtneps2bf16`, needs AVX512-BF16).
        F32ToPairs,
    }

    /// The vector form of kernel `K`'s packing from `T`, if there is one.
    pub(super) fn form<K: Kernel, T: Src>(round: bool) -> Option<Form> {
        match (K::KP, T::IS_BF16) {
            (1, false) if !round => Some(Form::F32),
            (1, true) => Some(Form::Bf16Widen),
            (2, true) => Some(Form::Bf16Pairs),
            (2, false) => Some(Form::F32ToPairs),
            _ => None,
        }
    }

    /// `dst[j]` = the bf16 pair (`lo[j]`, `hi[j]` or 0) rounded to nearest even, 16 at a time
    /// (`dst.len()` a multiple of 16, `lo`/`hi` at least as long).
    ///
    /// # Safety
    /// The CPU has avx512f and avx512bf16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn rows_to_pairs(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
        for (j, d) in dst.chunks_exact_mut(16).enumerate() {
            let l = &lo[j * 16..j * 16 + 16];
            // SAFETY: 16 f32 at `l` (and `h`), 16 u32 at `d`; the bf16 vectors are 16 × 16 bits.
            unsafe {
                let lb: __m256i =
                    std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(l.as_ptr())));
                let mut v = _mm512_cvtepu16_epi32(lb);
                if let Some(hi) = hi {
                    let h = &hi[j * 16..j * 16 + 16];
                    let hb: __m256i =
                        std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(h.as_ptr())));
                    v = _mm512_or_si512(v, _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hb)));
                }
                _mm512_storeu_si512(d.as_mut_ptr() as *mut _, v);
            }
        }
    }

    /// Rows r[i] (8 lanes each) → columns.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// Eight packed elements from `p` (8·KP source values) in `form` (not `F32ToPairs`).
    ///
    /// # Safety
    /// `p` is valid for the 8·KP source values the form reads.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(form: Form, p: *const u8) -> __m256 {
        // SAFETY: per the contract; unaligned loads.
        unsafe {
            match form {
                Form::Bf16Widen => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                )),
                _ => _mm256_loadu_ps(p as *const f32),
            }
        }
    }

    /// Eight bf16 pairs rounded from 16 f32 at `p`.
    ///
    /// # Safety
    /// `p` is valid for 16 f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn load8_pairs(p: *const u8) -> __m256 {
        // SAFETY: per the contract; the bf16 vector is 256 bits of 16 bf16 = 8 pairs, in the
        // order `Kernel::pack` puts them (low half k = 2s).
        unsafe { std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(p as *const f32))) }
    }

    /// # Safety
    /// The CPU has avx512f; `form` is `form::<K, T>(round)` and not `F32ToPairs`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn runs<K: Kernel, T: Src>(
        form: Form,
        runs: &[Option<&[T]>],
        steps: usize,
        kvalid: usize,
        round: bool,
        dst: &mut [K::P],
    ) {
        // SAFETY: forwarded; `load8` reads 8·KP values of a run inside its whole tiles.
        unsafe { body::<K, T>(runs, steps, kvalid, round, dst, |p| load8(form, p)) }
    }

    /// # Safety
    /// The CPU has avx512f and avx512bf16; `K` packs bf16 pairs and `T` is f32.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn runs_bf16<K: Kernel, T: Src>(
        runs: &[Option<&[T]>],
        steps: usize,
        kvalid: usize,
        round: bool,
        dst: &mut [K::P],
    ) {
        // SAFETY: forwarded; `load8_pairs` reads 16 f32 of a run inside its whole tiles.
        unsafe { body::<K, T>(runs, steps, kvalid, round, dst, |p| load8_pairs(p)) }
    }

    /// # Safety
    /// `load` reads 8 packed elements' source values from a pointer to them, with features the
    /// CPU has (avx2 at least).
    #[inline(always)]
    unsafe fn body<K: Kernel, T: Src>(
        runs: &[Option<&[T]>],
        steps: usize,
        kvalid: usize,
        round: bool,
        dst: &mut [K::P],
        load: impl Fn(*const u8) -> __m256,
    ) {
        const { assert!(std::mem::size_of::<K::P>() == 4) };
        let (rn, kp) = (runs.len(), K::KP);
        assert!(dst.len() >= steps * rn);
        // Packed steps inside whole 8-step tiles of every run.
        let whole = (kvalid / kp).min(steps) / 8 * 8;
        // Groups of up to 8 runs (zero rows for missing runs and past the last run).
        for g in (0..rn).step_by(8) {
            let cnt = 8.min(rn - g);
            let group = &runs[g..g + cnt];
            for sb in (0..whole).step_by(8) {
                let mut rows = [_mm256_setzero_ps(); 8];
                for (row, src) in rows.iter_mut().zip(group) {
                    if let Some(src) = src {
                        let v = &src[sb * kp..(sb + 8) * kp];
                        *row = load(v.as_ptr() as *const u8);
                        // The runs are far apart in memory (weight rows): fetch each one's
                        // next lines ahead of use, which the hardware prefetchers, tracking
                        // few streams, do not.
                        let ahead = (sb + 32) * kp;
                        if ahead < src.len() {
                            // SAFETY: a prefetch of an address inside the slice; no access.
                            unsafe {
                                _mm_prefetch::<_MM_HINT_T0>(src.as_ptr().add(ahead) as *const i8)
                            };
                        }
                    }
                }
                // SAFETY: avx2 present (see the contract).
                let cols = unsafe { transpose8(rows) };
                for (t, col) in cols.iter().enumerate() {
                    let at = (sb + t) * rn + g;
                    let d = &mut dst[at..at + cnt];
                    if cnt == 8 {
                        // SAFETY: `d` holds 8 elements of 4 bytes.
                        unsafe { _mm256_storeu_ps(d.as_mut_ptr() as *mut f32, *col) };
                    } else {
                        let mut lanes = [0f32; 8];
                        // SAFETY: `lanes` holds 8 f32.
                        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *col) };
                        for (d, &l) in d.iter_mut().zip(&lanes) {
                            // SAFETY: `K::P` is 4 bytes, any bit pattern valid.
                            *d = unsafe { std::mem::transmute_copy::<f32, K::P>(&l) };
                        }
                    }
                }
            }
        }
        // Steps past the whole tiles (the end of k), element by element.
        for t in whole..steps {
            let row = &mut dst[t * rn..(t + 1) * rn];
            for (d, run) in row.iter_mut().zip(runs) {
                *d = match run {
                    Some(src) => pack_step::<K>(|p| src[p].f(), t, kvalid, round),
                    None => K::P::default(),
                };
            }
        }
    }
}

#[inline(always)]
fn pack_runs_body<K: Kernel, T: Src>(
    runs: &[Option<&[T]>],
    steps: usize,
    kvalid: usize,
    round: bool,
    dst: &mut [K::P],
) {
    const TS: usize = 8;
    let (rn, kp) = (runs.len(), K::KP);
    debug_assert!(rn <= 64 && dst.len() >= steps * rn);
    let mut tile = [[K::P::default(); TS]; 64];
    let mut sb = 0;
    while sb < steps {
        let cnt = TS.min(steps - sb);
        let full = cnt == TS && (sb + TS) * kp <= kvalid;
        for (tr, run) in tile.iter_mut().zip(runs) {
            match run {
                None => *tr = [K::P::default(); TS],
                Some(src) if full => {
                    let src = &src[sb * kp..(sb + TS) * kp];
                    if kp == 1 {
                        for (d, &v) in tr.iter_mut().zip(src) {
                            *d = K::pack([v.f(), 0.0], round);
                        }
                    } else {
                        for (d, v) in tr.iter_mut().zip(src.chunks_exact(2)) {
                            *d = K::pack([v[0].f(), v[1].f()], round);
                        }
                    }
                }
                Some(src) => {
                    for (t, d) in tr.iter_mut().enumerate().take(cnt) {
                        *d = pack_step::<K>(|p| src[p].f(), sb + t, kvalid, round);
                    }
                }
            }
        }
        for t in 0..cnt {
            let row = &mut dst[(sb + t) * rn..(sb + t + 1) * rn];
            for (d, tr) in row.iter_mut().zip(&tile[..rn]) {
                *d = tr[t];
            }
        }
        sb += TS;
    }
}

/// Elements of A packed for kernel `K`: `⌈m / MR⌉` panels of `⌈k / KP⌉ × MR`.
pub(super) fn packed_a_len<K: Kernel>(m: usize, k: usize) -> usize {
    m.div_ceil(K::MR) * k.div_ceil(K::KP) * K::MR
}

/// Packs B rows `s0·KP..` (`steps` packed steps) of columns `j0..j0 + ncs` into micro-panels
/// `[steps][NR]` (zeros past k and past the stripe).
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_b<K: Kernel, T: Src>(
    b: &MatRef<'_, T>,
    k: usize,
    s0: usize,
    steps: usize,
    j0: usize,
    ncs: usize,
    round: bool,
    bp: &mut [K::P],
) {
    let (nr, kp) = (K::NR, K::KP);
    if b.cs == 1 && ncs.is_multiple_of(nr) {
        // Row-major B (e.g. Winograd's transformed input): each packed step is NR (or NR pairs of)
        // consecutive elements of one or two B rows.
        for u in 0..ncs / nr {
            let panel = &mut bp[u * steps * nr..(u + 1) * steps * nr];
            let c0 = j0 + u * nr;
            for s in 0..steps {
                let p0 = (s0 + s) * kp;
                let r0 = &b.data[p0 * b.rs + c0..p0 * b.rs + c0 + nr];
                let r1 = if kp == 2 && p0 + 1 < k {
                    Some(&b.data[(p0 + 1) * b.rs + c0..(p0 + 1) * b.rs + c0 + nr])
                } else {
                    None
                };
                let dst = &mut panel[s * nr..(s + 1) * nr];
                if p0 >= k {
                    dst.fill(K::P::default());
                    continue;
                }
                if kp == 1 && !round && !T::IS_BF16 {
                    // f32 as is: a copy.
                    // SAFETY: `T` is f32 and `K::P` 4 bytes with any bit pattern valid, so both
                    // slices are `nr` 4-byte values.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            r0.as_ptr() as *const u8,
                            dst.as_mut_ptr() as *mut u8,
                            4 * nr,
                        )
                    };
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if kp == 2 && !T::IS_BF16 && nr % 16 == 0 && crate::cpu::has_avx512bf16() {
                    // f32 rows to bf16 pairs (the only KP = 2 kernel needs AVX512-BF16).
                    // SAFETY: `T` is f32, `K::P` u32-sized; the CPU has avx512f and avx512bf16.
                    unsafe {
                        let lo = std::slice::from_raw_parts(r0.as_ptr() as *const f32, nr);
                        let hi =
                            r1.map(|r| std::slice::from_raw_parts(r.as_ptr() as *const f32, nr));
                        let d = std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u32, nr);
                        xpack::rows_to_pairs(lo, hi, d);
                    }
                    continue;
                }
                for (jj, d) in dst.iter_mut().enumerate() {
                    let hi = r1.map_or(0.0, |r| r[jj].f());
                    *d = K::pack([r0[jj].f(), hi], round);
                }
            }
        }
        return;
    }
    if b.rs == 1 {
        // Columns contiguous along k (a transposed row-major weight): transpose through tiles.
        let kvalid = k.saturating_sub(s0 * kp);
        let mut runs = [None; 64];
        for u in 0..ncs.div_ceil(nr) {
            for (jj, run) in runs[..nr].iter_mut().enumerate() {
                let j = u * nr + jj;
                *run = (j < ncs).then(|| &b.data[(j0 + j) * b.cs + s0 * kp..]);
            }
            let panel = &mut bp[u * steps * nr..(u + 1) * steps * nr];
            pack_runs::<K, T>(&runs[..nr], steps, kvalid, round, panel);
        }
        return;
    }
    for u in 0..ncs.div_ceil(nr) {
        let panel = &mut bp[u * steps * nr..(u + 1) * steps * nr];
        for jj in 0..nr {
            let j = u * nr + jj;
            if j >= ncs {
                for s in 0..steps {
                    panel[s * nr + jj] = K::P::default();
                }
                continue;
            }
            let col = (j0 + j) * b.cs;
            for s in 0..steps {
                panel[s * nr + jj] =
                    pack_step::<K>(|p| b.data[p * b.rs + col].f(), s0 + s, k, round);
            }
        }
    }
}

/// Packs A (`m × k`) into `ap` (zeroed, [`packed_a_len`] elements): panel q holds rows
/// q·MR.. as `[ksteps][MR]`, zero rows past m and zero k past k.
pub(super) fn pack_a<K: Kernel>(
    a: MatRef<'_, f32>,
    m: usize,
    k: usize,
    round: bool,
    ap: &mut [K::P],
    parallel: bool,
) {
    let (mr, kp) = (K::MR, K::KP);
    let ksteps = k.div_ceil(kp);
    let pack_panel = |(q, panel): (usize, &mut [K::P])| {
        if a.cs == 1 {
            // Row-major A: each panel row is a contiguous run along k.
            let mut runs = [None; 64];
            for (r, run) in runs[..mr].iter_mut().enumerate() {
                let i = q * mr + r;
                *run = (i < m).then(|| &a.data[i * a.rs..]);
            }
            pack_runs::<K, f32>(&runs[..mr], ksteps, k, round, panel);
            return;
        }
        for r in 0..mr {
            let i = q * mr + r;
            if i >= m {
                for s in 0..ksteps {
                    panel[s * mr + r] = K::P::default();
                }
                continue;
            }
            let row = i * a.rs;
            for s in 0..ksteps {
                panel[s * mr + r] = pack_step::<K>(|p| a.data[row + p * a.cs], s, k, round);
            }
        }
    };
    // (k = 0 leaves nothing to pack; chunks need a non-zero size.)
    let chunk = (ksteps * mr).max(1);
    if parallel {
        ap.par_chunks_mut(chunk).enumerate().for_each(pack_panel);
    } else {
        ap.chunks_mut(chunk).enumerate().for_each(pack_panel);
    }
}
