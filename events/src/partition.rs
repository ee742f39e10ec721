//! Partition keys: a UTC day (`2024-05-05`) or a UTC hour (`2024-05-05T13`).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// How an analysis cuts time into partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Granularity {
    #[serde(rename = "1d")]
    Day,
    #[serde(rename = "1h")]
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

    /// Every partition that overlaps the half-open range `[from, to)`.
    pub fn partitions_between(self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<PartitionKey> {
        let mut out = Vec::new();
        if to <= from {
            return out;
        }
        let mut key = self.partition_of(from);
        while key.start < to {
            out.push(key);
            key = key.next();
        }
        out
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
        if let Ok(date) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            return Ok(PartitionKey {
                granularity: Granularity::Day,
                start: Utc.from_utc_datetime(&date.and_time(NaiveTime::MIN)),
            });
        }
        if let Ok(hour) = NaiveDateTime::parse_from_str(&format!("{s}:00:00"), "%Y-%m-%dT%H:%M:%S")
        {
            return Ok(PartitionKey {
                granularity: Granularity::Hour,
                start: Utc.from_utc_datetime(&hour),
            });
        }
        Err(format!(
            "{s:?} is not a partition key: write a day as 2024-05-05 or an hour as 2024-05-05T13"
        ))
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

/// Parse a range bound given as `YYYY-MM-DD` (midnight UTC) or RFC 3339.
pub fn parse_instant(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(date) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(Utc.from_utc_datetime(&date.and_time(NaiveTime::MIN)));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("{s:?} is not a date: write YYYY-MM-DD or an RFC 3339 time such as 2024-05-05T00:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .partitions_between(from, to)
            .iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(keys, ["2024-05-05", "2024-05-06", "2024-05-07"]);
        assert!(Granularity::Day.partitions_between(to, from).is_empty());
    }

    #[test]
    fn a_bad_key_is_explained() {
        assert!(
            PartitionKey::parse("May 5")
                .unwrap_err()
                .contains("2024-05-05")
        );
    }
}
