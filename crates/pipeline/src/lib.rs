//! Janus-Pro pipelines without any transport: checkpoint loading, prompts, batching, sampling,
//! and the two halves of the model — understanding (image + text → text) and generation
//! (text → image). Each half loads only its own weights because each service owns one half.
//!
//! Both pipelines are *step functions over a batch*: `start` prefills a batch and `step` advances
//! every row by one token, so a scheduler can interleave many requests.

pub mod config;
pub mod error;
pub mod gen_batch;
pub mod generate;
pub mod prompt;
pub mod sampling;
pub mod synth;
pub mod understand;
pub mod weights;

pub use candle_core::{DType, Device};
pub use config::JanusConfig;
pub use error::{Error, Result};
pub use generate::{GenJob, GenerateParams, GeneratedImage, GenerationModel};
pub use janus_imageproc::{decode_rgb, ImageLimits};
pub use prompt::{Message, Role};
pub use sampling::SamplingParams;
pub use understand::{
    Conversation, FinishReason, PendingPrefill, TokenEvent, UnderstandBatch, UnderstandingModel,
};

use std::path::{Path, PathBuf};

/// How to load a half of the model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where tensors live and run.
    pub device: Device,
    /// Activation (compute) dtype: f32 by default, bf16 selectable.
    pub dtype: DType,
    /// Weight storage dtype; defaults to `dtype`. bf16 storage with f32 compute halves the memory
    /// read per decode step on the CPU (weights are widened on the fly).
    pub weight_dtype: Option<DType>,
    /// Context window in tokens; defaults to the config's `max_position_embeddings`.
    pub max_context: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            weight_dtype: None,
            max_context: None,
        }
    }
}

/// Parses `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let (kind, idx) = match s.split_once(':') {
        Some((k, i)) => (
            k,
            i.parse::<usize>()
                .map_err(|_| Error::invalid("device", format!("bad device index in '{s}'")))?,
        ),
        None => (s, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(idx).map_err(|e| {
            Error::invalid(
                "device",
                format!("{s}: {e} (build with `--features cuda` for GPUs)"),
            )
        }),
        "metal" => Device::new_metal(idx).map_err(|e| {
            Error::invalid(
                "device",
                format!("{s}: {e} (build with `--features metal`)"),
            )
        }),
        _ => Err(Error::invalid(
            "device",
            format!("unknown device '{s}' (cpu, cuda:N, metal:N)"),
        )),
    }
}

/// Parses `f32`, `bf16` (or `f16`, which the reference warns against).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(Error::invalid(
            "dtype",
            format!("unknown dtype '{s}' (f32, bf16)"),
        )),
    }
}

/// The files every half needs: configuration, tokenizer and weights.
pub(crate) struct Checkpoint {
    pub dir: PathBuf,
    pub config: JanusConfig,
    pub tokenizer: prompt::TextTokenizer,
    pub weights: weights::WeightFiles,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "checkpoint directory",
            });
        }
        let config = JanusConfig::from_dir(dir)?;
        let tokenizer = prompt::TextTokenizer::from_dir(dir)?;
        let weights = weights::WeightFiles::find(dir)?;
        let ids = tokenizer.ids;
        for (name, id) in [
            ("bos", ids.bos),
            ("eos", ids.eos),
            ("pad", ids.pad),
            ("image", ids.image),
        ] {
            if id as usize >= config.llm.vocab_size {
                return Err(Error::Tokenizer(format!(
                    "{name} token id {id} is outside the model vocabulary of {}",
                    config.llm.vocab_size
                )));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            weights,
        })
    }

    pub fn var_builder(&self, opts: &LoadOptions) -> Result<candle_nn::VarBuilder<'static>> {
        self.weights
            .var_builder(opts.weight_dtype.unwrap_or(opts.dtype), &opts.device)
    }
}
