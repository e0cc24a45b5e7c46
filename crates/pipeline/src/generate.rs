//! The generation half: LLM body + `gen_embed` + `gen_aligner` + `gen_head` + VQ decoder, with
//! classifier-free guidance exactly as DeepSeek's `generation_inference.py` builds it.
//!
//! Rows are interleaved `[c0, u0, c1, u1, …]`: conditional prompt, and the unconditional prompt
//! (every token but BOS and the final `<begin_of_image>` replaced by the pad id), no attention
//! mask. The two prompt rows are prefilled once and their cache broadcast to the `n` image pairs.

use crate::config::JanusConfig;
use crate::error::{Error, Result};
use crate::prompt::TextTokenizer;
use crate::sampling::{check_temperature, check_top_p, Sampler};
use crate::weights::weights_err;
use crate::{Checkpoint, LoadOptions};
use candle_core::{DType, Device, Module, Tensor};
use janus_llm::{KvCache, Linear, Llm};
use janus_vision::MlpAligner;
use janus_vq::{image_buf::Rgb8, VqModel};
use std::path::Path;

/// Most images one request may ask for.
pub const MAX_IMAGES: usize = 16;

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
        if !self.cfg_weight.is_finite() || self.cfg_weight < 0.0 {
            return Err(Error::invalid(
                "cfg_weight",
                format!("must be a finite number ≥ 0, got {}", self.cfg_weight),
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

/// An in-flight request: its cache (2n rows), samplers and the tokens so far.
#[derive(Debug)]
pub struct GenJob {
    cache: KvCache,
    /// Final-normed hidden state of the last slot of each row `[2n, hidden]`.
    last_hidden: Tensor,
    samplers: Vec<Sampler>,
    /// Tokens per image.
    pub tokens: Vec<Vec<u32>>,
    /// The request's settings.
    pub params: GenerateParams,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    total: usize,
}

/// The pieces of a [`GenJob`], for joining a [`crate::gen_batch::GenBatch`].
pub(crate) struct JobParts {
    pub cache: KvCache,
    pub last_hidden: Tensor,
    pub samplers: Vec<Sampler>,
    pub tokens: Vec<Vec<u32>>,
    pub params: GenerateParams,
    pub prompt_tokens: usize,
    pub total: usize,
}

impl GenJob {
    pub(crate) fn into_parts(self) -> JobParts {
        JobParts {
            cache: self.cache,
            last_hidden: self.last_hidden,
            samplers: self.samplers,
            tokens: self.tokens,
            params: self.params,
            prompt_tokens: self.prompt_tokens,
            total: self.total,
        }
    }

    /// Steps taken so far (tokens per image).
    pub fn step(&self) -> usize {
        self.tokens.first().map_or(0, Vec::len)
    }

    /// Steps in total (576 for 384 px).
    pub fn total_steps(&self) -> usize {
        self.total
    }

    /// True when every image has all its tokens.
    pub fn is_done(&self) -> bool {
        self.step() >= self.total
    }
}

/// `vision_head` of the reference: Linear → GELU (erf) → Linear to code logits.
#[derive(Debug, Clone)]
struct GenHead {
    output_mlp_projector: Linear,
    vision_head: Linear,
}

impl GenHead {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.vision_head
            .forward(&self.output_mlp_projector.forward(x)?.gelu_erf()?)
    }
}

/// The generation half of a Janus checkpoint.
#[derive(Debug)]
pub struct GenerationModel {
    tokenizer: TextTokenizer,
    config: JanusConfig,
    llm: Llm,
    gen_embed: Tensor,
    gen_aligner: MlpAligner,
    gen_head: GenHead,
    vq: VqModel,
    context: usize,
    device: Device,
    uncond: std::sync::Mutex<UncondCache>,
}

/// Prefilled unconditional rows by prompt length. The unconditional prompt is
/// `[BOS, pad × (L − 2), <begin_of_image>]`: it depends only on the prompt length, so requests
/// of equal length share its prefill.
#[derive(Debug, Default)]
struct UncondCache {
    /// `(ids, one-row cache, last hidden [1, hidden])`, most recently used last.
    entries: Vec<(Vec<u32>, KvCache, Tensor)>,
    reuses: u64,
}

/// Unconditional prefills kept (a few prompt lengths cover most traffic).
const UNCOND_CACHE_ENTRIES: usize = 16;

impl GenerationModel {
    /// Loads the LLM body, `gen_embed`, `gen_aligner`, `gen_head` and the VQ decoder.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        let vb = ck.var_builder(opts)?;
        let cfg = &ck.config;
        let llm =
            Llm::load(vb.pp("language_model"), &cfg.llm, opts.dtype, false).map_err(weights_err)?;
        let gh = &cfg.gen_head;
        let gen_embed = vb
            .get((gh.image_token_size, gh.gen_embed_dim), "gen_embed.weight")
            .and_then(|t| t.to_dtype(opts.dtype))
            .map_err(weights_err)?;
        let ga = &cfg.gen_aligner;
        let gen_aligner =
            MlpAligner::load(vb.pp("gen_aligner"), ga.input_dim, ga.n_embed, ga.depth)
                .map_err(weights_err)?;
        let gen_head = GenHead {
            output_mlp_projector: Linear::load(
                vb.pp("gen_head.output_mlp_projector"),
                gh.n_embed,
                gh.image_token_embed,
                true,
            )
            .map_err(weights_err)?,
            vision_head: Linear::load(
                vb.pp("gen_head.vision_head"),
                gh.image_token_embed,
                gh.image_token_size,
                true,
            )
            .map_err(weights_err)?,
        };
        let vq = VqModel::load(vb.pp("gen_vision_model"), &cfg.vq, false).map_err(weights_err)?;
        let context = opts.max_context.unwrap_or(cfg.llm.max_position_embeddings);
        Ok(Self {
            tokenizer: ck.tokenizer,
            config: ck.config,
            llm,
            gen_embed,
            gen_aligner,
            gen_head,
            vq,
            context,
            device: opts.device.clone(),
            uncond: Default::default(),
        })
    }

    /// How many requests reused a cached unconditional prefill.
    pub fn uncond_reuses(&self) -> u64 {
        self.uncond.lock().map(|c| c.reuses).unwrap_or(0)
    }

    /// Prefills the (conditional, unconditional) pair: cache of 2 rows and their last hidden
    /// states `[2, hidden]`, reusing the unconditional row when its length was seen before.
    ///
    /// Each row is prefilled on its own, cache hit or miss alike, so a request's numerics (and
    /// therefore its sampled tokens for a seed) do not depend on what ran before it.
    fn prefill_pair(&self, cond: Vec<u32>, uncond: Vec<u32>) -> Result<(KvCache, Tensor)> {
        let cached = self.uncond.lock().ok().and_then(|mut c| {
            let i = c.entries.iter().position(|(ids, _, _)| *ids == uncond)?;
            let hit = c.entries.remove(i);
            let out = (hit.1.clone(), hit.2.clone());
            c.entries.push(hit);
            c.reuses += 1;
            Some(out)
        });
        let (ucache, uhidden) = match cached {
            Some(hit) => hit,
            None => {
                let (urow, uhidden) = self.prefill_row(uncond.clone())?;
                if let Ok(mut c) = self.uncond.lock() {
                    if c.entries.len() >= UNCOND_CACHE_ENTRIES {
                        c.entries.remove(0);
                    }
                    c.entries.push((uncond, urow.clone(), uhidden.clone()));
                }
                (urow, uhidden)
            }
        };
        let (mut cache, chidden) = self.prefill_row(cond)?;
        // `merge` copies into fresh tensors, so the cached row is never written to.
        cache.merge(ucache)?;
        Ok((cache, Tensor::cat(&[&chidden, &uhidden], 0)?))
    }

    /// Prefills one prompt row: its cache and last hidden state `[1, hidden]`.
    fn prefill_row(&self, ids: Vec<u32>) -> Result<(KvCache, Tensor)> {
        let l = ids.len();
        let ids = Tensor::from_vec(ids, (1, l), &self.device)?;
        let mut cache = self.llm.new_cache(vec![0]);
        let hidden = self.llm.forward(&self.llm.embed(&ids)?, &mut cache)?;
        Ok((cache, Llm::last(&hidden)?))
    }

    /// The model configuration.
    pub fn config(&self) -> &JanusConfig {
        &self.config
    }

    /// The tokenizer and special ids.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Context window in tokens (prompt plus image tokens must fit).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Image tokens per image.
    pub fn image_tokens(&self) -> usize {
        self.config.image_tokens()
    }

    /// Validates, tokenizes and prefills a request; the job is ready for its first step.
    pub fn start(&self, prompt: &str, params: &GenerateParams) -> Result<GenJob> {
        params.validate()?;
        let (cond, uncond) = self.tokenizer.encode_generation(prompt)?;
        let total = self.image_tokens();
        if cond.len() + total > self.context {
            return Err(Error::PromptTooLong {
                prompt_tokens: cond.len(),
                max_new_tokens: total,
                context: self.context,
            });
        }
        let l = cond.len();
        let (mut cache, last) = self.prefill_pair(cond, uncond)?;
        // Broadcast the (cond, uncond) pair to n interleaved pairs.
        let rows: Vec<usize> = (0..params.n).flat_map(|_| [0, 1]).collect();
        cache.select_rows(&rows)?;
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &self.device,
        )?;
        let last_hidden = last.index_select(&idx, 0)?;
        let samplers = (0..params.n)
            .map(|i| {
                Sampler::new(
                    params.seed.wrapping_add(i as u64),
                    params.temperature,
                    params.top_k,
                    params.top_p,
                )
            })
            .collect();
        Ok(GenJob {
            cache,
            last_hidden,
            samplers,
            tokens: vec![Vec::with_capacity(total); params.n],
            params: params.clone(),
            prompt_tokens: l,
            total,
        })
    }

    /// `gen_head` logits `[rows, codes]` for final-normed hidden states `[rows, hidden]`.
    pub(crate) fn head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.gen_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// Feeds one code per row (`codes.len()` = cache rows) through `gen_embed`, `gen_aligner`
    /// and the LLM; returns the hidden states `[rows, 1, hidden]`.
    pub(crate) fn forward_codes(&self, codes: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let idx = Tensor::from_vec(codes.to_vec(), codes.len(), &self.device)?;
        let emb = self
            .gen_aligner
            .forward(&self.gen_embed.index_select(&idx, 0)?)?;
        Ok(self.llm.forward(&emb.unsqueeze(1)?, cache)?)
    }

    /// Guided logits `[n, codes]` (f32) for the job's next step:
    /// `uncond + cfg_weight · (cond − uncond)`.
    pub fn guided_logits(&self, job: &GenJob) -> Result<Tensor> {
        let logits = self.head_logits(&job.last_hidden)?;
        let (rows, v) = logits.dims2()?;
        let pairs = logits.reshape((rows / 2, 2, v))?;
        let cond = pairs.narrow(1, 0, 1)?.squeeze(1)?;
        let uncond = pairs.narrow(1, 1, 1)?.squeeze(1)?;
        Ok((&uncond + ((cond - &uncond)? * job.params.cfg_weight as f64)?)?)
    }

    /// Appends one token per image and, unless the images are complete, runs the LLM on them.
    pub fn advance(&self, job: &mut GenJob, tokens: &[u32]) -> Result<()> {
        if tokens.len() != job.tokens.len() {
            return Err(Error::invalid(
                "tokens",
                format!("{} tokens for {} images", tokens.len(), job.tokens.len()),
            ));
        }
        if job.is_done() {
            return Err(Error::invalid(
                "tokens",
                "the job already has all its tokens",
            ));
        }
        let codes = self.config.gen_head.image_token_size as u32;
        if let Some(&bad) = tokens.iter().find(|&&t| t >= codes) {
            return Err(Error::invalid(
                "tokens",
                format!("code {bad} outside 0..{codes}"),
            ));
        }
        for (seq, &t) in job.tokens.iter_mut().zip(tokens) {
            seq.push(t);
        }
        if job.is_done() {
            return Ok(());
        }
        // Each token feeds both rows of its pair.
        let pair: Vec<u32> = tokens.iter().flat_map(|&t| [t, t]).collect();
        let hidden = self.forward_codes(&pair, &mut job.cache)?;
        job.last_hidden = Llm::last(&hidden)?;
        Ok(())
    }

    /// One full step: guided logits, sampling, advance. Returns the sampled tokens.
    pub fn step(&self, job: &mut GenJob) -> Result<Vec<u32>> {
        let logits = self.guided_logits(job)?.to_vec2::<f32>()?;
        let toks: Vec<u32> = logits
            .into_iter()
            .zip(job.samplers.iter_mut())
            .map(|(mut l, s)| s.sample(&mut l))
            .collect();
        self.advance(job, &toks)?;
        Ok(toks)
    }

    /// Decodes complete token grids to images `[n, 3, S, S]` in nominal [-1, 1].
    pub fn decode_raw(&self, tokens: &[Vec<u32>]) -> Result<Tensor> {
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        Ok(self.vq.decode_codes(&flat, tokens.len())?)
    }

    /// Decodes complete token grids to RGB8 images.
    pub fn decode(&self, tokens: &[Vec<u32>]) -> Result<Vec<Rgb8>> {
        Ok(janus_vq::to_rgb8(&self.decode_raw(tokens)?)?)
    }

    /// Runs a request to the end; `on_step(done, total)` after every step.
    pub fn generate(
        &self,
        prompt: &str,
        params: &GenerateParams,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Vec<GeneratedImage>> {
        let mut job = self.start(prompt, params)?;
        while !job.is_done() {
            self.step(&mut job)?;
            on_step(job.step(), job.total_steps());
        }
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
