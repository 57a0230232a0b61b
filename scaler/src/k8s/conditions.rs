//! Status conditions: set one, and its `lastTransitionTime` changes only when its status does.

use std::time::{SystemTime, UNIX_EPOCH};

use super::crd::Condition;

pub const READY: &str = "Ready";
pub const ACTIVE: &str = "Active";
pub const FALLBACK: &str = "Fallback";
pub const PAUSED: &str = "Paused";
pub const CONFLICT: &str = "Conflict";

/// Sets condition `type_` in `conditions` (kept in a fixed order: Ready, Active, Fallback,
/// Paused, Conflict). `now` is RFC 3339.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: &str,
) {
    let status = if status { "True" } else { "False" };
    // Never empty: a 1.20 API server turns "" in a merge patch into null and rejects it.
    let message = if message.is_empty() { reason } else { message };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.to_string();
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now.to_string(),
        }),
    }
    let order = |t: &str| {
        [READY, ACTIVE, FALLBACK, PAUSED, CONFLICT]
            .iter()
            .position(|x| *x == t)
    };
    conditions.sort_by_key(|c| order(&c.type_));
}

/// The condition `type_`, if set.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether condition `type_` is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == "True")
}

/// `t` as RFC 3339 in UTC, to the second (`2024-05-01T12:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
    }

    #[test]
    fn transition_time_changes_only_with_the_status() {
        let mut c = Vec::new();
        set(&mut c, CONFLICT, false, "NoConflict", "", "t1");
        set(&mut c, READY, true, "Scaling", "ok", "t1");
        assert_eq!(c[0].type_, READY);
        set(&mut c, READY, true, "Scaling", "still ok", "t2");
        assert_eq!(
            get(&c, READY).map(|c| c.last_transition_time.as_str()),
            Some("t1")
        );
        set(&mut c, READY, false, "InvalidPolicy", "bad", "t3");
        assert_eq!(
            get(&c, READY).map(|c| c.last_transition_time.as_str()),
            Some("t3")
        );
        assert!(!is_true(&c, READY));
    }
}
