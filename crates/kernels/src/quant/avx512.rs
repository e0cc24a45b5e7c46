//! The AVX-512 VNNI decode dots (Zen 4, Ice Lake and later): two blocks of 32 per 512-bit
//! register, their 64 byte products summed into sixteen i32 lanes by one `vpdpbusd` (u8 × i8,
//! no intermediate i16 saturation), eight lanes per block; then converted to f32 and scaled by
//! `d_w·d_x` in one FMA, the pair's two scales spread over the halves by `vpermps`. Sixteen
//! blocks' scales convert and multiply in one instruction each. `Q8_0`'s weights are held
//! offset by 128 (unsigned), so a block is one `vpdpbusd` with no sign handling, and the
//! `128·Σx` the offset adds is one FMA per sixteen blocks from the activations' block sums (as
//! `Q4_1`'s `m·s` terms); `Q4_1`'s nibbles are unsigned already, four blocks per load, and its
//! `m·s` terms are one FMA per sixteen blocks. Leftover blocks (a `k` that is not a multiple
//! of 512) take the 256-bit `vpdpbusd` one block at a time. Up to four activation rows per pass
//! over a weight row, and each cache line prefetched ahead, as on AVX2.

use super::avx2::{f16_at, hsum};
use super::blocks::{Row, Q4_1_BYTES, Q8_0_BYTES, QK};
use crate::stream::prefetch_ahead;
use std::arch::x86_64::*;

/// Blocks per scale group: one 512-bit register of f32 scales.
const G: usize = 16;

/// Sixteen f16 at `p` as f32 lanes.
///
/// # Safety
/// The CPU has avx512f; `p` is valid for 32 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn f16x16(p: *const u8) -> __m512 {
    // SAFETY: forwarded contract.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
}

/// The scale of block pair `j` of a group, spread: lanes 0–7 get scale `2j`, lanes 8–15
/// scale `2j + 1` of `sc`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
fn pair_scale(sc: __m512, j: usize) -> __m512 {
    let (a, b) = (2 * j as i32, 2 * j as i32 + 1);
    _mm512_permutexvar_ps(
        _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a),
        sc,
    )
}

/// The 256-bit dot of one block, as f32 lanes (`u` unsigned, `s` signed).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
fn dot256(u: __m256i, s: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s))
}

/// [`super::scalar::dots_q8_0`] on AVX-512 VNNI.
///
/// # Safety
/// The CPU has avx512f, avx512bw, avx512vl, avx512vnni and f16c; `w` is a split `Q8_0` row and
/// every row of `xs` holds its blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn dots_q8_0<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    let nb = w.len() / Q8_0_BYTES;
    let (z, zi) = (_mm512_setzero_ps(), _mm512_setzero_si512());
    let (mut a0, mut a1, mut off) = ([z; R], [z; R], [z; R]);
    let mut tail = [_mm256_setzero_ps(); R];
    let mut tail_off = [0f32; R];
    // SAFETY: the scales are the row's first 2·nb bytes and block b's quants (offset by 128,
    // see `blocks`) the 32 at 2·nb + 32·b, so blocks b and b + 1 are 64 contiguous bytes; the
    // activation rows hold nb·32 values, nb scales and nb sums (contract). A block's
    // `vpdpbusd` sums Σ(w + 128)·x; the 128·d_w·d_x·Σx it adds is gathered in `off` (one FMA
    // per sixteen blocks, from the rows' block sums) and taken off at the end.
    unsafe {
        let (ds, qs) = (w.as_ptr(), w.as_ptr().add(2 * nb));
        for g in 0..nb / G {
            let b0 = g * G;
            let dw = f16x16(ds.add(2 * b0));
            let mut sc = [z; R];
            for r in 0..R {
                sc[r] = _mm512_mul_ps(dw, _mm512_loadu_ps(xs[r].d.as_ptr().add(b0)));
                off[r] = _mm512_fmadd_ps(dw, _mm512_loadu_ps(xs[r].s.as_ptr().add(b0)), off[r]);
            }
            for j in 0..G / 2 {
                let b = b0 + 2 * j;
                prefetch_ahead(qs.add(b * QK));
                let qw = _mm512_loadu_si512(qs.add(b * QK) as *const __m512i);
                for r in 0..R {
                    let qx = _mm512_loadu_si512(xs[r].q.as_ptr().add(b * QK) as *const __m512i);
                    let p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zi, qw, qx));
                    let s = pair_scale(sc[r], j);
                    if j % 2 == 0 {
                        a0[r] = _mm512_fmadd_ps(p, s, a0[r]);
                    } else {
                        a1[r] = _mm512_fmadd_ps(p, s, a1[r]);
                    }
                }
            }
        }
        for b in nb / G * G..nb {
            let dw = f16_at(ds.add(2 * b));
            let qw = _mm256_loadu_si256(qs.add(b * QK) as *const __m256i);
            for r in 0..R {
                let qx = _mm256_loadu_si256(xs[r].q.as_ptr().add(b * QK) as *const __m256i);
                let s = _mm256_set1_ps(dw * *xs[r].d.get_unchecked(b));
                tail[r] = _mm256_fmadd_ps(dot256(qw, qx), s, tail[r]);
                tail_off[r] += dw * *xs[r].s.get_unchecked(b);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let offset = _mm512_reduce_add_ps(off[r]) + tail_off[r];
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r])) + hsum(tail[r]) - 128.0 * offset;
    }
    out
}

/// [`super::scalar::dots_q4_1`] on AVX-512 VNNI.
///
/// # Safety
/// As [`dots_q8_0`], for a split `Q4_1` row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn dots_q4_1<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    let nb = w.len() / Q4_1_BYTES;
    let (z, zi) = (_mm512_setzero_ps(), _mm512_setzero_si512());
    let (mut a0, mut a1, mut mv) = ([z; R], [z; R], [z; R]);
    let mut tail = [_mm256_setzero_ps(); R];
    let mut tail_mins = [0f32; R];
    // Quadwords of (lo, hi) that put blocks 0, 1 (then 2, 3) of a 64-byte load in block order:
    // each block's low nibbles (its values 0–15) then its high nibbles (16–31).
    let first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    let second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    // SAFETY: the d fields are the row's first 2·nb bytes, the m fields the next 2·nb, and
    // block b's nibbles the 16 at 4·nb + 16·b (so blocks b..b + 4 are 64 contiguous bytes);
    // the activation rows hold nb·32 values, nb scales and nb sums (contract).
    unsafe {
        let (ds, ms, qs) = (w.as_ptr(), w.as_ptr().add(2 * nb), w.as_ptr().add(4 * nb));
        let low = _mm512_set1_epi8(15);
        for g in 0..nb / G {
            let b0 = g * G;
            let (dw, mw) = (f16x16(ds.add(2 * b0)), f16x16(ms.add(2 * b0)));
            let mut sc = [z; R];
            for r in 0..R {
                sc[r] = _mm512_mul_ps(dw, _mm512_loadu_ps(xs[r].d.as_ptr().add(b0)));
                mv[r] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(xs[r].s.as_ptr().add(b0)), mv[r]);
            }
            for j in 0..G / 4 {
                let b = b0 + 4 * j;
                prefetch_ahead(qs.add(b * (QK / 2)));
                let v = _mm512_loadu_si512(qs.add(b * (QK / 2)) as *const __m512i);
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                let q01 = _mm512_permutex2var_epi64(lo, first, hi);
                let q23 = _mm512_permutex2var_epi64(lo, second, hi);
                for r in 0..R {
                    let x = xs[r].q.as_ptr().add(b * QK);
                    let x01 = _mm512_loadu_si512(x as *const __m512i);
                    let x23 = _mm512_loadu_si512(x.add(2 * QK) as *const __m512i);
                    let p01 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zi, q01, x01));
                    let p23 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zi, q23, x23));
                    a0[r] = _mm512_fmadd_ps(p01, pair_scale(sc[r], 2 * j), a0[r]);
                    a1[r] = _mm512_fmadd_ps(p23, pair_scale(sc[r], 2 * j + 1), a1[r]);
                }
            }
        }
        let low = _mm_set1_epi8(15);
        for b in nb / G * G..nb {
            let (dw, mw) = (f16_at(ds.add(2 * b)), f16_at(ms.add(2 * b)));
            let v = _mm_loadu_si128(qs.add(b * (QK / 2)) as *const __m128i);
            let q = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(v, 4), low),
                _mm_and_si128(v, low),
            );
            for r in 0..R {
                let qx = _mm256_loadu_si256(xs[r].q.as_ptr().add(b * QK) as *const __m256i);
                let s = _mm256_set1_ps(dw * *xs[r].d.get_unchecked(b));
                tail[r] = _mm256_fmadd_ps(dot256(q, qx), s, tail[r]);
                tail_mins[r] += mw * *xs[r].s.get_unchecked(b);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]))
            + _mm512_reduce_add_ps(mv[r])
            + hsum(tail[r])
            + tail_mins[r];
    }
    out
}
