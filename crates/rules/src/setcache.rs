//! Set files parsed earlier in this process, by their exact text (issue 11): a long-lived
//! process (the daemon, a bench) that reloads a ruleset beside an unchanged 1M-line set file
//! reads the file and compares it with the text kept, but neither parses nor hashes it again. Parsing is a pure
//! function of the text, so an equal text (compared byte for byte, not by a digest) gives the
//! same prefixes; only texts that parsed without error are kept. A short-lived `loader`
//! command gains nothing from it.

use std::sync::{Arc, Mutex};

use ipnet::IpNet;

/// Texts below this size parse in well under a millisecond: not worth keeping.
const MIN_TEXT: usize = 64 * 1024;
/// Set files kept (the most recently stored last): a ruleset rarely has more large ones.
const ENTRIES: usize = 4;

/// A set file's text, the prefixes it parsed to, and its SHA-256 (its part of the ruleset hash).
#[derive(Clone)]
pub(crate) struct Entry {
    pub text: Arc<str>,
    pub prefixes: Arc<[IpNet]>,
    pub digest: [u8; 32],
}

static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The kept text equal to `text` (to share its allocation) and its prefixes.
pub(crate) fn lookup(text: &str) -> Option<Entry> {
    if text.len() < MIN_TEXT {
        return None;
    }
    let cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    cache.iter().find(|e| e.text.len() == text.len() && *e.text == *text).cloned()
}

/// Keeps `text` and the prefixes it parsed to, dropping the oldest entry beyond [`ENTRIES`].
pub(crate) fn store(text: &Arc<str>, prefixes: &[IpNet], digest: [u8; 32]) {
    if text.len() < MIN_TEXT {
        return;
    }
    let mut cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    cache.retain(|e| *e.text != **text);
    if cache.len() >= ENTRIES {
        cache.remove(0);
    }
    cache.push(Entry { text: text.clone(), prefixes: Arc::from(prefixes), digest });
}

#[cfg(test)]
mod tests {
    /// A set file parsed again from the cache gives what a first parse gives, and a changed
    /// text (one line more, same length class) is parsed afresh.
    #[test]
    fn a_cached_set_file_parses_to_the_same_prefixes() {
        let dir = std::env::temp_dir().join(format!("xdpfw-setcache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines: String = (0..20_000u32).map(|i| format!("10.{}.{}.0/24\n", i >> 8 & 0xff, i & 0xff)).collect();
        std::fs::write(dir.join("rules.toml"), "default = \"pass\"\n[sets.s]\nfile = \"s.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@s\"]\n").unwrap();
        let load = |text: &str| {
            std::fs::write(dir.join("s.txt"), text).unwrap();
            crate::load(&dir.join("rules.toml")).unwrap()
        };
        let first = load(&lines);
        let again = load(&lines);
        assert_eq!(first.sets["s"], again.sets["s"]);
        assert_eq!(first.hash, again.hash);
        assert_eq!(first.sets["s"].len(), 20_000);
        let changed = load(&format!("{lines}192.0.2.1\n"));
        assert_eq!(changed.sets["s"].len(), 20_001);
        assert_eq!(changed.sets["s"][20_000], "192.0.2.1/32".parse().unwrap());
        // An error in a text never comes from (or goes into) the cache.
        std::fs::write(dir.join("s.txt"), format!("{lines}not-an-address\n")).unwrap();
        let e = crate::load(&dir.join("rules.toml")).unwrap_err();
        assert_eq!(e.location.line, 20_001, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
