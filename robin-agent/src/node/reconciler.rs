//! The one task that owns the [`Capturer`] and all per-pod state: brings each opted-in pod to
//! what its annotations ask for, retries what could not be captured yet every second, and
//! releases what no pod claims.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::ReadyLatch,
    capture::{self, Attachment, CaptureSettings, CapturedListener, Capturer, Cgroup, NetNs},
    identity::{self, PodRef},
    kube::{Pod, PodEvent},
    podfs::{PodFs, PodRoot},
    proxy::{Dialer, Limits, Proxy},
    serve::Served,
};

use super::{
    NodeError, accept,
    annotations::{Wanted, containers_changed, wanted},
    config::NodeConfig,
    podcgroup,
    pods::{NodeShared, PodState, PodView},
};

const RETRY_EVERY: Duration = Duration::from_secs(1);

struct Captured {
    wanted: Wanted,
    attachment: Attachment,
    proxy: watch::Sender<Proxy>,
    /// Stops the pod's accept loop (its listener closes); connections in flight go on.
    serve: CancellationToken,
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

pub(super) struct Reconciler {
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
    /// Every pod's accept loop and connections, for the drain at shutdown.
    served: Served,
    /// Marked once the first complete pod list has been applied.
    watch_synced: Option<ReadyLatch>,
}

impl Reconciler {
    pub(super) fn new(
        capturer: Capturer,
        cfg: NodeConfig,
        cgroup_root: PathBuf,
        shared: Arc<NodeShared>,
        adopted: HashMap<u64, Attachment>,
        served: Served,
        watch_synced: ReadyLatch,
    ) -> Self {
        Self {
            capturer,
            cfg,
            cgroup_root,
            shared,
            known: HashMap::new(),
            captured: HashMap::new(),
            adopted,
            listed: false,
            served,
            watch_synced: Some(watch_synced),
        }
    }

    /// Runs until `stop` fires or the pod watch ends; the listeners are closed by the drain.
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<PodEvent>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut tick = tokio::time::interval(RETRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                ev = rx.recv() => match ev {
                    None => return,
                    Some(PodEvent::Restarted(pods)) => self.relisted(pods),
                    Some(PodEvent::Applied(pod)) => self.apply(pod),
                    Some(PodEvent::Deleted(pod)) => self.forget(&pod.metadata.uid),
                },
                _ = tick.tick() => self.tick(),
            }
        }
    }

    /// A complete pod list (the watch started or restarted): what it lacks is gone.
    fn relisted(&mut self, pods: Vec<Pod>) {
        let fresh: HashMap<String, Pod> = pods
            .into_iter()
            .map(|p| (p.metadata.uid.clone(), p))
            .collect();
        let reported: Vec<String> = self
            .shared
            .pods
            .lock()
            .expect("pods lock")
            .keys()
            .cloned()
            .collect();
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
        if let Some(latch) = self.watch_synced.take() {
            latch.mark_ready();
        }
    }

    /// Every second: retry pods not captured yet, release what no pod claims, re-check the
    /// process each captured pod is read through.
    fn tick(&mut self) {
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
        // The old proxy's counts stay in the shared families.
        c.proxy.send_replace(proxy);
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
                    c.serve.cancel();
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
        Ok(Proxy::with_stats(
            &cfg,
            Limits::default(),
            Dialer::InNetNs(netns),
            &identity,
            self.shared.proxy_stats.clone(),
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
        let (proxy_tx, proxy_rx) = watch::channel(proxy);
        let serve = accept::serve_pod(&self.served, listener, proxy_rx, pod);
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
            old.serve.cancel();
            self.adopted
                .insert(old.attachment.cgroup_id(), old.attachment);
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

    /// Detaches and closes the listener of a captured pod.
    fn release(&mut self, uid: &str) {
        if let Some(c) = self.captured.remove(uid) {
            // Redirection is removed before the listener closes: no connect lands on a closed
            // listener because of us.
            self.capturer.detach(c.attachment);
            c.serve.cancel();
            tracing::info!(uid, "released");
        }
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
