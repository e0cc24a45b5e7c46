//! A generation request before it joins the batch: validation and tokenization (the
//! conditional prompt and its unconditional twin), the chunked prefill of its two prompt rows
//! within a scheduler's budget, and the cache of unconditional prefills shared by prompts of
//! equal length.

use super::batch::Member;
use super::GenerationModel;
use crate::error::{Error, Result};
use crate::sampling::Sampler;
use crate::GenerateParams;
use candle_core::Tensor;
use janus_llm::{KvCache, Llm};

/// Prefilled unconditional rows by prompt length. The unconditional prompt is
/// `[BOS, pad × (L − 2), <begin_of_image>]`: it depends only on the prompt length, so requests
/// of equal length share its prefill.
#[derive(Debug, Default)]
pub(super) struct UncondCache {
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
    /// How many requests reused a cached unconditional prefill.
    pub fn uncond_reuses(&self) -> u64 {
        self.uncond.lock().map(|c| c.reuses).unwrap_or(0)
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
    /// request, its pair broadcast to `n` interleaved image pairs, ready to join a batch
    /// ([`GenerationModel::join`]) for its first step.
    pub fn prefill(&self, pre: &mut GenPrefill, budget: usize) -> Result<Option<Prefilled>> {
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

    /// Validates, tokenizes and prefills a request in one go, ready to join a batch.
    pub fn start(&self, prompt: &str, params: &GenerateParams) -> Result<Prefilled> {
        let mut pre = self.begin(self.prepare(prompt, params)?);
        loop {
            if let Some(ready) = self.prefill(&mut pre, usize::MAX)? {
                return Ok(ready);
            }
        }
    }
}
