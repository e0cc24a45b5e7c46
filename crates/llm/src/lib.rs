//! DeepSeek-LLM (the Llama architecture) as Janus-Pro uses it, shared by both services.
//!
//! Follows `transformers.LlamaForCausalLM`: RMSNorm, rotate-half RoPE (θ from the config), SiLU
//! MLP, no biases, `num_key_value_heads` honoured. Unlike a text-only Llama it runs from input
//! embeddings (image features are spliced in by the caller), returns the *final-normed hidden
//! states* (the image-generation head reads them) and computes `lm_head` logits only where asked.
//! The KV cache is ragged: every row (sequence) has its own length and storage, so rows of
//! different lengths share a forward without padding, and a prompt can be prefilled in chunks
//! against its cache with O(chunk × context) extra memory.

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

/// Masked attention scores get this instead of -inf (the softmax stays finite).
const MASKED: f32 = -1e30;

/// One layer's cached keys and values of one row `[1, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// The cache of one sequence: every layer's keys and values, `len` slots filled.
#[derive(Debug, Clone)]
struct RowKv {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    /// Slots allocated at the first append (see [`KvCache::reserve`]).
    reserve: usize,
}

impl RowKv {
    fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            reserve: 0,
        }
    }

    /// Allocated slots.
    fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|l| l.k.dim(2).ok())
            .unwrap_or(0)
    }

    /// A copy of the filled slots that shares no storage with `self` (appends to one never
    /// show in the other); it grows to its reserve at its next append.
    fn deep_copy(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|l| {
                        Ok::<_, candle_core::Error>(LayerKv {
                            k: l.k.narrow(2, 0, self.len)?.copy()?,
                            v: l.v.narrow(2, 0, self.len)?.copy()?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: self.len,
            reserve: self.reserve,
        })
    }

    /// Appends `k`, `v` (`[1, h, n, d]`) for layer `li` at slot `self.len` and returns the
    /// filled views `[1, h, len + n, d]`. The first allocation takes the reserved size; growth
    /// beyond it doubles, so appends are amortised O(n).
    fn append(&mut self, li: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let need = self.len + n;
        let layer = match &mut self.layers[li] {
            Some(layer) if layer.k.dim(2)? >= need => layer,
            slot => {
                let (b, h, _, d) = k.dims4()?;
                let old_cap = slot.as_ref().map_or(0, |l| l.k.dim(2).unwrap_or(0));
                // A reserved row is allocated exactly; an unreserved one grows from 16 slots.
                let floor = if self.reserve > 0 { 0 } else { 16 };
                let cap = need.max(self.reserve).max(2 * old_cap).max(floor);
                let nk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
                let nv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
                if let Some(old) = slot.as_ref() {
                    if self.len > 0 {
                        nk.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                        nv.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
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

/// KV cache of a batch of independent sequences ("ragged": each row has its own length and
/// its own storage; nothing is padded).
///
/// Rows of any lengths step together: the linear layers run over all rows at once and each row
/// attends over its own keys, so a batch costs the memory of its rows' real lengths, never
/// rows × the longest. Rows can be selected, repeated or appended between steps without copying
/// the others, which is what a batch scheduler needs.
#[derive(Debug, Clone)]
pub struct KvCache {
    rows: Vec<RowKv>,
    num_layers: usize,
}

impl KvCache {
    /// An empty cache of `rows` sequences.
    pub fn new(num_layers: usize, rows: usize) -> Self {
        Self {
            rows: (0..rows).map(|_| RowKv::new(num_layers)).collect(),
            num_layers,
        }
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.rows.len()
    }

    /// Slots filled in row `b` (its next position id).
    pub fn row_len(&self, b: usize) -> usize {
        self.rows.get(b).map_or(0, |r| r.len)
    }

    /// The longest row.
    pub fn max_len(&self) -> usize {
        self.rows.iter().map(|r| r.len).max().unwrap_or(0)
    }

    /// True when no row holds a slot.
    pub fn is_empty(&self) -> bool {
        self.rows.iter().all(|r| r.len == 0)
    }

    /// Slots allocated over all rows (memory of the cache is this × the bytes per slot).
    pub fn allocated_slots(&self) -> usize {
        self.rows.iter().map(RowKv::capacity).sum()
    }

    /// Allocates `slots` slots per row at the next append of a row that has none yet, so a
    /// sequence whose final length is known (prompt + new tokens) is allocated once.
    pub fn reserve(&mut self, slots: usize) {
        for r in &mut self.rows {
            r.reserve = slots;
        }
    }

    /// Keeps rows `rows` (in that order). A row named more than once is copied (deep), so the
    /// copies diverge independently, e.g. to broadcast one prefilled conditional/unconditional
    /// pair to `n` image rows.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        for &r in rows {
            if r >= self.rows.len() {
                candle_core::bail!("row {r} out of range for a batch of {}", self.rows.len());
            }
        }
        let mut old: Vec<Option<RowKv>> = std::mem::take(&mut self.rows)
            .into_iter()
            .map(Some)
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for (i, &r) in rows.iter().enumerate() {
            let again = rows[i + 1..].contains(&r);
            let row = if again {
                old[r]
                    .as_ref()
                    .expect("present until its last use")
                    .deep_copy()?
            } else {
                old[r].take().expect("present until its last use")
            };
            out.push(row);
        }
        self.rows = out;
        Ok(())
    }

    /// A copy sharing no storage with this cache (a cached prefill handed to a request).
    pub fn deep_copy(&self) -> Result<Self> {
        Ok(Self {
            rows: self
                .rows
                .iter()
                .map(RowKv::deep_copy)
                .collect::<Result<Vec<_>>>()?,
            num_layers: self.num_layers,
        })
    }

    /// Appends the rows of `other` after this cache's rows, so two batches decode as one.
    /// No data is copied.
    pub fn merge(&mut self, other: KvCache) -> Result<()> {
        if other.rows.is_empty() {
            return Ok(());
        }
        if self.rows.is_empty() {
            *self = other;
            return Ok(());
        }
        if self.num_layers != other.num_layers {
            candle_core::bail!(
                "merging caches of {} and {} layers",
                self.num_layers,
                other.num_layers
            );
        }
        self.rows.extend(other.rows);
        Ok(())
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
    /// dtype the keys and values are cached in.
    kv_dtype: DType,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &LlmConfig, kv_dtype: DType, bf16_products: bool) -> Result<Self> {
        let (h, hd, kvh) = (cfg.hidden_size, cfg.head_dim(), cfg.kv_heads());
        let q = Linear::load(vb.pp("q_proj"), h, cfg.num_attention_heads * hd, false)?;
        let k = Linear::load(vb.pp("k_proj"), h, kvh * hd, false)?;
        let v = Linear::load(vb.pp("v_proj"), h, kvh * hd, false)?;
        let o_proj = Linear::load(vb.pp("o_proj"), cfg.num_attention_heads * hd, h, false)?;
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

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        masks: &[Option<Tensor>],
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
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.to_dtype(self.kv_dtype)?;
        let v = v.to_dtype(self.kv_dtype)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut ys = Vec::with_capacity(b);
        for (r, (row, mask)) in cache.rows.iter_mut().zip(masks).enumerate() {
            let (k, v) = row.append(li, &k.narrow(0, r, 1)?, &v.narrow(0, r, 1)?)?;
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
    fn load(vb: VarBuilder, cfg: &LlmConfig, bf16_products: bool) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate = Linear::load(vb.pp("gate_proj"), h, i, false)?;
        let up = Linear::load(vb.pp("up_proj"), h, i, false)?;
        let down_proj = Linear::load(vb.pp("down_proj"), i, h, false)?;
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
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    span: tracing::Span,
}

impl Block {
    /// `act` is the activations' dtype, `kv` the cache's; `bf16_products` rounds the operands
    /// of the CPU's large-M products to bf16.
    fn load(
        vb: VarBuilder,
        cfg: &LlmConfig,
        act: DType,
        kv: DType,
        bf16_products: bool,
    ) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                act,
            )?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg, kv, bf16_products)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                act,
            )?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, bf16_products)?,
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
    /// The compute dtype asked for: of the KV cache and of the hidden states returned.
    dtype: DType,
    /// dtype of the activations inside the layers (f32 for bf16 compute on the CPU).
    act: DType,
    device: Device,
}

impl Llm {
    /// Loads from `vb` positioned at the LLM root (`language_model` in Janus checkpoints).
    /// `dtype` is the compute dtype; weights keep the `vb` dtype.
    ///
    /// bf16 on the CPU keeps the activations, norms, RoPE and softmax in f32 and rounds the
    /// operands of the large products (linear layers and attention) to bf16, accumulating in
    /// f32 (`vdpbf16ps` on AVX512-BF16); the KV cache and the returned hidden states are bf16,
    /// as on other devices.
    pub fn load(vb: VarBuilder, cfg: &LlmConfig, dtype: DType, with_lm_head: bool) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let device = vb.device().clone();
        let m = vb.pp("model");
        // Kept in its storage dtype (bf16 for the hub checkpoints); `embed` widens only the rows
        // it gathers (exact), instead of a vocab × hidden f32 copy.
        let embed_tokens = m.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
        let cpu_bf16 = dtype == DType::BF16 && device.is_cpu();
        let act = if cpu_bf16 { DType::F32 } else { dtype };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(m.pp(format!("layers.{i}")), cfg, act, dtype, cpu_bf16))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps, act)?;
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
        let (cos, sin) = rope_tables(cfg, act, &device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            cfg: cfg.clone(),
            dtype,
            act,
            device,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    /// The compute dtype: of the inputs callers build, the KV cache and the hidden states
    /// returned (activations inside may be wider, see [`Llm::load`]).
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
        let e = self
            .embed_tokens
            .index_select(&flat, 0)?
            .to_dtype(self.dtype)?;
        let mut out = shape;
        out.push(self.cfg.hidden_size);
        e.reshape(out)
    }

    /// A fresh cache of `rows` empty sequences.
    pub fn new_cache(&self, rows: usize) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, rows)
    }

    /// Runs `embeds` `[batch, n, hidden]` as the next `n` positions of every row of `cache` and
    /// returns the final-normed hidden states `[batch, n, hidden]`. Rows may have different
    /// lengths; each attends causally over its own cache. Extra memory beyond the cache is
    /// O(batch · n · (hidden + row length)): prefill a long prompt in chunks to bound it.
    pub fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, n, _) = embeds.dims3()?;
        if b != cache.batch_size() {
            candle_core::bail!(
                "batch of {b} rows for a cache of {} rows",
                cache.batch_size()
            );
        }
        let longest = cache.max_len() + n;
        if longest > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {longest} positions exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        // Position ids per row: its filled slots onwards.
        let mut pos = Vec::with_capacity(b * n);
        for r in &cache.rows {
            pos.extend((0..n).map(|i| (r.len + i) as u32));
        }
        let pos = Tensor::from_vec(pos, b * n, &self.device)?;
        let half = self.cfg.head_dim() / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, n, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, n, half))?;
        // One causal mask per row for all layers (none for a single position).
        let masks = cache
            .rows
            .iter()
            .map(|r| causal_mask(r.len, n, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let mut x = embeds.to_dtype(self.act)?;
        for (li, block) in self.layers.iter().enumerate() {
            let _enter = block.span.enter();
            let h = block.input_layernorm.forward(&x)?;
            let h = block.self_attn.forward(&h, &cos, &sin, &masks, cache, li)?;
            x = (x + h)?;
            let h = block.post_attention_layernorm.forward(&x)?;
            x = (&x + block.mlp.forward(&h)?)?;
        }
        for r in &mut cache.rows {
            r.len += n;
        }
        self.norm.forward(&x)?.to_dtype(self.dtype)
    }

    /// Multiply-adds per token of the decoder layers (their matmuls, attention over the cache
    /// left out): the unit a scheduler weighs other work (a vision block) against.
    pub fn token_macs(&self) -> usize {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let per_layer = h * (c.num_attention_heads + 2 * c.kv_heads()) * hd
            + c.num_attention_heads * hd * h
            + 3 * h * c.intermediate_size;
        c.num_hidden_layers * per_layer
    }

    /// Bytes one cached position of one row takes (keys and values of every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_hidden_layers
            * self.cfg.kv_heads()
            * self.cfg.head_dim()
            * self.dtype.size_in_bytes()
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

/// Additive causal mask `[1, 1, n, start + n]` for `n` new positions after `start` cached ones
/// (`None` for a single position: it sees everything). O(n · (start + n)) floats.
fn causal_mask(start: usize, n: usize, dev: &Device) -> Result<Option<Tensor>> {
    if n == 1 {
        return Ok(None);
    }
    let t = start + n;
    let mut m = vec![0f32; n * t];
    for i in 0..n {
        m[i * t + start + i + 1..(i + 1) * t].fill(MASKED);
    }
    Ok(Some(Tensor::from_vec(m, (1, 1, n, t), dev)?))
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

    use crate::attention::tests::max_abs_diff as max_diff;

    /// Incremental decode and chunked prefill equal a full forward; rows of different lengths
    /// in one batch equal each row alone.
    #[test]
    fn cache_chunks_and_ragged_rows_match_alone() {
        let m = model();
        let ids = Tensor::new(&[[3u32, 7, 11, 13, 17]], &Device::Cpu).unwrap();
        let e = m.embed(&ids).unwrap();
        let mut c1 = m.new_cache(1);
        let full = m.forward(&e, &mut c1).unwrap();
        let mut c2 = m.new_cache(1);
        c2.reserve(8);
        m.forward(&e.narrow(1, 0, 2).unwrap(), &mut c2).unwrap();
        let mid = m.forward(&e.narrow(1, 2, 2).unwrap(), &mut c2).unwrap();
        let last = m.forward(&e.narrow(1, 4, 1).unwrap(), &mut c2).unwrap();
        assert_eq!(c2.allocated_slots(), 8, "the reserve is allocated once");
        assert!(max_diff(&full.narrow(1, 2, 2).unwrap(), &mid) < 1e-5);
        assert!(max_diff(&full.narrow(1, 4, 1).unwrap(), &last) < 1e-5);

        // Row 0 holds 5 tokens, row 1 holds 3: one decode step for both.
        let mut cs = m.new_cache(1);
        m.forward(
            &m.embed(&Tensor::new(&[[5u32, 9, 2]], &Device::Cpu).unwrap())
                .unwrap(),
            &mut cs,
        )
        .unwrap();
        let mut cb = c1.clone();
        cb.merge(cs.deep_copy().unwrap()).unwrap();
        assert_eq!((cb.row_len(0), cb.row_len(1)), (5, 3));
        let step = m
            .embed(&Tensor::new(&[[4u32], [6]], &Device::Cpu).unwrap())
            .unwrap();
        let hb = m.forward(&step, &mut cb).unwrap();
        let one = |c: &mut KvCache, t: u32| {
            m.forward(
                &m.embed(&Tensor::new(&[[t]], &Device::Cpu).unwrap())
                    .unwrap(),
                c,
            )
            .unwrap()
        };
        let ha = one(&mut c1, 4);
        let hs = one(&mut cs, 6);
        assert!(max_diff(&hb.i(0).unwrap(), &ha.i(0).unwrap()) < 1e-5);
        assert!(max_diff(&hb.i(1).unwrap(), &hs.i(0).unwrap()) < 1e-5);
        // Selecting a row twice copies it: the copies then diverge independently.
        cb.select_rows(&[1, 1]).unwrap();
        let st = m
            .embed(&Tensor::new(&[[6u32], [8]], &Device::Cpu).unwrap())
            .unwrap();
        let hsel = m.forward(&st, &mut cb).unwrap();
        let mut cs2 = cs.deep_copy().unwrap();
        assert!(max_diff(&hsel.i(0).unwrap(), &one(&mut cs, 6).i(0).unwrap()) < 1e-5);
        assert!(max_diff(&hsel.i(1).unwrap(), &one(&mut cs2, 8).i(0).unwrap()) < 1e-5);
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
