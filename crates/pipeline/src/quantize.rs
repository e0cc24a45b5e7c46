//! `janus quantize`: a checkpoint directory rewritten with the language model's linear layers
//! as 8- or 4-bit blocks, which loads directly (no quantization at load, a quarter to an eighth
//! of the layers' bytes read from disk).
//!
//! Format: one `model.safetensors` beside copies of the source's configuration, tokenizer and
//! processor files. Each quantized layer's `…weight` becomes `…weight_q8_0` or
//! `…weight_q4_1`: u8 `[out, row bytes]`, the blocks exactly as GGUF lays out `Q8_0` / `Q4_1`
//! rows (see `janus_kernels::quant`). Every other tensor is copied as stored. Safetensors
//! rather than GGUF because the rest of a Janus checkpoint (vision tower, VQ decoder,
//! tokenizer and processor files) lives in the Hugging Face directory form our loader already
//! reads, with one reader for everything; the blocks are GGUF's, so a GGUF export needs only
//! a header.
//!
//! Memory: the header is written first (every size is known from the source's), then one
//! tensor at a time is read, quantized and appended: at most one tensor's bytes in memory.

use crate::error::{Error, Result};
use crate::weights::WeightFiles;
use candle_core::{DType, Device};
use janus_kernels::quant::{QFormat, QuantWeight};
use janus_kernels::Weights;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Whether `name` is one of the language model's weights `janus quantize` stores as blocks
/// (DeepSeek's or transformers' layout): the decoder layers' projections, `lm_head` and the
/// token embedding table.
pub fn is_llm_linear(name: &str) -> bool {
    let layer = name
        .strip_prefix("language_model.model.layers.")
        .or_else(|| name.strip_prefix("model.language_model.layers."));
    if let Some(rest) = layer {
        let Some((idx, part)) = rest.split_once('.') else {
            return false;
        };
        return idx.parse::<usize>().is_ok()
            && [
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ]
            .contains(&part);
    }
    [
        "language_model.lm_head.weight",
        "lm_head.weight",
        "language_model.model.embed_tokens.weight",
        "model.language_model.embed_tokens.weight",
    ]
    .contains(&name)
}

/// What [`quantize_dir`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// Tensors quantized / copied.
    pub quantized: usize,
    pub copied: usize,
    /// Bytes of the source's tensors and of the written file.
    pub source_bytes: u64,
    pub written_bytes: u64,
}

fn st_dtype(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        d => return Err(Error::Weights(format!("cannot write dtype {d:?}"))),
    })
}

/// The files copied beside the weights (those present).
const SIDE_FILES: [&str; 7] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
];

/// Writes `src`'s checkpoint into `out` (created; must not hold weights already) with the
/// language model's linear weights as `format` blocks.
pub fn quantize_dir(src: &Path, out: &Path, format: QFormat) -> Result<Written> {
    let files = WeightFiles::find(src)?;
    let index = files.open()?;
    if WeightFiles::find(out).is_ok() {
        return Err(Error::invalid(
            "out",
            format!(
                "{} already holds weights; choose an empty directory",
                out.display()
            ),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::Weights(format!("{}: {e}", out.display())))?;
    let mut names: Vec<String> = index.names().map(str::to_string).collect();
    names.sort();
    // The header: names, dtypes, shapes and offsets, all known before any tensor is read.
    let mut header = BTreeMap::new();
    let mut plan = Vec::with_capacity(names.len());
    let (mut offset, mut source_bytes) = (0u64, 0u64);
    for name in &names {
        let (dtype, shape) = index.info(name).expect("listed by the index");
        let shape = shape.to_vec();
        source_bytes += (shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64;
        let quantize = is_llm_linear(name) && shape.len() == 2;
        let (out_name, out_dtype, out_shape) = if quantize {
            let stem = name
                .strip_suffix("weight")
                .expect("linear names end in weight");
            let q = format!("{stem}weight_{}", format.name());
            (q, DType::U8, vec![shape[0], format.row_bytes(shape[1])])
        } else {
            (name.clone(), dtype, shape.clone())
        };
        let bytes = (out_shape.iter().product::<usize>() * out_dtype.size_in_bytes()) as u64;
        header.insert(
            out_name,
            serde_json::json!({
                "dtype": st_dtype(out_dtype)?,
                "shape": out_shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        plan.push((name.clone(), quantize, dtype, shape, bytes));
        offset += bytes;
    }
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({ "format": "pt", "janus_quantized": format.name() }),
    );
    // The data follows in `plan` order, the order the offsets above were given in.
    let mut json = serde_json::to_vec(&header).map_err(|e| Error::Weights(e.to_string()))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let path = out.join("model.safetensors");
    let fail = |e: std::io::Error| Error::Weights(format!("{}: {e}", path.display()));
    let mut f =
        std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&path).map_err(fail)?);
    f.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(fail)?;
    f.write_all(&json).map_err(fail)?;
    let (mut quantized, mut copied) = (0, 0);
    for (name, quantize, dtype, shape, bytes) in plan {
        let werr = |e: candle_core::Error| Error::Weights(format!("{name}: {e}"));
        if quantize {
            let read_as = if dtype == DType::BF16 {
                DType::BF16
            } else {
                DType::F32
            };
            let t = index.read(&name, read_as, &Device::Cpu).map_err(werr)?;
            let (n, k) = (shape[0], shape[1]);
            let q = match read_as {
                DType::BF16 => {
                    let v = t
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<half::bf16>())
                        .map_err(werr)?;
                    QuantWeight::quantize(Weights::Bf16(&v), n, k, format)
                }
                _ => {
                    let v = t
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(werr)?;
                    QuantWeight::quantize(Weights::F32(&v), n, k, format)
                }
            };
            let gguf = q.gguf_bytes();
            debug_assert_eq!(gguf.len() as u64, bytes);
            f.write_all(&gguf).map_err(fail)?;
            quantized += 1;
        } else {
            let t = index.read(&name, dtype, &Device::Cpu).map_err(werr)?;
            let t = t.flatten_all().map_err(werr)?;
            let raw = tensor_bytes(&t).map_err(werr)?;
            debug_assert_eq!(raw.len() as u64, bytes);
            f.write_all(&raw).map_err(fail)?;
            copied += 1;
        }
    }
    f.flush().map_err(fail)?;
    drop(f);
    for side in SIDE_FILES {
        let from = src.join(side);
        if from.is_file() {
            std::fs::copy(&from, out.join(side))
                .map_err(|e| Error::Weights(format!("{}: {e}", from.display())))?;
        }
    }
    Ok(Written {
        quantized,
        copied,
        source_bytes,
        written_bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
    })
}

/// A CPU tensor's elements as little-endian bytes.
fn tensor_bytes(t: &candle_core::Tensor) -> candle_core::Result<Vec<u8>> {
    use half::{bf16, f16};
    fn le<T: Copy>(v: Vec<T>, f: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
        v.into_iter().flat_map(f).collect()
    }
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::U32 => le(t.to_vec1::<u32>()?, |x| x.to_le_bytes().to_vec()),
        DType::I64 => le(t.to_vec1::<i64>()?, |x| x.to_le_bytes().to_vec()),
        DType::BF16 => le(t.to_vec1::<bf16>()?, |x| x.to_le_bytes().to_vec()),
        DType::F16 => le(t.to_vec1::<f16>()?, |x| x.to_le_bytes().to_vec()),
        DType::F32 => le(t.to_vec1::<f32>()?, |x| x.to_le_bytes().to_vec()),
        DType::F64 => le(t.to_vec1::<f64>()?, |x| x.to_le_bytes().to_vec()),
        d => candle_core::bail!("cannot write dtype {d:?}"),
    })
}
