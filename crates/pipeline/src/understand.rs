//! The understanding half: SigLIP tower + aligner + LLM + `lm_head`, as a batched step function.

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
    /// Sampling settings of this request.
    pub params: SamplingParams,
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
        completion_tokens: usize,
    },
}

#[derive(Debug, Clone)]
struct Row {
    id: usize,
    params: SamplingParams,
    sampler: Sampler,
    prompt_tokens: usize,
    generated: Vec<u32>,
    emitted: usize,
    done: bool,
}

impl Row {
    fn new(id: usize, p: Prepared) -> Self {
        Row {
            id,
            sampler: Sampler::new(
                p.params.seed,
                p.params.temperature,
                p.params.top_k,
                p.params.top_p,
            ),
            prompt_tokens: p.ids.len(),
            params: p.params,
            generated: Vec::new(),
            emitted: 0,
            done: false,
        }
    }
}

/// A batch whose prompt is being prefilled in chunks (see [`UnderstandingModel::begin`]).
#[derive(Debug)]
pub struct PendingPrefill {
    embeds: Tensor,
    cache: KvCache,
    done: usize,
    batch: Vec<Prepared>,
}

impl PendingPrefill {
    /// Prompt positions prefilled so far and in total.
    pub fn progress(&self) -> (usize, usize) {
        (self.done, self.embeds.dim(1).unwrap_or(0))
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
    llm: Llm,
    context: usize,
    device: Device,
    dtype: DType,
}

impl UnderstandingModel {
    /// Loads the vision tower, aligner, LLM and `lm_head` from a checkpoint directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        let vb = ck.var_builder(opts)?;
        let cfg = &ck.config;
        let vision = VisionTower::load(vb.pp("vision_model.vision_tower"), &cfg.vision, opts.dtype)
            .map_err(weights_err)?;
        let aligner = MlpAligner::load(
            vb.pp("aligner"),
            cfg.aligner.input_dim,
            cfg.aligner.n_embed,
            cfg.aligner.depth,
        )
        .map_err(weights_err)?;
        let llm =
            Llm::load(vb.pp("language_model"), &cfg.llm, opts.dtype, true).map_err(weights_err)?;
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
            tokenizer: ck.tokenizer,
            config: ck.config,
            pre,
            vision,
            aligner,
            llm,
            context,
            device: opts.device.clone(),
            dtype: opts.dtype,
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

    /// Context window in tokens.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Renders, tokenizes and checks a conversation; preprocesses its images.
    pub fn prepare(&self, conv: &Conversation, params: SamplingParams) -> Result<Prepared> {
        params.validate()?;
        if conv.messages.is_empty() {
            return Err(Error::invalid("messages", "the conversation is empty"));
        }
        if !conv.messages.iter().any(|m| m.role == prompt::Role::User) {
            return Err(Error::invalid(
                "messages",
                "the conversation has no user message",
            ));
        }
        let text = prompt::render(&conv.messages, prompt::DEFAULT_SYSTEM_PROMPT);
        let placeholders = text.matches(prompt::IMAGE_TAG).count();
        if placeholders != conv.images.len() {
            return Err(Error::ImageCountMismatch {
                placeholders,
                images: conv.images.len(),
            });
        }
        let (ids, n_img) = self
            .tokenizer
            .encode_understanding(&text, self.config.vision.num_patches())?;
        if n_img != placeholders {
            return Err(Error::ImageCountMismatch {
                placeholders: n_img,
                images: conv.images.len(),
            });
        }
        if ids.len() + params.max_new_tokens > self.context {
            return Err(Error::PromptTooLong {
                prompt_tokens: ids.len(),
                max_new_tokens: params.max_new_tokens,
                context: self.context,
            });
        }
        let images = conv
            .images
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
            images,
            params,
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

    /// Left-padded input embeddings `[b, T, hidden]` with image features spliced in, and each
    /// row's pad count.
    pub fn embed_batch(&self, batch: &[Prepared]) -> Result<(Tensor, Vec<usize>)> {
        let t = batch.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let pad = self.tokenizer.ids.pad;
        let mut ids = Vec::with_capacity(batch.len() * t);
        let mut pads = Vec::with_capacity(batch.len());
        for p in batch {
            let n = t - p.ids.len();
            pads.push(n);
            ids.extend(std::iter::repeat_n(pad, n));
            ids.extend_from_slice(&p.ids);
        }
        let ids_t = Tensor::from_vec(ids.clone(), (batch.len(), t), &self.device)?;
        let mut embeds = self.llm.embed(&ids_t)?;
        let images: Vec<RgbImage> = batch
            .iter()
            .flat_map(|p| p.images.iter().cloned())
            .collect();
        if !images.is_empty() {
            let (_, aligned) = self.image_features(&images)?;
            let h = self.config.llm.hidden_size;
            let aligned = aligned.to_dtype(embeds.dtype())?.reshape(((), h))?;
            // Positions of placeholders across the flattened batch, in order = image order.
            let positions: Vec<u32> = ids
                .iter()
                .enumerate()
                .filter(|(_, &id)| id == self.tokenizer.ids.image)
                .map(|(i, _)| i as u32)
                .collect();
            if positions.len() != aligned.dim(0)? {
                return Err(Error::ImageCountMismatch {
                    placeholders: positions.len() / self.config.vision.num_patches(),
                    images: images.len(),
                });
            }
            let flat = embeds.reshape(((), h))?;
            let idx = Tensor::from_vec(positions, aligned.dim(0)?, &self.device)?;
            let flat = flat.index_add(&idx, &(aligned - flat.index_select(&idx, 0)?)?, 0)?;
            embeds = flat.reshape((batch.len(), t, h))?;
        }
        Ok((embeds, pads))
    }

    /// Prefills `embeds` and returns the cache and the last position's logits `[b, vocab]` (f32).
    pub fn prefill(&self, embeds: &Tensor, pads: Vec<usize>) -> Result<(KvCache, Tensor)> {
        let mut cache = self.llm.new_cache(pads);
        let hidden = self.llm.forward(embeds, &mut cache)?;
        let logits = self.llm.lm_logits(&Llm::last(&hidden)?)?;
        Ok((cache, logits))
    }

    /// Prefills a batch in one go and samples each row's first token.
    pub fn start(&self, batch: Vec<Prepared>) -> Result<(UnderstandBatch, Vec<TokenEvent>)> {
        let mut pending = self.begin(batch)?;
        Ok(self
            .prefill_chunk(&mut pending, usize::MAX)?
            .expect("the whole prompt in one chunk"))
    }

    /// Starts a batch whose prefill runs in pieces ([`Self::prefill_chunk`]), so a scheduler can
    /// interleave a long prompt with the decode steps of running requests.
    pub fn begin(&self, batch: Vec<Prepared>) -> Result<PendingPrefill> {
        if batch.is_empty() {
            return Err(Error::invalid("batch", "no requests"));
        }
        let (embeds, pads) = self.embed_batch(&batch)?;
        let cache = self.llm.new_cache(pads);
        Ok(PendingPrefill {
            embeds,
            cache,
            done: 0,
            batch,
        })
    }

    /// Runs up to `max_tokens` more prompt positions of a pending prefill. When the prompt is
    /// complete, returns the batch ready for [`Self::step`] and the first sampled tokens.
    pub fn prefill_chunk(
        &self,
        pending: &mut PendingPrefill,
        max_tokens: usize,
    ) -> Result<Option<(UnderstandBatch, Vec<TokenEvent>)>> {
        let total = pending.embeds.dim(1)?;
        let n = max_tokens.max(1).min(total - pending.done);
        let chunk = pending.embeds.narrow(1, pending.done, n)?;
        let hidden = self.llm.forward(&chunk, &mut pending.cache)?;
        pending.done += n;
        if pending.done < total {
            return Ok(None);
        }
        let logits = self.llm.lm_logits(&Llm::last(&hidden)?)?;
        let rows = std::mem::take(&mut pending.batch)
            .into_iter()
            .enumerate()
            .map(|(id, p)| Row::new(id, p))
            .collect();
        let cache = std::mem::replace(&mut pending.cache, self.llm.new_cache(Vec::new()));
        let mut b = UnderstandBatch { cache, rows };
        let events = self.sample_rows(&mut b, &logits)?;
        Ok(Some((b, events)))
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
        Ok(events)
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
