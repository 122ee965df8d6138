//! The binary's allocator (jemalloc, `main.rs`) asked to hand memory back: every arena's free
//! pages once a storm of connections ends ([`purge`], from `conns::trim_when_load_falls`), and
//! each worker thread's cache of freed blocks once that thread goes quiet
//! ([`flush_thread_cache_when_quiet`]).
//!
//! Why the thread caches: jemalloc trims a thread's cache only as that thread allocates, so a
//! worker that served a burst of requests and then sits idle (its connections parked, still
//! open) keeps the blocks its cache holds, and the pages under them, indefinitely. Turning the
//! caches off (`tcache:false`) saved that memory but cost 15 % more CPU per request
//! (`bench/README.md`); a flush when the thread goes quiet costs nothing per request.
use std::{ffi::CStr, time::Duration};

/// How often a worker looks at its own allocation.
const QUIET_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Less than this allocated between two looks and the thread counts as quiet.
const QUIET_BYTES: u64 = 64 * 1024;
/// Flush only when at least this much was allocated since the last flush: a thread that did
/// little since has little cached.
const FLUSH_AFTER_BYTES: u64 = 1024 * 1024;

/// Gives the kernel back the free pages of every arena now, rather than within jemalloc's decay
/// time.
pub fn purge() {
    // MALLCTL_ARENAS_ALL: every arena.
    mallctl_void(c"arena.4096.purge");
}

/// Returns the calling thread's cached blocks to their arenas, whose background thread then
/// hands the pages back (within the decay time set in `main.rs`).
pub fn flush_thread_cache() {
    mallctl_void(c"thread.tcache.flush");
}

/// Runs on a single-threaded runtime, forever: flushes that thread's cache
/// ([`flush_thread_cache`]) each time it goes quiet after allocating.
pub async fn flush_thread_cache_when_quiet() {
    let mut tick = tokio::time::interval(QUIET_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = QuietThread::default();
    loop {
        tick.tick().await;
        if let Some(allocated) = thread_allocated()
            && quiet.should_flush(allocated)
        {
            flush_thread_cache();
        }
    }
}

/// The flush decision, from the thread's allocation counter read at each look.
#[derive(Debug, Default)]
struct QuietThread {
    last_look: u64,
    last_flush: u64,
}

impl QuietThread {
    fn should_flush(&mut self, allocated: u64) -> bool {
        let quiet = allocated.saturating_sub(self.last_look) < QUIET_BYTES;
        self.last_look = allocated;
        let flush = quiet && allocated.saturating_sub(self.last_flush) >= FLUSH_AFTER_BYTES;
        if flush {
            self.last_flush = allocated;
        }
        flush
    }
}

/// Bytes the calling thread has allocated since it started (jemalloc's `thread.allocated`), or
/// `None` where jemalloc is not the allocator in use (the test binaries).
fn thread_allocated() -> Option<u64> {
    let mut value = 0u64;
    let mut len = std::mem::size_of::<u64>();
    // SAFETY: `thread.allocated` is a uint64_t; `value` and `len` describe a buffer of that size.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.allocated".as_ptr(),
            (&raw mut value).cast(),
            &raw mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0 && value > 0).then_some(value)
}

/// Runs a mallctl that takes no argument and returns nothing.
fn mallctl_void(name: &'static CStr) {
    // SAFETY: both commands read and write no value (null pointers, zero length) and only move
    // free memory, never memory in use.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_thread_flushes_once_it_goes_quiet_after_a_burst() {
        let mut quiet = QuietThread::default();
        assert!(
            !quiet.should_flush(10 * MIB),
            "busy: 10 MiB since the last look"
        );
        assert!(!quiet.should_flush(20 * MIB), "still busy");
        assert!(quiet.should_flush(20 * MIB + 1024), "quiet after the burst");
        assert!(!quiet.should_flush(20 * MIB + 2048), "nothing new to flush");
    }

    #[test]
    fn a_trickle_of_allocation_flushes_once_it_adds_up() {
        let mut quiet = QuietThread::default();
        let mut allocated = 0;
        let mut flushes = 0;
        for _ in 0..40 {
            allocated += 32 * 1024;
            flushes += u32::from(quiet.should_flush(allocated));
        }
        // 40 looks of 32 KiB each: 1.25 MiB, one flush.
        assert_eq!(flushes, 1);
    }

    #[test]
    fn the_allocation_counter_counts_jemalloc_allocations() {
        // Test binaries allocate with the system's malloc: allocate from jemalloc directly.
        let before = thread_allocated().unwrap_or(0);
        // SAFETY: a plain allocation, freed below.
        let block = unsafe { tikv_jemalloc_sys::malloc(1 << 20) };
        assert!(!block.is_null());
        let after = thread_allocated().expect("jemalloc counts this thread's allocation");
        // SAFETY: allocated above by the same allocator.
        unsafe { tikv_jemalloc_sys::free(block) };
        assert!(after - before >= 1 << 20, "{before} -> {after}");
    }
}
