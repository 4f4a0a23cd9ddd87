//! Any bytes as an Ethernet frame through the real XDP program (BPF_PROG_TEST_RUN on a private,
//! unattached copy, loaded once), against the reference: the frame read as the kernel parser
//! reads it (`xdpfw_rules::frame`) and decided by the reference matcher. Any disagreement
//! aborts with the frame. The first input byte chooses one of a few fixed rulesets. Needs root
//! (or CAP_BPF and CAP_NET_ADMIN) to load the program.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use xdpfw_common::action;
use xdpfw_kernel::testrun::PrivateProgram;
use xdpfw_rules::{
    Action, Ruleset,
    compile::{Image, compile},
    frame::{FrameClass, classify},
    matcher::decide,
    parse,
};

/// Stateless rulesets (no `limit`, no owner conditions: their verdicts depend on earlier
/// packets or on userspace) over every field the parser fills, each fragment policy and both
/// neighbour-discovery policies.
const RULESETS: [&str; 3] = [
    r#"
default = "drop"
[options]
fragments = "l3-only"
[sets.nets]
prefixes = ["192.0.2.0/24", "198.51.100.0/25", "2001:db8:1::/48", "0.0.0.0/1"]
[[rule]]
name = "ssh"
action = "pass"
proto = "tcp"
dport = 22
tcp_flags = "S/SA"
[[rule]]
name = "dns"
action = "pass"
proto = "udp"
sport = ["53", "5353-5360"]
[[rule]]
name = "nets-but"
action = "pass"
src = ["@nets", "!192.0.2.128/25"]
proto = ["tcp", "udp", "icmp", "47"]
[[rule]]
name = "echo"
action = "pass"
proto = "icmp"
icmp_type = 8
icmp_code = 0
[[rule]]
name = "v6"
action = "pass"
dst = ["2001:db8::/32"]
proto = ["icmpv6", "tcp"]
"#,
    r#"
default = "pass"
[options]
fragments = "drop"
icmpv6_nd = "rules"
[[rule]]
name = "no-nd"
action = "drop"
proto = "icmpv6"
icmp_type = [134, 137]
[[rule]]
name = "no-xmas"
action = "drop"
proto = "tcp"
tcp_flags = "fin psh urg"
[[rule]]
name = "not-web"
action = "drop"
proto = "tcp"
dport = ["!80", "!443"]
[[rule]]
name = "gre"
action = "drop"
proto = [47, 4, 41, 0, 43, 60]
[[rule]]
name = "v4-drop"
action = "drop"
src = ["0.0.0.0/0"]
dst = ["203.0.113.0/24"]
"#,
    r#"
default = "drop"
[options]
fragments = "pass"
[[rule]]
name = "any-udp"
action = "pass"
proto = "udp"
[[rule]]
name = "v6-src"
action = "pass"
src = ["::/1", "8000::/2"]
"#,
];

/// One private program per ruleset, each with its ruleset active: loaded once, so no input
/// pays for a map install.
struct State {
    programs: Vec<(PrivateProgram, Ruleset)>,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        let programs = RULESETS
            .iter()
            .map(|text| {
                let rs = parse(std::path::Path::new("fuzz.toml"), text).expect("a fuzz ruleset parses");
                let image: Image = compile(&rs).expect("a fuzz ruleset compiles");
                let mut prog = PrivateProgram::load().expect("loading the XDP program (the frames target needs root)");
                prog.activate(&image).expect("activating a ruleset");
                (prog, rs)
            })
            .collect();
        Mutex::new(State { programs })
    })
}

/// BPF_PROG_TEST_RUN takes an XDP frame of 14 bytes up to about a page (without fragments).
const MAX_FRAME: usize = 3000;

fuzz_target!(
    // Loading and verifying the programs takes seconds on a busy host: before the first input,
    // so it never counts against an input's timeout.
    init: {
        let _ = state();
    },
    |data: &[u8]| {
        let Some((&choice, frame)) = data.split_first() else { return };
        if frame.len() < 14 || frame.len() > MAX_FRAME {
            return;
        }
        let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
        let which = choice as usize % RULESETS.len();
        let (prog, rs) = &mut st.programs[which];
        let kernel = prog.run(frame).expect("BPF_PROG_TEST_RUN");
        let class = classify(frame);
        let (reference, why) = match &class {
            FrameClass::NonIp => (Action::Pass, "not IP".to_string()),
            FrameClass::Malformed => (Action::Drop, "malformed".to_string()),
            FrameClass::Packet(p) => {
                let d = decide(rs, p);
                (d.action, format!("{p}: {:?} {:?}", d.rule_name, d.reasons))
            }
        };
        let kernel_action = match kernel {
            action::PASS => Action::Pass,
            action::DROP => Action::Drop,
            other => panic!("the program returned {other} for {frame:02x?}"),
        };
        assert_eq!(kernel_action, reference, "ruleset #{which}: the kernel and the reference disagree on {frame:02x?}\nreference: {class:?}, {why}");
    }
);
