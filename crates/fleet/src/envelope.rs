//! The signed ruleset envelope and the ed25519 key files.
//!
//! A value on the bus is either a plain ruleset (TOML, accepted only by nodes without trusted
//! keys) or an envelope: three header lines, an empty line, and the exact ruleset bytes:
//!
//! ```text
//! xdpfw-signed-ruleset v1
//! meta {"version":"v2","sha256":"…","key":"rules","supersedes":41,"signed_at":1767225600123,"signer":"<hex>"}
//! signature ed25519 <public key, hex> <signature, hex>
//!
//! <the ruleset, byte for byte>
//! ```
//!
//! The signature covers `xdpfw-signed-ruleset v1\n`, the meta line (exact bytes, with its
//! newline) and the body: a signature cannot be moved to another body or other metadata, and
//! no re-serialization is needed to check it. The meta's sha256 is also checked against the
//! body. A node also refuses a value signed for another key, or one that is older than its
//! live value (a replay: see [`check_order`]). Key files are one line: `xdpfw-ed25519-secret <hex seed>` (mode 0600) or
//! `xdpfw-ed25519-public <hex>`.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MAGIC: &[u8] = b"xdpfw-signed-ruleset v1\n";
const SECRET_TAG: &str = "xdpfw-ed25519-secret";
const PUBLIC_TAG: &str = "xdpfw-ed25519-public";

/// What the publisher signed beside the body.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    /// The ruleset's `version`, if it has one.
    pub version: Option<String>,
    /// sha256 of the body (hex).
    pub sha256: String,
    /// The key it was published to.
    pub key: String,
    /// The revision of `key` this publication supersedes (0: the first), checked by the bus
    /// on publishing (compare-and-set), so two publishers cannot overwrite each other blindly.
    pub supersedes: u64,
    /// Unix time of the signature, in milliseconds.
    pub signed_at: u64,
    /// The signer's public key (hex), informative: the signature line is what is checked.
    pub signer: String,
    /// For `fleet rollback`: the revision of `key` whose ruleset this envelope restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restores: Option<u64>,
    /// For `fleet promote`: the revision of the group's key whose ruleset goes to every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotes: Option<u64>,
}

/// What a node remembers of its live value from the bus, to refuse replays of older ones
/// (kept in its state directory, so a restart does not forget it).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Watermark {
    pub key: String,
    /// The bus revision of the live value.
    pub revision: u64,
    /// Its `signed_at` (0 for an unsigned value).
    pub signed_at: u64,
}

/// Whether a verified envelope found at `key` may replace the node's live value `live`.
///
/// - It must have been signed for this key: a canary's value copied to the common key (or any
///   value moved between keys) is refused; `fleet promote` signs a fresh envelope instead.
/// - It must not be older than the live value: it is accepted if it was signed knowing the
///   live revision (`supersedes` ≥ the live revision: the publisher saw it) or later than the
///   live value (`signed_at`). An old envelope put back on the bus by whoever can write to it
///   fails both (it superseded something older and was signed earlier), so it is refused;
///   `fleet rollback` signs a fresh envelope naming the revision it restores.
///
/// Either condition alone suffices, so a publisher whose clock is behind still passes through
/// the chain, and a bucket recreated from scratch (revisions restart) through the clock.
pub fn check_order(meta: &Meta, key: &str, live: Option<&Watermark>) -> Result<(), EnvelopeError> {
    if meta.key != key {
        return Err(EnvelopeError::WrongKey { signed_for: meta.key.clone(), found_at: key.to_string() });
    }
    match live {
        Some(w) if meta.supersedes < w.revision && meta.signed_at <= w.signed_at => Err(EnvelopeError::Replayed {
            signed_at: meta.signed_at,
            supersedes: meta.supersedes,
            live_revision: w.revision,
            live_signed_at: w.signed_at,
        }),
        _ => Ok(()),
    }
}

/// Why a value was refused by a node.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("unsigned ruleset refused: this node only accepts rulesets signed by its trusted keys")]
    Unsigned,
    #[error("ruleset signed by an untrusted key {0}")]
    UntrustedKey(String),
    #[error("bad signature: the ruleset or its metadata was changed after signing")]
    BadSignature,
    #[error("malformed signed envelope: {0}")]
    Malformed(String),
    #[error("ruleset signed for the key \"{signed_for}\" found at \"{found_at}\": values cannot be moved between keys (promote and rollback sign anew)")]
    WrongKey { signed_for: String, found_at: String },
    #[error(
        "replayed ruleset refused: signed at {signed_at} ms superseding revision {supersedes}, older than the live revision {live_revision} (signed at {live_signed_at} ms); `fleet rollback` restores an earlier ruleset"
    )]
    Replayed { signed_at: u64, supersedes: u64, live_revision: u64, live_signed_at: u64 },
}

impl EnvelopeError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::UntrustedKey(_) => "untrusted_key",
            Self::BadSignature => "bad_signature",
            Self::Malformed(_) => "malformed",
            Self::WrongKey { .. } => "wrong_key",
            Self::Replayed { .. } => "replayed",
        }
    }
}

/// A value from the bus, opened.
#[derive(Debug)]
pub struct Opened<'a> {
    pub body: &'a [u8],
    /// Present for an envelope (verified when the node has trusted keys).
    pub meta: Option<Meta>,
    /// The public key (hex) whose signature was verified.
    pub signer: Option<String>,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

pub fn sha256_hex(body: &[u8]) -> String {
    hex(&Sha256::digest(body))
}

fn signed_message(meta_line: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(MAGIC.len() + meta_line.len() + body.len());
    m.extend_from_slice(MAGIC);
    m.extend_from_slice(meta_line);
    m.extend_from_slice(body);
    m
}

/// Wraps `body` in a signed envelope. `meta.sha256` and `meta.signer` are filled in here.
pub fn seal(body: &[u8], mut meta: Meta, key: &SigningKey) -> Vec<u8> {
    meta.sha256 = sha256_hex(body);
    meta.signer = hex(key.verifying_key().as_bytes());
    let meta_line = format!("meta {}\n", serde_json::to_string(&meta).expect("meta serializes"));
    let sig = key.sign(&signed_message(meta_line.as_bytes(), body));
    let mut out = Vec::with_capacity(body.len() + 512);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(meta_line.as_bytes());
    let _ = writeln!(out, "signature ed25519 {} {}\n", hex(key.verifying_key().as_bytes()), hex(&sig.to_bytes()));
    out.extend_from_slice(body);
    out
}

fn line(rest: &[u8]) -> Result<(&[u8], &[u8]), EnvelopeError> {
    let nl = rest.iter().position(|&b| b == b'\n').ok_or_else(|| EnvelopeError::Malformed("truncated header".into()))?;
    Ok((&rest[..=nl], &rest[nl + 1..]))
}

/// Whether the value is an envelope (else a plain ruleset).
pub fn is_envelope(value: &[u8]) -> bool {
    value.starts_with(MAGIC)
}

/// Opens a value. With trusted keys, only an envelope signed by one of them is accepted; with
/// none, a plain ruleset is accepted and an envelope's signature is checked against its own
/// key (integrity only).
pub fn open<'a>(value: &'a [u8], trusted: &[VerifyingKey]) -> Result<Opened<'a>, EnvelopeError> {
    let Some(rest) = value.strip_prefix(MAGIC) else {
        if trusted.is_empty() {
            return Ok(Opened { body: value, meta: None, signer: None });
        }
        return Err(EnvelopeError::Unsigned);
    };
    let (meta_line, rest) = line(rest)?;
    let (sig_line, rest) = line(rest)?;
    let body = rest.strip_prefix(b"\n").ok_or_else(|| EnvelopeError::Malformed("no empty line after the header".into()))?;
    let meta_json = meta_line.strip_prefix(b"meta ").ok_or_else(|| EnvelopeError::Malformed("no meta line".into()))?;
    let meta: Meta = serde_json::from_slice(meta_json).map_err(|e| EnvelopeError::Malformed(format!("meta: {e}")))?;
    let sig_text = std::str::from_utf8(sig_line).map_err(|_| EnvelopeError::Malformed("signature line is not text".into()))?;
    let mut parts = sig_text.trim_end().split(' ');
    let (Some("signature"), Some("ed25519"), Some(pk), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(EnvelopeError::Malformed("bad signature line".into()));
    };
    let pk_bytes: [u8; 32] = unhex(pk).and_then(|v| v.try_into().ok()).ok_or_else(|| EnvelopeError::Malformed("bad public key".into()))?;
    let sig_bytes: [u8; 64] = unhex(sig).and_then(|v| v.try_into().ok()).ok_or_else(|| EnvelopeError::Malformed("bad signature".into()))?;
    let signer = VerifyingKey::from_bytes(&pk_bytes).map_err(|_| EnvelopeError::Malformed("bad public key".into()))?;
    if !trusted.is_empty() && !trusted.contains(&signer) {
        return Err(EnvelopeError::UntrustedKey(pk.to_string()));
    }
    signer.verify(&signed_message(meta_line, body), &Signature::from_bytes(&sig_bytes)).map_err(|_| EnvelopeError::BadSignature)?;
    if meta.sha256 != sha256_hex(body) {
        return Err(EnvelopeError::BadSignature);
    }
    Ok(Opened { body, meta: Some(meta), signer: Some(pk.to_string()) })
}

/// Writes a new key pair: `<prefix>.key` (secret, 0600) and `<prefix>.pub`.
pub fn keygen(prefix: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    let (secret, public) = (prefix.with_extension("key"), prefix.with_extension("pub"));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&secret)?;
    writeln!(f, "{SECRET_TAG} {}", hex(&seed))?;
    std::fs::write(&public, format!("{PUBLIC_TAG} {}\n", hex(key.verifying_key().as_bytes())))?;
    Ok((secret, public))
}

fn read_tagged(path: &Path, tag: &str) -> anyhow::Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let hexed = text.trim().strip_prefix(tag).map(str::trim);
    // The content is never echoed: it may be a secret.
    hexed.and_then(unhex).and_then(|v| v.try_into().ok()).ok_or_else(|| anyhow::anyhow!("{}: not a {tag} file", path.display()))
}

pub fn load_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    Ok(SigningKey::from_bytes(&read_tagged(path, SECRET_TAG)?))
}

/// A public key file, or a secret key file (its public half is used).
pub fn load_trusted_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    match read_tagged(path, PUBLIC_TAG) {
        Ok(b) => VerifyingKey::from_bytes(&b).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(_) => Ok(load_signing_key(path)?.verifying_key()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    #[test]
    fn sealed_values_open_only_with_the_right_key_and_bytes() {
        let body = b"version = \"a\"\ndefault = \"pass\"\n";
        let sealed = seal(body, Meta { key: "rules".into(), supersedes: 3, ..Default::default() }, &key());
        let trusted = [key().verifying_key()];
        let o = open(&sealed, &trusted).unwrap();
        assert_eq!(o.body, body);
        assert_eq!(o.meta.unwrap().supersedes, 3);
        assert!(open(&sealed, &[]).is_ok(), "integrity-checked without trusted keys");
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert!(matches!(open(&sealed, &[other]), Err(EnvelopeError::UntrustedKey(_))));
        assert_eq!(open(body, &trusted).unwrap_err(), EnvelopeError::Unsigned);
        assert!(open(body, &[]).is_ok());
        // One byte of the body changed.
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() = b' ';
        assert_eq!(open(&tampered, &trusted).unwrap_err(), EnvelopeError::BadSignature);
        // The metadata changed.
        let text = String::from_utf8(sealed.clone()).unwrap().replace("\"supersedes\":3", "\"supersedes\":4");
        assert_eq!(open(text.as_bytes(), &trusted).unwrap_err(), EnvelopeError::BadSignature);
        // A signature moved to another signer's line.
        let forged = seal(body, Meta::default(), &SigningKey::from_bytes(&[8; 32]));
        assert!(open(&forged, &trusted).is_err());
        assert!(matches!(open(&sealed[..40], &trusted), Err(EnvelopeError::Malformed(_))));
    }

    #[test]
    fn replays_and_moved_values_are_refused() {
        let meta = |key: &str, supersedes, signed_at| Meta { key: key.into(), supersedes, signed_at, ..Default::default() };
        let live = Watermark { key: "rules".into(), revision: 10, signed_at: 5_000 };
        // The next publication: it saw revision 10.
        assert_eq!(check_order(&meta("rules", 10, 6_000), "rules", Some(&live)), Ok(()));
        // A lagging node: the publisher saw a later revision.
        assert_eq!(check_order(&meta("rules", 14, 9_000), "rules", Some(&live)), Ok(()));
        // A publisher with a clock behind, but on the chain.
        assert_eq!(check_order(&meta("rules", 10, 1_000), "rules", Some(&live)), Ok(()));
        // A bucket recreated (revisions restart), signed later.
        assert_eq!(check_order(&meta("rules", 0, 7_000), "rules", Some(&live)), Ok(()));
        // A replay: signed before the live value, superseding an older revision.
        let r = check_order(&meta("rules", 7, 4_000), "rules", Some(&live)).unwrap_err();
        assert_eq!(r.reason(), "replayed");
        // The live value itself put back.
        assert!(check_order(&meta("rules", 9, 5_000), "rules", Some(&live)).is_err());
        // Nothing live yet: anything signed for the key.
        assert_eq!(check_order(&meta("rules", 0, 1), "rules", None), Ok(()));
        assert_eq!(check_order(&meta("rules.canary", 20, 9_000), "rules", Some(&live)).unwrap_err().reason(), "wrong_key");
        assert_eq!(check_order(&meta("", 20, 9_000), "rules", None).unwrap_err().reason(), "wrong_key");
    }

    #[test]
    fn key_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("xdpfw-fleet-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (s, p) = keygen(&dir.join("fleet")).unwrap();
        let sk = load_signing_key(&s).unwrap();
        assert_eq!(load_trusted_key(&p).unwrap(), sk.verifying_key());
        assert_eq!(load_trusted_key(&s).unwrap(), sk.verifying_key());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&s).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(keygen(&dir.join("fleet")).is_err(), "an existing key is not overwritten");
        assert!(load_signing_key(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
