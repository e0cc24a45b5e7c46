//! Which micro-kernel runs: a [`Path`] per CPU and precision ([`path`]), and [`on_path!`], the
//! one dispatch from a path to its kernel type.

use super::Precision;
use crate::cpu::{self, Level};

/// `$f::<K>(args)` with `K` the kernel of path `$p` (the one dispatch from a path to a kernel).
/// For the `unsafe` kernel entry points the caller states why the CPU has the path's features.
macro_rules! on_path {
    ($p:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $p {
            #[cfg(target_arch = "x86_64")]
            $crate::gemm::dispatch::Path::Avx512Bf16 => {
                $f::<$crate::gemm::avx512::Avx512Bf16>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            $crate::gemm::dispatch::Path::Avx512 => $f::<$crate::gemm::avx512::Avx512>($($arg),*),
            #[cfg(target_arch = "x86_64")]
            $crate::gemm::dispatch::Path::Avx2 => $f::<$crate::gemm::avx2::Avx2>($($arg),*),
            _ => $f::<$crate::gemm::scalar::Portable>($($arg),*),
        }
    };
}
pub(super) use on_path;

/// A kernel choice: the CPU's level, and for bf16 products whether they run natively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    Avx512Bf16,
    Avx512,
    Avx2,
    Scalar,
}

/// The default path for `precision` on this CPU: the kernel of the CPU's level, or for bf16
/// products the native bf16 kernel where the CPU has it.
pub(super) fn path(precision: Precision) -> Path {
    let f32_path = match cpu::level() {
        Level::Avx512 => Path::Avx512,
        Level::Avx2 => Path::Avx2,
        Level::Scalar => Path::Scalar,
    };
    match precision {
        Precision::F32 => f32_path,
        Precision::Bf16 if cpu::has_avx512bf16() => Path::Avx512Bf16,
        Precision::Bf16 => f32_path,
    }
}
