//! The architecture as a check: every crate of the workspace depends only on crates below it
//! (ARCHITECTURE.md), and the rules crate's whole tree stays free of aya, tokio and libc.

#[cfg(test)]
mod tests {
    use std::process::Command;

    /// Bottom to top; a crate may depend only on crates earlier in this list.
    const LAYERS: [&str; 9] = [
        "xdpfw-common",
        "xdpfw-rules",
        "xdpfw-kernel",
        "xdpfw-control",
        "xdpfw-fleet",
        "xdpfw-daemon",
        "loader",
        "xdpfw-testkit",
        "xdpfw-tests",
    ];

    fn metadata() -> serde_json::Value {
        let out = Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(crate::root_dir())
            .output()
            .expect("running cargo metadata");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
    }

    #[test]
    fn crates_depend_downward_only() {
        let meta = metadata();
        let mut checked = 0;
        for pkg in meta["packages"].as_array().unwrap() {
            let name = pkg["name"].as_str().unwrap();
            let Some(level) = LAYERS.iter().position(|l| *l == name) else { continue };
            checked += 1;
            for dep in pkg["dependencies"].as_array().unwrap() {
                let dep_name = dep["name"].as_str().unwrap();
                if let Some(dep_level) = LAYERS.iter().position(|l| *l == dep_name) {
                    // testkit sits beside the product crates: it may use only common and rules.
                    let allowed = if name == "xdpfw-testkit" { dep_level <= 1 } else { dep_level < level };
                    assert!(allowed, "{name} depends on {dep_name}, which is not below it (see ARCHITECTURE.md)");
                }
            }
        }
        assert_eq!(checked, LAYERS.len(), "every layer is a package of the workspace");
    }

    #[test]
    fn the_rules_crate_needs_no_kernel_runtime_or_libc() {
        let out = Command::new(env!("CARGO"))
            .args(["tree", "-p", "xdpfw-rules", "--edges", "normal,build,dev", "--prefix", "none"])
            .current_dir(crate::root_dir())
            .output()
            .expect("running cargo tree");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let tree = String::from_utf8_lossy(&out.stdout);
        for banned in ["aya ", "aya-", "tokio ", "libc ", "nix "] {
            assert!(!tree.lines().any(|l| l.starts_with(banned)), "xdpfw-rules pulls in {banned}:\n{tree}");
        }
    }
}
