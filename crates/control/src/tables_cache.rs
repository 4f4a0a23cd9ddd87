//! Compiled address tables kept across reloads (issue 11): the live buffer's tables are reused
//! by a reload whose address inputs ([`rules::compile::address_key`]) equal those the live
//! tables were compiled from, so changing a port rule beside a 1M-prefix set neither compiles
//! nor installs the set again.
//!
//! The cache is the live buffer itself: nothing but its description is stored, in the
//! instance's private state folder: `tables.key` (a nonce, then the exact address key) and
//! `tables.json` (the generation whose buffer holds those tables, the key's nonce, and the
//! address stage's summary). The description is valid only while the live generation is the
//! one it names, so a reload that failed before its flip keeps it valid, one that flipped but
//! died before recording makes it stale (a different generation), and an attach (a new set of
//! maps, generation 1 again) removes it first. Whatever changes the live tables in place must
//! [`forget`] it first. The key file is compared byte for byte: equal keys mean equal inputs.
//! The key ([`address_key`]) names each set by its content id ([`Ruleset::set_ids`]: SHA-256
//! of its inline prefixes and of its file's SHA-256), not by its prefixes, so it is a few hundred
//! bytes however large the sets are, and building it costs nothing beside a 1M-prefix set; a
//! set's id is the digest the ruleset hash already trusts for it. Both files are written without
//! fsync: a crash of the machine loses the maps too (they live in bpffs), and the attach after
//! it starts without a description.

use std::{fs, path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};
use xdpfw_common::buffer_of;
use xdpfw_kernel::Maps;
use xdpfw_rules::{
    Ruleset,
    compile::{AddrSummary, Reuse},
};

use crate::{error::Result, files, instance::Instance};

/// The address key of `rs`: [`xdpfw_rules::compile::address_key`] of the ruleset with each
/// set's prefixes replaced by a stand-in made of its content id (two /128s), after a prefix of
/// its own, so the key keeps the compiler's own account of what the address stage reads (the
/// rule count, each rule's prefixes, exclusions and set names) without encoding a million
/// prefixes. A ruleset with a set lacking an id (none the parser makes) gets the plain key.
pub(crate) fn address_key(rs: &Ruleset) -> Vec<u8> {
    if rs.sets.keys().any(|name| !rs.set_ids.contains_key(name)) {
        return xdpfw_rules::compile::address_key(rs);
    }
    let light = |l: &Option<xdpfw_rules::AddrList>| l.as_ref().map(|l| light_list(l, &|name| rs.set_ids.get(name).copied()));
    let src: Vec<Option<xdpfw_rules::AddrList>> = rs.rules.iter().map(|r| light(&r.src)).collect();
    let dst: Vec<Option<xdpfw_rules::AddrList>> = rs.rules.iter().map(|r| light(&r.dst)).collect();
    light_key(&src, &dst)
}

/// The address key of rules whose conditions are `src[i]` and `dst[i]`, their sets' contents
/// already the stand-ins of their ids ([`light_list`]).
pub(crate) fn light_key(src: &[Option<xdpfw_rules::AddrList>], dst: &[Option<xdpfw_rules::AddrList>]) -> Vec<u8> {
    fn refs(v: &[Option<xdpfw_rules::AddrList>]) -> Vec<Option<&xdpfw_rules::AddrList>> {
        v.iter().map(Option::as_ref).collect()
    }
    let mut key = b"xdpfw-addr-ids-1\0".to_vec();
    key.extend_from_slice(&xdpfw_rules::compile::address_key_of(&refs(src), &refs(dst), 0));
    key
}

/// `list` with each set's prefixes replaced by the stand-in of its content id (`id_of`: two
/// /128s made of it; a set without an id keeps its prefixes).
pub(crate) fn light_list(list: &xdpfw_rules::AddrList, id_of: &dyn Fn(&str) -> Option<[u8; 32]>) -> xdpfw_rules::AddrList {
    let stand_in = |id: &[u8; 32]| {
        let half = |b: &[u8]| ipnet::IpNet::V6(ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap_or_default()), 128).unwrap_or_default());
        Arc::new(vec![half(&id[..16]), half(&id[16..])])
    };
    let replace = |l: &xdpfw_rules::AddrList| xdpfw_rules::AddrList {
        inline: l.inline.clone(),
        sets: l.sets.iter().map(|(name, set)| (name.clone(), id_of(name).map_or_else(|| set.clone(), |id| stand_in(&id)))).collect(),
        except: None,
    };
    xdpfw_rules::AddrList { except: list.except.as_deref().map(|e| Box::new(replace(e))), ..replace(list) }
}

#[derive(Serialize, Deserialize)]
struct Description {
    generation: u64,
    nonce: u64,
    summary: AddrSummary,
}

fn key_path(inst: &Instance) -> PathBuf {
    inst.state_dir.join("tables.key")
}

fn description_path(inst: &Instance) -> PathBuf {
    inst.state_dir.join("tables.json")
}

/// The reuse the live buffer offers to a ruleset of address key `key`, if its tables were
/// compiled from that key: the summary, and the address bitmaps read back from the buffer.
/// Call with the instance's lock held, and install before releasing it.
pub(crate) fn reuse_for(inst: &Instance, maps: &Maps, key: &[u8]) -> Option<Reuse> {
    let description: Description = serde_json::from_slice(&fs::read(description_path(inst)).ok()?).ok()?;
    let live = maps.generation();
    if description.generation != live || maps.header(buffer_of(live)).generation != live {
        return None;
    }
    let stored = fs::read(key_path(inst)).ok()?;
    let (nonce, stored_key) = stored.split_at_checked(8)?;
    if u64::from_le_bytes(nonce.try_into().ok()?) != description.nonce || stored_key != key {
        return None;
    }
    let bitmaps = maps.bitmaps(buffer_of(live), description.summary.bitmaps);
    Some(Reuse { summary: description.summary, bitmaps })
}

/// Records that `generation` (live now) holds the tables of address key `key`. With
/// `key_unchanged` (the tables were shared, so the key file already holds `key`), only the
/// description is rewritten, keeping the key file's nonce.
pub(crate) fn record(inst: &Instance, generation: u64, summary: &AddrSummary, key: &[u8], key_unchanged: bool) -> Result<()> {
    let old_nonce = || -> Option<u64> {
        let d: Description = serde_json::from_slice(&fs::read(description_path(inst)).ok()?).ok()?;
        Some(d.nonce)
    };
    let nonce = match key_unchanged.then(old_nonce).flatten() {
        Some(n) => n,
        None => {
            // Any value unlike the last one will do: it ties the description to this key file.
            let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64) ^ u64::from(std::process::id()) << 40;
            let mut bytes = Vec::with_capacity(8 + key.len());
            bytes.extend_from_slice(&n.to_le_bytes());
            bytes.extend_from_slice(key);
            files::write_unsynced(&key_path(inst), &bytes)?;
            n
        }
    };
    let description = Description { generation, nonce, summary: summary.clone() };
    files::write_unsynced(&description_path(inst), &serde_json::to_vec(&description).unwrap_or_default())
}

/// The summary of the live tables' compile, when they are described (by the live generation).
pub(crate) fn live_summary(inst: &Instance, maps: &Maps) -> Option<AddrSummary> {
    let description: Description = serde_json::from_slice(&fs::read(description_path(inst)).ok()?).ok()?;
    (description.generation == maps.generation()).then_some(description.summary)
}

/// Makes the live tables undescribed: before anything changes them in place, and before an
/// attach makes new maps.
pub(crate) fn forget(inst: &Instance) {
    let _ = fs::remove_file(description_path(inst));
}
