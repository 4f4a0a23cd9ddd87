//! The rules of the XDP firewall, everything about them that needs no kernel: the language
//! ([`parse`], [`load`]) with file:line:column diagnostics and lints, the reference matcher
//! ([`matcher`]: the oracle of the differential tests and the engine of `explain` and of
//! escalation decisions), self-test evaluation ([`selftest`]), and the compiler to a map image
//! ([`compile`]), a pure function whose output the kernel crate writes into the maps.
//!
//! Pure by design: no aya, tokio, libc or build script, so it builds and tests on the stable
//! toolchain without root.

pub mod compile;
pub mod duration;
pub mod frame;
mod error;
mod lang;
pub mod matcher;
pub mod owner;
pub mod packet;
pub mod selftest;
pub mod setedit;
mod setcache;

pub use error::{CompileError, SpecError};
pub use lang::*;
pub use setcache::{SetFileCounts, TRUST_AGE, forget_file, keep_parsed_on_disk, set_file_counts, trusted_digest};

/// The first 12 characters of a content hash, as shown to people. Char-safe: a hash read from a
/// state file an operator edited may be anything.
pub fn short_hash(hash: &str) -> &str {
    hash.char_indices().nth(12).map_or(hash, |(i, _)| &hash[..i])
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_hash_cuts_at_characters() {
        assert_eq!(super::short_hash("0123456789abcdef"), "0123456789ab");
        assert_eq!(super::short_hash("abc"), "abc");
        assert_eq!(super::short_hash("ééééééééééééééé"), "éééééééééééé");
    }
}
