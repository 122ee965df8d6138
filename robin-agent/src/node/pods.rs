//! The pod table the reconciler keeps and the admin plane reads: where each opted-in pod
//! stands, and the counters every pod's proxy shares.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use serde::Serialize;

use crate::{
    admin::{self, AdminHandler},
    proxy::ProxyStats,
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

impl EncodeLabelValue for PodState {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
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

/// What the reconciler shares with the admin plane's handlers.
#[derive(Default)]
pub struct NodeShared {
    /// By pod uid: every opted-in pod the agent knows of.
    pub pods: Mutex<BTreeMap<String, PodView>>,
    /// The counters every pod's proxy counts into (registered once, so a retired proxy's
    /// counts stay exported).
    pub proxy_stats: Arc<ProxyStats>,
}

impl NodeShared {
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
