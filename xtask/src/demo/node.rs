//! The demo's second act: the same "pod" namespace, captured by `robin node` (DaemonSet mode)
//! instead of `robin exec`. A small Python stand-in for the API server lists the one annotated
//! pod (and holds a watch open); the pod is a process in the pod namespace, inside a cgroup laid
//! out as the kubelet's cgroupfs driver does. The agent finds it, captures it and injects its
//! token; the demo then shows what an operator sees: `/debug/pods` and the agent's metrics.
use std::{
    fs,
    io::{BufRead as _, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::step;

const NODE_NAME: &str = "demo-node";
const POD_UID: &str = "0d3c1f2e-4a01-4c53-9a55-6f1c2a8e0b7d";

const FAKE_API_PY: &str = r#"
import http.server, json, sys, time
pod = json.load(open(sys.argv[1]))
class Api(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if not self.path.startswith("/api/v1/pods?"):
            self.send_error(404)
            return
        if "watch=1" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            time.sleep(3600)
            return
        body = json.dumps({"kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": [pod]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
srv.daemon_threads = True
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// What the second act starts, stopped and removed in reverse order whatever happens.
#[derive(Default)]
struct NodeWorld {
    children: Vec<Child>,
    /// Created cgroup directories, parents first.
    cgroups: Vec<PathBuf>,
    pins: Option<PathBuf>,
}

impl Drop for NodeWorld {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Unpinning the links detaches capture from the pod cgroup.
        if let Some(pins) = &self.pins {
            let _ = fs::remove_dir_all(pins);
        }
        for cg in self.cgroups.iter().rev() {
            let _ = fs::remove_dir(cg);
        }
    }
}

/// Files of the first act the second one reuses.
pub struct Act {
    pub robin: PathBuf,
    pub dir: PathBuf,
    pub pod_ns: &'static str,
    pub ruled_host: &'static str,
}

pub fn run(act: &Act) -> anyhow::Result<()> {
    step("robin node (DaemonSet mode): the pod opts in with an annotation; no wrapper");
    let mut world = NodeWorld::default();
    let token = act.dir.join("pod-token");
    fs::write(&token, "demo-pod-token\n")?;
    let cgroup_root = cgroup2_mount()?.join(format!("robin-demo-{}", std::process::id()));
    let container = cgroup_root.join(format!("kubepods/besteffort/pod{POD_UID}/app"));
    for dir in container
        .ancestors()
        .take_while(|d| d.starts_with(&cgroup_root))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        world.cgroups.push(dir.to_owned());
    }
    // The pod's "sandbox" process: in the pod's network namespace and container cgroup.
    world.children.push(
        in_pod(&container, act.pod_ns, &["sleep", "600"])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let pod = format!(
        r#"{{"metadata": {{"name": "broker-client-7d9f8", "namespace": "shop", "uid": "{POD_UID}", "resourceVersion": "1",
  "annotations": {{"robin.dev/inject": "true", "robin.dev/token-path": "{token}", "robin.dev/capture-ports": "443"}}}},
 "spec": {{"nodeName": "{NODE_NAME}", "serviceAccountName": "broker-client"}},
 "status": {{"phase": "Running", "qosClass": "BestEffort"}}}}"#,
        token = token.display()
    );
    println!("the pod, as the API server lists it:\n{pod}");
    fs::write(act.dir.join("pod.json"), &pod)?;
    let api_port = start_fake_api(&mut world, &act.dir)?;
    let admin = free_port()?;
    world.pins = Some(bpffs_dir()?);
    let config = write_config(&act.dir, act.ruled_host)?;
    let agent = Command::new(&act.robin)
        .args([
            "node",
            "--node-name",
            NODE_NAME,
            "--kube-api",
            &format!("http://127.0.0.1:{api_port}"),
        ])
        .arg("--config")
        .arg(&config)
        .arg("--cgroup-root")
        .arg(&cgroup_root)
        .arg("--bpf-pin-dir")
        .arg(world.pins.as_ref().expect("set above"))
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .env("ROBIN_LOG", "warn")
        .stderr(fs::File::create(act.dir.join("agent.log"))?)
        .spawn()
        .context("starting robin node")?;
    world.children.push(agent);
    wait_captured(admin, &act.dir.join("agent.log"))?;
    show_request(&container, act)?;
    show_admin(admin)?;
    drop(world);
    Ok(())
}

/// `args` run as a process of the pod: moved into its cgroup, then into its network namespace.
fn in_pod(cgroup: &Path, pod_ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-ec")
        .arg(format!(
            "echo $$ > {}/cgroup.procs; exec ip netns exec {pod_ns} \"$@\"",
            cgroup.display()
        ))
        .arg("sh")
        .args(args);
    cmd
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 hierarchy is mounted")
}

/// A pin directory on the host's bpffs (mounted at /sys/fs/bpf first if it is not).
fn bpffs_dir() -> anyhow::Result<PathBuf> {
    let mounted = fs::read_to_string("/proc/mounts")?.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    });
    if !mounted {
        crate::status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    let dir = PathBuf::from(format!("/sys/fs/bpf/robin-demo-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn start_fake_api(world: &mut NodeWorld, dir: &Path) -> anyhow::Result<u16> {
    fs::write(dir.join("fake_api.py"), FAKE_API_PY)?;
    let mut api = Command::new("python3")
        .arg(dir.join("fake_api.py"))
        .arg(dir.join("pod.json"))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the stand-in API server")?;
    let stdout = api.stdout.take().context("api stdout")?;
    world.children.push(api);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    line.trim()
        .parse()
        .context("the stand-in API server did not start")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn write_config(dir: &Path, ruled_host: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("node.toml");
    fs::write(
        &path,
        format!(
            "[tls]\nca_cert = {:?}\nca_key = {:?}\nupstream_roots = {:?}\n\n[capture]\nports = [443]\n\n[[rule_sets.default.inject]]\nhosts = [\"{ruled_host}\"]\n",
            dir.join("robin-ca.crt"),
            dir.join("robin-ca.key"),
            dir.join("upstream-ca.crt"),
        ),
    )?;
    println!(
        "node config (rule set \"default\": the pod's own token for {ruled_host}):\n{}",
        fs::read_to_string(&path)?
    );
    Ok(path)
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
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

fn wait_captured(admin: u16, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, body)) = admin_get(admin, "/debug/pods")
            && body.contains("\"captured\"")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "robin node did not capture the pod in 30 s; its log:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn show_request(container: &Path, act: &Act) -> anyhow::Result<()> {
    let url = format!("https://{}/", act.ruled_host);
    println!("--- curl {url} from a process of the pod (no token, no proxy settings)");
    let out = in_pod(
        container,
        act.pod_ns,
        &["curl", "-sS", "--max-time", "10", &url],
    )
    .output()
    .context("running curl in the pod")?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("curl in the pod failed");
    }
    Ok(())
}

fn show_admin(admin: u16) -> anyhow::Result<()> {
    let (_, pods) = admin_get(admin, "/debug/pods").context("the admin plane stopped answering")?;
    println!("--- GET /debug/pods (admin plane, :{admin})");
    let mut pretty = Command::new("python3")
        .args(["-m", "json.tool"])
        .stdin(Stdio::piped())
        .spawn()?;
    pretty
        .stdin
        .take()
        .context("json.tool stdin")?
        .write_all(pods.as_bytes())?;
    pretty.wait()?;
    let (_, metrics) = admin_get(admin, "/metrics").context("the admin plane stopped answering")?;
    println!("--- GET /metrics (a few lines)");
    let wanted = [
        "robin_pods{",
        "robin_connections_total{",
        "robin_requests_total{",
    ];
    for line in metrics
        .lines()
        .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
        .take(8)
    {
        println!("{line}");
    }
    Ok(())
}
