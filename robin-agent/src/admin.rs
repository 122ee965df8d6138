//! The node agent's admin plane, on its own port: `/healthz` (the process answers), `/readyz`
//! (200 only once the eBPF programs are loaded, the pod watch has synced and the CA is loaded),
//! `/metrics` (Prometheus text format, written by hand) and `/debug/pods` (JSON, no secrets).
use std::{convert::Infallible, fmt::Write as _, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{
    metrics::{CLASS_LABELS, escape_label},
    node::{NodeShared, PodState},
};

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("serializing pods: {0}")]
    Json(#[from] serde_json::Error),
}

/// Serves until the task is dropped. One task per connection; each bounded by a header timeout.
pub async fn serve(listener: TcpListener, shared: Arc<NodeShared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&req, &shared)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

pub fn route(req: &Request<Incoming>, shared: &NodeShared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => readyz(shared),
        "/metrics" => text(StatusCode::OK, PROMETHEUS_TEXT, metrics(shared)),
        "/debug/pods" => match debug_pods(shared) {
            Ok(body) => text(StatusCode::OK, "application/json", body),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn readyz(shared: &NodeShared) -> Response<Full<Bytes>> {
    use std::sync::atomic::Ordering::Relaxed;
    let checks = [
        ("programs_loaded", shared.programs_loaded.load(Relaxed)),
        ("pod_watch_synced", shared.watch_synced.load(Relaxed)),
        ("ca_loaded", shared.ca_loaded.load(Relaxed)),
    ];
    let mut body = String::new();
    for (name, ok) in checks {
        let _ = writeln!(body, "{name}: {}", if ok { "ok" } else { "no" });
    }
    let status = if shared.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, "text/plain", body)
}

pub fn debug_pods(shared: &NodeShared) -> Result<String, AdminError> {
    let pods: Vec<_> = shared
        .pods
        .lock()
        .expect("pods lock")
        .values()
        .cloned()
        .collect();
    Ok(serde_json::to_string_pretty(&pods)?)
}

/// Prometheus text exposition format 0.0.4.
pub fn metrics(shared: &NodeShared) -> String {
    let t = shared.totals();
    let by_state: Vec<(String, u64)> = {
        let pods = shared.pods.lock().expect("pods lock");
        PodState::ALL
            .iter()
            .map(|&s| {
                let n = pods.values().filter(|p| p.state == s).count();
                (format!("state=\"{}\"", s.as_str()), n as u64)
            })
            .collect()
    };
    let mut out = String::new();
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    let family =
        |out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            header(out, name, kind, help);
            for (labels, v) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        };
    let classes = |prefix: &str, counts: &[u64; 5]| -> Vec<(String, u64)> {
        CLASS_LABELS
            .iter()
            .zip(counts)
            .map(|(class, n)| (format!("{prefix}class=\"{class}\""), *n))
            .collect()
    };
    let one = |v: u64| vec![(String::new(), v)];
    let rule_label = |rule: &str| format!("rule=\"{}\"", escape_label(rule));

    family(
        &mut out,
        "robin_ready",
        "gauge",
        "1 when programs are loaded, the pod watch synced and the CA loaded.",
        &one(u64::from(shared.ready())),
    );
    family(
        &mut out,
        "robin_pods",
        "gauge",
        "Opted-in pods on this node by state (the states of /debug/pods).",
        &by_state,
    );
    family(
        &mut out,
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
        &mut out,
        "robin_bytes_total",
        "counter",
        "Bytes of captured connections (intercepted and spliced), counted when each ends.",
        &[
            ("direction=\"from_workload\"".into(), t.bytes_from_workload),
            ("direction=\"to_workload\"".into(), t.bytes_to_workload),
        ],
    );
    let mut by_rule = Vec::new();
    for (rule, r) in &t.rules {
        by_rule.extend(classes(&format!("{},", rule_label(rule)), &r.requests));
    }
    family(
        &mut out,
        "robin_requests_total",
        "counter",
        "Intercepted requests by rule and status class of the answer given to the workload.",
        &by_rule,
    );
    family(
        &mut out,
        "robin_identity_errors_total",
        "counter",
        "Requests answered 503 because the rule's source had no valid token.",
        &t.rules
            .iter()
            .map(|(rule, r)| (rule_label(rule), r.identity_errors))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "robin_audience_mismatches_total",
        "counter",
        "Requests answered 503 because the token's aud claim was not the audience the rule expects.",
        &t.rules
            .iter()
            .map(|(rule, r)| (rule_label(rule), r.audience_mismatches))
            .collect::<Vec<_>>(),
    );
    header(
        &mut out,
        "robin_identity_fetch_seconds",
        "histogram",
        "Time to get the token for a request from the rule's identity source.",
    );
    for (rule, r) in &t.rules {
        r.identity_fetch
            .write(&mut out, "robin_identity_fetch_seconds", &rule_label(rule));
    }
    family(
        &mut out,
        "robin_upstream_responses_total",
        "counter",
        "Responses received from upstreams, by status class.",
        &classes("", &t.upstream_responses),
    );
    family(
        &mut out,
        "robin_upstream_errors_total",
        "counter",
        "Requests answered 502 because the upstream could not be reached or verified.",
        &one(t.upstream_errors),
    );
    family(
        &mut out,
        "robin_upstream_connections_total",
        "counter",
        "Upstream connections established (TCP, TLS and HTTP handshakes done).",
        &one(t.upstream_connects),
    );
    family(
        &mut out,
        "robin_upstream_reused_total",
        "counter",
        "Requests sent on a pooled upstream connection.",
        &one(t.upstream_reused),
    );
    family(
        &mut out,
        "robin_upstream_redials_total",
        "counter",
        "Requests dialled once afresh because their pooled connection had closed before any byte was written.",
        &one(t.upstream_retries),
    );
    family(
        &mut out,
        "robin_leaf_cache_total",
        "counter",
        "Leaf certificate cache lookups by result.",
        &[
            ("result=\"hit\"".into(), t.leaf_hits),
            ("result=\"mint\"".into(), t.leaf_mints),
            ("result=\"mint_error\"".into(), t.leaf_mint_errors),
        ],
    );
    write_capacity(&mut out, shared);
    out
}

/// Process-wide families: the connection cap and connects the kernel refused.
fn write_capacity(out: &mut String, shared: &NodeShared) {
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    if let Some(c) = shared.connections.get() {
        let one = |v: usize| vec![(String::new(), v as u64)];
        family(
            "robin_connections_open",
            "gauge",
            "Client connections open now.",
            one(c.open()),
        );
        family(
            "robin_connections_max",
            "gauge",
            "The connection cap (max_connections).",
            one(c.cap()),
        );
        family(
            "robin_connections_shed_total",
            "counter",
            "Client connections closed at the connection cap (newest idle first).",
            vec![(String::new(), c.shed_total())],
        );
    }
    if let Some(r) = shared.capture_refused.get() {
        let samples = r
            .snapshot()
            .into_iter()
            .map(|(reason, n)| (format!("{{reason=\"{}\"}}", reason.label()), n))
            .collect();
        family(
            "robin_capture_refused_total",
            "counter",
            "Captured connects refused in the kernel (never let through uncaptured), by reason.",
            samples,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::PodView;
    use std::sync::atomic::Ordering;

    #[test]
    fn metrics_and_pods_reflect_state() {
        let shared = NodeShared::default();
        assert!(metrics(&shared).contains("robin_ready 0\n"));
        shared.programs_loaded.store(true, Ordering::Relaxed);
        shared.watch_synced.store(true, Ordering::Relaxed);
        shared.ca_loaded.store(true, Ordering::Relaxed);
        shared.pods.lock().unwrap().insert(
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
        let m = metrics(&shared);
        assert!(m.contains("robin_ready 1\n"), "{m}");
        // Every family is announced even with no sample yet, and each once.
        for family in [
            "robin_requests_total counter",
            "robin_identity_fetch_seconds histogram",
            "robin_audience_mismatches_total counter",
            "robin_upstream_responses_total counter",
            "robin_bytes_total counter",
        ] {
            assert_eq!(m.matches(&format!("# TYPE {family}\n")).count(), 1, "{m}");
        }
        assert!(m.contains("robin_pods{state=\"captured\"} 1\n"), "{m}");
        assert!(m.contains("robin_pods{state=\"pending\"} 0\n"), "{m}");
        assert!(m.contains("robin_pods{state=\"invalid\"} 0\n"), "{m}");
        assert!(m.contains("# TYPE robin_connections_total counter\n"));
        let pods = debug_pods(&shared).unwrap();
        assert!(pods.contains("\"listener_port\": 15001"), "{pods}");
        assert!(pods.contains("\"state\": \"captured\""), "{pods}");
    }

    #[test]
    fn connection_cap_metrics() {
        let shared = NodeShared::default();
        let conns = crate::conns::Connections::new(1);
        let _ = shared.connections.set(conns.clone());
        let first = conns.admit().expect("room");
        let _second = conns.admit().expect("sheds the first");
        drop(first);
        let m = metrics(&shared);
        assert!(
            m.contains("# TYPE robin_connections_shed_total counter\n"),
            "{m}"
        );
        assert!(m.contains("robin_connections_shed_total 1\n"), "{m}");
        assert!(m.contains("robin_connections_open 1\n"), "{m}");
        assert!(m.contains("robin_connections_max 1\n"), "{m}");
    }
}
