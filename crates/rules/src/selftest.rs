//! Evaluating a rules file's `[[test]]` packets: with the reference matcher alone (`check`,
//! `fleet publish`) or also through the kernel (a reload proves the inactive buffer with them),
//! which the caller supplies as a closure so this crate stays free of the kernel.

use xdpfw_common::action;

use crate::{Action, Ruleset, SelfTest, matcher, owner::OwnerSpec};

/// Runs a packet through the kernel and returns the XDP action: its frame, with its connection
/// state given to the probe program (which reads it instead of the live flow table).
pub type KernelRun<'a, E> = dyn FnMut(&crate::packet::PacketSpec) -> Result<u32, E> + 'a;

/// The decisions of a `[[test]]` packet: the kernel's alone (which gives the pending action to
/// packets an owner rule decides), and with the test's owner, if it gives one, what the
/// escalation service then decides.
pub fn test_decisions(rs: &Ruleset, t: &SelfTest) -> (matcher::Decision, matcher::Decision) {
    let kernel_view = matcher::decide(rs, &t.packet);
    let d = match &t.owner {
        Some(OwnerSpec(owner)) => matcher::decide_with_owner(rs, &t.packet, owner.as_ref()),
        None => kernel_view.clone(),
    };
    (kernel_view, d)
}

/// The self-tests of a ruleset that failed, each as a located line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} of {total} self-tests failed; the rules were not applied:\n  {}", failures.len(), failures.join("\n  "))]
pub struct SelfTestFailures {
    pub total: usize,
    pub failures: Vec<String>,
}

/// The verdicts of a rules file's `[[test]]` packets that do not match what they expect:
/// `run` gives the kernel's XDP action for a frame (`None` checks the reference matcher only).
pub fn self_test_failures<E>(rs: &Ruleset, mut run: Option<&mut KernelRun<'_, E>>) -> Result<Vec<String>, E> {
    let mut failures = Vec::new();
    for t in &rs.tests {
        let (kernel_view, d) = test_decisions(rs, t);
        let mut problems = Vec::new();
        if d.action != t.expect {
            problems.push(format!("the rules give {} ({})", d.action, d.rule_name.as_deref().unwrap_or("no rule")));
        }
        if let Some(want) = &t.rule
            && d.rule_name.as_deref() != Some(want.as_str())
        {
            problems.push(format!(
                "decided by {}, not rule \"{want}\"",
                d.rule_name.as_deref().map_or("the default".to_string(), |n| format!("rule \"{n}\""))
            ));
        }
        if let Some(run) = run.as_mut() {
            let kernel = if run(&t.packet)? == action::DROP { Action::Drop } else { Action::Pass };
            // Without an owner the kernel's verdict is the verdict; with one, the kernel can only
            // escalate, and must do what the reference matcher says the kernel alone does.
            let want = if t.owner.is_some() { kernel_view.action } else { t.expect };
            if kernel != want {
                problems.push(format!("the kernel gives {kernel}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: self-test \"{}\" expects {}: {}", t.location, t.text, t.expect, problems.join("; ")));
        }
    }
    Ok(failures)
}

/// The reference matcher's verdict on every self-test, as an error when any fails.
pub fn check_self_tests(rs: &Ruleset) -> Result<(), SelfTestFailures> {
    let failures = self_test_failures::<std::convert::Infallible>(rs, None).unwrap_or_else(|e| match e {});
    if failures.is_empty() { Ok(()) } else { Err(SelfTestFailures { total: rs.tests.len(), failures }) }
}
