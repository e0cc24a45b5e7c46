//! The AVX2 decode dots (also what AVX-512 machines run): 32 weights and 32 activation values
//! per block meet in `vpmaddubsw` (u8 × i8 pairs → i16) and `vpmaddwd` (→ i32), converted
//! to f32 and scaled by `d_w·d_x` in one FMA, as ggml's `ggml_vec_dot_q8_0_q8_0` /
//! `_q4_1_q8_1`. On the split rows (see `blocks`) eight blocks' scales convert and multiply in
//! one instruction each and each block picks its lane with `vpermps`; a `Q4_1` row's `m·s`
//! terms are one FMA per eight blocks, and two blocks' nibbles are one load. Up to four
//! activation rows per pass over a weight row; two accumulator sets (even and odd blocks) so
//! consecutive FMAs do not wait on each other.

use super::blocks::{Row, Q4_1_BYTES, Q8_0_BYTES, Q8_0_FLIP, QK};
use crate::stream::prefetch_ahead;
use std::arch::x86_64::*;

/// The f16 at `p` as f32.
///
/// # Safety
/// The CPU has f16c; `p` is valid for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: forwarded contract.
    unsafe {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// The i32 lanes of `Σ u·s` over byte pairs and then pairs of those (`u` unsigned, `s` signed).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_madd_epi16(
        _mm256_maddubs_epi16(u, s),
        _mm256_set1_epi16(1),
    ))
}

/// Eight f16 at `p` as f32 lanes.
///
/// # Safety
/// The CPU has f16c; `p` is valid for 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x8(p: *const u8) -> __m256 {
    // SAFETY: forwarded contract.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// Lane `j` of `v` in every lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lane(v: __m256, j: i32) -> __m256 {
    _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j))
}

/// [`super::scalar::dots_q8_0`] on AVX2.
///
/// # Safety
/// The CPU has avx2, fma and f16c; `w` is a split `Q8_0` row and every row of `xs` holds its
/// blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dots_q8_0<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    let nb = w.len() / Q8_0_BYTES;
    let zero = _mm256_setzero_ps();
    let (mut a0, mut a1) = ([zero; R], [zero; R]);
    // The stored quants are offset by 128 (see `blocks`): one XOR gives the signed value back.
    let flip = _mm256_set1_epi8(Q8_0_FLIP as i8);
    // SAFETY: the scales are the row's first 2·nb bytes and block b's quants the 32 at
    // 2·nb + 32·b; the activation rows hold nb·32 values and nb scales (contract).
    unsafe {
        let (ds, qs) = (w.as_ptr(), w.as_ptr().add(2 * nb));
        for g in 0..nb / 8 {
            let b0 = g * 8;
            let dw = f16x8(ds.add(2 * b0));
            let mut sc = [zero; R];
            for r in 0..R {
                sc[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(xs[r].d.as_ptr().add(b0)));
            }
            for j in 0..8 {
                let b = b0 + j;
                if j % 2 == 0 {
                    prefetch_ahead(qs.add(b * QK));
                }
                let qw =
                    _mm256_xor_si256(_mm256_loadu_si256(qs.add(b * QK) as *const __m256i), flip);
                let aw = _mm256_sign_epi8(qw, qw);
                for r in 0..R {
                    let qx = _mm256_loadu_si256(xs[r].q.as_ptr().add(b * QK) as *const __m256i);
                    let p = dot_u8_i8(aw, _mm256_sign_epi8(qx, qw));
                    let s = lane(sc[r], j as i32);
                    if j % 2 == 0 {
                        a0[r] = _mm256_fmadd_ps(p, s, a0[r]);
                    } else {
                        a1[r] = _mm256_fmadd_ps(p, s, a1[r]);
                    }
                }
            }
        }
        for b in nb / 8 * 8..nb {
            let dw = f16_at(ds.add(2 * b));
            let qw = _mm256_xor_si256(_mm256_loadu_si256(qs.add(b * QK) as *const __m256i), flip);
            let aw = _mm256_sign_epi8(qw, qw);
            for r in 0..R {
                let qx = _mm256_loadu_si256(xs[r].q.as_ptr().add(b * QK) as *const __m256i);
                let p = dot_u8_i8(aw, _mm256_sign_epi8(qx, qw));
                a0[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * *xs[r].d.get_unchecked(b)), a0[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
    }
    out
}

/// [`super::scalar::dots_q4_1`] on AVX2.
///
/// # Safety
/// As [`dots_q8_0`], for a split `Q4_1` row.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dots_q4_1<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    let nb = w.len() / Q4_1_BYTES;
    let zero = _mm256_setzero_ps();
    let (mut a0, mut a1, mut mv) = ([zero; R], [zero; R], [zero; R]);
    let mut tail_mins = [0f32; R];
    // SAFETY: the d fields are the row's first 2·nb bytes, the m fields the next 2·nb, and
    // block b's nibbles the 16 at 4·nb + 16·b (so blocks b and b + 1 are 32 contiguous
    // bytes); the activation rows hold nb·32 values, nb scales and nb sums (contract).
    unsafe {
        let (ds, ms, qs) = (w.as_ptr(), w.as_ptr().add(2 * nb), w.as_ptr().add(4 * nb));
        let low = _mm256_set1_epi8(15);
        for g in 0..nb / 8 {
            let b0 = g * 8;
            let (dw, mw) = (f16x8(ds.add(2 * b0)), f16x8(ms.add(2 * b0)));
            let mut sc = [zero; R];
            for r in 0..R {
                sc[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(xs[r].d.as_ptr().add(b0)));
                mv[r] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(xs[r].s.as_ptr().add(b0)), mv[r]);
            }
            for j in 0..4 {
                let b = b0 + 2 * j;
                if j % 2 == 0 {
                    prefetch_ahead(qs.add(b * (QK / 2)));
                }
                let v = _mm256_loadu_si256(qs.add(b * (QK / 2)) as *const __m256i);
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                let q0 = _mm256_permute2x128_si256(lo, hi, 0x20);
                let q1 = _mm256_permute2x128_si256(lo, hi, 0x31);
                for r in 0..R {
                    let x = xs[r].q.as_ptr().add(b * QK);
                    let p0 = dot_u8_i8(q0, _mm256_loadu_si256(x as *const __m256i));
                    let p1 = dot_u8_i8(q1, _mm256_loadu_si256(x.add(QK) as *const __m256i));
                    a0[r] = _mm256_fmadd_ps(p0, lane(sc[r], 2 * j as i32), a0[r]);
                    a1[r] = _mm256_fmadd_ps(p1, lane(sc[r], 2 * j as i32 + 1), a1[r]);
                }
            }
        }
        let low = _mm_set1_epi8(15);
        for b in nb / 8 * 8..nb {
            let (dw, mw) = (f16_at(ds.add(2 * b)), f16_at(ms.add(2 * b)));
            let v = _mm_loadu_si128(qs.add(b * (QK / 2)) as *const __m128i);
            let q = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(v, 4), low),
                _mm_and_si128(v, low),
            );
            for r in 0..R {
                let qx = _mm256_loadu_si256(xs[r].q.as_ptr().add(b * QK) as *const __m256i);
                let p = dot_u8_i8(q, qx);
                a0[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * *xs[r].d.get_unchecked(b)), a0[r]);
                tail_mins[r] += mw * *xs[r].s.get_unchecked(b);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(_mm256_add_ps(a0[r], a1[r])) + hsum(mv[r]) + tail_mins[r];
    }
    out
}
