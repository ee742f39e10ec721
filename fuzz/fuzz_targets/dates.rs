//! Range bounds (`parse_instant`) and partition keys (`PartitionKey::parse`), as query
//! strings and events carry them. The input is UTF-8 text; each of its first few lines is
//! given to both parsers.
//!
//! Checked: no panic; an instant is in the accepted range and in whole microseconds; a
//! key writes and reads back as itself, starts a partition of its granularity, and (for a
//! day) reads as the same instant through `parse_instant`; for every pair of instants
//! (parsed, or the start or end of a parsed key) and each granularity, `count_between`
//! never panics and, when it is at most 10,000, equals the length of
//! `partitions_between(…, usize::MAX)`, whose keys are consecutive and cover the range.

#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::{Corpus, fuzz_target};

use scholia_events::envelope::{earliest_time, end_of_time};
use scholia_events::partition::{Granularity, PartitionKey, parse_instant};

/// Lines read from one input; more would only repeat pairs.
const MAX_LINES: usize = 4;
/// Ranges listed to compare with their count.
const MAX_LISTED: u64 = 10_000;

fuzz_target!(|input: &[u8]| -> Corpus {
    let Ok(text) = std::str::from_utf8(input) else {
        return Corpus::Reject;
    };
    let mut instants: Vec<DateTime<Utc>> = Vec::new();
    for line in text.split('\n').take(MAX_LINES) {
        if let Ok(t) = parse_instant(line) {
            assert!(
                earliest_time() <= t && t < end_of_time(),
                "{line:?} parsed as {t:?}, outside the accepted range"
            );
            assert_eq!(
                t.timestamp_subsec_nanos() % 1_000,
                0,
                "{line:?} parsed as {t:?}, not whole microseconds"
            );
            instants.push(t);
        }
        if let Ok(key) = PartitionKey::parse(line) {
            check_key(line, key);
            instants.push(key.start);
            instants.push(key.end());
        }
    }
    for &from in &instants {
        for &to in &instants {
            for granularity in [Granularity::Day, Granularity::Hour] {
                check_range(granularity, from, to);
            }
        }
    }
    Corpus::Keep
});

fn check_key(line: &str, key: PartitionKey) {
    let text = key.to_string();
    assert_eq!(
        PartitionKey::parse(&text),
        Ok(key),
        "{line:?} parsed as {key:?}, written as {text:?}"
    );
    assert_eq!(
        key.granularity.partition_of(key.start),
        key,
        "{line:?} does not start a partition"
    );
    assert!(earliest_time() <= key.start && key.start < end_of_time());
    if key.granularity == Granularity::Day {
        assert_eq!(parse_instant(line), Ok(key.start), "{line:?} as an instant");
    }
}

fn check_range(granularity: Granularity, from: DateTime<Utc>, to: DateTime<Utc>) {
    let count = granularity.count_between(from, to);
    if to <= from {
        assert_eq!(count, 0, "{granularity} from {from:?} to {to:?}");
    }
    if count > MAX_LISTED {
        let limit = MAX_LISTED as usize;
        assert!(
            granularity.partitions_between(from, to, limit).is_err(),
            "{count} partitions listed within a limit of {limit}"
        );
        return;
    }
    let keys = granularity
        .partitions_between(from, to, usize::MAX)
        .unwrap_or_else(|e| panic!("{granularity} from {from:?} to {to:?}: {e}"));
    assert_eq!(
        keys.len() as u64,
        count,
        "{granularity} from {from:?} to {to:?}: count_between says {count}, partitions_between lists {}",
        keys.len()
    );
    check_cover(granularity, from, to, &keys);
}

/// The keys are consecutive partitions of `granularity` from the one holding `from` to
/// the one holding the last instant before `to`.
fn check_cover(
    granularity: Granularity,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    keys: &[PartitionKey],
) {
    assert_eq!(
        keys.is_empty(),
        to <= from,
        "{granularity} from {from:?} to {to:?}"
    );
    if let (Some(first), Some(last)) = (keys.first(), keys.last()) {
        assert!(
            first.start <= from && from < first.end(),
            "{first} holds {from:?}"
        );
        assert!(
            last.start < to && to <= last.end(),
            "{last} ends the range to {to:?}"
        );
        assert!(keys.windows(2).all(|w| w[0].next() == w[1]));
        assert!(keys.iter().all(|k| k.granularity == granularity));
    }
}
