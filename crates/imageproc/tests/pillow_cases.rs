//! Exactness against Pillow 13 beyond the golden fixtures: hashes of `Image.resize(.., BICUBIC)`
//! and of the Janus preprocess for sizes covering every pass order, single passes, upscaling,
//! 1-pixel sides and extreme ratios. Regenerate with tests/fixtures/gen_pillow_cases.py.

use image::{Rgb, RgbImage};
use janus_imageproc::{preprocess, resize_bicubic};
use serde_json::Value;

/// Same noise as `pattern` in gen_pillow_cases.py.
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let px = |c: u32| {
            let v = x.wrapping_mul(73856093) ^ y.wrapping_mul(19349663) ^ c.wrapping_mul(83492791);
            (v.wrapping_mul(2654435761) >> 24) as u8
        };
        Rgb([px(0), px(1), px(2)])
    })
}

fn fnv1a64(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn cases() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pillow_cases.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("cases file")).expect("cases parse")
}

fn pair(v: &Value) -> (u32, u32) {
    (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32)
}

#[test]
fn resize_matches_pillow() {
    let cases = cases();
    let list = cases["resize"].as_array().unwrap();
    assert!(list.len() >= 60);
    let mut failed = Vec::new();
    for case in list {
        let ((w, h), (ow, oh)) = (pair(&case["in"]), pair(&case["out"]));
        let out = resize_bicubic(&pattern(w, h), ow, oh);
        assert_eq!(out.dimensions(), (ow, oh));
        if fnv1a64(out.as_raw()) != case["fnv1a64"].as_str().unwrap() {
            failed.push(format!("{w}x{h} -> {ow}x{oh}"));
        }
    }
    println!(
        "{} resize cases checked against Pillow {}",
        list.len(),
        cases["pillow"]
    );
    assert!(failed.is_empty(), "differ from Pillow: {failed:?}");
}

#[test]
fn preprocess_matches_janus_reference() {
    let cases = cases();
    let list = cases["preprocess"].as_array().unwrap();
    let mut failed = Vec::new();
    for case in list {
        let (w, h) = pair(&case["in"]);
        let out = preprocess(&pattern(w, h), 384, 14, [127; 3]);
        assert_eq!(out.dimensions(), (384, 384));
        if fnv1a64(out.as_raw()) != case["fnv1a64"].as_str().unwrap() {
            failed.push(format!("{w}x{h}"));
        }
    }
    assert!(failed.is_empty(), "differ from the reference: {failed:?}");
}
