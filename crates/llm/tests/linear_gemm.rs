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

#[test]
fn large_m_forms_match_candle() {
    let dev = Device::Cpu;
    let (rows, k, n) = (SMALL_M + 9, 70, 45);
    let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.5, n, &dev).unwrap();
    let res = Tensor::randn(0f32, 1.0, (1, rows, n), &dev).unwrap();
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
