//! systemd's service protocol (sd_notify): `READY=1` once attached, `STATUS=` with the live
//! ruleset after every reload attempt, `WATCHDOG=1` at half of `WATCHDOG_USEC`, `STOPPING=1`.
//! Every function is a no-op outside systemd (no `NOTIFY_SOCKET`).

use std::{path::Path, time::Duration};

use xdpfw_control::Instance;
use xdpfw_rules::short_hash;

/// Sends one notification (`KEY=value` lines) to `$NOTIFY_SOCKET`.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!("could not notify systemd ({}): {e}", state.lines().next().unwrap_or(""));
    }
}

/// The longest `STATUS=` text (systemctl status shows one line).
const MAX_STATUS: usize = 400;

/// One line for `systemctl status`: the live generation and ruleset, and the last attempt when
/// it failed (`rejected` names what went wrong, first line only).
pub(crate) fn status_text(inst: &Instance, rejected: Option<&str>) -> String {
    let live = match inst.state() {
        Ok(s) => format!(
            "generation {}: {} {} ({} rules, default {})",
            s.generation,
            s.ruleset.version.as_deref().unwrap_or("(no version)"),
            short_hash(&s.ruleset.hash),
            s.ruleset.rules.len(),
            s.ruleset.default
        ),
        Err(e) => format!("live ruleset unknown ({e})"),
    };
    let mut text = match rejected {
        Some(why) => format!("{live}; last reload rejected: {}", why.lines().next().unwrap_or("")),
        None => live,
    };
    text.retain(|c| !c.is_control());
    if text.len() > MAX_STATUS {
        let mut end = MAX_STATUS;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// `STATUS=` with the live ruleset.
pub(crate) fn status(inst: &Instance, rejected: Option<&str>) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        notify(&format!("STATUS={}", status_text(inst, rejected)));
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, for this process: `WATCHDOG_PID`
/// unset or ours), if any.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `WATCHDOG=1` every half interval until shutdown. It runs on the daemon's runtime, so a
/// runtime that stops making progress stops the pings, and systemd restarts the service.
pub(crate) async fn watchdog(every: Duration, shutdown: crate::Shutdown) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval((every / 2).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => notify("WATCHDOG=1"),
            _ = shutdown.wait() => return Ok(()),
        }
    }
}
