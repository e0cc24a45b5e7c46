//! `Linear` that stores its weight in the checkpoint's dtype and picks the fastest matmul per call.
//!
//! Decode steps multiply a handful of rows by large weights; candle's CPU GEMM is tuned for big
//! blocks and reads weights slowly at that shape, so few-row products on the CPU go through
//! `janus_kernels::linear_rows` (each weight row read once for all rows, bf16 widened on the fly).
//! Everything else (prefill, GPU) uses candle's matmul.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Largest number of activation rows sent to the few-row CPU kernel.
pub const SMALL_M: usize = 32;

/// A dense layer `y = x Wᵀ + b` with weight `[out, in]` kept in its storage dtype.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    span: tracing::Span,
}

impl Linear {
    /// Builds from tensors; `weight` is `[out, in]`, `bias` `[out]` (kept in f32 on the CPU path).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let span = tracing::span!(tracing::Level::TRACE, "linear");
        Self { weight, bias, span }
    }

    /// Loads `weight` (and `bias` when `with_bias`) under `vb`, checking shapes.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, with_bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_dim, "bias")?.to_dtype(bias_dtype(vb.dtype()))?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// Stacks several layers that read the same input into one (e.g. q, k, v) so a step reads
    /// their weights in one pass.
    pub fn fuse(parts: &[Linear]) -> Result<Self> {
        let ws: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let weight = Tensor::cat(&ws, 0)?;
        let bias = if parts.iter().all(|p| p.bias.is_some()) {
            let bs: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    /// The weight tensor `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Biases stay f32 when weights are stored in bf16 on the CPU: they are tiny and added in f32.
fn bias_dtype(weight_dtype: DType) -> DType {
    match weight_dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let out_dim = self.out_dim();
        let mut out_shape = dims.clone();
        if let Some(last) = out_shape.last_mut() {
            *last = out_dim;
        }
        if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && rows <= SMALL_M {
            if let Some(y) = self.forward_small_cpu(x, rows, in_dim)? {
                return y.reshape(out_shape);
            }
        }
        let x2 = x.reshape((rows, in_dim))?;
        let w = if self.weight.dtype() == x.dtype() {
            self.weight.clone()
        } else {
            self.weight.to_dtype(x.dtype())?
        };
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
        }
        y.reshape(out_shape)
    }
}

impl Linear {
    /// Few-row product on the CPU kernel; `None` when the weight layout does not allow it.
    fn forward_small_cpu(&self, x: &Tensor, rows: usize, in_dim: usize) -> Result<Option<Tensor>> {
        if !self.weight.is_contiguous() {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let out_dim = self.out_dim();
        let (xs, xl) = x.storage_and_layout();
        let xs = match &*xs {
            candle_core::Storage::Cpu(s) => s.as_slice::<f32>()?,
            _ => return Ok(None),
        };
        let xs = &xs[xl.start_offset()..xl.start_offset() + rows * in_dim];
        let bias = match &self.bias {
            Some(b) if b.dtype() == DType::F32 => Some(b.contiguous()?),
            Some(_) => return Ok(None),
            None => None,
        };
        let bias_store = bias.as_ref().map(|b| b.storage_and_layout());
        let bias_slice = match &bias_store {
            Some((s, l)) => match &**s {
                candle_core::Storage::Cpu(s) => {
                    Some(&s.as_slice::<f32>()?[l.start_offset()..l.start_offset() + out_dim])
                }
                _ => return Ok(None),
            },
            None => None,
        };
        let (ws, wl) = self.weight.storage_and_layout();
        let mut out = vec![0f32; rows * out_dim];
        let n_w = out_dim * in_dim;
        match &*ws {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(w)) => {
                let w = &w[wl.start_offset()..wl.start_offset() + n_w];
                janus_kernels::linear_rows(
                    xs,
                    rows,
                    in_dim,
                    janus_kernels::Weights::F32(w),
                    out_dim,
                    bias_slice,
                    &mut out,
                );
            }
            candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(w)) => {
                let w = &w[wl.start_offset()..wl.start_offset() + n_w];
                janus_kernels::linear_rows(
                    xs,
                    rows,
                    in_dim,
                    janus_kernels::Weights::Bf16(w),
                    out_dim,
                    bias_slice,
                    &mut out,
                );
            }
            _ => return Ok(None),
        }
        Ok(Some(Tensor::from_vec(out, (rows, out_dim), &Device::Cpu)?))
    }
}

/// `softmax` over the last dimension computed in f32 whatever the input dtype.
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dt)
}
