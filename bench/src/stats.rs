//! Summaries of latency samples, and what `/proc` says about processes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// Milliseconds from `ack` to `received`, or 0 when the message came first.
pub(crate) fn latency_ms(ack: Instant, received: Instant) -> f64 {
    received.saturating_duration_since(ack).as_secs_f64() * 1_000.0
}

/// The nearest-rank `q`-quantile (0 < q ≤ 1) of sorted samples.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Sort samples in place (they are finite milliseconds).
pub(crate) fn sort(samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
}

/// p50, p99, max and mean of sorted samples, in milliseconds rounded to 0.01;
/// `null` when there are none.
pub(crate) fn summary(sorted: &[f64]) -> Value {
    let mean = (!sorted.is_empty()).then(|| sorted.iter().sum::<f64>() / sorted.len() as f64);
    json!({
        "p50_ms": quantile(sorted, 0.50).map(round2),
        "p99_ms": quantile(sorted, 0.99).map(round2),
        "max_ms": sorted.last().copied().map(round2),
        "mean_ms": mean.map(round2),
    })
}

/// Copy the fields of `extra` (an object) into `report` (an object).
pub(crate) fn merge(report: &mut Value, extra: Value) {
    if let (Value::Object(report), Value::Object(extra)) = (report, extra) {
        report.extend(extra);
    }
}

/// Round to two decimals.
pub(crate) fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Seconds as a number rounded to milliseconds.
pub(crate) fn seconds(elapsed: Duration) -> f64 {
    (elapsed.as_secs_f64() * 1_000.0).round() / 1_000.0
}

/// A process's resident memory now and at its peak (`VmRSS`, `VmHWM`), in MB.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    pub(crate) rss_mb: f64,
    pub(crate) hwm_mb: f64,
}

/// Read `/proc/<pid>/status` (`pid` may be `self`).
pub(crate) fn memory(pid: &str) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}; is --server-pid the server's process id?"))?;
    let field = |name: &str| -> Result<f64> {
        let kb = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .with_context(|| format!("{path} has no {name} line"))?;
        Ok(round2(kb / 1_024.0))
    };
    Ok(Memory {
        rss_mb: field("VmRSS:")?,
        hwm_mb: field("VmHWM:")?,
    })
}

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user and system) a process has used so far, in seconds, from
/// `/proc/<pid>/stat` (`pid` may be `self`); `None` when it cannot be read.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields follow it,
    // starting with the state (field 3); utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |field: usize| fields.get(field - 3)?.parse::<f64>().ok();
    Some((ticks(14)? + ticks(15)?) / TICKS_PER_SECOND)
}

/// This process's soft limit on open files, from `/proc/self/limits`, if it says.
pub(crate) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let mut samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        sort(&mut samples);
        assert_eq!(quantile(&samples, 0.5), Some(50.0));
        assert_eq!(quantile(&samples, 0.99), Some(99.0));
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(summary(&[])["p99_ms"], Value::Null);
    }

    #[test]
    fn a_message_before_the_ack_counts_as_zero() {
        let received = Instant::now();
        let ack = received + Duration::from_millis(5);
        assert_eq!(latency_ms(ack, received), 0.0);
    }

    #[test]
    fn this_process_has_memory_and_a_file_limit() {
        let memory = memory("self").unwrap();
        assert!(memory.rss_mb > 0.0 && memory.hwm_mb >= memory.rss_mb);
        assert!(open_files_limit().is_some());
        assert!(cpu_seconds("self").is_some_and(|s| s >= 0.0));
    }
}
