//! Running packets through the real XDP program with BPF_PROG_TEST_RUN, on a private (unpinned,
//! unattached) copy with its own maps: `explain --kernel`, kernel tests, differential tests and
//! benchmarks all use this.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use xdpfw_common::{BUFFERS, PROGRAM_NAME, action};

use crate::{
    compile::Image,
    kernel::{self, Maps},
    matcher,
    owner::OwnerSpec,
    rules::{Action, Ruleset, SelfTest},
};

pub struct PrivateProgram {
    ebpf: Ebpf,
    pub maps: Maps,
}

impl PrivateProgram {
    pub fn load() -> Result<Self> {
        let (ebpf, maps) = kernel::load_private()?;
        Ok(Self { ebpf, maps })
    }

    /// Installs `image` as the next generation and makes it active.
    pub fn activate(&mut self, image: &Image) -> Result<u64> {
        let generation = self.maps.generation() + 1;
        let buffer = (generation % BUFFERS as u64) as u32;
        self.maps.install(buffer, generation, image)?;
        self.maps.flip(generation)?;
        // No packet runs concurrently with a test run, so no grace period is needed here.
        if generation > 1 {
            self.maps.clear(1 - buffer)?;
        }
        Ok(generation)
    }

    /// The XDP action the program returns for `frame`.
    pub fn run(&mut self, frame: &[u8]) -> Result<u32> {
        Ok(self.run_repeat(frame, 1)?.0)
    }

    /// The verdict as an action of the rules language (anything but XDP_DROP passes).
    pub fn verdict(&mut self, frame: &[u8]) -> Result<Action> {
        Ok(if self.run(frame)? == action::DROP { Action::Drop } else { Action::Pass })
    }

    /// Runs `frame` `repeat` times in the kernel; returns the action and the mean time per run.
    pub fn run_repeat(&mut self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program missing"))?
            .try_into()?;
        run_frame(prog, frame, repeat)
    }
}

/// Runs `frame` through an XDP program `repeat` times (BPF_PROG_TEST_RUN).
pub fn run_frame(prog: &mut Xdp, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration))
}

/// Runs a frame through the kernel and returns the XDP action.
pub type KernelRun<'a> = dyn FnMut(&[u8]) -> Result<u32> + 'a;

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

/// The verdicts of a rules file's `[[test]]` packets that do not match what they expect:
/// `run` gives the kernel's XDP action for a frame (`None` checks the reference matcher only).
pub fn self_test_failures(
    rs: &Ruleset,
    mut run: Option<&mut KernelRun<'_>>,
) -> Result<Vec<String>> {
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
            problems.push(format!("decided by {}, not rule \"{want}\"", d.rule_name.as_deref().map_or("the default".to_string(), |n| format!("rule \"{n}\""))));
        }
        if let Some(run) = run.as_mut() {
            let kernel = if run(&t.packet.to_frame())? == action::DROP { Action::Drop } else { Action::Pass };
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
