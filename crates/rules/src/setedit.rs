//! Incremental changes to a named set (`loader set add|del|replace`), made on the texts a
//! ruleset was parsed from ([`crate::Sources`]): the set's file text gains or loses lines, and
//! the result is parsed again with [`crate::parse_with_sets`]. The changed ruleset is therefore
//! an ordinary ruleset, with its own hash and snapshot, that any reload, rollback or
//! `attach --last-good` reproduces exactly.
//!
//! Only a set with a `file` can be changed: its prefixes are lines of that text. Prefixes given
//! inline (`prefixes = [...]`) stay as the rules text says; deleting one is refused.

use std::{collections::HashSet, fmt::Write as _};

use ipnet::IpNet;

use crate::{Ruleset, RulesError, parse_cidr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SetOp {
    /// Add the prefixes not yet in the set.
    Add,
    /// Remove the prefixes (lines of the set file) that are in the set.
    Del,
    /// The set file holds exactly these prefixes afterwards.
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
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SetEdit {
    pub set: String,
    /// The set file (as the rules text names it) whose text was changed.
    pub file: String,
    pub added: usize,
    pub removed: usize,
    /// Prefixes to add that were in the set already.
    pub present: usize,
    /// Prefixes to delete that were not in the set.
    pub absent: usize,
    /// The set's prefixes after the change.
    pub size: usize,
}

impl SetEdit {
    pub fn changed(&self) -> bool {
        self.added + self.removed > 0
    }
}

/// Why a change cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SetEditError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Rules(#[from] RulesError),
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

/// The file the set `name` reads its prefixes from, as the rules text names it, and whether
/// another set reads the same file.
fn set_file(rs: &Ruleset, name: &str) -> Result<String, SetEditError> {
    if !rs.sets.contains_key(name) {
        let known: Vec<&str> = rs.sets.keys().map(String::as_str).collect();
        return Err(SetEditError::Refused(format!(
            "the live ruleset has no set \"{}\" (its sets: {})",
            name.escape_debug(),
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )));
    }
    let doc: toml::Table = toml::from_str(&rs.sources.rules).map_err(|e| SetEditError::Refused(format!("the live rules text does not parse: {e}")))?;
    let sets = doc.get("sets").and_then(toml::Value::as_table);
    let file_of = |set: &toml::Value| set.get("file").and_then(toml::Value::as_str).map(str::to_string);
    let Some(file) = sets.and_then(|s| s.get(name)).and_then(file_of) else {
        return Err(SetEditError::Refused(format!(
            "set \"{name}\" has no `file`: only a set whose prefixes are in a set file can be changed incrementally (give it `file = \"{name}.txt\"`, even an empty one, and reload)"
        )));
    };
    if let Some((other, _)) = sets.into_iter().flatten().find(|(n, s)| n.as_str() != name && file_of(s).as_deref() == Some(file.as_str())) {
        return Err(SetEditError::Refused(format!("set \"{name}\" shares its file {file} with set \"{other}\": a change to one would change both")));
    }
    Ok(file)
}

/// Applies `op` with `prefixes` to the set `name` of `rs`: its file text is changed and the
/// ruleset parsed again from the changed texts (as if from `rs.path`). `None` when nothing
/// would change (every prefix present for an add, absent for a delete, the same for a replace).
pub fn edit_set(rs: &Ruleset, name: &str, op: SetOp, prefixes: &[IpNet]) -> Result<(Option<Ruleset>, SetEdit), SetEditError> {
    let file = set_file(rs, name)?;
    let old_text = rs.sources.sets.iter().find(|(f, _)| *f == file).map(|(_, t)| t.clone()).unwrap_or_else(|| "".into());
    let in_file: HashSet<IpNet> = parse_prefix_lines(&old_text).map_err(|e| SetEditError::Refused(format!("{file}: {e}")))?.into_iter().collect();
    let current: HashSet<IpNet> = rs.sets[name].iter().copied().collect();
    let mut edit = SetEdit { set: name.to_string(), file: file.clone(), ..Default::default() };
    let mut text = String::new();
    match op {
        SetOp::Add => {
            text.push_str(&old_text);
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            let mut seen = HashSet::new();
            for p in prefixes {
                if current.contains(p) || !seen.insert(*p) {
                    edit.present += 1;
                } else {
                    let _ = writeln!(text, "{p}");
                    edit.added += 1;
                }
            }
        }
        SetOp::Del | SetOp::Replace => {
            let wanted: HashSet<IpNet> = prefixes.iter().copied().collect();
            if op == SetOp::Del {
                if let Some(p) = wanted.iter().find(|p| current.contains(p) && !in_file.contains(p)) {
                    return Err(SetEditError::Refused(format!(
                        "{p} is given inline in the rules text (`prefixes` of set \"{name}\"), not in its file {file}: remove it there and reload"
                    )));
                }
                edit.absent = wanted.iter().filter(|p| !in_file.contains(p)).count();
            }
            // Keep lines (comments included) that stay; drop the prefixes leaving.
            let mut kept = HashSet::new();
            for line in old_text.lines() {
                let body = line.split('#').next().unwrap_or("").trim();
                let leaves = match parse_cidr(body) {
                    Ok(p) if op == SetOp::Del => wanted.contains(&p),
                    Ok(p) => !wanted.contains(&p) || !kept.insert(p),
                    Err(_) => false,
                };
                if leaves {
                    edit.removed += 1;
                } else {
                    text.push_str(line);
                    text.push('\n');
                }
            }
            if op == SetOp::Replace {
                for p in prefixes {
                    if !in_file.contains(p) && kept.insert(*p) {
                        let _ = writeln!(text, "{p}");
                        edit.added += 1;
                    }
                }
            }
        }
    }
    if !edit.changed() {
        edit.size = rs.sets[name].len();
        return Ok((None, edit));
    }
    let sets: Vec<(String, String)> = rs
        .sources
        .sets
        .iter()
        .map(|(f, t)| (f.clone(), if *f == file { text.clone() } else { t.to_string() }))
        .collect();
    let new = crate::parse_with_sets(&rs.path, &rs.sources.rules, &sets)?;
    edit.size = new.sets[name].len();
    Ok((Some(new), edit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(set_text: &str) -> Ruleset {
        let rules = "default = \"pass\"\n[sets.bad]\nfile = \"bad.txt\"\nprefixes = [\"198.51.100.0/24\"]\n[sets.inline]\nprefixes = [\"192.0.2.0/24\"]\n[[rule]]\nname = \"block\"\naction = \"drop\"\nsrc = [\"@bad\"]\n";
        crate::parse_with_sets(std::path::Path::new("/etc/xdpfw/rules.toml"), rules, &[("bad.txt".into(), set_text.into())]).unwrap()
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|s| parse_cidr(s).unwrap()).collect()
    }

    #[test]
    fn add_del_replace_change_the_file_text_and_the_hash() {
        let rs = live("# feed\n203.0.113.1\n");
        let (new, e) = edit_set(&rs, "bad", SetOp::Add, &nets(&["203.0.113.1", "203.0.113.2", "203.0.113.2", "198.51.100.0/24"])).unwrap();
        let new = new.unwrap();
        assert_eq!((e.added, e.present, e.size), (1, 3, 3));
        assert_ne!(new.hash, rs.hash);
        assert_eq!(&*new.sources.sets[0].1, "# feed\n203.0.113.1\n203.0.113.2/32\n");
        // The snapshot of the change parses back to the same ruleset.
        let again = crate::parse_with_sets(&new.path, &new.sources.rules, &[("bad.txt".into(), new.sources.sets[0].1.to_string())]).unwrap();
        assert_eq!(again.hash, new.hash);

        let (back, e) = edit_set(&new, "bad", SetOp::Del, &nets(&["203.0.113.2", "203.0.113.9"])).unwrap();
        assert_eq!((e.removed, e.absent, e.size), (1, 1, 2));
        assert_eq!(back.unwrap().hash, rs.hash, "add then del is the original text");

        let (none, e) = edit_set(&rs, "bad", SetOp::Add, &nets(&["203.0.113.1"])).unwrap();
        assert!(none.is_none() && !e.changed());

        let (r, e) = edit_set(&rs, "bad", SetOp::Replace, &nets(&["203.0.113.1", "203.0.113.5"])).unwrap();
        assert_eq!((e.added, e.removed), (1, 0));
        assert_eq!(&*r.unwrap().sources.sets[0].1, "# feed\n203.0.113.1\n203.0.113.5/32\n");
    }

    #[test]
    fn inline_sets_and_unknown_sets_are_refused() {
        let rs = live("");
        assert!(matches!(edit_set(&rs, "inline", SetOp::Add, &nets(&["203.0.113.1"])), Err(SetEditError::Refused(m)) if m.contains("no `file`")));
        assert!(matches!(edit_set(&rs, "nope", SetOp::Add, &[]), Err(SetEditError::Refused(m)) if m.contains("no set")));
        assert!(matches!(edit_set(&rs, "bad", SetOp::Del, &nets(&["198.51.100.0/24"])), Err(SetEditError::Refused(m)) if m.contains("inline")));
        let (new, e) = edit_set(&rs, "bad", SetOp::Add, &nets(&["203.0.113.1"])).unwrap();
        assert_eq!((e.added, e.size), (1, 2));
        assert_eq!(&*new.unwrap().sources.sets[0].1, "203.0.113.1/32\n");
    }
}
