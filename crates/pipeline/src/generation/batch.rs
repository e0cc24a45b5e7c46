//! Many generation requests stepped together: the CFG row pairs of every active request share
//! one LLM forward per step, whatever their prompts, prompt lengths or image counts. This is
//! the only generation step: a single request is a batch of one.
//!
//! A request joins between steps (its prefilled cache rows join the batch's ragged cache, each
//! row keeping its own length; nothing is padded) and leaves when its images have all their
//! tokens or when it is cancelled.

use super::{GenerateParams, GenerationModel, Prefilled};
use crate::error::{Error, Result};
use crate::sampling::Sampler;
use candle_core::Tensor;
use janus_llm::{KvCache, Llm};

/// One request inside a [`GenBatch`].
#[derive(Debug)]
pub(super) struct Member {
    pub(super) id: u64,
    /// One per image (seed + i).
    pub(super) samplers: Vec<Sampler>,
    /// Tokens so far, per image.
    pub(super) tokens: Vec<Vec<u32>>,
    pub(super) params: GenerateParams,
    /// Prompt length in tokens.
    pub(super) prompt_tokens: usize,
    /// Tokens per image when done.
    pub(super) total: usize,
    pub(super) cancelled: bool,
    /// Whether its rows are still in the batch cache.
    pub(super) in_cache: bool,
}

impl Member {
    fn rows(&self) -> usize {
        2 * self.tokens.len()
    }

    fn step(&self) -> usize {
        self.tokens.first().map_or(0, Vec::len)
    }

    fn done(&self) -> bool {
        self.step() >= self.total
    }

    /// Still taking steps (not finished, not cancelled).
    fn running(&self) -> bool {
        !self.done() && !self.cancelled
    }
}

/// A request whose images have all their tokens.
#[derive(Debug, Clone)]
pub struct FinishedJob {
    /// The id it joined with.
    pub id: u64,
    /// Tokens per image.
    pub tokens: Vec<Vec<u32>>,
    /// Its settings.
    pub params: GenerateParams,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
}

/// The running generation batch.
#[derive(Debug, Default)]
pub struct GenBatch {
    cache: Option<KvCache>,
    /// `[rows, hidden]`: last hidden state of every row, members in order.
    last_hidden: Option<Tensor>,
    members: Vec<Member>,
}

impl GenBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests in the batch (finished ones included until taken).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when no request is in the batch.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// LLM rows stepped per forward (2 per image of every running request).
    pub fn rows(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.running())
            .map(Member::rows)
            .sum()
    }

    /// `(step, total)` of request `id`.
    pub fn progress(&self, id: u64) -> Option<(usize, usize)> {
        self.members
            .iter()
            .find(|m| m.id == id)
            .map(|m| (m.step(), m.total))
    }

    /// Tokens so far of request `id` (per image).
    pub fn tokens(&self, id: u64) -> Option<&[Vec<u32>]> {
        self.members
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.tokens.as_slice())
    }

    /// Ids of the requests in the batch.
    pub fn ids(&self) -> Vec<u64> {
        self.members.iter().map(|m| m.id).collect()
    }

    /// Drops request `id`; its rows leave at the next step. Returns false if unknown.
    pub fn cancel(&mut self, id: u64) -> bool {
        match self.members.iter_mut().find(|m| m.id == id) {
            Some(m) => {
                m.cancelled = true;
                true
            }
            None => false,
        }
    }

    /// Removes and returns the requests that have all their tokens.
    pub fn take_finished(&mut self) -> Vec<FinishedJob> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.members.len() {
            if self.members[i].done() && !self.members[i].in_cache {
                let m = self.members.remove(i);
                out.push(FinishedJob {
                    id: m.id,
                    tokens: m.tokens,
                    params: m.params,
                    prompt_tokens: m.prompt_tokens,
                });
            } else {
                i += 1;
            }
        }
        out
    }

    /// Drops the cache rows of finished and cancelled members, and cancelled members.
    fn compact(&mut self) -> Result<()> {
        let mut keep_rows = Vec::new();
        let mut offset = 0;
        for m in self.members.iter_mut().filter(|m| m.in_cache) {
            if m.done() || m.cancelled {
                m.in_cache = false;
            } else {
                keep_rows.extend(offset..offset + m.rows());
            }
            offset += m.rows();
        }
        self.members.retain(|m| !m.cancelled);
        if keep_rows.len() != offset {
            if let Some(cache) = &mut self.cache {
                cache.select_rows(&keep_rows)?;
            }
            if let Some(h) = &self.last_hidden {
                let idx = Tensor::from_vec(
                    keep_rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                    keep_rows.len(),
                    h.device(),
                )?;
                self.last_hidden = Some(h.index_select(&idx, 0)?);
            }
        }
        Ok(())
    }

    fn running(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.running())
    }
}

impl GenerationModel {
    /// Adds a prefilled request ([`GenerationModel::prefill`], [`GenerationModel::start`]) to
    /// the batch under `id`; it takes its first step with the batch's next.
    pub fn join(&self, batch: &mut GenBatch, id: u64, ready: Prefilled) -> Result<()> {
        if batch.members.iter().any(|m| m.id == id) {
            return Err(Error::invalid(
                "id",
                format!("request {id} is already in the batch"),
            ));
        }
        let Prefilled {
            cache,
            last_hidden,
            mut member,
        } = ready;
        if member.done() {
            return Err(Error::invalid("job", "the job already has all its tokens"));
        }
        batch.compact()?;
        match &mut batch.cache {
            Some(c) => c.merge(cache)?,
            slot => *slot = Some(cache),
        }
        batch.last_hidden = Some(match batch.last_hidden.take() {
            Some(h) if h.dim(0)? > 0 => Tensor::cat(&[&h, &last_hidden], 0)?,
            _ => last_hidden,
        });
        member.id = id;
        batch.members.push(member);
        Ok(())
    }

    /// Guided logits `[images, codes]` (f32) for the next token of every running request's
    /// images, requests in batch order ([`GenerationModel::guide`] on the rows' last hidden
    /// states, each pair with its request's guidance weight). An error when nothing runs.
    pub fn guided_logits(&self, batch: &mut GenBatch) -> Result<Tensor> {
        batch.compact()?;
        let hidden = match &batch.last_hidden {
            Some(h) if batch.rows() > 0 => h.clone(),
            _ => return Err(Error::invalid("batch", "no running request in the batch")),
        };
        // Per-pair guidance weights: requests may differ.
        let weights: Vec<f32> = batch
            .running()
            .flat_map(|m| std::iter::repeat_n(m.params.cfg_weight, m.tokens.len()))
            .collect();
        self.guide(&hidden, &weights)
    }

    /// The step: for every running request, one token per image sampled from the guided logits
    /// (its own samplers), then [`GenerationModel::advance`]: one `gen_head` pass and one LLM
    /// forward over all rows. Returns the tokens sampled per request `(id, one token per
    /// image)`; nothing when no request runs.
    pub fn step_batch(&self, batch: &mut GenBatch) -> Result<Vec<(u64, Vec<u32>)>> {
        if batch.rows() == 0 {
            return Ok(Vec::new());
        }
        let mut guided = self.guided_logits(batch)?.to_vec2::<f32>()?.into_iter();
        let mut tokens = Vec::with_capacity(guided.len());
        for m in batch.members.iter_mut().filter(|m| m.running()) {
            for s in &mut m.samplers {
                tokens.push(s.sample(&mut guided.next().expect("one row per image")));
            }
        }
        self.advance(batch, &tokens)
    }

    /// Appends one token per running image (requests in batch order, as
    /// [`GenerationModel::guided_logits`] lists them); requests whose images are complete leave
    /// the batch's rows, the rest advance together through `gen_embed`, `gen_aligner` and one
    /// LLM forward. Returns the tokens per request `(id, one token per image)`. Tokens are
    /// checked: one per running image, each a code of the codebook.
    pub fn advance(&self, batch: &mut GenBatch, tokens: &[u32]) -> Result<Vec<(u64, Vec<u32>)>> {
        batch.compact()?;
        let images: usize = batch.running().map(|m| m.tokens.len()).sum();
        if images == 0 {
            return Err(Error::invalid(
                "tokens",
                "no running request in the batch: every job has all its tokens",
            ));
        }
        if tokens.len() != images {
            return Err(Error::invalid(
                "tokens",
                format!("{} tokens for {images} images", tokens.len()),
            ));
        }
        let codes = self.config.gen_head.image_token_size as u32;
        if let Some(&bad) = tokens.iter().find(|&&t| t >= codes) {
            return Err(Error::invalid(
                "tokens",
                format!("code {bad} outside 0..{codes}"),
            ));
        }
        let mut next = tokens.iter().copied();
        let mut advanced = Vec::new();
        let mut feed = Vec::with_capacity(2 * images);
        for m in batch.members.iter_mut().filter(|m| m.running()) {
            let toks: Vec<u32> = next.by_ref().take(m.tokens.len()).collect();
            for (seq, &t) in m.tokens.iter_mut().zip(&toks) {
                seq.push(t);
            }
            if !m.done() {
                // Each token feeds both rows of its pair.
                feed.extend(toks.iter().flat_map(|&t| [t, t]));
            }
            advanced.push((m.id, toks));
        }
        // Finished requests leave before the forward; the rest advance together.
        batch.compact()?;
        if !feed.is_empty() {
            let cache = batch.cache.as_mut().expect("rows exist");
            let hidden = self.forward_codes(&feed, cache)?;
            batch.last_hidden = Some(Llm::last(&hidden)?);
        } else {
            batch.last_hidden = None;
            batch.cache = None;
        }
        Ok(advanced)
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
}
