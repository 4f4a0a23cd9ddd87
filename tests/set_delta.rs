//! The delta path of `loader set` against the compiler: after every batch (adds and deletes of
//! host routes, /24s and short prefixes, over a host-route-heavy set that rules use in the
//! source and the destination, with exclusions of it and by it), the live tables, read as the
//! program reads them, give every address tried the rule set a full compile of the same ruleset
//! gives it; and a reload of the rules file afterwards reaches the same ruleset hash.

use std::collections::BTreeSet;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use xdpfw_common::buffer_of;
use xdpfw_control::{self as control, Instance, ReloadOptions};
use xdpfw_rules::setedit::SetOp;
use xdpfw_testkit::{daemon::TempDir, *};

/// splitmix64: the same draws on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn net(a: u32, len: u8) -> Ipv4Net {
    Ipv4Net::new(a.into(), len).unwrap().trunc()
}

/// Host-route heavy, as feeds are: 45% /32, 45% /24, 10% /20 to /23, in 10.0.0.0/8 (so batches
/// land beside what the set holds), a quarter anywhere.
fn draw(rng: &mut Rng) -> Ipv4Net {
    let a = if rng.below(4) == 0 { rng.next() as u32 } else { 0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff) };
    let len = match rng.below(20) {
        0..=8 => 32,
        9..=17 => 24,
        _ => 20 + rng.below(4) as u8,
    };
    net(a, len)
}

/// A prefix for a batch: beside one the set holds (a host route in its /24, a /25 or /28 in
/// it, its /24), which changes leaves the live tables already have; or a fresh one; or short.
fn near(rng: &mut Rng, present: &[Ipv4Net]) -> Ipv4Net {
    let p = present[rng.below(present.len() as u64) as usize];
    let a = u32::from(p.network());
    match rng.below(8) {
        0..=2 => net(a & !0xff | (rng.next() as u32 & 0xff), 32),
        3 => net(a | (rng.next() as u32 & 0x80), 25),
        4 => net(a | (rng.next() as u32 & 0xf0), 28),
        5 => net(a, 24),
        6 => draw(rng),
        _ => net(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff), 12 + rng.below(5) as u8),
    }
}

/// The rules file (a host-route-heavy 20k-prefix `feed` in both fields, with exclusions of it
/// and by it) and a topology to attach it to.
fn setup(rng: &mut Rng, name: &str) -> (TempDir, std::path::PathBuf, BTreeSet<Ipv4Net>, Topology) {
    let dir = TempDir::new(name);
    let rules = dir.0.join("rules.toml");
    let feed: BTreeSet<Ipv4Net> = (0..20_000).map(|_| draw(rng)).collect();
    std::fs::write(dir.0.join("feed.txt"), feed.iter().map(|n| format!("{n}\n")).collect::<String>()).unwrap();
    std::fs::write(dir.0.join("allow.txt"), "10.1.0.0/16\n10.2.3.0/24\n").unwrap();
    std::fs::write(
        &rules,
        "default = \"pass\"\n\
         [sets.feed]\nfile = \"feed.txt\"\n\
         [sets.allow]\nfile = \"allow.txt\"\n\
         [[rule]]\nname = \"feed-src\"\naction = \"drop\"\nsrc = [\"@feed\"]\nproto = \"tcp\"\n\
         [[rule]]\nname = \"feed-dst\"\naction = \"drop\"\ndst = [\"@feed\", \"!@allow\"]\nproto = \"udp\"\n\
         [[rule]]\nname = \"not-feed\"\naction = \"pass\"\nsrc = [\"198.51.100.0/24\", \"@allow\", \"!@feed\"]\n\
         [[rule]]\nname = \"outside\"\naction = \"drop\"\nsrc = [\"!10.0.0.0/8\"]\nproto = \"tcp\"\ndport = 22\n",
    )
    .unwrap();
    let mut t = Topology::new(name).expect("topology");
    t.detach_on_drop(loader_bin());
    (dir, rules, feed, t)
}

/// Moves this thread into the server namespace of `t`, for the rest of the test.
fn enter_server_ns(t: &Topology) {
    let ns = std::fs::File::open(std::path::Path::new("/run/netns").join(&t.server_ns)).unwrap();
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// `rules` attached to the server end of `t` from inside its namespace (where this thread then
/// works), and its instance.
fn attach_inside(t: &Topology, rules: &std::path::Path) -> Instance {
    enter_server_ns(t);
    control::attach(&t.server_if, Some(rules), xdpfw_kernel::AttachMode::Auto).unwrap();
    Instance::find(Some(&t.server_if)).unwrap()
}

#[test]
fn delta_batches_answer_like_a_full_compile() {
    if !root_or_skip() {
        return;
    }
    let mut rng = Rng(7);
    let (_dir, rules, feed, t) = setup(&mut rng, "setdelta");
    let inst = attach_inside(&t, &rules);

    let mut present: Vec<Ipv4Net> = feed.iter().copied().collect();
    let mut checked = 0usize;
    for batch in 0..40 {
        let add = batch % 3 != 2;
        let prefixes: Vec<Ipv4Net> = (0..1 + rng.below(if batch % 10 == 0 { 2000 } else { 30 }))
            .map(|_| if add || present.is_empty() { near(&mut rng, &present) } else { present[rng.below(present.len() as u64) as usize] })
            .collect();
        let nets: Vec<IpNet> = prefixes.iter().copied().map(IpNet::V4).collect();
        let op = if add { SetOp::Add } else { SetOp::Del };
        let r = control::set_update(&inst, "feed", op, &nets, &ReloadOptions::default()).unwrap();
        if r.reload.is_some() {
            assert_eq!(r.path, "delta", "batch {batch}: {:?}", r.why_reload);
        }
        if add {
            present.extend(&prefixes);
        } else {
            present.retain(|p| !prefixes.contains(p));
        }

        let mut addrs: Vec<u32> = (0..3000).map(|_| if rng.below(4) == 0 { rng.next() as u32 } else { 0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff) }).collect();
        for p in &prefixes {
            let (lo, hi) = (u32::from(p.network()), u32::from(p.broadcast()));
            addrs.extend([lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1), lo + (rng.next() as u32 % (hi - lo + 1).max(1))]);
        }
        checked += live_matches_compile(&inst, &rules, &addrs, &format!("batch {batch} ({op}, {} prefixes)", prefixes.len()));
    }
    assert!(checked > 200_000, "{checked} lookups compared");

    // A batch of host routes over the whole space: a new chunk for each /16 it touches (as many
    // as this set's chunk map has free; a 1M-prefix set's has about 14,000: the reload bench's
    // 10,000 addresses).
    let wide: Vec<Ipv4Net> = (0..600).map(|_| net(rng.next() as u32 | 0x0100_0000, 32)).collect();
    let r = control::set_update(&inst, "feed", SetOp::Add, &wide.iter().copied().map(IpNet::V4).collect::<Vec<_>>(), &ReloadOptions::default()).unwrap();
    assert_eq!(r.path, "delta", "{:?}", r.why_reload);
    let addrs: Vec<u32> = wide.iter().flat_map(|p| [u32::from(p.network()), u32::from(p.network()) ^ 1, u32::from(p.network()) ^ 0x100]).collect();
    live_matches_compile(&inst, &rules, &addrs, "after a batch over the whole space");

    // A reload that fails its self-tests writes the inactive buffer and does not flip: the next
    // batch must not take that buffer for the live one's twin.
    let failing = rules.with_file_name("failing.toml");
    let text = std::fs::read_to_string(&rules).unwrap().replacen("\"pass\"\n", "\"pass\"\n[[test]]\npacket = \"udp 192.0.2.9:1000 -> 192.0.2.1:53\"\nexpect = \"drop\"\n", 1).replace("198.51.100.0/24", "198.51.101.0/24");
    std::fs::write(&failing, text).unwrap();
    assert!(control::reload(&inst, &failing, &ReloadOptions::default()).is_err(), "the self-test fails");
    let r = control::set_update(&inst, "feed", SetOp::Add, &[IpNet::V4(net(0x0a63_0000, 16))], &ReloadOptions::default()).unwrap();
    assert_eq!(r.path, "delta", "{:?}", r.why_reload);
    let addrs: Vec<u32> = (0..20_000).map(|_| 0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff)).collect();
    assert!(live_matches_compile(&inst, &rules, &addrs, "after a failed reload") > 0);

    // A reload of the file (the journal applied, compiled whole) is the ruleset the deltas made.
    let hash = inst.state().unwrap().ruleset.hash;
    let r = control::reload(&inst, &rules, &ReloadOptions::default()).unwrap();
    assert_eq!(r.ruleset.hash, hash);
    assert!(r.times.tables_reused, "the deltas' tables are described for reuse: {:?}", r.times);
}

/// Checks that the live tables give each of `addrs`, in both fields, the rule set a full
/// compile of the rules file with the instance's journal gives it, and that the live hash is
/// that ruleset's; returns the lookups compared.
fn live_matches_compile(inst: &Instance, rules: &std::path::Path, addrs: &[u32], what: &str) -> usize {
    let (img, maps, bitmaps) = compiled_and_live(inst, rules, what);
    let mut checked = 0;
    for (field, table) in [(0, img.src_v4.as_ref()), (1, img.dst_v4.as_ref())].into_iter().filter_map(|(f, t)| Some((f, t?))) {
        let lt = maps.live_table(field).unwrap();
        for &a in addrs {
            let id = maps.live_lookup(&lt, a).unwrap_or_else(|| panic!("{what}: {} leads outside the maps", std::net::Ipv4Addr::from(a)));
            let got = bitmaps.get(id as usize).copied().unwrap_or_else(|| panic!("{what}: bitmap {id} beyond the recorded {}", bitmaps.len()));
            let want = img.bitmaps[table.lookup(a) as usize];
            assert_eq!(got, want, "{what}: field {field}, address {}", std::net::Ipv4Addr::from(a));
            checked += 1;
        }
    }
    checked
}

/// A full compile of the rules file with the instance's journal (checked to hash as the live
/// ruleset does), the maps, and the live buffer's bitmaps (checked complete).
fn compiled_and_live(inst: &Instance, rules: &std::path::Path, what: &str) -> (xdpfw_rules::compile::Image, xdpfw_kernel::Maps, Vec<xdpfw_common::Bitmap>) {
    let state = inst.state().unwrap();
    let journal = inst.history().journal().unwrap();
    let rs = control::history::load_rules_with(rules, xdpfw_rules::Origin::Local, &journal).unwrap();
    assert_eq!(rs.hash, state.ruleset.hash, "{what}: the live hash is the file's with the journal");
    let img = xdpfw_rules::compile::compile(&rs).unwrap();
    let maps = xdpfw_kernel::Maps::open(&inst.pin_dir).unwrap();
    let live = buffer_of(maps.generation());
    assert_eq!(maps.header(live).generation, maps.generation(), "{what}: the live buffer is complete");
    let bitmaps = maps.bitmaps(live, state.ruleset.bitmaps);
    (img, maps, bitmaps)
}

/// `loader set` killed (SIGKILL) at random moments of its batches, 60 times: the live buffer is
/// complete after every kill; then the next batch goes live (the delta path, or the reload path
/// when a killed batch is in the journal and not live), and the live tables answer like a full
/// compile of the file with the journal.
#[test]
fn killed_set_batches_leave_a_consistent_instance() {
    if !root_or_skip() {
        return;
    }
    let mut rng = Rng(11);
    let (_dir, rules, feed, t) = setup(&mut rng, "setkill");
    let (ns, iface) = (t.server_ns.clone(), t.server_if.clone());
    loader_ok(&ns, &["attach", &iface, "--rules", rules.to_str().unwrap()]);
    let present: Vec<Ipv4Net> = feed.iter().copied().collect();
    let set = |op: &str, p: Ipv4Net| {
        std::process::Command::new(loader_bin())
            .args(["--netns", &ns, "set", op, &iface, "feed", &p.to_string(), "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // How long a whole batch takes (the first builds the context): kills land anywhere in it.
    let start = std::time::Instant::now();
    assert!(set("add", near(&mut rng, &present)).wait().unwrap().success());
    let whole = start.elapsed().as_micros() as u64;
    let mut paths = std::collections::BTreeMap::new();
    for i in 0..60 {
        let p = near(&mut rng, &present);
        let op = if i % 3 == 2 { "del" } else { "add" };
        let mut child = set(op, p);
        std::thread::sleep(std::time::Duration::from_micros(rng.below(whole + whole / 4)));
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        if out.status.success()
            && let Ok(r) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        {
            *paths.entry(r["path"].as_str().unwrap_or("none").to_string()).or_insert(0) += 1;
        }
        let m = std::process::Command::new(loader_bin()).args(["--netns", &ns, "stats", "--iface", &iface, "--json"]).output().unwrap();
        assert!(m.status.success(), "kill {i}: the instance answers: {}", String::from_utf8_lossy(&m.stderr));
    }
    eprintln!("a batch takes {whole} us; batches that finished before their kill, by path: {paths:?}");

    enter_server_ns(&t);
    let inst = Instance::find(Some(&iface)).unwrap();
    let batch: Vec<IpNet> = (0..20).map(|_| IpNet::V4(near(&mut rng, &present))).collect();
    let r = control::set_update(&inst, "feed", SetOp::Add, &batch, &ReloadOptions::default()).unwrap();
    eprintln!("the batch after the kills: {} ({:?})", r.path, r.why_reload);
    let addrs: Vec<u32> = (0..20_000).map(|_| if rng.below(4) == 0 { rng.next() as u32 } else { 0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff) }).collect();
    live_matches_compile(&inst, &rules, &addrs, "after the kills");
    // And once more, now that everything is in step: the delta path.
    let r = control::set_update(&inst, "feed", SetOp::Add, &[IpNet::V4(near(&mut rng, &present))], &ReloadOptions::default()).unwrap();
    assert!(r.reload.is_none() || r.path == "delta", "{:?}", r.why_reload);
    live_matches_compile(&inst, &rules, &addrs, "after the kills and one more batch");
}

/// A ruleset with self-tests keeps the delta path: each batch is proven in the kernel (the
/// probe on the inactive buffer) before its flip, and a batch that breaks a self-test is
/// refused with nothing changed: the journal, the live ruleset and its tables as they were.
#[test]
fn self_tests_are_proven_on_the_delta_path() {
    if !root_or_skip() {
        return;
    }
    let mut rng = Rng(13);
    let dir = TempDir::new("setproof");
    let rules = dir.0.join("rules.toml");
    let feed: BTreeSet<Ipv4Net> = (0..5_000).map(|_| draw(&mut rng)).filter(|n| u32::from(n.network()) >> 16 != 0x0ac8).collect();
    std::fs::write(dir.0.join("feed.txt"), feed.iter().map(|n| format!("{n}\n")).collect::<String>()).unwrap();
    std::fs::write(
        &rules,
        "default = \"pass\"\n[sets.feed]\nfile = \"feed.txt\"\n\
         [[rule]]\nname = \"feed\"\naction = \"drop\"\nsrc = [\"@feed\"]\n\
         [[test]]\npacket = \"udp 10.200.0.1:1000 -> 192.0.2.1:53\"\nexpect = \"pass\"\n\
         [[test]]\npacket = \"udp 192.0.2.7:1000 -> 10.200.0.1:53\"\nexpect = \"pass\"\n",
    )
    .unwrap();
    let mut t = Topology::new("setproof").expect("topology");
    t.detach_on_drop(loader_bin());
    let inst = attach_inside(&t, &rules);
    let opts = ReloadOptions::default();

    let r = control::set_update(&inst, "feed", SetOp::Add, &[IpNet::V4(net(0x0a01_0203, 32))], &opts).unwrap();
    assert_eq!(r.path, "delta", "{:?}", r.why_reload);
    assert_eq!(r.reload.as_ref().unwrap().times.self_tests, 2, "both self-tests ran in the kernel");

    // 10.200.0.0/16 would drop the first self-test's packet: refused, nothing changed.
    let (hash, journal) = (inst.state().unwrap().ruleset.hash, inst.history().journal().unwrap());
    let err = control::set_update(&inst, "feed", SetOp::Add, &[IpNet::V4(net(0x0ac8_0000, 16))], &opts).unwrap_err();
    assert!(err.to_string().contains("self-test"), "{err}");
    assert_eq!(inst.state().unwrap().ruleset.hash, hash, "the live ruleset is unchanged");
    assert_eq!(inst.history().journal().unwrap(), journal, "the journal is unchanged");
    let addrs: Vec<u32> = (0..5_000).map(|_| 0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff)).chain([0x0ac8_0001]).collect();
    live_matches_compile(&inst, &rules, &addrs, "after a refused batch");

    // And the next batch goes live as before.
    let r = control::set_update(&inst, "feed", SetOp::Add, &[IpNet::V4(net(0x0a01_0204, 32))], &opts).unwrap();
    assert_eq!(r.path, "delta", "{:?}", r.why_reload);
    live_matches_compile(&inst, &rules, &addrs, "after the next batch");
}

/// An IPv6 prefix of a host-route-heavy feed, as issue 11's IPv6 set (30% /32–/48, 40%
/// /49–/64, 30% /128), in the 32 /16s from 2001::/16 on, so batches land beside what the set
/// holds and touch few of the table's /16s.
fn draw6(rng: &mut Rng) -> Ipv6Net {
    let len = match rng.below(10) {
        0..=2 => 32 + rng.below(17) as u8,
        3..=6 => 49 + rng.below(16) as u8,
        _ => 128,
    };
    let a = (0x2001 + rng.below(32) as u128) << 112 | (u128::from(rng.next()) << 64 | u128::from(rng.next())) >> 16;
    Ipv6Net::new(a.into(), len).unwrap().trunc()
}

/// A prefix for an IPv6 batch: beside one the set holds (a host in it, a longer prefix in it,
/// itself shortened), or a fresh one.
fn near6(rng: &mut Rng, present: &[Ipv6Net]) -> Ipv6Net {
    let p = present[rng.below(present.len() as u64) as usize];
    let a = u128::from(p.network());
    let inside = |rng: &mut Rng, len: u8| {
        let host = (u128::from(rng.next()) << 64 | u128::from(rng.next())) & (u128::MAX >> p.prefix_len().min(127));
        Ipv6Net::new((a | host).into(), len.max(p.prefix_len())).unwrap().trunc()
    };
    match rng.below(6) {
        0..=1 => inside(rng, 128),
        2 => inside(rng, p.prefix_len().saturating_add(8).min(128)),
        3 => Ipv6Net::new(p.network(), p.prefix_len().saturating_sub(4).max(17)).unwrap().trunc(),
        _ => draw6(rng),
    }
}

/// The delta path with IPv6 prefixes: a set of IPv6 and IPv4 prefixes in both fields, with
/// exclusions, and an IPv6 self-test; after every batch (IPv6 adds and deletes, some with IPv4
/// prefixes beside them) taken on the delta path, the live IPv6 tables, walked as the program
/// walks them, give every address tried the rule set a full compile gives it.
#[test]
fn ipv6_delta_batches_answer_like_a_full_compile() {
    if !root_or_skip() {
        return;
    }
    let mut rng = Rng(17);
    let dir = TempDir::new("setdelta6");
    let rules = dir.0.join("rules.toml");
    let feed: BTreeSet<Ipv6Net> = (0..4_000).map(|_| draw6(&mut rng)).filter(|n| !n.contains(&"2001:db8:ffff::1".parse::<std::net::Ipv6Addr>().unwrap())).collect();
    let v4: BTreeSet<Ipv4Net> = (0..1_000).map(|_| draw(&mut rng)).collect();
    let lines: String = feed.iter().map(|n| format!("{n}\n")).chain(v4.iter().map(|n| format!("{n}\n"))).collect();
    std::fs::write(dir.0.join("feed.txt"), lines).unwrap();
    std::fs::write(dir.0.join("allow.txt"), "2001:db8::/32\n2003:1:2::/48\n").unwrap();
    std::fs::write(
        &rules,
        "default = \"pass\"\n\
         [sets.feed]\nfile = \"feed.txt\"\n\
         [sets.allow]\nfile = \"allow.txt\"\n\
         [[rule]]\nname = \"feed-src\"\naction = \"drop\"\nsrc = [\"@feed\"]\nproto = \"tcp\"\n\
         [[rule]]\nname = \"feed-dst\"\naction = \"drop\"\ndst = [\"@feed\", \"!@allow\"]\nproto = \"udp\"\n\
         [[rule]]\nname = \"not-feed\"\naction = \"pass\"\nsrc = [\"2001:db8:1::/48\", \"@allow\", \"!@feed\"]\n\
         [[test]]\npacket = \"udp [2001:db8:ffff::1]:1000 -> [2001:db8:ffff::1]:53\"\nexpect = \"pass\"\n",
    )
    .unwrap();
    let mut t = Topology::new("setdelta6").expect("topology");
    t.detach_on_drop(loader_bin());
    let inst = attach_inside(&t, &rules);

    let mut present: Vec<Ipv6Net> = feed.iter().copied().collect();
    let v4: Vec<Ipv4Net> = v4.into_iter().collect();
    let mut checked = 0usize;
    for batch in 0..30 {
        let add = batch % 3 != 2;
        let n = 1 + rng.below(if batch % 10 == 0 { 500 } else { 20 });
        let prefixes: Vec<Ipv6Net> = (0..n).map(|_| if add { near6(&mut rng, &present) } else { present[rng.below(present.len() as u64) as usize] }).collect();
        let mut nets: Vec<IpNet> = prefixes.iter().copied().map(IpNet::V6).collect();
        if batch % 4 == 1 {
            nets.push(IpNet::V4(near(&mut rng, &v4)));
        }
        let op = if add { SetOp::Add } else { SetOp::Del };
        let r = control::set_update(&inst, "feed", op, &nets, &ReloadOptions::default()).unwrap();
        if let Some(reload) = &r.reload {
            assert_eq!(r.path, "delta", "batch {batch}: {:?}", r.why_reload);
            assert_eq!(reload.times.self_tests, 1, "batch {batch}: the IPv6 self-test ran in the kernel");
        }
        if add {
            present.extend(&prefixes);
        } else {
            present.retain(|p| !prefixes.contains(p));
        }
        let mut addrs: Vec<u128> = (0..2000).map(|_| (0x2001 + rng.below(40) as u128) << 112 | (u128::from(rng.next()) << 64 | u128::from(rng.next())) >> 16).collect();
        for p in &prefixes {
            let (lo, hi) = (u128::from(p.network()), u128::from(p.broadcast()));
            addrs.extend([lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1)]);
        }
        for _ in 0..500 {
            let p = present[rng.below(present.len() as u64) as usize];
            addrs.push(u128::from(p.network()) | (u128::from(rng.next()) & (u128::MAX >> p.prefix_len().min(127))));
        }
        checked += live6_matches_compile(&inst, &rules, &addrs, &format!("batch {batch} ({op}, {} prefixes)", nets.len()));
    }
    assert!(checked > 100_000, "{checked} lookups compared");
    // Each batch wrote a snapshot with the whole journal: the old ones went (the attach's stays,
    // and the live one beside the newest set batches the history names).
    let snapshots = std::fs::read_dir(inst.history().dir().join("snapshots")).unwrap().flatten().filter(|e| e.file_name() != "blobs").count();
    assert!(snapshots <= control::history::KEEP_SET_SNAPSHOTS + 2, "{snapshots} snapshots after 30 batches");

    // A reload of the file (the journal applied, compiled whole) is the ruleset the deltas made.
    let hash = inst.state().unwrap().ruleset.hash;
    let r = control::reload(&inst, &rules, &ReloadOptions::default()).unwrap();
    assert_eq!(r.ruleset.hash, hash);
    // And the delta path goes on after it (the reload recorded where the line maps end).
    let r = control::set_update(&inst, "feed", SetOp::Add, &[IpNet::V6(near6(&mut rng, &present))], &ReloadOptions::default()).unwrap();
    assert_eq!(r.path, "delta", "{:?}", r.why_reload);
    let addrs: Vec<u128> = present.iter().take(3000).map(|p| u128::from(p.network())).collect();
    live6_matches_compile(&inst, &rules, &addrs, "after a reload and one more batch");
}

/// [`live_matches_compile`] for the IPv6 tables.
fn live6_matches_compile(inst: &Instance, rules: &std::path::Path, addrs: &[u128], what: &str) -> usize {
    let (img, maps, bitmaps) = compiled_and_live(inst, rules, what);
    let mut checked = 0;
    for (field, table) in [(0, img.src_v6.as_ref()), (1, img.dst_v6.as_ref())].into_iter().filter_map(|(f, t)| Some((f, t?))) {
        let lt = maps.live_v6(field).unwrap();
        for &a in addrs {
            let addr = std::net::Ipv6Addr::from(a);
            let id = maps.live_lookup6(&lt, a).unwrap_or_else(|| panic!("{what}: {addr} leads outside the maps"));
            let got = bitmaps.get(id as usize).copied().unwrap_or_else(|| panic!("{what}: bitmap {id} beyond the recorded {}", bitmaps.len()));
            assert_eq!(got, img.bitmaps[table.lookup(a) as usize], "{what}: field {field}, address {addr}");
            checked += 1;
        }
    }
    checked
}
