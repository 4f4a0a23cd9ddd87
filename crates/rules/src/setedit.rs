//! Incremental changes to named sets (`loader set add|del|replace|reset`), kept as the
//! instance's **set journal**: per set, the prefixes added and deleted (or the exact contents a
//! `replace` gave), net of one another. The journal is applied on top of every ruleset the
//! instance loads (a reload of the rules file, a rollback, `attach --last-good`), so a change
//! stands until `loader set` changes it again or `loader set reset` drops it; the rules file
//! and the set files on disk are never modified.
//!
//! A ruleset with changes applied has its own identity: each changed set's content id becomes
//! `SHA-256(id, changes)` and the ruleset hash `SHA-256(hash, each changed set's changes)`, both
//! pure functions of the texts and the journal, so the same file with the same journal hashes
//! alike whoever loads it (a reload, the fast path of `loader set`, a restart).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{Ruleset, parse_cidr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetOp {
    /// Add the prefixes not yet in the set.
    Add,
    /// Remove the prefixes that are in the set.
    Del,
    /// The set holds exactly these prefixes afterwards.
    Replace,
}

impl std::fmt::Display for SetOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Add => "add",
            Self::Del => "del",
            Self::Replace => "replace",
        })
    }
}

/// What a change did to the set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetEdit {
    pub set: String,
    pub added: usize,
    pub removed: usize,
    /// Prefixes to add that were in the set already.
    pub present: usize,
    /// Prefixes to delete that were not in the set.
    pub absent: usize,
    /// The set's prefixes after the change (`None` where the fast path did not count them).
    pub size: Option<usize>,
}

impl SetEdit {
    pub fn changed(&self) -> bool {
        self.added + self.removed > 0
    }
}

/// Reads prefixes one a line ('#' comments, blank lines), as a set file is read.
pub fn parse_prefix_lines(text: &str) -> Result<Vec<IpNet>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let body = line.split('#').next().unwrap_or("").trim();
        if !body.is_empty() {
            out.push(parse_cidr(body).map_err(|e| format!("line {}: {e}", i + 1))?);
        }
    }
    Ok(out)
}

/// The changes of one set, net: `added` and `deleted` never share a prefix. The set's contents
/// are `(replace, or what the ruleset gives) ∪ added − deleted`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace: Option<BTreeSet<IpNet>>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub added: BTreeSet<IpNet>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub deleted: BTreeSet<IpNet>,
}

impl SetChanges {
    pub fn is_empty(&self) -> bool {
        self.replace.is_none() && self.added.is_empty() && self.deleted.is_empty()
    }

    /// Prefixes the changes name (what a journal's size is bounded by).
    pub fn len(&self) -> usize {
        self.replace.as_ref().map_or(0, BTreeSet::len) + self.added.len() + self.deleted.len()
    }

    /// Whether `p` is in the set, `in_base` telling whether the ruleset's own contents hold it.
    pub fn contains(&self, p: &IpNet, in_base: impl Fn(&IpNet) -> bool) -> bool {
        if self.added.contains(p) {
            return true;
        }
        if self.deleted.contains(p) {
            return false;
        }
        match &self.replace {
            Some(r) => r.contains(p),
            None => in_base(p),
        }
    }

    /// Records a batch of adds or deletes; `in_base` as for [`Self::contains`]. Only prefixes
    /// whose membership changes are recorded, so adding a present prefix or deleting an absent
    /// one leaves the journal as it was. A replace is [`Self::replace_with`].
    pub fn record(&mut self, name: &str, add: bool, prefixes: &[IpNet], in_base: impl Fn(&IpNet) -> bool) -> SetEdit {
        let mut edit = SetEdit { set: name.to_string(), ..Default::default() };
        let mut seen = HashSet::new();
        for p in prefixes {
            if !seen.insert(*p) || self.contains(p, &in_base) == add {
                *(if add { &mut edit.present } else { &mut edit.absent }) += 1;
                continue;
            }
            let in_own = match &self.replace {
                Some(r) => r.contains(p),
                None => in_base(p),
            };
            // An entry only where the set differs from its own contents.
            let (into, from) = if add { (&mut self.added, &mut self.deleted) } else { (&mut self.deleted, &mut self.added) };
            from.remove(p);
            if in_own != add {
                into.insert(*p);
            }
            *(if add { &mut edit.added } else { &mut edit.removed }) += 1;
        }
        edit
    }

    /// Makes the set hold exactly `new`; `current` is what it holds now (with these changes).
    pub fn replace_with(&mut self, name: &str, new: &[IpNet], current: &[IpNet]) -> SetEdit {
        let new: BTreeSet<IpNet> = new.iter().copied().collect();
        let current: HashSet<IpNet> = current.iter().copied().collect();
        let edit = SetEdit {
            set: name.to_string(),
            added: new.iter().filter(|p| !current.contains(p)).count(),
            removed: current.iter().filter(|p| !new.contains(p)).count(),
            size: Some(new.len()),
            ..Default::default()
        };
        if edit.changed() {
            *self = Self { replace: Some(new), ..Default::default() };
        }
        edit
    }

    /// The set's contents with these changes, from the ruleset's own `base`. One pass over the
    /// base, looking each prefix up among the changes only (a set of 1M prefixes with a few
    /// thousand changes: no table of the million is built). The tables keep std's randomly
    /// keyed hasher: the changes come from ban feeds, which must not be able to pick colliding
    /// prefixes.
    pub fn apply(&self, base: &[IpNet]) -> Vec<IpNet> {
        let deleted: HashSet<IpNet> = self.deleted.iter().copied().collect();
        let mut out: Vec<IpNet> = match &self.replace {
            Some(r) => r.iter().copied().filter(|p| !deleted.contains(p)).collect(),
            None if deleted.is_empty() => base.to_vec(),
            None => base.iter().copied().filter(|p| !deleted.contains(p)).collect(),
        };
        // The added prefixes the contents lack already.
        let mut fresh: HashSet<IpNet> = self.added.iter().copied().collect();
        for p in &out {
            if fresh.is_empty() {
                break;
            }
            fresh.remove(p);
        }
        out.extend(self.added.iter().copied().filter(|p| fresh.contains(p)));
        out
    }

    /// SHA-256 of the changes, canonical (sorted prefixes, each as family, length, address).
    pub fn digest(&self) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update(b"xdpfw-set-changes-1\0");
        let put = |h: &mut sha2::Sha256, tag: u8, nets: &BTreeSet<IpNet>| {
            h.update([tag]);
            h.update((nets.len() as u64).to_le_bytes());
            for n in nets {
                match n {
                    IpNet::V4(n) => {
                        h.update([4, n.prefix_len()]);
                        h.update(n.network().octets());
                    }
                    IpNet::V6(n) => {
                        h.update([6, n.prefix_len()]);
                        h.update(n.network().octets());
                    }
                }
            }
        };
        match &self.replace {
            None => h.update([0]),
            Some(r) => put(&mut h, 1, r),
        }
        put(&mut h, 2, &self.added);
        put(&mut h, 3, &self.deleted);
        h.finalize().into()
    }
}

/// The changes of every set that has any.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetJournal {
    #[serde(default)]
    pub sets: BTreeMap<String, SetChanges>,
}

/// Most prefixes a journal names: each batch rewrites it, and every load applies it.
pub const MAX_JOURNAL_PREFIXES: usize = 1 << 20;

impl SetJournal {
    pub fn is_empty(&self) -> bool {
        self.sets.values().all(SetChanges::is_empty)
    }

    pub fn len(&self) -> usize {
        self.sets.values().map(SetChanges::len).sum()
    }

    /// Drops sets left without changes.
    pub fn prune(&mut self) {
        self.sets.retain(|_, c| !c.is_empty());
    }

    /// Applies the journal to `rs`: each changed set's prefixes (in the set and in every rule
    /// that names it), its content id and the ruleset hash ([`journaled_hash`]). Returns the
    /// names of sets with changes that `rs` does not have (their changes wait for a ruleset
    /// that has them).
    pub fn apply(&self, rs: &mut Ruleset) -> Vec<String> {
        let mut missing = Vec::new();
        for (name, changes) in self.sets.iter().filter(|(_, c)| !c.is_empty()) {
            let Some(base) = rs.sets.get(name) else {
                missing.push(name.clone());
                continue;
            };
            let new = std::sync::Arc::new(changes.apply(base));
            if let Some(id) = rs.set_ids.get_mut(name) {
                *id = changed_set_id(id, &changes.digest());
            }
            for rule in &mut rs.rules {
                for list in [rule.src.as_mut(), rule.dst.as_mut()].into_iter().flatten() {
                    let (own, except) = (&mut list.sets, list.except.as_deref_mut().map(|e| &mut e.sets));
                    for (n, set) in own.iter_mut().chain(except.into_iter().flatten()) {
                        if n == name {
                            *set = new.clone();
                        }
                    }
                }
            }
            rs.sets.insert(name.clone(), new);
        }
        let sets = rs.sets.clone();
        let hash = journaled_hash(&rs.hash, self, |n| sets.contains_key(n));
        if hash != rs.hash {
            rs.hash = hash;
            rs.sources.journal = Some(std::sync::Arc::new(self.clone()));
        }
        missing
    }
}

/// The hash of a ruleset whose texts hash to `text_hash` with `journal` applied: `text_hash`
/// itself when no set it has (`has_set`) has changes.
pub fn journaled_hash(text_hash: &str, journal: &SetJournal, has_set: impl Fn(&str) -> bool) -> String {
    let mut hash = sha2::Sha256::new();
    hash.update(b"xdpfw-journal-1\0");
    hash.update(text_hash.as_bytes());
    let mut any = false;
    for (name, changes) in journal.sets.iter().filter(|(n, c)| !c.is_empty() && has_set(n)) {
        any = true;
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
        hash.update(changes.digest());
    }
    if !any {
        return text_hash.to_string();
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The content id of a set whose id was `id` before `changes` (digest) were applied.
pub fn changed_set_id(id: &[u8; 32], changes_digest: &[u8; 32]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(b"xdpfw-set-journal-1\0");
    h.update(id);
    h.update(changes_digest);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(set_text: &str) -> Ruleset {
        let rules = "default = \"pass\"\n[sets.bad]\nfile = \"bad.txt\"\nprefixes = [\"198.51.100.0/24\"]\n[sets.other]\nprefixes = [\"192.0.2.0/24\"]\n[[rule]]\nname = \"block\"\naction = \"drop\"\nsrc = [\"@bad\", \"!@other\"]\n";
        crate::parse_with_sets(std::path::Path::new("/etc/xdpfw/rules.toml"), rules, &[("bad.txt".into(), set_text.into())]).unwrap()
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|s| parse_cidr(s).unwrap()).collect()
    }

    fn record(j: &mut SetJournal, rs: &Ruleset, name: &str, add: bool, p: &[&str]) -> SetEdit {
        let base: HashSet<IpNet> = rs.sets[name].iter().copied().collect();
        let e = j.sets.entry(name.into()).or_default().record(name, add, &nets(p), |p| base.contains(p));
        j.prune();
        e
    }

    fn sorted(v: &[IpNet]) -> Vec<IpNet> {
        let mut v = v.to_vec();
        v.sort();
        v
    }

    #[test]
    fn adds_and_deletes_are_net_and_applied_everywhere() {
        let rs = live("# feed\n203.0.113.1\n");
        let mut j = SetJournal::default();
        let e = record(&mut j, &rs, "bad", true, &["203.0.113.1", "203.0.113.2", "203.0.113.2", "198.51.100.0/24"]);
        assert_eq!((e.added, e.present), (1, 3));
        let e = record(&mut j, &rs, "bad", false, &["203.0.113.1", "203.0.113.9"]);
        assert_eq!((e.removed, e.absent), (1, 1));
        assert_eq!(j.sets["bad"].added, nets(&["203.0.113.2"]).into_iter().collect());
        assert_eq!(j.sets["bad"].deleted, nets(&["203.0.113.1"]).into_iter().collect());

        let mut new = rs.clone();
        assert!(j.apply(&mut new).is_empty());
        assert_eq!(sorted(&new.sets["bad"]), sorted(&nets(&["198.51.100.0/24", "203.0.113.2"])));
        // Every rule naming the set sees the new contents (the matcher and compiler read those).
        let src = new.rules[0].src.as_ref().unwrap();
        assert!(std::sync::Arc::ptr_eq(&src.sets[0].1, &new.sets["bad"]));
        assert_ne!(new.hash, rs.hash);
        assert_ne!(new.set_ids["bad"], rs.set_ids["bad"]);
        assert_eq!(new.set_ids["other"], rs.set_ids["other"]);

        // The same texts with the same journal hash alike; undoing every change is the original.
        let mut again = rs.clone();
        j.apply(&mut again);
        assert_eq!(again.hash, new.hash);
        record(&mut j, &rs, "bad", true, &["203.0.113.1"]);
        record(&mut j, &rs, "bad", false, &["203.0.113.2"]);
        assert!(j.is_empty(), "{j:?}");
        let mut back = rs.clone();
        j.apply(&mut back);
        assert_eq!(back.hash, rs.hash);
    }

    #[test]
    fn a_replace_is_the_whole_contents_and_later_changes_apply_to_it() {
        let rs = live("203.0.113.1\n203.0.113.2\n");
        let mut j = SetJournal::default();
        let current = rs.sets["bad"].to_vec();
        let e = j.sets.entry("bad".into()).or_default().replace_with("bad", &nets(&["203.0.113.2", "203.0.113.5"]), &current);
        assert_eq!((e.added, e.removed, e.size), (1, 2, Some(2)));
        record(&mut j, &rs, "bad", true, &["203.0.113.7"]);
        record(&mut j, &rs, "bad", false, &["203.0.113.2", "203.0.113.1"]);
        let mut new = rs.clone();
        j.apply(&mut new);
        assert_eq!(sorted(&new.sets["bad"]), sorted(&nets(&["203.0.113.5", "203.0.113.7"])));
        // A journal survives its own file format.
        let text = serde_json::to_string(&j).unwrap();
        assert_eq!(serde_json::from_str::<SetJournal>(&text).unwrap(), j);
    }

    #[test]
    fn changes_to_a_set_the_ruleset_lacks_wait() {
        let rs = live("");
        let mut j = SetJournal::default();
        j.sets.entry("gone".into()).or_default().added.insert(nets(&["203.0.113.1"])[0]);
        let mut new = rs.clone();
        assert_eq!(j.apply(&mut new), vec!["gone".to_string()]);
        assert_eq!(new.hash, rs.hash);
    }
}
