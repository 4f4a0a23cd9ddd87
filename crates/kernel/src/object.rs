//! The XDP object embedded in this crate and its loading into the kernel (the verifier runs
//! here; its log is part of the error when it refuses).

use std::path::{Path, PathBuf};

use crate::error::{KernelContext, KernelError, Result, kbail};
use crate::maps::Maps;
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Map, MapData,
    },
    programs::{SchedClassifier, Xdp},
};
use xdpfw_common::{
    EGRESS_PROGRAM_NAME, PROBE_PROGRAM_NAME, PROGRAM_NAME, map_names, variant,
};


/// The XDP object, built by build.rs with the pinned eBPF toolchain.
pub static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdpfw"));


/// Loads the program with every map created and pinned under `dir`, or reused from there when
/// already pinned (how `attach` creates an instance), and the egress program that records the
/// host's flows beside it.
pub fn load_program(dir: &Path) -> Result<Ebpf> {
    let mut ebpf = load_pinned(dir, false, variant::FULL)?;
    load_egress(&mut ebpf)?;
    Ok(ebpf)
}

/// Loads the egress program of an object already loaded (the verifier runs): it shares the
/// object's maps (the flow table, the ruleset headers, the counters).
pub fn load_egress(ebpf: &mut Ebpf) -> Result<()> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(EGRESS_PROGRAM_NAME)
        .ok_or_else(|| KernelError::msg(format!("program {EGRESS_PROGRAM_NAME} missing from the object")))?
        .try_into()?;
    prog.load().map_err(verifier_error)
}

/// Loads the probe copy of the program: it shares the pinned maps in `dir` with the attached
/// program, reads the inactive buffer, and is never attached (reload self-tests run through it).
pub fn load_probe(dir: &Path) -> Result<Ebpf> {
    load_pinned(dir, true, variant::FULL)
}

/// Loads the full copy of the program over the pinned maps in `dir`, without its egress
/// program (an instance whose full copy was not pinned: attached by an earlier version).
pub(crate) fn load_pinned_program(dir: &Path) -> Result<Ebpf> {
    load_pinned(dir, false, variant::FULL)
}

/// Loads the `variant::PLAIN` copy of the program over the pinned maps in `dir` (see
/// `xdpfw_common::variant`); its program is `PROGRAM_NAME`, loaded, not attached.
pub fn load_plain(dir: &Path) -> Result<Ebpf> {
    load_pinned(dir, false, variant::PLAIN)
}

fn load_pinned(dir: &Path, probe: bool, variant: u32) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = map_names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    if probe {
        loader.override_global("PROBE", &1u32, true);
    }
    if variant != variant::FULL {
        loader.override_global(variant::GLOBAL, &variant, true);
    }
    load_object(&mut loader, if probe { PROBE_PROGRAM_NAME } else { PROGRAM_NAME })
}

/// Loads the object with `loader` and its program `name` into the kernel (the verifier runs).
fn load_object(loader: &mut EbpfLoader, name: &str) -> Result<Ebpf> {
    load_object_from(loader, PROGRAM_OBJECT, name)
}

/// `object` with its program named `name`. The object's one entry point is `xdpfw_probe`
/// (`PROBE_PROGRAM_NAME`); the attached program is the same code named `xdpfw`: every copy of
/// `xdpfw_probe\0` (the symbol, its BTF function, debug strings) becomes `xdpfw\0probe\0`,
/// the same bytes with the name ended early, so the ELF stays as it was. (Two entry points in
/// the program would be simpler, but measured 4% slower per packet.) An object without that
/// name (an earlier build) is returned as it is. 8-byte aligned, as the ELF parser wants.
fn object_named(object: &[u8], name: &str) -> Vec<u64> {
    let mut words = vec![0u64; object.len().div_ceil(8)];
    // SAFETY: the u64s' memory viewed as bytes: in bounds (at least `object.len()` bytes), any
    // bit pattern valid.
    let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), object.len()) };
    bytes.copy_from_slice(object);
    if name == PROGRAM_NAME {
        let long = format!("{PROBE_PROGRAM_NAME}\0");
        let cut = PROGRAM_NAME.len();
        let mut i = 0;
        while let Some(at) = bytes[i..].windows(long.len()).position(|w| w == long.as_bytes()) {
            bytes[i + at + cut] = 0;
            i += at + long.len();
        }
    }
    words
}

fn load_object_from(loader: &mut EbpfLoader, object: &[u8], name: &str) -> Result<Ebpf> {
    let words = object_named(object, name);
    // SAFETY: as in object_named.
    let object = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), object.len()) };
    let mut ebpf = loader.load(object).kctx(|| "loading the XDP object".into())?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| KernelError::msg(format!("program {name} missing from the object")))?
        .try_into()?;
    prog.load().map_err(verifier_error)?;
    Ok(ebpf)
}

/// Loads the program into the kernel without pinning anything (kernel tests, benchmarks,
/// `explain --kernel`): the returned handle owns private maps.
pub fn load_private() -> Result<(Ebpf, Maps)> {
    load_private_from(PROGRAM_OBJECT)
}

/// As [`load_private`], from another build of the object (the classifier bench measures the
/// program against an earlier build of itself).
pub fn load_private_from(object: &[u8]) -> Result<(Ebpf, Maps)> {
    load_private_variant(object, variant::FULL)
}

/// As [`load_private_from`], the copy `variant` (`xdpfw_common::variant`).
pub fn load_private_variant(object: &[u8], variant: u32) -> Result<(Ebpf, Maps)> {
    let mut loader = EbpfLoader::new();
    if variant != variant::FULL {
        loader.override_global(variant::GLOBAL, &variant, true);
    }
    let mut ebpf = load_object_from(&mut loader, object, PROGRAM_NAME)?;
    let mut take = |name: &str| -> Result<MapData> {
        let map = ebpf.take_map(name).ok_or_else(|| KernelError::msg(format!("map {name} missing")))?;
        map_data(map)
    };
    let maps = Maps::from_data(&mut take)?;
    Ok((ebpf, maps))
}

fn verifier_error(e: aya::programs::ProgramError) -> KernelError {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            KernelError::msg(format!("the kernel verifier rejected the program: {io_error}\n{verifier_log}"))
        }
        other => KernelError::new("loading the program", other),
    }
}

fn map_data(map: Map) -> Result<MapData> {
    Ok(match map {
        Map::Array(m) | Map::PerCpuArray(m) | Map::LpmTrie(m) | Map::ArrayOfMaps(m) | Map::LruHashMap(m) => m,
        other => kbail!("unexpected map type {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_attached_program_is_named_xdpfw_in_the_same_bytes() {
        let object = b"\x7fELF..xdpfw_probe\0..xdpfw_probe\0xdpfw_probes";
        let words = super::object_named(object, xdpfw_common::PROGRAM_NAME);
        // SAFETY: as in object_named.
        let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), object.len()) };
        assert_eq!(bytes, b"\x7fELF..xdpfw\0probe\0..xdpfw\0probe\0xdpfw_probes");
        let words = super::object_named(object, xdpfw_common::PROBE_PROGRAM_NAME);
        // SAFETY: as above.
        assert_eq!(unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), object.len()) }, object);
    }
}
