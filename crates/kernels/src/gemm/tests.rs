use super::kernel::{bf16_bits, round_to_bf16};
use super::*;
use crate::test_util::lcg;

/// f64 reference of `A·B + bias` (and accumulate/act), operands optionally rounded to bf16.
#[allow(clippy::too_many_arguments)]
fn reference(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    bt: bool,
    c0: &[f32],
    opts: &GemmOpts<'_>,
) -> Vec<f64> {
    let r = |x: f32| {
        if opts.precision == Precision::Bf16 {
            round_to_bf16(x) as f64
        } else {
            x as f64
        }
    };
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                let bv = if bt { b[j * k + p] } else { b[p * n + j] };
                s += r(a[i * k + p]) * r(bv);
            }
            s += opts.bias_n.map_or(0.0, |v| v[j] as f64);
            s += opts.bias_m.map_or(0.0, |v| v[i] as f64);
            if opts.accumulate {
                s += c0[i * n + j] as f64;
            }
            if opts.act == Act::GeluErf {
                s = s * 0.5 * (1.0 + erf(s / 2f64.sqrt()));
            }
            out[i * n + j] = s;
        }
    }
    out
}

fn erf(x: f64) -> f64 {
    crate::test_util::erf64(x)
}

/// Runs every path this CPU has on one shape and compares with the f64 reference.
/// Tolerance: |err| ≤ tol · Σ_p |a_p·b_p| (+ slack for bias/accumulate), the usual bound
/// for f32 sums of k products in any order (tol = 1e-5 f32, 2e-5 bf16: products of
/// bf16-rounded operands are exact in f32, so both are summation error).
fn check_shape(m: usize, n: usize, k: usize, bt: bool, seed: u64) {
    let mut s = seed;
    let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
    let b: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
    let bias_n: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
    let bias_m: Vec<f32> = (0..m).map(|_| lcg(&mut s)).collect();
    let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
    let b16: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
    let b16f: Vec<f32> = b16.iter().map(|x| x.to_f32()).collect();
    for path in gemm_paths() {
        for precision in [Precision::F32, Precision::Bf16] {
            for variant in 0..4 {
                let opts = GemmOpts {
                    bias_n: (variant & 1 == 1).then_some(&bias_n[..]),
                    bias_m: (variant == 2).then_some(&bias_m[..]),
                    accumulate: variant >= 2,
                    act: if variant == 3 {
                        Act::GeluErf
                    } else {
                        Act::None
                    },
                    precision,
                    serial: variant == 1,
                };
                for bf16_b in [false, true] {
                    let mut c = c0.clone();
                    let bref = match (bf16_b, bt) {
                        (true, true) => BRef::Bf16(MatRef::transposed(&b16, k, n)),
                        (true, false) => BRef::Bf16(MatRef::row_major(&b16, k, n)),
                        (false, true) => BRef::F32(MatRef::transposed(&b, k, n)),
                        (false, false) => BRef::F32(MatRef::row_major(&b, k, n)),
                    };
                    gemm_on(path, MatRef::row_major(&a, m, k), bref, &mut c, n, &opts).unwrap();
                    let bsrc = if bf16_b { &b16f } else { &b };
                    let want = reference(&a, bsrc, m, n, k, bt, &c0, &opts);
                    let tol = if precision == Precision::Bf16 {
                        2e-5
                    } else {
                        1e-5
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let mag: f64 = (0..k)
                                .map(|p| {
                                    let bv = if bt { bsrc[j * k + p] } else { bsrc[p * n + j] };
                                    (a[i * k + p] as f64 * bv as f64).abs()
                                })
                                .sum::<f64>()
                                + 3.0;
                            let got = c[i * n + j] as f64;
                            let w = want[i * n + j];
                            assert!(
                                (got - w).abs() <= tol * mag,
                                "{path} {precision:?} v{variant} bf16_b={bf16_b} \
                                 {m}x{n}x{k} bt={bt} at ({i},{j}): {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn odd_and_tiny_shapes_on_every_path() {
    for &(m, n, k) in &[
        (1, 1, 1),
        (1, 5, 1),
        (13, 33, 1),
        (12, 32, 7),
        (25, 65, 3),
        (7, 100, 257),
        (37, 70, 513),
        (3, 17, 2),
    ] {
        check_shape(m, n, k, true, 1 + m as u64);
        check_shape(m, n, k, false, 2 + n as u64);
    }
}

#[test]
fn every_row_count_of_a_panel_on_every_path() {
    // m = 1..=25 covers each partial panel (the row-count kernels, 1..MR-1 rows) alone and
    // after full panels; k = 300 is long enough for the C prefetch to run mid-tile (both
    // for f32 and for bf16 pairs); n = 69 mixes full and partial column tiles.
    for m in 1..=25 {
        check_shape(m, 69, 300, true, 40 + m as u64);
    }
}

#[test]
fn large_shapes_on_every_path() {
    // Several stripes, several k-blocks, partial tiles on both edges, parallel tasks.
    check_shape(61, 700, 600, true, 11);
    check_shape(50, 1030, 300, false, 12);
}

#[test]
fn leading_dimension_leaves_other_columns_alone() {
    let (m, n, k, ldc) = (5, 7, 9, 11);
    let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| i as f32 * 0.01).collect();
    let mut c = vec![42f32; (m - 1) * ldc + n];
    gemm(
        MatRef::row_major(&a, m, k),
        BRef::F32(MatRef::row_major(&b, k, n)),
        &mut c,
        ldc,
        &GemmOpts::default(),
    )
    .unwrap();
    for i in 0..m - 1 {
        assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 42.0));
    }
    let want: f32 = (0..k).map(|p| a[p] * b[p * n]).sum();
    assert!((c[0] - want).abs() < 1e-4);
}

#[test]
fn bad_shapes_are_errors() {
    let a = vec![0f32; 6];
    let b = vec![0f32; 6];
    let mut c = vec![0f32; 4];
    let o = GemmOpts::default();
    let am = MatRef::row_major(&a, 2, 3);
    // Inner dimension mismatch.
    assert!(gemm(am, BRef::F32(MatRef::row_major(&b, 2, 3)), &mut c, 2, &o).is_err());
    // B view past its slice.
    assert!(gemm(am, BRef::F32(MatRef::row_major(&b, 3, 3)), &mut c, 3, &o).is_err());
    // C too short / ldc too small.
    let bm = BRef::F32(MatRef::row_major(&b, 3, 2));
    assert!(gemm(am, bm, &mut c[..3], 2, &o).is_err());
    assert!(gemm(am, bm, &mut c, 1, &o).is_err());
    // Bias lengths.
    let bias = [0f32; 3];
    let ob = GemmOpts {
        bias_n: Some(&bias),
        ..Default::default()
    };
    assert!(gemm(am, bm, &mut c, 2, &ob).is_err());
    let ob = GemmOpts {
        bias_m: Some(&bias),
        ..Default::default()
    };
    assert!(gemm(am, bm, &mut c, 2, &ob).is_err());
    // Fine, and empty shapes are no-ops.
    assert!(gemm(am, bm, &mut c, 2, &o).is_ok());
    assert!(gemm(MatRef::row_major(&a, 0, 3), bm, &mut [], 2, &o).is_ok());
    // k = 0: the bias alone, activated.
    let bias = [1f32, -1.0];
    let og = GemmOpts {
        bias_n: Some(&bias),
        act: Act::GeluErf,
        ..Default::default()
    };
    let mut c0 = [9f32; 2];
    gemm(
        MatRef::row_major(&[], 1, 0),
        BRef::F32(MatRef::row_major(&[], 0, 2)),
        &mut c0,
        2,
        &og,
    )
    .unwrap();
    assert!((c0[0] - 0.841_344_7).abs() < 1e-6 && (c0[1] + 0.158_655_3).abs() < 1e-6);
    // Unknown path.
    assert!(gemm_on("neon", am, bm, &mut c, 2, &o).is_err());
}

#[test]
fn bf16_rounding_equals_half() {
    let mut s = 5u64;
    let special = [
        0.0f32,
        -0.0,
        1.0,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MIN_POSITIVE,
        1e-40,
        f32::from_bits(0x3f80_8000), // a tie, rounds to even (down)
        f32::from_bits(0x3f81_8000), // a tie, rounds to even (up)
        f32::from_bits(0x7f7f_ffff), // rounds to infinity
    ];
    let random = (0..100_000).map(|_| f32::from_bits((lcg(&mut s).to_bits()).rotate_left(7)));
    for x in special.into_iter().chain(random) {
        assert_eq!(
            bf16_bits(x) as u16,
            bf16::from_f32(x).to_bits(),
            "{x:e} ({:#x})",
            x.to_bits()
        );
    }
}

#[test]
fn prepacked_a_gives_the_same_product() {
    let mut s = 11u64;
    for (m, k, n) in [(1, 1, 1), (13, 7, 33), (40, 300, 70)] {
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut s)).collect();
        let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        for precision in [Precision::F32, Precision::Bf16] {
            for serial in [false, true] {
                let opts = GemmOpts {
                    bias_n: Some(&bias),
                    precision,
                    serial,
                    ..Default::default()
                };
                let am = MatRef::row_major(&a, m, k);
                let bm = BRef::F32(MatRef::row_major(&b, k, n));
                let mut want = vec![0f32; m * n];
                gemm(am, bm, &mut want, n, &opts).unwrap();
                let pa = PackedA::new(am, precision).unwrap();
                assert_eq!((pa.rows(), pa.cols()), (m, k));
                let mut got = vec![0f32; m * n];
                gemm_packed(&pa, bm, &mut got, n, &opts).unwrap();
                assert_eq!(got, want, "{m}×{k}×{n} {precision:?} serial {serial}");
                // Wrong inner dimension or precision: errors.
                let other = if precision == Precision::F32 {
                    Precision::Bf16
                } else {
                    Precision::F32
                };
                let wrong = GemmOpts {
                    precision: other,
                    ..opts
                };
                assert!(gemm_packed(&pa, bm, &mut got, n, &wrong).is_err());
                let short = BRef::F32(MatRef::row_major(&b, k - 1, n));
                if k > 1 {
                    assert!(gemm_packed(&pa, short, &mut got, n, &opts).is_err());
                }
            }
        }
    }
}

/// Parts packed side by side hold the very bytes of the stacked matrix packed whole, on
/// f32 and bf16 sources, at both precisions; parts that cannot stack are errors.
#[test]
fn stacked_parts_pack_like_the_stacked_matrix() {
    /// The rows of W (`[Σ widths, k]`, read transposed) as one view per part.
    fn split<'a, T>(w: &'a [T], k: usize, widths: &[usize]) -> Vec<MatRef<'a, T>> {
        let mut at = 0;
        widths
            .iter()
            .map(|&wd| {
                at += wd * k;
                MatRef::transposed(&w[at - wd * k..at], k, wd)
            })
            .collect()
    }
    let mut s = 9u64;
    let (k, widths) = (70, [32usize, 64, 13]);
    let n: usize = widths.iter().sum();
    let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
    let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
    for precision in [Precision::F32, Precision::Bf16] {
        let parts: Vec<BRef<'_>> = split(&w, k, &widths).into_iter().map(BRef::F32).collect();
        let parts_b: Vec<BRef<'_>> = split(&wb, k, &widths).into_iter().map(BRef::Bf16).collect();
        for (whole, parts, what) in [
            (BRef::F32(MatRef::transposed(&w, k, n)), &parts, "f32"),
            (BRef::Bf16(MatRef::transposed(&wb, k, n)), &parts_b, "bf16"),
        ] {
            let whole = PackedB::new(whole, precision).unwrap();
            let stacked = PackedB::stacked(parts, precision).unwrap();
            assert_eq!((stacked.rows(), stacked.cols()), (k, n));
            assert_eq!(stacked.data, whole.data, "{what} source, {precision:?}");
        }
        // A part that is not the last must be a whole number of tiles wide, all parts
        // must share k, and there must be parts.
        let ragged = [parts[2], parts[0]];
        assert!(PackedB::stacked(&ragged, precision).is_err());
        let short = BRef::F32(MatRef::transposed(&w[..(k - 1) * 32], k - 1, 32));
        assert!(PackedB::stacked(&[parts[0], short], precision).is_err());
        assert!(PackedB::stacked(&[], precision).is_err());
    }
}

/// A weight packed once as B (f32 or bf16 storage, `[n, k]` read transposed, as a linear
/// layer's) gives the product `gemm` gives packing it per call, bit for bit, with bias,
/// GELU or accumulation, across several k-blocks and stripes and ragged edges; few rows
/// (up to three A panels) walk the prepacked B micro-panel by micro-panel, more k-block by
/// k-block, and both orders sum the k-blocks in the same order.
#[test]
fn prepacked_b_gives_the_same_product() {
    let mut s = 5u64;
    for (m, k, n) in [
        (1, 1, 1),
        (13, 7, 33),
        (40, 1100, 70),
        (30, 64, 600),
        (2, 1100, 70),
        (36, 1300, 300),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let start: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
        let weights = [
            BRef::F32(MatRef::transposed(&w, k, n)),
            BRef::Bf16(MatRef::transposed(&wb, k, n)),
        ];
        for (bm, precision) in weights
            .into_iter()
            .flat_map(|b| [(b, Precision::F32), (b, Precision::Bf16)])
        {
            let pb = PackedB::new(bm, precision).unwrap();
            assert_eq!((pb.rows(), pb.cols()), (k, n));
            for (act, accumulate) in [(Act::None, false), (Act::GeluErf, false), (Act::None, true)]
            {
                let opts = GemmOpts {
                    bias_n: Some(&bias),
                    precision,
                    act,
                    accumulate,
                    ..Default::default()
                };
                let am = MatRef::row_major(&a, m, k);
                let mut want = start.clone();
                gemm(am, bm, &mut want, n, &opts).unwrap();
                let mut got = start.clone();
                gemm_packed_b(am, &pb, &mut got, n, &opts).unwrap();
                assert_eq!(got, want, "{m}×{k}×{n} {precision:?} {act:?} {accumulate}");
            }
            // Wrong precision, inner dimension or C: errors, C untouched.
            let other = match precision {
                Precision::F32 => Precision::Bf16,
                Precision::Bf16 => Precision::F32,
            };
            let opts = GemmOpts {
                precision: other,
                ..Default::default()
            };
            let mut c = vec![7f32; m * n];
            let am = MatRef::row_major(&a, m, k);
            assert!(gemm_packed_b(am, &pb, &mut c, n, &opts).is_err());
            let opts = GemmOpts {
                precision,
                ..Default::default()
            };
            if k > 1 {
                let narrow = MatRef::row_major(&a, m, k - 1);
                assert!(gemm_packed_b(narrow, &pb, &mut c, n, &opts).is_err());
            }
            assert!(gemm_packed_b(am, &pb, &mut c[..m * n - 1], n, &opts).is_err());
            assert!(c.iter().all(|&x| x == 7.0));
        }
    }
}
