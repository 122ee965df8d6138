//! `robin node` end to end. The pod watch talks to a fake API server run by the test (a real
//! HTTP server answering list and watch for pods); below it everything is real: pods are network
//! namespaces plus cgroups laid out as the kubelet lays them out (systemd and cgroupfs drivers)
//! under a test cgroup root, with processes and token files.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use robin_e2e::{
    Cgroup, ChildGuard, Pki, TempDir, Topology, command_in, find_cgroup2_mount, pod_etc,
    require_privileges, robin_bin, unique_id,
};
use serde_json::{Value, json};

const HOST: &str = "api.test";
const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(30);

// ---- a fake Kubernetes API server: list and watch of pods ----

#[derive(Default)]
struct ApiState {
    pods: BTreeMap<String, Value>,
    rv: u64,
    watchers: Vec<mpsc::Sender<String>>,
    /// Until opened, lists fail (500): the agent cannot have synced.
    open: bool,
}

struct FakeApi {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<ApiState>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl FakeApi {
    fn start() -> Self {
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

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn open(&self) {
        self.state.lock().unwrap().open = true;
    }

    fn event(&self, kind: &str, uid: &str, pod: Option<Value>) {
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

    fn upsert(&self, pod: Value) {
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
        let kind = if self.state.lock().unwrap().pods.contains_key(&uid) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.event(kind, &uid, Some(pod));
    }

    fn delete(&self, uid: &str) {
        self.event("DELETED", uid, None);
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

// ---- simulated pods ----

/// Cgroups created parent first, removed children first (removal kills what is left inside).
struct CgroupTree(Vec<Cgroup>);

impl CgroupTree {
    fn mkdirs(&mut self, root: &Path, rel: &Path) -> PathBuf {
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

fn pod_uid() -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        NEXT_UID.fetch_add(1, Ordering::Relaxed)
    )
}

fn pod_json(name: &str, uid: &str, qos: &str, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "team", "uid": uid, "annotations": annotations},
        "spec": {"nodeName": NODE, "serviceAccountName": "default"},
        "status": {"phase": "Running", "qosClass": qos},
    })
}

fn start_upstream(topo: &Topology, pki: &Pki, log: &Path) -> ChildGuard {
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
fn curl(topo_netns: &robin_e2e::Netns, cgroup: &Cgroup, path: &str) -> Value {
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

/// `GET path` on the admin plane: (status, body).
fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
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

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn debug_pods(port: u16) -> Vec<Value> {
    let (status, body) = admin_get(port, "/debug/pods").expect("admin plane answers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn pod_state(port: u16, uid: &str) -> Option<Value> {
    debug_pods(port).into_iter().find(|p| p["uid"] == uid)
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[test]
fn node_agent_captures_annotated_pods_each_with_its_own_token() {
    require_privileges();
    let dir = TempDir::new("node");
    let pki = Pki::new(dir.path(), &[HOST]);
    // Two pods, each in its own network namespace with its own upstream.
    let topo_a = Topology::new(0);
    let topo_b = Topology::new(0);
    let cas = [pki.file("robin-ca.crt"), pki.file("upstream-ca.crt")];
    pod_etc(
        &topo_a.pod,
        &[(HOST, IpAddr::from(topo_a.upstream_ip4))],
        &cas,
    );
    pod_etc(
        &topo_b.pod,
        &[(HOST, IpAddr::from(topo_b.upstream_ip4))],
        &cas,
    );
    let (log_a, log_b) = (dir.path().join("up-a.log"), dir.path().join("up-b.log"));
    let _up_a = start_upstream(&topo_a, &pki, &log_a);
    let _up_b = start_upstream(&topo_b, &pki, &log_b);

    let (tok_a, tok_b, tok_a2) = ("tok-A.pod-alpha", "tok-B.pod-bravo", "tok-A2.rotated");
    let (file_a, file_b, file_a2) = (
        dir.path().join("a-token"),
        dir.path().join("b-token"),
        dir.path().join("a2-token"),
    );
    std::fs::write(&file_a, format!("{tok_a}\n")).unwrap();
    std::fs::write(&file_b, format!("{tok_b}\n")).unwrap();
    std::fs::write(&file_a2, format!("{tok_a2}\n")).unwrap();

    // The kubelet's layout under a test cgroup root: A with the systemd driver (BestEffort), B
    // with cgroupfs (Burstable), C (not annotated, Guaranteed) sharing A's network namespace.
    let parent = find_cgroup2_mount().unwrap().join("robin-test");
    std::fs::create_dir_all(&parent).expect("creating the robin-test cgroup parent");
    let root = parent.join(format!("node{}", unique_id()));
    let mut tree = CgroupTree(vec![
        Cgroup::create(root.clone()).expect("creating cgroup root"),
    ]);
    let (uid_a, uid_b, uid_c) = (pod_uid(), pod_uid(), pod_uid());
    let cg_a = tree.mkdirs(
        &root,
        &Path::new("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid_a.replace('-', "_")
            ))
            .join("cri-containerd-a.scope"),
    );
    let cg_b = tree.mkdirs(
        &root,
        &Path::new("kubepods/burstable")
            .join(format!("pod{uid_b}"))
            .join("ctr-b"),
    );
    let cg_c = tree.mkdirs(
        &root,
        &Path::new("kubepods")
            .join(format!("pod{uid_c}"))
            .join("ctr-c"),
    );
    let (cg_a, cg_b, cg_c) = (
        Cgroup::existing(cg_a),
        Cgroup::existing(cg_b),
        Cgroup::existing(cg_c),
    );
    let spawn_sleeper = |netns, cg| {
        ChildGuard(
            command_in(netns, Some(cg), "sleep", &["600"])
                .spawn()
                .expect("starting a pod process"),
        )
    };
    let _pa = spawn_sleeper(&topo_a.pod, &cg_a);
    let _pb = spawn_sleeper(&topo_b.pod, &cg_b);
    let _pc = spawn_sleeper(&topo_a.pod, &cg_c);

    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nca_cert = {:?}\nca_key = {:?}\nupstream_roots = {:?}\n\n[capture]\nports = [443]\n\n[[rule_sets.default.inject]]\nhosts = [\"{HOST}\"]\n",
            pki.file("robin-ca.crt"),
            pki.file("robin-ca.key"),
            pki.file("upstream-ca.crt"),
        ),
    )
    .unwrap();

    let api = FakeApi::start();
    let inject = |token: &Path| json!({"robin.dev/inject": "true", "robin.dev/token-path": token.to_str().unwrap()});
    api.upsert(pod_json("a", &uid_a, "BestEffort", inject(&file_a)));
    api.upsert(pod_json("b", &uid_b, "Burstable", inject(&file_b)));
    api.upsert(pod_json("c", &uid_c, "Guaranteed", json!({})));
    // An annotated pod of another node: the agent must never see it.
    let mut elsewhere = pod_json("far", &pod_uid(), "BestEffort", inject(&file_a));
    elsewhere["spec"]["nodeName"] = json!("node-b");
    api.upsert(elsewhere);
    // Opted in with unusable annotations, and opted in with a rule set the node does not have
    // (no cgroup either): reported, never captured.
    let (uid_bad, uid_unknown) = (pod_uid(), pod_uid());
    api.upsert(pod_json(
        "bad",
        &uid_bad,
        "BestEffort",
        json!({"robin.dev/inject": "true", "robin.dev/capture-ports": "https"}),
    ));
    api.upsert(pod_json(
        "unknown",
        &uid_unknown,
        "BestEffort",
        json!({"robin.dev/inject": "true", "robin.dev/rules": "nope"}),
    ));

    let admin = free_port();
    let agent_log = dir.path().join("agent.log");
    let _agent = ChildGuard(
        Command::new(robin_bin())
            .args(["node", "--node-name", NODE, "--kube-api", &api.url()])
            .arg("--config")
            .arg(&config)
            .arg("--cgroup-root")
            .arg(&root)
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .env("ROBIN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .expect("starting robin node"),
    );
    let agent_logs = || std::fs::read_to_string(&agent_log).unwrap_or_default();

    // Not ready while the pod list fails.
    let (status, body) = wait_for("the admin plane", || admin_get(admin, "/readyz"));
    assert_eq!(status, 503, "ready before the pod watch synced: {body}");
    assert!(body.contains("pod_watch_synced: no"), "{body}");
    assert_eq!(admin_get(admin, "/healthz").unwrap().0, 200);
    // An init container waiting for capture, started before the agent could capture anything.
    let robin = robin_bin();
    let robin = robin.to_str().unwrap();
    let mut awaiting = ChildGuard(
        command_in(
            &topo_a.pod,
            Some(&cg_a),
            robin,
            &["await", "--timeout-secs", "30"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting robin await"),
    );
    thread::sleep(Duration::from_millis(600));
    assert!(
        awaiting.0.try_wait().unwrap().is_none(),
        "robin await returned before the pod was captured"
    );
    api.open();
    wait_for("/readyz 200", || {
        admin_get(admin, "/readyz").filter(|(s, _)| *s == 200)
    });

    for uid in [&uid_a, &uid_b] {
        wait_for("pods captured", || {
            pod_state(admin, uid).filter(|p| p["state"] == "captured")
        });
    }
    let pods = debug_pods(admin);
    assert_eq!(
        pods.len(),
        4,
        "only the annotated pods of this node: {pods:?}"
    );
    let bad = pod_state(admin, &uid_bad).unwrap();
    assert_eq!(bad["state"], "invalid", "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("capture-ports"),
        "{bad}"
    );
    let unknown = pod_state(admin, &uid_unknown).unwrap();
    assert_eq!(unknown["state"], "pending", "{unknown}");
    assert!(!serde_json::to_string(&pods).unwrap().contains("tok-"));

    // Each pod gets its own token; the pod without the annotation is untouched.
    let seen = curl(&topo_a.pod, &cg_a, "/a");
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {tok_a}")]),
        "{}",
        agent_logs()
    );
    let seen = curl(&topo_b.pod, &cg_b, "/b");
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {tok_b}")]),
        "{}",
        agent_logs()
    );
    let seen = curl(&topo_a.pod, &cg_c, "/c");
    assert_eq!(
        seen["authorization"],
        json!([]),
        "pod c must not be captured"
    );

    let m = admin_get(admin, "/metrics").unwrap().1;
    assert_eq!(metric(&m, "robin_pods{state=\"captured\"}"), 2, "{m}");
    assert_eq!(
        metric(&m, "robin_connections_total{outcome=\"intercepted\"}"),
        2,
        "{m}"
    );
    assert_eq!(metric(&m, "robin_requests_total{class=\"2xx\"}"), 2, "{m}");
    assert_eq!(metric(&m, "robin_ready"), 1, "{m}");
    assert_eq!(metric(&m, "robin_pods{state=\"not_captured\"}"), 2, "{m}");

    // Annotation changed: the new token path applies.
    api.upsert(pod_json("a", &uid_a, "BestEffort", inject(&file_a2)));
    wait_for("new token path", || {
        pod_state(admin, &uid_a).filter(|p| p["token_path"] == file_a2.to_str().unwrap())
    });
    let seen = curl(&topo_a.pod, &cg_a, "/a2");
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {tok_a2}")]),
        "{}",
        agent_logs()
    );

    // Deleted: detached, the pod's connections go direct again.
    api.delete(&uid_b);
    wait_for("pod b released", || {
        pod_state(admin, &uid_b).is_none().then_some(())
    });
    let seen = curl(&topo_b.pod, &cg_b, "/b-after");
    assert_eq!(
        seen["authorization"],
        json!([]),
        "pod b still captured after deletion"
    );
    let m = admin_get(admin, "/metrics").unwrap().1;
    assert_eq!(metric(&m, "robin_pods{state=\"captured\"}"), 1, "{m}");
    // Counters of the released pod are kept.
    assert_eq!(metric(&m, "robin_requests_total{class=\"2xx\"}"), 3, "{m}");

    let logs = agent_logs();
    for tok in [tok_a, tok_b, tok_a2] {
        assert!(
            !logs.contains(tok),
            "a token reached the agent's logs:\n{logs}"
        );
    }
}
