//! Scaled-dot-product attention: `janus_kernels::attention` on the CPU (heads in parallel,
//! f32 or bf16 KV-cache views read in place), candle ops elsewhere.

use candle_core::{DType, Device, Result, Tensor};

fn cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// The f32 data of a CPU storage from the layout's start offset.
pub(crate) fn cpu_slice<'a>(
    s: &'a candle_core::Storage,
    l: &candle_core::Layout,
) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(s) => Ok(&s.as_slice::<f32>()?[l.start_offset()..]),
        _ => candle_core::bail!("CPU storage expected"),
    }
}

/// The f32 or bf16 data of a CPU storage from the layout's start offset, as keys or values.
fn cpu_kv<'a>(
    s: &'a candle_core::Storage,
    l: &candle_core::Layout,
) -> Result<janus_kernels::attention::Kv<'a>> {
    use janus_kernels::attention::Kv;
    match s {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(x)) => {
            Ok(Kv::F32(&x[l.start_offset()..]))
        }
        candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(x)) => {
            Ok(Kv::Bf16(&x[l.start_offset()..]))
        }
        _ => candle_core::bail!("CPU f32 or bf16 storage expected"),
    }
}

/// `softmax(q kᵀ · scale + mask) v` for `q` `[b, h, sq, d]`, `k`/`v` `[b, h, sk, d]` (views of a
/// larger cache along `sk` allowed), `mask` additive `[b, 1, sq, sk]`. Returns `[b, h, sq, d]`
/// in q's dtype. On the CPU, f32 queries may attend over a bf16 cache (bf16 products).
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, sq, d) = q.dims4()?;
    let sk = k.dim(2)?;
    let kv_stride = |t: &Tensor| {
        let s = t.stride();
        (s[3] == 1 && s[2] == d && s[0] == h * s[1] && t.dim(0).ok() == Some(b)).then_some(s[1])
    };
    // The CPU kernel: f32, or bf16 anywhere (a bf16 KV cache read in place; q, the scores and
    // the softmax in f32, both products rounded to bf16 with f32 accumulation, as bf16
    // products are on other devices).
    let dt = q.dtype();
    let on_cpu = |t: &Tensor| matches!(t.device(), Device::Cpu);
    let fast = matches!(dt, DType::F32 | DType::BF16)
        && matches!(k.dtype(), DType::F32 | DType::BF16)
        && v.dtype() == k.dtype()
        && on_cpu(q)
        && on_cpu(k)
        && on_cpu(v)
        && mask.is_none_or(on_cpu);
    if let (true, Some(ks), Some(vs)) = (fast, kv_stride(k), kv_stride(v)) {
        if ks == vs {
            let q = q.to_dtype(DType::F32)?.contiguous()?;
            let mask = mask
                .map(|m| m.to_dtype(DType::F32)?.contiguous())
                .transpose()?;
            let mut shape = janus_kernels::attention::AttnShape::packed(b * h, sq, sk, d, ks, h);
            if dt == DType::BF16 || k.dtype() == DType::BF16 {
                shape.precision = janus_kernels::gemm::Precision::Bf16;
            }
            let mut out = vec![0f32; b * h * sq * d];
            let (qg, ql) = q.storage_and_layout();
            let (kg, kl) = k.storage_and_layout();
            let (vg, vl) = v.storage_and_layout();
            let mg = mask.as_ref().map(|m| m.storage_and_layout());
            let md = match &mg {
                Some((g, l)) => Some(&cpu_slice(g, l)?[..b * sq * sk]),
                None => None,
            };
            janus_kernels::attention::attention(
                &cpu_slice(&qg, ql)?[..b * h * sq * d],
                cpu_kv(&kg, kl)?,
                cpu_kv(&vg, vl)?,
                shape,
                scale as f32,
                md,
                &mut out,
            );
            return Tensor::from_vec(out, (b, h, sq, d), q.device())?.to_dtype(dt);
        }
    }
    sdpa_generic(q, k, v, scale, mask)
}

/// [`sdpa`] in candle ops (CUDA, or the CPU in another dtype).
fn sdpa_generic(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dt = q.dtype();
    // Both products in the compute dtype, read straight from the cache views (cuBLAS
    // accumulates bf16 products in f32), so no step copies or widens the keys and values;
    // scale, mask and softmax in f32 on the small score matrix, as the reference's eager
    // attention upcasts its softmax.
    let mut att = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
    if let Some(mask) = mask {
        att = att.broadcast_add(&mask.to_dtype(DType::F32)?)?;
    }
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    att.to_dtype(dt)?.matmul(v)
}

/// Self-attention over a fused product `qkv` `[b, n, 3 · heads · d]` (rows `[q | k | v]`, each
/// head's `d` values consecutive), no mask: returns `[b, n, heads · d]`, heads side by side as
/// the output projection reads them.
///
/// On the CPU in f32 the kernel reads q, k and v in place and writes each head's slot of the
/// output rows, so no transposed copy is made; `bf16_products` then rounds the operands of
/// both products to bf16 (f32 accumulation and softmax). Elsewhere the thirds are split and
/// transposed for [`sdpa`], in the tensors' dtype.
pub fn fused_qkv_attention(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    bf16_products: bool,
) -> Result<Tensor> {
    let (b, n, w3) = qkv.dims3()?;
    if heads == 0 || w3 % (3 * heads) != 0 {
        candle_core::bail!("fused qkv width {w3} is not 3 × {heads} heads");
    }
    let w = w3 / 3;
    let d = w / heads;
    if cpu_f32(qkv) {
        let qkv = qkv.contiguous()?;
        let (g, l) = qkv.storage_and_layout();
        let data = &cpu_slice(&g, l)?[..b * n * w3];
        let mut out = vec![0f32; b * n * w];
        let strides = |row| janus_kernels::attention::Strides { head: d, row };
        let shape = janus_kernels::attention::AttnShape {
            heads,
            q_len: n,
            kv_len: n,
            dim: d,
            heads_per_mask: heads,
            q: strides(w3),
            kv: strides(w3),
            out: strides(w),
            precision: janus_kernels::gemm::Precision::bf16_if(bf16_products),
        };
        for (x, o) in data.chunks(n * w3).zip(out.chunks_mut(n * w)) {
            janus_kernels::attention::attention(
                x,
                janus_kernels::attention::Kv::F32(&x[w..]),
                janus_kernels::attention::Kv::F32(&x[2 * w..]),
                shape,
                scale as f32,
                None,
                o,
            );
        }
        return Tensor::from_vec(out, (b, n, w), qkv.device());
    }
    let qkv = qkv.reshape((b, n, 3, heads, d))?;
    let part = |i| {
        qkv.narrow(2, i, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()
    };
    let y = sdpa(&part(0)?, &part(1)?, &part(2)?, scale, None)?;
    y.transpose(1, 2)?.reshape((b, n, w))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Random `q` `[b, h, sq, d]` and views `[b, h, sk, d]` into random caches of `cap` slots.
    fn qkv_views(
        (b, h, sq, d): (usize, usize, usize, usize),
        sk: usize,
        cap: usize,
    ) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (b, h, sq, d), &dev).unwrap();
        let kc = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let vc = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let (k, v) = (kc.narrow(2, 0, sk).unwrap(), vc.narrow(2, 0, sk).unwrap());
        (q, k, v, kc, vc)
    }

    /// Largest absolute difference of two tensors (compared in f32).
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The CPU kernel reading a fused qkv product in place equals splitting it and running
    /// candle's ops (f32), and the bf16 variant stays within bf16 rounding of it; the generic
    /// path (bf16 tensors) returns the same layout.
    #[test]
    fn fused_qkv_attention_matches_split_heads() {
        let (b, n, heads, d) = (2, 9, 4, 8);
        let qkv = Tensor::randn(0f32, 1.0, (b, n, 3 * heads * d), &Device::Cpu).unwrap();
        let parts = qkv.reshape((b, n, 3, heads, d)).unwrap();
        let part = |i| {
            parts
                .narrow(2, i, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let att = (q.matmul(&k.t().unwrap()).unwrap() * 0.35).unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
        let want = att
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, n, heads * d))
            .unwrap();
        let f32_out = fused_qkv_attention(&qkv, heads, 0.35, false).unwrap();
        assert!(max_abs_diff(&f32_out, &want) < 1e-5);
        let bf16_out = fused_qkv_attention(&qkv, heads, 0.35, true).unwrap();
        let e = max_abs_diff(&bf16_out, &want);
        assert!(e > 0.0 && e < 0.05, "bf16 products: {e}");
        let generic =
            fused_qkv_attention(&qkv.to_dtype(DType::BF16).unwrap(), heads, 0.35, false).unwrap();
        assert_eq!(generic.dims(), &[b, n, heads * d]);
        assert!(max_abs_diff(&generic, &want) < 0.05);
        assert!(fused_qkv_attention(&qkv, 5, 0.35, false).is_err());
    }

    #[test]
    fn fast_path_equals_generic_on_cache_views() {
        let dev = Device::Cpu;
        let (q, k, v, _, _) = qkv_views((2, 3, 4, 8), 6, 10);
        let mask = Tensor::from_vec(
            (0..2 * 4 * 6)
                .map(|i| if i % 5 == 0 { -1e30f32 } else { 0.0 })
                .collect::<Vec<_>>(),
            (2, 1, 4, 6),
            &dev,
        )
        .unwrap();
        let fast = sdpa(&q, &k, &v, 0.3, Some(&mask)).unwrap();
        let att = (q.matmul(&k.t().unwrap()).unwrap() * 0.3)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&att)
            .unwrap()
            .matmul(&v)
            .unwrap();
        let d = max_abs_diff(&fast, &want);
        assert!(d < 1e-5, "{d}");
    }

    /// bf16 on cache views, on the CPU kernel and on the generic path (the one CUDA takes):
    /// products in bf16 read in place, softmax in f32; within bf16 rounding of the f32 result.
    #[test]
    fn bf16_on_cache_views_matches_f32() {
        let dev = Device::Cpu;
        let (q, k, v, kc, vc) = qkv_views((1, 4, 5, 16), 7, 12);
        let mut m = vec![0f32; 5 * 7];
        for i in 0..5 {
            for j in 3 + i..7 {
                m[i * 7 + j] = -1e30;
            }
        }
        let mask = Tensor::from_vec(m, (1, 1, 5, 7), &dev).unwrap();
        let want = sdpa(&q, &k, &v, 0.25, Some(&mask)).unwrap();
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let (kb, vb) = (
            bf(&kc).narrow(2, 0, 7).unwrap(),
            bf(&vc).narrow(2, 0, 7).unwrap(),
        );
        assert!(!kb.is_contiguous(), "a cache view, not a copy");
        let kernel = sdpa(&bf(&q), &kb, &vb, 0.25, Some(&mask)).unwrap();
        let generic = sdpa_generic(&bf(&q), &kb, &vb, 0.25, Some(&mask)).unwrap();
        // f32 queries over the bf16 cache (the CPU's bf16 compute): f32 out, bf16 products.
        let mixed = sdpa(&q, &kb, &vb, 0.25, Some(&mask)).unwrap();
        assert_eq!(mixed.dtype(), DType::F32);
        let d = max_abs_diff(&mixed, &want);
        assert!(d > 0.0 && d < 0.05, "f32 q over a bf16 cache off by {d}");
        for (path, got) in [("kernel", kernel), ("generic", generic)] {
            assert_eq!(got.dtype(), DType::BF16, "{path}");
            let d = max_abs_diff(&got, &want);
            assert!(d < 0.05, "bf16 attention ({path}) off by {d}");
        }
    }
}
