//! The host-route-heavy sets of issue 11, shared by the differential test and the benches
//! (included with `#[path]`): what threat-intelligence feeds and fail2ban/CrowdSec produce.

use std::{
    collections::HashSet,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

/// `n` distinct IPv4 prefixes, deterministic for a `seed`: 10% /16 to /23, 45% /24, 45% /32,
/// spread uniformly over the whole address space.
pub(crate) fn host_route_heavy(seed: u64, n: usize) -> Vec<(Ipv4Addr, u8)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let len: u8 = match rng.random_range(0..100) {
            0..10 => rng.random_range(16..=23),
            10..55 => 24,
            _ => 32,
        };
        let addr = rng.random::<u32>() & (u32::MAX << (32 - len));
        if seen.insert((addr, len)) {
            out.push((Ipv4Addr::from(addr), len));
        }
    }
    out
}

/// `n` distinct IPv6 prefixes in 2000::/3 (global unicast), deterministic for a `seed`: 30% /32
/// to /48 (allocations), 40% /49 to /64 (sites and subnets), 30% /128 (single hosts).
#[allow(dead_code, reason = "not every file that includes this one uses IPv6")]
pub(crate) fn host_route_heavy_v6(seed: u64, n: usize) -> Vec<(Ipv6Addr, u8)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let len: u8 = match rng.random_range(0..10) {
            0..3 => rng.random_range(32..=48),
            3..7 => rng.random_range(49..=64),
            _ => 128,
        };
        let a = (rng.random::<u128>() & (u128::MAX >> 3) | 1 << 125) & (u128::MAX << (128 - len as u32));
        if seen.insert((a, len)) {
            out.push((Ipv6Addr::from(a), len));
        }
    }
    out
}

/// An address inside `(net, len)`, random below the prefix.
#[allow(dead_code, reason = "not every file that includes this one uses IPv6")]
pub(crate) fn inside_v6(rng: &mut StdRng, (net, len): (Ipv6Addr, u8)) -> Ipv6Addr {
    let host = if len == 128 { 0 } else { rng.random::<u128>() & (u128::MAX >> len) };
    Ipv6Addr::from(u128::from(net) | host)
}

/// The prefixes (IPv4 or IPv6) as the lines of a set file.
pub(crate) fn set_file<A: std::fmt::Display>(set: &[(A, u8)]) -> String {
    let mut text = String::with_capacity(set.len() * 24);
    for (net, len) in set {
        let _ = writeln!(text, "{net}/{len}");
    }
    text
}

/// An address inside `(net, len)`, random below the prefix.
#[allow(dead_code, reason = "the bench includes this file too and draws its sources over the whole space")]
pub(crate) fn inside(rng: &mut StdRng, (net, len): (Ipv4Addr, u8)) -> Ipv4Addr {
    let host = if len == 32 { 0 } else { rng.random::<u32>() & (u32::MAX >> len) };
    Ipv4Addr::from(u32::from(net) | host)
}
