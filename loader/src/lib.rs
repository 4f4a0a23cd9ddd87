//! Userspace of the XDP firewall: the rules language, the compiler, the reference matcher, and
//! the operations on an attached instance (attach, reload, stats, detach).

pub mod compile;
pub mod daemon;
pub mod duration;
pub mod escalation;
pub mod grace;
pub mod history;
pub mod instance;
pub mod kernel;
pub mod matcher;
pub mod owner;
pub mod packet;
pub mod rules;
pub mod testrun;
