//! The `janus` binary's memory trimmer (src/memtrim.rs) under its allocator, mimalloc: freed
//! memory of a burst stays committed while the process is busy and goes back to the OS once
//! it is quiet. One test in its own binary, so nothing else moves the RSS meanwhile.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../src/memtrim.rs"]
#[allow(dead_code)]
mod memtrim;

use std::time::{Duration, Instant};

const MB: u64 = 1 << 20;

/// A 16k-token prompt's transients in miniature: tensors of 8–200 MiB allocated, written and
/// freed layer after layer on a long-lived "model thread", which then goes idle.
fn burst() {
    let sizes = [8usize, 48, 96, 200, 64, 200, 32, 128];
    for _layer in 0..4 {
        let live: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&mb| {
                let mut v = vec![0u8; mb << 20];
                for p in v.iter_mut().step_by(4096) {
                    *p = 1;
                }
                v
            })
            .collect();
        std::hint::black_box(&live);
    }
}

fn rss() -> u64 {
    memtrim::rss_bytes().unwrap()
}

#[test]
fn burst_memory_is_held_while_busy_and_returned_when_quiet() {
    memtrim::configure_allocator(true);
    let before = rss();
    // The model thread stays alive (as the engines' threads do) after the burst.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel::<()>();
    let model = std::thread::spawn(move || {
        burst();
        done_tx.send(()).unwrap();
        let _ = exit_rx.recv();
    });
    done_rx.recv().unwrap();
    let held = rss();
    eprintln!(
        "rss: before {} MiB, after the burst {} MiB",
        before / MB,
        held / MB
    );
    // mimalloc keeps the freed memory (no purge on the hot path: reuse does not page-fault).
    assert!(
        held > before + 400 * MB,
        "the burst's memory was not kept ({} -> {} MiB)",
        before / MB,
        held / MB
    );

    // Reusing it costs no new memory.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        burst();
        tx.send(()).unwrap();
    });
    rx.recv().unwrap();
    assert!(
        rss() < held + 64 * MB,
        "reuse grew the RSS to {} MiB",
        rss() / MB
    );

    // The trimmer, with a short interval, returns it once the process is quiet.
    let policy = memtrim::Policy {
        interval: Duration::from_millis(100),
        ..Default::default()
    };
    memtrim::spawn_trimmer_from(policy, before).unwrap();
    let t = Instant::now();
    while rss() > before + 100 * MB && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = rss();
    eprintln!(
        "rss after the trimmer: {} MiB ({:.1} s)",
        after / MB,
        t.elapsed().as_secs_f64()
    );
    assert!(
        after <= before + 100 * MB,
        "memory not returned: {} MiB before, {} MiB held, {} MiB after",
        before / MB,
        held / MB,
        after / MB
    );
    exit_tx.send(()).unwrap();
    model.join().unwrap();
}

/// The decision tests' policy: 100 bytes of growth, two quiet 1-s samples.
fn policy() -> memtrim::Policy {
    memtrim::Policy {
        interval: Duration::from_secs(1),
        grow_bytes: 100,
        quiet_ticks: 2,
        quiet_cpu: 0.1,
    }
}

#[test]
fn trimmer_waits_for_growth_and_quiet() {
    let ms = Duration::from_millis;
    let mut t = memtrim::Trimmer::new(policy(), 1000);
    assert!(!t.sample(1000, ms(0)));
    // Grown, but busy (0.5 s of CPU per 1 s interval).
    assert!(!t.sample(2000, ms(500)));
    assert!(!t.sample(2000, ms(1000)));
    // Quiet once: not yet.
    assert!(!t.sample(2000, ms(1010)));
    // Quiet twice: trim.
    assert!(t.sample(2000, ms(1020)));
    t.trimmed(2000, 1200);
    // Quiet but not grown since the trim: nothing to do.
    assert!(!t.sample(1250, ms(1030)));
    assert!(!t.sample(1250, ms(1040)));
    assert!(!t.sample(1250, ms(1050)));
    // Shrunk: the baseline follows it down.
    assert!(!t.sample(900, ms(1060)));
    assert!(t.sample(1001, ms(1070)));
}

/// A trim while a burst still holds its memory (slow clients are quiet) returns nothing; the
/// trimmer keeps its baseline and tries again after twice the quiet time, so the memory the burst
/// frees later is returned too.
#[test]
fn a_trim_of_memory_still_in_use_is_retried_later() {
    let ms = Duration::from_millis;
    let mut t = memtrim::Trimmer::new(policy(), 1000);
    assert!(!t.sample(2000, ms(0)));
    assert!(!t.sample(2000, ms(10)));
    assert!(t.sample(2000, ms(20)));
    // Almost nothing came back: the growth is in use.
    t.trimmed(2000, 1990);
    // Three quiet samples are not enough any more; the fourth tries again.
    assert!(!t.sample(2000, ms(30)));
    assert!(!t.sample(2000, ms(40)));
    assert!(!t.sample(2000, ms(50)));
    assert!(t.sample(2000, ms(60)));
    // This time it came back: growth is measured from here, with the usual wait.
    t.trimmed(2000, 1000);
    assert!(!t.sample(1050, ms(70)));
    assert!(!t.sample(1050, ms(80)));
    assert!(!t.sample(1099, ms(90)));
    assert!(t.sample(1101, ms(100)));
}
