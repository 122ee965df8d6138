//! `robin node`'s own families in the process's one registry: readiness and the pod table,
//! read at each scrape. The proxy families every pod's proxy counts into, the connection cap
//! and the kernel's refusals are registered by their modules (see `node::run`).
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::gauge::ConstGauge,
    registry::Registry,
};

use crate::{
    admin::Readiness,
    metrics::{encode_family, encode_one},
};

use super::pods::{NodeShared, PodState};

#[derive(Debug, EncodeLabelSet)]
struct PodLabels {
    state: PodState,
}

/// `robin_ready` and `robin_pods{state}`.
struct NodeCollector {
    shared: Arc<NodeShared>,
    readiness: Readiness,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_one(
            &mut encoder,
            "robin_ready",
            "1 when programs are loaded, the pod watch synced and the CA loaded.",
            &ConstGauge::new(i64::from(self.readiness.is_ready())),
        )?;
        let by_state: Vec<_> = {
            let pods = self.shared.pods.lock().expect("pods lock");
            PodState::ALL
                .iter()
                .map(|&state| {
                    let n = pods.values().filter(|p| p.state == state).count();
                    (PodLabels { state }, ConstGauge::new(n))
                })
                .collect()
        };
        encode_family(
            &mut encoder,
            "robin_pods",
            "Opted-in pods on this node by state (the states of /debug/pods).",
            by_state,
        )
    }
}

/// Registers the node's own families.
pub fn register(registry: &mut Registry, shared: Arc<NodeShared>, readiness: Readiness) {
    registry.register_collector(Box::new(NodeCollector { shared, readiness }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        metrics::encode,
        node::pods::PodView,
        proxy::{ProxyStats, RuleStats},
    };
    use http::StatusCode;

    fn pod(uid: &str, state: PodState) -> PodView {
        PodView {
            namespace: "ns".into(),
            name: uid.into(),
            uid: uid.into(),
            state,
            error: None,
            rule_set: Some("default".into()),
            cgroup: None,
            pid: Some(1),
            listener_port: Some(15001),
            ports: Some(vec![443]),
            token_path: None,
            token_visible: Some(true),
            captured_at_unix: None,
            adopted: None,
        }
    }

    /// The node's registry as `node::run` builds it, minus the eBPF refusal counters.
    fn node_registry(readiness: Readiness) -> (Registry, Arc<NodeShared>) {
        let mut registry = Registry::default();
        let shared = Arc::new(NodeShared {
            pods: Default::default(),
            proxy_stats: Arc::new(ProxyStats::register(&mut registry)),
        });
        register(&mut registry, shared.clone(), readiness);
        (registry, shared)
    }

    #[test]
    fn metrics_reflect_state() {
        let readiness = Readiness::default();
        let latch = readiness.register("ca_loaded");
        let (registry, shared) = node_registry(readiness);
        assert!(encode(&registry).contains("robin_ready 0\n"));
        latch.mark_ready();
        shared
            .pods
            .lock()
            .unwrap()
            .insert("u1".into(), pod("u1", PodState::Captured));
        let out = encode(&registry);
        assert!(out.contains("robin_ready 1\n"), "{out}");
        // Each family is announced once; counters carry the OpenMetrics `_total` suffix on
        // samples, not on the family name. Per-rule families appear with the first rule
        // (`rule="-"` of robin_requests is there from the start).
        let _ = shared.proxy_stats.rule("api.example.com");
        let out = encode(&registry);
        for family in [
            "robin_requests counter",
            "robin_identity_fetch_seconds histogram",
            "robin_audience_mismatches counter",
            "robin_upstream_responses counter",
            "robin_upstream_redials counter",
            "robin_connections_parked counter",
            "robin_upstream_parked counter",
            "robin_bytes counter",
            "robin_connections counter",
            "robin_leaf_cache counter",
            "robin_pods gauge",
            "robin_ready gauge",
        ] {
            assert_eq!(
                out.matches(&format!("# TYPE {family}\n")).count(),
                1,
                "{out}"
            );
        }
        assert!(out.contains("robin_pods{state=\"captured\"} 1\n"), "{out}");
        assert!(out.contains("robin_pods{state=\"pending\"} 0\n"), "{out}");
        assert!(out.contains("robin_pods{state=\"invalid\"} 0\n"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
        let pods = shared.debug_pods().unwrap();
        assert!(pods.contains("\"listener_port\": 15001"), "{pods}");
        assert!(pods.contains("\"state\": \"captured\""), "{pods}");
    }

    #[test]
    fn a_replaced_proxy_never_takes_its_counts_away() {
        let (registry, shared) = node_registry(Readiness::default());
        // Two generations of one pod's proxy, and another pod, with rules of one label.
        let old: RuleStats = shared.proxy_stats.rule("api.example.com");
        old.requests.count(StatusCode::OK);
        old.identity_fetch
            .observe(std::time::Duration::from_millis(2));
        drop(old);
        let new = shared.proxy_stats.rule("api.example.com");
        new.requests.count(StatusCode::OK);
        shared.proxy_stats.rule("other").identity_errors.inc();
        let out = encode(&registry);
        for line in [
            "robin_requests_total{rule=\"api.example.com\",class=\"2xx\"} 2\n",
            "robin_identity_fetch_seconds_count{rule=\"api.example.com\"} 1\n",
            "robin_identity_errors_total{rule=\"other\"} 1\n",
        ] {
            assert!(out.contains(line), "{line} not in\n{out}");
        }
    }

    #[test]
    fn connection_cap_metrics() {
        let mut registry = Registry::default();
        let conns = crate::conns::Connections::new(1);
        registry.register_collector(Box::new(conns.clone()));
        let first = conns.admit().expect("room");
        let _second = conns.admit().expect("sheds the first");
        drop(first);
        let m = encode(&registry);
        for line in [
            "# TYPE robin_connections_shed counter\n",
            "robin_connections_shed_total 1\n",
            "# TYPE robin_connections_open gauge\n",
            "robin_connections_open 1\n",
            "robin_connections_max 1\n",
        ] {
            assert!(m.contains(line), "{line} not in\n{m}");
        }
    }

    /// What Prometheus gets: the OpenMetrics content type, every sample under a family
    /// announced by HELP (one sentence) and TYPE, `# EOF` last.
    #[tokio::test]
    async fn scrape_is_well_formed_openmetrics() {
        use crate::admin::AdminHandler as _;
        use http_body_util::BodyExt as _;
        let (mut registry, shared) = node_registry(Readiness::default());
        registry.register_collector(Box::new(crate::conns::Connections::new(4)));
        shared.proxy_stats.rule("a").requests.count(StatusCode::OK);
        let resp = crate::metrics::Scrape(registry).get();
        assert_eq!(
            resp.headers()[http::header::CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                assert!(help.ends_with('.') && !help.ends_with(".."), "{line}");
                families.push(help.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(families.iter().any(|f| f == family), "{line} in\n{text}");
            }
        }
        assert!(families.len() >= 17, "{text}");
    }
}
