//! Times the quantized decode products (`quant::linear_rows_q`, Q8_0 and Q4_1) against
//! `linear_rows` on bf16 weights (each SIMD path of ours this CPU runs) and candle's CPU `QMatMul` on the same GGUF block types, at
//! the Janus-Pro-1B decode shapes; one JSON line per case.
//!
//! Run: `cargo run --release -p janus-kernels --example bench_qmatmul`
//! (BENCH_RUNS samples, BENCH_M=1,2 row counts, BENCH_N=102400 one shape).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::bf16;
use janus_kernels::gemm::{gemm_packed_b, BRef, GemmOpts, MatRef, PackedB, Precision};
use janus_kernels::quant::{linear_rows_q_on, quant_paths, QFormat, QuantWeight};
use janus_kernels::{linear_rows, Weights};
use std::time::Instant;

mod common;
use common::median;

fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> candle_core::Result<()> {
    let runs = common::env_usize("BENCH_RUNS").unwrap_or(20);
    let ms = common::env_list("BENCH_M", &[1, 2, 16]);
    let shapes = [
        (6144usize, 2048usize),
        (11264, 2048),
        (2048, 5632),
        (102400, 2048),
        (16384, 2048),
    ];
    // BENCH_PREFILL=128: large-M products (the GEMM on bf16 weights against the dequantizing
    // GEMM on blocks) at that many rows, instead of the decode products.
    if let Some(m) = common::env_usize("BENCH_PREFILL") {
        use janus_kernels::gemm::gemm;
        use janus_kernels::quant::gemm_q;
        for &(n, k) in &shapes[..3] {
            let w32: Vec<f32> = (0..n * k)
                .map(|i| (((i * 7919) % 997) as f32 - 498.0) * 1e-4)
                .collect();
            let wbf: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
            let mut out = vec![0f32; m * n];
            let opts = GemmOpts::default();
            let a = MatRef::row_major(&x, m, k);
            let s = time(runs, || {
                gemm(
                    a,
                    BRef::Bf16(MatRef::transposed(&wbf, k, n)),
                    &mut out,
                    n,
                    &opts,
                )
                .unwrap()
            });
            println!("{{\"m\":{m},\"n\":{n},\"k\":{k},\"kind\":\"bf16 gemm\",\"ms\":{:.3},\"gflops\":{:.1}}}", s * 1e3, 2.0 * (m * n * k) as f64 / s / 1e9);
            for f in [QFormat::Q8_0, QFormat::Q4_1] {
                let q = QuantWeight::quantize(Weights::Bf16(&wbf), n, k, f);
                let s = time(runs, || gemm_q(a, &q, &mut out, n, &opts).unwrap());
                println!("{{\"m\":{m},\"n\":{n},\"k\":{k},\"kind\":\"{} gemm_q\",\"ms\":{:.3},\"gflops\":{:.1}}}", f.name(), s * 1e3, 2.0 * (m * n * k) as f64 / s / 1e9);
            }
        }
        return Ok(());
    }
    // BENCH_N=102400: only the shapes with that many output features (the lm_head shape is
    // the one too large for the last-level cache, so it measures DRAM streaming).
    let only_n = common::env_usize("BENCH_N");
    for &(n, k) in shapes.iter().filter(|s| only_n.is_none_or(|o| o == s.0)) {
        let w32: Vec<f32> = (0..n * k)
            .map(|i| (((i * 7919) % 997) as f32 - 498.0) * 1e-4)
            .collect();
        let wbf: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let bf16_opts = GemmOpts {
            precision: Precision::Bf16,
            ..Default::default()
        };
        let packed =
            PackedB::new(BRef::Bf16(MatRef::transposed(&wbf, k, n)), Precision::Bf16).unwrap();
        let wt = Tensor::from_vec(w32, (n, k), &Device::Cpu)?;
        let mut qs = Vec::new();
        let ours: Vec<QuantWeight> = [QFormat::Q8_0, QFormat::Q4_1]
            .into_iter()
            .map(|f| QuantWeight::quantize(Weights::Bf16(&wbf), n, k, f))
            .collect();
        for dt in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4K] {
            let q = QTensor::quantize(&wt, dt)?;
            let bytes = q.storage_size_in_bytes();
            qs.push((format!("{dt:?}"), QMatMul::from_qtensor(q)?, bytes));
        }
        drop(wt);
        for &m in &ms {
            let xv: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
            let mut out = vec![0f32; m * n];
            let s = time(runs, || {
                linear_rows(&xv, m, k, Weights::Bf16(&wbf), n, None, &mut out)
            });
            println!("{{\"m\":{m},\"n\":{n},\"k\":{k},\"kind\":\"bf16 linear_rows\",\"ms\":{:.3},\"weight_gbps\":{:.1}}}", s * 1e3, (n * k * 2) as f64 / s / 1e9);
            // What a bf16-compute decode step runs: the weight prepacked as bf16 pairs.
            let s = time(runs, || {
                gemm_packed_b(
                    MatRef::row_major(&xv, m, k),
                    &packed,
                    &mut out,
                    n,
                    &bf16_opts,
                )
                .unwrap()
            });
            println!("{{\"m\":{m},\"n\":{n},\"k\":{k},\"kind\":\"bf16 prepacked gemm\",\"ms\":{:.3},\"weight_gbps\":{:.1}}}", s * 1e3, packed.bytes() as f64 / s / 1e9);
            for q in &ours {
                for path in quant_paths().into_iter().filter(|p| *p != "scalar") {
                    let s = time(runs, || linear_rows_q_on(path, &xv, m, q, None, &mut out));
                    println!("{{\"m\":{m},\"n\":{n},\"k\":{k},\"kind\":\"ours {} {path}\",\"ms\":{:.3},\"weight_gbps\":{:.1}}}", q.format().name(), s * 1e3, q.len_bytes() as f64 / s / 1e9);
                }
            }
            let x = Tensor::from_vec(xv.clone(), (m, k), &Device::Cpu)?;
            for (name, q, bytes) in &qs {
                let s = time(runs, || {
                    std::hint::black_box(q.forward(&x).unwrap());
                });
                println!("{{\"m\":{m},\"n\":{n},\"k\":{k},\"kind\":\"candle {name}\",\"ms\":{:.3},\"weight_gbps\":{:.1}}}", s * 1e3, *bytes as f64 / s / 1e9);
            }
        }
    }
    Ok(())
}
