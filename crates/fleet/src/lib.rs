//! Fleet distribution over NATS JetStream key-value (issue 14).
//!
//! Where it sits: `common ← rules ← fleet`, and `daemon` (the node side, `source_nats.rs`) and
//! `loader` (`loader fleet …`) depend on it. It knows nothing of the kernel or the instance: the
//! daemon applies what it fetches through its usual pipeline.
//!
//! - [`envelope`]: the signed ruleset (ed25519 over the exact bytes and its metadata), key files;
//! - [`bus`]: connecting, the rules and status buckets, the node status record;
//! - [`ops`]: validate and publish, wait for convergence, status rows, promote, rollback.

pub mod bus;
pub mod envelope;
pub mod ops;

pub use async_nats;
pub use ed25519_dalek;
