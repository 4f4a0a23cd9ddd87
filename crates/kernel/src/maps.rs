//! The maps of an instance as userspace sees them, and the primitive operations of a reload:
//! write the inactive buffer, flip the generation, clear the retired buffer.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::error::{KernelContext, KernelError, Result, kbail};
use aya::{
    maps::{
        Array, ArrayOfMaps, Map, MapData, PerCpuArray, PerCpuValues,
    },
    util::nr_cpus,
};
use xdpfw_common::{
    BUFFERS, Bitmap, buffer_of, DirBlock, DirLine, FieldEntry, FlowEntry, FlowKey, GlobalStats, LimitKey, LimitState, LogLimit, MAX_BITMAPS,
    MAX_RULES, RULE_SLOTS, RuleMeta, RuleStats, RulesetHeader,
    dir, dir6, fields_layout::FIELDS_PER_BUFFER, map_names, trace, TraceConfig,
};

use xdpfw_rules::compile::Image;

mod delta;
pub use delta::{LiveTable, LiveV6};

/// buffer's worth of entries with plain stores instead of one syscall per entry.
/// A BPF array created with BPF_F_MMAPABLE, mapped into this process. Userspace writes a whole
pub struct MmapArray<T> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
    /// The mapping itself keeps the map alive; this keeps its fd too when we own it.
    _map: Option<MapData>,
}

// SAFETY: the mapping is process-wide shared memory; access is coordinated by the reload lock.
unsafe impl<T> Send for MmapArray<T> {}

impl<T: Copy> MmapArray<T> {
    pub(crate) fn new(map: MapData) -> Result<Self> {
        let mut m = Self::map(&map)?;
        m._map = Some(map);
        Ok(m)
    }

    fn map(map: &MapData) -> Result<Self> {
        // Mmapable arrays store elements at an 8-byte stride; every shared type is a multiple of 8.
        assert!(size_of::<T>().is_multiple_of(8));
        let len = map.info()?.max_entries() as usize;
        let page = 4096;
        let bytes = (len * size_of::<T>()).div_ceil(page) * page;
        // SAFETY: mapping a BPF array fd shared, sized to its elements.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).kctx(|| "mmap of a BPF array".into());
        }
        Ok(Self { ptr: NonNull::new(ptr.cast()).expect("mmap returned null"), len, bytes, _map: None })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn read(&self, index: usize) -> T {
        assert!(index < self.len);
        // SAFETY: in bounds; volatile because the kernel may write concurrently.
        unsafe { self.ptr.as_ptr().add(index).read_volatile() }
    }

    /// The entries `[start, start + len)`. Only ever called on the inactive buffer, which no
    /// packet reads.
    pub fn range_mut(&mut self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len);
        // SAFETY: in bounds, and exclusive through &mut self plus the reload lock.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), len) }
    }
}

impl MmapArray<u64> {
    pub(crate) fn atomic(&self, index: usize) -> &AtomicU64 {
        assert!(index < self.len);
        // SAFETY: 8-byte aligned (page-aligned mapping, 8-byte stride) and in bounds.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(index)) }
    }
}

impl<T> Drop for MmapArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// Every map of one firewall instance.
pub struct Maps {
    active: MmapArray<u64>,
    headers: MmapArray<RulesetHeader>,
    rules: MmapArray<RuleMeta>,
    fields: MmapArray<FieldEntry>,
    bitmaps: MmapArray<Bitmap>,
    /// IPv6 tables: the top levels (both buffers, written through the mapping), and one
    /// array-of-maps of lines per size of `dir6::LINE_SIZES`.
    src_v6_top: MmapArray<DirBlock>,
    dst_v6_top: MmapArray<DirBlock>,
    src_v6_lines: [ArrayOfMaps<MapData, LeafArray>; 6],
    dst_v6_lines: [ArrayOfMaps<MapData, LeafArray>; 6],
    /// Direct IPv4 tables: top levels and first chunks (both buffers, written through the
    /// mapping), and the further chunks.
    src_v4_fixed: MmapArray<DirBlock>,
    dst_v4_fixed: MmapArray<DirBlock>,
    /// One array-of-maps per size of `dir::MORE_SIZES`.
    src_v4_more: [ArrayOfMaps<MapData, DirArray>; 3],
    dst_v4_more: [ArrayOfMaps<MapData, DirArray>; 3],
    /// One array-of-maps per size of `dir::LEAF_SIZES`.
    src_v4_leaves: [ArrayOfMaps<MapData, LeafArray>; 4],
    dst_v4_leaves: [ArrayOfMaps<MapData, LeafArray>; 4],
    /// Every array-of-maps above, to empty a slot (aya offers no delete on them).
    slot_fds: Vec<std::os::fd::OwnedFd>,
    global_stats: PerCpuArray<MapData, GlobalStats>,
    rule_stats: PerCpuArray<MapData, RuleStats>,
    /// Rules' rate limits and buckets (both buffers, written through the mapping).
    limits: MmapArray<LimitState>,
    limit_sources: aya::maps::HashMap<MapData, LimitKey, u64>,
    /// The flows this host opened (`state` rules), written by the egress program. `None` in an
    /// instance attached by a version without `state` (until it is attached again).
    flows: Option<aya::maps::HashMap<MapData, FlowKey, FlowEntry>>,
    /// Rules' log rates and buckets (both buffers, written through the mapping). `None` in an
    /// instance attached by a version without `log` (until it is attached again).
    log_limits: Option<MmapArray<LogLimit>>,
    /// The tracer's settings (`None` as `log_limits`).
    trace: Option<MmapArray<TraceConfig>>,
}

/// Where each array-of-maps sits in `Maps::slot_fds`: per IPv6 table its line maps (one per
/// `dir6::LINE_SIZES`), then per direct IPv4 table its chunk maps (one per `dir::MORE_SIZES`)
/// and its leaf maps (one per `dir::LEAF_SIZES`).
mod slot {
    use xdpfw_common::{dir, dir6};
    pub(super) const SRC_V6: usize = 0;
    pub(super) const DST_V6: usize = dir6::LINE_SIZES.len();
    pub(super) const SRC_V4: usize = 2 * dir6::LINE_SIZES.len();
    pub(super) const DST_V4: usize = SRC_V4 + dir::MORE_SIZES.len() + dir::LEAF_SIZES.len();
    pub(super) const COUNT: usize = DST_V4 + dir::MORE_SIZES.len() + dir::LEAF_SIZES.len();
}

type DirArray = Array<MapData, DirBlock>;
type LeafArray = Array<MapData, DirLine>;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// BPF_MAP_DELETE_ELEM (a missing key is fine).
fn delete_elem(fd: std::os::fd::BorrowedFd<'_>, key: u32) -> std::io::Result<()> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    match elem_call(BPF_MAP_DELETE_ELEM, fd, key, 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The id of the inner map in slot `key` of the array-of-maps `fd`, `None` when it is empty.
fn slot_id(fd: std::os::fd::BorrowedFd<'_>, key: u32) -> std::io::Result<Option<u32>> {
    let mut id = 0u32;
    let rc = elem_call(BPF_MAP_LOOKUP_ELEM, fd, key, &mut id as *mut u32 as u64);
    match rc {
        Ok(()) => Ok(Some(id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A new fd of the map of id `id`.
fn map_fd_by_id(id: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    #[repr(C)]
    struct GetFdAttr {
        map_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    let attr = GetFdAttr { map_id: id, next_id: 0, open_flags: 0 };
    // SAFETY: a bpf(2) call with a properly sized attribute; the result is a new fd we own.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_GET_FD_BY_ID, &attr as *const GetFdAttr, size_of::<GetFdAttr>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(rc as i32) })
}

/// Puts the map of id `id` into slot `key` of the array-of-maps `fd`.
fn set_slot(fd: std::os::fd::BorrowedFd<'_>, key: u32, id: u32) -> std::io::Result<()> {
    let inner = map_fd_by_id(id)?;
    let value = inner.as_raw_fd() as u32;
    elem_call(BPF_MAP_UPDATE_ELEM, fd, key, &value as *const u32 as u64)
}

/// The kernel's own account of a map's memory (`memlock` of its fdinfo), in bytes.
fn map_memory(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no memlock line in the map's fdinfo"))
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// A BPF_MAP_*_ELEM command on a u32 key, `value` pointing at the value (0 for a delete).
fn elem_call(cmd: libc::c_long, fd: std::os::fd::BorrowedFd<'_>, key: u32, value: u64) -> std::io::Result<()> {
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = ElemAttr { map_fd: fd.as_raw_fd() as u32, _pad: 0, key: &key as *const u32 as u64, value, flags: 0 };
    // SAFETY: a bpf(2) call with a properly sized attribute pointing at a live key and value.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &attr as *const ElemAttr, size_of::<ElemAttr>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// `items` (the chunks of a direct IPv4 table beyond the fixed ones, or its leaf lines) as a new
/// map of `size` elements, filled through its mapping.
fn inner_array<T: Copy + aya::Pod>(items: &[T], size: u32) -> Result<Array<MapData, T>> {
    // Created as raw MapData (not Array::create) so this process can map it before handing it over.
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let obj = aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, size_of::<T>() as u32, size, BPF_F_MMAPABLE);
    let data = MapData::create(obj, "xdpfw_v4_dir", None)?;
    let mut map = MmapArray::<T>::map(&data)?;
    map.range_mut(0, items.len()).copy_from_slice(items);
    drop(map);
    Ok(Array::try_from(Map::from_map_data(data)?)?)
}

/// Puts `items` into `buffer`'s slot of the array-of-maps (one per size of `sizes`) whose
/// inner maps are the smallest that hold them, as a new map; returns that size's index.
fn in_smallest<T: Copy + aya::Pod>(maps: &mut [ArrayOfMaps<MapData, Array<MapData, T>>], sizes: &[u32], buffer: u32, items: &[T], what: &str) -> Result<usize> {
    let size = u32::try_from(items.len())
        .ok()
        .and_then(|n| dir::size_class(n, sizes))
        .ok_or_else(|| KernelError::msg(format!("{} {what}: more than the compiler allows", items.len())))?;
    maps[size].set(buffer, &inner_array(items, sizes[size])?, 0)?;
    Ok(size)
}

/// Time spent in each part of writing a buffer.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct InstallTimes {
    pub arrays_us: u64,
    pub tables_us: u64,
    /// Array-of-maps slots changed: each waits for an RCU grace period in the kernel.
    pub slot_changes: u32,
}

fn pinned_data(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).kctx(|| format!("opening pinned map {}", path.display()))
}

/// The map `name` pinned in an instance's `dir`.
pub fn pinned_map(dir: &Path, name: &str) -> Result<Map> {
    Ok(Map::from_map_data(pinned_data(dir, name)?)?)
}

impl Maps {
    /// Opens the maps pinned in `dir` (the instance made by `loader attach`).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::from_data(&mut |name| pinned_data(dir, name))
    }

    pub(crate) fn from_data(get: &mut dyn FnMut(&str) -> Result<MapData>) -> Result<Self> {
        use map_names::*;
        let mut slot_fds = Vec::new();
        // One array-of-maps per size class (aya's inner-map trait is sealed, hence the macro).
        macro_rules! of_maps {
            ($names:expr) => {{
                let mut maps = Vec::new();
                for name in $names {
                    let m = get(name)?;
                    slot_fds.push(m.fd().as_fd().try_clone_to_owned()?);
                    maps.push(ArrayOfMaps::try_from(Map::from_map_data(m)?)?);
                }
                maps.try_into().map_err(|_| KernelError::msg("one map per size".to_string()))?
            }};
        }
        // In the order of `slot`: the IPv6 tables' line sizes, then each IPv4 table's chunk
        // sizes and its leaf sizes.
        let src_v6_lines = of_maps!(SRC_V6_LINES);
        let dst_v6_lines = of_maps!(DST_V6_LINES);
        let src_v4_more = of_maps!(SRC_V4_MORE);
        let src_v4_leaves = of_maps!(SRC_V4_LEAVES);
        let dst_v4_more = of_maps!(DST_V4_MORE);
        let dst_v4_leaves = of_maps!(DST_V4_LEAVES);
        debug_assert_eq!(slot_fds.len(), slot::COUNT);
        Ok(Self {
            active: MmapArray::new(get(ACTIVE)?)?,
            headers: MmapArray::new(get(HEADERS)?)?,
            src_v4_fixed: MmapArray::new(get(SRC_V4_FIXED)?)?,
            dst_v4_fixed: MmapArray::new(get(DST_V4_FIXED)?)?,
            rules: MmapArray::new(get(RULES)?)?,
            fields: MmapArray::new(get(FIELDS)?)?,
            bitmaps: MmapArray::new(get(BITMAPS)?)?,
            src_v6_top: MmapArray::new(get(SRC_V6_TOP)?)?,
            dst_v6_top: MmapArray::new(get(DST_V6_TOP)?)?,
            src_v6_lines,
            dst_v6_lines,
            src_v4_more,
            dst_v4_more,
            src_v4_leaves,
            dst_v4_leaves,
            slot_fds,
            global_stats: PerCpuArray::try_from(Map::from_map_data(get(GLOBAL_STATS)?)?)?,
            rule_stats: PerCpuArray::try_from(Map::from_map_data(get(RULE_STATS)?)?)?,
            limits: MmapArray::new(get(LIMITS)?)?,
            limit_sources: aya::maps::HashMap::try_from(Map::from_map_data(get(LIMIT_SOURCES)?)?)?,
            flows: get(FLOWS).ok().map(|m| -> Result<_> { Ok(aya::maps::HashMap::try_from(Map::from_map_data(m)?)?) }).transpose()?,
            log_limits: get(LOG_LIMITS).ok().map(MmapArray::new).transpose()?,
            trace: get(TRACE).ok().map(MmapArray::new).transpose()?,
        })
    }

    /// The generation packets are classified against now.
    pub fn generation(&self) -> u64 {
        self.active.atomic(0).load(Ordering::SeqCst)
    }

    pub fn header(&self, buffer: u32) -> RulesetHeader {
        self.headers.read(buffer as usize)
    }

    /// Writes a complete ruleset into `buffer`, which must not be the active one.
    pub fn install(&mut self, buffer: u32, generation: u64, image: &Image) -> Result<InstallTimes> {
        assert!(buffer < BUFFERS);
        if buffer == buffer_of(self.generation()) {
            kbail!("refusing to write buffer {buffer}: it is the active one");
        }
        let start = std::time::Instant::now();
        let b = buffer as usize;

        let rules = self.rules.range_mut(b * MAX_RULES, MAX_RULES);
        rules.fill(RuleMeta::default());
        rules[..image.rules.len()].copy_from_slice(&image.rules);

        let bitmaps = self.bitmaps.range_mut(b * MAX_BITMAPS as usize, image.bitmaps.len());
        bitmaps.copy_from_slice(&image.bitmaps);

        // Every rule's limit with a full bucket: a new ruleset starts its limits afresh.
        let limits = self.limits.range_mut(b * MAX_RULES, MAX_RULES);
        limits.fill(LimitState::default());
        limits[..image.limits.len()].copy_from_slice(&image.limits);
        match &mut self.log_limits {
            Some(l) => {
                let log_limits = l.range_mut(b * MAX_RULES, MAX_RULES);
                log_limits.fill(LogLimit::default());
                log_limits[..image.log_limits.len()].copy_from_slice(&image.log_limits);
            }
            None if image.log_limits.iter().any(|l| *l != LogLimit::default()) => {
                kbail!("this instance was attached by a version of loader without `log`: detach and attach it again to use `log`")
            }
            None => {}
        }

        let per = FIELDS_PER_BUFFER as usize;
        let fields = self.fields.range_mut(b * per, per);
        fields.copy_from_slice(&image.fields);
        let arrays_us = start.elapsed().as_micros() as u64;

        let start = std::time::Instant::now();
        // Only fields with prefixes get a map; an empty slot makes the lookup fall back to the
        // field's "no prefix matched" bitmap, which is what an empty map would give.
        if image.tables_reused {
            let slot_changes = self.share_tables(buffer)?;
            let tables_us = start.elapsed().as_micros() as u64;
            let mut header = image.header;
            header.generation = generation;
            self.headers.range_mut(b, 1)[0] = header;
            return Ok(InstallTimes { arrays_us, tables_us, slot_changes });
        }
        // Every slot of this buffer gets its new map, or is emptied if the image has none for
        // it. A slot is written only when it changes: each change of an array-of-maps slot waits
        // for an RCU grace period in the kernel, and the slots of a cleared buffer still hold
        // the live buffer's maps (see [`Maps::clear`]), most of which a new image replaces.
        let mut filled = vec![false; self.slot_fds.len()];
        let top_blocks = dir6::TOP_BLOCKS as usize;
        for (table, top, lines, first_slot) in [
            (&image.src_v6, &mut self.src_v6_top, &mut self.src_v6_lines, slot::SRC_V6),
            (&image.dst_v6, &mut self.dst_v6_top, &mut self.dst_v6_lines, slot::DST_V6),
        ] {
            let Some(t) = table else { continue };
            top.range_mut(b * top_blocks, top_blocks).copy_from_slice(t.blocks());
            if !t.lines.is_empty() {
                filled[first_slot + in_smallest(lines, &dir6::LINE_SIZES, buffer, &t.lines, "IPv6 lines")?] = true;
            }
        }
        let per_buffer = dir::BUFFER_BLOCKS as usize;
        for (table, fixed, more, leaves, first_slot) in [
            (&image.src_v4, &mut self.src_v4_fixed, &mut self.src_v4_more, &mut self.src_v4_leaves, slot::SRC_V4),
            (&image.dst_v4, &mut self.dst_v4_fixed, &mut self.dst_v4_more, &mut self.dst_v4_leaves, slot::DST_V4),
        ] {
            let Some(t) = table else { continue };
            // The top level and the first chunks into the fixed array, the rest into a new map of
            // the smallest size that holds them.
            let blocks = t.blocks();
            let (head, rest) = blocks.split_at(blocks.len().min(per_buffer));
            fixed.range_mut(b * per_buffer, head.len()).copy_from_slice(head);
            if !rest.is_empty() {
                filled[first_slot + in_smallest(more, &dir::MORE_SIZES, buffer, rest, "chunks beyond the fixed ones")?] = true;
            }
            if !t.lines.is_empty() {
                filled[first_slot + dir::MORE_SIZES.len() + in_smallest(leaves, &dir::LEAF_SIZES, buffer, &t.lines, "leaf lines")?] = true;
            }
        }
        let mut slot_changes = filled.iter().filter(|f| **f).count() as u32;
        for (fd, filled) in self.slot_fds.iter().zip(filled) {
            let fd = fd.as_fd();
            if !filled && slot_id(fd, buffer).kctx(|| "reading an array-of-maps slot".into())?.is_some() {
                delete_elem(fd, buffer).kctx(|| "emptying an array-of-maps slot".into())?;
                slot_changes += 1;
            }
        }
        let tables_us = start.elapsed().as_micros() as u64;

        // The header goes last: it is what makes the buffer's contents meaningful.
        let mut header = image.header;
        header.generation = generation;
        self.headers.range_mut(b, 1)[0] = header;
        Ok(InstallTimes { arrays_us, tables_us, slot_changes })
    }

    /// Makes `buffer`'s address tables those of the active buffer: the fixed parts copied, every
    /// inner map (IPv4 chunks and leaves, IPv6 lines) shared, not copied. Neither buffer's tables
    /// are written while both hold them (a reload writes only fresh maps), so sharing is safe;
    /// it is what a reload that changes no prefix needs. A slot that already holds the live
    /// map is left alone: every change of an array-of-maps slot costs an RCU grace period in
    /// the kernel, and [`Maps::clear`] leaves the live maps in the retired buffer's slots, so
    /// such a reload changes no slot at all (unless a crash skipped the clear).
    fn share_tables(&mut self, buffer: u32) -> Result<u32> {
        let live = buffer_of(self.generation());
        if live == buffer || self.header(live).generation != self.generation() {
            kbail!("no complete active buffer to share the address tables of");
        }
        let per_buffer = dir::BUFFER_BLOCKS as usize;
        for fixed in [&mut self.src_v4_fixed, &mut self.dst_v4_fixed] {
            fixed.copy_range(live as usize * per_buffer, buffer as usize * per_buffer, per_buffer);
        }
        let top_blocks = dir6::TOP_BLOCKS as usize;
        for top in [&mut self.src_v6_top, &mut self.dst_v6_top] {
            top.copy_range(live as usize * top_blocks, buffer as usize * top_blocks, top_blocks);
        }
        self.follow_live_slots(buffer)
    }

    /// Makes every array-of-maps slot of `buffer` hold what the live buffer's holds (its map,
    /// or nothing), changing only the slots that differ; returns how many changed.
    fn follow_live_slots(&self, buffer: u32) -> Result<u32> {
        let live = buffer_of(self.generation());
        let mut changes = 0;
        for fd in &self.slot_fds {
            let fd = fd.as_fd();
            let mine = slot_id(fd, buffer).kctx(|| "reading an array-of-maps slot".into())?;
            match slot_id(fd, live).kctx(|| "reading an array-of-maps slot".into())? {
                theirs if theirs == mine => continue,
                Some(id) => set_slot(fd, buffer, id).kctx(|| "sharing an inner map".into())?,
                None => delete_elem(fd, buffer).kctx(|| "emptying an array-of-maps slot".into())?,
            }
            changes += 1;
        }
        Ok(changes)
    }

    /// Memory of `buffer`'s address tables held in inner maps (IPv6 lines, IPv4 chunks beyond
    /// the fixed ones and leaves), as the kernel accounts it: per field, `[source, destination]`
    /// each `(IPv4, IPv6)` bytes. The fixed parts (the IPv4 tables' top level and first chunks,
    /// `dir::BUFFER_BLOCKS` blocks per table and buffer, and the IPv6 top levels,
    /// `dir6::TOP_BLOCKS`) are not included: they are allocated at attach whatever the ruleset.
    pub fn table_memory(&self, buffer: u32) -> Result<[(u64, u64); 2]> {
        let mut out = [(0, 0); 2];
        for (i, fd) in self.slot_fds.iter().enumerate() {
            let Some(id) = slot_id(fd.as_fd(), buffer).kctx(|| "reading an array-of-maps slot".into())? else { continue };
            let inner = map_fd_by_id(id).kctx(|| "opening an inner map".into())?;
            let bytes = map_memory(inner.as_fd()).kctx(|| "reading an inner map's memory".into())?;
            match i {
                i if i < slot::DST_V6 => out[0].1 += bytes,
                i if i < slot::SRC_V4 => out[1].1 += bytes,
                i if i < slot::DST_V4 => out[0].0 += bytes,
                _ => out[1].0 += bytes,
            }
        }
        Ok(out)
    }

    /// The first `count` bitmaps of `buffer`.
    pub fn bitmaps(&self, buffer: u32, count: u32) -> Vec<Bitmap> {
        let base = buffer as usize * MAX_BITMAPS as usize;
        (0..count.min(MAX_BITMAPS) as usize).map(|i| self.bitmaps.read(base + i)).collect()
    }

    /// Publishes `generation` (whose buffer must hold a complete ruleset) with one atomic store.
    pub fn flip(&mut self, generation: u64) -> Result<()> {
        let buffer = buffer_of(generation);
        let header = self.header(buffer);
        if header.generation != generation {
            kbail!("buffer {buffer} holds generation {}, not {generation}", header.generation);
        }
        self.active.atomic(0).store(generation, Ordering::SeqCst);
        Ok(())
    }

    /// Empties a retired buffer. Call only after a grace period since it stopped being active.
    pub fn clear(&mut self, buffer: u32) -> Result<()> {
        assert!(buffer < BUFFERS);
        if buffer == buffer_of(self.generation()) {
            kbail!("refusing to clear buffer {buffer}: it is the active one");
        }
        let b = buffer as usize;
        let retired = self.header(buffer);
        self.headers.range_mut(b, 1)[0] = RulesetHeader::default();
        // Its counters start from zero when the buffer is used again.
        self.zero_rule_stats(buffer, retired.rule_count)?;
        // Each slot is given the live buffer's map (or emptied where the live one is empty):
        // that releases the retired map in one syscall (the kernel frees a retired table
        // asynchronously, so even a 1M-prefix buffer costs no long syscall here), costs no memory
        // (the map is shared, and neither buffer writes a map it holds), and leaves the slots as
        // the next reload that changes no prefix wants them, so that reload changes no slot and
        // waits for no grace period before its flip (each slot change waits for one). A slot
        // already holding the live map is left alone.
        self.follow_live_slots(buffer)?;
        Ok(())
    }

    fn zero_rule_stats(&mut self, buffer: u32, rule_count: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e)?.get() as usize;
        let slots = (0..rule_count.min(RULE_SLOTS - 1)).chain(std::iter::once(xdpfw_common::DEFAULT_RULE_SLOT));
        for slot in slots {
            let zero = PerCpuValues::try_from(vec![RuleStats::default(); cpus])?;
            self.rule_stats.set(buffer * RULE_SLOTS + slot, zero, 0)?;
        }
        Ok(())
    }

    /// Global counters summed over CPUs.
    pub fn global_stats(&self) -> Result<GlobalStats> {
        let per_cpu = self.global_stats.get(&0, 0)?;
        let mut sum = GlobalStats::default();
        for s in per_cpu.iter() {
            sum.add(s);
        }
        Ok(sum)
    }

    /// Packets beyond each rule's limit (`rule_count` rules of `buffer`).
    pub fn limited(&self, buffer: u32, rule_count: u32) -> Vec<u64> {
        (0..rule_count.min(MAX_RULES as u32)).map(|r| self.limits.read((buffer * MAX_RULES as u32 + r) as usize).limited).collect()
    }

    /// Packets of each rule with `log` not logged (beyond its log rate, or the ring full):
    /// `rule_count` rules of `buffer`.
    pub fn log_suppressed(&self, buffer: u32, rule_count: u32) -> Vec<u64> {
        let Some(l) = &self.log_limits else { return vec![0; rule_count.min(MAX_RULES as u32) as usize] };
        (0..rule_count.min(MAX_RULES as u32)).map(|r| l.read((buffer * MAX_RULES as u32 + r) as usize).suppressed).collect()
    }

    /// Whether the program of this instance can trace (attached by a version with `trace`).
    pub fn can_trace(&self) -> bool {
        self.trace.is_some() && self.active.len() > trace::LEASE_SLOT as usize
    }

    /// Turns tracing on: the settings first, then the lease (CLOCK_MONOTONIC ns), which makes
    /// the program read them.
    pub fn trace_start(&mut self, config: &TraceConfig, lease_until_ns: u64) -> Result<()> {
        if !self.can_trace() {
            kbail!("this instance was attached by a version of loader without `trace`: detach and attach it again to trace it");
        }
        self.trace_stop();
        if let Some(t) = &mut self.trace {
            t.range_mut(0, 1)[0] = *config;
        }
        self.trace_renew(lease_until_ns);
        Ok(())
    }

    /// Extends the lease (a tracer that stops renewing it stops tracing when it runs out).
    pub fn trace_renew(&self, lease_until_ns: u64) {
        if self.can_trace() {
            self.active.atomic(trace::LEASE_SLOT as usize).store(lease_until_ns, Ordering::SeqCst);
        }
    }

    /// Turns tracing off at once.
    pub fn trace_stop(&self) {
        self.trace_renew(0);
    }

    /// The lease now: 0 when nobody traces, else when it runs out (CLOCK_MONOTONIC ns).
    pub fn trace_lease(&self) -> u64 {
        if self.can_trace() { self.active.atomic(trace::LEASE_SLOT as usize).load(Ordering::SeqCst) } else { 0 }
    }

    /// Changes the rule the tracer filters on (a reload gave it another slot), the slot before
    /// the generation: for a moment a packet may be judged by the new slot of the old
    /// generation, which matches nothing.
    pub fn trace_set_rule(&mut self, generation: u64, rule: u32) {
        if let Some(t) = &mut self.trace {
            let c = &mut t.range_mut(0, 1)[0];
            // SAFETY: fields of the mapped value; volatile, as the program reads them meanwhile.
            unsafe {
                std::ptr::addr_of_mut!(c.rule).write_volatile(rule);
                std::ptr::addr_of_mut!(c.rule_generation).write_volatile(generation);
            }
        }
    }

    /// The tracer's settings and counters as they are now.
    pub fn trace_config(&self) -> Option<TraceConfig> {
        self.trace.as_ref().map(|t| t.read(0))
    }

    /// Per-source buckets in the table now (at most `limit::SOURCE_ENTRIES`).
    pub fn limit_sources(&self) -> usize {
        self.limit_sources.keys().filter(Result::is_ok).count()
    }

    /// Entries of the flow table now, expired ones included (at most `flow::ENTRIES`). A walk of
    /// the table: tens of milliseconds when it is full.
    pub fn flow_entries(&self) -> usize {
        self.flows.as_ref().map_or(0, |f| f.keys().filter(Result::is_ok).count())
    }

    fn flows_mut(&mut self) -> Result<&mut aya::maps::HashMap<MapData, FlowKey, FlowEntry>> {
        self.flows.as_mut().ok_or_else(|| KernelError::msg("this instance has no flow table (attached by an older version: detach and attach again)"))
    }

    /// Records a flow as the egress program does (tests, `explain --kernel --state`): `key` is
    /// the key of its replies.
    pub fn insert_flow(&mut self, key: FlowKey, entry: FlowEntry) -> Result<()> {
        self.flows_mut()?.insert(&key, &entry, 0)?;
        Ok(())
    }

    /// Forgets a flow (a missing one is fine).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        match self.flows_mut()?.remove(key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Empties the flow table; returns how many flows it held.
    pub fn clear_flows(&mut self) -> Result<usize> {
        let Some(flows) = self.flows.as_mut() else { return Ok(0) };
        let keys: Vec<FlowKey> = flows.keys().filter_map(|k| k.ok()).collect();
        for k in &keys {
            // One evicted meanwhile is gone already.
            let _ = flows.remove(k);
        }
        Ok(keys.len())
    }

    /// The entry of a flow, if the table has it.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.flows.as_ref()?.get(key, 0).ok()
    }

    /// Per-rule counters of `buffer`, summed over CPUs: `rule_count` rules, then the default.
    pub fn rule_stats(&self, buffer: u32, rule_count: u32) -> Result<Vec<RuleStats>> {
        let slots = (0..rule_count).chain(std::iter::once(xdpfw_common::DEFAULT_RULE_SLOT));
        slots
            .map(|slot| {
                let per_cpu = self.rule_stats.get(&(buffer * RULE_SLOTS + slot), 0)?;
                Ok(per_cpu.iter().fold(RuleStats::default(), |a, s| RuleStats {
                    packets: a.packets + s.packets,
                    bytes: a.bytes + s.bytes,
                }))
            })
            .collect()
    }
}


