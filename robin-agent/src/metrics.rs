//! What every mode's metrics share: the OpenMetrics text exposition of one `prometheus-client`
//! [`Registry`] per process (each module registers its own typed families into it), the
//! `class` label of HTTP status counts, and a lock-free latency histogram.
//!
//! Hot-path counters are `prometheus-client` [`Counter`]s resolved once per label set (a rule
//! when its proxy is built, a status class at start-up), so counting is one relaxed atomic add,
//! never a family lookup.
use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use prometheus_client::{
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
        MetricEncoder, NoLabelSet, text,
    },
    metrics::{MetricType, TypedMetric, counter::Counter},
    registry::Registry,
};

use crate::admin::{self, AdminHandler};

/// The OpenMetrics text format, which `prometheus_client::encoding::text` writes and every
/// Prometheus since 2.5 scrapes.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry in the OpenMetrics text format, `# EOF` included.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a family.
    if let Err(e) = text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics");
    }
    out
}

/// `/metrics` on the admin plane: the process's one registry.
pub struct Scrape(pub Registry);

impl AdminHandler for Scrape {
    fn get(&self) -> Response<Full<Bytes>> {
        admin::text(StatusCode::OK, OPENMETRICS_TEXT, encode(&self.0))
    }
}

/// Writes one family of a [`prometheus_client::collector::Collector`]: `metric` (a
/// `ConstGauge`, `ConstCounter`...) under `name`. Unlike `Registry::register`, the encoder
/// writes `help` as given: end it with a full stop.
pub fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Writes one labelled family of a collector: a `(labels, metric)` sample each.
pub fn encode_family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The `class` label: an HTTP status class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

impl StatusClass {
    pub const ALL: [Self; 5] = [
        Self::Informational,
        Self::Success,
        Self::Redirection,
        Self::ClientError,
        Self::ServerError,
    ];

    pub fn of(status: StatusCode) -> Self {
        match status.as_u16() {
            ..=199 => Self::Informational,
            200..=299 => Self::Success,
            300..=399 => Self::Redirection,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }

    pub fn as_str(self) -> &'static str {
        ["1xx", "2xx", "3xx", "4xx", "5xx"][self as usize]
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// One counter per status class, resolved from a family once.
#[derive(Clone, Debug, Default)]
pub struct ByClass([Counter; 5]);

impl ByClass {
    /// The counters `counter(class)` gives, e.g. a family's series for one rule.
    pub fn new(counter: impl Fn(StatusClass) -> Counter) -> Self {
        Self(StatusClass::ALL.map(counter))
    }

    pub fn count(&self, status: StatusCode) {
        self.0[StatusClass::of(status) as usize].inc();
    }

    pub fn get(&self, class: StatusClass) -> u64 {
        self.0[class as usize].get()
    }
}

/// Upper bounds, in seconds, of the identity fetch histogram: a file read takes microseconds, a
/// token endpoint or the Kubernetes API milliseconds to seconds (the client gives up at 15 s).
pub const FETCH_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 15.0,
];

/// A histogram over [`FETCH_BUCKETS`] (plus `+Inf`) that observes with two relaxed atomic adds
/// and no lock (`prometheus_client`'s own histogram takes a mutex per observation). Clones
/// share their counts; encoded through the typed encoder like any other metric.
#[derive(Clone, Debug, Default)]
pub struct Histogram(Arc<HistogramCounts>);

#[derive(Debug, Default)]
struct HistogramCounts {
    /// Non-cumulative counts; the last is the `+Inf` bucket. The count is their sum, so a
    /// scrape never sees a count that disagrees with its buckets.
    buckets: [AtomicU64; FETCH_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = FETCH_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(FETCH_BUCKETS.len());
        self.0.buckets[i].fetch_add(1, Relaxed);
        self.0
            .sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = FETCH_BUCKETS
            .iter()
            .chain(&[f64::INFINITY])
            .zip(&self.0.buckets)
            .map(|(&bound, n)| (bound, n.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.0.sum_micros.load(Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The label set of families labelled by status class only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: StatusClass,
}

#[cfg(test)]
mod tests {
    use prometheus_client::{metrics::family::Family, registry::Unit};

    use super::*;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct RuleLabels {
        rule: String,
    }

    #[test]
    fn classes_and_histogram_encode_as_openmetrics() {
        let mut registry = Registry::default();
        let family = Family::<ClassLabels, Counter>::default();
        registry.register("x_requests", "Requests", family.clone());
        let c = ByClass::new(|class| family.get_or_create_owned(&ClassLabels { class }));
        for s in [200, 204, 503, 101, 404] {
            c.count(StatusCode::from_u16(s).unwrap());
        }
        assert_eq!(c.get(StatusClass::Success), 2);

        let fetch = Family::<RuleLabels, Histogram>::default();
        registry.register_with_unit("x_fetch", "Fetches", Unit::Seconds, fetch.clone());
        let h = fetch.get_or_create_owned(&RuleLabels {
            rule: "a\"b".into(),
        });
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        assert_eq!(h.count(), 3);

        let out = encode(&registry);
        for line in [
            "# HELP x_requests Requests.\n# TYPE x_requests counter\n",
            "x_requests_total{class=\"2xx\"} 2\n",
            "x_requests_total{class=\"3xx\"} 0\n",
            "x_requests_total{class=\"5xx\"} 1\n",
            "# TYPE x_fetch_seconds histogram\n",
            "# UNIT x_fetch_seconds seconds\n",
            // Label values are escaped by the encoder.
            "x_fetch_seconds_bucket{le=\"0.0001\",rule=\"a\\\"b\"} 1\n",
            "x_fetch_seconds_bucket{le=\"0.005\",rule=\"a\\\"b\"} 2\n",
            // Beyond the last bound: only in +Inf.
            "x_fetch_seconds_bucket{le=\"15.0\",rule=\"a\\\"b\"} 2\n",
            "x_fetch_seconds_bucket{le=\"+Inf\",rule=\"a\\\"b\"} 3\n",
            "x_fetch_seconds_sum{rule=\"a\\\"b\"} 20.0030",
            "x_fetch_seconds_count{rule=\"a\\\"b\"} 3\n",
        ] {
            assert!(out.contains(line), "{line} not in\n{out}");
        }
        assert!(out.ends_with("# EOF\n"), "{out}");
    }
}
