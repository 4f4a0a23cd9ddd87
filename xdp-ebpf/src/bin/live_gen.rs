//! Benchmark traffic generator for the live veth bench (`tests/benches/live.rs`): run by
//! BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES` on an IPv4 frame, it gives each frame a
//! source address drawn at random from `LIVE_SOURCES` (filled by the bench), fixes the IPv4
//! header checksum and sends the frame out of the ingress interface (XDP_TX, which a live test
//! run turns into a redirect to that interface: the sender end of a veth pair).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_get_prandom_u32,
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};

/// Source addresses as they sit in the header (network byte order); the index is 16 random
/// bits, so the bench fills all 65,536 entries.
#[map]
static LIVE_SOURCES: Array<u32> = Array::with_max_entries(1 << 16, 0);

#[xdp]
pub fn live_gen(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 34 > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: a random index below the map's size always finds its entry.
    let Some(&new) = LIVE_SOURCES.get(unsafe { bpf_get_prandom_u32() } & 0xffff) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: 34 bytes checked above: Ethernet, then the IPv4 header up to the source address.
    unsafe { xdp_ebpf::set_ipv4_source(start as *mut u8, new) };
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
