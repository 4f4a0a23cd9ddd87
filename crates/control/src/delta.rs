//! The delta path of `loader set`: a batch of IPv4 prefixes goes live by writing only the table
//! entries it changes (stub: being built).

use std::time::Instant;

use crate::{
    error::Result,
    instance::{Instance, ReloadTimes},
    pipeline::{ReloadOptions, SetReport},
};

pub(crate) enum Outcome {
    Done(Box<SetReport>),
    /// Why the batch must take the reload path.
    NotApplicable(String),
}

pub(crate) fn try_set_update(
    _inst: &Instance,
    _name: &str,
    _op: xdpfw_rules::setedit::SetOp,
    _prefixes: &[ipnet::IpNet],
    _opts: &ReloadOptions,
    _total: Instant,
    _times: ReloadTimes,
) -> Result<Outcome> {
    Ok(Outcome::NotApplicable("not built".into()))
}
