//! Random-weight checkpoints in the DeepSeek layout, at real shapes, for benchmarks, load tests
//! and cluster smoke tests without a 15 GB download.

use crate::config::JanusConfig;
use crate::error::{Error, Result};
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
    for lvl in 0..n {
        block_in = q.ch * in_mult[lvl];
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

impl View for LazyBf16 {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let n: usize = self.shape.iter().product();
        let mut bytes = Vec::with_capacity(n * 2);
        let mut s = self.seed | 1;
        for _ in 0..n {
            let v = match self.fill {
                Fill::Ones => 1.0f32,
                Fill::Zeros => 0.0,
                Fill::Uniform(scale) => {
                    // xorshift64*: fast and good enough for random weights.
                    s ^= s >> 12;
                    s ^= s << 25;
                    s ^= s >> 27;
                    let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
                    ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                }
            };
            bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        }
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

const PREPROCESSOR: &str = r#"{"background_color": [127, 127, 127], "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "VLMImageProcessor", "image_size": 384, "image_std": [0.5, 0.5, 0.5], "min_size": 14, "processor_class": "VLChatProcessor", "rescale_factor": 0.00392156862745098}"#;
const PROCESSOR: &str = r#"{"add_special_token": false, "ignore_id": -100, "image_tag": "<image_placeholder>", "mask_prompt": true, "num_image_tokens": 576, "processor_class": "VLChatProcessor", "sft_format": "deepseek"}"#;
const TOKENIZER_CONFIG: &str = r#"{"add_bos_token": true, "add_eos_token": false, "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "pad_token": null, "clean_up_tokenization_spaces": false, "legacy": true, "model_max_length": 16384, "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": true, "unk_token": null}"#;

/// Writes a random-weight checkpoint for `preset` into `out` (created), using `tokenizer_json`.
/// Returns the number of parameters written.
pub fn write_checkpoint(
    preset: Preset,
    llm_layers: Option<usize>,
    tokenizer_json: &Path,
    out: &Path,
    seed: u64,
) -> Result<u64> {
    let config = preset_config(preset, llm_layers);
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
    let views = specs
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
        });
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors"))
        .map_err(|e| Error::Weights(format!("writing model.safetensors: {e}")))?;
    Ok(params)
}
