//! Any text as a rules file: the parser answers with a ruleset or a located error, never a
//! panic, a hang or unbounded memory; a ruleset it accepts compiles (or hits a stated limit),
//! and its self-tests evaluate with the reference matcher.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xdpfw_rules::{Origin, compile::compile, parse_from, selftest::check_self_tests};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Remote: a fuzzed ruleset must never make the parser read a local file.
    let Ok(rs) = parse_from(Path::new("fuzz.toml"), text, Origin::Remote) else { return };
    let _ = compile(&rs);
    let _ = check_self_tests(&rs);
});
