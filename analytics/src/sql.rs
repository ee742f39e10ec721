//! Analyses written in SQL, registered at run time, and run by Polars' SQL engine over one
//! table per input: the kind's name (or `events`, for an analysis with one kind input) or
//! the upstream analysis' name.
//!
//! What analysts can write (Polars SQL, 0.55): one `SELECT` (with `WITH`, joins of the
//! input tables, `GROUP BY`, `HAVING`, `ORDER BY`, `LIMIT`), with AVG, SUM, COUNT, MIN, MAX,
//! MEDIAN, STDDEV, QUANTILE_CONT, window functions (`AVG(x) OVER (PARTITION BY source)`),
//! CASE, COALESCE, casts, `EXTRACT(HOUR FROM created)`, `DATE_PART('hour', created)` and
//! `STRFTIME(created, '%Y-%m-%dT%H')`. Not supported: `DATE_TRUNC`. Refused at
//! registration: anything but one query, and every table function (`read_parquet`,
//! `read_csv`, `read_ipc`, `read_json`, …): an analysis reads its inputs and nothing else.

use std::ops::ControlFlow;

use polars::prelude::*;
use polars::sql::SQLContext;
use sqlparser::ast::{Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use scholia_events::analysis::{AnalysisMeta, InputSource};

use crate::analysis::{Analysis, Inputs};

/// The table a single kind input is read as.
pub const SINGLE_KIND_TABLE: &str = "events";

#[derive(Debug, Clone)]
pub struct SqlAnalysis {
    pub meta: AnalysisMeta,
}

impl SqlAnalysis {
    fn sql(&self) -> &str {
        self.meta.sql.as_deref().unwrap_or_default()
    }
}

/// The table names `meta`'s SQL sees, with the input each one holds.
pub fn tables(meta: &AnalysisMeta) -> Vec<(String, InputSource)> {
    let kinds = meta.kinds().count();
    let mut out = Vec::new();
    for input in &meta.inputs {
        out.push((input.source.name().to_string(), input.source.clone()));
        if kinds == 1 && matches!(input.source, InputSource::Kind(_)) {
            out.push((SINGLE_KIND_TABLE.to_string(), input.source.clone()));
        }
    }
    out
}

/// Run `sql` over `inputs`, each registered under its table names.
pub fn run_sql(
    sql: &str,
    tables: &[(String, InputSource)],
    inputs: &Inputs,
) -> PolarsResult<DataFrame> {
    let mut context = SQLContext::new();
    for (name, source) in tables {
        context.register(name, inputs.get(source)?.clone().lazy());
    }
    context.execute(sql)?.collect()
}

/// Refuse what an analysis may not write: anything but one query, and table functions
/// (which read files and the network).
pub fn check_statement(sql: &str) -> Result<(), String> {
    let statements = Parser::parse_sql(&GenericDialect, sql)
        .map_err(|e| format!("the SQL does not parse: {e}"))?;
    let [statement] = statements.as_slice() else {
        return Err(format!(
            "write exactly one SELECT statement, not {}",
            statements.len()
        ));
    };
    if !matches!(statement, Statement::Query(_)) {
        return Err("an analysis is one SELECT statement (WITH … SELECT is fine); it cannot create, change or copy anything".into());
    }
    struct TableFunctions(Vec<String>);
    impl Visitor for TableFunctions {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            match factor {
                TableFactor::Table {
                    name,
                    args: Some(_),
                    ..
                } => self.0.push(name.to_string()),
                TableFactor::Function { name, .. } => self.0.push(name.to_string()),
                TableFactor::TableFunction { expr, .. } => self.0.push(expr.to_string()),
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let mut found = TableFunctions(Vec::new());
    let _ = statement.visit(&mut found);
    if !found.0.is_empty() {
        return Err(format!(
            "the SQL calls the table function {}; an analysis reads only its inputs (no files, no network)",
            found.0.join(", ")
        ));
    }
    Ok(())
}

impl Analysis for SqlAnalysis {
    fn meta(&self) -> &AnalysisMeta {
        &self.meta
    }

    fn compute(&self, inputs: Inputs) -> PolarsResult<DataFrame> {
        run_sql(self.sql(), &tables(&self.meta), &inputs)
    }
}

/// A stable fingerprint of a few strings (FNV-1a, 64 bits, hex): enough to tell whether a
/// definition changed; not a security measure.
pub fn fingerprint(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf29ce484222325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x100000001b3);
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use scholia_events::Granularity;
    use scholia_events::analysis::{Input, Language};

    fn meta(sql: &str, inputs: Vec<Input>) -> AnalysisMeta {
        AnalysisMeta {
            name: "x".into(),
            version: 1,
            partition: Granularity::Day,
            inputs,
            language: Language::Sql,
            sql: Some(sql.into()),
            description: String::new(),
            key: None,
        }
    }

    fn input() -> Inputs {
        let frame = DataFrame::new(
            4,
            vec![
                Series::new("source".into(), ["a", "a", "b", "b"]).into_column(),
                Series::new("mw".into(), [Some(1.0), Some(3.0), None, Some(5.0)]).into_column(),
            ],
        )
        .unwrap();
        let mut inputs = Inputs::new();
        inputs.insert(InputSource::Kind("generation".into()), frame);
        inputs
    }

    #[test]
    fn a_sql_analysis_aggregates_its_partition() {
        let analysis = SqlAnalysis {
            meta: meta(
                "SELECT source, AVG(mw) AS avg_mw, COUNT(mw) AS n FROM events GROUP BY source ORDER BY source",
                vec![Input::kind("generation")],
            ),
        };
        let out = analysis.compute(input()).unwrap();
        assert_eq!(out.height(), 2);
        let avg = out.column("avg_mw").unwrap().f64().unwrap();
        assert_eq!(avg.get(0), Some(2.0));
        assert_eq!(avg.get(1), Some(5.0));
    }

    #[test]
    fn sql_naming_a_missing_column_fails_with_its_name() {
        let analysis = SqlAnalysis {
            meta: meta("SELECT nope FROM events", vec![Input::kind("generation")]),
        };
        let error = analysis.compute(input()).unwrap_err().to_string();
        assert!(error.contains("nope"), "{error}");
    }

    #[test]
    fn a_change_of_sql_changes_the_fingerprint() {
        assert_ne!(fingerprint(&["SELECT 1"]), fingerprint(&["SELECT 2"]));
        assert_eq!(fingerprint(&["a", "b"]), fingerprint(&["a", "b"]));
        assert_ne!(fingerprint(&["ab"]), fingerprint(&["a", "b"]));
    }

    #[test]
    fn table_functions_and_other_statements_are_refused() {
        for sql in [
            "SELECT * FROM read_parquet('/etc/secret.parquet')",
            "SELECT * FROM events WHERE source IN (SELECT source FROM read_csv('/x.csv'))",
            "WITH t AS (SELECT * FROM READ_IPC('/x')) SELECT * FROM t",
            "SELECT * FROM events JOIN read_json('/x.json') j ON true",
        ] {
            let error = check_statement(sql).unwrap_err();
            assert!(error.contains("table function"), "{sql}: {error}");
        }
        assert!(
            check_statement("CREATE TABLE t AS SELECT 1")
                .unwrap_err()
                .contains("one SELECT")
        );
        assert!(
            check_statement("SELECT 1; SELECT 2")
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(check_statement("WITH t AS (SELECT * FROM events) SELECT * FROM t").is_ok());
    }

    #[test]
    fn one_kind_is_also_the_table_events() {
        let names: Vec<String> = tables(&meta("", vec![Input::kind("generation")]))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["generation", "events"]);
        let two = meta("", vec![Input::kind("generation"), Input::kind("demand")]);
        assert_eq!(tables(&two).len(), 2);
    }
}
