//! Partition keys: a UTC day (`2024-05-05`) or a UTC hour (`2024-05-05T13`), and runs
//! of consecutive keys, which is how events and requests carry many partitions.
//!
//! Every accepted time has a four-digit year (see [`crate::envelope::accepted_time`]), so
//! keys of one granularity sort as text the way they sort as times; stores rely on it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::envelope::{accepted_time, earliest_time, end_of_time};

/// How an analysis cuts time into partitions.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
pub enum Granularity {
    #[serde(rename = "1d", alias = "day")]
    Day,
    #[serde(rename = "1h", alias = "hour")]
    Hour,
}

impl Granularity {
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Day => "1d",
            Granularity::Hour => "1h",
        }
    }

    pub fn step(self) -> Duration {
        match self {
            Granularity::Day => Duration::days(1),
            Granularity::Hour => Duration::hours(1),
        }
    }

    /// The partition that contains `at`.
    pub fn partition_of(self, at: DateTime<Utc>) -> PartitionKey {
        let start = match self {
            Granularity::Day => Utc.from_utc_datetime(&at.date_naive().and_time(NaiveTime::MIN)),
            Granularity::Hour => Utc.from_utc_datetime(
                &at.date_naive()
                    .and_hms_opt(at.hour(), 0, 0)
                    .expect("an hour of a valid time is valid"),
            ),
        };
        PartitionKey {
            granularity: self,
            start,
        }
    }

    /// How many partitions overlap the half-open range `[from, to)`, computed without
    /// listing them, so that a range of any length costs nothing to refuse.
    pub fn count_between(self, from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
        if to <= from {
            return 0;
        }
        let first = self.partition_of(from).start;
        // In microseconds, so that a `to` a fraction of a second into a partition counts it.
        let micros = |d: Duration| d.num_microseconds().unwrap_or(i64::MAX).max(0) as u64;
        micros(to - first).div_ceil(micros(self.step()))
    }

    /// Every partition that overlaps the half-open range `[from, to)`, or an error that
    /// names `limit` when there are more than `limit`.
    pub fn partitions_between(
        self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PartitionKey>, String> {
        if to <= from {
            return Ok(Vec::new());
        }
        let count = self.count_between(from, to);
        if count > limit as u64 {
            return Err(format!(
                "the range covers {count} partitions of {}; at most {limit} are allowed here, so ask for a shorter range",
                self.as_str()
            ));
        }
        let mut out = Vec::with_capacity(count as usize);
        let mut key = self.partition_of(from);
        while key.start < to {
            out.push(key);
            key = key.next();
        }
        Ok(out)
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "1d" | "day" => Ok(Granularity::Day),
            "1h" | "hour" => Ok(Granularity::Hour),
            other => Err(format!(
                "partition must be \"1d\" (a UTC day) or \"1h\" (a UTC hour), not {other:?}"
            )),
        }
    }
}

/// One partition: the granularity and the instant it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub granularity: Granularity,
    pub start: DateTime<Utc>,
}

impl PartitionKey {
    pub fn end(&self) -> DateTime<Utc> {
        self.start + self.granularity.step()
    }

    pub fn next(&self) -> PartitionKey {
        PartitionKey {
            granularity: self.granularity,
            start: self.end(),
        }
    }

    /// Parse a key written as `2024-05-05` (day) or `2024-05-05T13` (hour).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a partition key: write a day as 2024-05-05 or an hour as 2024-05-05T13"
            )
        };
        // Four-digit years only: keys must sort as text.
        if s.len() < 10 || !s.as_bytes()[..4].iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let key = if s.len() == 10 {
            let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| bad())?;
            PartitionKey {
                granularity: Granularity::Day,
                start: Utc.from_utc_datetime(&date.and_time(NaiveTime::MIN)),
            }
        } else if s.len() == 13 {
            let hour = NaiveDateTime::parse_from_str(&format!("{s}:00:00"), "%Y-%m-%dT%H:%M:%S")
                .map_err(|_| bad())?;
            PartitionKey {
                granularity: Granularity::Hour,
                start: Utc.from_utc_datetime(&hour),
            }
        } else {
            return Err(bad());
        };
        accepted_time(key.start).map_err(|_| bad())?;
        Ok(key)
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.granularity {
            Granularity::Day => write!(f, "{}", self.start.format("%Y-%m-%d")),
            Granularity::Hour => write!(f, "{}", self.start.format("%Y-%m-%dT%H")),
        }
    }
}

impl Serialize for PartitionKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PartitionKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PartitionKey::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A run of consecutive partitions of one granularity, `first` to `last` inclusive. Events
/// carry runs rather than lists, so that an event about many partitions stays small.
/// A run of one partition is written as its key (`"2024-05-05"`), a longer one as
/// `{"first": "2024-05-05", "last": "2024-05-09"}`; events logged before runs existed
/// listed keys, which read back as runs of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRun {
    pub first: PartitionKey,
    pub last: PartitionKey,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RunForm {
    One(PartitionKey),
    Many {
        first: PartitionKey,
        last: PartitionKey,
    },
}

impl Serialize for PartitionRun {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.first == self.last {
            RunForm::One(self.first).serialize(s)
        } else {
            RunForm::Many {
                first: self.first,
                last: self.last,
            }
            .serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for PartitionRun {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match RunForm::deserialize(d)? {
            RunForm::One(key) => Ok(PartitionRun {
                first: key,
                last: key,
            }),
            RunForm::Many { first, last }
                if first.granularity == last.granularity && first <= last =>
            {
                Ok(PartitionRun { first, last })
            }
            RunForm::Many { .. } => Err(serde::de::Error::custom(
                "a run's first and last partitions must be of one granularity, first before last",
            )),
        }
    }
}

impl PartitionRun {
    pub fn contains(&self, key: &PartitionKey) -> bool {
        key.granularity == self.first.granularity && self.first <= *key && *key <= self.last
    }

    /// The half-open time range the run covers.
    pub fn span(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        (self.first.start, self.last.end())
    }

    pub fn len(&self) -> u64 {
        self.first
            .granularity
            .count_between(self.first.start, self.last.end())
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn keys(&self) -> impl Iterator<Item = PartitionKey> + '_ {
        std::iter::successors(Some(self.first), |k| Some(k.next())).take_while(|k| *k <= self.last)
    }
}

/// The runs of consecutive keys in `keys` (sorted and deduplicated first).
pub fn runs(keys: impl IntoIterator<Item = PartitionKey>) -> Vec<PartitionRun> {
    let mut keys: Vec<PartitionKey> = keys.into_iter().collect();
    keys.sort();
    keys.dedup();
    let mut out: Vec<PartitionRun> = Vec::new();
    for key in keys {
        match out.last_mut() {
            Some(run) if run.last.granularity == key.granularity && run.last.next() == key => {
                run.last = key
            }
            _ => out.push(PartitionRun {
                first: key,
                last: key,
            }),
        }
    }
    out
}

/// Parse a range bound given as `YYYY-MM-DD` (midnight UTC) or RFC 3339, within the
/// accepted range of times.
pub fn parse_instant(s: &str) -> Result<DateTime<Utc>, String> {
    let bad = || {
        format!(
            "{s:?} is not a date: write YYYY-MM-DD or an RFC 3339 time such as 2024-05-05T00:00:00Z"
        )
    };
    let t = if let Some(date) =
        plain_date(s).or_else(|| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
    {
        Utc.from_utc_datetime(&date.and_time(NaiveTime::MIN))
    } else {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| bad())?
    };
    if t < earliest_time() || t >= end_of_time() {
        return Err(format!(
            "{s:?} is outside the accepted range of dates, 0001-01-01 to 9999-12-31"
        ));
    }
    accepted_time(t)
}

/// `YYYY-MM-DD` exactly as written by every client we know of, read without chrono's
/// format machinery (a cached read of annotations parses two of these, and the format
/// parser was a tenth of its handler's time). Anything else is left to `parse_from_str`.
fn plain_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let number = |digits: &[u8]| {
        digits.iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let year = i32::try_from(number(&b[..4])?).ok()?;
    NaiveDate::from_ymd_opt(year, number(&b[5..7])?, number(&b[8..])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_dates_read_as_chrono_reads_them() {
        for text in [
            "2024-05-05",
            "0001-01-01",
            "9999-12-31",
            "2024-02-29",
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-05-32",
            "2024-5-05",
            "2024/05/05",
            "20240505",
            "2024-05-0a",
            "+024-05-05",
            "2024-05-05T00",
            "",
        ] {
            assert_eq!(
                plain_date(text).or_else(|| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()),
                NaiveDate::parse_from_str(text, "%Y-%m-%d").ok(),
                "{text:?}"
            );
        }
        assert_eq!(
            plain_date("2024-05-05"),
            NaiveDate::from_ymd_opt(2024, 5, 5)
        );
        assert_eq!(plain_date("2023-02-29"), None);
    }

    #[test]
    fn a_day_key_round_trips_through_its_text() {
        let key = PartitionKey::parse("2024-05-05").unwrap();
        assert_eq!(key.granularity, Granularity::Day);
        assert_eq!(key.to_string(), "2024-05-05");
        assert_eq!(key.next().to_string(), "2024-05-06");
    }

    #[test]
    fn an_hour_key_round_trips_through_its_text() {
        let key = PartitionKey::parse("2024-05-05T13").unwrap();
        assert_eq!(key.granularity, Granularity::Hour);
        assert_eq!(key.to_string(), "2024-05-05T13");
        assert_eq!(key.next().to_string(), "2024-05-05T14");
    }

    #[test]
    fn a_half_open_range_lists_the_partitions_it_overlaps() {
        let from = parse_instant("2024-05-05").unwrap();
        let to = parse_instant("2024-05-08").unwrap();
        let keys: Vec<String> = Granularity::Day
            .partitions_between(from, to, 10)
            .unwrap()
            .iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(keys, ["2024-05-05", "2024-05-06", "2024-05-07"]);
        assert!(
            Granularity::Day
                .partitions_between(to, from, 10)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_huge_range_is_refused_by_arithmetic() {
        let from = parse_instant("1000-01-01").unwrap();
        let to = parse_instant("9000-01-01").unwrap();
        assert_eq!(Granularity::Hour.count_between(from, to), 70_126_560);
        let error = Granularity::Hour
            .partitions_between(from, to, 5_000)
            .unwrap_err();
        assert!(error.contains("at most 5000"), "{error}");
        let from = parse_instant("2024-05-05T10:30:00Z").unwrap();
        let to = parse_instant("2024-05-05T12:00:01Z").unwrap();
        assert_eq!(Granularity::Hour.count_between(from, to), 3);
    }

    #[test]
    fn a_bad_key_is_explained() {
        for bad in [
            "May 5",
            "24-05-05",
            "2024-05-05T1",
            "0000-01-01",
            "2024-5-5",
        ] {
            assert!(
                PartitionKey::parse(bad).unwrap_err().contains("2024-05-05"),
                "{bad}"
            );
        }
    }

    #[test]
    fn runs_join_consecutive_keys() {
        let keys = ["2024-05-05", "2024-05-06", "2024-05-09", "2024-05-05"]
            .iter()
            .map(|k| PartitionKey::parse(k).unwrap());
        let runs = runs(keys);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].last.to_string(), "2024-05-06");
        assert_eq!(runs[0].len(), 2);
        assert_eq!(runs[1].keys().count(), 1);
        assert!(runs[1].contains(&PartitionKey::parse("2024-05-09").unwrap()));
    }

    #[test]
    fn range_bounds_stay_in_the_accepted_years() {
        assert!(parse_instant("0000-01-01T00:00:00Z").is_err());
        assert!(parse_instant("0001-01-01").is_ok());
        assert!(parse_instant("9999-12-31T23:59:59Z").is_ok());
    }

    #[test]
    fn an_empty_range_has_no_partitions_and_a_fraction_of_a_second_counts() {
        let t = |s: &str| parse_instant(s).unwrap();
        let none = Granularity::Day
            .partitions_between(t("2024-05-05T10:30:00Z"), t("2024-05-05T10:15:00Z"), 10)
            .unwrap();
        assert!(none.is_empty());
        let (from, to) = (t("2024-05-05T00:00:00Z"), t("2024-05-05T01:00:00.5Z"));
        assert_eq!(Granularity::Hour.count_between(from, to), 2);
        assert_eq!(
            Granularity::Hour
                .partitions_between(from, to, 2)
                .unwrap()
                .len(),
            2
        );
        assert!(Granularity::Hour.partitions_between(from, to, 1).is_err());
    }

    #[test]
    fn a_leap_second_at_the_end_of_9999_is_outside_the_range() {
        assert!(parse_instant("9999-12-31T23:59:60.5Z").is_err());
        assert!(parse_instant("9999-12-31T23:59:59.999999Z").is_ok());
    }
}
