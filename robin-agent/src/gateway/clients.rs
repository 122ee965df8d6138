//! Who a gateway client is, and so whose identity its requests carry.
//!
//! - `own`: the gateway serves the pod (or host) it runs in, with its own identity, to clients
//!   from the prefixes it allows (loopback by default).
//! - `pods`: a separate gateway in front of many pods. A client is the pod whose address its
//!   connection comes from, found through the pod watch; it is served with a proxy built for
//!   that pod (TokenRequest bound to it, delegated SPIFFE with its selectors). An address that
//!   is no known pod — or that several pods claim (host-network pods, a reused address not yet
//!   released) — is refused, never served with the gateway's own identity.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use tokio::sync::mpsc;

use crate::{
    admin::ReadyLatch,
    config::{Cidr, Config},
    identity::{IdentityContext, SourceConfig},
    kube::{Pod, PodEvent},
    proxy::{Dialer, Limits, Proxy, ProxyError, ProxyStats},
};

#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error(
        "inject[{0}]: a `file` source reads the gateway's own credential; with --clients pods \
         every rule must act for the client pod (token_request, delegated spiffe, exchange of those)"
    )]
    NotPerPod(usize),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

/// Why a client is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// `own`: outside the allowed prefixes; `pods`: no known pod has this address.
    NotAClient,
    /// Several pods claim this address.
    Ambiguous,
}

pub enum Clients {
    Own { proxy: Proxy, allowed: Vec<Cidr> },
    Pods(Arc<PodClients>),
}

impl Clients {
    pub fn proxy_for(&self, ip: IpAddr) -> Result<Proxy, Unknown> {
        let ip = ip.to_canonical();
        match self {
            Self::Own { proxy, allowed } if allowed.iter().any(|c| c.contains(ip)) => {
                Ok(proxy.clone())
            }
            Self::Own { .. } => Err(Unknown::NotAClient),
            Self::Pods(pods) => pods.proxy_for(ip),
        }
    }
}

/// Checks, before anything starts, that every rule's source can act for a client pod.
pub fn check_per_pod(cfg: &Config) -> Result<(), ClientsError> {
    fn acts_for_pod(s: &SourceConfig) -> bool {
        match s {
            SourceConfig::File { .. } => false,
            SourceConfig::TokenRequest(_) => true,
            SourceConfig::Spiffe(c) => c.delegated,
            SourceConfig::Exchange(c) => acts_for_pod(&c.inner),
        }
    }
    match cfg.inject.iter().position(|r| !acts_for_pod(&r.source)) {
        Some(i) => Err(ClientsError::NotPerPod(i)),
        None => Ok(()),
    }
}

/// A known client pod and the proxy that acts for it.
struct Client {
    uid: String,
    key: String,
    proxy: Proxy,
}

/// The client pods by address, kept from the pod watch.
pub struct PodClients {
    cfg: Config,
    identity: IdentityContext,
    /// The registered counters every client's proxy counts into.
    stats: Arc<ProxyStats>,
    by_ip: RwLock<HashMap<IpAddr, Vec<Arc<Client>>>>,
}

impl PodClients {
    pub fn new(cfg: Config, identity: IdentityContext, stats: Arc<ProxyStats>) -> Self {
        Self {
            cfg,
            identity,
            stats,
            by_ip: RwLock::default(),
        }
    }

    fn proxy_for(&self, ip: IpAddr) -> Result<Proxy, Unknown> {
        let table = self.by_ip.read().unwrap_or_else(|p| p.into_inner());
        match table.get(&ip).map(Vec::as_slice) {
            None | Some([]) => Err(Unknown::NotAClient),
            Some([one]) => Ok(one.proxy.clone()),
            Some(_) => Err(Unknown::Ambiguous),
        }
    }

    /// Applies the pod watch's events until it ends; `synced` is latched at the first list.
    pub async fn follow(self: Arc<Self>, mut rx: mpsc::Receiver<PodEvent>, synced: ReadyLatch) {
        let mut synced = Some(synced);
        while let Some(ev) = rx.recv().await {
            match ev {
                PodEvent::Restarted(pods) => {
                    self.relisted(pods);
                    if let Some(latch) = synced.take() {
                        latch.mark_ready();
                    }
                }
                PodEvent::Applied(pod) => self.applied(pod),
                PodEvent::Deleted(pod) => self.remove(&pod.metadata.uid),
            }
        }
    }

    fn relisted(&self, pods: Vec<Pod>) {
        let known = self.known();
        let mut table: HashMap<IpAddr, Vec<Arc<Client>>> = HashMap::new();
        for pod in pods {
            if let Some((ips, client)) = self.client(&pod, known.get(&pod.metadata.uid)) {
                for ip in ips {
                    table.entry(ip).or_default().push(client.clone());
                }
            }
        }
        *self.by_ip.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    fn applied(&self, pod: Pod) {
        let known = self.find(&pod.metadata.uid);
        let entry = self.client(&pod, known.as_ref());
        let mut table = self.by_ip.write().unwrap_or_else(|p| p.into_inner());
        remove_uid(&mut table, &pod.metadata.uid);
        if let Some((ips, client)) = entry {
            for ip in ips {
                table.entry(ip).or_default().push(client.clone());
            }
        }
    }

    fn remove(&self, uid: &str) {
        let mut table = self.by_ip.write().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = table.values().flatten().find(|c| c.uid == uid) {
            tracing::info!(pod = %c.key, "gateway client gone");
        }
        remove_uid(&mut table, uid);
    }

    /// The client entry of the pod with `uid`, if it is known: a pod seen again keeps its
    /// proxy (and its leaf cache).
    fn find(&self, uid: &str) -> Option<Arc<Client>> {
        let table = self.by_ip.read().unwrap_or_else(|p| p.into_inner());
        table.values().flatten().find(|c| c.uid == uid).cloned()
    }

    /// The clients known now, by uid (for a relist, which looks every pod up).
    fn known(&self) -> HashMap<String, Arc<Client>> {
        let table = self.by_ip.read().unwrap_or_else(|p| p.into_inner());
        table
            .values()
            .flatten()
            .map(|c| (c.uid.clone(), c.clone()))
            .collect()
    }

    /// The pod's addresses and its client entry, or `None` when it cannot be a client: not
    /// running any more (its address may already be another pod's), no address yet, or no
    /// proxy could be built for it.
    fn client(&self, pod: &Pod, known: Option<&Arc<Client>>) -> Option<(Vec<IpAddr>, Arc<Client>)> {
        let phase = pod.status.phase.as_deref();
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let ips: Vec<IpAddr> = pod
            .status
            .pod_ips
            .iter()
            .filter_map(|p| p.ip.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect();
        if ips.is_empty() {
            return None;
        }
        if let Some(host) = pod.status.host_ip.as_deref()
            && ips.iter().any(|ip| ip.to_string() == host)
        {
            tracing::warn!(pod = %pod.key(), "host-network pod: its address is the node's, not served");
            return None;
        }
        if let Some(c) = known {
            return Some((ips, c.clone()));
        }
        let ctx = self.identity.for_pod(pod.identity());
        let stats = self.stats.clone();
        match Proxy::with_stats(&self.cfg, Limits::default(), Dialer::Host, &ctx, stats) {
            Ok(proxy) => {
                tracing::info!(pod = %pod.key(), ips = ?ips, "gateway client");
                let client = Client {
                    uid: pod.metadata.uid.clone(),
                    key: pod.key(),
                    proxy,
                };
                Some((ips, Arc::new(client)))
            }
            Err(e) => {
                tracing::warn!(pod = %pod.key(), error = %e, "cannot serve this client pod");
                None
            }
        }
    }
}

fn remove_uid(table: &mut HashMap<IpAddr, Vec<Arc<Client>>>, uid: &str) {
    table.retain(|_, clients| {
        clients.retain(|c| c.uid != uid);
        !clients.is_empty()
    });
}
