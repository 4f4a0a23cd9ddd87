//! Durations as operators write them, in flags and in rules files.

use std::time::Duration;

/// The longest duration anything accepts (30 days): no timer of the firewall needs more, and
/// a bound here keeps every `Instant + duration` of its users from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86400);

/// "250ms", "1.5s", "2m", "1h", or a bare number of seconds, at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration \"{s}\" (e.g. 500ms, 1s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in \"{s}\" (ms, s, m or h)")),
    };
    let d = Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration \"{s}\": {e}"))?;
    if d > MAX_DURATION {
        return Err(format!("duration \"{s}\" is longer than the limit of 30 days"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(parse_duration("720h"), Ok(MAX_DURATION));
        assert!(parse_duration("18446744073709551615").is_err(), "huge durations are refused, not overflowed later");
        assert!(parse_duration("721h").is_err());
    }

}
