//! Wall-clock times as RFC 3339 UTC text, without a date crate: the access
//! log stamps every line, and the control plane stamps its history and
//! webhooks, with the same few lines of calendar arithmetic.

use std::time::{SystemTime, UNIX_EPOCH};

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for `t`; times before 1970 print as the epoch.
pub fn rfc3339_millis(t: SystemTime) -> [u8; 24] {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    with_millis(utc_second(since.as_secs()), since.subsec_millis())
}

/// `second` (from [`utc_second`]) with `.mmmZ` appended.
pub(crate) fn with_millis(second: [u8; 19], millis: u32) -> [u8; 24] {
    let mut out = *b"0000-00-00T00:00:00.000Z";
    out[..19].copy_from_slice(&second);
    put_digits(&mut out[20..23], u64::from(millis));
    out
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for a Unix time in seconds (Howard
/// Hinnant's days-to-civil algorithm).
pub(crate) fn utc_second(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let of_day = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00";
    put_digits(&mut out[0..4], year.clamp(0, 9999) as u64);
    put_digits(&mut out[5..7], month as u64);
    put_digits(&mut out[8..10], day as u64);
    put_digits(&mut out[11..13], of_day / 3600);
    put_digits(&mut out[14..16], of_day / 60 % 60);
    put_digits(&mut out[17..19], of_day % 60);
    out
}

/// Writes `value`'s last `slots.len()` decimal digits into `slots`.
fn put_digits(slots: &mut [u8], mut value: u64) {
    for slot in slots.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_seconds_are_civil_dates() {
        assert_eq!(&utc_second(0), b"1970-01-01T00:00:00");
        assert_eq!(&utc_second(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&utc_second(1_796_000_000), b"2026-11-30T00:53:20");
        assert_eq!(&utc_second(4_102_444_799), b"2099-12-31T23:59:59");
    }

    #[test]
    fn millis_are_zero_padded() {
        let t = UNIX_EPOCH + Duration::from_millis(1_796_000_000_007);
        assert_eq!(&rfc3339_millis(t), b"2026-11-30T00:53:20.007Z");
    }
}
