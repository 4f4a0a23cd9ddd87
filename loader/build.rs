//! Builds the XDP program with the pinned eBPF nightly (installed by `cargo xtask setup`).
fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "xdp-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../xdp-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(xtask_toolchain()))
}

/// Kept in one place with xtask's copy by a test in xtask (`ebpf_toolchain_matches_build_rs`).
fn xtask_toolchain() -> &'static str {
    "nightly-2026-10-01"
}
