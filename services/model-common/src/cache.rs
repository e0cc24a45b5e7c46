//! The cache scope of a request and the caches' `Info`, for both model services.

use janus_engine::CacheScope;
use janus_pipeline::Scope;
use janus_proto::v1 as pb;

/// The cache scope of a request: with [`CacheScope::Key`], the SHA-256 of the bearer key it
/// carries, parsed as the API-key check parses it (the gateway forwards the caller's
/// `authorization`; a request without one shares with the others without one); with
/// [`CacheScope::Global`], one scope for all.
pub fn scope(mode: CacheScope, md: &tonic::metadata::MetadataMap) -> Scope {
    use sha2::{Digest, Sha256};
    let key = md
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| janus_service::auth::bearer_key(v).ok());
    match (mode, key) {
        (CacheScope::Key, Some(k)) => Scope::Key(Sha256::digest(k.as_bytes()).into()),
        _ => Scope::Global,
    }
}

/// The caches' sizes and counters as the protocol's `CacheInfo`.
pub fn info(scope: CacheScope, s: janus_pipeline::CacheStats) -> pb::CacheInfo {
    pb::CacheInfo {
        scope: match scope {
            CacheScope::Key => "key",
            CacheScope::Global => "global",
        }
        .to_string(),
        prefix_bytes: s.prefix.bytes as u64,
        prefix_limit_bytes: s.prefix.limit as u64,
        prefix_entries: s.prefix.entries as u32,
        prefix_hits: s.prefix.hits,
        prefix_misses: s.prefix.misses,
        prefix_hit_tokens: s.prefix.hit_tokens,
        prefix_evictions: s.prefix.evictions,
        image_bytes: s.images.bytes as u64,
        image_limit_bytes: s.images.limit as u64,
        image_entries: s.images.entries as u32,
        image_hits: s.images.hits,
        image_misses: s.images.misses,
        image_evictions: s.images.evictions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> tonic::metadata::MetadataMap {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", value.parse().unwrap());
        md
    }

    #[test]
    fn a_key_is_its_scope_however_the_header_spells_bearer() {
        let k = scope(CacheScope::Key, &with("Bearer alpha"));
        assert!(matches!(k, Scope::Key(_)));
        // The API-key check accepts these spellings of the same key: they share a scope.
        for v in ["bearer alpha", "BEARER  alpha ", " Bearer alpha"] {
            assert_eq!(scope(CacheScope::Key, &with(v)), k, "{v:?}");
        }
        assert_ne!(scope(CacheScope::Key, &with("Bearer beta")), k);
        let none = tonic::metadata::MetadataMap::new();
        assert_eq!(scope(CacheScope::Key, &none), Scope::Global);
        assert_eq!(scope(CacheScope::Key, &with("Basic abc")), Scope::Global);
        assert_eq!(
            scope(CacheScope::Global, &with("Bearer alpha")),
            Scope::Global
        );
    }
}
