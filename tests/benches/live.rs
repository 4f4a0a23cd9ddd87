//! `cargo bench --bench live`: packets per second of live traffic on veth pairs, xdpfw beside
//! one plain BPF LPM lookup and nftables, with the same prefix set, in one run (issue 11).
//!
//! Traffic: the `live_gen` peer program, run with BPF_PROG_TEST_RUN and
//! `BPF_F_TEST_XDP_LIVE_FRAMES` in the client namespace of a veth pair, gives each 64-byte UDP
//! frame a source drawn at random from a table of 65,536 addresses and sends it out of the
//! client end (XDP_TX); the frames arrive as real XDP frames at the server end, where the filter
//! under test sits. Two mixes: (a) sources inside the set (every packet is dropped; the ceiling
//! is XDP_DROP), (b) sources uniform over the whole IPv4 space (what passes goes up the stack,
//! to a UDP port nothing listens on).
//!
//! Receivers, one veth pair (two namespaces) each, all built before the first measurement:
//! - xdpfw with one rule (`drop` on `src in set`), attached in-process (`control::attach`);
//! - xdpfw with 1,000 structured rules before the set rule (not matching this traffic);
//! - the classifier bench's plain LPM program (one LPM-trie lookup of the source, drop on a hit);
//! - nftables: `ip saddr @hosts counter drop` in a netdev ingress chain on the server end, the
//!   set an interval set loaded with `nft -f`;
//! - the ceiling: the plain LPM program over a trie holding only 0.0.0.0/0 (drops everything).
//!
//! GRO is switched on at every server end (veth runs NAPI, which XDP redirection into it
//! needs, only with an XDP program or GRO; nftables has no XDP program). The generator and the
//! receiver's NAPI run on the same CPU (the test run's bottom half), so a figure is the packets
//! the pair gets through per second, generator included. Each cell runs the generator for a fixed
//! time and counts what the server end processed (its veth rx counter); the receivers take turns
//! within each round, rounds give the median. The filters' own counters check the drop ratio.
//!
//! `--threaded`: the receivers' NAPI runs in its own kernel thread (threaded NAPI), pinned to
//! the second CPU, and the generator to the first: a figure is then what the filter gets
//! through on a CPU of its own, as on a host whose NIC does not share the filter's CPU.
//!
//! `--quick`: a 100k-prefix set, 1 s per cell, 3 rounds (default: 1M prefixes, 3 s, 5 rounds).
//! Results: stdout and target/bench/live.json.

use std::{
    fmt::Write as _,
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, LpmTrie, lpm_trie::Key},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use xdpfw_control::{self as control, Instance};
use xdpfw_kernel::peers::{LIVE_GEN, PLAIN_LPM};
use xdpfw_testkit::{SERVER_V4, Topology};

#[path = "../kernel_support/host_routes.rs"]
mod host_routes;
#[path = "../kernel_support/bench_rules.rs"]
mod bench_rules;
use bench_rules::structured_rules;

/// Entries of the generator's source table (`LIVE_SOURCES` in `live_gen.rs`).
const SOURCES: usize = 1 << 16;
/// Frames per test-run call (a call is one syscall; the loop checks the clock between calls).
const FRAMES_PER_CALL: u32 = 1 << 17;
/// Calls per cell at most, whatever the clock says.
const MAX_CALLS: usize = 2_000;
/// The frame's length (Ethernet, IPv4, UDP, 22 bytes of payload).
const FRAME_LEN: usize = 64;

/// Runs `f` with this thread in network namespace `ns`, then returns to its own.
fn with_ns<T>(ns: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    let target = File::open(Path::new("/run/netns").join(ns)).with_context(|| format!("namespace {ns}"))?;
    nix::sched::setns(target, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let r = f();
    nix::sched::setns(home, nix::sched::CloneFlags::CLONE_NEWNET).context("returning to the bench's own namespace")?;
    r
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| args.join(" "))?;
    ensure!(out.status.success(), "{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn link_json(ns: &str, iface: &str) -> Result<serde_json::Value> {
    let text = sh(&["ip", "-n", ns, "-s", "-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v[0].clone())
}

fn mac(ns: &str, iface: &str) -> Result<[u8; 6]> {
    let v = link_json(ns, iface)?;
    let s = v["address"].as_str().ok_or_else(|| anyhow!("no address for {iface}"))?;
    let b: Vec<u8> = s.split(':').map(|x| u8::from_str_radix(x, 16)).collect::<Result<_, _>>()?;
    b.try_into().map_err(|_| anyhow!("bad MAC {s}"))
}

/// The server end's rx counters: packets taken off its ring (every frame the filter saw) and
/// drops (frames the sender could not queue, the ring being full).
fn rx_counters(ns: &str, iface: &str) -> Result<(u64, u64)> {
    let v = link_json(ns, iface)?;
    let rx = &v["stats64"]["rx"];
    Ok((rx["packets"].as_u64().unwrap_or(0), rx["dropped"].as_u64().unwrap_or(0)))
}

/// `ethtool -K IFACE gro on` without ethtool: the ETHTOOL_SGRO ioctl, then ETHTOOL_GGRO to check.
fn gro_on(ns: &str, iface: &str) -> Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GGRO: u32 = 0x2b;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let name = iface.as_bytes();
    ensure!(name.len() < libc::IFNAMSIZ, "interface name too long");
    with_ns(ns, || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
        let call = |cmd: u32, data: u32| -> Result<u32> {
            let mut value = EthtoolValue { cmd, data };
            // SAFETY: an all-zero ifreq is valid; the name fits (checked) with its terminator.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
                *d = *s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
            // SAFETY: SIOCETHTOOL with an ifreq whose data points to a live ethtool_value.
            let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&sock), SIOCETHTOOL as _, &mut ifr) };
            ensure!(rc == 0, "SIOCETHTOOL {cmd:#x} on {iface}: {}", std::io::Error::last_os_error());
            Ok(value.data)
        };
        call(ETHTOOL_SGRO, 1)?;
        ensure!(call(ETHTOOL_GGRO, 0)? == 1, "GRO stayed off on {iface}");
        Ok(())
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What a receiver runs, with what it must keep alive.
enum Filter {
    /// An attached xdpfw instance (detached on drop, before its namespaces go).
    Xdpfw { instance: Instance },
    /// A plain-LPM program (the link goes with the `Ebpf`).
    Lpm { _ebpf: Ebpf },
    /// nftables in the server namespace (the table goes with the namespace; deleted on drop).
    Nft,
}

struct Receiver {
    name: String,
    filter: Filter,
    // Dropped after `filter`: fields drop in declaration order.
    topo: Topology,
    /// Mpps per round, per mix.
    mpps: [Vec<f64>; 2],
    sent_mpps: [Vec<f64>; 2],
    /// Frames the sender could not queue (ring full), per mix, summed over rounds.
    lost: [u64; 2],
    /// Dropped by the filter / seen by it, per mix, from the filter's own counters.
    drop_ratio: [Option<f64>; 2],
}

impl Drop for Receiver {
    fn drop(&mut self) {
        match &self.filter {
            Filter::Xdpfw { .. } => {
                if let Err(e) = with_ns(&self.topo.server_ns, || Ok(control::detach(&self.topo.server_if)?)) {
                    eprintln!("detaching xdpfw from {}: {e:#}", self.topo.server_if);
                }
            }
            Filter::Nft => {
                let _ = sh(&["ip", "netns", "exec", &self.topo.server_ns, "nft", "delete", "table", "netdev", "xdpfw_live"]);
            }
            Filter::Lpm { .. } => {}
        }
    }
}

impl Receiver {
    /// (dropped, seen) from the filter's own counters, where it has them.
    fn counters(&self) -> Result<Option<(u64, u64)>> {
        match &self.filter {
            Filter::Xdpfw { instance } => {
                let s = with_ns(&self.topo.server_ns, || Ok(control::stats(instance)?))?;
                Ok(Some((s.global.dropped, s.global.seen)))
            }
            Filter::Nft => {
                let text = sh(&["ip", "netns", "exec", &self.topo.server_ns, "nft", "list", "chain", "netdev", "xdpfw_live", "ingress"])?;
                let packets = text
                    .split("counter packets ")
                    .nth(1)
                    .and_then(|t| t.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| anyhow!("no counter in: {text}"))?;
                // Seen: the interface's rx counter (every frame passes the ingress hook).
                Ok(Some((packets, rx_counters(&self.topo.server_ns, &self.topo.server_if)?.0)))
            }
            Filter::Lpm { .. } => Ok(None),
        }
    }
}

fn new_receiver(tag: &str, name: &str, threaded: bool, filter: impl FnOnce(&Topology) -> Result<Filter>) -> Result<Receiver> {
    let topo = Topology::new(tag).map_err(anyhow::Error::msg)?;
    gro_on(&topo.server_ns, &topo.server_if)?;
    let t = Instant::now();
    let filter = filter(&topo)?;
    if threaded {
        napi_threaded(&topo.server_ns, &topo.server_if)?;
    }
    eprintln!("{name}: ready on {} in {:.1?}", topo.server_if, t.elapsed());
    Ok(Receiver { name: name.to_string(), filter, topo, mpps: [vec![], vec![]], sent_mpps: [vec![], vec![]], lost: [0, 0], drop_ratio: [None, None] })
}

fn attach_xdpfw(t: &Topology, rules: &Path) -> Result<Filter> {
    with_ns(&t.server_ns, || {
        control::attach(&t.server_if, Some(rules), xdpfw_kernel::AttachMode::Native)?;
        Ok(Filter::Xdpfw { instance: Instance::find(Some(&t.server_if))? })
    })
}

fn attach_lpm(t: &Topology, set: &[(Ipv4Addr, u8)]) -> Result<Filter> {
    let mut ebpf = Ebpf::load(PLAIN_LPM)?;
    {
        let mut trie: LpmTrie<_, [u8; 4], u32> = LpmTrie::try_from(ebpf.map_mut("PLAIN_V4").context("PLAIN_V4")?)?;
        for (net, len) in set {
            trie.insert(&Key::new(u32::from(*len), net.octets()), &1, 0)?;
        }
    }
    let prog: &mut Xdp = ebpf.program_mut("plain_lpm").ok_or_else(|| anyhow!("no plain_lpm"))?.try_into()?;
    prog.load()?;
    with_ns(&t.server_ns, || {
        let ifindex = nix::net::if_::if_nametoindex(t.server_if.as_str())?;
        prog.attach(ifindex, XdpMode::Driver)?;
        Ok(())
    })?;
    Ok(Filter::Lpm { _ebpf: ebpf })
}

fn attach_nft(t: &Topology, dir: &Path, set: &[(Ipv4Addr, u8)]) -> Result<Filter> {
    let mut elements = String::with_capacity(set.len() * 20);
    for (i, (net, len)) in set.iter().enumerate() {
        let _ = write!(elements, "{}{net}/{len}", if i == 0 { "" } else { ", " });
    }
    let path = dir.join("nft.conf");
    std::fs::write(
        &path,
        format!(
            "table netdev xdpfw_live {{\n  set hosts {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {elements} }} }}\n  \
             chain ingress {{ type filter hook ingress device \"{}\" priority 0; ip saddr @hosts counter drop; }}\n}}\n",
            t.server_if
        ),
    )?;
    let start = Instant::now();
    sh(&["ip", "netns", "exec", &t.server_ns, "nft", "-f", path.to_str().unwrap_or_default()])?;
    eprintln!("nft -f: {} prefixes in {:.1?}", set.len(), start.elapsed());
    Ok(Filter::Nft)
}

/// The CPU the generator runs on with `--threaded`; the receivers' NAPI threads get the other.
const GENERATOR_CPU: usize = 0;
const RECEIVER_CPU: usize = 1;

/// Pins thread `tid` (0: the calling thread) to `cpu`.
fn pin(tid: i32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity get valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        ensure!(libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) == 0, "pinning thread {tid} to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Switches `iface`'s NAPI to a kernel thread (`/sys/class/net/IFACE/threaded`, written in the
/// namespace's own sysfs) and pins every NAPI thread to `RECEIVER_CPU`.
fn napi_threaded(ns: &str, iface: &str) -> Result<()> {
    sh(&["ip", "netns", "exec", ns, "sh", "-c", &format!("echo 1 > /sys/class/net/{iface}/threaded")])?;
    let mut pinned = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.starts_with("napi/") {
            pin(pid, RECEIVER_CPU)?;
            pinned += 1;
        }
    }
    ensure!(pinned > 0, "no NAPI thread after switching {iface} to threaded NAPI");
    Ok(())
}

/// The generator: the `live_gen` program and the frame it rewrites.
struct Generator {
    ebpf: Ebpf,
}

impl Generator {
    fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(LIVE_GEN)?;
        let prog: &mut Xdp = ebpf.program_mut("live_gen").ok_or_else(|| anyhow!("no live_gen"))?.try_into()?;
        prog.load()?;
        Ok(Self { ebpf })
    }

    fn set_sources(&mut self, sources: &[Ipv4Addr]) -> Result<()> {
        let mut table: Array<_, u32> = Array::try_from(self.ebpf.map_mut("LIVE_SOURCES").context("LIVE_SOURCES")?)?;
        for (i, a) in sources.iter().enumerate() {
            table.set(i as u32, &u32::from_ne_bytes(a.octets()), 0)?;
        }
        Ok(())
    }

    /// Sends frames from `t`'s client end for `secs`; returns (frames sent, seconds).
    fn run(&mut self, t: &Topology, secs: f64) -> Result<(u64, f64)> {
        let frame = udp_frame(mac(&t.client_ns, &t.client_if)?, mac(&t.server_ns, &t.server_if)?);
        let prog: &mut Xdp = self.ebpf.program_mut("live_gen").ok_or_else(|| anyhow!("no live_gen"))?.try_into()?;
        with_ns(&t.client_ns, || {
            let ifindex = nix::net::if_::if_nametoindex(t.client_if.as_str())?;
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
            // egress_ifindex. The ingress interface is where XDP_TX sends the frame.
            let words: [u32; 6] = [0, FRAME_LEN as u32, 0, ifindex, 0, 0];
            let ctx: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let (mut sent, mut calls) = (0u64, 0usize);
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < secs && calls < MAX_CALLS {
                let mut opts = TestRunOptions::new();
                opts.data_in = Some(&frame);
                opts.ctx_in = Some(&ctx);
                opts.repeat = FRAMES_PER_CALL;
                opts.attrs = TestRunAttrs::new().xdp_live_frames(64);
                prog.test_run(opts).context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES")?;
                sent += u64::from(FRAMES_PER_CALL);
                calls += 1;
            }
            Ok((sent, start.elapsed().as_secs_f64()))
        })
    }
}

/// A 64-byte IPv4 UDP frame from the client end to the server's address, port 9 (nothing
/// listens), source 0.0.0.0 (the generator rewrites it), header checksum set.
fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_LEN);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let dst: Ipv4Addr = SERVER_V4.parse().expect("the server address");
    let total = (FRAME_LEN - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&(total - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4)
    f.resize(FRAME_LEN, 0);
    f
}

/// Whether `a` is inside one of the prefixes (by /16 to /32 lookups in a hash set).
fn covered(index: &std::collections::HashSet<(u32, u8)>, a: Ipv4Addr) -> bool {
    let a = u32::from(a);
    (16..=32u8).any(|len| index.contains(&(a & (u32::MAX << (32 - u32::from(len))), len)))
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let threaded = std::env::args().any(|a| a == "--threaded");
    let n = if quick { 100_000 } else { 1_000_000 };
    let secs = if quick { 1.0 } else { 3.0 };
    let rounds = if quick { 3 } else { 5 };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the live bench needs root (namespaces, XDP, nftables)");
    }
    let set = host_routes::host_route_heavy(11, n);
    let index: std::collections::HashSet<(u32, u8)> = set.iter().map(|(net, len)| (u32::from(*net), *len)).collect();
    let mut rng = StdRng::seed_from_u64(111);
    let inside: Vec<Ipv4Addr> = (0..SOURCES)
        .map(|_| {
            let prefix = set[rng.random_range(0..set.len())];
            host_routes::inside(&mut rng, prefix)
        })
        .collect();
    let anywhere: Vec<Ipv4Addr> = (0..SOURCES).map(|_| Ipv4Addr::from(rng.random::<u32>())).collect();
    let in_set_b = anywhere.iter().filter(|a| covered(&index, **a)).count() as f64 / SOURCES as f64;
    let distinct = |v: &[Ipv4Addr]| v.iter().collect::<std::collections::HashSet<_>>().len();
    eprintln!(
        "{n} host-route-heavy prefixes; mix a: {} distinct sources inside the set; mix b: {} distinct, {:.1}% of them inside",
        distinct(&inside),
        distinct(&anywhere),
        in_set_b * 100.0
    );

    let dir = std::env::temp_dir().join(format!("xdpfw-live-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    if threaded {
        pin(0, GENERATOR_CPU)?;
    }
    let result = run(quick, threaded, n, secs, rounds, &set, [&inside[..], &anywhere[..]], in_set_b, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[expect(clippy::too_many_arguments, reason = "the bench's parameters, passed once")]
fn run(quick: bool, threaded: bool, n: usize, secs: f64, rounds: usize, set: &[(Ipv4Addr, u8)], mixes: [&[Ipv4Addr]; 2], in_set_b: f64, dir: &Path) -> Result<()> {
    std::fs::write(dir.join("hosts.txt"), host_routes::set_file(set))?;
    let one_rule = dir.join("one.toml");
    std::fs::write(&one_rule, "default = \"pass\"\n[sets.hosts]\nfile = \"hosts.txt\"\n[[rule]]\nname = \"hosts\"\naction = \"drop\"\nsrc = [\"@hosts\"]\n")?;
    let many_rules = dir.join("many.toml");
    let extra = structured_rules(&mut StdRng::seed_from_u64(7), 1000);
    std::fs::write(&many_rules, format!("default = \"pass\"\n[sets.hosts]\nfile = \"hosts.txt\"\n{extra}[[rule]]\nname = \"hosts\"\naction = \"drop\"\nsrc = [\"@hosts\"]\n"))?;

    let mut generator = Generator::load()?;
    // Built one by one; any failure drops (detaches, deletes) those built so far.
    let mut receivers = vec![
        new_receiver("lvc", "ceiling (XDP_DROP)", threaded, |t| attach_lpm(t, &[(Ipv4Addr::UNSPECIFIED, 0)]))?,
        new_receiver("lvx", "xdpfw, 1 rule", threaded, |t| attach_xdpfw(t, &one_rule))?,
        new_receiver("lvk", "xdpfw, 1000 rules + set rule", threaded, |t| attach_xdpfw(t, &many_rules))?,
        new_receiver("lvl", "plain LPM lookup", threaded, |t| attach_lpm(t, set))?,
        new_receiver("lvn", "nftables (netdev ingress)", threaded, |t| attach_nft(t, dir, set))?,
    ];

    let mix_names = ["a: sources inside the set", "b: sources anywhere"];
    for (m, sources) in mixes.iter().enumerate() {
        generator.set_sources(sources)?;
        // Warm-up, not counted: page pools, caches, the first NAPI runs.
        for r in &receivers {
            generator.run(&r.topo, 0.3)?;
        }
        let before: Vec<Option<(u64, u64)>> = receivers.iter().map(Receiver::counters).collect::<Result<_>>()?;
        for round in 0..rounds {
            for r in receivers.iter_mut() {
                let (rx0, lost0) = rx_counters(&r.topo.server_ns, &r.topo.server_if)?;
                let (sent, elapsed) = generator.run(&r.topo, secs)?;
                // The ring holds at most 256 frames; let NAPI empty it before reading.
                std::thread::sleep(Duration::from_millis(20));
                let (rx1, lost1) = rx_counters(&r.topo.server_ns, &r.topo.server_if)?;
                let mpps = (rx1 - rx0) as f64 / elapsed / 1e6;
                r.mpps[m].push(mpps);
                r.sent_mpps[m].push(sent as f64 / elapsed / 1e6);
                r.lost[m] += lost1 - lost0;
                eprintln!("mix {} round {round}: {:<32} {mpps:6.3} Mpps ({:.3} Mpps sent, {} lost)", &mix_names[m][..1], r.name, sent as f64 / elapsed / 1e6, lost1 - lost0);
            }
        }
        for (r, b) in receivers.iter_mut().zip(before) {
            if let (Some((d0, s0)), Some((d1, s1))) = (b, r.counters()?) {
                r.drop_ratio[m] = Some((d1 - d0) as f64 / (s1 - s0).max(1) as f64);
            }
        }
    }
    report(quick, threaded, n, secs, rounds, &receivers, in_set_b, &mix_names)
}

#[expect(clippy::too_many_arguments, reason = "the run's parameters, reported once")]
fn report(quick: bool, threaded: bool, n: usize, secs: f64, rounds: usize, receivers: &[Receiver], in_set_b: f64, mix_names: &[&str; 2]) -> Result<()> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nLive veth, 64-byte UDP frames from {SOURCES} random sources per mix, {n} host-route-heavy prefixes; Mpps processed by the receiving end\n\
         (median of {rounds} rounds of {secs} s; the receivers take turns in each round; {})\n",
        if threaded { "threaded NAPI: the receiver on a CPU of its own, the generator on the other" } else { "generator and receiver share one CPU" }
    );
    let _ = writeln!(out, "{:<32} {:>10} {:>8} {:>10} {:>8} {:>12}   per round (a | b)", "filter", "a: Mpps", "a: drop", "b: Mpps", "b: drop", "a: ns > ceil");
    let med = |r: &Receiver, m: usize| median(r.mpps[m].clone());
    let find = |name: &str| receivers.iter().find(|r| r.name.starts_with(name)).ok_or_else(|| anyhow!("no receiver {name}"));
    let (ceiling, lpm, nft) = (find("ceiling")?, find("plain LPM")?, find("nftables")?);
    // Mix a only (the ceiling drops every packet, as every filter does in mix a): ns per packet
    // beyond what generating, carrying and dropping a frame costs, i.e. the filter's own cost.
    let above = |r: &Receiver| 1e3 / med(r, 0) - 1e3 / med(ceiling, 0);
    for r in receivers {
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
        let rounds = |m: usize| r.mpps[m].iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(" ");
        let _ = writeln!(
            out,
            "{:<32} {:>10.3} {:>8} {:>10.3} {:>8} {:>12.0}   {} | {}",
            r.name,
            med(r, 0),
            pct(r.drop_ratio[0]),
            med(r, 1),
            pct(r.drop_ratio[1]),
            above(r),
            rounds(0),
            rounds(1)
        );
    }
    let _ = writeln!(out, "(mix b: {:.1}% of the sources are inside the set; ns > ceil: 1000/Mpps minus the ceiling's, mix a)", in_set_b * 100.0);
    let mut ratios = Vec::new();
    let _ = writeln!(out, "\n{:<32} {:>10} {:>10} {:>10} {:>10} {:>16} {:>16}", "Mpps ratio", "a: / LPM", "a: / nft", "b: / LPM", "b: / nft", "a: LPM ns / fw", "a: nft ns / fw");
    for fw in [find("xdpfw, 1 rule")?, find("xdpfw, 1000")?] {
        let r = |m: usize, peer: &Receiver| med(fw, m) / med(peer, m);
        let cost = |peer: &Receiver| above(peer) / above(fw);
        let _ = writeln!(out, "{:<32} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>16.2} {:>16.2}", fw.name, r(0, lpm), r(0, nft), r(1, lpm), r(1, nft), cost(lpm), cost(nft));
        ratios.push(serde_json::json!({
            "filter": fw.name, "a_over_lpm": r(0, lpm), "a_over_nft": r(0, nft), "b_over_lpm": r(1, lpm), "b_over_nft": r(1, nft),
            "a_ns_above_ceiling": above(fw), "a_lpm_cost_over_fw": cost(lpm), "a_nft_cost_over_fw": cost(nft),
        }));
    }
    let _ = writeln!(out, "(targets, issue 11: mix a xdpfw >= 1.5x LPM and >= 5x nftables in Mpps; mix b ahead of both)");
    print!("{out}");
    let json = serde_json::json!({
        "quick": quick,
        "threaded": threaded,
        "prefixes": n,
        "sources_per_mix": SOURCES,
        "seconds_per_cell": secs,
        "rounds": rounds,
        "mix_b_sources_inside": in_set_b,
        "mixes": mix_names,
        "filters": receivers.iter().map(|r| serde_json::json!({
            "filter": r.name,
            "mpps": [med(r, 0), med(r, 1)],
            "mpps_per_round": r.mpps,
            "sent_mpps_per_round": r.sent_mpps,
            "lost_to_full_ring": r.lost,
            "drop_ratio": r.drop_ratio,
            "a_ns_above_ceiling": above(r),
        })).collect::<Vec<_>>(),
        "ratios": ratios,
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("live.json"), serde_json::to_string_pretty(&json)?)?;
    println!("JSON: target/bench/live.json");
    Ok(())
}
