//! `cargo xtask bench`: ns per packet of the real XDP program through BPF_PROG_TEST_RUN, side by
//! side in one run with an empty XDP program (the floor) and a plain one-LPM-lookup program over
//! the same prefixes; plus compile and install times of large rulesets.
//!
//! Packets vary (256 distinct frames, half inside the prefix set) so large tries are not measured
//! cache-hot on one path only. Results are medians over frames of the kernel's mean per run.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    maps::{LpmTrie, lpm_trie::Key},
    programs::{TestRun, TestRunOptions, Xdp},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use xdpfw::{compile::compile, packet::PacketSpec, rules, testrun::PrivateProgram};

static FLOOR: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor"));
static PLAIN_LPM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/plain_lpm"));

const FRAMES: usize = 256;

struct Row {
    name: String,
    prefixes: usize,
    rules: usize,
    ns: f64,
    plain_ns: Option<f64>,
    compile_ms: Option<f64>,
    install_ms: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run_prog(ebpf: &mut Ebpf, name: &str, frames: &[Vec<u8>], repeat: u32) -> Result<f64> {
    let prog: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?;
    let mut per_frame = Vec::with_capacity(frames.len());
    for f in frames {
        let mut out = vec![0u8; f.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(f);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        per_frame.push(prog.test_run(opts)?.duration.as_nanos() as f64);
    }
    Ok(median(per_frame))
}

fn load(object: &[u8], name: &str) -> Result<Ebpf> {
    let mut ebpf = Ebpf::load(object)?;
    let prog: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?;
    prog.load()?;
    Ok(ebpf)
}

/// `n` distinct IPv4 prefixes, mostly /24 as in real routing tables, inside 10.0.0.0/8 and
/// 100.64.0.0/10 so the probes outside them miss.
fn random_prefixes(rng: &mut StdRng, n: usize) -> Vec<(Ipv4Addr, u8)> {
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let len: u8 = match rng.random_range(0..100) {
            0..70 => 24,
            70..80 => 22,
            80..88 => 20,
            88..96 => 28,
            _ => 32,
        };
        let base: u32 = if rng.random_bool(0.5) { 0x0a00_0000 } else { 0x6440_0000 };
        let span = if base == 0x0a00_0000 { 24 } else { 22 };
        let addr = base | (rng.random::<u32>() & ((1 << span) - 1));
        let addr = addr & (u32::MAX << (32 - len));
        if seen.insert((addr, len)) {
            out.push((Ipv4Addr::from(addr), len));
        }
    }
    out
}

fn structured_rules(rng: &mut StdRng, k: usize) -> String {
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

fn frames(rng: &mut StdRng, prefixes: &[(Ipv4Addr, u8)]) -> Vec<Vec<u8>> {
    (0..FRAMES)
        .map(|i| {
            let src = if i % 2 == 0 && !prefixes.is_empty() {
                let (net, len) = prefixes[rng.random_range(0..prefixes.len())];
                let host = if len == 32 { 0 } else { rng.random::<u32>() & ((1u32 << (32 - len)) - 1) };
                Ipv4Addr::from(u32::from(net) | host)
            } else {
                Ipv4Addr::new(203, 0, 113, rng.random())
            };
            let spec = PacketSpec {
                proto: 6,
                src: src.into(),
                dst: Ipv4Addr::new(192, 168, rng.random(), 1).into(),
                sport: rng.random_range(1024..65535),
                dport: rng.random_range(1..65535),
                tcp_flags: 0x02,
                icmp_type: 0,
                icmp_code: 0,
                fragment: false,
            };
            spec.to_frame()
        })
        .collect()
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let repeat: u32 = if quick { 200 } else { 2000 };
    let scales: &[usize] = if quick { &[0, 1_000] } else { &[0, 1_000, 100_000, 1_000_000] };
    let rule_counts: &[usize] = if quick { &[10] } else { &[10, 100, 1000] };
    let big = *scales.last().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let dir = std::env::temp_dir().join(format!("xdpfw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let mut floor = load(FLOOR, "floor")?;
    let mut plain = load(PLAIN_LPM, "plain_lpm")?;
    let mut fw = PrivateProgram::load()?;
    let mut rows = Vec::new();

    let all = random_prefixes(&mut rng, big);
    let probe = frames(&mut rng, &all);
    let floor_ns = run_prog(&mut floor, "floor", &probe, repeat)?;
    rows.push(Row { name: "empty XDP program (floor)".into(), prefixes: 0, rules: 0, ns: floor_ns, plain_ns: None, compile_ms: None, install_ms: None });

    let mut plain_at = std::collections::HashMap::new();
    for &n in scales {
        let set = &all[..n];
        // The plain program over the same prefixes.
        let mut trie: LpmTrie<_, [u8; 4], u32> = LpmTrie::try_from(plain.map_mut("PLAIN_V4").context("PLAIN_V4")?)?;
        for k in trie.keys().collect::<Result<Vec<_>, _>>()? {
            trie.remove(&k)?;
        }
        for (net, len) in set {
            trie.insert(&Key::new(*len as u32, net.octets()), &1, 0)?;
        }
        let f = frames(&mut rng, set);
        let plain_ns = run_prog(&mut plain, "plain_lpm", &f, repeat)?;
        plain_at.insert(n, plain_ns);

        let (compile_ms, install_ms, ns) = classifier(&mut fw, &dir, set, "", &f, repeat)?;
        rows.push(Row { name: format!("classifier, {n} prefixes, 1 rule"), prefixes: n, rules: 1, ns, plain_ns: Some(plain_ns), compile_ms: Some(compile_ms), install_ms: Some(install_ms) });
    }
    let set = &all[..big];
    let f = frames(&mut rng, set);
    for &k in rule_counts {
        let extra = structured_rules(&mut rng, k);
        let (compile_ms, install_ms, ns) = classifier(&mut fw, &dir, set, &extra, &f, repeat)?;
        rows.push(Row { name: format!("classifier, {big} prefixes + {k} rules"), prefixes: big, rules: k + 1, ns, plain_ns: plain_at.get(&big).copied(), compile_ms: Some(compile_ms), install_ms: Some(install_ms) });
    }
    // A ruleset without ports does no port lookup: compare with one that has them.
    let (_, _, ns_noports) = classifier_text(&mut fw, "default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = [\"10.0.0.0/8\"]\n", &f, repeat)?;
    let (_, _, ns_ports) = classifier_text(&mut fw, "default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = [\"10.0.0.0/8\"]\nproto = \"tcp\"\ndport = \"1-30000\"\nsport = \"1-30000\"\n", &f, repeat)?;
    rows.push(Row { name: "classifier, src prefix only (no port lookups)".into(), prefixes: 1, rules: 1, ns: ns_noports, plain_ns: None, compile_ms: None, install_ms: None });
    rows.push(Row { name: "classifier, src prefix + proto + ports".into(), prefixes: 1, rules: 1, ns: ns_ports, plain_ns: None, compile_ms: None, install_ms: None });

    let mut table = String::new();
    let _ = writeln!(table, "{:<52} {:>9} {:>8} {:>9} {:>11} {:>11}", "program", "ns/pkt", "x floor", "x plain", "compile ms", "install ms");
    for r in &rows {
        let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
        let _ = writeln!(
            table,
            "{:<52} {:>9.1} {:>8.2} {:>9} {:>11} {:>11}",
            r.name,
            r.ns,
            r.ns / floor_ns,
            opt(r.plain_ns.map(|p| r.ns / p), 2),
            opt(r.compile_ms, 0),
            opt(r.install_ms, 0)
        );
    }
    print!("{table}");
    println!("(BPF_PROG_TEST_RUN, {repeat} repeats x {FRAMES} distinct frames, median of per-frame means; plain = one LPM lookup over the same prefixes)");
    let json: Vec<_> = rows
        .iter()
        .map(|r| serde_json::json!({"name": r.name, "prefixes": r.prefixes, "rules": r.rules, "ns_per_packet": r.ns, "ratio_to_floor": r.ns / floor_ns, "plain_ns": r.plain_ns, "compile_ms": r.compile_ms, "install_ms": r.install_ms}))
        .collect();
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("classifier.json"), serde_json::to_string_pretty(&json)?)?;
    println!("JSON: target/bench/classifier.json");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Writes the prefixes as a set file, builds a ruleset dropping them plus `extra` rules, and
/// measures compile, install and classification.
fn classifier(fw: &mut PrivateProgram, dir: &std::path::Path, set: &[(Ipv4Addr, u8)], extra: &str, f: &[Vec<u8>], repeat: u32) -> Result<(f64, f64, f64)> {
    let mut text = String::with_capacity(set.len() * 18);
    for (net, len) in set {
        let _ = writeln!(text, "{net}/{len}");
    }
    std::fs::write(dir.join("set.txt"), text)?;
    let src = if set.is_empty() { String::new() } else { "[sets.big]\nfile = \"set.txt\"\n[[rule]]\nname = \"big\"\naction = \"drop\"\nsrc = [\"@big\"]\n".to_string() };
    classifier_text_at(fw, dir, &format!("default = \"pass\"\n{src}\n{extra}"), f, repeat)
}

fn classifier_text(fw: &mut PrivateProgram, text: &str, f: &[Vec<u8>], repeat: u32) -> Result<(f64, f64, f64)> {
    classifier_text_at(fw, &std::env::temp_dir(), text, f, repeat)
}

fn classifier_text_at(fw: &mut PrivateProgram, dir: &std::path::Path, text: &str, f: &[Vec<u8>], repeat: u32) -> Result<(f64, f64, f64)> {
    let path = dir.join("bench.toml");
    std::fs::write(&path, text)?;
    let t = Instant::now();
    let rs = rules::load(&path)?;
    let image = compile(&rs)?;
    let compile_ms = ms(t.elapsed());
    let t = Instant::now();
    fw.activate(&image)?;
    let install_ms = ms(t.elapsed());
    let mut per_frame = Vec::new();
    for frame in f {
        per_frame.push(fw.run_repeat(frame, repeat)?.1.as_nanos() as f64);
    }
    Ok((compile_ms, install_ms, median(per_frame)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
