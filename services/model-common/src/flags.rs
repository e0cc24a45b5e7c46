//! The flags only the model services (and `janus serve` / local mode) take: which checkpoint,
//! where it runs, and each engine's settings. Transport and security flags are
//! `janus_service::flags`.

use anyhow::Context;
use janus_pipeline::LoadOptions;
use janus_service::ModelInfo;

/// Default `--model`.
pub const DEFAULT_MODEL: &str = "deepseek-ai/Janus-Pro-1B";

/// Which checkpoint to load and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelFlags {
    /// Checkpoint directory or Hugging Face hub id (hub cache: HF_HOME / HF_HUB_CACHE; token: HF_TOKEN; HF_HUB_OFFLINE=1 never downloads).
    #[arg(long, env = "JANUS_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Device: cpu or cuda:N (needs a build with `--features cuda`).
    #[arg(long, env = "JANUS_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype: auto (bf16 on CUDA and on CPUs with AVX512-BF16, f32 on other CPUs), f32
    /// or bf16. CPU bf16 rounds the operands of the large products to bf16 (f32 accumulation,
    /// norms and softmax in f32); f32 is the reference's numerics.
    #[arg(long, env = "JANUS_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Weight storage: f32, bf16, f16, or q8 / q4 (the language model's linear layers as 8-bit
    /// or 4-bit blocks of 32, GGUF's Q8_0 / Q4_1, quantized at load; the other weights keep the
    /// checkpoint's dtype). Default: the checkpoint's dtype, bf16 for the hub checkpoints (the
    /// compute dtype when the checkpoint is stored wider or in another 16-bit format).
    #[arg(long, env = "JANUS_WEIGHT_DTYPE")]
    pub weight_dtype: Option<String>,
    /// Context window in tokens (default: the checkpoint's).
    #[arg(long, env = "JANUS_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// Tokenize message text as DeepSeek's reference does: special-token strings typed in a
    /// message or prompt (`<|User|>`, `<|Assistant|>`, `<｜end▁of▁sentence｜>`,
    /// `<begin_of_image>`) become special tokens, so a user can forge turns. Default: plain text
    /// (only `<image_placeholder>` marks images).
    #[arg(long, env = "JANUS_SPECIAL_TOKENS_IN_TEXT")]
    pub special_tokens_in_text: bool,
}

impl ModelFlags {
    /// Load options for `device` (defaults to `--device`).
    pub fn load_options(&self, device: Option<&str>) -> anyhow::Result<LoadOptions> {
        let device = janus_pipeline::parse_device(device.unwrap_or(&self.device))?;
        let (weight_dtype, quant) = match self.weight_dtype.as_deref() {
            Some(w) => janus_pipeline::parse_weight_dtype(w)?,
            None => (None, None),
        };
        Ok(LoadOptions {
            dtype: janus_pipeline::parse_dtype_for(&self.dtype, &device)?,
            device,
            weight_dtype,
            quant,
            max_context: self.max_context,
            special_tokens_in_text: self.special_tokens_in_text,
        })
    }

    /// Info about the model as it will be reported, for `device` (defaults to `--device`):
    /// the resolved compute and weight dtypes (`auto` and the checkpoint's dtype resolved
    /// against the checkpoint in `path`), as the model was loaded.
    pub fn info(&self, path: &std::path::Path, device: Option<&str>) -> ModelInfo {
        let device_name = device.unwrap_or(&self.device).to_string();
        // Resolved by name: building a device here would open another GPU context.
        let compute = if self.dtype == "auto" {
            Ok(janus_pipeline::auto_dtype_for(
                device_name.starts_with("cuda"),
            ))
        } else {
            janus_pipeline::parse_dtype(&self.dtype)
        };
        let weight = self
            .weight_dtype
            .as_deref()
            .map(janus_pipeline::parse_weight_dtype)
            .transpose();
        let (dtype, weight_dtype) = match (compute, weight) {
            (Ok(dtype), Ok(parsed)) => {
                // Blocks asked for, or (nothing asked) stored by `janus quantize`.
                let blocks = match parsed {
                    Some((_, q)) => q,
                    None => janus_pipeline::checkpoint_quant(path).ok().flatten(),
                };
                let weight = match blocks {
                    Some(q) => q.name(),
                    None => {
                        let weight_dtype = parsed.and_then(|(d, _)| d);
                        let opts = LoadOptions {
                            dtype,
                            weight_dtype,
                            ..LoadOptions::default()
                        };
                        let weight = janus_pipeline::checkpoint_dtype(path)
                            .map(|c| opts.resolve_weight_dtype(c))
                            .ok()
                            .or(weight_dtype)
                            .unwrap_or(dtype);
                        janus_pipeline::dtype_name(weight)
                    }
                };
                (
                    janus_pipeline::dtype_name(dtype).to_string(),
                    weight.to_string(),
                )
            }
            _ => (
                self.dtype.clone(),
                self.weight_dtype.clone().unwrap_or_default(),
            ),
        };
        ModelInfo {
            model_id: self.model.clone(),
            model_path: path.display().to_string(),
            device: device_name,
            dtype,
            weight_dtype,
        }
    }

    /// Resolves `--model` to a directory (may download).
    pub fn resolve(&self) -> anyhow::Result<crate::model_source::ResolvedModel> {
        crate::model_source::resolve(&self.model).context("resolving --model")
    }
}

/// Understanding engine settings.
#[derive(clap::Args, Debug, Clone)]
pub struct UnderstandingFlags {
    /// Understanding requests that may wait before RESOURCE_EXHAUSTED.
    #[arg(long, env = "JANUS_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Understanding requests decoded together at most.
    #[arg(long, env = "JANUS_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// Largest accepted encoded image, in bytes.
    #[arg(long, env = "JANUS_MAX_IMAGE_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_image_bytes: usize,
    /// Largest accepted width × height (read from the header before decoding).
    #[arg(long, env = "JANUS_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Largest accepted sampling.max_new_tokens.
    #[arg(long, env = "JANUS_MAX_NEW_TOKENS_LIMIT", default_value_t = 2048)]
    pub max_new_tokens_limit: usize,
    /// KV-cache budget in tokens: requests join the running batch while the rows' prompt plus
    /// max_new_tokens fit (a larger request runs alone).
    #[arg(long, env = "JANUS_MAX_BATCH_TOKENS", default_value_t = 32_768)]
    pub max_batch_tokens: usize,
    /// Work per engine step in prompt-token units: each running row takes one, the rest goes
    /// to prompts being prefilled (in chunks) and images being encoded (a few vision blocks at a
    /// time). Bounds the time between two tokens and a prefill's extra memory (`janus serve`:
    /// both engines).
    #[arg(
        long,
        env = "JANUS_STEP_TOKENS",
        default_value_t = 128,
        alias = "prefill-chunk"
    )]
    pub step_tokens: usize,
    /// Bytes of the prefix KV cache: finished conversations' keys and values, so a later
    /// request that begins the same way (the next turn of a chat, the same request again)
    /// prefills only the rest. Least recently used entries go first; 0 turns it off. The
    /// default (2 GiB) holds about 7 conversations of 700 tokens at Janus-Pro-1B size in f32
    /// (24 layers × 2 × 2048 × 4 bytes per token).
    #[arg(long, env = "JANUS_PREFIX_CACHE_BYTES", default_value_t = 2 << 30)]
    pub prefix_cache_bytes: usize,
    /// Bytes of the image-feature cache: the vision tower's output per image (SHA-256 of the
    /// pixels), so a later request with the same image skips the tower. 0 turns it off; the
    /// default (256 MiB) holds about 54 images at Janus-Pro-1B size.
    #[arg(long, env = "JANUS_IMAGE_CACHE_BYTES", default_value_t = 256 << 20)]
    pub image_cache_bytes: usize,
    /// Who shares cache entries. `key`: only requests made with the same API key (a shared
    /// cache is a timing side channel: time to first token would tell a client what another
    /// sent); requests without a key share with each other. `global`: everyone (one tenant).
    #[arg(long, env = "JANUS_PREFIX_CACHE_SCOPE", value_enum, default_value_t = ScopeFlag::Key)]
    pub prefix_cache_scope: ScopeFlag,
}

/// `--prefix-cache-scope`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeFlag {
    /// Per API key.
    Key,
    /// Shared by all.
    Global,
}

impl UnderstandingFlags {
    /// As engine configuration.
    pub fn config(&self) -> janus_engine::UnderstandingConfig {
        janus_engine::UnderstandingConfig {
            max_queue: self.max_queue,
            max_batch: self.max_batch,
            max_new_tokens_limit: self.max_new_tokens_limit,
            default_max_new_tokens: 512,
            image_limits: janus_pipeline::ImageLimits {
                max_bytes: self.max_image_bytes,
                max_pixels: self.max_image_pixels,
            },
            max_batch_tokens: self.max_batch_tokens,
            step_tokens: self.step_tokens,
            prefix_cache_bytes: self.prefix_cache_bytes,
            image_cache_bytes: self.image_cache_bytes,
            cache_scope: self.prefix_cache_scope.into(),
            ..Default::default()
        }
    }
}

/// Generation engine settings.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerationFlags {
    /// Generation requests that may wait before RESOURCE_EXHAUSTED.
    #[arg(long, env = "JANUS_MAX_QUEUE", default_value_t = 16)]
    pub max_queue: usize,
    /// Generation requests batched into one forward at most.
    #[arg(long, env = "JANUS_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// Side of preview thumbnails in pixels.
    #[arg(long, env = "JANUS_PREVIEW_SIZE", default_value_t = 96)]
    pub preview_size: u32,
    /// Work per engine step in prompt-token units: each running CFG row takes one, the rest
    /// prefills waiting prompts in chunks.
    #[arg(long, env = "JANUS_STEP_TOKENS", default_value_t = 128)]
    pub step_tokens: usize,
    /// Bytes of the prefix cache of prompt rows: the unconditional row is shared by prompts of
    /// equal length, and a prompt generated again ("4 more") reuses its conditional prefill.
    /// 0 turns it off.
    #[arg(long, env = "JANUS_PREFIX_CACHE_BYTES", default_value_t = GEN_PREFIX_CACHE_BYTES)]
    pub prefix_cache_bytes: usize,
    /// Who shares cache entries: `key` (per API key) or `global` (see the understanding
    /// service's flag of the same name).
    #[arg(long, env = "JANUS_PREFIX_CACHE_SCOPE", value_enum, default_value_t = ScopeFlag::Key)]
    pub prefix_cache_scope: ScopeFlag,
}

/// Default of the generation half's `--prefix-cache-bytes` (a prompt row of Janus-Pro-1B in f32
/// takes about 0.4 MB per token: hundreds of prompts).
pub const GEN_PREFIX_CACHE_BYTES: usize = 512 << 20;

impl GenerationFlags {
    /// As engine configuration.
    pub fn config(&self) -> janus_engine::GenerationConfig {
        janus_engine::GenerationConfig {
            prefix_cache_bytes: self.prefix_cache_bytes,
            cache_scope: self.prefix_cache_scope.into(),
            ..generation_config(
                self.max_queue,
                self.max_batch,
                self.preview_size,
                self.step_tokens,
            )
        }
    }
}

impl From<ScopeFlag> for janus_engine::CacheScope {
    fn from(f: ScopeFlag) -> Self {
        match f {
            ScopeFlag::Key => janus_engine::CacheScope::Key,
            ScopeFlag::Global => janus_engine::CacheScope::Global,
        }
    }
}

/// Generation engine configuration from its knobs (the prefix cache off: set
/// `prefix_cache_bytes` to turn it on).
pub fn generation_config(
    max_queue: usize,
    max_batch: usize,
    preview_size: u32,
    step_tokens: usize,
) -> janus_engine::GenerationConfig {
    janus_engine::GenerationConfig {
        max_queue,
        max_batch,
        preview_size: preview_size.clamp(8, 384),
        step_tokens,
        ..Default::default()
    }
}
