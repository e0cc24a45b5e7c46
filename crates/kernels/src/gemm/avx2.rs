//! The AVX2 + FMA micro-kernel (`Avx2`, 6 × 16 f32).

use super::kernel::{pack_f32, Kernel};
use std::arch::x86_64::*;

pub(super) struct Avx2;

// SAFETY: `kernel` requires avx2 and fma, which `drive::<Avx2>` callers guarantee.
unsafe impl Kernel for Avx2 {
    type P = f32;
    const MR: usize = 6;
    const NR: usize = 16;
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
        // SAFETY: forwarded contract (avx2 + fma present, pointers valid).
        unsafe { k256(steps, a, b, c, ldc, add) }
    }
}

/// 6 × 16 f32 tile: 12 ymm accumulators, two B vectors and one broadcast per k step.
///
/// # Safety
/// avx2 and fma present; `a` valid for steps·6 floats, `b` for steps·16, `c` for 6 rows of
/// 16 floats `ldc` apart.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn k256(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, add: bool) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    for s in 0..steps {
        // SAFETY: s < steps: within the packed micro-panels.
        unsafe {
            let b0 = _mm256_loadu_ps(b.add(s * 16));
            let b1 = _mm256_loadu_ps(b.add(s * 16 + 8));
            let ar = a.add(s * 6);
            for (r, accr) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*ar.add(r));
                accr[0] = _mm256_fmadd_ps(av, b0, accr[0]);
                accr[1] = _mm256_fmadd_ps(av, b1, accr[1]);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        // SAFETY: row r < 6 of the C tile, 16 floats.
        unsafe {
            let p = c.add(r * ldc);
            if add {
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), accr[0]));
                _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), accr[1]));
            } else {
                _mm256_storeu_ps(p, accr[0]);
                _mm256_storeu_ps(p.add(8), accr[1]);
            }
        }
    }
}
