//! `decode_rgb` against Pillow's `Image.open(..).convert("RGB")` for every PNG colour type and
//! bit depth (bit exact) and common JPEG layouts (different decoders: measured, bounded).
//! Fixtures come from tests/fixtures/gen_modes.py.

use janus_imageproc::{decode_rgb, ImageLimits};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/modes");

fn decode(path: &str) -> image::RgbImage {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    decode_rgb(&bytes, &ImageLimits::default()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (max, mean) absolute difference between our decode of `name` and Pillow's.
fn compare(name: &str, ext: &str) -> (u8, f64) {
    let ours = decode(&format!("{DIR}/{name}.{ext}"));
    let pil = decode(&format!("{DIR}/{name}.rgb.png"));
    assert_eq!(ours.dimensions(), pil.dimensions(), "{name}");
    let diffs: Vec<u8> = ours
        .as_raw()
        .iter()
        .zip(pil.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
    (max, mean)
}

/// Fixture names (without extension) of the inputs with extension `ext`.
fn inputs(ext: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(DIR)
        .expect("modes dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| !f.ends_with(".rgb.png"))
        .filter_map(|f| f.strip_suffix(&format!(".{ext}")).map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[test]
fn png_modes_match_pillow_exactly() {
    // Every colour type and bit depth, with and without tRNS, palettes of 1 to 8 bits.
    let names = inputs("png");
    assert!(names.len() >= 21, "{names:?}");
    let failed: Vec<String> = names
        .iter()
        .filter_map(|name| {
            let (max, mean) = compare(name, "png");
            (max != 0).then(|| format!("{name}: max {max}, mean {mean:.4}"))
        })
        .collect();
    assert!(failed.is_empty(), "differ from Pillow: {failed:?}");
}

#[test]
fn jpeg_close_to_pillow() {
    // zune-jpeg and libjpeg-turbo differ in IDCT rounding and chroma upsampling.
    let names = inputs("jpg");
    assert_eq!(names.len(), 4, "{names:?}");
    for name in &names {
        let (max, mean) = compare(name, "jpg");
        println!("{name}: max abs diff {max}, mean {mean:.4} vs Pillow");
        assert!(max <= 8 && mean <= 1.0, "{name}: max {max}, mean {mean}");
    }
}
