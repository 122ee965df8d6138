//! Robin's one Kubernetes client (kube-rs) and its pod watch: the pods of one node (`robin
//! node`) or the labelled clients of a gateway (`robin gateway`).
//!
//! `kube::runtime::watcher` lists with `resourceVersion=0` (served from the API server's watch
//! cache, not a consistent read from etcd), watches with bookmarks, relists on 410 and backs off
//! with jitter (800 ms to 30 s) so that after an API-server restart the agents of thousands of
//! nodes do not relist in the same instant. Its `Init`/`InitApply`/`InitDone` events become one
//! [`PodEvent::Restarted`] with the complete set, the reconciler's only notion of a relist.
//!
//! The client comes from `--kube-api`, a kubeconfig or in-cluster config (`kube::Config`); what
//! Robin adds on top is in `client`: no proxy (neither `proxy-url` nor `HTTPS_PROXY`), and the
//! kubeconfig features that would make the agent run commands or skip verification are refused
//! by name.
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1 as core;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde::Deserialize;
use tokio::sync::mpsc;

mod config;
mod endpoint;

pub use config::{ConfigError, ENV_KUBECONFIG, ENV_SERVICE_HOST, KubeArgs, client};
pub use endpoint::{CallError, CallLimits, Endpoint, EndpointConfig};

// ---- the part of a Pod the agent reads ----

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSpec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodStatus {
    pub qos_class: Option<String>,
    pub phase: Option<String>,
    /// Read only to notice a container starting or restarting: its process is then the one
    /// whose filesystem view holds the pod's volumes.
    pub container_statuses: Vec<ContainerStatus>,
    pub init_container_statuses: Vec<ContainerStatus>,
    /// The pod's addresses (`status.podIPs`): how `robin gateway` tells its clients apart.
    #[serde(rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// The node's address: a pod that shares it (host network) shares it with every process
    /// of the node, so it cannot be told apart by address.
    #[serde(rename = "hostIP")]
    pub host_ip: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerStatus {
    pub name: String,
    #[serde(rename = "containerID")]
    pub container_id: Option<String>,
    pub restart_count: u32,
    pub started: Option<bool>,
}

/// The few fields of a `k8s_openapi` Pod the reconciler compares and keeps (a full Pod per
/// known pod would be most of the agent's memory on a dense node).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    pub status: PodStatus,
}

/// The pod a token is requested for, when the agent knows it (`robin node`): TokenRequest
/// tokens are requested for its namespace and ServiceAccount and bound to it, delegated SPIFFE
/// selectors default to its uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `None`: the agent's own ServiceAccount. The node agent always sets it (Kubernetes means
    /// `default` when a pod names none).
    pub service_account: Option<String>,
}

/// The ServiceAccount of a pod whose spec names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

impl Pod {
    /// `namespace/name`, for logs and the debug endpoint.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// Who this pod is, for the identity sources that act on its behalf.
    pub fn identity(&self) -> PodRef {
        let sa = self
            .spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
        PodRef {
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
            uid: self.metadata.uid.clone(),
            service_account: Some(sa.to_owned()),
        }
    }
}

impl From<core::ContainerStatus> for ContainerStatus {
    fn from(c: core::ContainerStatus) -> Self {
        Self {
            name: c.name,
            container_id: c.container_id,
            restart_count: u32::try_from(c.restart_count).unwrap_or(0),
            started: c.started,
        }
    }
}

impl From<core::Pod> for Pod {
    fn from(p: core::Pod) -> Self {
        let m = p.metadata;
        let spec = p.spec.unwrap_or_default();
        let status = p.status.unwrap_or_default();
        let statuses = |s: Option<Vec<core::ContainerStatus>>| {
            s.unwrap_or_default().into_iter().map(Into::into).collect()
        };
        Self {
            metadata: ObjectMeta {
                name: m.name.unwrap_or_default(),
                namespace: m.namespace.unwrap_or_default(),
                uid: m.uid.unwrap_or_default(),
                annotations: m.annotations.unwrap_or_default(),
            },
            spec: PodSpec {
                node_name: spec.node_name,
                service_account_name: spec.service_account_name,
            },
            status: PodStatus {
                qos_class: status.qos_class,
                phase: status.phase,
                container_statuses: statuses(status.container_statuses),
                init_container_statuses: statuses(status.init_container_statuses),
                pod_ips: status
                    .pod_ips
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| PodIp { ip: p.ip })
                    .collect(),
                host_ip: status.host_ip,
            },
        }
    }
}

/// What the watch tells the reconciler.
#[derive(Debug)]
pub enum PodEvent {
    /// A fresh list: the complete set of pods on the node (anything else is gone).
    Restarted(Vec<Pod>),
    Applied(Pod),
    Deleted(Pod),
}

/// Folds the watcher's events into [`PodEvent`]s: a relist's `InitApply`s are gathered until
/// `InitDone`, so the reconciler never sees half a list.
#[derive(Default)]
struct Relist(Option<Vec<Pod>>);

impl Relist {
    fn fold(&mut self, ev: watcher::Event<core::Pod>) -> Option<PodEvent> {
        match ev {
            watcher::Event::Init => {
                self.0 = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(p) => {
                self.0.get_or_insert_default().push(p.into());
                None
            }
            watcher::Event::InitDone => {
                Some(PodEvent::Restarted(self.0.take().unwrap_or_default()))
            }
            watcher::Event::Apply(p) => Some(PodEvent::Applied(p.into())),
            watcher::Event::Delete(p) => Some(PodEvent::Deleted(p.into())),
        }
    }
}

/// Which pods a watch lists.
#[derive(Clone, Debug)]
pub enum PodSelector {
    /// The pods scheduled on one node (`robin node`).
    OnNode(String),
    /// The pods carrying a label selector, cluster-wide (`robin gateway`'s clients).
    Labelled(String),
}

impl PodSelector {
    fn watcher_config(&self) -> watcher::Config {
        let cfg = watcher::Config {
            // kube-rs drops `resourceVersion=0` from a paged list (a paged list cannot come
            // from the cache), which would make every relist a consistent read from etcd; one
            // node's pods, or a gateway's labelled clients, fit in one unpaged answer.
            page_size: None,
            ..watcher::Config::default()
        }
        .any_semantic();
        match self {
            Self::OnNode(node) => cfg.fields(&format!("spec.nodeName={node}")),
            Self::Labelled(selector) => cfg.labels(selector),
        }
    }
}

/// Lists and watches the `selected` pods until the receiver goes away; `synced` turns true
/// after the first complete list. Errors are logged with the API server's `Status` message
/// (an RBAC denial reads "pods is forbidden: ...") and retried with the watcher's backoff.
pub async fn run_pod_watch(
    client: kube::Client,
    selected: PodSelector,
    tx: mpsc::Sender<PodEvent>,
    synced: Arc<AtomicBool>,
) {
    let cfg = selected.watcher_config();
    let mut events = watcher(kube::Api::<core::Pod>::all(client), cfg)
        .default_backoff()
        .inspect_err(|e| tracing::warn!(error = %e, "pod watch failed; retrying"))
        .filter_map(|r| std::future::ready(r.ok()))
        .boxed();
    let mut relist = Relist::default();
    while let Some(ev) = events.next().await {
        let Some(ev) = relist.fold(ev) else { continue };
        let listed = matches!(ev, PodEvent::Restarted(_));
        if tx.send(ev).await.is_err() {
            return;
        }
        if listed {
            synced.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k8s_pod(uid: &str) -> core::Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("p-{uid}"), "namespace": "n", "uid": uid,
                         "annotations": {"robin.dev/inject": "true"}},
            "spec": {"nodeName": "k", "containers": []},
            "status": {"qosClass": "BestEffort", "containerStatuses": [
                {"name": "app", "containerID": "containerd://1", "restartCount": 2, "started": true,
                 "image": "i", "imageID": "", "ready": true}
            ]},
        }))
        .unwrap()
    }

    #[test]
    fn identity_defaults_the_service_account() {
        let named = br#"{"metadata":{"name":"web-0","namespace":"shop","uid":"u1"},"spec":{"serviceAccountName":"web"}}"#;
        let pod: Pod = serde_json::from_slice(named).unwrap();
        assert_eq!(
            pod.identity(),
            PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "u1".into(),
                service_account: Some("web".into()),
            }
        );
        let unnamed: Pod =
            serde_json::from_slice(br#"{"metadata":{"name":"p","namespace":"n","uid":"u2"}}"#)
                .unwrap();
        assert_eq!(
            unnamed.identity().service_account.as_deref(),
            Some(DEFAULT_SERVICE_ACCOUNT)
        );
    }

    #[test]
    fn keeps_the_fields_the_reconciler_reads() {
        let p = Pod::from(k8s_pod("u1"));
        assert_eq!(p.key(), "n/p-u1");
        assert_eq!(p.metadata.uid, "u1");
        assert_eq!(p.metadata.annotations["robin.dev/inject"], "true");
        assert_eq!(p.spec.node_name.as_deref(), Some("k"));
        assert_eq!(p.status.qos_class.as_deref(), Some("BestEffort"));
        let c = &p.status.container_statuses[0];
        assert_eq!(
            (c.container_id.as_deref(), c.restart_count, c.started),
            (Some("containerd://1"), 2, Some(true))
        );
    }

    /// A relist reaches the reconciler as one complete set, only at `InitDone`; a relist with
    /// no pods is an empty set, not nothing.
    #[test]
    fn a_relist_is_one_event() {
        let mut r = Relist::default();
        assert!(r.fold(watcher::Event::Init).is_none());
        assert!(r.fold(watcher::Event::InitApply(k8s_pod("u1"))).is_none());
        assert!(r.fold(watcher::Event::InitApply(k8s_pod("u2"))).is_none());
        let Some(PodEvent::Restarted(pods)) = r.fold(watcher::Event::InitDone) else {
            panic!("expected the list at InitDone");
        };
        let uids: Vec<_> = pods.iter().map(|p| p.metadata.uid.as_str()).collect();
        assert_eq!(uids, ["u1", "u2"]);
        assert!(matches!(
            r.fold(watcher::Event::Apply(k8s_pod("u3"))),
            Some(PodEvent::Applied(p)) if p.metadata.uid == "u3"
        ));
        assert!(matches!(
            r.fold(watcher::Event::Delete(k8s_pod("u1"))),
            Some(PodEvent::Deleted(p)) if p.metadata.uid == "u1"
        ));
        assert!(r.fold(watcher::Event::Init).is_none());
        assert!(matches!(
            r.fold(watcher::Event::InitDone),
            Some(PodEvent::Restarted(p)) if p.is_empty()
        ));
    }
}
