//! Instants and durations as plain numbers: the core never reads a clock, callers pass `now`.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since an epoch chosen by the caller (the Unix epoch in the
/// scaler, zero in the simulator). Only differences matter to the policy core.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch itself.
    pub const ZERO: Timestamp = Timestamp(0);

    /// `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// `s` seconds after the epoch.
    pub const fn from_secs(s: u64) -> Self {
        Timestamp(s.saturating_mul(1000))
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Seconds since the epoch, with fractions.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    /// Time elapsed from `earlier` to `self`; zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(millis(d)))
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(millis(d)))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", fmt_duration(Duration::from_millis(self.0)))
    }
}

/// A duration in whole milliseconds, saturating at `u64::MAX`.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Errors from [`parse_duration`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: expected e.g. 500ms, 30s, 5m, 1h30m or a number of seconds")]
pub struct DurationError(pub String);

/// Parses Go/Kubernetes style durations (`500ms`, `6s`, `1m30s`, `1h`) and bare numbers of
/// seconds (`30`, `2.5`), as written in Knative ConfigMaps, annotations and policy files.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    let err = || DurationError(text.to_string());
    if s.is_empty() {
        return Err(err());
    }
    if let Ok(secs) = s.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return Err(err());
        }
        return Ok(Duration::from_secs_f64(secs));
    }
    let mut total_ms = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| err())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return Err(err()),
        };
        total_ms += n * scale;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_millis(total_ms.round() as u64))
}

/// Formats a duration the way users write it: `500ms`, `6s`, `1m30s`, `1h`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = millis(d);
    if ms == 0 {
        return "0s".to_string();
    }
    let (h, m, s, rem) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if rem > 0 && h == 0 && m == 0 && s == 0 {
        out.push_str(&format!("{rem}ms"));
    } else if rem > 0 {
        out.push_str(&format!("{}s", s as f64 + rem as f64 / 1000.0));
    } else if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_durations() {
        for (text, ms, shown) in [
            ("60s", 60_000, "1m"),
            ("1h", 3_600_000, "1h"),
            ("1m30s", 90_000, "1m30s"),
            ("500ms", 500, "500ms"),
            ("30", 30_000, "30s"),
            ("2.5", 2_500, "2.5s"),
            ("0s", 0, "0s"),
        ] {
            let d = parse_duration(text).expect(text);
            assert_eq!(millis(d), ms, "{text}");
            assert_eq!(fmt_duration(d), shown, "{text}");
        }
        for bad in ["", "5x", "s", "-3", "1h-2m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_saturate() {
        let t = Timestamp::from_secs(10);
        assert_eq!(t.since(Timestamp::from_secs(20)), Duration::ZERO);
        assert_eq!((t - Duration::from_secs(20)), Timestamp::ZERO);
        assert_eq!((t + Duration::from_millis(5)).as_millis(), 10_005);
    }
}
