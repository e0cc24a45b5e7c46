//! Scratch A/B timing (min of N runs, interleaved) of the large-M pieces: candle's matmul and
//! ops vs the kernels in this tree. `cargo run --release -p janus-vision --example block_prof`
use candle_core::{DType, Device, Module, Tensor};
use janus_llm::Linear;
use std::time::Instant;
fn best(
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    let mut b = f64::MAX;
    for _ in 0..iters {
        let s = Instant::now();
        let _t = f()?;
        b = b.min(s.elapsed().as_secs_f64());
    }
    Ok(b * 1e3)
}
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let iters = 5;
    for &(m, k, n, wdt) in &[
        (576usize, 1024usize, 3072usize, DType::F32),
        (576, 4096, 1024, DType::F32),
        (576, 1024, 4096, DType::BF16),
        (698, 2048, 5632, DType::F32),
        (698, 5632, 2048, DType::BF16),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(wdt)?;
        let b = Tensor::randn(0f32, 0.02, n, &dev)?;
        let lin = Linear::new(w.clone(), Some(b.clone()));
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let xb = x.to_dtype(DType::BF16)?;
        let flops = 2.0 * (m * n * k) as f64 / 1e6;
        let cand = best(iters, || {
            x.matmul(&w.to_dtype(DType::F32)?.t()?)?.broadcast_add(&b)
        })?;
        let ours = best(iters, || lin.forward(&x))?;
        let ours_bf = best(iters, || lin.forward(&xb))?;
        let cand_g = best(iters, || {
            x.matmul(&w.to_dtype(DType::F32)?.t()?)?
                .broadcast_add(&b)?
                .gelu_erf()
        })?;
        let ours_g = best(iters, || lin.forward_gelu(&x))?;
        println!("{m}x{k}x{n} w={wdt:?}: candle {:.1} GF/s | ours f32 {:.1} | ours bf16-act {:.1} | +gelu candle {cand_g:.1} ms ours {ours_g:.1} ms",
            flops / cand, flops / ours, flops / ours_bf);
    }
    // Attention at SigLIP shape: 16 heads × 576 × 64.
    let q = Tensor::randn(0f32, 1.0, (1, 16, 576, 64), &dev)?;
    let kk = Tensor::randn(0f32, 1.0, (1, 16, 576, 64), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (1, 16, 576, 64), &dev)?;
    let a = best(iters, || {
        janus_llm::attention::sdpa(&q, &kk, &v, 0.125, None)
    })?;
    let ac = best(iters, || {
        let att = (q.matmul(&kk.t()?)? * 0.125)?;
        candle_nn::ops::softmax_last_dim(&att)?.matmul(&v)
    })?;
    println!(
        "sdpa 16x576x64: ours {a:.1} ms, candle {ac:.1} ms ({:.1} GF/s ours)",
        16.0 * 4.0 * 576.0 * 576.0 * 64.0 / 1e6 / a
    );
    let x = Tensor::randn(0f32, 1.0, (1, 576, 1024), &dev)?;
    let ln = candle_nn::LayerNorm::new(
        Tensor::ones(1024, DType::F32, &dev)?,
        Tensor::zeros(1024, DType::F32, &dev)?,
        1e-6,
    );
    println!(
        "layernorm candle {:.2} ms; add candle {:.2} ms",
        best(iters, || ln.forward(&x))?,
        best(iters, || &x + &x)?
    );
    Ok(())
}
