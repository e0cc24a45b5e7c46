//! The generation half: LLM body + `gen_embed` + `gen_aligner` + `gen_head` + VQ decoder, with
//! classifier-free guidance exactly as DeepSeek's `generation_inference.py` builds it.
//!
//! Rows are interleaved `[c0, u0, c1, u1, …]`: conditional prompt, and the unconditional prompt
//! (every token but BOS and the final `<begin_of_image>` replaced by the pad id), no attention
//! mask. The two prompt rows are prefilled once and their cache broadcast to the `n` image pairs.
//!
//! One path for every caller (the engine, `janus generate` locally, `janus bench`, the parity
//! tests): a request is prepared and prefilled ([`prefill`](self::GenerationModel::prefill)),
//! joins a [`GenBatch`] and advances with the batch's step
//! ([`step_batch`](self::GenerationModel::step_batch)); a single request is a batch of one.
//!
//! - this file: the request's settings, the model and its loading;
//! - `prefill.rs`: validation and tokenization, chunked prefill of the two prompt rows from
//!   what the prefix cache holds of them ([`crate::cache`], shared with understanding);
//! - `batch.rs`: [`GenBatch`] and its step (sample, append, one LLM forward for every row);
//! - `guidance.rs`: `gen_head` and classifier-free guidance;
//! - `decode.rs`, `preview.rs`: VQ decoding to RGB and the cheap previews of partial grids.

mod batch;
mod decode;
mod guidance;
mod prefill;
mod preview;

pub use batch::{FinishedJob, GenBatch};
pub use prefill::{GenPrefill, GenPrepared, Prefilled};

use crate::config::JanusConfig;
use crate::error::{Error, Result};
use crate::prompt::TextTokenizer;
use crate::sampling::{check_temperature, check_top_p};
use crate::weights::weights_err;
use crate::{Checkpoint, LoadOptions};
use candle_core::{DType, Device, Tensor};
use guidance::GenHead;
use janus_llm::{Linear, Llm};
use janus_vision::MlpAligner;
use janus_vq::{image_buf::Rgb8, VqModel};
use preview::PreviewPalette;
use std::path::Path;
use std::sync::Arc;

/// Most images one request may ask for.
pub const MAX_IMAGES: usize = 16;

/// Largest accepted guidance weight. Useful weights are about 1–10 (5 in the reference); far
/// larger ones only saturate the logits, and near `f32::MAX` they overflow to infinities.
pub const MAX_CFG_WEIGHT: f32 = 100.0;

/// Settings of one text-to-image request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Images to generate, 1..=16.
    pub n: usize,
    /// Guidance weight (5 in the reference).
    pub cfg_weight: f32,
    /// Softmax temperature; 0 means greedy (argmax), which the reference cannot do.
    pub temperature: f32,
    /// Keep the `top_k` most likely codes (0 = off; the reference uses none).
    pub top_k: usize,
    /// Nucleus mass in (0, 1] (1 = off).
    pub top_p: f32,
    /// Image `i` samples with seed `seed + i`, so each image is reproducible on its own.
    pub seed: u64,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            n: 1,
            cfg_weight: 5.0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 12345,
        }
    }
}

impl GenerateParams {
    /// Rejects out-of-range settings with an error naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_IMAGES).contains(&self.n) {
            return Err(Error::invalid(
                "n",
                format!("must be in 1..={MAX_IMAGES}, got {}", self.n),
            ));
        }
        if !(0.0..=MAX_CFG_WEIGHT).contains(&self.cfg_weight) {
            return Err(Error::invalid(
                "cfg_weight",
                format!(
                    "must be a finite number in [0, {MAX_CFG_WEIGHT}], got {}",
                    self.cfg_weight
                ),
            ));
        }
        check_temperature(self.temperature)?;
        check_top_p(self.top_p)
    }
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// RGB8 pixels.
    pub image: Rgb8,
    /// The codebook ids it was decoded from, raster order.
    pub tokens: Vec<u32>,
    /// The seed its tokens were sampled with.
    pub seed: u64,
}

/// The generation half of a Janus checkpoint.
#[derive(Debug)]
pub struct GenerationModel {
    tokenizer: TextTokenizer,
    config: JanusConfig,
    llm: Arc<Llm>,
    gen_embed: Tensor,
    gen_aligner: MlpAligner,
    gen_head: GenHead,
    vq: VqModel,
    context: usize,
    device: Device,
    caches: crate::cache::Caches,
    palette: std::sync::OnceLock<std::sync::Mutex<PreviewPalette>>,
}

impl GenerationModel {
    /// Loads the LLM body, `gen_embed`, `gen_aligner`, `gen_head` and the VQ decoder.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_sharing(dir, opts, None)
    }

    /// Like [`Self::load`], but uses `llm` (from the same checkpoint, on `opts.device`) instead
    /// of loading the LLM body again; only the generation parts are read from the checkpoint.
    pub fn load_sharing(dir: &Path, opts: &LoadOptions, llm: Option<Arc<Llm>>) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        let vb = ck.var_builder(opts)?;
        let cfg = &ck.config;
        let llm = match llm {
            Some(llm) => llm,
            None => Arc::new(
                Llm::load_quantized(
                    vb.pp("language_model"),
                    &cfg.llm,
                    opts.dtype,
                    false,
                    janus_llm::Quantize {
                        layers: opts.quant,
                        lm_head: None,
                    },
                )
                .map_err(weights_err)?,
            ),
        };
        let gh = &cfg.gen_head;
        let gen_embed = vb
            .get((gh.image_token_size, gh.gen_embed_dim), "gen_embed.weight")
            .and_then(|t| t.to_dtype(opts.dtype))
            .map_err(weights_err)?;
        let ga = &cfg.gen_aligner;
        let gen_aligner =
            MlpAligner::load(vb.pp("gen_aligner"), ga.input_dim, ga.n_embed, ga.depth)
                .map_err(weights_err)?;
        // Under CPU bf16 compute the head multiplies with bf16 products like the language
        // model, its weights packed once as bf16 pairs (no extra memory): at 16 rows (8
        // guided images) a step is compute-bound.
        let cpu_bf16 = opts.dtype == DType::BF16 && opts.device.is_cpu();
        let head_layer = |name: &str, in_dim: usize, out_dim: usize| -> Result<Linear> {
            Linear::load(vb.pp(name), in_dim, out_dim, true)
                .and_then(|l| l.packed_for_bf16_compute(cpu_bf16))
                .map_err(weights_err)
        };
        let gen_head = GenHead {
            output_mlp_projector: head_layer(
                "gen_head.output_mlp_projector",
                gh.n_embed,
                gh.image_token_embed,
            )?,
            vision_head: head_layer(
                "gen_head.vision_head",
                gh.image_token_embed,
                gh.image_token_size,
            )?,
        };
        let vq = VqModel::load(vb.pp("gen_vision_model"), &cfg.vq, false, opts.dtype)
            .map_err(weights_err)?;
        let context = opts.max_context.unwrap_or(cfg.llm.max_position_embeddings);
        Ok(Self {
            tokenizer: ck
                .tokenizer
                .with_special_tokens_in_text(opts.special_tokens_in_text),
            config: ck.config,
            llm,
            gen_embed,
            gen_aligner,
            gen_head,
            vq,
            context,
            device: opts.device.clone(),
            caches: crate::cache::Caches::new(0, 0),
            palette: Default::default(),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &JanusConfig {
        &self.config
    }

    /// The tokenizer and special ids.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Reference tokenization: special-token strings typed in prompt text become special
    /// tokens (off by default, see [`TextTokenizer::set_special_tokens_in_text`]).
    pub fn set_special_tokens_in_text(&mut self, allow: bool) {
        self.tokenizer.set_special_tokens_in_text(allow);
    }

    /// The language model body (shared with the understanding half in `janus serve`).
    pub fn llm(&self) -> &Arc<Llm> {
        &self.llm
    }

    /// Context window in tokens (prompt plus image tokens must fit).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Image tokens per image.
    pub fn image_tokens(&self) -> usize {
        self.config.image_tokens()
    }

    /// Runs a request to the end, as a batch of one; `on_step(done, total)` after every step.
    pub fn generate(
        &self,
        prompt: &str,
        params: &GenerateParams,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Vec<GeneratedImage>> {
        let mut batch = GenBatch::new();
        self.join(&mut batch, 0, self.start(prompt, params)?)?;
        loop {
            self.step_batch(&mut batch)?;
            let (done, total) = batch.progress(0).expect("in the batch until taken");
            on_step(done, total);
            if done >= total {
                break;
            }
        }
        let job = batch
            .take_finished()
            .pop()
            .expect("a request with all its tokens is finished");
        let images = self.decode(&job.tokens)?;
        Ok(images
            .into_iter()
            .zip(job.tokens)
            .enumerate()
            .map(|(i, (image, tokens))| GeneratedImage {
                image,
                tokens,
                seed: params.seed.wrapping_add(i as u64),
            })
            .collect())
    }
}
