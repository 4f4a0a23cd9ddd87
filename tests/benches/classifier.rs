//! `cargo xtask bench`: ns per packet of the real XDP program through BPF_PROG_TEST_RUN, side by
//! side in one run with an empty XDP program (the floor) and a plain one-LPM-lookup program over
//! the same prefixes; plus compile and install times of large rulesets.
//!
//! Packets vary (64 distinct frames, half inside the prefix set) so large tries are not measured
//! cache-hot on one path only. Results are medians over frames of the kernel's mean per run.
//! `--focus` runs only the rows of the performance target, with more rounds; `--trace` only the
//! quick rows and the cost of `loader trace` (off, on but filtered out, on at 100/s);
//! `XDPFW_BENCH_FRAMES=1` prints each row's per-frame figures (sorted), to tell noise from paths.
//! `XDPFW_BENCH_BASELINE=a.o,b.o` (with `--trace`) runs other builds of the program beside this
//! one, taking turns frame by frame (variants with a part left out measure what that
//! part costs); `XDPFW_BENCH_REPEAT` and `XDPFW_BENCH_ROUNDS` raise the runs per call and the
//! rounds for such comparisons.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, LpmTrie, ProgramArray, lpm_trie::Key},
    programs::{ProgramFd, Xdp},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use xdpfw_kernel::{
    peers::{FLOOR, PLAIN_LPM, STREAM_FEED},
    testrun::{PrivateProgram, run_frame},
};
use xdpfw_rules::{self as rules, compile::compile, packet::PacketSpec};

#[path = "../kernel_support/host_routes.rs"]
mod host_routes;
#[path = "../kernel_support/bench_rules.rs"]
mod bench_rules;
use bench_rules::structured_rules;

/// Frames of the random-source rows: sources drawn over the whole IPv4 space, each frame run
/// once per round (repeat 1), so the tables' lines are as cold as traffic from many sources
/// makes them, and then 16 times.
const RANDOM_FRAMES: usize = 4096;
/// Prefixes of the host-route-heavy set of the random-source row.
const HOST_ROUTES: usize = 1_000_000;

// Each BPF_PROG_TEST_RUN call swaps the program into the XDP dispatcher and back, two RCU grace
// periods, so the number of calls (frames x rounds x programs) bounds the run time.
const FRAMES: usize = 64;

struct Row {
    name: String,
    prefixes: usize,
    rules: usize,
    m: Measure,
    compile_ms: Option<f64>,
    install_ms: Option<f64>,
}

/// Medians over frames. The programs take turns over the whole frame list, several rounds, so
/// the ratios compare runs made under the same machine noise. (Not frame by frame: switching the
/// program BPF_PROG_TEST_RUN runs costs an RCU grace period in the kernel's XDP dispatcher.)
struct Measure {
    ns: f64,
    floor_ns: f64,
    x_floor: f64,
    plain_ns: Option<f64>,
    x_plain: Option<f64>,
}

const ROUNDS: usize = 2;
/// `--focus`: only the rows of the performance target, with more rounds.
const FOCUS_ROUNDS: usize = 4;

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run_one(ebpf: &mut Ebpf, name: &str, frame: &[u8], repeat: u32) -> Result<f64> {
    let prog: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?;
    Ok(run_frame(prog, frame, repeat)?.1.as_nanos() as f64)
}

struct Peers {
    floor: Ebpf,
    plain: Ebpf,
}

/// A TCP SYN from `src` to `dst` with random ports (drawn in that order).
fn syn_frame(rng: &mut StdRng, src: std::net::IpAddr, dst: std::net::IpAddr) -> Vec<u8> {
    PacketSpec {
        proto: 6,
        src,
        dst,
        sport: rng.random_range(1024..65535),
        dport: rng.random_range(1..65535),
        tcp_flags: 0x02,
        icmp_type: 0,
        icmp_code: 0,
        fragment: false,
        state: Default::default(),
        vlan: None,
    }
    .to_frame()
}

fn measure(fw: &mut PrivateProgram, peers: &mut Peers, frames: &[Vec<u8>], repeat: u32, with_plain: bool) -> Result<Measure> {
    let n = frames.len();
    let (mut fl, mut ns, mut pl) = (vec![vec![]; n], vec![vec![]; n], vec![vec![]; n]);
    let rounds = if focus() { FOCUS_ROUNDS } else { ROUNDS };
    for _ in 0..rounds {
        for (i, f) in frames.iter().enumerate() {
            fl[i].push(run_one(&mut peers.floor, "floor", f, repeat)?);
        }
        for (i, f) in frames.iter().enumerate() {
            ns[i].push(fw.run_repeat(f, repeat)?.1.as_nanos() as f64);
        }
        if with_plain {
            for (i, f) in frames.iter().enumerate() {
                pl[i].push(run_one(&mut peers.plain, "plain_lpm", f, repeat)?);
            }
        }
    }
    // Per frame: the median of its rounds; then medians over frames.
    let per = |v: &Vec<Vec<f64>>| v.iter().map(|r| median(r.clone())).collect::<Vec<f64>>();
    let (fl, ns) = (per(&fl), per(&ns));
    if std::env::var_os("XDPFW_BENCH_FRAMES").is_some() {
        let mut v: Vec<(usize, f64)> = ns.iter().copied().enumerate().collect();
        v.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap());
        eprintln!("frames (index:ns, sorted): {:?}", v.iter().map(|(i, n)| format!("{i}:{n}")).collect::<Vec<_>>());
    }
    let pl = if with_plain { per(&pl) } else { Vec::new() };
    // Ratio of medians: per-frame ratios would pair a cheap miss of one program with a costly hit
    // of the other.
    let ratio = |a: &[f64], b: &[f64]| median(a.to_vec()) / median(b.to_vec());
    Ok(Measure {
        ns: median(ns.clone()),
        floor_ns: median(fl.clone()),
        x_floor: ratio(&ns, &fl),
        plain_ns: with_plain.then(|| median(pl.clone())),
        x_plain: with_plain.then(|| ratio(&ns, &pl)),
    })
}

/// The stream harness (`STREAM_FEED`): one BPF_PROG_TEST_RUN call runs a frame `STREAM_RUNS`
/// times, with the next of 65,536 random sources each time, through the program under test.
struct Stream {
    feed: Ebpf,
}

/// Runs per stream call: every source of the feed's table twice.
const STREAM_RUNS: u32 = 2 << 16;
/// Stream calls per program and row (taking turns), and the median taken.
const STREAM_ROUNDS: usize = 7;

impl Stream {
    fn load(v4: &[Ipv4Addr], v6: &[std::net::Ipv6Addr]) -> Result<Self> {
        let mut feed = load(STREAM_FEED, "stream_feed")?;
        let mut a: Array<_, u32> = Array::try_from(feed.map_mut("STREAM_V4").context("STREAM_V4")?)?;
        for (i, s) in v4.iter().enumerate() {
            a.set(i as u32, &u32::from_ne_bytes(s.octets()), 0)?;
        }
        let mut a: Array<_, [u32; 4]> = Array::try_from(feed.map_mut("STREAM_V6").context("STREAM_V6")?)?;
        for (i, s) in v6.iter().enumerate() {
            let o = s.octets();
            let w = |k: usize| u32::from_ne_bytes([o[k], o[k + 1], o[k + 2], o[k + 3]]);
            a.set(i as u32, &[w(0), w(4), w(8), w(12)], 0)?;
        }
        Ok(Self { feed })
    }

    /// Mean ns per run of `target` over the stream (the feed's own cost included).
    fn run(&mut self, target: &ProgramFd, frame: &[u8]) -> Result<f64> {
        let mut slots = ProgramArray::try_from(self.feed.map_mut("STREAM_TARGET").context("STREAM_TARGET")?)?;
        slots.set(0, target, 0)?;
        let prog: &mut Xdp = self.feed.program_mut("stream_feed").ok_or_else(|| anyhow!("no stream_feed"))?.try_into()?;
        let (action, d) = run_frame(prog, frame, STREAM_RUNS)?;
        // XDP_ABORTED: the tail call did not happen (or the frame was too short).
        anyhow::ensure!(action != 0, "the stream harness did not reach the program under test");
        Ok(d.as_nanos() as f64)
    }
}

/// The firewall, the floor and (`with_plain`) the plain LPM program over one stream each round,
/// taking turns; medians over rounds.
fn measure_stream(fw: &mut PrivateProgram, peers: &mut Peers, stream: &mut Stream, frame: &[u8], with_plain: bool) -> Result<Measure> {
    let (mut fl, mut ns, mut pl) = (vec![], vec![], vec![]);
    for _ in 0..STREAM_ROUNDS {
        fl.push(stream.run(peer_fd(&peers.floor, "floor")?, frame)?);
        ns.push(stream.run(fw.program()?.fd()?, frame)?);
        if with_plain {
            pl.push(stream.run(peer_fd(&peers.plain, "plain_lpm")?, frame)?);
        }
    }
    let (ns, floor_ns) = (median(ns), median(fl));
    let plain_ns = with_plain.then(|| median(pl));
    Ok(Measure { ns, floor_ns, x_floor: ns / floor_ns, plain_ns, x_plain: plain_ns.map(|p| ns / p) })
}

/// What one dependent read of a random cache line costs over `bytes` of memory in 4 KiB pages
/// (as the kernel's BPF arrays are): a pointer chase in userspace through every line of the
/// region in a random cycle; the mean ns per step. A lookup that must read a line of a table
/// larger than the caches pays about this per packet, whatever the table's layout.
fn memory_latency_ns(rng: &mut StdRng, bytes: usize) -> f64 {
    let lines = bytes / 64;
    // One u64 per 64-byte line: the index of the next line in the cycle.
    let mut next = vec![0u64; lines * 8];
    let mut order: Vec<usize> = (0..lines).collect();
    for i in (1..lines).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    for w in 0..lines {
        next[order[w] * 8] = (order[(w + 1) % lines] * 8) as u64;
    }
    let steps = 4 * lines.min(1 << 22);
    let mut at = order[0] * 8;
    let t = Instant::now();
    for _ in 0..steps {
        at = next[at] as usize;
    }
    let ns = t.elapsed().as_nanos() as f64 / steps as f64;
    std::hint::black_box(at);
    ns
}

fn peer_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a ProgramFd> {
    let prog: &Xdp = ebpf.program(name).ok_or_else(|| anyhow!("no {name}"))?.try_into()?;
    Ok(prog.fd()?)
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

/// `n` distinct IPv6 prefixes, /32 to /64, inside 2001:db8::/32 and 2001:db9::/32.
fn random_prefixes_v6(rng: &mut StdRng, n: usize) -> Vec<(std::net::Ipv6Addr, u8)> {
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let len: u8 = [32, 40, 48, 48, 48, 56, 64][rng.random_range(0..7)];
        let base: u128 = if rng.random_bool(0.5) { 0x2001_0db8 << 96 } else { 0x2001_0db9 << 96 };
        let addr = (base | (rng.random::<u128>() >> 32)) & (u128::MAX << (128 - len as u32));
        if seen.insert((addr, len)) {
            out.push((addr.into(), len));
        }
    }
    out
}

fn frames_v6(rng: &mut StdRng, prefixes: &[(std::net::Ipv6Addr, u8)]) -> Vec<Vec<u8>> {
    (0..FRAMES)
        .map(|i| {
            let src: u128 = if i % 2 == 0 {
                let (net, len) = prefixes[rng.random_range(0..prefixes.len())];
                u128::from(net) | (rng.random::<u128>() >> len)
            } else {
                0x2001_0db7 << 96 | rng.random::<u32>() as u128
            };
            PacketSpec {
                proto: 6,
                src: std::net::Ipv6Addr::from(src).into(),
                dst: "2001:db8:ffff::1".parse::<std::net::Ipv6Addr>().unwrap().into(),
                sport: rng.random_range(1024..65535),
                dport: 443,
                tcp_flags: 0x02,
                icmp_type: 0,
                icmp_code: 0,
                fragment: false,
                state: Default::default(),
                vlan: None,
            }
            .to_frame()
        })
        .collect()
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
            let dst = Ipv4Addr::new(192, 168, rng.random(), 1);
            syn_frame(rng, src.into(), dst.into())
        })
        .collect()
}

fn focus() -> bool {
    std::env::args().any(|a| a == "--focus")
}

fn main() -> Result<()> {
    // `--trace`: only the quick rows and the cost of tracing (off, filtered out, rate-limited).
    let trace_only = std::env::args().any(|a| a == "--trace");
    let quick = trace_only || std::env::args().any(|a| a == "--quick");
    let focus = focus();
    // `XDPFW_BENCH_REPEAT=N`: runs per BPF_PROG_TEST_RUN call (the kernel reports whole ns per
    // call, so the resolution is 1 ns a frame; more repeats and rounds narrow the noise).
    let repeat: u32 = env_number("XDPFW_BENCH_REPEAT").unwrap_or(if quick { 1000 } else { 5000 });
    let scales: &[usize] = if quick {
        &[0, 1_000]
    } else if focus {
        &[0, 1_000_000]
    } else {
        &[0, 1_000, 100_000, 1_000_000]
    };
    let rule_counts: &[usize] = if quick { &[10] } else if focus { &[1000] } else { &[10, 100, 1000] };
    let big = *scales.last().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let dir = std::env::temp_dir().join(format!("xdpfw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let mut peers = Peers { floor: load(FLOOR, "floor")?, plain: load(PLAIN_LPM, "plain_lpm")? };
    // The copy of the program an attach would run: the plain one for the rows' rulesets (no
    // limits, state, VLAN, log), the full one for the `--state` rows.
    let state_only = std::env::args().any(|a| a == "--state");
    let mut fw = if state_only { PrivateProgram::load()? } else { PrivateProgram::load_variant(xdpfw_common::variant::PLAIN)? };
    let mut rows = Vec::new();
    if std::env::args().any(|a| a == "--stream") {
        // Only the random-source rows, as streams (no per-frame calls).
        random_source_row(&mut fw, &mut peers, &mut rng, &dir, false, &mut rows)?;
        print_rows(&rows, repeat)?;
        std::fs::remove_dir_all(&dir)?;
        return Ok(());
    }
    if state_only {
        // Only the connection-state and limit rows (quick: no large sets).
        state_rows(&mut fw, &mut peers, &mut rng, &dir, repeat, &mut rows)?;
        print_rows(&rows, repeat)?;
        std::fs::remove_dir_all(&dir)?;
        return Ok(());
    }
    let all = random_prefixes(&mut rng, big);

    let set_plain = |peers: &mut Peers, set: &[(Ipv4Addr, u8)]| -> Result<()> {
        let mut trie: LpmTrie<_, [u8; 4], u32> = LpmTrie::try_from(peers.plain.map_mut("PLAIN_V4").context("PLAIN_V4")?)?;
        for k in trie.keys().collect::<Result<Vec<_>, _>>()? {
            trie.remove(&k)?;
        }
        for (net, len) in set {
            trie.insert(&Key::new(*len as u32, net.octets()), &1, 0)?;
        }
        Ok(())
    };
    for &n in scales {
        let set = &all[..n];
        set_plain(&mut peers, set)?;
        let f = frames(&mut rng, set);
        let (compile_ms, install_ms) = install(&mut fw, &dir, set, "")?;
        let m = measure(&mut fw, &mut peers, &f, repeat, true)?;
        rows.push(Row { name: format!("{n} prefixes, 1 rule"), prefixes: n, rules: 1, m, compile_ms: Some(compile_ms), install_ms: Some(install_ms) });
    }
    let set = &all[..big];
    set_plain(&mut peers, set)?;
    let f = frames(&mut rng, set);
    for &k in rule_counts {
        let extra = structured_rules(&mut rng, k);
        let (compile_ms, install_ms) = install(&mut fw, &dir, set, &extra)?;
        let m = measure(&mut fw, &mut peers, &f, repeat, true)?;
        rows.push(Row { name: format!("{big} prefixes + {k} rules"), prefixes: big, rules: k + 1, m, compile_ms: Some(compile_ms), install_ms: Some(install_ms) });
    }
    // The same prefixes split between a drop and a pass rule, alternately: neighbours select
    // different rules, so few merge (one random set alone merges into a handful of short
    // prefixes) and the direct table needs tens of thousands of chunks.
    if !quick {
        let k = *rule_counts.last().unwrap();
        for (name, half) in ["a", "b"].iter().zip([0, 1]) {
            let mut text = String::with_capacity(set.len() * 9);
            for (net, len) in set.iter().skip(half).step_by(2) {
                let _ = writeln!(text, "{net}/{len}");
            }
            std::fs::write(dir.join(format!("{name}.txt")), text)?;
        }
        let extra = structured_rules(&mut rng, k);
        let text = format!(
            "default = \"pass\"\n[sets.a]\nfile = \"a.txt\"\n[sets.b]\nfile = \"b.txt\"\n\
             [[rule]]\nname = \"a\"\naction = \"drop\"\nsrc = [\"@a\"]\n\
             [[rule]]\nname = \"b\"\naction = \"pass\"\nsrc = [\"@b\"]\n{extra}"
        );
        let (compile_ms, install_ms) = install_text(&mut fw, &dir, &text)?;
        let m = measure(&mut fw, &mut peers, &f, repeat, true)?;
        rows.push(Row { name: format!("{big} prefixes in 2 sets + {k} rules"), prefixes: big, rules: k + 2, m, compile_ms: Some(compile_ms), install_ms: Some(install_ms) });
    }
    if !focus {
        trace_rows(&mut fw, &mut peers, &dir, &f, repeat, &mut rows)?;
    }
    if !focus && !trace_only {
        more_rows(&mut fw, &mut peers, &mut rng, &dir, big, &f, repeat, &mut rows)?;
        // Rulesets with `state` and `limit`: the full copy, as an attach would run them.
        state_rows(&mut PrivateProgram::load()?, &mut peers, &mut rng, &dir, repeat, &mut rows)?;
    }
    if !trace_only {
        random_source_row(&mut fw, &mut peers, &mut rng, &dir, true, &mut rows)?;
    }
    print_rows(&rows, repeat)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Issue 11's host-route-heavy 1M-prefix set (45% /32 over the whole space) and 1,000
/// structured rules, with `RANDOM_FRAMES` frames whose sources are random over the whole space,
/// each run once per round: the classifier beside the floor and the plain LPM program over the
/// same 1M prefixes.
fn random_source_row(fw: &mut PrivateProgram, peers: &mut Peers, rng: &mut StdRng, dir: &std::path::Path, per_frame: bool, rows: &mut Vec<Row>) -> Result<()> {
    let set = host_routes::host_route_heavy(11, HOST_ROUTES);
    let t = Instant::now();
    let mut trie: LpmTrie<_, [u8; 4], u32> = LpmTrie::try_from(peers.plain.map_mut("PLAIN_V4").context("PLAIN_V4")?)?;
    for k in trie.keys().collect::<Result<Vec<_>, _>>()? {
        trie.remove(&k)?;
    }
    for (net, len) in &set {
        trie.insert(&Key::new(*len as u32, net.octets()), &1, 0)?;
    }
    eprintln!("plain LPM trie: {} host-route-heavy prefixes inserted in {:.1?}", set.len(), t.elapsed());
    std::fs::write(dir.join("hosts.txt"), host_routes::set_file(&set))?;
    // And a 1M-prefix IPv6 set (30% /32-/48, 40% /49-/64, 30% /128 in 2000::/3) behind its own
    // rule, for the same rows with IPv6 sources (issue 11: IPv6 at most 1.5x IPv4).
    std::fs::write(dir.join("hosts6.txt"), host_routes::set_file(&host_routes::host_route_heavy_v6(11, HOST_ROUTES)))?;
    let extra = structured_rules(rng, 1000);
    let sets = "default = \"pass\"\n[sets.hosts]\nfile = \"hosts.txt\"\n[sets.hosts6]\nfile = \"hosts6.txt\"\n\
         [[rule]]\nname = \"hosts\"\naction = \"drop\"\nsrc = [\"@hosts\"]\n\
         [[rule]]\nname = \"hosts6\"\naction = \"drop\"\nsrc = [\"@hosts6\"]\n";
    let frames: Vec<Vec<u8>> = (0..RANDOM_FRAMES)
        .map(|_| {
            let (src, dst) = (Ipv4Addr::from(rng.random::<u32>()), Ipv4Addr::new(192, 168, rng.random(), 1));
            syn_frame(rng, src.into(), dst.into())
        })
        .collect();
    // Sources random over 2000::/3, the space the IPv6 set is drawn from.
    let frames6: Vec<Vec<u8>> = (0..RANDOM_FRAMES)
        .map(|_| {
            let src = std::net::Ipv6Addr::from((rng.random::<u128>() >> 3) | (1u128 << 125));
            syn_frame(rng, src.into(), "2001:db8::1".parse().unwrap())
        })
        .collect();
    // Once cold (1 repeat: each frame's lines as the previous frames and the syscall left the
    // caches), then with 16 repeats (each frame's own lines warm after its first run). The
    // plain LPM program holds IPv4 prefixes only: no peer for the IPv6 rows.
    // The sets' rules alone first (cold only), then with the 1,000 rules: what the prefix lookup
    // costs and what the rules' fields add.
    // The stream rows: one test run per program walks 65,536 sources (random over the whole
    // IPv4 space, and over 2000::/3), a new one each run, to a destination no structured rule
    // names (192.0.2.1): every packet is classified past all the rules.
    let v4: Vec<Ipv4Addr> = (0..1 << 16).map(|_| Ipv4Addr::from(rng.random::<u32>())).collect();
    let v6: Vec<std::net::Ipv6Addr> = (0..1 << 16).map(|_| std::net::Ipv6Addr::from((rng.random::<u128>() >> 3) | (1u128 << 125))).collect();
    let mut stream = Stream::load(&v4, &v6)?;
    let stream4 = syn_frame(rng, Ipv4Addr::UNSPECIFIED.into(), Ipv4Addr::new(192, 0, 2, 1).into());
    let stream6 = syn_frame(rng, std::net::Ipv6Addr::UNSPECIFIED.into(), std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into());
    for mib in [1usize, 4, 16, 96] {
        eprintln!("memory: one dependent read of a random line over {mib} MiB (4 KiB pages, userspace pointer chase): {:.1} ns", memory_latency_ns(rng, mib << 20));
    }
    // The program's fixed cost on the same stream: no set, no rule.
    let (compile_ms, install_ms) = install_text(fw, dir, "default = \"pass\"\n")?;
    for (frame, family) in [(&stream4, ""), (&stream6, " IPv6")] {
        let m = measure_stream(fw, peers, &mut stream, frame, false)?;
        rows.push(Row { name: format!("no set, no rule{family}, stream"), prefixes: 0, rules: 0, m, compile_ms: Some(compile_ms), install_ms: Some(install_ms) });
    }
    for (rules, extra, repeats) in [(2, "", &[(1, "random src")][..]), (1002, extra.as_str(), &[(1, "random src"), (16, "random src x16")][..])] {
        let (compile_ms, install_ms) = install_text(fw, dir, &format!("{sets}{extra}"))?;
        for (frames, stream_frame, family, with_plain) in [(&frames, &stream4, "", true), (&frames6, &stream6, " IPv6", false)] {
            let name = |label: &str| format!("{HOST_ROUTES} host-route-heavy{family} + {} rules, {label}", rules - 2);
            let mut row = |m, label: &str| rows.push(Row { name: name(label), prefixes: HOST_ROUTES, rules, m, compile_ms: Some(compile_ms), install_ms: Some(install_ms) });
            if per_frame {
                for &(repeat, label) in repeats {
                    row(measure(fw, peers, frames, repeat, with_plain)?, label);
                }
            }
            row(measure_stream(fw, peers, &mut stream, stream_frame, with_plain)?, "stream");
        }
    }
    Ok(())
}

/// The cost of `loader trace` on the ruleset installed last: the program with tracing off, and
/// on with a filter no frame meets, and on with a rate no flood stays within (the default,
/// 100/s: nearly every packet is refused by the bucket). The three take turns frame by frame
/// group, round after round, under the same noise.
fn trace_rows(fw: &mut PrivateProgram, peers: &mut Peers, dir: &std::path::Path, frames: &[Vec<u8>], repeat: u32, rows: &mut Vec<Row>) -> Result<()> {
    use xdpfw_common::{TraceConfig, trace};
    let excluding = TraceConfig { filter: trace::filter::PORT, port: 1, ..Default::default() };
    let at_100 = TraceConfig { sample: 1, interval_ns: 10_000_000, burst_ns: 990_000_000, ..Default::default() };
    let modes: [(&str, Option<TraceConfig>); 3] = [("trace off", None), ("trace on, filtered out", Some(excluding)), ("trace on, 100/s", Some(at_100))];
    // `XDPFW_BENCH_ROUNDS=N`: more rounds for comparisons of builds a few percent apart.
    let rounds = env_number("XDPFW_BENCH_ROUNDS").unwrap_or(if focus() { FOCUS_ROUNDS } else { ROUNDS } * 2);
    let n = frames.len();
    eprintln!("verifier: {:?} instructions for this build", fw.verified_instructions());
    // `XDPFW_BENCH_BASELINE=OBJECT[,OBJECT…]`: earlier builds of the program (the ELF aya-build
    // made, e.g. of the commit before tracing, or variants of this one with a part left out),
    // with the same ruleset, taking turns with the others.
    let mut baselines = Vec::new();
    // `OBJECT@plain` loads a build that has the global as its plain copy (`variant::PLAIN`).
    for entry in std::env::var("XDPFW_BENCH_BASELINE").unwrap_or_default().split(',').filter(|p| !p.is_empty()) {
        let (path, plain) = match entry.strip_suffix("@plain") {
            Some(p) => (p, true),
            None => (entry, false),
        };
        let object = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        // It must have the same map layouts (GlobalStats, RulesetHeader, …) as this build.
        let mut b = if plain {
            let (ebpf, maps) = xdpfw_kernel::load_private_variant(&object, xdpfw_common::variant::PLAIN)?;
            PrivateProgram::from_parts(ebpf, maps, xdpfw_common::variant::PLAIN)
        } else {
            PrivateProgram::load_from(&object)?
        };
        eprintln!("verifier: {:?} instructions for the baseline {path}", b.verified_instructions());
        // The ruleset installed last (install_text's file).
        b.activate(&compile(&rules::load(&dir.join("bench.toml"))?)?)?;
        let name = std::path::Path::new(entry).file_name().map_or(entry.to_string(), |f| f.to_string_lossy().into_owned());
        baselines.push((name, b));
    }
    let mut before = vec![vec![vec![]; n]; baselines.len()];
    let mut ns = vec![vec![vec![]; n]; modes.len()];
    let mut fl = vec![vec![]; n];
    for round in 0..rounds {
        for (i, f) in frames.iter().enumerate() {
            fl[i].push(run_one(&mut peers.floor, "floor", f, repeat)?);
        }
        // The baselines and this build with tracing off take turns frame by frame, in an order
        // that rotates with the round and the frame, so no build always runs first or last and
        // each baseline's time on a frame is paired with this build's a few milliseconds apart
        // (a drift of the machine's speed over the round then cancels out of their ratio).
        fw.maps.trace_stop();
        let turns = baselines.len() + 1;
        for (i, f) in frames.iter().enumerate() {
            for j in 0..turns {
                let k = (j + round + i) % turns;
                match baselines.get_mut(k) {
                    Some((_, b)) => before[k][i].push(b.run_repeat(f, repeat)?.1.as_nanos() as f64),
                    None => ns[0][i].push(fw.run_repeat(f, repeat)?.1.as_nanos() as f64),
                }
            }
        }
        for (m, (_, config)) in modes.iter().enumerate().skip(1) {
            match config {
                // A lease that never runs out: the bench is its own tracer.
                Some(c) => fw.maps.trace_start(c, u64::MAX)?,
                None => fw.maps.trace_stop(),
            }
            for (i, f) in frames.iter().enumerate() {
                ns[m][i].push(fw.run_repeat(f, repeat)?.1.as_nanos() as f64);
            }
        }
    }
    fw.maps.trace_stop();
    let per = |v: &Vec<Vec<f64>>| v.iter().map(|r| median(r.clone())).collect::<Vec<f64>>();
    let floor = median(per(&fl));
    let off = median(per(&ns[0]));
    for (k, (name, _)) in baselines.iter().enumerate() {
        let v = median(per(&before[k]));
        // Also each frame's fastest round, averaged over frames: other work on the machine only
        // ever adds time, and medians of whole ns hide differences below 1 ns.
        let fastest = |v: &Vec<Vec<f64>>| mean(&v.iter().map(|r| r.iter().copied().fold(f64::MAX, f64::min)).collect::<Vec<f64>>());
        let (mb, mo) = (fastest(&before[k]), fastest(&ns[0]));
        // Paired: each (frame, round)'s time of this build over the baseline's, measured side by
        // side; their median and quartiles say how far apart the builds are and how noisy.
        let mut paired: Vec<f64> = (0..n).flat_map(|i| ns[0][i].iter().zip(&before[k][i]).map(|(o, b)| o / b)).collect();
        paired.sort_by(f64::total_cmp);
        let q = |p: f64| paired.get(((paired.len() - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN);
        eprintln!(
            "baseline {name}: {v:.1} ns/packet (fastest rounds {mb:.2}); trace off is {:.3}x the baseline (fastest: {:.4}x; paired median {:.4}x, quartiles {:.4}-{:.4}, {} pairs)",
            off / v,
            mo / mb,
            q(0.5),
            q(0.25),
            q(0.75),
            paired.len()
        );
        rows.push(Row {
            name: format!("baseline {name} ({:.3}x off)", v / off),
            prefixes: 0,
            rules: 0,
            m: Measure { ns: v, floor_ns: floor, x_floor: v / floor, plain_ns: None, x_plain: None },
            compile_ms: None,
            install_ms: None,
        });
    }
    for (m, (name, _)) in modes.iter().enumerate() {
        let v = median(per(&ns[m]));
        eprintln!("{name}: {v:.1} ns/packet, {:.3}x trace off", v / off);
        rows.push(Row {
            name: format!("{name} ({:.3}x off)", v / off),
            prefixes: 0,
            rules: 0,
            m: Measure { ns: v, floor_ns: floor, x_floor: v / floor, plain_ns: None, x_plain: None },
            compile_ms: None,
            install_ms: None,
        });
    }
    Ok(())
}

/// The IPv6 row and the per-field rows.
#[expect(clippy::too_many_arguments, reason = "the bench's shared state, passed through once")]
fn more_rows(fw: &mut PrivateProgram, peers: &mut Peers, rng: &mut StdRng, dir: &std::path::Path, big: usize, f: &[Vec<u8>], repeat: u32, rows: &mut Vec<Row>) -> Result<()> {
    // IPv6 at the same scale: the trie path (compile and install times, ns on IPv6 frames).
    let v6 = random_prefixes_v6(rng, big);
    let mut text = String::with_capacity(v6.len() * 24);
    for (net, len) in &v6 {
        let _ = writeln!(text, "{net}/{len}");
    }
    std::fs::write(dir.join("set6.txt"), text)?;
    let (compile_ms, install_ms) = install_text(fw, dir, "default = \"pass\"\n[sets.big6]\nfile = \"set6.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@big6\"]\n")?;
    let f6 = frames_v6(rng, &v6);
    let m = measure(fw, peers, &f6, repeat, false)?;
    rows.push(Row { name: format!("{big} IPv6 prefixes, 1 rule"), prefixes: big, rules: 1, m, compile_ms: Some(compile_ms), install_ms: Some(install_ms) });

    // The fast path pays only for the fields a ruleset uses: add them one at a time.
    let mut conditions = String::new();
    for (label, cond) in [
        ("src", "src = [\"10.0.0.0/8\"]\n"),
        ("+ dst", "dst = [\"192.168.0.0/16\"]\n"),
        ("+ proto", "proto = \"tcp\"\n"),
        ("+ dport", "dport = \"1-30000\"\n"),
        ("+ sport", "sport = \"1-30000\"\n"),
        ("+ tcp_flags", "tcp_flags = \"syn\"\n"),
    ] {
        conditions.push_str(cond);
        let text = format!("default = \"pass\"\n[[rule]]\naction = \"drop\"\n{conditions}");
        install_text(fw, dir, &text)?;
        let m = measure(fw, peers, f, repeat, false)?;
        rows.push(Row { name: format!("one rule on: {label}"), prefixes: 1, rules: 1, m, compile_ms: None, install_ms: None });
    }
    Ok(())
}

/// Connection state: what a `state` rule's lookup costs. Over the same 100 port rules: none with
/// `state` (the baseline), then a first rule `state = "established"` with every frame's flow in
/// the table (one hash lookup, then the match), and with none (the lookup misses and the rules
/// are matched again); and a first rule with a `limit` never reached (the cost of a check). Then
/// the egress program's cost per packet sent, recording off (no ruleset uses `state`) and on (a
/// refresh of the flow's entry).
fn state_rows(fw: &mut PrivateProgram, peers: &mut Peers, rng: &mut StdRng, dir: &std::path::Path, repeat: u32, rows: &mut Vec<Row>) -> Result<()> {
    let extra = structured_rules(rng, 100);
    let replies: Vec<PacketSpec> = (0..FRAMES)
        .map(|_| {
            format!("tcp 203.0.113.{}:443 -> 192.0.2.2:{} flags A state established", rng.random::<u8>(), rng.random_range(32768..61000u16))
                .parse()
                .unwrap()
        })
        .collect();
    let f: Vec<Vec<u8>> = replies.iter().map(PacketSpec::to_frame).collect();
    install_text(fw, dir, &format!("default = \"pass\"\n{extra}"))?;
    let m = measure(fw, peers, &f, repeat, false)?;
    rows.push(Row { name: "100 rules, no state rule".into(), prefixes: 0, rules: 100, m, compile_ms: None, install_ms: None });
    install_text(fw, dir, &format!("default = \"pass\"\n[[rule]]\nname = \"replies\"\naction = \"pass\"\nstate = \"established\"\n{extra}"))?;
    for p in &replies {
        fw.maps.insert_flow(p.flow_key(), xdpfw_common::FlowEntry { expires_ns: u64::MAX, flags: 0, _pad: 0 })?;
    }
    let m = measure(fw, peers, &f, repeat, false)?;
    rows.push(Row { name: "100 rules + state rule first, flow found".into(), prefixes: 0, rules: 101, m, compile_ms: None, install_ms: None });
    for p in &replies {
        fw.maps.remove_flow(&p.flow_key())?;
    }
    let m = measure(fw, peers, &f, repeat, false)?;
    rows.push(Row { name: "100 rules + state rule first, no flow".into(), prefixes: 0, rules: 101, m, compile_ms: None, install_ms: None });

    // `limit`: the same 100 rules behind a first rule with a limit no packet here reaches (one
    // bucket for the rule, then one per source), against the first row: the cost of a check.
    for (label, limit) in [("per rule", "limit = { rate = \"10000000/s\" }"), ("per source", "limit = { rate = \"10000000/s\", per = \"source\" }")] {
        install_text(fw, dir, &format!("default = \"pass\"\n[[rule]]\nname = \"limited\"\naction = \"pass\"\nproto = \"tcp\"\n{limit}\n{extra}"))?;
        let m = measure(fw, peers, &f, repeat, false)?;
        rows.push(Row { name: format!("100 rules + limit rule first, {label}"), prefixes: 0, rules: 101, m, compile_ms: None, install_ms: None });
    }

    // The egress program, on the packets this host sends (the replies' flows, reversed).
    fw.load_egress()?;
    let sent: Vec<Vec<u8>> = replies
        .iter()
        .map(|p| PacketSpec { src: p.dst, dst: p.src, sport: p.dport, dport: p.sport, state: Default::default(),
 vlan: None, ..p.clone() }.to_frame())
        .collect();
    let egress = |fw: &mut PrivateProgram| -> Result<f64> {
        let ns: Vec<f64> = sent.iter().map(|f| Ok(fw.run_egress(f, repeat)?.1.as_nanos() as f64)).collect::<Result<_>>()?;
        Ok(median(ns))
    };
    let on = egress(fw)?;
    install_text(fw, dir, &format!("default = \"pass\"\n{extra}"))?;
    let off = egress(fw)?;
    eprintln!("egress program per packet sent (TC BPF_PROG_TEST_RUN, median of {FRAMES} frames): recording {on:.1} ns, not recording (no state rule) {off:.1} ns");
    Ok(())
}

fn print_rows(rows: &[Row], repeat: u32) -> Result<()> {
    let rounds = if focus() { FOCUS_ROUNDS } else { ROUNDS };
    let mut table = String::new();
    let _ = writeln!(table, "{:<60} {:>8} {:>8} {:>8} {:>9} {:>8} {:>11} {:>11}", "classifier ruleset", "ns/pkt", "floor ns", "x floor", "plain ns", "x plain", "compile ms", "install ms");
    for r in rows {
        let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
        let m = &r.m;
        let _ = writeln!(
            table,
            "{:<60} {:>8.1} {:>8.1} {:>8.2} {:>9} {:>8} {:>11} {:>11}",
            r.name, m.ns, m.floor_ns, m.x_floor, opt(m.plain_ns, 1), opt(m.x_plain, 2), opt(r.compile_ms, 0), opt(r.install_ms, 0)
        );
    }
    print!("{table}");
    println!("BPF_PROG_TEST_RUN, {repeat} repeats per frame, {FRAMES} distinct frames (half inside the prefix set).");
    println!("Medians over frames; floor = an empty XDP program, plain = one LPM lookup over the same prefixes,");
    println!("taking turns with the classifier over the frames, {rounds} rounds; x = ratio of the medians.");
    println!("The random-src rows: {RANDOM_FRAMES} frames with sources random over the whole IPv4 space, 1 (x16: 16) repeats each.");
    let json: Vec<_> = rows
        .iter()
        .map(|r| serde_json::json!({"ruleset": r.name, "prefixes": r.prefixes, "rules": r.rules, "ns_per_packet": r.m.ns, "floor_ns": r.m.floor_ns, "ratio_to_floor": r.m.x_floor, "plain_ns": r.m.plain_ns, "ratio_to_plain": r.m.x_plain, "compile_ms": r.compile_ms, "install_ms": r.install_ms}))
        .collect();
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("classifier.json"), serde_json::to_string_pretty(&json)?)?;
    println!("JSON: target/bench/classifier.json");
    Ok(())
}

/// Writes the prefixes as a set file, builds a ruleset dropping them plus `extra` rules, and
/// installs it; returns compile (parse included) and install times.
fn install(fw: &mut PrivateProgram, dir: &std::path::Path, set: &[(Ipv4Addr, u8)], extra: &str) -> Result<(f64, f64)> {
    let mut text = String::with_capacity(set.len() * 18);
    for (net, len) in set {
        let _ = writeln!(text, "{net}/{len}");
    }
    std::fs::write(dir.join("set.txt"), text)?;
    let src = if set.is_empty() { String::new() } else { "[sets.big]\nfile = \"set.txt\"\n[[rule]]\nname = \"big\"\naction = \"drop\"\nsrc = [\"@big\"]\n".to_string() };
    install_text(fw, dir, &format!("default = \"pass\"\n{src}\n{extra}"))
}

fn install_text(fw: &mut PrivateProgram, dir: &std::path::Path, text: &str) -> Result<(f64, f64)> {
    let path = dir.join("bench.toml");
    std::fs::write(&path, text)?;
    let t = Instant::now();
    let rs = rules::load(&path)?;
    let image = compile(&rs)?;
    let compile_ms = ms(t.elapsed());
    if let Some(t) = image.src_v4.as_ref().filter(|t| t.chunks > 0) {
        eprintln!(
            "{} IPv4 source prefixes after merging, {} table chunks, {} leaves in {} lines: {:.1} MiB per buffer",
            t.prefixes,
            t.chunks,
            t.leaves,
            t.lines.len(),
            t.bytes_per_buffer() as f64 / (1 << 20) as f64
        );
    }
    let t = Instant::now();
    fw.activate(&image)?;
    Ok((compile_ms, ms(t.elapsed())))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
