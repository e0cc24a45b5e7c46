//! VQ decoding of finished grids to RGB, and the cheap previews of partial grids.

use super::preview::PreviewPalette;
use super::GenerationModel;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use janus_vq::image_buf::Rgb8;

/// True when a candle error is a VQ decode stopped by its callback.
fn is_stopped(e: &candle_core::Error) -> bool {
    match e {
        candle_core::Error::Wrapped(inner) => {
            inner.to_string() == janus_vq::DecodeStopped.to_string()
        }
        candle_core::Error::WithBacktrace { inner, .. } => is_stopped(inner),
        candle_core::Error::Context { inner, .. } => is_stopped(inner),
        _ => false,
    }
}

impl GenerationModel {
    /// Decodes complete token grids to images `[n, 3, S, S]` in nominal [-1, 1].
    pub fn decode_raw(&self, tokens: &[Vec<u32>]) -> Result<Tensor> {
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        Ok(self.vq.decode_codes(&flat, tokens.len())?)
    }

    /// Decodes complete token grids to RGB8 images.
    pub fn decode(&self, tokens: &[Vec<u32>]) -> Result<Vec<Rgb8>> {
        Ok(self
            .decode_until(tokens, &|| false)?
            .expect("a decode that is never stopped completes"))
    }

    /// Decodes complete grids, asking `stop` between decoder blocks: `None` when it stopped
    /// (a cancelled request's decode ends within one block). Every decoded image also refines
    /// the preview palette.
    pub fn decode_until(
        &self,
        tokens: &[Vec<u32>],
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Vec<Rgb8>>> {
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        let raw = match self.vq.decode_codes_until(&flat, tokens.len(), stop) {
            Ok(raw) => raw,
            Err(e) if is_stopped(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let images = janus_vq::to_rgb8(&raw)?;
        if let Ok(mut p) = self.palette()?.lock() {
            for (codes, img) in tokens.iter().zip(&images) {
                p.observe(codes, img);
            }
        }
        Ok(Some(images))
    }

    /// The preview palette, created on first use from the codebook.
    fn palette(&self) -> Result<&std::sync::Mutex<PreviewPalette>> {
        if let Some(p) = self.palette.get() {
            return Ok(p);
        }
        let cb = self.vq.codebook().to_dtype(DType::F32)?;
        let dim = cb.dim(1)?;
        let flat = cb.flatten_all()?.to_vec1::<f32>()?;
        Ok(self
            .palette
            .get_or_init(|| std::sync::Mutex::new(PreviewPalette::new(flat, dim))))
    }

    /// A cheap `size`×`size` preview of a partial grid (see `preview.rs`): no VQ decode,
    /// except one calibration decode the first time (when no image was decoded yet).
    pub fn preview(&self, tokens: &[u32], size: u32) -> Result<Rgb8> {
        let total = self.image_tokens();
        let side = (total as f64).sqrt().round() as usize;
        let calibrated = self
            .palette()?
            .lock()
            .map(|p| p.observed() > 0)
            .unwrap_or(true);
        if !calibrated {
            self.calibrate_previews()?;
        }
        let p = self
            .palette()?
            .lock()
            .map_err(|_| Error::invalid("preview", "palette lock poisoned"))?;
        Ok(p.render(tokens, side, size))
    }

    /// Fits the preview palette on one decode of a seeded random 12×12 grid (a quarter of an
    /// image's decoder work); later decodes refine it. The decode worker calls it at start.
    pub fn calibrate_previews(&self) -> Result<()> {
        let side = 12usize
            .min((self.image_tokens() as f64).sqrt() as usize)
            .max(1);
        {
            let codes = self.config.gen_head.image_token_size.max(1) as u64;
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let grid: Vec<u32> = (0..side * side)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % codes) as u32
                })
                .collect();
            self.decode(&[grid])?;
        }
        Ok(())
    }
}
