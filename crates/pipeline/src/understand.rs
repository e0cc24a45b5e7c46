//! The understanding half: SigLIP tower + aligner + LLM + `lm_head`, as a batched step function.

use crate::cache::{image_hash, Caches, ImageHash, Scope, SeqKey};
use crate::config::{JanusConfig, PreprocessorConfig};
use crate::error::{Error, Result};
use crate::prompt::{self, Message, TextTokenizer};
use crate::sampling::{apply_repetition_penalty, Sampler, SamplingParams};
use crate::weights::weights_err;
use crate::{Checkpoint, LoadOptions};
use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;
use janus_llm::{KvCache, Llm};
use janus_vision::{MlpAligner, VisionTower};
use std::path::Path;
use std::sync::Arc;

/// A conversation and its images, in the order their `<image_placeholder>` tags appear.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// Turns; a system turn replaces the default system prompt.
    pub messages: Vec<Message>,
    /// Decoded RGB images (see [`crate::decode_rgb`]).
    pub images: Vec<RgbImage>,
}

/// A conversation turned into model input.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The rendered prompt text.
    pub prompt: String,
    /// Token ids with each image expanded to BOI + placeholders + EOI.
    pub ids: Vec<u32>,
    /// The images resized and padded to the model's input square.
    pub images: Vec<RgbImage>,
    /// SHA-256 of each preprocessed image (what the caches key it by).
    pub image_hashes: Vec<ImageHash>,
    /// Sampling settings of this request.
    pub params: SamplingParams,
    /// Whose cache entries this request may reuse and leaves ([`Scope::Global`] unless the
    /// server scopes them by API key).
    pub scope: Scope,
}

/// A request past [`UnderstandingModel::check`]: what [`UnderstandingModel::prepare_checked`]
/// takes with the decoded images. Made only by `check`.
#[derive(Debug, Clone)]
pub struct Checked {
    messages: Vec<Message>,
    params: SamplingParams,
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced end-of-sentence.
    Eos,
    /// `max_new_tokens` were produced.
    Length,
    /// A stop string appeared.
    Stop,
}

/// What one step produced for one row.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// A new token and the text it completes (may be empty while UTF-8 or a possible stop string is pending).
    Token { row: usize, id: u32, text: String },
    /// The row is done.
    Finished {
        row: usize,
        reason: FinishReason,
        prompt_tokens: usize,
        /// Prompt positions taken from the prefix cache instead of prefilled.
        cached_tokens: usize,
        completion_tokens: usize,
    },
}

impl TokenEvent {
    /// The same event for row `row`.
    fn on_row(self, row: usize) -> Self {
        match self {
            TokenEvent::Token { id, text, .. } => TokenEvent::Token { row, id, text },
            TokenEvent::Finished {
                reason,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                ..
            } => TokenEvent::Finished {
                row,
                reason,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            },
        }
    }
}

#[derive(Debug, Clone)]
struct Row {
    id: usize,
    params: SamplingParams,
    sampler: Sampler,
    prompt_tokens: usize,
    cached_tokens: usize,
    /// The prompt's cache key and scope, for the prefix cache when the row finishes.
    key: Arc<(Scope, SeqKey)>,
    generated: Vec<u32>,
    emitted: usize,
    done: bool,
}

impl Row {
    fn new(id: usize, params: SamplingParams, pre: &Prefill) -> Self {
        Row {
            id,
            sampler: Sampler::new(params.seed, params.temperature, params.top_k, params.top_p),
            prompt_tokens: pre.prepared.ids.len(),
            cached_tokens: pre.cached,
            key: pre.key.clone(),
            params,
            generated: Vec::new(),
            emitted: 0,
            done: false,
        }
    }
}

/// One request on its way into a batch: its images go through the vision tower a few blocks
/// at a time, then its prompt is prefilled chunk by chunk into its own cache (see
/// [`UnderstandingModel::begin`] and [`UnderstandingModel::prefill`]). Extra memory while it
/// runs is one chunk's activations and attention scores against the cache, never O(prompt²).
#[derive(Debug)]
pub struct Prefill {
    /// The request; `prepared.image_hashes` are those of the images after the reused prefix
    /// (one per `found`), `prepared.images` only the images the tower still has to see (those
    /// neither inside the reused prefix nor in the image cache).
    prepared: Prepared,
    /// The prompt's cache key and scope.
    key: Arc<(Scope, SeqKey)>,
    /// Features `[patches, hidden]` of each image after the reused prefix, in order: `None`
    /// for those the tower computes.
    found: Vec<Option<Tensor>>,
    /// Tower activations of the request's images `[images, patches, width]` and blocks done.
    tower: Option<(Tensor, usize)>,
    /// Aligned image features `[images · patches, hidden]` of the images after the reused
    /// prefix, once the tower is done.
    features: Option<Tensor>,
    cache: KvCache,
    /// Prompt positions taken from the prefix cache.
    cached: usize,
    /// Prompt positions prefilled so far (the reused ones included).
    done: usize,
    /// Image-placeholder ids among the positions prefilled after the reused prefix.
    image_rows_done: usize,
}

impl Prefill {
    /// Prompt positions prefilled so far and in total.
    pub fn progress(&self) -> (usize, usize) {
        (self.done, self.prepared.ids.len())
    }

    /// True while its images are still in the vision tower.
    pub fn in_vision(&self) -> bool {
        !self.prepared.images.is_empty() && self.features.is_none()
    }

    /// Prompt positions taken from the prefix cache.
    pub fn cached_tokens(&self) -> usize {
        self.cached
    }

    /// Images the vision tower has to see (neither in the reused prefix nor in the image
    /// cache).
    pub fn images_to_encode(&self) -> usize {
        self.prepared.images.len()
    }
}

/// Rows being decoded together, with their KV cache.
#[derive(Debug)]
pub struct UnderstandBatch {
    cache: KvCache,
    rows: Vec<Row>,
}

impl UnderstandBatch {
    /// True when every row has finished.
    pub fn is_done(&self) -> bool {
        self.rows.iter().all(|r| r.done)
    }

    /// Ids (indices into the `start` input) of rows still running.
    pub fn active(&self) -> Vec<usize> {
        self.rows.iter().filter(|r| !r.done).map(|r| r.id).collect()
    }

    /// Stops row `id` (e.g. its client went away); it leaves the batch at the next step.
    pub fn cancel(&mut self, id: usize) {
        for r in &mut self.rows {
            if r.id == id {
                r.done = true;
            }
        }
    }

    /// Rows still in the cache (finished rows leave at the next step or merge).
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Drops finished rows from the cache.
    fn compact(&mut self) -> Result<()> {
        if self.rows.iter().any(|r| r.done) {
            let keep: Vec<usize> = (0..self.rows.len())
                .filter(|&i| !self.rows[i].done)
                .collect();
            self.cache.select_rows(&keep)?;
            self.rows = keep.iter().map(|&i| self.rows[i].clone()).collect();
        }
        Ok(())
    }

    /// Continuous batching: appends the running rows of `other` (a freshly started batch) so
    /// both decode in the same forward from the next step on. Returns the ids `other`'s rows
    /// get here, indexed by their id in `other`; ids of this batch's rows are unchanged.
    pub fn merge(&mut self, mut other: UnderstandBatch) -> Result<Vec<Option<usize>>> {
        self.compact()?;
        other.compact()?;
        let base = self.rows.iter().map(|r| r.id + 1).max().unwrap_or(0);
        let max_other = other.rows.iter().map(|r| r.id + 1).max().unwrap_or(0);
        let mut ids = vec![None; max_other];
        if other.rows.is_empty() {
            return Ok(ids);
        }
        self.cache.merge(other.cache)?;
        for mut r in other.rows {
            ids[r.id] = Some(base + r.id);
            r.id += base;
            self.rows.push(r);
        }
        Ok(ids)
    }
}

/// The understanding half of a Janus checkpoint.
#[derive(Debug)]
pub struct UnderstandingModel {
    tokenizer: TextTokenizer,
    config: JanusConfig,
    pre: PreprocessorConfig,
    vision: VisionTower,
    aligner: MlpAligner,
    llm: Arc<Llm>,
    context: usize,
    device: Device,
    dtype: DType,
    caches: Caches,
}

impl UnderstandingModel {
    /// Loads the vision tower, aligner, LLM and `lm_head` from a checkpoint directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_sharing(dir, opts, None)
    }

    /// Like [`Self::load`], but uses `llm` (loaded with its `lm_head` from the same checkpoint,
    /// on `opts.device`) instead of loading the LLM again: `janus serve` builds the LLM once
    /// for both halves.
    pub fn load_sharing(dir: &Path, opts: &LoadOptions, llm: Option<Arc<Llm>>) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        let (vb, quantized) = ck.open_weights(opts)?;
        let cfg = &ck.config;
        // Quantized weights ask for memory first: the tower keeps its stored dtype.
        let vision = VisionTower::load_with(
            vb.pp("vision_model.vision_tower"),
            &cfg.vision,
            opts.dtype,
            quantized,
        )
        .map_err(weights_err)?;
        let aligner = MlpAligner::load(
            vb.pp("aligner"),
            cfg.aligner.input_dim,
            cfg.aligner.n_embed,
            cfg.aligner.depth,
        )
        .map_err(weights_err)?;
        let llm = match llm {
            Some(llm) => llm,
            None => Arc::new(
                Llm::load_quantized(
                    vb.pp("language_model"),
                    &cfg.llm,
                    opts.dtype,
                    true,
                    janus_llm::Quantize {
                        layers: opts.quant,
                        lm_head: opts.quant,
                    },
                )
                .map_err(weights_err)?,
            ),
        };
        let pre = PreprocessorConfig::from_dir(&ck.dir)?;
        if pre.image_size as usize != cfg.vision.image_size {
            return Err(Error::Config {
                file: "preprocessor_config.json".into(),
                reason: format!(
                    "image_size {} != vision tower input {}",
                    pre.image_size, cfg.vision.image_size
                ),
            });
        }
        let context = opts.max_context.unwrap_or(cfg.llm.max_position_embeddings);
        Ok(Self {
            tokenizer: ck
                .tokenizer
                .with_special_tokens_in_text(opts.special_tokens_in_text),
            config: ck.config,
            pre,
            vision,
            aligner,
            llm,
            context,
            device: opts.device.clone(),
            dtype: opts.dtype,
            caches: Caches::new(0, 0),
        })
    }

    /// Turns on the prefix KV cache and the image-feature cache with these byte limits (0
    /// keeps one off; both are off after loading). Outputs are the same either way.
    pub fn set_cache_limits(&mut self, prefix_bytes: usize, image_bytes: usize) {
        self.caches = Caches::new(prefix_bytes, image_bytes);
    }

    /// The caches' counters and sizes.
    pub fn cache_stats(&self) -> crate::CacheStats {
        self.caches.stats()
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

    /// The language model (shared with the generation half in `janus serve`).
    pub fn llm(&self) -> &Arc<Llm> {
        &self.llm
    }

    /// Context window in tokens.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Renders, tokenizes and checks a conversation; preprocesses its images.
    /// [`check`](Self::check) then [`prepare_checked`](Self::prepare_checked).
    pub fn prepare(&self, conv: &Conversation, params: SamplingParams) -> Result<Prepared> {
        let checked = self.check(conv.messages.clone(), conv.images.len(), params)?;
        self.prepare_checked(checked, &conv.images)
    }

    /// The checks that need no image and no tokenizer, cheap enough to run before a server
    /// decodes the request's images: the sampling parameters, a conversation with a user
    /// message, and `images` images plus the tokens to generate within the context window.
    pub fn check(
        &self,
        messages: Vec<Message>,
        images: usize,
        params: SamplingParams,
    ) -> Result<Checked> {
        params.validate()?;
        if messages.is_empty() {
            return Err(Error::invalid("messages", "the conversation is empty"));
        }
        if !messages.iter().any(|m| m.role == prompt::Role::User) {
            return Err(Error::invalid(
                "messages",
                "the conversation has no user message",
            ));
        }
        let per_image = self.config.vision.num_patches() + 2;
        if images * per_image + params.max_new_tokens > self.context {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "{images} image(s) of {per_image} tokens plus {} new tokens exceed the context window of {} tokens",
                    params.max_new_tokens, self.context
                ),
            ));
        }
        Ok(Checked { messages, params })
    }

    /// Renders and tokenizes a checked conversation with its decoded images (in the order of
    /// their tags) and preprocesses them; the exact checks (tags against images, the prompt's
    /// tokens within the context) are here.
    pub fn prepare_checked(&self, checked: Checked, images: &[RgbImage]) -> Result<Prepared> {
        let Checked { messages, params } = checked;
        let text = prompt::render(&messages, prompt::DEFAULT_SYSTEM_PROMPT);
        let placeholders = text.matches(prompt::IMAGE_TAG).count();
        if placeholders != images.len() {
            return Err(Error::ImageCountMismatch {
                placeholders,
                images: images.len(),
            });
        }
        let (ids, n_img) = self.tokenizer.encode_conversation(
            &messages,
            prompt::DEFAULT_SYSTEM_PROMPT,
            self.config.vision.num_patches(),
        )?;
        if n_img != placeholders {
            return Err(Error::ImageCountMismatch {
                placeholders: n_img,
                images: images.len(),
            });
        }
        if ids.len() + params.max_new_tokens > self.context {
            return Err(Error::PromptTooLong {
                prompt_tokens: ids.len(),
                max_new_tokens: params.max_new_tokens,
                context: self.context,
            });
        }
        let images: Vec<RgbImage> = images
            .iter()
            .map(|img| {
                janus_imageproc::preprocess(
                    img,
                    self.pre.image_size,
                    self.pre.min_size,
                    self.pre.background_color,
                )
            })
            .collect();
        Ok(Prepared {
            prompt: text,
            ids,
            image_hashes: images.iter().map(image_hash).collect(),
            images,
            params,
            scope: Scope::Global,
        })
    }

    /// Tower features `[n, patches, width]` and aligned features `[n, patches, hidden]`.
    pub fn image_features(&self, images: &[RgbImage]) -> Result<(Tensor, Tensor)> {
        let pixels = self.pixels(images)?;
        let feats = self.vision.forward(&pixels)?;
        let aligned = self.aligner.forward(&feats)?;
        Ok((feats, aligned))
    }

    fn pixels(&self, images: &[RgbImage]) -> Result<Tensor> {
        let s = self.pre.image_size as usize;
        let mut data = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            data.extend(janus_imageproc::to_chw(
                img,
                self.pre.image_mean,
                self.pre.image_std,
            ));
        }
        Ok(Tensor::from_vec(data, (images.len(), 3, s, s), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Cost of one vision-tower block for one image in *prompt-token units* (the multiply-adds
    /// of one LLM token): a scheduler spends one budget on both kinds of work.
    pub fn vision_block_cost(&self) -> usize {
        self.vision
            .block_macs()
            .div_ceil(self.llm.token_macs().max(1))
            .max(1)
    }

    /// Work left before `pre` yields its first token, in prompt-token units.
    pub fn cost_left(&self, pre: &Prefill) -> usize {
        let images = pre.prepared.images.len();
        let blocks_left = if pre.in_vision() {
            self.vision.num_blocks() - pre.tower.as_ref().map_or(0, |t| t.1)
        } else {
            0
        };
        blocks_left * images * self.vision_block_cost() + pre.prepared.ids.len() - pre.done
    }

    /// The cache key of a prompt: its ids, and each image's run of placeholders with the
    /// image's hash.
    fn seq_key(&self, prepared: &Prepared) -> SeqKey {
        let image = self.tokenizer.ids.image;
        let ids = &prepared.ids;
        let starts = (0..ids.len()).filter(|&i| ids[i] == image && (i == 0 || ids[i - 1] != image));
        SeqKey {
            images: starts.zip(prepared.image_hashes.iter().copied()).collect(),
            ids: ids.clone(),
        }
    }

    /// Starts a request: takes the longest prefix of its prompt the prefix cache holds (all
    /// but the last position at most), and the features of its later images the image cache
    /// holds; nothing is computed yet. Its cache is reserved for the prompt plus
    /// `max_new_tokens`, so it is allocated once.
    pub fn begin(&self, mut prepared: Prepared) -> Result<Prefill> {
        let key = self.seq_key(&prepared);
        let total = prepared.ids.len();
        let reserve = total + prepared.params.max_new_tokens;
        // Entries here are finished rows (no hidden state kept): the prompt's last position
        // always runs, for its logits.
        let hit = self
            .caches
            .start_row(&self.llm, &prepared.scope, &key, reserve)?;
        let (cache, cached) = (hit.cache, hit.len);
        // Images inside the reused prefix need no features (a prefix never ends inside an
        // image: entries hold whole images and the prompt's last position is text).
        let skip = key.images.iter().filter(|(at, _)| *at < cached).count();
        let images: Vec<RgbImage> = prepared.images.drain(..).skip(skip).collect();
        prepared.image_hashes.drain(..skip);
        let mut caches = self.caches.lock();
        let found: Vec<Option<Tensor>> = (prepared.image_hashes.iter())
            .map(|h| caches.images.get(&prepared.scope, h))
            .collect();
        drop(caches);
        prepared.images = images
            .into_iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(img, _)| img)
            .collect();
        let features = if prepared.images.is_empty() && !found.is_empty() {
            Some(self.assemble(&found, None)?)
        } else {
            None
        };
        let key = Arc::new((prepared.scope.clone(), key));
        Ok(Prefill {
            prepared,
            key,
            found,
            tower: None,
            features,
            cache,
            cached,
            done: cached,
            image_rows_done: 0,
        })
    }

    /// Features `[images · patches, hidden]` of a request's images after its reused prefix:
    /// each found one, or the next of `computed` (`[missing, patches, hidden]`, in order).
    fn assemble(&self, found: &[Option<Tensor>], computed: Option<&Tensor>) -> Result<Tensor> {
        let mut next = 0;
        let mut parts = Vec::with_capacity(found.len());
        for f in found {
            match f {
                Some(t) => parts.push(t.clone()),
                None => {
                    let Some(c) = computed else {
                        return Err(Error::invalid("images", "features missing"));
                    };
                    parts.push(c.i(next)?);
                    next += 1;
                }
            }
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Spends up to `budget` prompt-token units on `pre` (vision blocks first, then prompt
    /// positions; at least one block or one position, so every call makes progress). When the
    /// prompt is complete, returns a one-row batch ready for [`Self::step`] and its first token.
    pub fn prefill(
        &self,
        pre: &mut Prefill,
        budget: usize,
    ) -> Result<Option<(UnderstandBatch, Vec<TokenEvent>)>> {
        let mut left = budget;
        if pre.in_vision() {
            let images = pre.prepared.images.len();
            let per = self.vision_block_cost() * images;
            let (x, done) = match pre.tower.take() {
                Some(t) => t,
                None => (self.vision.embed(&self.pixels(&pre.prepared.images)?)?, 0),
            };
            let total = self.vision.num_blocks();
            let blocks = (left / per).clamp(1, total - done);
            let x = self.vision.blocks(&x, done..done + blocks)?;
            left = left.saturating_sub(blocks * per);
            if done + blocks < total {
                pre.tower = Some((x, done + blocks));
                return Ok(None);
            }
            let feats = self.vision.finish(&x)?;
            let aligned = self.aligner.forward(&feats)?;
            let hashes = pre.prepared.image_hashes.iter();
            let missing = hashes.zip(&pre.found).filter(|(_, f)| f.is_none());
            let mut caches = self.caches.lock();
            for (j, (hash, _)) in missing.enumerate() {
                // Its own storage: the entry must not keep the whole batch's tensor alive.
                let features = aligned.i(j)?.copy()?;
                caches
                    .images
                    .insert(pre.prepared.scope.clone(), *hash, features);
            }
            drop(caches);
            pre.features = Some(self.assemble(&pre.found, Some(&aligned))?);
            if left == 0 {
                return Ok(None);
            }
        }
        let Some(logits) = self.prompt_chunk(pre, left)? else {
            return Ok(None);
        };
        let cache = std::mem::replace(&mut pre.cache, self.llm.new_cache(0));
        let mut b = UnderstandBatch {
            cache,
            rows: vec![Row::new(0, pre.prepared.params.clone(), pre)],
        };
        let events = self.sample_rows(&mut b, &logits)?;
        Ok(Some((b, events)))
    }

    /// Prefills up to `max` more prompt positions (at least one); the last position's logits
    /// `[1, vocab]` (f32) when the prompt is complete.
    fn prompt_chunk(&self, pre: &mut Prefill, max: usize) -> Result<Option<Tensor>> {
        let total = pre.prepared.ids.len();
        let n = max.max(1).min(total - pre.done);
        let embeds = self.embed_chunk(pre, n)?;
        let hidden = self.llm.forward(&embeds, &mut pre.cache)?;
        pre.done += n;
        if pre.done < total {
            return Ok(None);
        }
        Ok(Some(self.llm.lm_logits(&Llm::last(&hidden)?)?))
    }

    /// Input embeddings `[1, n, hidden]` of the next `n` prompt positions, image features
    /// spliced in at the placeholder ids.
    fn embed_chunk(&self, pre: &mut Prefill, n: usize) -> Result<Tensor> {
        let ids = &pre.prepared.ids[pre.done..pre.done + n];
        let t = Tensor::from_vec(ids.to_vec(), (1, n), &self.device)?;
        let embeds = self.llm.embed(&t)?;
        let image = self.tokenizer.ids.image;
        let at: Vec<u32> = (0..n as u32)
            .filter(|&i| ids[i as usize] == image)
            .collect();
        if at.is_empty() {
            return Ok(embeds);
        }
        let Some(features) = &pre.features else {
            return Err(Error::ImageCountMismatch {
                placeholders: 1,
                images: 0,
            });
        };
        let from = pre.image_rows_done;
        if from + at.len() > features.dim(0)? {
            return Err(Error::ImageCountMismatch {
                placeholders: (from + at.len()) / self.config.vision.num_patches(),
                images: pre.prepared.images.len(),
            });
        }
        pre.image_rows_done += at.len();
        let h = self.config.llm.hidden_size;
        let feats = features
            .narrow(0, from, at.len())?
            .to_dtype(embeds.dtype())?;
        let flat = embeds.reshape((n, h))?;
        let idx = Tensor::from_vec(at.clone(), at.len(), &self.device)?;
        let flat = flat.index_add(&idx, &(feats - flat.index_select(&idx, 0)?)?, 0)?;
        Ok(flat.reshape((1, n, h))?)
    }

    /// Runs a started request's images through the tower (and aligner) in one go.
    fn encode_images(&self, pre: &mut Prefill) -> Result<()> {
        if pre.in_vision() {
            let vision = self.cost_left(pre) - (pre.prepared.ids.len() - pre.done);
            self.prefill(pre, vision)?;
        }
        Ok(())
    }

    /// The input embeddings `[1, prompt, hidden]` of a request: token embeddings with its
    /// image features spliced in at the placeholders (what the LLM is prefilled with).
    pub fn input_embeds(&self, prepared: Prepared) -> Result<Tensor> {
        let mut pre = self.begin(prepared)?;
        self.encode_images(&mut pre)?;
        let n = pre.prepared.ids.len();
        self.embed_chunk(&mut pre, n)
    }

    /// Prefills one request (chunks of `chunk` positions; vision in one go) and returns the
    /// logits of its last prompt position `[1, vocab]` (f32): what chunking must not change.
    pub fn prompt_logits(&self, prepared: Prepared, chunk: usize) -> Result<Tensor> {
        let mut pre = self.begin(prepared)?;
        self.encode_images(&mut pre)?;
        loop {
            if let Some(logits) = self.prompt_chunk(&mut pre, chunk)? {
                return Ok(logits);
            }
        }
    }

    /// Prefills each request on its own (in one go) and returns them as one batch with their
    /// first tokens; row `i` is `batch[i]`.
    pub fn start(&self, batch: Vec<Prepared>) -> Result<(UnderstandBatch, Vec<TokenEvent>)> {
        if batch.is_empty() {
            return Err(Error::invalid("batch", "no requests"));
        }
        let mut out = UnderstandBatch {
            cache: self.llm.new_cache(0),
            rows: Vec::new(),
        };
        let mut events = Vec::new();
        for (i, p) in batch.into_iter().enumerate() {
            let mut pre = self.begin(p)?;
            let (one, ev) = loop {
                if let Some(done) = self.prefill(&mut pre, usize::MAX)? {
                    break done;
                }
            };
            out.cache.merge(one.cache)?;
            out.rows.extend(one.rows.into_iter().map(|mut r| {
                r.id = i;
                r
            }));
            events.extend(ev.into_iter().map(|e| e.on_row(i)));
        }
        Ok((out, events))
    }

    /// One decode step for every running row.
    pub fn step(&self, batch: &mut UnderstandBatch) -> Result<Vec<TokenEvent>> {
        // Finished rows leave the cache before the forward.
        batch.compact()?;
        if batch.rows.is_empty() {
            return Ok(Vec::new());
        }
        let last: Vec<u32> = batch
            .rows
            .iter()
            .map(|r| *r.generated.last().expect("sampled at start"))
            .collect();
        let ids = Tensor::from_vec(last, (batch.rows.len(), 1), &self.device)?;
        let hidden = self.llm.forward(&self.llm.embed(&ids)?, &mut batch.cache)?;
        let logits = self.llm.lm_logits(&hidden.i((.., 0, ..))?)?;
        self.sample_rows(batch, &logits)
    }

    fn sample_rows(&self, batch: &mut UnderstandBatch, logits: &Tensor) -> Result<Vec<TokenEvent>> {
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let eos = self.tokenizer.ids.eos;
        let mut events = Vec::new();
        let was_done: Vec<bool> = batch.rows.iter().map(|r| r.done).collect();
        for (row, mut l) in batch.rows.iter_mut().zip(logits) {
            if row.done {
                continue;
            }
            apply_repetition_penalty(&mut l, &row.generated, row.params.repetition_penalty);
            if row.generated.len() < row.params.min_new_tokens {
                if let Some(v) = l.get_mut(eos as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
            let tok = row.sampler.sample(&mut l);
            if tok == eos {
                let rest = self.flush(row)?;
                if !rest.is_empty() {
                    events.push(TokenEvent::Token {
                        row: row.id,
                        id: tok,
                        text: rest,
                    });
                }
                events.push(self.finish(row, FinishReason::Eos));
                continue;
            }
            row.generated.push(tok);
            let text = self.tokenizer.decode(&row.generated)?;
            if let Some(cut) = earliest_stop(&text, &row.params.stop) {
                let delta = text.get(row.emitted..cut).unwrap_or("").to_string();
                events.push(TokenEvent::Token {
                    row: row.id,
                    id: tok,
                    text: delta,
                });
                events.push(self.finish(row, FinishReason::Stop));
                continue;
            }
            let at_length = row.generated.len() >= row.params.max_new_tokens;
            let safe = if at_length {
                text.len()
            } else {
                safe_prefix(&text, &row.params.stop)
            };
            let delta = text
                .get(row.emitted..safe.max(row.emitted))
                .unwrap_or("")
                .to_string();
            row.emitted = safe.max(row.emitted);
            events.push(TokenEvent::Token {
                row: row.id,
                id: tok,
                text: delta,
            });
            if at_length {
                events.push(self.finish(row, FinishReason::Length));
            }
        }
        for (i, row) in batch.rows.iter().enumerate() {
            if row.done && !was_done[i] {
                self.keep_prefix(&batch.cache, i, row)?;
            }
        }
        Ok(events)
    }

    /// Leaves a finished row's cache (its prompt and the tokens it holds) to the prefix cache.
    fn keep_prefix(&self, cache: &KvCache, i: usize, row: &Row) -> Result<()> {
        let (scope, prompt) = &*row.key;
        let held = cache.row_len(i);
        let Some(new) = held.checked_sub(prompt.len()) else {
            return Ok(());
        };
        let mut key = prompt.clone();
        key.ids
            .extend(&row.generated[..new.min(row.generated.len())]);
        Ok(self.caches.keep(scope, key, cache, i, None)?)
    }

    /// Text held back so far, released when the row ends without a stop string.
    fn flush(&self, row: &mut Row) -> Result<String> {
        let text = self.tokenizer.decode(&row.generated)?;
        let rest = text.get(row.emitted..).unwrap_or("").to_string();
        row.emitted = text.len();
        Ok(rest)
    }

    fn finish(&self, row: &mut Row, reason: FinishReason) -> TokenEvent {
        row.done = true;
        TokenEvent::Finished {
            row: row.id,
            reason,
            prompt_tokens: row.prompt_tokens,
            cached_tokens: row.cached_tokens,
            completion_tokens: row.generated.len(),
        }
    }

    /// Runs one conversation to the end, calling `on_event` for every event.
    pub fn understand(
        &self,
        conv: &Conversation,
        params: SamplingParams,
        mut on_event: impl FnMut(&TokenEvent),
    ) -> Result<(String, FinishReason)> {
        let prepared = self.prepare(conv, params)?;
        let (mut batch, mut events) = self.start(vec![prepared])?;
        let mut text = String::new();
        loop {
            for e in &events {
                on_event(e);
                match e {
                    TokenEvent::Token { text: t, .. } => text.push_str(t),
                    TokenEvent::Finished { reason, .. } => return Ok((text, *reason)),
                }
            }
            events = self.step(&mut batch)?;
        }
    }
}

/// Byte offset where the first stop string starts, if any.
fn earliest_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the prefix of `text` that can be shown: excludes a trailing incomplete UTF-8
/// sequence (decoded as U+FFFD) and any suffix that could start a stop string.
fn safe_prefix(text: &str, stops: &[String]) -> usize {
    let end = text.trim_end_matches('\u{FFFD}').len();
    let mut cut = end;
    for s in stops {
        let prefixes: Vec<usize> = s.char_indices().skip(1).map(|(k, _)| k).collect();
        if let Some(k) = prefixes
            .into_iter()
            .rev()
            .find(|&k| text[..end].ends_with(&s[..k]))
        {
            cut = cut.min(end - k);
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_hold_back() {
        let stops = vec!["<|User|>".to_string()];
        assert_eq!(safe_prefix("hello <|Us", &stops), 6);
        assert_eq!(safe_prefix("hello", &stops), 5);
        assert_eq!(safe_prefix("ab\u{FFFD}", &[]), 2);
        assert_eq!(earliest_stop("a <|User|> b", &stops), Some(2));
    }
}
