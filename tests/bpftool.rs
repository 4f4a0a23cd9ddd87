//! What `bpftool` shows of an instance: the attached program and its probe copy by their own
//! names, and the maps an operator reads with their fields named (BTF).

use xdpfw_testkit as harness;

use std::process::Command;

use harness::*;

fn bpftool_json(args: &[&str], pin: &std::path::Path) -> serde_json::Value {
    let out = Command::new("bpftool").arg("-j").args(args).arg(pin).output().expect("running bpftool");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn bpftool_names_the_live_program_and_the_probe_and_dumps_fields_by_name() {
    if !root_or_skip() {
        return;
    }
    let mut t = Topology::new("bpft").expect("topology");
    t.detach_on_drop(loader_bin());
    let rules = rules_dir().join("services.toml");
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    let dir = t.pin_dir();

    // The attached program is `xdpfw`, the probe copy (pinned, never attached) `xdpfw_probe`.
    let live = bpftool_json(&["prog", "show", "pinned"], &dir.join("prog"));
    let probe = bpftool_json(&["prog", "show", "pinned"], &dir.join("probe"));
    assert_eq!(live["name"], "xdpfw");
    assert_eq!(probe["name"], "xdpfw_probe");
    assert_ne!(live["id"], probe["id"]);
    let link = Command::new("ip").args(["-n", &t.server_ns, "-d", "link", "show", &t.server_if]).output().unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains(&format!("prog/xdp id {}", live["id"])));

    // Some traffic to count, then GLOBAL_STATS and RULE_STATS dumped with their fields named.
    ping(&t, SERVER_V4, 2);
    let dump = bpftool_json(&["map", "dump", "pinned"], &dir.join("GLOBAL_STATS"));
    let text = dump.to_string();
    for field in ["\"seen\"", "\"passed\"", "\"dropped\"", "\"ipv4\"", "\"rule_hits\"", "\"limited\""] {
        assert!(text.contains(field), "GLOBAL_STATS dump without {field}: {text}");
    }
    // The per-CPU values of slot 0 (`formatted`, as bpftool prints maps with BTF) add up to
    // at least the two echo requests.
    let seen: u64 = dump[0]["formatted"]["values"].as_array().unwrap().iter().map(|v| v["value"]["seen"].as_u64().unwrap()).sum();
    assert!(seen >= 2, "{text}");
    let rules_dump = bpftool_json(&["map", "dump", "pinned"], &dir.join("RULE_STATS")).to_string();
    assert!(rules_dump.contains("\"packets\"") && rules_dump.contains("\"bytes\""), "{}", &rules_dump[..rules_dump.len().min(500)]);
    for (map, field) in [("RULES", "\"action\""), ("HEADERS", "\"rule_count\""), ("LIMITS", "\"burst_ns\""), ("LOG_LIMITS", "\"suppressed\""), ("TRACE", "\"sample\"")] {
        let out = Command::new("bpftool").args(["map", "dump", "pinned"]).arg(dir.join(map)).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(field), "{map}: {}", &text[..text.len().min(500)]);
    }
}
