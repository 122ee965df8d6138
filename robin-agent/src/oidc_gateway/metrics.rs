//! The gateway's families, in its one `prometheus-client` registry, exposed in the OpenMetrics
//! text format.
use std::fmt::Write as _;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::cache::Document;

pub use crate::metrics::OPENMETRICS_TEXT as CONTENT_TYPE;

impl EncodeLabelValue for Document {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DocumentLabels {
    document: Document,
}

/// One counter per document, resolved from its family once.
struct ByDocument([Counter; 2]);

impl ByDocument {
    fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let family = Family::<DocumentLabels, Counter>::default();
        registry.register(name, help, family.clone());
        Self(Document::ALL.map(|document| family.get_or_create_owned(&DocumentLabels { document })))
    }

    fn inc(&self, doc: Document) {
        self.0[doc as usize].inc();
    }
}

pub struct Metrics {
    registry: Registry,
    hits: ByDocument,
    misses: ByDocument,
    stale: ByDocument,
    upstream_errors: ByDocument,
    ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut by_doc = |name, help| ByDocument::register(&mut registry, name, help);
        let hits = by_doc(
            "robin_oidc_cache_hits",
            "Requests served from a fresh cached copy without fetching it",
        );
        let misses = by_doc(
            "robin_oidc_cache_misses",
            "Requests that fetched the document from the API server",
        );
        let stale = by_doc(
            "robin_oidc_stale_served",
            "Requests served a copy past its TTL because the API server failed",
        );
        let upstream_errors = by_doc(
            "robin_oidc_upstream_errors",
            "Failed fetches from the API server",
        );
        let ready = Gauge::default();
        registry.register(
            "robin_oidc_ready",
            "Whether every document has been fetched at least once",
            ready.clone(),
        );
        Self {
            registry,
            hits,
            misses,
            stale,
            upstream_errors,
            ready,
        }
    }
}

impl Metrics {
    pub fn hit(&self, doc: Document) {
        self.hits.inc(doc);
    }

    pub fn miss(&self, doc: Document) {
        self.misses.inc(doc);
    }

    pub fn stale(&self, doc: Document) {
        self.stale.inc(doc);
    }

    pub fn upstream_error(&self, doc: Document) {
        self.upstream_errors.inc(doc);
    }

    /// The registry in the OpenMetrics text format, with readiness as of now.
    pub fn render(&self, ready: bool) -> String {
        self.ready.set(i64::from(ready));
        crate::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_labelled_samples() {
        let m = Metrics::default();
        m.hit(Document::Jwks);
        m.hit(Document::Jwks);
        m.miss(Document::Discovery);
        let text = m.render(true);
        assert!(text.contains("# TYPE robin_oidc_cache_hits counter\n"));
        assert!(text.contains("robin_oidc_cache_hits_total{document=\"jwks\"} 2\n"));
        assert!(
            text.contains("robin_oidc_cache_misses_total{document=\"openid-configuration\"} 1\n")
        );
        assert!(text.contains("robin_oidc_stale_served_total{document=\"jwks\"} 0\n"));
        assert!(text.contains("robin_oidc_ready 1\n"));
        assert!(text.ends_with("# EOF\n"));
        // Every sample line belongs to a family announced by HELP and TYPE before it.
        let mut typed = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = name.strip_suffix("_total").unwrap_or(name);
                assert!(typed.iter().any(|t| t == family), "untyped sample {line}");
            }
        }
    }
}
