//! Fixtures for Robin's privileged end-to-end tests: network namespaces joined by a veth pair
//! with no route out, cgroup v2 directories, and workloads started inside both.
//!
//! Every fixture removes what it created on `Drop`, which also runs while a failing test unwinds.
//! A test that cannot run here (not root, no bpf, no cgroup2) panics with the reason: a skipped
//! privileged test must never look like a pass.
use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

pub mod fake_api;
pub mod node_fixture;
pub mod pki;
pub mod token_endpoint;

pub use robin_agent::capture::{Cgroup, NetNs, find_cgroup2_mount};
pub use tempfile::TempDir;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A short id unique within this machine for the life of the test process; interface names are
/// limited to 15 bytes, so it is kept small.
pub fn unique_id() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{}{}", std::process::id() % 100_000, n)
}

/// Fails the test, with the reason, if this process cannot run privileged tests.
pub fn require_privileges() {
    let euid = nix::unistd::geteuid();
    assert!(
        euid.is_root(),
        "privileged test: must run as root (eBPF attach, netns, cgroups); run `cargo xtask test`"
    );
    assert!(
        Path::new("/sys/fs/bpf").exists()
            || Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists(),
        "privileged test: this kernel exposes no bpf() support"
    );
    find_cgroup2_mount().expect("privileged test: no cgroup2 hierarchy is mounted");
    for tool in ["ip", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            found,
            "privileged test: `{tool}` is not installed; run `cargo xtask setup`"
        );
    }
}

/// Runs a command and panics with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace (`ip netns add`), loopback up. Its `/etc/netns/NAME` directory
/// (per-namespace `/etc` overlays used by `ip netns exec`) is removed with it.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    pub fn handle(&self) -> NetNs {
        NetNs::open(self.path()).expect("opening netns handle")
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// `/etc/netns/NAME`: files here replace `/etc/...` for processes started with
    /// `ip netns exec` (hosts file, trust store), like a platform mounting them into a pod.
    pub fn etc_dir(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

/// Two namespaces, "pod" and "upstream", joined by a veth pair; neither has a default route, so
/// nothing can leave the machine.
pub struct Topology {
    pub pod: Netns,
    pub upstream: Netns,
    pub pod_ip4: Ipv4Addr,
    pub upstream_ip4: Ipv4Addr,
    pub pod_ip6: Ipv6Addr,
    pub upstream_ip6: Ipv6Addr,
    /// Extra upstream addresses (for tests that need many distinct destinations).
    pub extra_upstream_ip4: Vec<Ipv4Addr>,
}

impl Topology {
    pub fn new(extra_upstream_addrs: u8) -> Self {
        let id = unique_id();
        let pod = Netns::new(format!("robin-{id}-pod"));
        let upstream = Netns::new(format!("robin-{id}-up"));
        let n: u8 = (id.parse::<u64>().unwrap_or(0) % 200) as u8 + 20;
        let (veth_pod, veth_up) = (format!("rp{id}"), format!("ru{id}"));
        run(
            "ip",
            &[
                "link",
                "add",
                &veth_pod,
                "netns",
                pod.name(),
                "type",
                "veth",
                "peer",
                "name",
                &veth_up,
                "netns",
                upstream.name(),
            ],
        );
        let pod_ip4 = Ipv4Addr::new(10, 231, n, 1);
        let upstream_ip4 = Ipv4Addr::new(10, 231, n, 2);
        let pod_ip6: Ipv6Addr = format!("fd00:231:{n}::1").parse().expect("ipv6");
        let upstream_ip6: Ipv6Addr = format!("fd00:231:{n}::2").parse().expect("ipv6");
        pod.ip(&["addr", "add", &format!("{pod_ip4}/24"), "dev", &veth_pod]);
        pod.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{pod_ip6}/64"),
            "dev",
            &veth_pod,
            "nodad",
        ]);
        pod.ip(&["link", "set", &veth_pod, "up"]);
        upstream.ip(&[
            "addr",
            "add",
            &format!("{upstream_ip4}/24"),
            "dev",
            &veth_up,
        ]);
        upstream.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{upstream_ip6}/64"),
            "dev",
            &veth_up,
            "nodad",
        ]);
        let mut extra_upstream_ip4 = Vec::new();
        for i in 0..extra_upstream_addrs {
            let ip = Ipv4Addr::new(10, 231, n, 10 + i);
            upstream.ip(&["addr", "add", &format!("{ip}/24"), "dev", &veth_up]);
            extra_upstream_ip4.push(ip);
        }
        upstream.ip(&["link", "set", &veth_up, "up"]);
        Self {
            pod,
            upstream,
            pod_ip4,
            upstream_ip4,
            pod_ip6,
            upstream_ip6,
            extra_upstream_ip4,
        }
    }

    pub fn upstream_ips(&self) -> [IpAddr; 2] {
        [self.upstream_ip4.into(), self.upstream_ip6.into()]
    }
}

/// A cgroup v2 directory for a workload, removed (after killing what is left in it) on drop.
pub fn workload_cgroup() -> Cgroup {
    let root = find_cgroup2_mount().expect("cgroup2 mount");
    let parent = root.join("robin-test");
    if !parent.exists() {
        std::fs::create_dir_all(&parent).expect("creating the robin-test cgroup parent");
    }
    Cgroup::create(parent.join(format!("w{}", unique_id()))).expect("creating a workload cgroup")
}

/// A command run inside `netns` (via `ip netns exec`, so `/etc/netns/NAME` applies) and, when
/// given, inside `cgroup` from before its first instruction.
#[allow(
    unsafe_code,
    reason = "pre_exec: the child joins the cgroup before exec"
)]
pub fn command_in(netns: &Netns, cgroup: Option<&Cgroup>, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns.name(), program])
        .args(args);
    if let Some(cgroup) = cgroup {
        let procs = CString::new(
            cgroup
                .path()
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .expect("cgroup path");
        // SAFETY: only open/write/close between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

/// Runs `cmd` to completion with a deadline, killing it if it overruns.
pub async fn output_within(cmd: Command, limit: Duration) -> Output {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawning workload");
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.expect("waiting for workload"),
        Err(_) => panic!("workload did not finish within {limit:?}"),
    }
}

/// The Python workload used by the capture tests (an unmodified client: plain sockets).
pub fn workload_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workload.py")
}

/// `upstream.py` (it echoes each request as JSON and logs it to `log`) on `ip:port`, inside
/// `netns` when given, over TLS with `(cert, key)` or in plain HTTP; returns once it is ready.
pub fn start_upstream_py(
    netns: Option<&Netns>,
    ip: IpAddr,
    port: u16,
    tls: Option<(&Path, &Path)>,
    log: &Path,
) -> ChildGuard {
    use std::io::BufRead as _;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("upstream.py");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name(), "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    cmd.arg(script).args([ip.to_string(), port.to_string()]);
    match tls {
        Some((cert, key)) => cmd.arg(cert).arg(key),
        None => cmd.arg("plain"),
    };
    cmd.arg(log).stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("starting upstream.py");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("reading upstream readiness");
    assert_eq!(
        line.trim(),
        "ready",
        "upstream on {ip}:{port} did not start"
    );
    ChildGuard(child)
}

/// The requests an `upstream.py` logged to `log`, in order.
pub fn logged_requests(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("upstream log line"))
        .collect()
}

/// Path of the built `robin` binary (`cargo xtask test` builds it first).
pub fn robin_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ROBIN_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/robin");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p robin-agent` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// A directory of its own on the host's bpffs for one `robin node` (`--bpf-pin-dir`). Removing
/// it on drop unpins everything the agent left there, which detaches its cgroup programs even
/// when the agent was killed.
pub struct BpfPins(PathBuf);

impl BpfPins {
    pub fn new() -> Self {
        let root = Path::new("/sys/fs/bpf");
        let is_bpffs = |p: &Path| robin_agent::capture::PinDir::is_bpffs(p).unwrap_or(false);
        if !is_bpffs(root) {
            // systemd mounts it on every ordinary host; a bare test machine may not have it.
            let out = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .output()
                .expect("running mount");
            assert!(
                out.status.success() && is_bpffs(root),
                "privileged test: /sys/fs/bpf is not a bpf filesystem and mounting one failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let dir = root.join(format!("robin-test-{}", unique_id()));
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Pinned attachments, by cgroup id (the agent's `cgroups/<id>/` directories).
    pub fn attached_cgroups(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = std::fs::read_dir(self.0.join("cgroups"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    }
}

impl Default for BpfPins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpfPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills and reaps a background process (upstream servers) when the test ends.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory named for the test (`robin-{tag}-…`), removed on drop.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("robin-{tag}-"))
        .tempdir()
        .expect("creating scratch dir")
}

/// The e2e PKI as files in `dir`: Robin's CA (`robin-ca`), an upstream CA (`upstream-ca`) with
/// a leaf for `hosts` (`upstream`), and a rogue CA (not trusted anywhere) with a leaf for the
/// same hosts (`rogue`); each as `{name}.crt` + `{name}.key`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, hosts: &[&str]) -> Self {
        pki::Ca::new("Test Robin CA").write(dir, "robin-ca");
        for (ca, leaf, cn) in [
            ("upstream-ca", "upstream", "Test Upstream CA"),
            ("rogue-ca", "rogue", "Test Rogue CA"),
        ] {
            let ca_ = pki::Ca::new(cn);
            ca_.write(dir, ca);
            ca_.leaf(hosts).write(dir, leaf);
        }
        Self {
            dir: dir.to_owned(),
        }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Gives the namespace's processes (started with `ip netns exec`) their own `/etc/hosts` and a
/// system trust bundle made of `cas`, as a platform mounts them into a pod.
pub fn pod_etc(netns: &Netns, hosts: &[(&str, IpAddr)], cas: &[PathBuf]) {
    let etc = netns.etc_dir();
    std::fs::create_dir_all(etc.join("ssl/certs")).expect("creating /etc/netns dir");
    let mut lines = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for (name, ip) in hosts {
        lines.push_str(&format!("{ip} {name}\n"));
    }
    std::fs::write(etc.join("hosts"), lines).expect("writing hosts");
    let bundle: String = cas
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("reading CA"))
        .collect();
    std::fs::write(etc.join("ssl/certs/ca-certificates.crt"), bundle)
        .expect("writing trust bundle");
}
