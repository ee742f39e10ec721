//! ISO 8601 durations as schedule windows (`parse_duration(text, "window", max)`) and
//! input lookbacks (`Lookback::parse`) are written. The first input byte chooses `max`;
//! the rest is the text.
//!
//! Checked: no panic or overflow; an accepted duration is positive and at most `max`;
//! and, against a reference reading of the grammar the parser documents (`P`, then
//! optional weeks and days, then optionally `T` and hours, minutes, seconds, each unit
//! at most once and in that order; no years or months), exactly the texts whose total is
//! within `(0, max]` are accepted, with that total. `Lookback::parse` accepts the same
//! texts as `parse_duration` with the largest limit, keeping the text as given.

#![no_main]

use chrono::Duration;
use libfuzzer_sys::{Corpus, fuzz_target};

use scholia_events::analysis::Lookback;
use scholia_events::duration::{max_duration, parse_duration};

fuzz_target!(|input: &[u8]| -> Corpus {
    let Some((&choice, rest)) = input.split_first() else {
        return Corpus::Reject;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return Corpus::Reject;
    };
    let max = match choice % 8 {
        0 => max_duration(),
        1 => Duration::days(1),
        2 => Duration::seconds(1),
        3 => Duration::weeks(2) + Duration::milliseconds(500),
        4 => Duration::MAX,
        5 => Duration::zero(),
        6 => Duration::MIN,
        _ => Duration::seconds(i64::from(u16::from_le_bytes([choice, 0x5a]))),
    };

    let parsed = parse_duration(text, "window", max);
    if let Ok(duration) = parsed {
        assert!(duration > Duration::zero(), "{text:?} is {duration:?}");
        assert!(duration <= max, "{text:?} is {duration:?}, over {max:?}");
    }
    let expected = reference_seconds(text)
        .filter(|&s| s > 0 && s <= i128::from(max.num_seconds()))
        .map(|s| Duration::seconds(i64::try_from(s).expect("at most max")));
    assert_eq!(
        parsed.as_ref().ok(),
        expected.as_ref(),
        "{text:?} with max {max:?}: {parsed:?}"
    );

    let lookback = Lookback::parse(text);
    let as_window = parse_duration(text, "lookback", max_duration());
    match (&lookback, &as_window) {
        (Ok(lookback), Ok(duration)) => {
            assert_eq!(lookback.duration(), *duration);
            assert_eq!(lookback.as_str(), text);
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("{text:?}: lookback {lookback:?}, duration {as_window:?}"),
    }
    Corpus::Keep
});

/// The total in seconds of a text that follows the grammar, without any limit (so in
/// `i128`, saturated: a total that large is refused either way), or `None`.
fn reference_seconds(text: &str) -> Option<i128> {
    let rest = text.strip_prefix('P')?;
    let (date, time) = match rest.split_once('T') {
        Some((date, time)) => (date, Some(time)),
        None => (rest, None),
    };
    let mut total = components(date, &[('W', 7 * 86_400), ('D', 86_400)])?;
    if let Some(time) = time {
        if time.is_empty() {
            return None;
        }
        total = total.saturating_add(components(time, &[('H', 3_600), ('M', 60), ('S', 1)])?);
    }
    Some(total)
}

/// `(digits unit)*` with units in the given order, each at most once.
fn components(mut part: &str, units: &[(char, i128)]) -> Option<i128> {
    let mut total: i128 = 0;
    let mut allowed = units;
    while !part.is_empty() {
        let digits = part.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let unit = part[digits..].chars().next()?;
        let at = allowed.iter().position(|(u, _)| *u == unit)?;
        let n = part[..digits].bytes().fold(0i128, |n, d| {
            n.saturating_mul(10).saturating_add(i128::from(d - b'0'))
        });
        total = total.saturating_add(n.saturating_mul(allowed[at].1));
        allowed = &allowed[at + 1..];
        part = &part[digits + unit.len_utf8()..];
    }
    Some(total)
}
