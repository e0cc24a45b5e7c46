//! Random-weight checkpoints in the DeepSeek layout, at real shapes, for benchmarks, load tests
//! and cluster smoke tests without a 15 GB download.

use janus_pipeline::config::JanusConfig;
use janus_pipeline::error::{Error, Result};
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::Path;

/// Shapes a synthetic checkpoint can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The shapes of the vendored test fixture (hidden 64, 2 layers).
    Tiny,
    /// Janus-Pro-1B: hidden 2048, 24 layers, SigLIP-L, VQ-16.
    Pro1b,
    /// Janus-Pro-7B: hidden 4096, 30 layers, SigLIP-L, VQ-16.
    Pro7b,
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "pro-1b" => Ok(Self::Pro1b),
            "pro-7b" => Ok(Self::Pro7b),
            _ => Err(Error::invalid(
                "preset",
                format!("unknown preset '{s}' (tiny, pro-1b, pro-7b)"),
            )),
        }
    }
}

fn sub(cls: &str, model_type: &str, params: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "cls": cls, "model_type": model_type, "params": params })
}

/// The `config.json` of a preset, optionally with fewer LLM layers.
pub fn preset_config(preset: Preset, llm_layers: Option<usize>) -> serde_json::Value {
    let (hidden, inter, heads, layers, vocab) = match preset {
        Preset::Tiny => (64, 176, 4, 2, 1216),
        Preset::Pro1b => (2048, 5632, 16, 24, 102400),
        Preset::Pro7b => (4096, 11008, 32, 30, 102400),
    };
    let layers = llm_layers.unwrap_or(layers);
    let (vision, vq, vision_width) = match preset {
        Preset::Tiny => (
            serde_json::json!({"image_size": 384, "model_name": "siglip_tiny_patch16_384", "select_feature": "same",
                "select_layer": -1, "width": 64, "layers": 2, "heads": 4, "mlp_ratio": 4.0, "patch_size": 16}),
            sub(
                "VQ-tiny",
                "gen_vision",
                serde_json::json!({"image_token_size": 16384, "n_embed": 8, "ch": 32,
                "ch_mult": [1, 1, 1, 2, 2], "z_channels": 32, "num_res_blocks": 1, "codebook_size": 16384,
                "codebook_embed_dim": 8}),
            ),
            64,
        ),
        _ => (
            serde_json::json!({"image_size": 384, "model_name": "siglip_large_patch16_384",
                "select_feature": "same", "select_layer": -1}),
            sub(
                "VQ-16",
                "gen_vision",
                serde_json::json!({"image_token_size": 16384, "n_embed": 8}),
            ),
            1024,
        ),
    };
    serde_json::json!({
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "torch_dtype": "bfloat16",
        "aligner_config": sub("MlpProjector", "aligner", serde_json::json!({"depth": 2, "input_dim": vision_width, "n_embed": hidden, "projector_type": "mlp_gelu"})),
        "gen_aligner_config": sub("MlpProjector", "gen_aligner", serde_json::json!({"depth": 2, "input_dim": 8, "n_embed": hidden, "projector_type": "mlp_gelu"})),
        "gen_head_config": sub("vision_head", "gen_head", serde_json::json!({"image_token_embed": hidden, "image_token_size": 16384, "n_embed": hidden})),
        "gen_vision_config": vq,
        "language_config": {"hidden_size": hidden, "intermediate_size": inter, "max_position_embeddings": 16384,
            "num_attention_heads": heads, "num_key_value_heads": heads, "num_hidden_layers": layers,
            "torch_dtype": "bfloat16", "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
        "vision_config": sub("CLIPVisionTower", "vision", vision),
    })
}

/// How a synthetic tensor is filled.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Ones,
    Zeros,
    /// Uniform in ±scale.
    Uniform(f32),
}

/// Names and shapes of every tensor the loaders read, with their fill.
fn tensor_specs(c: &JanusConfig) -> Vec<(String, Vec<usize>, Fill)> {
    let mut out = Vec::new();
    let lin =
        |out: &mut Vec<(String, Vec<usize>, Fill)>, p: &str, i: usize, o: usize, bias: bool| {
            out.push((
                format!("{p}.weight"),
                vec![o, i],
                Fill::Uniform(1.0 / (i as f32).sqrt()),
            ));
            if bias {
                out.push((format!("{p}.bias"), vec![o], Fill::Zeros));
            }
        };
    let norm = |out: &mut Vec<(String, Vec<usize>, Fill)>, p: &str, n: usize, bias: bool| {
        out.push((format!("{p}.weight"), vec![n], Fill::Ones));
        if bias {
            out.push((format!("{p}.bias"), vec![n], Fill::Zeros));
        }
    };
    // Vision tower.
    let v = &c.vision;
    let vt = "vision_model.vision_tower";
    let p = v.patch_size;
    out.push((
        format!("{vt}.patch_embed.proj.weight"),
        vec![v.width, 3, p, p],
        Fill::Uniform(1.0 / ((3 * p * p) as f32).sqrt()),
    ));
    out.push((
        format!("{vt}.patch_embed.proj.bias"),
        vec![v.width],
        Fill::Zeros,
    ));
    out.push((
        format!("{vt}.pos_embed"),
        vec![1, v.num_patches(), v.width],
        Fill::Uniform(0.02),
    ));
    let mlp = (v.width as f64 * v.mlp_ratio) as usize;
    for b in 0..v.layers {
        let bp = format!("{vt}.blocks.{b}");
        norm(&mut out, &format!("{bp}.norm1"), v.width, true);
        lin(
            &mut out,
            &format!("{bp}.attn.qkv"),
            v.width,
            3 * v.width,
            true,
        );
        lin(&mut out, &format!("{bp}.attn.proj"), v.width, v.width, true);
        norm(&mut out, &format!("{bp}.norm2"), v.width, true);
        lin(&mut out, &format!("{bp}.mlp.fc1"), v.width, mlp, true);
        lin(&mut out, &format!("{bp}.mlp.fc2"), mlp, v.width, true);
    }
    norm(&mut out, &format!("{vt}.norm"), v.width, true);
    // Aligners and generation head.
    let a = &c.aligner;
    lin(&mut out, "aligner.layers.0", a.input_dim, a.n_embed, true);
    for d in 1..a.depth {
        lin(
            &mut out,
            &format!("aligner.layers.{}", 2 * d),
            a.n_embed,
            a.n_embed,
            true,
        );
    }
    let g = &c.gen_aligner;
    lin(
        &mut out,
        "gen_aligner.layers.0",
        g.input_dim,
        g.n_embed,
        true,
    );
    for d in 1..g.depth {
        lin(
            &mut out,
            &format!("gen_aligner.layers.{}", 2 * d),
            g.n_embed,
            g.n_embed,
            true,
        );
    }
    let gh = &c.gen_head;
    out.push((
        "gen_embed.weight".into(),
        vec![gh.image_token_size, gh.gen_embed_dim],
        Fill::Uniform(1.0),
    ));
    lin(
        &mut out,
        "gen_head.output_mlp_projector",
        gh.n_embed,
        gh.image_token_embed,
        true,
    );
    lin(
        &mut out,
        "gen_head.vision_head",
        gh.image_token_embed,
        gh.image_token_size,
        true,
    );
    // LLM.
    let l = &c.llm;
    let (h, i, kv) = (
        l.hidden_size,
        l.intermediate_size,
        l.kv_heads() * l.head_dim(),
    );
    out.push((
        "language_model.model.embed_tokens.weight".into(),
        vec![l.vocab_size, h],
        Fill::Uniform(1.0),
    ));
    for li in 0..l.num_hidden_layers {
        let lp = format!("language_model.model.layers.{li}");
        lin(&mut out, &format!("{lp}.self_attn.q_proj"), h, h, false);
        lin(&mut out, &format!("{lp}.self_attn.k_proj"), h, kv, false);
        lin(&mut out, &format!("{lp}.self_attn.v_proj"), h, kv, false);
        lin(&mut out, &format!("{lp}.self_attn.o_proj"), h, h, false);
        lin(&mut out, &format!("{lp}.mlp.gate_proj"), h, i, false);
        lin(&mut out, &format!("{lp}.mlp.up_proj"), h, i, false);
        lin(&mut out, &format!("{lp}.mlp.down_proj"), i, h, false);
        norm(&mut out, &format!("{lp}.input_layernorm"), h, false);
        norm(
            &mut out,
            &format!("{lp}.post_attention_layernorm"),
            h,
            false,
        );
    }
    norm(&mut out, "language_model.model.norm", h, false);
    lin(&mut out, "language_model.lm_head", h, l.vocab_size, false);
    // VQ model (encoder and decoder, as the real checkpoints hold both).
    vq_specs(c, &mut out);
    out
}

fn vq_specs(c: &JanusConfig, out: &mut Vec<(String, Vec<usize>, Fill)>) {
    let q = &c.vq;
    let conv =
        |out: &mut Vec<(String, Vec<usize>, Fill)>, p: &str, i: usize, o: usize, k: usize| {
            out.push((
                format!("{p}.weight"),
                vec![o, i, k, k],
                Fill::Uniform(1.0 / ((i * k * k) as f32).sqrt()),
            ));
            out.push((format!("{p}.bias"), vec![o], Fill::Zeros));
        };
    let gn = |out: &mut Vec<(String, Vec<usize>, Fill)>, p: &str, n: usize| {
        out.push((format!("{p}.weight"), vec![n], Fill::Ones));
        out.push((format!("{p}.bias"), vec![n], Fill::Zeros));
    };
    let res = |out: &mut Vec<(String, Vec<usize>, Fill)>, p: &str, i: usize, o: usize| {
        gn(out, &format!("{p}.norm1"), i);
        conv(out, &format!("{p}.conv1"), i, o, 3);
        gn(out, &format!("{p}.norm2"), o);
        conv(out, &format!("{p}.conv2"), o, o, 3);
        if i != o {
            conv(out, &format!("{p}.nin_shortcut"), i, o, 1);
        }
    };
    let attn = |out: &mut Vec<(String, Vec<usize>, Fill)>, p: &str, ch: usize| {
        gn(out, &format!("{p}.norm"), ch);
        for n in ["q", "k", "v", "proj_out"] {
            conv(out, &format!("{p}.{n}"), ch, ch, 1);
        }
    };
    let n = q.ch_mult.len();
    let g = "gen_vision_model";
    // Encoder.
    conv(out, &format!("{g}.encoder.conv_in"), 3, q.ch, 3);
    let mut in_mult = vec![1];
    in_mult.extend(&q.ch_mult);
    let mut block_in = q.ch;
    for (lvl, &mult_in) in in_mult.iter().enumerate().take(n) {
        block_in = q.ch * mult_in;
        let block_out = q.ch * q.ch_mult[lvl];
        for j in 0..q.num_res_blocks {
            res(
                out,
                &format!("{g}.encoder.conv_blocks.{lvl}.res.{j}"),
                block_in,
                block_out,
            );
            block_in = block_out;
            if lvl == n - 1 {
                attn(
                    out,
                    &format!("{g}.encoder.conv_blocks.{lvl}.attn.{j}"),
                    block_in,
                );
            }
        }
        if lvl != n - 1 {
            conv(
                out,
                &format!("{g}.encoder.conv_blocks.{lvl}.downsample.conv"),
                block_in,
                block_in,
                3,
            );
        }
    }
    res(out, &format!("{g}.encoder.mid.0"), block_in, block_in);
    attn(out, &format!("{g}.encoder.mid.1"), block_in);
    res(out, &format!("{g}.encoder.mid.2"), block_in, block_in);
    gn(out, &format!("{g}.encoder.norm_out"), block_in);
    conv(
        out,
        &format!("{g}.encoder.conv_out"),
        block_in,
        q.z_channels,
        3,
    );
    conv(
        out,
        &format!("{g}.quant_conv"),
        q.z_channels,
        q.codebook_embed_dim,
        1,
    );
    // Quantizer and decoder.
    out.push((
        format!("{g}.quantize.embedding.weight"),
        vec![q.codebook_size, q.codebook_embed_dim],
        Fill::Uniform(1.0),
    ));
    conv(
        out,
        &format!("{g}.post_quant_conv"),
        q.codebook_embed_dim,
        q.z_channels,
        1,
    );
    let mut block_in = q.ch * q.ch_mult[n - 1];
    conv(
        out,
        &format!("{g}.decoder.conv_in"),
        q.z_channels,
        block_in,
        3,
    );
    res(out, &format!("{g}.decoder.mid.0"), block_in, block_in);
    attn(out, &format!("{g}.decoder.mid.1"), block_in);
    res(out, &format!("{g}.decoder.mid.2"), block_in, block_in);
    for lvl in 0..n {
        let block_out = q.ch * q.ch_mult[n - 1 - lvl];
        for j in 0..=q.num_res_blocks {
            res(
                out,
                &format!("{g}.decoder.conv_blocks.{lvl}.res.{j}"),
                block_in,
                block_out,
            );
            block_in = block_out;
            if lvl == 0 {
                attn(
                    out,
                    &format!("{g}.decoder.conv_blocks.{lvl}.attn.{j}"),
                    block_in,
                );
            }
        }
        if lvl != n - 1 {
            conv(
                out,
                &format!("{g}.decoder.conv_blocks.{lvl}.upsample.conv"),
                block_in,
                block_in,
                3,
            );
        }
    }
    gn(out, &format!("{g}.decoder.norm_out"), block_in);
    conv(out, &format!("{g}.decoder.conv_out"), block_in, 3, 3);
}

/// A bf16 tensor whose bytes are generated when the writer asks for them, so a multi-GB
/// checkpoint never sits in memory at once.
struct LazyBf16 {
    shape: Vec<usize>,
    fill: Fill,
    seed: u64,
}

/// The value stream of one [`LazyBf16`].
struct FillGen {
    fill: Fill,
    s: u64,
}

impl FillGen {
    fn next(&mut self) -> f32 {
        match self.fill {
            Fill::Ones => 1.0f32,
            Fill::Zeros => 0.0,
            Fill::Uniform(scale) => {
                // xorshift64*: fast and good enough for random weights.
                let s = &mut self.s;
                *s ^= *s >> 12;
                *s ^= *s << 25;
                *s ^= *s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
                ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            }
        }
    }
}

/// Elements generated per piece when streaming a tensor to a file.
const STREAM_ELEMS: usize = 1 << 20;

impl LazyBf16 {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn gen(&self) -> FillGen {
        FillGen {
            fill: self.fill,
            s: self.seed | 1,
        }
    }

    /// Writes the little-endian bf16 bytes to `w`, [`STREAM_ELEMS`] at a time.
    fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut g = self.gen();
        let n = self.numel();
        let mut buf = Vec::with_capacity(STREAM_ELEMS.min(n) * 2);
        let mut done = 0;
        while done < n {
            let k = STREAM_ELEMS.min(n - done);
            buf.clear();
            for _ in 0..k {
                buf.extend_from_slice(&half::bf16::from_f32(g.next()).to_le_bytes());
            }
            w.write_all(&buf)?;
            done += k;
        }
        Ok(())
    }
}

impl View for LazyBf16 {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut bytes = Vec::with_capacity(self.numel() * 2);
        self.write_to(&mut bytes).expect("writing to a Vec");
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.numel() * 2
    }
}

const PREPROCESSOR: &str = r#"{"background_color": [127, 127, 127], "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "VLMImageProcessor", "image_size": 384, "image_std": [0.5, 0.5, 0.5], "min_size": 14, "processor_class": "VLChatProcessor", "rescale_factor": 0.00392156862745098}"#;
const PROCESSOR: &str = r#"{"add_special_token": false, "ignore_id": -100, "image_tag": "<image_placeholder>", "mask_prompt": true, "num_image_tokens": 576, "processor_class": "VLChatProcessor", "sft_format": "deepseek"}"#;
const TOKENIZER_CONFIG: &str = r#"{"add_bos_token": true, "add_eos_token": false, "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "pad_token": null, "clean_up_tokenization_spaces": false, "legacy": true, "model_max_length": 16384, "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": true, "unk_token": null}"#;

/// Weight file format of a synthetic checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One `model.safetensors`.
    #[default]
    Safetensors,
    /// PyTorch pickle as `torch.save` writes it and the hub ships Janus-Pro: one
    /// `pytorch_model.bin`, or `pytorch_model-0000N-of-0000M.bin` shards plus
    /// `pytorch_model.bin.index.json` when the tensors exceed one shard.
    Pth,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "safetensors" => Ok(Self::Safetensors),
            "pth" | "pytorch" | "bin" => Ok(Self::Pth),
            _ => Err(Error::invalid(
                "format",
                format!("unknown weight format '{s}' (safetensors, pth)"),
            )),
        }
    }
}

/// Largest pickle shard in bytes of tensor data: `save_pretrained`'s `max_shard_size="10GB"`,
/// with which the hub's checkpoints were written (Janus-Pro-7B: 2 shards; Janus-Pro-1B: one
/// `pytorch_model.bin`).
pub const DEFAULT_SHARD_BYTES: u64 = 10_000_000_000;

/// How to write a synthetic checkpoint.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Override of the number of LLM layers.
    pub llm_layers: Option<usize>,
    /// Seed of the random weights (equal seeds give equal weights in every format).
    pub seed: u64,
    /// Weight file format.
    pub format: Format,
    /// Largest pickle shard ([`Format::Pth`]), in bytes of tensor data.
    pub shard_bytes: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            llm_layers: None,
            seed: 0,
            format: Format::Safetensors,
            shard_bytes: DEFAULT_SHARD_BYTES,
        }
    }
}

/// Writes a random-weight checkpoint for `preset` into `out` (created), using `tokenizer_json`,
/// as one `model.safetensors`. Returns the number of parameters written.
pub fn write_checkpoint(
    preset: Preset,
    llm_layers: Option<usize>,
    tokenizer_json: &Path,
    out: &Path,
    seed: u64,
) -> Result<u64> {
    write_checkpoint_with(
        preset,
        tokenizer_json,
        out,
        &SynthOptions {
            llm_layers,
            seed,
            ..Default::default()
        },
    )
}

/// Writes a random-weight checkpoint for `preset` into `out` (created) in `opts.format`,
/// streaming: at most one tensor's bytes (safetensors) or one piece of a tensor (pickle) is in
/// memory. Returns the number of parameters written.
pub fn write_checkpoint_with(
    preset: Preset,
    tokenizer_json: &Path,
    out: &Path,
    opts: &SynthOptions,
) -> Result<u64> {
    let config = preset_config(preset, opts.llm_layers);
    let parsed = JanusConfig::from_json(&config.to_string())?;
    let tok = tokenizers::Tokenizer::from_file(tokenizer_json)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
    if tok.get_vocab_size(true) > parsed.llm.vocab_size {
        return Err(Error::Tokenizer(format!(
            "tokenizer has {} tokens but the {preset:?} vocabulary is {}",
            tok.get_vocab_size(true),
            parsed.llm.vocab_size
        )));
    }
    let io = |e: std::io::Error| Error::Weights(format!("{}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(io)?;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .map_err(io)?;
    std::fs::copy(tokenizer_json, out.join("tokenizer.json")).map_err(io)?;
    std::fs::write(out.join("tokenizer_config.json"), TOKENIZER_CONFIG).map_err(io)?;
    std::fs::write(out.join("preprocessor_config.json"), PREPROCESSOR).map_err(io)?;
    std::fs::write(out.join("processor_config.json"), PROCESSOR).map_err(io)?;
    let specs = tensor_specs(&parsed);
    let params: u64 = specs
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>() as u64)
        .sum();
    let seed = opts.seed;
    let views: Vec<(String, LazyBf16)> = specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, fill))| {
            (
                name,
                LazyBf16 {
                    shape,
                    fill,
                    seed: seed
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add(i as u64 + 1),
                },
            )
        })
        .collect();
    match opts.format {
        Format::Safetensors => {
            safetensors::serialize_to_file(views, None, &out.join("model.safetensors"))
                .map_err(|e| Error::Weights(format!("writing model.safetensors: {e}")))?
        }
        Format::Pth => pth::write_sharded(&views, out, opts.shard_bytes)?,
    }
    Ok(params)
}

/// PyTorch's zip checkpoint format, as `torch.save(state_dict, path)` writes it.
mod pth {
    use super::LazyBf16;
    use janus_pipeline::error::{Error, Result};
    use std::io::Write;
    use std::path::Path;

    /// Splits `tensors` into shards the way `transformers`' `shard_checkpoint` does (in order,
    /// a new shard when the next tensor would overflow a non-empty one) and writes them with
    /// the index, or a single `pytorch_model.bin` when everything fits in one.
    pub(super) fn write_sharded(
        tensors: &[(String, LazyBf16)],
        out: &Path,
        shard_bytes: u64,
    ) -> Result<()> {
        let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
        let mut size = 0u64;
        for (i, (_, t)) in tensors.iter().enumerate() {
            let n = t.numel() as u64 * 2;
            let last = shards.last_mut().expect("one shard");
            if size + n > shard_bytes && !last.is_empty() {
                shards.push(vec![i]);
                size = n;
            } else {
                last.push(i);
                size += n;
            }
        }
        if shards.len() == 1 {
            return write_shard(tensors, &shards[0], &out.join("pytorch_model.bin"));
        }
        let count = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for (k, shard) in shards.iter().enumerate() {
            let name = format!("pytorch_model-{:05}-of-{count:05}.bin", k + 1);
            write_shard(tensors, shard, &out.join(&name))?;
            for &i in shard {
                weight_map.insert(tensors[i].0.clone(), name.clone().into());
                total += tensors[i].1.numel() as u64 * 2;
            }
        }
        // serde_json's map is sorted, as `json.dumps(index, indent=2, sort_keys=True)`.
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let path = out.join("pytorch_model.bin.index.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&index).expect("json") + "\n",
        )
        .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))
    }

    /// Record name prefix inside the zip archive.
    const ARCHIVE: &str = "archive";

    /// Writes one `torch.save` zip: `archive/data.pkl` (the state dict: an `OrderedDict` of
    /// `torch._utils._rebuild_tensor_v2` over `torch.BFloat16Storage` persistent ids),
    /// `archive/byteorder`, `archive/data/<key>` (one storage per tensor, stored uncompressed and
    /// 64-byte aligned, streamed) and `archive/version`.
    fn write_shard(tensors: &[(String, LazyBf16)], which: &[usize], path: &Path) -> Result<()> {
        let fail = |e: String| Error::Weights(format!("writing {}: {e}", path.display()));
        let file = std::fs::File::create(path).map_err(|e| fail(e.to_string()))?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::with_capacity(8 << 20, file));
        let opts = |large: bool| {
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored)
                .with_alignment(64)
                .large_file(large)
        };
        let entries: Vec<(&str, &[usize])> = which
            .iter()
            .map(|&i| (tensors[i].0.as_str(), tensors[i].1.shape.as_slice()))
            .collect();
        let pkl = state_dict_pickle(&entries);
        let mut put =
            |name: &str, large: bool, f: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>| {
                zip.start_file(format!("{ARCHIVE}/{name}"), opts(large))
                    .map_err(|e| fail(format!("{name}: {e}")))?;
                f(&mut zip).map_err(|e| fail(format!("{name}: {e}")))
            };
        put("data.pkl", false, &mut |w| w.write_all(&pkl))?;
        put("byteorder", false, &mut |w| w.write_all(b"little"))?;
        for (key, &i) in which.iter().enumerate() {
            let t = &tensors[i].1;
            let large = t.numel() as u64 * 2 >= u32::MAX as u64;
            put(&format!("data/{key}"), large, &mut |w| {
                let mut w = w;
                t.write_to(&mut w)
            })?;
        }
        put("version", false, &mut |w| w.write_all(b"3\n"))?;
        let mut inner = zip.finish().map_err(|e| fail(e.to_string()))?;
        inner.flush().map_err(|e| fail(e.to_string()))
    }

    /// Pickle (protocol 2) opcodes used below.
    mod op {
        pub const PROTO: u8 = 0x80;
        pub const GLOBAL: u8 = b'c';
        pub const BINPUT: u8 = b'q';
        pub const BINGET: u8 = b'h';
        pub const EMPTY_TUPLE: u8 = b')';
        pub const REDUCE: u8 = b'R';
        pub const MARK: u8 = b'(';
        pub const TUPLE: u8 = b't';
        pub const BINUNICODE: u8 = b'X';
        pub const BININT1: u8 = b'K';
        pub const BININT2: u8 = b'M';
        pub const BININT: u8 = b'J';
        pub const LONG1: u8 = 0x8a;
        pub const BINPERSID: u8 = b'Q';
        pub const NEWFALSE: u8 = 0x89;
        pub const SETITEMS: u8 = b'u';
        pub const STOP: u8 = b'.';
    }

    struct Pickler(Vec<u8>);

    impl Pickler {
        fn op(&mut self, o: u8) {
            self.0.push(o);
        }
        fn global(&mut self, module: &str, name: &str) {
            self.op(op::GLOBAL);
            self.0.extend_from_slice(module.as_bytes());
            self.0.push(b'\n');
            self.0.extend_from_slice(name.as_bytes());
            self.0.push(b'\n');
        }
        fn put(&mut self, memo: u8) {
            self.0.extend_from_slice(&[op::BINPUT, memo]);
        }
        fn get(&mut self, memo: u8) {
            self.0.extend_from_slice(&[op::BINGET, memo]);
        }
        fn str(&mut self, s: &str) {
            self.op(op::BINUNICODE);
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
        }
        /// A non-negative int with the smallest opcode pickle would pick.
        fn int(&mut self, v: u64) {
            if v < 0x100 {
                self.0.extend_from_slice(&[op::BININT1, v as u8]);
            } else if v < 0x1_0000 {
                self.op(op::BININT2);
                self.0.extend_from_slice(&(v as u16).to_le_bytes());
            } else if v < 0x8000_0000 {
                self.op(op::BININT);
                self.0.extend_from_slice(&(v as u32).to_le_bytes());
            } else {
                // LONG1: little-endian two's complement, a zero top bit for a positive value.
                let mut bytes = v.to_le_bytes().to_vec();
                while bytes.len() > 1
                    && bytes[bytes.len() - 1] == 0
                    && bytes[bytes.len() - 2] < 0x80
                {
                    bytes.pop();
                }
                if bytes[bytes.len() - 1] >= 0x80 {
                    bytes.push(0);
                }
                self.0.extend_from_slice(&[op::LONG1, bytes.len() as u8]);
                self.0.extend_from_slice(&bytes);
            }
        }
        fn int_tuple(&mut self, v: &[u64]) {
            if v.is_empty() {
                self.op(op::EMPTY_TUPLE);
                return;
            }
            self.op(op::MARK);
            for &x in v {
                self.int(x);
            }
            self.op(op::TUPLE);
        }
    }

    /// `data.pkl` of a state dict of contiguous bf16 tensors; tensor `i` views storage `"i"`.
    pub(super) fn state_dict_pickle(entries: &[(&str, &[usize])]) -> Vec<u8> {
        // Memo slots (as torch's pickler, shared objects are memoized and fetched back).
        const ORDERED_DICT: u8 = 0;
        const REBUILD: u8 = 1;
        const STORAGE: u8 = 2;
        const BF16_STORAGE: u8 = 3;
        const CPU: u8 = 4;
        let mut p = Pickler(Vec::with_capacity(64 + entries.len() * 160));
        p.0.extend_from_slice(&[op::PROTO, 2]);
        p.global("collections", "OrderedDict");
        p.put(ORDERED_DICT);
        p.op(op::EMPTY_TUPLE);
        p.op(op::REDUCE);
        let mut first = true;
        // SETITEMS in batches of 1000, as pickle's `_batch_setitems`.
        for (batch, chunk) in entries.chunks(1000).enumerate() {
            p.op(op::MARK);
            for (j, (name, shape)) in chunk.iter().enumerate() {
                let key = batch * 1000 + j;
                p.str(name);
                if first {
                    p.global("torch._utils", "_rebuild_tensor_v2");
                    p.put(REBUILD);
                } else {
                    p.get(REBUILD);
                }
                p.op(op::MARK);
                // The persistent id: ('storage', torch.BFloat16Storage, key, 'cpu', numel).
                p.op(op::MARK);
                if first {
                    p.str("storage");
                    p.put(STORAGE);
                    p.global("torch", "BFloat16Storage");
                    p.put(BF16_STORAGE);
                } else {
                    p.get(STORAGE);
                    p.get(BF16_STORAGE);
                }
                p.str(&key.to_string());
                if first {
                    p.str("cpu");
                    p.put(CPU);
                } else {
                    p.get(CPU);
                }
                let numel: usize = shape.iter().product();
                p.int(numel as u64);
                p.op(op::TUPLE);
                p.op(op::BINPERSID);
                // storage_offset, size, stride (row-major), requires_grad, backward_hooks.
                p.int(0);
                let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                p.int_tuple(&dims);
                let mut strides = vec![1u64; dims.len()];
                for k in (0..dims.len().saturating_sub(1)).rev() {
                    strides[k] = strides[k + 1] * dims[k + 1];
                }
                p.int_tuple(&strides);
                p.op(op::NEWFALSE);
                p.get(ORDERED_DICT);
                p.op(op::EMPTY_TUPLE);
                p.op(op::REDUCE);
                p.op(op::TUPLE);
                p.op(op::REDUCE);
                first = false;
            }
            p.op(op::SETITEMS);
        }
        p.op(op::STOP);
        p.0
    }
}
