//! Benchmark harness for the classifier bench's stream rows (`tests/benches/classifier.rs
//! --stream`): run by BPF_PROG_TEST_RUN with many repeats on one frame, it gives the frame the
//! next source address of `STREAM_V4` (IPv4 frames, with the header checksum fixed) or
//! `STREAM_V6` (IPv6 frames) at every run, then tail-calls the program under test
//! (`STREAM_TARGET[0]`: the firewall, the floor or the plain LPM program). One call then
//! measures a stream of distinct sources, as live traffic gives them, without a syscall and its
//! cache pollution between two packets; the feed's own cost is in every program's figure.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

/// How many sources each table holds (a power of two: the feed walks them in order).
const SOURCES: u32 = 1 << 16;

/// IPv4 sources as they sit in the header (network byte order).
#[map]
static STREAM_V4: Array<u32> = Array::with_max_entries(SOURCES, 0);

/// IPv6 sources as they sit in the header.
#[map]
static STREAM_V6: Array<[u32; 4]> = Array::with_max_entries(SOURCES, 0);

/// The next source's index, per CPU.
#[map]
static STREAM_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The program under test, at index 0.
#[map]
static STREAM_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[xdp]
pub fn stream_feed(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 54 > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(next) = STREAM_NEXT.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a per-CPU slot, only touched by this CPU with preemption disabled.
    let i = unsafe {
        let i = *next;
        *next = i.wrapping_add(1);
        i % SOURCES
    };
    // SAFETY: 54 bytes checked above cover Ethernet and either header up to its source address
    // (IPv4: checksum at 24, source at 26; IPv6: source at 22). Unaligned accesses, as the
    // frame's offsets are.
    unsafe {
        let p = start as *mut u8;
        if *p.add(12) == 0x86 && *p.add(13) == 0xdd {
            let Some(new) = STREAM_V6.get(i) else {
                return xdp_action::XDP_ABORTED;
            };
            (p.add(22) as *mut [u32; 4]).write_unaligned(*new);
        } else {
            let Some(&new) = STREAM_V4.get(i) else {
                return xdp_action::XDP_ABORTED;
            };
            xdp_ebpf::set_ipv4_source(p, new);
        }
        STREAM_TARGET.tail_call(&ctx, 0);
    }
    xdp_action::XDP_ABORTED
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
