//! The only crate that talks to the kernel: it embeds the XDP object (built by `build.rs` with
//! the pinned eBPF toolchain), loads and pins it, attaches it, writes a compiled ruleset into the
//! inactive buffer of the maps and flips the generation ([`Maps`]), waits for a provable grace
//! period ([`grace`]), and runs frames through BPF_PROG_TEST_RUN ([`testrun`]).

mod error;
pub mod grace;
mod maps;
pub mod netlink;
mod object;
mod pins;
pub mod testrun;
pub mod trace;

pub use error::{KernelError, Result};
pub use maps::{InstallTimes, LiveTable, LiveV6, Maps, MmapArray, pinned_map};
pub use object::{PROGRAM_OBJECT, load_egress, load_plain, load_private, load_private_from, load_private_variant, load_probe, load_program};
pub use pins::{AttachMode, EGRESS_LINK_PIN, EGRESS_PIN, FULL_PIN, NEXT_PROG_PIN, PLAIN_PIN, PROG_PIN, attach_and_pin, serve, served_variant, attach_egress, egress_attached, detach_and_unpin, ensure_bpffs, open_probe, pin_dir, pin_probe, pin_root};

/// The peers the benchmarks run beside the firewall, built with it: an XDP program that only
/// returns (the floor), one that makes a single LPM lookup (the plain program), and the live
/// bench's traffic generator, and the classifier bench's stream harness.
pub mod peers {
    /// The empty XDP program.
    pub static FLOOR: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor"));
    /// One LPM-trie lookup on the source address.
    pub static PLAIN_LPM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/plain_lpm"));
    /// The live veth bench's traffic generator: a random source from `LIVE_SOURCES` per frame,
    /// then XDP_TX (run with BPF_F_TEST_XDP_LIVE_FRAMES).
    pub static LIVE_GEN: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/live_gen"));
    /// The classifier bench's stream harness: a new source per run from `STREAM_V4` or
    /// `STREAM_V6`, then a tail call to the program in `STREAM_TARGET`.
    pub static STREAM_FEED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stream_feed"));
}
