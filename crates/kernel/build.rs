//! Builds the XDP program with the pinned eBPF nightly (installed by `cargo xtask setup`).
fn main() -> anyhow::Result<()> {
    let pin = concat!(env!("CARGO_MANIFEST_DIR"), "/../../xdp-ebpf/rust-toolchain.toml");
    println!("cargo::rerun-if-changed={pin}");
    let text = std::fs::read_to_string(pin)?;
    let channel = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"').to_string())
        .ok_or_else(|| anyhow::anyhow!("no channel in {pin}"))?;
    let ebpf = aya_build::Package {
        name: "xdp-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../../xdp-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&channel))
}
