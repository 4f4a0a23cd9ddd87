//! Any bytes as a set file named by a rules file: read through the same bounded reader as a
//! real set file, parsed line by line into prefixes, then compiled. Never a panic, a hang or
//! unbounded memory.
#![no_main]

use std::{path::PathBuf, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use xdpfw_rules::{compile::compile, load};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("xdpfw-fuzz-set-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a scratch folder");
        std::fs::write(
            d.join("rules.toml"),
            "default = \"pass\"\n[sets.s]\nfile = \"set.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@s\"]\n[[rule]]\naction = \"pass\"\ndst = [\"@s\"]\n",
        )
        .expect("the rules file");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    std::fs::write(d.join("set.txt"), data).expect("the set file");
    if let Ok(rs) = load(&d.join("rules.toml")) {
        let _ = compile(&rs);
    }
});
