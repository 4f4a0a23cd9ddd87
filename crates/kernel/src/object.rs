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
    programs::Xdp,
};
use xdpfw_common::{
    PROBE_PROGRAM_NAME, PROGRAM_NAME, map_names,
};


/// The XDP object, built by build.rs with the pinned eBPF toolchain.
pub static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdpfw"));


/// Loads the program with every map created and pinned under `dir`, or reused from there when
/// already pinned (how `attach` creates an instance).
pub fn load_program(dir: &Path) -> Result<Ebpf> {
    load_pinned(dir, false)
}

/// Loads the probe copy of the program: it shares the pinned maps in `dir` with the attached
/// program, reads the inactive buffer, and is never attached (reload self-tests run through it).
pub fn load_probe(dir: &Path) -> Result<Ebpf> {
    load_pinned(dir, true)
}

fn load_pinned(dir: &Path, probe: bool) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = map_names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    if probe {
        loader.override_global("PROBE", &1u32, true);
    }
    load_object(&mut loader, if probe { PROBE_PROGRAM_NAME } else { PROGRAM_NAME })
}

/// Loads the object with `loader` and its program `name` into the kernel (the verifier runs).
fn load_object(loader: &mut EbpfLoader, name: &str) -> Result<Ebpf> {
    let mut ebpf = loader.load(PROGRAM_OBJECT).kctx(|| "loading the XDP object".into())?;
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
    let mut ebpf = load_object(&mut EbpfLoader::new(), PROGRAM_NAME)?;
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

