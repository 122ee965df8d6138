//! `robin node`'s `/metrics`: the pod table, every proxy's counters (live and retired), the
//! connection cap and the kernel's refusals, in the Prometheus text format.
use std::{fmt::Write as _, sync::Arc};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::{
    admin::{self, AdminHandler, Readiness},
    metrics::{CLASS_LABELS, escape_label},
};

use super::pods::{NodeShared, PodState, Totals};

/// The `/metrics` handler the node registers with the admin plane.
pub struct NodeMetrics {
    pub shared: Arc<NodeShared>,
    pub readiness: Readiness,
}

impl AdminHandler for NodeMetrics {
    fn get(&self) -> Response<Full<Bytes>> {
        admin::text(StatusCode::OK, admin::PROMETHEUS_TEXT, self.render())
    }
}

type Samples = Vec<(String, u64)>;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    header(out, name, kind, help);
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

fn one(v: u64) -> Samples {
    vec![(String::new(), v)]
}

fn classes(prefix: &str, counts: &[u64; 5]) -> Samples {
    CLASS_LABELS
        .iter()
        .zip(counts)
        .map(|(class, n)| (format!("{prefix}class=\"{class}\""), *n))
        .collect()
}

fn rule_label(rule: &str) -> String {
    format!("rule=\"{}\"", escape_label(rule))
}

impl NodeMetrics {
    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let t = self.shared.totals();
        let mut out = String::new();
        family(
            &mut out,
            "robin_ready",
            "gauge",
            "1 when programs are loaded, the pod watch synced and the CA loaded.",
            &one(u64::from(self.readiness.is_ready())),
        );
        self.write_pods(&mut out);
        write_connections(&mut out, &t);
        write_rules(&mut out, &t);
        write_upstream(&mut out, &t);
        self.write_capacity(&mut out);
        out
    }

    fn write_pods(&self, out: &mut String) {
        let by_state: Samples = {
            let pods = self.shared.pods.lock().expect("pods lock");
            PodState::ALL
                .iter()
                .map(|&s| {
                    let n = pods.values().filter(|p| p.state == s).count();
                    (format!("state=\"{}\"", s.as_str()), n as u64)
                })
                .collect()
        };
        family(
            out,
            "robin_pods",
            "gauge",
            "Opted-in pods on this node by state (the states of /debug/pods).",
            &by_state,
        );
    }

    /// Process-wide families: the connection cap and connects the kernel refused.
    fn write_capacity(&self, out: &mut String) {
        if let Some(c) = self.shared.connections.get() {
            let open = one(c.open() as u64);
            family(
                out,
                "robin_connections_open",
                "gauge",
                "Client connections open now.",
                &open,
            );
            let max = one(c.cap() as u64);
            family(
                out,
                "robin_connections_max",
                "gauge",
                "The connection cap (max_connections).",
                &max,
            );
            family(
                out,
                "robin_connections_shed_total",
                "counter",
                "Client connections closed at the connection cap (newest idle first).",
                &one(c.shed_total()),
            );
        }
        if let Some(r) = self.shared.capture_refused.get() {
            let samples: Samples = r
                .snapshot()
                .into_iter()
                .map(|(reason, n)| (format!("reason=\"{}\"", reason.label()), n))
                .collect();
            family(
                out,
                "robin_capture_refused_total",
                "counter",
                "Captured connects refused in the kernel (never let through uncaptured), by reason.",
                &samples,
            );
        }
    }
}

fn write_connections(out: &mut String, t: &Totals) {
    family(
        out,
        "robin_connections_total",
        "counter",
        "Captured connections by outcome.",
        &[
            ("outcome=\"intercepted\"".into(), t.conn_intercepted),
            ("outcome=\"spliced\"".into(), t.conn_spliced),
            ("outcome=\"failed\"".into(), t.conn_failed),
            ("outcome=\"splice_failed\"".into(), t.conn_splice_failed),
        ],
    );
    family(
        out,
        "robin_bytes_total",
        "counter",
        "Bytes of captured connections (intercepted and spliced), counted when each ends.",
        &[
            ("direction=\"from_workload\"".into(), t.bytes_from_workload),
            ("direction=\"to_workload\"".into(), t.bytes_to_workload),
        ],
    );
}

fn write_rules(out: &mut String, t: &Totals) {
    let mut by_rule = Vec::new();
    for (rule, r) in &t.rules {
        by_rule.extend(classes(&format!("{},", rule_label(rule)), &r.requests));
    }
    family(
        out,
        "robin_requests_total",
        "counter",
        "Intercepted requests by rule and status class of the answer given to the workload.",
        &by_rule,
    );
    let per_rule = |f: fn(&super::pods::RuleTotals) -> u64| -> Samples {
        t.rules
            .iter()
            .map(|(rule, r)| (rule_label(rule), f(r)))
            .collect()
    };
    family(
        out,
        "robin_identity_errors_total",
        "counter",
        "Requests answered 503 because the rule's source had no valid token.",
        &per_rule(|r| r.identity_errors),
    );
    family(
        out,
        "robin_audience_mismatches_total",
        "counter",
        "Requests answered 503 because the token's aud claim was not the audience the rule expects.",
        &per_rule(|r| r.audience_mismatches),
    );
    header(
        out,
        "robin_identity_fetch_seconds",
        "histogram",
        "Time to get the token for a request from the rule's identity source.",
    );
    for (rule, r) in &t.rules {
        r.identity_fetch
            .write(out, "robin_identity_fetch_seconds", &rule_label(rule));
    }
}

fn write_upstream(out: &mut String, t: &Totals) {
    family(
        out,
        "robin_upstream_responses_total",
        "counter",
        "Responses received from upstreams, by status class.",
        &classes("", &t.upstream_responses),
    );
    let counters = [
        (
            "robin_upstream_errors_total",
            "Requests answered 502 because the upstream could not be reached or verified.",
            t.upstream_errors,
        ),
        (
            "robin_upstream_connections_total",
            "Upstream connections established (TCP, TLS and HTTP handshakes done).",
            t.upstream_connects,
        ),
        (
            "robin_upstream_reused_total",
            "Requests sent on a pooled upstream connection.",
            t.upstream_reused,
        ),
        (
            "robin_upstream_redials_total",
            "Requests dialled once afresh because their pooled connection had closed before any byte was written.",
            t.upstream_retries,
        ),
    ];
    for (name, help, v) in counters {
        family(out, name, "counter", help, &one(v));
    }
    family(
        out,
        "robin_leaf_cache_total",
        "counter",
        "Leaf certificate cache lookups by result.",
        &[
            ("result=\"hit\"".into(), t.leaf_hits),
            ("result=\"mint\"".into(), t.leaf_mints),
            ("result=\"mint_error\"".into(), t.leaf_mint_errors),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::pods::PodView;

    #[test]
    fn metrics_reflect_state() {
        let readiness = Readiness::default();
        let latch = readiness.register("ca_loaded");
        let m = NodeMetrics {
            shared: Arc::new(NodeShared::default()),
            readiness,
        };
        assert!(m.render().contains("robin_ready 0\n"));
        latch.mark_ready();
        m.shared.pods.lock().unwrap().insert(
            "u1".into(),
            PodView {
                namespace: "ns".into(),
                name: "a".into(),
                uid: "u1".into(),
                state: PodState::Captured,
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
            },
        );
        let out = m.render();
        assert!(out.contains("robin_ready 1\n"), "{out}");
        // Every family is announced even with no sample yet, and each once.
        for family in [
            "robin_requests_total counter",
            "robin_identity_fetch_seconds histogram",
            "robin_audience_mismatches_total counter",
            "robin_upstream_responses_total counter",
            "robin_upstream_redials_total counter",
            "robin_bytes_total counter",
            "robin_connections_total counter",
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
        let pods = m.shared.debug_pods().unwrap();
        assert!(pods.contains("\"listener_port\": 15001"), "{pods}");
        assert!(pods.contains("\"state\": \"captured\""), "{pods}");
    }

    #[test]
    fn connection_cap_metrics() {
        let shared = Arc::new(NodeShared::default());
        let conns = crate::conns::Connections::new(1);
        let _ = shared.connections.set(conns.clone());
        let first = conns.admit().expect("room");
        let _second = conns.admit().expect("sheds the first");
        drop(first);
        let m = NodeMetrics {
            shared,
            readiness: Readiness::default(),
        }
        .render();
        assert!(
            m.contains("# TYPE robin_connections_shed_total counter\n"),
            "{m}"
        );
        assert!(m.contains("robin_connections_shed_total 1\n"), "{m}");
        assert!(m.contains("robin_connections_open 1\n"), "{m}");
        assert!(m.contains("robin_connections_max 1\n"), "{m}");
    }
}
