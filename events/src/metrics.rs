//! A small metrics registry rendered in the Prometheus text format. Counters and gauges
//! are atomics; histograms have fixed buckets. A name is registered the first time it is
//! asked for, and the same metric is returned on every later call.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<&'static str, (&'static str, Arc<AtomicU64>)>>,
    gauges: Mutex<BTreeMap<&'static str, (&'static str, Arc<AtomicU64>)>>,
    histograms: Mutex<BTreeMap<&'static str, (&'static str, Arc<Histogram>)>>,
}

/// Latency buckets in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn counter(&self, name: &'static str, help: &'static str) -> Arc<AtomicU64> {
        self.counters
            .lock()
            .expect("metrics lock")
            .entry(name)
            .or_insert_with(|| (help, Arc::default()))
            .1
            .clone()
    }

    pub fn gauge(&self, name: &'static str, help: &'static str) -> Arc<AtomicU64> {
        self.gauges
            .lock()
            .expect("metrics lock")
            .entry(name)
            .or_insert_with(|| (help, Arc::default()))
            .1
            .clone()
    }

    pub fn histogram(&self, name: &'static str, help: &'static str) -> Arc<Histogram> {
        self.histograms
            .lock()
            .expect("metrics lock")
            .entry(name)
            .or_insert_with(|| {
                (
                    help,
                    Arc::new(Histogram {
                        buckets: Default::default(),
                        count: AtomicU64::new(0),
                        sum_micros: AtomicU64::new(0),
                    }),
                )
            })
            .1
            .clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, (help, value)) in self.counters.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        for (name, (help, value)) in self.gauges.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        for (name, (help, h)) in self.histograms.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{le=\"{bound}\"}} {}",
                    h.buckets[i].load(Ordering::Relaxed)
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
            let _ = writeln!(
                out,
                "{name}_sum {}",
                h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "{name}_count {count}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_the_prometheus_text_format() {
        let m = Metrics::default();
        m.counter("scholia_things_total", "Things.")
            .fetch_add(3, Ordering::Relaxed);
        m.histogram("scholia_latency_seconds", "Latency.")
            .observe(0.003);
        let text = m.render();
        assert!(text.contains("scholia_things_total 3"));
        assert!(text.contains("scholia_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("scholia_latency_seconds_count 1"));
    }
}
