//! Lock-free counters the data path updates and the admin plane exposes in the Prometheus text
//! format: counts by HTTP status class and fixed-bucket latency histograms. Written by hand (a
//! few atomics) rather than pulling a metrics registry into the hot path.
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use http::StatusCode;

/// Counts by status class: `[1xx, 2xx, 3xx, 4xx, 5xx]`.
#[derive(Debug, Default)]
pub struct StatusClasses([AtomicU64; 5]);

pub const CLASS_LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl StatusClasses {
    pub fn count(&self, status: StatusCode) {
        let i = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.0[i].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.0[i].load(Relaxed))
    }
}

/// Upper bounds, in seconds, of the identity fetch histogram: a file read takes microseconds, a
/// token endpoint or the Kubernetes API milliseconds to seconds (the client gives up at 15 s).
pub const FETCH_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 15.0,
];

/// A histogram over [`FETCH_BUCKETS`]; buckets hold non-cumulative counts.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; FETCH_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// A point-in-time copy of a [`Histogram`], which can be added up across proxies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: [u64; FETCH_BUCKETS.len()],
    pub count: u64,
    pub sum_micros: u64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = FETCH_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            count: self.count.load(Relaxed),
            sum_micros: self.sum_micros.load(Relaxed),
        }
    }
}

impl HistogramSnapshot {
    pub fn add(&mut self, other: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_micros += other.sum_micros;
    }

    /// `_bucket` (cumulative, with `+Inf`), `_sum` and `_count` lines for `name{labels}`.
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in FETCH_BUCKETS.iter().zip(self.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            braces(labels),
            self.sum_micros as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// A label value escaped for the text format (backslash, double quote, newline).
pub fn escape_label(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_histogram() {
        let c = StatusClasses::default();
        for s in [200, 204, 503, 101, 404] {
            c.count(StatusCode::from_u16(s).unwrap());
        }
        assert_eq!(c.snapshot(), [1, 2, 0, 1, 1]);

        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let snap = h.snapshot();
        assert_eq!(snap.count, 3);
        let mut twice = snap.clone();
        twice.add(&snap);
        assert_eq!(twice.count, 6);
        let mut out = String::new();
        snap.write(&mut out, "x_seconds", "rule=\"a\"");
        assert!(
            out.contains("x_seconds_bucket{rule=\"a\",le=\"0.0001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{rule=\"a\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        // Beyond the last bound: only in +Inf.
        assert!(
            out.contains("x_seconds_bucket{rule=\"a\",le=\"15\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{rule=\"a\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_sum{rule=\"a\"} 20.00305\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{rule=\"a\"} 3\n"), "{out}");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
