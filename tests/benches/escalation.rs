//! `cargo xtask bench`: what escalation costs.
//!
//! 1. Ordinary traffic with and without process rules in the ruleset, in one run
//!    (BPF_PROG_TEST_RUN, the two programs taking turns over the same frames): the ratio shows
//!    that flows no owner rule decides pay nothing for them.
//! 2. First-packet decision latency of escalated flows, p50 and p99: real flows over the veth
//!    harness to a port owned by a real process, decided by the real daemon; measured from the
//!    kernel's event (its bpf_ktime_get_ns) to the verdict written in the map.

use xdpfw_testkit as harness;

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::Result;
use harness::{
    Topology,
    daemon::TempDir,
    owners::{OwnerProcess, escalation_daemon, flood_frame, send_raw},
};
use xdpfw_kernel::testrun::PrivateProgram;
use xdpfw_rules::{self as rules, compile::compile, packet::PacketSpec};

const FRAMES: usize = 64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// 100 ordinary rules on ports, optionally preceded by 20 owner rules (the worst place for
/// them: first in priority).
fn ruleset_text(with_owner_rules: bool) -> String {
    let mut s = String::from("default = \"pass\"\n");
    if with_owner_rules {
        for i in 0..20 {
            let _ = write!(
                s,
                "[[rule]]\nname = \"owner-{i}\"\naction = \"pass\"\nproto = \"tcp\"\ndport = {}\nowner = {{ process = \"app{i}\" }}\n[[rule]]\nname = \"owner-{i}-others\"\naction = \"drop\"\nproto = \"tcp\"\ndport = {}\n",
                7100 + i,
                7100 + i
            );
        }
    }
    for i in 0..100 {
        let _ = write!(
            s,
            "[[rule]]\nname = \"r{i}\"\naction = \"{}\"\nproto = \"{}\"\ndport = \"{}-{}\"\nsrc = [\"10.{i}.0.0/16\"]\n",
            if i % 2 == 0 { "pass" } else { "drop" },
            if i % 3 == 0 { "udp" } else { "tcp" },
            1000 + i * 10,
            1005 + i * 10
        );
    }
    s
}

fn fast_path(quick: bool) -> Result<(f64, f64, f64)> {
    let dir = std::env::temp_dir();
    let mut progs = Vec::new();
    for with in [false, true] {
        let path = dir.join(format!("xfw-bench-owner-{with}.toml"));
        std::fs::write(&path, ruleset_text(with))?;
        let rs = rules::load(&path)?;
        assert_eq!(rs.needs_owner(), with);
        let mut p = PrivateProgram::load()?;
        p.activate(&compile(&rs)?)?;
        progs.push(p);
    }
    // Ordinary traffic: TCP and UDP to the ordinary rules' ports, and to ports no rule names.
    let frames: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| {
            let proto = if i % 2 == 0 { "tcp" } else { "udp" };
            let flags = if i % 2 == 0 { " flags S" } else { "" };
            let p: PacketSpec = format!("{proto} 10.{}.1.1:40000 -> 192.0.2.2:{}{flags}", i % 100, 1000 + (i * 37) % 1200).parse().unwrap();
            p.to_frame()
        })
        .collect();
    let repeat = if quick { 2000 } else { 10_000 };
    let rounds = if quick { 2 } else { 3 };
    // The two programs run each frame back to back, so a burst of machine noise lands on both
    // sides of a pair; the ratio is the median of the pairs' ratios.
    let (mut without, mut with, mut ratios) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        for f in &frames {
            let a = progs[0].run_repeat(f, repeat)?.1.as_nanos() as f64;
            let b = progs[1].run_repeat(f, repeat)?.1.as_nanos() as f64;
            without.push(a);
            with.push(b);
            ratios.push(b / a.max(1.0));
        }
    }
    // Every ordinary frame must be decided in the kernel: no escalation happened.
    let g = progs[1].maps.global_stats()?;
    assert_eq!(g.escalations + g.pending, 0, "ordinary traffic must not escalate");
    Ok((median(without), median(with), median(ratios)))
}

fn decision_latency(quick: bool) -> Result<serde_json::Value> {
    let mut t = Topology::new("bes").map_err(anyhow::Error::msg)?;
    t.detach_on_drop(harness::loader_bin());
    let rules = harness::rules_dir().join("owners.toml");
    harness::loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    let _app = OwnerProcess::start(&t.server_ns, "xfw-app", 0, 7100);
    let log_dir = TempDir::new("bench");
    let _daemon = escalation_daemon(&t, &log_dir, &rules);
    // New flows, one a millisecond, each from its own source (so no per-source limit applies).
    let flows: usize = if quick { 500 } else { 2000 };
    let iface = t.client_if.clone();
    harness::in_ns(&t.client_ns, move || {
        let frames = (0..flows).map(|i| flood_frame(&format!("198.51.{}.{}", 100 + i / 250, 1 + i % 250), 20_000 + i as u16, "192.0.2.2", 7100));
        send_raw(&iface, frames, 1)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the sending thread panicked"))?;
    let mut report = serde_json::Value::Null;
    harness::eventually(Duration::from_secs(5), || {
        report = harness::stats(&t)["escalation"].clone();
        report["counters"]["decided_pass"].as_u64().unwrap_or(0) >= flows as u64
    });
    Ok(serde_json::json!({
        "flows": flows,
        "decided": report["counters"]["decided_pass"],
        "p50_us": report["latency_p50_us"],
        "p99_us": report["latency_p99_us"],
        "samples": report["latency_samples"],
    }))
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (without, with, ratio) = fast_path(quick)?;
    println!("\nescalation: ordinary traffic (BPF_PROG_TEST_RUN, {FRAMES} frames, medians; ratio: median of per-frame pairs)");
    println!("  without process rules  {without:7.1} ns/pkt");
    println!("  with 40 process rules  {with:7.1} ns/pkt   ratio {ratio:.3}");
    let lat = decision_latency(quick)?;
    println!(
        "escalation: first-packet decision latency over {} new flows (kernel event -> verdict in place): p50 {:.0} us, p99 {:.0} us",
        lat["flows"],
        lat["p50_us"].as_f64().unwrap_or(f64::NAN),
        lat["p99_us"].as_f64().unwrap_or(f64::NAN)
    );
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    let json = serde_json::json!({
        "ordinary_ns_without_process_rules": without,
        "ordinary_ns_with_process_rules": with,
        "ratio": ratio,
        "decision_latency": lat,
    });
    std::fs::write(out.join("escalation.json"), serde_json::to_string_pretty(&json)?)?;
    println!("JSON: target/bench/escalation.json");
    Ok(())
}
