//! The micro-kernel interface: [`Kernel`] (packed element, tile shape, the kernel itself), the
//! packed-element conversions the kernels share, and views of `u32` storage as packed elements.

use super::{Act, Precision};
use crate::math;

/// One micro-kernel family: packed element type and tile shape.
///
/// # Safety
/// Implementors' `kernel` may require CPU features; `drive::<K>` may only be called when the
/// CPU has them.
pub(super) unsafe trait Kernel {
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
            Act::GeluErf => math::gelu_erf_inplace(row),
        }
    }
}

/// The packed element of the f32 kernels: the k value itself, rounded to bf16 when the
/// product emulates bf16 precision.
pub(super) fn pack_f32(vals: [f32; 2], round: bool) -> f32 {
    if round {
        round_to_bf16(vals[0])
    } else {
        vals[0]
    }
}

pub(super) fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits(bf16_bits(x) << 16)
}

/// The bf16 nearest to `x` (ties to even; NaN stays a quiet NaN) as its 16 bits in a u32: the
/// rounding of `half::bf16::from_f32`, written without branches so packing loops vectorise.
#[inline(always)]
pub(super) fn bf16_bits(x: f32) -> u32 {
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

/// `u32` storage viewed as the packed elements of kernel `K`.
pub(super) fn as_packed<K: Kernel>(data: &[u32]) -> &[K::P] {
    const { assert!(std::mem::size_of::<K::P>() == 4 && std::mem::align_of::<K::P>() <= 4) };
    // SAFETY: `K::P` is f32 or u32 (size 4, align ≤ 4, every bit pattern valid; see `Kernel`),
    // and the slice covers `data.len()` initialised u32s.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<K::P>(), data.len()) }
}

/// [`as_packed`], mutable.
pub(super) fn as_packed_mut<K: Kernel>(data: &mut [u32]) -> &mut [K::P] {
    const { assert!(std::mem::size_of::<K::P>() == 4 && std::mem::align_of::<K::P>() <= 4) };
    // SAFETY: as in `as_packed`.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<K::P>(), data.len()) }
}
