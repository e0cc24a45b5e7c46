//! Scaled-dot-product attention: `janus_kernels::attention` on the CPU (heads in parallel,
//! KV-cache views read in place), candle ops elsewhere.

use candle_core::{DType, Device, Result, Tensor};

fn cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// The f32 data of a CPU storage from the layout's start offset.
fn cpu_slice<'a>(s: &'a candle_core::Storage, l: &candle_core::Layout) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(s) => Ok(&s.as_slice::<f32>()?[l.start_offset()..]),
        _ => candle_core::bail!("CPU storage expected"),
    }
}

/// `softmax(q kᵀ · scale + mask) v` for `q` `[b, h, sq, d]`, `k`/`v` `[b, h, sk, d]` (views of a
/// larger cache along `sk` allowed), `mask` additive `[b, 1, sq, sk]`. Returns `[b, h, sq, d]`.
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
    let fast = cpu_f32(q) && cpu_f32(k) && cpu_f32(v) && mask.is_none_or(cpu_f32);
    if let (true, Some(ks), Some(vs)) = (fast, kv_stride(k), kv_stride(v)) {
        if ks == vs {
            let q = q.contiguous()?;
            let mask = mask.map(|m| m.contiguous()).transpose()?;
            let shape = janus_kernels::attention::AttnShape {
                heads: b * h,
                q_len: sq,
                kv_len: sk,
                dim: d,
                kv_head_stride: ks,
                heads_per_mask: h,
            };
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
                cpu_slice(&kg, kl)?,
                cpu_slice(&vg, vl)?,
                shape,
                scale as f32,
                md,
                &mut out,
            );
            return Tensor::from_vec(out, (b, h, sq, d), q.device());
        }
    }
    // Generic path (CUDA, or CPU in another dtype): both products in the compute dtype, read
    // straight from the cache views (cuBLAS accumulates bf16 products in f32), so no step copies
    // or widens the keys and values; scale, mask and softmax in f32 on the small score matrix,
    // as the reference's eager attention upcasts its softmax.
    let dt = q.dtype();
    let mut att = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
    if let Some(mask) = mask {
        att = att.broadcast_add(&mask.to_dtype(DType::F32)?)?;
    }
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    att.to_dtype(dt)?.matmul(v)
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

    /// The generic path (the one CUDA takes) in bf16 on cache views: products in bf16 read
    /// in place, softmax in f32; within bf16 rounding of the f32 result.
    #[test]
    fn generic_bf16_on_cache_views_matches_f32() {
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
        let got = sdpa(&bf(&q), &kb, &vb, 0.25, Some(&mask)).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let d = max_abs_diff(&got, &want);
        assert!(d < 0.05, "bf16 attention off by {d}");
    }
}
