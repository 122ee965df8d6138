//! `robin attach` end to end: a long-running process already inside a cgroup (as a systemd
//! service is) is captured without being restarted; with `robin attach` killed or stopped its
//! connects are refused (fail closed), a restarted one adopts the pinned capture, and only
//! `--release` lets them go direct again.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use robin_e2e::{
    BpfPins, Cgroup, ChildGuard, Netns, Pki, TempDir, command_in, find_cgroup2_mount,
    node_fixture::{HOST, PodNet},
    require_privileges, robin_bin, temp_dir, unique_id,
};
use serde_json::Value;

const TOKEN: &str = "tok-ATTACH.42_secret";
/// Fixed, as `robin attach` requires: the pinned redirect names it while Robin is down.
const LISTENER_PORT: u16 = 15123;
const WAIT: Duration = Duration::from_secs(30);

/// The "service": started before `robin attach`, never restarted. For each trigger file
/// `go<N>` it runs curl once and leaves `out<N>`, `err<N>`, `pid<N>` ($$) and then `rc<N>`.
/// It gives up after 120 s without a trigger.
fn service_script() -> String {
    format!(
        r#"dir=$1; echo $$ > "$dir/pid.tmp"; mv "$dir/pid.tmp" "$dir/pid"
n=1
while [ $n -le 9 ]; do
  t=0
  while [ ! -e "$dir/go$n" ]; do
    sleep 0.05; t=$((t+1)); [ $t -gt 2400 ] && exit 3
  done
  curl -sS --max-time 10 "https://{HOST}/step$n" > "$dir/out$n" 2> "$dir/err$n"
  echo $? > "$dir/rc$n.tmp"; echo $$ > "$dir/pid$n"; mv "$dir/rc$n.tmp" "$dir/rc$n"
  n=$((n+1))
done
"#
    )
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Fields drop in order: the service, its cgroup (killing what is left), the pins (which
/// detaches capture), the namespaces and upstream, the scratch directory.
struct World {
    service: ChildGuard,
    cgroup: Cgroup,
    pins: BpfPins,
    net: PodNet,
    config: PathBuf,
    steps: PathBuf,
    dir: TempDir,
    pid: u32,
}

/// A running `robin attach`, its stderr in `log`.
struct Robin {
    child: ChildGuard,
    log: PathBuf,
}

impl Robin {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl World {
    fn new() -> Self {
        require_privileges();
        let dir = temp_dir("attach");
        let pki = Pki::new(dir.path(), &[HOST]);
        let net = PodNet::new(&pki, dir.path().join("upstream.log"));
        let config = write_config(dir.path(), &pki, Some(LISTENER_PORT));
        let parent = find_cgroup2_mount()
            .expect("cgroup2 mount")
            .join("robin-test");
        fs::create_dir_all(&parent).expect("creating the robin-test cgroup parent");
        // Named like a transient systemd unit's cgroup.
        let cgroup = Cgroup::create(parent.join(format!("app-{}.service", unique_id())))
            .expect("creating the service cgroup");
        let steps = dir.path().join("steps");
        fs::create_dir(&steps).expect("creating the steps dir");
        let script = service_script();
        let steps_arg = steps.to_str().expect("utf-8 path");
        let child = command_in(
            net.netns(),
            Some(&cgroup),
            "sh",
            &["-c", &script, "sh", steps_arg],
        )
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the service");
        let service = ChildGuard(child);
        wait_for("the service to start", || steps.join("pid").exists());
        let pid = read_u32(&steps.join("pid"));
        assert!(
            cgroup.pids().expect("cgroup.procs").contains(&pid),
            "the service runs in its cgroup"
        );
        Self {
            service,
            cgroup,
            pins: BpfPins::new(),
            net,
            config,
            steps,
            dir,
            pid,
        }
    }

    fn attach_args(&self) -> Vec<String> {
        let cgroup = self.cgroup.path().display().to_string();
        let pins = self.pins.path().display().to_string();
        vec![
            "attach".into(),
            "--cgroup".into(),
            cgroup,
            "--bpffs-pins".into(),
            pins,
        ]
    }

    fn start_robin(&self, tag: &str) -> Robin {
        let log = self.dir.path().join(format!("robin-{tag}.log"));
        start_robin(self.net.netns(), self.attach_args(), &self.config, log)
    }

    /// Triggers step `n` of the service and waits for its curl: (exit code, stdout, stderr).
    fn step(&self, n: u32) -> (u32, String, String) {
        fs::write(self.steps.join(format!("go{n}")), "").expect("writing a trigger");
        let rc = self.steps.join(format!("rc{n}"));
        wait_for(&format!("step {n} of the service"), || rc.exists());
        assert_eq!(
            read_u32(&self.steps.join(format!("pid{n}"))),
            self.pid,
            "the service was restarted"
        );
        let read = |name: String| fs::read_to_string(self.steps.join(name)).unwrap_or_default();
        (
            read_u32(&rc),
            read(format!("out{n}")),
            read(format!("err{n}")),
        )
    }

    /// The requests the upstream served for `/step<n>`.
    fn upstream_saw(&self, n: u32) -> Vec<Value> {
        fs::read_to_string(&self.net.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("upstream log line"))
            .filter(|v| v["path"] == format!("/step{n}"))
            .collect()
    }
}

/// `robin attach ARGS --config CONFIG` in `netns` (`nsenter --net`, which keeps the host's
/// mounts, cgroup2 included), returned once it logs that it captures.
fn start_robin(netns: &Netns, args: Vec<String>, config: &Path, log: PathBuf) -> Robin {
    let stderr = fs::File::create(&log).expect("creating the robin log");
    let child = Command::new("nsenter")
        .arg(format!("--net={}", netns.path().display()))
        .arg(robin_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("ROBIN_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("starting robin attach");
    let mut robin = Robin {
        child: ChildGuard(child),
        log,
    };
    wait_for("robin attach to capture", || {
        if let Some(status) = robin.child.0.try_wait().expect("polling robin") {
            panic!("robin attach exited ({status}):\n{}", robin.log());
        }
        robin.log().contains("\"message\":\"capturing\"")
    });
    robin
}

fn read_u32(path: &Path) -> u32 {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}: {text:?}", path.display()))
}

fn write_config(dir: &Path, pki: &Pki, listener_port: Option<u16>) -> PathBuf {
    let token = dir.join("token");
    fs::write(&token, format!("{TOKEN}\n")).expect("writing token");
    let port = listener_port.map_or(String::new(), |p| format!("listener_port = {p}\n"));
    let config = dir.join("robin.toml");
    fs::write(
        &config,
        format!(
            "[tls]\nca_cert = {:?}\nca_key = {:?}\nupstream_roots = {:?}\n\n\
             [capture]\nports = [443]\n{port}\n\
             [[inject]]\nhosts = [\"{HOST}\"]\nsource = {{ kind = \"file\", path = {:?} }}\n",
            pki.file("robin-ca.crt"),
            pki.file("robin-ca.key"),
            pki.file("upstream-ca.crt"),
            token,
        ),
    )
    .expect("writing config");
    config
}

/// Runs `robin ARGS` to completion, bounded.
fn robin_once(args: &[String]) -> Output {
    let mut child = Command::new(robin_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running robin");
    wait_for("robin to exit", || {
        child.try_wait().expect("polling robin").is_some()
    });
    child.wait_with_output().expect("robin output")
}

fn assert_refused(w: &World, n: u32, when: &str) {
    let (rc, out, err) = w.step(n);
    // 7: curl could not connect (the redirect finds no listener).
    assert_eq!(rc, 7, "{when}: the connect must be refused: {out}{err}");
    assert!(
        w.upstream_saw(n).is_empty(),
        "{when}: the connect went direct to the upstream"
    );
}

fn assert_injected(w: &World, n: u32) {
    let (rc, out, err) = w.step(n);
    assert_eq!(rc, 0, "curl failed: {err}");
    let echo: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        echo["authorization"],
        serde_json::json!([format!("Bearer {TOKEN}")])
    );
    assert_eq!(w.upstream_saw(n).len(), 1);
}

#[test]
fn captures_a_running_service_fails_closed_while_down_and_releases_on_request() {
    let mut w = World::new();

    let mut first = w.start_robin("first");
    assert!(first.log().contains("\"adopted\":false"), "{}", first.log());
    assert_injected(&w, 1);

    // Crashed: the pinned capture still redirects, to a port nothing listens on.
    first.child.0.kill().expect("killing robin attach");
    first.child.0.wait().expect("reaping robin attach");
    let cgroup_id = w.cgroup.id().expect("cgroup id");
    assert_eq!(w.pins.attached_cgroups(), vec![cgroup_id]);
    assert_refused(&w, 2, "robin attach killed");

    // Restarted: it adopts the pinned attachment and serves again.
    let mut second = w.start_robin("second");
    assert!(
        second.log().contains("\"adopted\":true"),
        "{}",
        second.log()
    );
    assert_injected(&w, 3);

    // Stopped cleanly: still fail closed.
    let pid = nix::unistd::Pid::from_raw(second.child.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    wait_for("robin attach to stop", || {
        second.child.0.try_wait().expect("polling robin").is_some()
    });
    let status = second.child.0.wait().expect("robin status");
    let logs = second.log();
    assert!(
        status.success(),
        "robin attach on SIGTERM: {status}\n{logs}"
    );
    assert!(logs.contains("pinned capture stays in place"), "{logs}");
    assert_refused(&w, 4, "robin attach stopped");

    // Released: direct again, no token.
    let mut release = w.attach_args();
    release.push("--release".into());
    let out = robin_once(&release);
    assert!(
        out.status.success(),
        "--release: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!w.pins.path().exists(), "--release removes the pins");
    let (rc, out, err) = w.step(5);
    assert_eq!(rc, 0, "after --release: {err}");
    let echo: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        echo["authorization"],
        serde_json::json!([]),
        "direct: no token"
    );
    assert_eq!(w.upstream_saw(5).len(), 1);

    for log in [first.log(), logs] {
        assert!(
            !log.contains(TOKEN),
            "a token value reached robin's log:\n{log}"
        );
    }
    assert!(
        w.service
            .0
            .try_wait()
            .expect("polling the service")
            .is_none()
            && w.cgroup.pids().expect("procs").contains(&w.pid),
        "the service kept running throughout"
    );
}

#[test]
fn refuses_what_it_cannot_capture_safely() {
    require_privileges();
    let dir = temp_dir("attach-bad");
    let pki = Pki::new(dir.path(), &[HOST]);
    let pinned = write_config(dir.path(), &pki, Some(LISTENER_PORT));
    let bad_cgroup = robin_once(&[
        "attach".into(),
        "--cgroup".into(),
        dir.path().display().to_string(),
        "--config".into(),
        pinned.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&bad_cgroup.stderr);
    assert_eq!(bad_cgroup.status.code(), Some(70), "{stderr}");
    assert!(stderr.contains("is not a cgroup2 directory"), "{stderr}");

    let free = write_config(dir.path(), &pki, None);
    let root = find_cgroup2_mount().expect("cgroup2 mount");
    let no_port = robin_once(&[
        "attach".into(),
        "--cgroup".into(),
        root.display().to_string(),
        "--config".into(),
        free.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&no_port.stderr);
    assert_eq!(no_port.status.code(), Some(70), "{stderr}");
    assert!(stderr.contains("fixed listener port"), "{stderr}");
}

/// A unit restarted while robin attach was down gets a new cgroup at the same path: the capture
/// pinned for the old one (gone) is released, the new one captured; a live cgroup's is kept.
#[test]
fn a_recreated_cgroup_replaces_the_capture_pinned_for_the_old_one() {
    require_privileges();
    let dir = temp_dir("attach-recreated");
    let pki = Pki::new(dir.path(), &[HOST]);
    let config = write_config(dir.path(), &pki, Some(LISTENER_PORT));
    let netns = Netns::new(format!("robin-{}-att", unique_id()));
    let pins = BpfPins::new();
    let parent = find_cgroup2_mount()
        .expect("cgroup2 mount")
        .join("robin-test");
    fs::create_dir_all(&parent).expect("creating the robin-test cgroup parent");
    let path = parent.join(format!("unit-{}.service", unique_id()));
    let args = vec![
        "attach".to_owned(),
        "--cgroup".into(),
        path.display().to_string(),
        "--bpffs-pins".into(),
        pins.path().display().to_string(),
    ];

    let mut old = Cgroup::create(&path).expect("creating the unit's cgroup");
    let old_id = old.id().expect("cgroup id");
    let mut first = start_robin(&netns, args.clone(), &config, dir.path().join("first.log"));
    first.child.0.kill().expect("killing robin attach");
    first.child.0.wait().expect("reaping robin attach");
    assert_eq!(pins.attached_cgroups(), vec![old_id]);
    old.remove().expect("removing the old cgroup");

    let new = Cgroup::create(&path).expect("recreating the unit's cgroup");
    let new_id = new.id().expect("cgroup id");
    assert_ne!(new_id, old_id);
    let second = start_robin(&netns, args, &config, dir.path().join("second.log"));
    let logs = second.log();
    assert!(logs.contains("\"adopted\":false"), "{logs}");
    assert!(
        logs.contains("releasing the capture of a cgroup that is gone"),
        "{logs}"
    );
    assert_eq!(pins.attached_cgroups(), vec![new_id]);
}
