//! What a request can reuse of earlier requests' work: the prefix KV cache ([`prefix`]) and
//! the image-feature cache ([`images`]), both byte-bounded, least recently used out first, and
//! both scoped ([`Scope`]) so that one tenant's entries never serve (or time) another's.

pub mod images;
mod lru;
pub mod prefix;

pub use images::{ImageCache, ImageStats};
pub use prefix::{common_prefix, Hit, ImageHash, PrefixCache, PrefixStats, SeqKey};

use candle_core::{Result, Tensor};
use janus_llm::{KvCache, Llm};
use std::sync::{Mutex, MutexGuard};

/// Who may reuse an entry. A shared cache is a timing side channel (a client could learn that
/// another sent a prompt or an image from its own time to first token), so a server with API
/// keys scopes entries by the caller's key; without keys the server is one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Shared by every request.
    #[default]
    Global,
    /// Only requests made with the same API key (its SHA-256).
    Key([u8; 32]),
}

/// Both caches' counters and sizes, for `Info` and Prometheus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub prefix: PrefixStats,
    pub images: ImageStats,
}

/// Both caches of a model half.
#[derive(Debug)]
pub(crate) struct Stores {
    pub(crate) prefix: PrefixCache,
    pub(crate) images: ImageCache,
}

/// Both caches of a model half behind one lock, taken briefly (never across a copy) on the
/// model's thread while a request begins or a row is kept, and by `Info` / `/metrics`.
#[derive(Debug)]
pub(crate) struct Caches(Mutex<Stores>);

impl Caches {
    /// Caches of at most these sizes (0: one off).
    pub(crate) fn new(prefix_bytes: usize, image_bytes: usize) -> Self {
        Self(Mutex::new(Stores {
            prefix: PrefixCache::new(prefix_bytes),
            images: ImageCache::new(image_bytes),
        }))
    }

    /// The stores. A panic while the lock was held left consistent entries (each change is
    /// one push or retain): keep serving.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Stores> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let s = self.lock();
        CacheStats {
            prefix: s.prefix.stats(),
            images: s.images.stats(),
        }
    }

    /// A one-row cache for a prompt `key`: the longest prefix an entry of `scope` holds
    /// ([`PrefixCache::lookup`]), or, on a miss, an empty row; storage for `reserve` slots.
    pub(crate) fn start_row(
        &self,
        llm: &Llm,
        scope: &Scope,
        key: &SeqKey,
        reserve: usize,
    ) -> Result<Hit> {
        if let Some(hit) = self.lock().prefix.lookup(scope, key, reserve)? {
            return Ok(hit);
        }
        let mut cache = llm.new_cache(1);
        cache.reserve(reserve);
        Ok(Hit {
            len: 0,
            cache,
            last: None,
        })
    }

    /// Leaves row `row` of `cache` (exactly `key`'s positions; `last`, the last position's
    /// hidden state, when `key` is a whole prompt) to the prefix cache: copied first, outside
    /// the lock; nothing when the cache is off.
    pub(crate) fn keep(
        &self,
        scope: &Scope,
        key: SeqKey,
        cache: &KvCache,
        row: usize,
        last: Option<&Tensor>,
    ) -> Result<()> {
        if self.lock().prefix.stats().limit == 0 {
            return Ok(());
        }
        let copy = cache.row_copy(row)?;
        // Its own storage: `last` is a view of a whole chunk's hidden states.
        let last = last.map(Tensor::copy).transpose()?;
        self.lock().prefix.insert(scope.clone(), key, copy, last);
        Ok(())
    }
}

/// SHA-256 of an image's pixels and dimensions: what both caches key an image by.
pub fn image_hash(img: &image::RgbImage) -> ImageHash {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(img.width().to_le_bytes());
    h.update(img.height().to_le_bytes());
    h.update(img.as_raw());
    h.finalize().into()
}
