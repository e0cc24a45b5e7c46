//! The language model: embeddings, the stack of [`Block`]s, the final norm and `lm_head`, with
//! the per-step RoPE tables and causal masks every block shares.

use crate::block::{Block, RmsNorm, Step};
use crate::config::LlmConfig;
use crate::kv_cache::KvCache;
use crate::Linear;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use janus_kernels::quant::QFormat;

/// Masked attention scores get this instead of -inf (the softmax stays finite).
const MASKED: f32 = -1e30;

/// Which of the language model's linear layers are held as quantized blocks, and in which
/// format (`None`: the checkpoint's dtype).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantize {
    /// The decoder layers' q, k, v, o, gate, up and down projections, and the token embedding
    /// table (rows dequantized as they are gathered).
    pub layers: Option<QFormat>,
    /// `lm_head`.
    pub lm_head: Option<QFormat>,
}

/// The language model: `model.*` plus an optional `lm_head` (only the understanding half needs it).
#[derive(Debug, Clone)]
pub struct Llm {
    /// `[vocab, hidden]`, gathered by row; as blocks when the layers are.
    embed_tokens: Linear,
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
        Self::load_quantized(vb, cfg, dtype, with_lm_head, Quantize::default())
    }

    /// [`Llm::load`] with the linear layers held as `quant` says (embeddings and norms keep
    /// their dtype). A checkpoint that stores quantized layers loads them as stored.
    pub fn load_quantized(
        vb: VarBuilder,
        cfg: &LlmConfig,
        dtype: DType,
        with_lm_head: bool,
        quant: Quantize,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let device = vb.device().clone();
        let m = vb.pp("model");
        // Kept in its storage dtype (bf16 for the hub checkpoints); `embed` widens only the rows
        // it gathers (exact), instead of a vocab × hidden f32 copy.
        let embed_tokens = Linear::load_as(
            m.pp("embed_tokens"),
            cfg.hidden_size,
            cfg.vocab_size,
            quant.layers,
        )?;
        let cpu_bf16 = dtype == DType::BF16 && device.is_cpu();
        let act = if cpu_bf16 { DType::F32 } else { dtype };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                Block::load(
                    m.pp(format!("layers.{i}")),
                    cfg,
                    act,
                    dtype,
                    cpu_bf16,
                    quant.layers,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps, act)?;
        let lm_head = if with_lm_head {
            // Under CPU bf16 compute, packed once as bf16 pairs like the layers (no extra
            // memory), so batched decode steps multiply it with bf16 products too.
            Some(
                Linear::load_as(
                    vb.pp("lm_head"),
                    cfg.hidden_size,
                    cfg.vocab_size,
                    quant.lm_head,
                )?
                .packed_for_bf16_compute(cpu_bf16)?,
            )
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
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let e = self.embed_tokens.gather_rows(&flat, self.dtype)?;
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
        for len in cache.row_lens() {
            pos.extend((0..n).map(|i| (len + i) as u32));
        }
        let pos = Tensor::from_vec(pos, b * n, &self.device)?;
        let half = self.cfg.head_dim() / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, n, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, n, half))?;
        // One causal mask per row for all layers (none for a single position).
        let masks = cache
            .row_lens()
            .map(|len| causal_mask(len, n, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let step = Step { cos, sin, masks };
        let mut x = embeds.to_dtype(self.act)?;
        for (li, block) in self.layers.iter().enumerate() {
            x = block.forward(&x, &step, cache, li)?;
        }
        cache.advance(n);
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
