//! `cargo xtask demo`: the firewall on a veth pair between two namespaces, with real traffic.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use xdpfw_testkit::topology::{CLIENT_V4, SERVER_V4, SERVER_V6, Topology};

use crate::{root_dir, run};

fn step(title: &str) {
    println!("\n=== {title}");
}

fn loader(bin: &Path, ns: &str, args: &[&str]) -> Result<()> {
    println!("$ loader --netns {ns} {}", args.join(" "));
    run(Command::new(bin).arg("--netns").arg(ns).args(args))
}

/// Pings from the client namespace; returns how many replies came back.
fn ping(t: &Topology, addr: &str, count: u32, interval: &str) -> Result<u32> {
    let out = Command::new("ip")
        .args(["netns", "exec", &t.client_ns, "ping", "-n", "-q", "-c", &count.to_string(), "-i", interval, "-W", "1", addr])
        .output()
        .context("running ping")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text.lines().find(|l| l.contains("transmitted")).unwrap_or("(no summary)").to_string();
    println!("  ping {addr} x{count}: {summary}");
    let received = summary
        .split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Ok(received)
}

pub(crate) fn run_demo(bin: &Path) -> Result<()> {
    let rules = root_dir().join("rules");
    let first = rules.join("demo.toml");
    let second = rules.join("demo-reloaded.toml");
    let bad = std::env::temp_dir().join(format!("xdpfw-demo-bad-{}.toml", std::process::id()));
    std::fs::write(&bad, "default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = [\"192.0.2.0/33\"]\n")?;

    step("Two namespaces and a veth pair (nothing touches the root namespace)");
    let mut t = Topology::new("demo").map_err(anyhow::Error::msg)?;
    t.detach_on_drop(&bin.to_string_lossy());
    println!("  client {} ({}) <-> server {} ({}), firewall on {}", t.client_ns, CLIENT_V4, t.server_ns, SERVER_V4, t.server_if);

    step("Attach with rules/demo.toml: IPv4 ping dropped, the rest passes");
    let first_s = first.to_string_lossy();
    loader(bin, &t.server_ns, &["attach", &t.server_if, "--rules", &first_s])?;
    let v4 = ping(&t, SERVER_V4, 3, "0.2")?;
    let v6 = ping(&t, SERVER_V6, 3, "0.2")?;
    ensure!(v4 == 0 && v6 == 3, "expected IPv4 ping dropped and IPv6 ping passed");

    step("Reload to rules/demo-reloaded.toml while 300 pings are in flight");
    let flood = Command::new("ip")
        .args(["netns", "exec", &t.client_ns, "ping", "-n", "-q", "-c", "300", "-i", "0.005", "-W", "1", SERVER_V4])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(600));
    let second_s = second.to_string_lossy();
    loader(bin, &t.server_ns, &["reload", &second_s, "--iface", &t.server_if])?;
    let out = flood.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("  in-flight ping: {}", text.lines().find(|l| l.contains("transmitted")).unwrap_or("?"));
    let v4 = ping(&t, SERVER_V4, 3, "0.2")?;
    let v6 = ping(&t, SERVER_V6, 3, "0.2")?;
    ensure!(v4 == 3 && v6 == 0, "expected IPv4 ping passed and IPv6 ping dropped after the reload");

    step("A broken rules file is rejected, and the running rules keep serving");
    println!("$ loader reload {} (CIDR with /33)", bad.display());
    let o = Command::new(bin).args(["--netns", &t.server_ns, "reload", &bad.to_string_lossy(), "--iface", &t.server_if]).output()?;
    print!("  {}", String::from_utf8_lossy(&o.stderr).replace('\n', "\n  "));
    ensure!(!o.status.success(), "the broken file was accepted");
    let v4 = ping(&t, SERVER_V4, 3, "0.2")?;
    ensure!(v4 == 3, "the previous ruleset stopped serving");
    let _ = std::fs::remove_file(&bad);

    step("Stats");
    loader(bin, &t.server_ns, &["stats", "--iface", &t.server_if])?;
    println!("$ bpftool prog show name xdpfw");
    let _ = run(Command::new("bpftool").args(["prog", "show", "name", "xdpfw"]));

    step("Detach: program and pins removed, namespaces deleted");
    loader(bin, &t.server_ns, &["detach", &t.server_if])?;
    drop(t);
    println!("\ndemo finished: attach, drop/pass by rule, reload under traffic, rejected bad file, stats, detach");
    Ok(())
}
