//! Analyses written in Rust, shipped with Scholia, for the demo's power-grid kinds:
//! `generation` (stations reporting `output_mw`) and `demand` (regions reporting
//! `demand_mw`).

use std::sync::Arc;

use polars::prelude::*;

use scholia_events::Granularity;

use crate::analysis::Analysis;

const HOUR_MICROS: i64 = 3_600_000_000;

pub fn all() -> Vec<Arc<dyn Analysis>> {
    vec![
        Arc::new(DailyAverage),
        Arc::new(HourlyMovingAverage),
        Arc::new(DemandAnomalies),
    ]
}

/// Per source and day: mean, minimum and maximum output, and how many records.
pub struct DailyAverage;

impl Analysis for DailyAverage {
    fn name(&self) -> &str {
        "daily_avg"
    }
    fn version(&self) -> i64 {
        1
    }
    fn kind(&self) -> &str {
        "generation"
    }
    fn partition(&self) -> Granularity {
        Granularity::Day
    }
    fn description(&self) -> &str {
        "Per station and day: average, minimum and maximum output (MW), and the number of readings."
    }
    fn compute(&self, input: DataFrame) -> PolarsResult<DataFrame> {
        let input = ensure_float(input, "output_mw")?;
        input
            .lazy()
            .group_by([col("source")])
            .agg([
                col("output_mw").mean().alias("avg_mw"),
                col("output_mw").min().alias("min_mw"),
                col("output_mw").max().alias("max_mw"),
                len().cast(DataType::Int64).alias("readings"),
            ])
            .sort(["source"], SortMultipleOptions::default())
            .collect()
    }
}

/// Per source and hour of the day: mean output and its three-hour moving average.
pub struct HourlyMovingAverage;

impl Analysis for HourlyMovingAverage {
    fn name(&self) -> &str {
        "hourly_moving_avg"
    }
    fn version(&self) -> i64 {
        1
    }
    fn kind(&self) -> &str {
        "generation"
    }
    fn partition(&self) -> Granularity {
        Granularity::Day
    }
    fn description(&self) -> &str {
        "Per station and hour: average output (MW) and its moving average over the last three hours."
    }
    fn compute(&self, input: DataFrame) -> PolarsResult<DataFrame> {
        let input = ensure_float(input, "output_mw")?;
        let hour = (col("created").cast(DataType::Int64) / lit(HOUR_MICROS)).cast(DataType::Int64)
            * lit(HOUR_MICROS);
        input
            .lazy()
            .with_column(hour.alias("hour_us"))
            .group_by([col("source"), col("hour_us")])
            .agg([col("output_mw").mean().alias("avg_mw")])
            .sort(["source", "hour_us"], SortMultipleOptions::default())
            .with_column(
                col("avg_mw")
                    .rolling_mean(RollingOptionsFixedWindow {
                        window_size: 3,
                        min_periods: 1,
                        ..Default::default()
                    })
                    .over([col("source")])?
                    .alias("moving_avg_mw"),
            )
            .with_column(
                col("hour_us")
                    .cast(DataType::Datetime(TimeUnit::Microseconds, None))
                    .alias("hour"),
            )
            .select([
                col("hour"),
                col("source"),
                col("avg_mw"),
                col("moving_avg_mw"),
            ])
            .collect()
    }
}

/// Per region and hour: mean demand, its z-score against the region's day, and a flag
/// when it is more than two standard deviations away.
pub struct DemandAnomalies;

impl Analysis for DemandAnomalies {
    fn name(&self) -> &str {
        "demand_anomalies"
    }
    fn version(&self) -> i64 {
        1
    }
    fn kind(&self) -> &str {
        "demand"
    }
    fn partition(&self) -> Granularity {
        Granularity::Day
    }
    fn description(&self) -> &str {
        "Per region and hour: average demand (MW), its z-score within the day, and an anomaly flag when |z| > 2."
    }
    fn compute(&self, input: DataFrame) -> PolarsResult<DataFrame> {
        let input = ensure_float(input, "demand_mw")?;
        let hour = (col("created").cast(DataType::Int64) / lit(HOUR_MICROS)).cast(DataType::Int64)
            * lit(HOUR_MICROS);
        let z = (col("demand_mw") - col("demand_mw").mean().over([col("source")])?)
            / col("demand_mw").std(1).over([col("source")])?;
        input
            .lazy()
            .with_column(hour.alias("hour_us"))
            .group_by([col("source"), col("hour_us")])
            .agg([col("demand_mw").mean().alias("demand_mw")])
            .with_column(z.alias("z"))
            .with_column(
                col("z")
                    .abs()
                    .gt(lit(2.0))
                    .fill_null(lit(false))
                    .alias("anomaly"),
            )
            .with_column(
                col("hour_us")
                    .cast(DataType::Datetime(TimeUnit::Microseconds, None))
                    .alias("hour"),
            )
            .sort(["source", "hour_us"], SortMultipleOptions::default())
            .select([
                col("hour"),
                col("source"),
                col("demand_mw"),
                col("z"),
                col("anomaly"),
            ])
            .collect()
    }
}

/// Make sure `column` exists as Float64 (an empty partition, or one whose values were
/// all integers, would otherwise lack it or type it differently).
fn ensure_float(mut input: DataFrame, column: &str) -> PolarsResult<DataFrame> {
    let height = input.height();
    match input.column(column) {
        Ok(c) if c.dtype() == &DataType::Float64 => Ok(input),
        Ok(c) => {
            let cast = c.cast(&DataType::Float64)?;
            input.with_column(cast)?;
            Ok(input)
        }
        Err(_) => {
            input.with_column(
                Series::full_null(column.into(), height, &DataType::Float64).into_column(),
            )?;
            Ok(input)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation() -> DataFrame {
        let hour = HOUR_MICROS;
        DataFrame::new(
            5,
            vec![
                Series::new("source".into(), ["s1", "s1", "s1", "s2", "s2"]).into_column(),
                Series::new("created".into(), [0, hour, 2 * hour, 0, hour])
                    .into_datetime(TimeUnit::Microseconds, None)
                    .into_column(),
                Series::new(
                    "output_mw".into(),
                    [Some(10.0), Some(20.0), Some(30.0), Some(1.0), None],
                )
                .into_column(),
            ],
        )
        .unwrap()
    }

    #[test]
    fn daily_average_groups_by_source_and_skips_nulls() {
        let out = DailyAverage.compute(generation()).unwrap();
        assert_eq!(out.height(), 2);
        let avg = out.column("avg_mw").unwrap().f64().unwrap();
        assert_eq!(avg.get(0), Some(20.0));
        assert_eq!(avg.get(1), Some(1.0));
        assert_eq!(
            out.column("readings").unwrap().i64().unwrap().get(1),
            Some(2)
        );
    }

    #[test]
    fn the_moving_average_covers_the_last_three_hours_of_each_source() {
        let out = HourlyMovingAverage.compute(generation()).unwrap();
        let moving = out.column("moving_avg_mw").unwrap().f64().unwrap();
        assert_eq!(moving.get(0), Some(10.0));
        assert_eq!(moving.get(1), Some(15.0));
        assert_eq!(moving.get(2), Some(20.0));
    }

    #[test]
    fn an_empty_partition_gives_no_rows() {
        let empty = DataFrame::new(
            0,
            vec![
                Series::new("source".into(), Vec::<String>::new()).into_column(),
                Series::new("created".into(), Vec::<i64>::new())
                    .into_datetime(TimeUnit::Microseconds, None)
                    .into_column(),
            ],
        )
        .unwrap();
        assert_eq!(DailyAverage.compute(empty.clone()).unwrap().height(), 0);
        assert_eq!(DemandAnomalies.compute(empty).unwrap().height(), 0);
    }
}
