//! What a request can reuse of earlier requests' work: the prefix KV cache ([`prefix`]) and
//! the image-feature cache ([`images`]), both byte-bounded, least recently used out first, and
//! both scoped ([`Scope`]) so that one tenant's entries never serve (or time) another's.

pub mod images;
mod lru;
pub mod prefix;

pub use images::{ImageCache, ImageStats};
pub use prefix::{common_prefix, ImageHash, PrefixCache, PrefixStats, SeqKey};

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

/// Both caches of a model half, behind one lock (taken briefly, on the model's own thread
/// only while a request begins or a row finishes).
#[derive(Debug)]
pub(crate) struct Caches {
    pub(crate) prefix: PrefixCache,
    pub(crate) images: ImageCache,
}

impl Caches {
    pub(crate) fn new(prefix_bytes: usize, image_bytes: usize) -> Self {
        Self {
            prefix: PrefixCache::new(prefix_bytes),
            images: ImageCache::new(image_bytes),
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            prefix: self.prefix.stats(),
            images: self.images.stats(),
        }
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
