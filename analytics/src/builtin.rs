//! Analyses written in Rust, shipped with Scholia, for the demo's power-grid kinds:
//! `generation` (stations reporting `output_mw`) and `demand` (regions reporting
//! `demand_mw`).

use std::sync::{Arc, LazyLock};

use polars::prelude::*;

use scholia_events::Granularity;
use scholia_events::analysis::{AnalysisMeta, Input, Language, Lookback};

use crate::analysis::{Analysis, Inputs};

const HOUR_MICROS: i64 = 3_600_000_000;

pub fn all() -> Vec<Arc<dyn Analysis>> {
    vec![
        Arc::new(DailyAverage),
        Arc::new(HourlyMovingAverage),
        Arc::new(DemandAnomalies),
    ]
}

fn meta(name: &str, version: i64, inputs: Vec<Input>, description: &str) -> AnalysisMeta {
    AnalysisMeta {
        name: name.into(),
        version,
        partition: Granularity::Day,
        inputs,
        language: Language::Builtin,
        sql: None,
        description: description.into(),
        // Built-in analyses declare no key: their diffs match rows on non-measure columns.
        key: None,
    }
}

/// Per source and day: mean, minimum and maximum output, and how many records.
pub struct DailyAverage;

static DAILY_AVERAGE: LazyLock<AnalysisMeta> = LazyLock::new(|| {
    meta(
        "daily_avg",
        1,
        vec![Input::kind("generation")],
        "Per station and day: average, minimum and maximum output (MW), and the number of readings.",
    )
});

impl Analysis for DailyAverage {
    fn meta(&self) -> &AnalysisMeta {
        &DAILY_AVERAGE
    }

    fn compute(&self, inputs: Inputs) -> PolarsResult<DataFrame> {
        let input = ensure_float(inputs.kind("generation")?, "output_mw")?;
        if input.column("source")?.null_count() > 0 {
            return daily_average_lazy(input);
        }
        daily_average(&input)
    }
}

/// The daily average as Polars' own group-by computes it: the reference the direct one
/// is tested against, and the path for a frame with null sources.
fn daily_average_lazy(input: DataFrame) -> PolarsResult<DataFrame> {
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

/// One source's figures so far.
struct Station<'a> {
    source: &'a str,
    rows: i64,
    values: u32,
    sum: f64,
    min: f64,
    max: f64,
}

/// One integer for a string of at most 12 bytes kept in its view: `words` are the view's
/// last 12 bytes, where the string sits, read as the view's fields are (in the machine's
/// byte order). The bytes past the string are zero in views Polars makes; they are
/// cleared anyway, so that equal strings are always one key.
fn inline_key(length: u32, words: [u32; 3]) -> u128 {
    let [a, b, c] = words.map(|w| u128::from(u32::from_le_bytes(w.to_ne_bytes())));
    let bytes = a | b << 32 | c << 64;
    let string = bytes & ((1u128 << (8 * length)) - 1);
    string << 32 | u128::from(length)
}

/// The daily average in one pass over the frame, without nulls in `source`.
///
/// It is what every rewind of `daily_avg` runs, and Polars' hash group-by spent most of
/// its time finding the groups: hashing and comparing each row's string. Here a source of
/// at most 12 bytes (every station name) is found by its 16-byte string view, in which
/// Arrow keeps such a string whole, as one integer; a longer one by its text.
fn daily_average(input: &DataFrame) -> PolarsResult<DataFrame> {
    let sources = input.column("source")?.str()?.rechunk();
    let sources = sources.downcast_as_array();
    let mw = input.column("output_mw")?.f64()?.rechunk();
    let mw = mw.downcast_as_array();
    let values = mw.values();
    let valid = mw.validity().filter(|bits| bits.unset_bits() > 0);

    let mut stations: Vec<Station> = Vec::new();
    let mut short: PlHashMap<u128, usize> = PlHashMap::new();
    let mut long: PlHashMap<&str, usize> = PlHashMap::new();
    for (i, view) in sources.views().iter().enumerate() {
        let new = stations.len();
        let at = if view.length <= 12 {
            *short
                .entry(inline_key(
                    view.length,
                    [view.prefix, view.buffer_idx, view.offset],
                ))
                .or_insert(new)
        } else {
            *long.entry(sources.value(i)).or_insert(new)
        };
        if at == new {
            stations.push(Station {
                source: sources.value(i),
                rows: 0,
                values: 0,
                sum: 0.0,
                min: f64::INFINITY,
                max: f64::NEG_INFINITY,
            });
        }
        let station = &mut stations[at];
        station.rows += 1;
        if valid.is_none_or(|bits| bits.get_bit(i)) {
            let value = values[i];
            station.values += 1;
            station.sum += value;
            station.min = station.min.min(value);
            station.max = station.max.max(value);
        }
    }
    stations.sort_unstable_by(|a, b| a.source.cmp(b.source));

    let figure = |f: fn(&Station) -> f64| -> Vec<Option<f64>> {
        stations
            .iter()
            .map(|s| (s.values > 0).then(|| f(s)))
            .collect()
    };
    let columns = vec![
        Column::new(
            "source".into(),
            stations.iter().map(|s| s.source).collect::<Vec<_>>(),
        ),
        Column::new("avg_mw".into(), figure(|s| s.sum / f64::from(s.values))),
        Column::new("min_mw".into(), figure(|s| s.min)),
        Column::new("max_mw".into(), figure(|s| s.max)),
        Column::new(
            "readings".into(),
            stations.iter().map(|s| s.rows).collect::<Vec<_>>(),
        ),
    ];
    DataFrame::new(stations.len(), columns)
}

/// Per source and hour of the day: mean output and its moving average over the last
/// three hours, which reach into the day before at midnight (a two-hour lookback).
pub struct HourlyMovingAverage;

static HOURLY_MOVING_AVERAGE: LazyLock<AnalysisMeta> = LazyLock::new(|| {
    meta(
        "hourly_moving_avg",
        2,
        vec![Input {
            lookback: Some(Lookback::parse("PT2H").expect("a valid lookback")),
            ..Input::kind("generation")
        }],
        "Per station and hour: average output (MW) and its moving average over the last three hours (the two before included, across midnight).",
    )
});

impl Analysis for HourlyMovingAverage {
    fn meta(&self) -> &AnalysisMeta {
        &HOURLY_MOVING_AVERAGE
    }

    fn compute(&self, inputs: Inputs) -> PolarsResult<DataFrame> {
        let mut input = ensure_float(inputs.kind("generation")?, "output_mw")?;
        if input.column("in_partition").is_err() {
            let height = input.height();
            input.with_column(
                Series::new("in_partition".into(), vec![true; height]).into_column(),
            )?;
        }
        let hour = (col("created").cast(DataType::Int64) / lit(HOUR_MICROS)).cast(DataType::Int64)
            * lit(HOUR_MICROS);
        let hourly = input
            .lazy()
            .with_column(hour.alias("hour_us"))
            .group_by([col("source"), col("hour_us")])
            .agg([
                col("output_mw").mean().alias("avg_mw"),
                col("in_partition").any(true).alias("in_partition"),
            ]);
        // Each hour against the hours of its source up to two before it (hours without
        // readings are simply absent from the window).
        let window = hourly.clone().select([
            col("source"),
            col("hour_us").alias("window_hour"),
            col("avg_mw").alias("window_avg"),
        ]);
        hourly
            .filter(col("in_partition"))
            .join(
                window,
                [col("source")],
                [col("source")],
                JoinArgs::new(JoinType::Inner),
            )
            .filter(
                col("window_hour")
                    .lt_eq(col("hour_us"))
                    .and(col("window_hour").gt_eq(col("hour_us") - lit(2 * HOUR_MICROS))),
            )
            .group_by([col("source"), col("hour_us")])
            .agg([
                col("avg_mw").first().alias("avg_mw"),
                col("window_avg").mean().alias("moving_avg_mw"),
            ])
            .sort(["source", "hour_us"], SortMultipleOptions::default())
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

static DEMAND_ANOMALIES: LazyLock<AnalysisMeta> = LazyLock::new(|| {
    meta(
        "demand_anomalies",
        1,
        vec![Input::kind("demand")],
        "Per region and hour: average demand (MW), its z-score within the day, and an anomaly flag when |z| > 2.",
    )
});

impl Analysis for DemandAnomalies {
    fn meta(&self) -> &AnalysisMeta {
        &DEMAND_ANOMALIES
    }

    fn compute(&self, inputs: Inputs) -> PolarsResult<DataFrame> {
        let input = ensure_float(inputs.kind("demand")?, "demand_mw")?;
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
    use scholia_events::InputSource;

    fn frame(
        sources: &[&str],
        hours: &[i64],
        mw: &[Option<f64>],
        in_partition: Option<&[bool]>,
    ) -> DataFrame {
        let mut columns = vec![
            Series::new("source".into(), sources).into_column(),
            Series::new(
                "created".into(),
                hours.iter().map(|h| h * HOUR_MICROS).collect::<Vec<_>>(),
            )
            .into_datetime(TimeUnit::Microseconds, None)
            .into_column(),
            Series::new("output_mw".into(), mw).into_column(),
        ];
        if let Some(flags) = in_partition {
            columns.push(Series::new("in_partition".into(), flags).into_column());
        }
        DataFrame::new(sources.len(), columns).unwrap()
    }

    fn generation(frame: DataFrame) -> Inputs {
        let mut inputs = Inputs::new();
        inputs.insert(InputSource::Kind("generation".into()), frame);
        inputs
    }

    fn sample() -> DataFrame {
        frame(
            &["s1", "s1", "s1", "s2", "s2"],
            &[0, 1, 2, 0, 1],
            &[Some(10.0), Some(20.0), Some(30.0), Some(1.0), None],
            None,
        )
    }

    #[test]
    fn daily_average_groups_by_source_and_skips_nulls() {
        let out = DailyAverage.compute(generation(sample())).unwrap();
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
    fn the_direct_daily_average_is_polars_group_by() {
        let mut next = crate::testing::numbers(0xDA117);
        // Short names, names of exactly 12 bytes, and names too long to sit in a view.
        let names = [
            "s",
            "s1",
            "station-7",
            "abcdefghijkl",
            "abcdefghijk",
            "a-rather-long-station",
            "a-rather-long-station-2",
            "",
        ];
        for case in 0..40 {
            let parts: Vec<DataFrame> = (0..1 + case % 3)
                .map(|_| {
                    let rows = next(400) as usize;
                    let sources: Vec<&str> = (0..rows)
                        .map(|_| names[next(names.len() as u64) as usize])
                        .collect();
                    let hours: Vec<i64> = (0..rows).map(|_| next(24) as i64).collect();
                    // Some sources' values are all null in some cases.
                    let mw: Vec<Option<f64>> = sources
                        .iter()
                        .map(|s| {
                            (next(5) > 0 && !(case % 4 == 0 && *s == "s1"))
                                .then(|| next(100_000) as f64 / 7.0 - 3000.0)
                        })
                        .collect();
                    frame(&sources, &hours, &mw, None)
                })
                .collect();
            let mut input = parts[0].clone();
            for part in &parts[1..] {
                input.vstack_mut(part).unwrap();
            }
            let direct = daily_average(&input).unwrap();
            let polars = daily_average_lazy(input.clone()).unwrap();
            assert_eq!(direct.schema(), polars.schema(), "case {case}");
            for column in ["source", "readings"] {
                assert!(
                    direct
                        .column(column)
                        .unwrap()
                        .equals_missing(polars.column(column).unwrap()),
                    "case {case}: {direct}\n{polars}"
                );
            }
            for column in ["avg_mw", "min_mw", "max_mw"] {
                let a = direct.column(column).unwrap().f64().unwrap();
                let b = polars.column(column).unwrap().f64().unwrap();
                for (x, y) in a.iter().zip(b.iter()) {
                    let same = match (x, y) {
                        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * y.abs().max(1.0),
                        (x, y) => x == y,
                    };
                    assert!(
                        same,
                        "case {case}, {column}: {x:?} != {y:?}\n{direct}\n{polars}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_moving_average_covers_the_last_three_hours_of_each_source() {
        let out = HourlyMovingAverage.compute(generation(sample())).unwrap();
        let moving = out.column("moving_avg_mw").unwrap().f64().unwrap();
        assert_eq!(moving.get(0), Some(10.0));
        assert_eq!(moving.get(1), Some(15.0));
        assert_eq!(moving.get(2), Some(20.0));
    }

    #[test]
    fn the_moving_average_reaches_into_the_lookback_but_reports_only_its_day() {
        // Hours 22 and 23 of the day before, then 00 and 01.
        let input = frame(
            &["s", "s", "s", "s"],
            &[22, 23, 24, 25],
            &[Some(230.8), Some(243.8), Some(241.5), Some(250.0)],
            Some(&[false, false, true, true]),
        );
        let out = HourlyMovingAverage.compute(generation(input)).unwrap();
        assert_eq!(out.height(), 2, "only the partition's own hours: {out}");
        let moving = out.column("moving_avg_mw").unwrap().f64().unwrap();
        assert!((moving.get(0).unwrap() - 238.7).abs() < 1e-9, "{out}");
        assert!((moving.get(1).unwrap() - (243.8 + 241.5 + 250.0) / 3.0).abs() < 1e-9);
    }

    #[test]
    fn an_empty_partition_gives_no_rows() {
        let empty = frame(&[], &[], &[], None);
        assert_eq!(
            DailyAverage
                .compute(generation(empty.clone()))
                .unwrap()
                .height(),
            0
        );
        assert_eq!(
            HourlyMovingAverage
                .compute(generation(empty.clone()))
                .unwrap()
                .height(),
            0
        );
        let mut demand = Inputs::new();
        demand.insert(InputSource::Kind("demand".into()), empty);
        assert_eq!(DemandAnomalies.compute(demand).unwrap().height(), 0);
    }
}
