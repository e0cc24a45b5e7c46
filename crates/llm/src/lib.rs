//! DeepSeek-LLM (the Llama architecture) as Janus-Pro uses it, shared by both services.
//!
//! Follows `transformers.LlamaForCausalLM`: RMSNorm, rotate-half RoPE (θ from the config), SiLU
//! MLP, no biases, `num_key_value_heads` honoured. Unlike a text-only Llama it runs from input
//! embeddings (image features are spliced in by the caller), returns the *final-normed hidden
//! states* (the image-generation head reads them) and computes `lm_head` logits only where asked.
//! The KV cache is batched and handles left-padded rows: each row's positions count from its
//! first real token and its pad slots are masked, so rows of different lengths share a forward.

pub mod attention;
pub mod linear;

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
pub use linear::Linear;
use serde::Deserialize;

/// `language_config` of a Janus checkpoint; defaults are `transformers.LlamaConfig`'s, which the
/// 7B config relies on (it omits hidden size, heads, intermediate size, eps and θ).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LlmConfig {
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (multi-head attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
}

fn default_hidden_size() -> usize {
    4096
}
fn default_intermediate_size() -> usize {
    11008
}
fn default_layers() -> usize {
    32
}
fn default_heads() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_vocab() -> usize {
    32000
}
fn default_max_pos() -> usize {
    2048
}

impl LlmConfig {
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rejects configurations the model cannot be built from.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return Err(
                "hidden_size, num_attention_heads and num_hidden_layers must be > 0".into(),
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "num_key_value_heads {kv} must divide num_attention_heads {}",
                self.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// Masked attention scores get this instead of -inf so a fully masked (pad) query row stays
/// finite: its softmax is uniform over pad values, which are finite, and never read by real rows.
const MASKED: f32 = -1e30;

/// One layer's cached keys and values `[batch, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Batched KV cache with per-row left padding.
///
/// All rows share one time axis of `len` slots; row `b`'s first `pads[b]` slots are padding
/// (masked as keys, and its positions count from slot `pads[b]`). Rows can be gathered, repeated
/// or dropped between steps, which is what a batch scheduler needs.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    pads: Vec<usize>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `pads.len()` rows; `pads[b]` leading slots of row `b` will be padding.
    pub fn new(num_layers: usize, pads: Vec<usize>) -> Self {
        Self {
            layers: vec![None; num_layers],
            pads,
            len: 0,
            capacity: 0,
        }
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.pads.len()
    }

    /// Slots filled so far (including padding).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Leading pad slots of each row.
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    /// Real tokens held for row `b` (its next position id).
    pub fn row_len(&self, b: usize) -> usize {
        self.len.saturating_sub(self.pads[b])
    }

    /// Keeps rows `rows` (in that order; repeats allowed), e.g. to drop finished requests or to
    /// broadcast one prefilled conditional/unconditional pair to `n` image rows.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        for &r in rows {
            if r >= self.pads.len() {
                candle_core::bail!("row {r} out of range for a batch of {}", self.pads.len());
            }
        }
        if let Some(Some(first)) = self.layers.first() {
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                first.k.device(),
            )?;
            for layer in self.layers.iter_mut().flatten() {
                layer.k = layer.k.index_select(&idx, 0)?;
                layer.v = layer.v.index_select(&idx, 0)?;
            }
        }
        self.pads = rows.iter().map(|&r| self.pads[r]).collect();
        Ok(())
    }

    /// Appends the rows of `other` after this cache's rows, so two batches decode as one.
    /// The shorter side is left-padded to the longer length (its pads grow by the difference,
    /// so its positions are unchanged and the new slots are masked).
    pub fn merge(&mut self, other: KvCache) -> Result<()> {
        if other.pads.is_empty() {
            return Ok(());
        }
        if self.pads.is_empty() {
            *self = other;
            return Ok(());
        }
        if self.layers.len() != other.layers.len() {
            candle_core::bail!(
                "merging caches of {} and {} layers",
                self.layers.len(),
                other.layers.len()
            );
        }
        let len = self.len.max(other.len);
        let cap = len.max(16).max(self.capacity);
        let widen = |t: &Tensor, old: usize| -> Result<Tensor> {
            let (b, h, _, d) = t.dims4()?;
            let data = t.narrow(2, 0, old)?;
            if old == len {
                return Ok(data);
            }
            let pad = Tensor::zeros((b, h, len - old, d), t.dtype(), t.device())?;
            Tensor::cat(&[&pad, &data], 2)
        };
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            let (Some(a), Some(b)) = (mine.as_ref(), theirs) else {
                candle_core::bail!("merging a cache that has not been filled");
            };
            let mut merged = Vec::with_capacity(2);
            for (x, y) in [(&a.k, &b.k), (&a.v, &b.v)] {
                let both = Tensor::cat(&[widen(x, self.len)?, widen(y, other.len)?], 0)?;
                let (rows, h, _, d) = both.dims4()?;
                let full = Tensor::zeros((rows, h, cap, d), both.dtype(), both.device())?;
                full.slice_set(&both.contiguous()?, 2, 0)?;
                merged.push(full);
            }
            let v = merged.pop().expect("two");
            let k = merged.pop().expect("two");
            *mine = Some(LayerKv { k, v });
        }
        let (da, db) = (len - self.len, len - other.len);
        self.pads = self
            .pads
            .iter()
            .map(|p| p + da)
            .chain(other.pads.iter().map(|p| p + db))
            .collect();
        self.len = len;
        self.capacity = cap;
        Ok(())
    }

    /// Appends `k`, `v` (`[b, h, n, d]`) for layer `li` at slot `self.len` and returns the
    /// filled views `[b, h, len + n, d]`. Growth doubles capacity so appends are amortised O(n).
    fn append(&mut self, li: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let need = self.len + n;
        let layer = match &mut self.layers[li] {
            Some(layer) if layer.k.dim(2)? >= need => layer,
            slot => {
                let (b, h, _, d) = k.dims4()?;
                let cap = need.max(self.capacity).max(2 * self.capacity).max(16);
                let nk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
                let nv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
                if let Some(old) = slot.as_ref() {
                    if self.len > 0 {
                        nk.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                        nv.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
                }
                if li == 0 {
                    self.capacity = cap;
                }
                *slot = Some(LayerKv { k: nk, v: nv });
                slot.as_mut().expect("just set")
            }
        };
        layer.k.slice_set(&k.contiguous()?, 2, self.len)?;
        layer.v.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((layer.k.narrow(2, 0, need)?, layer.v.narrow(2, 0, need)?))
    }
}

/// RMSNorm as `LlamaRMSNorm`: normalise in f32, then scale.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?.to_dtype(dtype)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &LlmConfig) -> Result<Self> {
        let (h, hd, kvh) = (cfg.hidden_size, cfg.head_dim(), cfg.kv_heads());
        let q = Linear::load(vb.pp("q_proj"), h, cfg.num_attention_heads * hd, false)?;
        let k = Linear::load(vb.pp("k_proj"), h, kvh * hd, false)?;
        let v = Linear::load(vb.pp("v_proj"), h, kvh * hd, false)?;
        let o_proj = Linear::load(vb.pp("o_proj"), cfg.num_attention_heads * hd, h, false)?;
        Ok(Self {
            qkv: Linear::fuse(&[q, k, v])?,
            o_proj,
            heads: cfg.num_attention_heads,
            kv_heads: kvh,
            head_dim: hd,
            span: tracing::span!(tracing::Level::TRACE, "attn"),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        li: usize,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
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
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = cache.append(li, &k, &v)?;
        let (k, v) = if nkv != nh {
            let rep = nh / nkv;
            let t = k.dim(2)?;
            let k = k
                .unsqueeze(2)?
                .expand((b, nkv, rep, t, hd))?
                .reshape((b, nh, t, hd))?;
            let v = v
                .unsqueeze(2)?
                .expand((b, nkv, rep, t, hd))?
                .reshape((b, nh, t, hd))?;
            (k, v)
        } else {
            (k, v)
        };
        let y = attention::sdpa(&q, &k, &v, 1.0 / (hd as f64).sqrt(), mask)?;
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
    fn load(vb: VarBuilder, cfg: &LlmConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate = Linear::load(vb.pp("gate_proj"), h, i, false)?;
        let up = Linear::load(vb.pp("up_proj"), h, i, false)?;
        let down_proj = Linear::load(vb.pp("down_proj"), i, h, false)?;
        Ok(Self {
            gate_up: Linear::fuse(&[gate, up])?,
            down_proj,
            inter: i,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        let gate = gu.narrow(D::Minus1, 0, self.inter)?;
        let up = gu.narrow(D::Minus1, self.inter, self.inter)?;
        self.down_proj
            .forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    span: tracing::Span,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &LlmConfig, dtype: DType) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                dtype,
            )?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                dtype,
            )?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            span: tracing::span!(tracing::Level::TRACE, "block"),
        })
    }
}

/// The language model: `model.*` plus an optional `lm_head` (only the understanding half needs it).
#[derive(Debug, Clone)]
pub struct Llm {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    cos: Tensor,
    sin: Tensor,
    cfg: LlmConfig,
    dtype: DType,
    device: Device,
}

impl Llm {
    /// Loads from `vb` positioned at the LLM root (`language_model` in Janus checkpoints).
    /// `dtype` is the compute dtype for activations; weights keep the `vb` dtype.
    pub fn load(vb: VarBuilder, cfg: &LlmConfig, dtype: DType, with_lm_head: bool) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let device = vb.device().clone();
        let m = vb.pp("model");
        let embed_tokens = m
            .get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?
            .to_dtype(dtype)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(m.pp(format!("layers.{i}")), cfg, dtype))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps, dtype)?;
        let lm_head = if with_lm_head {
            Some(Linear::load(
                vb.pp("lm_head"),
                cfg.hidden_size,
                cfg.vocab_size,
                false,
            )?)
        } else {
            None
        };
        let (cos, sin) = rope_tables(cfg, dtype, &device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            cfg: cfg.clone(),
            dtype,
            device,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    /// Compute dtype of activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings `[.., hidden]` for ids of any shape.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let shape = ids.dims().to_vec();
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let e = self.embed_tokens.index_select(&flat, 0)?;
        let mut out = shape;
        out.push(self.cfg.hidden_size);
        e.reshape(out)
    }

    /// A fresh cache for rows with the given left padding.
    pub fn new_cache(&self, pads: Vec<usize>) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, pads)
    }

    /// Runs `embeds` `[batch, n, hidden]` as the next `n` slots of every row of `cache` and returns
    /// the final-normed hidden states `[batch, n, hidden]`.
    pub fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, n, _) = embeds.dims3()?;
        if b != cache.batch_size() {
            candle_core::bail!(
                "batch of {b} rows for a cache of {} rows",
                cache.batch_size()
            );
        }
        let start = cache.len;
        let longest = (start + n).saturating_sub(cache.pads.iter().copied().min().unwrap_or(0));
        if longest > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {longest} positions exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        // Position ids per row: slots count from the row's first real token (pads clamp to 0).
        let mut pos = Vec::with_capacity(b * n);
        for &pad in &cache.pads {
            for i in 0..n {
                pos.push((start + i).saturating_sub(pad) as u32);
            }
        }
        let pos = Tensor::from_vec(pos, b * n, &self.device)?;
        let half = self.cfg.head_dim() / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, n, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, n, half))?;
        let mask = self.mask(cache, start, n)?;
        let mut x = embeds.to_dtype(self.dtype)?;
        for (li, block) in self.layers.iter().enumerate() {
            let _enter = block.span.enter();
            let h = block.input_layernorm.forward(&x)?;
            let h = block
                .self_attn
                .forward(&h, &cos, &sin, mask.as_ref(), cache, li)?;
            x = (x + h)?;
            let h = block.post_attention_layernorm.forward(&x)?;
            x = (&x + block.mlp.forward(&h)?)?;
        }
        cache.len = start + n;
        self.norm.forward(&x)
    }

    /// Additive mask `[b, 1, n, start + n]`: causal, and pad slots of each row hidden as keys.
    /// `None` when nothing needs masking (one new slot and no padding).
    fn mask(&self, cache: &KvCache, start: usize, n: usize) -> Result<Option<Tensor>> {
        let any_pad = cache.pads.iter().any(|&p| p > 0);
        if n == 1 && !any_pad {
            return Ok(None);
        }
        let t = start + n;
        let b = cache.batch_size();
        let mut m = vec![0f32; b * n * t];
        for (row, &pad) in cache.pads.iter().enumerate() {
            for i in 0..n {
                let q = start + i;
                let base = (row * n + i) * t;
                for (j, v) in m[base..base + t].iter_mut().enumerate() {
                    let visible = j <= q && (j >= pad || q < pad && j == q);
                    if !visible {
                        *v = MASKED;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (b, 1, n, t), &self.device)?))
    }

    /// `lm_head` logits (f32) for hidden states `[.., hidden]`; errors if loaded without the head.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(hidden)?.to_dtype(DType::F32),
            None => candle_core::bail!("this model was loaded without lm_head"),
        }
    }

    /// Hidden state of the last slot of every row `[b, hidden]`.
    pub fn last(hidden: &Tensor) -> Result<Tensor> {
        let n = hidden.dim(1)?;
        hidden.i((.., n - 1, ..))?.contiguous()
    }
}

/// cos/sin tables `[max_pos, head_dim/2]` for rotate-half RoPE.
fn rope_tables(cfg: &LlmConfig, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|j| 1.0 / (cfg.rope_theta.powf(2.0 * j as f64 / hd as f64)) as f32)
        .collect();
    let max = cfg.max_position_embeddings;
    let inv = Tensor::from_vec(inv, (1, hd / 2), dev)?;
    let t = Tensor::arange(0u32, max as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((max, 1))?;
    let freqs = t.broadcast_mul(&inv)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny() -> LlmConfig {
        serde_json::from_str(
            r#"{"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,
                "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":50,
                "max_position_embeddings":128}"#,
        )
        .unwrap()
    }

    /// Random weights for every tensor the tiny config needs.
    fn model() -> Llm {
        let dev = Device::Cpu;
        let mut t = std::collections::HashMap::new();
        let mut put = |name: String, shape: &[usize]| {
            t.insert(
                name,
                (Tensor::randn(0f32, 0.3, shape, &dev).unwrap()
                    + if shape.len() == 1 { 1.0 } else { 0.0 })
                .unwrap(),
            );
        };
        put("model.embed_tokens.weight".into(), &[50, 32]);
        put("lm_head.weight".into(), &[50, 32]);
        put("model.norm.weight".into(), &[32]);
        for l in 0..2 {
            let p = format!("model.layers.{l}.");
            put(format!("{p}self_attn.q_proj.weight"), &[32, 32]);
            put(format!("{p}self_attn.k_proj.weight"), &[16, 32]);
            put(format!("{p}self_attn.v_proj.weight"), &[16, 32]);
            put(format!("{p}self_attn.o_proj.weight"), &[32, 32]);
            put(format!("{p}mlp.gate_proj.weight"), &[64, 32]);
            put(format!("{p}mlp.up_proj.weight"), &[64, 32]);
            put(format!("{p}mlp.down_proj.weight"), &[32, 64]);
            put(format!("{p}input_layernorm.weight"), &[32]);
            put(format!("{p}post_attention_layernorm.weight"), &[32]);
        }
        let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
        Llm::load(vb, &tiny(), DType::F32, true).unwrap()
    }

    #[test]
    fn defaults_follow_llama_config() {
        let c: LlmConfig =
            serde_json::from_str(r#"{"num_hidden_layers":30,"vocab_size":102400}"#).unwrap();
        assert_eq!(c.hidden_size, 4096);
        assert_eq!(c.intermediate_size, 11008);
        assert_eq!(c.num_attention_heads, 32);
        assert_eq!(c.kv_heads(), 32);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.rope_theta, 10000.0);
    }

    /// Incremental decode equals a full forward, and a left-padded row equals the same row alone.
    #[test]
    fn cache_and_left_padding_match_unpadded() {
        let m = model();
        let ids = Tensor::new(&[[3u32, 7, 11, 13, 17]], &Device::Cpu).unwrap();
        let e = m.embed(&ids).unwrap();
        let mut c1 = m.new_cache(vec![0]);
        let full = m.forward(&e, &mut c1).unwrap();
        let mut c2 = m.new_cache(vec![0]);
        m.forward(&e.narrow(1, 0, 3).unwrap(), &mut c2).unwrap();
        m.forward(&e.narrow(1, 3, 1).unwrap(), &mut c2).unwrap();
        let last = m.forward(&e.narrow(1, 4, 1).unwrap(), &mut c2).unwrap();
        let d = (full.narrow(1, 4, 1).unwrap() - last)
            .unwrap()
            .abs()
            .unwrap();
        assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);

        // Batch: row 0 = the 5 tokens, row 1 = 2 pads + 3 tokens.
        let ids2 = Tensor::new(&[[3u32, 7, 11, 13, 17], [0, 0, 5, 9, 2]], &Device::Cpu).unwrap();
        let mut cb = m.new_cache(vec![0, 2]);
        let hb = m.forward(&m.embed(&ids2).unwrap(), &mut cb).unwrap();
        let mut cs = m.new_cache(vec![0]);
        let alone = m
            .forward(
                &m.embed(&Tensor::new(&[[5u32, 9, 2]], &Device::Cpu).unwrap())
                    .unwrap(),
                &mut cs,
            )
            .unwrap();
        let d = (hb.i((1..2, 2.., ..)).unwrap() - &alone)
            .unwrap()
            .abs()
            .unwrap();
        assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        assert!(hb
            .i((1, 0, ..))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
        // One more decode step for both rows still matches.
        let step = m
            .embed(&Tensor::new(&[[4u32], [4]], &Device::Cpu).unwrap())
            .unwrap();
        let hb2 = m.forward(&step, &mut cb).unwrap();
        let hs2 = m
            .forward(
                &m.embed(&Tensor::new(&[[4u32]], &Device::Cpu).unwrap())
                    .unwrap(),
                &mut cs,
            )
            .unwrap();
        let d = (hb2.i(1).unwrap() - hs2.i(0).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        // Selecting rows keeps their state.
        cb.select_rows(&[1, 1]).unwrap();
        let st = m
            .embed(&Tensor::new(&[[6u32], [6]], &Device::Cpu).unwrap())
            .unwrap();
        let hsel = m.forward(&st, &mut cb).unwrap();
        let hs3 = m
            .forward(
                &m.embed(&Tensor::new(&[[6u32]], &Device::Cpu).unwrap())
                    .unwrap(),
                &mut cs,
            )
            .unwrap();
        for r in 0..2 {
            let d = (hsel.i(r).unwrap() - hs3.i(0).unwrap())
                .unwrap()
                .abs()
                .unwrap();
            assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        }
    }

    /// Two caches of different lengths merged into one batch decode exactly like each alone.
    #[test]
    fn merged_caches_decode_like_separate_ones() {
        let m = model();
        let dev = Device::Cpu;
        let ids_a = Tensor::new(&[[3u32, 7, 11, 13, 17]], &dev).unwrap();
        let ids_b = Tensor::new(&[[5u32, 9]], &dev).unwrap();
        let mut ca = m.new_cache(vec![0]);
        m.forward(&m.embed(&ids_a).unwrap(), &mut ca).unwrap();
        let mut cb = m.new_cache(vec![0]);
        m.forward(&m.embed(&ids_b).unwrap(), &mut cb).unwrap();
        let (mut sa, mut sb) = (ca.clone(), cb.clone());
        // b joins a (b is shorter), then a third copy of a joins (longer than nothing).
        let mut merged = ca;
        merged.merge(cb).unwrap();
        assert_eq!(merged.pads(), &[0, 3]);
        let step = m
            .embed(&Tensor::new(&[[4u32], [6]], &dev).unwrap())
            .unwrap();
        let hm = m.forward(&step, &mut merged).unwrap();
        let ha = m
            .forward(
                &m.embed(&Tensor::new(&[[4u32]], &dev).unwrap()).unwrap(),
                &mut sa,
            )
            .unwrap();
        let hb = m
            .forward(
                &m.embed(&Tensor::new(&[[6u32]], &dev).unwrap()).unwrap(),
                &mut sb,
            )
            .unwrap();
        for (r, alone) in [(0, &ha), (1, &hb)] {
            let d = (hm.i(r).unwrap() - alone.i(0).unwrap())
                .unwrap()
                .abs()
                .unwrap();
            assert!(
                d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5,
                "row {r}"
            );
        }
        // The shorter side may also be `self`.
        let mut short = sb.clone();
        short.merge(sa.clone()).unwrap();
        assert_eq!(short.pads(), &[3, 0]);
        assert_eq!(short.len(), sa.len());
    }

    #[test]
    fn missing_lm_head_is_an_error() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let m = Llm::load(vb, &tiny(), DType::F32, false).unwrap();
        let h = Tensor::zeros((1, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(m.lm_logits(&h).is_err());
    }
}
