//! Annotations as CSV and as Arrow (IPC stream), one row per annotation row, with the
//! partition and generation first.

use polars::prelude::*;
use serde_json::{Map, Value};

use scholia_analytics::rows::{ColumnSpec, rows_to_frame};

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
            row.insert("partition".into(), Value::String(view.partition.clone()));
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
            ty: "string".into(),
        },
        ColumnSpec {
            name: "generation".into(),
            ty: "int".into(),
        },
    ];
    specs.extend(
        columns(views)
            .into_iter()
            .filter(|c| c.name != "partition" && c.name != "generation"),
    );
    let mut frame = rows_to_frame(&specs, &rows(views))
        .map_err(|e| PolarsError::ComputeError(e.to_string().into()))?;
    let mut buffer = Vec::new();
    IpcStreamWriter::new(&mut buffer).finish(&mut frame)?;
    Ok(buffer)
}
