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

use crate::node::NodeShared;

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
    let (captured, pending) = {
        let pods = shared.pods.lock().expect("pods lock");
        let captured = pods.values().filter(|p| p.state == "captured").count();
        (captured, pods.len() - captured)
    };
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    };
    family(
        "robin_ready",
        "gauge",
        "1 when programs are loaded, the pod watch synced and the CA loaded.",
        &[("", u64::from(shared.ready()))],
    );
    family(
        "robin_pods",
        "gauge",
        "Opted-in pods on this node by capture state.",
        &[
            ("state=\"captured\"", captured as u64),
            ("state=\"not_captured\"", pending as u64),
        ],
    );
    family(
        "robin_connections_total",
        "counter",
        "Captured connections by outcome.",
        &[
            ("outcome=\"intercepted\"", t.conn_intercepted),
            ("outcome=\"spliced\"", t.conn_spliced),
            ("outcome=\"failed\"", t.conn_failed),
            ("outcome=\"splice_failed\"", t.conn_splice_failed),
        ],
    );
    family(
        "robin_requests_total",
        "counter",
        "Intercepted requests by status class of the answer given to the workload.",
        &[
            ("class=\"1xx\"", t.requests[0]),
            ("class=\"2xx\"", t.requests[1]),
            ("class=\"3xx\"", t.requests[2]),
            ("class=\"4xx\"", t.requests[3]),
            ("class=\"5xx\"", t.requests[4]),
        ],
    );
    family(
        "robin_identity_errors_total",
        "counter",
        "Requests answered 503 because no valid token was available.",
        &[("", t.identity_errors)],
    );
    family(
        "robin_upstream_errors_total",
        "counter",
        "Requests answered 502 because the upstream could not be reached or verified.",
        &[("", t.upstream_errors)],
    );
    family(
        "robin_leaf_cache_total",
        "counter",
        "Leaf certificate cache lookups by result.",
        &[
            ("result=\"hit\"", t.leaf_hits),
            ("result=\"mint\"", t.leaf_mints),
            ("result=\"mint_error\"", t.leaf_mint_errors),
        ],
    );
    out
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
                state: "captured",
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
        assert!(m.contains("robin_pods{state=\"captured\"} 1\n"), "{m}");
        assert!(m.contains("# TYPE robin_connections_total counter\n"));
        let pods = debug_pods(&shared).unwrap();
        assert!(pods.contains("\"listener_port\": 15001"), "{pods}");
    }
}
