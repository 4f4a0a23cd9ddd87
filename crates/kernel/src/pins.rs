//! Where an instance lives in bpffs, and the operations on its pins: mounting bpffs, attaching
//! and pinning the program and its link, the probe copy, detaching and unpinning.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::error::{KernelContext, KernelError, Result};
use crate::object::{load_plain, load_probe};
use aya::{
    Ebpf,
    programs::{LinkOrder, SchedClassifier, TcAttach, TcAttachType, Xdp, XdpMode, links::FdLink, links::PinnedLink, xdp::XdpLink},
};
use aya_obj::programs::XdpAttachType;
use xdpfw_common::{EGRESS_PROGRAM_NAME, PROBE_PROGRAM_NAME, PROGRAM_NAME, variant};

/// Pins of the egress program (see [`attach_egress`]) in an instance's folder.
pub const EGRESS_PIN: &str = "egress";
pub const EGRESS_LINK_PIN: &str = "egress_link";
/// The program the link runs (re-pinned when it changes, see [`serve`]).
pub const PROG_PIN: &str = "prog";
/// The two copies of the program (`xdpfw_common::variant`), pinned once loaded.
pub const FULL_PIN: &str = "prog-full";
pub const PLAIN_PIN: &str = "prog-plain";
/// Where [`serve`] pins the program it attached before renaming it over [`PROG_PIN`].
pub const NEXT_PROG_PIN: &str = "prog-next";


/// Where attached instances live in bpffs: `<root>/<key>/{link,prog,probe,<MAP>...}`, one folder
/// per instance, named by its key (`ns<netns inode>-if<ifindex>`, see `xdpfw_control::Instance`).
pub fn pin_root() -> PathBuf {
    std::env::var_os("XDPFW_PIN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/xdpfw"))
}

/// The pin folder of the instance with this key.
pub fn pin_dir(key: &str) -> PathBuf {
    pin_root().join(key)
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there (it is not mounted at boot on
/// every distribution).
pub fn ensure_bpffs() -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let path = Path::new("/sys/fs/bpf");
    let stat = nix::sys::statfs::statfs(path).kctx(|| "statfs /sys/fs/bpf".into())?;
    if stat.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .kctx(|| "mounting bpffs on /sys/fs/bpf (are you root?)".into())
}

/// XDP attach mode as the CLI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    Auto,
    Native,
    Skb,
}

impl AttachMode {
    fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Auto => XdpMode::Default,
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Skb => XdpMode::Skb,
        }
    }
}
/// Loads the probe copy and pins it as `dir/probe`, so every reload can prove its ruleset without
/// paying for a verifier run.
pub fn pin_probe(dir: &Path) -> Result<()> {
    let mut ebpf = load_probe(dir)?;
    let prog: &mut Xdp = ebpf.program_mut(PROBE_PROGRAM_NAME).ok_or_else(|| KernelError::msg("probe program missing".to_string()))?.try_into()?;
    prog.pin(dir.join("probe")).kctx(|| "pinning the probe program".into())?;
    Ok(())
}

/// Opens the pinned probe copy of an instance.
pub fn open_probe(dir: &Path) -> Result<Xdp> {
    Xdp::from_pin(dir.join("probe"), aya_obj::programs::XdpAttachType::Interface).kctx(|| "opening the pinned probe program".into())
}

/// Attaches a loaded program to the interface `ifindex` (named `iface`, for messages) of the
/// current network namespace and pins the link and program in `dir`: the egress program first
/// (see [`attach_egress`]), then the XDP program, whose pinned link is the last step (an
/// instance is attached when `dir/link` exists).
pub fn attach_and_pin(ebpf: &mut Ebpf, iface: &str, ifindex: u32, mode: AttachMode, dir: &Path) -> Result<()> {
    attach_egress(ebpf, iface, ifindex, dir)?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| KernelError::msg("program missing".to_string()))?
        .try_into()?;
    let link_id = prog.attach(ifindex, mode.xdp_mode()).map_err(|e| {
        let busy = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| io.raw_os_error() == Some(libc::EBUSY));
        if busy {
            KernelError::msg(format!("{iface} already has an XDP program attached by another tool; detach it first"))
        } else {
            KernelError::msg(format!("attaching to {iface} in {mode:?} mode: {e}"))
        }
    })?;
    prog.pin(dir.join(PROG_PIN)).kctx(|| "pinning the program".into())?;
    // The same program as the full copy (`load_program` loads it), for `serve`.
    prog.pin(dir.join(FULL_PIN)).kctx(|| "pinning the program".into())?;
    let link = prog.take_link(link_id)?;
    let link: FdLink = link
        .try_into()
        .map_err(|_| KernelError::msg(format!("the kernel attached {iface} without a BPF link (kernel older than 5.9?)")))?;
    link.pin(dir.join("link")).kctx(|| "pinning the link".into())?;
    Ok(())
}

/// Attaches the egress program (TCX egress, kernel 6.6 or later) to `ifindex` and pins it and
/// its link in `dir`. It records the flows this host sends on the interface while a ruleset
/// uses `state`, and never changes a packet's fate. TCX lets it sit beside other tools'
/// programs (it runs last and passes every packet on).
pub fn attach_egress(ebpf: &mut Ebpf, iface: &str, ifindex: u32, dir: &Path) -> Result<()> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(EGRESS_PROGRAM_NAME)
        .ok_or_else(|| KernelError::msg(format!("program {EGRESS_PROGRAM_NAME} missing")))?
        .try_into()?;
    let link_id = prog
        .attach(ifindex, TcAttach::Tcx { attach_type: TcAttachType::Egress, order: LinkOrder::default() })
        .map_err(|e| KernelError::msg(format!("attaching the egress program to {iface} (TCX needs Linux 6.6 or later): {e}")))?;
    prog.pin(dir.join(EGRESS_PIN)).kctx(|| "pinning the egress program".into())?;
    let link: FdLink = prog
        .take_link(link_id)?
        .try_into()
        .map_err(|_| KernelError::msg(format!("the kernel attached the egress program to {iface} without a BPF link")))?;
    link.pin(dir.join(EGRESS_LINK_PIN)).kctx(|| "pinning the egress link".into())?;
    Ok(())
}

/// Whether the egress program is attached to `ifindex` of the current network namespace (a link
/// detached with `bpftool link detach` leaves its pin but not the attachment).
pub fn egress_attached(ifindex: u32) -> Result<bool> {
    let (_, progs) = SchedClassifier::query_tcx(ifindex, TcAttachType::Egress).kctx(|| "querying the TCX egress programs".into())?;
    Ok(progs.iter().any(|p| p.name_as_str() == Some(EGRESS_PROGRAM_NAME)))
}

/// The copy of the program (`variant::*`) the instance in `dir` runs: which pinned copy its
/// link's program is. `None` for a program that is neither (an instance attached by an earlier
/// version, whose `prog` is the full program under another pin).
pub fn served_variant(dir: &Path) -> Result<Option<u32>> {
    let attached = linked_program(dir)?;
    for (pin, v) in [(FULL_PIN, variant::FULL), (PLAIN_PIN, variant::PLAIN)] {
        if let Ok(p) = Xdp::from_pin(dir.join(pin), XdpAttachType::Interface)
            && p.info().kctx(|| format!("reading the program pinned at {pin}"))?.id() == attached
        {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The id of the program the instance's link runs.
fn linked_program(dir: &Path) -> Result<u32> {
    let link: FdLink = PinnedLink::from_pin(dir.join("link")).kctx(|| "opening the pinned link".into())?.into();
    Ok(link.info().kctx(|| "reading the link".into())?.program_id())
}

/// Makes the instance in `dir` run the copy `variant` of the program (`xdpfw_common::variant`):
/// its pinned copy, loaded and pinned first if it is not (a verifier run, once per instance),
/// put into the link with one atomic `BPF_LINK_UPDATE` (a packet runs the old program or the
/// new one, whole), then pinned as `prog`. True when the link changed.
///
/// The caller sees to it that both copies can serve the generation that is live meanwhile, and
/// waits a grace period after a switch before relying on it: packets that started on the old
/// copy may still be running.
pub fn serve(dir: &Path, variant: u32) -> Result<bool> {
    let pin = if variant == variant::PLAIN { PLAIN_PIN } else { FULL_PIN };
    let path = dir.join(pin);
    if !path.exists() {
        let mut ebpf = if variant == variant::PLAIN { load_plain(dir)? } else { crate::object::load_pinned_program(dir)? };
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).ok_or_else(|| KernelError::msg("program missing".to_string()))?.try_into()?;
        pin_in_place(prog, dir, pin)?;
    }
    let mut prog = Xdp::from_pin(&path, XdpAttachType::Interface).kctx(|| format!("opening the program pinned at {}", path.display()))?;
    let id = prog.info().kctx(|| format!("reading the program pinned at {}", path.display()))?.id();
    if linked_program(dir)? == id {
        return Ok(false);
    }
    let link: FdLink = PinnedLink::from_pin(dir.join("link")).kctx(|| "opening the pinned link".into())?.into();
    let link = XdpLink::try_from(link).map_err(|e| KernelError::msg(format!("the pinned link is not an XDP link: {e}")))?;
    // The program takes the link's descriptor (not the pin): dropping it closes only that.
    prog.attach_to_link(link).map_err(|e| KernelError::msg(format!("switching the attached program to the {pin} copy: {e}")))?;
    // `prog` names the program the link runs, for bpftool and the operator.
    pin_in_place(&mut prog, dir, PROG_PIN)?;
    Ok(true)
}

/// Pins `prog` as `dir/name`, replacing what is pinned there: pinned under a temporary name and
/// renamed over it, so a crash leaves the old pin or the new one, never none.
fn pin_in_place(prog: &mut Xdp, dir: &Path, name: &str) -> Result<()> {
    let next = dir.join(NEXT_PROG_PIN);
    let _ = fs::remove_file(&next);
    prog.pin(&next).kctx(|| format!("pinning the program as {}", next.display()))?;
    fs::rename(&next, dir.join(name)).kctx(|| format!("renaming {} to {name}", next.display()))
}

/// Removes the links (which detach the programs) and every pin under `dir`.
pub fn detach_and_unpin(dir: &Path) -> Result<()> {
    for (name, what) in [("link", "the pinned link"), (EGRESS_LINK_PIN, "the pinned egress link")] {
        let link = dir.join(name);
        if link.exists() {
            let pinned = PinnedLink::from_pin(&link).kctx(|| format!("opening {what}"))?;
            // Dropping the unpinned link closes its last reference, which detaches the program.
            drop(pinned.unpin().kctx(|| format!("unpinning {what}"))?);
        }
    }
    for entry in fs::read_dir(dir).kctx(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        fs::remove_file(&path).kctx(|| format!("removing {}", path.display()))?;
    }
    fs::remove_dir(dir).kctx(|| format!("removing {}", dir.display()))?;
    Ok(())
}

