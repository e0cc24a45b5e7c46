use super::*;
use crate::gemm::{Act, Precision};
use half::bf16;

/// Deterministic weights in roughly [-1, 1] with some larger outliers per row.
fn weights(n: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n * k)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 33) as f64 / (1u64 << 31) as f64) as f32 * 2.0 - 1.0;
            if i % 61 == 0 {
                u * 4.0
            } else {
                u
            }
        })
        .collect()
}

/// `x·wᵀ` in f64 from the dequantized weight and the 8-bit activation blocks: what the
/// integer dots compute exactly, up to f32 rounding.
fn reference(x: &[f32], m: usize, w: &QuantWeight, bias: Option<&[f32]>) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let mut wd = vec![0f32; n * k];
    w.dequantize_rows(0, n, &mut wd);
    let xq = QRows::new(x, m, k);
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        let row = xq.row(r);
        for j in 0..n {
            let mut acc = 0f64;
            for i in 0..k {
                acc += wd[j * k + i] as f64 * (row.q[i] as f64 * row.d[i / QK] as f64);
            }
            out[r * n + j] = acc as f32 + bias.map_or(0.0, |b| b[j]);
        }
    }
    out
}

fn close(a: &[f32], b: &[f32], rel: f32) {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= rel * scale,
            "element {i}: {x} vs {y} (scale {scale})"
        );
    }
}

const FORMATS: [QFormat; 2] = [QFormat::Q8_0, QFormat::Q4_1];

#[test]
fn dequantized_weights_are_within_half_a_step() {
    let (n, k) = (8, 176); // k not a multiple of 32: the last block is padded
    let w = weights(n, k, 1);
    for f in FORMATS {
        let q = QuantWeight::quantize(Weights::F32(&w), n, k, f);
        assert_eq!(q.len_bytes(), n * 6 * f.block_bytes());
        let mut d = vec![0f32; n * k];
        q.dequantize_rows(0, n, &mut d);
        for j in 0..n {
            for b in 0..k.div_ceil(QK) {
                let blk = &w[j * k + b * QK..j * k + (b * QK + QK).min(k)];
                let (lo, hi) = blk
                    .iter()
                    .fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
                // One quantization step; the f16 scale adds ~0.05 % of the range.
                let step = match f {
                    QFormat::Q8_0 => hi.max(-lo) / 127.0,
                    QFormat::Q4_1 => (hi - lo) / 15.0,
                };
                for (i, &v) in blk.iter().enumerate() {
                    let e = (d[j * k + b * QK + i] - v).abs();
                    assert!(
                        e <= step * 0.5 + (hi - lo) * 1e-3,
                        "{f:?} row {j} block {b}: {e} > {step}/2"
                    );
                }
            }
        }
    }
}

#[test]
fn the_blocks_are_ggufs_bytes_as_candle_writes_them() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let (n, k) = (6, 128);
    let w = weights(n, k, 2);
    let t = candle_core::Tensor::from_vec(w.clone(), (n, k), &candle_core::Device::Cpu).unwrap();
    for (f, g) in [
        (QFormat::Q8_0, GgmlDType::Q8_0),
        (QFormat::Q4_1, GgmlDType::Q4_1),
    ] {
        let ours = QuantWeight::quantize(Weights::F32(&w), n, k, f);
        let theirs = QTensor::quantize(&t, g).unwrap();
        assert_eq!(ours.gguf_bytes(), &theirs.data().unwrap()[..], "{f:?}");
        // And candle's dequantization of our bytes is ours.
        let back = QTensor::new(
            candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Owned(ours.gguf_bytes()),
                &candle_core::Device::Cpu,
                g,
            )
            .unwrap(),
            (n, k),
        )
        .unwrap()
        .dequantize(&candle_core::Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let mut d = vec![0f32; n * k];
        ours.dequantize_rows(0, n, &mut d);
        assert_eq!(back, d, "{f:?}");
    }
}

#[test]
fn decode_dots_match_the_exact_sum_on_every_path_and_row_count() {
    // 6 blocks (tail only); 14 (AVX2: one group of eight, then the tail; AVX-512: tail
    // only); 37 (two groups of sixteen and a tail of five; four of eight and five). Rows padded.
    for k in [176, 432, 1184] {
        dots_match_at(k);
    }
}

fn dots_match_at(k: usize) {
    let n = 37;
    let w = weights(n, k, 3);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.2).collect();
    for f in FORMATS {
        let q = QuantWeight::quantize(Weights::Bf16(&wb), n, k, f);
        for m in 1..=9 {
            let x = weights(m, k, 10 + m as u64);
            let want = reference(&x, m, &q, Some(&bias));
            for path in super::quant_paths() {
                let mut out = vec![f32::NAN; m * n];
                linear_rows_q_on(path, &x, m, &q, Some(&bias), &mut out);
                close(&out, &want, 1e-5);
            }
        }
    }
}

#[test]
fn decode_products_are_close_to_the_unquantized_ones() {
    // What quantization costs on dots of 2048 (weights and activations both rounded): the
    // error's RMS relative to the output's RMS.
    let (n, k, m) = (256, 2048, 2);
    let w = weights(n, k, 4);
    let x = weights(m, k, 5);
    let mut exact = vec![0f32; m * n];
    crate::linear_rows_scalar(&x, m, k, Weights::F32(&w), n, None, &mut exact);
    let rms = |v: &mut dyn Iterator<Item = f32>| {
        let (s, c) = v.fold((0f64, 0usize), |(s, c), e| (s + (e as f64).powi(2), c + 1));
        (s / c as f64).sqrt()
    };
    let scale = rms(&mut exact.iter().copied());
    for (f, tol) in [(QFormat::Q8_0, 0.015), (QFormat::Q4_1, 0.12)] {
        let q = QuantWeight::quantize(Weights::F32(&w), n, k, f);
        let mut out = vec![0f32; m * n];
        linear_rows_q(&x, m, &q, None, &mut out);
        let err = rms(&mut out.iter().zip(&exact).map(|(a, b)| a - b)) / scale;
        eprintln!("{f:?}: relative RMS error {err:.5}");
        assert!(err < tol, "{f:?}: relative RMS error {err}");
    }
}

#[test]
fn large_m_products_multiply_the_dequantized_weight() {
    let (m, n, k) = (40, 70, 96);
    let w = weights(n, k, 6);
    let a = weights(m, k, 7);
    let bias: Vec<f32> = (0..n).map(|j| (j % 5) as f32).collect();
    for f in FORMATS {
        let q = QuantWeight::quantize(Weights::F32(&w), n, k, f);
        let mut wd = vec![0f32; n * k];
        q.dequantize_rows(0, n, &mut wd);
        for precision in [Precision::F32, Precision::Bf16] {
            let ldc = n + 3;
            let mut want = vec![1f32; m * ldc];
            let mut got = want.clone();
            let opts = GemmOpts {
                bias_n: Some(&bias),
                act: Act::None,
                precision,
                accumulate: true,
                ..Default::default()
            };
            let am = MatRef::row_major(&a, m, k);
            gemm::gemm(
                am,
                BRef::F32(MatRef::transposed(&wd, k, n)),
                &mut want,
                ldc,
                &opts,
            )
            .unwrap();
            gemm_q(am, &q, &mut got, ldc, &opts).unwrap();
            assert_eq!(got, want, "{f:?} {precision:?}");
        }
    }
}

#[test]
fn large_m_products_cover_every_dequantized_slice() {
    // More output features than one transient slice holds at this k.
    let k = 64;
    let n = DEQUANT_CHUNK_BYTES / (4 * k) + 100;
    let m = 3;
    let w = weights(n, k, 8);
    let a = weights(m, k, 9);
    let q = QuantWeight::quantize(Weights::F32(&w), n, k, QFormat::Q8_0);
    let mut wd = vec![0f32; n * k];
    q.dequantize_rows(0, n, &mut wd);
    let opts = GemmOpts::default();
    let am = MatRef::row_major(&a, m, k);
    let mut want = vec![0f32; m * n];
    let mut got = vec![0f32; m * n];
    gemm::gemm(
        am,
        BRef::F32(MatRef::transposed(&wd, k, n)),
        &mut want,
        n,
        &opts,
    )
    .unwrap();
    gemm_q(am, &q, &mut got, n, &opts).unwrap();
    assert_eq!(got, want);
}

#[test]
fn stacking_and_bytes_round_trip() {
    let k = 64;
    let parts: Vec<QuantWeight> = (0..3)
        .map(|i| {
            QuantWeight::quantize(
                Weights::F32(&weights(5 + i, k, 20 + i as u64)),
                5 + i,
                k,
                QFormat::Q4_1,
            )
        })
        .collect();
    let s = QuantWeight::stack(&parts).unwrap();
    assert_eq!((s.rows(), s.cols()), (18, k));
    let mut d = vec![0f32; 18 * k];
    s.dequantize_rows(0, 18, &mut d);
    let mut p1 = vec![0f32; 6 * k];
    parts[1].dequantize_rows(0, 6, &mut p1);
    assert_eq!(&d[5 * k..11 * k], &p1[..]);
    let back = QuantWeight::from_gguf_bytes(QFormat::Q4_1, 18, k, &s.gguf_bytes()).unwrap();
    assert_eq!(back.gguf_bytes(), s.gguf_bytes());
    let mut d2 = vec![0f32; 18 * k];
    back.dequantize_rows(0, 18, &mut d2);
    assert_eq!(d2, d);
    assert!(QuantWeight::from_gguf_bytes(QFormat::Q4_1, 19, k, &s.gguf_bytes()).is_none());
    let q8 = QuantWeight::quantize(Weights::F32(&weights(2, k, 1)), 2, k, QFormat::Q8_0);
    assert!(QuantWeight::stack(&[s, q8]).is_none(), "formats differ");
    assert_eq!(QFormat::from_name("q8_0"), Some(QFormat::Q8_0));
    assert_eq!(QFormat::from_name("q5"), None);
}

#[test]
fn activation_blocks_are_within_half_a_step_and_keep_their_sums() {
    // Three whole blocks and a short one, two rows.
    let (m, k) = (2, 100);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
        .collect();
    let xq = QRows::new(&x, m, k);
    for r in 0..m {
        let row = xq.row(r);
        for b in 0..k.div_ceil(QK) {
            let (d, q) = (row.d[b], &row.q[b * QK..(b + 1) * QK]);
            for (i, &qi) in q.iter().enumerate() {
                let xi = if b * QK + i < k {
                    x[r * k + b * QK + i]
                } else {
                    0.0
                };
                assert!(
                    (qi as f32 * d - xi).abs() <= d / 2.0 * 1.0001,
                    "row {r} block {b} value {i}"
                );
            }
            assert!(
                q.iter().any(|&v| v.unsigned_abs() == 127),
                "the largest maps to ±127"
            );
            let sum: i32 = q.iter().map(|&v| v as i32).sum();
            assert_eq!(row.s[b], d * sum as f32);
        }
    }
    // d = 1: halves round to the even neighbour.
    let t = QRows::new(&[127.0, 2.5, -0.5, 1.5, 3.5, -2.5], 1, 6);
    assert_eq!(t.row(0).d[0], 1.0);
    assert_eq!(&t.row(0).q[..6], &[127, 2, 0, 2, 4, -2]);
}
