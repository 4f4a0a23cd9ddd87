//! Running packets through the real XDP program with BPF_PROG_TEST_RUN, on a private (unpinned,
//! unattached) copy with its own maps: `explain --kernel`, kernel tests, differential tests and
//! benchmarks all use this.

use std::time::Duration;


use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use xdpfw_common::{PROGRAM_NAME, action, buffer_of};
use xdpfw_rules::{Action, compile::Image};

use crate::{
    Maps,
    error::{KernelContext, KernelError, Result},
};

pub struct PrivateProgram {
    ebpf: Ebpf,
    pub maps: Maps,
}

impl PrivateProgram {
    pub fn load() -> Result<Self> {
        let (ebpf, maps) = crate::load_private()?;
        Ok(Self { ebpf, maps })
    }

    /// A private copy of another build of the program (`object`: its ELF bytes).
    pub fn load_from(object: &[u8]) -> Result<Self> {
        let (ebpf, maps) = crate::load_private_from(object)?;
        Ok(Self { ebpf, maps })
    }

    /// Installs `image` as the next generation and makes it active.
    pub fn activate(&mut self, image: &Image) -> Result<u64> {
        let generation = self.maps.generation() + 1;
        let buffer = buffer_of(generation);
        self.maps.install(buffer, generation, image)?;
        self.maps.flip(generation)?;
        // No packet runs concurrently with a test run, so no grace period is needed here.
        if generation > 1 {
            self.maps.clear(1 - buffer)?;
        }
        Ok(generation)
    }

    /// Instructions the verifier processed to load the program (what loading it costs).
    pub fn verified_instructions(&self) -> Option<u32> {
        let prog: &Xdp = self.ebpf.program(PROGRAM_NAME)?.try_into().ok()?;
        prog.info().ok()?.verified_instruction_count()
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
            .ok_or_else(|| KernelError::msg("program missing"))?
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
    let r = prog.test_run(opts).kctx(|| "BPF_PROG_TEST_RUN".into())?;
    Ok((r.return_value, r.duration))
}
