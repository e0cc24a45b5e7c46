//! A generation request before it joins the batch: validation and tokenization (the
//! conditional prompt and its unconditional twin), and the chunked prefill of its two prompt
//! rows within a scheduler's budget, each from the longest prefix the prefix cache holds
//! ([`crate::cache::PrefixCache`], the same as understanding's): the unconditional prompt
//! `[BOS, pad × (L − 2), <begin_of_image>]` depends only on the prompt length, so prompts of
//! equal length share it, and a prompt generated again ("4 more") reuses its own.

use super::batch::Member;
use super::GenerationModel;
use crate::cache::{Caches, Scope, SeqKey};
use crate::error::{Error, Result};
use crate::sampling::Sampler;
use crate::GenerateParams;
use candle_core::Tensor;
use janus_llm::{KvCache, Llm};

/// The prefix cache key of a prompt row (no images).
fn prompt_key(ids: &[u32]) -> SeqKey {
    SeqKey {
        ids: ids.to_vec(),
        images: Vec::new(),
    }
}

/// A validated, tokenized generation request.
#[derive(Debug, Clone)]
pub struct GenPrepared {
    /// Conditional prompt ids.
    pub cond: Vec<u32>,
    /// Unconditional prompt ids (same length).
    pub uncond: Vec<u32>,
    /// The request's settings.
    pub params: GenerateParams,
    /// Whose prefix cache entries the conditional prompt may reuse and leaves (the
    /// unconditional prompt says nothing of the request but its length: it is shared).
    pub scope: Scope,
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
    /// Conditional positions the prefix cache supplied.
    cond_cached: usize,
}

impl GenPrefill {
    /// Prompt rows (conditional, unconditional) not completely prefilled yet.
    pub fn rows_left(&self) -> usize {
        (self.cond.done < self.prepared.cond.len()) as usize
            + (self.uncond.done < self.prepared.uncond.len()) as usize
    }

    /// Positions of the conditional prompt taken from the prefix cache when the request began.
    pub fn cached_tokens(&self) -> usize {
        self.cond_cached
    }

    /// The request being prefilled.
    pub fn prepared(&self) -> &GenPrepared {
        &self.prepared
    }
}

/// A request whose two prompt rows are prefilled and broadcast to its `n` image pairs: the
/// rows' cache and last hidden states, and the batch member it becomes when it joins a
/// [`super::GenBatch`] ([`GenerationModel::join`]).
#[derive(Debug)]
pub struct Prefilled {
    pub(super) cache: KvCache,
    /// Final-normed hidden state of the last slot of each row `[2n, hidden]`.
    pub(super) last_hidden: Tensor,
    pub(super) member: Member,
}

impl Prefilled {
    /// Prompt length in tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.member.prompt_tokens
    }

    /// Steps to take (tokens per image: 576 for 384 px).
    pub fn total_steps(&self) -> usize {
        self.member.total
    }
}

impl GenerationModel {
    /// The prefix cache's counters and sizes.
    pub fn cache_stats(&self) -> crate::PrefixStats {
        self.caches.stats().prefix
    }

    /// Turns on the prefix cache with this byte limit (0: off, as after loading).
    pub fn set_cache_limits(&mut self, prefix_bytes: usize) {
        self.caches = Caches::new(prefix_bytes, 0);
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
            scope: Scope::Global,
        })
    }

    /// Starts prefilling a prepared request: each prompt row starts from the longest prefix of
    /// it the prefix cache holds (the whole row with its last hidden state, which starts the
    /// image, when the same prompt row was prefilled before); nothing is computed yet.
    pub fn begin(&self, prepared: GenPrepared) -> Result<GenPrefill> {
        let total = self.image_tokens();
        let row = |ids: &[u32], scope: &Scope| -> Result<RowPrefill> {
            let hit =
                self.caches
                    .start_row(&self.llm, scope, &prompt_key(ids), ids.len() + total)?;
            Ok(RowPrefill {
                cache: hit.cache,
                done: hit.len,
                last: hit.last,
            })
        };
        let cond = row(&prepared.cond, &prepared.scope)?;
        let uncond = row(&prepared.uncond, &Scope::Global)?;
        Ok(GenPrefill {
            prepared,
            cond_cached: cond.done,
            cond,
            uncond,
        })
    }

    /// Prompt positions left to prefill (the budget unit of a scheduler); at least 1 until
    /// [`Self::prefill`] returned the request, even when the prefix cache held both rows whole.
    pub fn cost_left(&self, pre: &GenPrefill) -> usize {
        Self::positions_left(pre).max(1)
    }

    fn positions_left(pre: &GenPrefill) -> usize {
        (pre.prepared.cond.len() - pre.cond.done) + (pre.prepared.uncond.len() - pre.uncond.done)
    }

    /// Prefills up to `budget` more prompt positions (the conditional row, then the
    /// unconditional one; each row on its own, so a request's numerics do not depend on the
    /// cache state; at least one position per call). When both rows are complete, returns the
    /// request, its pair broadcast to `n` interleaved image pairs, ready to join a batch
    /// ([`GenerationModel::join`]) for its first step.
    pub fn prefill(&self, pre: &mut GenPrefill, budget: usize) -> Result<Option<Prefilled>> {
        let mut left = budget.max(1);
        for (row, ids, scope) in [
            (&mut pre.cond, &pre.prepared.cond, &pre.prepared.scope),
            (&mut pre.uncond, &pre.prepared.uncond, &Scope::Global),
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
                let last = Llm::last(&hidden)?;
                let key = prompt_key(ids);
                self.caches.keep(scope, key, &row.cache, 0, Some(&last))?;
                row.last = Some(last);
            }
        }
        if Self::positions_left(pre) > 0 {
            return Ok(None);
        }
        let (Some(clast), Some(ulast)) = (pre.cond.last.clone(), pre.uncond.last.clone()) else {
            return Err(Error::invalid("prompt", "empty prompt"));
        };
        let mut cache = std::mem::replace(&mut pre.cond.cache, self.llm.new_cache(0));
        let ucache = std::mem::replace(&mut pre.uncond.cache, self.llm.new_cache(0));
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
        Ok(Some(Prefilled {
            cache,
            last_hidden,
            member: Member {
                id: 0,
                samplers,
                tokens: vec![Vec::with_capacity(total); params.n],
                prompt_tokens: pre.prepared.cond.len(),
                params,
                total,
                cancelled: false,
                in_cache: true,
            },
        }))
    }

    /// Validates, tokenizes and prefills a request in one go, ready to join a batch.
    pub fn start(&self, prompt: &str, params: &GenerateParams) -> Result<Prefilled> {
        let mut pre = self.begin(self.prepare(prompt, params)?)?;
        loop {
            if let Some(ready) = self.prefill(&mut pre, usize::MAX)? {
                return Ok(ready);
            }
        }
    }
}
