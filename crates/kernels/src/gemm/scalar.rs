//! The portable micro-kernel.

use super::kernel::{pack_f32, Kernel};

/// Portable kernel: plain Rust over small arrays, which LLVM vectorises for the baseline target.
pub(super) struct Portable;

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
