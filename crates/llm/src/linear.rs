//! `Linear` that stores its weight in the checkpoint's dtype and picks the fastest matmul per call.
//!
//! Decode steps multiply a handful of rows by large weights; candle's CPU GEMM is tuned for big
//! blocks and reads weights slowly at that shape, so few-row products on the CPU go through
//! `janus_kernels::linear_rows` (each weight row read once for all rows, bf16 widened on the fly).
//! Larger products on the CPU (prefill, the vision tower) go through `janus_kernels::gemm`
//! (packed, register-blocked AVX-512/AVX2 micro-kernels; bf16 weights widened while packing, so
//! no f32 copy of the weight is made per call). bf16 activations on the CPU use the same GEMM
//! with bf16 products (AVX512-BF16 `vdpbf16ps` where present) and f32 accumulation. The GPU uses
//! candle's matmul.
//!
//! The LLM's layers pack their weights once at load ([`Linear::prepack_if_no_larger`]) where
//! that takes no more memory than the weight: f32 weights, or bf16 products (bf16 pairs). Every
//! product of such a layer, decode steps included, then runs on the packed GEMM, whose
//! row-count kernels cover one or two rows, and nothing is packed per call. bf16 weights
//! multiplied in f32 keep their tensor and the paths above.
//!
//! Quantized layers ([`Linear::load_as`] with a [`QFormat`], or a checkpoint that stores
//! `weight_q8_0` / `weight_q4_1` blocks) hold 8- or 4-bit blocks instead: on the CPU
//! `janus_kernels::quant` multiplies them (integer dots for few rows, dequantized into the
//! GEMM for many); elsewhere candle's `QMatMul` does, on the same bytes (GGUF's block layouts).

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use janus_kernels::gemm::{self, Act, BRef, GemmOpts, MatRef, PackedB, Precision};
use janus_kernels::quant::{self as q, QFormat, QuantWeight};
use janus_kernels::Weights;
use std::borrow::Cow;
use std::sync::Arc;

/// Largest number of activation rows sent to the few-row CPU kernel.
pub const SMALL_M: usize = 32;

/// A dense layer `y = x Wᵀ + b` with weight `[out, in]` kept in its storage dtype (or, for
/// layers that only ever see many rows on the CPU, packed once for the GEMM).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    /// The weight packed for the CPU GEMM by [`Linear::prepack`]; `weight` is then an empty
    /// placeholder and every product goes through the packed copy.
    packed: Option<Arc<PackedB>>,
    /// The weight as 8- or 4-bit blocks ([`Linear::quantize`]); `weight` is then an empty
    /// placeholder.
    quant: Option<Quantized>,
    bias: Option<Tensor>,
    /// Products of large-M CPU calls with f32 activations rounded to bf16 (f32 accumulation):
    /// the CPU's bf16-compute mode for layers that keep f32 activations (the vision tower).
    bf16_products: bool,
    span: tracing::Span,
}

impl Linear {
    /// Builds from tensors; `weight` is `[out, in]`, `bias` `[out]` (kept in f32 on the CPU path).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let span = tracing::span!(tracing::Level::TRACE, "linear");
        Self {
            weight,
            packed: None,
            quant: None,
            bias,
            bf16_products: false,
            span,
        }
    }

    /// Packs the weight once for the CPU GEMM at the precision this layer's products use
    /// (bf16 pairs with bf16 products: half an f32 weight's bytes) and drops the tensor, so
    /// large-M products skip packing it per call at no extra memory. For layers that only see
    /// many rows (the vision tower): every product, few-row ones included, then runs on the
    /// GEMM. No-op off the CPU or for weights the GEMM cannot read.
    pub fn prepack(mut self) -> Result<Self> {
        if !self.weight.device().is_cpu() || self.packed.is_some() || self.quant.is_some() {
            return Ok(self);
        }
        // A 2-D weight (`dims` and `with_weight` read its shape), contiguous for packing.
        self.weight.dims2()?;
        self.weight = self.weight.contiguous()?;
        match pack_side_by_side(&[&self], self.bf16_products)? {
            Some(packed) => self.holding(packed),
            None => Ok(self),
        }
    }

    /// [`Linear::prepack`] when the packed copy takes no more memory than the weight it
    /// replaces: f32 weights, or products in bf16 (packed as bf16 pairs). bf16 weights
    /// multiplied in f32 stay as they are (packing would widen them to f32).
    pub fn prepack_if_no_larger(self) -> Result<Self> {
        if packs_no_larger(self.weight.dtype(), self.bf16_products) {
            self.prepack()
        } else {
            Ok(self)
        }
    }

    /// This layer with `packed` in place of its weight tensor; the placeholder keeps the
    /// dtype and device, its shape is never read (see `dims`).
    fn holding(mut self, packed: PackedB) -> Result<Self> {
        self.packed = Some(Arc::new(packed));
        self.weight = Tensor::zeros(0, self.weight.dtype(), self.weight.device())?;
        Ok(self)
    }

    /// `(out, in)`.
    fn dims(&self) -> (usize, usize) {
        match (&self.packed, &self.quant) {
            (Some(p), _) => (p.cols(), p.rows()),
            (None, Some(q)) => q.dims(),
            (None, None) => self.weight.dims2().unwrap_or((0, 0)),
        }
    }

    /// Sets whether large-M CPU products with f32 activations use bf16 products (f32
    /// accumulation) instead of f32 ones.
    pub fn with_bf16_products(mut self, on: bool) -> Self {
        self.bf16_products = on;
        self
    }

    /// When `on` (CPU bf16 compute): every product with bf16 operands, the weight packed once
    /// as bf16 pairs ([`Linear::prepack`], no more memory than a bf16 weight), so few-row
    /// steps use bf16 products too; otherwise the layer as it is. For heads that, unlike the
    /// decoder layers, keep an f32 weight unpacked under f32 compute.
    pub fn packed_for_bf16_compute(self, on: bool) -> Result<Self> {
        if on {
            self.with_bf16_products(true).prepack()
        } else {
            Ok(self)
        }
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

    /// [`Linear::load`] (no bias) held as `format` blocks when one is given. A checkpoint that
    /// stores the layer quantized (`weight_q8_0` or `weight_q4_1`, `[out, row bytes]` of u8,
    /// as `janus quantize` writes) loads as it is stored; asking for another format is an
    /// error. Otherwise the weight is read in its storage dtype and quantized, so a load holds
    /// at most one layer's unquantized weight at a time.
    pub fn load_as(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        format: Option<QFormat>,
    ) -> Result<Self> {
        for stored in [QFormat::Q8_0, QFormat::Q4_1] {
            let name = stored_name(stored);
            if !vb.contains_tensor(&name) {
                continue;
            }
            if format.is_some_and(|f| f != stored) {
                candle_core::bail!(
                    "{}.{name}: the checkpoint stores this layer as {}, not the {} asked for",
                    vb.prefix(),
                    stored.name(),
                    format.map_or("", QFormat::name)
                );
            }
            let device = vb.device().clone();
            let bytes = vb.clone().set_device(Device::Cpu).get_with_hints_dtype(
                (out_dim, stored.row_bytes(in_dim)),
                &name,
                Default::default(),
                DType::U8,
            )?;
            // Split straight from the tensor's storage (no intermediate copy of the bytes).
            let w = {
                let (st, layout) = bytes.storage_and_layout();
                let candle_core::Storage::Cpu(candle_core::CpuStorage::U8(v)) = &*st else {
                    candle_core::bail!("{}.{name}: not u8 bytes in host memory", vb.prefix());
                };
                let start = layout.start_offset();
                QuantWeight::from_gguf_bytes(
                    stored,
                    out_dim,
                    in_dim,
                    &v[start..start + out_dim * stored.row_bytes(in_dim)],
                )
                .expect("the shape was checked against the row bytes")
            };
            drop(bytes);
            let dense = Tensor::zeros(0, vb.dtype(), &device)?;
            return Self::new(dense, None).holding_quant(w);
        }
        let dense = Self::load(vb, in_dim, out_dim, false)?;
        match format {
            Some(f) => dense.quantize(f),
            None => Ok(dense),
        }
    }

    /// This layer with its weight as `format` blocks (quantized from the weight in any dtype;
    /// a no-op for a layer already quantized). Fails for a packed layer: quantize first.
    pub fn quantize(self, format: QFormat) -> Result<Self> {
        if self.quant.is_some() {
            return Ok(self);
        }
        if self.packed.is_some() {
            candle_core::bail!("Linear::quantize: quantize before prepacking");
        }
        let (out_dim, in_dim) = self.weight.dims2()?;
        let host = self
            .weight
            .to_device(&Device::Cpu)?
            .to_dtype(match self.weight.dtype() {
                DType::BF16 => DType::BF16,
                _ => DType::F32,
            })?
            .contiguous()?;
        let w = {
            let (ws, wl) = host.storage_and_layout();
            let range = wl.start_offset()..wl.start_offset() + out_dim * in_dim;
            let w = match &*ws {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                    Weights::F32(&v[range])
                }
                candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
                    Weights::Bf16(&v[range])
                }
                _ => candle_core::bail!("Linear::quantize: weight not in host memory"),
            };
            QuantWeight::quantize(w, out_dim, in_dim, format)
        };
        drop(host);
        self.holding_quant(w)
    }

    /// This layer with `w` in place of its weight, where the weight's device multiplies it.
    fn holding_quant(mut self, w: QuantWeight) -> Result<Self> {
        let device = self.weight.device().clone();
        let dtype = self.weight.dtype();
        self.weight = Tensor::zeros(0, dtype, &device)?;
        self.quant = Some(Quantized::on(w, &device, dtype)?);
        Ok(self)
    }

    /// Rows `ids` of the weight (`[ids.len(), in]`, in `dtype`): the layer as an embedding
    /// table, dense or quantized (rows dequantized as they are gathered). An id past the last
    /// row is an error.
    pub fn gather_rows(&self, ids: &[u32], dtype: DType) -> Result<Tensor> {
        let (rows, width) = self.dims();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
            candle_core::bail!("token id {bad} is outside the embedding table of {rows} rows");
        }
        let device = self.weight.device();
        match &self.quant {
            None if self.packed.is_none() => {
                let idx = Tensor::from_vec(ids.to_vec(), ids.len(), device)?;
                self.weight.index_select(&idx, 0)?.to_dtype(dtype)
            }
            None => candle_core::bail!("gather_rows of a packed layer"),
            Some(Quantized::Device { mm, .. }) => {
                let idx = Tensor::from_vec(ids.to_vec(), ids.len(), device)?;
                mm.embedding(&idx)?.to_dtype(dtype)
            }
            Some(Quantized::Cpu(w)) => {
                let mut out = vec![0f32; ids.len() * width];
                for (o, &id) in out.chunks_mut(width.max(1)).zip(ids) {
                    w.dequantize_rows(id as usize, id as usize + 1, o);
                }
                Tensor::from_vec(out, (ids.len(), width), &Device::Cpu)?.to_dtype(dtype)
            }
        }
    }

    /// The weight's blocks in host memory, when the layer is quantized (what `janus quantize`
    /// writes).
    pub fn quantized(&self) -> Result<Option<QuantWeight>> {
        self.quant.as_ref().map(Quantized::host).transpose()
    }

    /// Stacks several layers that read the same input into one (e.g. q, k, v) so a step reads
    /// their weights in one pass. Takes the parts, so their weights are freed as soon as the
    /// stacked copy exists (a load then holds at most two copies of a layer's weights, also
    /// when the stacked one is prepacked next).
    pub fn fuse<const N: usize>(parts: [Linear; N]) -> Result<Self> {
        if parts.iter().all(|p| p.quant.is_some()) && N > 0 {
            let hosts = parts
                .iter()
                .map(|p| p.quantized().map(|w| w.expect("quantized")))
                .collect::<Result<Vec<_>>>()?;
            let Some(stacked) = QuantWeight::stack(&hosts) else {
                candle_core::bail!("Linear::fuse: quantized parts of different formats or widths");
            };
            drop(hosts);
            let bias = stacked_bias(&parts)?;
            let template = Self::new(parts[0].weight.clone(), bias);
            drop(parts);
            return template.holding_quant(stacked);
        }
        if parts
            .iter()
            .any(|p| p.packed.is_some() || p.quant.is_some())
        {
            candle_core::bail!("Linear::fuse: fuse before prepacking");
        }
        let ws: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let weight = Tensor::cat(&ws, 0)?;
        Ok(Self::new(weight, stacked_bias(&parts)?))
    }

    /// [`Linear::fuse`], with bf16 products when asked, then
    /// [`Linear::prepack_if_no_larger`]; when it packs, straight from the parts' weights into
    /// one packed operand ([`PackedB::stacked`]), without the stacked copy `fuse` builds, so a
    /// load holds the parts and the packed copy and nothing else.
    pub fn fuse_prepacked<const N: usize>(parts: [Linear; N], bf16_products: bool) -> Result<Self> {
        // Packed side by side when every part is a contiguous CPU weight of the same input
        // width and dtype, packing it costs no memory, and no micro-panel would straddle two
        // parts; otherwise through `fuse`.
        let stack = |i: usize, p: &Linear| {
            p.packed.is_none()
                && p.weight.device().is_cpu()
                && p.weight.is_contiguous()
                && p.weight.rank() == 2
                && p.weight.dtype() == parts[0].weight.dtype()
                && p.in_dim() == parts[0].in_dim()
                && packs_no_larger(p.weight.dtype(), bf16_products)
                && (i + 1 == N || p.out_dim().is_multiple_of(PackedB::STACK_COLS))
        };
        if parts.iter().any(|p| p.quant.is_some()) {
            return Ok(Linear::fuse(parts)?.with_bf16_products(bf16_products));
        }
        if N > 0 && parts.iter().enumerate().all(|(i, p)| stack(i, p)) {
            let refs: Vec<&Linear> = parts.iter().collect();
            if let Some(packed) = pack_side_by_side(&refs, bf16_products)? {
                let fused = Self::new(parts[0].weight.clone(), stacked_bias(&parts)?)
                    .with_bf16_products(bf16_products);
                drop(parts);
                return fused.holding(packed);
            }
        }
        Linear::fuse(parts)?
            .with_bf16_products(bf16_products)
            .prepack_if_no_larger()
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.dims().0
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.dims().1
    }
}

/// The tensor name of a layer's weight stored as `format` blocks.
pub fn stored_name(format: QFormat) -> String {
    format!("weight_{}", format.name())
}

/// A quantized weight where it is multiplied: the CPU's kernels, or candle's `QMatMul`.
#[derive(Debug, Clone)]
enum Quantized {
    Cpu(Arc<QuantWeight>),
    Device {
        mm: QMatMul,
        format: QFormat,
        n: usize,
        k: usize,
    },
}

impl Quantized {
    /// `w` on `device`: kept as it is on the CPU; elsewhere uploaded as the GGUF type of the
    /// same bytes, or, when a row is not whole blocks (GGUF has no padding), dequantized into a
    /// dense `dtype` tensor (the same values, without the savings).
    fn on(w: QuantWeight, device: &Device, dtype: DType) -> Result<Self> {
        if device.is_cpu() {
            return Ok(Self::Cpu(Arc::new(w)));
        }
        let (n, k, format) = (w.rows(), w.cols(), w.format());
        let mm = if k % q::QK == 0 {
            let storage = QStorage::from_data(Cow::Owned(w.gguf_bytes()), device, ggml(format))?;
            QMatMul::from_qtensor(QTensor::new(storage, (n, k))?)?
        } else {
            let mut v = vec![0f32; n * k];
            w.dequantize_rows(0, n, &mut v);
            QMatMul::Tensor(
                Tensor::from_vec(v, (n, k), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(device)?,
            )
        };
        Ok(Self::Device { mm, format, n, k })
    }

    /// `(out, in)`.
    fn dims(&self) -> (usize, usize) {
        match self {
            Self::Cpu(w) => (w.rows(), w.cols()),
            Self::Device { n, k, .. } => (*n, *k),
        }
    }

    /// The blocks in host memory.
    fn host(&self) -> Result<QuantWeight> {
        match self {
            Self::Cpu(w) => Ok((**w).clone()),
            Self::Device { mm, format, n, k } => {
                let QMatMul::QTensor(t) = mm else {
                    let dense = mm
                        .dequantize_f16()?
                        .to_dtype(DType::F32)?
                        .to_device(&Device::Cpu)?;
                    let v = dense.flatten_all()?.to_vec1::<f32>()?;
                    return Ok(QuantWeight::quantize(Weights::F32(&v), *n, *k, *format));
                };
                QuantWeight::from_gguf_bytes(*format, *n, *k, &t.data()?)
                    .ok_or_else(|| candle_core::Error::msg("quantized weight of unexpected size"))
            }
        }
    }
}

/// The GGUF type of a block format.
fn ggml(format: QFormat) -> GgmlDType {
    match format {
        QFormat::Q8_0 => GgmlDType::Q8_0,
        QFormat::Q4_1 => GgmlDType::Q4_1,
    }
}

/// Biases stay f32 when weights are stored in bf16 on the CPU: they are tiny and added in f32.
/// Whether packing a `dtype` weight for products in bf16 (`bf16_products`) or f32 takes no
/// more memory than the weight: f32 weights, or bf16 products (bf16 pairs).
fn packs_no_larger(dtype: DType, bf16_products: bool) -> bool {
    dtype == DType::F32 || bf16_products
}

/// The parts' weights packed side by side (`[W₀ᵀ | W₁ᵀ | …]`, [`PackedB::stacked`]) for the
/// products `bf16_products` asks for; `None` when one is not an f32 or bf16 CPU weight.
fn pack_side_by_side(parts: &[&Linear], bf16_products: bool) -> Result<Option<PackedB>> {
    let guards: Vec<_> = parts
        .iter()
        .map(|p| p.weight.storage_and_layout())
        .collect();
    let mut operands = Vec::with_capacity(parts.len());
    for (p, (ws, wl)) in parts.iter().zip(&guards) {
        let Some(w) = p.weights_in(ws, wl) else {
            return Ok(None);
        };
        operands.push(p.weight_operand(w));
    }
    PackedB::stacked(&operands, Precision::bf16_if(bf16_products))
        .map(Some)
        .map_err(candle_core::Error::wrap)
}

/// The parts' biases stacked, when every part has one.
fn stacked_bias(parts: &[Linear]) -> Result<Option<Tensor>> {
    if !parts.iter().all(|p| p.bias.is_some()) {
        return Ok(None);
    }
    let bs: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
    Ok(Some(Tensor::cat(&bs, 0)?))
}

fn bias_dtype(weight_dtype: DType) -> DType {
    match weight_dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        if let Some(q) = &self.quant {
            return self.forward_quant(q, x, Act::None, None);
        }
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
        if matches!(x.device(), Device::Cpu) && x.dtype() == DType::BF16 && rows <= SMALL_M {
            // bf16 activations, few rows: the weight-streaming kernel in f32 (exact products of
            // the bf16 inputs), rounded back to bf16.
            if let Some(y) = self.forward_small_cpu(&x.to_dtype(DType::F32)?, rows, in_dim)? {
                return y.to_dtype(DType::BF16)?.reshape(out_shape);
            }
        }
        if matches!(x.device(), Device::Cpu) && rows > 0 {
            if let Some(y) = self.forward_gemm_cpu(x, rows, in_dim, Act::None, None)? {
                return y.reshape(out_shape);
            }
        }
        if self.packed.is_some() {
            // Only CPU layers are packed, and the GEMM takes every product but an empty one
            // (or one whose input width is wrong).
            if rows == 0 && in_dim == self.in_dim() {
                return Tensor::zeros(out_shape, x.dtype(), x.device());
            }
            candle_core::bail!(
                "prepacked linear layer of input width {} got {:?} on {:?}",
                self.in_dim(),
                x.shape(),
                x.device()
            );
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
    /// `act(x Wᵀ + b)` with exact-erf GELU as `act`; on the CPU's GEMM path the activation runs
    /// on each finished tile while it is in cache, elsewhere as a separate pass.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.quant {
            let _enter = self.span.enter();
            return self.forward_quant(q, x, Act::GeluErf, None);
        }
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        if matches!(x.device(), Device::Cpu) && rows > SMALL_M {
            let _enter = self.span.enter();
            if let Some(y) = self.forward_gemm_cpu(x, rows, in_dim, Act::GeluErf, None)? {
                let mut out_shape = dims;
                if let Some(last) = out_shape.last_mut() {
                    *last = self.out_dim();
                }
                return y.reshape(out_shape);
            }
        }
        self.forward(x)?.gelu_erf()
    }

    /// `residual + x Wᵀ + b` (`residual` shaped as the output); on the CPU's GEMM path the
    /// product is accumulated straight into a copy of `residual`.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.quant {
            let _enter = self.span.enter();
            return self.forward_quant(q, x, Act::None, Some(residual));
        }
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        if matches!(x.device(), Device::Cpu)
            && rows > SMALL_M
            && residual.dtype() == DType::F32
            && residual.elem_count() == rows * self.out_dim()
        {
            let _enter = self.span.enter();
            if let Some(y) = self.forward_gemm_cpu(x, rows, in_dim, Act::None, Some(residual))? {
                return y.reshape(residual.shape());
            }
        }
        residual + self.forward(x)?
    }

    /// `act(x Wᵀ + b) (+ residual)` on the quantized weight, in `x`'s dtype: on the CPU the
    /// decode dots for up to [`SMALL_M`] rows, else the dequantizing GEMM (bf16 products when
    /// the layer has them; activation and residual fused); elsewhere candle's `QMatMul`.
    fn forward_quant(
        &self,
        quant: &Quantized,
        x: &Tensor,
        act: Act,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let (out_dim, k) = quant.dims();
        if in_dim != k {
            candle_core::bail!(
                "quantized linear layer of input width {k} got {:?}",
                x.shape()
            );
        }
        let mut out_shape = dims.clone();
        if let Some(last) = out_shape.last_mut() {
            *last = out_dim;
        }
        let w = match quant {
            Quantized::Cpu(w) => w,
            Quantized::Device { mm, .. } => {
                let mut y = mm.forward(&x.reshape((rows, in_dim))?)?;
                if let Some(b) = &self.bias {
                    y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
                }
                let mut y = y.to_dtype(x.dtype())?.reshape(out_shape)?;
                if act == Act::GeluErf {
                    y = y.gelu_erf()?;
                }
                return match residual {
                    Some(r) => r + y,
                    None => Ok(y),
                };
            }
        };
        // Few rows: the integer dots (GELU and residual as separate passes); many: the
        // dequantizing GEMM with both fused.
        let small = rows <= SMALL_M;
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        let fused_residual = residual.filter(|r| !small && r.elem_count() == rows * out_dim);
        let out = self.with_cpu_slices(&x32, bias.as_ref(), rows, |xs, bias, _| {
            if small {
                let mut y = vec![0f32; rows * out_dim];
                q::linear_rows_q(xs, rows, w, bias, &mut y);
                return Ok(y);
            }
            let mut out = match fused_residual {
                Some(r) => r.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                None => vec![0f32; rows * out_dim],
            };
            let opts = GemmOpts {
                bias_n: bias,
                act,
                precision: Precision::bf16_if(self.bf16_products),
                accumulate: fused_residual.is_some(),
                ..Default::default()
            };
            q::gemm_q(
                MatRef::row_major(xs, rows, in_dim),
                w,
                &mut out,
                out_dim,
                &opts,
            )
            .map_err(candle_core::Error::wrap)?;
            Ok(out)
        })?;
        let Some(out) = out else {
            candle_core::bail!("quantized linear layer: operands not in host memory");
        };
        let mut y = Tensor::from_vec(out, out_shape, &Device::Cpu)?;
        if small && act == Act::GeluErf {
            y = y.gelu_erf()?;
        }
        let y = y.to_dtype(x.dtype())?;
        match (residual, fused_residual) {
            (Some(r), None) => r + y,
            _ => Ok(y),
        }
    }

    /// Large-M product on the CPU GEMM (f32 or bf16 activations, f32 or bf16 weights); `None`
    /// when the weight or bias layout does not allow it (never for a prepacked weight). bf16
    /// activations are multiplied with bf16 products and f32 accumulation, and the result is
    /// returned in bf16; a prepacked weight multiplies at the precision it was packed for.
    fn forward_gemm_cpu(
        &self,
        x: &Tensor,
        rows: usize,
        in_dim: usize,
        act: Act,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let out_dt = x.dtype();
        if residual.is_some() && out_dt != DType::F32 {
            return Ok(None);
        }
        let precision = match (&self.packed, out_dt) {
            (Some(p), _) => p.precision(),
            (None, DType::F32) => Precision::bf16_if(self.bf16_products),
            (None, DType::BF16) => Precision::Bf16,
            (None, _) => return Ok(None),
        };
        if in_dim != self.in_dim() || (self.packed.is_none() && !self.weight.is_contiguous()) {
            return Ok(None);
        }
        let out_dim = self.out_dim();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        let product = |xs: &[f32], bias_slice: Option<&[f32]>, w: Option<Weights<'_>>| {
            let mut out = match residual {
                Some(r) => r.flatten_all()?.to_vec1::<f32>()?,
                None => vec![0f32; rows * out_dim],
            };
            let opts = GemmOpts {
                bias_n: bias_slice,
                act,
                precision,
                accumulate: residual.is_some(),
                ..Default::default()
            };
            let a = MatRef::row_major(xs, rows, in_dim);
            match (&self.packed, w) {
                (Some(p), _) => gemm::gemm_packed_b(a, p, &mut out, out_dim, &opts),
                (None, Some(w)) => gemm::gemm(a, self.weight_operand(w), &mut out, out_dim, &opts),
                (None, None) => unreachable!("a weight without a packed copy has its slice"),
            }
            .map_err(candle_core::Error::wrap)?;
            Ok(out)
        };
        let out = self.with_cpu_slices(&x, bias.as_ref(), rows, product)?;
        let Some(out) = out else {
            return Ok(None);
        };
        let y = Tensor::from_vec(out, (rows, out_dim), &Device::Cpu)?;
        Ok(Some(if out_dt == DType::F32 {
            y
        } else {
            y.to_dtype(out_dt)?
        }))
    }

    /// Few-row product on the CPU kernel; `None` when the weight layout does not allow it.
    fn forward_small_cpu(&self, x: &Tensor, rows: usize, in_dim: usize) -> Result<Option<Tensor>> {
        if self.packed.is_some() || !self.weight.is_contiguous() || in_dim != self.in_dim() {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let out_dim = self.out_dim();
        let bias = match &self.bias {
            Some(b) if b.dtype() == DType::F32 => Some(b.contiguous()?),
            Some(_) => return Ok(None),
            None => None,
        };
        let out = self.with_cpu_slices(&x, bias.as_ref(), rows, |xs, bias_slice, w| {
            let w = w.expect("not prepacked (checked above)");
            let mut out = vec![0f32; rows * out_dim];
            janus_kernels::linear_rows(xs, rows, in_dim, w, out_dim, bias_slice, &mut out);
            Ok(out)
        })?;
        out.map(|o| Tensor::from_vec(o, (rows, out_dim), &Device::Cpu))
            .transpose()
    }

    /// Runs `f` on the CPU slices of `x` (f32, contiguous, `rows × in_dim`), of `bias` (f32,
    /// contiguous) and of the weight (f32 or bf16, contiguous; `None` when prepacked or
    /// quantized); `None`
    /// when one of them is not in CPU memory in such a dtype.
    fn with_cpu_slices<R>(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        rows: usize,
        f: impl FnOnce(&[f32], Option<&[f32]>, Option<Weights<'_>>) -> Result<R>,
    ) -> Result<Option<R>> {
        let (in_dim, out_dim) = (self.in_dim(), self.out_dim());
        let (xs, xl) = x.storage_and_layout();
        let xs = match &*xs {
            candle_core::Storage::Cpu(s) => s.as_slice::<f32>()?,
            _ => return Ok(None),
        };
        let xs = &xs[xl.start_offset()..xl.start_offset() + rows * in_dim];
        let bias_store = bias.map(|b| b.storage_and_layout());
        let bias_slice = match &bias_store {
            Some((s, l)) => match &**s {
                candle_core::Storage::Cpu(s) => {
                    Some(&s.as_slice::<f32>()?[l.start_offset()..l.start_offset() + out_dim])
                }
                _ => return Ok(None),
            },
            None => None,
        };
        if self.packed.is_some() || self.quant.is_some() {
            return f(xs, bias_slice, None).map(Some);
        }
        self.with_weight(|w| f(xs, bias_slice, Some(w)))?
            .transpose()
    }

    /// Runs `f` on the weight's CPU slice (f32 or bf16, `out × in` from its layout's start);
    /// `None` when it is not in CPU memory in such a dtype.
    fn with_weight<R>(&self, f: impl FnOnce(Weights<'_>) -> R) -> Result<Option<R>> {
        let (ws, wl) = self.weight.storage_and_layout();
        Ok(self.weights_in(&ws, wl).map(f))
    }

    /// The weight's slice in its storage `ws` laid out as `wl` (see [`Linear::with_weight`]).
    fn weights_in<'a>(
        &self,
        ws: &'a candle_core::Storage,
        wl: &candle_core::Layout,
    ) -> Option<Weights<'a>> {
        let w = wl.start_offset()..wl.start_offset() + self.out_dim() * self.in_dim();
        match ws {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => Some(Weights::F32(&v[w])),
            candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
                Some(Weights::Bf16(&v[w]))
            }
            _ => None,
        }
    }

    /// The weight `[out, in]` as the GEMM's right operand (`in × out`, read transposed).
    fn weight_operand<'a>(&self, w: Weights<'a>) -> BRef<'a> {
        let (in_dim, out_dim) = (self.in_dim(), self.out_dim());
        match w {
            Weights::F32(w) => BRef::F32(MatRef::transposed(w, in_dim, out_dim)),
            Weights::Bf16(w) => BRef::Bf16(MatRef::transposed(w, in_dim, out_dim)),
        }
    }
}

/// `softmax` over the last dimension computed in f32 whatever the input dtype.
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dt)
}
