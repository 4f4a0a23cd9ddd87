//! Benchmark peer: the plainest prefix filter, one LPM lookup of the IPv4 source address and
//! drop on a hit. The classifier is measured beside it over the same prefixes.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};

#[map]
static PLAIN_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(2 * 1024 * 1024, 0);

#[xdp]
pub fn plain_lpm(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 34 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: 34 bytes checked above (Ethernet + the IPv4 header up to the source address).
    let (ethertype, src) = unsafe {
        let p = start as *const u8;
        (u16::from_be_bytes([*p.add(12), *p.add(13)]), [*p.add(26), *p.add(27), *p.add(28), *p.add(29)])
    };
    if ethertype != 0x0800 {
        return xdp_action::XDP_PASS;
    }
    match PLAIN_V4.get(&Key::new(32, src)) {
        Some(_) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
