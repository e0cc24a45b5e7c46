//! Opening a checkpoint directory's weights as one `VarBuilder`, whatever the format.
//!
//! Supported, in order of preference: `model.safetensors.index.json` (sharded safetensors),
//! `model.safetensors`, `pytorch_model.bin.index.json` (sharded PyTorch pickle, how the hub ships
//! Janus-Pro-7B) and `pytorch_model.bin` (Janus-Pro-1B). Tensors are read lazily, so each service
//! only touches the half of the checkpoint it builds.
//!
//! Names are the files' own; [`crate::layout`] serves them by DeepSeek name whatever the
//! checkpoint's layout (DeepSeek's or transformers').
//!
//! Memory: nothing is memory-mapped. The headers (safetensors JSON, the pickle's `data.pkl` and
//! the zip directory) are parsed once into a [`TensorIndex`]; each tensor is then read with
//! positioned reads (`pread`) straight into a buffer of its destination dtype, so loading holds
//! the finished model plus at most one tensor's transient bytes, never the checkpoint's pages.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor, WithDType};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
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

    /// The files, in index order.
    pub fn files(&self) -> &[PathBuf] {
        match self {
            Self::Safetensors(files) | Self::Pth { files, .. } => files,
        }
    }

    /// Parses every file's header into one name → location index (no tensor data is read).
    pub fn open(&self) -> Result<TensorIndex> {
        let mut index = TensorIndex {
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for (i, path) in self.files().iter().enumerate() {
            let file =
                File::open(path).map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
            let entries = match self {
                Self::Safetensors(_) => safetensors_entries(&file, path, i)?,
                Self::Pth { .. } => pth_entries(&file, path, i)?,
            };
            for (name, entry) in entries {
                index.tensors.insert(name, entry);
            }
            index.files.push((path.clone(), file));
        }
        if let Self::Pth { map, .. } = self {
            // The index json names a shard per tensor: a tensor it routes elsewhere than where
            // it was found is a broken checkpoint, better reported now than mis-loaded.
            for (name, &shard) in map {
                if let Some(e) = index.tensors.get(name) {
                    if e.file != shard {
                        return Err(Error::Weights(format!(
                            "{name}: the index names {} but the tensor is in {}",
                            self.files()[shard].display(),
                            self.files()[e.file].display()
                        )));
                    }
                }
            }
        }
        Ok(index)
    }

    /// The checkpoint's storage dtype: that of most language-model weights (by size), else of
    /// most weights. BF16 for the hub's Janus-Pro checkpoints.
    pub fn dtype(&self) -> Result<DType> {
        self.open().map(|i| i.dtype())
    }

    /// A `VarBuilder` over these files storing tensors as `dtype` on `device`, by the files' own
    /// names (DeepSeek's layout; [`crate::layout::var_builder`] answers DeepSeek names in
    /// either layout).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        Ok(self.open()?.into_var_builder(dtype, device))
    }
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct TensorEntry {
    /// Index into [`TensorIndex::files`].
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offset of the first element in the file.
    offset: u64,
    /// Column-major (a transposed tensor saved by PyTorch): read reversed, then permuted.
    fortran: bool,
}

/// The tensors of a checkpoint's files and where their bytes are.
#[derive(Debug)]
pub struct TensorIndex {
    files: Vec<(PathBuf, File)>,
    tensors: HashMap<String, TensorEntry>,
}

/// Bytes read (and converted) per positioned read when the storage dtype differs from the
/// destination: the transient buffer of a converting load.
const CHUNK_BYTES: usize = 8 << 20;

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl TensorIndex {
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Names of all tensors (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Storage dtype and shape of a tensor.
    pub fn info(&self, name: &str) -> Option<(DType, &[usize])> {
        self.tensors
            .get(name)
            .map(|e| (e.dtype, e.shape.as_slice()))
    }

    /// See [`WeightFiles::dtype`].
    pub fn dtype(&self) -> DType {
        let mut by_dtype: Vec<(DType, u64, u64)> = Vec::new(); // dtype, llm bytes, all bytes
        for (name, e) in &self.tensors {
            // Floating-point tensors only: quantized blocks (`janus quantize`) are u8 bytes.
            if !e.dtype.is_float() {
                continue;
            }
            let n = e.shape.iter().product::<usize>() as u64;
            // The language model's tensors in DeepSeek's layout and in transformers'.
            let llm = if name.starts_with("language_model.")
                || name.starts_with("model.language_model.")
                || name == "lm_head.weight"
            {
                n
            } else {
                0
            };
            match by_dtype.iter_mut().find(|(d, _, _)| *d == e.dtype) {
                Some(x) => {
                    x.1 += llm;
                    x.2 += n;
                }
                None => by_dtype.push((e.dtype, llm, n)),
            }
        }
        by_dtype
            .into_iter()
            .max_by_key(|&(_, llm, all)| (llm, all))
            .map(|(d, _, _)| d)
            .unwrap_or(DType::F32)
    }

    /// The block format of the layers a `janus quantize` checkpoint stores as blocks
    /// (`…weight_q8_0` / `…weight_q4_1` tensors), if any.
    pub fn stored_blocks(&self) -> Option<janus_llm::QFormat> {
        [janus_llm::QFormat::Q8_0, janus_llm::QFormat::Q4_1]
            .into_iter()
            .find(|f| {
                let suffix = janus_llm::linear::stored_name(*f);
                self.tensors.keys().any(|n| n.ends_with(&suffix))
            })
    }

    /// A `VarBuilder` reading from these files, storing tensors as `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn path(&self, e: &TensorEntry) -> &Path {
        &self.files[e.file].0
    }

    /// The files, for messages (`a, b`).
    pub fn files_display(&self) -> String {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        files.join(", ")
    }

    /// [`Self::read`] after checking that the stored shape is `dims`.
    pub fn read_checked(
        &self,
        name: &str,
        dims: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(e) = self.tensors.get(name) {
            if e.shape.as_slice() != dims {
                return Err(err(format!(
                    "shape mismatch for {name} in {}: expected {dims:?}, found {:?}",
                    self.path(e).display(),
                    e.shape
                )));
            }
        }
        self.read(name, dtype, device)
    }

    /// Reads `name` as a `dtype` tensor on `device`: positioned reads into a buffer of the
    /// destination dtype (converting chunk by chunk when the storage dtype differs).
    pub fn read(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let Some(e) = self.tensors.get(name) else {
            return Err(err(format!(
                "cannot find tensor {name} in {}",
                self.files_display()
            )));
        };
        let ctx = |x: candle_core::Error| err(format!("{name} in {}: {x}", self.path(e).display()));
        let file = &self.files[e.file].1;
        let mut dims = e.shape.clone();
        if e.fortran {
            dims.reverse();
        }
        let mut t = read_cpu(file, e.offset, e.dtype, &dims, dtype).map_err(ctx)?;
        if e.fortran && dims.len() > 1 {
            let perm: Vec<usize> = (0..dims.len()).rev().collect();
            t = t.permute(perm).and_then(|t| t.contiguous()).map_err(ctx)?;
        }
        if !matches!(device, Device::Cpu) {
            t = t.to_device(device).map_err(ctx)?;
        }
        Ok(t)
    }
}

impl SimpleBackend for TensorIndex {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.read_checked(name, s.dims(), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

// The positioned reads below copy file bytes straight into typed buffers.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "weights are read as little-endian"
);

/// `v` as bytes, for reading into.
fn bytes_of_mut<T: WithDType>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: the `WithDType` types (u8, u32, i64, bf16, f16, f32, f64) are plain old data
    // without padding, every bit pattern is a valid value, and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn io_err(e: std::io::Error) -> candle_core::Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        err("the file ends before the tensor's data (truncated?)".into())
    } else {
        err(e.to_string())
    }
}

/// Reads `numel(dims)` elements of `T` at `offset` into a tensor without conversion.
fn read_direct<T: WithDType>(
    file: &File,
    offset: u64,
    dims: &[usize],
) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut v = vec![T::from_f64(0.0); n];
    file.read_exact_at(bytes_of_mut(&mut v), offset)
        .map_err(io_err)?;
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// Reads elements stored as `S` and stores them as `D`, [`CHUNK_BYTES`] at a time.
fn read_converting<S: WithDType, D: WithDType>(
    file: &File,
    offset: u64,
    dims: &[usize],
) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().product();
    let size = std::mem::size_of::<S>();
    let per = (CHUNK_BYTES / size).max(1);
    let mut out: Vec<D> = Vec::with_capacity(n);
    let mut buf = vec![S::from_f64(0.0); per.min(n)];
    let mut done = 0;
    while done < n {
        let k = per.min(n - done);
        file.read_exact_at(bytes_of_mut(&mut buf[..k]), offset + (done * size) as u64)
            .map_err(io_err)?;
        out.extend(buf[..k].iter().map(|&s| D::from_f64(s.to_f64())));
        done += k;
    }
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// A CPU tensor of `dims` stored as `src` at `offset`, as `dst`.
fn read_cpu(
    file: &File,
    offset: u64,
    src: DType,
    dims: &[usize],
    dst: DType,
) -> candle_core::Result<Tensor> {
    use half::{bf16, f16};
    macro_rules! direct {
        ($d:expr) => {
            match $d {
                DType::U8 => read_direct::<u8>(file, offset, dims),
                DType::U32 => read_direct::<u32>(file, offset, dims),
                DType::I64 => read_direct::<i64>(file, offset, dims),
                DType::BF16 => read_direct::<bf16>(file, offset, dims),
                DType::F16 => read_direct::<f16>(file, offset, dims),
                DType::F32 => read_direct::<f32>(file, offset, dims),
                DType::F64 => read_direct::<f64>(file, offset, dims),
                d => Err(err(format!("unsupported storage dtype {d:?}"))),
            }
        };
    }
    macro_rules! to {
        ($s:ty) => {
            match dst {
                DType::BF16 => read_converting::<$s, bf16>(file, offset, dims),
                DType::F16 => read_converting::<$s, f16>(file, offset, dims),
                DType::F32 => read_converting::<$s, f32>(file, offset, dims),
                DType::F64 => read_converting::<$s, f64>(file, offset, dims),
                _ => direct!(src)?.to_dtype(dst),
            }
        };
    }
    if src == dst {
        return direct!(src);
    }
    match src {
        DType::BF16 => to!(bf16),
        DType::F16 => to!(f16),
        DType::F32 => to!(f32),
        DType::F64 => to!(f64),
        _ => direct!(src)?.to_dtype(dst),
    }
}

/// Storage dtype of a safetensors dtype name (`None`: not supported here).
fn safetensors_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

/// Largest safetensors JSON header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// The tensors of one safetensors file: its JSON header, nothing else is read.
fn safetensors_entries(file: &File, path: &Path, fi: usize) -> Result<Vec<(String, TensorEntry)>> {
    let fail = |m: String| Error::Weights(format!("{}: {m}", path.display()));
    let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    let mut n8 = [0u8; 8];
    file.read_exact_at(&mut n8, 0)
        .map_err(|_| fail("not a safetensors file (shorter than its header)".into()))?;
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER || n > len.saturating_sub(8) {
        return Err(fail(format!(
            "not a safetensors file (header of {n} bytes in a file of {len})"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| fail(e.to_string()))?;
    #[derive(serde::Deserialize)]
    struct Header {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let map: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| fail(format!("bad header: {e}")))?;
    let base = 8 + n;
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let h: Header =
            serde_json::from_value(v).map_err(|e| fail(format!("{name}: bad header: {e}")))?;
        let Some(dtype) = safetensors_dtype(&h.dtype) else {
            tracing::debug!(tensor = %name, dtype = %h.dtype, "skipping a tensor of an unsupported dtype");
            continue;
        };
        let (start, end) = h.data_offsets;
        let want = (h.shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64;
        if end < start || end - start != want {
            return Err(fail(format!(
                "{name}: data_offsets {start}..{end} do not hold {:?} {:?}",
                h.dtype, h.shape
            )));
        }
        if base + end > len {
            return Err(fail(format!(
                "{name}: data ends at byte {} but the file has {len} (truncated?)",
                base + end
            )));
        }
        out.push((
            name,
            TensorEntry {
                file: fi,
                dtype,
                shape: h.shape,
                offset: base + start,
                fortran: false,
            },
        ));
    }
    Ok(out)
}

/// Offset of an entry's data from its local header (`header_start`) in a zip file.
fn zip_data_start(file: &File, header_start: u64) -> std::io::Result<u64> {
    let mut h = [0u8; 30];
    file.read_exact_at(&mut h, header_start)?;
    if h[..4] != [0x50, 0x4b, 0x03, 0x04] {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no zip local header at byte {header_start}"),
        ));
    }
    let name_len = u16::from_le_bytes([h[26], h[27]]) as u64;
    let extra_len = u16::from_le_bytes([h[28], h[29]]) as u64;
    Ok(header_start + 30 + name_len + extra_len)
}

/// The tensors of one PyTorch zip checkpoint: the pickle (`data.pkl`) and the zip directory
/// are read, the storages are not.
fn pth_entries(file: &File, path: &Path, fi: usize) -> Result<Vec<(String, TensorEntry)>> {
    let fail = |m: String| Error::Weights(format!("{}: {m}", path.display()));
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None)
        .map_err(|e| fail(format!("unreadable PyTorch checkpoint ({e})")))?;
    let reader = std::io::BufReader::new(file.try_clone().map_err(|e| fail(e.to_string()))?);
    let mut zip = zip::ZipArchive::new(reader)
        .map_err(|e| fail(format!("unreadable PyTorch checkpoint ({e})")))?;
    let file_len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    // Storage record → (data start, size); several tensors may view one storage.
    let mut storages: HashMap<String, (u64, u64)> = HashMap::new();
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let (start, size) = match storages.get(&info.path) {
            Some(&s) => s,
            None => {
                let entry = zip
                    .by_name(&info.path)
                    .map_err(|e| fail(format!("{}: storage {}: {e}", info.name, info.path)))?;
                if entry.compression() != zip::CompressionMethod::Stored {
                    return Err(fail(format!(
                        "{}: storage {} is compressed ({:?}); torch.save stores them uncompressed",
                        info.name,
                        info.path,
                        entry.compression()
                    )));
                }
                let (header, size) = (entry.header_start(), entry.size());
                drop(entry);
                let start = zip_data_start(file, header)
                    .map_err(|e| fail(format!("{}: storage {}: {e}", info.name, info.path)))?;
                storages.insert(info.path.clone(), (start, size));
                (start, size)
            }
        };
        let layout = &info.layout;
        let fortran = !layout.is_contiguous();
        if fortran && !layout.is_fortran_contiguous() {
            return Err(fail(format!(
                "{}: non-contiguous tensor (strides {:?}) is not supported",
                info.name,
                layout.stride()
            )));
        }
        let dims = layout.dims().to_vec();
        // candle's pickle reader keeps the storage offset in bytes.
        let offset = layout.start_offset() as u64;
        let bytes = (dims.iter().product::<usize>() * info.dtype.size_in_bytes()) as u64;
        if offset + bytes > size {
            return Err(fail(format!(
                "{}: {bytes} bytes at offset {offset} overrun its storage of {size} bytes",
                info.name
            )));
        }
        if start + size > file_len {
            return Err(fail(format!(
                "{}: storage {} is truncated",
                info.name, info.path
            )));
        }
        out.push((
            info.name,
            TensorEntry {
                file: fi,
                dtype: info.dtype,
                shape: dims,
                offset: start + offset,
                fortran: fortran && layout.dims().len() > 1,
            },
        ));
    }
    Ok(out)
}

/// Maps a loading error to [`Error::Weights`], keeping the message (it names the tensor, the
/// file and, for shape mismatches, both shapes).
pub fn weights_err(e: candle_core::Error) -> Error {
    Error::Weights(e.to_string())
}
