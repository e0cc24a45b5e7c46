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

use crate::elementwise;
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// `$f::<K>(args)` with `K` the kernel of path `$p` (the one dispatch from a path to a kernel).
/// For the `unsafe` kernel entry points the caller states why the CPU has the path's features.
macro_rules! on_path {
    ($p:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $p {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 => $f::<x86::Avx512Bf16>($($arg),*),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => $f::<x86::Avx512>($($arg),*),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => $f::<x86::Avx2>($($arg),*),
            _ => $f::<Portable>($($arg),*),
        }
    };
}

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

/// A left operand packed once for the default path of a precision, for products that reuse it
/// many times (a convolution's transformed weights): [`gemm_packed`] then skips packing A.
#[derive(Clone, Debug)]
pub struct PackedA {
    path: Path,
    precision: Precision,
    m: usize,
    k: usize,
    /// Packed elements of the path's kernel (f32 bits, or bf16 pairs).
    data: Vec<u32>,
}

impl PackedA {
    /// Packs `a` for [`gemm_packed`] calls with `precision`; errors if the view reaches past
    /// its slice.
    pub fn new(a: MatRef<'_, f32>, precision: Precision) -> Result<Self, GemmError> {
        if !a.in_bounds() {
            return Err(GemmError("A's view reaches past its slice".into()));
        }
        let p = path(precision);
        let (m, k) = (a.rows, a.cols);
        fn packed<K: Kernel>(a: MatRef<'_, f32>, precision: Precision) -> Vec<u32> {
            let (m, k) = (a.rows, a.cols);
            let mut data = vec![0u32; packed_a_len::<K>(m, k)];
            pack_a::<K>(
                a,
                m,
                k,
                K::round_bf16(precision),
                as_packed_mut::<K>(&mut data),
                true,
            );
            data
        }
        let data = on_path!(p, packed(a, precision));
        Ok(Self {
            path: p,
            precision,
            m,
            k,
            data,
        })
    }

    /// Rows of A.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Columns of A.
    pub fn cols(&self) -> usize {
        self.k
    }
}

/// A right operand packed once for the default path of a precision, for products that reuse
/// it many times (a linear layer's weight, used only at large M): [`gemm_packed_b`] then skips
/// packing B. Holds `⌈n / NR⌉` micro-panels of `⌈k / KP⌉ × NR` packed elements (f32, or
/// bf16 pairs for bf16 products: half the bytes of an f32 weight).
#[derive(Clone, Debug)]
pub struct PackedB {
    path: Path,
    precision: Precision,
    k: usize,
    n: usize,
    data: Vec<u32>,
}

impl PackedB {
    /// Packs `b` (`k × n`) for [`gemm_packed_b`] calls with `precision`; errors if the view
    /// reaches past its slice.
    pub fn new(b: BRef<'_>, precision: Precision) -> Result<Self, GemmError> {
        Self::stacked(&[b], precision)
    }

    /// Packs the parts side by side, `[B₀ | B₁ | …]` (`k × Σnᵢ`), as [`PackedB::new`] would
    /// pack that matrix, without building it: a fused layer's weights (q, k and v) go straight
    /// from the checkpoint's tensors into one packed operand. Every part has the same k, and
    /// every part but the last a multiple of [`PackedB::STACK_COLS`] columns (so no micro-panel
    /// straddles two parts); errors otherwise, or if a view reaches past its slice.
    pub fn stacked(parts: &[BRef<'_>], precision: Precision) -> Result<Self, GemmError> {
        let Some(first) = parts.first() else {
            return Err(GemmError("no parts to pack".into()));
        };
        let k = first.dims().0;
        for (i, b) in parts.iter().enumerate() {
            if !b.in_bounds() {
                return Err(GemmError(format!(
                    "B part {i}'s view reaches past its slice"
                )));
            }
            let (bk, bn) = b.dims();
            if bk != k {
                return Err(GemmError(format!(
                    "B part {i} has {bk} rows, part 0 has {k}"
                )));
            }
            if i + 1 < parts.len() && bn % Self::STACK_COLS != 0 {
                return Err(GemmError(format!(
                    "B part {i} has {bn} columns, not a multiple of {}",
                    Self::STACK_COLS
                )));
            }
        }
        let n = parts.iter().map(|b| b.dims().1).sum();
        let p = path(precision);
        fn packed<K: Kernel>(
            parts: &[BRef<'_>],
            k: usize,
            n: usize,
            precision: Precision,
        ) -> Vec<u32> {
            const { assert!(PackedB::STACK_COLS.is_multiple_of(K::NR)) };
            let (nr, ksteps) = (K::NR, k.div_ceil(K::KP));
            let mut data = vec![0u32; n.div_ceil(nr) * ksteps * nr];
            if data.is_empty() {
                return data;
            }
            let mut rest = as_packed_mut::<K>(&mut data);
            let round = K::round_bf16(precision);
            for &b in parts {
                let bn = b.dims().1;
                let (bp, tail) = rest.split_at_mut(bn.div_ceil(nr) * ksteps * nr);
                rest = tail;
                // Micro-panel u is `[ksteps][NR]` at u · ksteps · NR: the whole k range of a
                // run of panels is one `pack_b` call, and runs go to the pool.
                const PANELS: usize = 8;
                bp.par_chunks_mut(PANELS * ksteps * nr)
                    .enumerate()
                    .for_each(|(i, chunk)| {
                        let j0 = i * PANELS * nr;
                        let ncs = (PANELS * nr).min(bn - j0);
                        match b {
                            BRef::F32(bv) => {
                                pack_b::<K, f32>(&bv, k, 0, ksteps, j0, ncs, round, chunk)
                            }
                            BRef::Bf16(bv) => {
                                pack_b::<K, bf16>(&bv, k, 0, ksteps, j0, ncs, round, chunk)
                            }
                        }
                    });
            }
            data
        }
        let data = on_path!(p, packed(parts, k, n, precision));
        Ok(Self {
            path: p,
            precision,
            k,
            n,
            data,
        })
    }

    /// Column multiple of the parts of [`PackedB::stacked`] (but the last): a multiple of
    /// every kernel's NR.
    pub const STACK_COLS: usize = 32;

    /// Rows of B (the inner dimension).
    pub fn rows(&self) -> usize {
        self.k
    }

    /// Columns of B.
    pub fn cols(&self) -> usize {
        self.n
    }

    /// The precision it was packed for.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * self.data.len()
    }
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
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
            v.push("avx512bf16");
        }
        if is_x86_feature_detected!("avx512f") {
            v.push("avx512");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push("avx2");
        }
    }
    v.push("scalar");
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Avx512Bf16,
    Avx512,
    Avx2,
    Scalar,
}

fn path(precision: Precision) -> Path {
    static BEST: OnceLock<(Path, Path)> = OnceLock::new();
    let (f32_path, bf16_path) = *BEST.get_or_init(|| {
        let paths = gemm_paths();
        let f = if paths.contains(&"avx512") {
            Path::Avx512
        } else if paths.contains(&"avx2") {
            Path::Avx2
        } else {
            Path::Scalar
        };
        let b = if paths.contains(&"avx512bf16") {
            Path::Avx512Bf16
        } else {
            f
        };
        (f, b)
    });
    match precision {
        Precision::F32 => f32_path,
        Precision::Bf16 => bf16_path,
    }
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

/// k-block: a 12 × 512 f32 A micro-panel (24 KiB) sits in L1 beside the B vectors streaming
/// in. 512 measured 8 % (f32) and 5 % (bf16 products) faster than 256 on one Zen 4 core at the
/// prefill and vision shapes (`gemm_bench`, 3 rounds), and 768 no better.
const KC: usize = 512;
/// Largest stripe of C columns per task: its packed `KC × NC` B block (512 KiB) stays in L2.
const NC_MAX: usize = 256;

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

/// One micro-kernel family: packed element type and tile shape.
///
/// # Safety
/// Implementors' `kernel` may require CPU features; `drive::<K>` may only be called when the
/// CPU has them.
unsafe trait Kernel {
    /// Packed element (f32, or u32 = a pair of bf16 along k): 4 bytes, every bit pattern valid
    /// (packing buffers are reused as u32 storage).
    type P: Copy + Default + Send + Sync;
    /// Rows of the register tile (A broadcasts).
    const MR: usize;
    /// Columns of the register tile (B vectors).
    const NR: usize;
    /// k values per packed element (1, or 2 for bf16 pairs).
    const KP: usize;
    /// Whether operands are rounded to bf16 when packing (f32 kernels emulating bf16 products).
    fn round_bf16(precision: Precision) -> bool {
        precision == Precision::Bf16
    }
    /// Packs `vals` (`KP` consecutive k values of one row/column; missing ones are zero).
    fn pack(vals: [f32; 2], round: bool) -> Self::P;
    /// `C[r][j] += Σ_s A[s][r] · B[s][j]` for r < MR, j < NR, over `steps` packed k steps
    /// (`=` instead of `+=` when `add` is false).
    ///
    /// # Safety
    /// The CPU has the kernel's features; `a` is valid for steps·MR packed elements, `b` for
    /// steps·NR, `c` for MR rows of NR floats `ldc` apart.
    unsafe fn kernel(
        steps: usize,
        a: *const Self::P,
        b: *const Self::P,
        c: *mut f32,
        ldc: usize,
        add: bool,
    );
    /// As [`Kernel::kernel`] for the first `rows` (1 ≤ rows < MR) rows of the tile only (the
    /// A micro-panel keeps its MR stride); false, doing nothing, when the kernel has no such
    /// variant and the caller must run the whole tile into a scratch tile instead. Decode-sized
    /// products (a row or two) and the last panel of every product use it.
    ///
    /// # Safety
    /// As [`Kernel::kernel`], with `c` valid for `rows` rows.
    unsafe fn kernel_rows(
        _rows: usize,
        _steps: usize,
        _a: *const Self::P,
        _b: *const Self::P,
        _c: *mut f32,
        _ldc: usize,
        _add: bool,
    ) -> bool {
        false
    }
    /// Runs the activation over a row slice with the kernel's features.
    fn act(act: Act, row: &mut [f32]) {
        match act {
            Act::None => {}
            Act::GeluErf => elementwise::gelu_erf_inplace(row),
        }
    }
}

/// The packed element of the f32 kernels: the k value itself, rounded to bf16 when the
/// product emulates bf16 precision.
fn pack_f32(vals: [f32; 2], round: bool) -> f32 {
    if round {
        round_to_bf16(vals[0])
    } else {
        vals[0]
    }
}

fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits(bf16_bits(x) << 16)
}

/// The bf16 nearest to `x` (ties to even; NaN stays a quiet NaN) as its 16 bits in a u32: the
/// rounding of `half::bf16::from_f32`, written without branches so packing loops vectorise.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// Packed elements are 4 bytes (f32, or u32 bf16 pairs), any bit pattern valid.
const _: () = assert!(std::mem::size_of::<f32>() == 4 && std::mem::size_of::<u32>() == 4);

thread_local! {
    /// Packing buffers kept per thread between calls, so each product does not fault in (and
    /// zero) fresh pages for its packed A and B.
    static SCRATCH: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest buffer kept for reuse (32 Mi elements, 128 MiB); larger ones are freed after use.
const SCRATCH_KEEP: usize = 32 << 20;

/// `u32` storage viewed as the packed elements of kernel `K`.
fn as_packed<K: Kernel>(data: &[u32]) -> &[K::P] {
    const { assert!(std::mem::size_of::<K::P>() == 4 && std::mem::align_of::<K::P>() <= 4) };
    // SAFETY: `K::P` is f32 or u32 (size 4, align ≤ 4, every bit pattern valid; see `Kernel`),
    // and the slice covers `data.len()` initialised u32s.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<K::P>(), data.len()) }
}

/// [`as_packed`], mutable.
fn as_packed_mut<K: Kernel>(data: &mut [u32]) -> &mut [K::P] {
    const { assert!(std::mem::size_of::<K::P>() == 4 && std::mem::align_of::<K::P>() <= 4) };
    // SAFETY: as in `as_packed`.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<K::P>(), data.len()) }
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

/// Runs `f` on a buffer of `len` packed elements taken from this thread's scratch (nested calls
/// get distinct buffers). Its contents are whatever an earlier user left: `f` writes before it
/// reads.
fn with_scratch<K: Kernel, R>(len: usize, f: impl FnOnce(&mut [K::P]) -> R) -> R {
    // The smallest kept buffer that is long enough, else the longest (grown): callers of
    // different sizes interleave (a product's packing inside an attention head's scores), and
    // growing a short buffer would copy and zero it again.
    let mut buf = SCRATCH
        .with(|s| {
            let mut s = s.borrow_mut();
            let fit = (0..s.len())
                .filter(|&i| s[i].len() >= len)
                .min_by_key(|&i| s[i].len())
                .or_else(|| (0..s.len()).max_by_key(|&i| s[i].len()));
            fit.map(|i| s.swap_remove(i))
        })
        .unwrap_or_default();
    if buf.len() < len {
        // Nothing to keep: a fresh allocation instead of a copy of the old contents.
        buf = vec![0; len];
    }
    let r = f(as_packed_mut::<K>(&mut buf[..len]));
    if buf.capacity() <= SCRATCH_KEEP {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < 4 {
                s.push(buf);
            }
        });
    }
    r
}

/// [`with_scratch`] for plain f32 buffers (other kernels of this crate); not zeroed.
pub(crate) fn with_f32_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_scratch::<Portable, R>(len, f)
}

/// A mutable f32 slice handed to parallel tasks that each write a disjoint part of it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtrF32 {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: only copied between threads; users write disjoint parts (see each use).
unsafe impl Send for SendPtrF32 {}
// SAFETY: as above.
unsafe impl Sync for SendPtrF32 {}
impl SendPtrF32 {
    pub(crate) fn new(s: &mut [f32]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// The slice's first element, for writers of disjoint parts that never form a slice.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.ptr
    }

    /// The whole slice again.
    ///
    /// # Safety
    /// The original slice outlives the use, and concurrent users write disjoint elements.
    pub(crate) unsafe fn slice<'a>(self) -> &'a mut [f32] {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Raw pointer that may cross threads; users write disjoint parts (see each use).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: only copied between threads; every task writes a disjoint set of C's columns.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// A B element type.
trait Src: Copy {
    /// Whether the type is bf16 (else f32).
    const IS_BF16: bool;
    fn f(self) -> f32;
}
impl Src for f32 {
    const IS_BF16: bool = false;
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}
impl Src for bf16 {
    const IS_BF16: bool = true;
    #[inline(always)]
    fn f(self) -> f32 {
        self.to_f32()
    }
}

/// Packs `R = dst.len() / steps` source runs into `[steps][R]` packed elements: run `r` holds
/// the k values `s0·KP..` of one row of A or one column of B, contiguous in memory (`None`: a
/// zero row past the matrix). `kvalid` k values of each run exist; the rest pack as zeros.
///
/// Goes through an L1-resident tile of 8 packed steps per run, so the source is read in
/// contiguous runs and the panel written in contiguous rows (the strided column walk this
/// replaces missed L1 on every store).
fn pack_runs<K: Kernel, T: Src>(
    runs: &[Option<&[T]>],
    steps: usize,
    kvalid: usize,
    round: bool,
    dst: &mut [K::P],
) {
    #[cfg(target_arch = "x86_64")]
    {
        /// The same loops compiled with AVX-512 (conversions and moves vectorised).
        #[target_feature(enable = "avx512f")]
        fn v512<K: Kernel, T: Src>(
            runs: &[Option<&[T]>],
            steps: usize,
            kvalid: usize,
            round: bool,
            dst: &mut [K::P],
        ) {
            pack_runs_body::<K, T>(runs, steps, kvalid, round, dst)
        }
        if crate::level() == crate::Level::Avx512 {
            match xpack::form::<K, T>(round) {
                // SAFETY: the level was detected on this CPU (avx512f), and the form names
                // the kernel's packed element for this source.
                Some(xpack::Form::F32ToPairs) => {
                    // Only the bf16-pair kernel packs f32 to pairs; it runs only where the CPU
                    // has avx512bf16.
                    debug_assert!(has_bf16_dot());
                    // SAFETY: as above, plus avx512bf16 (the kernel's own requirement).
                    return unsafe { xpack::runs_bf16::<K, T>(runs, steps, kvalid, round, dst) };
                }
                // SAFETY: as above.
                Some(f) => {
                    return unsafe { xpack::runs::<K, T>(f, runs, steps, kvalid, round, dst) }
                }
                None => {}
            }
            // SAFETY: the level was detected on this CPU (avx512f).
            return unsafe { v512::<K, T>(runs, steps, kvalid, round, dst) };
        }
    }
    pack_runs_body::<K, T>(runs, steps, kvalid, round, dst)
}

/// The packed element at packed step `t` of a row of A or column of B whose k-th value is
/// `get(k)`: its `KP` values from k = t·KP, zeros past `kvalid` values.
#[inline(always)]
fn pack_step<K: Kernel>(get: impl Fn(usize) -> f32, t: usize, kvalid: usize, round: bool) -> K::P {
    let mut vals = [0f32; 2];
    for (u, v) in vals.iter_mut().enumerate().take(K::KP) {
        let p = t * K::KP + u;
        if p < kvalid {
            *v = get(p);
        }
    }
    K::pack(vals, round)
}

/// [`pack_runs`] with 8 × 8 register transposes: every group of 8 runs, over the packed steps
/// whose 8-step tiles are whole, moves as eight 8-lane loads (converted to the packed element
/// on the way), a transpose, and eight stores; the rest goes element by element.
#[cfg(target_arch = "x86_64")]
mod xpack {
    use super::{pack_step, Kernel, Src};
    use std::arch::x86_64::*;

    /// How 8 packed elements load from a run as 8 32-bit lanes.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(super) enum Form {
        /// f32 source, f32 element, no rounding.
        F32,
        /// bf16 source widened to an f32 element.
        Bf16Widen,
        /// bf16 source, bf16-pair element: the pairs as they lie in memory.
        Bf16Pairs,
        /// f32 source rounded to bf16 pairs (`vcvtneps2bf16`, needs AVX512-BF16).
        F32ToPairs,
    }

    /// The vector form of kernel `K`'s packing from `T`, if there is one.
    pub(super) fn form<K: Kernel, T: Src>(round: bool) -> Option<Form> {
        match (K::KP, T::IS_BF16) {
            (1, false) if !round => Some(Form::F32),
            (1, true) => Some(Form::Bf16Widen),
            (2, true) => Some(Form::Bf16Pairs),
            (2, false) => Some(Form::F32ToPairs),
            _ => None,
        }
    }

    /// `dst[j]` = the bf16 pair (`lo[j]`, `hi[j]` or 0) rounded to nearest even, 16 at a time
    /// (`dst.len()` a multiple of 16, `lo`/`hi` at least as long).
    ///
    /// # Safety
    /// The CPU has avx512f and avx512bf16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn rows_to_pairs(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
        for (j, d) in dst.chunks_exact_mut(16).enumerate() {
            let l = &lo[j * 16..j * 16 + 16];
            // SAFETY: 16 f32 at `l` (and `h`), 16 u32 at `d`; the bf16 vectors are 16 × 16 bits.
            unsafe {
                let lb: __m256i =
                    std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(l.as_ptr())));
                let mut v = _mm512_cvtepu16_epi32(lb);
                if let Some(hi) = hi {
                    let h = &hi[j * 16..j * 16 + 16];
                    let hb: __m256i =
                        std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(h.as_ptr())));
                    v = _mm512_or_si512(v, _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hb)));
                }
                _mm512_storeu_si512(d.as_mut_ptr() as *mut _, v);
            }
        }
    }

    /// Rows r[i] (8 lanes each) → columns.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// Eight packed elements from `p` (8·KP source values) in `form` (not `F32ToPairs`).
    ///
    /// # Safety
    /// `p` is valid for the 8·KP source values the form reads.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(form: Form, p: *const u8) -> __m256 {
        // SAFETY: per the contract; unaligned loads.
        unsafe {
            match form {
                Form::Bf16Widen => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                )),
                _ => _mm256_loadu_ps(p as *const f32),
            }
        }
    }

    /// Eight bf16 pairs rounded from 16 f32 at `p`.
    ///
    /// # Safety
    /// `p` is valid for 16 f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn load8_pairs(p: *const u8) -> __m256 {
        // SAFETY: per the contract; the bf16 vector is 256 bits of 16 bf16 = 8 pairs, in the
        // order `Kernel::pack` puts them (low half k = 2s).
        unsafe { std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(p as *const f32))) }
    }

    /// # Safety
    /// The CPU has avx512f; `form` is `form::<K, T>(round)` and not `F32ToPairs`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn runs<K: Kernel, T: Src>(
        form: Form,
        runs: &[Option<&[T]>],
        steps: usize,
        kvalid: usize,
        round: bool,
        dst: &mut [K::P],
    ) {
        // SAFETY: forwarded; `load8` reads 8·KP values of a run inside its whole tiles.
        unsafe { body::<K, T>(runs, steps, kvalid, round, dst, |p| load8(form, p)) }
    }

    /// # Safety
    /// The CPU has avx512f and avx512bf16; `K` packs bf16 pairs and `T` is f32.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn runs_bf16<K: Kernel, T: Src>(
        runs: &[Option<&[T]>],
        steps: usize,
        kvalid: usize,
        round: bool,
        dst: &mut [K::P],
    ) {
        // SAFETY: forwarded; `load8_pairs` reads 16 f32 of a run inside its whole tiles.
        unsafe { body::<K, T>(runs, steps, kvalid, round, dst, |p| load8_pairs(p)) }
    }

    /// # Safety
    /// `load` reads 8 packed elements' source values from a pointer to them, with features the
    /// CPU has (avx2 at least).
    #[inline(always)]
    unsafe fn body<K: Kernel, T: Src>(
        runs: &[Option<&[T]>],
        steps: usize,
        kvalid: usize,
        round: bool,
        dst: &mut [K::P],
        load: impl Fn(*const u8) -> __m256,
    ) {
        const { assert!(std::mem::size_of::<K::P>() == 4) };
        let (rn, kp) = (runs.len(), K::KP);
        assert!(dst.len() >= steps * rn);
        // Packed steps inside whole 8-step tiles of every run.
        let whole = (kvalid / kp).min(steps) / 8 * 8;
        // Groups of up to 8 runs (zero rows for missing runs and past the last run).
        for g in (0..rn).step_by(8) {
            let cnt = 8.min(rn - g);
            let group = &runs[g..g + cnt];
            for sb in (0..whole).step_by(8) {
                let mut rows = [_mm256_setzero_ps(); 8];
                for (row, src) in rows.iter_mut().zip(group) {
                    if let Some(src) = src {
                        let v = &src[sb * kp..(sb + 8) * kp];
                        *row = load(v.as_ptr() as *const u8);
                        // The runs are far apart in memory (weight rows): fetch each one's
                        // next lines ahead of use, which the hardware prefetchers, tracking
                        // few streams, do not.
                        let ahead = (sb + 32) * kp;
                        if ahead < src.len() {
                            // SAFETY: a prefetch of an address inside the slice; no access.
                            unsafe {
                                _mm_prefetch::<_MM_HINT_T0>(src.as_ptr().add(ahead) as *const i8)
                            };
                        }
                    }
                }
                // SAFETY: avx2 present (see the contract).
                let cols = unsafe { transpose8(rows) };
                for (t, col) in cols.iter().enumerate() {
                    let at = (sb + t) * rn + g;
                    let d = &mut dst[at..at + cnt];
                    if cnt == 8 {
                        // SAFETY: `d` holds 8 elements of 4 bytes.
                        unsafe { _mm256_storeu_ps(d.as_mut_ptr() as *mut f32, *col) };
                    } else {
                        let mut lanes = [0f32; 8];
                        // SAFETY: `lanes` holds 8 f32.
                        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *col) };
                        for (d, &l) in d.iter_mut().zip(&lanes) {
                            // SAFETY: `K::P` is 4 bytes, any bit pattern valid.
                            *d = unsafe { std::mem::transmute_copy::<f32, K::P>(&l) };
                        }
                    }
                }
            }
        }
        // Steps past the whole tiles (the end of k), element by element.
        for t in whole..steps {
            let row = &mut dst[t * rn..(t + 1) * rn];
            for (d, run) in row.iter_mut().zip(runs) {
                *d = match run {
                    Some(src) => pack_step::<K>(|p| src[p].f(), t, kvalid, round),
                    None => K::P::default(),
                };
            }
        }
    }
}

#[inline(always)]
fn pack_runs_body<K: Kernel, T: Src>(
    runs: &[Option<&[T]>],
    steps: usize,
    kvalid: usize,
    round: bool,
    dst: &mut [K::P],
) {
    const TS: usize = 8;
    let (rn, kp) = (runs.len(), K::KP);
    debug_assert!(rn <= 64 && dst.len() >= steps * rn);
    let mut tile = [[K::P::default(); TS]; 64];
    let mut sb = 0;
    while sb < steps {
        let cnt = TS.min(steps - sb);
        let full = cnt == TS && (sb + TS) * kp <= kvalid;
        for (tr, run) in tile.iter_mut().zip(runs) {
            match run {
                None => *tr = [K::P::default(); TS],
                Some(src) if full => {
                    let src = &src[sb * kp..(sb + TS) * kp];
                    if kp == 1 {
                        for (d, &v) in tr.iter_mut().zip(src) {
                            *d = K::pack([v.f(), 0.0], round);
                        }
                    } else {
                        for (d, v) in tr.iter_mut().zip(src.chunks_exact(2)) {
                            *d = K::pack([v[0].f(), v[1].f()], round);
                        }
                    }
                }
                Some(src) => {
                    for (t, d) in tr.iter_mut().enumerate().take(cnt) {
                        *d = pack_step::<K>(|p| src[p].f(), sb + t, kvalid, round);
                    }
                }
            }
        }
        for t in 0..cnt {
            let row = &mut dst[(sb + t) * rn..(sb + t + 1) * rn];
            for (d, tr) in row.iter_mut().zip(&tile[..rn]) {
                *d = tr[t];
            }
        }
        sb += TS;
    }
}

/// Packs B rows `s0·KP..` (`steps` packed steps) of columns `j0..j0 + ncs` into micro-panels
/// `[steps][NR]` (zeros past k and past the stripe).
#[allow(clippy::too_many_arguments)]
fn pack_b<K: Kernel, T: Src>(
    b: &MatRef<'_, T>,
    k: usize,
    s0: usize,
    steps: usize,
    j0: usize,
    ncs: usize,
    round: bool,
    bp: &mut [K::P],
) {
    let (nr, kp) = (K::NR, K::KP);
    if b.cs == 1 && ncs.is_multiple_of(nr) {
        // Row-major B (e.g. Winograd's transformed input): each packed step is NR (or NR pairs of)
        // consecutive elements of one or two B rows.
        for u in 0..ncs / nr {
            let panel = &mut bp[u * steps * nr..(u + 1) * steps * nr];
            let c0 = j0 + u * nr;
            for s in 0..steps {
                let p0 = (s0 + s) * kp;
                let r0 = &b.data[p0 * b.rs + c0..p0 * b.rs + c0 + nr];
                let r1 = if kp == 2 && p0 + 1 < k {
                    Some(&b.data[(p0 + 1) * b.rs + c0..(p0 + 1) * b.rs + c0 + nr])
                } else {
                    None
                };
                let dst = &mut panel[s * nr..(s + 1) * nr];
                if p0 >= k {
                    dst.fill(K::P::default());
                    continue;
                }
                if kp == 1 && !round && !T::IS_BF16 {
                    // f32 as is: a copy.
                    // SAFETY: `T` is f32 and `K::P` 4 bytes with any bit pattern valid, so both
                    // slices are `nr` 4-byte values.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            r0.as_ptr() as *const u8,
                            dst.as_mut_ptr() as *mut u8,
                            4 * nr,
                        )
                    };
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if kp == 2 && !T::IS_BF16 && nr % 16 == 0 && has_bf16_dot() {
                    // f32 rows to bf16 pairs (the only KP = 2 kernel needs AVX512-BF16).
                    // SAFETY: `T` is f32, `K::P` u32-sized; the CPU has avx512f and avx512bf16.
                    unsafe {
                        let lo = std::slice::from_raw_parts(r0.as_ptr() as *const f32, nr);
                        let hi =
                            r1.map(|r| std::slice::from_raw_parts(r.as_ptr() as *const f32, nr));
                        let d = std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u32, nr);
                        xpack::rows_to_pairs(lo, hi, d);
                    }
                    continue;
                }
                for (jj, d) in dst.iter_mut().enumerate() {
                    let hi = r1.map_or(0.0, |r| r[jj].f());
                    *d = K::pack([r0[jj].f(), hi], round);
                }
            }
        }
        return;
    }
    if b.rs == 1 {
        // Columns contiguous along k (a transposed row-major weight): transpose through tiles.
        let kvalid = k.saturating_sub(s0 * kp);
        let mut runs = [None; 64];
        for u in 0..ncs.div_ceil(nr) {
            for (jj, run) in runs[..nr].iter_mut().enumerate() {
                let j = u * nr + jj;
                *run = (j < ncs).then(|| &b.data[(j0 + j) * b.cs + s0 * kp..]);
            }
            let panel = &mut bp[u * steps * nr..(u + 1) * steps * nr];
            pack_runs::<K, T>(&runs[..nr], steps, kvalid, round, panel);
        }
        return;
    }
    for u in 0..ncs.div_ceil(nr) {
        let panel = &mut bp[u * steps * nr..(u + 1) * steps * nr];
        for jj in 0..nr {
            let j = u * nr + jj;
            if j >= ncs {
                for s in 0..steps {
                    panel[s * nr + jj] = K::P::default();
                }
                continue;
            }
            let col = (j0 + j) * b.cs;
            for s in 0..steps {
                panel[s * nr + jj] =
                    pack_step::<K>(|p| b.data[p * b.rs + col].f(), s0 + s, k, round);
            }
        }
    }
}

/// The whole product on kernel `K`, A packed here, B packed as it goes or beforehand.
///
/// # Safety
/// The CPU has `K`'s features; shapes as `check` accepted, m, n ≥ 1; a prepacked B was
/// packed by `pack_b::<K>` for a k × n B.
#[allow(clippy::too_many_arguments)]
unsafe fn drive<K: Kernel>(
    a: MatRef<'_, f32>,
    b: BSrc<'_, K::P>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
) {
    // A: panel q holds rows q·MR.. as [ksteps][MR] (zero rows past m, zero k past k).
    with_scratch::<K, _>(packed_a_len::<K>(m, k), |ap| {
        pack_a::<K>(a, m, k, K::round_bf16(opts.precision), ap, !opts.serial);
        run_packed::<K>(ap, b, c, ldc, m, n, k, opts)
    })
}

/// Elements of A packed for kernel `K`: `⌈m / MR⌉` panels of `⌈k / KP⌉ × MR`.
fn packed_a_len<K: Kernel>(m: usize, k: usize) -> usize {
    m.div_ceil(K::MR) * k.div_ceil(K::KP) * K::MR
}

/// Packs A (`m × k`) into `ap` (zeroed, [`packed_a_len`] elements): panel q holds rows
/// q·MR.. as `[ksteps][MR]`, zero rows past m and zero k past k.
fn pack_a<K: Kernel>(
    a: MatRef<'_, f32>,
    m: usize,
    k: usize,
    round: bool,
    ap: &mut [K::P],
    parallel: bool,
) {
    let (mr, kp) = (K::MR, K::KP);
    let ksteps = k.div_ceil(kp);
    let pack_panel = |(q, panel): (usize, &mut [K::P])| {
        if a.cs == 1 {
            // Row-major A: each panel row is a contiguous run along k.
            let mut runs = [None; 64];
            for (r, run) in runs[..mr].iter_mut().enumerate() {
                let i = q * mr + r;
                *run = (i < m).then(|| &a.data[i * a.rs..]);
            }
            pack_runs::<K, f32>(&runs[..mr], ksteps, k, round, panel);
            return;
        }
        for r in 0..mr {
            let i = q * mr + r;
            if i >= m {
                for s in 0..ksteps {
                    panel[s * mr + r] = K::P::default();
                }
                continue;
            }
            let row = i * a.rs;
            for s in 0..ksteps {
                panel[s * mr + r] = pack_step::<K>(|p| a.data[row + p * a.cs], s, k, round);
            }
        }
    };
    // (k = 0 leaves nothing to pack; chunks need a non-zero size.)
    let chunk = (ksteps * mr).max(1);
    if parallel {
        ap.par_chunks_mut(chunk).enumerate().for_each(pack_panel);
    } else {
        ap.chunks_mut(chunk).enumerate().for_each(pack_panel);
    }
}

/// Where [`run_packed`] gets B: packed per stripe and k-block as it goes, or prepacked whole
/// by [`PackedB`] (micro-panel u at u · ⌈k / KP⌉ · NR).
#[derive(Clone, Copy)]
enum BSrc<'a, P> {
    Pack(BRef<'a>),
    Packed(&'a [P]),
}

/// The product from A packed by [`pack_a`] (B packed per stripe and k-block as it goes).
///
/// # Safety
/// As [`drive`]; `ap` holds A packed for `K`, `m × k`.
#[allow(clippy::too_many_arguments)]
unsafe fn run_packed<K: Kernel>(
    ap: &[K::P],
    b: BSrc<'_, K::P>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
) {
    let round = K::round_bf16(opts.precision);
    let (mr, nr, kp) = (K::MR, K::NR, K::KP);
    // Packed k length (steps of KP values), and the k-block in packed steps.
    let ksteps = k.div_ceil(kp);
    let kcs = KC / kp;
    let panels = m.div_ceil(mr);
    // Stripes: at most NC_MAX columns, at least 2 per thread when n allows, multiples of NR.
    let threads = rayon::current_num_threads().max(1);
    let nc = n
        .div_ceil(2 * threads)
        .div_ceil(nr)
        .max(1)
        .saturating_mul(nr)
        .min(NC_MAX.div_ceil(nr) * nr);
    let stripes = n.div_ceil(nc);
    let cp = SendPtr(c.as_mut_ptr());
    let clen = c.len();
    let run_stripe = |si: usize| {
        let j0 = si * nc;
        let ncs = nc.min(n - j0);
        let micro = ncs.div_ceil(nr);
        // SAFETY: this task reads and writes only columns j0..j0+ncs of rows < m of C (inside
        // `c` per `check`), which no other task touches; `c` outlives the parallel loop.
        let c = unsafe { std::slice::from_raw_parts_mut(cp.get(), clen) };
        // C starts at zero (the first k-block's tiles are stored, not added) or keeps its
        // contents when accumulating; biases are added with the activation as each row panel
        // is finished, while it is in cache, not by a pass over cold C first. k = 0 has no
        // k-block: C is set here.
        let zero_start = !opts.accumulate && ksteps > 0;
        let biased = opts.bias_m.is_some() || opts.bias_n.is_some();
        for i in (0..m).filter(|_| ksteps == 0) {
            let row = &mut c[i * ldc + j0..i * ldc + j0 + ncs];
            if !opts.accumulate {
                let bm = opts.bias_m.map_or(0.0, |v| v[i]);
                match opts.bias_n {
                    Some(bn) => row
                        .iter_mut()
                        .zip(&bn[j0..j0 + ncs])
                        .for_each(|(o, &v)| *o = v + bm),
                    None => row.fill(bm),
                }
            } else {
                let bm = opts.bias_m.map_or(0.0, |v| v[i]);
                match opts.bias_n {
                    Some(bn) => row
                        .iter_mut()
                        .zip(&bn[j0..j0 + ncs])
                        .for_each(|(o, &v)| *o += v + bm),
                    None if bm != 0.0 => row.iter_mut().for_each(|o| *o += bm),
                    None => {}
                }
            }
        }
        if ksteps == 0 && opts.act != Act::None {
            // k = 0: C is the bias (or its old value) alone, still activated.
            for i in 0..m {
                K::act(opts.act, &mut c[i * ldc + j0..i * ldc + j0 + ncs]);
            }
        }
        let scratch_len = match b {
            BSrc::Pack(_) => micro * kcs * nr,
            BSrc::Packed(_) => 0,
        };
        with_scratch::<K, _>(scratch_len, |bp| {
            let mut tmp = vec![0f32; mr * nr];
            let nkb = ksteps.div_ceil(kcs);
            for kb in 0..nkb {
                let s0 = kb * kcs;
                let steps = kcs.min(ksteps - s0);
                // B rows s0·KP.. of columns j0..j0+ncs as micro-panels [steps][NR], u apart:
                // packed now, or the prepacked panels' rows (j0 is a multiple of NR).
                let (bbase, ustride): (*const K::P, usize) = match b {
                    BSrc::Pack(BRef::F32(bv)) => {
                        pack_b::<K, f32>(&bv, k, s0, steps, j0, ncs, round, bp);
                        (bp.as_ptr(), steps * nr)
                    }
                    BSrc::Pack(BRef::Bf16(bv)) => {
                        pack_b::<K, bf16>(&bv, k, s0, steps, j0, ncs, round, bp);
                        (bp.as_ptr(), steps * nr)
                    }
                    // SAFETY: panel j0/NR + u holds ksteps·NR elements from
                    // (j0/NR + u)·ksteps·NR, inside the prepacked slice for u < micro.
                    BSrc::Packed(pb) => (
                        unsafe { pb.as_ptr().add((j0 / nr) * ksteps * nr + s0 * nr) },
                        ksteps * nr,
                    ),
                };
                for q in 0..panels {
                    let i0 = q * mr;
                    let rows = mr.min(m - i0);
                    // SAFETY: panel q's block s0.. holds steps·MR packed elements inside `ap`.
                    let apan = unsafe { ap.as_ptr().add(q * ksteps * mr + s0 * mr) };
                    for u in 0..micro {
                        let jc = j0 + u * nr;
                        let cols = nr.min(j0 + ncs - jc);
                        // SAFETY: micro-panel u's block spans steps·NR packed elements from
                        // `bbase + u · ustride`, inside `bp` or the prepacked B.
                        let bpan = unsafe { bbase.add(u * ustride) };
                        let add = !(zero_start && kb == 0);
                        // Whole-width tiles go straight into C: the full kernel, or for the
                        // last panel's rows the row-count kernel where the path has one.
                        let direct = cols == nr && {
                            // SAFETY: rows i0..i0+rows < m and columns jc..jc+NR ≤ j0+ncs of C
                            // are inside `c` and owned by this task; features per `drive`'s
                            // contract.
                            unsafe {
                                let cp = c.as_mut_ptr().add(i0 * ldc + jc);
                                if rows == mr {
                                    K::kernel(steps, apan, bpan, cp, ldc, add);
                                    true
                                } else {
                                    K::kernel_rows(rows, steps, apan, bpan, cp, ldc, add)
                                }
                            }
                        };
                        if !direct {
                            // SAFETY: `tmp` holds MR rows of NR floats.
                            unsafe { K::kernel(steps, apan, bpan, tmp.as_mut_ptr(), nr, false) };
                            for r in 0..rows {
                                let dst = &mut c[(i0 + r) * ldc + jc..(i0 + r) * ldc + jc + cols];
                                let src = &tmp[r * nr..r * nr + cols];
                                if add {
                                    dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
                                } else {
                                    dst.copy_from_slice(src);
                                }
                            }
                        }
                    }
                    if kb + 1 == nkb && (biased || opts.act != Act::None) {
                        for r in 0..rows {
                            let row = &mut c[(i0 + r) * ldc + j0..(i0 + r) * ldc + j0 + ncs];
                            let bm = opts.bias_m.map_or(0.0, |v| v[i0 + r]);
                            match opts.bias_n {
                                Some(bn) => row
                                    .iter_mut()
                                    .zip(&bn[j0..j0 + ncs])
                                    .for_each(|(o, &v)| *o += v + bm),
                                None if bm != 0.0 => row.iter_mut().for_each(|o| *o += bm),
                                None => {}
                            }
                            K::act(opts.act, row);
                        }
                    }
                }
            }
        });
    };
    if opts.serial || stripes == 1 || (m * n * k) < (1 << 18) {
        (0..stripes).for_each(run_stripe);
    } else {
        (0..stripes).into_par_iter().for_each(run_stripe);
    }
}

/// Portable kernel: plain Rust over small arrays, which LLVM vectorises for the baseline target.
struct Portable;

// SAFETY: the kernel needs no CPU feature.
unsafe impl Kernel for Portable {
    type P = f32;
    const MR: usize = 4;
    const NR: usize = 16;
    const KP: usize = 1;
    fn pack(vals: [f32; 2], round: bool) -> f32 {
        pack_f32(vals, round)
    }
    unsafe fn kernel(
        steps: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        let mut acc = [[0f32; 16]; 4];
        for s in 0..steps {
            // SAFETY: s < steps: inside the packed panels per the contract.
            let (av, bv) = unsafe {
                (
                    std::slice::from_raw_parts(a.add(s * 4), 4),
                    std::slice::from_raw_parts(b.add(s * 16), 16),
                )
            };
            for r in 0..4 {
                for j in 0..16 {
                    acc[r][j] += av[r] * bv[j];
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            for (j, &v) in accr.iter().enumerate() {
                // SAFETY: r < MR rows of NR floats at `c`, per the contract.
                unsafe {
                    let d = c.add(r * ldc + j);
                    *d = if add { *d + v } else { v };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Kernel;
    use std::arch::x86_64::*;

    pub(super) struct Avx512;
    pub(super) struct Avx512Bf16;
    pub(super) struct Avx2;

    // SAFETY: `kernel` requires avx512f, which `drive::<Avx512>` callers guarantee.
    unsafe impl Kernel for Avx512 {
        type P = f32;
        const MR: usize = 12;
        const NR: usize = 32;
        const KP: usize = 1;
        fn pack(vals: [f32; 2], round: bool) -> f32 {
            super::pack_f32(vals, round)
        }
        unsafe fn kernel(
            steps: usize,
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            add: bool,
        ) {
            // SAFETY: forwarded contract (avx512f present, pointers valid).
            unsafe { k512::<12>(steps, a, b, c, ldc, add) }
        }
        unsafe fn kernel_rows(
            rows: usize,
            steps: usize,
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            add: bool,
        ) -> bool {
            // SAFETY: forwarded contract (avx512f present, pointers valid for `rows` rows).
            unsafe { by_rows!(rows, k512(steps, a, b, c, ldc, add)) }
        }
    }

    /// `$f::<R>(args)` for R = `$rows` in 1..=11, true; false for any other row count.
    macro_rules! by_rows {
        ($rows:expr, $f:ident($($arg:expr),*)) => {
            match $rows {
                1 => { $f::<1>($($arg),*); true }
                2 => { $f::<2>($($arg),*); true }
                3 => { $f::<3>($($arg),*); true }
                4 => { $f::<4>($($arg),*); true }
                5 => { $f::<5>($($arg),*); true }
                6 => { $f::<6>($($arg),*); true }
                7 => { $f::<7>($($arg),*); true }
                8 => { $f::<8>($($arg),*); true }
                9 => { $f::<9>($($arg),*); true }
                10 => { $f::<10>($($arg),*); true }
                11 => { $f::<11>($($arg),*); true }
                _ => false,
            }
        };
    }
    use by_rows;

    /// R × 32 f32 tile (R ≤ 12; 12 is the full tile: 24 zmm accumulators), two B vectors and
    /// R broadcasts per k step. The A micro-panel has 12 values per step whatever R.
    ///
    /// # Safety
    /// avx512f present; `a` valid for steps·12 floats, `b` for steps·32, `c` for R rows of 32
    /// floats `ldc` apart.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn k512<const R: usize>(
        steps: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let pf = steps.saturating_sub(C_PREFETCH_STEPS);
        for s in 0..steps {
            if s.wrapping_sub(pf) < R {
                // SAFETY: row s − pf < R of the C tile (valid memory, per the contract).
                unsafe { prefetch_row(c.add((s - pf) * ldc)) };
            }
            // SAFETY: s < steps: within the packed B micro-panel and A micro-panel.
            unsafe {
                let b0 = _mm512_loadu_ps(b.add(s * 32));
                let b1 = _mm512_loadu_ps(b.add(s * 32 + 16));
                let ar = a.add(s * 12);
                for (r, accr) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ar.add(r));
                    accr[0] = _mm512_fmadd_ps(av, b0, accr[0]);
                    accr[1] = _mm512_fmadd_ps(av, b1, accr[1]);
                }
            }
        }
        // SAFETY: forwarded contract (`c` valid for R rows of 32 floats `ldc` apart).
        unsafe { store_tile512(&acc, c, ldc, add) }
    }

    /// k steps before a tile's end at which its block of C starts being prefetched, one row
    /// per step. C is touched once per k-block and is by then out of L1 (often out of L2);
    /// without this `store_tile512` waits for its lines. About 2 000 cycles ahead: long enough
    /// for an L3 or DRAM fetch, short enough that the B stream does not evict the lines again.
    /// Prefetching the whole tile at one step was slower than a row per step: the burst holds
    /// the L1 miss buffers the B stream needs. At the prefill and vision shapes (variants
    /// interleaved in one process, 2 threads, best and mean of 6–8) a row per step was 3–7 %
    /// faster than no prefetch in f32 and 0–4 % with bf16 products; the whole-tile burst was
    /// in between.
    const C_PREFETCH_STEPS: usize = 96;

    /// Prefetches the lines of one 32-float row of a C tile into L1.
    ///
    /// # Safety
    /// avx512f present (for inlining into the kernels); `p` points at 32 floats (prefetches
    /// never fault, but the addresses are computed with `add`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn prefetch_row(p: *const f32) {
        // SAFETY: 32 floats = 128 bytes from `p`: two lines when 64-byte aligned, three
        // otherwise (bytes 0, 64 and 124 lie in all of them).
        unsafe {
            let p = p as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.add(64));
            _mm_prefetch::<_MM_HINT_T0>(p.add(124));
        }
    }

    /// Adds (or, `add` false, stores) an R × 32 tile of accumulators into C.
    ///
    /// # Safety
    /// avx512f present; `c` valid for R rows of 32 floats `ldc` apart.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tile512<const R: usize>(
        acc: &[[__m512; 2]; R],
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        for (r, accr) in acc.iter().enumerate() {
            // SAFETY: row r < R of the C tile, 32 floats.
            unsafe {
                let p = c.add(r * ldc);
                if add {
                    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), accr[0]));
                    _mm512_storeu_ps(
                        p.add(16),
                        _mm512_add_ps(_mm512_loadu_ps(p.add(16)), accr[1]),
                    );
                } else {
                    _mm512_storeu_ps(p, accr[0]);
                    _mm512_storeu_ps(p.add(16), accr[1]);
                }
            }
        }
    }

    // SAFETY: `kernel` requires avx512f and avx512bf16, which `drive::<Avx512Bf16>` callers
    // guarantee.
    unsafe impl Kernel for Avx512Bf16 {
        /// A pair of bf16 along k: low half k = 2s, high half k = 2s + 1.
        type P = u32;
        const MR: usize = 12;
        const NR: usize = 32;
        const KP: usize = 2;
        fn round_bf16(_: super::Precision) -> bool {
            true
        }
        fn pack(vals: [f32; 2], _round: bool) -> u32 {
            super::bf16_bits(vals[0]) | (super::bf16_bits(vals[1]) << 16)
        }
        unsafe fn kernel(
            steps: usize,
            a: *const u32,
            b: *const u32,
            c: *mut f32,
            ldc: usize,
            add: bool,
        ) {
            // SAFETY: forwarded contract (avx512f + avx512bf16 present, pointers valid).
            unsafe { k512bf16::<12>(steps, a, b, c, ldc, add) }
        }
        unsafe fn kernel_rows(
            rows: usize,
            steps: usize,
            a: *const u32,
            b: *const u32,
            c: *mut f32,
            ldc: usize,
            add: bool,
        ) -> bool {
            // SAFETY: forwarded contract (avx512f + avx512bf16 present, pointers valid for
            // `rows` rows).
            unsafe { by_rows!(rows, k512bf16(steps, a, b, c, ldc, add)) }
        }
    }

    /// R × 32 tile (R ≤ 12) of bf16-pair dot products (`vdpbf16ps`), f32 accumulators; the A
    /// micro-panel has 12 pairs per step whatever R.
    ///
    /// # Safety
    /// avx512f and avx512bf16 present; `a` valid for steps·12 pairs, `b` for steps·32 pairs,
    /// `c` for R rows of 32 floats `ldc` apart.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn k512bf16<const R: usize>(
        steps: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let pf = steps.saturating_sub(C_PREFETCH_STEPS);
        for s in 0..steps {
            if s.wrapping_sub(pf) < R {
                // SAFETY: row s − pf < R of the C tile (valid memory, per the contract).
                unsafe { prefetch_row(c.add((s - pf) * ldc)) };
            }
            // SAFETY: s < steps: within the packed micro-panels. The transmutes reinterpret
            // 512 bits of bf16 pairs as the bf16 vector type (same size, any bits valid).
            unsafe {
                let b0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(s * 32) as *const _));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(s * 32 + 16) as *const _));
                let ar = a.add(s * 12);
                for (r, accr) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(r) as i32));
                    accr[0] = _mm512_dpbf16_ps(accr[0], av, b0);
                    accr[1] = _mm512_dpbf16_ps(accr[1], av, b1);
                }
            }
        }
        // SAFETY: forwarded contract (`c` valid for 12 rows of 32 floats `ldc` apart).
        unsafe { store_tile512(&acc, c, ldc, add) }
    }

    // SAFETY: `kernel` requires avx2 and fma, which `drive::<Avx2>` callers guarantee.
    unsafe impl Kernel for Avx2 {
        type P = f32;
        const MR: usize = 6;
        const NR: usize = 16;
        const KP: usize = 1;
        fn pack(vals: [f32; 2], round: bool) -> f32 {
            super::pack_f32(vals, round)
        }
        unsafe fn kernel(
            steps: usize,
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            add: bool,
        ) {
            // SAFETY: forwarded contract (avx2 + fma present, pointers valid).
            unsafe { k256(steps, a, b, c, ldc, add) }
        }
    }

    /// 6 × 16 f32 tile: 12 ymm accumulators, two B vectors and one broadcast per k step.
    ///
    /// # Safety
    /// avx2 and fma present; `a` valid for steps·6 floats, `b` for steps·16, `c` for 6 rows of
    /// 16 floats `ldc` apart.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn k256(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, add: bool) {
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        for s in 0..steps {
            // SAFETY: s < steps: within the packed micro-panels.
            unsafe {
                let b0 = _mm256_loadu_ps(b.add(s * 16));
                let b1 = _mm256_loadu_ps(b.add(s * 16 + 8));
                let ar = a.add(s * 6);
                for (r, accr) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_ps(*ar.add(r));
                    accr[0] = _mm256_fmadd_ps(av, b0, accr[0]);
                    accr[1] = _mm256_fmadd_ps(av, b1, accr[1]);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            // SAFETY: row r < 6 of the C tile, 16 floats.
            unsafe {
                let p = c.add(r * ldc);
                if add {
                    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), accr[0]));
                    _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), accr[1]));
                } else {
                    _mm256_storeu_ps(p, accr[0]);
                    _mm256_storeu_ps(p.add(8), accr[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::tests::lcg;

    /// f64 reference of `A·B + bias` (and accumulate/act), operands optionally rounded to bf16.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[f32],
        b: &[f32],
        m: usize,
        n: usize,
        k: usize,
        bt: bool,
        c0: &[f32],
        opts: &GemmOpts<'_>,
    ) -> Vec<f64> {
        let r = |x: f32| {
            if opts.precision == Precision::Bf16 {
                round_to_bf16(x) as f64
            } else {
                x as f64
            }
        };
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let bv = if bt { b[j * k + p] } else { b[p * n + j] };
                    s += r(a[i * k + p]) * r(bv);
                }
                s += opts.bias_n.map_or(0.0, |v| v[j] as f64);
                s += opts.bias_m.map_or(0.0, |v| v[i] as f64);
                if opts.accumulate {
                    s += c0[i * n + j] as f64;
                }
                if opts.act == Act::GeluErf {
                    s = s * 0.5 * (1.0 + erf(s / 2f64.sqrt()));
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn erf(x: f64) -> f64 {
        crate::elementwise::tests::erf64(x)
    }

    /// Runs every path this CPU has on one shape and compares with the f64 reference.
    /// Tolerance: |err| ≤ tol · Σ_p |a_p·b_p| (+ slack for bias/accumulate), the usual bound
    /// for f32 sums of k products in any order (tol = 1e-5 f32, 2e-5 bf16: products of
    /// bf16-rounded operands are exact in f32, so both are summation error).
    fn check_shape(m: usize, n: usize, k: usize, bt: bool, seed: u64) {
        let mut s = seed;
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let bias_n: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let bias_m: Vec<f32> = (0..m).map(|_| lcg(&mut s)).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
        let b16: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
        let b16f: Vec<f32> = b16.iter().map(|x| x.to_f32()).collect();
        for path in gemm_paths() {
            for precision in [Precision::F32, Precision::Bf16] {
                for variant in 0..4 {
                    let opts = GemmOpts {
                        bias_n: (variant & 1 == 1).then_some(&bias_n[..]),
                        bias_m: (variant == 2).then_some(&bias_m[..]),
                        accumulate: variant >= 2,
                        act: if variant == 3 {
                            Act::GeluErf
                        } else {
                            Act::None
                        },
                        precision,
                        serial: variant == 1,
                    };
                    for bf16_b in [false, true] {
                        let mut c = c0.clone();
                        let bref = match (bf16_b, bt) {
                            (true, true) => BRef::Bf16(MatRef::transposed(&b16, k, n)),
                            (true, false) => BRef::Bf16(MatRef::row_major(&b16, k, n)),
                            (false, true) => BRef::F32(MatRef::transposed(&b, k, n)),
                            (false, false) => BRef::F32(MatRef::row_major(&b, k, n)),
                        };
                        gemm_on(path, MatRef::row_major(&a, m, k), bref, &mut c, n, &opts).unwrap();
                        let bsrc = if bf16_b { &b16f } else { &b };
                        let want = reference(&a, bsrc, m, n, k, bt, &c0, &opts);
                        let tol = if precision == Precision::Bf16 {
                            2e-5
                        } else {
                            1e-5
                        };
                        for i in 0..m {
                            for j in 0..n {
                                let mag: f64 = (0..k)
                                    .map(|p| {
                                        let bv = if bt { bsrc[j * k + p] } else { bsrc[p * n + j] };
                                        (a[i * k + p] as f64 * bv as f64).abs()
                                    })
                                    .sum::<f64>()
                                    + 3.0;
                                let got = c[i * n + j] as f64;
                                let w = want[i * n + j];
                                assert!(
                                    (got - w).abs() <= tol * mag,
                                    "{path} {precision:?} v{variant} bf16_b={bf16_b} \
                                     {m}x{n}x{k} bt={bt} at ({i},{j}): {got} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn odd_and_tiny_shapes_on_every_path() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 5, 1),
            (13, 33, 1),
            (12, 32, 7),
            (25, 65, 3),
            (7, 100, 257),
            (37, 70, 513),
            (3, 17, 2),
        ] {
            check_shape(m, n, k, true, 1 + m as u64);
            check_shape(m, n, k, false, 2 + n as u64);
        }
    }

    #[test]
    fn every_row_count_of_a_panel_on_every_path() {
        // m = 1..=25 covers each partial panel (the row-count kernels, 1..MR-1 rows) alone and
        // after full panels; k = 300 is long enough for the C prefetch to run mid-tile (both
        // for f32 and for bf16 pairs); n = 69 mixes full and partial column tiles.
        for m in 1..=25 {
            check_shape(m, 69, 300, true, 40 + m as u64);
        }
    }

    #[test]
    fn large_shapes_on_every_path() {
        // Several stripes, several k-blocks, partial tiles on both edges, parallel tasks.
        check_shape(61, 700, 600, true, 11);
        check_shape(50, 1030, 300, false, 12);
    }

    #[test]
    fn leading_dimension_leaves_other_columns_alone() {
        let (m, n, k, ldc) = (5, 7, 9, 11);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| i as f32 * 0.01).collect();
        let mut c = vec![42f32; (m - 1) * ldc + n];
        gemm(
            MatRef::row_major(&a, m, k),
            BRef::F32(MatRef::row_major(&b, k, n)),
            &mut c,
            ldc,
            &GemmOpts::default(),
        )
        .unwrap();
        for i in 0..m - 1 {
            assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 42.0));
        }
        let want: f32 = (0..k).map(|p| a[p] * b[p * n]).sum();
        assert!((c[0] - want).abs() < 1e-4);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let a = vec![0f32; 6];
        let b = vec![0f32; 6];
        let mut c = vec![0f32; 4];
        let o = GemmOpts::default();
        let am = MatRef::row_major(&a, 2, 3);
        // Inner dimension mismatch.
        assert!(gemm(am, BRef::F32(MatRef::row_major(&b, 2, 3)), &mut c, 2, &o).is_err());
        // B view past its slice.
        assert!(gemm(am, BRef::F32(MatRef::row_major(&b, 3, 3)), &mut c, 3, &o).is_err());
        // C too short / ldc too small.
        let bm = BRef::F32(MatRef::row_major(&b, 3, 2));
        assert!(gemm(am, bm, &mut c[..3], 2, &o).is_err());
        assert!(gemm(am, bm, &mut c, 1, &o).is_err());
        // Bias lengths.
        let bias = [0f32; 3];
        let ob = GemmOpts {
            bias_n: Some(&bias),
            ..Default::default()
        };
        assert!(gemm(am, bm, &mut c, 2, &ob).is_err());
        let ob = GemmOpts {
            bias_m: Some(&bias),
            ..Default::default()
        };
        assert!(gemm(am, bm, &mut c, 2, &ob).is_err());
        // Fine, and empty shapes are no-ops.
        assert!(gemm(am, bm, &mut c, 2, &o).is_ok());
        assert!(gemm(MatRef::row_major(&a, 0, 3), bm, &mut [], 2, &o).is_ok());
        // k = 0: the bias alone, activated.
        let bias = [1f32, -1.0];
        let og = GemmOpts {
            bias_n: Some(&bias),
            act: Act::GeluErf,
            ..Default::default()
        };
        let mut c0 = [9f32; 2];
        gemm(
            MatRef::row_major(&[], 1, 0),
            BRef::F32(MatRef::row_major(&[], 0, 2)),
            &mut c0,
            2,
            &og,
        )
        .unwrap();
        assert!((c0[0] - 0.841_344_7).abs() < 1e-6 && (c0[1] + 0.158_655_3).abs() < 1e-6);
        // Unknown path.
        assert!(gemm_on("neon", am, bm, &mut c, 2, &o).is_err());
    }

    #[test]
    fn bf16_rounding_equals_half() {
        let mut s = 5u64;
        let special = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE,
            1e-40,
            f32::from_bits(0x3f80_8000), // a tie, rounds to even (down)
            f32::from_bits(0x3f81_8000), // a tie, rounds to even (up)
            f32::from_bits(0x7f7f_ffff), // rounds to infinity
        ];
        let random = (0..100_000).map(|_| f32::from_bits((lcg(&mut s).to_bits()).rotate_left(7)));
        for x in special.into_iter().chain(random) {
            assert_eq!(
                bf16_bits(x) as u16,
                bf16::from_f32(x).to_bits(),
                "{x:e} ({:#x})",
                x.to_bits()
            );
        }
    }

    #[test]
    fn prepacked_a_gives_the_same_product() {
        let mut s = 11u64;
        for (m, k, n) in [(1, 1, 1), (13, 7, 33), (40, 300, 70)] {
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            for precision in [Precision::F32, Precision::Bf16] {
                for serial in [false, true] {
                    let opts = GemmOpts {
                        bias_n: Some(&bias),
                        precision,
                        serial,
                        ..Default::default()
                    };
                    let am = MatRef::row_major(&a, m, k);
                    let bm = BRef::F32(MatRef::row_major(&b, k, n));
                    let mut want = vec![0f32; m * n];
                    gemm(am, bm, &mut want, n, &opts).unwrap();
                    let pa = PackedA::new(am, precision).unwrap();
                    assert_eq!((pa.rows(), pa.cols()), (m, k));
                    let mut got = vec![0f32; m * n];
                    gemm_packed(&pa, bm, &mut got, n, &opts).unwrap();
                    assert_eq!(got, want, "{m}×{k}×{n} {precision:?} serial {serial}");
                    // Wrong inner dimension or precision: errors.
                    let other = if precision == Precision::F32 {
                        Precision::Bf16
                    } else {
                        Precision::F32
                    };
                    let wrong = GemmOpts {
                        precision: other,
                        ..opts
                    };
                    assert!(gemm_packed(&pa, bm, &mut got, n, &wrong).is_err());
                    let short = BRef::F32(MatRef::row_major(&b, k - 1, n));
                    if k > 1 {
                        assert!(gemm_packed(&pa, short, &mut got, n, &opts).is_err());
                    }
                }
            }
        }
    }

    /// Parts packed side by side hold the very bytes of the stacked matrix packed whole, on
    /// f32 and bf16 sources, at both precisions; parts that cannot stack are errors.
    #[test]
    fn stacked_parts_pack_like_the_stacked_matrix() {
        /// The rows of W (`[Σ widths, k]`, read transposed) as one view per part.
        fn split<'a, T>(w: &'a [T], k: usize, widths: &[usize]) -> Vec<MatRef<'a, T>> {
            let mut at = 0;
            widths
                .iter()
                .map(|&wd| {
                    at += wd * k;
                    MatRef::transposed(&w[at - wd * k..at], k, wd)
                })
                .collect()
        }
        let mut s = 9u64;
        let (k, widths) = (70, [32usize, 64, 13]);
        let n: usize = widths.iter().sum();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        for precision in [Precision::F32, Precision::Bf16] {
            let parts: Vec<BRef<'_>> = split(&w, k, &widths).into_iter().map(BRef::F32).collect();
            let parts_b: Vec<BRef<'_>> =
                split(&wb, k, &widths).into_iter().map(BRef::Bf16).collect();
            for (whole, parts, what) in [
                (BRef::F32(MatRef::transposed(&w, k, n)), &parts, "f32"),
                (BRef::Bf16(MatRef::transposed(&wb, k, n)), &parts_b, "bf16"),
            ] {
                let whole = PackedB::new(whole, precision).unwrap();
                let stacked = PackedB::stacked(parts, precision).unwrap();
                assert_eq!((stacked.rows(), stacked.cols()), (k, n));
                assert_eq!(stacked.data, whole.data, "{what} source, {precision:?}");
            }
            // A part that is not the last must be a whole number of tiles wide, all parts
            // must share k, and there must be parts.
            let ragged = [parts[2], parts[0]];
            assert!(PackedB::stacked(&ragged, precision).is_err());
            let short = BRef::F32(MatRef::transposed(&w[..(k - 1) * 32], k - 1, 32));
            assert!(PackedB::stacked(&[parts[0], short], precision).is_err());
            assert!(PackedB::stacked(&[], precision).is_err());
        }
    }

    /// A weight packed once as B (f32 or bf16 storage, `[n, k]` read transposed, as a linear
    /// layer's) gives the product `gemm` gives packing it per call, bit for bit, with bias,
    /// GELU or accumulation, across several k-blocks and stripes and ragged edges.
    #[test]
    fn prepacked_b_gives_the_same_product() {
        let mut s = 5u64;
        for (m, k, n) in [(1, 1, 1), (13, 7, 33), (40, 1100, 70), (30, 64, 600)] {
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let start: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
            let weights = [
                BRef::F32(MatRef::transposed(&w, k, n)),
                BRef::Bf16(MatRef::transposed(&wb, k, n)),
            ];
            for (bm, precision) in weights
                .into_iter()
                .flat_map(|b| [(b, Precision::F32), (b, Precision::Bf16)])
            {
                let pb = PackedB::new(bm, precision).unwrap();
                assert_eq!((pb.rows(), pb.cols()), (k, n));
                for (act, accumulate) in
                    [(Act::None, false), (Act::GeluErf, false), (Act::None, true)]
                {
                    let opts = GemmOpts {
                        bias_n: Some(&bias),
                        precision,
                        act,
                        accumulate,
                        ..Default::default()
                    };
                    let am = MatRef::row_major(&a, m, k);
                    let mut want = start.clone();
                    gemm(am, bm, &mut want, n, &opts).unwrap();
                    let mut got = start.clone();
                    gemm_packed_b(am, &pb, &mut got, n, &opts).unwrap();
                    assert_eq!(got, want, "{m}×{k}×{n} {precision:?} {act:?} {accumulate}");
                }
                // Wrong precision, inner dimension or C: errors, C untouched.
                let other = match precision {
                    Precision::F32 => Precision::Bf16,
                    Precision::Bf16 => Precision::F32,
                };
                let opts = GemmOpts {
                    precision: other,
                    ..Default::default()
                };
                let mut c = vec![7f32; m * n];
                let am = MatRef::row_major(&a, m, k);
                assert!(gemm_packed_b(am, &pb, &mut c, n, &opts).is_err());
                let opts = GemmOpts {
                    precision,
                    ..Default::default()
                };
                if k > 1 {
                    let narrow = MatRef::row_major(&a, m, k - 1);
                    assert!(gemm_packed_b(narrow, &pb, &mut c, n, &opts).is_err());
                }
                assert!(gemm_packed_b(am, &pb, &mut c[..m * n - 1], n, &opts).is_err());
                assert!(c.iter().all(|&x| x == 7.0));
            }
        }
    }
}
