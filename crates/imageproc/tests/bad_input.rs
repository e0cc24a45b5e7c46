//! Refusals and edge cases of `decode_rgb`, plus the `preprocess` / `to_chw` contracts.

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};
use janus_imageproc::{decode_rgb, preprocess, to_chw, ImageError, ImageLimits};

mod common;

fn wide_png() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/janus-tiny/wide.png"
    );
    std::fs::read(path).expect("wide.png")
}

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encodes");
    out.into_inner()
}

/// Deterministic bytes (64-bit LCG) so failures reproduce.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect()
}

#[test]
fn truncated_png_is_a_decode_error() {
    let png = wide_png();
    let err = decode_rgb(&png[..png.len() / 2], &ImageLimits::default()).unwrap_err();
    println!("truncated PNG: {err}");
    assert!(matches!(err, ImageError::Decode(_)), "{err:?}");
    assert!(err.to_string().contains("corrupt or truncated"));
}

#[test]
fn garbage_is_unknown_format() {
    let err = decode_rgb(&noise(4096, 7), &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::UnknownFormat), "{err:?}");
}

#[test]
fn formats_other_than_png_and_jpeg_are_unknown() {
    // GIF and BMP signatures: `image` recognises them, this crate refuses them.
    for bytes in [
        &b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"[..],
        &b"BM\x1e\x00\x00\x00\x00\x00\x00\x00\x1a\x00"[..],
    ] {
        let err = decode_rgb(bytes, &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, ImageError::UnknownFormat), "{err:?}");
    }
}

#[test]
fn empty_input_is_refused() {
    let err = decode_rgb(&[], &ImageLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Empty {
                width: 0,
                height: 0
            }
        ),
        "{err:?}"
    );
}

#[test]
fn zero_by_zero_header_is_refused() {
    // The png crate rejects a zero dimension while parsing IHDR, so this surfaces as Decode;
    // Empty is reserved for decoders that report 0 from the header.
    let err = decode_rgb(&common::png_claiming(0, 0), &ImageLimits::default()).unwrap_err();
    println!("0x0 PNG: {err:?}");
    assert!(
        matches!(err, ImageError::Decode(_) | ImageError::Empty { .. }),
        "{err:?}"
    );
    let err = decode_rgb(&common::png_claiming(0, 5), &ImageLimits::default()).unwrap_err();
    assert!(
        matches!(err, ImageError::Decode(_) | ImageError::Empty { .. }),
        "{err:?}"
    );
}

#[test]
fn too_many_bytes_is_refused_before_parsing() {
    let png = wide_png();
    let limits = ImageLimits {
        max_bytes: 1000,
        ..ImageLimits::default()
    };
    let err = decode_rgb(&png, &limits).unwrap_err();
    assert!(
        matches!(err, ImageError::TooManyBytes { bytes, limit: 1000 } if bytes == png.len()),
        "{err:?}"
    );
    assert!(err.to_string().contains(&png.len().to_string()));
}

#[test]
fn pixel_limit_is_inclusive() {
    let png = wide_png();
    let at = ImageLimits {
        max_pixels: 640 * 360,
        ..ImageLimits::default()
    };
    assert_eq!(decode_rgb(&png, &at).unwrap().dimensions(), (640, 360));
    let under = ImageLimits {
        max_pixels: 640 * 360 - 1,
        ..ImageLimits::default()
    };
    let err = decode_rgb(&png, &under).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TooManyPixels {
                width: 640,
                height: 360,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn damaged_inputs_never_panic() {
    let png = wide_png();
    let jpeg = encode(
        &RgbImage::from_fn(40, 30, |x, y| Rgb([x as u8 * 6, y as u8 * 8, 90])),
        ImageFormat::Jpeg,
    );
    let limits = ImageLimits::default();
    for source in [&png, &jpeg] {
        for cut in (0..source.len()).step_by(source.len() / 97 + 1) {
            let _ = decode_rgb(&source[..cut], &limits);
        }
        for seed in 0..64u64 {
            let mut bytes = source.clone();
            let flips = noise(16, seed);
            for pair in flips.chunks_exact(2) {
                // Spare the signature so the decoders, not the sniffer, see the damage.
                let at = 8 + (usize::from(pair[0]) * 131 + seed as usize * 977) % (bytes.len() - 8);
                bytes[at] ^= pair[1] | 1;
            }
            let _ = decode_rgb(&bytes, &limits);
        }
    }
}

#[test]
fn jpeg_round_trips() {
    let src = RgbImage::from_fn(64, 16, |x, y| Rgb([(x * 4) as u8, (y * 16) as u8, 128]));
    let img = decode_rgb(&encode(&src, ImageFormat::Jpeg), &ImageLimits::default()).unwrap();
    assert_eq!(img.dimensions(), (64, 16));
    let max = img
        .as_raw()
        .iter()
        .zip(src.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(max <= 24, "lossy but close: max diff {max}");
    let out = preprocess(&img, 384, 14, [127; 3]);
    assert_eq!(out.dimensions(), (384, 384));
    // 64x16 -> 384x96, pasted at y = 144.
    assert!(out
        .enumerate_pixels()
        .all(|(_, y, p)| (144..240).contains(&y) || p.0 == [127; 3]));
}

#[test]
fn one_pixel_jpeg_fills_the_square() {
    let src = RgbImage::from_pixel(1, 1, Rgb([200, 40, 90]));
    let img = decode_rgb(&encode(&src, ImageFormat::Jpeg), &ImageLimits::default()).unwrap();
    assert_eq!(img.dimensions(), (1, 1));
    let out = preprocess(&img, 384, 14, [127; 3]);
    assert_eq!(out.dimensions(), (384, 384));
    let p = img.get_pixel(0, 0).0;
    // Upscaling a constant keeps it constant: no padding, every pixel the decoded colour.
    assert!(out.pixels().all(|q| q.0 == p));
}

#[test]
fn png_alpha_is_dropped_not_composited() {
    let rgba = image::RgbaImage::from_pixel(3, 2, image::Rgba([10, 20, 30, 0]));
    let mut bytes = Cursor::new(Vec::new());
    rgba.write_to(&mut bytes, ImageFormat::Png).unwrap();
    let img = decode_rgb(bytes.get_ref(), &ImageLimits::default()).unwrap();
    assert!(img.pixels().all(|p| p.0 == [10, 20, 30]));
}

#[test]
fn long_strip_keeps_min_size() {
    // 1000x10: short side int(10 / 1000 * 384) = 3, raised to min_size 14.
    let src = RgbImage::from_fn(1000, 10, |x, y| Rgb([(x % 256) as u8, (y * 20) as u8, 60]));
    let out = preprocess(&src, 384, 14, [127; 3]);
    assert_eq!(out.dimensions(), (384, 384));
    let y0 = (384 - 14) / 2;
    let strip = janus_imageproc::resize_bicubic(&src, 384, 14);
    for (x, y, p) in out.enumerate_pixels() {
        if (y0..y0 + 14).contains(&y) {
            assert_eq!(p, strip.get_pixel(x, y - y0), "strip at {x},{y}");
        } else {
            assert_eq!(p.0, [127; 3], "padding at {x},{y}");
        }
    }
    // Portrait counterpart: pasted at x = (384 - 14) / 2.
    let tall = preprocess(&image::imageops::rotate90(&src), 384, 14, [127; 3]);
    for (x, _, p) in tall.enumerate_pixels() {
        if !(y0..y0 + 14).contains(&x) {
            assert_eq!(p.0, [127; 3]);
        }
    }
}

#[test]
fn to_chw_normalises_like_the_reference() {
    let img = RgbImage::from_fn(3, 1, |x, _| Rgb([[0u8, 127, 255][x as usize]; 3]));
    let chw = to_chw(&img, [0.5; 3], [0.5; 3]);
    assert_eq!(chw.len(), 9);
    let want = [-1.0f32, (127.0 / 255.0 - 0.5) / 0.5, 1.0];
    for c in 0..3 {
        for x in 0..3 {
            let got = chw[c * 3 + x];
            assert!(
                (got - want[x]).abs() < 1e-6,
                "c{c} x{x}: {got} vs {}",
                want[x]
            );
        }
    }
    // Planes are channel-major.
    let img = RgbImage::from_pixel(2, 2, Rgb([0, 255, 0]));
    let chw = to_chw(&img, [0.5; 3], [0.5; 3]);
    assert_eq!(&chw[..4], &[-1.0; 4]);
    assert_eq!(&chw[4..8], &[1.0; 4]);
    assert_eq!(&chw[8..], &[-1.0; 4]);
}
