//! Cheap previews of partially generated images: one colour per image token.
//!
//! The VQ decoder costs seconds per image on a CPU; a preview every token row would cost more
//! than the generation itself. A preview instead paints each generated token's 16×16 patch with
//! a colour predicted from its codebook vector by a linear map (8 codebook dimensions + bias →
//! RGB), fitted by least squares on images the real decoder produced: one calibration decode
//! of a seeded random 12×12 grid, then every finished image. Tokens not generated yet are grey.
//! Rendering is a table lookup per token: microseconds, whatever the model size.

use janus_vq::image_buf::Rgb8;

/// Ridge term keeping the normal equations well posed before many images were seen.
const RIDGE: f64 = 1e-3;

/// The linear map from codebook vectors to patch colours and its running least-squares fit.
#[derive(Debug, Clone)]
pub struct PreviewPalette {
    dim: usize,
    /// Codebook vectors, `dim` floats per code.
    codebook: Vec<f32>,
    /// Σ xxᵀ over observed patches (x = codebook vector plus a constant 1).
    xtx: Vec<f64>,
    /// Σ x·rgbᵀ.
    xty: Vec<f64>,
    observed: usize,
    /// RGB of every code under the current fit.
    colours: Vec<[u8; 3]>,
}

impl PreviewPalette {
    /// A palette for `codebook` (`codes × dim`, row-major); grey until something is observed.
    pub fn new(codebook: Vec<f32>, dim: usize) -> Self {
        let codes = codebook.len() / dim.max(1);
        let d1 = dim + 1;
        Self {
            dim,
            codebook,
            xtx: vec![0.0; d1 * d1],
            xty: vec![0.0; d1 * 3],
            observed: 0,
            colours: vec![[128, 128, 128]; codes],
        }
    }

    /// Images observed so far.
    pub fn observed(&self) -> usize {
        self.observed
    }

    /// Colour of `code` under the current fit.
    pub fn colour(&self, code: u32) -> [u8; 3] {
        self.colours
            .get(code as usize)
            .copied()
            .unwrap_or([128, 128, 128])
    }

    /// Adds a decoded image and the square grid of codes it came from to the fit, then
    /// recomputes every code's colour.
    pub fn observe(&mut self, codes: &[u32], image: &Rgb8) {
        let side = (codes.len() as f64).sqrt() as usize;
        if side == 0 || side * side != codes.len() || !(image.width as usize).is_multiple_of(side) {
            return;
        }
        let patch = image.width as usize / side;
        let d1 = self.dim + 1;
        let mut x = vec![0f64; d1];
        for (i, &code) in codes.iter().enumerate() {
            let Some(v) = self
                .codebook
                .get(code as usize * self.dim..(code as usize + 1) * self.dim)
            else {
                continue;
            };
            for (xi, &vi) in x.iter_mut().zip(v) {
                *xi = vi as f64;
            }
            x[self.dim] = 1.0;
            let mean = patch_mean(image, (i % side) * patch, (i / side) * patch, patch);
            for (a, &xa) in x.iter().enumerate() {
                for (b, &xb) in x.iter().enumerate() {
                    self.xtx[a * d1 + b] += xa * xb;
                }
                for (c, &m) in mean.iter().enumerate() {
                    self.xty[a * 3 + c] += xa * m;
                }
            }
        }
        self.observed += 1;
        self.refit();
    }

    fn refit(&mut self) {
        let d1 = self.dim + 1;
        let mut a = self.xtx.clone();
        for i in 0..d1 {
            a[i * d1 + i] += RIDGE;
        }
        let Some(w) = solve(a, self.xty.clone(), d1, 3) else {
            return;
        };
        for (code, out) in self.colours.iter_mut().enumerate() {
            let v = &self.codebook[code * self.dim..(code + 1) * self.dim];
            for (c, o) in out.iter_mut().enumerate() {
                let mut acc = w[self.dim * 3 + c];
                for (k, &vk) in v.iter().enumerate() {
                    acc += vk as f64 * w[k * 3 + c];
                }
                *o = acc.round().clamp(0.0, 255.0) as u8;
            }
        }
    }

    /// A `size`×`size` RGB preview of a partial grid: `tokens` in raster order (fewer than
    /// `side²` while generating), one patch per token, the rest grey.
    pub fn render(&self, tokens: &[u32], side: usize, size: u32) -> Rgb8 {
        let size = size.max(1) as usize;
        let mut data = vec![128u8; size * size * 3];
        for y in 0..size {
            let gy = y * side / size;
            for x in 0..size {
                let gx = x * side / size;
                if let Some(&code) = tokens.get(gy * side + gx) {
                    let c = self.colour(code);
                    data[(y * size + x) * 3..(y * size + x) * 3 + 3].copy_from_slice(&c);
                }
            }
        }
        Rgb8 {
            width: size as u32,
            height: size as u32,
            data,
        }
    }
}

/// Mean RGB (0–255) of the `patch`×`patch` square at (`x0`, `y0`).
fn patch_mean(img: &Rgb8, x0: usize, y0: usize, patch: usize) -> [f64; 3] {
    let w = img.width as usize;
    let mut sum = [0f64; 3];
    for y in y0..y0 + patch {
        for x in x0..x0 + patch {
            let p = (y * w + x) * 3;
            for (c, acc) in sum.iter_mut().enumerate() {
                *acc += img.data.get(p + c).copied().unwrap_or(0) as f64;
            }
        }
    }
    let n = (patch * patch).max(1) as f64;
    sum.map(|s| s / n)
}

/// Solves `A X = B` (`A` n×n, `B` n×m, row-major) by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize, m: usize) -> Option<Vec<f64>> {
    for col in 0..n {
        let piv =
            (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))?;
        if a[piv * n + col].abs() < 1e-12 {
            return None;
        }
        for k in 0..n {
            a.swap(col * n + k, piv * n + k);
        }
        for k in 0..m {
            b.swap(col * m + k, piv * m + k);
        }
        for row in 0..n {
            if row == col {
                continue;
            }
            let f = a[row * n + col] / a[col * n + col];
            if f == 0.0 {
                continue;
            }
            for k in col..n {
                a[row * n + k] -= f * a[col * n + k];
            }
            for k in 0..m {
                b[row * m + k] -= f * b[col * m + k];
            }
        }
    }
    for row in 0..n {
        let d = a[row * n + row];
        for k in 0..m {
            b[row * m + k] /= d;
        }
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Patches whose colour is an exact linear function of the code vector are recovered.
    #[test]
    fn fit_recovers_a_linear_colour_map() {
        let dim = 2;
        // 6 codes on a 2-d codebook; colour = (100 + 50·v0, 20 + 80·v1, 200 − 30·v0 − 30·v1).
        let codebook: Vec<f32> = vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.2, 0.3, 0.9];
        let colour = |c: usize| {
            let (v0, v1) = (codebook[2 * c] as f64, codebook[2 * c + 1] as f64);
            [
                100.0 + 50.0 * v0,
                20.0 + 80.0 * v1,
                200.0 - 30.0 * v0 - 30.0 * v1,
            ]
        };
        let codes: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 0, 3, 5];
        let (side, patch) = (3usize, 4usize);
        let w = side * patch;
        let mut data = vec![0u8; w * w * 3];
        for (i, &code) in codes.iter().enumerate() {
            let c = colour(code as usize).map(|v| v.round() as u8);
            for y in 0..patch {
                for x in 0..patch {
                    let p = (((i / side) * patch + y) * w + (i % side) * patch + x) * 3;
                    data[p..p + 3].copy_from_slice(&c);
                }
            }
        }
        let img = Rgb8 {
            width: w as u32,
            height: w as u32,
            data,
        };
        let mut p = PreviewPalette::new(codebook.clone(), dim);
        assert_eq!(p.colour(3), [128, 128, 128], "grey before any image");
        p.observe(&codes, &img);
        for code in 0..6u32 {
            let want = colour(code as usize);
            let got = p.colour(code);
            for c in 0..3 {
                assert!(
                    (got[c] as f64 - want[c]).abs() <= 1.5,
                    "code {code}: {got:?} vs {want:?}"
                );
            }
        }
        // A partial grid: generated tokens painted, the rest grey.
        let r = p.render(&[3], 3, 6);
        assert_eq!(&r.data[0..3], &p.colour(3));
        assert_eq!(&r.data[r.data.len() - 3..], &[128, 128, 128]);
    }
}
