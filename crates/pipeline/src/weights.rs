//! Opening a checkpoint directory's weights as one `VarBuilder`, whatever the format.
//!
//! Supported, in order of preference: `model.safetensors.index.json` (sharded safetensors),
//! `model.safetensors`, `pytorch_model.bin.index.json` (sharded PyTorch pickle, how the hub ships
//! Janus-Pro-7B) and `pytorch_model.bin` (Janus-Pro-1B). Tensors are read lazily, so each service
//! only touches the half of the checkpoint it builds.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which weight files a checkpoint directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// One or more safetensors files.
    Safetensors(Vec<PathBuf>),
    /// PyTorch pickle shards with the tensor → file map of the index json.
    Pth {
        files: Vec<PathBuf>,
        map: HashMap<String, usize>,
    },
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

fn read_index(path: &Path, dir: &Path) -> Result<(Vec<PathBuf>, HashMap<String, usize>)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
    let idx: Index = serde_json::from_str(&text)
        .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
    let mut files: Vec<String> = idx.weight_map.values().cloned().collect();
    files.sort();
    files.dedup();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    for p in &paths {
        if !p.is_file() {
            return Err(Error::MissingFile {
                path: p.clone(),
                what: "weight shard named by the index",
            });
        }
    }
    let map = idx
        .weight_map
        .into_iter()
        .map(|(k, f)| {
            let i = files.iter().position(|x| *x == f).expect("listed above");
            (k, i)
        })
        .collect();
    Ok((paths, map))
}

impl WeightFiles {
    /// Finds the weight files of `dir`.
    pub fn find(dir: &Path) -> Result<Self> {
        let st_index = dir.join("model.safetensors.index.json");
        if st_index.is_file() {
            let (files, _) = read_index(&st_index, dir)?;
            return Ok(Self::Safetensors(files));
        }
        let st = dir.join("model.safetensors");
        if st.is_file() {
            return Ok(Self::Safetensors(vec![st]));
        }
        let pth_index = dir.join("pytorch_model.bin.index.json");
        if pth_index.is_file() {
            let (files, map) = read_index(&pth_index, dir)?;
            return Ok(Self::Pth { files, map });
        }
        let pth = dir.join("pytorch_model.bin");
        if pth.is_file() {
            return Ok(Self::Pth {
                files: vec![pth],
                map: HashMap::new(),
            });
        }
        Err(Error::MissingFile {
            path: dir.join("model.safetensors"),
            what: "weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])",
        })
    }

    /// A `VarBuilder` over these files storing tensors as `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match self {
            Self::Safetensors(files) => {
                // SAFETY: the files are memory-mapped read-only; the checkpoint must not be
                // modified while the model is loaded, as with any mmap-based loader.
                unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
                    .map_err(|e| Error::Weights(e.to_string()))
            }
            Self::Pth { files, map } => {
                let shards = files
                    .iter()
                    .map(|f| {
                        candle_core::pickle::PthTensors::new(f, None).map_err(|e| {
                            Error::Weights(format!(
                                "{}: unreadable PyTorch checkpoint ({e})",
                                f.display()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let backend = ShardedPth {
                    shards,
                    map: map.clone(),
                };
                Ok(VarBuilder::from_backend(
                    Box::new(backend),
                    dtype,
                    device.clone(),
                ))
            }
        }
    }
}

/// Several `PthTensors` routed by the index's weight map (a single file needs no map).
struct ShardedPth {
    shards: Vec<candle_core::pickle::PthTensors>,
    map: HashMap<String, usize>,
}

impl ShardedPth {
    fn shard(&self, name: &str) -> Option<&candle_core::pickle::PthTensors> {
        match self.map.get(name) {
            Some(&i) => self.shards.get(i),
            None if self.map.is_empty() => self.shards.first(),
            None => None,
        }
    }
}

impl SimpleBackend for ShardedPth {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.shard(name) {
            Some(shard) => SimpleBackend::get(shard, s, name, h, dtype, dev),
            None => Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.shard(name) {
            Some(shard) => SimpleBackend::get_unchecked(shard, name, dtype, dev),
            None => Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shard(name)
            .is_some_and(|s| SimpleBackend::contains_tensor(s, name))
    }
}

/// Maps a loading error to [`Error::Weights`], keeping candle's message (it names the tensor
/// and, for shape mismatches, both shapes).
pub fn weights_err(e: candle_core::Error) -> Error {
    Error::Weights(e.to_string())
}
