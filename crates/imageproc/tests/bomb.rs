//! Decompression bombs are refused from the header, before any pixel buffer exists. A counting
//! allocator measures the peak heap use; this file holds a single test so nothing else allocates
//! concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use janus_imageproc::{decode_rgb, ImageError, ImageLimits};

mod common;
use common::png_claiming;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A baseline JPEG whose SOF0 claims `width` x `height`, with a stub scan.
fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut j = vec![0xff, 0xd8];
    j.extend_from_slice(&[0xff, 0xc0, 0x00, 0x11, 0x08]);
    j.extend_from_slice(&height.to_be_bytes());
    j.extend_from_slice(&width.to_be_bytes());
    j.extend_from_slice(&[0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
    j.extend_from_slice(&[
        0xff, 0xda, 0x00, 0x0c, 0x03, 0x01, 0x00, 0x02, 0x11, 0x03, 0x11, 0x00, 0x3f, 0x00,
    ]);
    j.extend_from_slice(&[0x00; 16]);
    j.extend_from_slice(&[0xff, 0xd9]);
    j
}

#[test]
fn bombs_are_refused_from_the_header_without_allocating() {
    let limits = ImageLimits::default();

    let png = png_claiming(50_000, 50_000);
    let before = CURRENT.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let err = decode_rgb(&png, &limits).unwrap_err();
    let peak = PEAK.load(Ordering::SeqCst) - before;
    println!("PNG 50000x50000 claim: {err} (peak heap {peak} bytes)");
    assert!(
        matches!(
            err,
            ImageError::TooManyPixels {
                width: 50_000,
                height: 50_000,
                limit: 40_000_000
            }
        ),
        "{err:?}"
    );
    // 7.5 GB would be needed to decode; the header check stays in the kilobytes.
    assert!(peak < 4 << 20, "peak heap {peak} bytes");

    let jpeg = jpeg_claiming(60_000, 60_000);
    let before = CURRENT.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let err = decode_rgb(&jpeg, &limits).unwrap_err();
    let peak = PEAK.load(Ordering::SeqCst) - before;
    println!("JPEG 60000x60000 claim: {err} (peak heap {peak} bytes)");
    assert!(
        matches!(
            err,
            ImageError::TooManyPixels {
                width: 60_000,
                height: 60_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(peak < 4 << 20, "peak heap {peak} bytes");
}
