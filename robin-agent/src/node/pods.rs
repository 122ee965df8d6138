//! The pod table the reconciler keeps and the admin plane reads: where each opted-in pod
//! stands, and the counters of every proxy this agent has run.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::{
    admin::{self, AdminHandler},
    capture,
    proxy::Proxy,
};

/// Where an opted-in pod stands: the `state` of `/debug/pods` and the label values of
/// `robin_pods{state}`, one set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodState {
    /// Capture attached, listener serving.
    Captured,
    /// Not captured yet (no cgroup, no process, unknown rule set...); retried every second.
    Pending,
    /// Opted in with annotations that cannot be used; waits for them to change.
    Invalid,
}

impl PodState {
    pub const ALL: [Self; 3] = [Self::Captured, Self::Pending, Self::Invalid];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Captured => "captured",
            Self::Pending => "pending",
            Self::Invalid => "invalid",
        }
    }
}

/// A pod as `/debug/pods` shows it. No token, no secret.
#[derive(Clone, Debug, Serialize)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub state: PodState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_set: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_path: Option<PathBuf>,
    /// Whether the token file was visible in the chosen process's filesystem view at capture.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_visible: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captured_at_unix: Option<u64>,
    /// The capture replaced one pinned by an earlier agent (the pod was never uncaptured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopted: Option<bool>,
}

/// Summed counters of proxies of pods no longer captured, so /metrics never goes backwards.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub conn_intercepted: u64,
    pub conn_spliced: u64,
    pub conn_failed: u64,
    pub conn_splice_failed: u64,
    pub upstream_errors: u64,
    pub upstream_connects: u64,
    pub upstream_reused: u64,
    pub upstream_retries: u64,
    pub upstream_responses: [u64; 5],
    pub bytes_from_workload: u64,
    pub bytes_to_workload: u64,
    pub leaf_hits: u64,
    pub leaf_mints: u64,
    pub leaf_mint_errors: u64,
    /// By rule label (its first host pattern), summed over pods and rule sets.
    pub rules: BTreeMap<String, RuleTotals>,
}

#[derive(Clone, Debug, Default)]
pub struct RuleTotals {
    pub requests: [u64; 5],
    pub identity_errors: u64,
    pub identity_fetch: crate::metrics::HistogramSnapshot,
    pub audience_mismatches: u64,
}

impl Totals {
    pub fn add(&mut self, proxy: &Proxy) {
        let s = proxy.stats();
        let l = proxy.leaf_stats();
        let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        self.conn_intercepted += r(&s.conn_intercepted);
        self.conn_spliced += r(&s.conn_spliced);
        self.conn_failed += r(&s.conn_failed);
        self.conn_splice_failed += r(&s.conn_splice_failed);
        self.upstream_errors += r(&s.upstream_errors);
        self.upstream_connects += r(&s.upstream_connects);
        self.upstream_reused += r(&s.upstream_reused);
        self.upstream_retries += r(&s.upstream_retries);
        for (t, n) in self
            .upstream_responses
            .iter_mut()
            .zip(s.upstream_responses.snapshot())
        {
            *t += n;
        }
        self.bytes_from_workload += r(&s.bytes_from_workload);
        self.bytes_to_workload += r(&s.bytes_to_workload);
        self.leaf_hits += r(&l.hits);
        self.leaf_mints += r(&l.mints);
        self.leaf_mint_errors += r(&l.mint_errors);
        for rule in proxy.rules() {
            let t = self.rules.entry(rule.label.clone()).or_default();
            for (t, n) in t.requests.iter_mut().zip(rule.stats.requests.snapshot()) {
                *t += n;
            }
            t.identity_errors += r(&rule.stats.identity_errors);
            t.audience_mismatches += r(&rule.stats.audience_mismatches);
            t.identity_fetch.add(&rule.stats.identity_fetch.snapshot());
        }
    }
}

/// What the reconciler shares with the admin plane's handlers.
#[derive(Default)]
pub struct NodeShared {
    /// By pod uid: every opted-in pod the agent knows of.
    pub pods: Mutex<BTreeMap<String, PodView>>,
    /// Proxies of captured pods, by uid (for metrics).
    pub proxies: Mutex<BTreeMap<String, Proxy>>,
    pub retired: Mutex<Totals>,
    /// The client connection cap shared by every pod's accept loop.
    pub connections: std::sync::OnceLock<Arc<crate::conns::Connections>>,
    pub capture_refused: std::sync::OnceLock<Arc<capture::RefusedConnects>>,
}

impl NodeShared {
    /// Counters over every proxy this agent has run.
    pub fn totals(&self) -> Totals {
        let mut t = self.retired.lock().expect("retired lock").clone();
        for p in self.proxies.lock().expect("proxies lock").values() {
            t.add(p);
        }
        t
    }

    /// `/debug/pods`: every opted-in pod as JSON, no secrets.
    pub fn debug_pods(&self) -> Result<String, serde_json::Error> {
        let pods: Vec<_> = self
            .pods
            .lock()
            .expect("pods lock")
            .values()
            .cloned()
            .collect();
        serde_json::to_string_pretty(&pods)
    }
}

/// The `/debug/pods` handler the node registers with the admin plane.
pub struct DebugPods(pub Arc<NodeShared>);

impl AdminHandler for DebugPods {
    fn get(&self) -> Response<Full<Bytes>> {
        match self.0.debug_pods() {
            Ok(body) => admin::text(StatusCode::OK, "application/json", body),
            Err(e) => admin::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("serializing pods: {e}\n"),
            ),
        }
    }
}
