//! The prefix KV cache: the keys and values of finished sequences, keyed by their token ids
//! (each image's positions by the image's SHA-256), so a later prompt that begins the same way
//! prefills only the rest.
//!
//! **Design.** An entry is one sequence's cache in storage of its own, exactly its length. A hit
//! copies the shared prefix into the new row's own storage, allocated once for the row's prompt
//! and new tokens ([`KvCache::prefix_of`]: one device-to-device copy per layer, no host round
//! trip on CUDA). Attention keeps reading one contiguous buffer per row, and a running row never
//! shares storage with an entry, so eviction can never pull memory from under a row and an entry
//! is free to go the moment it is least recently used. The copy costs milliseconds against the
//! seconds of prefill it saves (docs/benchmarks.md). Granularity is the token: the longest common
//! prefix with any entry is reused, cut before the first image that differs, and kept one token
//! short of the prompt (whose last position must run to give its first output), unless the entry
//! is exactly the prompt and kept that position's hidden state: then nothing is recomputed and
//! the result is bit-equal to a fresh prefill (generation's prompt rows).
//!
//! A sequence that extends an entry replaces it (turn 3 of a chat supersedes turn 2); one that an
//! entry already covers is not stored again.

use super::lru::Lru;
use super::Scope;
use candle_core::{Result, Tensor};
use janus_llm::KvCache;

/// SHA-256 of an image's preprocessed pixels: 256 bits, so no two images a client can make
/// collide.
pub type ImageHash = [u8; 32];

/// What a sequence's cache holds: its token ids, and each image's run of placeholder ids with
/// the image's hash (runs in order, the placeholder id repeated; two images differ only by hash).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqKey {
    /// Every token id, image placeholders included.
    pub ids: Vec<u32>,
    /// `(first placeholder position, hash)` of each image, in order.
    pub images: Vec<(usize, ImageHash)>,
}

impl SeqKey {
    /// Positions in the key.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the key has no position.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Positions `a` and `b` share from the start: equal ids, and no image inside them whose hash
/// (or start) differs. A shared prefix that reaches into an image of `a` that `b` does not have
/// at the same place stops at that image's first placeholder.
pub fn common_prefix(a: &SeqKey, b: &SeqKey) -> usize {
    let mut n = a.ids.iter().zip(&b.ids).take_while(|(x, y)| x == y).count();
    for (k, (at, hash)) in a.images.iter().enumerate() {
        if *at >= n {
            break;
        }
        if b.images.get(k) != Some(&(*at, *hash)) {
            n = *at;
            break;
        }
    }
    // `b`'s images inside the prefix are `a`'s (same count up to `n`): a run of placeholders in
    // `b` that `a` does not list would have differed in ids.
    n
}

/// An entry: whose it is, what it holds, and the cache.
#[derive(Debug)]
struct Entry {
    scope: Scope,
    key: SeqKey,
    cache: KvCache,
    /// The hidden state of the key's last position, when the entry is a whole prompt.
    last: Option<Tensor>,
}

/// What a lookup reuses.
#[derive(Debug)]
pub struct Hit {
    /// Positions reused.
    pub len: usize,
    /// A one-row cache holding them, with storage for the requested reserve.
    pub cache: KvCache,
    /// The last position's hidden state, when the hit is the whole key (nothing to recompute).
    pub last: Option<Tensor>,
}

/// Counters since the start (Prometheus counters are these, sampled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Lookups that reused at least one position.
    pub hits: u64,
    /// Lookups that reused nothing.
    pub misses: u64,
    /// Prompt positions reused over all hits.
    pub hit_tokens: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Entries held now.
    pub entries: usize,
    /// Bytes held now.
    pub bytes: usize,
    /// The byte limit.
    pub limit: usize,
}

/// Finished sequences' caches within a byte limit; see the module documentation.
#[derive(Debug)]
pub struct PrefixCache {
    store: Lru<Entry>,
    hits: u64,
    misses: u64,
    hit_tokens: u64,
}

impl PrefixCache {
    /// A cache of at most `limit` bytes (0 turns it off).
    pub fn new(limit: usize) -> Self {
        Self {
            store: Lru::new(limit),
            hits: 0,
            misses: 0,
            hit_tokens: 0,
        }
    }

    /// The counters and sizes.
    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            hits: self.hits,
            misses: self.misses,
            hit_tokens: self.hit_tokens,
            evictions: self.store.evictions(),
            entries: self.store.len(),
            bytes: self.store.bytes(),
            limit: self.store.limit(),
        }
    }

    /// The longest prefix of the prompt `key` that an entry of `scope` holds, copied into a
    /// one-row cache with storage for `reserve` slots: all but the prompt's last position at
    /// most, or the whole prompt with its last hidden state from an entry that is exactly this
    /// prompt. `None` (a miss) when no entry shares a position, or the cache is off.
    pub fn lookup(&mut self, scope: &Scope, key: &SeqKey, reserve: usize) -> Result<Option<Hit>> {
        if self.store.limit() == 0 {
            return Ok(None);
        }
        let short = key.len().saturating_sub(1);
        let best = self
            .store
            .iter()
            .filter(|(_, e)| e.scope == *scope)
            .map(|(i, e)| {
                let whole = e.last.is_some() && e.key == *key;
                (
                    i,
                    if whole {
                        key.len()
                    } else {
                        common_prefix(key, &e.key).min(short)
                    },
                )
            })
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > 0);
        let Some((i, n)) = best else {
            self.misses += 1;
            return Ok(None);
        };
        let entry = self.store.touch(i);
        let last = entry.last.clone().filter(|_| n == key.len());
        let cache = entry.cache.prefix_of(0, n, reserve)?;
        self.hits += 1;
        self.hit_tokens += n as u64;
        Ok(Some(Hit {
            len: n,
            cache,
            last,
        }))
    }

    /// Keeps a sequence: `cache` is one row holding exactly `key`'s positions, `last` the hidden
    /// state of its last position when it is a whole prompt. An entry of the same scope that
    /// `key` extends is dropped; nothing is stored when an entry already holds all of `key`
    /// (with a hidden state, if this one has one), or when it is larger than the limit.
    pub fn insert(&mut self, scope: Scope, key: SeqKey, cache: KvCache, last: Option<Tensor>) {
        if self.store.limit() == 0 || key.is_empty() || cache.row_len(0) != key.len() {
            return;
        }
        let covered = self
            .store
            .iter()
            .find(|(_, e)| {
                e.scope == scope
                    && common_prefix(&key, &e.key) == key.len()
                    && (last.is_none() || (e.last.is_some() && e.key == key))
            })
            .map(|(i, _)| i);
        if let Some(i) = covered {
            self.store.touch(i);
            return;
        }
        self.store
            .remove_where(|e| e.scope == scope && common_prefix(&e.key, &key) == e.key.len());
        let bytes = cache.allocated_bytes();
        let entry = Entry {
            scope,
            key,
            cache,
            last,
        };
        self.store.insert(entry, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 9;

    /// A key from ids, with an image run (of `IMG` ids) starting at each `(at, hash byte)`.
    fn key(ids: &[u32], images: &[(usize, u8)]) -> SeqKey {
        SeqKey {
            ids: ids.to_vec(),
            images: images.iter().map(|&(at, h)| (at, [h; 32])).collect(),
        }
    }

    #[test]
    fn common_prefix_table() {
        let a = key(&[1, 2, IMG, IMG, 3, 4], &[(2, 1)]);
        // (case, other key) → shared positions with `a`
        let cases = [
            ("identical", key(&[1, 2, IMG, IMG, 3, 4], &[(2, 1)]), 6),
            ("longer", key(&[1, 2, IMG, IMG, 3, 4, 5], &[(2, 1)]), 6),
            (
                "text differs after the image",
                key(&[1, 2, IMG, IMG, 3, 7], &[(2, 1)]),
                5,
            ),
            (
                "another image at the same place",
                key(&[1, 2, IMG, IMG, 3, 4], &[(2, 2)]),
                2,
            ),
            (
                "text differs before the image",
                key(&[1, 5, IMG, IMG, 3, 4], &[(2, 1)]),
                1,
            ),
            ("no image there", key(&[1, 2, 7, 7], &[]), 2),
            ("ends inside the image", key(&[1, 2, IMG], &[(2, 1)]), 3),
            ("nothing shared", key(&[8], &[]), 0),
            ("empty", key(&[], &[]), 0),
        ];
        for (case, b, want) in cases {
            assert_eq!(common_prefix(&a, &b), want, "{case}");
        }
    }
}
