//! The delta path of `loader set`: a batch of IPv4 prefixes goes live by writing only the table
//! entries it changes, in milliseconds beside a 1M-prefix set, instead of compiling and
//! installing the whole ruleset again.
//!
//! How (the instance's lock held throughout):
//! 1. **What the live rules are**, without parsing a set: a *context* (`delta-context.json` in
//!    the instance's runtime folder) holds, for the texts of the live ruleset, each rule's
//!    address conditions (inline prefixes, set names, exclusions) and each set's content id;
//!    each set's IPv4 prefixes are in a sorted *index* (`set-index/<id>.v4`, 8 bytes a prefix,
//!    mapped, not read). The context is valid when its texts' hash with the instance's journal
//!    is the live ruleset's hash; otherwise it is built again from the live snapshot (a parse of
//!    its texts, once per change of the rules or set files).
//! 2. **The batch** is recorded in a copy of the journal (membership from the index); nothing
//!    changes when no prefix's membership does.
//! 3. **The /16s it touches** are computed again with the compiler's own code
//!    ([`xdpfw_rules::compile::v4_regions`]) from every prefix that overlaps them (from the
//!    indexes and the journal), in every field whose rules name the set.
//! 4. **The inactive buffer** becomes a copy of the live one, then gets the new top-level
//!    entries, chunks and bitmaps. Chunks beyond the fixed ones and leaf lines live in maps both
//!    buffers share, so new ones go where the live buffer references nothing: chunk slots it
//!    does not use, leaf lines past the highest it uses (the *watermark*, in
//!    `delta-tables.json`, reserved before they are written). A /24 whose leaf is unchanged
//!    keeps it. When a shared map has no room left, the batch takes the reload path, which
//!    packs the tables again.
//! 5. **The self-tests** of the ruleset run through the probe on the inactive buffer, against
//!    the reference matcher on the rules parsed alone, each set holding its prefixes that
//!    overlap the test packets' /16s (an address's verdict depends only on the prefixes that
//!    contain it). A failure refuses the batch with nothing live changed.
//! 6. **The journal** is written (synced), then the flip publishes the whole batch at once; a
//!    grace period later the retired buffer is cleared and its counters carried, as a reload
//!    does. The history records action `set` with a snapshot of the live texts and the journal.
//!
//! IPv6 prefixes go the same way: each set's IPv6 prefixes have their own index
//! (`set-index/<id>.v6`, 24 bytes a prefix), the touched /16s (the first 16 bits, the IPv6
//! table's top level) are computed again ([`xdpfw_rules::compile::v6_regions`]), and the
//! subtree under each is built anew past the lines the live buffer references in the field's
//! shared line map (its own watermark); the inactive buffer gets the new top-level entries.
//!
//! What takes the reload path instead (said in the report): `replace`, a batch touching more
//! than `MAX_REGIONS` /16s of a table, no room in the shared maps (an IPv6 table without a line
//! map yet among them), an IPv6 line map whose end is not recorded (after an upgrade: the next
//! reload records it), and a live ruleset installed by an earlier version.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use xdpfw_common::{Bitmap, DirBlock, DirLine, MAX_BITMAPS, buffer_of, dir};
use xdpfw_kernel::{LiveTable, LiveV6, Maps, grace};
use xdpfw_rules::{
    AddrList, Ruleset,
    compile::{Region, Slot, V6Regions, push_leaf, v4_regions, v6_regions},
    setedit::{MAX_JOURNAL_PREFIXES, SetChanges, SetEdit, SetJournal, SetOp, changed_set_id, journaled_hash},
};

use crate::{
    error::{ControlContext, ControlError, Result},
    files::{self, now_secs},
    history,
    instance::{Instance, ReloadReport, ReloadTimes, State},
    pipeline::{ReloadOptions, SetReport},
    tables_cache,
};

/// Most /16s of a table a batch may touch on the delta path (a /2 touches 16,384; 10,000
/// random host routes about 9,300).
pub(crate) const MAX_REGIONS: usize = 1 << 14;

const CONTEXT: &str = "delta-context.json";
const TABLES: &str = "delta-tables.json";
const INDEX_DIR: &str = "set-index";

pub(crate) enum Outcome {
    Done(Box<SetReport>),
    /// Why the batch must take the reload path.
    NotApplicable(String),
}

/// One rule's condition on one address field, without the sets' prefixes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Lists {
    inline: Vec<IpNet>,
    sets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    except: Option<Box<Lists>>,
}

impl Lists {
    fn of(l: &AddrList) -> Self {
        Self { inline: l.inline.clone(), sets: l.sets.iter().map(|(n, _)| n.clone()).collect(), except: l.except.as_deref().map(|e| Box::new(Self::of(e))) }
    }
    fn names(&self, set: &str) -> bool {
        self.sets.iter().any(|n| n == set) || self.except.as_ref().is_some_and(|e| e.names(set))
    }
    fn set_names(&self) -> impl Iterator<Item = &String> {
        self.sets.iter().chain(self.except.iter().flat_map(|e| e.sets.iter()))
    }
    /// The condition with each set's prefixes given by `prefixes`.
    fn with(&self, prefixes: &dyn Fn(&str) -> Arc<Vec<IpNet>>) -> AddrList {
        AddrList {
            inline: self.inline.clone(),
            sets: self.sets.iter().map(|n| (n.clone(), prefixes(n))).collect(),
            except: self.except.as_ref().map(|e| Box::new(e.with(prefixes))),
        }
    }
}

/// What the delta path knows of the live ruleset's texts (see the module's notes).
#[derive(Serialize, Deserialize)]
struct Context {
    /// The hash of the texts (no journal applied).
    text_hash: String,
    rules: usize,
    /// Per field (source, destination): each rule's condition, `None` when no rule has one.
    fields: [Option<Vec<Option<Lists>>>; 2],
    /// Each set's content id in the texts (hex): the name of its index.
    sets: BTreeMap<String, String>,
    /// Self-tests of the ruleset.
    tests: usize,
    /// The set files (as the rules name them): what a parse of the rules alone leaves empty.
    set_files: Vec<String>,
    /// The sets with IPv6 prefixes in the texts: those with an IPv6 index.
    v6_sets: BTreeSet<String>,
}

fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// An IPv4 prefix as an index key: the address, then the length (so keys sort by address).
fn key(n: &Ipv4Net) -> u64 {
    (u64::from(u32::from(n.network())) << 8) | u64::from(n.prefix_len())
}

fn net_of(k: u64) -> Option<IpNet> {
    Ipv4Net::new(((k >> 8) as u32).into(), (k & 0xff) as u8).ok().map(IpNet::V4)
}

/// An IPv6 prefix as an index key: the address's two halves, then the length.
type Key6 = [u64; 3];

fn key6(n: &Ipv6Net) -> Key6 {
    let a = u128::from(n.network());
    [(a >> 64) as u64, a as u64, u64::from(n.prefix_len())]
}

fn net6_of(k: Key6) -> Option<IpNet> {
    Ipv6Net::new((u128::from(k[0]) << 64 | u128::from(k[1])).into(), u8::try_from(k[2]).ok()?).ok().map(IpNet::V6)
}

/// A set's prefixes of one family, sorted keys (`u64` for IPv4, [`Key6`] for IPv6) in a file,
/// mapped read-only.
struct Index<K> {
    ptr: *const K,
    len: usize,
}

impl<K: Copy + Ord> Index<K> {
    fn open(path: &std::path::Path) -> Result<Self> {
        let f = fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let bytes = f.metadata().ctx(|| format!("inspecting {}", path.display()))?.len() as usize;
        if !bytes.is_multiple_of(size_of::<K>()) {
            return Err(ControlError::Refused(format!("{} is not a set index", path.display())));
        }
        if bytes == 0 {
            return Ok(Self { ptr: std::ptr::null(), len: 0 });
        }
        // SAFETY: a private read-only mapping of a file of `bytes` bytes.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).ctx(|| format!("mapping {}", path.display()));
        }
        Ok(Self { ptr: ptr.cast(), len: bytes / size_of::<K>() })
    }
    fn keys(&self) -> &[K] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the mapping holds `len` keys (page-aligned; a key is plain u64s) and lives as
        // long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn contains(&self, k: K) -> bool {
        self.keys().binary_search(&k).is_ok()
    }
}

impl Index<u64> {
    /// The prefixes that overlap the /16 `top`: those inside it and those containing it.
    fn region(&self, top: u16, out: &mut Vec<IpNet>) {
        let keys = self.keys();
        let lo = u64::from(top) << 24;
        let hi = (u64::from(top) + 1) << 24;
        let start = keys.partition_point(|&k| k < lo);
        let end = keys.partition_point(|&k| k < hi);
        out.extend(keys[start..end].iter().filter_map(|&k| net_of(k)));
        for len in 0..16u8 {
            let a = (u32::from(top) << 16) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            let k = (u64::from(a) << 8) | u64::from(len);
            if k < lo && self.contains(k) {
                out.extend(net_of(k));
            }
        }
    }
}

impl Index<Key6> {
    /// The prefixes that overlap the IPv6 /16 `top`: those inside it and those containing it.
    fn region(&self, top: u16, out: &mut Vec<IpNet>) {
        let keys = self.keys();
        let lo = [u64::from(top) << 48, 0, 0];
        let start = keys.partition_point(|k| *k < lo);
        let end = match top.checked_add(1) {
            Some(next) => keys.partition_point(|k| *k < [u64::from(next) << 48, 0, 0]),
            None => keys.len(),
        };
        out.extend(keys[start..end].iter().filter_map(|&k| net6_of(k)));
        for len in 0..16u8 {
            let a = (u64::from(top) << 48) & u64::MAX.checked_shl(64 - u32::from(len)).unwrap_or(0);
            let k = [a, 0, u64::from(len)];
            if k < lo && self.contains(k) {
                out.extend(net6_of(k));
            }
        }
    }
}

impl<K> Drop for Index<K> {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly what open() mapped.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len * size_of::<K>()) };
        }
    }
}

/// The prefixes of `set` (a journal's) that overlap the /16 `top`: those whose network lies in
/// it (ordered by address, then length, so one range), and those containing it.
fn overlapping(set: &BTreeSet<IpNet>, top: u16, out: &mut Vec<IpNet>) {
    let at = |a: u32| IpNet::V4(Ipv4Net::new(a.into(), 0).unwrap_or_default());
    let start = u32::from(top) << 16;
    match start.checked_add(1 << 16) {
        Some(end) => out.extend(set.range(at(start)..at(end)).copied()),
        None => out.extend(set.range(at(start)..).take_while(|n| matches!(n, IpNet::V4(_))).copied()),
    }
    for len in 0..16u8 {
        let a = start & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        if let Ok(n) = Ipv4Net::new(a.into(), len)
            && a < start
            && set.contains(&IpNet::V4(n))
        {
            out.push(IpNet::V4(n));
        }
    }
}

/// [`overlapping`] for the IPv6 /16 `top`.
fn overlapping6(set: &BTreeSet<IpNet>, top: u16, out: &mut Vec<IpNet>) {
    let at = |a: u128| IpNet::V6(Ipv6Net::new(a.into(), 0).unwrap_or_default());
    let start = u128::from(top) << 112;
    match top.checked_add(1) {
        Some(next) => out.extend(set.range(at(start)..at(u128::from(next) << 112)).copied()),
        None => out.extend(set.range(at(start)..).copied()),
    }
    for len in 0..16u8 {
        let a = start & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        if let Ok(n) = Ipv6Net::new(a.into(), len)
            && a < start
            && set.contains(&IpNet::V6(n))
        {
            out.push(IpNet::V6(n));
        }
    }
}

/// The /16s a batch touches, of each family's table (sorted).
#[derive(Default)]
struct Tops {
    v4: Vec<u16>,
    v6: Vec<u16>,
}

impl Tops {
    /// The prefixes of `set` that overlap these /16s.
    fn overlapping(&self, set: &BTreeSet<IpNet>, out: &mut Vec<IpNet>) {
        self.v4.iter().for_each(|&t| overlapping(set, t, out));
        self.v6.iter().for_each(|&t| overlapping6(set, t, out));
    }
}

/// The sets' prefixes that overlap some /16s, from their indexes and the journal (the indexes
/// opened once).
#[derive(Default)]
struct RegionSets {
    indexes: HashMap<String, (Index<u64>, Option<Index<Key6>>)>,
}

impl RegionSets {
    /// The prefixes of `set` (with `journal`) that overlap the /16s `tops`; `None` when the
    /// context has no such set.
    fn get(&mut self, inst: &Instance, ctx: &Context, journal: &SetJournal, set: &str, tops: &Tops) -> Result<Option<Arc<Vec<IpNet>>>> {
        let changes: Option<&SetChanges> = journal.sets.get(set);
        let mut v = Vec::new();
        match changes.and_then(|c| c.replace.as_ref()) {
            Some(r) => tops.overlapping(r, &mut v),
            None => {
                let Some(id) = ctx.sets.get(set) else { return Ok(None) };
                if !self.indexes.contains_key(set) {
                    // A set without IPv6 prefixes in the texts has no IPv6 index.
                    let v6 = match ctx.v6_sets.contains(set) {
                        true => Some(Index::open(&index_path6(inst, id))?),
                        false => None,
                    };
                    self.indexes.insert(set.to_string(), (Index::open(&index_path(inst, id))?, v6));
                }
                let (idx, idx6) = &self.indexes[set];
                tops.v4.iter().for_each(|&t| idx.region(t, &mut v));
                if let Some(idx6) = idx6 {
                    tops.v6.iter().for_each(|&t| idx6.region(t, &mut v));
                }
            }
        }
        if let Some(c) = changes {
            let mut gone = Vec::new();
            tops.overlapping(&c.deleted, &mut gone);
            let gone: HashSet<IpNet> = gone.into_iter().collect();
            v.retain(|p| !gone.contains(p));
            tops.overlapping(&c.added, &mut v);
        }
        v.sort_unstable();
        v.dedup();
        Ok(Some(Arc::new(v)))
    }
}

/// The /16s a batch touches, of each family's table; `None` when one family's are more than
/// `MAX_REGIONS`.
fn tops_of(prefixes: &[IpNet]) -> Option<Tops> {
    let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
    for p in prefixes {
        let (tops, first, len) = match p {
            IpNet::V4(n) => (&mut v4, (u32::from(n.network()) >> 16) as u16, n.prefix_len()),
            IpNet::V6(n) => (&mut v6, (u128::from(n.network()) >> 112) as u16, n.prefix_len()),
        };
        let count = if len >= 16 { 1 } else { 1u32 << (16 - len) };
        if count as usize > MAX_REGIONS {
            return None;
        }
        tops.extend((0..count).map(|i| first.wrapping_add(i as u16)));
        if tops.len() > MAX_REGIONS {
            return None;
        }
    }
    Some(Tops { v4: v4.into_iter().collect(), v6: v6.into_iter().collect() })
}

fn index_path(inst: &Instance, id: &str) -> PathBuf {
    inst.state_dir.join(INDEX_DIR).join(format!("{id}.v4"))
}

fn index_path6(inst: &Instance, id: &str) -> PathBuf {
    inst.state_dir.join(INDEX_DIR).join(format!("{id}.v6"))
}

/// Writes the indexes of `prefixes` unless they exist: its IPv4 ones, and its IPv6 ones when it
/// has any.
fn write_index(inst: &Instance, id: &str, prefixes: &[IpNet]) -> Result<()> {
    let path = index_path(inst, id);
    if !path.exists() {
        let mut keys: Vec<u64> = prefixes.iter().filter_map(|p| if let IpNet::V4(n) = p { Some(key(n)) } else { None }).collect();
        keys.sort_unstable();
        keys.dedup();
        let bytes: Vec<u8> = keys.iter().flat_map(|k| k.to_ne_bytes()).collect();
        files::write_unsynced(&path, &bytes)?;
    }
    let path = index_path6(inst, id);
    let mut keys: Vec<Key6> = prefixes.iter().filter_map(|p| if let IpNet::V6(n) = p { Some(key6(n)) } else { None }).collect();
    if keys.is_empty() || path.exists() {
        return Ok(());
    }
    keys.sort_unstable();
    keys.dedup();
    let bytes: Vec<u8> = keys.iter().flatten().flat_map(|k| k.to_ne_bytes()).collect();
    files::write_unsynced(&path, &bytes)
}

/// Builds the context of `texts` (and the indexes of its sets), replacing the stored one.
fn build_context(inst: &Instance, texts: &Ruleset) -> Result<Context> {
    let mut sets = BTreeMap::new();
    for (name, prefixes) in &texts.sets {
        let Some(id) = texts.set_ids.get(name) else { continue };
        let id = hex(id);
        write_index(inst, &id, prefixes)?;
        sets.insert(name.clone(), id);
    }
    // Indexes of sets no longer live go (the folder would otherwise grow with every feed).
    let keep: HashSet<String> = sets.values().flat_map(|id| [format!("{id}.v4"), format!("{id}.v6")]).collect();
    if let Ok(dir) = fs::read_dir(inst.state_dir.join(INDEX_DIR)) {
        for e in dir.flatten() {
            if !keep.contains(&*e.file_name().to_string_lossy()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let field = |get: fn(&xdpfw_rules::Rule) -> Option<&AddrList>| -> Option<Vec<Option<Lists>>> {
        texts.rules.iter().any(|r| get(r).is_some()).then(|| texts.rules.iter().map(|r| get(r).map(Lists::of)).collect())
    };
    let ctx = Context {
        text_hash: texts.hash.clone(),
        rules: texts.rules.len(),
        fields: [field(|r| r.src.as_ref()), field(|r| r.dst.as_ref())],
        sets,
        tests: texts.tests.len(),
        set_files: texts.sources.set_digests.iter().map(|(f, _)| f.clone()).collect(),
        v6_sets: texts.sets.iter().filter(|(_, p)| p.iter().any(|n| matches!(n, IpNet::V6(_)))).map(|(n, _)| n.clone()).collect(),
    };
    files::write_unsynced(&inst.state_dir.join(CONTEXT), &serde_json::to_vec(&ctx).ctx(|| "serializing the delta context".into())?)?;
    Ok(ctx)
}

/// The context of the live ruleset: the stored one when it describes it, else built from the
/// live snapshot's texts. `None` when the live ruleset is not its snapshot's texts with this
/// journal (a change in flight when a process died): the reload path sorts that out.
fn context(inst: &Instance, state: &State, journal: &SetJournal) -> Result<Option<Context>> {
    let live = |ctx: &Context| journaled_hash(&ctx.text_hash, journal, |n| ctx.sets.contains_key(n)) == state.ruleset.hash;
    if let Ok(bytes) = fs::read(inst.state_dir.join(CONTEXT))
        && let Ok(ctx) = serde_json::from_slice::<Context>(&bytes)
        && live(&ctx)
        && ctx.sets.values().all(|id| index_path(inst, id).exists())
        && ctx.v6_sets.iter().filter_map(|n| ctx.sets.get(n)).all(|id| index_path6(inst, id).exists())
    {
        return Ok(Some(ctx));
    }
    let snapshot = inst.history().dir().join("snapshots").join(&state.ruleset.hash).join("rules.toml");
    if !snapshot.exists() {
        return Ok(None);
    }
    let texts = history::load_rules_with(&snapshot, xdpfw_rules::Origin::Local, &SetJournal::default())?;
    let ctx = build_context(inst, &texts)?;
    Ok(live(&ctx).then_some(ctx))
}

/// Where each field's leaf lines end: past the highest line the live buffer references, per
/// leaf map (by id); and what the inactive buffer lacks of the live one, when the last change
/// was a delta.
#[derive(Default, Serialize, Deserialize)]
struct Watermarks {
    fields: [Option<(u32, u32)>; 2],
    /// The same for each field's IPv6 line map.
    #[serde(default)]
    v6: [Option<(u32, u32)>; 2],
    #[serde(default)]
    twin: Option<Twin>,
}

/// The inactive buffer is a copy of the live one (generation `generation`) but for these
/// blocks of each table's fixed part and these bitmaps: what the delta that made `generation`
/// wrote. Recorded after that delta's clear, removed before anything writes the inactive
/// buffer; an install (another generation) makes it stale.
#[derive(Clone, Serialize, Deserialize)]
struct Twin {
    generation: u64,
    blocks: [Vec<u32>; 2],
    /// Blocks of each field's IPv6 top level.
    #[serde(default)]
    v6_blocks: [Vec<u32>; 2],
    bitmaps: (u32, u32),
}

/// The end of the highest leaf the live buffer references in `table` (a scan of every chunk,
/// once per leaf map).
fn scan_watermark(maps: &Maps, table: &LiveTable, tops: &[u32]) -> Result<u32> {
    let mut end = 0;
    for &e in tops {
        if e & dir::CHUNK == 0 {
            continue;
        }
        let Some(chunk) = maps.live_chunk(table, e & !dir::CHUNK) else { continue };
        for &c in &chunk.entries {
            if c & dir::CHUNK != 0 {
                end = end.max(table.leaf_end_scanned(c & !dir::CHUNK)?);
            }
        }
    }
    Ok(end)
}

/// Records where the leaf lines of the tables an install just made live end (the image's own
/// count), so the first batch after a reload does not scan every chunk to find it.
pub(crate) fn record_installed(inst: &Instance, maps: &Maps, image: &xdpfw_rules::compile::Image) {
    if image.tables_reused {
        return;
    }
    let path = inst.state_dir.join(TABLES);
    let mut w: Watermarks = fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    for (field, table) in [&image.src_v4, &image.dst_v4].into_iter().enumerate() {
        w.fields[field] = match (table, maps.live_table(field).ok().and_then(|t| t.leaves_id())) {
            (Some(t), Some(id)) => Some((id, t.lines.len() as u32)),
            _ => None,
        };
    }
    for (field, table) in [&image.src_v6, &image.dst_v6].into_iter().enumerate() {
        w.v6[field] = match (table, maps.live_v6(field).ok().and_then(|t| t.lines_id())) {
            (Some(t), Some(id)) => Some((id, t.lines.len() as u32)),
            _ => None,
        };
    }
    w.twin = None;
    let _ = files::write_unsynced(&path, &serde_json::to_vec(&w).unwrap_or_default());
}

/// Forgets that the inactive buffer is the live one's twin: before anything but the delta path
/// writes it (an install, an attach).
pub(crate) fn forget_twin(inst: &Instance) {
    let path = inst.state_dir.join(TABLES);
    let Some(mut w) = fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Watermarks>(&b).ok()) else {
        let _ = fs::remove_file(&path);
        return;
    };
    if w.twin.take().is_some() && files::write_unsynced(&path, &serde_json::to_vec(&w).unwrap_or_default()).is_err() {
        let _ = fs::remove_file(&path);
    }
}

/// The writes of one field's table.
struct FieldWrites {
    field: usize,
    table: LiveTable,
    tops: Vec<(u16, u32)>,
    fixed_chunks: Vec<(u32, DirBlock)>,
    more_chunks: Vec<(u32, DirBlock)>,
    /// New leaf lines, written from `first_line` on.
    first_line: u32,
    lines: Vec<DirLine>,
}

/// Plans the writes that make `regions` (bitmap ids already the live buffer's, `remap`) what
/// the live table of `field` answers. `Err(reason)` when the shared maps have no room.
fn plan_field(maps: &Maps, field: usize, regions: &[(u16, Region)], remap: &[u32], watermarks: &mut Watermarks) -> Result<std::result::Result<FieldWrites, String>> {
    let t0 = Instant::now();
    let table = maps.live_table(field)?;
    let tops = maps.live_tops(&table);
    tracing::debug!("delta: {} table opened and its top level read in {} us", ["source", "destination"][field], t0.elapsed().as_micros());
    let first_line = match (table.leaves_id(), watermarks.fields[field]) {
        (Some(id), Some((known, next))) if known == id => next,
        (Some(id), _) => {
            let next = scan_watermark(maps, &table, &tops)?;
            watermarks.fields[field] = Some((id, next));
            next
        }
        (None, _) => 0,
    };
    // Chunk slots the live buffer uses: the rest are free (fixed ones are per buffer, but a
    // fixed slot the live buffer uses elsewhere must keep its contents in this copy too).
    let capacity = dir::FIXED_CHUNKS + table.more_capacity();
    let mut used = vec![false; capacity as usize];
    for e in tops.iter().filter(|e| *e & dir::CHUNK != 0) {
        if let Some(u) = used.get_mut((e & !dir::CHUNK) as usize) {
            *u = true;
        }
    }
    let mut free = (0..capacity).filter(|&n| !used[n as usize]);
    let mut new_lines = Vec::new();
    let (mut tops_w, mut fixed_chunks, mut more_chunks) = (Vec::new(), Vec::new(), Vec::new());
    for (top, region) in regions {
        let old = tops[*top as usize];
        let old_chunk = (old & dir::CHUNK != 0).then(|| maps.live_chunk(&table, old & !dir::CHUNK).map(|b| (old & !dir::CHUNK, b))).flatten();
        match region {
            Region::Uniform(id) => {
                let v = remap[*id as usize];
                if v != old {
                    tops_w.push((*top, v));
                }
            }
            Region::Chunk(slots) => {
                let mut block = DirBlock { entries: [0; 256] };
                for (b, slot) in slots.iter().enumerate() {
                    block.entries[b] = match slot {
                        Slot::Value(id) => remap[*id as usize],
                        Slot::Leaf(values) => {
                            let values: [u32; 256] = values.map(|id| remap[id as usize]);
                            let kept = old_chunk.as_ref().map(|(_, ob)| ob.entries[b]).filter(|oe| oe & dir::CHUNK != 0 && table.leaf_values(oe & !dir::CHUNK) == Some(values));
                            match kept {
                                Some(oe) => oe,
                                None => dir::CHUNK | (first_line + push_leaf(&values, &mut new_lines)),
                            }
                        }
                    };
                }
                if old_chunk.as_ref().is_some_and(|(_, ob)| *ob == block) {
                    continue;
                }
                // A fixed chunk is the inactive buffer's own: rewritten in place. A shared one
                // is read by the live buffer: the new one goes to a free slot.
                let n = match old_chunk {
                    Some((n, _)) if n < dir::FIXED_CHUNKS => n,
                    _ => match free.next() {
                        Some(n) => n,
                        None => return Ok(Err(format!("no free chunk slot in the {} table: a reload packs it", ["source", "destination"][field]))),
                    },
                };
                if n < dir::FIXED_CHUNKS {
                    fixed_chunks.push((n, block));
                } else {
                    more_chunks.push((n, block));
                }
                if dir::CHUNK | n != old {
                    tops_w.push((*top, dir::CHUNK | n));
                }
            }
        }
    }
    if !new_lines.is_empty() && first_line as usize + new_lines.len() > table.leaves_capacity() as usize {
        return Ok(Err(format!(
            "the leaf lines of the {} table are used up ({} of {}): a reload packs them",
            ["source", "destination"][field],
            first_line,
            table.leaves_capacity()
        )));
    }
    tracing::debug!("delta: {} table planned in {} us", ["source", "destination"][field], t0.elapsed().as_micros());
    Ok(Ok(FieldWrites { field, table, tops: tops_w, fixed_chunks, more_chunks, first_line, lines: new_lines }))
}

/// The writes of one field's IPv6 table: new lines at the end of its line map, then the new
/// top-level entries of the /16s the batch touches.
struct FieldWrites6 {
    field: usize,
    table: LiveV6,
    tops: Vec<(u16, u32)>,
    first_line: u32,
    lines: Vec<DirLine>,
}

/// Plans the writes that make the /16s of `regions` what the live IPv6 table of `field`
/// answers: each one's subtree built anew past the lines the live buffer references (the
/// recorded watermark). `Err(reason)` when the line map has no room, or its end is not known.
fn plan_field6(maps: &Maps, field: usize, regions: &V6Regions, remap: &[u32], watermarks: &Watermarks) -> Result<std::result::Result<FieldWrites6, String>> {
    let which = ["source", "destination"][field];
    let table = maps.live_v6(field)?;
    let first_line = match (table.lines_id(), watermarks.v6[field]) {
        (Some(id), Some((known, next))) if known == id => next,
        (Some(_), _) => return Ok(Err(format!("where the lines of the {which} IPv6 table end is not recorded: a reload records it"))),
        (None, _) => 0,
    };
    let (entries, lines) = regions.subtrees(remap, first_line)?;
    if !lines.is_empty() && first_line as usize + lines.len() > table.lines_capacity() as usize {
        return Ok(Err(match table.lines_id() {
            Some(_) => format!("the lines of the {which} IPv6 table are used up ({first_line} of {}): a reload packs them", table.lines_capacity()),
            None => format!("the {which} IPv6 table has no line map yet: a reload makes one"),
        }));
    }
    let tops = entries.into_iter().filter(|&(top, e)| e != maps.live_v6_top(&table, top)).collect();
    Ok(Ok(FieldWrites6 { field, table, tops, first_line, lines }))
}

fn us(d: std::time::Duration) -> u64 {
    d.as_micros() as u64
}

/// The delta path (see the module's notes), with the instance's lock held. `NotApplicable`
/// leaves everything as it was.
pub(crate) fn try_set_update(inst: &Instance, name: &str, op: SetOp, prefixes: &[IpNet], opts: &ReloadOptions, total: Instant, mut times: ReloadTimes) -> Result<Outcome> {
    let not = |why: &str| Ok(Outcome::NotApplicable(why.to_string()));
    if op == SetOp::Replace {
        return not("a replace names the whole set");
    }
    if std::env::var_os("XDPFW_SET_RELOAD").is_some() {
        return not("XDPFW_SET_RELOAD is set");
    }
    let t = Instant::now();
    let state = inst.state()?;
    if state.ruleset.path.is_none() {
        return not("the live ruleset is built in");
    }
    if state.ruleset.bitmaps == 0 {
        return not("the live ruleset was installed by an earlier version (its bitmap count is not recorded)");
    }
    let history = inst.history();
    let journal = history.journal()?;
    let Some(ctx) = context(inst, &state, &journal)? else {
        return not("the live ruleset is not its snapshot's texts with the set journal");
    };
    let Some(set_id) = ctx.sets.get(name) else {
        return not("no such set");
    };
    tracing::debug!("delta: state, journal and context read in {} us", t.elapsed().as_micros());
    let index = Index::<u64>::open(&index_path(inst, set_id))?;
    let index6 = match ctx.v6_sets.contains(name) {
        true => Some(Index::<Key6>::open(&index_path6(inst, set_id))?),
        false => None,
    };
    let mut new_journal = journal.clone();
    let mut edit: SetEdit = new_journal.sets.entry(name.to_string()).or_default().record(name, op == SetOp::Add, prefixes, |p| match p {
        IpNet::V4(n) => index.contains(key(n)),
        IpNet::V6(n) => index6.as_ref().is_some_and(|i| i.contains(key6(n))),
    });
    new_journal.prune();
    if !edit.changed() {
        return Ok(Outcome::Done(Box::new(SetReport { iface: inst.iface.clone(), op: op.to_string(), edit, reload: None, edit_us: us(t.elapsed()), path: "delta".into(), why_reload: None })));
    }
    if new_journal.len() > MAX_JOURNAL_PREFIXES {
        return not("the set journal is full");
    }
    let Some(tops) = tops_of(prefixes) else {
        return not(&format!("the batch touches more than {MAX_REGIONS} /16s of a table"));
    };
    let new_hash = journaled_hash(&ctx.text_hash, &new_journal, |n| ctx.sets.contains_key(n));
    times.parse_us = us(t.elapsed());
    let edit_us = times.parse_us;

    // The touched /16s of every field whose rules name the set, recomputed.
    let t = Instant::now();
    let mut sets = RegionSets::default();
    let mut region_sets: HashMap<String, Arc<Vec<IpNet>>> = HashMap::new();
    let mut computed = Vec::new();
    for (field, rules) in ctx.fields.iter().enumerate() {
        let Some(rules) = rules else { continue };
        if !rules.iter().flatten().any(|l| l.names(name)) {
            continue;
        }
        for set in rules.iter().flatten().flat_map(Lists::set_names) {
            if region_sets.contains_key(set) {
                continue;
            }
            let Some(v) = sets.get(inst, &ctx, &new_journal, set, &tops)? else { return not("a rule names a set the context lacks") };
            region_sets.insert(set.clone(), v);
        }
        let lists: Vec<Option<AddrList>> = rules.iter().map(|r| r.as_ref().map(|l| l.with(&|n| region_sets.get(n).cloned().unwrap_or_default()))).collect();
        let refs: Vec<Option<&AddrList>> = lists.iter().map(Option::as_ref).collect();
        let v4 = match tops.v4.is_empty() {
            true => None,
            false => Some(v4_regions(&refs, &tops.v4)?),
        };
        let v6 = (!tops.v6.is_empty()).then(|| v6_regions(&refs, &tops.v6));
        computed.push((field, v4, v6));
    }
    tracing::debug!("delta: regions computed in {} us", t.elapsed().as_micros());

    // The writes, planned in full before anything is written.
    let mut maps = Maps::open(&inst.pin_dir)?;
    let previous = maps.generation();
    let (generation, live) = (previous + 1, buffer_of(previous));
    let buffer = buffer_of(generation);
    if state.generation != previous {
        return not("the live generation is not the recorded one (a change in flight when a process died)");
    }
    tracing::debug!("delta: maps opened in {} us", t.elapsed().as_micros());
    let mut bitmaps = maps.bitmaps(live, state.ruleset.bitmaps);
    let mut ids: HashMap<Bitmap, u32> = HashMap::with_capacity(bitmaps.len());
    for (i, b) in bitmaps.iter().enumerate() {
        ids.entry(*b).or_insert(i as u32);
    }
    let first_new = bitmaps.len() as u32;
    let watermarks_path = inst.state_dir.join(TABLES);
    let mut watermarks: Watermarks = fs::read(&watermarks_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let (mut writes, mut writes6) = (Vec::new(), Vec::new());
    for (field, v4, v6) in computed {
        // The live buffer's id of each bitmap the regions name (new bitmaps after its own).
        let mut remap = |list: &[Bitmap]| -> Vec<u32> {
            list.iter()
                .map(|b| {
                    *ids.entry(*b).or_insert_with(|| {
                        bitmaps.push(*b);
                        bitmaps.len() as u32 - 1
                    })
                })
                .collect()
        };
        let v4 = v4.map(|(list, regions)| (remap(&list), regions));
        let v6 = v6.map(|r| (remap(&r.bitmaps), r));
        if bitmaps.len() > MAX_BITMAPS as usize {
            return not("the buffer's bitmaps are used up");
        }
        if let Some((remap, regions)) = v4 {
            match plan_field(&maps, field, &regions, &remap, &mut watermarks)? {
                Ok(w) => writes.push(w),
                Err(why) => return not(&why),
            }
        }
        if let Some((remap, regions)) = v6 {
            match plan_field6(&maps, field, &regions, &remap, &watermarks)? {
                Ok(w) => writes6.push(w),
                Err(why) => return not(&why),
            }
        }
    }
    times.compile_us = us(t.elapsed());

    // The snapshot of what goes live exists before the flip, so a `set` killed after the flip
    // leaves the live ruleset's snapshot for the next one to start from.
    let snapshot = match history.derive_snapshot(&state.ruleset.hash, &new_hash, &new_journal) {
        Ok(s) => s,
        Err(e) => return not(&format!("the live ruleset's snapshot cannot be copied: {e}")),
    };

    // From here on the inactive buffer is written. A grace period first if a reload that died
    // after its flip (or failed before it) left it uncleared: then it is nobody's twin.
    let t = Instant::now();
    if maps.header(buffer).generation != 0 {
        watermarks.twin = None;
        grace::wait(opts.min_grace);
        maps.clear(buffer)?;
    }
    // The new lines are reserved before they are written: a crash after this leaks them, never
    // hands them out twice.
    for w in &writes {
        if let Some(id) = w.table.leaves_id() {
            watermarks.fields[w.field] = Some((id, w.first_line + w.lines.len() as u32));
        }
    }
    for w in &writes6 {
        if let Some(id) = w.table.lines_id() {
            watermarks.v6[w.field] = Some((id, w.first_line + w.lines.len() as u32));
        }
    }
    // The inactive buffer is made a copy of the live one: by the parts the last delta wrote
    // when it is that delta's twin, else whole.
    let twin = watermarks.twin.take().filter(|t| t.generation == previous && t.bitmaps.1 == first_new);
    files::write_unsynced(&watermarks_path, &serde_json::to_vec(&watermarks).unwrap_or_default())?;
    let slot_changes = match &twin {
        Some(t) => {
            maps.copy_live_parts(buffer, [&t.blocks[0], &t.blocks[1]], [&t.v6_blocks[0], &t.v6_blocks[1]], t.bitmaps.0..t.bitmaps.1)?;
            0
        }
        None => maps.copy_live_into(buffer, first_new)?,
    };
    tracing::debug!("delta: inactive buffer made a copy ({}) in {} us", if twin.is_some() { "the last delta's parts" } else { "whole" }, t.elapsed().as_micros());
    // What this delta writes: the parts that make the buffer it retires its twin.
    let mut written: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    for w in &writes {
        let blocks = &mut written[w.field];
        blocks.extend(w.tops.iter().map(|(top, _)| u32::from(*top) / dir::CHUNK_ENTRIES));
        blocks.extend(w.fixed_chunks.iter().map(|(n, _)| dir::TOP_BLOCKS + n));
        blocks.sort_unstable();
        blocks.dedup();
    }
    let mut written6: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    for w in &writes6 {
        let blocks = &mut written6[w.field];
        blocks.extend(w.tops.iter().map(|(top, _)| u32::from(*top) / 256));
        blocks.sort_unstable();
        blocks.dedup();
    }
    let next_twin = Twin { generation, blocks: written, v6_blocks: written6, bitmaps: (first_new, bitmaps.len() as u32) };
    times.install_arrays_us = us(t.elapsed());
    let t = Instant::now();
    for w in &mut writes {
        if !w.lines.is_empty() {
            w.table.write_lines(w.first_line, &w.lines)?;
        }
        for (n, block) in &w.more_chunks {
            w.table.write_more_chunk(*n, block)?;
        }
        for (n, block) in &w.fixed_chunks {
            maps.write_fixed_chunk(buffer, w.field, *n, block);
        }
        for (top, v) in &w.tops {
            maps.write_top(buffer, w.field, *top, *v);
        }
    }
    for w in &mut writes6 {
        if !w.lines.is_empty() {
            w.table.write_lines(w.first_line, &w.lines)?;
        }
        for (top, v) in &w.tops {
            maps.write_v6_top(buffer, w.field, *top, *v);
        }
    }
    maps.write_bitmaps(buffer, first_new, &bitmaps[first_new as usize..])?;
    let header = maps.header(live);
    maps.publish_header(buffer, generation, header);
    times.install_tables_us = us(t.elapsed());
    times.slot_changes = slot_changes;

    // The ruleset's self-tests, on what goes live: the probe reads the inactive buffer.
    if ctx.tests > 0 {
        let t = Instant::now();
        match prove(inst, &state, &ctx, &new_journal, &mut sets)? {
            Ok(n) => times.self_tests = n,
            Err(Proof::Cannot(why)) => return not(&why),
            Err(Proof::Failed(e)) => return Err(e),
        }
        times.prove_us = us(t.elapsed());
    }

    // Durable before it goes live.
    history.store_journal(&new_journal)?;
    edit.size = None;
    let summary = {
        let mut s = state.ruleset.clone();
        s.hash = new_hash.clone();
        s.bitmaps = bitmaps.len() as u32;
        s.prefixes = (s.prefixes + edit.added).saturating_sub(edit.removed);
        s
    };
    let result = go_live(inst, &mut maps, &state, summary, generation, opts, times, total, &ctx, &new_journal);
    let path = state.ruleset.path.clone().unwrap_or_default();
    let result = result.map(|report| {
        // The retired buffer is cleared: this delta's twin (a failure to say so costs the next
        // batch a whole copy).
        watermarks.twin = Some(next_twin);
        let _ = files::write_unsynced(&watermarks_path, &serde_json::to_vec(&watermarks).unwrap_or_default());
        let synced = history.sync_snapshot(&new_hash).map(|()| snapshot).map_err(|e| e.to_string());
        (report, synced)
    });
    let history_result = match result {
        Ok((report, snapshot)) => {
            let entry = history::Entry::applied(history::Operation::Set, generation, report.ruleset.version.clone(), &new_hash, &path, snapshot, Some(report.times.clone()));
            if let Err(e) = history.append(&entry) {
                tracing::warn!("could not record the set change in {}: {e}", history.dir().display());
            }
            Ok(report)
        }
        Err(e) => {
            if inst.state().is_ok_and(|s| s.ruleset.hash != new_hash)
                && let Err(e) = history.store_journal(&journal)
            {
                tracing::error!("the set change did not go live, and the set journal could not be put back: {e}");
            }
            let entry = history::Entry {
                time: now_secs(),
                result: history::Outcome::Failed,
                action: history::Operation::Set,
                generation: None,
                version: None,
                hash: None,
                source: path,
                snapshot: None,
                error: Some(e.to_string()),
                times: None,
            };
            let _ = history.append(&entry);
            Err(e)
        }
    };
    let report = history_result?;
    Ok(Outcome::Done(Box::new(SetReport { iface: inst.iface.clone(), op: op.to_string(), edit, reload: Some(report), edit_us, path: "delta".into(), why_reload: None })))
}

enum Proof {
    /// The delta path cannot prove these self-tests (the reload path can).
    Cannot(String),
    Failed(ControlError),
}

/// Runs the ruleset's self-tests through the probe on the inactive buffer, with the reference
/// matcher's verdicts from the rules alone (parsed with every set file empty) and each set's
/// prefixes that overlap the test packets' /16s (from the indexes and `journal`): an address's
/// verdict depends only on the prefixes that contain it. Returns how many ran.
fn prove(inst: &Instance, state: &State, ctx: &Context, journal: &SetJournal, sets: &mut RegionSets) -> Result<std::result::Result<usize, Proof>> {
    let snapshot = inst.history().dir().join("snapshots").join(&state.ruleset.hash).join("rules.toml");
    let Some((text, files)) = history::snapshot_texts_without(&snapshot, &|f| ctx.set_files.iter().any(|s| s == f))? else {
        return Ok(Err(Proof::Cannot("the live ruleset has no snapshot".into())));
    };
    let mut rs = xdpfw_rules::parse_with_sets(&state.ruleset.path.clone().unwrap_or_default(), &text, &files)?;
    let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
    for t in &rs.tests {
        for a in [t.packet.src, t.packet.dst] {
            match a {
                std::net::IpAddr::V4(a) => v4.insert((u32::from(a) >> 16) as u16),
                std::net::IpAddr::V6(a) => v6.insert((u128::from(a) >> 112) as u16),
            };
        }
    }
    let tops = Tops { v4: v4.into_iter().collect(), v6: v6.into_iter().collect() };
    let names: Vec<String> = rs.sets.keys().cloned().collect();
    for name in names {
        let Some(v) = sets.get(inst, ctx, journal, &name, &tops)? else { return Ok(Err(Proof::Cannot(format!("set \"{name}\" is not in the context")))) };
        for rule in &mut rs.rules {
            for list in [rule.src.as_mut(), rule.dst.as_mut()].into_iter().flatten() {
                let (own, except) = (&mut list.sets, list.except.as_deref_mut().map(|e| &mut e.sets));
                for (n, set) in own.iter_mut().chain(except.into_iter().flatten()) {
                    if *n == name {
                        *set = v.clone();
                    }
                }
            }
        }
        rs.sets.insert(name, v);
    }
    let mut probe = xdpfw_kernel::open_probe(&inst.pin_dir)?;
    let mut run = |pkt: &xdpfw_rules::packet::PacketSpec| xdpfw_kernel::testrun::run_probe(&mut probe, pkt);
    let failures = xdpfw_rules::selftest::self_test_failures(&rs, Some(&mut run))?;
    if !failures.is_empty() {
        return Ok(Err(Proof::Failed(ControlError::SelfTests {
            file: state.ruleset.path.clone().unwrap_or_default(),
            failures: xdpfw_rules::selftest::SelfTestFailures { total: rs.tests.len(), failures },
        })));
    }
    Ok(Ok(rs.tests.len()))
}

/// Flip, grace, carry the retired counters, clear, record: the end of a reload, for a buffer the
/// delta path wrote.
#[expect(clippy::too_many_arguments, reason = "the pipeline's state, handed on")]
fn go_live(
    inst: &Instance,
    maps: &mut Maps,
    state: &State,
    summary: crate::instance::RulesetSummary,
    generation: u64,
    opts: &ReloadOptions,
    mut times: ReloadTimes,
    total: Instant,
    ctx: &Context,
    journal: &SetJournal,
) -> Result<ReloadReport> {
    let previous = generation - 1;
    let mut next = state.clone();
    let (old_rules, old_carried) = (next.ruleset.rules.clone(), std::mem::take(&mut next.carried));
    next.carried = crate::instance::carry(&old_carried, &[], &[], &summary.rules);
    next.retiring = Some(crate::instance::Retiring { generation: previous, rules: old_rules.clone() });
    next.generation = generation;
    next.ruleset = summary.clone();
    inst.write_state_file_unsynced(&format!("next-{generation}.json"), &next)?;

    let described = tables_cache::live_summary(inst, maps);
    let t = Instant::now();
    maps.flip(generation)?;
    times.flip_us = us(t.elapsed());
    times.to_flip_us = us(total.elapsed());
    // The live tables are described again for a reload to reuse: the key of the texts with
    // the new journal, and every bitmap (the new ones come after the fields').
    if let Some(mut s) = described {
        s.bitmaps = summary.bitmaps;
        let key = context_key(ctx, journal);
        if let Err(e) = tables_cache::record(inst, generation, &s, &key, false) {
            tracing::warn!("the address tables of generation {generation} could not be described for reuse: {e}");
        }
    }

    crate::pipeline::retire(inst, maps, crate::pipeline::Flipped { next, old_carried, old_rules, previous, generation }, opts, times, total, Vec::new(), |_| {})
}

/// The address key ([`tables_cache::address_key`]) of the context's texts with `journal`.
fn context_key(ctx: &Context, journal: &SetJournal) -> Vec<u8> {
    let id_of = |name: &str| -> Option<[u8; 32]> {
        let id = unhex(ctx.sets.get(name)?)?;
        Some(match journal.sets.get(name).filter(|c| !c.is_empty()) {
            Some(c) => changed_set_id(&id, &c.digest()),
            None => id,
        })
    };
    let empty = Arc::new(Vec::new());
    let lists = |f: usize| -> Vec<Option<AddrList>> {
        match &ctx.fields[f] {
            None => vec![None; ctx.rules],
            Some(rules) => rules.iter().map(|r| r.as_ref().map(|l| tables_cache::light_list(&l.with(&|_| empty.clone()), &id_of))).collect(),
        }
    };
    tables_cache::light_key(&lists(0), &lists(1))
}
