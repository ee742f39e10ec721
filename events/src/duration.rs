//! ISO 8601 durations (`P7D`, `PT6H`, `P1DT12H`, `P2W`, `PT30M`), as schedule windows and
//! input lookbacks are written. Years and months are refused (their length depends on
//! the calendar); every value is checked against a limit without overflowing.

use chrono::Duration;

/// The longest duration anything accepts: about 100 years.
pub const MAX_DURATION_DAYS: i64 = 36_600;

/// Parse `text`, which must be positive and at most `max`. `what` names the setting in
/// error messages ("window", "lookback").
pub fn parse_duration(text: &str, what: &str, max: Duration) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{what} {text:?} is not an ISO 8601 duration such as P7D, PT6H or P1DT12H (weeks, days, hours, minutes and seconds)"
        )
    };
    let too_long = || {
        format!(
            "{what} {text:?} is longer than the {} days allowed",
            max.num_days()
        )
    };
    let rest = text.strip_prefix('P').ok_or_else(bad)?;
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) if !t.is_empty() => (d, Some(t)),
        Some(_) => return Err(bad()),
        None => (rest, None),
    };
    let mut seconds: i64 = 0;
    let mut add = |part: &str, units: &[(char, i64)]| -> Result<(), String> {
        let mut number = String::new();
        let mut last_unit = usize::MAX;
        for c in part.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let position = units.iter().position(|(u, _)| *u == c).ok_or_else(bad)?;
            // Units in order, each at most once: P1D2W is not a duration.
            if last_unit != usize::MAX && position <= last_unit {
                return Err(bad());
            }
            last_unit = position;
            if number.is_empty() {
                return Err(bad());
            }
            let n: i64 = number.parse().map_err(|_| too_long())?;
            let part_seconds = n.checked_mul(units[position].1).ok_or_else(too_long)?;
            seconds = seconds.checked_add(part_seconds).ok_or_else(too_long)?;
            number.clear();
        }
        if number.is_empty() {
            Ok(())
        } else {
            Err(bad())
        }
    };
    if date.contains(['Y', 'M']) {
        return Err(format!(
            "{what} {text:?} uses years or months, whose length varies; write it in weeks or days (P30D)"
        ));
    }
    add(date, &[('W', 7 * 86_400), ('D', 86_400)])?;
    if let Some(time) = time {
        add(time, &[('H', 3_600), ('M', 60), ('S', 1)])?;
    }
    if seconds <= 0 {
        return Err(bad());
    }
    if seconds > max.num_seconds() {
        return Err(too_long());
    }
    Ok(Duration::seconds(seconds))
}

/// The largest duration allowed anywhere.
pub fn max_duration() -> Duration {
    Duration::days(MAX_DURATION_DAYS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Duration, String> {
        parse_duration(text, "window", max_duration())
    }

    #[test]
    fn durations_are_iso_8601() {
        assert_eq!(parse("P7D").unwrap(), Duration::days(7));
        assert_eq!(parse("PT6H").unwrap(), Duration::hours(6));
        assert_eq!(parse("P1DT12H").unwrap(), Duration::hours(36));
        assert_eq!(parse("P2W").unwrap(), Duration::days(14));
        assert_eq!(parse("PT1H30M").unwrap(), Duration::minutes(90));
        for bad in ["7 days", "P", "PT", "P1D2W", "P-1D", "PT0S", "P1DT"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("P1M").unwrap_err().contains("months"));
    }

    #[test]
    fn huge_durations_are_refused_without_overflow() {
        assert!(parse("P99999999999999D").unwrap_err().contains("longer"));
        assert!(parse("P100000000D").unwrap_err().contains("longer"));
        assert!(
            parse("PT99999999999999999999S")
                .unwrap_err()
                .contains("longer")
        );
        assert!(parse("P36600D").is_ok());
    }
}
