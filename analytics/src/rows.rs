//! Annotation frames as JSON: the columns (name and type) and the rows as objects, the
//! form in which annotations are stored and served; and back to a frame, for Arrow.

use chrono::{DateTime, NaiveDate};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSpec {
    pub name: String,
    /// `float`, `int`, `bool`, `string`, `date`, `datetime` or `other`.
    #[serde(rename = "type")]
    pub ty: String,
}

/// The columns and rows of a frame. Times are written as RFC 3339 (UTC), dates as
/// `YYYY-MM-DD`, NaN and infinities as null.
/// A frame as its column specs and its rows.
pub type Rows = (Vec<ColumnSpec>, Vec<Map<String, Value>>);

pub fn frame_to_rows(frame: &DataFrame) -> Result<Rows> {
    let columns: Vec<ColumnSpec> = frame
        .columns()
        .iter()
        .map(|c| ColumnSpec {
            name: c.name().to_string(),
            ty: type_name(c.dtype()).to_string(),
        })
        .collect();
    let mut rows: Vec<Map<String, Value>> = (0..frame.height())
        .map(|_| Map::with_capacity(columns.len()))
        .collect();
    for column in frame.columns() {
        let name = column.name().to_string();
        let series = column.as_materialized_series();
        let values = series_values(series)?;
        for (row, value) in rows.iter_mut().zip(values) {
            row.insert(name.clone(), value);
        }
    }
    Ok((columns, rows))
}

fn type_name(dtype: &DataType) -> &'static str {
    match dtype {
        DataType::Float32 | DataType::Float64 => "float",
        dt if dt.is_integer() => "int",
        DataType::Boolean => "bool",
        DataType::String => "string",
        DataType::Date => "date",
        DataType::Datetime(_, _) => "datetime",
        _ => "other",
    }
}

fn series_values(series: &Series) -> Result<Vec<Value>> {
    let out = match series.dtype() {
        DataType::Float32 | DataType::Float64 => {
            let s = series.cast(&DataType::Float64)?;
            s.f64()?
                .iter()
                .map(|v| {
                    v.and_then(serde_json::Number::from_f64)
                        .map(Value::Number)
                        .unwrap_or(Value::Null)
                })
                .collect()
        }
        dt if dt.is_unsigned_integer() => {
            let s = series.cast(&DataType::UInt64)?;
            s.u64()?
                .iter()
                .map(|v| v.map(Value::from).unwrap_or(Value::Null))
                .collect()
        }
        dt if dt.is_integer() => {
            let s = series.cast(&DataType::Int64)?;
            s.i64()?
                .iter()
                .map(|v| v.map(Value::from).unwrap_or(Value::Null))
                .collect()
        }
        DataType::Boolean => series
            .bool()?
            .iter()
            .map(|v| v.map(Value::Bool).unwrap_or(Value::Null))
            .collect(),
        DataType::String => series
            .str()?
            .iter()
            .map(|v| {
                v.map(|s| Value::String(s.to_string()))
                    .unwrap_or(Value::Null)
            })
            .collect(),
        DataType::Date => {
            let s = series.cast(&DataType::Int32)?;
            let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("the epoch is a date");
            s.i32()?
                .iter()
                .map(|v| {
                    v.and_then(|d| epoch.checked_add_signed(chrono::Duration::days(d as i64)))
                        .map(|d| Value::String(d.format("%Y-%m-%d").to_string()))
                        .unwrap_or(Value::Null)
                })
                .collect()
        }
        DataType::Datetime(unit, _) => {
            let unit = *unit;
            let s = series.cast(&DataType::Int64)?;
            s.i64()?
                .iter()
                .map(|v| {
                    v.and_then(|x| match unit {
                        TimeUnit::Nanoseconds => Some(DateTime::from_timestamp_nanos(x)),
                        TimeUnit::Microseconds => DateTime::from_timestamp_micros(x),
                        TimeUnit::Milliseconds => DateTime::from_timestamp_millis(x),
                    })
                    .map(|t| Value::String(scholia_events::envelope::format_time(t)))
                    .unwrap_or(Value::Null)
                })
                .collect()
        }
        _ => {
            let s = series.cast(&DataType::String)?;
            s.str()?
                .iter()
                .map(|v| {
                    v.map(|s| Value::String(s.to_string()))
                        .unwrap_or(Value::Null)
                })
                .collect()
        }
    };
    Ok(out)
}

/// Rebuild a frame from stored columns and rows (for Arrow output). Extra columns
/// (such as `partition`) may be prepended by the caller.
pub fn rows_to_frame(columns: &[ColumnSpec], rows: &[Map<String, Value>]) -> Result<DataFrame> {
    let height = rows.len();
    let mut out = Vec::with_capacity(columns.len());
    for spec in columns {
        let name = PlSmallStr::from(spec.name.as_str());
        let get = |row: &Map<String, Value>| row.get(&spec.name).cloned().unwrap_or(Value::Null);
        let column = match spec.ty.as_str() {
            "float" => Series::new(
                name,
                rows.iter().map(|r| get(r).as_f64()).collect::<Vec<_>>(),
            ),
            "int" => Series::new(
                name,
                rows.iter().map(|r| get(r).as_i64()).collect::<Vec<_>>(),
            ),
            "bool" => Series::new(
                name,
                rows.iter().map(|r| get(r).as_bool()).collect::<Vec<_>>(),
            ),
            "datetime" => Series::new(
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
            _ => Series::new(
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
    Ok(DataFrame::new(height, out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_becomes_rows_with_nulls_and_times_in_text() {
        let frame = DataFrame::new(
            2,
            vec![
                Series::new("source".into(), ["a", "b"]).into_column(),
                Series::new("avg".into(), [Some(1.5), None]).into_column(),
                Series::new("n".into(), [3i64, 4]).into_column(),
                Series::new("at".into(), [0i64, 3_600_000_000])
                    .into_datetime(TimeUnit::Microseconds, None)
                    .into_column(),
            ],
        )
        .unwrap();
        let (columns, rows) = frame_to_rows(&frame).unwrap();
        assert_eq!(
            columns.iter().map(|c| c.ty.as_str()).collect::<Vec<_>>(),
            ["string", "float", "int", "datetime"]
        );
        assert_eq!(rows[0]["avg"], 1.5);
        assert_eq!(rows[1]["avg"], Value::Null);
        assert_eq!(rows[1]["at"], "1970-01-01T01:00:00.000000Z");
        let back = rows_to_frame(&columns, &rows).unwrap();
        assert_eq!(back.height(), 2);
        assert_eq!(back.column("n").unwrap().i64().unwrap().get(1), Some(4));
    }
}
