//! Analyses written in SQL, registered at run time, and run by Polars' SQL engine over a
//! table named `events` holding one partition of records.
//!
//! What analysts can write (Polars SQL, 0.55): `SELECT … FROM events [WHERE …] [GROUP BY
//! …] [HAVING …] [ORDER BY …] [LIMIT …]`, with AVG, SUM, COUNT, MIN, MAX, MEDIAN,
//! STDDEV, QUANTILE_CONT, window functions (`AVG(x) OVER (PARTITION BY source)`),
//! CASE, COALESCE, casts, `EXTRACT(HOUR FROM created)`, `DATE_PART('hour', created)` and
//! `STRFTIME(created, '%Y-%m-%dT%H')`. Not supported: `DATE_TRUNC`, joins with other
//! tables (there is only `events`).

use polars::prelude::*;
use polars::sql::SQLContext;
use sha2_free_fingerprint::fingerprint;

use scholia_events::Granularity;

use crate::analysis::Analysis;

/// The table name a SQL analysis reads.
pub const TABLE: &str = "events";

#[derive(Debug, Clone)]
pub struct SqlAnalysis {
    pub name: String,
    pub version: i64,
    pub kind: String,
    pub partition: Granularity,
    pub sql: String,
    pub description: String,
}

impl SqlAnalysis {
    /// A fingerprint of what defines the computation: a change bumps the version.
    pub fn fingerprint(&self) -> String {
        fingerprint(&[&self.kind, self.partition.as_str(), self.sql.trim()])
    }
}

/// Run `sql` over `input` as the table `events`.
pub fn run_sql(sql: &str, input: DataFrame) -> PolarsResult<DataFrame> {
    let mut context = SQLContext::new();
    context.register(TABLE, input.lazy());
    context.execute(sql)?.collect()
}

impl Analysis for SqlAnalysis {
    fn name(&self) -> &str {
        &self.name
    }
    fn version(&self) -> i64 {
        self.version
    }
    fn kind(&self) -> &str {
        &self.kind
    }
    fn partition(&self) -> Granularity {
        self.partition
    }
    fn description(&self) -> &str {
        &self.description
    }
    fn sql(&self) -> Option<&str> {
        Some(&self.sql)
    }
    fn compute(&self, input: DataFrame) -> PolarsResult<DataFrame> {
        run_sql(&self.sql, input)
    }
}

/// A stable fingerprint of a few strings (FNV-1a, 64 bits, hex): enough to tell whether
/// a definition changed; not a security measure.
mod sha2_free_fingerprint {
    pub(crate) fn fingerprint(parts: &[&str]) -> String {
        let mut hash: u64 = 0xcbf29ce484222325;
        for part in parts {
            for byte in part.bytes().chain(std::iter::once(0)) {
                hash ^= byte as u64;
                hash = hash.wrapping_mul(0x100000001b3);
            }
        }
        format!("{hash:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> DataFrame {
        DataFrame::new(
            4,
            vec![
                Series::new("source".into(), ["a", "a", "b", "b"]).into_column(),
                Series::new("mw".into(), [Some(1.0), Some(3.0), None, Some(5.0)]).into_column(),
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_sql_analysis_aggregates_its_partition() {
        let out = run_sql("SELECT source, AVG(mw) AS avg_mw, COUNT(mw) AS n FROM events GROUP BY source ORDER BY source", input()).unwrap();
        assert_eq!(out.height(), 2);
        assert_eq!(
            out.column("avg_mw").unwrap().f64().unwrap().get(0),
            Some(2.0)
        );
        assert_eq!(
            out.column("avg_mw").unwrap().f64().unwrap().get(1),
            Some(5.0)
        );
    }

    #[test]
    fn sql_naming_a_missing_column_fails_with_its_name() {
        let error = run_sql("SELECT nope FROM events", input().head(Some(0)))
            .unwrap_err()
            .to_string();
        assert!(error.contains("nope"), "{error}");
    }

    #[test]
    fn a_change_of_sql_changes_the_fingerprint() {
        let mut a = SqlAnalysis {
            name: "x".into(),
            version: 1,
            kind: "k".into(),
            partition: Granularity::Day,
            sql: "SELECT 1".into(),
            description: String::new(),
        };
        let before = a.fingerprint();
        a.sql = "SELECT 2".into();
        assert_ne!(before, a.fingerprint());
    }
}
