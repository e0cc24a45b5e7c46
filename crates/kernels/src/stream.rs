//! Streams read once from memory (a decode step's quantized weights, its KV cache, a batched
//! step's prepacked weights): the hardware prefetcher alone leaves such a pass short of the
//! memory's rate on these CPUs, so the loops ask for each cache line some bytes before they
//! reach it ([`AHEAD`] for the decode dots and attention; the GEMM micro-kernels, which spend
//! longer per byte, use their own distance).

/// How far ahead of the bytes being used [`prefetch_ahead`] asks for them. Measured on a
/// Zen 5 pair of cores: 2 KiB took the 8-bit decode dots on the lm_head shape (too large for
/// the last-level cache) from 33–37 to 45–50 GB/s (1 KiB and 4 KiB were slower), and the
/// attention decode pass over a bf16 KV cache from 27–35 to 37–50 GB/s.
pub(crate) const AHEAD: usize = 2048;

/// Asks for the cache line [`AHEAD`] bytes past `p` (see [`prefetch_at`]).
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8) {
    prefetch_at(p, AHEAD)
}

/// Asks for the cache line `ahead` bytes past `p` (a hint: it never faults, so an address
/// past the end of the data is harmless; a no-op off x86-64).
#[inline(always)]
pub(crate) fn prefetch_at(p: *const u8, ahead: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not access memory architecturally; the address is only
    // computed (wrapping), never dereferenced.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, ahead);
}
