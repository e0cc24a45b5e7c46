//! `config.json` of a Janus checkpoint in either layout ([`crate::layout::Layout`], by
//! `model_type`), and the image processor's settings.
//!
//! DeepSeek's (`"multi_modality"`): six sub-configs; the real checkpoints name their vision tower
//! and VQ model and leave sizes to code, so known names resolve to presets and explicit `params`
//! override them (the tiny fixture uses other names with every size spelled out).
//!
//! transformers' (`"janus"`, a `JanusConfig`): `text_config` (a `LlamaConfig`), `vision_config`
//! (`JanusVisionConfig`, which also holds the understanding aligner's width and depth as
//! `projection_dim` / `depth`), `vq_config` (`JanusVQVAEConfig`, which also holds the generation
//! aligner's and head's widths) and `image_token_id`; absent fields take those classes' defaults,
//! which are Janus-Pro-1B's SigLIP-L and VQ-16 shapes ([`JanusConfig::from_hf`]).

use crate::error::{Error, Result};
use crate::layout::Layout;
use janus_llm::LlmConfig;
use janus_vision::VisionConfig;
use janus_vq::VqConfig;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// A `{cls, model_type, params}` sub-config.
#[derive(Debug, Clone, Deserialize, Default)]
struct SubConfig {
    #[serde(default)]
    cls: String,
    #[serde(default)]
    params: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    language_config: LlmConfig,
    vision_config: SubConfig,
    aligner_config: SubConfig,
    gen_vision_config: SubConfig,
    gen_aligner_config: SubConfig,
    gen_head_config: SubConfig,
}

/// A `MlpProjector` (`mlp_gelu`) shape.
#[derive(Debug, Clone, PartialEq)]
pub struct AlignerConfig {
    /// Input width.
    pub input_dim: usize,
    /// Output (and hidden) width.
    pub n_embed: usize,
    /// Number of linear layers.
    pub depth: usize,
}

/// Shapes of the generation head and the image-token embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct GenHeadConfig {
    /// LLM hidden size fed to the head.
    pub n_embed: usize,
    /// Width of the head's projection.
    pub image_token_embed: usize,
    /// Number of image codes (16384).
    pub image_token_size: usize,
    /// Width of `gen_embed` rows (8).
    pub gen_embed_dim: usize,
}

/// The parsed, validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct JanusConfig {
    /// The language model.
    pub llm: LlmConfig,
    /// The understanding vision tower.
    pub vision: VisionConfig,
    /// Understanding aligner (vision width → LLM width).
    pub aligner: AlignerConfig,
    /// The VQ tokenizer.
    pub vq: VqConfig,
    /// Generation aligner (code embedding → LLM width).
    pub gen_aligner: AlignerConfig,
    /// Generation head and code embedding.
    pub gen_head: GenHeadConfig,
    /// The layout `config.json` (and so the tensor names) is in.
    pub layout: Layout,
    /// transformers' `image_token_id` (the id of `<image_placeholder>`; checked against the
    /// tokenizer). DeepSeek's config has none.
    pub image_token_id: Option<u32>,
}

fn param_usize(p: &serde_json::Map<String, Value>, k: &str) -> Result<Option<usize>> {
    match p.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|v| Some(v as usize))
            .ok_or_else(|| Error::Config {
                file: "config.json".into(),
                reason: format!("params.{k} must be a non-negative integer, got {v}"),
            }),
    }
}

fn param_f64(p: &serde_json::Map<String, Value>, k: &str) -> Result<Option<f64>> {
    match p.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| Error::Config {
            file: "config.json".into(),
            reason: format!("params.{k} must be a number, got {v}"),
        }),
    }
}

fn required(v: Option<usize>, what: &str) -> Result<usize> {
    v.ok_or_else(|| Error::Config {
        file: "config.json".into(),
        reason: format!("missing {what}"),
    })
}

fn aligner(sub: &SubConfig, name: &str) -> Result<AlignerConfig> {
    let p = &sub.params;
    if let Some(t) = p.get("projector_type").and_then(|v| v.as_str()) {
        if t != "mlp_gelu" {
            return Err(Error::Config {
                file: "config.json".into(),
                reason: format!(
                    "{name}.params.projector_type '{t}' is not supported (only mlp_gelu)"
                ),
            });
        }
    }
    Ok(AlignerConfig {
        input_dim: required(
            param_usize(p, "input_dim")?,
            &format!("{name}.params.input_dim"),
        )?,
        n_embed: required(
            param_usize(p, "n_embed")?,
            &format!("{name}.params.n_embed"),
        )?,
        depth: param_usize(p, "depth")?.unwrap_or(2),
    })
}

fn vision(sub: &SubConfig) -> Result<VisionConfig> {
    let p = &sub.params;
    let name = p.get("model_name").and_then(|v| v.as_str()).unwrap_or("");
    let explicit = [
        param_usize(p, "width")?,
        param_usize(p, "layers")?,
        param_usize(p, "heads")?,
        param_usize(p, "patch_size")?,
    ];
    let mut cfg = match name {
        "siglip_large_patch16_384" => VisionConfig::siglip_large_patch16_384(),
        _ if explicit.iter().all(Option::is_some) && param_f64(p, "mlp_ratio")?.is_some() => {
            VisionConfig::siglip_large_patch16_384()
        }
        _ => return Err(Error::UnknownVisionTower(name.to_string())),
    };
    if let Some(v) = explicit[0] {
        cfg.width = v;
    }
    if let Some(v) = explicit[1] {
        cfg.layers = v;
    }
    if let Some(v) = explicit[2] {
        cfg.heads = v;
    }
    if let Some(v) = explicit[3] {
        cfg.patch_size = v;
    }
    if let Some(v) = param_f64(p, "mlp_ratio")? {
        cfg.mlp_ratio = v;
    }
    if let Some(v) = param_usize(p, "image_size")? {
        cfg.image_size = v;
    }
    if let Some(sel) = p.get("select_layer").and_then(|v| v.as_i64()) {
        if sel != -1 {
            return Err(Error::Config {
                file: "config.json".into(),
                reason: format!(
                    "vision_config.params.select_layer {sel} is not supported (only -1)"
                ),
            });
        }
    }
    if cfg.heads == 0
        || cfg.width % cfg.heads != 0
        || cfg.patch_size == 0
        || cfg.image_size % cfg.patch_size != 0
    {
        return Err(Error::Config {
            file: "config.json".into(),
            reason: format!("inconsistent vision tower shape {cfg:?}"),
        });
    }
    Ok(cfg)
}

fn vq(sub: &SubConfig) -> Result<VqConfig> {
    let p = &sub.params;
    let ch_mult: Option<Vec<usize>> = match p.get("ch_mult") {
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::Config {
                    file: "config.json".into(),
                    reason: "gen_vision_config.params.ch_mult must be a list of integers".into(),
                })?,
        ),
        _ => None,
    };
    let keys = [
        "ch",
        "z_channels",
        "num_res_blocks",
        "codebook_size",
        "codebook_embed_dim",
    ];
    let vals = keys
        .iter()
        .map(|k| param_usize(p, k))
        .collect::<Result<Vec<_>>>()?;
    let mut cfg = match sub.cls.as_str() {
        "VQ-16" => VqConfig::vq_16(),
        _ if ch_mult.is_some() && vals.iter().all(Option::is_some) => VqConfig::vq_16(),
        other => return Err(Error::UnknownVqModel(other.to_string())),
    };
    if let Some(m) = ch_mult {
        cfg.ch_mult = m;
    }
    let [ch, z, nrb, cs, ce] = [vals[0], vals[1], vals[2], vals[3], vals[4]];
    if let Some(v) = ch {
        cfg.ch = v;
    }
    if let Some(v) = z {
        cfg.z_channels = v;
    }
    if let Some(v) = nrb {
        cfg.num_res_blocks = v;
    }
    if let Some(v) = cs {
        cfg.codebook_size = v;
    }
    if let Some(v) = ce {
        cfg.codebook_embed_dim = v;
    }
    // Legacy names of the real config.
    if let Some(v) = param_usize(p, "image_token_size")? {
        cfg.codebook_size = v;
    }
    if let Some(v) = param_usize(p, "n_embed")? {
        cfg.codebook_embed_dim = v;
    }
    if cfg.ch_mult.is_empty()
        || cfg.ch == 0
        || (cfg.ch * cfg.ch_mult.iter().min().copied().unwrap_or(0)) % 32 != 0
    {
        return Err(Error::Config {
            file: "config.json".into(),
            reason: format!(
                "inconsistent VQ shape {cfg:?} (channels must be multiples of 32 for GroupNorm)"
            ),
        });
    }
    Ok(cfg)
}

impl JanusConfig {
    /// Parses a `config.json` text in either layout, as its `model_type` says.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            file: "config.json".into(),
            reason: e.to_string(),
        })?;
        match Layout::of_config(&value)? {
            Layout::DeepSeek => Self::from_deepseek(value),
            Layout::Transformers => Self::from_hf(&value),
        }
    }

    /// DeepSeek's `config.json` (`model_type: "multi_modality"`).
    fn from_deepseek(value: Value) -> Result<Self> {
        let raw: RawConfig = serde_json::from_value(value).map_err(|e| Error::Config {
            file: "config.json".into(),
            reason: e.to_string(),
        })?;
        raw.llm_check()?;
        let vq = vq(&raw.gen_vision_config)?;
        let gh = &raw.gen_head_config.params;
        let gen_head = GenHeadConfig {
            n_embed: param_usize(gh, "n_embed")?.unwrap_or(raw.language_config.hidden_size),
            image_token_embed: param_usize(gh, "image_token_embed")?
                .unwrap_or(raw.language_config.hidden_size),
            image_token_size: param_usize(gh, "image_token_size")?.unwrap_or(vq.codebook_size),
            gen_embed_dim: param_usize(&raw.gen_vision_config.params, "n_embed")?
                .unwrap_or(vq.codebook_embed_dim),
        };
        let cfg = Self {
            llm: raw.language_config.clone(),
            vision: vision(&raw.vision_config)?,
            aligner: aligner(&raw.aligner_config, "aligner_config")?,
            vq,
            gen_aligner: aligner(&raw.gen_aligner_config, "gen_aligner_config")?,
            gen_head,
            layout: Layout::DeepSeek,
            image_token_id: None,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// transformers' `config.json` (`model_type: "janus"`, a `JanusConfig` as
    /// `convert_janus_weights_to_hf.py` writes it). Every number is read where transformers'
    /// `JanusForConditionalGeneration` reads it:
    ///
    /// - LLM: `text_config` (a `LlamaConfig`, its defaults; `rope_theta` or transformers 5's
    ///   `rope_parameters.rope_theta`). `lm_head` is always loaded (Janus-Pro's is untied, whatever
    ///   the top-level `tie_word_embeddings` says).
    /// - vision tower: `vision_config.{hidden_size, num_hidden_layers, num_attention_heads,
    ///   patch_size, image_size, mlp_ratio}`; aligner: `hidden_size` → `projection_dim`, `depth`
    ///   linear layers.
    /// - VQ: `vq_config.{base_channels, channel_multiplier, latent_channels, num_res_blocks,
    ///   num_embeddings, embed_dim}`; generation aligner: `embed_dim` → `projection_dim`,
    ///   `num_hidden_layers` linear layers (the script also writes a `depth`, which the model
    ///   ignores); head: `image_token_embed_dim` → `projection_dim` → `num_embeddings`.
    ///
    /// Settings this implementation does not have (another activation, qk-norm, no attention
    /// bias, LayerNorm eps other than 1e-6, RoPE scaling, a double latent) are refused by name.
    pub fn from_hf(v: &Value) -> Result<Self> {
        let text = hf_section(v, "text_config")?;
        let vis = hf_section(v, "vision_config")?;
        let vqc = hf_section(v, "vq_config")?;
        let llm = hf_llm(text)?;

        let mut vision = VisionConfig::siglip_large_patch16_384();
        let vu = |k: &str| hf_usize(vis, "vision_config", k);
        if let Some(x) = vu("hidden_size")? {
            vision.width = x;
        }
        if let Some(x) = vu("num_hidden_layers")? {
            vision.layers = x;
        }
        if let Some(x) = vu("num_attention_heads")? {
            vision.heads = x;
        }
        if let Some(x) = vu("patch_size")? {
            vision.patch_size = x;
        }
        if let Some(x) = vu("image_size")? {
            vision.image_size = x;
        }
        if let Some(x) = hf_f64(vis, "vision_config", "mlp_ratio")? {
            vision.mlp_ratio = x;
        }
        hf_expect_str(vis, "vision_config", "hidden_act", &["gelu"])?;
        hf_expect(vis, "vision_config", "use_qk_norm", &Value::Bool(false))?;
        hf_expect(vis, "vision_config", "attention_bias", &Value::Bool(true))?;
        hf_expect_num(vis, "vision_config", "num_channels", 3.0)?;
        hf_expect_num(vis, "vision_config", "layer_norm_eps", 1e-6)?;
        if vision.heads == 0
            || !vision.width.is_multiple_of(vision.heads)
            || vision.patch_size == 0
            || !vision.image_size.is_multiple_of(vision.patch_size)
        {
            return Err(Error::Config {
                file: "config.json".into(),
                reason: format!("inconsistent vision_config shape {vision:?}"),
            });
        }
        let aligner = AlignerConfig {
            input_dim: vision.width,
            n_embed: vu("projection_dim")?.unwrap_or(2048),
            depth: vu("depth")?.unwrap_or(2),
        };

        let mut vq = VqConfig::vq_16();
        let qu = |k: &str| hf_usize(vqc, "vq_config", k);
        if let Some(x) = qu("base_channels")? {
            vq.ch = x;
        }
        if let Some(m) = vqc.get("channel_multiplier").filter(|m| !m.is_null()) {
            vq.ch_mult = m
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().map(|x| x as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| Error::Config {
                    file: "config.json".into(),
                    reason: format!(
                        "vq_config.channel_multiplier must be a list of integers, got {m}"
                    ),
                })?;
        }
        if let Some(x) = qu("latent_channels")? {
            vq.z_channels = x;
        }
        if let Some(x) = qu("num_res_blocks")? {
            vq.num_res_blocks = x;
        }
        if let Some(x) = qu("num_embeddings")? {
            vq.codebook_size = x;
        }
        if let Some(x) = qu("embed_dim")? {
            vq.codebook_embed_dim = x;
        }
        hf_expect(vqc, "vq_config", "double_latent", &Value::Bool(false))?;
        hf_expect_str(vqc, "vq_config", "hidden_act", &["gelu"])?;
        hf_expect_num(vqc, "vq_config", "in_channels", 3.0)?;
        hf_expect_num(vqc, "vq_config", "out_channels", 3.0)?;
        if vq.ch_mult.is_empty()
            || vq.ch == 0
            || !(vq.ch * vq.ch_mult.iter().min().copied().unwrap_or(0)).is_multiple_of(32)
        {
            return Err(Error::Config {
                file: "config.json".into(),
                reason: format!(
                    "inconsistent vq_config shape {vq:?} (channels must be multiples of 32 for GroupNorm)"
                ),
            });
        }
        let projection = qu("projection_dim")?.unwrap_or(2048);
        let gen_aligner = AlignerConfig {
            input_dim: vq.codebook_embed_dim,
            n_embed: projection,
            depth: qu("num_hidden_layers")?.unwrap_or(2),
        };
        let gen_head = GenHeadConfig {
            n_embed: qu("image_token_embed_dim")?.unwrap_or(2048),
            image_token_embed: projection,
            image_token_size: vq.codebook_size,
            gen_embed_dim: vq.codebook_embed_dim,
        };
        let image_token_id = match hf_usize(v, "config", "image_token_id")? {
            Some(x) => u32::try_from(x).map_err(|_| Error::Config {
                file: "config.json".into(),
                reason: format!("image_token_id {x} is out of range"),
            })?,
            None => 100581, // JanusConfig's default (Janus-Pro-1B's id)
        };
        let cfg = Self {
            llm,
            vision,
            aligner,
            vq,
            gen_aligner,
            gen_head,
            layout: Layout::Transformers,
            image_token_id: Some(image_token_id),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|_| Error::MissingFile {
            path: path.clone(),
            what: "model configuration",
        })?;
        Self::from_json(&text)
    }

    fn check(&self) -> Result<()> {
        let h = self.llm.hidden_size;
        let bad = |reason: String| {
            Err(Error::Config {
                file: "config.json".into(),
                reason,
            })
        };
        if self.aligner.input_dim != self.vision.width {
            return bad(format!(
                "aligner input_dim {} != vision width {}",
                self.aligner.input_dim, self.vision.width
            ));
        }
        if self.aligner.n_embed != h || self.gen_aligner.n_embed != h || self.gen_head.n_embed != h
        {
            return bad(format!(
                "aligner/gen_aligner/gen_head widths must equal hidden_size {h}"
            ));
        }
        if self.gen_aligner.input_dim != self.gen_head.gen_embed_dim {
            return bad(format!(
                "gen_aligner input_dim {} != gen_embed width {}",
                self.gen_aligner.input_dim, self.gen_head.gen_embed_dim
            ));
        }
        if self.gen_head.image_token_size != self.vq.codebook_size {
            return bad(format!(
                "gen_head image_token_size {} != VQ codebook size {}",
                self.gen_head.image_token_size, self.vq.codebook_size
            ));
        }
        Ok(())
    }

    /// Image tokens per generated image (24 × 24 = 576 for a 384 px output of VQ-16).
    pub fn image_tokens(&self) -> usize {
        let side = self.vision.image_size / self.vq.downsample();
        side * side
    }
}

fn hf_section<'a>(v: &'a Value, key: &str) -> Result<&'a serde_json::Map<String, Value>> {
    match v.get(key) {
        Some(Value::Object(m)) => Ok(m),
        None | Some(Value::Null) => Err(Error::Config {
            file: "config.json".into(),
            reason: format!("model_type \"janus\" needs a {key} object (none found)"),
        }),
        Some(other) => Err(Error::Config {
            file: "config.json".into(),
            reason: format!("{key} must be an object, got {other}"),
        }),
    }
}

fn hf_usize(obj: &impl HfGet, section: &str, k: &str) -> Result<Option<usize>> {
    match obj.field(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|v| Some(v as usize))
            .ok_or_else(|| Error::Config {
                file: "config.json".into(),
                reason: format!("{section}.{k} must be a non-negative integer, got {v}"),
            }),
    }
}

fn hf_f64(obj: &impl HfGet, section: &str, k: &str) -> Result<Option<f64>> {
    match obj.field(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| Error::Config {
            file: "config.json".into(),
            reason: format!("{section}.{k} must be a number, got {v}"),
        }),
    }
}

/// A setting this implementation has only one value of: absent or that value.
fn hf_expect(obj: &impl HfGet, section: &str, k: &str, want: &Value) -> Result<()> {
    match obj.field(k) {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v == want => Ok(()),
        Some(v) => Err(Error::Config {
            file: "config.json".into(),
            reason: format!("{section}.{k} = {v} is not supported (only {want})"),
        }),
    }
}

fn hf_expect_num(obj: &impl HfGet, section: &str, k: &str, want: f64) -> Result<()> {
    match hf_f64(obj, section, k)? {
        None => Ok(()),
        Some(v) if (v - want).abs() <= want.abs() * 1e-9 => Ok(()),
        Some(v) => Err(Error::Config {
            file: "config.json".into(),
            reason: format!("{section}.{k} = {v} is not supported (only {want})"),
        }),
    }
}

fn hf_expect_str(obj: &impl HfGet, section: &str, k: &str, allowed: &[&str]) -> Result<()> {
    match obj.field(k) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
        Some(v) => Err(Error::Config {
            file: "config.json".into(),
            reason: format!(
                "{section}.{k} = {v} is not supported (only {})",
                allowed.join(", ")
            ),
        }),
    }
}

/// A JSON object's field (the top level is a `Value`, the sections are maps).
trait HfGet {
    fn field(&self, k: &str) -> Option<&Value>;
}

impl HfGet for Value {
    fn field(&self, k: &str) -> Option<&Value> {
        self.get(k)
    }
}

impl HfGet for serde_json::Map<String, Value> {
    fn field(&self, k: &str) -> Option<&Value> {
        self.get(k)
    }
}

/// `text_config` (a `LlamaConfig` as transformers 4 or 5 writes it) as [`LlmConfig`].
fn hf_llm(text: &serde_json::Map<String, Value>) -> Result<LlmConfig> {
    const S: &str = "text_config";
    hf_expect_str(text, S, "model_type", &["llama"])?;
    hf_expect_str(text, S, "hidden_act", &["silu"])?;
    hf_expect(text, S, "attention_bias", &Value::Bool(false))?;
    hf_expect(text, S, "mlp_bias", &Value::Bool(false))?;
    // RoPE: transformers 4 writes `rope_theta` and `rope_scaling`, 5 `rope_parameters`.
    let mut theta = hf_f64(text, S, "rope_theta")?;
    if let Some(p) = text.get("rope_parameters").filter(|p| !p.is_null()) {
        let p = p.as_object().ok_or_else(|| Error::Config {
            file: "config.json".into(),
            reason: format!("{S}.rope_parameters must be an object, got {p}"),
        })?;
        hf_expect_str(p, "text_config.rope_parameters", "rope_type", &["default"])?;
        if let Some(t) = hf_f64(p, "text_config.rope_parameters", "rope_theta")? {
            theta = Some(t);
        }
    }
    if let Some(r) = text.get("rope_scaling").filter(|r| !r.is_null()) {
        let kind = r
            .get("rope_type")
            .or_else(|| r.get("type"))
            .and_then(|t| t.as_str());
        if kind != Some("default") {
            return Err(Error::Config {
                file: "config.json".into(),
                reason: format!("{S}.rope_scaling {r} is not supported (plain RoPE only)"),
            });
        }
    }
    let mut llm: LlmConfig =
        serde_json::from_value(Value::Object(text.clone())).map_err(|e| Error::Config {
            file: "config.json".into(),
            reason: format!("{S}: {e}"),
        })?;
    if let Some(t) = theta {
        llm.rope_theta = t;
    }
    llm.validate().map_err(|reason| Error::Config {
        file: "config.json".into(),
        reason: format!("{S}: {reason}"),
    })?;
    if let Some(hd) = hf_usize(text, S, "head_dim")? {
        if hd != llm.head_dim() {
            return Err(Error::Config {
                file: "config.json".into(),
                reason: format!(
                    "{S}.head_dim {hd} != hidden_size / num_attention_heads {} (not supported)",
                    llm.head_dim()
                ),
            });
        }
    }
    Ok(llm)
}

impl RawConfig {
    fn llm_check(&self) -> Result<()> {
        self.language_config
            .validate()
            .map_err(|reason| Error::Config {
                file: "config.json".into(),
                reason: format!("language_config: {reason}"),
            })
    }
}

/// The image processor's fields the pipeline uses (defaults are Janus-Pro's): DeepSeek's
/// `VLMImageProcessor` or transformers' `JanusImageProcessor` (see [`Self::from_dir`]).
#[derive(Debug, Clone, Deserialize)]
pub struct PreprocessorConfig {
    /// Side of the square model input.
    #[serde(default = "d_image_size")]
    pub image_size: u32,
    /// Smallest resized short side.
    #[serde(default = "d_min_size")]
    pub min_size: u32,
    /// Padding colour (127,127,127 for mean 0.5).
    #[serde(default = "d_background")]
    pub background_color: [u8; 3],
    /// Per-channel mean.
    #[serde(default = "d_half")]
    pub image_mean: [f32; 3],
    /// Per-channel std.
    #[serde(default = "d_half")]
    pub image_std: [f32; 3],
}

fn d_image_size() -> u32 {
    384
}
fn d_min_size() -> u32 {
    14
}
fn d_background() -> [u8; 3] {
    [127, 127, 127]
}
fn d_half() -> [f32; 3] {
    [0.5; 3]
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl PreprocessorConfig {
    /// Reads `dir/preprocessor_config.json` (DeepSeek's, and transformers 4's), else the
    /// `image_processor` object of `dir/processor_config.json` (where transformers 5 saves it),
    /// else Janus-Pro's defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let bad = |file: &str, reason: String| Error::Config {
            file: file.into(),
            reason,
        };
        const PRE: &str = "preprocessor_config.json";
        if let Ok(t) = std::fs::read_to_string(dir.join(PRE)) {
            let v: Value = serde_json::from_str(&t).map_err(|e| bad(PRE, e.to_string()))?;
            return Self::from_value(&v, PRE);
        }
        const PROC: &str = "processor_config.json";
        if let Ok(t) = std::fs::read_to_string(dir.join(PROC)) {
            let v: Value = serde_json::from_str(&t).map_err(|e| bad(PROC, e.to_string()))?;
            if let Some(ip) = v.get("image_processor") {
                return Self::from_value(ip, "processor_config.json (image_processor)");
            }
        }
        Ok(Self::default())
    }

    /// Parses one image processor's settings from `file`: DeepSeek's `image_size` or
    /// transformers' `size: {height, width}` (square); a `background_color` absent (transformers
    /// derives it) is `int(mean * 255)` per channel, as both processors compute it.
    fn from_value(v: &Value, file: &str) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            file: file.into(),
            reason,
        };
        let mut cfg: Self = serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?;
        if v.get("image_size").is_none() {
            if let Some(size) = v.get("size").filter(|s| !s.is_null()) {
                let side = |k: &str| size.get(k).and_then(|x| x.as_u64());
                match (side("height"), side("width")) {
                    (Some(h), Some(w)) if h == w && h <= u32::MAX as u64 => {
                        cfg.image_size = h as u32
                    }
                    _ => {
                        return Err(bad(format!(
                            "size {size} must be a square {{\"height\": N, \"width\": N}}"
                        )))
                    }
                }
            }
        }
        if v.get("background_color").is_none() {
            cfg.background_color = cfg.image_mean.map(|m| (m * 255.0) as u8);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL_7B: &str = r#"{
      "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": {"depth": 2, "input_dim": 1024, "n_embed": 4096, "projector_type": "mlp_gelu"}},
      "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner", "params": {"depth": 2, "input_dim": 8, "n_embed": 4096, "projector_type": "mlp_gelu"}},
      "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {"image_token_embed": 4096, "image_token_size": 16384, "n_embed": 4096}},
      "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {"image_token_size": 16384, "n_embed": 8}},
      "language_config": {"max_position_embeddings": 16384, "model_type": "llama", "num_hidden_layers": 30, "torch_dtype": "bfloat16", "vocab_size": 102400},
      "model_type": "multi_modality",
      "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {"image_size": 384, "model_name": "siglip_large_patch16_384", "select_feature": "same", "select_layer": -1}}
    }"#;

    #[test]
    fn real_7b_config_gets_llama_defaults_and_presets() {
        let c = JanusConfig::from_json(REAL_7B).unwrap();
        assert_eq!(c.llm.hidden_size, 4096);
        assert_eq!(c.llm.intermediate_size, 11008);
        assert_eq!(c.llm.num_attention_heads, 32);
        assert_eq!(c.llm.num_hidden_layers, 30);
        assert_eq!(c.vision, VisionConfig::siglip_large_patch16_384());
        assert_eq!(c.vq, VqConfig::vq_16());
        assert_eq!(c.image_tokens(), 576);
    }

    /// A transformers 4-style `JanusConfig` that, like the hub's, leaves the class defaults out:
    /// the numbers come from `LlamaConfig`, `JanusVisionConfig` and `JanusVQVAEConfig` defaults.
    const HF_1B_SPARSE: &str = r#"{
      "model_type": "janus", "image_token_id": 100581,
      "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 102400, "max_position_embeddings": 16384, "rope_theta": 10000.0,
        "rope_scaling": null, "torch_dtype": "bfloat16", "tie_word_embeddings": false},
      "vision_config": {"model_type": "janus_vision_model"},
      "vq_config": {"model_type": "janus_vqgan", "depth": 2}
    }"#;

    #[test]
    fn hf_config_defaults_are_the_transformers_classes() {
        let c = JanusConfig::from_json(HF_1B_SPARSE).unwrap();
        assert_eq!(c.layout, Layout::Transformers);
        assert_eq!(c.image_token_id, Some(100581));
        assert_eq!(c.llm.hidden_size, 2048);
        assert_eq!(c.llm.num_hidden_layers, 24);
        assert_eq!(c.llm.rms_norm_eps, 1e-6);
        assert_eq!(c.llm.rope_theta, 10000.0);
        assert_eq!(c.vision, VisionConfig::siglip_large_patch16_384());
        assert_eq!(c.vq, VqConfig::vq_16());
        assert_eq!(
            c.aligner,
            AlignerConfig {
                input_dim: 1024,
                n_embed: 2048,
                depth: 2
            }
        );
        assert_eq!(
            c.gen_aligner,
            AlignerConfig {
                input_dim: 8,
                n_embed: 2048,
                depth: 2
            }
        );
        assert_eq!(
            c.gen_head,
            GenHeadConfig {
                n_embed: 2048,
                image_token_embed: 2048,
                image_token_size: 16384,
                gen_embed_dim: 8
            }
        );
        assert_eq!(c.image_tokens(), 576);
    }

    #[test]
    fn hf_rope_theta_in_either_spelling() {
        let mut v: Value = serde_json::from_str(HF_1B_SPARSE).unwrap();
        v["text_config"]["rope_theta"] = 5e5.into();
        assert_eq!(
            JanusConfig::from_hf(&v).unwrap().llm.rope_theta,
            5e5,
            "transformers 4"
        );
        let t = v["text_config"].as_object_mut().unwrap();
        t.remove("rope_theta");
        t.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": 250000.0}),
        );
        assert_eq!(
            JanusConfig::from_hf(&v).unwrap().llm.rope_theta,
            250000.0,
            "transformers 5"
        );
        v["text_config"]["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let e = JanusConfig::from_hf(&v).unwrap_err().to_string();
        assert!(e.contains("text_config.rope_scaling"), "{e}");
    }

    #[test]
    fn hf_settings_without_an_implementation_are_named() {
        for (section, key, value, named) in [
            (
                "vision_config",
                "use_qk_norm",
                Value::Bool(true),
                "vision_config.use_qk_norm",
            ),
            (
                "vision_config",
                "layer_norm_eps",
                1e-5.into(),
                "vision_config.layer_norm_eps",
            ),
            (
                "vq_config",
                "double_latent",
                Value::Bool(true),
                "vq_config.double_latent",
            ),
            (
                "text_config",
                "hidden_act",
                "gelu".into(),
                "text_config.hidden_act",
            ),
            ("text_config", "head_dim", 64.into(), "text_config.head_dim"),
            (
                "text_config",
                "model_type",
                "mistral".into(),
                "text_config.model_type",
            ),
            (
                "vq_config",
                "channel_multiplier",
                "x".into(),
                "vq_config.channel_multiplier",
            ),
        ] {
            let mut v: Value = serde_json::from_str(HF_1B_SPARSE).unwrap();
            v[section][key] = value;
            let e = JanusConfig::from_hf(&v).unwrap_err().to_string();
            assert!(
                e.contains(named) && e.contains("config.json"),
                "{named}: {e}"
            );
        }
    }

    #[test]
    fn image_processor_settings_in_either_layout() {
        // DeepSeek's VLMImageProcessor.
        let ds: Value = serde_json::from_str(
            r#"{"background_color": [127,127,127], "image_mean": [0.5,0.5,0.5],
                "image_std": [0.5,0.5,0.5], "image_size": 384, "min_size": 14}"#,
        )
        .unwrap();
        let ds = PreprocessorConfig::from_value(&ds, "preprocessor_config.json").unwrap();
        // transformers' JanusImageProcessor: size {height, width}, background from the mean.
        let hf: Value = serde_json::from_str(
            r#"{"image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5], "min_size": 14,
                "size": {"height": 384, "width": 384}, "resample": 3, "do_pad": true,
                "image_processor_type": "JanusImageProcessor"}"#,
        )
        .unwrap();
        let hf = PreprocessorConfig::from_value(&hf, "preprocessor_config.json").unwrap();
        assert_eq!(
            (
                hf.image_size,
                hf.min_size,
                hf.background_color,
                hf.image_mean,
                hf.image_std
            ),
            (
                ds.image_size,
                ds.min_size,
                ds.background_color,
                ds.image_mean,
                ds.image_std
            )
        );
        let bad: Value =
            serde_json::from_str(r#"{"size": {"height": 384, "width": 512}}"#).unwrap();
        let e = PreprocessorConfig::from_value(&bad, "processor_config.json (image_processor)")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("processor_config.json") && e.contains("size"),
            "{e}"
        );
    }

    #[test]
    fn unknown_tower_and_vq_are_named() {
        let t = REAL_7B.replace("siglip_large_patch16_384", "siglip_giant_patch14_224");
        match JanusConfig::from_json(&t) {
            Err(Error::UnknownVisionTower(n)) => assert_eq!(n, "siglip_giant_patch14_224"),
            other => panic!("expected UnknownVisionTower, got {other:?}"),
        }
        let t = REAL_7B.replace("\"VQ-16\"", "\"VQ-32\"");
        match JanusConfig::from_json(&t) {
            Err(Error::UnknownVqModel(n)) => assert_eq!(n, "VQ-32"),
            other => panic!("expected UnknownVqModel, got {other:?}"),
        }
    }
}
