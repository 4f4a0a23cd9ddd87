//! Reading the decisions the program sends through a ring buffer (`loader trace`'s TRACE_RING,
//! the daemon's LOG_RING), and the clock their times and the tracer's lease are in.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use xdpfw_common::DecisionEvent;

use crate::error::Result;
use crate::maps::pinned_map;

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, so of events' times and the lease.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A ring buffer of [`DecisionEvent`]s, pinned in an instance's folder.
pub struct DecisionRing {
    ring: RingBuf<MapData>,
}

impl DecisionRing {
    /// Opens the ring `name` (`map_names::TRACE_RING` or `LOG_RING`) pinned in `dir`.
    pub fn open(dir: &Path, name: &str) -> Result<Self> {
        Ok(Self { ring: RingBuf::try_from(pinned_map(dir, name)?)? })
    }

    /// The next event, if one is waiting. A record of another size (none is sent) is skipped.
    pub fn next_event(&mut self) -> Option<DecisionEvent> {
        loop {
            let item = self.ring.next()?;
            if item.len() >= size_of::<DecisionEvent>() {
                // SAFETY: the program writes whole DecisionEvents (every byte set); read
                // unaligned, as ring records are only 8-byte aligned.
                return Some(unsafe { item.as_ptr().cast::<DecisionEvent>().read_unaligned() });
            }
        }
    }

    /// Throws away every event waiting (what an earlier reader left).
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while self.ring.next().is_some() {
            n += 1;
        }
        n
    }

    /// Waits up to `timeout` for an event; true when one may be waiting.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.ring.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd we own.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        rc > 0
    }
}
