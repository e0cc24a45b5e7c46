//! Janus-Pro pipelines without any transport: checkpoint loading, prompts, batching, sampling,
//! and the two halves of the model — understanding (image + text → text) and generation
//! (text → image). Each half loads only its own weights because each service owns one half.
//!
//! Both pipelines are *step functions over a batch*: a request is prepared, prefilled in chunks
//! within a scheduler's budget and joins the running batch, whose step advances every row by one
//! token, so a scheduler can interleave many requests (`understand.rs`; the `generation`
//! folder, where a lone request is a batch of one).

pub mod cache;
pub mod config;
pub mod error;
pub mod generation;
pub mod layout;
pub mod prompt;
pub mod quality;
pub mod quantize;
pub mod sampling;
pub mod understand;
pub mod weights;

pub use cache::{CacheStats, ImageStats, PrefixStats, Scope};
pub use candle_core::{DType, Device};
pub use config::JanusConfig;
pub use error::{Error, Result};
pub use generation::{
    FinishedJob, GenBatch, GenPrefill, GenPrepared, GenerateParams, GeneratedImage,
    GenerationModel, Prefilled,
};
pub use janus_imageproc::{decode_rgb, ImageLimits};
pub use janus_llm::QFormat;
pub use prompt::{Message, Role};
pub use sampling::SamplingParams;
pub use understand::{
    Checked, Conversation, FinishReason, Prefill, TokenEvent, UnderstandBatch, UnderstandingModel,
};

use std::path::{Path, PathBuf};

/// How to load a half of the model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where tensors live and run.
    pub device: Device,
    /// Activation (compute) dtype; [`default_dtype`] of the device by default (f32 on the CPU,
    /// bf16 on CUDA).
    pub dtype: DType,
    /// Weight storage dtype; `None`: the checkpoint's (bf16 for the hub's Janus-Pro checkpoints),
    /// see [`LoadOptions::resolve_weight_dtype`]. bf16 storage with f32 compute halves the memory
    /// held and read per decode step on the CPU (weights are widened on the fly).
    pub weight_dtype: Option<DType>,
    /// The language model's linear layers and token embeddings held as 8- or 4-bit blocks
    /// (`--weight-dtype q8|q4`); `None`: in the weight dtype. The understanding half quantizes
    /// the decoder layers, the embeddings and `lm_head`; the generation half the decoder layers
    /// and the embeddings (`gen_head`, `gen_embed`, the aligners, the vision tower and the VQ
    /// decoder keep the weight dtype; the vision tower is not packed to f32 at load). A
    /// checkpoint written by `janus quantize` loads its blocks whatever this says.
    pub quant: Option<QFormat>,
    /// Context window in tokens; defaults to the config's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// The reference's tokenization of message text: special-token strings typed by a user
    /// (`<|User|>`, `<｜end▁of▁sentence｜>`, `<begin_of_image>`, ...) become special tokens,
    /// which lets them forge turns. Off (plain text) by default; see
    /// [`prompt::TextTokenizer::set_special_tokens_in_text`].
    pub special_tokens_in_text: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::for_device(Device::Cpu)
    }
}

impl LoadOptions {
    /// Defaults for `device`: its [`default_dtype`], weights in the checkpoint's dtype.
    pub fn for_device(device: Device) -> Self {
        Self {
            dtype: default_dtype(&device),
            device,
            weight_dtype: None,
            quant: None,
            max_context: None,
            special_tokens_in_text: false,
        }
    }

    /// The weight storage dtype for a checkpoint stored as `checkpoint`: `weight_dtype` when
    /// set; otherwise the checkpoint's own dtype when it is the compute dtype, or bf16 under f32
    /// compute (the CPU kernels widen bf16 weights on the fly); otherwise the compute dtype
    /// (weights are never kept wider than they are computed with, nor in a dtype the matmul
    /// kernels would convert on every call).
    pub fn resolve_weight_dtype(&self, checkpoint: DType) -> DType {
        match self.weight_dtype {
            Some(d) => d,
            None if checkpoint == self.dtype => checkpoint,
            None if checkpoint == DType::BF16 && self.dtype == DType::F32 => DType::BF16,
            None => self.dtype,
        }
    }
}

/// The library's default compute dtype of a device ([`LoadOptions::for_device`]): bf16 on CUDA
/// (the reference runs the hub checkpoints in bf16), f32 elsewhere (the CPU kernels compute in
/// f32 and read bf16 weights: the reference's numerics, which the parity tests hold). The
/// commands' `--dtype auto` is [`auto_dtype`].
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// What `--dtype auto` picks for both halves on `device`: bf16 on CUDA, and on CPUs with native
/// bf16 dot products (AVX512-BF16); f32 on other CPUs, where bf16 products would be rounded
/// and then multiplied with f32 FMAs at no gain.
///
/// CPU bf16 compute keeps activations, norms, RoPE and softmax in f32 and rounds the operands
/// of the large products to bf16 with f32 accumulation (the language model's KV cache is bf16).
/// Measured against f32 (README, "Precision on the CPU"): understanding logits within cosine
/// 0.99999 with the same greedy answers, guided image logits within cosine 0.9998, closer
/// than 8-bit weights; prefill, the vision tower, the VQ decoder and batched generation
/// steps run up to twice as fast. `tests/pipeline/bf16.rs` holds the bounds.
pub fn auto_dtype(device: &Device) -> DType {
    auto_dtype_for(device.is_cuda())
}

/// [`auto_dtype`] for a device known only by kind (`cuda`: a GPU, else the CPU), so that
/// reporting it opens no device.
pub fn auto_dtype_for(cuda: bool) -> DType {
    if cuda || janus_kernels::gemm::has_bf16_dot() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// The storage dtype of a checkpoint directory's weights (that of most language-model
/// weights; read from the safetensors headers or the pickle's storage types).
pub fn checkpoint_dtype(dir: &Path) -> Result<DType> {
    weights::WeightFiles::find(dir)?.dtype()
}

/// The block format a `janus quantize` checkpoint stores its language model in, if any.
pub fn checkpoint_quant(dir: &Path) -> Result<Option<QFormat>> {
    Ok(weights::WeightFiles::find(dir)?.open()?.stored_blocks())
}

/// Loads both halves of one checkpoint. When they run on the same device with the same dtypes,
/// the LLM (the bulk of the weights) is built once and shared read-only by both halves (each
/// keeps its own KV caches); otherwise each half loads its own copy, in parallel.
pub fn load_both(
    dir: &Path,
    understanding: &LoadOptions,
    generation: &LoadOptions,
) -> Result<(UnderstandingModel, GenerationModel)> {
    if shares_llm(understanding, generation) {
        let und = UnderstandingModel::load(dir, understanding)?;
        let llm = und.llm().clone();
        let gen = GenerationModel::load_sharing(dir, generation, Some(llm))?;
        return Ok((und, gen));
    }
    std::thread::scope(|s| {
        let gen = s.spawn(|| GenerationModel::load(dir, generation));
        let und = UnderstandingModel::load(dir, understanding);
        let gen = gen
            .join()
            .unwrap_or_else(|_| Err(Error::Weights("generation loader panicked".into())));
        Ok((und?, gen?))
    })
}

/// Whether two halves loaded with these options can use one LLM.
pub fn shares_llm(a: &LoadOptions, b: &LoadOptions) -> bool {
    a.device.same_device(&b.device)
        && a.dtype == b.dtype
        && a.weight_dtype == b.weight_dtype
        && a.quant == b.quant
        && a.max_context == b.max_context
}

/// `(used, total)` bytes of `device`'s memory as the driver reports it (everything on the GPU,
/// this process's cached allocations included); `None` off CUDA.
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| ((total - free) as u64, total as u64)),
        _ => None,
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
            format!("unknown dtype '{s}' (auto, f32, bf16)"),
        )),
    }
}

/// Parses `--weight-dtype`: a storage dtype ([`parse_dtype`]) or a block format for the
/// language model's linear layers (`q8` = `q8_0`, `q4` = `q4_1`; the other weights then keep
/// the checkpoint's dtype).
pub fn parse_weight_dtype(s: &str) -> Result<(Option<DType>, Option<QFormat>)> {
    match s {
        "q8" | "q8_0" => Ok((None, Some(QFormat::Q8_0))),
        "q4" | "q4_1" => Ok((None, Some(QFormat::Q4_1))),
        s => parse_dtype(s).map(|d| (Some(d), None)).map_err(|_| {
            Error::invalid(
                "weight dtype",
                format!("unknown weight dtype '{s}' (f32, bf16, f16, q8, q4)"),
            )
        }),
    }
}

/// Parses a compute dtype for `device`: `auto` is [`auto_dtype`], anything else as
/// [`parse_dtype`].
pub fn parse_dtype_for(s: &str, device: &Device) -> Result<DType> {
    match s {
        "auto" => Ok(auto_dtype(device)),
        s => parse_dtype(s),
    }
}

/// The name `--dtype` / `Info` use for a dtype (`f32`, `bf16`, `f16`, …).
pub fn dtype_name(d: DType) -> &'static str {
    d.as_str()
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
        if let Some(id) = config.image_token_id {
            if id != ids.image {
                return Err(Error::Config {
                    file: "config.json".into(),
                    reason: format!(
                        "image_token_id {id} is not the tokenizer's id of {} ({})",
                        prompt::IMAGE_TAG,
                        ids.image
                    ),
                });
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            weights,
        })
    }

    /// Parses the weight headers once; tensors are stored as
    /// [`LoadOptions::resolve_weight_dtype`] of the checkpoint's dtype and asked for by their
    /// DeepSeek names whatever the checkpoint's layout ([`layout::LayoutBackend`]).
    pub fn var_builder(&self, opts: &LoadOptions) -> Result<candle_nn::VarBuilder<'static>> {
        Ok(self.open_weights(opts)?.0)
    }

    /// [`Checkpoint::var_builder`], and whether the language model will be held as blocks
    /// (asked for, or stored so by `janus quantize`), from one read of the headers.
    pub fn open_weights(
        &self,
        opts: &LoadOptions,
    ) -> Result<(candle_nn::VarBuilder<'static>, bool)> {
        let index = self.weights.open()?;
        let quantized = opts.quant.is_some() || index.stored_blocks().is_some();
        let dtype = opts.resolve_weight_dtype(index.dtype());
        let backend = layout::LayoutBackend::new(index, self.config.layout);
        Ok((backend.into_var_builder(dtype, &opts.device), quantized))
    }
}
