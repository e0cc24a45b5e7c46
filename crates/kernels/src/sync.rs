//! Plumbing of the parallel kernels: [`SendPtr`], the one pointer that lets rayon tasks write
//! disjoint parts of one output, and the per-thread scratch buffers ([`with_scratch`],
//! [`with_f32_scratch`]).

/// A mutable f32 slice handed to parallel tasks that each write a disjoint part of it.
///
/// Fields are reached through methods, not directly, so closures capture the whole Send
/// wrapper, not the raw pointer field.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: only copied between threads; users write disjoint parts (see each use).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
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

thread_local! {
    /// Packing buffers kept per thread between calls, so each product does not fault in (and
    /// zero) fresh pages for its packed A and B.
    static SCRATCH: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest buffer kept for reuse (32 Mi elements, 128 MiB); larger ones are freed after use.
const SCRATCH_KEEP: usize = 32 << 20;

/// Runs `f` on a buffer of `len` elements taken from this thread's scratch (nested calls get
/// distinct buffers). Its contents are whatever an earlier user left: `f` writes before it
/// reads. The GEMM views it as its kernels' packed elements.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
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
    let r = f(&mut buf[..len]);
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
    const { assert!(std::mem::size_of::<f32>() == 4 && std::mem::align_of::<f32>() <= 4) };
    with_scratch(len, |buf| {
        // SAFETY: f32 is 4 bytes with align ≤ 4 (as u32) and every bit pattern is a valid f32;
        // the slice covers `buf.len()` initialised u32s.
        f(unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<f32>(), buf.len()) })
    })
}
