//! `--model`: a local checkpoint directory or a Hugging Face hub id (`org/name`), resolved
//! through the hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`) and
//! downloaded with `HF_TOKEN` when not cached and not offline (`HF_HUB_OFFLINE=1`).

use std::path::{Path, PathBuf};

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// What the user passed.
    pub id: String,
    /// The checkpoint directory.
    pub path: PathBuf,
}

/// Why a model could not be found.
#[derive(Debug, thiserror::Error)]
pub enum ModelSourceError {
    /// A path-like value that is not a directory.
    #[error("model directory {0} does not exist (pass --model with a checkpoint directory holding config.json, tokenizer.json and the weights, or a Hugging Face hub id such as deepseek-ai/Janus-Pro-1B)")]
    NoSuchDirectory(PathBuf),
    /// Not cached, and downloads are off.
    #[error("model {id} is not in the Hugging Face cache at {cache} and downloads are disabled (HF_HUB_OFFLINE). Download it where there is network access (`huggingface-cli download {id}`) and copy the cache, set HF_HOME/HF_HUB_CACHE to a cache that holds it, or pass --model /path/to/checkpoint-directory")]
    NotCached { id: String, cache: PathBuf },
    /// The download failed (offline, no access, …).
    #[error("model {id} is not in the Hugging Face cache at {cache} and downloading it failed: {reason}. If this machine is offline, download it elsewhere (`huggingface-cli download {id}`) and set HF_HOME, or pass --model /path/to/checkpoint-directory; gated repositories need HF_TOKEN")]
    Download {
        id: String,
        cache: PathBuf,
        reason: String,
    },
}

/// Files a checkpoint needs besides the weights.
const NEEDED: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
];

/// True for files worth downloading from a Janus repository.
fn wanted(name: &str) -> bool {
    NEEDED.contains(&name)
        || name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || (name.starts_with("pytorch_model")
            && (name.ends_with(".bin") || name.ends_with(".bin.index.json")))
}

/// The hub cache directory from the environment.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    hf_hub::Cache::from_env().path().clone()
}

/// True when `HF_HUB_OFFLINE` is set to a true value.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

/// Resolves `spec` with the environment's cache, token and offline setting.
pub fn resolve(spec: &str) -> Result<ResolvedModel, ModelSourceError> {
    resolve_with(spec, &cache_dir(), offline())
}

/// True when `spec` has the shape of a hub id (`org/name`, no other slashes, not a path).
pub fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves `spec` against an explicit cache directory.
pub fn resolve_with(
    spec: &str,
    cache: &Path,
    offline: bool,
) -> Result<ResolvedModel, ModelSourceError> {
    let as_path = Path::new(spec);
    if as_path.is_dir() {
        return Ok(ResolvedModel {
            id: spec.to_string(),
            path: as_path.to_path_buf(),
        });
    }
    if !is_hub_id(spec) {
        return Err(ModelSourceError::NoSuchDirectory(as_path.to_path_buf()));
    }
    if let Some(dir) = cached_snapshot(spec, cache) {
        return Ok(ResolvedModel {
            id: spec.to_string(),
            path: dir,
        });
    }
    if offline {
        return Err(ModelSourceError::NotCached {
            id: spec.to_string(),
            cache: cache.to_path_buf(),
        });
    }
    download(spec, cache).map(|path| ResolvedModel {
        id: spec.to_string(),
        path,
    })
}

/// The snapshot directory of `id` in `cache` if it holds a config and some weights.
pub fn cached_snapshot(id: &str, cache: &Path) -> Option<PathBuf> {
    let repo = hf_hub::Cache::new(cache.to_path_buf()).model(id.to_string());
    let config = repo.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let has_weights = std::fs::read_dir(&dir).ok()?.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        name.ends_with(".safetensors") || name.ends_with(".bin")
    });
    (has_weights && dir.join("tokenizer.json").exists()).then_some(dir)
}

fn download(id: &str, cache: &Path) -> Result<PathBuf, ModelSourceError> {
    let fail = |reason: String| ModelSourceError::Download {
        id: id.to_string(),
        cache: cache.to_path_buf(),
        reason,
    };
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| hf_hub::Cache::new(cache.to_path_buf()).token());
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_token(token)
        .with_progress(true)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let repo = api.model(id.to_string());
    let info = repo.info().map_err(|e| fail(e.to_string()))?;
    let mut dir = None;
    for s in info.siblings.iter().filter(|s| wanted(&s.rfilename)) {
        tracing::info!("downloading {id}/{}", s.rfilename);
        let p = repo.get(&s.rfilename).map_err(|e| fail(e.to_string()))?;
        if s.rfilename == "config.json" {
            dir = p.parent().map(Path::to_path_buf);
        }
    }
    dir.ok_or_else(|| fail("the repository has no config.json".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("deepseek-ai/Janus-Pro-1B"));
        assert!(!is_hub_id("./model"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("model"));
        assert!(wanted("pytorch_model-00001-of-00002.bin"));
        assert!(wanted("model.safetensors"));
        assert!(!wanted("README.md"));
    }

    #[test]
    fn offline_not_cached_is_a_clear_error() {
        let cache = std::env::temp_dir().join(format!("janus-empty-cache-{}", std::process::id()));
        let err = resolve_with("deepseek-ai/Janus-Pro-1B", &cache, true).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ModelSourceError::NotCached { .. }), "{msg}");
        assert!(
            msg.contains("--model /path/to/checkpoint-directory"),
            "{msg}"
        );
        let err = resolve_with("./no/such/dir", &cache, true).unwrap_err();
        assert!(matches!(err, ModelSourceError::NoSuchDirectory(_)), "{err}");
    }

    #[test]
    fn finds_a_cached_snapshot() {
        let tmp = std::env::temp_dir().join(format!("janus-cache-{}", std::process::id()));
        let repo = tmp.join("models--org--tiny");
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
        let r = resolve_with("org/tiny", &tmp, true).unwrap();
        assert_eq!(r.path, snap);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
