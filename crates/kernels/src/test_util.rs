//! Helpers shared by the kernels' unit tests.

/// Deterministic values in [-1, 1) for the kernels' tests.
pub(crate) fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// erf in f64 to ~1e-15 (test reference).
pub(crate) fn erf64(x: f64) -> f64 {
    // High-precision reference: series for small |x|, continued fraction beyond.
    if x.abs() < 3.0 {
        let mut sum = x;
        let mut term = x;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x * x / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let s = x.signum();
        let a = x.abs();
        // erfc continued fraction (Lentz), adequate for a ≥ 3.
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        s * (1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt()))
    }
}
