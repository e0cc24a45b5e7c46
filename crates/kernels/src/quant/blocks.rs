//! The block formats, element by element: quantizing a weight row, dequantizing it, the row
//! layout the kernels read, and the activation rows' 8-bit blocks the decode products multiply
//! against.
//!
//! Both weight formats are GGUF's (`ggml-common.h`), so their bytes load into candle's
//! `QTensor` on CUDA and a GGUF writer needs only a header:
//! - `Q8_0`: 32 weights as `d: f16, q: [i8; 32]`, value `d·q` (34 bytes, 8.5 bits a weight);
//! - `Q4_1`: 32 weights as `d: f16, m: f16, qs: [u8; 16]`, value `d·q + m`, with `q[i]` the
//!   low nibble of `qs[i]` and `q[i + 16]` its high nibble (20 bytes, 5 bits a weight).
//!
//! In memory a row keeps the same bytes with its fields gathered ("split"): every block's `d`
//! (then, for `Q4_1`, every `m`), then every block's quants. The kernels then convert eight
//! scales with one instruction and load two `Q4_1` blocks' quants with one, instead of
//! picking fields out of 34- or 20-byte records. `Q8_0`'s quants are held offset by 128 (`q ^
//! 0x80`, i.e. `q + 128` as a u8), so AVX-512 VNNI multiplies them as the unsigned operand of
//! `vpdpbusd` with no sign handling (the `128·Σx` the offset adds is taken off once per row
//! from [`QRows`]' block sums).
//! A row whose length is not a multiple of 32 is padded with zeros to whole blocks.

use half::f16;

/// Weights per block (both formats).
pub const QK: usize = 32;

/// Bytes of one `Q8_0` block.
pub(crate) const Q8_0_BYTES: usize = 2 + QK;
/// Bytes of one `Q4_1` block.
pub(crate) const Q4_1_BYTES: usize = 4 + QK / 2;

/// The value at `i` of a row of `k`, or 0 past its end (the padding of the last block).
#[inline(always)]
fn at(row: &[f32], i: usize) -> f32 {
    row.get(i).copied().unwrap_or(0.0)
}

/// Writes `row` (f32, `k` values) as GGUF `Q8_0` blocks into `out` (`⌈k/32⌉ · 34` bytes), as
/// ggml's `quantize_row_q8_0_ref`: `d = max|x| / 127`, `q = round(x / d)`.
fn quantize_row_q8_0_gguf(row: &[f32], out: &mut [u8]) {
    for (b, blk) in out.chunks_exact_mut(Q8_0_BYTES).enumerate() {
        let xs = |i: usize| at(row, b * QK + i);
        let amax = (0..QK).map(|i| xs(i).abs()).fold(0f32, f32::max);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        blk[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for i in 0..QK {
            blk[2 + i] = ((xs(i) * id).round() as i8) as u8;
        }
    }
}

/// Writes `row` as GGUF `Q4_1` blocks into `out` (`⌈k/32⌉ · 20` bytes), as ggml's
/// `quantize_row_q4_1_ref`: `m = min x`, `d = (max x − m) / 15`, `q = ⌊(x − m) / d + ½⌋ ≤ 15`.
fn quantize_row_q4_1_gguf(row: &[f32], out: &mut [u8]) {
    for (b, blk) in out.chunks_exact_mut(Q4_1_BYTES).enumerate() {
        let xs = |i: usize| at(row, b * QK + i);
        let (mut lo, mut hi) = (f32::MAX, f32::MIN);
        for i in 0..QK {
            lo = lo.min(xs(i));
            hi = hi.max(xs(i));
        }
        let d = (hi - lo) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        blk[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(lo).to_le_bytes());
        let q = |i: usize| (((xs(i) - lo) * id + 0.5) as u8).min(15);
        for i in 0..QK / 2 {
            blk[4 + i] = q(i) | (q(i + QK / 2) << 4);
        }
    }
}

/// The f16 at the start of `b`.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Quantizes `row` into one split `Q8_0` row (`out`: `⌈k/32⌉ · 34` bytes).
pub(crate) fn quantize_row_q8_0(row: &[f32], out: &mut [u8]) {
    let mut gguf = vec![0u8; out.len()];
    quantize_row_q8_0_gguf(row, &mut gguf);
    split_row(Q8_0_BYTES, 2, Q8_0_FLIP, &gguf, out);
}

/// Quantizes `row` into one split `Q4_1` row (`out`: `⌈k/32⌉ · 20` bytes).
pub(crate) fn quantize_row_q4_1(row: &[f32], out: &mut [u8]) {
    let mut gguf = vec![0u8; out.len()];
    quantize_row_q4_1_gguf(row, &mut gguf);
    split_row(Q4_1_BYTES, 4, 0, &gguf, out);
}

/// What `Q8_0`'s quants are XORed with in memory: `q + 128` as a u8 (see the module doc).
pub(crate) const Q8_0_FLIP: u8 = 0x80;

/// One row of GGUF blocks of `block` bytes, whose first `head` bytes are f16 fields, as the
/// split row: each f16 field of every block (in field order), then every block's quants, each
/// XORed with `flip`.
pub(crate) fn split_row(block: usize, head: usize, flip: u8, gguf: &[u8], out: &mut [u8]) {
    let nb = gguf.len() / block;
    let quants = block - head;
    for (b, blk) in gguf.chunks_exact(block).enumerate() {
        for f in 0..head / 2 {
            out[f * 2 * nb + 2 * b..][..2].copy_from_slice(&blk[2 * f..2 * f + 2]);
        }
        let dst = &mut out[head * nb + b * quants..][..quants];
        for (d, &q) in dst.iter_mut().zip(&blk[head..]) {
            *d = q ^ flip;
        }
    }
}

/// The inverse of [`split_row`].
pub(crate) fn join_row(block: usize, head: usize, flip: u8, split: &[u8], out: &mut [u8]) {
    let nb = split.len() / block;
    let quants = block - head;
    for (b, blk) in out.chunks_exact_mut(block).enumerate() {
        for f in 0..head / 2 {
            blk[2 * f..2 * f + 2].copy_from_slice(&split[f * 2 * nb + 2 * b..][..2]);
        }
        let src = &split[head * nb + b * quants..][..quants];
        for (d, &q) in blk[head..].iter_mut().zip(src) {
            *d = q ^ flip;
        }
    }
}

/// The f16 field `f` of block `b` in a split row of `nb` blocks.
#[inline(always)]
pub(crate) fn field(row: &[u8], nb: usize, f: usize, b: usize) -> f32 {
    f16_at(&row[f * 2 * nb + 2 * b..])
}

/// Dequantizes one split `Q8_0` row into `out` (its `k` values; padding dropped).
pub(crate) fn dequantize_row_q8_0(row: &[u8], out: &mut [f32]) {
    let nb = row.len() / Q8_0_BYTES;
    let mut vals = [0f32; QK];
    for b in 0..nb {
        let d = field(row, nb, 0, b);
        let qs = &row[2 * nb + b * QK..][..QK];
        // Fixed-size loops the compiler vectorises.
        for (v, &q) in vals.iter_mut().zip(qs) {
            *v = d * ((q ^ Q8_0_FLIP) as i8) as f32;
        }
        let dst = &mut out[b * QK..];
        let n = dst.len().min(QK);
        dst[..n].copy_from_slice(&vals[..n]);
    }
}

/// Dequantizes one split `Q4_1` row into `out` (its `k` values; padding dropped).
pub(crate) fn dequantize_row_q4_1(row: &[u8], out: &mut [f32]) {
    let nb = row.len() / Q4_1_BYTES;
    let mut vals = [0f32; QK];
    for b in 0..nb {
        let (d, m) = (field(row, nb, 0, b), field(row, nb, 1, b));
        let qs = &row[4 * nb + b * (QK / 2)..][..QK / 2];
        let (lo, hi) = vals.split_at_mut(QK / 2);
        for ((l, h), &byte) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
            *l = d * (byte & 15) as f32 + m;
            *h = d * (byte >> 4) as f32 + m;
        }
        let dst = &mut out[b * QK..];
        let n = dst.len().min(QK);
        dst[..n].copy_from_slice(&vals[..n]);
    }
}

/// Activation rows as 8-bit blocks (ggml's `Q8_1` without its packing): per row and block of
/// 32, `d = max|x| / 127`, `q = x / d` rounded (ties to even), and `s = d · Σq` (the block's
/// sum, for the `m` term of `Q4_1` and the offset of `Q8_0`'s quants). Rows are padded with
/// zeros to whole blocks.
#[derive(Debug, Default)]
pub(crate) struct QRows {
    /// `m × nb · 32` quantized values.
    pub(crate) q: Vec<i8>,
    /// `m × nb` scales.
    pub(crate) d: Vec<f32>,
    /// `m × nb` block sums.
    pub(crate) s: Vec<f32>,
    /// Blocks per row.
    pub(crate) nb: usize,
}

impl QRows {
    /// Quantizes the `m` rows of `k` values in `x`.
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> Self {
        let nb = k.div_ceil(QK);
        let mut r = QRows {
            q: vec![0; m * nb * QK],
            d: vec![0.0; m * nb],
            s: vec![0.0; m * nb],
            nb,
        };
        for row in 0..m {
            let (o, bo) = (row * nb * QK, row * nb);
            quantize_x_row(
                &x[row * k..(row + 1) * k],
                &mut r.q[o..o + nb * QK],
                &mut r.d[bo..bo + nb],
                &mut r.s[bo..bo + nb],
            );
        }
        r
    }

    /// Row `r`'s values, scales and sums.
    pub(crate) fn row(&self, r: usize) -> Row<'_> {
        let nb = self.nb;
        Row {
            q: &self.q[r * nb * QK..(r + 1) * nb * QK],
            d: &self.d[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
        }
    }
}

/// One activation row as 8-bit blocks: `d = max|x| / 127`, `q = x / d` rounded to nearest
/// (ties to even), `s = d · Σq`; a short last block is padded with zeros.
#[inline(always)]
fn quantize_x_row_body(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let mut pad = [0f32; QK];
    for (b, ((qb, db), sb)) in q.chunks_exact_mut(QK).zip(d).zip(s).enumerate() {
        let xb: &[f32] = match x.get(b * QK..(b + 1) * QK) {
            Some(full) => full,
            None => {
                let rest = &x[b * QK..];
                pad[..rest.len()].copy_from_slice(rest);
                pad[rest.len()..].fill(0.0);
                &pad
            }
        };
        // A plain comparison vectorises; f32::max's NaN rule does not.
        let amax = xb
            .iter()
            .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        let dv = amax / 127.0;
        let id = if dv != 0.0 { 1.0 / dv } else { 0.0 };
        // |x·id| ≤ 127: adding and taking away 1.5·2²³ rounds to the nearest integer, ties to
        // even, in two vector instructions (no `roundf` call per value).
        const ROUND: f32 = 12_582_912.0;
        let mut sum = 0i32;
        for (v, &xv) in qb.iter_mut().zip(xb) {
            let qi = ((xv * id + ROUND) - ROUND) as i32;
            *v = qi as i8;
            sum += qi;
        }
        *db = dv;
        *sb = dv * sum as f32;
    }
}

crate::cpu::multiversion!(
    /// [`quantize_x_row_body`] compiled for the best SIMD level of this CPU.
    fn quantize_x_row(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) => quantize_x_row_body
);

/// One quantized activation row (see [`QRows`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Row<'a> {
    pub(crate) q: &'a [i8],
    pub(crate) d: &'a [f32],
    pub(crate) s: &'a [f32],
}
