//! Log lines for people at a terminal, or for journald under systemd.
//!
//! systemd connects a service's stderr to journald and says so in `JOURNAL_STREAM` (the device
//! and inode of that stream). There, every line starts with its syslog priority (`<3>` error,
//! `<4>` warning, `<6>` info, `<7>` debug), which journald strips and records
//! (`SyslogLevelPrefix=`, on by default), so `journalctl -p err` finds rejected rulesets; and
//! carries no timestamp of its own, since journald stamps every entry.

use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// Syslog priorities, as the `<N>` prefix journald reads.
pub(crate) const ERR: u8 = 3;
pub(crate) const WARNING: u8 = 4;
pub(crate) const INFO: u8 = 6;

/// Whether stderr is journald's stream: `JOURNAL_STREAM` names the device and inode of stderr
/// (systemd's test; a child whose stderr was redirected elsewhere inherits the variable but not
/// the stream).
pub(crate) fn stderr_is_journal() -> bool {
    static IS: OnceLock<bool> = OnceLock::new();
    *IS.get_or_init(|| {
        let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
        let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else { return false };
        let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
        nix::sys::stat::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
    })
}

/// `text` for stderr: under journald every line prefixed with `<priority>`, else unchanged.
pub(crate) fn lines(priority: u8, text: &str) -> String {
    if !stderr_is_journal() {
        return text.to_string();
    }
    prefixed(priority, text)
}

fn prefixed(priority: u8, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.lines() {
        out.push_str(&format!("<{priority}>{line}\n"));
    }
    out
}

/// Prints `text` to stderr with its priority under journald.
pub(crate) fn eprint(priority: u8, text: &str) {
    let mut t = lines(priority, text);
    if !t.ends_with('\n') {
        t.push('\n');
    }
    eprint!("{t}");
}

fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => ERR,
        Level::WARN => WARNING,
        Level::INFO => INFO,
        _ => 7,
    }
}

/// The journald format of a tracing event: `<priority>message fields`, every line of a
/// multi-line message prefixed, no timestamp, no colour.
pub(crate) struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let mut text = String::new();
        ctx.field_format().format_fields(Writer::new(&mut text), event)?;
        let p = priority(event.metadata().level());
        if text.is_empty() {
            return writeln!(writer, "<{p}>");
        }
        writer.write_str(&prefixed(p, &text))
    }
}

/// Installs the log subscriber: journald's format when stderr is the journal, else the usual
/// one (timestamps, level, colour on a terminal).
pub(crate) fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if stderr_is_journal() {
        builder.with_ansi(false).event_format(JournalFormat).init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        builder.with_ansi(ansi).init();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_line_carries_the_priority() {
        assert_eq!(super::prefixed(3, "rejected x.toml: x.toml:2:1: error\n  expected ]"), "<3>rejected x.toml: x.toml:2:1: error\n<3>  expected ]\n");
    }
}
