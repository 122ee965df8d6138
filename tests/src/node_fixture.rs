//! Fixtures for `robin node` end-to-end tests: kubelet-like cgroup trees, simulated pods and
//! small clients for the agent's admin plane; the fake API server is `crate::fake_api`.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    BpfPins, Cgroup, ChildGuard, Netns, Pki, TempDir, Topology, command_in, find_cgroup2_mount,
    pod_etc, robin_bin, unique_id,
};

pub const HOST: &str = "api.test";
pub use crate::fake_api::{FakeApi, MintedToken, NODE};
pub const WAIT: Duration = Duration::from_secs(30);

// ---- simulated pods ----

/// Cgroups created parent first, removed children first (removal kills what is left inside).
pub struct CgroupTree(pub Vec<Cgroup>);

impl CgroupTree {
    pub fn mkdirs(&mut self, root: &Path, rel: &Path) -> PathBuf {
        let mut p = root.to_owned();
        for c in rel.components() {
            p.push(c);
            if !p.exists() {
                self.0
                    .push(Cgroup::create(p.clone()).expect("creating cgroup"));
            }
        }
        p
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        while let Some(c) = self.0.pop() {
            drop(c);
        }
    }
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

pub fn pod_uid() -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        NEXT_UID.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn pod_json(name: &str, uid: &str, qos: &str, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "team", "uid": uid, "annotations": annotations},
        "spec": {"nodeName": NODE, "serviceAccountName": "default"},
        "status": {"phase": "Running", "qosClass": qos},
    })
}

pub fn start_upstream(topo: &Topology, pki: &Pki, log: &Path) -> ChildGuard {
    let tls = (pki.file("upstream.crt"), pki.file("upstream.key"));
    let ip = topo.upstream_ip4.into();
    crate::start_upstream_py(Some(&topo.upstream), ip, 443, Some((&tls.0, &tls.1)), log)
}

/// `curl https://api.test/` from inside `netns` and `cgroup`; the upstream's echo as JSON.
pub fn curl(topo_netns: &Netns, cgroup: &Cgroup, path: &str) -> Value {
    let out = command_in(
        topo_netns,
        Some(cgroup),
        "curl",
        &["-sS", "--max-time", "20", &format!("https://{HOST}{path}")],
    )
    .env_remove("HTTPS_PROXY")
    .env_remove("https_proxy")
    .env_remove("ALL_PROXY")
    .output()
    .expect("running curl");
    assert!(
        out.status.success(),
        "curl {path} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `curl https://api.test/path` from inside `netns` and `cgroup`, and, as a process of a real
/// container would be, inside the mount namespace of process `mounts_of` (see
/// [`pod_process_with_mounts`]): the HTTP status (0 when no answer) and body, whatever the status.
pub fn curl_status(netns: &Netns, cgroup: &Cgroup, mounts_of: u32, path: &str) -> (u16, String) {
    let url = format!("https://{HOST}{path}");
    let mnt = format!("--mount=/proc/{mounts_of}/ns/mnt");
    let out = command_in(
        netns,
        Some(cgroup),
        "nsenter",
        &[
            &mnt,
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            &url,
        ],
    )
    .output()
    .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

/// `GET path` on the admin plane: (status, body).
pub fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

pub fn debug_pods(port: u16) -> Vec<Value> {
    let (status, body) = admin_get(port, "/debug/pods").expect("admin plane answers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The pod's entry in `/debug/pods`; `None` also while the admin plane is not answering yet.
pub fn pod_state(port: u16, uid: &str) -> Option<Value> {
    admin_get(port, "/debug/pods")?;
    debug_pods(port).into_iter().find(|p| p["uid"] == uid)
}

pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A pod's network: its own namespace joined by veth to an upstream namespace that runs
/// `upstream.py` (HTTPS on 443, echoing what it received, logging to `log`); the pod's `/etc`
/// resolves [`HOST`] to it and trusts Robin's and the upstream's CA.
pub struct PodNet {
    pub topo: Topology,
    pub log: PathBuf,
    _upstream: ChildGuard,
}

impl PodNet {
    pub fn new(pki: &Pki, log: PathBuf) -> Self {
        let topo = Topology::new(0);
        pod_etc(
            &topo.pod,
            &[(HOST, std::net::IpAddr::from(topo.upstream_ip4))],
            &[pki.file("robin-ca.crt"), pki.file("upstream-ca.crt")],
        );
        let upstream = start_upstream(&topo, pki, &log);
        Self {
            topo,
            log,
            _upstream: upstream,
        }
    }

    pub fn netns(&self) -> &Netns {
        &self.topo.pod
    }
}

/// Two pod network namespaces with their upstreams, the PKI they trust and one pod's token
/// file, all in a scratch directory: the world of a node test about one or two sandboxes.
pub struct TwoPodNets {
    pub dir: TempDir,
    pub pki: Pki,
    pub first: PodNet,
    pub second: PodNet,
    pub token_file: PathBuf,
}

impl TwoPodNets {
    /// Upstream logs `up-{names.0}.log` and `up-{names.1}.log`; the token file holds `token`.
    pub fn new(tag: &str, names: (&str, &str), token: &str) -> Self {
        let dir = crate::temp_dir(tag);
        let pki = Pki::new(dir.path(), &[HOST]);
        let log = |n: &str| dir.path().join(format!("up-{n}.log"));
        let (first, second) = (
            PodNet::new(&pki, log(names.0)),
            PodNet::new(&pki, log(names.1)),
        );
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token).unwrap();
        Self {
            dir,
            pki,
            first,
            second,
            token_file,
        }
    }
}

/// A cgroup root laid out by the test as the kubelet lays out its pods, under `robin-test/` of
/// the cgroup2 mount; removed (children first) on drop.
pub struct KubeletCgroups {
    pub root: PathBuf,
    tree: CgroupTree,
}

impl KubeletCgroups {
    pub fn new() -> Self {
        let parent = find_cgroup2_mount()
            .expect("privileged test: no cgroup2 hierarchy is mounted")
            .join("robin-test");
        std::fs::create_dir_all(&parent).expect("creating the robin-test cgroup parent");
        let root = parent.join(format!("node{}", unique_id()));
        let tree = CgroupTree(vec![
            Cgroup::create(root.clone()).expect("creating cgroup root"),
        ]);
        Self { root, tree }
    }

    /// A container of pod `uid` with the systemd driver:
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<container>.scope`
    /// (`qos`: `besteffort` or `burstable`).
    pub fn systemd(&mut self, uid: &str, qos: &str, container: &str) -> Cgroup {
        let rel = Path::new("kubepods.slice")
            .join(format!("kubepods-{qos}.slice"))
            .join(format!("kubepods-{qos}-pod{}.slice", uid.replace('-', "_")))
            .join(format!("{container}.scope"));
        Cgroup::existing(self.tree.mkdirs(&self.root, &rel))
    }

    /// A container of pod `uid` with the cgroupfs driver: `kubepods/<qos>/pod<uid>/<container>`,
    /// or `kubepods/pod<uid>/<container>` for a Guaranteed pod (`qos` empty).
    pub fn cgroupfs(&mut self, uid: &str, qos: &str, container: &str) -> Cgroup {
        let rel = Path::new("kubepods")
            .join(qos)
            .join(format!("pod{uid}"))
            .join(container);
        Cgroup::existing(self.tree.mkdirs(&self.root, &rel))
    }
}

impl Default for KubeletCgroups {
    fn default() -> Self {
        Self::new()
    }
}

/// A container process of a pod: `sleep 600` inside `netns` and `cgroup`.
pub fn pod_process(netns: &Netns, cgroup: &Cgroup) -> ChildGuard {
    ChildGuard(
        command_in(netns, Some(cgroup), "sleep", &["600"])
            .spawn()
            .expect("starting a pod process"),
    )
}

/// A container process of a pod with a mount namespace of its own, as a container has: `setup`
/// (shell, e.g. mounting a tmpfs and writing a token into it) runs inside that namespace, then
/// the process becomes `sleep 600`. Returns once the setup is done; the mounts are visible only
/// through the process (`/proc/<pid>/root`), never in the test's own view.
pub fn pod_process_with_mounts(netns: &Netns, cgroup: &Cgroup, setup: &str) -> ChildGuard {
    let script = format!("set -e; {setup}; exec sleep 600");
    let mut child = ChildGuard(
        command_in(
            netns,
            Some(cgroup),
            "unshare",
            &["--mount", "--propagation", "private", "sh", "-c", &script],
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("starting a pod process with its own mounts"),
    );
    // `ip netns exec`, `unshare` and `sh -c 'exec ...'` all exec: the pid stays the same.
    let comm = format!("/proc/{}/comm", child.0.id());
    wait_for("the pod process's mount setup", || {
        if let Some(status) = child.0.try_wait().expect("polling the pod process") {
            panic!("the pod process's setup failed ({status}): {setup}");
        }
        (std::fs::read_to_string(&comm).ok()?.trim() == "sleep").then_some(())
    });
    child
}

/// Writes a node config: Robin's CA, the upstream CA as extra roots, capture of port 443, and
/// `rule_sets` (TOML).
pub fn write_node_config(path: &Path, pki: &Pki, rule_sets: &str) {
    write_node_config_with(path, pki, "", rule_sets);
}

/// [`write_node_config`] with more `[capture]` settings (TOML lines, e.g. `listener_port = 15001`).
pub fn write_node_config_with(path: &Path, pki: &Pki, capture: &str, rule_sets: &str) {
    std::fs::write(
        path,
        format!(
            "[tls]\nca_cert = {:?}\nca_key = {:?}\nupstream_roots = {:?}\n\n[capture]\nports = [443]\n{capture}\n\n{rule_sets}",
            pki.file("robin-ca.crt"),
            pki.file("robin-ca.key"),
            pki.file("upstream-ca.crt"),
        ),
    )
    .expect("writing the node config");
}

/// The one rule set most tests use: inject the pod's own token for [`HOST`].
pub fn default_rule_set() -> String {
    format!("[[rule_sets.default.inject]]\nhosts = [\"{HOST}\"]\n")
}

/// `robin node` against `api`, with the cgroup root, pin directory and admin port of the test,
/// logging at `log_level` to `log`.
pub fn start_agent(
    api: &FakeApi,
    config: &Path,
    cgroups: &KubeletCgroups,
    pins: &BpfPins,
    admin: u16,
    log_level: &str,
    log: &Path,
) -> ChildGuard {
    ChildGuard(
        Command::new(robin_bin())
            .args(["node", "--node-name", NODE, "--kube-api", &api.url()])
            .arg("--config")
            .arg(config)
            .arg("--cgroup-root")
            .arg(&cgroups.root)
            .arg("--bpf-pin-dir")
            .arg(pins.path())
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .env("ROBIN_LOG", log_level)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("creating the agent log"))
            .spawn()
            .expect("starting robin node"),
    )
}

/// The cgroup id of the pod cgroup above a container cgroup (what the agent attaches to).
pub fn pod_cgroup_id(container: &Cgroup) -> u64 {
    Cgroup::existing(container.path().parent().expect("a container has a pod"))
        .id()
        .expect("reading the pod cgroup id")
}
