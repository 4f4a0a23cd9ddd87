//! The `[[test]]` entries of every shipped rules file, through the real program and the
//! reference matcher. Needs root.

mod kernel_support;

use std::path::{Path, PathBuf};

use xdpfw_rules::{
    self as rules,
};
use xdpfw_testkit as harness;

use kernel_support::*;

// ---------------------------------------------------------------------------------------------
// 2. The shipped rules files and their [[test]] entries
// ---------------------------------------------------------------------------------------------

fn rules_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn rules_files_self_tests() {
    if !harness::root_or_skip() {
        return;
    }
    let files = rules_files();
    assert!(!files.is_empty(), "no rules/*.toml files found");
    let mut prog = load();
    let mut failures = Vec::new();
    let mut total = 0;
    for path in &files {
        let rs = rules::load(path).unwrap_or_else(|e| panic!("{e}"));
        let buffer = activate(&mut prog, &rs);
        let n = rs.rules.len() as u32;
        for t in &rs.tests {
            total += 1;
            // The kernel alone escalates what an owner rule decides (pending action, counted on
            // the escalating rule); with the test's owner, `d` is what the service decides.
            let (in_kernel, d) = xdpfw_rules::selftest::test_decisions(&rs, t);
            if d.action != t.expect {
                failures.push(format!("{}: matcher says {} for \"{}\", expected {}", t.location, d.action, t.text, t.expect));
            }
            if let Some(rule) = &t.rule
                && d.rule_name.as_ref() != Some(rule)
            {
                failures.push(format!("{}: matcher decided \"{}\" by {:?}, expected rule \"{rule}\"", t.location, t.text, d.rule_name));
            }
            let before = prog.maps.rule_stats(buffer, n).unwrap();
            // An established or related packet has its flow in the table for its run.
            let verdict = prog.run_spec(&t.packet).unwrap();
            let after = prog.maps.rule_stats(buffer, n).unwrap();
            if verdict != in_kernel.action.kernel() {
                failures.push(format!("{}: kernel says {} for \"{}\", expected {}", t.location, action_name(verdict), t.text, in_kernel.action));
            }
            if t.rule.is_some()
                && let Some(i) = in_kernel.rule
                && after[i].packets != before[i].packets + 1
            {
                failures.push(format!("{}: kernel did not count \"{}\" on rule \"{}\"", t.location, t.text, rs.rules[i].name));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {total} self-tests failed:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{} rules files, {total} self-tests", files.len());
}

// ---------------------------------------------------------------------------------------------
// 3. Differential: random rulesets and packets, kernel against the reference matcher
// ---------------------------------------------------------------------------------------------

