//! What the delta path of `loader set` needs of the maps: the live buffer's direct IPv4 tables
//! read in place, the live buffer copied into the inactive one, and single entries, chunks, leaf
//! lines and bitmaps written beside what packets read.
//!
//! The contract that makes it safe: the inactive buffer's own arrays (its top levels, fixed
//! chunks, bitmaps, header) are written only while no packet reads them (the caller holds the
//! instance's lock, and a grace period has passed since that buffer was last active); the
//! shared inner maps (chunks beyond the fixed ones, leaf lines), which the live buffer reads,
//! are written only at indices the live buffer does not reference. The flip then publishes the
//! whole batch at once.

use std::os::fd::AsFd;

use xdpfw_common::{BUFFERS, Bitmap, DirBlock, DirLine, MAX_BITMAPS, MAX_RULES, RulesetHeader, buffer_of, dir, dir6, fields_layout::FIELDS_PER_BUFFER};

use super::{BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, Maps, MmapArray, elem_call, map_fd_by_id, slot, slot_id};
use crate::error::{KernelContext, KernelError, Result, kbail};

/// One field's direct IPv4 table as the live buffer holds it: its shared inner maps.
pub struct LiveTable {
    /// 0 for the source, 1 for the destination.
    pub field: usize,
    /// The live buffer.
    pub buffer: u32,
    /// The chunks beyond the fixed ones (`None`: the table has none).
    more: Option<Inner<DirBlock>>,
    /// The leaf lines (`None`: the table has none).
    leaves: Option<Inner<DirLine>>,
}

/// An inner map of a direct table, read and written element by element (a batch touches a few
/// chunks and lines; mapping a 64 MiB chunk map costs more, as the kernel maps a BPF array's
/// every page at mmap time), or mapped whole for a scan.
struct Inner<T> {
    fd: std::os::fd::OwnedFd,
    id: u32,
    len: u32,
    mapped: std::cell::OnceCell<MmapArray<T>>,
}

impl<T: aya::Pod> Inner<T> {
    fn open(id: u32, len: u32) -> Result<Self> {
        let fd = map_fd_by_id(id).kctx(|| format!("opening inner map {id}"))?;
        Ok(Self { fd, id, len, mapped: std::cell::OnceCell::new() })
    }
    fn get(&self, i: u32) -> Option<T> {
        if i >= self.len {
            return None;
        }
        // SAFETY: `T` is plain old data (`aya::Pod`): all zeroes is a value of it.
        let mut v: T = unsafe { std::mem::zeroed() };
        elem_call(BPF_MAP_LOOKUP_ELEM, self.fd.as_fd(), i, &mut v as *mut T as u64).ok()?;
        Some(v)
    }
    fn put(&self, i: u32, v: &T) -> Result<()> {
        if i >= self.len {
            kbail!("element {i} beyond the inner map's {}", self.len);
        }
        elem_call(BPF_MAP_UPDATE_ELEM, self.fd.as_fd(), i, v as *const T as u64).kctx(|| format!("writing element {i} of inner map {}", self.id))
    }
    /// Writes `items` from `first` on.
    fn put_all(&self, first: u32, items: &[T]) -> Result<()> {
        if first as usize + items.len() > self.len as usize {
            kbail!("elements {first}..{} beyond the inner map's {}", first as usize + items.len(), self.len);
        }
        for (i, v) in items.iter().enumerate() {
            self.put(first + i as u32, v)?;
        }
        Ok(())
    }
    fn mapped(&self) -> Result<&MmapArray<T>> {
        if let Some(m) = self.mapped.get() {
            return Ok(m);
        }
        let fd = self.fd.try_clone().kctx(|| "duplicating an inner map's fd".into())?;
        let m = MmapArray::new(aya::maps::MapData::from_fd(fd)?)?;
        Ok(self.mapped.get_or_init(|| m))
    }
}

/// Lines of the leaf whose first line is `head`.
fn leaf_len(head: &DirLine) -> u32 {
    let runs: u32 = head.words[..8].iter().map(|w| w.count_ones()).sum();
    1 + runs.saturating_sub(dir::LEAF_INLINE).div_ceil(dir::LINE_VALUES)
}

impl LiveTable {
    /// Slots in the shared chunk map (0 without one).
    pub fn more_capacity(&self) -> u32 {
        self.more.as_ref().map_or(0, |m| m.len)
    }
    /// Lines in the shared leaf map (0 without one).
    pub fn leaves_capacity(&self) -> u32 {
        self.leaves.as_ref().map_or(0, |m| m.len)
    }
    pub fn leaves_id(&self) -> Option<u32> {
        self.leaves.as_ref().map(|m| m.id)
    }
    /// The lines of the leaf at `n` (`None` when it does not lie within the map).
    pub fn leaf(&self, n: u32) -> Option<Vec<DirLine>> {
        leaf_in(self.leaves.as_ref()?, n)
    }
    /// The 256 values of the leaf at `n`.
    pub fn leaf_values(&self, n: u32) -> Option<[u32; 256]> {
        let lines = self.leaf(n)?;
        Some(std::array::from_fn(|b| xdpfw_rules::compile::leaf_entry(&lines, 0, b as u32)))
    }
    /// Where the leaf at `n` ends (its first line past it), read through a mapping of the whole
    /// leaf map: for a scan of every leaf.
    pub fn leaf_end_scanned(&self, n: u32) -> Result<u32> {
        let Some(leaves) = self.leaves.as_ref() else { return Ok(0) };
        let m = leaves.mapped()?;
        Ok(match (n as usize) < m.len() {
            true => n + leaf_len(&m.read(n as usize)),
            false => n + 1,
        })
    }
    /// Chunk `n` beyond the fixed ones.
    fn more_chunk(&self, n: u32) -> Option<DirBlock> {
        self.more.as_ref()?.get(n)
    }
    /// Writes `lines` at `first`: lines the live buffer does not reference.
    pub fn write_lines(&mut self, first: u32, lines: &[DirLine]) -> Result<()> {
        let Some(m) = self.leaves.as_ref() else { kbail!("the table has no leaf map") };
        m.put_all(first, lines)
    }
    /// Writes chunk `n` (beyond the fixed ones) of the shared chunk map: one the live buffer
    /// does not reference.
    pub fn write_more_chunk(&mut self, n: u32, block: &DirBlock) -> Result<()> {
        let Some(m) = self.more.as_ref() else { kbail!("the table has no chunk map") };
        let i = n.checked_sub(dir::FIXED_CHUNKS).ok_or_else(|| KernelError::msg(format!("chunk {n} is a fixed one")))?;
        m.put(i, block)
    }
}

/// The lines of the leaf (or IPv6 run node, the same format) whose first line is `n`.
fn leaf_in(lines: &Inner<DirLine>, n: u32) -> Option<Vec<DirLine>> {
    let head = lines.get(n)?;
    let len = leaf_len(&head);
    let mut out = vec![head];
    for i in 1..len {
        out.push(lines.get(n.checked_add(i)?)?);
    }
    Some(out)
}

/// One field's IPv6 table as the live buffer holds it: its line map, shared by both buffers
/// (the top level is each buffer's own).
pub struct LiveV6 {
    pub field: usize,
    pub buffer: u32,
    /// `None`: the table has no node.
    lines: Option<Inner<DirLine>>,
}

impl LiveV6 {
    pub fn lines_id(&self) -> Option<u32> {
        self.lines.as_ref().map(|m| m.id)
    }
    /// Lines in the line map (0 without one).
    pub fn lines_capacity(&self) -> u32 {
        self.lines.as_ref().map_or(0, |m| m.len)
    }
    /// Writes `lines` at `first`: lines the live buffer does not reference.
    pub fn write_lines(&mut self, first: u32, lines: &[DirLine]) -> Result<()> {
        let Some(m) = self.lines.as_ref() else { kbail!("the IPv6 table has no line map") };
        m.put_all(first, lines)
    }
}

impl<T: Copy> MmapArray<T> {
    /// Copies entries `from..from + n` over `to..to + n` (the ranges must not overlap): one
    /// buffer's part of an array into another's.
    pub(super) fn copy_range(&mut self, from: usize, to: usize, n: usize) {
        assert!(from + n <= self.len && to + n <= self.len && (from + n <= to || to + n <= from));
        // SAFETY: both ranges are in bounds and disjoint; `to` is the inactive buffer's, which
        // no packet reads, and `&mut self` plus the reload lock make this the only writer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(from), self.ptr.as_ptr().add(to), n) }
    }
}

impl Maps {
    fn fixed(&self, field: usize) -> &MmapArray<DirBlock> {
        if field == 0 { &self.src_v4_fixed } else { &self.dst_v4_fixed }
    }

    fn v6_top_mut(&mut self, field: usize) -> &mut MmapArray<DirBlock> {
        if field == 0 { &mut self.src_v6_top } else { &mut self.dst_v6_top }
    }

    /// The live buffer's IPv6 table of `field` (0 source, 1 destination).
    pub fn live_v6(&self, field: usize) -> Result<LiveV6> {
        let buffer = buffer_of(self.generation());
        let first = if field == 0 { slot::SRC_V6 } else { slot::DST_V6 };
        let mut lines = None;
        for (size, &len) in dir6::LINE_SIZES.iter().enumerate() {
            if let Some(id) = slot_id(self.slot_fds[first + size].as_fd(), buffer).kctx(|| "reading an array-of-maps slot".into())? {
                lines = Some(Inner::open(id, len)?);
            }
        }
        Ok(LiveV6 { field, buffer, lines })
    }

    /// Top-level entry `top` (the first 16 bits) of `table`'s live buffer.
    pub fn live_v6_top(&self, table: &LiveV6, top: u16) -> u32 {
        let t = if table.field == 0 { &self.src_v6_top } else { &self.dst_v6_top };
        t.read(table.buffer as usize * dir6::TOP_BLOCKS as usize + top as usize / 256).entries[top as usize % 256]
    }

    /// The bitmap id `table` (the live buffer's) gives address `a`, walked as the program walks
    /// it (`None` when an entry points outside the map or the walk is too long: never, for
    /// tables the loader wrote).
    pub fn live_lookup6(&self, table: &LiveV6, a: u128) -> Option<u32> {
        let top = self.live_v6_top(table, (a >> 112) as u16);
        xdpfw_rules::compile::v6_walk(top, a, |i| table.lines.as_ref()?.get(i))
    }

    /// Writes top-level entry `top` of `field`'s IPv6 table in the inactive `buffer`.
    pub fn write_v6_top(&mut self, buffer: u32, field: usize, top: u16, value: u32) {
        self.assert_inactive(buffer);
        let i = buffer as usize * dir6::TOP_BLOCKS as usize + top as usize / 256;
        self.v6_top_mut(field).range_mut(i, 1)[0].entries[top as usize % 256] = value;
    }

    /// The live buffer's direct IPv4 table of `field` (0 source, 1 destination).
    pub fn live_table(&self, field: usize) -> Result<LiveTable> {
        let t0 = std::time::Instant::now();
        let buffer = buffer_of(self.generation());
        let first = if field == 0 { slot::SRC_V4 } else { slot::DST_V4 };
        let mut more = None;
        for (size, &len) in dir::MORE_SIZES.iter().enumerate() {
            if let Some(id) = slot_id(self.slot_fds[first + size].as_fd(), buffer).kctx(|| "reading an array-of-maps slot".into())? {
                more = Some(Inner::open(id, len)?);
            }
        }
        let mut leaves = None;
        for (size, &len) in dir::LEAF_SIZES.iter().enumerate() {
            let s = first + dir::MORE_SIZES.len() + size;
            if let Some(id) = slot_id(self.slot_fds[s].as_fd(), buffer).kctx(|| "reading an array-of-maps slot".into())? {
                leaves = Some(Inner::open(id, len)?);
            }
        }
        tracing::debug!("delta: inner maps of table {field} opened in {} us", t0.elapsed().as_micros());
        Ok(LiveTable { field, buffer, more, leaves })
    }

    /// Top-level entry `top` (the /16) of `table`'s live buffer.
    pub fn live_top(&self, table: &LiveTable, top: u16) -> u32 {
        let i = table.buffer as usize * dir::BUFFER_BLOCKS as usize + top as usize / 256;
        self.fixed(table.field).read(i).entries[top as usize % 256]
    }

    /// Every top-level entry of `table`'s live buffer.
    pub fn live_tops(&self, table: &LiveTable) -> Vec<u32> {
        let base = table.buffer as usize * dir::BUFFER_BLOCKS as usize;
        (0..dir::TOP_BLOCKS as usize).flat_map(|b| self.fixed(table.field).read(base + b).entries).collect()
    }

    /// Chunk `n` of `table` as the live buffer holds it.
    pub fn live_chunk(&self, table: &LiveTable, n: u32) -> Option<DirBlock> {
        if n < dir::FIXED_CHUNKS {
            let i = table.buffer as usize * dir::BUFFER_BLOCKS as usize + (dir::TOP_BLOCKS + n) as usize;
            return Some(self.fixed(table.field).read(i));
        }
        table.more_chunk(n - dir::FIXED_CHUNKS)
    }

    /// The bitmap id `table` (the live buffer's) gives address `a`, read as the program reads it
    /// (`None` when an entry points outside the maps: never, for tables the loader wrote).
    pub fn live_lookup(&self, table: &LiveTable, a: u32) -> Option<u32> {
        let e = self.live_top(table, (a >> 16) as u16);
        if e & dir::CHUNK == 0 {
            return Some(e);
        }
        let c = self.live_chunk(table, e & !dir::CHUNK)?.entries[((a >> 8) & 0xff) as usize];
        if c & dir::CHUNK == 0 {
            return Some(c);
        }
        // The leaf must lie within the map (its runs' count says how many lines it takes).
        let lines = table.leaf(c & !dir::CHUNK)?;
        Some(xdpfw_rules::compile::leaf_entry(&lines, 0, a & 0xff))
    }

    /// Makes the inactive `buffer` a copy of the live one: rules, fields, limits, log rates, the
    /// first `bitmaps` bitmaps, the direct tables' top levels and fixed chunks, and every
    /// array-of-maps slot (shared, as after a reload that changes no prefix). Not the header:
    /// [`Maps::publish_header`] writes that last. Returns the slots changed (each waits for an
    /// RCU grace period in the kernel; none when the buffer was cleared after the live one's
    /// flip).
    pub fn copy_live_into(&mut self, buffer: u32, bitmaps: u32) -> Result<u32> {
        assert!(buffer < BUFFERS);
        let live = buffer_of(self.generation());
        if live == buffer || self.header(live).generation != self.generation() {
            kbail!("no complete active buffer to copy, or buffer {buffer} is the active one");
        }
        if bitmaps > MAX_BITMAPS {
            kbail!("{bitmaps} bitmaps: more than a buffer holds");
        }
        // Buffer `l`'s part of an array of `n` entries per buffer over buffer `b`'s.
        fn copy<T: Copy>(a: &mut MmapArray<T>, l: usize, b: usize, per_buffer: usize, n: usize) {
            a.copy_range(l * per_buffer, b * per_buffer, n);
        }
        let (l, b) = (live as usize, buffer as usize);
        copy(&mut self.rules, l, b, MAX_RULES, MAX_RULES);
        copy(&mut self.fields, l, b, FIELDS_PER_BUFFER as usize, FIELDS_PER_BUFFER as usize);
        copy(&mut self.limits, l, b, MAX_RULES, MAX_RULES);
        if let Some(log) = self.log_limits.as_mut() {
            copy(log, l, b, MAX_RULES, MAX_RULES);
        }
        copy(&mut self.bitmaps, l, b, MAX_BITMAPS as usize, bitmaps as usize);
        // A direct table no rule of the live ruleset reads is not copied (its program path is
        // not taken, and the delta path writes only tables rules name).
        let blocks = dir::BUFFER_BLOCKS as usize;
        let fields = self.header(live).fields;
        let tops = xdpfw_common::dir6::TOP_BLOCKS as usize;
        if fields & xdpfw_common::field::SRC != 0 {
            copy(&mut self.src_v4_fixed, l, b, blocks, blocks);
            copy(&mut self.src_v6_top, l, b, tops, tops);
        }
        if fields & xdpfw_common::field::DST != 0 {
            copy(&mut self.dst_v4_fixed, l, b, blocks, blocks);
            copy(&mut self.dst_v6_top, l, b, tops, tops);
        }
        self.follow_live_slots(buffer)
    }

    /// Copies blocks `blocks` (indices within a buffer's part of the fixed array: the top level's
    /// blocks, then chunk `n` at `dir::TOP_BLOCKS + n`) of `field`'s table, blocks `v6_blocks`
    /// of its IPv6 top level, and bitmaps
    /// `bitmaps`, from the live buffer into the inactive `buffer`: what makes a buffer that
    /// differed from the live one only there (the one the previous delta retired) a copy of it.
    pub fn copy_live_parts(&mut self, buffer: u32, blocks: [&[u32]; 2], v6_blocks: [&[u32]; 2], bitmaps: std::ops::Range<u32>) -> Result<()> {
        self.assert_inactive(buffer);
        let live = buffer_of(self.generation()) as usize;
        for (field, (blocks, v6_blocks)) in blocks.into_iter().zip(v6_blocks).enumerate() {
            let (fixed, top) = if field == 0 { (&mut self.src_v4_fixed, &mut self.src_v6_top) } else { (&mut self.dst_v4_fixed, &mut self.dst_v6_top) };
            for (array, blocks, per) in [(fixed, blocks, dir::BUFFER_BLOCKS as usize), (top, v6_blocks, dir6::TOP_BLOCKS as usize)] {
                for &i in blocks {
                    if i as usize >= per {
                        kbail!("block {i} beyond a buffer's {per}");
                    }
                    array.copy_range(live * per + i as usize, buffer as usize * per + i as usize, 1);
                }
            }
        }
        if bitmaps.end > MAX_BITMAPS || bitmaps.start > bitmaps.end {
            kbail!("bitmaps {bitmaps:?} beyond a buffer's {MAX_BITMAPS}");
        }
        let n = (bitmaps.end - bitmaps.start) as usize;
        let per = MAX_BITMAPS as usize;
        self.bitmaps.copy_range(live * per + bitmaps.start as usize, buffer as usize * per + bitmaps.start as usize, n);
        Ok(())
    }

    /// Writes top-level entry `top` of `field`'s table in the inactive `buffer`.
    pub fn write_top(&mut self, buffer: u32, field: usize, top: u16, value: u32) {
        self.assert_inactive(buffer);
        let i = buffer as usize * dir::BUFFER_BLOCKS as usize + top as usize / 256;
        let fixed = if field == 0 { &mut self.src_v4_fixed } else { &mut self.dst_v4_fixed };
        fixed.range_mut(i, 1)[0].entries[top as usize % 256] = value;
    }

    /// Writes fixed chunk `n` of `field`'s table in the inactive `buffer`.
    pub fn write_fixed_chunk(&mut self, buffer: u32, field: usize, n: u32, block: &DirBlock) {
        self.assert_inactive(buffer);
        assert!(n < dir::FIXED_CHUNKS);
        let i = buffer as usize * dir::BUFFER_BLOCKS as usize + (dir::TOP_BLOCKS + n) as usize;
        let fixed = if field == 0 { &mut self.src_v4_fixed } else { &mut self.dst_v4_fixed };
        fixed.range_mut(i, 1)[0] = *block;
    }

    /// Writes bitmaps `first..` of the inactive `buffer`.
    pub fn write_bitmaps(&mut self, buffer: u32, first: u32, bitmaps: &[Bitmap]) -> Result<()> {
        self.assert_inactive(buffer);
        if first as usize + bitmaps.len() > MAX_BITMAPS as usize {
            kbail!("more than {MAX_BITMAPS} bitmaps");
        }
        self.bitmaps.range_mut(buffer as usize * MAX_BITMAPS as usize + first as usize, bitmaps.len()).copy_from_slice(bitmaps);
        Ok(())
    }

    /// Writes the header of the inactive `buffer` for `generation`: the last write before a flip.
    pub fn publish_header(&mut self, buffer: u32, generation: u64, mut header: RulesetHeader) {
        self.assert_inactive(buffer);
        header.generation = generation;
        self.headers.range_mut(buffer as usize, 1)[0] = header;
    }

    fn assert_inactive(&self, buffer: u32) {
        assert!(buffer < BUFFERS && buffer != buffer_of(self.generation()), "buffer {buffer} is the active one");
    }
}
