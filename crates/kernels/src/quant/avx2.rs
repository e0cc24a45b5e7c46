//! The AVX2 decode dots (also what AVX-512 machines run): 32 weights and 32 activation values
//! per block meet in `vpmaddubsw` (u8 × i8 pairs → i16) and `vpmaddwd` (→ i32), converted
//! to f32 and scaled by `d_w·d_x` in one FMA. As ggml's `ggml_vec_dot_q8_0_q8_0` /
//! `_q4_1_q8_1`, with up to four activation rows per pass over a weight row and two
//! accumulator sets (even and odd blocks) so consecutive FMAs do not wait on each other.

use super::blocks::{Row, Q4_1_BYTES, Q8_0_BYTES, QK};
use std::arch::x86_64::*;

/// The f16 at `p` as f32.
///
/// # Safety
/// The CPU has f16c; `p` is valid for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: forwarded contract.
    unsafe {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
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

/// [`super::scalar::dots_q8_0`] on AVX2.
///
/// # Safety
/// The CPU has avx2, fma and f16c; every row of `xs` holds the blocks of `w`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dots_q8_0<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    /// Adds block `b`'s products to `acc`.
    #[inline(always)]
    unsafe fn block<const R: usize>(
        w: *const u8,
        xs: &[Row<'_>; R],
        b: usize,
        acc: &mut [__m256; R],
    ) {
        // SAFETY: block b lies in the weight row; the rows hold its values and scale.
        unsafe {
            let blk = w.add(b * Q8_0_BYTES);
            let dw = f16_at(blk);
            let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let aw = _mm256_sign_epi8(qw, qw);
            for r in 0..R {
                let x = &xs[r];
                let qx = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
                let p = dot_u8_i8(aw, _mm256_sign_epi8(qx, qw));
                acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * *x.d.get_unchecked(b)), acc[r]);
            }
        }
    }
    let nb = w.len() / Q8_0_BYTES;
    let (mut a0, mut a1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let mut b = 0;
    // SAFETY: b, b + 1 < nb (contract as above).
    unsafe {
        while b + 1 < nb {
            block(w.as_ptr(), &xs, b, &mut a0);
            block(w.as_ptr(), &xs, b + 1, &mut a1);
            b += 2;
        }
        if b < nb {
            block(w.as_ptr(), &xs, b, &mut a0);
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
/// As [`dots_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dots_q4_1<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    /// Adds block `b`'s products to `acc` and its minimum's term to `mins`.
    #[inline(always)]
    unsafe fn block<const R: usize>(
        w: *const u8,
        xs: &[Row<'_>; R],
        b: usize,
        acc: &mut [__m256; R],
        mins: &mut [f32; R],
    ) {
        // SAFETY: as in `dots_q8_0`.
        unsafe {
            let blk = w.add(b * Q4_1_BYTES);
            let (dw, mw) = (f16_at(blk), f16_at(blk.add(2)));
            let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
            let low = _mm_set1_epi8(15);
            let q = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(qs, 4), low),
                _mm_and_si128(qs, low),
            );
            for r in 0..R {
                let x = &xs[r];
                let qx = _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i);
                let p = dot_u8_i8(q, qx);
                acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw * *x.d.get_unchecked(b)), acc[r]);
                mins[r] += mw * *x.s.get_unchecked(b);
            }
        }
    }
    let nb = w.len() / Q4_1_BYTES;
    let (mut a0, mut a1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let (mut m0, mut m1) = ([0f32; R], [0f32; R]);
    let mut b = 0;
    // SAFETY: b, b + 1 < nb (contract as above).
    unsafe {
        while b + 1 < nb {
            block(w.as_ptr(), &xs, b, &mut a0, &mut m0);
            block(w.as_ptr(), &xs, b + 1, &mut a1, &mut m1);
            b += 2;
        }
        if b < nb {
            block(w.as_ptr(), &xs, b, &mut a0, &mut m0);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(_mm256_add_ps(a0[r], a1[r])) + m0[r] + m1[r];
    }
    out
}
