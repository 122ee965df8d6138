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
use std::{collections::HashMap, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::{
    admin::{Admin, Readiness},
    capture::{self, Capturer, PinDir},
    conns::Connections,
    proxy::ProxyStats,
    serve::Served,
};

mod accept;
pub mod annotations;
pub mod args;
pub mod config;
pub mod metrics;
pub mod podcgroup;
pub mod pods;
mod reconciler;
pub mod wait;

pub use annotations::{ANN_CAPTURE_PORTS, ANN_INJECT, ANN_RULES, ANN_TOKEN_PATH, Wanted, wanted};
pub use args::NodeArgs;
pub use pods::{DebugPods, NodeShared, PodState, PodView};

use config::NodeConfig;
use reconciler::Reconciler;

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

pub fn main(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::load(&args.config)?;
    capture::check_capabilities(true).map_err(anyhow::Error::msg)?;
    // Pod files are read only inside the pod's root; without openat2 that cannot be done.
    crate::podfs::probe()?;
    crate::standalone::runtime()?.block_on(run(args, cfg))
}

async fn run(args: NodeArgs, cfg: NodeConfig) -> anyhow::Result<ExitCode> {
    // The process's one metrics registry: each module registers its own families.
    let mut registry = Registry::default();
    let shared = Arc::new(NodeShared {
        pods: Default::default(),
        proxy_stats: Arc::new(ProxyStats::register(&mut registry)),
    });
    let readiness = Readiness::default();
    let programs_loaded = readiness.register("programs_loaded");
    let watch_synced = readiness.register("pod_watch_synced");
    let nofile = crate::conns::raise_nofile_limit();
    let conns = Connections::for_limit(cfg.base.capture.max_connections, nofile);
    tokio::spawn(crate::conns::trim_when_load_falls(conns.clone()));
    registry.register_collector(Box::new(conns.clone()));
    // The CA was loaded and checked against its key by the config loader.
    readiness.register("ca_loaded").mark_ready();
    tracing::info!(
        node = %args.node_name,
        rule_sets = ?cfg.rule_sets.keys().collect::<Vec<_>>(),
        tls = ?cfg.base.tls,
        capture = ?cfg.base.capture,
        "effective configuration"
    );
    let (capturer, adopted) = load_capture(&args, &mut registry)?;
    programs_loaded.mark_ready();
    let cgroup_root = match args.cgroup_root.clone().or(cfg.cgroup_root.clone()) {
        Some(r) => podcgroup::cgroup2_root(&r).context("checking the cgroup root")?,
        None => capture::find_cgroup2_mount().context("finding the cgroup2 mount")?,
    };
    tracing::info!(cgroup_root = %cgroup_root.display(), "pod cgroups");
    let client = crate::kube::client(&args.kube)
        .await
        .context("configuring the Kubernetes client")?;

    serve_admin(&args, readiness, shared.clone(), registry).await?;

    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(crate::kube::run_pod_watch(
        client,
        crate::kube::PodSelector::OnNode(args.node_name.clone()),
        tx,
        // Readiness is latched by the reconciler once it has applied the first list.
        Arc::default(),
    ));
    let served = Served::new(conns)?;
    let reconciler = Reconciler::new(
        capturer,
        cfg,
        cgroup_root,
        shared,
        adopted,
        served.clone(),
        watch_synced,
    );
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
    let left = served.drain(args.drain_timeout).await;
    tracing::info!(
        connections_cut = left,
        "shutting down; pinned capture stays in place"
    );
    Ok(ExitCode::SUCCESS)
}

/// The admin plane: readiness, `/debug/pods` and the process's metrics registry.
async fn serve_admin(
    args: &NodeArgs,
    readiness: Readiness,
    shared: Arc<NodeShared>,
    mut registry: Registry,
) -> anyhow::Result<()> {
    let admin = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin plane on {}", args.admin_addr))?;
    tracing::info!(addr = %admin.local_addr().unwrap_or(args.admin_addr), "admin plane listening");
    let mut plane = Admin::new(readiness.clone());
    plane.register("/debug/pods", Arc::new(DebugPods(shared.clone())));
    metrics::register(&mut registry, shared, readiness);
    plane.register("/metrics", Arc::new(crate::metrics::Scrape(registry)));
    tokio::spawn(plane.serve(admin));
    Ok(())
}

/// Loads (or reuses the pinned) eBPF programs and adopts the attachments an earlier agent left.
fn load_capture(
    args: &NodeArgs,
    registry: &mut Registry,
) -> anyhow::Result<(Capturer, HashMap<u64, capture::Attachment>)> {
    let pins = PinDir::open(&args.bpf_pin_dir).context("opening the bpffs pin directory")?;
    let capturer = Capturer::load_pinned(pins).context("loading eBPF capture")?;
    registry.register_collector(Box::new(capturer.refused_connects()));
    let adopted = capturer.adopt_pinned();
    tracing::info!(
        pin_dir = %args.bpf_pin_dir.display(),
        adopted = adopted.len(),
        "eBPF capture loaded"
    );
    Ok((capturer, adopted))
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
