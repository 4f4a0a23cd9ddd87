#![no_std]
//! What the benchmark programs of `src/bin` share.

/// Writes `new` (in network order, as the header holds it) as the IPv4 source address of the
/// frame at `frame` (Ethernet, then an IPv4 header: its checksum at byte 24, the source at 26)
/// and fixes the header checksum (RFC 1624: HC' = ~(~HC + ~m + m'), over 16-bit words; the
/// one's-complement sum is the same in either byte order, so the words are summed as loaded).
///
/// # Safety
/// `frame` must point to at least 30 writable bytes. Unaligned accesses, as a frame's offsets
/// are.
#[inline(always)]
pub unsafe fn set_ipv4_source(frame: *mut u8, new: u32) {
    // SAFETY: bytes 24..30 lie within the 30 the caller vouches for.
    unsafe {
        let src = frame.add(26) as *mut u32;
        let sum = frame.add(24) as *mut u16;
        let old = src.read_unaligned();
        src.write_unaligned(new);
        let mut acc = u32::from(!sum.read_unaligned());
        acc += u32::from(!(old as u16)) + u32::from(!((old >> 16) as u16));
        acc += u32::from(new as u16) + (new >> 16);
        acc = (acc & 0xffff) + (acc >> 16);
        acc = (acc & 0xffff) + (acc >> 16);
        sum.write_unaligned(!(acc as u16));
    }
}
