//! Image bytes as the understanding service handles them: `decode_rgb` with the production
//! limits (format sniffing, JPEG completeness, header size checks before decoding, decoder
//! allocation limits), then `preprocess` to the 384×384 square and `to_chw` normalisation,
//! exactly as `UnderstandingModel::prepare` and its vision input do.
//!
//! Must never panic; every refusal must be a typed `ImageError`; memory must stay bounded
//! (run with `-rss_limit_mb=2048 -malloc_limit_mb=2048`, see scripts/fuzz.sh).
#![no_main]

use janus_imageproc::{decode_rgb, preprocess, to_chw, ImageError, ImageLimits};
use janus_pipeline::config::PreprocessorConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = ImageLimits::default();
    match decode_rgb(data, &limits) {
        Ok(img) => {
            let (w, h) = img.dimensions();
            assert!(w > 0 && h > 0, "decoded an empty image {w}x{h}");
            assert!(
                u64::from(w) * u64::from(h) <= limits.max_pixels,
                "decoded {w}x{h}, over the pixel limit"
            );
            let pre = PreprocessorConfig::default();
            let square = preprocess(&img, pre.image_size, pre.min_size, pre.background_color);
            assert_eq!(square.dimensions(), (pre.image_size, pre.image_size));
            let chw = to_chw(&square, pre.image_mean, pre.image_std);
            let side = pre.image_size as usize;
            assert_eq!(chw.len(), 3 * side * side);
            assert!(
                chw.iter().all(|v| (-1.0..=1.0).contains(v)),
                "normalised pixel outside [-1, 1]"
            );
        }
        Err(e) => {
            // Typed refusals only, each consistent with what it claims.
            match &e {
                ImageError::TooManyBytes { bytes, limit } => assert!(bytes > limit),
                ImageError::TooManyPixels {
                    width,
                    height,
                    limit,
                } => assert!(u64::from(*width) * u64::from(*height) > *limit),
                ImageError::Empty { width, height } => {
                    assert!(data.is_empty() || *width == 0 || *height == 0)
                }
                ImageError::UnknownFormat | ImageError::Decode(_) => {}
            }
            assert!(!e.to_string().is_empty());
        }
    }
});
