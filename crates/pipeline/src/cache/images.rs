//! The image-feature cache: the vision tower + aligner output of an image, keyed by the
//! image's SHA-256 ([`super::image_hash`], 256 bits: a collision cannot hand one client
//! another's image) and scoped like the prefix cache. A later request with the same image
//! skips the tower.

use super::lru::Lru;
use super::{ImageHash, Scope};
use candle_core::Tensor;

/// Counters since the start, and sizes now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Images whose features were found.
    pub hits: u64,
    /// Images whose features had to be computed.
    pub misses: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Entries held now.
    pub entries: usize,
    /// Bytes held now.
    pub bytes: usize,
    /// The byte limit.
    pub limit: usize,
}

/// Aligned image features `[patches, hidden]` within a byte limit.
#[derive(Debug)]
pub struct ImageCache {
    store: Lru<(Scope, ImageHash, Tensor)>,
    hits: u64,
    misses: u64,
}

impl ImageCache {
    /// A cache of at most `limit` bytes (0 turns it off).
    pub fn new(limit: usize) -> Self {
        Self {
            store: Lru::new(limit),
            hits: 0,
            misses: 0,
        }
    }

    /// The counters and sizes.
    pub fn stats(&self) -> ImageStats {
        ImageStats {
            hits: self.hits,
            misses: self.misses,
            evictions: self.store.evictions(),
            entries: self.store.len(),
            bytes: self.store.bytes(),
            limit: self.store.limit(),
        }
    }

    /// The features of image `hash` for `scope`, when held (counted as a hit or a miss).
    pub fn get(&mut self, scope: &Scope, hash: &ImageHash) -> Option<Tensor> {
        let found = self
            .store
            .iter()
            .find(|(_, (s, h, _))| s == scope && h == hash)
            .map(|(i, _)| i);
        match found {
            Some(i) => {
                self.hits += 1;
                Some(self.store.touch(i).2.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Keeps the features of image `hash` (a tensor that shares storage with nothing else).
    pub fn insert(&mut self, scope: Scope, hash: ImageHash, features: Tensor) {
        if self.store.limit() == 0 {
            return;
        }
        if self
            .store
            .iter()
            .any(|(_, (s, h, _))| *s == scope && *h == hash)
        {
            return;
        }
        let bytes = features.elem_count() * features.dtype().size_in_bytes();
        self.store.insert((scope, hash, features), bytes);
    }
}
