//! Reference-exact image preprocessing for Janus-Pro understanding.
//!
//! The Python reference (`VLMImageProcessor`) opens images with PIL, converts them to RGB,
//! resizes with Pillow's bicubic filter, pads to a square with a background colour, then
//! rescales and normalises in numpy. Every step here reproduces that arithmetic bit for bit
//! (fixed-point Pillow convolution included), so the vision tower sees the same pixels.

use std::borrow::Cow;
use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Rgb, RgbImage};

/// Limits applied before an image is decoded.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Largest accepted encoded input, in bytes.
    pub max_bytes: usize,
    /// Largest accepted `width * height`, read from the header before decoding.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    /// 20 MiB of encoded data and 40 megapixels.
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            max_pixels: 40_000_000,
        }
    }
}

/// Why an image was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The encoded input is larger than `ImageLimits::max_bytes`.
    #[error("image is {bytes} bytes, over the limit of {limit} bytes")]
    TooManyBytes { bytes: usize, limit: usize },
    /// The header claims more than `ImageLimits::max_pixels` pixels (checked before decoding).
    #[error("image header claims {width}x{height} pixels, over the limit of {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    /// The input is empty or the header claims a zero width or height.
    #[error("image is empty ({width}x{height})")]
    Empty { width: u32, height: u32 },
    /// The data is neither PNG nor JPEG.
    #[error("unknown image format: only PNG and JPEG are accepted")]
    UnknownFormat,
    /// The data is corrupt, truncated or uses an unsupported variant.
    #[error("corrupt or truncated image data: {0}")]
    Decode(String),
}

/// Slack on top of the output buffer for the decoders' own buffers (zlib window, rows, chunks).
const DECODER_SLACK_BYTES: u64 = 64 * 1024 * 1024;
/// Worst-case bytes per decoded pixel for PNG/JPEG (RGBA, 16 bits per channel).
const MAX_BYTES_PER_PIXEL: u64 = 8;

/// Decode PNG/JPEG bytes into RGB8 like PIL's `Image.open(..).convert("RGB")`, refusing bombs before decoding.
pub fn decode_rgb(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty {
            width: 0,
            height: 0,
        });
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            bytes: bytes.len(),
            limit: limits.max_bytes,
        });
    }

    let reader = guessed_reader(bytes)?;
    match reader.format() {
        Some(ImageFormat::Png) => {}
        // The JPEG decoder answers a truncated stream with grey filler instead of an error:
        // the stream must be whole (every segment, the scans, the end-of-image marker).
        Some(ImageFormat::Jpeg) => jpeg_is_complete(bytes).map_err(ImageError::Decode)?,
        // Formats `image` recognises but this build does not accept (GIF, WebP, ...) count as unknown.
        _ => return Err(ImageError::UnknownFormat),
    }

    // Header only: no pixel buffer is allocated, so a decompression bomb stops here.
    let (width, height) = reader.into_dimensions().map_err(decode_error)?;
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }

    // Second line of defence: the decoder itself refuses anything beyond what the header promised.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(width);
    decoder_limits.max_image_height = Some(height);
    decoder_limits.max_alloc =
        Some(u64::from(width) * u64::from(height) * MAX_BYTES_PER_PIXEL + DECODER_SLACK_BYTES);
    let mut reader = guessed_reader(bytes)?;
    reader.limits(decoder_limits);
    let decoded = reader.decode().map_err(decode_error)?;
    Ok(to_rgb8_like_pil(decoded, png_is_grey(bytes)))
}

/// Checks that a JPEG stream is structurally whole: from SOI, every marker segment fits in the
/// data, every scan's entropy-coded data is followed by a marker, and the end-of-image marker
/// (`FF D9`) is reached. Bytes after EOI are ignored (trailers some cameras append). A stream
/// cut anywhere, even right before EOI, is refused; PIL refuses such files too ("image file is
/// truncated") unless `LOAD_TRUNCATED_IMAGES` is set.
pub fn jpeg_is_complete(bytes: &[u8]) -> Result<(), String> {
    let truncated = |what: &str| {
        Err(format!(
            "truncated JPEG: the data ({} bytes) ends {what}, before the end-of-image marker",
            bytes.len()
        ))
    };
    if bytes.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err("not a JPEG stream (no start-of-image marker)".into());
    }
    let mut pos = 2;
    loop {
        // Tolerate stray bytes between segments (as libjpeg does), then fill bytes (FF FF ...).
        while pos < bytes.len() && bytes[pos] != 0xFF {
            pos += 1;
        }
        while pos < bytes.len() && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return truncated("between segments");
        };
        pos += 1;
        match marker {
            0xD9 => return Ok(()),
            // Standalone markers: restart intervals, TEM, a repeated SOI.
            0xD0..=0xD7 | 0x01 | 0xD8 => continue,
            _ => {}
        }
        let Some(len) = bytes.get(pos..pos + 2) else {
            return truncated(&format!("inside the length of marker FF{marker:02X}"));
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len < 2 {
            return Err(format!(
                "corrupt JPEG: marker FF{marker:02X} has length {len}"
            ));
        }
        if pos + len > bytes.len() {
            return truncated(&format!("inside the segment of marker FF{marker:02X}"));
        }
        pos += len;
        if marker == 0xDA {
            // Entropy-coded data: runs until a marker other than a stuffed zero or a restart.
            loop {
                match bytes.get(pos..pos + 2) {
                    None => return truncated("inside a scan's entropy-coded data"),
                    Some([0xFF, next]) if *next == 0x00 || (0xD0..=0xD7).contains(next) => pos += 2,
                    Some([0xFF, 0xFF]) => pos += 1,
                    Some([0xFF, _]) => break,
                    Some(_) => pos += 1,
                }
            }
        }
    }
}

/// Whether the PNG's IHDR (always the first chunk) declares colour type 0, greyscale without alpha.
fn png_is_grey(bytes: &[u8]) -> bool {
    bytes.get(12..16) == Some(b"IHDR") && bytes.get(25) == Some(&0)
}

fn guessed_reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ImageError> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))
}

fn decode_error(e: image::ImageError) -> ImageError {
    ImageError::Decode(e.to_string())
}

/// Mirrors PIL's mode conversions to "RGB" where they differ from `image`'s own.
///
/// `png_grey` marks a greyscale PNG, which `image` turns into grey+alpha when it has a tRNS chunk.
fn to_rgb8_like_pil(img: DynamicImage, png_grey: bool) -> RgbImage {
    // PIL keeps only the high byte of 16-bit RGB(A)/LA PNG samples ("RGB;16B" raw modes),
    // where `image` would round v / 257.
    let high = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgb16(src) => map_pixels(src.width(), src.height(), |x, y| {
            let p = src.get_pixel(x, y).0;
            [high(p[0]), high(p[1]), high(p[2])]
        }),
        DynamicImage::ImageRgba16(src) => map_pixels(src.width(), src.height(), |x, y| {
            let p = src.get_pixel(x, y).0;
            [high(p[0]), high(p[1]), high(p[2])]
        }),
        // PIL opens 16-bit grey PNGs (tRNS or not) as mode "I;16", and its conversion to RGB
        // saturates at 255 instead of scaling: any value above 255 becomes white.
        DynamicImage::ImageLuma16(src) => map_pixels(src.width(), src.height(), |x, y| {
            let v = src.get_pixel(x, y).0[0].min(255) as u8;
            [v, v, v]
        }),
        DynamicImage::ImageLumaA16(src) if png_grey => {
            map_pixels(src.width(), src.height(), |x, y| {
                let v = src.get_pixel(x, y).0[0].min(255) as u8;
                [v, v, v]
            })
        }
        DynamicImage::ImageLumaA16(src) => map_pixels(src.width(), src.height(), |x, y| {
            let v = high(src.get_pixel(x, y).0[0]);
            [v, v, v]
        }),
        // 8-bit grey is replicated and alpha dropped without compositing, exactly as PIL does.
        other => other.to_rgb8(),
    }
}

fn map_pixels(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| Rgb(f(x, y)))
}

/// Fixed-point precision of Pillow's 8-bit resampling (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Pillow's bicubic support radius at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;
/// Upper bound on taps held at once; extreme aspect ratios would otherwise need gigabytes of weights.
const MAX_TAPS_PER_CHUNK: usize = 1 << 20;

/// Pillow's bicubic kernel with a = -0.5, written in the same operation order as Resample.c.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Geometry shared by every output sample of one resampling pass (`precompute_coeffs`).
struct PassGeometry {
    in_size: usize,
    scale: f64,
    filterscale: f64,
    support: f64,
}

impl PassGeometry {
    fn new(in_size: usize, out_size: usize) -> Self {
        // Image.resize without a box passes in0 = 0 and in1 = in_size as C floats, so the
        // width goes through f32 first (exact up to 2^24, rounded beyond, as in Pillow).
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = if scale < 1.0 { 1.0 } else { scale };
        Self {
            in_size,
            scale,
            filterscale,
            support: BICUBIC_SUPPORT * filterscale,
        }
    }

    /// First input index and fixed-point weights of output sample `out`, appended to `taps`.
    fn taps(&self, out: usize, weights: &mut Vec<f64>, taps: &mut Vec<i32>) -> usize {
        let center = (out as f64 + 0.5) * self.scale;
        let ss = 1.0 / self.filterscale;
        // C `(int)` casts truncate toward zero; `as i64` does the same.
        let xmin = ((center - self.support + 0.5) as i64).max(0);
        let xmax = ((center + self.support + 0.5) as i64).min(self.in_size as i64) - xmin;

        weights.clear();
        let mut ww = 0.0;
        for x in 0..xmax.max(0) {
            let w = bicubic_filter(((x + xmin) as f64 - center + 0.5) * ss);
            weights.push(w);
            ww += w;
        }
        if ww != 0.0 {
            for w in weights.iter_mut() {
                *w /= ww;
            }
        }
        let one = f64::from(1u32 << PRECISION_BITS);
        taps.extend(weights.iter().map(|&k| {
            if k < 0.0 {
                (-0.5 + k * one) as i32
            } else {
                (0.5 + k * one) as i32
            }
        }));
        xmin as usize
    }
}

/// Fixed-point taps for a run of consecutive output samples.
struct Chunk {
    /// (first input index, offset into `taps`, tap count) per output sample.
    spans: Vec<(usize, usize, usize)>,
    taps: Vec<i32>,
}

/// Splits the outputs of one pass into chunks whose taps fit in `MAX_TAPS_PER_CHUNK`.
fn for_each_chunk(in_size: usize, out_size: usize, mut f: impl FnMut(usize, &Chunk)) {
    let geometry = PassGeometry::new(in_size, out_size);
    let mut weights = Vec::new();
    let mut chunk = Chunk {
        spans: Vec::new(),
        taps: Vec::new(),
    };
    let mut first = 0;
    for out in 0..out_size {
        let offset = chunk.taps.len();
        let start = geometry.taps(out, &mut weights, &mut chunk.taps);
        chunk.spans.push((start, offset, chunk.taps.len() - offset));
        if chunk.taps.len() >= MAX_TAPS_PER_CHUNK || out + 1 == out_size {
            f(first, &chunk);
            first = out + 1;
            chunk.spans.clear();
            chunk.taps.clear();
        }
    }
}

/// Rounds and clamps a fixed-point accumulator to u8 (Pillow's `clip8`).
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding term every accumulator starts from.
const ROUND: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over every row: `src` is `in_w` x `h`, the result `out_w` x `h`.
fn resample_horizontal(src: &[u8], in_w: usize, h: usize, out_w: usize) -> Vec<u8> {
    let mut dst = vec![0u8; out_w * h * 3];
    for_each_chunk(in_w, out_w, |first, chunk| {
        for y in 0..h {
            let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
            let out_row = &mut dst[y * out_w * 3..(y + 1) * out_w * 3];
            for (i, &(start, offset, len)) in chunk.spans.iter().enumerate() {
                let k = &chunk.taps[offset..offset + len];
                let window = &row[start * 3..(start + len) * 3];
                let mut acc = [ROUND; 3];
                for (px, &w) in window.chunks_exact(3).zip(k) {
                    acc[0] += i32::from(px[0]) * w;
                    acc[1] += i32::from(px[1]) * w;
                    acc[2] += i32::from(px[2]) * w;
                }
                let o = (first + i) * 3;
                out_row[o] = clip8(acc[0]);
                out_row[o + 1] = clip8(acc[1]);
                out_row[o + 2] = clip8(acc[2]);
            }
        }
    });
    dst
}

/// Vertical pass: `src` is `w` x `in_h`, the result `w` x `out_h`.
fn resample_vertical(src: &[u8], w: usize, in_h: usize, out_h: usize) -> Vec<u8> {
    let stride = w * 3;
    let mut dst = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for_each_chunk(in_h, out_h, |first, chunk| {
        for (i, &(start, offset, len)) in chunk.spans.iter().enumerate() {
            acc.fill(ROUND);
            // Row by row so the inner loop runs over contiguous memory; integer sums are order-free.
            for (t, &k) in chunk.taps[offset..offset + len].iter().enumerate() {
                let row = &src[(start + t) * stride..(start + t + 1) * stride];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += i32::from(v) * k;
                }
            }
            let out_row = &mut dst[(first + i) * stride..(first + i + 1) * stride];
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
    });
    dst
}

/// Pillow's (>= 13) `Image.resize((width, height), Image.BICUBIC)` on RGB, reproduced exactly (zero-filled if a side is empty).
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (width, height) {
        return img.clone();
    }
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        // Pillow raises here; returning a blank image keeps this function total.
        return RgbImage::new(width, height);
    }
    let (in_w, in_h, out_w, out_h) = (
        in_w as usize,
        in_h as usize,
        width as usize,
        height as usize,
    );

    // Each pass rounds to u8, so pass order and skipped passes change the result: a pass runs
    // only when its dimension changes, and the order follows Pillow >= 13 (PR #9549), which
    // resamples vertically first when the height shrinks by more than twice as many pixels
    // as the width. Pillow 12 and older always went horizontal first.
    let (need_h, need_v) = (out_w != in_w, out_h != in_h);
    let shrink_h = in_h as i64 - out_h as i64;
    let shrink_w = in_w as i64 - out_w as i64;
    let horizontal_first = !(shrink_h > 0 && shrink_h > shrink_w * 2);
    let src = img.as_raw().as_slice();
    // At least one pass runs: equal sizes returned above.
    let data = if horizontal_first {
        let mid = if need_h {
            Cow::Owned(resample_horizontal(src, in_w, in_h, out_w))
        } else {
            Cow::Borrowed(src)
        };
        if need_v {
            resample_vertical(&mid, out_w, in_h, out_h)
        } else {
            mid.into_owned()
        }
    } else {
        let mid = if need_v {
            Cow::Owned(resample_vertical(src, in_w, in_h, out_h))
        } else {
            Cow::Borrowed(src)
        };
        if need_h {
            resample_horizontal(&mid, in_w, out_h, out_w)
        } else {
            mid.into_owned()
        }
    };
    RgbImage::from_raw(width, height, data).expect("buffer sized width * height * 3")
}

/// Janus `VLMImageProcessor` geometry: long side to `image_size`, Pillow bicubic, centred on a `background` square.
///
/// The short side is `max(int(short / long * image_size), min_size)` as Python computes it.
/// Like `expand2square`, the canvas side is the larger resized side, which is `image_size`
/// whenever `min_size <= image_size`. An empty input yields a blank `image_size` square.
pub fn preprocess(img: &RgbImage, image_size: u32, min_size: u32, background: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return RgbImage::from_pixel(image_size, image_size, Rgb(background));
    }
    let long = f64::from(w.max(h));
    let side = f64::from(image_size);
    // Python: int(h / max_size * image_size); `as u32` truncates like int() for these non-negative values.
    let new_h = ((f64::from(h) / long * side) as u32).max(min_size);
    let new_w = ((f64::from(w) / long * side) as u32).max(min_size);
    // torchvision returns the image untouched when the size already matches.
    let resized = resize_bicubic(img, new_w, new_h);
    expand_to_square(resized, background)
}

/// Janus `expand2square`: paste at ((S - w) // 2, 0) for portrait, (0, (S - h) // 2) for landscape.
fn expand_to_square(img: RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img;
    }
    let side = w.max(h);
    let (x0, y0) = if w > h {
        (0, (side - h) / 2)
    } else {
        ((side - w) / 2, 0)
    };
    let mut canvas = RgbImage::from_pixel(side, side, Rgb(background));
    let (w, side, x0) = (w as usize, side as usize, x0 as usize);
    for (y, src_row) in img.as_raw().chunks_exact(w * 3).enumerate() {
        let start = ((y0 as usize + y) * side + x0) * 3;
        canvas.as_mut()[start..start + w * 3].copy_from_slice(src_row);
    }
    canvas
}

/// The reference rescale factor, 1/255 as a Python float.
const RESCALE_FACTOR: f64 = 0.00392156862745098;

/// CHW f32 planes of `(v * 1/255 - mean[c]) / std[c]`, rounded like the numpy reference.
///
/// transformers' `rescale` multiplies in f64 and then casts to f32; `normalize` runs in f32.
/// Doing the multiply in f32 instead differs by one ulp for about half of the 256 values.
pub fn to_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; plane * 3];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = (f64::from(px[c]) * RESCALE_FACTOR) as f32;
            out[c * plane + i] = (x - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_kernel_values() {
        assert_eq!(bicubic_filter(0.0), 1.0);
        assert_eq!(bicubic_filter(1.0), 0.0);
        assert_eq!(bicubic_filter(-2.0), 0.0);
        assert_eq!(bicubic_filter(0.5), 0.5625);
        assert_eq!(bicubic_filter(-1.5), -0.0625);
    }

    #[test]
    fn fixed_point_taps_sum_to_one() {
        for &(i, o) in &[
            (640usize, 384usize),
            (360, 216),
            (10, 384),
            (1000, 384),
            (5, 7),
        ] {
            let mut n = 0;
            for_each_chunk(i, o, |_, chunk| {
                for &(start, offset, len) in &chunk.spans {
                    assert!(start + len <= i);
                    let sum: i32 = chunk.taps[offset..offset + len].iter().sum();
                    assert!(
                        (sum - (1 << PRECISION_BITS)).abs() <= len as i32,
                        "{i}->{o}: {sum}"
                    );
                    n += 1;
                }
            });
            assert_eq!(n, o);
        }
    }

    #[test]
    fn chunking_does_not_change_taps() {
        // A very long pass is split into several chunks; each output sample must still get
        // the taps an unsplit computation would give.
        let (i, o) = (3_000_000usize, 7usize);
        let geometry = PassGeometry::new(i, o);
        let mut seen = 0;
        for_each_chunk(i, o, |first, chunk| {
            for (j, &(start, offset, len)) in chunk.spans.iter().enumerate() {
                let (mut w, mut t) = (Vec::new(), Vec::new());
                let s = geometry.taps(first + j, &mut w, &mut t);
                assert_eq!((s, &t[..]), (start, &chunk.taps[offset..offset + len]));
                seen += 1;
            }
        });
        assert_eq!(seen, o);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, Rgb([0, 128, 255]));
        for &(w, h) in &[(11, 5), (100, 60), (37, 60), (11, 23), (1, 1)] {
            let out = resize_bicubic(&img, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [0, 128, 255]), "{w}x{h}");
        }
    }

    #[test]
    fn degenerate_sizes_do_not_panic() {
        let img = RgbImage::from_pixel(4, 4, Rgb([9, 9, 9]));
        assert_eq!(resize_bicubic(&img, 0, 5).dimensions(), (0, 5));
        assert_eq!(
            resize_bicubic(&RgbImage::new(0, 0), 3, 3).dimensions(),
            (3, 3)
        );
        assert_eq!(
            preprocess(&RgbImage::new(0, 3), 8, 2, [1, 2, 3]).dimensions(),
            (8, 8)
        );
        assert_eq!(preprocess(&img, 0, 0, [1, 2, 3]).dimensions(), (0, 0));
    }

    #[test]
    fn rescale_is_f64_then_f32() {
        let img = RgbImage::from_fn(256, 1, |x, _| Rgb([x as u8; 3]));
        let chw = to_chw(&img, [0.0; 3], [1.0; 3]);
        for (v, &got) in chw[..256].iter().enumerate() {
            assert_eq!(got, (v as f64 * RESCALE_FACTOR) as f32);
        }
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 7) as u8, (y * 5) as u8, (x ^ y) as u8])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn whole_jpegs_decode() {
        let data = jpeg(40, 30);
        assert!(jpeg_is_complete(&data).is_ok());
        let rgb = decode_rgb(&data, &ImageLimits::default()).unwrap();
        assert_eq!(rgb.dimensions(), (40, 30));
        // Bytes after the end-of-image marker are ignored.
        let mut trailer = data.clone();
        trailer.extend_from_slice(b"camera trailer \xff\xd8");
        assert!(decode_rgb(&trailer, &ImageLimits::default()).is_ok());
    }

    #[test]
    fn truncated_jpegs_are_refused() {
        let data = jpeg(64, 48);
        for pct in [5usize, 10, 25, 50, 75, 90, 95, 99] {
            let cut = &data[..data.len() * pct / 100];
            let e = decode_rgb(cut, &ImageLimits::default()).unwrap_err();
            assert!(e.to_string().contains("truncated"), "{pct}%: {e}");
        }
        for drop in 1..=3 {
            let cut = &data[..data.len() - drop];
            let e = decode_rgb(cut, &ImageLimits::default()).unwrap_err();
            assert!(e.to_string().contains("truncated"), "-{drop} bytes: {e}");
        }
    }
}
