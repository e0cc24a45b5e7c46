//! Which checkpoint layout a directory holds, and the mapping between the two layouts' tensors.
//!
//! Two layouts of the same Janus-Pro weights exist:
//!
//! - **DeepSeek's** (`config.json` `model_type: "multi_modality"`): `deepseek-ai/Janus-Pro-1B` /
//!   `-7B` as DeepSeek ships them. The model loaders ask for tensors by these names.
//! - **transformers'** (`model_type: "janus"`): `deepseek-community/Janus-Pro-1B` / `-7B`, written
//!   by transformers' `convert_janus_weights_to_hf.py`. Its `MAPPINGS` / `convert_state_dict_to_hf`
//!   rename every tensor, split the vision tower's fused `qkv` into `q_proj` / `k_proj` / `v_proj`,
//!   squeeze `pos_embed` from `[1, N, W]` to `[N, W]` and drop the unused attention-pool head
//!   (`attn_pool.*`) and the VQ training buffer `quantize.codebook_used`.
//!
//! [`LayoutBackend`] serves the loaders DeepSeek names whatever the layout: for a transformers
//! checkpoint it looks each name up under its transformers name ([`hf_source`], the inverse of
//! that script's renaming), concatenates q/k/v back into `qkv` (weights and biases) and unsqueezes
//! the position embedding. The VQ decoder's `up.{i}` is DeepSeek's `conv_blocks.{i}` with the same
//! index (both list the levels lowest resolution first; the script renames without reindexing).
//!
//! The transformers config (`JanusConfig`: `text_config`, `vision_config`, `vq_config`) is
//! translated in [`crate::config`]; the processor files in [`crate::config::PreprocessorConfig`].

use crate::error::{Error, Result};
use crate::weights::{TensorIndex, WeightFiles};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::path::Path;

/// The layout of a checkpoint's config and tensor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// DeepSeek's (`model_type: "multi_modality"`).
    DeepSeek,
    /// transformers' (`model_type: "janus"`).
    Transformers,
}

impl Layout {
    /// The layout a parsed `config.json` declares by its `model_type`.
    pub fn of_config(config: &serde_json::Value) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            file: "config.json".into(),
            reason,
        };
        match config.get("model_type") {
            Some(serde_json::Value::String(t)) => match t.as_str() {
                "multi_modality" => Ok(Self::DeepSeek),
                "janus" => Ok(Self::Transformers),
                other => Err(bad(format!(
                    "model_type '{other}' is not a Janus checkpoint layout this loader knows \
                     (\"multi_modality\": DeepSeek's, e.g. deepseek-ai/Janus-Pro-1B; \
                     \"janus\": transformers', e.g. deepseek-community/Janus-Pro-1B)"
                ))),
            },
            Some(v) => Err(bad(format!("model_type must be a string, got {v}"))),
            None => Err(bad(
                "no model_type (\"multi_modality\" for DeepSeek's layout, \"janus\" for transformers')"
                    .into(),
            )),
        }
    }

    /// The layout of `dir/config.json`.
    pub fn of_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|_| Error::MissingFile {
            path: path.clone(),
            what: "model configuration",
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            file: "config.json".into(),
            reason: e.to_string(),
        })?;
        Self::of_config(&v)
    }
}

/// Where the tensor a loader asks for by its DeepSeek name is in a transformers checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The same tensor under another name.
    Renamed(String),
    /// `[N, W]` stored, `[1, N, W]` wanted (`pos_embed`).
    Unsqueezed(String),
    /// Stored in parts, concatenated along dim 0 (the vision tower's `qkv` from q, k, v).
    Concatenated(Vec<String>),
}

impl Source {
    /// The stored tensors it reads.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Self::Renamed(n) | Self::Unsqueezed(n) => vec![n.as_str()],
            Self::Concatenated(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `mlp.layers.{0,2,4,…}` (`nn.Sequential` with GELUs at the odd indices) as transformers'
/// `fc1`, `hidden_layers.{0,1,…}`.
fn aligner_layer(rest: &str) -> Option<String> {
    let (idx, tail) = rest.strip_prefix("layers.")?.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    match i {
        0 => Some(format!("fc1.{tail}")),
        _ if i.is_multiple_of(2) => Some(format!("hidden_layers.{}.{tail}", i / 2 - 1)),
        _ => None,
    }
}

/// The VQ model's names below `gen_vision_model.`: `encoder.conv_blocks` → `encoder.down`,
/// `decoder.conv_blocks` → `decoder.up`, `res` → `block`, `mid.{0,1,2}` →
/// `mid.{block_1,attn_1,block_2}`; `quantize.codebook_used` has no counterpart.
fn vq_name(rest: &str) -> Option<String> {
    if rest == "quantize.codebook_used" {
        return None;
    }
    let parts: Vec<&str> = rest.split('.').collect();
    let mut out: Vec<&str> = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        let prev = out.last().copied();
        match (prev, p) {
            (Some("encoder"), "conv_blocks") => out.push("down"),
            (Some("decoder"), "conv_blocks") => out.push("up"),
            (_, "res") => out.push("block"),
            (Some("encoder" | "decoder"), "mid") if i + 1 < parts.len() => {
                out.push("mid");
                out.push(match parts[i + 1] {
                    "0" => "block_1",
                    "1" => "attn_1",
                    "2" => "block_2",
                    _ => return None,
                });
                i += 1;
            }
            _ => out.push(p),
        }
        i += 1;
    }
    Some(out.join("."))
}

/// The vision tower's names below `vision_model.vision_tower.`.
fn vision_source(rest: &str) -> Option<Source> {
    const EMB: &str = "model.vision_model.embeddings";
    if rest == "pos_embed" {
        return Some(Source::Unsqueezed(format!(
            "{EMB}.position_embedding.weight"
        )));
    }
    if let Some(p) = rest.strip_prefix("patch_embed.proj.") {
        return Some(Source::Renamed(format!("{EMB}.patch_embedding.{p}")));
    }
    if let Some(p) = rest.strip_prefix("norm.") {
        return Some(Source::Renamed(format!(
            "model.vision_model.post_layernorm.{p}"
        )));
    }
    let (i, block) = rest.strip_prefix("blocks.")?.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let layer = format!("model.vision_model.encoder.layers.{i}");
    if let Some(p) = block.strip_prefix("attn.qkv.") {
        return Some(Source::Concatenated(
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|x| format!("{layer}.self_attn.{x}.{p}"))
                .collect(),
        ));
    }
    let renamed = if let Some(p) = block.strip_prefix("attn.proj.") {
        format!("self_attn.projection_layer.{p}")
    } else if let Some(p) = block.strip_prefix("norm1.") {
        format!("layer_norm1.{p}")
    } else if let Some(p) = block.strip_prefix("norm2.") {
        format!("layer_norm2.{p}")
    } else if let Some(p) = block.strip_prefix("mlp.") {
        format!("mlp.{p}")
    } else {
        return None;
    };
    Some(Source::Renamed(format!("{layer}.{renamed}")))
}

/// Where the tensor DeepSeek names `name` is in a transformers checkpoint; `None` for tensors
/// the conversion drops (`attn_pool.*`, `quantize.codebook_used`) or does not know.
pub fn hf_source(name: &str) -> Option<Source> {
    let renamed = |s: String| Some(Source::Renamed(s));
    if let Some(rest) = name.strip_prefix("language_model.lm_head.") {
        return renamed(format!("lm_head.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        return renamed(format!("model.language_model.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("vision_model.vision_tower.") {
        return vision_source(rest);
    }
    if let Some(rest) = name.strip_prefix("gen_aligner.") {
        return renamed(format!("model.generation_aligner.{}", aligner_layer(rest)?));
    }
    if let Some(rest) = name.strip_prefix("aligner.") {
        return renamed(format!("model.aligner.{}", aligner_layer(rest)?));
    }
    if let Some(rest) = name.strip_prefix("gen_head.output_mlp_projector.") {
        return renamed(format!("model.generation_head.proj_out.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("gen_head.vision_head.") {
        return renamed(format!("model.generation_head.vision_head.{rest}"));
    }
    if name == "gen_embed.weight" {
        return renamed("model.generation_embeddings.weight".into());
    }
    if let Some(rest) = name.strip_prefix("gen_vision_model.") {
        return renamed(format!("model.vqmodel.{}", vq_name(rest)?));
    }
    None
}

/// A checkpoint's tensors served by DeepSeek name, whatever the layout (see the module docs).
#[derive(Debug)]
pub struct LayoutBackend {
    index: TensorIndex,
    layout: Layout,
}

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl LayoutBackend {
    /// Serves `index`, whose names are in `layout`.
    pub fn new(index: TensorIndex, layout: Layout) -> Self {
        Self { index, layout }
    }

    /// A `VarBuilder` over it storing tensors as `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn source(&self, name: &str) -> candle_core::Result<Source> {
        hf_source(name).ok_or_else(|| {
            err(format!(
                "{name} has no counterpart in the transformers layout of {}",
                self.index.files_display()
            ))
        })
    }

    /// Reads `name` (a DeepSeek name), checking its shape against `want` when given.
    fn read(
        &self,
        name: &str,
        want: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if self.layout == Layout::DeepSeek {
            return match want {
                Some(s) => self.index.read_checked(name, s.dims(), dtype, dev),
                None => self.index.read(name, dtype, dev),
            };
        }
        let src = self.source(name)?;
        let parts = src.names();
        for p in &parts {
            if self.index.info(p).is_none() {
                let hint = if *p == "lm_head.weight" {
                    " (Janus-Pro's lm_head is untied and must be saved; transformers 5 saves \
                     none when the config's top-level tie_word_embeddings is true, so a \
                     checkpoint converted that way has lost it)"
                } else {
                    ""
                };
                return Err(err(format!(
                    "cannot find tensor {p} (transformers name of {name}) in {}{hint}",
                    self.index.files_display()
                )));
            }
        }
        let t = match &src {
            Source::Renamed(n) => match want {
                Some(s) => self.index.read_checked(n, s.dims(), dtype, dev),
                None => self.index.read(n, dtype, dev),
            }?,
            Source::Unsqueezed(n) => self.index.read(n, dtype, dev)?.unsqueeze(0)?,
            Source::Concatenated(v) => {
                let ts = v
                    .iter()
                    .map(|n| self.index.read(n, dtype, dev))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&ts, 0).map_err(|e| {
                    err(format!(
                        "{name} from {} in {}: {e}",
                        v.join(" + "),
                        self.index.files_display()
                    ))
                })?
            }
        };
        if let Some(s) = want {
            if t.dims() != s.dims() {
                let found: Vec<String> = parts
                    .iter()
                    .map(|p| format!("{p} {:?}", self.index.info(p).map(|i| i.1).unwrap_or(&[])))
                    .collect();
                return Err(err(format!(
                    "shape mismatch for {name} in {}: expected {:?}, found {}",
                    self.index.files_display(),
                    s.dims(),
                    found.join(" + ")
                )));
            }
        }
        Ok(t)
    }
}

impl SimpleBackend for LayoutBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.read(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self.layout {
            Layout::DeepSeek => self.index.info(name).is_some(),
            Layout::Transformers => hf_source(name)
                .is_some_and(|s| s.names().iter().all(|n| self.index.info(n).is_some())),
        }
    }
}

/// A `VarBuilder` over the weights of the checkpoint in `dir` that answers DeepSeek names in
/// either layout, storing tensors as `dtype` on `device`.
pub fn var_builder(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let layout = Layout::of_dir(dir)?;
    let index = WeightFiles::find(dir)?.open()?;
    Ok(LayoutBackend::new(index, layout).into_var_builder(dtype, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renamed(s: &str) -> Option<Source> {
        Some(Source::Renamed(s.into()))
    }

    /// The names transformers' `MAPPINGS` produce for each kind of DeepSeek name (worked out from
    /// the regexes of convert_janus_weights_to_hf.py; the fixture test checks every tensor).
    #[test]
    fn names_follow_the_conversion_script() {
        let cases = [
            ("language_model.lm_head.weight", "lm_head.weight"),
            (
                "language_model.model.layers.3.self_attn.q_proj.weight",
                "model.language_model.layers.3.self_attn.q_proj.weight",
            ),
            (
                "language_model.model.embed_tokens.weight",
                "model.language_model.embed_tokens.weight",
            ),
            (
                "vision_model.vision_tower.patch_embed.proj.weight",
                "model.vision_model.embeddings.patch_embedding.weight",
            ),
            (
                "vision_model.vision_tower.norm.bias",
                "model.vision_model.post_layernorm.bias",
            ),
            (
                "vision_model.vision_tower.blocks.12.attn.proj.weight",
                "model.vision_model.encoder.layers.12.self_attn.projection_layer.weight",
            ),
            (
                "vision_model.vision_tower.blocks.0.norm1.weight",
                "model.vision_model.encoder.layers.0.layer_norm1.weight",
            ),
            (
                "vision_model.vision_tower.blocks.0.norm2.bias",
                "model.vision_model.encoder.layers.0.layer_norm2.bias",
            ),
            (
                "vision_model.vision_tower.blocks.23.mlp.fc2.weight",
                "model.vision_model.encoder.layers.23.mlp.fc2.weight",
            ),
            ("aligner.layers.0.weight", "model.aligner.fc1.weight"),
            (
                "aligner.layers.2.bias",
                "model.aligner.hidden_layers.0.bias",
            ),
            (
                "gen_aligner.layers.0.weight",
                "model.generation_aligner.fc1.weight",
            ),
            (
                "gen_aligner.layers.2.weight",
                "model.generation_aligner.hidden_layers.0.weight",
            ),
            (
                "gen_head.output_mlp_projector.bias",
                "model.generation_head.proj_out.bias",
            ),
            (
                "gen_head.vision_head.weight",
                "model.generation_head.vision_head.weight",
            ),
            ("gen_embed.weight", "model.generation_embeddings.weight"),
            (
                "gen_vision_model.decoder.conv_blocks.0.res.2.conv1.weight",
                "model.vqmodel.decoder.up.0.block.2.conv1.weight",
            ),
            (
                "gen_vision_model.decoder.conv_blocks.0.attn.1.proj_out.bias",
                "model.vqmodel.decoder.up.0.attn.1.proj_out.bias",
            ),
            (
                "gen_vision_model.decoder.conv_blocks.3.upsample.conv.weight",
                "model.vqmodel.decoder.up.3.upsample.conv.weight",
            ),
            (
                "gen_vision_model.encoder.conv_blocks.1.res.0.nin_shortcut.weight",
                "model.vqmodel.encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "gen_vision_model.encoder.conv_blocks.2.downsample.conv.bias",
                "model.vqmodel.encoder.down.2.downsample.conv.bias",
            ),
            (
                "gen_vision_model.decoder.mid.0.norm1.weight",
                "model.vqmodel.decoder.mid.block_1.norm1.weight",
            ),
            (
                "gen_vision_model.decoder.mid.1.q.weight",
                "model.vqmodel.decoder.mid.attn_1.q.weight",
            ),
            (
                "gen_vision_model.encoder.mid.2.conv2.bias",
                "model.vqmodel.encoder.mid.block_2.conv2.bias",
            ),
            (
                "gen_vision_model.decoder.norm_out.weight",
                "model.vqmodel.decoder.norm_out.weight",
            ),
            (
                "gen_vision_model.quantize.embedding.weight",
                "model.vqmodel.quantize.embedding.weight",
            ),
            (
                "gen_vision_model.post_quant_conv.bias",
                "model.vqmodel.post_quant_conv.bias",
            ),
            (
                "gen_vision_model.quant_conv.weight",
                "model.vqmodel.quant_conv.weight",
            ),
        ];
        for (ds, hf) in cases {
            assert_eq!(hf_source(ds), renamed(hf), "{ds}");
        }
        assert_eq!(
            hf_source("vision_model.vision_tower.pos_embed"),
            Some(Source::Unsqueezed(
                "model.vision_model.embeddings.position_embedding.weight".into()
            ))
        );
        assert_eq!(
            hf_source("vision_model.vision_tower.blocks.5.attn.qkv.bias"),
            Some(Source::Concatenated(vec![
                "model.vision_model.encoder.layers.5.self_attn.q_proj.bias".into(),
                "model.vision_model.encoder.layers.5.self_attn.k_proj.bias".into(),
                "model.vision_model.encoder.layers.5.self_attn.v_proj.bias".into(),
            ]))
        );
        for dropped in [
            "vision_model.vision_tower.attn_pool.kv.weight",
            "vision_model.vision_tower.attn_pool.latent",
            "gen_vision_model.quantize.codebook_used",
            "aligner.layers.1.weight",
            "something.else",
        ] {
            assert_eq!(hf_source(dropped), None, "{dropped}");
        }
    }

    #[test]
    fn model_type_picks_the_layout() {
        let of = |s: &str| Layout::of_config(&serde_json::from_str(s).unwrap());
        assert_eq!(
            of(r#"{"model_type":"multi_modality"}"#).unwrap(),
            Layout::DeepSeek
        );
        assert_eq!(
            of(r#"{"model_type":"janus"}"#).unwrap(),
            Layout::Transformers
        );
        let e = of(r#"{"model_type":"llava"}"#).unwrap_err().to_string();
        assert!(e.contains("'llava'") && e.contains("config.json"), "{e}");
        let e = of("{}").unwrap_err().to_string();
        assert!(e.contains("no model_type"), "{e}");
    }
}
