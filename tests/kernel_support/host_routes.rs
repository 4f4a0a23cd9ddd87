//! The host-route-heavy IPv4 set of issue 11, shared by the differential test and the classifier
//! bench (included with `#[path]`): what threat-intelligence feeds and fail2ban/CrowdSec produce.

use std::{collections::HashSet, fmt::Write as _, net::Ipv4Addr};

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

/// The prefixes as the lines of a set file.
pub(crate) fn set_file(set: &[(Ipv4Addr, u8)]) -> String {
    let mut text = String::with_capacity(set.len() * 18);
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
