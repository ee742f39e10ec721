//! Annotation frames as JSON: the columns (name and type) and the rows as objects, the
//! form in which annotations are stored and served; and back to a frame, for Arrow.

use chrono::{DateTime, NaiveDate};
use polars::prelude::*;
use serde_json::{Map, Value};

use scholia_events::analysis::{ColumnSpec, ColumnType};

/// A frame as its column specs and its rows. Times are written as RFC 3339 (UTC), dates
/// as `YYYY-MM-DD`, NaN and infinities as null.
pub type Rows = (Vec<ColumnSpec>, Vec<Map<String, Value>>);

pub fn frame_to_rows(frame: &DataFrame) -> PolarsResult<Rows> {
    let columns: Vec<ColumnSpec> = frame
        .columns()
        .iter()
        .map(|c| ColumnSpec {
            name: c.name().to_string(),
            ty: column_type(c.dtype()),
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

fn column_type(dtype: &DataType) -> ColumnType {
    match dtype {
        DataType::Float32 | DataType::Float64 => ColumnType::Float,
        dt if dt.is_integer() => ColumnType::Int,
        DataType::Boolean => ColumnType::Bool,
        DataType::String => ColumnType::String,
        DataType::Date => ColumnType::Date,
        DataType::Datetime(_, _) => ColumnType::Datetime,
        _ => ColumnType::Other,
    }
}

fn series_values(series: &Series) -> PolarsResult<Vec<Value>> {
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
            columns.iter().map(|c| c.ty).collect::<Vec<_>>(),
            [
                ColumnType::String,
                ColumnType::Float,
                ColumnType::Int,
                ColumnType::Datetime
            ]
        );
        assert_eq!(rows[0]["avg"], 1.5);
        assert_eq!(rows[1]["avg"], Value::Null);
        assert_eq!(rows[1]["at"], "1970-01-01T01:00:00.000000Z");
    }
}
