//! Counters by document, rendered in the Prometheus text exposition format (0.0.4) by hand:
//! four counters and a gauge do not justify a metrics crate.
use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

use super::cache::Document;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Default)]
pub struct Metrics {
    hits: [AtomicU64; 2],
    misses: [AtomicU64; 2],
    stale: [AtomicU64; 2],
    upstream_errors: [AtomicU64; 2],
}

impl Metrics {
    pub fn hit(&self, doc: Document) {
        self.hits[doc as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn miss(&self, doc: Document) {
        self.misses[doc as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn stale(&self, doc: Document) {
        self.stale[doc as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_error(&self, doc: Document) {
        self.upstream_errors[doc as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, ready: bool) -> String {
        let mut out = String::new();
        let families: [(&str, &str, &[AtomicU64; 2]); 4] = [
            (
                "robin_oidc_cache_hits_total",
                "Requests served from a fresh cached copy without fetching it.",
                &self.hits,
            ),
            (
                "robin_oidc_cache_misses_total",
                "Requests that fetched the document from the API server.",
                &self.misses,
            ),
            (
                "robin_oidc_stale_served_total",
                "Requests served a copy past its TTL because the API server failed.",
                &self.stale,
            ),
            (
                "robin_oidc_upstream_errors_total",
                "Failed fetches from the API server.",
                &self.upstream_errors,
            ),
        ];
        for (name, help, values) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for doc in Document::ALL {
                let value = values[doc as usize].load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{document=\"{}\"}} {value}", doc.label());
            }
        }
        let _ = writeln!(
            out,
            "# HELP robin_oidc_ready Whether every document has been fetched at least once."
        );
        let _ = writeln!(out, "# TYPE robin_oidc_ready gauge");
        let _ = writeln!(out, "robin_oidc_ready {}", u8::from(ready));
        out
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
        assert!(text.contains("# TYPE robin_oidc_cache_hits_total counter\n"));
        assert!(text.contains("robin_oidc_cache_hits_total{document=\"jwks\"} 2\n"));
        assert!(
            text.contains("robin_oidc_cache_misses_total{document=\"openid-configuration\"} 1\n")
        );
        assert!(text.contains("robin_oidc_ready 1\n"));
        // Every sample line belongs to a family announced by HELP and TYPE before it.
        let mut typed = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.iter().any(|t| t == name), "untyped sample {line}");
            }
        }
    }
}
