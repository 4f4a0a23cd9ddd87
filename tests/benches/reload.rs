//! `cargo xtask bench` (second part): reload latency phase by phase for 1k, 100k and 1M IPv4
//! prefixes on an attached instance, side by side with `nft -f` replacing an equivalent nftables
//! interval set, both inside a network namespace made for the run.

use xdpfw_testkit::topology;

use std::{fmt::Write as _, fs::File, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, ensure};
use rand::{Rng, SeedableRng, rngs::StdRng};
use xdpfw_control::{self as instance, Instance, ReloadOptions};

#[path = "../kernel_support/host_routes.rs"]
mod host_routes;

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick { &[1_000, 100_000] } else { &[1_000, 100_000, 1_000_000] };
    let t = topology::Topology::new("rbn").map_err(anyhow::Error::msg)?;
    let dir = std::env::temp_dir().join(format!("xdpfw-reload-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // This process works inside the server namespace from here on (attach resolves the
    // interface there); bpffs and the files stay the host's.
    let ns = File::open(Path::new("/run/netns").join(&t.server_ns))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let result = run(&t, &dir, sizes, quick);
    let _ = instance::detach(&t.server_if);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(t.history_dir());
    result
}

fn run(t: &topology::Topology, dir: &Path, sizes: &[usize], quick: bool) -> Result<()> {
    instance::attach(&t.server_if, None, xdpfw_kernel::AttachMode::Auto)?;
    let inst = Instance::find(Some(&t.server_if))?;
    let nft = |script: &str| -> Result<f64> {
        let path = dir.join("nft.conf");
        std::fs::write(&path, script)?;
        let start = Instant::now();
        let out = Command::new("nft").arg("-f").arg(&path).output().context("running nft (install nftables)")?;
        ensure!(out.status.success(), "nft -f failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(start.elapsed().as_secs_f64() * 1000.0)
    };
    nft("table inet xdpfw_bench {\n  set blocklist { type ipv4_addr; flags interval; auto-merge; }\n  chain input { type filter hook input priority 0; ip saddr @blocklist drop; }\n}\n")?;

    let mut rng = StdRng::seed_from_u64(11);
    let mut table = String::new();
    let _ = writeln!(table, "{:>9} {:>8} {:>8} {:>8} {:>7} {:>6} {:>8} {:>7} {:>13} {:>10} {:>9} {:>15}", "prefixes", "parse", "compile", "install", "prove", "flip", "grace", "clear", "to flip (ms)", "total ms", "nft -f ms", "to flip / nft");
    let mut json = Vec::new();
    for &n in sizes {
        // Distinct /24s and /32s, as a blocklist would hold.
        let mut seen = std::collections::HashSet::with_capacity(n);
        let mut set = String::with_capacity(n * 18);
        let mut elements = String::with_capacity(n * 18);
        while seen.len() < n {
            let len = if rng.random_bool(0.8) { 24 } else { 32 };
            let a: u32 = (rng.random::<u32>() & 0x00ff_ffff | 0x0a00_0000) & (u32::MAX << (32 - len));
            if seen.insert((a, len)) {
                let net = format!("{}/{len}", std::net::Ipv4Addr::from(a));
                let _ = writeln!(set, "{net}");
                let _ = write!(elements, "{}{net}", if elements.is_empty() { "" } else { ", " });
            }
        }
        std::fs::write(dir.join("set.txt"), &set)?;
        let rules = dir.join("rules.toml");
        std::fs::write(&rules, format!("version = \"bench-{n}\"\ndefault = \"pass\"\n[sets.block]\nfile = \"set.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@block\"]\n"))?;
        let r = instance::reload(&inst, &rules, &ReloadOptions::default())?;
        let tm = &r.times;
        let us = |v: u64| v as f64 / 1000.0;
        let to_flip = us(tm.parse_us + tm.compile_us + tm.lock_wait_us + tm.install_arrays_us + tm.install_tables_us + tm.prove_us + tm.flip_us);
        let nft_ms = nft(&format!("flush set inet xdpfw_bench blocklist\nadd element inet xdpfw_bench blocklist {{ {elements} }}\n"))?;
        let _ = writeln!(
            table,
            "{n:>9} {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>6.2} {:>8.1} {:>7.1} {to_flip:>13.1} {:>10.1} {nft_ms:>9.1} {:>15.3}",
            us(tm.parse_us),
            us(tm.compile_us),
            us(tm.install_arrays_us + tm.install_tables_us),
            us(tm.prove_us),
            us(tm.flip_us),
            us(tm.grace_us),
            us(tm.clear_us),
            us(tm.total_us),
            to_flip / nft_ms
        );
        json.push(serde_json::json!({"prefixes": n, "times_us": tm, "to_flip_ms": to_flip, "total_ms": us(tm.total_us), "nft_ms": nft_ms, "ratio_to_nft": to_flip / nft_ms}));
    }
    if !quick {
        let real = real_world_like(t, dir, &inst, &nft)?;
        json.push(real.0);
        table.push_str(&real.1);
    }
    let _ = Command::new("nft").args(["delete", "table", "inet", "xdpfw_bench"]).output();

    // The fast path while reloads run back to back, against the same program idle: the attached
    // program itself (opened from its pin) through BPF_PROG_TEST_RUN.
    let mut prog = aya::programs::Xdp::from_pin(
        t.pin_dir().join("prog"),
        aya_obj::programs::XdpAttachType::Interface,
    )?;
    let frames: Vec<Vec<u8>> = (0..64u32)
        .map(|i| {
            let spec: xdpfw_rules::packet::PacketSpec = format!("tcp 10.{}.{}.7:4000 -> 192.0.2.2:443", i % 200, (i * 7) % 250).parse().unwrap();
            spec.to_frame()
        })
        .collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let sample = |prog: &mut aya::programs::Xdp| -> Result<f64> {
        let mut ns = Vec::new();
        for f in &frames {
            ns.push(xdpfw_kernel::testrun::run_frame(prog, f, 2000)?.1.as_nanos() as f64);
        }
        Ok(median(ns))
    };
    let idle_before = (0..3).map(|_| sample(&mut prog)).collect::<Result<Vec<_>>>()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The same ruleset again and again, so each packet's work is the same as when idle.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reloader = {
        let (stop, done, rules, iface) = (stop.clone(), done.clone(), dir.join("rules.toml"), t.server_if.clone());
        std::thread::spawn(move || -> Result<()> {
            let inst = Instance::find(Some(&iface))?;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                instance::reload(&inst, &rules, &ReloadOptions::default())?;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        })
    };
    let mut busy_samples = Vec::new();
    while busy_samples.len() < 3 || done.load(std::sync::atomic::Ordering::SeqCst) < 10 {
        busy_samples.push(sample(&mut prog)?);
    }
    let busy = median(busy_samples);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    reloader.join().map_err(|_| anyhow::anyhow!("the reloader thread panicked"))??;
    let reloads = done.load(std::sync::atomic::Ordering::SeqCst);
    // Idle both before and after, so a drift of the machine does not pass for an effect.
    let mut idle_samples = idle_before;
    for _ in 0..3 {
        idle_samples.push(sample(&mut prog)?);
    }
    let idle = median(idle_samples);
    println!("\nFast path during continuous reloads: {busy:.1} ns/packet vs {idle:.1} idle (ratio {:.2}; {reloads} reloads ran meanwhile)", busy / idle);
    json.push(serde_json::json!({"fast_path_idle_ns": idle, "fast_path_during_reloads_ns": busy, "ratio": busy / idle, "reloads_during_sample": reloads}));
    println!("\nReload latency (ms; parse includes reading the set file; the same prefixes for nft, in one transaction):");
    print!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("reload.json"), serde_json::to_string_pretty(&json)?)?;
    println!("JSON: target/bench/reload.json");
    Ok(())
}

/// Issue 11's real-world-like case: a host-route-heavy 1M-prefix IPv4 set (10% /16-/23, 45% /24,
/// 45% /32 over the whole space) and 250k IPv6 prefixes (/32 to /64 and /128) under four rules.
/// A first reload compiles them; then reloads that change only a port rule reuse the compiled
/// tables (five of them, median). `nft -f` loads the same two sets into interval sets in one
/// transaction, in the same namespace, for the ratio.
fn real_world_like(t: &topology::Topology, dir: &Path, inst: &Instance, nft: &dyn Fn(&str) -> Result<f64>) -> Result<(serde_json::Value, String)> {
    let v4 = host_routes::host_route_heavy(11, 1_000_000);
    std::fs::write(dir.join("v4.txt"), host_routes::set_file(&v4))?;
    let v6 = host_routes::host_route_heavy_v6(12, 250_000);
    let v6_text = host_routes::set_file(&v6);
    let v6_elements = v6.iter().map(|(net, len)| format!("{net}/{len}")).collect::<Vec<_>>().join(", ");
    std::fs::write(dir.join("v6.txt"), &v6_text)?;
    let rules = dir.join("real.toml");
    let write_rules = |port: u16| {
        std::fs::write(
            &rules,
            format!(
                "default = \"pass\"\n[sets.v4]\nfile = \"v4.txt\"\n[sets.v6]\nfile = \"v6.txt\"\n\
                 [[rule]]\naction = \"pass\"\nproto = \"tcp\"\ndport = {port}\n\
                 [[rule]]\naction = \"drop\"\nsrc = [\"@v4\", \"@v6\"]\n\
                 [[rule]]\naction = \"drop\"\ndst = [\"@v6\"]\nproto = \"udp\"\n\
                 [[rule]]\naction = \"pass\"\nproto = \"udp\"\ndport = 53\n"
            ),
        )
    };
    let us = |v: u64| v as f64 / 1000.0;
    // Measured by the pipeline from its start to the flip, everything included (the records
    // written before the flip too); the sum of the phases for reports of older versions.
    let to_flip = |tm: &instance::ReloadTimes| {
        if tm.to_flip_us > 0 { us(tm.to_flip_us) } else { us(tm.parse_us + tm.compile_us + tm.lock_wait_us + tm.install_arrays_us + tm.install_tables_us + tm.prove_us + tm.flip_us) }
    };
    let row = |what: &str, tm: &instance::ReloadTimes, nft_ms: f64| {
        format!(
            "{what:<44} {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>13.1} {:>10.1} {:>9.1} {:>9.4}\n",
            us(tm.parse_us),
            us(tm.compile_us),
            us(tm.install_arrays_us + tm.install_tables_us),
            us(tm.flip_us + tm.prove_us),
            to_flip(tm),
            us(tm.total_us),
            nft_ms,
            to_flip(tm) / nft_ms
        )
    };
    let mut out = format!(
        "\nReal-world-like sets: 1M host-route-heavy IPv4 + 250k IPv6 prefixes, 4 rules (ms; `to flip`: the reload's start to its flip, measured):\n{:<44} {:>8} {:>8} {:>8} {:>7} {:>13} {:>10} {:>9} {:>9}\n",
        "reload", "parse", "compile", "install", "flip", "to flip (ms)", "total ms", "nft -f ms", "/ nft"
    );
    let files = |tm: &instance::ReloadTimes| format!("large set files read {}, parsed {}, taken unread {}", tm.set_files_read, tm.set_files_parsed, tm.set_files_unread);
    write_rules(22)?;
    let cold = instance::reload(inst, &rules, &ReloadOptions::default())?;
    let v4_elements: Vec<String> = v4.iter().map(|(n, l)| format!("{n}/{l}")).collect();
    nft("table inet xdpfw_bench {\n  set v6 { type ipv6_addr; flags interval; auto-merge; }\n  chain input6 { type filter hook input priority 0; ip6 saddr @v6 drop; }\n}\n")?;
    let nft_ms = nft(&format!(
        "flush set inet xdpfw_bench blocklist\nflush set inet xdpfw_bench v6\nadd element inet xdpfw_bench blocklist {{ {} }}\nadd element inet xdpfw_bench v6 {{ {v6_elements} }}\n",
        v4_elements.join(", ")
    ))?;
    out.push_str(&row("all sets compiled (first reload)", &cold.times, nft_ms));
    // The first port-only reload after the sets were loaded reads the set files and finds
    // their texts kept; from then on their metadata vouches for them (they are older than
    // `TRUST_AGE`), and they are not read at all.
    write_rules(2221)?;
    let first = instance::reload(inst, &rules, &ReloadOptions::default())?;
    ensure!(first.times.tables_reused, "a reload that changes only a port rule must reuse the address tables");
    // It is also the first to share the live tables: clearing the retired buffer after the
    // first reload left the live tables in its slots, so it changes none (each change would
    // cost the kernel an RCU grace period before the flip).
    ensure!(first.times.slot_changes == 0, "the first port-only reload changed {} array-of-maps slots", first.times.slot_changes);
    out.push_str(&row("one port rule changed, first after the sets", &first.times, nft_ms));
    let mut port_only = Vec::new();
    for port in [2222, 22, 2222, 22, 2222] {
        write_rules(port)?;
        let r = instance::reload(inst, &rules, &ReloadOptions::default())?;
        ensure!(r.times.tables_reused, "a reload that changes only a port rule must reuse the address tables");
        port_only.push(r.times);
    }
    port_only.sort_by(|a, b| to_flip(a).total_cmp(&to_flip(b)));
    let median = port_only[port_only.len() / 2].clone();
    out.push_str(&row("one port rule changed (in-process; median of 5)", &median, nft_ms));
    out.push_str(&format!("(first: {}; median: {})\n", files(&first.times), files(&median)));
    // The same through the command line, as an operator runs it (process start, reading the
    // files, the JSON report): its wall time to exit, which includes the grace period.
    write_rules(2223)?;
    let start = Instant::now();
    let cli = Command::new(xdpfw_testkit::loader_bin())
        .args(["--netns", &t.server_ns, "reload", rules.to_str().unwrap_or_default(), "--iface", &t.server_if, "--json"])
        .output()?;
    let cli_wall = start.elapsed().as_secs_f64() * 1000.0;
    ensure!(cli.status.success(), "loader reload failed: {}", String::from_utf8_lossy(&cli.stderr));
    let cli_report: serde_json::Value = serde_json::from_slice(&cli.stdout)?;
    let cli_times: instance::ReloadTimes = serde_json::from_value(cli_report["times"].clone())?;
    out.push_str(&row("one port rule changed, `loader reload` (CLI)", &cli_times, nft_ms));
    out.push_str(&format!("(`loader reload` wall time, process start to exit: {cli_wall:.1} ms; tables reused: {})\n", cli_times.tables_reused));

    // The same through the daemon operators run (`loader run --rules`): it adopts the instance,
    // parses the files once, then each port change is applied on SIGHUP (sent right after the
    // write, before the file watcher's debounce ends) and on the file event alone. Its log says
    // how long after the trigger (the SIGHUP's wake-up, or the end of the event burst) the flip
    // came, and the reload's own phase times.
    let daemon = daemon_rows(t, dir, &rules, &write_rules)?;
    let mut daemon_json = Vec::new();
    for (what, trigger_to_flip, tm) in &daemon {
        out.push_str(&format!(
            "{:<44} {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>13.1} {:>10.1} {:>9.1} {:>9.4}\n",
            what,
            us(tm.parse_us),
            us(tm.compile_us),
            us(tm.install_arrays_us + tm.install_tables_us),
            us(tm.flip_us + tm.prove_us),
            trigger_to_flip,
            us(tm.total_us),
            nft_ms,
            trigger_to_flip / nft_ms
        ));
        daemon_json.push(serde_json::json!({"what": what, "trigger_to_flip_ms": trigger_to_flip, "times_us": tm}));
    }
    if let Some((_, _, tm)) = daemon.first() {
        out.push_str(&format!("(daemon, SIGHUP median: {}; `to flip` for the daemon rows is from the trigger to the flip; a file event adds the watcher's {} ms debounce before its trigger)\n", files(tm), 150));
    }
    // `loader set` beside the 1M-prefix set (issue 11: under 10 ms for one address is the
    // target), on the delta path, beside nftables' `add element` of the same addresses to its
    // equivalent set. The first batch after a reload builds the delta context (a parse of the
    // live snapshot's texts and the sets' indexes); the others read them. The set's counters
    // are kept (tests/sets.rs shows it on real traffic, tests/set_delta.rs the tables).
    let mut rng = StdRng::seed_from_u64(99);
    let mut set_json = Vec::new();
    let mut hosts = |n: usize| -> Vec<std::net::Ipv4Addr> { (0..n).map(|_| std::net::Ipv4Addr::from(rng.random::<u32>() | 0x0100_0000)).collect() };
    let nets = |addrs: &[std::net::Ipv4Addr]| -> Vec<ipnet::IpNet> { addrs.iter().map(|a| ipnet::IpNet::from(std::net::IpAddr::V4(*a))).collect() };
    let nft_add = |addrs: &[std::net::Ipv4Addr]| nft(&format!("add element inet xdpfw_bench blocklist {{ {} }}\n", addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")));
    let mut set_row = |what: &str, r: &instance::SetReport, wall: f64, nft_ms: f64, out: &mut String| -> Result<()> {
        let reload = r.reload.as_ref().context("the batch changed nothing")?;
        // Batches that fit the delta path must take it; a larger one is reported with its path.
        ensure!(r.path == "delta" || what.contains("10000"), "{what}: took the reload path: {:?}", r.why_reload);
        let what = if r.path == "delta" { what.to_string() } else { format!("{what} (reload path)") };
        let what = what.as_str();
        let line = row(what, &reload.times, nft_ms);
        // Said as it comes too: these rows come last, after minutes of others.
        eprint!("{line}");
        out.push_str(&line);
        if let Some(why) = &r.why_reload {
            out.push_str(&format!("({what}: {why})\n"));
        }
        set_json.push(serde_json::json!({"what": what, "path": r.path, "wall_ms": wall, "times_us": reload.times, "nft_add_ms": nft_ms}));
        Ok(())
    };
    let timed_in = |set: &str, op: xdpfw_rules::setedit::SetOp, nets: &[ipnet::IpNet]| -> Result<(instance::SetReport, f64)> {
        let start = Instant::now();
        let r = instance::set_update(inst, set, op, nets, &ReloadOptions::default())?;
        Ok((r, start.elapsed().as_secs_f64() * 1000.0))
    };
    let timed = |op, nets: &[ipnet::IpNet]| timed_in("v4", op, nets);
    let add = xdpfw_rules::setedit::SetOp::Add;
    let a = hosts(1);
    let (r, wall) = timed(add, &nets(&a))?;
    let nft_ms = nft_add(&a)?;
    set_row("`set add` of 1, first after the reload", &r, wall, nft_ms, &mut out)?;
    // nftables' `add element` of one address into the auto-merge set takes about 30 s (it reads
    // the set back to merge): measured once above, the reference for every one-address row.
    let nft_one = nft_ms;
    let mut ones = Vec::new();
    for _ in 0..5 {
        let a = hosts(1);
        let (r, wall) = timed(add, &nets(&a))?;
        ones.push((r, wall, nft_one));
    }
    ones.sort_by(|x, y| x.1.total_cmp(&y.1));
    let (r, wall, nft_ms) = &ones[2];
    set_row("`set add` of 1 (in-process; median of 5)", r, *wall, *nft_ms, &mut out)?;
    out.push_str(&format!("(`set add` of 1 in-process: {wall:.2} ms in all, lock to report)\n"));
    // The command line, as fail2ban runs it: process start to exit.
    let mut cli = Vec::new();
    for _ in 0..5 {
        let a = hosts(1);
        let start = Instant::now();
        let o = Command::new(xdpfw_testkit::loader_bin())
            .args(["--netns", &t.server_ns, "set", "add", &t.server_if, "v4", &a[0].to_string(), "--json"])
            .output()?;
        let wall = start.elapsed().as_secs_f64() * 1000.0;
        ensure!(o.status.success(), "loader set add failed: {}", String::from_utf8_lossy(&o.stderr));
        let r: instance::SetReport = serde_json::from_slice(&o.stdout)?;
        cli.push((r, wall, nft_one));
    }
    cli.sort_by(|x, y| x.1.total_cmp(&y.1));
    let (r, wall, nft_ms) = &cli[2];
    set_row("`set add` of 1 (CLI; median of 5)", r, *wall, *nft_ms, &mut out)?;
    out.push_str(&format!("(`loader set add` of 1 from the command line: {wall:.2} ms process start to exit, median of 5)\n"));
    for n in [1000, 10_000] {
        let many = hosts(n);
        let (r, wall) = timed(add, &nets(&many))?;
        let nft_ms = nft_add(&many)?;
        set_row(&format!("`set add` of {n} to the 1M set"), &r, wall, nft_ms, &mut out)?;
    }
    let (r, wall) = timed(xdpfw_rules::setedit::SetOp::Del, &nets(&a))?;
    // nftables' auto-merge may have merged the address into a range already: no delete then.
    let nft_ms = nft(&format!("delete element inet xdpfw_bench blocklist {{ {} }}\n", a[0])).unwrap_or(f64::NAN);
    set_row("`set del` of 1 (vs nft delete element)", &r, wall, nft_ms, &mut out)?;
    // IPv6 host routes added to the 250k-prefix IPv6 set (both fields' rules name it), beside
    // `add element` of the same addresses to nftables' IPv6 set.
    let mut rng6 = StdRng::seed_from_u64(66);
    let mut hosts6 = |n: usize| -> Vec<std::net::Ipv6Addr> { (0..n).map(|_| std::net::Ipv6Addr::from((rng6.random::<u128>() >> 3) | (1u128 << 125))).collect() };
    let nets6 = |addrs: &[std::net::Ipv6Addr]| -> Vec<ipnet::IpNet> { addrs.iter().map(|a| ipnet::IpNet::from(std::net::IpAddr::V6(*a))).collect() };
    let nft_add6 = |addrs: &[std::net::Ipv6Addr]| nft(&format!("add element inet xdpfw_bench v6 {{ {} }}\n", addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")));
    let a6 = hosts6(1);
    let (r, wall) = timed_in("v6", add, &nets6(&a6))?;
    let nft6_one = nft_add6(&a6)?;
    set_row("`set add` of 1 IPv6, first", &r, wall, nft6_one, &mut out)?;
    let mut ones = Vec::new();
    for _ in 0..5 {
        let (r, wall) = timed_in("v6", add, &nets6(&hosts6(1)))?;
        ones.push((r, wall));
    }
    ones.sort_by(|x, y| x.1.total_cmp(&y.1));
    set_row("`set add` of 1 IPv6 (in-process; median of 5)", &ones[2].0, ones[2].1, nft6_one, &mut out)?;
    let many = hosts6(1000);
    let (r, wall) = timed_in("v6", add, &nets6(&many))?;
    let nft_ms = nft_add6(&many)?;
    set_row("`set add` of 1000 IPv6 to the 250k set", &r, wall, nft_ms, &mut out)?;
    let json = serde_json::json!({
        "real_world_like": {
            "set_add": set_json,
            "v4_prefixes": 1_000_000, "v6_prefixes": 250_000, "nft_ms": nft_ms,
            "first": {"times_us": cold.times, "to_flip_ms": to_flip(&cold.times)},
            "port_rule_only": {"times_us": median, "to_flip_ms": to_flip(&median)},
            "cli": {"times_us": cli_times, "to_flip_ms": to_flip(&cli_times), "wall_ms": cli_wall},
            "port_rule_only_first": {"times_us": first.times, "to_flip_ms": to_flip(&first.times)},
            "daemon": daemon_json,
        }
    });
    Ok((json, out))
}

/// `loader run IFACE --rules RULES` on the bench's instance: five port changes applied on
/// SIGHUP and five on the file event alone; for each kind the median of (trigger to flip in
/// ms, the reload's times), from the daemon's log and `loader status --json`.
fn daemon_rows(t: &topology::Topology, dir: &Path, rules: &Path, write_rules: &dyn Fn(u16) -> std::io::Result<()>) -> Result<Vec<(String, f64, instance::ReloadTimes)>> {
    use xdpfw_testkit::daemon::Daemon;
    let d = Daemon::start(t, dir, &["--rules", rules.to_str().unwrap_or_default(), "--min-interval", "100ms"]);
    // The first check parses the sets (a fresh process) and finds the file's ruleset live.
    let applied = |d: &Daemon| d.log().lines().filter(|l| l.contains("after the trigger")).count();
    let settle = |d: &Daemon, n: usize| -> Result<()> {
        let start = Instant::now();
        while applied(d) < n {
            ensure!(start.elapsed().as_secs() < 120, "the daemon did not apply the change:\n{}", d.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    };
    let last_times = || -> Result<instance::ReloadTimes> {
        let out = Command::new(xdpfw_testkit::loader_bin()).args(["--netns", &t.server_ns, "status", "--iface", &t.server_if, "--json"]).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
        let times = v.pointer("/state/last_reload/times").cloned().with_context(|| format!("no last_reload in {v}"))?;
        Ok(serde_json::from_value(times)?)
    };
    let trigger_ms = |d: &Daemon| -> Option<f64> {
        let log = d.log();
        let line = log.lines().rev().find(|l| l.contains("after the trigger"))?;
        let before = line.split(" us after the trigger").next()?;
        before.rsplit(' ').next()?.parse::<f64>().ok().map(|v| v / 1000.0)
    };
    // Let the adoption's first check (a full parse) pass.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let mut rows = Vec::new();
    for (what, hup) in [("one port rule changed, daemon, SIGHUP (median of 5)", true), ("one port rule changed, daemon, file event (median of 5)", false)] {
        let mut samples = Vec::new();
        for i in 0..5u16 {
            let n = applied(&d);
            write_rules(3000 + i + if hup { 0 } else { 100 })?;
            if hup {
                d.signal(nix::sys::signal::Signal::SIGHUP);
            }
            settle(&d, n + 1)?;
            // Quiet before the next change: the watcher's events of this one are consumed.
            std::thread::sleep(std::time::Duration::from_millis(1500));
            samples.push((trigger_ms(&d).context("no trigger-to-flip in the daemon's log")?, last_times()?));
        }
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (ms, tm) = samples.swap_remove(samples.len() / 2);
        rows.push((what.to_string(), ms, tm));
    }
    Ok(rows)
}
