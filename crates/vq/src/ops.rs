//! Convolution and GroupNorm for the decoder, faster than candle's generic CPU versions at the
//! decoder's shapes (128–512 channels at up to 384×384).
//!
//! * 3×3 convolutions: candle materialises the whole im2col matrix (680 MB at 384² × 128 ch) and
//!   multiplies it with an output only 128 wide. Here the input is cut into bands of output rows,
//!   each band's im2col is built from 9 shifted views (it stays small) and multiplied as
//!   `W [cout, cin·9] × cols [cin·9, pixels]`, which writes the NCHW output band directly.
//! * GroupNorm: candle composes it from ~8 tensor passes; on the CPU this is one statistics pass
//!   and one normalise(+SiLU) pass per group, groups in parallel.

use candle_core::{DType, Device, Module, Result, Tensor};
use rayon::prelude::*;

/// Output pixels per band: keeps a band's im2col (`cin·9 × pixels` floats) around 50 MB at most.
const BAND_PIXELS: usize = 12 * 1024;

/// A 3×3, stride-1, padding-1 convolution with bias.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    /// `[cout, cin·9]`, rows in (c, ky, kx) order as the checkpoint's `[cout, cin, 3, 3]`.
    weight: Tensor,
    bias: Tensor,
    /// candle's convolution, used off the CPU.
    generic: candle_nn::Conv2d,
}

impl Conv3x3 {
    /// Wraps a `[cout, cin, 3, 3]` weight and `[cout]` bias (f32).
    pub fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("Conv3x3 needs a 3×3 kernel, got {kh}×{kw}");
        }
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let generic = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg);
        Ok(Self {
            weight: weight.reshape((cout, cin * 9))?,
            bias: bias.reshape((cout, 1))?,
            generic,
        })
    }
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
            return self.generic.forward(x);
        }
        let (n, c, h, w) = x.dims4()?;
        let cout = self.weight.dim(0)?;
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let data = match &*storage {
            candle_core::Storage::Cpu(s) => &s.as_slice::<f32>()?[layout.start_offset()..],
            _ => candle_core::bail!("CPU storage expected"),
        };
        let band_rows = (BAND_PIXELS / w.max(1)).clamp(1, h);
        let mut images = Vec::with_capacity(n);
        for i in 0..n {
            let img = &data[i * c * h * w..(i + 1) * c * h * w];
            let mut bands = Vec::new();
            let mut y0 = 0;
            while y0 < h {
                let rows = band_rows.min(h - y0);
                let mut cols = vec![0f32; c * 9 * rows * w];
                im2col_band(img, c, h, w, y0, rows, &mut cols);
                let cols = Tensor::from_vec(cols, (c * 9, rows * w), &Device::Cpu)?;
                let out = self.weight.matmul(&cols)?.broadcast_add(&self.bias)?;
                bands.push(out.reshape((cout, rows, w))?);
                y0 += rows;
            }
            images.push(Tensor::cat(&bands, 1)?);
        }
        Tensor::stack(&images, 0)
    }
}

/// im2col of output rows `y0..y0 + rows` for a 3×3, padding-1 convolution of one `[c, h, w]`
/// image: `cols[(ci·9 + ky·3 + kx), r·w + x] = img[ci, y0 + r + ky − 1, x + kx − 1]` (0 outside).
/// Every destination row is a shifted copy of a source row, so this runs at memcpy speed.
fn im2col_band(
    img: &[f32],
    c: usize,
    h: usize,
    w: usize,
    y0: usize,
    rows: usize,
    cols: &mut [f32],
) {
    let plane = h * w;
    let band = rows * w;
    cols.par_chunks_mut(9 * band)
        .enumerate()
        .take(c)
        .for_each(|(ci, chunk)| {
            let src_plane = &img[ci * plane..(ci + 1) * plane];
            for ky in 0..3 {
                for kx in 0..3 {
                    let dst = &mut chunk[(ky * 3 + kx) * band..(ky * 3 + kx + 1) * band];
                    for r in 0..rows {
                        let d = &mut dst[r * w..(r + 1) * w];
                        let sy = (y0 + r + ky) as isize - 1;
                        if sy < 0 || sy >= h as isize {
                            d.fill(0.0);
                            continue;
                        }
                        let s = &src_plane[sy as usize * w..(sy as usize + 1) * w];
                        match kx {
                            0 => {
                                d[0] = 0.0;
                                d[1..].copy_from_slice(&s[..w - 1]);
                            }
                            1 => d.copy_from_slice(s),
                            _ => {
                                d[..w - 1].copy_from_slice(&s[1..]);
                                d[w - 1] = 0.0;
                            }
                        }
                    }
                }
            }
        });
}

/// `GroupNorm(groups, eps)` with affine parameters, optionally followed by SiLU.
#[derive(Debug, Clone)]
pub struct GroupNormAct {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
    generic: candle_nn::GroupNorm,
}

impl GroupNormAct {
    /// `weight`/`bias` are `[channels]` f32; `silu` appends `x · sigmoid(x)`.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64, silu: bool) -> Result<Self> {
        let c = weight.dim(0)?;
        let generic = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            silu,
            generic,
        })
    }

    /// The same normalisation without the activation.
    pub fn without_act(&self) -> Self {
        Self {
            silu: false,
            ..self.clone()
        }
    }
}

impl Module for GroupNormAct {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
            let y = self.generic.forward(x)?;
            return if self.silu {
                candle_nn::ops::silu(&y)
            } else {
                Ok(y)
            };
        }
        let (n, c, h, w) = x.dims4()?;
        let x = x.contiguous()?;
        let mut data = x.flatten_all()?.to_vec1::<f32>()?;
        let gamma = self.weight.to_vec1::<f32>()?;
        let beta = self.bias.to_vec1::<f32>()?;
        let cpg = c / self.groups;
        let group_len = cpg * h * w;
        let hw = h * w;
        let (eps, silu) = (self.eps, self.silu);
        // Groups are contiguous runs in NCHW: [n][g][c/g][h][w].
        data.par_chunks_mut(group_len)
            .enumerate()
            .for_each(|(gi, g)| {
                let (mut s, mut ss) = (0f64, 0f64);
                for &v in g.iter() {
                    s += v as f64;
                    ss += (v as f64) * (v as f64);
                }
                let len = g.len() as f64;
                let mean = s / len;
                let var = (ss / len - mean * mean).max(0.0);
                let inv = 1.0 / (var + eps).sqrt();
                let first_channel = (gi % self.groups) * cpg;
                for (ci, chan) in g.chunks_mut(hw).enumerate() {
                    let a = (gamma[first_channel + ci] as f64 * inv) as f32;
                    let b = (beta[first_channel + ci] as f64
                        - mean * gamma[first_channel + ci] as f64 * inv)
                        as f32;
                    if silu {
                        for v in chan.iter_mut() {
                            let y = *v * a + b;
                            *v = y / (1.0 + (-y).exp());
                        }
                    } else {
                        for v in chan.iter_mut() {
                            *v = *v * a + b;
                        }
                    }
                }
            });
        Tensor::from_vec(data, (n, c, h, w), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn banded_conv_equals_candle_conv() {
        let dev = Device::Cpu;
        // Width and height chosen so several bands and a partial last band occur.
        let x = Tensor::randn(0f32, 1.0, (2, 5, 37, 400), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.2, (7, 5, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.2, 7, &dev).unwrap();
        let ours = Conv3x3::new(w.clone(), b.clone())
            .unwrap()
            .forward(&x)
            .unwrap();
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let theirs = candle_nn::Conv2d::new(w, Some(b), cfg).forward(&x).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-4);
    }

    #[test]
    fn fused_group_norm_equals_candle() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (2, 64, 9, 11), &dev).unwrap() + 0.5).unwrap();
        let g = Tensor::randn(1f32, 0.3, 64, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 64, &dev).unwrap();
        let gn = GroupNormAct::new(g.clone(), b.clone(), 32, 1e-6, true).unwrap();
        let reference = candle_nn::GroupNorm::new(g, b, 64, 32, 1e-6)
            .unwrap()
            .forward(&x)
            .unwrap();
        assert!(max_diff(&gn.without_act().forward(&x).unwrap(), &reference) < 1e-4);
        let act = candle_nn::ops::silu(&reference).unwrap();
        assert!(max_diff(&gn.forward(&x).unwrap(), &act) < 1e-4);
    }
}
