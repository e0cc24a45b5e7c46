//! `Linear` on the CPU's large-M GEMM path (more than `SMALL_M` rows): plain, fused GELU and
//! fused residual forms against candle's own ops, for f32 and bf16 weights, and the bf16
//! activation path against f32.

use candle_core::{DType, Device, Module, Tensor};
use janus_llm::linear::SMALL_M;
use janus_llm::Linear;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Shapes `(rows, k, n)` past the few-row path, an input `[1, rows, k]`, a bias `[n]` and a
/// residual `[1, rows, n]`.
fn inputs() -> ((usize, usize, usize), Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let (rows, k, n) = (SMALL_M + 9, 70, 45);
    let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.5, n, &dev).unwrap();
    let res = Tensor::randn(0f32, 1.0, (1, rows, n), &dev).unwrap();
    ((rows, k, n), x, b, res)
}

#[test]
fn large_m_forms_match_candle() {
    let dev = Device::Cpu;
    let ((rows, k, n), x, b, res) = inputs();
    for wdt in [DType::F32, DType::BF16] {
        let w = Tensor::randn(0f32, 0.2, (n, k), &dev)
            .unwrap()
            .to_dtype(wdt)
            .unwrap();
        let lin = Linear::new(w.clone(), Some(b.clone()));
        let want = x
            .broadcast_matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let got = lin.forward(&x).unwrap();
        assert_eq!(got.dims(), &[1, rows, n]);
        assert!(max_diff(&got, &want) < 1e-4, "{wdt:?} plain");
        let g = lin.forward_gelu(&x).unwrap();
        assert!(
            max_diff(&g, &want.gelu_erf().unwrap()) < 1e-4,
            "{wdt:?} gelu"
        );
        let r = lin.forward_residual(&x, &res).unwrap();
        assert!(
            max_diff(&r, &(&res + &want).unwrap()) < 1e-4,
            "{wdt:?} residual"
        );
        // bf16 activations: bf16 products, f32 accumulation, bf16 out.
        let y16 = lin.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(y16.dtype(), DType::BF16);
        assert!(max_diff(&y16, &want) < 0.1, "{wdt:?} bf16 activations");
        // bf16 products with f32 activations.
        let l16 = Linear::new(w, Some(b.clone())).with_bf16_products(true);
        let y = l16.forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        assert!(max_diff(&y, &want) < 0.05, "{wdt:?} bf16 products");
    }
    // A residual of the wrong size falls back to candle's add and its shape error.
    let lin = Linear::new(Tensor::zeros((n, k), DType::F32, &dev).unwrap(), None);
    let bad = Tensor::zeros((1, rows, n + 1), DType::F32, &dev).unwrap();
    assert!(lin.forward_residual(&x, &bad).is_err());
}

/// A prepacked layer (the vision tower's) gives, bit for bit, the large-M products of the same
/// layer unpacked, in f32 and with bf16 products, from f32 or bf16 weights; few-row and empty
/// inputs still work (through the GEMM); it cannot be fused any more.
#[test]
fn prepacked_layer_matches_unpacked() {
    let dev = Device::Cpu;
    let ((_, k, n), x, b, res) = inputs();
    for wdt in [DType::F32, DType::BF16] {
        let w = Tensor::randn(0f32, 0.2, (n, k), &dev)
            .unwrap()
            .to_dtype(wdt)
            .unwrap();
        for bf16_products in [false, true] {
            let plain = Linear::new(w.clone(), Some(b.clone())).with_bf16_products(bf16_products);
            let packed = plain.clone().prepack().unwrap();
            assert_eq!((packed.in_dim(), packed.out_dim()), (k, n));
            let same = |a: Tensor, b: Tensor, what: &str| {
                assert_eq!(a.dims(), b.dims(), "{what}");
                assert_eq!(max_diff(&a, &b), 0.0, "{wdt:?} {bf16_products} {what}");
            };
            same(
                packed.forward(&x).unwrap(),
                plain.forward(&x).unwrap(),
                "plain",
            );
            same(
                packed.forward_gelu(&x).unwrap(),
                plain.forward_gelu(&x).unwrap(),
                "gelu",
            );
            same(
                packed.forward_residual(&x, &res).unwrap(),
                plain.forward_residual(&x, &res).unwrap(),
                "residual",
            );
            // Few rows: the packed layer multiplies on the GEMM, the plain one on the few-row
            // kernel (f32 products); equal within the products' rounding.
            let few = x.narrow(1, 0, 3).unwrap();
            let tol = if bf16_products { 0.05 } else { 1e-4 };
            let d = max_diff(
                &packed.forward(&few).unwrap(),
                &plain.forward(&few).unwrap(),
            );
            assert!(d < tol, "{wdt:?} {bf16_products} few rows: {d}");
            let none = x.narrow(1, 0, 0).unwrap();
            assert_eq!(packed.forward(&none).unwrap().dims(), &[1, 0, n]);
            let wide = Tensor::zeros((1, 2, k + 1), DType::F32, &dev).unwrap();
            assert!(packed.forward(&wide).is_err());
            assert!(Linear::fuse([packed.clone(), packed]).is_err());
        }
    }
}

/// `fuse_prepacked` (packed straight from the parts when their widths stack, through `fuse` +
/// `prepack_if_no_larger` otherwise) multiplies exactly as the fused, prepacked layer, for f32
/// and bf16 weights, with and without bf16 products, at many rows and at decode's one row; and
/// it packs only when that takes no more memory (bf16 weights, f32 products: not packed,
/// still equal).
#[test]
fn fuse_prepacked_equals_fuse_then_prepack() {
    let dev = Device::Cpu;
    let k = 70;
    let x = Tensor::randn(0f32, 1.0, (1, SMALL_M + 9, k), &dev).unwrap();
    let one = x.narrow(1, 0, 1).unwrap();
    // Stackable widths (multiples of 32 but the last), and widths that are not.
    for widths in [&[64usize, 32, 45][..], &[45, 32][..]] {
        for wdt in [DType::F32, DType::BF16] {
            let parts: Vec<Linear> = widths
                .iter()
                .map(|&n| {
                    let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap();
                    let b = Tensor::randn(0f32, 0.5, n, &dev).unwrap();
                    Linear::new(w.to_dtype(wdt).unwrap(), Some(b))
                })
                .collect();
            for bf16_products in [false, true] {
                let (direct, reference) = match parts.as_slice() {
                    [a, b, c] => (
                        Linear::fuse_prepacked([a.clone(), b.clone(), c.clone()], bf16_products),
                        Linear::fuse([a.clone(), b.clone(), c.clone()]),
                    ),
                    [a, b] => (
                        Linear::fuse_prepacked([a.clone(), b.clone()], bf16_products),
                        Linear::fuse([a.clone(), b.clone()]),
                    ),
                    _ => unreachable!(),
                };
                let direct = direct.unwrap();
                let reference = reference
                    .unwrap()
                    .with_bf16_products(bf16_products)
                    .prepack_if_no_larger()
                    .unwrap();
                let what = format!("{widths:?} {wdt:?} bf16 products {bf16_products}");
                assert_eq!(direct.out_dim(), widths.iter().sum::<usize>(), "{what}");
                assert_eq!(direct.in_dim(), k, "{what}");
                for input in [&x, &one] {
                    let d = max_diff(
                        &direct.forward(input).unwrap(),
                        &reference.forward(input).unwrap(),
                    );
                    assert_eq!(d, 0.0, "{what}, {:?}", input.dims());
                }
            }
        }
    }
}

/// A quantized layer used as an embedding table gathers the dequantized rows, and an id past
/// the table is an error naming it (not a panic).
#[test]
fn quantized_rows_gather_and_refuse_ids_past_the_table() {
    use janus_llm::QFormat;
    let (rows, width) = (10, 64);
    let w: Vec<f32> = (0..rows * width)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.05)
        .collect();
    let dense = Linear::new(
        Tensor::from_vec(w, (rows, width), &Device::Cpu).unwrap(),
        None,
    );
    let q = dense.clone().quantize(QFormat::Q8_0).unwrap();
    let got = q.gather_rows(&[3, 0, 9], DType::F32).unwrap();
    let want = dense.gather_rows(&[3, 0, 9], DType::F32).unwrap();
    assert_eq!(got.dims(), &[3, width]);
    let diff = max_diff(&got, &want);
    assert!(
        diff <= 0.4 / 127.0 + 1e-6,
        "within half a step of the row's largest weight: {diff}"
    );
    let e = q.gather_rows(&[10], DType::F32).unwrap_err().to_string();
    assert!(e.contains("token id 10") && e.contains("10 rows"), "{e}");
}

/// A quantized layer's two CPU paths (integer dots for few rows, the dequantizing GEMM for
/// many) compute the same product within the activations' 8-bit rounding, with bias, GELU and
/// a residual, for both formats.
#[test]
fn quantized_layers_agree_across_row_counts() {
    use janus_llm::QFormat;
    let (out, inp) = (48, 96);
    let w: Vec<f32> = (0..out * inp)
        .map(|i| (((i * 37) % 101) as f32 - 50.0) * 0.01)
        .collect();
    let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.01).collect();
    let layer = Linear::new(
        Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap(),
        Some(Tensor::from_vec(b, out, &Device::Cpu).unwrap()),
    );
    let rows = SMALL_M + 8;
    let x: Vec<f32> = (0..rows * inp)
        .map(|i| ((i % 23) as f32 - 11.0) * 0.1)
        .collect();
    let x = Tensor::from_vec(x, (rows, inp), &Device::Cpu).unwrap();
    let res = Tensor::ones((rows, out), DType::F32, &Device::Cpu).unwrap();
    for f in [QFormat::Q8_0, QFormat::Q4_1] {
        let q = layer.clone().quantize(f).unwrap();
        for (name, all, few) in [
            (
                "plain",
                q.forward(&x).unwrap(),
                q.forward(&x.narrow(0, 0, 2).unwrap()).unwrap(),
            ),
            (
                "gelu",
                q.forward_gelu(&x).unwrap(),
                q.forward_gelu(&x.narrow(0, 0, 2).unwrap()).unwrap(),
            ),
            (
                "residual",
                q.forward_residual(&x, &res).unwrap(),
                q.forward_residual(&x.narrow(0, 0, 2).unwrap(), &res.narrow(0, 0, 2).unwrap())
                    .unwrap(),
            ),
        ] {
            let head = all.narrow(0, 0, 2).unwrap();
            let scale = max_diff(&head, &head.zeros_like().unwrap());
            let diff = max_diff(&head, &few);
            assert!(diff <= 0.02 * scale, "{f:?} {name}: {diff} of {scale}");
        }
    }
}
