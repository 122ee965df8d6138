//! Hostile workloads against `robin exec`: HTTP/2 floods, slowloris, ten thousand idle TLS
//! connections and a small connection cap. The attacker is `robin-attack` (this crate's
//! binary), run by `robin exec` in its captured cgroup inside a "pod" namespace; every attack is
//! bounded in count and time. Robin's memory and descriptors are read from `/proc/<pid>`.
use std::{
    net::IpAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use robin_e2e::{
    ChildGuard, Pki, TempDir, Topology, pod_etc, require_privileges, robin_bin, start_upstream_py,
    temp_dir,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
};

const HOST: &str = "api.test";
const TOKEN: &str = "tok-hostile-secret";
const STEP: Duration = Duration::from_secs(90);
/// A legitimate request must complete this fast while an attack runs.
const LEGIT_WITHIN_MS: u64 = 2000;
/// Robin's resident memory must stay under this through an HTTP/2 flood (measured: ~25 MB).
const RSS_CEILING_KB: u64 = 64 * 1024;
/// ... and through 2,000 slowloris connections, each holding a TLS session and a partial
/// request head (measured: ~115 MB).
const SLOWLORIS_RSS_CEILING_KB: u64 = 192 * 1024;

struct World {
    topo: Topology,
    dir: TempDir,
    pki: Pki,
    config: PathBuf,
    _upstream: ChildGuard,
}

impl World {
    fn new() -> Self {
        require_privileges();
        let topo = Topology::new(0);
        let dir = temp_dir("hostile");
        let pki = Pki::new(dir.path(), &[HOST]);
        let up: IpAddr = topo.upstream_ip4.into();
        pod_etc(&topo.pod, &[(HOST, up)], &[pki.file("robin-ca.crt")]);
        let log = dir.path().join("upstream.log");
        let tls = (pki.file("upstream.crt"), pki.file("upstream.key"));
        let upstream =
            start_upstream_py(Some(&topo.upstream), up, 443, Some((&tls.0, &tls.1)), &log);
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).expect("writing token");
        let config = dir.path().join("robin.toml");
        std::fs::write(
            &config,
            format!(
                "[tls]\nca_cert = \"{}\"\nca_key = \"{}\"\nupstream_roots = \"{}\"\n\n\
                 [capture]\nports = [443]\n\n[[inject]]\nhosts = [\"{HOST}\"]\n\
                 source = {{ kind = \"file\", path = \"{}\" }}\n",
                pki.file("robin-ca.crt").display(),
                pki.file("robin-ca.key").display(),
                pki.file("upstream-ca.crt").display(),
                token.display(),
            ),
        )
        .expect("writing config");
        Self {
            topo,
            dir,
            pki,
            config,
            _upstream: upstream,
        }
    }

    /// `robin exec [robin_args] -- robin-attack ... SCENARIO N` in the pod namespace.
    fn start(&self, robin_args: &[&str], scenario: &str, n: usize) -> Robin {
        self.start_limited(robin_args, scenario, n, None)
    }

    /// As [`World::start`], with `RLIMIT_NOFILE` (soft and hard) set to `nofile` for Robin and,
    /// through it, the attacker.
    #[allow(unsafe_code, reason = "pre_exec: setrlimit in the child before exec")]
    fn start_limited(
        &self,
        robin_args: &[&str],
        scenario: &str,
        n: usize,
        nofile: Option<u64>,
    ) -> Robin {
        let log = self.dir.path().join(format!("robin-{scenario}.log"));
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", self.topo.pod.name()])
            .arg(robin_bin())
            .arg("exec")
            .args(robin_args)
            .arg("--config")
            .arg(&self.config)
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_robin-attack"))
            .arg(self.pki.file("robin-ca.crt"))
            .args([HOST, &self.topo.upstream_ip4.to_string(), scenario])
            .arg(n.to_string())
            .env("ROBIN_LOG", "info")
            .env("ROBIN_LOG_FORMAT", "json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("robin log file"))
            .kill_on_drop(true);
        if let Some(limit) = nofile {
            // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        limit,
                        limit,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn().expect("starting robin exec");
        // `ip netns exec` execs robin in place: the child's pid is robin's.
        let pid = child.id().expect("robin pid");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Robin {
            child,
            pid,
            stdin,
            lines,
            log,
        }
    }
}

struct Robin {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    log: PathBuf,
}

impl Robin {
    /// The attacker's next JSON line.
    async fn line(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(STEP, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no output within {STEP:?}; robin log:\n{}", self.logs()))
            .expect("reading the attacker's output")
            .unwrap_or_else(|| panic!("the attacker ended early; robin log:\n{}", self.logs()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Waits for checkpoint `name`; returns its detail.
    async fn checkpoint(&mut self, name: &str) -> serde_json::Value {
        let v = self.line().await;
        assert_eq!(v["checkpoint"], name, "{v}");
        v["detail"].clone()
    }

    /// Waits until the attacker has made one request through Robin (leaf minted, upstream
    /// pooled) and returns Robin's resident memory then, in kB.
    async fn warmed_up(&mut self) -> u64 {
        let warm = self.checkpoint("ready").await;
        assert!(
            warm.as_str()
                .unwrap_or_default()
                .starts_with("HTTP/1.1 200"),
            "warm-up request: {warm}"
        );
        self.rss_kb()
    }

    async fn go_on(&mut self) {
        self.stdin
            .write_all(b"\n")
            .await
            .expect("writing to the attacker");
        self.stdin.flush().await.expect("flushing");
    }

    /// The attacker's final report, once robin exec has exited successfully.
    async fn finish(mut self) -> serde_json::Value {
        let v = self.line().await;
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("robin exec did not exit")
            .expect("waiting for robin exec");
        assert!(
            status.success(),
            "robin exec: {status}; log:\n{}",
            self.logs()
        );
        v
    }

    /// The end of robin's log, for failure messages.
    fn logs(&self) -> String {
        let all = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn rss_kb(&self) -> u64 {
        rss_kb(self.pid)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Polls resident memory once a second, for at most a minute, until it is under `kb`;
    /// returns the last figure and the seconds it took.
    async fn rss_settles_under(&self, kb: u64) -> (u64, u64) {
        let start = Instant::now();
        let mut now = self.rss_kb();
        while now >= kb && start.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            now = self.rss_kb();
        }
        (now, start.elapsed().as_secs())
    }

    /// Samples resident memory every 50 ms until the returned sampler is stopped.
    fn sample_rss(&self) -> RssSampler {
        let max = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (pid, m, s) = (self.pid, max.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(rss_kb(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssSampler { max, stop }
    }
}

struct RssSampler {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    fn peak_kb(&self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.max.load(Ordering::Relaxed)
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The legitimate request of a report succeeded within [`LEGIT_WITHIN_MS`].
fn assert_legit(v: &serde_json::Value) {
    let status = v["legit_status"].as_str().unwrap_or_default();
    assert!(status.starts_with("HTTP/1.1 200"), "legit request: {v}");
    let ms = v["legit_ms"].as_u64().expect("legit_ms");
    assert!(ms < LEGIT_WITHIN_MS, "legit request took {ms} ms: {v}");
}

/// One HTTP/2 flood: Robin stays up, a concurrent request completes in time, RSS is bounded.
async fn h2_flood(scenario: &str, n: usize) {
    let w = World::new();
    let mut robin = w.start(&[], scenario, n);
    let idle = robin.warmed_up().await;
    let rss = robin.sample_rss();
    let start = Instant::now();
    robin.go_on().await;
    let v = robin.finish().await;
    let peak = rss.peak_kb();
    eprintln!(
        "{scenario}: {v}; RSS idle {idle} kB, peak {peak} kB; {:?}",
        start.elapsed()
    );
    assert!(v["sent"].as_u64().unwrap_or(0) > 0, "the attack ran: {v}");
    assert_legit(&v);
    assert!(
        peak > 0 && peak < RSS_CEILING_KB,
        "{scenario}: peak RSS {peak} kB (ceiling {RSS_CEILING_KB} kB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset() {
    h2_flood("rapid-reset", 5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_continuation_flood() {
    h2_flood("continuation", 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_hpack_bomb() {
    h2_flood("hpack-bomb", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_settings_flood() {
    h2_flood("settings", 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_ping_flood() {
    h2_flood("ping", 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_empty_data_flood() {
    h2_flood("empty-data", 100_000).await;
}

/// Header read timeout of intercepted connections (`proxy::Limits::header_read_timeout`).
const HEADER_TIMEOUT_S: f64 = 30.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_header_timeout() {
    let w = World::new();
    let mut robin = w.start(&[], "slowloris", 2_000);
    let idle = robin.warmed_up().await;
    let rss = robin.sample_rss();
    robin.go_on().await;
    robin.checkpoint("closed").await;
    let peak = rss.peak_kb();
    let (after, secs) = robin.rss_settles_under(2 * idle).await;
    robin.go_on().await;
    let v = robin.finish().await;
    eprintln!(
        "slowloris: {v}; RSS idle {idle} kB, peak {peak} kB, {after} kB {secs} s after the close"
    );
    assert!(
        after < 2 * idle,
        "RSS {after} kB a minute after the connections closed; idle was {idle} kB"
    );
    assert_eq!(v["failed"], 0, "every connection was accepted: {v}");
    assert_eq!(v["never_closed"], 0, "{v}");
    assert_legit(&v);
    let first = v["closed_min_s"].as_f64().expect("closed_min_s");
    let last = v["closed_max_s"].as_f64().expect("closed_max_s");
    assert!(
        first > HEADER_TIMEOUT_S - 5.0 && last < HEADER_TIMEOUT_S + 8.0,
        "closed between {first:.1} and {last:.1} s, header timeout {HEADER_TIMEOUT_S} s"
    );
    assert!(peak < SLOWLORIS_RSS_CEILING_KB, "peak RSS {peak} kB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_tls_connections() {
    const N: usize = 10_000;
    let w = World::new();
    let mut robin = w.start(&[], "idle", N);
    let idle_rss = robin.warmed_up().await;
    let idle_fds = robin.fds();
    robin.go_on().await;

    let held = robin.checkpoint("holding").await;
    let (rss, fds) = (robin.rss_kb(), robin.fds());
    eprintln!(
        "idle: {idle_rss} kB, {idle_fds} fds; holding {held}: {rss} kB, {fds} fds ({:.3} per connection)",
        fds.saturating_sub(idle_fds) as f64 / N as f64
    );
    assert_eq!(held["failed"], 0, "nothing refused: {held}");
    assert_eq!(held["open"], N, "{held}");
    assert!(
        fds >= idle_fds + N * 95 / 100 && fds <= idle_fds + N * 105 / 100,
        "one descriptor per connection: {fds} open, {idle_fds} when idle"
    );
    robin.go_on().await;

    robin.checkpoint("closed").await;
    let (after, secs) = robin.rss_settles_under(2 * idle_rss).await;
    eprintln!("after close: {after} kB, {secs} s after (idle {idle_rss} kB)");
    assert!(
        after < 2 * idle_rss,
        "RSS {after} kB a minute after the connections closed; idle was {idle_rss} kB"
    );
    robin.go_on().await;
    let v = robin.finish().await;
    assert_legit(&v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_sheds_the_newest_idle_connections() {
    const CAP: usize = 50;
    const OLD: usize = 40;
    let w = World::new();
    let robin = w.start(&["--max-connections", &CAP.to_string()], "cap", OLD);
    let log = robin.log.clone();
    let v = robin.finish().await;
    let logs = std::fs::read_to_string(log).unwrap_or_default();
    eprintln!("cap: {v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_legit(&v);
    // OLD + 20 connections: the first CAP fill the cap; each of the last 10 then displaces the
    // newest idle one (the one opened just before it); the legitimate request displaces the last.
    let expected: Vec<usize> = (CAP - 1..OLD + 20).collect();
    assert_eq!(
        v["closed"],
        serde_json::json!(expected),
        "the newest idle connections are shed, the oldest kept"
    );
    let summary: serde_json::Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &serde_json::Value| v["message"] == "connections shed at the connection cap")
        .unwrap_or_else(|| {
            let tail: Vec<&str> = logs.lines().rev().take(5).collect();
            panic!("robin exec logs its shed count when it exits: {tail:#?}")
        });
    assert_eq!(summary["shed"], expected.len(), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_descriptor_limit_token_reads_and_upstream_dials_still_work() {
    // With 1,000 descriptors, 485 idle connections used to exhaust them: the next request got
    // "503 reading token: Too many open files". Now the default cap, (1000 - 256) * 3/4 = 558,
    // sheds the newest idle ones and leaves descriptors for the token file and the upstream.
    const NOFILE: u64 = 1_000;
    const CAP: usize = 558;
    const OPENED: usize = 880 + 20;
    let w = World::new();
    let robin = w.start_limited(&[], "cap", OPENED - 20, Some(NOFILE));
    let log = robin.log.clone();
    let v = robin.finish().await;
    let logs = std::fs::read_to_string(log).unwrap_or_default();
    eprintln!(
        "descriptor limit: failed {}, closed {}, legit {} in {} ms",
        v["failed"],
        v["closed"].as_array().map_or(0, Vec::len),
        v["legit_status"],
        v["legit_ms"]
    );
    assert_eq!(v["failed"], 0, "no connection refused outright: {v}");
    assert_legit(&v);
    assert_eq!(
        v["closed"].as_array().map_or(0, Vec::len),
        OPENED - CAP + 1,
        "the connections past the cap (and one for the legitimate request) were shed"
    );
    assert!(
        !logs.contains("Too many open files"),
        "Robin ran out of descriptors"
    );
}
