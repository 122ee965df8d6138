//! `robin node`: the DaemonSet mode. Watches the pods of this node, and for every pod annotated
//! `robin.dev/inject: "true"` finds its cgroup and network namespace, opens a listener inside
//! that namespace, attaches capture to the pod cgroup and serves the pod with its own identity
//! (its token read through its own filesystem view). Upstream connections are made from inside
//! the pod's namespace, so they leave with the pod's address.
//!
//! One task owns the [`Capturer`] and all per-pod state; the pod watch feeds it events, a 1 s
//! tick retries pods that could not be captured yet (no cgroup or no process yet).
//!
//! Capture is pinned in bpffs and outlives the agent: while the agent is down (crash, upgrade),
//! a captured pod's connects are still redirected, find no listener and are refused. A starting
//! agent adopts the pinned attachments: each is replaced, without a gap, when its pod is
//! captured again, and released once the first pod list shows its pod is gone.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    capture::{
        self, Attachment, CaptureSettings, CapturedListener, Capturer, Cgroup, NetNs, PinDir,
    },
    config::ConfigArgs,
    conns::Connections,
    identity::{self, PodRef},
    podfs::{PodFs, PodRoot},
    proxy::{Dialer, Limits, Proxy},
};

pub mod config;
pub mod kube;
pub mod podcgroup;
pub mod wait;

use self::kube::{Pod, PodEvent};
use config::NodeConfig;

pub const ANN_INJECT: &str = "robin.dev/inject";
pub const ANN_RULES: &str = "robin.dev/rules";
pub const ANN_TOKEN_PATH: &str = "robin.dev/token-path";
pub const ANN_CAPTURE_PORTS: &str = "robin.dev/capture-ports";

pub const ENV_NODE_NAME: &str = "NODE_NAME";
pub const ENV_CGROUP_ROOT: &str = "ROBIN_CGROUP_ROOT";
pub const ENV_KUBE_API: &str = "ROBIN_KUBE_API";
pub const ENV_KUBE_TOKEN_FILE: &str = "ROBIN_KUBE_TOKEN_FILE";
pub const ENV_KUBE_CA: &str = "ROBIN_KUBE_CA";
pub const ENV_ADMIN_ADDR: &str = "ROBIN_ADMIN_ADDR";
pub const ENV_BPF_PIN_DIR: &str = "ROBIN_BPF_PIN_DIR";
pub const ENV_DRAIN_TIMEOUT: &str = "ROBIN_DRAIN_TIMEOUT";

const RETRY_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{ANN_CAPTURE_PORTS}: {0:?} is not a comma-separated list of ports (1-65535)")]
    BadPorts(String),
    #[error("{ANN_TOKEN_PATH}: {0:?} must be an absolute path without `..`")]
    BadTokenPath(String),
    #[error("{ANN_RULES}: no rule set {0:?} in the node config")]
    UnknownRuleSet(String),
    #[error(transparent)]
    PodCgroup(#[from] podcgroup::PodCgroupError),
    #[error(transparent)]
    NetNs(#[from] capture::netns::NetNsError),
    #[error(transparent)]
    Listener(#[from] capture::listener::ListenerError),
    #[error(transparent)]
    Capture(#[from] capture::ebpf::CaptureError),
    #[error("building the pod's proxy: {0}")]
    Proxy(#[from] crate::proxy::ProxyError),
}

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// This node's name (from the downward API).
    #[arg(long, env = ENV_NODE_NAME)]
    pub node_name: String,
    /// Where the kubelet's pod cgroups live (default: the cgroup2 mount).
    #[arg(long, env = ENV_CGROUP_ROOT, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    /// API server URL (default: in-cluster config). `http://` only for tests or `kubectl proxy`.
    #[arg(long, env = ENV_KUBE_API, value_name = "URL")]
    pub kube_api: Option<String>,
    /// Bearer token file for --kube-api.
    #[arg(long, env = ENV_KUBE_TOKEN_FILE, value_name = "FILE")]
    pub kube_token_file: Option<PathBuf>,
    /// CA bundle for an https --kube-api.
    #[arg(long, env = ENV_KUBE_CA, value_name = "FILE")]
    pub kube_ca: Option<PathBuf>,
    /// Kubeconfig file(s), colon-separated, used when --kube-api is not given (outside a
    /// cluster). Default when not in a pod: ~/.kube/config.
    #[arg(long, env = kube::ENV_KUBECONFIG, value_name = "FILES")]
    pub kubeconfig: Option<String>,
    /// Kubeconfig context (default: its current-context).
    #[arg(long, value_name = "NAME")]
    pub kube_context: Option<String>,
    /// Admin plane: /healthz, /readyz, /metrics, /debug/pods.
    #[arg(long, env = ENV_ADMIN_ADDR, default_value = "0.0.0.0:4001")]
    pub admin_addr: SocketAddr,
    /// Where maps and per-pod links are pinned (must be on the host's bpffs); what keeps pods
    /// captured, failing closed, while the agent restarts.
    #[arg(long, env = ENV_BPF_PIN_DIR, default_value = "/sys/fs/bpf/robin", value_name = "DIR")]
    pub bpf_pin_dir: PathBuf,
    /// On SIGTERM, how long connections in flight may take to finish (keep it below the pod's
    /// terminationGracePeriodSeconds), e.g. `10s`, `500ms`.
    #[arg(long, env = ENV_DRAIN_TIMEOUT, default_value = "10s", value_parser = crate::oidc_gateway::parse_duration)]
    pub drain_timeout: Duration,
}

/// What a pod asks for through its annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub rule_set: String,
    pub token_path: PathBuf,
    pub ports: Option<Vec<u16>>,
}

/// `None`: the pod is not opted in (or has finished). `Err`: opted in with bad annotations.
pub fn wanted(pod: &Pod) -> Result<Option<Wanted>, NodeError> {
    let ann = &pod.metadata.annotations;
    if ann.get(ANN_INJECT).map(String::as_str) != Some("true") {
        return Ok(None);
    }
    // A finished pod has no process left to serve.
    if matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let rule_set = ann
        .get(ANN_RULES)
        .cloned()
        .unwrap_or_else(|| config::DEFAULT_RULE_SET.to_owned());
    let token_path = match ann.get(ANN_TOKEN_PATH) {
        None => PathBuf::from(config::DEFAULT_TOKEN_PATH),
        Some(p) => {
            let path = PathBuf::from(p);
            let sane = path.is_absolute()
                && path
                    .components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir));
            if !sane {
                return Err(NodeError::BadTokenPath(p.clone()));
            }
            path
        }
    };
    let ports = match ann.get(ANN_CAPTURE_PORTS) {
        None => None,
        Some(raw) => {
            let ports: Option<Vec<u16>> = raw
                .split(',')
                .map(|p| p.trim().parse::<u16>().ok().filter(|&p| p != 0))
                .collect();
            match ports {
                Some(p) if !p.is_empty() => Some(p),
                _ => return Err(NodeError::BadPorts(raw.clone())),
            }
        }
    };
    Ok(Some(Wanted {
        rule_set,
        token_path,
        ports,
    }))
}

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

/// A container of the pod started, restarted or was replaced (by the pod watch): the process to
/// read the pod's files through may have changed.
pub fn containers_changed(old: &Pod, new: &Pod) -> bool {
    old.status.container_statuses != new.status.container_statuses
        || old.status.init_container_statuses != new.status.init_container_statuses
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

/// What the reconciler shares with the admin plane.
#[derive(Default)]
pub struct NodeShared {
    pub programs_loaded: AtomicBool,
    pub watch_synced: Arc<AtomicBool>,
    pub ca_loaded: AtomicBool,
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
    pub fn ready(&self) -> bool {
        self.programs_loaded.load(Ordering::Relaxed)
            && self.watch_synced.load(Ordering::Relaxed)
            && self.ca_loaded.load(Ordering::Relaxed)
    }

    pub fn captured_pods(&self) -> usize {
        self.pods
            .lock()
            .expect("pods lock")
            .values()
            .filter(|p| p.state == PodState::Captured)
            .count()
    }

    /// Counters over every proxy this agent has run.
    pub fn totals(&self) -> Totals {
        let mut t = self.retired.lock().expect("retired lock").clone();
        for p in self.proxies.lock().expect("proxies lock").values() {
            t.add(p);
        }
        t
    }
}

pub fn main(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::load(&args.config)?;
    capture::check_capabilities(true).map_err(anyhow::Error::msg)?;
    // Pod files are read only inside the pod's root; without openat2 that cannot be done.
    crate::podfs::probe()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(crate::exec::MAX_BLOCKING_THREADS)
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args, cfg))
}

async fn run(args: NodeArgs, cfg: NodeConfig) -> anyhow::Result<ExitCode> {
    let shared = Arc::new(NodeShared::default());
    let nofile = crate::conns::raise_nofile_limit();
    let conns = Connections::for_limit(cfg.base.capture.max_connections, nofile);
    tokio::spawn(crate::conns::trim_when_load_falls(conns.clone()));
    let _ = shared.connections.set(conns);
    // The CA was loaded and checked against its key by the config loader.
    shared.ca_loaded.store(true, Ordering::Relaxed);
    tracing::info!(
        node = %args.node_name,
        rule_sets = ?cfg.rule_sets.keys().collect::<Vec<_>>(),
        tls = ?cfg.base.tls,
        capture = ?cfg.base.capture,
        "effective configuration"
    );
    let pins = PinDir::open(&args.bpf_pin_dir).context("opening the bpffs pin directory")?;
    let capturer = Capturer::load_pinned(pins).context("loading eBPF capture")?;
    let _ = shared.capture_refused.set(capturer.refused_connects());
    let adopted = capturer.adopt_pinned();
    tracing::info!(
        pin_dir = %args.bpf_pin_dir.display(),
        adopted = adopted.len(),
        "eBPF capture loaded"
    );
    shared.programs_loaded.store(true, Ordering::Relaxed);
    let cgroup_root = match args.cgroup_root.clone().or(cfg.cgroup_root.clone()) {
        Some(r) => podcgroup::cgroup2_root(&r).context("checking the cgroup root")?,
        None => capture::find_cgroup2_mount().context("finding the cgroup2 mount")?,
    };
    tracing::info!(cgroup_root = %cgroup_root.display(), "pod cgroups");
    let client = kube::client(&args)
        .await
        .context("configuring the Kubernetes client")?;

    let admin = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin plane on {}", args.admin_addr))?;
    tracing::info!(addr = %admin.local_addr().unwrap_or(args.admin_addr), "admin plane listening");
    tokio::spawn(crate::admin::serve(admin, shared.clone()));

    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(kube::run_pod_watch(
        client,
        args.node_name.clone(),
        tx,
        shared.watch_synced.clone(),
    ));
    let in_flight = Arc::new(());
    let reconciler = Reconciler {
        capturer,
        cfg,
        cgroup_root,
        shared,
        known: HashMap::new(),
        captured: HashMap::new(),
        adopted,
        listed: false,
        in_flight: in_flight.clone(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let mut reconciler = tokio::spawn(reconciler.run(rx, stopped));
    tokio::select! {
        r = &mut reconciler => {
            r.context("the reconciler failed")?;
            return Ok(ExitCode::FAILURE);
        }
        r = tokio::signal::ctrl_c() => { r.context("waiting for a signal")?; }
        () = sigterm() => {}
    }
    // Stop accepting (listeners close; the pinned capture stays, so new connects are refused),
    // then let connections in flight finish, bounded.
    let _ = stop.send(());
    let _ = reconciler.await;
    let left = crate::proxy::drain(&in_flight, args.drain_timeout).await;
    tracing::info!(
        connections_cut = left,
        "shutting down; pinned capture stays in place"
    );
    Ok(ExitCode::SUCCESS)
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

struct Captured {
    wanted: Wanted,
    attachment: Attachment,
    proxy: watch::Sender<Proxy>,
    serve: JoinHandle<()>,
    netns: Arc<NetNs>,
    /// The listener's port (the attachment redirects there); kept across a ports change.
    listener_port: u16,
    cgroup: PathBuf,
    /// The pod's files are read inside the root of one of its processes; the proxy's sources
    /// may switch it themselves (a file not found), the tick and container changes too.
    fs: Arc<PodFs>,
    /// The process `/debug/pods` shows.
    pid: u32,
    token_visible: bool,
    /// Who the pod is, for sources that act on its behalf (TokenRequest, delegated SPIFFE).
    identity: PodRef,
}

struct Reconciler {
    capturer: Capturer,
    cfg: NodeConfig,
    cgroup_root: PathBuf,
    shared: Arc<NodeShared>,
    /// Opted-in pods as last seen, by uid.
    known: HashMap<String, Pod>,
    captured: HashMap<String, Captured>,
    /// Pinned attachments not (yet) claimed by a pod, by cgroup id: left by an earlier agent,
    /// or kept across a change of capture ports.
    adopted: HashMap<u64, Attachment>,
    /// A complete pod list has been applied: adopted attachments no pod claims can go.
    listed: bool,
    /// Cloned by every connection task, so shutdown can wait for them.
    in_flight: Arc<()>,
}

impl Reconciler {
    /// Runs until `stop` fires (then closes every listener) or the pod watch ends.
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<PodEvent>,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut tick = tokio::time::interval(RETRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => {
                    for c in self.captured.values() {
                        c.serve.abort();
                    }
                    return;
                }
                ev = rx.recv() => match ev {
                    None => return,
                    Some(PodEvent::Restarted(pods)) => {
                        let fresh: HashMap<String, Pod> = pods
                            .into_iter()
                            .map(|p| (p.metadata.uid.clone(), p))
                            .collect();
                        let reported: Vec<String> =
                            self.shared.pods.lock().expect("pods lock").keys().cloned().collect();
                        let gone: Vec<String> = self
                            .known
                            .keys()
                            .chain(self.captured.keys())
                            .chain(reported.iter())
                            .filter(|uid| !fresh.contains_key(*uid))
                            .cloned()
                            .collect();
                        for uid in gone {
                            self.forget(&uid);
                        }
                        for pod in fresh.into_values() {
                            self.apply(pod);
                        }
                        self.listed = true;
                        self.release_unclaimed();
                    }
                    Some(PodEvent::Applied(pod)) => self.apply(pod),
                    Some(PodEvent::Deleted(pod)) => self.forget(&pod.metadata.uid),
                },
                _ = tick.tick() => {
                    let pending: Vec<Pod> = self
                        .known
                        .iter()
                        .filter(|(uid, _)| !self.captured.contains_key(*uid))
                        .map(|(_, p)| p.clone())
                        .collect();
                    for pod in pending {
                        self.apply(pod);
                    }
                    self.release_unclaimed();
                    self.refresh_views();
                }
            }
        }
    }

    fn view(&self, pod: &Pod, state: PodState, error: Option<String>) -> PodView {
        PodView {
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            state,
            error,
            rule_set: None,
            cgroup: None,
            pid: None,
            listener_port: None,
            ports: None,
            token_path: None,
            token_visible: None,
            captured_at_unix: None,
            adopted: None,
        }
    }

    fn set_view(&self, view: PodView) {
        self.shared
            .pods
            .lock()
            .expect("pods lock")
            .insert(view.uid.clone(), view);
    }

    /// Brings one pod to what its annotations ask for.
    fn apply(&mut self, pod: Pod) {
        let uid = pod.metadata.uid.clone();
        let want = match wanted(&pod) {
            Ok(Some(w)) => w,
            Ok(None) => {
                self.forget(&uid);
                return;
            }
            Err(e) => {
                // Opted in but unusable: keep any capture in place (never fail open), report.
                tracing::warn!(pod = %pod.key(), error = %e, "invalid annotations");
                if !self.captured.contains_key(&uid) {
                    self.set_view(self.view(&pod, PodState::Invalid, Some(e.to_string())));
                }
                self.known.remove(&uid);
                return;
            }
        };
        let containers_changed = self
            .known
            .get(&uid)
            .is_some_and(|old| containers_changed(old, &pod));
        self.known.insert(uid.clone(), pod.clone());
        if let Some(c) = self.captured.get(&uid) {
            let (rules_changed, ports_changed) = (
                c.wanted.rule_set != want.rule_set || c.wanted.token_path != want.token_path,
                c.wanted.ports != want.ports,
            );
            if rules_changed {
                self.swap_proxy(&pod, &want);
            }
            if ports_changed {
                self.reattach(&pod, &want);
            }
            if containers_changed {
                // A container started or restarted: its process may be the one that sees the
                // pod's volumes, or the one we read through may be gone.
                self.refresh_view(&uid, true);
            }
            return;
        }
        match self.capture(&pod, &want) {
            Ok(view) => {
                tracing::info!(pod = %pod.key(), cgroup = ?view.cgroup, pid = ?view.pid, listener_port = ?view.listener_port, "captured");
                self.set_view(view);
            }
            Err(e) => {
                let error = e.to_string();
                // Retried every second: log only when the reason changes.
                let same = self
                    .shared
                    .pods
                    .lock()
                    .expect("pods lock")
                    .get(&uid)
                    .is_some_and(|v| v.error.as_deref() == Some(error.as_str()));
                if !same {
                    tracing::info!(pod = %pod.key(), error, "not captured yet; will retry");
                }
                self.set_view(self.view(&pod, PodState::Pending, Some(error)));
            }
        }
    }

    /// New rules or token path: a new proxy for the pod; the kernel side and the listener stay.
    fn swap_proxy(&mut self, pod: &Pod, want: &Wanted) {
        let uid = &pod.metadata.uid;
        let c = &self.captured[uid];
        let proxy = match self.pod_proxy(&c.identity, want, c.fs.clone(), c.netns.clone()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(pod = %pod.key(), error = %e, "re-applying annotations failed; keeping the previous ones");
                return;
            }
        };
        let old = c.proxy.send_replace(proxy.clone());
        self.retire(&old);
        self.shared
            .proxies
            .lock()
            .expect("proxies lock")
            .insert(uid.clone(), proxy);
        let c = self.captured.get_mut(uid).expect("present");
        c.wanted.rule_set = want.rule_set.clone();
        c.wanted.token_path = want.token_path.clone();
        // The new token path may need another process's view.
        c.token_visible = false;
        if let Some(v) = self.shared.pods.lock().expect("pods lock").get_mut(uid) {
            v.rule_set = Some(want.rule_set.clone());
            v.token_path = Some(want.token_path.clone());
        }
        tracing::info!(pod = %pod.key(), "re-applied annotations");
    }

    /// New capture ports: attach again with them, redirecting to the same listener, which
    /// keeps serving (a fixed listener port could not be bound twice). The new links are in
    /// place before the old ones go: no connect is refused or sent direct meanwhile.
    fn reattach(&mut self, pod: &Pod, want: &Wanted) {
        let uid = &pod.metadata.uid;
        let Some(mut c) = self.captured.remove(uid) else {
            return;
        };
        let ports = want
            .ports
            .clone()
            .unwrap_or_else(|| self.cfg.base.capture.ports.clone());
        let settings = CaptureSettings::new(ports.clone(), c.listener_port);
        let cgroup = Cgroup::existing(c.cgroup.clone());
        match self
            .capturer
            .attach_replacing(&cgroup, &settings, Some(c.attachment))
        {
            Ok(attachment) => {
                c.attachment = attachment;
                c.wanted.ports = want.ports.clone();
                if let Some(v) = self.shared.pods.lock().expect("pods lock").get_mut(uid) {
                    v.ports = Some(ports);
                }
                tracing::info!(pod = %pod.key(), "capture ports changed");
                self.captured.insert(uid.clone(), c);
            }
            Err(e) => match e.previous {
                Some(previous) => {
                    tracing::warn!(pod = %pod.key(), error = %e.error, "changing capture ports failed; keeping the previous ones");
                    c.attachment = previous;
                    self.captured.insert(uid.clone(), c);
                }
                None => {
                    // The old links are gone too: capture from scratch (retried every second).
                    tracing::warn!(pod = %pod.key(), error = %e.error, "changing capture ports failed; capturing again");
                    c.serve.abort();
                    self.retire_pod_proxy(uid);
                    self.apply(pod.clone());
                }
            },
        }
    }

    fn pod_proxy(
        &self,
        pod: &PodRef,
        want: &Wanted,
        fs: Arc<PodFs>,
        netns: Arc<NetNs>,
    ) -> Result<Proxy, NodeError> {
        let set = self
            .cfg
            .rule_sets
            .get(&want.rule_set)
            .ok_or_else(|| NodeError::UnknownRuleSet(want.rule_set.clone()))?;
        let cfg = set.for_pod(&want.token_path, want.ports.as_deref());
        // The pod's own context over the one process-wide token cache, reading files inside
        // the pod's root.
        let identity = identity::process_context()
            .for_pod(pod.clone())
            .in_pod_fs(fs);
        Ok(Proxy::with_dialer_and_identity(
            &cfg,
            Limits::default(),
            Dialer::InNetNs(netns),
            &identity,
        )?)
    }

    fn capture(&mut self, pod: &Pod, want: &Wanted) -> Result<PodView, NodeError> {
        let uid = &pod.metadata.uid;
        let qos = pod
            .status
            .qos_class
            .as_deref()
            .and_then(podcgroup::QosClass::parse);
        let cgroup = podcgroup::find(&self.cgroup_root, uid, qos)?;
        let (root, token_visible) = podcgroup::pick(&cgroup, &want.token_path)?;
        let pid = root.pid();
        let netns = Arc::new(NetNs::open(format!("/proc/{pid}/ns/net"))?);
        let fs = pod_fs(&cgroup, root);
        let identity = pod.identity();
        let proxy = self.pod_proxy(&identity, want, fs.clone(), netns.clone())?;
        let ports = want
            .ports
            .clone()
            .unwrap_or_else(|| self.cfg.base.capture.ports.clone());
        let listener = Arc::new(CapturedListener::bind(
            &netns,
            self.cfg.base.capture.listener_port,
            self.capturer.orig_dst_table(),
        )?);
        let settings = CaptureSettings::new(ports.clone(), listener.ports().port);
        let pod_cgroup = Cgroup::existing(cgroup.clone());
        let cgroup_id = pod_cgroup.id().map_err(capture::ebpf::CaptureError::from)?;
        let previous = self.adopted.remove(&cgroup_id);
        let adopted = previous.is_some();
        let attachment = self
            .capturer
            .attach_replacing(&pod_cgroup, &settings, previous)
            .map_err(|e| {
                if let Some(p) = e.previous {
                    self.adopted.insert(cgroup_id, p);
                }
                e.error
            })?;
        let (proxy_tx, proxy_rx) = watch::channel(proxy.clone());
        let span = tracing::info_span!("pod", pod = %pod.key());
        let serve = tokio::spawn(tracing::Instrument::instrument(
            accept_loop(
                listener,
                proxy_rx,
                self.in_flight.clone(),
                self.connections(),
            ),
            span,
        ));
        self.shared
            .proxies
            .lock()
            .expect("proxies lock")
            .insert(uid.clone(), proxy);
        self.captured.insert(
            uid.clone(),
            Captured {
                wanted: want.clone(),
                attachment,
                proxy: proxy_tx,
                serve,
                netns,
                listener_port: settings.listener_port,
                cgroup: cgroup.clone(),
                fs,
                pid,
                token_visible,
                identity,
            },
        );
        Ok(PodView {
            rule_set: Some(want.rule_set.clone()),
            cgroup: Some(cgroup),
            pid: Some(pid),
            listener_port: Some(settings.listener_port),
            ports: Some(ports),
            token_path: Some(want.token_path.clone()),
            token_visible: Some(token_visible),
            captured_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
            adopted: Some(adopted),
            ..self.view(pod, PodState::Captured, None)
        })
    }

    /// The token is read through one process's view of the pod's filesystem: when that
    /// process exits (container restart) or could not see the token yet (only the pause
    /// container was up), pick again. The proxy and the kernel side are untouched.
    fn refresh_views(&mut self) {
        let uids: Vec<String> = self.captured.keys().cloned().collect();
        for uid in uids {
            self.refresh_view(&uid, false);
        }
    }

    /// Re-selects the process of one captured pod when needed (`force`: a container changed).
    fn refresh_view(&mut self, uid: &str, force: bool) {
        let Some(c) = self.captured.get_mut(uid) else {
            return;
        };
        // A source may have switched process itself (a file only another process sees): that
        // one is checked like a new pick (its network namespace too).
        let current = c.fs.pid();
        let switched = current != c.pid;
        if switched {
            c.pid = current;
            c.token_visible = PodRoot::open(current).is_ok_and(|r| r.is_file(&c.wanted.token_path));
            self.show_process(uid);
        }
        let c = &self.captured[uid];
        let alive = Path::new(&format!("/proc/{}", c.pid)).exists();
        if !force && !switched && c.token_visible && alive {
            return;
        }
        let Ok((root, visible)) = podcgroup::pick(&c.cgroup, &c.wanted.token_path) else {
            return;
        };
        let pid = root.pid();
        // A recreated pod sandbox: same pod and cgroup, new network namespace. The listener
        // and upstream sockets must move there; capture again (the pinned links stay until
        // the new ones are in place, so connects meanwhile are refused, never direct).
        let moved = match (NetNs::id_of(format!("/proc/{pid}/ns/net")), c.netns.id()) {
            (Ok(new), Ok(old)) => new != old,
            _ => false,
        };
        if moved {
            tracing::info!(uid, pid, "pod network namespace changed; capturing again");
            self.recapture(uid);
            return;
        }
        if pid != c.pid {
            c.fs.replace(root);
            tracing::info!(uid, pid, token_visible = visible, "pod process re-selected");
        }
        let c = self.captured.get_mut(uid).expect("present");
        c.pid = pid;
        c.token_visible = visible;
        self.show_process(uid);
    }

    fn show_process(&self, uid: &str) {
        let c = &self.captured[uid];
        if let Some(v) = self.shared.pods.lock().expect("pods lock").get_mut(uid) {
            v.pid = Some(c.pid);
            v.token_visible = Some(c.token_visible);
        }
    }

    /// Captures a pod again from scratch (new listener, new process, new proxy), replacing its
    /// attachment without a gap.
    fn recapture(&mut self, uid: &str) {
        if let Some(old) = self.captured.remove(uid) {
            old.serve.abort();
            self.adopted
                .insert(old.attachment.cgroup_id(), old.attachment);
            self.retire_pod_proxy(uid);
        }
        if let Some(pod) = self.known.get(uid).cloned() {
            self.apply(pod);
        }
    }

    /// Releases adopted attachments that no opted-in pod claims, once a complete pod list has
    /// been applied: their pods were deleted (or opted out) while no agent was running. An
    /// attachment whose pod is still wanted but not captured yet is kept: better refused than
    /// sent direct.
    fn release_unclaimed(&mut self) {
        if !self.listed || self.adopted.is_empty() {
            return;
        }
        let wanted: Vec<u64> = self
            .known
            .iter()
            .filter(|(uid, _)| !self.captured.contains_key(*uid))
            .filter_map(|(uid, pod)| {
                let qos = pod
                    .status
                    .qos_class
                    .as_deref()
                    .and_then(podcgroup::QosClass::parse);
                let path = podcgroup::find(&self.cgroup_root, uid, qos).ok()?;
                Cgroup::existing(path).id().ok()
            })
            .collect();
        let unclaimed: Vec<u64> = self
            .adopted
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        for id in unclaimed {
            if let Some(a) = self.adopted.remove(&id) {
                self.capturer.detach(a);
                tracing::info!(cgroup_id = id, "released a pinned capture no pod claims");
            }
        }
    }

    /// Stops reporting a pod's proxy; its counters go to the retired totals.
    fn retire_pod_proxy(&self, uid: &str) {
        let proxy = self
            .shared
            .proxies
            .lock()
            .expect("proxies lock")
            .remove(uid);
        if let Some(p) = proxy {
            self.retire(&p);
        }
    }

    fn retire(&self, proxy: &Proxy) {
        self.shared.retired.lock().expect("retired lock").add(proxy);
    }

    /// Detaches and closes the listener of a captured pod.
    fn release(&mut self, uid: &str) {
        if let Some(c) = self.captured.remove(uid) {
            // Redirection is removed before the listener closes: no connect lands on a closed
            // listener because of us.
            self.capturer.detach(c.attachment);
            c.serve.abort();
            self.retire_pod_proxy(uid);
            tracing::info!(uid, "released");
        }
    }

    fn connections(&self) -> Arc<Connections> {
        self.shared
            .connections
            .get()
            .cloned()
            .unwrap_or_else(|| Connections::new(usize::MAX))
    }

    /// The pod is gone or no longer opted in.
    fn forget(&mut self, uid: &str) {
        self.release(uid);
        self.known.remove(uid);
        self.shared.pods.lock().expect("pods lock").remove(uid);
    }
}

/// The pod's filesystem as read through `root`, re-selectable among the processes of the pod
/// cgroup (a source that cannot find a file asks for one that sees it).
fn pod_fs(cgroup: &Path, root: PodRoot) -> Arc<PodFs> {
    let cgroup = cgroup.to_owned();
    PodFs::new(
        root,
        Box::new(move |path| podcgroup::root_showing(&cgroup, path)),
    )
}

async fn accept_loop(
    listener: Arc<CapturedListener>,
    proxy: watch::Receiver<Proxy>,
    in_flight: Arc<()>,
    conns: Arc<Connections>,
) {
    loop {
        match listener.accept().await {
            Ok((mut stream, orig, client)) => {
                if orig.0.ip() == wait::PROBE_IP {
                    // `robin await` asking whether this pod is captured: it is.
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt as _;
                        let _ = stream.write_all(wait::PROBE_ANSWER).await;
                        let _ = stream.shutdown().await;
                    });
                    continue;
                }
                let Some(conn) = conns.admit() else {
                    continue;
                };
                let proxy = proxy.borrow().clone();
                let guard = in_flight.clone();
                tokio::spawn(async move {
                    proxy.serve_admitted(stream, orig, client, conn).await;
                    drop(guard);
                });
            }
            Err(e) => conns.accept_failed(&e).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ann: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.uid = "u".into();
        p.metadata.annotations = ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p
    }

    #[test]
    fn annotations_decide_capture() {
        assert!(wanted(&pod(&[])).unwrap().is_none());
        assert!(wanted(&pod(&[(ANN_INJECT, "false")])).unwrap().is_none());
        let w = wanted(&pod(&[(ANN_INJECT, "true")])).unwrap().unwrap();
        assert_eq!(w.rule_set, "default");
        assert_eq!(w.token_path, Path::new(config::DEFAULT_TOKEN_PATH));
        assert_eq!(w.ports, None);
        let w = wanted(&pod(&[
            (ANN_INJECT, "true"),
            (ANN_RULES, "broker"),
            (ANN_TOKEN_PATH, "/t/tok"),
            (ANN_CAPTURE_PORTS, "443, 8443"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.rule_set, "broker");
        assert_eq!(w.token_path, Path::new("/t/tok"));
        assert_eq!(w.ports, Some(vec![443, 8443]));
        for bad in [
            (ANN_CAPTURE_PORTS, "0"),
            (ANN_CAPTURE_PORTS, "x"),
            (ANN_CAPTURE_PORTS, ""),
            (ANN_TOKEN_PATH, "relative"),
            (ANN_TOKEN_PATH, "/a/../etc/shadow"),
        ] {
            assert!(
                wanted(&pod(&[(ANN_INJECT, "true"), bad])).is_err(),
                "{bad:?}"
            );
        }
        let mut done = pod(&[(ANN_INJECT, "true")]);
        assert!(!containers_changed(&done, &done.clone()));
        done.status.phase = Some("Succeeded".into());
        assert!(wanted(&done).unwrap().is_none());
    }

    #[test]
    fn container_starts_and_restarts_are_noticed() {
        let at = |statuses: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"uid": "u"},
                "status": statuses,
            }))
            .unwrap()
        };
        let pause_only = at(serde_json::json!({"phase": "Pending"}));
        let init = at(serde_json::json!({"initContainerStatuses": [
            {"name": "robin-await", "containerID": "containerd://1", "restartCount": 0, "started": true}
        ]}));
        let app = at(serde_json::json!({"containerStatuses": [
            {"name": "app", "containerID": "containerd://2", "restartCount": 0, "started": true}
        ]}));
        let restarted = at(serde_json::json!({"containerStatuses": [
            {"name": "app", "containerID": "containerd://3", "restartCount": 1, "started": false}
        ]}));
        assert!(containers_changed(&pause_only, &init));
        assert!(containers_changed(&pause_only, &app));
        assert!(containers_changed(&app, &restarted));
        assert!(!containers_changed(&app, &app.clone()));
        // Other status fields do not count.
        let mut ready = app.clone();
        ready.status.phase = Some("Running".into());
        assert!(!containers_changed(&app, &ready));
    }
}
