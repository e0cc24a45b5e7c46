//! PNG/JPEG encoding of generated images and previews.

use crate::error::{EngineError, Result};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

/// PNG bytes of an RGB8 buffer.
pub(crate) fn png(width: u32, height: u32, data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(data, width, height, ExtendedColorType::Rgb8)
        .map_err(|e| EngineError::Internal(format!("PNG encoding: {e}")))?;
    Ok(out)
}

/// JPEG bytes of an RGB8 buffer.
pub(crate) fn jpeg(width: u32, height: u32, data: &[u8], quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, quality)
        .write_image(data, width, height, ExtendedColorType::Rgb8)
        .map_err(|e| EngineError::Internal(format!("JPEG encoding: {e}")))?;
    Ok(out)
}
