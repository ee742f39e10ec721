//! Annotations as CSV and as Arrow (IPC stream), one row per annotation row, with the
//! partition and generation first.

use chrono::DateTime;
use polars::prelude::*;
use serde_json::{Map, Value};

use scholia_events::analysis::{ColumnSpec, ColumnType};

use crate::PartitionView;

/// The union of the partitions' columns, in first-seen order.
fn columns(views: &[PartitionView]) -> Vec<ColumnSpec> {
    let mut out: Vec<ColumnSpec> = Vec::new();
    for view in views {
        if let Some(stored) = &view.rows {
            for c in &stored.columns {
                if !out.iter().any(|o| o.name == c.name) {
                    out.push(c.clone());
                }
            }
        }
    }
    out
}

fn rows(views: &[PartitionView]) -> Vec<Map<String, Value>> {
    let mut out = Vec::new();
    for view in views {
        let Some(stored) = &view.rows else { continue };
        let rows: Vec<Map<String, Value>> =
            serde_json::from_str(stored.rows.get()).unwrap_or_default();
        for mut row in rows {
            row.insert(
                "partition".into(),
                Value::String(view.partition.to_string()),
            );
            row.insert("generation".into(), Value::from(stored.generation));
            out.push(row);
        }
    }
    out
}

pub(crate) fn csv(views: &[PartitionView]) -> String {
    let columns = columns(views);
    let mut out = String::from("partition,generation");
    for c in &columns {
        out.push(',');
        out.push_str(&csv_field(&c.name));
    }
    out.push('\n');
    for row in rows(views) {
        out.push_str(&csv_field(row["partition"].as_str().unwrap_or("")));
        out.push(',');
        out.push_str(&row["generation"].to_string());
        for c in &columns {
            out.push(',');
            match row.get(&c.name) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => out.push_str(&csv_field(s)),
                Some(other) => out.push_str(&csv_field(&other.to_string())),
            }
        }
        out.push('\n');
    }
    out
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

pub(crate) fn arrow(views: &[PartitionView]) -> PolarsResult<Vec<u8>> {
    let mut specs = vec![
        ColumnSpec {
            name: "partition".into(),
            ty: ColumnType::String,
        },
        ColumnSpec {
            name: "generation".into(),
            ty: ColumnType::Int,
        },
    ];
    specs.extend(
        columns(views)
            .into_iter()
            .filter(|c| c.name != "partition" && c.name != "generation"),
    );
    let mut frame = rows_to_frame(&specs, &rows(views))?;
    let mut buffer = Vec::new();
    IpcStreamWriter::new(&mut buffer).finish(&mut frame)?;
    Ok(buffer)
}

/// Rebuild a frame from stored columns and rows.
pub fn rows_to_frame(
    columns: &[ColumnSpec],
    rows: &[Map<String, Value>],
) -> PolarsResult<DataFrame> {
    let height = rows.len();
    let mut out = Vec::with_capacity(columns.len());
    for spec in columns {
        let name = PlSmallStr::from(spec.name.as_str());
        let get = |row: &Map<String, Value>| row.get(&spec.name).cloned().unwrap_or(Value::Null);
        let column = match spec.ty {
            ColumnType::Float => Series::new(
                name,
                rows.iter().map(|r| get(r).as_f64()).collect::<Vec<_>>(),
            ),
            ColumnType::Int => Series::new(
                name,
                rows.iter().map(|r| get(r).as_i64()).collect::<Vec<_>>(),
            ),
            ColumnType::Bool => Series::new(
                name,
                rows.iter().map(|r| get(r).as_bool()).collect::<Vec<_>>(),
            ),
            ColumnType::Datetime => Series::new(
                name,
                rows.iter()
                    .map(|r| {
                        get(r)
                            .as_str()
                            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                            .map(|t| t.timestamp_micros())
                    })
                    .collect::<Vec<_>>(),
            )
            .into_datetime(TimeUnit::Microseconds, None),
            ColumnType::String | ColumnType::Date | ColumnType::Other => Series::new(
                name,
                rows.iter()
                    .map(|r| match get(r) {
                        Value::Null => None,
                        Value::String(s) => Some(s),
                        other => Some(other.to_string()),
                    })
                    .collect::<Vec<_>>(),
            ),
        };
        out.push(column.into_column());
    }
    DataFrame::new(height, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_rows_become_a_typed_frame() {
        let columns = vec![
            ColumnSpec {
                name: "n".into(),
                ty: ColumnType::Int,
            },
            ColumnSpec {
                name: "at".into(),
                ty: ColumnType::Datetime,
            },
        ];
        let rows: Vec<Map<String, Value>> = serde_json::from_str(
            r#"[{"n": 3, "at": "1970-01-01T01:00:00.000000Z"}, {"n": 4, "at": null}]"#,
        )
        .unwrap();
        let frame = rows_to_frame(&columns, &rows).unwrap();
        assert_eq!(frame.height(), 2);
        assert_eq!(frame.column("n").unwrap().i64().unwrap().get(1), Some(4));
        assert_eq!(frame.column("at").unwrap().null_count(), 1);
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
