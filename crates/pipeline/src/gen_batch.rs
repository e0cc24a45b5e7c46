//! Many generation requests stepped together: the CFG row pairs of every active request share
//! one LLM forward per step, whatever their prompts, prompt lengths or image counts.
//!
//! A request joins between steps (its prefilled cache rows join the batch's ragged cache, each
//! row keeping its own length; nothing is padded) and leaves when its images have all their
//! tokens or when it is cancelled.

use crate::error::{Error, Result};
use crate::generate::{GenJob, GenerateParams, GenerationModel};
use crate::sampling::Sampler;
use candle_core::Tensor;
use janus_llm::{KvCache, Llm};

/// One request inside a [`GenBatch`].
#[derive(Debug)]
struct Member {
    id: u64,
    samplers: Vec<Sampler>,
    tokens: Vec<Vec<u32>>,
    params: GenerateParams,
    prompt_tokens: usize,
    total: usize,
    cancelled: bool,
    /// Whether its rows are still in the batch cache.
    in_cache: bool,
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
            .filter(|m| !m.done() && !m.cancelled)
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
        self.members.iter().filter(|m| !m.done() && !m.cancelled)
    }
}

impl GenerationModel {
    /// Adds a started job (see [`GenerationModel::start`]) to the batch under `id`.
    pub fn join(&self, batch: &mut GenBatch, id: u64, job: GenJob) -> Result<()> {
        if batch.members.iter().any(|m| m.id == id) {
            return Err(Error::invalid(
                "id",
                format!("request {id} is already in the batch"),
            ));
        }
        if job.is_done() {
            return Err(Error::invalid("job", "the job already has all its tokens"));
        }
        batch.compact()?;
        let parts = job.into_parts();
        match &mut batch.cache {
            Some(c) => c.merge(parts.cache)?,
            slot => *slot = Some(parts.cache),
        }
        batch.last_hidden = Some(match batch.last_hidden.take() {
            Some(h) if h.dim(0)? > 0 => Tensor::cat(&[&h, &parts.last_hidden], 0)?,
            _ => parts.last_hidden,
        });
        batch.members.push(Member {
            id,
            samplers: parts.samplers,
            tokens: parts.tokens,
            params: parts.params,
            prompt_tokens: parts.prompt_tokens,
            total: parts.total,
            cancelled: false,
            in_cache: true,
        });
        Ok(())
    }

    /// One step for every running request: one `gen_head` pass and one LLM forward over all
    /// rows. Returns the tokens sampled per request `(id, one token per image)`.
    pub fn step_batch(&self, batch: &mut GenBatch) -> Result<Vec<(u64, Vec<u32>)>> {
        batch.compact()?;
        let Some(hidden) = batch.last_hidden.clone() else {
            return Ok(Vec::new());
        };
        if hidden.dim(0)? == 0 {
            return Ok(Vec::new());
        }
        // Per-pair guidance weights: requests may differ.
        let weights: Vec<f32> = batch
            .running()
            .flat_map(|m| std::iter::repeat_n(m.params.cfg_weight, m.tokens.len()))
            .collect();
        let guided = self.guide(&hidden, &weights)?;
        let rows = hidden.dim(0)?;
        let mut guided = guided.to_vec2::<f32>()?.into_iter();
        let mut sampled = Vec::new();
        let mut feed = Vec::with_capacity(rows);
        for m in batch
            .members
            .iter_mut()
            .filter(|m| !m.done() && !m.cancelled)
        {
            let toks: Vec<u32> = m
                .samplers
                .iter_mut()
                .map(|s| s.sample(&mut guided.next().expect("one row per image")))
                .collect();
            for (seq, &t) in m.tokens.iter_mut().zip(&toks) {
                seq.push(t);
            }
            if !m.done() {
                feed.extend(toks.iter().flat_map(|&t| [t, t]));
            }
            sampled.push((m.id, toks));
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
        Ok(sampled)
    }
}
