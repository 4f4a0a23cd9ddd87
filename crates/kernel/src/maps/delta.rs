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

use xdpfw_common::{BUFFERS, Bitmap, DirBlock, DirLine, MAX_BITMAPS, MAX_RULES, RulesetHeader, buffer_of, dir, fields_layout::FIELDS_PER_BUFFER};

use super::{Maps, MmapArray, map_fd_by_id, slot, slot_id};
use crate::error::{KernelContext, KernelError, Result, kbail};

/// One field's direct IPv4 table as the live buffer holds it: its shared inner maps, mapped.
pub struct LiveTable {
    /// 0 for the source, 1 for the destination.
    pub field: usize,
    /// The live buffer.
    pub buffer: u32,
    /// The chunks beyond the fixed ones (`None`: the table has none) and the map's id.
    more: Option<(MmapArray<DirBlock>, u32)>,
    /// The leaf lines (`None`: the table has none) and the map's id.
    leaves: Option<(MmapArray<DirLine>, u32)>,
}

fn open_inner<T: Copy>(id: u32) -> Result<MmapArray<T>> {
    let fd = map_fd_by_id(id).kctx(|| format!("opening inner map {id}"))?;
    let data = aya::maps::MapData::from_fd(fd)?;
    MmapArray::new(data)
}

impl LiveTable {
    /// Slots in the shared chunk map (0 without one).
    pub fn more_capacity(&self) -> u32 {
        self.more.as_ref().map_or(0, |(m, _)| m.len() as u32)
    }
    /// Lines in the shared leaf map (0 without one), and its id.
    pub fn leaves_capacity(&self) -> u32 {
        self.leaves.as_ref().map_or(0, |(m, _)| m.len() as u32)
    }
    pub fn leaves_id(&self) -> Option<u32> {
        self.leaves.as_ref().map(|(_, id)| *id)
    }
    /// Every leaf line (empty without a leaf map).
    pub fn lines(&self) -> &[DirLine] {
        match &self.leaves {
            // SAFETY of the read: lines the live buffer references are never written (see the
            // module's contract); others may be garbage, which a reader of them must tolerate.
            Some((m, _)) => m.as_slice(),
            None => &[],
        }
    }
    /// Chunk `n` beyond the fixed ones.
    fn more_chunk(&self, n: u32) -> Option<DirBlock> {
        let (m, _) = self.more.as_ref()?;
        ((n as usize) < m.len()).then(|| m.read(n as usize))
    }
    /// Writes `lines` at `first`: lines the live buffer does not reference.
    pub fn write_lines(&mut self, first: u32, lines: &[DirLine]) -> Result<()> {
        let Some((m, _)) = self.leaves.as_mut() else { kbail!("the table has no leaf map") };
        if first as usize + lines.len() > m.len() {
            kbail!("leaf lines {first}..{} beyond the map's {}", first as usize + lines.len(), m.len());
        }
        m.range_mut(first as usize, lines.len()).copy_from_slice(lines);
        Ok(())
    }
    /// Writes chunk `n` (beyond the fixed ones) of the shared chunk map: one the live buffer
    /// does not reference.
    pub fn write_more_chunk(&mut self, n: u32, block: &DirBlock) -> Result<()> {
        let Some((m, _)) = self.more.as_mut() else { kbail!("the table has no chunk map") };
        let i = n.checked_sub(dir::FIXED_CHUNKS).ok_or_else(|| KernelError::msg(format!("chunk {n} is a fixed one")))? as usize;
        if i >= m.len() {
            kbail!("chunk {n} beyond the chunk map");
        }
        m.range_mut(i, 1)[0] = *block;
        Ok(())
    }
}

impl<T: Copy> MmapArray<T> {
    /// The whole array. For arrays whose writers follow the module's contract.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: in bounds; the mapping lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Maps {
    fn fixed(&self, field: usize) -> &MmapArray<DirBlock> {
        if field == 0 { &self.src_v4_fixed } else { &self.dst_v4_fixed }
    }

    /// The live buffer's direct IPv4 table of `field` (0 source, 1 destination).
    pub fn live_table(&self, field: usize) -> Result<LiveTable> {
        let buffer = buffer_of(self.generation());
        let first = if field == 0 { slot::SRC_V4 } else { slot::DST_V4 };
        let mut more = None;
        for size in 0..dir::MORE_SIZES.len() {
            if let Some(id) = slot_id(self.slot_fds[first + size].as_fd(), buffer).kctx(|| "reading an array-of-maps slot".into())? {
                more = Some((open_inner(id)?, id));
            }
        }
        let mut leaves = None;
        for size in 0..dir::LEAF_SIZES.len() {
            let s = first + dir::MORE_SIZES.len() + size;
            if let Some(id) = slot_id(self.slot_fds[s].as_fd(), buffer).kctx(|| "reading an array-of-maps slot".into())? {
                leaves = Some((open_inner(id)?, id));
            }
        }
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
        let (lines, n) = (table.lines(), c & !dir::CHUNK);
        // The leaf must lie within the map (its runs' count says how many lines it takes).
        let head = lines.get(n as usize)?;
        let runs: u32 = head.words[..8].iter().map(|w| w.count_ones()).sum();
        let len = 1 + runs.saturating_sub(dir::LEAF_INLINE).div_ceil(dir::LINE_VALUES);
        if (n + len) as usize > lines.len() {
            return None;
        }
        Some(xdpfw_rules::compile::leaf_entry(lines, n, a & 0xff))
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
        fn copy<T: Copy>(a: &mut MmapArray<T>, from: usize, to: usize, n: usize) {
            let src: Vec<T> = (0..n).map(|i| a.read(from * n + i)).collect();
            a.range_mut(to * n, n).copy_from_slice(&src);
        }
        let (l, b) = (live as usize, buffer as usize);
        copy(&mut self.rules, l, b, MAX_RULES);
        copy(&mut self.fields, l, b, FIELDS_PER_BUFFER as usize);
        copy(&mut self.limits, l, b, MAX_RULES);
        if let Some(log) = self.log_limits.as_mut() {
            copy(log, l, b, MAX_RULES);
        }
        let n = bitmaps as usize;
        let src: Vec<Bitmap> = (0..n).map(|i| self.bitmaps.read(l * MAX_BITMAPS as usize + i)).collect();
        self.bitmaps.range_mut(b * MAX_BITMAPS as usize, n).copy_from_slice(&src);
        copy(&mut self.src_v4_fixed, l, b, dir::BUFFER_BLOCKS as usize);
        copy(&mut self.dst_v4_fixed, l, b, dir::BUFFER_BLOCKS as usize);
        self.follow_live_slots(buffer)
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
