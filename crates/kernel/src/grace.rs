//! The grace period between a flip and the clearing of the retired buffer.
//!
//! XDP programs run inside an RCU read-side critical section (softirq, preemption off), and a
//! packet reads the generation once, at its start. `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for
//! `synchronize_rcu()`, so when it returns every packet that could have read the previous
//! generation has finished. Where the call is refused (nohz_full kernels disable it) we fall back
//! to a sleep far longer than any XDP program runs.

use std::time::{Duration, Instant};

const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
const FALLBACK: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GraceMethod {
    /// synchronize_rcu() through membarrier: proven.
    Membarrier,
    /// membarrier unavailable: a fixed sleep.
    Sleep,
}

/// Waits until no packet can still be reading a buffer that was active before the call.
/// Returns how long it took and how it was established.
pub fn wait(minimum: Duration) -> (Duration, GraceMethod) {
    let start = Instant::now();
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    let method = if rc == 0 {
        GraceMethod::Membarrier
    } else {
        std::thread::sleep(FALLBACK);
        GraceMethod::Sleep
    };
    let elapsed = start.elapsed();
    if elapsed < minimum {
        std::thread::sleep(minimum - elapsed);
    }
    (start.elapsed(), method)
}
