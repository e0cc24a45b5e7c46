//! Operands packed once for many products: [`PackedA`], [`PackedB`].

use super::dispatch::{on_path, path, Path};
use super::kernel::{as_packed_mut, Kernel};
use super::pack::{pack_a, pack_b, packed_a_len};
use super::{BRef, GemmError, MatRef, Precision};
use half::bf16;
use rayon::prelude::*;

/// A left operand packed once for the default path of a precision, for products that reuse it
/// many times (a convolution's transformed weights): [`gemm_packed`] then skips packing A.
///
/// [`gemm_packed`]: super::gemm_packed
#[derive(Clone, Debug)]
pub struct PackedA {
    pub(super) path: Path,
    pub(super) precision: Precision,
    pub(super) m: usize,
    pub(super) k: usize,
    /// Packed elements of the path's kernel (f32 bits, or bf16 pairs).
    pub(super) data: Vec<u32>,
}

impl PackedA {
    /// Packs `a` for [`gemm_packed`](super::gemm_packed) calls with `precision`; errors if the
    /// view reaches past its slice.
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
///
/// [`gemm_packed_b`]: super::gemm_packed_b
#[derive(Clone, Debug)]
pub struct PackedB {
    pub(super) path: Path,
    pub(super) precision: Precision,
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) data: Vec<u32>,
}

impl PackedB {
    /// Packs `b` (`k × n`) for [`gemm_packed_b`](super::gemm_packed_b) calls with `precision`;
    /// errors if the view reaches past its slice.
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
