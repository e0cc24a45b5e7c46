//! Large-M matrix products on the CPU: `C = A·B (+ bias)` with packing and register-blocked
//! micro-kernels, for prefill, the vision tower and the VQ decoder's convolutions.
//!
//! Blocking (one task per column stripe of C, stripes in parallel on the global rayon pool):
//! - A (`m × k`, any strides) is packed once per call into panels of `MR` rows, `[k][MR]` each
//!   (or once for many calls: [`PackedA`], [`gemm_packed`]);
//! - each task packs its stripe's `KC × NC` block of B (any strides, f32 or bf16 source) into
//!   micro-panels `[KC][NR]` that stay in L2, then runs every A panel over them: the `MR × KC`
//!   A micro-panel stays in L1 while the stripe's `NR`-wide micro-panels stream past it.
//! - Packing runs that are contiguous in memory (rows of a row-major A, columns of a transposed
//!   weight) goes through 8 × 8 register transposes on AVX-512 machines, converting on the way
//!   (bf16 widened, or f32 rounded to bf16 pairs); packing buffers are reused per thread.
//! - The micro-kernel holds an `MR × NR` tile of C in registers (AVX-512: 12 × 32 in 24 zmm;
//!   AVX2: 6 × 16 in 12 ymm) and adds it into C, so k-blocks accumulate in place; C starts as
//!   the bias (or its old value when accumulating), and when it starts at zero the first
//!   k-block stores its tiles instead. Each tile's block of C is prefetched shortly before its
//!   k-block ends. A panel of fewer than MR rows (the last of a product, or all of a decode
//!   step's one or two rows) runs an R-row copy of the kernel straight into C on AVX-512.
//! - bf16 products (`Precision::Bf16`): A and B are rounded to bf16 while packing, pairs of k
//!   interleaved, and multiplied by `vdpbf16ps` (AVX512-BF16) into f32 accumulators. CPUs
//!   without it get the same rounding and f32 FMAs (same products, sums in another order).
//! - An optional activation (exact-erf GELU) runs on each finished row panel while it is hot.
//!
//! This file: the operand and option types, the entry points and their shape checks. The
//! others, each using only those listed after it (and this file's types): `packed` (operands
//! packed once: [`PackedA`], [`PackedB`]), `driver` (the blocking loops and threading), `pack`
//! (the packing routines), `dispatch` (which kernel runs), `scalar`, `avx2`, `avx512` (the
//! micro-kernels), `kernel` (the micro-kernel trait); and `tests`.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod dispatch;
mod driver;
mod kernel;
mod pack;
mod packed;
mod scalar;
#[cfg(test)]
mod tests;

pub use packed::{PackedA, PackedB};

use crate::cpu::{self, Level};
use dispatch::{on_path, path, Path};
use driver::{drive, run_packed, BSrc};
use half::bf16;
use kernel::{as_packed, Kernel};

/// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    /// Backing slice.
    pub data: &'a [T],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride in elements.
    pub rs: usize,
    /// Column stride in elements.
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// Row-major `rows × cols`.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `cols × rows` matrix (e.g. a `[out, in]` weight as `in × out`).
    pub fn transposed(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: 1,
            cs: rows,
        }
    }

    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|a| (self.cols - 1).checked_mul(self.cs).map(|b| (a, b)))
            .and_then(|(a, b)| a.checked_add(b));
        matches!(last, Some(l) if l < self.data.len())
    }
}

/// The B operand: f32 or bf16 storage.
#[derive(Clone, Copy, Debug)]
pub enum BRef<'a> {
    /// f32 elements.
    F32(MatRef<'a, f32>),
    /// bf16 elements (exactly widened, or used as is for bf16 products).
    Bf16(MatRef<'a, bf16>),
}

impl BRef<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            BRef::F32(b) => (b.rows, b.cols),
            BRef::Bf16(b) => (b.rows, b.cols),
        }
    }
    fn in_bounds(&self) -> bool {
        match self {
            BRef::F32(b) => b.in_bounds(),
            BRef::Bf16(b) => b.in_bounds(),
        }
    }
}

/// Precision of the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 products, f32 accumulation.
    #[default]
    F32,
    /// Operands rounded to bf16 (nearest even), products and accumulation in f32.
    Bf16,
}

impl Precision {
    /// `Bf16` when `bf16_products`, else `F32`.
    pub fn bf16_if(bf16_products: bool) -> Self {
        if bf16_products {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

/// Activation applied to C after the product and bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Act {
    /// None.
    #[default]
    None,
    /// `x · Φ(x)` with the exact (erf) normal CDF.
    GeluErf,
}

/// Options of [`gemm`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmOpts<'a> {
    /// Added to every row (`[n]`).
    pub bias_n: Option<&'a [f32]>,
    /// Added to every column (`[m]`, a per-output-channel bias when C is `[channels, pixels]`).
    pub bias_m: Option<&'a [f32]>,
    /// Add the product to C's current contents instead of overwriting them (a fused residual).
    pub accumulate: bool,
    /// Activation after bias (and after accumulation).
    pub act: Act,
    /// Product precision.
    pub precision: Precision,
    /// Run on the calling thread only (the caller already splits its work across the pool).
    pub serial: bool,
}

/// A shape error from [`gemm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GemmError(pub String);

impl std::fmt::Display for GemmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gemm: {}", self.0)
    }
}

impl std::error::Error for GemmError {}

/// `C[i * ldc + j] = Σ_p A(i, p) · B(p, j) (+ bias) for i < m = A.rows, j < n = B.cols`.
///
/// Errors (nothing written) when the inner dimensions differ, a view reaches past its slice,
/// `ldc < n`, C is too short, or a bias has the wrong length.
pub fn gemm(
    a: MatRef<'_, f32>,
    b: BRef<'_>,
    c: &mut [f32],
    ldc: usize,
    opts: &GemmOpts<'_>,
) -> Result<(), GemmError> {
    gemm_at(path(opts.precision), a, b, c, ldc, opts)
}

/// [`gemm`] with B packed beforehand; `opts.precision` must be the one B was packed for.
pub fn gemm_packed_b(
    a: MatRef<'_, f32>,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    opts: &GemmOpts<'_>,
) -> Result<(), GemmError> {
    check_packed_for("B", b.precision, opts.precision)?;
    if !a.in_bounds() {
        return Err(GemmError("A's view reaches past its slice".into()));
    }
    let (m, n, k) = check_dims((a.rows, a.cols), (b.k, b.n), c, ldc, opts)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    /// # Safety
    /// `K` is the kernel of the path `b` was packed on (so the CPU has its features).
    unsafe fn run<K: Kernel>(
        a: MatRef<'_, f32>,
        b: &PackedB,
        c: &mut [f32],
        ldc: usize,
        (m, n, k): (usize, usize, usize),
        opts: &GemmOpts<'_>,
    ) {
        // SAFETY: forwarded (shapes checked by the caller); `data` was packed by
        // `pack_b::<K>` for a k × n B.
        unsafe {
            drive::<K>(
                a,
                BSrc::Packed(as_packed::<K>(&b.data)),
                c,
                ldc,
                m,
                n,
                k,
                opts,
            )
        }
    }
    // SAFETY: the path was chosen by `path` on this CPU when B was packed (the portable
    // kernel needs no feature).
    unsafe { on_path!(b.path, run(a, b, c, ldc, (m, n, k), opts)) };
    Ok(())
}

/// [`gemm`] with A packed beforehand; `opts.precision` must be the one A was packed for.
pub fn gemm_packed(
    a: &PackedA,
    b: BRef<'_>,
    c: &mut [f32],
    ldc: usize,
    opts: &GemmOpts<'_>,
) -> Result<(), GemmError> {
    check_packed_for("A", a.precision, opts.precision)?;
    if !b.in_bounds() {
        return Err(GemmError("B's view reaches past its slice".into()));
    }
    let (m, n, _) = check_dims((a.m, a.k), b.dims(), c, ldc, opts)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    /// # Safety
    /// `K` is the kernel of the path `a` was packed on (so the CPU has its features).
    unsafe fn run<K: Kernel>(
        a: &PackedA,
        b: BRef<'_>,
        c: &mut [f32],
        ldc: usize,
        opts: &GemmOpts<'_>,
    ) {
        // `data` was packed by `pack_a::<K>` for an m × k A.
        let ap = as_packed::<K>(&a.data);
        let (_, n) = b.dims();
        // SAFETY: forwarded (shapes checked by the caller).
        unsafe { run_packed::<K>(ap, BSrc::Pack(b), c, ldc, a.m, n, a.k, opts) }
    }
    // SAFETY: the path was chosen by `path` on this CPU when A was packed (the portable
    // kernel needs no feature).
    unsafe { on_path!(a.path, run(a, b, c, ldc, opts)) };
    Ok(())
}

/// The paths this CPU can run, best first ("avx512bf16", "avx512", "avx2", "scalar"), for tests.
#[doc(hidden)]
pub fn gemm_paths() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cpu::has_avx512bf16() {
        v.push("avx512bf16");
    }
    v.extend(
        Level::ALL
            .into_iter()
            .filter(|&l| cpu::supported(l))
            .map(Level::name),
    );
    v
}

/// [`gemm`] on a named path (see [`gemm_paths`]); `avx512bf16` applies to bf16 precision only
/// (f32 precision on it runs the avx512 kernel). Errors if this CPU lacks the path.
#[doc(hidden)]
pub fn gemm_on(
    name: &str,
    a: MatRef<'_, f32>,
    b: BRef<'_>,
    c: &mut [f32],
    ldc: usize,
    opts: &GemmOpts<'_>,
) -> Result<(), GemmError> {
    if !gemm_paths().contains(&name) {
        return Err(GemmError(format!("path {name} not available on this CPU")));
    }
    let p = match (name, opts.precision) {
        ("avx512bf16", Precision::Bf16) => Path::Avx512Bf16,
        ("avx512bf16", Precision::F32) | ("avx512", _) => Path::Avx512,
        ("avx2", _) => Path::Avx2,
        _ => Path::Scalar,
    };
    gemm_at(p, a, b, c, ldc, opts)
}

/// Which kernel the default path uses for `precision`, for logs and benchmarks.
pub fn gemm_level(precision: Precision) -> &'static str {
    match path(precision) {
        Path::Avx512Bf16 => "avx512bf16",
        Path::Avx512 => "avx512",
        Path::Avx2 => "avx2",
        Path::Scalar => "scalar",
    }
}

/// Whether bf16 products run on native bf16 dot-product instructions here.
pub fn has_bf16_dot() -> bool {
    path(Precision::Bf16) == Path::Avx512Bf16
}

fn check(
    a: &MatRef<'_, f32>,
    b: &BRef<'_>,
    c: &[f32],
    ldc: usize,
    opts: &GemmOpts<'_>,
) -> Result<(usize, usize, usize), GemmError> {
    if !a.in_bounds() {
        return Err(GemmError("A's view reaches past its slice".into()));
    }
    if !b.in_bounds() {
        return Err(GemmError("B's view reaches past its slice".into()));
    }
    check_dims((a.rows, a.cols), b.dims(), c, ldc, opts)
}

/// The checks of [`check`] past the operands' own views, for an `m × k` A and a `kb × n` B.
fn check_dims(
    (m, k): (usize, usize),
    (kb, n): (usize, usize),
    c: &[f32],
    ldc: usize,
    opts: &GemmOpts<'_>,
) -> Result<(usize, usize, usize), GemmError> {
    if kb != k {
        return Err(GemmError(format!(
            "inner dimensions differ: A is {m}×{k}, B is {kb}×{n}"
        )));
    }
    if m > 0 && n > 0 && (ldc < n || c.len() < (m - 1) * ldc + n) {
        return Err(GemmError(format!(
            "C ({} elements, ldc {ldc}) cannot hold {m}×{n}",
            c.len()
        )));
    }
    if opts.bias_n.is_some_and(|v| v.len() != n) {
        return Err(GemmError(format!("bias_n must have {n} elements")));
    }
    if opts.bias_m.is_some_and(|v| v.len() != m) {
        return Err(GemmError(format!("bias_m must have {m} elements")));
    }
    Ok((m, n, k))
}

/// Errors unless an operand packed for `packed` products is used for `asked` ones.
fn check_packed_for(which: &str, packed: Precision, asked: Precision) -> Result<(), GemmError> {
    if packed == asked {
        return Ok(());
    }
    Err(GemmError(format!(
        "{which} was packed for {packed:?} products, the call asks for {asked:?}"
    )))
}

fn gemm_at(
    p: Path,
    a: MatRef<'_, f32>,
    b: BRef<'_>,
    c: &mut [f32],
    ldc: usize,
    opts: &GemmOpts<'_>,
) -> Result<(), GemmError> {
    let (m, n, k) = check(&a, &b, c, ldc, opts)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: `p` came from `path`/`gemm_on`, which only name paths whose features this CPU
    // has (the portable kernel needs none); shapes were checked above.
    unsafe { on_path!(p, drive(a, BSrc::Pack(b), c, ldc, m, n, k, opts)) };
    Ok(())
}
