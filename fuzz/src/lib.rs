//! Shared set-up of the fuzz targets: the vendored tiny checkpoint (loaded once per process),
//! engines over it and a few small valid images the structured inputs can pick from.
//!
//! Nothing here re-implements production logic: the targets call the services' adapters, the
//! engines' `prepare`, the pipeline's prompt code and `janus-imageproc` directly.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::OnceLock;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use janus_engine::{GenerationConfig, GenerationEngine, UnderstandingConfig, UnderstandingEngine};
use janus_pipeline::prompt::TextTokenizer;
use janus_pipeline::{GenerationModel, LoadOptions, UnderstandingModel};

/// `tests/fixtures/janus-tiny/model` of this repository.
pub fn model_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/janus-tiny/model"
    ))
}

/// An understanding engine over the tiny checkpoint with the default (production) limits.
pub fn understanding() -> &'static UnderstandingEngine {
    static E: OnceLock<UnderstandingEngine> = OnceLock::new();
    E.get_or_init(|| {
        let model = UnderstandingModel::load(&model_dir(), &LoadOptions::default())
            .expect("load the tiny understanding model");
        UnderstandingEngine::start(model, UnderstandingConfig::default())
    })
}

/// A generation engine over the tiny checkpoint with the default (production) limits.
pub fn generation() -> &'static GenerationEngine {
    static E: OnceLock<GenerationEngine> = OnceLock::new();
    E.get_or_init(|| {
        let model = GenerationModel::load(&model_dir(), &LoadOptions::default())
            .expect("load the tiny generation model");
        GenerationEngine::start(model, GenerationConfig::default())
    })
}

/// The tiny checkpoint's tokenizer: `[0]` the default (message text is plain text), `[1]` the
/// reference behaviour (`--special-tokens-in-text`: special-token strings in text are special).
pub fn tokenizers() -> &'static [TextTokenizer; 2] {
    static T: OnceLock<[TextTokenizer; 2]> = OnceLock::new();
    T.get_or_init(|| {
        let plain = TextTokenizer::from_dir(&model_dir()).expect("load the tiny tokenizer");
        let mut special = plain.clone();
        special.set_special_tokens_in_text(true);
        [plain, special]
    })
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode a seed image");
    out.into_inner()
}

/// Small valid PNGs and JPEGs (several colour types and aspect ratios).
pub fn seed_images() -> &'static [Vec<u8>] {
    static S: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        let rgb = |w, h| {
            RgbImage::from_fn(w, h, |x, y| {
                Rgb([(x * 37) as u8, (y * 91) as u8, (x ^ y) as u8])
            })
        };
        vec![
            encode(DynamicImage::ImageRgb8(rgb(5, 3)), ImageFormat::Png),
            encode(DynamicImage::ImageRgb8(rgb(2, 9)), ImageFormat::Jpeg),
            encode(
                DynamicImage::ImageRgb8(rgb(16, 16)).grayscale(),
                ImageFormat::Png,
            ),
            encode(
                DynamicImage::ImageRgba16(DynamicImage::ImageRgb8(rgb(3, 4)).to_rgba16()),
                ImageFormat::Png,
            ),
            encode(
                DynamicImage::ImageLuma16(DynamicImage::ImageRgb8(rgb(7, 1)).to_luma16()),
                ImageFormat::Png,
            ),
            encode(DynamicImage::ImageRgb8(rgb(1, 1)), ImageFormat::Jpeg),
        ]
    })
}
