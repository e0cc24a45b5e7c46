//! Checks `linear_rows` against a naive f64 reference on random shapes, both weight dtypes,
//! with and without bias, and checks the SIMD path against the forced portable path.

use half::bf16;
use janus_kernels::{linear_rows, linear_rows_on, linear_rows_scalar, simd_level, Weights};

/// Every path; those this CPU lacks are skipped by `linear_rows_on` returning false.
const PATHS: [&str; 3] = ["avx512", "avx2", "scalar"];

/// Small deterministic generator so the test needs no rand crate.
struct XorShift(u64);

impl XorShift {
    fn next_u64(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.f32()).collect()
    }
}

/// Naive f64 product; also returns sum |x·w| per output, the scale rounding error is relative to.
fn reference(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; m * n];
    let mut mag = vec![0.0; m * n];
    for r in 0..m {
        for j in 0..n {
            let mut s = bias.map_or(0.0, |b| b[j] as f64);
            let mut a = bias.map_or(0.0, |b| (b[j] as f64).abs());
            for i in 0..k {
                let p = x[r * k + i] as f64 * w[j * k + i] as f64;
                s += p;
                a += p.abs();
            }
            out[r * n + j] = s;
            mag[r * n + j] = a;
        }
    }
    (out, mag)
}

fn assert_close(got: &[f32], want: &[f64], mag: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (idx, ((&g, &w), &a)) in got.iter().zip(want).zip(mag).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= 1e-5 * a.max(1e-30),
            "{what}: element {idx}: got {g}, want {w}, err {err}, scale {a}"
        );
    }
}

const MS: [usize; 8] = [1, 2, 3, 5, 8, 16, 17, 32];
const KS: [usize; 5] = [1, 7, 16, 64, 2048 + 3];
const NS: [usize; 4] = [1, 5, 64, 257];

#[test]
fn matches_f64_reference_all_shapes() {
    eprintln!("simd level: {}", simd_level());
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for &m in &MS {
        for &k in &KS {
            for &n in &NS {
                let x = rng.vec(m * k);
                let w32 = rng.vec(n * k);
                let wbf: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
                let wbf_wide: Vec<f32> = wbf.iter().map(|v| v.to_f32()).collect();
                let b = rng.vec(n);
                for bias in [None, Some(&b[..])] {
                    let tag = format!("m={m} k={k} n={n} bias={}", bias.is_some());

                    let (want, mag) = reference(&x, m, k, &w32, n, bias);
                    let mut got = vec![f32::NAN; m * n];
                    linear_rows(&x, m, k, Weights::F32(&w32), n, bias, &mut got);
                    assert_close(&got, &want, &mag, &format!("f32 {tag}"));
                    for path in PATHS {
                        let mut got = vec![f32::NAN; m * n];
                        if linear_rows_on(path, &x, m, k, Weights::F32(&w32), n, bias, &mut got) {
                            assert_close(&got, &want, &mag, &format!("f32 {path} {tag}"));
                        }
                    }

                    let (want, mag) = reference(&x, m, k, &wbf_wide, n, bias);
                    let mut got = vec![f32::NAN; m * n];
                    linear_rows(&x, m, k, Weights::Bf16(&wbf), n, bias, &mut got);
                    assert_close(&got, &want, &mag, &format!("bf16 {tag}"));
                    for path in PATHS {
                        let mut got = vec![f32::NAN; m * n];
                        if linear_rows_on(path, &x, m, k, Weights::Bf16(&wbf), n, bias, &mut got) {
                            assert_close(&got, &want, &mag, &format!("bf16 {path} {tag}"));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn simd_equals_scalar_on_model_shapes() {
    let mut rng = XorShift(12345);
    // Covers both SIMD strategies (m <= 4 direct, m > 4 packed), several k-blocks, ragged tails.
    let shapes = [
        (1, 2048, 2048),
        (4, 300, 5632),
        (9, 1000, 2048),
        (32, 130, 256),
        (6, 67, 1100),
    ];
    for &(m, n, k) in &shapes {
        let x = rng.vec(m * k);
        let w: Vec<f32> = rng.vec(n * k);
        let wbf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        for weights in [Weights::F32(&w), Weights::Bf16(&wbf)] {
            let mut a = vec![0.0; m * n];
            let mut b = vec![0.0; m * n];
            linear_rows(&x, m, k, weights, n, None, &mut a);
            linear_rows_scalar(&x, m, k, weights, n, None, &mut b);
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                // Inputs in [-1, 1): the sum of |x·w| is about k/4, and two f32 summation
                // orders of k terms differ far less than 1e-5 of that.
                let tol = 1e-5 * k as f32 / 4.0;
                assert!((p - q).abs() <= tol, "m={m} n={n} k={k} [{i}]: {p} vs {q}");
            }
        }
    }
}

#[test]
fn degenerate_shapes() {
    // k = 0: the output is the bias (or zero).
    let b = [1.0f32, -2.0, 3.0];
    let mut out = [f32::NAN; 6];
    linear_rows(&[], 2, 0, Weights::F32(&[]), 3, Some(&b), &mut out);
    assert_eq!(out, [1.0, -2.0, 3.0, 1.0, -2.0, 3.0]);
    linear_rows(&[], 2, 0, Weights::Bf16(&[]), 3, None, &mut out);
    assert_eq!(out, [0.0; 6]);
    // m = 0 or n = 0: nothing to do.
    linear_rows(&[], 0, 4, Weights::F32(&[0.0; 8]), 2, None, &mut []);
    linear_rows(&[0.0; 4], 1, 4, Weights::F32(&[]), 0, None, &mut []);
}

#[test]
fn exact_small_case() {
    // x = [[1,2,3],[4,5,6]], w = [[1,0,0],[0,1,0],[1,1,1],[2,0,-1]] with bias.
    let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let w = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.0, -1.0];
    let b = [0.5, 0.0, 0.0, 1.0];
    let mut out = [0.0; 8];
    linear_rows(&x, 2, 3, Weights::F32(&w), 4, Some(&b), &mut out);
    assert_eq!(out, [1.5, 2.0, 6.0, 0.0, 4.5, 5.0, 15.0, 3.0]);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    linear_rows(&x, 2, 3, Weights::Bf16(&wb), 4, Some(&b), &mut out);
    assert_eq!(out, [1.5, 2.0, 6.0, 0.0, 4.5, 5.0, 15.0, 3.0]);
}

#[test]
#[should_panic(expected = "w.len() != n * k")]
fn panics_on_length_mismatch() {
    let mut out = [0.0; 2];
    linear_rows(&[0.0; 3], 1, 3, Weights::F32(&[0.0; 5]), 2, None, &mut out);
}

#[test]
fn reports_a_known_path() {
    assert!(PATHS.contains(&simd_level()), "{}", simd_level());
    // The detected path and the portable one always run.
    let mut out = [0.0; 1];
    assert!(linear_rows_on(
        simd_level(),
        &[2.0],
        1,
        1,
        Weights::F32(&[3.0]),
        1,
        None,
        &mut out
    ));
    assert_eq!(out, [6.0]);
    assert!(linear_rows_on(
        "scalar",
        &[2.0],
        1,
        1,
        Weights::F32(&[4.0]),
        1,
        None,
        &mut out
    ));
    assert_eq!(out, [8.0]);
}
