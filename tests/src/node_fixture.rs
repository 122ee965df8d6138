//! Fixtures for `robin node` end-to-end tests: a fake Kubernetes API server (a real HTTP server
//! answering list and watch of pods, driven by the test, and TokenRequests), kubelet-like cgroup
//! trees, simulated pods and small clients for the agent's admin plane.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::{
    BpfPins, Cgroup, ChildGuard, Netns, Pki, Topology, command_in, find_cgroup2_mount, pod_etc,
    robin_bin, unique_id,
};

pub const HOST: &str = "api.test";
pub const NODE: &str = "node-a";
pub const WAIT: Duration = Duration::from_secs(30);

// ---- a fake Kubernetes API server: list and watch of pods, TokenRequest ----

#[derive(Default)]
pub struct ApiState {
    pub pods: BTreeMap<String, Value>,
    rv: u64,
    watchers: Vec<mpsc::Sender<String>>,
    /// Until opened, lists fail (500): the agent cannot have synced.
    open: bool,
    minted: Vec<MintedToken>,
}

/// A TokenRequest the fake API answered
/// (`POST /api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token`).
#[derive(Clone, Debug)]
pub struct MintedToken {
    pub namespace: String,
    pub service_account: String,
    /// The caller's `Authorization` header.
    pub authorization: Option<String>,
    /// The TokenRequest body as sent.
    pub request: Value,
    /// The JWT it answered (unsigned), and that JWT's claims.
    pub token: String,
    pub claims: Value,
}

pub struct FakeApi {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<ApiState>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl FakeApi {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding fake api");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(ApiState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let accept = thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, sp) = (st.clone(), sp.clone());
                        thread::spawn(move || serve_api(conn, &st, &sp));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            addr,
            state,
            stop,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn open(&self) {
        self.state.lock().unwrap().open = true;
    }

    pub fn event(&self, kind: &str, uid: &str, pod: Option<Value>) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv.to_string();
        let mut obj = match pod {
            Some(p) => p,
            None => s.pods.remove(uid).expect("deleting an unknown pod"),
        };
        obj["metadata"]["resourceVersion"] = json!(rv);
        if kind != "DELETED" {
            s.pods.insert(uid.to_owned(), obj.clone());
        }
        let line = json!({"type": kind, "object": obj}).to_string();
        s.watchers.retain(|w| w.send(line.clone()).is_ok());
    }

    pub fn upsert(&self, pod: Value) {
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
        let kind = if self.state.lock().unwrap().pods.contains_key(&uid) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.event(kind, &uid, Some(pod));
    }

    pub fn delete(&self, uid: &str) {
        self.event("DELETED", uid, None);
    }

    /// Every TokenRequest answered so far, in order.
    pub fn token_requests(&self) -> Vec<MintedToken> {
        self.state.lock().unwrap().minted.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve_api(mut conn: TcpStream, state: &Mutex<ApiState>, stop: &AtomicBool) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    if head.starts_with("POST ") {
        serve_token_request(conn, &head, &target, state);
        return;
    }
    // The agent must ask only for its own node's pods.
    let selector = format!("fieldSelector=spec.nodeName%3D{NODE}");
    if !target.starts_with("/api/v1/pods?") || !target.contains(&selector) {
        let _ = conn.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    }
    if !target.contains("watch=1") {
        let body = {
            let s = state.lock().unwrap();
            if !s.open {
                let _ = conn.write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                return;
            }
            json!({
                "kind": "PodList",
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": s.pods.values().filter(|p| p["spec"]["nodeName"] == NODE).collect::<Vec<_>>(),
            })
            .to_string()
        };
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let (tx, rx) = mpsc::channel();
    state.lock().unwrap().watchers.push(tx);
    if conn
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .is_err()
    {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let line = format!("{line}\n");
                if write!(conn, "{:x}\r\n{line}\r\n", line.len()).is_err() {
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn respond(conn: &mut TcpStream, status: &str, body: &Value) {
    let body = body.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Mints an unsigned JWT shaped like a bound ServiceAccount token (the `kubernetes.io` claims
/// of a real one), records the request and answers it as the API server does (201).
fn serve_token_request(mut conn: TcpStream, head: &str, target: &str, state: &Mutex<ApiState>) {
    let parts: Vec<&str> = target.split('/').collect();
    let (namespace, sa) = match parts[..] {
        [
            "",
            "api",
            "v1",
            "namespaces",
            ns,
            "serviceaccounts",
            sa,
            "token",
        ] if !ns.is_empty() && !sa.is_empty() => (ns.to_owned(), sa.to_owned()),
        _ => return respond(&mut conn, "404 Not Found", &json!({"kind": "Status"})),
    };
    let authorization = header(head, "authorization").map(str::to_owned);
    if !authorization
        .as_deref()
        .is_some_and(|a| a.starts_with("Bearer "))
    {
        return respond(&mut conn, "401 Unauthorized", &json!({"kind": "Status"}));
    }
    let len: usize = header(head, "content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(1 << 20)];
    if conn.read_exact(&mut body).is_err() {
        return;
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return respond(&mut conn, "400 Bad Request", &json!({"kind": "Status"}));
    };
    let spec = &request["spec"];
    if request["kind"] != "TokenRequest"
        || request["apiVersion"] != "authentication.k8s.io/v1"
        || spec["audiences"].as_array().is_none_or(|a| a.is_empty())
    {
        return respond(&mut conn, "400 Bad Request", &json!({"kind": "Status"}));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = now + spec["expirationSeconds"].as_u64().unwrap_or(3600);
    let bound = &spec["boundObjectRef"];
    let mut state = state.lock().unwrap();
    if bound["kind"] == "Pod" {
        // As the API server does: the pod is looked up in the ServiceAccount's namespace and
        // must run as that ServiceAccount, with the uid given.
        let pod = state.pods.values().find(|p| {
            p["metadata"]["namespace"] == namespace.as_str()
                && p["metadata"]["name"] == bound["name"]
        });
        let refused = match pod {
            None => Some("404 Not Found"),
            Some(p) if p["metadata"]["uid"] != bound["uid"] => Some("409 Conflict"),
            Some(p)
                if p["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    != sa =>
            {
                Some("400 Bad Request")
            }
            Some(_) => None,
        };
        if let Some(status) = refused {
            drop(state);
            return respond(&mut conn, status, &json!({"kind": "Status"}));
        }
    }
    let mut claims = json!({
        "iss": "https://fake-api.test",
        "sub": format!("system:serviceaccount:{namespace}:{sa}"),
        "aud": spec["audiences"],
        "iat": now,
        "exp": exp,
        "jti": format!("minted-{}", state.minted.len() + 1),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": sa}},
    });
    if bound["kind"] == "Pod" {
        claims["kubernetes.io"]["pod"] = json!({"name": bound["name"], "uid": bound["uid"]});
    }
    let token = format!(
        "{}.{}.c2ln",
        b64url(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    );
    let mut answer = request.clone();
    answer["status"] = json!({"token": token, "expirationTimestamp": exp});
    state.minted.push(MintedToken {
        namespace,
        service_account: sa,
        authorization,
        request,
        token,
        claims,
    });
    drop(state);
    respond(&mut conn, "201 Created", &answer);
}

/// Base64url without padding (JWT segments).
fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

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
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("upstream.py");
    let mut child = Command::new("ip")
        .args(["netns", "exec", topo.upstream.name(), "python3"])
        .arg(script)
        .args([topo.upstream_ip4.to_string(), "443".into()])
        .arg(pki.file("upstream.crt"))
        .arg(pki.file("upstream.key"))
        .arg(log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting upstream.py");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("reading upstream readiness");
    assert_eq!(line.trim(), "ready", "upstream did not start");
    ChildGuard(child)
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

#[cfg(test)]
mod tests {
    #[test]
    fn b64url_matches_rfc4648_without_padding() {
        for (raw, enc) in [
            (&b""[..], ""),
            (b"M", "TQ"),
            (b"Ma", "TWE"),
            (b"Man", "TWFu"),
            (b"\xfb\xff", "-_8"),
        ] {
            assert_eq!(super::b64url(raw), enc);
        }
    }
}
