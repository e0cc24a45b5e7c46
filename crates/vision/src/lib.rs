//! The understanding encoder of Janus-Pro: SigLIP-L/16-384 in timm's layout, and the MLP aligner.
//!
//! Follows `janus/models/siglip_vit.py` as `CLIPVisionTower(select_layer=-1)` builds it: patch
//! embedding + learned positions (no class token), all blocks, then the final LayerNorm (eps 1e-6);
//! the attention-pool head in the checkpoint is never run. Attention uses the fused `qkv` weight in
//! `[q | k | v]` row order; the MLP uses exact (erf) GELU.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
pub use janus_imageproc as preprocess;
use janus_llm::Linear;

/// Shape of a SigLIP tower (the `params` of `vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Input side in pixels (384).
    pub image_size: usize,
    /// Patch side in pixels (16).
    pub patch_size: usize,
    /// Embedding width (1024 for -L).
    pub width: usize,
    /// Transformer blocks (24 for -L).
    pub layers: usize,
    /// Attention heads (16 for -L).
    pub heads: usize,
    /// MLP hidden width is `int(width * mlp_ratio)`.
    pub mlp_ratio: f64,
}

impl VisionConfig {
    /// `siglip_large_patch16_384`, the tower every Janus-Pro checkpoint names.
    pub fn siglip_large_patch16_384() -> Self {
        Self {
            image_size: 384,
            patch_size: 16,
            width: 1024,
            layers: 24,
            heads: 16,
            mlp_ratio: 4.0,
        }
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image (576 for 384/16).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    fn mlp_hidden(&self) -> usize {
        (self.width as f64 * self.mlp_ratio) as usize
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    /// Attention's products rounded to bf16 on the CPU (as the linear layers' are).
    bf16_products: bool,
}

impl Block {
    fn load(
        vb: VarBuilder,
        cfg: &VisionConfig,
        dtype: DType,
        bf16_products: bool,
        compact: bool,
    ) -> Result<Self> {
        let w = cfg.width;
        // The tower only multiplies many rows (patches) at a time: on the CPU the weights are
        // packed once for the GEMM, in place of the tensors (`compact`: only where packing
        // takes no more memory than the stored weight).
        let lin = |name: &str, i: usize, o: usize| -> Result<Linear> {
            let l = Linear::load(vb.pp(name), i, o, true)?.with_bf16_products(bf16_products);
            if compact {
                l.prepack_if_no_larger()
            } else {
                l.prepack()
            }
        };
        Ok(Self {
            norm1: layer_norm(vb.pp("norm1"), w, dtype)?,
            qkv: lin("attn.qkv", w, 3 * w)?,
            proj: lin("attn.proj", w, w)?,
            norm2: layer_norm(vb.pp("norm2"), w, dtype)?,
            fc1: lin("mlp.fc1", w, cfg.mlp_hidden())?,
            fc2: lin("mlp.fc2", cfg.mlp_hidden(), w)?,
            heads: cfg.heads,
            bf16_products,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = x.dim(2)?;
        let hd = w / self.heads;
        let h = self.norm1.forward(x)?;
        let y = janus_llm::attention::fused_qkv_attention(
            &self.qkv.forward(&h)?,
            self.heads,
            1.0 / (hd as f64).sqrt(),
            self.bf16_products,
        )?;
        // Residual adds accumulate into the products and GELU runs on fc1's finished tiles on
        // the CPU GEMM path (separate passes elsewhere).
        let x = self.proj.forward_residual(&y, x)?;
        let h = self.norm2.forward(&x)?;
        self.fc2.forward_residual(&self.fc1.forward_gelu(&h)?, &x)
    }
}

fn layer_norm(vb: VarBuilder, size: usize, dtype: DType) -> Result<LayerNorm> {
    let weight = vb.get(size, "weight")?.to_dtype(dtype)?;
    let bias = vb.get(size, "bias")?.to_dtype(dtype)?;
    Ok(LayerNorm::new(weight, bias, 1e-6))
}

/// The vision tower: pixels `[b, 3, S, S]` in [-1, 1] → features `[b, patches, width]`.
#[derive(Debug, Clone)]
pub struct VisionTower {
    patch_embed: Linear,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    cfg: VisionConfig,
    /// Activation dtype inside the tower.
    dtype: DType,
    /// dtype of the features `finish` returns (the requested compute dtype).
    out_dtype: DType,
    span: tracing::Span,
}

impl VisionTower {
    /// Loads from `vb` at `vision_model.vision_tower`; `dtype` is the compute dtype.
    ///
    /// bf16 on the CPU keeps activations, LayerNorm, GELU and attention in f32 and rounds the
    /// operands of the large matmuls to bf16 (products accumulated in f32, `vdpbf16ps` on
    /// AVX512-BF16); the features come out in bf16 as on other devices.
    pub fn load(vb: VarBuilder, cfg: &VisionConfig, dtype: DType) -> Result<Self> {
        Self::load_with(vb, cfg, dtype, false)
    }

    /// [`VisionTower::load`]; `compact` keeps the blocks' weights in their stored dtype where
    /// packing them for the GEMM would take more memory (bf16 weights under f32 products: the
    /// GEMM then packs them per product, half the bytes held), as `--weight-dtype q8|q4` asks.
    pub fn load_with(
        vb: VarBuilder,
        cfg: &VisionConfig,
        dtype: DType,
        compact: bool,
    ) -> Result<Self> {
        let out_dtype = dtype;
        let cpu_bf16 = dtype == DType::BF16 && vb.device().is_cpu();
        let dtype = if cpu_bf16 { DType::F32 } else { dtype };
        let (w, p) = (cfg.width, cfg.patch_size);
        if cfg.heads == 0 || w % cfg.heads != 0 || p == 0 || !cfg.image_size.is_multiple_of(p) {
            candle_core::bail!("invalid vision tower shape {cfg:?}");
        }
        // The stride-p conv equals a matmul over flattened (c, ky, kx) patches.
        let conv_w = vb.get((w, 3, p, p), "patch_embed.proj.weight")?;
        let conv_b = vb.get(w, "patch_embed.proj.bias")?.to_dtype(DType::F32)?;
        let patch_embed = Linear::new(conv_w.reshape((w, 3 * p * p))?, Some(conv_b))
            .with_bf16_products(cpu_bf16)
            .prepack()?;
        let pos_embed = vb
            .get((1, cfg.num_patches(), w), "pos_embed")?
            .to_dtype(dtype)?
            .squeeze(0)?;
        let blocks = (0..cfg.layers)
            .map(|i| Block::load(vb.pp(format!("blocks.{i}")), cfg, dtype, cpu_bf16, compact))
            .collect::<Result<Vec<_>>>()?;
        let norm = layer_norm(vb.pp("norm"), w, dtype)?;
        Ok(Self {
            patch_embed,
            pos_embed,
            blocks,
            norm,
            cfg: cfg.clone(),
            dtype,
            out_dtype,
            span: tracing::span!(tracing::Level::TRACE, "vision_tower"),
        })
    }

    /// The tower's shape.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Features after the final LayerNorm for a batch of normalised images.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let x = self.embed(pixels)?;
        let x = self.blocks(&x, 0..self.blocks.len())?;
        self.finish(&x)
    }

    /// Transformer blocks of the tower (a scheduler can run them a few at a time).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Multiply-adds of one block for one image, counted on its matmuls (attention included):
    /// what a scheduler weighs a block against LLM tokens with.
    pub fn block_macs(&self) -> usize {
        let (n, w) = (self.cfg.num_patches(), self.cfg.width);
        n * (4 * w * w + 2 * w * self.cfg.mlp_hidden()) + 2 * n * n * w
    }

    /// Patch embedding plus position embedding: the input of block 0 `[b, patches, width]`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let (s, p, g) = (self.cfg.image_size, self.cfg.patch_size, self.cfg.grid());
        if c != 3 || h != s || w != s {
            candle_core::bail!(
                "vision tower expects [b, 3, {s}, {s}], got {:?}",
                pixels.shape()
            );
        }
        // [b,3,g,p,g,p] → [b,g,g,3,p,p]: patches in raster order, each flattened as (c, ky, kx).
        let patches = pixels
            .to_dtype(self.dtype)?
            .reshape((b, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, 3 * p * p))?;
        self.patch_embed
            .forward(&patches)?
            .broadcast_add(&self.pos_embed)
    }

    /// Runs blocks `range` on `x`.
    pub fn blocks(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.blocks[range] {
            x = block.forward(&x)?;
        }
        Ok(x)
    }

    /// The final LayerNorm after the last block.
    pub fn finish(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)?.to_dtype(self.out_dtype)
    }
}

/// `MlpProjector` with `projector_type = "mlp_gelu"`: Linear, then (GELU, Linear) × (depth − 1).
/// Janus uses it as the understanding aligner and as the generation aligner.
#[derive(Debug, Clone)]
pub struct MlpAligner {
    layers: Vec<Linear>,
}

impl MlpAligner {
    /// Loads `layers.0`, `layers.2`, … under `vb` (odd indices are the parameter-free GELUs).
    pub fn load(vb: VarBuilder, input_dim: usize, n_embed: usize, depth: usize) -> Result<Self> {
        if depth == 0 {
            candle_core::bail!("aligner depth must be at least 1");
        }
        let mut layers = vec![Linear::load(vb.pp("layers.0"), input_dim, n_embed, true)?];
        for i in 1..depth {
            layers.push(Linear::load(
                vb.pp(format!("layers.{}", 2 * i)),
                n_embed,
                n_embed,
                true,
            )?);
        }
        Ok(Self { layers })
    }

    /// Projects `[.., input_dim]` to `[.., n_embed]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Each layer but the last is followed by GELU (fused into the product where it can be).
        let last = self.layers.len() - 1;
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = if i < last {
                l.forward_gelu(&h)?
            } else {
                l.forward(&h)?
            };
        }
        Ok(h)
    }
}

/// Converts preprocessed RGB8 images (already `image_size` square) to normalised pixels
/// `[b, 3, S, S]` on `device`: `(v / 255 − 0.5) / 0.5` as the reference processor computes it.
pub fn pixels_from_rgb(images: &[image::RgbImage], device: &candle_core::Device) -> Result<Tensor> {
    let mut data = Vec::new();
    let mut side = 0;
    for img in images {
        side = img.width() as usize;
        data.extend(preprocess::to_chw(img, [0.5; 3], [0.5; 3]));
    }
    Tensor::from_vec(data, (images.len(), 3, side, side), device)
}
