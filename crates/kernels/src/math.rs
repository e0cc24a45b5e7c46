//! Shared math of the kernels: [`exp_approx`], the vectorisable `exp` (softmax, SiLU, GELU),
//! and the exact-erf GELU ([`gelu_erf_inplace`], also the GEMM's activation), with its erf.

use crate::cpu::multiversion;
use rayon::prelude::*;

/// Elements per parallel task of the elementwise passes (here and in `elementwise`).
pub(crate) const CHUNK: usize = 16 * 1024;

/// `e^x` for x ≤ 0 with relative error below 2e-7, written without calls or branches so loops
/// over it vectorise. Inputs below −87 give 0 (as `expf` underflows there).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.max(-87.0);
    // e^x = 2^n · e^r, n = round(x / ln 2), r = x − n·ln 2 ∈ [−ln2/2, ln2/2]; ln 2 split in a
    // short high part and a correction (Cody–Waite) so r keeps full precision for large |x|.
    // Round to nearest by the 1.5·2²³ trick: `f32::round` is a libm call that blocks vectorising.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from t's bits: t = 1.5·2²³ + n holds n in its low mantissa bits (|n| ≤ 126 here), so
    // the exponent field is plain integer arithmetic. (`n as i32` is a saturating cast that the
    // compiler lowers to one scalar conversion per lane, which kept this loop from vectorising.)
    let bits = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

/// `0.5 · x · (1 + erf(x / √2))`, erf by Abramowitz–Stegun 7.1.26 (absolute error ≤ 1.5e-7,
/// the formula PyTorch's vectorised CPU `erf` uses) with a branch-free `exp`.
#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let az = z.abs();
    let t = 1.0 / (1.0 + P * az);
    let poly = t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5))));
    let e = 1.0 - poly * exp_approx(-az * az);
    let erf = if z < 0.0 { -e } else { e };
    0.5 * x * (1.0 + erf)
}

#[inline(always)]
fn gelu_body(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu_one(*v);
    }
}

multiversion!(
    /// Exact-erf GELU in place, on the calling thread.
    fn gelu_serial(x: &mut [f32]) => gelu_body
);

/// Exact-erf GELU (`x · Φ(x)`) in place, split across the rayon pool for large slices.
pub fn gelu_erf_inplace(x: &mut [f32]) {
    if x.len() <= CHUNK {
        gelu_serial(x);
    } else {
        x.par_chunks_mut(CHUNK).for_each(gelu_serial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::erf64;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let rel = ((exp_approx(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        let floor = (-87f32).exp();
        assert!(((exp_approx(-1000.0) - floor) / floor).abs() < 5e-7);
    }

    #[test]
    fn gelu_matches_exact_erf() {
        let mut xs: Vec<f32> = (-12000..12000).map(|i| i as f32 * 1e-3).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 50.0, -50.0, 1e4, -1e4]);
        let mut got = xs.clone();
        gelu_erf_inplace(&mut got);
        let mut worst = 0f64;
        for (&x, &g) in xs.iter().zip(&got) {
            let want = 0.5 * x as f64 * (1.0 + erf64(x as f64 / 2f64.sqrt()));
            let err = (g as f64 - want).abs() / want.abs().max(1.0);
            worst = worst.max(err);
        }
        // Absolute error ≤ 1.5e-7·|x|/2 from the erf formula plus f32 rounding.
        assert!(worst < 4e-7, "worst error {worst}");
    }
}
