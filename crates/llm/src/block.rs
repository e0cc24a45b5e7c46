//! One decoder layer ([`Block`]) and its parts: RMSNorm, attention with the ragged cache
//! (fused q/k/v, rotate-half RoPE, grouped KV heads), the SiLU MLP (fused gate/up).

use crate::config::LlmConfig;
use crate::kv_cache::KvCache;
use crate::{attention, Linear};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use janus_kernels::quant::QFormat;

/// What every layer of one forward shares: the rows' RoPE tables `[batch, n, head_dim / 2]` at
/// their positions and one causal mask per row (`None` for a single position).
pub(crate) struct Step {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) masks: Vec<Option<Tensor>>,
}

/// RMSNorm as `LlamaRMSNorm`: normalise in f32, then scale.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn load(vb: VarBuilder, size: usize, eps: f64, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?.to_dtype(dtype)?,
            eps: eps as f32,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    o_proj: Linear,
    /// dtype the keys and values are cached in.
    kv_dtype: DType,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl Attention {
    fn load(
        vb: VarBuilder,
        cfg: &LlmConfig,
        kv_dtype: DType,
        bf16_products: bool,
        quant: Option<QFormat>,
    ) -> Result<Self> {
        let (h, hd, kvh) = (cfg.hidden_size, cfg.head_dim(), cfg.kv_heads());
        let q = Linear::load_as(vb.pp("q_proj"), h, cfg.num_attention_heads * hd, quant)?;
        let k = Linear::load_as(vb.pp("k_proj"), h, kvh * hd, quant)?;
        let v = Linear::load_as(vb.pp("v_proj"), h, kvh * hd, quant)?;
        let o_proj = Linear::load_as(vb.pp("o_proj"), cfg.num_attention_heads * hd, h, quant)?;
        Ok(Self {
            qkv: Linear::fuse_prepacked([q, k, v], bf16_products)?,
            o_proj: o_proj
                .with_bf16_products(bf16_products)
                .prepack_if_no_larger()?,
            kv_dtype,
            heads: cfg.num_attention_heads,
            kv_heads: kvh,
            head_dim: hd,
            span: tracing::span!(tracing::Level::TRACE, "attn"),
        })
    }

    fn forward(&self, x: &Tensor, step: &Step, cache: &mut KvCache, li: usize) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (cos, sin, masks) = (&step.cos, &step.sin, &step.masks);
        let (b, n, _) = x.dims3()?;
        let (hd, nh, nkv) = (self.head_dim, self.heads, self.kv_heads);
        let qkv = self.qkv.forward(x)?;
        let q = qkv.narrow(D::Minus1, 0, nh * hd)?;
        let k = qkv.narrow(D::Minus1, nh * hd, nkv * hd)?;
        let v = qkv.narrow(D::Minus1, (nh + nkv) * hd, nkv * hd)?;
        let q = q.reshape((b, n, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, n, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, n, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.to_dtype(self.kv_dtype)?;
        let v = v.to_dtype(self.kv_dtype)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut ys = Vec::with_capacity(b);
        for (r, mask) in masks.iter().enumerate() {
            let (k, v) = cache.append(r, li, &k.narrow(0, r, 1)?, &v.narrow(0, r, 1)?)?;
            let (k, v) = if nkv != nh {
                let rep = nh / nkv;
                let t = k.dim(2)?;
                let k = k
                    .unsqueeze(2)?
                    .expand((1, nkv, rep, t, hd))?
                    .reshape((1, nh, t, hd))?;
                let v = v
                    .unsqueeze(2)?
                    .expand((1, nkv, rep, t, hd))?
                    .reshape((1, nh, t, hd))?;
                (k, v)
            } else {
                (k, v)
            };
            let q = if b == 1 {
                q.clone()
            } else {
                q.narrow(0, r, 1)?
            };
            ys.push(attention::sdpa(&q, &k, &v, scale, mask.as_ref())?);
        }
        let y = if ys.len() == 1 {
            ys.pop().expect("one row")
        } else {
            Tensor::cat(&ys, 0)?
        };
        let y = y.transpose(1, 2)?.reshape((b, n, nh * hd))?;
        self.o_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: Linear,
    down_proj: Linear,
    inter: usize,
}

impl Mlp {
    fn load(
        vb: VarBuilder,
        cfg: &LlmConfig,
        bf16_products: bool,
        quant: Option<QFormat>,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate = Linear::load_as(vb.pp("gate_proj"), h, i, quant)?;
        let up = Linear::load_as(vb.pp("up_proj"), h, i, quant)?;
        let down_proj = Linear::load_as(vb.pp("down_proj"), i, h, quant)?;
        Ok(Self {
            gate_up: Linear::fuse_prepacked([gate, up], bf16_products)?,
            down_proj: down_proj
                .with_bf16_products(bf16_products)
                .prepack_if_no_larger()?,
            inter: i,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        if matches!(gu.device(), Device::Cpu) && gu.dtype() == DType::F32 {
            // One pass over the fused product (candle's narrow + silu + mul are three, on
            // strided views).
            let gu = gu.contiguous()?;
            let mut dims = gu.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = self.inter;
            }
            let mut out = vec![0f32; gu.elem_count() / 2];
            {
                let (g, l) = gu.storage_and_layout();
                let g = &attention::cpu_slice(&g, l)?[..gu.elem_count()];
                janus_kernels::elementwise::silu_mul(g, self.inter, &mut out);
            }
            return self
                .down_proj
                .forward(&Tensor::from_vec(out, dims, gu.device())?);
        }
        let gate = gu.narrow(D::Minus1, 0, self.inter)?;
        let up = gu.narrow(D::Minus1, self.inter, self.inter)?;
        self.down_proj
            .forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    span: tracing::Span,
}

impl Block {
    /// `act` is the activations' dtype, `kv` the cache's; `bf16_products` rounds the operands
    /// of the CPU's large-M products to bf16; `quant` holds the linear layers as blocks.
    pub(crate) fn load(
        vb: VarBuilder,
        cfg: &LlmConfig,
        act: DType,
        kv: DType,
        bf16_products: bool,
        quant: Option<QFormat>,
    ) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                act,
            )?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg, kv, bf16_products, quant)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                act,
            )?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, bf16_products, quant)?,
            span: tracing::span!(tracing::Level::TRACE, "block"),
        })
    }

    /// One decoder layer over `x` `[batch, n, hidden]` (the activations' dtype): pre-norm
    /// attention over each row's cache (this layer's keys and values appended), residual,
    /// pre-norm MLP, residual.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        cache: &mut KvCache,
        li: usize,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let h = self.input_layernorm.forward(x)?;
        let h = self.self_attn.forward(&h, step, cache, li)?;
        let x = (x + h)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        &x + self.mlp.forward(&h)?
    }
}
