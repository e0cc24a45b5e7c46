//! LlamaGen's VQ-16 image tokenizer as Janus-Pro uses it (`janus/models/vq_model.py`).
//!
//! The decoder turns a 24×24 grid of codebook ids into a 384×384 RGB image; the encoder (for round
//! trips and tests) goes the other way. Codebook rows are L2-normalised before lookup because the
//! model was trained with `codebook_l2_norm=True`: skipping it gives washed-out images.

pub mod ops;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use janus_kernels::gemm::Precision;
use ops::{Conv3x3, GroupNormAct};

/// A convolution: the banded 3×3 kernel for stride-1 3×3 layers, candle's otherwise.
#[derive(Debug, Clone)]
enum Conv2d {
    K3(Conv3x3),
    Generic(candle_nn::Conv2d),
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::K3(c) => c.forward(x),
            Self::Generic(c) => c.forward(x),
        }
    }
}

/// VQ model shape (the `params` of `gen_vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct VqConfig {
    /// Base channels.
    pub ch: usize,
    /// Channel multiplier per resolution level.
    pub ch_mult: Vec<usize>,
    /// Latent channels between encoder/decoder and the quantiser convs.
    pub z_channels: usize,
    /// Residual blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Codebook entries.
    pub codebook_size: usize,
    /// Codebook vector width.
    pub codebook_embed_dim: usize,
}

impl VqConfig {
    /// `VQ-16`, the model every Janus-Pro checkpoint names.
    pub fn vq_16() -> Self {
        Self {
            ch: 128,
            ch_mult: vec![1, 1, 2, 2, 4],
            z_channels: 256,
            num_res_blocks: 2,
            codebook_size: 16384,
            codebook_embed_dim: 8,
        }
    }

    /// Spatial downsampling factor (16 for five levels).
    pub fn downsample(&self) -> usize {
        1 << (self.ch_mult.len().saturating_sub(1))
    }

    /// Multiply-adds of one decode of an `h × w` code grid (post-quant conv, decoder
    /// convolutions and attention blocks; normalisation and activations not counted), for
    /// throughput reports. VQ-16 at 24 × 24: 285.1 G (570 GFLOP).
    pub fn decoder_macs(&self, h: usize, w: usize) -> u64 {
        let n = self.ch_mult.len();
        if n == 0 {
            return 0;
        }
        let conv3 = |ci: usize, co: usize, hw: usize| (ci * co * 9 * hw) as u64;
        let res = |ci: usize, co: usize, hw: usize| {
            conv3(ci, co, hw) + conv3(co, co, hw) + if ci != co { (ci * co * hw) as u64 } else { 0 }
        };
        let attn = |c: usize, hw: usize| (4 * c * c * hw + 2 * hw * hw * c) as u64;
        let mut hw = h * w;
        let mut c = self.ch * self.ch_mult[n - 1];
        let mut macs = (self.codebook_embed_dim * self.z_channels * hw) as u64;
        macs += conv3(self.z_channels, c, hw);
        macs += 2 * res(c, c, hw) + attn(c, hw);
        for i in 0..n {
            let co = self.ch * self.ch_mult[n - 1 - i];
            for _ in 0..=self.num_res_blocks {
                macs += res(c, co, hw);
                c = co;
                if i == 0 {
                    macs += attn(c, hw);
                }
            }
            if i != n - 1 {
                hw *= 4;
                macs += conv3(c, c, hw);
            }
        }
        macs + conv3(c, 3, hw)
    }
}

/// `Normalize` of the reference: GroupNorm(32, eps 1e-6), here fused with the swish that always
/// follows it in ResnetBlocks and before `conv_out`.
fn group_norm(vb: VarBuilder, c: usize, silu: bool) -> Result<GroupNormAct> {
    let w = vb.get(c, "weight")?;
    let b = vb.get(c, "bias")?;
    GroupNormAct::new(w, b, 32, 1e-6, silu)
}

/// A convolution; 3×3 stride-1 padding-1 ones get [`Conv3x3`], whose CPU path multiplies in
/// `precision` (the other shapes are small and run on candle).
#[allow(clippy::too_many_arguments)]
fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    precision: Precision,
) -> Result<Conv2d> {
    let w = vb.get((cout, cin, k, k), "weight")?;
    let b = vb.get(cout, "bias")?;
    if k == 3 && stride == 1 && pad == 1 {
        return Ok(Conv2d::K3(Conv3x3::new(w, b, precision)?));
    }
    let cfg = Conv2dConfig {
        padding: pad,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::Generic(candle_nn::Conv2d::new(w, Some(b), cfg)))
}

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNormAct,
    conv1: Conv2d,
    norm2: GroupNormAct,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(vb: VarBuilder, cin: usize, cout: usize, p: Precision) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), cin, true)?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1, p)?,
            norm2: group_norm(vb.pp("norm2"), cout, true)?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1, p)?,
            nin_shortcut: if cin != cout {
                Some(conv(vb.pp("nin_shortcut"), cin, cout, 1, 1, 0, p)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?)?;
        let h = self.norm2.forward(&h)?;
        let skip = match &self.nin_shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        // conv2 accumulates into the skip connection (no separate add pass on the CPU).
        match &self.conv2 {
            Conv2d::K3(c) => c.forward_residual(&h, &skip),
            c => skip + c.forward(&h)?,
        }
    }
}

/// Single-head spatial self-attention with 1×1 convs (applied as matmuls).
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNormAct,
    qkv_w: Tensor,
    qkv_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    c: usize,
}

impl AttnBlock {
    fn load(vb: VarBuilder, c: usize) -> Result<Self> {
        let get = |n: &str| -> Result<(Tensor, Tensor)> {
            let w = vb.get((c, c, 1, 1), &format!("{n}.weight"))?;
            let b = vb.get(c, &format!("{n}.bias"))?;
            Ok((w.reshape((c, c))?, b))
        };
        let (q, qb) = get("q")?;
        let (k, kb) = get("k")?;
        let (v, vb_) = get("v")?;
        let (p, pb) = get("proj_out")?;
        Ok(Self {
            norm: group_norm(vb.pp("norm"), c, false)?,
            qkv_w: Tensor::cat(&[q, k, v], 0)?,
            qkv_b: Tensor::cat(&[qb, kb, vb_], 0)?,
            proj_w: p,
            proj_b: pb,
            c,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hw = h * w;
        // [b, hw, c] tokens.
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, hw))?
            .transpose(1, 2)?
            .contiguous()?;
        let qkv = t
            .broadcast_matmul(&self.qkv_w.t()?)?
            .broadcast_add(&self.qkv_b)?;
        let q = qkv.narrow(D::Minus1, 0, c)?.contiguous()?;
        let k = qkv.narrow(D::Minus1, c, c)?.contiguous()?;
        let v = qkv.narrow(D::Minus1, 2 * c, c)?.contiguous()?;
        // Scores, scale and softmax in f32 whatever the compute dtype.
        let att = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * (self.c as f64).powf(-0.5))?;
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(v.dtype())?;
        let y = att.matmul(&v)?;
        let y = y
            .broadcast_matmul(&self.proj_w.t()?)?
            .broadcast_add(&self.proj_b)?;
        x + y.transpose(1, 2)?.reshape((b, c, h, w))?
    }
}

#[derive(Debug, Clone)]
struct Level {
    res: Vec<ResnetBlock>,
    attn: Vec<AttnBlock>,
    resample: Option<Conv2d>,
}

/// The decoder: latent `[n, z, h, w]` → image `[n, 3, 16h, 16w]` in nominal [-1, 1].
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: (ResnetBlock, AttnBlock, ResnetBlock),
    levels: Vec<Level>,
    norm_out: GroupNormAct,
    conv_out: Conv2d,
}

impl Decoder {
    /// Loads the decoder; its 3×3 convolutions multiply in `p` on the CPU.
    fn load(vb: VarBuilder, cfg: &VqConfig, p: Precision) -> Result<Self> {
        let n = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[n - 1];
        let conv_in = conv(vb.pp("conv_in"), cfg.z_channels, block_in, 3, 1, 1, p)?;
        let mid = (
            ResnetBlock::load(vb.pp("mid.0"), block_in, block_in, p)?,
            AttnBlock::load(vb.pp("mid.1"), block_in)?,
            ResnetBlock::load(vb.pp("mid.2"), block_in, block_in, p)?,
        );
        let mut levels = Vec::with_capacity(n);
        for i in 0..n {
            let lvb = vb.pp(format!("conv_blocks.{i}"));
            let block_out = cfg.ch * cfg.ch_mult[n - 1 - i];
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                res.push(ResnetBlock::load(
                    lvb.pp(format!("res.{j}")),
                    block_in,
                    block_out,
                    p,
                )?);
                block_in = block_out;
                if i == 0 {
                    attn.push(AttnBlock::load(lvb.pp(format!("attn.{j}")), block_in)?);
                }
            }
            let resample = if i != n - 1 {
                Some(conv(
                    lvb.pp("upsample.conv"),
                    block_in,
                    block_in,
                    3,
                    1,
                    1,
                    p,
                )?)
            } else {
                None
            };
            levels.push(Level {
                res,
                attn,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            mid,
            levels,
            norm_out: group_norm(vb.pp("norm_out"), block_in, true)?,
            conv_out: conv(vb.pp("conv_out"), block_in, 3, 3, 1, 1, p)?,
        })
    }

    /// Decodes `z`; `stop` is asked between blocks and ends the decode with
    /// [`DecodeStopped`] when it answers true.
    fn forward(&self, z: &Tensor, stop: &dyn Fn() -> bool) -> Result<Tensor> {
        let check = || {
            if stop() {
                Err(candle_core::Error::wrap(DecodeStopped))
            } else {
                Ok(())
            }
        };
        let mut h = self.conv_in.forward(z)?;
        h = self.mid.0.forward(&h)?;
        h = self.mid.1.forward(&h)?;
        h = self.mid.2.forward(&h)?;
        for level in &self.levels {
            for (j, r) in level.res.iter().enumerate() {
                check()?;
                h = r.forward(&h)?;
                if let Some(a) = level.attn.get(j) {
                    h = a.forward(&h)?;
                }
            }
            if let Some(up) = &level.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = up.forward(&h.upsample_nearest2d(hh * 2, ww * 2)?)?;
            }
        }
        let h = self.norm_out.forward(&h)?;
        self.conv_out.forward(&h)
    }
}

/// The encoder: image `[n, 3, H, W]` in [-1, 1] → latent `[n, z, H/16, W/16]`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    levels: Vec<Level>,
    mid: (ResnetBlock, AttnBlock, ResnetBlock),
    norm_out: GroupNormAct,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: VarBuilder, cfg: &VqConfig) -> Result<Self> {
        // The encoder (image → codes) keeps f32 products on the CPU.
        let p = Precision::F32;
        let n = cfg.ch_mult.len();
        let conv_in = conv(vb.pp("conv_in"), 3, cfg.ch, 3, 1, 1, p)?;
        let mut in_mult = vec![1];
        in_mult.extend(&cfg.ch_mult);
        let mut levels = Vec::with_capacity(n);
        let mut block_in = cfg.ch;
        for (i, &mult_in) in in_mult.iter().enumerate().take(n) {
            let lvb = vb.pp(format!("conv_blocks.{i}"));
            block_in = cfg.ch * mult_in;
            let block_out = cfg.ch * cfg.ch_mult[i];
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..cfg.num_res_blocks {
                res.push(ResnetBlock::load(
                    lvb.pp(format!("res.{j}")),
                    block_in,
                    block_out,
                    p,
                )?);
                block_in = block_out;
                if i == n - 1 {
                    attn.push(AttnBlock::load(lvb.pp(format!("attn.{j}")), block_in)?);
                }
            }
            let resample = if i != n - 1 {
                Some(conv(
                    lvb.pp("downsample.conv"),
                    block_in,
                    block_in,
                    3,
                    2,
                    0,
                    p,
                )?)
            } else {
                None
            };
            levels.push(Level {
                res,
                attn,
                resample,
            });
        }
        let mid = (
            ResnetBlock::load(vb.pp("mid.0"), block_in, block_in, p)?,
            AttnBlock::load(vb.pp("mid.1"), block_in)?,
            ResnetBlock::load(vb.pp("mid.2"), block_in, block_in, p)?,
        );
        Ok(Self {
            conv_in,
            levels,
            mid,
            norm_out: group_norm(vb.pp("norm_out"), block_in, true)?,
            conv_out: conv(vb.pp("conv_out"), block_in, cfg.z_channels, 3, 1, 1, p)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.levels {
            for (j, r) in level.res.iter().enumerate() {
                h = r.forward(&h)?;
                if let Some(a) = level.attn.get(j) {
                    h = a.forward(&h)?;
                }
            }
            if let Some(down) = &level.resample {
                // F.pad(x, (0, 1, 0, 1)): one zero column right, one zero row bottom.
                let padded = h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
                h = down.forward(&padded)?;
            }
        }
        h = self.mid.0.forward(&h)?;
        h = self.mid.1.forward(&h)?;
        h = self.mid.2.forward(&h)?;
        let h = self.norm_out.forward(&h)?;
        self.conv_out.forward(&h)
    }
}

/// Why a decode ended early: its `stop` callback asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStopped;

impl std::fmt::Display for DecodeStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VQ decode stopped")
    }
}

impl std::error::Error for DecodeStopped {}

/// The VQ model. The decoder half is what image generation needs; the encoder is optional.
#[derive(Debug, Clone)]
pub struct VqModel {
    encoder: Option<(Encoder, Conv2d)>,
    decoder: Decoder,
    post_quant_conv: Conv2d,
    /// L2-normalised codebook `[codebook_size, embed_dim]`.
    codebook: Tensor,
    cfg: VqConfig,
    device: Device,
    /// Activation dtype of the encoder and decoder.
    dtype: DType,
    span: tracing::Span,
}

impl VqModel {
    /// Loads from `vb` at `gen_vision_model` for compute dtype `dtype`. Off the CPU the
    /// encoder and decoder compute in `dtype` (bf16 by default on CUDA). On the CPU activations
    /// stay f32 (its kernels are f32); with `dtype` bf16 the decoder's 3×3 convolutions (≈ 99 %
    /// of its multiply-adds) round their operands to bf16 and accumulate in f32 (`vdpbf16ps` on
    /// AVX512-BF16). In every case the codebook, the GroupNorm statistics and the attention
    /// softmax stay f32, and images come out as f32.
    pub fn load(vb: VarBuilder, cfg: &VqConfig, with_encoder: bool, dtype: DType) -> Result<Self> {
        if cfg.ch_mult.is_empty() || cfg.ch == 0 || cfg.codebook_embed_dim == 0 {
            candle_core::bail!("invalid VQ configuration {cfg:?}");
        }
        let device = vb.device().clone();
        let e = cfg.codebook_embed_dim;
        let codebook = vb
            .get((cfg.codebook_size, e), "quantize.embedding.weight")?
            .to_dtype(DType::F32)?;
        let norm = codebook.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
        let codebook = codebook.broadcast_div(&norm)?;
        let on_cpu = device.is_cpu();
        let act = if on_cpu { DType::F32 } else { dtype };
        let vb = vb.set_dtype(act);
        let encoder = if with_encoder {
            Some((
                Encoder::load(vb.pp("encoder"), cfg)?,
                conv(
                    vb.pp("quant_conv"),
                    cfg.z_channels,
                    e,
                    1,
                    1,
                    0,
                    Precision::F32,
                )?,
            ))
        } else {
            None
        };
        let products = Precision::bf16_if(on_cpu && dtype == DType::BF16);
        let decoder = Decoder::load(vb.pp("decoder"), cfg, products)?;
        Ok(Self {
            encoder,
            decoder,
            post_quant_conv: conv(
                vb.pp("post_quant_conv"),
                e,
                cfg.z_channels,
                1,
                1,
                0,
                Precision::F32,
            )?,
            codebook,
            cfg: cfg.clone(),
            device,
            dtype: act,
            span: tracing::span!(tracing::Level::TRACE, "vq_decode"),
        })
    }

    /// The L2-normalised codebook `[codebook_size, embed_dim]` (f32).
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    /// The model's shape.
    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// Decodes `n` square grids of codes (`codes.len() == n * side²`, raster order) to images
    /// `[n, 3, 16·side, 16·side]` in nominal [-1, 1] (not clamped).
    pub fn decode_codes(&self, codes: &[u32], n: usize) -> Result<Tensor> {
        self.decode_codes_until(codes, n, &|| false)
    }

    /// [`Self::decode_codes`] that asks `stop` between decoder blocks (a cancelled request's
    /// decode ends within one block); a stopped decode is an error wrapping [`DecodeStopped`].
    pub fn decode_codes_until(
        &self,
        codes: &[u32],
        n: usize,
        stop: &dyn Fn() -> bool,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        if n == 0 || !codes.len().is_multiple_of(n) {
            candle_core::bail!("{} codes do not split into {n} images", codes.len());
        }
        let per = codes.len() / n;
        let side = (per as f64).sqrt() as usize;
        if side * side != per {
            candle_core::bail!("{per} codes per image is not a square grid");
        }
        if let Some(&bad) = codes
            .iter()
            .find(|&&c| c as usize >= self.cfg.codebook_size)
        {
            candle_core::bail!(
                "code {bad} outside the codebook of {}",
                self.cfg.codebook_size
            );
        }
        let idx = Tensor::from_slice(codes, codes.len(), &self.device)?;
        let e = self.cfg.codebook_embed_dim;
        let z = self
            .codebook
            .index_select(&idx, 0)?
            .reshape((n, side, side, e))?
            .permute((0, 3, 1, 2))?
            .to_dtype(self.dtype)?
            .contiguous()?;
        self.decoder
            .forward(&self.post_quant_conv.forward(&z)?, stop)?
            .to_dtype(DType::F32)
    }

    /// Encodes images `[n, 3, H, W]` in [-1, 1] to their nearest codebook ids (raster order).
    pub fn encode(&self, pixels: &Tensor) -> Result<Vec<u32>> {
        let Some((encoder, quant_conv)) = &self.encoder else {
            candle_core::bail!("this VQ model was loaded without its encoder");
        };
        let h = quant_conv
            .forward(&encoder.forward(&pixels.to_dtype(self.dtype)?)?)?
            .to_dtype(DType::F32)?;
        let (n, e, hh, ww) = h.dims4()?;
        let z = h.permute((0, 2, 3, 1))?.reshape((n * hh * ww, e))?;
        let z = z.broadcast_div(&z.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?)?;
        // argmin ‖z − e‖² = argmax z·e for unit vectors.
        let sim = z.matmul(&self.codebook.t()?)?;
        sim.argmax(1)?.to_vec1::<u32>()
    }
}

/// Maps decoder output `[n, 3, H, W]` to RGB8 images as the reference does:
/// `clip((x + 1) / 2 · 255, 0, 255)` truncated to u8.
pub fn to_rgb8(decoded: &Tensor) -> Result<Vec<image_buf::Rgb8>> {
    let (n, c, h, w) = decoded.dims4()?;
    if c != 3 {
        candle_core::bail!("expected 3 channels, got {c}");
    }
    let x = ((decoded.to_dtype(DType::F32)? + 1.0)? / 2.0)?;
    let x = (x * 255.0)?
        .clamp(0f32, 255f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let flat = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(flat
        .chunks(h * w * 3)
        .take(n)
        .map(|px| image_buf::Rgb8 {
            width: w as u32,
            height: h as u32,
            data: px.iter().map(|&v| v as u8).collect(),
        })
        .collect())
}

/// A tiny RGB8 buffer type so this crate does not depend on an image library.
pub mod image_buf {
    /// Interleaved RGB8 pixels, row-major.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Rgb8 {
        /// Width in pixels.
        pub width: u32,
        /// Height in pixels.
        pub height: u32,
        /// `width * height * 3` bytes.
        pub data: Vec<u8>,
    }
}

#[cfg(test)]
mod macs_tests {
    #[test]
    fn vq16_decoder_macs() {
        // Hand count for VQ-16 at 24 × 24, by resolution: 24² 23.48 G (conv_in, mid, level 0,
        // first upsample conv at 48²), 48² + 96² 15.25 G, 96² + 192² 54.36 G, 192² + 384²
        // 61.0 G, level 4 at 384² 130.46 G, conv_out 0.51 G: 285.06 G in all.
        let m = super::VqConfig::vq_16().decoder_macs(24, 24);
        assert!((285_000_000_000..285_100_000_000).contains(&m), "{m}");
    }
}
