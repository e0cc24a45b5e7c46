//! Quantized weights: 8-bit (`Q8_0`) and 4-bit (`Q4_1`) blocks of 32 along the input
//! dimension, GGUF's layouts byte for byte ([`blocks`]), and the two products on them:
//! - decode ([`linear_rows_q`], a few activation rows): the activation rows are quantized to
//!   8-bit blocks of the same 32 values, and each weight row streams once through integer dot
//!   products (AVX-512 VNNI `vpdpbusd`, [`avx512`]; AVX2 `vpmaddubsw`, [`avx2`]; portable,
//!   [`scalar`]; picked at run time) for up to four rows at a time, split across the rayon
//!   pool by output feature as `linear_rows` is;
//! - large M ([`gemm_q`], prefill): the weight is dequantized to f32 a slice of output
//!   features at a time and multiplied on the packed GEMM with A packed once, so there is one
//!   GEMM micro-kernel and the transient copy is bounded ([`DEQUANT_CHUNK_BYTES`]).
//!
//! Why these blocks: 32 weights are one 256-bit register of bytes, so a block is one load and
//! one multiply-add chain on AVX2 (and half a register on AVX-512); a scale per 32 keeps the
//! 8-bit error under 0.4 % of the block's largest weight; `Q4_1`'s minimum (asymmetric, 5 bits
//! a weight against `Q4_0`'s 4.5) measured closer to bf16 on our fixtures than symmetric 4-bit
//! blocks, and both are formats candle's CUDA `QMatMul` multiplies natively.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod blocks;
mod scalar;
#[cfg(test)]
mod tests;

pub use blocks::QK;

use crate::gemm::{self, BRef, GemmError, GemmOpts, MatRef, PackedA};
use crate::gemv::{for_each_stripe, Weights};
use crate::sync::SendPtr;
use blocks::{QRows, Row};
use rayon::prelude::*;

/// A block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QFormat {
    /// 8 bits: `d·q`, `d` f16 per 32 weights.
    Q8_0,
    /// 4 bits: `d·q + m`, `d` and `m` f16 per 32 weights.
    Q4_1,
}

impl QFormat {
    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8_0 => blocks::Q8_0_BYTES,
            QFormat::Q4_1 => blocks::Q4_1_BYTES,
        }
    }

    /// The name as checkpoints and flags spell it ("q8_0", "q4_1").
    pub fn name(self) -> &'static str {
        match self {
            QFormat::Q8_0 => "q8_0",
            QFormat::Q4_1 => "q4_1",
        }
    }

    /// The format named `name` (see [`QFormat::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [QFormat::Q8_0, QFormat::Q4_1]
            .into_iter()
            .find(|f| f.name() == name)
    }

    /// (bytes per block, bytes of its leading f16 fields, what its quants are XORed with in
    /// memory).
    fn layout(self) -> (usize, usize, u8) {
        match self {
            QFormat::Q8_0 => (blocks::Q8_0_BYTES, 2, blocks::Q8_0_FLIP),
            QFormat::Q4_1 => (blocks::Q4_1_BYTES, 4, 0),
        }
    }

    /// Bytes of a row of `k` weights (whole blocks).
    pub fn row_bytes(self, k: usize) -> usize {
        k.div_ceil(QK) * self.block_bytes()
    }
}

/// A quantized `[n, k]` weight: row `j` at `j · row_bytes(k)`, split as `blocks` describes
/// ([`QuantWeight::gguf_bytes`] gives GGUF's layout).
#[derive(Clone, Debug)]
pub struct QuantWeight {
    format: QFormat,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

/// Largest transient f32 copy [`gemm_q`] dequantizes into at a time.
pub const DEQUANT_CHUNK_BYTES: usize = 16 << 20;

impl QuantWeight {
    /// Quantizes the row-major `[n, k]` weight `w` (rows in parallel).
    pub fn quantize(w: Weights<'_>, n: usize, k: usize, format: QFormat) -> Self {
        let rb = format.row_bytes(k);
        let mut data = vec![0u8; n * rb];
        data.par_chunks_mut(rb).enumerate().for_each(|(j, out)| {
            let row: Vec<f32> = match w {
                Weights::F32(w) => w[j * k..(j + 1) * k].to_vec(),
                Weights::Bf16(w) => w[j * k..(j + 1) * k].iter().map(|v| v.to_f32()).collect(),
            };
            match format {
                QFormat::Q8_0 => blocks::quantize_row_q8_0(&row, out),
                QFormat::Q4_1 => blocks::quantize_row_q4_1(&row, out),
            }
        });
        Self { format, n, k, data }
    }

    /// A weight from its rows of GGUF blocks (as [`QuantWeight::gguf_bytes`] returns them);
    /// `None` when `gguf` does not hold `n` rows of `k`.
    pub fn from_gguf_bytes(format: QFormat, n: usize, k: usize, gguf: &[u8]) -> Option<Self> {
        let rb = format.row_bytes(k);
        if gguf.len() != n.checked_mul(rb)? {
            return None;
        }
        let (block, head, flip) = format.layout();
        let mut data = vec![0u8; gguf.len()];
        data.par_chunks_mut(rb.max(1))
            .zip(gguf.par_chunks(rb.max(1)))
            .for_each(|(out, row)| blocks::split_row(block, head, flip, row, out));
        Some(Self { format, n, k, data })
    }

    /// The rows as GGUF lays out `Q8_0` / `Q4_1` blocks (a copy).
    pub fn gguf_bytes(&self) -> Vec<u8> {
        let rb = self.format.row_bytes(self.k);
        let (block, head, flip) = self.format.layout();
        let mut out = vec![0u8; self.data.len()];
        out.par_chunks_mut(rb.max(1))
            .zip(self.data.par_chunks(rb.max(1)))
            .for_each(|(o, row)| blocks::join_row(block, head, flip, row, o));
        out
    }

    /// Bytes held.
    pub fn len_bytes(&self) -> usize {
        self.data.len()
    }

    /// The rows of several weights of the same format and `k`, stacked (e.g. q, k and v).
    pub fn stack(parts: &[QuantWeight]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.k != first.k)
        {
            return None;
        }
        let n = parts.iter().map(|p| p.n).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(Self {
            format: first.format,
            n,
            k: first.k,
            data,
        })
    }

    /// The format.
    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (columns).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Dequantizes rows `j0..j1` into `out` (`(j1 − j0) · k` values, row-major).
    pub fn dequantize_rows(&self, j0: usize, j1: usize, out: &mut [f32]) {
        let (k, rb) = (self.k, self.format.row_bytes(self.k));
        assert!(j0 <= j1 && j1 <= self.n && out.len() == (j1 - j0) * k);
        out.par_chunks_mut(k.max(1)).enumerate().for_each(|(i, o)| {
            let src = &self.data[(j0 + i) * rb..(j0 + i + 1) * rb];
            match self.format {
                QFormat::Q8_0 => blocks::dequantize_row_q8_0(src, o),
                QFormat::Q4_1 => blocks::dequantize_row_q4_1(src, o),
            }
        });
    }
}

/// A path of the decode dots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Avx512Vnni,
    Avx2,
    Scalar,
}

impl Path {
    const ALL: [Path; 3] = [Path::Avx512Vnni, Path::Avx2, Path::Scalar];

    fn name(self) -> &'static str {
        match self {
            Path::Avx512Vnni => "avx512vnni",
            Path::Avx2 => "avx2",
            Path::Scalar => "scalar",
        }
    }

    fn supported(self) -> bool {
        match self {
            Path::Avx512Vnni => crate::cpu::has_avx512vnni(),
            Path::Avx2 => crate::cpu::has_avx2_f16c(),
            Path::Scalar => true,
        }
    }

    /// The best path this CPU supports.
    fn best() -> Path {
        Path::ALL
            .into_iter()
            .find(|p| p.supported())
            .unwrap_or(Path::Scalar)
    }
}

/// Which path the decode dots take ("avx512vnni", "avx2" or "scalar").
pub fn quant_level() -> &'static str {
    Path::best().name()
}

/// The decode dots' paths this CPU runs, best first (for tests and benchmarks).
#[doc(hidden)]
pub fn quant_paths() -> Vec<&'static str> {
    Path::ALL
        .into_iter()
        .filter(|p| p.supported())
        .map(Path::name)
        .collect()
}

/// `out[r·n + j] = Σ_i x[r·k + i] · w(j, i) (+ bias[j])` for `r < m`, with `x` rounded to
/// 8-bit blocks of 32 (see the module doc). Panics on a length mismatch.
pub fn linear_rows_q(x: &[f32], m: usize, w: &QuantWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    linear_rows_q_on(quant_level(), x, m, w, bias, out);
}

/// [`linear_rows_q`] on a named path ("avx2", "scalar"), for tests and benchmarks; panics on a
/// path this CPU lacks.
#[doc(hidden)]
pub fn linear_rows_q_on(
    path: &str,
    x: &[f32],
    m: usize,
    w: &QuantWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "linear_rows_q: x.len() != m * k");
    assert_eq!(out.len(), m * n, "linear_rows_q: out.len() != m * n");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear_rows_q: bias.len() != n");
    }
    let path = Path::ALL
        .into_iter()
        .find(|p| p.name() == path)
        .unwrap_or_else(|| panic!("linear_rows_q_on: unknown path {path:?}"));
    assert!(path.supported(), "this CPU lacks the {} path", path.name());
    if m == 0 || n == 0 {
        return;
    }
    let xq = QRows::new(x, m, k);
    let rb = w.format.row_bytes(k);
    let ptr = SendPtr::new(out);
    // More than four rows: the weight rows go in chunks of ≤ CHUNK_BYTES that stay in L2
    // while each group of four activation rows (in L1) passes over them, rather than every
    // weight row pulling all m activation rows through L2.
    let jb = if m > 4 {
        (CHUNK_BYTES / rb.max(1)).max(4)
    } else {
        usize::MAX
    };
    for_each_stripe(m, n, k, |j0, j1| {
        for c0 in (j0..j1).step_by(jb) {
            let c1 = c0.saturating_add(jb).min(j1);
            let mut r0 = 0;
            while r0 < m {
                let take = (m - r0).min(4);
                for j in c0..c1 {
                    let wr = &w.data[j * rb..(j + 1) * rb];
                    let mut vals = [0f32; 4];
                    match take {
                        1 => vals[..1].copy_from_slice(&dots(path, w.format, wr, [xq.row(r0)])),
                        2 => vals[..2].copy_from_slice(&dots(
                            path,
                            w.format,
                            wr,
                            [xq.row(r0), xq.row(r0 + 1)],
                        )),
                        3 => vals[..3].copy_from_slice(&dots(
                            path,
                            w.format,
                            wr,
                            [xq.row(r0), xq.row(r0 + 1), xq.row(r0 + 2)],
                        )),
                        _ => {
                            vals = dots(
                                path,
                                w.format,
                                wr,
                                [xq.row(r0), xq.row(r0 + 1), xq.row(r0 + 2), xq.row(r0 + 3)],
                            )
                        }
                    }
                    let b = bias.map_or(0.0, |b| b[j]);
                    for (i, v) in vals[..take].iter().enumerate() {
                        // SAFETY: column j lies in this task's stripe j0..j1 and r0 + i < m, so
                        // the element is in `out` and written by this task alone (see
                        // `for_each_stripe`).
                        unsafe { *ptr.ptr().add((r0 + i) * n + j) = v + b };
                    }
                }
                r0 += take;
            }
        }
    });
}

/// Bytes of weight rows [`linear_rows_q`] keeps in L2 while the activation rows pass.
const CHUNK_BYTES: usize = 96 << 10;

/// One weight row's dots with `R` activation rows on the chosen path.
#[inline]
fn dots<const R: usize>(path: Path, format: QFormat, w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    match path {
        // SAFETY: a path is only taken when the CPU has its features (`Path::supported`,
        // checked by the callers); the rows were quantized with the weight's k, so they hold
        // its blocks.
        Path::Avx512Vnni => {
            return unsafe {
                match format {
                    QFormat::Q8_0 => avx512::dots_q8_0(w, xs),
                    QFormat::Q4_1 => avx512::dots_q4_1(w, xs),
                }
            }
        }
        // SAFETY: as above.
        Path::Avx2 => {
            return unsafe {
                match format {
                    QFormat::Q8_0 => avx2::dots_q8_0(w, xs),
                    QFormat::Q4_1 => avx2::dots_q4_1(w, xs),
                }
            }
        }
        Path::Scalar => {}
    }
    let _ = path;
    match format {
        QFormat::Q8_0 => scalar::dots_q8_0(w, xs),
        QFormat::Q4_1 => scalar::dots_q4_1(w, xs),
    }
}

/// `C[i·ldc + j] = Σ_p A(i, p) · w(j, p) (+ bias)` for the `m × k` A, as [`gemm::gemm`] with
/// B = `wᵀ` (same options, `opts.serial` ignored): A is packed once, and `w` is dequantized to
/// f32 [`DEQUANT_CHUNK_BYTES`] at a time, each slice of output features multiplied as it is
/// ready.
pub fn gemm_q(
    a: MatRef<'_, f32>,
    w: &QuantWeight,
    c: &mut [f32],
    ldc: usize,
    opts: &GemmOpts<'_>,
) -> Result<(), GemmError> {
    let (n, k) = (w.n, w.k);
    if a.cols != k {
        return Err(GemmError(format!(
            "A has {} columns, the weight {k}",
            a.cols
        )));
    }
    if let Some(b) = opts.bias_n {
        if b.len() != n {
            return Err(GemmError(format!("bias of {} for {n} outputs", b.len())));
        }
    }
    if a.rows == 0 || n == 0 {
        return Ok(());
    }
    if ldc < n || c.len() < (a.rows - 1) * ldc + n {
        return Err(GemmError(format!(
            "C of {} with ldc {ldc} for {}×{n}",
            c.len(),
            a.rows
        )));
    }
    let pa = PackedA::new(a, opts.precision)?;
    let chunk = (DEQUANT_CHUNK_BYTES / (4 * k.max(1))).max(64).div_ceil(64) * 64;
    let mut buf = vec![0f32; chunk.min(n) * k];
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + chunk).min(n);
        let wb = &mut buf[..(j1 - j0) * k];
        w.dequantize_rows(j0, j1, wb);
        let o = GemmOpts {
            bias_n: opts.bias_n.map(|b| &b[j0..j1]),
            ..*opts
        };
        let b = BRef::F32(MatRef::transposed(wb, k, j1 - j0));
        gemm::gemm_packed(&pa, b, &mut c[j0..], ldc, &o)?;
        j0 = j1;
    }
    Ok(())
}
