//! Parity with the Python reference: PIL open + convert("RGB") + bicubic resize + expand2square.

use janus_imageproc::{decode_rgb, preprocess, ImageLimits};
use safetensors::SafeTensors;

const SIZE: usize = 384;
const MIN_SIZE: u32 = 14;
const BACKGROUND: u8 = 127;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../tests/fixtures/janus-tiny/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// CHW u8 planes of `preprocess(decode_rgb(file))`, the layout of the golden tensors.
fn ours_chw(file: &str) -> Vec<u8> {
    let img = decode_rgb(&fixture(file), &ImageLimits::default()).expect("fixture decodes");
    let out = preprocess(&img, SIZE as u32, MIN_SIZE, [BACKGROUND; 3]);
    assert_eq!(out.dimensions(), (SIZE as u32, SIZE as u32), "{file}");
    let mut chw = vec![0u8; 3 * SIZE * SIZE];
    for (i, px) in out.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * SIZE * SIZE + i] = px[c];
        }
    }
    chw
}

/// Pad region `expand2square` leaves for a `w` x `h` source: (rows, cols) ranges of content.
fn content_box(w: u32, h: u32) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let long = w.max(h) as f64;
    let nh = ((h as f64 / long * SIZE as f64) as usize).max(MIN_SIZE as usize);
    let nw = ((w as f64 / long * SIZE as f64) as usize).max(MIN_SIZE as usize);
    if nw > nh {
        let y0 = (SIZE - nh) / 2;
        (y0..y0 + nh, 0..SIZE)
    } else {
        let x0 = (SIZE - nw) / 2;
        (0..SIZE, x0..x0 + nw)
    }
}

/// Rows (or columns) that are entirely background in a CHW image.
fn background_lines(chw: &[u8], by_row: bool) -> Vec<usize> {
    (0..SIZE)
        .filter(|&line| {
            (0..3).all(|c| {
                (0..SIZE).all(|i| {
                    let (y, x) = if by_row { (line, i) } else { (i, line) };
                    chw[c * SIZE * SIZE + y * SIZE + x] == BACKGROUND
                })
            })
        })
        .collect()
}

fn check(case: &str, index: usize, file: &str, size: (u32, u32)) {
    let bytes = fixture("golden.safetensors");
    let tensors = SafeTensors::deserialize(&bytes).expect("golden parses");
    let name = format!("{case}.preprocessed_u8");
    let view = tensors.tensor(&name).expect("golden tensor present");
    assert_eq!(view.dtype(), safetensors::Dtype::U8);
    assert_eq!(&view.shape()[1..], &[3, SIZE, SIZE]);
    let n = 3 * SIZE * SIZE;
    let golden = &view.data()[index * n..(index + 1) * n];
    let ours = ours_chw(file);

    let diffs: Vec<u32> = ours
        .iter()
        .zip(golden)
        .map(|(&a, &b)| a.abs_diff(b) as u32)
        .collect();
    let max = diffs.iter().copied().max().unwrap();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / n as f64;
    let mismatched = diffs.iter().filter(|&&d| d != 0).count();
    println!("{name}[{index}] ({file}): mean abs diff {mean:.6}, max {max}, {mismatched} of {n} values differ");
    assert!(max <= 4, "{name}[{index}]: max diff {max}");
    assert!(mean <= 0.5, "{name}[{index}]: mean diff {mean}");

    // Geometry: the reference's padding is where the formula puts it, and ours matches it exactly.
    let (rows, cols) = content_box(size.0, size.1);
    for c in 0..3 {
        for y in 0..SIZE {
            for x in 0..SIZE {
                if !rows.contains(&y) || !cols.contains(&x) {
                    let at = c * SIZE * SIZE + y * SIZE + x;
                    assert_eq!(golden[at], BACKGROUND, "golden pad at c{c} y{y} x{x}");
                    assert_eq!(ours[at], BACKGROUND, "our pad at c{c} y{y} x{x}");
                }
            }
        }
    }
    for by_row in [true, false] {
        let ours_bg = background_lines(&ours, by_row);
        for line in background_lines(golden, by_row) {
            assert!(
                ours_bg.contains(&line),
                "{name}[{index}]: golden background line {line} (rows: {by_row})"
            );
        }
    }
}

#[test]
fn und_single_wide() {
    check("und_single", 0, "wide.png", (640, 360));
}

#[test]
fn und_batch_tall() {
    check("und_batch", 0, "tall.png", (200, 500));
}

#[test]
fn und_batch_wide() {
    check("und_batch", 1, "wide.png", (640, 360));
}

#[test]
fn und_batch_square() {
    check("und_batch", 2, "square.png", (384, 384));
}

#[test]
fn vq_square() {
    check("vq", 0, "square.png", (384, 384));
}

#[test]
fn fixtures_have_expected_sizes() {
    for (file, size) in [
        ("wide.png", (640, 360)),
        ("tall.png", (200, 500)),
        ("square.png", (384, 384)),
    ] {
        let img = decode_rgb(&fixture(file), &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), size, "{file}");
    }
}
