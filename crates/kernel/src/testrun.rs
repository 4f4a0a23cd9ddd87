//! Running packets through the real XDP program with BPF_PROG_TEST_RUN, on a private (unpinned,
//! unattached) copy with its own maps: `explain --kernel`, kernel tests, differential tests and
//! benchmarks all use this.

use std::time::Duration;


use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use xdpfw_common::{PROGRAM_NAME, action, buffer_of, variant};
use xdpfw_common::FlowEntry;
use xdpfw_rules::{Action, compile::Image, packet::{FlowState, PacketSpec}};

use crate::{
    Maps,
    error::{KernelContext, KernelError, Result},
};

pub struct PrivateProgram {
    ebpf: Ebpf,
    pub maps: Maps,
    /// Which copy this is (`xdpfw_common::variant`).
    variant: u32,
}

impl PrivateProgram {
    pub fn load() -> Result<Self> {
        let (ebpf, maps) = crate::load_private()?;
        Ok(Self { ebpf, maps, variant: variant::FULL })
    }

    /// Also loads the egress program (sharing the maps), for [`Self::run_egress`].
    pub fn load_egress(&mut self) -> Result<()> {
        crate::load_egress(&mut self.ebpf)
    }

    /// Runs `frame` through the egress program `repeat` times, as a packet this host sends;
    /// returns its TC verdict and the mean time per run.
    pub fn run_egress(&mut self, frame: &[u8], repeat: u32) -> Result<(i32, Duration)> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(xdpfw_common::EGRESS_PROGRAM_NAME)
            .ok_or_else(|| KernelError::msg("egress program missing"))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let r = prog.test_run(opts).kctx(|| "BPF_PROG_TEST_RUN of the egress program".into())?;
        Ok((r.return_value as i32, r.duration))
    }

    /// A private copy loaded by the caller (`crate::load_private_variant` of another build).
    pub fn from_parts(ebpf: Ebpf, maps: Maps, variant: u32) -> Self {
        Self { ebpf, maps, variant }
    }

    /// A private copy of the program as `variant` (`xdpfw_common::variant`).
    pub fn load_variant(variant: u32) -> Result<Self> {
        let (ebpf, maps) = crate::load_private_variant(crate::PROGRAM_OBJECT, variant)?;
        Ok(Self { ebpf, maps, variant })
    }

    /// A private copy of another build of the program (`object`: its ELF bytes).
    pub fn load_from(object: &[u8]) -> Result<Self> {
        let (ebpf, maps) = crate::load_private_from(object)?;
        Ok(Self { ebpf, maps, variant: variant::FULL })
    }

    /// Installs `image` as the next generation and makes it active.
    pub fn activate(&mut self, image: &Image) -> Result<u64> {
        if self.variant == variant::PLAIN && image.header.needs_full_program() {
            return Err(KernelError::msg("this ruleset needs the full copy of the program, not the plain one"));
        }
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

    /// The XDP action for `pkt` in its connection state: an established or related packet's flow
    /// is put in the flow table for the run (as the egress program would have), and taken out
    /// after, so no other packet finds it.
    pub fn run_spec(&mut self, pkt: &PacketSpec) -> Result<u32> {
        if pkt.state == FlowState::New {
            return self.run(&pkt.to_frame());
        }
        let key = pkt.flow_key();
        self.maps.insert_flow(key, FlowEntry { expires_ns: u64::MAX, flags: 0, _pad: 0 })?;
        let result = self.run(&pkt.to_frame());
        self.maps.remove_flow(&key)?;
        result
    }

    /// The verdict as an action of the rules language (anything but XDP_DROP passes).
    pub fn verdict(&mut self, frame: &[u8]) -> Result<Action> {
        Ok(if self.run(frame)? == action::DROP { Action::Drop } else { Action::Pass })
    }

    /// The loaded program, for a harness that tail-calls it (the classifier bench's stream rows).
    pub fn program(&self) -> Result<&Xdp> {
        Ok(self.ebpf.program(PROGRAM_NAME).ok_or_else(|| KernelError::msg("program missing"))?.try_into()?)
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

/// Runs `pkt` through the probe copy of the program (self-tests), which takes the packet's
/// connection state from the frame's metadata (one byte, in 4) instead of the live flow table.
pub fn run_probe(prog: &mut Xdp, pkt: &PacketSpec) -> Result<u32> {
    let frame = pkt.to_frame();
    let mut data = vec![pkt.state.kernel() as u8, 0, 0, 0];
    data.extend_from_slice(&frame);
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. The metadata is the first `data` bytes of data_in.
    let words: [u32; 6] = [4, data.len() as u32, 0, 0, 0, 0];
    let ctx: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; data.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&data);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let r = prog.test_run(opts).kctx(|| "BPF_PROG_TEST_RUN (with metadata)".into())?;
    Ok(r.return_value)
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
