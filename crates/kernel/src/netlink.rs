//! The XDP mode the kernel actually attached in, from rtnetlink (`IFLA_XDP_ATTACHED`), so an
//! `auto` attachment can be reported as the native or generic (skb) mode in effect.

use std::{io, os::fd::AsRawFd};

use crate::AttachMode;

const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const NLA_TYPE_MASK: u16 = 0x3fff;

#[repr(C)]
struct Request {
    nlh: libc::nlmsghdr,
    ifi: libc::ifinfomsg,
}

/// The mode of the XDP program attached to `iface` in the current network namespace: `Native`
/// (driver) or `Skb` (generic); `None` when nothing is attached (or offloaded/multi, which this
/// firewall never uses).
pub fn attached_mode(iface: &str) -> io::Result<Option<AttachMode>> {
    let name = std::ffi::CString::new(iface).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    attached_mode_of(index)
}

/// [`attached_mode`] of the interface with index `index` in the current network namespace.
pub fn attached_mode_of(index: u32) -> io::Result<Option<AttachMode>> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid value of these C structs.
    let mut req: Request = unsafe { std::mem::zeroed() };
    req.nlh.nlmsg_len = size_of::<Request>() as u32;
    req.nlh.nlmsg_type = libc::RTM_GETLINK;
    req.nlh.nlmsg_flags = libc::NLM_F_REQUEST as u16;
    req.nlh.nlmsg_seq = 1;
    req.ifi.ifi_family = libc::AF_UNSPEC as u8;
    req.ifi.ifi_index = index as i32;
    // SAFETY: sending the bytes of a live, fully initialised request.
    let sent = unsafe { libc::send(sock.as_raw_fd(), (&req as *const Request).cast(), size_of::<Request>(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: receiving into a buffer of the given length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse(&buf[..n as usize])
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Finds attribute `kind` in a run of netlink attributes.
fn attr(mut b: &[u8], kind: u16) -> Option<&[u8]> {
    while b.len() >= 4 {
        let len = usize::from(u16_at(b, 0)?);
        if len < 4 || len > b.len() {
            return None;
        }
        if u16_at(b, 2)? & NLA_TYPE_MASK == kind {
            return Some(&b[4..len]);
        }
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}

fn parse(msg: &[u8]) -> io::Result<Option<AttachMode>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "a malformed rtnetlink answer");
    let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(msg, 4).ok_or_else(bad)?;
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = u32_at(msg, 16).ok_or_else(bad)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    let body = msg.get(size_of::<libc::nlmsghdr>() + size_of::<libc::ifinfomsg>()..len.min(msg.len())).ok_or_else(bad)?;
    let Some(xdp) = attr(body, IFLA_XDP) else { return Ok(None) };
    Ok(match attr(xdp, IFLA_XDP_ATTACHED).and_then(|v| v.first().copied()) {
        Some(XDP_ATTACHED_DRV) => Some(AttachMode::Native),
        Some(XDP_ATTACHED_SKB) => Some(AttachMode::Skb),
        _ => None,
    })
}
