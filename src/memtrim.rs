//! Giving memory back to the OS after a burst, cheaply.
//!
//! The `janus` binary allocates with mimalloc. While the process computes, freed memory must
//! stay committed: per-op tensors of tens to hundreds of MB are freed and reallocated every
//! layer, and returning them to the OS would fault in zeroed pages on every reuse. But a burst
//! (a 16k-token prompt, a large batch) leaves gigabytes of such freed memory behind, and a
//! process that never purges keeps its peak resident forever.
//!
//! So: [`configure_allocator`] sets mimalloc's purge delay to [`HOLD`] (an hour) instead of
//! "never". Freed arena memory is then *marked* for purging but, in practice, not purged while
//! the process is busy (no page-fault churn). [`spawn_trimmer`] starts a thread that wakes every
//! [`Policy::interval`], reads the process's RSS and CPU time from `/proc/self` (two small
//! reads), and when the process has grown by [`Policy::grow_bytes`] since the last trim and then
//! used almost no CPU for [`Policy::quiet_ticks`] intervals, calls `mi_collect(true)`: that
//! forces the purge of every marked free range of every arena (process-wide), returning it to
//! the OS with `MADV_DONTNEED`. Memory still in use (weights, KV caches of running requests) is
//! untouched; a busy process is never trimmed.
//!
//! `mi_collect` only reaches the calling thread's own pages: memory that the async runtime's
//! worker threads freed (connection and stream state of a burst of requests, say) sits in
//! their heaps. So a trim also bumps [`TRIM_EPOCH`] and wakes the runtime's workers
//! ([`register_runtime`]); each worker collects its own heap the next time it parks
//! ([`on_worker_park`], installed with `on_thread_park`) after an epoch change.
//!
//! `JANUS_MEM_TRIM=0` (or `off`) leaves mimalloc's purging as it was before this module: never.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Incremented by every trim; a runtime worker that sees a new value collects its heap.
pub static TRIM_EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SEEN_EPOCH: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The runtime whose workers a trim wakes, and how many it has.
static RUNTIME: OnceLock<(tokio::runtime::Handle, usize)> = OnceLock::new();

/// Registers the process's async runtime (its `workers` threads run [`on_worker_park`]).
pub fn register_runtime(handle: tokio::runtime::Handle, workers: usize) {
    let _ = RUNTIME.set((handle, workers));
}

/// For the runtime's `on_thread_park`: after a trim, returns this worker's freed memory to the
/// OS (once per trim; otherwise an atomic load).
pub fn on_worker_park() {
    let epoch = TRIM_EPOCH.load(Ordering::Relaxed);
    SEEN_EPOCH.with(|seen| {
        if seen.get() != epoch {
            seen.set(epoch);
            trim();
        }
    });
}

/// Asks every runtime worker to collect its heap: bumps the epoch and spawns a few empty
/// tasks, which wake parked workers (they collect when they park again).
fn trim_workers() {
    TRIM_EPOCH.fetch_add(1, Ordering::Relaxed);
    if let Some((handle, workers)) = RUNTIME.get() {
        for _ in 0..workers * 2 {
            handle.spawn(async {});
        }
    }
}

/// mimalloc's `purge_delay` option id (`mi_option_purge_delay` in mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc's `arena_purge_mult` option id (`mi_option_arena_purge_mult`).
const MI_OPTION_ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;

/// Purge delay while trimming is on: long enough that a busy process never purges on its own.
pub const HOLD: Duration = Duration::from_secs(3600);

/// Whether `JANUS_MEM_TRIM` allows trimming (default: yes).
pub fn enabled() -> bool {
    !matches!(
        std::env::var("JANUS_MEM_TRIM").ok().as_deref(),
        Some("0" | "off" | "false" | "no")
    )
}

/// Sets the allocator's purge policy; call first thing in `main`, before other threads exist.
/// With trimming on, freed memory is marked for a purge after [`HOLD`] (so that
/// [`trim`] can return it); with it off, freed memory is never purged.
pub fn configure_allocator(trimming: bool) {
    let delay = if trimming {
        HOLD.as_millis() as i64
    } else {
        -1
    };
    // SAFETY: plain option setters of the allocator.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_PURGE_MULT, 1);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay as _);
    }
}

/// Returns the freed memory of all arenas to the OS now (`mi_collect(true)`).
pub fn trim() {
    // SAFETY: mimalloc's collection entry point, callable from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// When the trimmer trims.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// How often the process is sampled.
    pub interval: Duration,
    /// Growth of the RSS since the last trim (or its lowest point since) that makes a trim
    /// worth it.
    pub grow_bytes: u64,
    /// Consecutive quiet samples needed.
    pub quiet_ticks: u32,
    /// A sample is quiet when the process used less CPU than this fraction of the interval
    /// (all threads together).
    pub quiet_cpu: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            grow_bytes: 32 << 20,
            quiet_ticks: 2,
            quiet_cpu: 0.1,
        }
    }
}

/// Resident set size of this process (`VmRSS`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time of all threads of this process (user + system), from `/proc/self/stat`.
pub fn cpu_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux configuration that matters.
    Some(Duration::from_millis(ticks * 10))
}

/// The trimmer's decision logic, separate from the clock and `/proc` for tests.
#[derive(Debug)]
pub struct Trimmer {
    policy: Policy,
    /// RSS after the last trim that returned memory, lowered when the process shrinks.
    baseline: u64,
    quiet: u32,
    /// Quiet samples needed before the next trim: `quiet_ticks`, doubled (up to 64 times) after
    /// each trim that returned little because the growth was still in use (a burst of slow
    /// clients holds its buffers while the process is quiet), so that the memory they free
    /// later is still returned.
    wait: u32,
    last_cpu: Option<Duration>,
    /// Trims done.
    pub trims: u64,
}

impl Trimmer {
    /// Starts from the current RSS.
    pub fn new(policy: Policy, rss: u64) -> Self {
        Self {
            policy,
            baseline: rss,
            quiet: 0,
            wait: policy.quiet_ticks,
            last_cpu: None,
            trims: 0,
        }
    }

    /// One sample; returns whether to trim now. Call [`Self::trimmed`] after trimming.
    pub fn sample(&mut self, rss: u64, cpu: Duration) -> bool {
        let busy = match self.last_cpu.replace(cpu) {
            Some(prev) => {
                cpu.saturating_sub(prev).as_secs_f64()
                    > self.policy.quiet_cpu * self.policy.interval.as_secs_f64()
            }
            None => true,
        };
        self.quiet = if busy { 0 } else { self.quiet + 1 };
        self.baseline = self.baseline.min(rss);
        self.quiet >= self.wait && rss > self.baseline + self.policy.grow_bytes
    }

    /// Records a trim that took the process from `before` to `rss` bytes. When it returned less
    /// than `grow_bytes` while the process is still grown, the growth is in use: the baseline
    /// stays, and the next try waits twice as many quiet samples.
    pub fn trimmed(&mut self, before: u64, rss: u64) {
        let returned = before.saturating_sub(rss);
        let grown = rss > self.baseline + self.policy.grow_bytes;
        if returned < self.policy.grow_bytes && grown {
            let most = self.policy.quiet_ticks.max(1).saturating_mul(64);
            self.wait = self.wait.max(1).saturating_mul(2).min(most);
        } else {
            self.baseline = rss;
            self.wait = self.policy.quiet_ticks;
        }
        self.quiet = 0;
        self.trims += 1;
    }
}

/// Starts the trimmer thread (for the lifetime of the process). Returns `None` when `/proc`
/// is not readable (not Linux): then nothing is trimmed.
pub fn spawn_trimmer(policy: Policy) -> Option<std::thread::JoinHandle<()>> {
    spawn_trimmer_from(policy, rss_bytes()?)
}

/// [`spawn_trimmer`] measuring growth from `baseline` bytes of RSS instead of the current RSS.
pub fn spawn_trimmer_from(policy: Policy, baseline: u64) -> Option<std::thread::JoinHandle<()>> {
    rss_bytes()?;
    cpu_time()?;
    let mut t = Trimmer::new(policy, baseline);
    std::thread::Builder::new()
        .name("janus-mem-trim".into())
        .spawn(move || loop {
            std::thread::sleep(policy.interval);
            let (Some(rss), Some(cpu)) = (rss_bytes(), cpu_time()) else {
                return;
            };
            if t.sample(rss, cpu) {
                trim();
                trim_workers();
                // The workers collect as they park again, within moments.
                std::thread::sleep(Duration::from_millis(100));
                let after = rss_bytes().unwrap_or(rss);
                tracing::debug!(
                    before_mb = rss >> 20,
                    after_mb = after >> 20,
                    "returned idle memory to the OS"
                );
                t.trimmed(rss, after);
                // The trim's own CPU time is not activity.
                t.last_cpu = cpu_time();
            }
        })
        .ok()
}
