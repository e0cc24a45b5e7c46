//! CPU kernels: decode-shaped matrix products (a few activation rows times a big weight matrix,
//! [`linear_rows`]), large-M products with packing ([`gemm`]), attention ([`attention`]), 3×3
//! convolutions ([`winograd`]) and the elementwise work around them ([`elementwise`]).
//!
//! The modules by role, each importing only from those listed before it:
//! - `cpu`: the one runtime CPU feature detection, and `multiversion!` (a function compiled
//!   once per SIMD level, dispatched on the detected one).
//! - `sync`: the pointer that lets parallel tasks write disjoint parts of one output, and the
//!   per-thread scratch buffers.
//! - `math`: shared math: the vectorisable `exp` and the exact-erf GELU.
//! - `gemv`: the decode GEMV ([`linear_rows`]).
//! - [`gemm`]: the packed GEMM (a folder: API and checks, packed operands, packing, driver,
//!   kernel trait, per-ISA kernels, tests).
//! - [`quant`]: 8- and 4-bit block weights (GGUF's `Q8_0`, `Q4_1`) and their decode and
//!   large-M products (integer dots; dequantized into the GEMM).
//! - [`elementwise`]: vectorised elementwise and row-wise passes (GELU, LayerNorm, GroupNorm,
//!   gated SiLU, adds).
//! - [`attention`]: multi-head attention, its products on the GEMM.
//! - [`winograd`]: 3×3 convolutions, their products on the GEMM.

pub mod attention;
mod cpu;
pub mod elementwise;
pub mod gemm;
mod gemv;
mod math;
pub mod quant;
mod stream;
mod sync;
#[cfg(test)]
mod test_util;
pub mod winograd;

pub use gemv::{linear_rows, linear_rows_on, linear_rows_scalar, simd_level, Weights};
