//! The `switchyard` binary: its allocator, and the chore that keeps each runtime thread's
//! allocator cache small. The command line itself is `switchyard::cli`.

use std::process::ExitCode;
use std::time::Duration;

// jemalloc with background purging: fewer instructions per proxied request than glibc's malloc,
// and the memory of a burst of streams goes back to the system within seconds, where glibc kept
// all of it (bench/results/profile-2026-11-26.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How often each of `serve`'s runtime threads gives back its allocator cache.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Hands what jemalloc keeps cached for this thread back to its arena. A thread cache holds
/// freed blocks for the thread's next allocations, and an idle thread never empties it: after
/// a burst (2,000 streams) that kept about 0.7 MB resident for good, the regions holding
/// partly used pages in place. Turning the cache off flushes it; back on, it starts empty and
/// refills as the thread allocates. Safe mallctl names only (the crate forbids
/// `unsafe`). A cache turned off (`_RJEM_MALLOC_CONF=tcache:false`) stays off.
fn trim_thread_cache() -> tikv_jemalloc_ctl::Result<()> {
    use tikv_jemalloc_ctl::{Access, AsName};
    let enabled = b"thread.tcache.enabled\0".name();
    if !enabled.read()? {
        return Ok(());
    }
    enabled.write(false)?;
    enabled.write(true)
}

fn main() -> ExitCode {
    switchyard::cli::main(Some(switchyard::server::ThreadChore {
        every: TRIM_EVERY,
        run: std::sync::Arc::new(|| {
            if let Err(e) = trim_thread_cache() {
                tracing::warn!(error = %e, "cannot flush the thread's allocator cache");
            }
        }),
    }))
}

#[cfg(test)]
mod tests {
    use tikv_jemalloc_ctl::{Access, AsName};

    /// The names and value types are right (jemalloc answers them) and the cache is on after.
    #[test]
    fn trimming_leaves_the_thread_cache_on() {
        let enabled = b"thread.tcache.enabled\0".name();
        let before: bool = enabled.read().unwrap();
        assert!(before);
        let big: Vec<Vec<u8>> = (0..1000).map(|i| vec![0; 64 + i % 512]).collect();
        drop(big);
        super::trim_thread_cache().unwrap();
        let after: bool = enabled.read().unwrap();
        assert!(after);
        // Off stays off.
        enabled.write(false).unwrap();
        super::trim_thread_cache().unwrap();
        let off: bool = enabled.read().unwrap();
        assert!(!off);
        enabled.write(true).unwrap();
    }
}
