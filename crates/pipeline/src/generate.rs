//! The generation half: LLM body + `gen_embed` + `gen_aligner` + `gen_head` + VQ decoder, with
//! classifier-free guidance exactly as DeepSeek's `generation_inference.py` builds it.
//!
//! Rows are interleaved `[c0, u0, c1, u1, …]`: conditional prompt, and the unconditional prompt
//! (every token but BOS and the final `<begin_of_image>` replaced by the pad id), no attention
//! mask. The two prompt rows are prefilled once and their cache broadcast to the `n` image pairs.

use crate::config::JanusConfig;
use crate::error::{Error, Result};
use crate::preview::PreviewPalette;
use crate::prompt::TextTokenizer;
use crate::sampling::{check_temperature, check_top_p, Sampler};
use crate::weights::weights_err;
use crate::{Checkpoint, LoadOptions};
use candle_core::{DType, Device, Module, Tensor};
use janus_llm::{KvCache, Linear, Llm};
use janus_vision::MlpAligner;
use janus_vq::{image_buf::Rgb8, VqModel};
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
    llm: Arc<Llm>,
    gen_embed: Tensor,
    gen_aligner: MlpAligner,
    gen_head: GenHead,
    vq: VqModel,
    context: usize,
    device: Device,
    uncond: std::sync::Mutex<UncondCache>,
    palette: std::sync::OnceLock<std::sync::Mutex<PreviewPalette>>,
}

/// True when a candle error is a VQ decode stopped by its callback.
fn is_stopped(e: &candle_core::Error) -> bool {
    match e {
        candle_core::Error::Wrapped(inner) => {
            inner.to_string() == janus_vq::DecodeStopped.to_string()
        }
        candle_core::Error::WithBacktrace { inner, .. } => is_stopped(inner),
        candle_core::Error::Context { inner, .. } => is_stopped(inner),
        _ => false,
    }
}

/// Prefilled unconditional rows by prompt length. The unconditional prompt is
/// `[BOS, pad × (L − 2), <begin_of_image>]`: it depends only on the prompt length, so requests
/// of equal length share its prefill.
#[derive(Debug, Default)]
struct UncondCache {
    /// Most recently used last.
    entries: Vec<UncondEntry>,
    reuses: u64,
}

#[derive(Debug)]
struct UncondEntry {
    ids: Vec<u32>,
    /// One-row cache holding exactly the prompt's slots.
    cache: KvCache,
    /// Last hidden state `[1, hidden]`.
    last: Tensor,
    bytes: usize,
}

/// Unconditional prefills kept (a few prompt lengths cover most traffic).
pub const UNCOND_CACHE_ENTRIES: usize = 16;

/// Memory the kept unconditional prefills may take in all.
pub const UNCOND_CACHE_BYTES: usize = 256 << 20;

/// A validated, tokenized generation request.
#[derive(Debug, Clone)]
pub struct GenPrepared {
    /// Conditional prompt ids.
    pub cond: Vec<u32>,
    /// Unconditional prompt ids (same length).
    pub uncond: Vec<u32>,
    /// The request's settings.
    pub params: GenerateParams,
}

/// One prompt row being prefilled.
#[derive(Debug)]
struct RowPrefill {
    cache: KvCache,
    done: usize,
    last: Option<Tensor>,
}

/// A generation request whose two prompt rows are being prefilled, a chunk at a time (see
/// [`GenerationModel::prefill`]).
#[derive(Debug)]
pub struct GenPrefill {
    prepared: GenPrepared,
    cond: RowPrefill,
    uncond: RowPrefill,
    /// The unconditional row came from the cache of recent prefills.
    uncond_cached: bool,
}

impl GenPrefill {
    /// Prompt rows (conditional, unconditional) not completely prefilled yet.
    pub fn rows_left(&self) -> usize {
        (self.cond.done < self.prepared.cond.len()) as usize
            + (self.uncond.done < self.prepared.uncond.len()) as usize
    }

    /// The request being prefilled.
    pub fn prepared(&self) -> &GenPrepared {
        &self.prepared
    }
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
                Llm::load(vb.pp("language_model"), &cfg.llm, opts.dtype, false)
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
            uncond: Default::default(),
            palette: Default::default(),
        })
    }

    /// How many requests reused a cached unconditional prefill.
    pub fn uncond_reuses(&self) -> u64 {
        self.uncond.lock().map(|c| c.reuses).unwrap_or(0)
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

    /// Validates and tokenizes a request (the conditional prompt and its unconditional twin).
    pub fn prepare(&self, prompt: &str, params: &GenerateParams) -> Result<GenPrepared> {
        params.validate()?;
        if prompt.trim().is_empty() {
            // Most likely an unset proto3 field: refused rather than drawing unconditioned images.
            return Err(Error::invalid(
                "prompt",
                "empty: describe the image to draw",
            ));
        }
        let (cond, uncond) = self.tokenizer.encode_generation(prompt)?;
        let total = self.image_tokens();
        if cond.len() + total > self.context {
            return Err(Error::PromptTooLong {
                prompt_tokens: cond.len(),
                max_new_tokens: total,
                context: self.context,
            });
        }
        Ok(GenPrepared {
            cond,
            uncond,
            params: params.clone(),
        })
    }

    /// Starts prefilling a prepared request: nothing is computed yet. The unconditional row is
    /// taken from the cache of recent prefills when a prompt of equal length was seen.
    pub fn begin(&self, prepared: GenPrepared) -> GenPrefill {
        let total = self.image_tokens();
        let row = |ids: &[u32]| {
            let mut cache = self.llm.new_cache(1);
            cache.reserve(ids.len() + total);
            RowPrefill {
                cache,
                done: 0,
                last: None,
            }
        };
        let cond = row(&prepared.cond);
        let cached = self.uncond.lock().ok().and_then(|mut c| {
            let i = c.entries.iter().position(|e| e.ids == prepared.uncond)?;
            let hit = c.entries.remove(i);
            // A copy: the request appends to its rows, the cached prefill stays as it is.
            let out = hit.cache.deep_copy().map(|cache| (cache, hit.last.clone()));
            c.entries.push(hit);
            c.reuses += 1;
            out.ok()
        });
        let (uncond, uncond_cached) = match cached {
            Some((mut cache, last)) => {
                cache.reserve(prepared.uncond.len() + total);
                let done = prepared.uncond.len();
                (
                    RowPrefill {
                        cache,
                        done,
                        last: Some(last),
                    },
                    true,
                )
            }
            None => (row(&prepared.uncond), false),
        };
        GenPrefill {
            prepared,
            cond,
            uncond,
            uncond_cached,
        }
    }

    /// Prompt positions left to prefill (the budget unit of a scheduler).
    pub fn cost_left(&self, pre: &GenPrefill) -> usize {
        (pre.prepared.cond.len() - pre.cond.done) + (pre.prepared.uncond.len() - pre.uncond.done)
    }

    /// Prefills up to `budget` more prompt positions (the conditional row, then the
    /// unconditional one; each row on its own, so a request's numerics do not depend on the
    /// cache state; at least one position per call). When both rows are complete, returns the
    /// job, its pair broadcast to `n` interleaved image pairs, ready for its first step.
    pub fn prefill(&self, pre: &mut GenPrefill, budget: usize) -> Result<Option<GenJob>> {
        let mut left = budget.max(1);
        for (row, ids) in [
            (&mut pre.cond, &pre.prepared.cond),
            (&mut pre.uncond, &pre.prepared.uncond),
        ] {
            if left == 0 || row.done == ids.len() {
                continue;
            }
            let n = left.min(ids.len() - row.done);
            let t = Tensor::from_vec(ids[row.done..row.done + n].to_vec(), (1, n), &self.device)?;
            let hidden = self.llm.forward(&self.llm.embed(&t)?, &mut row.cache)?;
            row.done += n;
            left -= n;
            if row.done == ids.len() {
                row.last = Some(Llm::last(&hidden)?);
            }
        }
        if self.cost_left(pre) > 0 {
            return Ok(None);
        }
        let (Some(clast), Some(ulast)) = (pre.cond.last.clone(), pre.uncond.last.clone()) else {
            return Err(Error::invalid("prompt", "empty prompt"));
        };
        let mut cache = std::mem::replace(&mut pre.cond.cache, self.llm.new_cache(0));
        let ucache = std::mem::replace(&mut pre.uncond.cache, self.llm.new_cache(0));
        if !pre.uncond_cached {
            self.remember_uncond(&pre.prepared.uncond, &ucache, &ulast);
        }
        cache.merge(ucache)?;
        let params = pre.prepared.params.clone();
        let total = self.image_tokens();
        // Broadcast the (cond, uncond) pair to n interleaved pairs.
        let rows: Vec<usize> = (0..params.n).flat_map(|_| [0, 1]).collect();
        cache.select_rows(&rows)?;
        let last = Tensor::cat(&[&clast, &ulast], 0)?;
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
        Ok(Some(GenJob {
            cache,
            last_hidden,
            samplers,
            tokens: vec![Vec::with_capacity(total); params.n],
            prompt_tokens: pre.prepared.cond.len(),
            params,
            total,
        }))
    }

    /// Keeps a compact copy of an unconditional prefill for later requests of equal length,
    /// within [`UNCOND_CACHE_ENTRIES`] entries and [`UNCOND_CACHE_BYTES`].
    fn remember_uncond(&self, ids: &[u32], cache: &KvCache, last: &Tensor) {
        let bytes = ids.len() * self.llm.kv_bytes_per_token();
        if bytes > UNCOND_CACHE_BYTES {
            return;
        }
        let Ok(copy) = cache.deep_copy() else {
            return;
        };
        if let Ok(mut c) = self.uncond.lock() {
            c.entries.push(UncondEntry {
                ids: ids.to_vec(),
                cache: copy,
                last: last.clone(),
                bytes,
            });
            while c.entries.len() > UNCOND_CACHE_ENTRIES
                || c.entries.iter().map(|e| e.bytes).sum::<usize>() > UNCOND_CACHE_BYTES
            {
                c.entries.remove(0);
            }
        }
    }

    /// Validates, tokenizes and prefills a request in one go; the job is ready for its first
    /// step.
    pub fn start(&self, prompt: &str, params: &GenerateParams) -> Result<GenJob> {
        let mut pre = self.begin(self.prepare(prompt, params)?);
        loop {
            if let Some(job) = self.prefill(&mut pre, usize::MAX)? {
                return Ok(job);
            }
        }
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
        self.guide(
            &job.last_hidden,
            &vec![job.params.cfg_weight; job.tokens.len()],
        )
    }

    /// Classifier-free guidance for interleaved `[c0, u0, c1, u1, …]` hidden states
    /// `[2k, hidden]` with one weight per pair: `[k, codes]` (f32).
    pub(crate) fn guide(&self, hidden: &Tensor, weights: &[f32]) -> Result<Tensor> {
        let logits = self.head_logits(hidden)?;
        let (rows, v) = logits.dims2()?;
        if rows != 2 * weights.len() {
            return Err(Error::invalid(
                "weights",
                format!("{} guidance weights for {rows} rows", weights.len()),
            ));
        }
        let pairs = logits.reshape((rows / 2, 2, v))?;
        let cond = pairs.narrow(1, 0, 1)?.squeeze(1)?;
        let uncond = pairs.narrow(1, 1, 1)?.squeeze(1)?;
        let w = Tensor::from_vec(weights.to_vec(), (rows / 2, 1), logits.device())?;
        Ok((&uncond + (cond - &uncond)?.broadcast_mul(&w)?)?.to_dtype(DType::F32)?)
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
        Ok(self
            .decode_until(tokens, &|| false)?
            .expect("a decode that is never stopped completes"))
    }

    /// Decodes complete grids, asking `stop` between decoder blocks: `None` when it stopped
    /// (a cancelled request's decode ends within one block). Every decoded image also refines
    /// the preview palette.
    pub fn decode_until(
        &self,
        tokens: &[Vec<u32>],
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Vec<Rgb8>>> {
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        let raw = match self.vq.decode_codes_until(&flat, tokens.len(), stop) {
            Ok(raw) => raw,
            Err(e) if is_stopped(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let images = janus_vq::to_rgb8(&raw)?;
        if let Ok(mut p) = self.palette()?.lock() {
            for (codes, img) in tokens.iter().zip(&images) {
                p.observe(codes, img);
            }
        }
        Ok(Some(images))
    }

    /// The preview palette, created on first use from the codebook.
    fn palette(&self) -> Result<&std::sync::Mutex<PreviewPalette>> {
        if let Some(p) = self.palette.get() {
            return Ok(p);
        }
        let cb = self.vq.codebook().to_dtype(DType::F32)?;
        let dim = cb.dim(1)?;
        let flat = cb.flatten_all()?.to_vec1::<f32>()?;
        Ok(self
            .palette
            .get_or_init(|| std::sync::Mutex::new(PreviewPalette::new(flat, dim))))
    }

    /// A cheap `size`×`size` preview of a partial grid (see [`crate::preview`]): no VQ decode,
    /// except one calibration decode the first time (when no image was decoded yet).
    pub fn preview(&self, tokens: &[u32], size: u32) -> Result<Rgb8> {
        let total = self.image_tokens();
        let side = (total as f64).sqrt().round() as usize;
        let calibrated = self
            .palette()?
            .lock()
            .map(|p| p.observed() > 0)
            .unwrap_or(true);
        if !calibrated {
            self.calibrate_previews()?;
        }
        let p = self
            .palette()?
            .lock()
            .map_err(|_| Error::invalid("preview", "palette lock poisoned"))?;
        Ok(p.render(tokens, side, size))
    }

    /// Fits the preview palette on one decode of a seeded random 12×12 grid (a quarter of an
    /// image's decoder work); later decodes refine it. The decode worker calls it at start.
    pub fn calibrate_previews(&self) -> Result<()> {
        let side = 12usize
            .min((self.image_tokens() as f64).sqrt() as usize)
            .max(1);
        {
            let codes = self.config.gen_head.image_token_size.max(1) as u64;
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let grid: Vec<u32> = (0..side * side)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % codes) as u32
                })
                .collect();
            self.decode(&[grid])?;
        }
        Ok(())
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
