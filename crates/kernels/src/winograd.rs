//! 3×3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2×2, 3×3) (Lavin &
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2015), on the packed GEMM.
//!
//! Each 2×2 block of output pixels (a *tile*) comes from the 4×4 input patch around it. With
//! the patch transformed as `V = Bᵀ d B` and each filter as `U = G g Gᵀ` (both 4×4), the output
//! tile is `Aᵀ (Σ_ci U ⊙ V) A`. Summing over input channels is, for each of the 16 positions
//! `ξ` of the 4×4 transform, one matrix product `M_ξ [cout × tiles] = U_ξ [cout × cin] ·
//! V_ξ [cin × tiles]`: 16·cout·cin multiplies per tile of 4 pixels, against 36·cout·cin for the
//! direct convolution (2.25× fewer). The transforms are additions only (`Bᵀ`, `Aᵀ` hold 0 and
//! ±1), so the results differ from the direct convolution by rounding alone.
//!
//! Blocking: tiles are processed a band of tile rows at a time (about a hundred tiles), so a band's
//! `V` and `M` (16 × channels × tiles) stay in L2 between the input transform, the 16 products
//! and the output transform. Bands run in parallel, each on one thread. The weights are
//! transformed and packed for the GEMM once ([`Winograd3x3::new`]).

use crate::cpu::multiversion;
use crate::gemm::{gemm_packed, BRef, GemmError, GemmOpts, MatRef, PackedA, Precision};
use crate::sync::{with_f32_scratch, SendPtr};
use rayon::prelude::*;

/// Tiles per band, roughly (at least one tile row): a band's V and M stay in L2. Measured on
/// the VQ decoder (2 Zen 4 cores): 96 beat 192, 384 and 768 in bf16 and tied in f32.
const BAND_TILES: usize = 96;

/// A 3×3 convolution's weights, transformed for F(2×2, 3×3) and packed.
#[derive(Clone, Debug)]
pub struct Winograd3x3 {
    cout: usize,
    cin: usize,
    precision: Precision,
    /// `U_ξ` (`[cout, cin]`) for ξ = 4·a + b, packed as GEMM left operands.
    u: Vec<PackedA>,
}

impl Winograd3x3 {
    /// Transforms `weight` (`[cout, cin, 3, 3]` row-major, as PyTorch stores a Conv2d weight)
    /// and packs it for products in `precision`.
    pub fn new(
        weight: &[f32],
        cout: usize,
        cin: usize,
        precision: Precision,
    ) -> Result<Self, GemmError> {
        if weight.len() != cout * cin * 9 {
            return Err(GemmError(format!(
                "winograd: weight has {} elements, [{cout}, {cin}, 3, 3] needs {}",
                weight.len(),
                cout * cin * 9
            )));
        }
        // U = G g Gᵀ with G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]], in f64.
        const G: [[f64; 3]; 4] = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0],
        ];
        let mut u = vec![vec![0f32; cout * cin]; 16];
        for (oc, filters) in weight.chunks_exact(cin * 9).enumerate() {
            for (ic, g) in filters.chunks_exact(9).enumerate() {
                // t = G g (4 × 3), then U = t Gᵀ (4 × 4).
                let mut t = [[0f64; 3]; 4];
                for (a, ga) in G.iter().enumerate() {
                    for (col, tv) in t[a].iter_mut().enumerate() {
                        *tv = (0..3).map(|r| ga[r] * g[r * 3 + col] as f64).sum();
                    }
                }
                for a in 0..4 {
                    for (b, gb) in G.iter().enumerate() {
                        let v: f64 = (0..3).map(|col| t[a][col] * gb[col]).sum();
                        u[a * 4 + b][oc * cin + ic] = v as f32;
                    }
                }
            }
        }
        let u = u
            .iter()
            .map(|m| PackedA::new(MatRef::row_major(m, cout, cin), precision))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cout,
            cin,
            precision,
            u,
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.cout
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.cin
    }

    /// `out[co, y, x] (+)= bias[co] + Σ_ci,ky,kx W[co, ci, ky, kx] · img[ci, y + ky − 1, x + kx − 1]`
    /// for one `[cin, h, w]` image into `[cout, h, w]` (`accumulate`: added to what `out` holds,
    /// a fused skip connection). Errors (nothing written) on wrong lengths.
    pub fn forward(
        &self,
        img: &[f32],
        h: usize,
        w: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        accumulate: bool,
    ) -> Result<(), GemmError> {
        let (cin, cout) = (self.cin, self.cout);
        if img.len() != cin * h * w || out.len() != cout * h * w {
            return Err(GemmError(format!(
                "winograd: image of {} and output of {} elements do not fit [{cin}, {h}, {w}] → \
                 [{cout}, {h}, {w}]",
                img.len(),
                out.len()
            )));
        }
        if bias.is_some_and(|b| b.len() != cout) {
            return Err(GemmError(format!(
                "winograd: bias must have {cout} elements"
            )));
        }
        if h == 0 || w == 0 || cout == 0 {
            return Ok(());
        }
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let threads = rayon::current_num_threads().max(1);
        // Band height in tile rows: about BAND_TILES tiles, and at least two bands per thread
        // when the image allows.
        let rb = (BAND_TILES / tw)
            .max(1)
            .min(th.div_ceil(2 * threads).max(1));
        let bands = th.div_ceil(rb);
        // Few bands (small images): bands one after another, each product across the pool.
        let parallel_bands = bands >= 2 * threads;
        let op = SendPtr::new(out);
        let opts = GemmOpts {
            precision: self.precision,
            serial: parallel_bands,
            ..Default::default()
        };
        let run_band = |bi: usize| -> Result<(), GemmError> {
            let ty0 = bi * rb;
            let rows = rb.min(th - ty0);
            let nt = rows * tw;
            // V and M are written whole before they are read (the transform, the products).
            with_f32_scratch(16 * cin * nt, |v| {
                with_f32_scratch(16 * cout * nt, |m| {
                    input_transform(img, cin, h, w, ty0, rows, v);
                    for xi in 0..16 {
                        let vx = &v[xi * cin * nt..(xi + 1) * cin * nt];
                        gemm_packed(
                            &self.u[xi],
                            BRef::F32(MatRef::row_major(vx, cin, nt)),
                            &mut m[xi * cout * nt..(xi + 1) * cout * nt],
                            nt,
                            &opts,
                        )?;
                    }
                    // SAFETY: this band writes only output rows 2·ty0 .. 2·(ty0 + rows) of
                    // each channel, which no other band touches; `out` outlives the loop.
                    let out = unsafe { op.slice() };
                    output_transform(m, cout, h, w, ty0, rows, bias, accumulate, out);
                    Ok(())
                })
            })
        };
        if parallel_bands {
            (0..bands).into_par_iter().try_for_each(run_band)?;
        } else {
            (0..bands).try_for_each(run_band)?;
        }
        Ok(())
    }
}

/// `V_ξ[ci][r·tw + tx]` for tile rows `ty0 .. ty0 + rows` of every channel, `v` laid out
/// `[16][cin][rows·tw]`.
fn input_transform(
    img: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    ty0: usize,
    rows: usize,
    v: &mut [f32],
) {
    let tw = w.div_ceil(2);
    let nt = rows * tw;
    // Even and odd columns of the zero-padded input row (x = −1 .. 2·tw), and the
    // horizontally transformed rows of the 4×4 patches.
    let mut even = vec![0f32; tw + 1];
    let mut odd = vec![0f32; tw + 1];
    let mut hrow = vec![0f32; 16 * tw];
    for ci in 0..cin {
        let plane = &img[ci * h * w..(ci + 1) * h * w];
        for r in 0..rows {
            let ty = ty0 + r;
            for i in 0..4 {
                // Input row y = 2·ty − 1 + i (zero outside the image).
                let y = (2 * ty + i).checked_sub(1).filter(|&y| y < h);
                match y {
                    Some(y) => split_row(&plane[y * w..(y + 1) * w], &mut even, &mut odd),
                    None => {
                        even.fill(0.0);
                        odd.fill(0.0);
                    }
                }
                let (h0, rest) = hrow[i * 4 * tw..(i + 1) * 4 * tw].split_at_mut(tw);
                let (h1, rest) = rest.split_at_mut(tw);
                let (h2, h3) = rest.split_at_mut(tw);
                // Patch columns d0..d3 of tile tx are x[2tx − 1 ..= 2tx + 2] = even[tx],
                // odd[tx], even[tx + 1], odd[tx + 1].
                let d = [&even[..tw], &odd[..tw], &even[1..], &odd[1..]];
                bt(d, [h0, h1, h2, h3]);
            }
            // Vertical Bᵀ over the four transformed rows, for each horizontal index b.
            for b in 0..4 {
                let d = |i: usize| &hrow[(i * 4 + b) * tw..(i * 4 + b + 1) * tw];
                let off = r * tw;
                let at = |a: usize| ((a * 4 + b) * cin + ci) * nt + off;
                let (p0, p1, p2, p3) = (at(0), at(1), at(2), at(3));
                // Four disjoint rows of v (distinct ξ).
                let [v0, v1, v2, v3] = four_mut(v, [p0, p1, p2, p3], tw);
                bt([d(0), d(1), d(2), d(3)], [v0, v1, v2, v3]);
            }
        }
    }
}

/// Four disjoint `len`-long windows of `v` starting at `at` (increasing offsets).
fn four_mut(v: &mut [f32], at: [usize; 4], len: usize) -> [&mut [f32]; 4] {
    debug_assert!(at.windows(2).all(|p| p[0] + len <= p[1]));
    let (_, rest) = v.split_at_mut(at[0]);
    let (a, rest) = rest.split_at_mut(at[1] - at[0]);
    let (b, rest) = rest.split_at_mut(at[2] - at[1]);
    let (c, d) = rest.split_at_mut(at[3] - at[2]);
    [&mut a[..len], &mut b[..len], &mut c[..len], &mut d[..len]]
}

/// `even[j] = x[2j − 1]`, `odd[j] = x[2j]` for the row `x` padded with zeros (x = −1 and past
/// its end).
fn split_row(row: &[f32], even: &mut [f32], odd: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::level() == crate::cpu::Level::Avx512 {
        // SAFETY: the level was detected on this CPU (avx512f).
        let done = unsafe { split_interior_512(row, even, odd) };
        split_row_rest(row, even, odd, done);
        return;
    }
    split_row_rest(row, even, odd, 0);
}

/// Interior pairs `(x[2j − 1], x[2j])`, j = 1 ..= [`interior`], for which both lie in the row.
fn interior(w: usize, n: usize) -> usize {
    (w.saturating_sub(1) / 2).min(n.saturating_sub(1))
}

/// The interior of [`split_row`], 16 pairs at a time by two-source permutes; returns how many
/// interior pairs it did.
///
/// # Safety
/// The CPU has avx512f.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn split_interior_512(row: &[f32], even: &mut [f32], odd: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let inner = interior(row.len(), even.len().min(odd.len()));
    let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let mut j = 0;
    while j + 16 <= inner {
        // Pairs j + 1 .. j + 17 read x[2j + 1 .. 2j + 33), inside the row (2·inner < w).
        let src = &row[1 + 2 * j..1 + 2 * j + 32];
        let (e, o) = (&mut even[1 + j..1 + j + 16], &mut odd[1 + j..1 + j + 16]);
        // SAFETY: `src` holds 32 floats, `e` and `o` 16 each.
        unsafe {
            let a = _mm512_loadu_ps(src.as_ptr());
            let b = _mm512_loadu_ps(src.as_ptr().add(16));
            _mm512_storeu_ps(e.as_mut_ptr(), _mm512_permutex2var_ps(a, ie, b));
            _mm512_storeu_ps(o.as_mut_ptr(), _mm512_permutex2var_ps(a, io, b));
        }
        j += 16;
    }
    j
}

/// [`split_row`] past the first `done` interior pairs, and its edges.
#[inline(always)]
fn split_row_rest_body(row: &[f32], even: &mut [f32], odd: &mut [f32], done: usize) {
    let w = row.len();
    let n = even.len().min(odd.len());
    let inner = interior(w, n);
    for (p, (e, o)) in row[1 + 2 * done..]
        .chunks_exact(2)
        .take(inner - done)
        .zip(even[1 + done..].iter_mut().zip(odd[1 + done..].iter_mut()))
    {
        *e = p[0];
        *o = p[1];
    }
    // The edges: j = 0 and j past the interior.
    for j in std::iter::once(0).chain(inner + 1..n).filter(|&j| j < n) {
        even[j] = if j >= 1 && 2 * j - 1 < w {
            row[2 * j - 1]
        } else {
            0.0
        };
        odd[j] = if 2 * j < w { row[2 * j] } else { 0.0 };
    }
}
multiversion!(fn split_row_rest(row: &[f32], even: &mut [f32], odd: &mut [f32], done: usize) => split_row_rest_body);

/// `Bᵀ` over four rows of values, elementwise: `v = (d0 − d2, d1 + d2, d2 − d1, d1 − d3)`.
/// Used across a patch (its four columns, per tile) and down it (its four transformed rows).
#[inline(always)]
fn bt_body(d: [&[f32]; 4], v: [&mut [f32]; 4]) {
    let [v0, v1, v2, v3] = v;
    let n = v0.len();
    let (d0, d1, d2, d3) = (&d[0][..n], &d[1][..n], &d[2][..n], &d[3][..n]);
    let (v1, v2, v3) = (&mut v1[..n], &mut v2[..n], &mut v3[..n]);
    for t in 0..n {
        v0[t] = d0[t] - d2[t];
        v1[t] = d1[t] + d2[t];
        v2[t] = d2[t] - d1[t];
        v3[t] = d1[t] - d3[t];
    }
}
multiversion!(fn bt(d: [&[f32]; 4], v: [&mut [f32]; 4]) => bt_body);

/// Output rows `2·ty0 .. 2·(ty0 + rows)` (within `h`) of every channel from `m` (laid out
/// `[16][cout][rows·tw]`): `Aᵀ M A` with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`, plus bias.
#[allow(clippy::too_many_arguments)]
fn output_transform(
    m: &[f32],
    cout: usize,
    h: usize,
    w: usize,
    ty0: usize,
    rows: usize,
    bias: Option<&[f32]>,
    accumulate: bool,
    out: &mut [f32],
) {
    let tw = w.div_ceil(2);
    let nt = rows * tw;
    let mut s = vec![0f32; 8 * tw];
    let mut y = vec![0f32; 4 * tw];
    for co in 0..cout {
        let bv = bias.map_or(0.0, |b| b[co]);
        for r in 0..rows {
            let off = r * tw;
            let mrow = |xi: usize| &m[(xi * cout + co) * nt + off..][..tw];
            // Horizontal Aᵀ for each patch row a: s[a][0] = m0 + m1 + m2, s[a][1] = m1 − m2 − m3.
            for a in 0..4 {
                let (s0, s1) = s[a * 2 * tw..(a + 1) * 2 * tw].split_at_mut(tw);
                at_pair(
                    mrow(a * 4),
                    mrow(a * 4 + 1),
                    mrow(a * 4 + 2),
                    mrow(a * 4 + 3),
                    s0,
                    s1,
                );
            }
            // Vertical Aᵀ: y[p][q] from s[0..4][q].
            for q in 0..2 {
                let sr = |a: usize| &s[(a * 2 + q) * tw..(a * 2 + q + 1) * tw];
                let (ya, yb) = y[q * 2 * tw..(q + 1) * 2 * tw].split_at_mut(tw);
                at_pair(sr(0), sr(1), sr(2), sr(3), ya, yb);
            }
            // y[q][p] now holds output (row 2ty + p, column 2tx + q); interleave columns.
            let ty = ty0 + r;
            for p in 0..2 {
                let oy = 2 * ty + p;
                if oy >= h {
                    continue;
                }
                let orow = &mut out[(co * h + oy) * w..(co * h + oy + 1) * w];
                let y0 = &y[p * tw..(p + 1) * tw];
                let y1 = &y[2 * tw + p * tw..2 * tw + (p + 1) * tw];
                interleave(y0, y1, bv, accumulate, orow);
            }
        }
    }
}

#[inline(always)]
fn at_pair_body(m0: &[f32], m1: &[f32], m2: &[f32], m3: &[f32], s0: &mut [f32], s1: &mut [f32]) {
    let n = s0.len();
    let (m0, m1, m2, m3, s1) = (&m0[..n], &m1[..n], &m2[..n], &m3[..n], &mut s1[..n]);
    for t in 0..n {
        s0[t] = m0[t] + m1[t] + m2[t];
        s1[t] = m1[t] - m2[t] - m3[t];
    }
}
multiversion!(fn at_pair(m0: &[f32], m1: &[f32], m2: &[f32], m3: &[f32], s0: &mut [f32], s1: &mut [f32]) => at_pair_body);

/// `row[2t] (+)= a[t] + bias`, `row[2t + 1] (+)= b[t] + bias`, within the row's length.
fn interleave(a: &[f32], b: &[f32], bias: f32, accumulate: bool, row: &mut [f32]) {
    let w = row.len();
    let full = w / 2;
    let (pairs, tail) = row.split_at_mut(full * 2);
    for (t, o) in pairs.chunks_exact_mut(2).enumerate() {
        if accumulate {
            o[0] += a[t] + bias;
            o[1] += b[t] + bias;
        } else {
            o[0] = a[t] + bias;
            o[1] = b[t] + bias;
        }
    }
    if let Some(o) = tail.first_mut() {
        let base = if accumulate { *o } else { 0.0 };
        *o = base + a[full] + bias;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| crate::test_util::lcg(&mut s)).collect()
    }

    /// Direct convolution in f64.
    fn reference(
        img: &[f32],
        wt: &[f32],
        bias: &[f32],
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; cout * h * w];
        for co in 0..cout {
            for y in 0..h {
                for x in 0..w {
                    let mut acc = bias[co] as f64;
                    for ci in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (sy, sx) = (y as isize + ky - 1, x as isize + kx - 1);
                                if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                    continue;
                                }
                                acc += wt[((co * cin + ci) * 3 + ky as usize) * 3 + kx as usize]
                                    as f64
                                    * img[(ci * h + sy as usize) * w + sx as usize] as f64;
                            }
                        }
                    }
                    out[(co * h + y) * w + x] = acc;
                }
            }
        }
        out
    }

    fn check(cin: usize, cout: usize, h: usize, w: usize, seed: u64) {
        let img = lcg(cin * h * w, seed);
        let wt = lcg(cout * cin * 9, seed + 1);
        let bias = lcg(cout, seed + 2);
        let want = reference(&img, &wt, &bias, cin, cout, h, w);
        let conv = Winograd3x3::new(&wt, cout, cin, Precision::F32).unwrap();
        let mut out = vec![f32::NAN; cout * h * w];
        conv.forward(&img, h, w, Some(&bias), &mut out, false)
            .unwrap();
        let scale = (cin * 9) as f64;
        for (i, (&o, &r)) in out.iter().zip(&want).enumerate() {
            assert!(
                (o as f64 - r).abs() <= 1e-5 * scale.sqrt() + 1e-5 * r.abs(),
                "[{cin}→{cout}, {h}×{w}] at {i}: {o} vs {r}"
            );
        }
        // Accumulating into a residual.
        let res = lcg(cout * h * w, seed + 3);
        let mut acc = res.clone();
        conv.forward(&img, h, w, Some(&bias), &mut acc, true)
            .unwrap();
        for ((&o, &r), &x) in acc.iter().zip(&want).zip(&res) {
            assert!((o as f64 - (r + x as f64)).abs() <= 1e-5 * scale.sqrt() + 1e-5 * r.abs());
        }
        // bf16 products: within bf16's rounding of the operands.
        let conv = Winograd3x3::new(&wt, cout, cin, Precision::Bf16).unwrap();
        conv.forward(&img, h, w, Some(&bias), &mut out, false)
            .unwrap();
        for (&o, &r) in out.iter().zip(&want) {
            assert!(
                (o as f64 - r).abs() <= 2e-2 * scale.sqrt(),
                "bf16: {o} vs {r}"
            );
        }
    }

    #[test]
    fn equals_direct_convolution() {
        // Odd and even sizes, one tile and many, bands of several rows, channels past one
        // panel of the GEMM.
        check(1, 1, 1, 1, 1);
        check(3, 5, 2, 2, 2);
        check(4, 7, 5, 3, 3);
        check(5, 13, 9, 33, 4);
        check(16, 24, 40, 70, 5);
        check(33, 17, 17, 130, 6);
    }

    #[test]
    fn row_split_on_every_level_agrees() {
        for w in [1usize, 2, 3, 4, 31, 32, 33, 34, 35, 64, 65, 97, 130] {
            let row = lcg(w, w as u64);
            let n = w.div_ceil(2) + 1;
            let (mut e0, mut o0) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            split_row(&row, &mut e0, &mut o0);
            // The portable body alone, and the plain definition.
            let (mut e1, mut o1) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            split_row_rest_body(&row, &mut e1, &mut o1, 0);
            let x = |i: isize| {
                if i >= 0 && (i as usize) < w {
                    row[i as usize]
                } else {
                    0.0
                }
            };
            for j in 0..n {
                let want = (x(2 * j as isize - 1), x(2 * j as isize));
                assert_eq!((e0[j], o0[j]), want, "w {w}, j {j}");
                assert_eq!((e1[j], o1[j]), want, "w {w}, j {j}");
            }
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        assert!(Winograd3x3::new(&[0.0; 17], 2, 1, Precision::F32).is_err());
        let conv = Winograd3x3::new(&[0.0; 18], 2, 1, Precision::F32).unwrap();
        let mut out = vec![0f32; 2 * 16];
        assert!(conv
            .forward(&[0.0; 15], 4, 4, None, &mut out, false)
            .is_err());
        assert!(conv
            .forward(&[0.0; 16], 4, 4, Some(&[0.0; 3]), &mut out, false)
            .is_err());
        assert!(conv
            .forward(&[0.0; 16], 4, 4, None, &mut out[..31], false)
            .is_err());
    }
}
