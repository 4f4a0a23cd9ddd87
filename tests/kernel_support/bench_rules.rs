//! Rules for the benches (included with `#[path]`): the classifier's and the live veth bench's
//! rulesets put the same 1,000 structured rules before the rule they measure.

use std::fmt::Write as _;

use rand::{Rng, rngs::StdRng};

/// `k` rules on protocol, destination port range and destination /24 under 192.168.0.0/16:
/// none matches the benches' traffic (to 192.0.2.0/24), so every packet is classified past them.
pub(crate) fn structured_rules(rng: &mut StdRng, k: usize) -> String {
    let mut s = String::new();
    for i in 0..k {
        let proto = if rng.random_bool(0.5) { "tcp" } else { "udp" };
        let lo: u16 = rng.random_range(1..60000);
        let hi = lo + rng.random_range(0..200);
        let net = format!("192.168.{}.0/24", rng.random_range(0..256));
        let action = if rng.random_bool(0.5) { "pass" } else { "drop" };
        let _ = writeln!(s, "[[rule]]\nname = \"r{i}\"\naction = \"{action}\"\nproto = \"{proto}\"\ndport = \"{lo}-{hi}\"\ndst = [\"{net}\"]\n");
    }
    s
}
