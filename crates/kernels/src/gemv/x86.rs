//! The AVX-512 and AVX2 paths: one template, `simd_kernels!`, instantiated per ISA.

/// The direct and packed kernels, written once over a vector type. The invoking module
/// provides `V` (vector of f32), `W` (lanes), `NR`×`MR` (packed register tile), and
/// `#[target_feature]` helpers `zero`, `add`, `fma`, `hsum`, `loadu`, `storeu`, `load_bf16`.
macro_rules! simd_kernels {
    ($feat:literal) => {
        use crate::gemv::{for_each_stripe, Elem, Weights};
        use crate::sync::SendPtr;
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
            let ptr = SendPtr::new(out);
            if m <= DIRECT_MAX {
                for_each_stripe(m, n, k, |j0, j1| {
                    // SAFETY: features per this fn's contract; shapes checked; columns
                    // j0..j1 of `out` belong to this task (see `for_each_stripe`).
                    unsafe {
                        match w {
                            Weights::F32(w) => {
                                direct::<LoadF32>(x, m, k, w, n, bias, ptr.ptr(), j0, j1)
                            }
                            Weights::Bf16(w) => {
                                direct::<LoadBf16>(x, m, k, w, n, bias, ptr.ptr(), j0, j1)
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
                                packed::<LoadF32>(&xp, m, k, w, n, bias, ptr.ptr(), j0, j1)
                            }
                            Weights::Bf16(w) => {
                                packed::<LoadBf16>(&xp, m, k, w, n, bias, ptr.ptr(), j0, j1)
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
