//! `config.json` of a DeepSeek-layout Janus checkpoint (`model_type: "multi_modality"`).
//!
//! Six sub-configs; the real checkpoints name their vision tower and VQ model and leave sizes to
//! code, so known names resolve to presets and explicit `params` override them (the tiny fixture
//! uses other names with every size spelled out).

use crate::error::{Error, Result};
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
    /// Parses a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| Error::Config {
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

/// `preprocessor_config.json` fields the pipeline uses (defaults are Janus-Pro's).
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
    /// Reads `dir/preprocessor_config.json`, or Janus-Pro's defaults when absent.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| Error::Config {
                file: "preprocessor_config.json".into(),
                reason: e.to_string(),
            }),
            Err(_) => Ok(Self::default()),
        }
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
