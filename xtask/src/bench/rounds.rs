//! Interleaved rounds: every path of a scenario runs once to warm up (caches, page cache, TLS
//! session caches, the upstream's pools), then in rounds, the order rotated each round, so a
//! drift of the host (another build, thermal state, TIME_WAIT sockets of the previous run)
//! spreads over all paths instead of landing on whichever ran first. The report shows the
//! median and the spread (min–max) of each path.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{
    CLIENT_NS, cgroups,
    idle::PollingIdle,
    load::{Load, Measurement},
    peers::with_redirect,
};

/// What a path is, for the ratios and the sanity guard.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// The load generator straight to the server: the upper bound.
    Direct,
    Robin,
    Peer,
}

/// How the load generator reaches the server.
#[derive(Clone)]
pub enum Via {
    /// As given (direct, or an explicit reverse proxy's own URL).
    Plain,
    /// Under `robin exec --config CONFIG --`.
    Robin(PathBuf),
    /// As `Robin`, with another `robin` binary (`ROBIN_BENCH_BASELINE`: before/after in one run).
    RobinBinary { bin: PathBuf, config: PathBuf },
    /// With an iptables REDIRECT to a transparent peer's port in place.
    Redirect(u16),
    /// Through a TCP proxy at 127.0.0.1:PORT that curl dials in place of the URL's host
    /// (`--connect-to`): the TLS name, the certificate and the Host header stay the URL's.
    ConnectTo(u16),
    /// Through `robin gateway --config CONFIG` (a forward proxy started in the client namespace
    /// for the run), with `https_proxy`/`http_proxy` pointing at it.
    Gateway(PathBuf),
}

/// Where the benchmark's `robin gateway` listens (in the client namespace).
const GATEWAY_ADDR: &str = "127.0.0.1:13128";
const GATEWAY_ADMIN: &str = "127.0.0.1:14001";

/// One path of a scenario.
#[derive(Clone)]
pub struct PathSpec {
    pub label: &'static str,
    pub capture: &'static str,
    pub role: Role,
    pub url: String,
    pub via: Via,
    /// Run the load generator inside this namespace (entered from the client namespace).
    pub enter_ns: Option<&'static str>,
    /// The peer's cgroup (`cgroups`), whose CPU during the run is the peer's figure.
    pub server: Option<&'static str>,
}

pub struct Scenario {
    pub title: String,
    pub load: Load,
    pub paths: Vec<PathSpec>,
    /// Why the sanity guard does not apply to this scenario, if it does not.
    pub unguarded: Option<&'static str>,
    /// Idle CPUs poll instead of halting while every path of it runs ([`PollingIdle`]).
    pub polling_idle: bool,
}

/// A path's runs (the warm-up excluded), or why it failed.
pub struct PathResult {
    pub spec: PathSpec,
    pub runs: Vec<Measurement>,
    /// A peer that failed is reported, not fatal.
    pub error: Option<String>,
}

pub struct Outcome {
    pub title: String,
    pub unit: &'static str,
    pub results: Vec<PathResult>,
    pub unguarded: Option<&'static str>,
}

/// How many rounds and how long each run.
pub struct Plan {
    pub rounds: usize,
    pub seconds: u32,
    pub warmup_seconds: u32,
}

/// The order of `n` paths in round `round`: rotated by one each round.
pub fn order(n: usize, round: usize) -> Vec<usize> {
    (0..n).map(|j| (j + round) % n).collect()
}

/// Runs `scn`'s paths: a warm-up run each, then `plan.rounds` interleaved rounds. A failing
/// direct or Robin path ends the benchmark; a failing peer is recorded and left out.
pub fn run(scn: &Scenario, plan: &Plan, robin_bin: &Path) -> anyhow::Result<Outcome> {
    println!("== {}", scn.title);
    let _polling_idle = scn.polling_idle.then(PollingIdle::hold).transpose()?;
    let mut results: Vec<PathResult> = scn
        .paths
        .iter()
        .map(|spec| PathResult {
            spec: spec.clone(),
            runs: Vec::new(),
            error: None,
        })
        .collect();
    let warmup = std::iter::once((None, plan.warmup_seconds));
    let rounds = (0..plan.rounds).map(|r| (Some(r), plan.seconds));
    for (round, seconds) in warmup.chain(rounds) {
        for i in order(results.len(), round.unwrap_or(0)) {
            let res = &mut results[i];
            if res.error.is_some() {
                continue;
            }
            match run_once(&scn.load, &res.spec, seconds, robin_bin) {
                Ok(m) => {
                    let when = round.map_or("warm-up".into(), |r| format!("round {}", r + 1));
                    println!(
                        "   {when:>8} {:<36} {:.1} {}",
                        res.spec.label,
                        m.rate,
                        scn.load.unit()
                    );
                    if round.is_some() {
                        res.runs.push(m);
                    }
                }
                Err(e) if res.spec.role == Role::Peer => res.error = Some(first_line(&e)),
                Err(e) => return Err(e.context(format!("{}: {}", scn.title, res.spec.label))),
            }
        }
    }
    Ok(Outcome {
        title: scn.title.clone(),
        unit: scn.load.unit(),
        results,
        unguarded: scn.unguarded,
    })
}

fn first_line(e: &anyhow::Error) -> String {
    let msg = format!("{e:#}");
    msg.lines()
        .next()
        .unwrap_or("failed")
        .chars()
        .take(160)
        .collect()
}

fn run_once(
    load: &Load,
    spec: &PathSpec,
    seconds: u32,
    robin_bin: &Path,
) -> anyhow::Result<Measurement> {
    let mut script = match spec.via {
        Via::ConnectTo(port) => load.curl_connecting_to(&spec.url, port)?,
        _ => load.command(&spec.url, seconds),
    };
    if let Some(ns) = spec.enter_ns {
        script = format!("ip netns exec {ns} {script}");
    }
    let robin = match &spec.via {
        Via::Plain | Via::ConnectTo(_) => None,
        Via::Robin(config) => Some((robin_bin, config.as_path())),
        Via::RobinBinary { bin, config } => Some((bin.as_path(), config.as_path())),
        Via::Redirect(port) => {
            script = with_redirect(*port, &script);
            None
        }
        Via::Gateway(config) => return run_via_gateway(load, &script, robin_bin, config),
    };
    let peer_cpu = || spec.server.map(cgroups::cpu_s).transpose();
    let before = peer_cpu()?;
    let (text, hwm, cpu) = run_client(robin, &script)?;
    let after = peer_cpu()?;
    let mut m = load.parse(&text)?;
    m.robin_hwm_kib = hwm;
    m.proxy_cpu_s = match (before, after) {
        (Some(b), Some(a)) => Some(a - b),
        _ => cpu,
    };
    Ok(m)
}

/// Runs `script` with the proxy variables set, through a `robin gateway` started for the run;
/// the gateway's peak RSS and CPU time are read before it is stopped.
fn run_via_gateway(
    load: &Load,
    script: &str,
    robin_bin: &Path,
    config: &Path,
) -> anyhow::Result<Measurement> {
    let mut gateway = Command::new("ip");
    gateway
        .args(["netns", "exec", CLIENT_NS])
        .arg(robin_bin)
        .args(["gateway", "--config"])
        .arg(config)
        .args(["--listen", GATEWAY_ADDR, "--admin-addr", GATEWAY_ADMIN])
        // The bench upstream is a namespace address; nothing is denied.
        .args(["--deny-destinations", ""])
        .env("ROBIN_LOG", "warn");
    let child = gateway.spawn().context("starting robin gateway")?;
    let mut gateway = KillOnDrop(child);
    super::world::wait_for_port(CLIENT_NS, &format!("http://{GATEWAY_ADMIN}/readyz"))?;
    let proxy = format!("http://{GATEWAY_ADDR}");
    let script = format!("export https_proxy={proxy} http_proxy={proxy}\n{script}");
    let pid = gateway.0.id();
    let before = cpu_of(pid)?;
    let (text, _, _) = run_client(None, &script)?;
    let after = cpu_of(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let _ = gateway.0.kill();
    let _ = gateway.0.wait();
    let mut m = load.parse(&text)?;
    m.robin_hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    m.proxy_cpu_s = Some(after - before);
    Ok(m)
}

/// CPU seconds process `pid` has used: utime + stime (fields 14, 15 of /proc/PID/stat, all
/// threads), in clock ticks of 1/100 s.
fn cpu_of(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    match (fields.get(11), fields.get(12)) {
        (Some(u), Some(s)) => Ok((u.parse::<f64>()? + s.parse::<f64>()?) / 100.0),
        _ => bail!("/proc/{pid}/stat has no utime and stime"),
    }
}

/// A background process killed (and reaped) however the run ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `script` in the client namespace, under `robin exec` when `robin` is given. When Robin
/// wraps it, the script's parent is Robin, whose peak RSS and the CPU time it used while the
/// script ran (start-up, eBPF loading, is left out, as a peer's is) are appended.
pub fn run_client(
    robin: Option<(&Path, &Path)>,
    script: &str,
) -> anyhow::Result<(String, Option<u64>, Option<f64>)> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", CLIENT_NS]);
    let script = match robin {
        Some((bin, config)) => {
            profile_prefix(&mut cmd);
            cmd.arg(bin)
                .arg("exec")
                .arg("--config")
                .arg(config)
                .arg("--");
            format!(
                "echo ROBIN_STAT0 $(cut -d' ' -f14,15 /proc/$PPID/stat)\n{script}\necho ROBIN_HWM $(grep VmHWM /proc/$PPID/status | tr -s ' ' | cut -d' ' -f2)\necho ROBIN_STAT $(cut -d' ' -f14,15 /proc/$PPID/stat)"
            )
        }
        None => script.to_owned(),
    };
    cmd.args(["sh", "-ec", &script]).env("ROBIN_LOG", "warn");
    let out = cmd.output().context("running the load generator")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "client run failed ({}): {text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let hwm = tagged(&text, "ROBIN_HWM ").and_then(|v| v.trim().parse().ok());
    // utime + stime in clock ticks; sysconf(_SC_CLK_TCK) is 100 on Linux x86_64.
    let ticks = |tag| {
        let mut it = tagged(&text, tag)?
            .split_whitespace()
            .filter_map(|n| n.parse::<f64>().ok());
        Some((it.next()? + it.next()?) / 100.0)
    };
    let cpu = ticks("ROBIN_STAT ")
        .zip(ticks("ROBIN_STAT0 "))
        .map(|(end, start)| end - start);
    Ok((text, hwm, cpu))
}

fn tagged<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(tag))
}

/// ROBIN_BENCH_PROFILE=DIR: sample every Robin run with perf (software clock; this host has no
/// hardware counters) into DIR/robin-NN.data, numbered in run order. With
/// ROBIN_BENCH_PROFILE_CALLS=dwarf, with call stacks unwound from DWARF (the release build has no
/// frame pointers), for `perf report --children`.
fn profile_prefix(cmd: &mut Command) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static RUN: AtomicUsize = AtomicUsize::new(1);
    if let Some(dir) = std::env::var_os("ROBIN_BENCH_PROFILE") {
        let n = RUN.fetch_add(1, Ordering::Relaxed);
        let out = Path::new(&dir).join(format!("robin-{n:02}.data"));
        // perf does not make the directory; without it every profiled run fails.
        if let Err(e) = std::fs::create_dir_all(&dir) {
            println!("   cannot make {}: {e}", Path::new(&dir).display());
        }
        println!("   perf record → {}", out.display());
        cmd.args(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999"]);
        if let Some(calls) = std::env::var_os("ROBIN_BENCH_PROFILE_CALLS") {
            cmd.arg("--call-graph").arg(calls);
        }
        cmd.arg("-o").arg(out).arg("--");
    }
}

/// Median and range of one figure over a path's rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// A path whose rate spreads more than this (max − min, over the median) is marked noisy.
pub const NOISY_SPREAD: f64 = 0.15;

impl Summary {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Summary> {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// (max − min) / median.
    pub fn spread(&self) -> f64 {
        if self.median > 0.0 {
            (self.max - self.min) / self.median
        } else {
            0.0
        }
    }

    pub fn noisy(&self) -> bool {
        self.spread() > NOISY_SPREAD
    }
}

impl PathResult {
    pub fn rate(&self) -> Option<Summary> {
        Summary::of(self.runs.iter().map(|m| m.rate))
    }

    /// The median of an optional per-run figure over the runs that have it.
    pub fn median_of(&self, f: impl Fn(&Measurement) -> Option<f64>) -> Option<f64> {
        Summary::of(self.runs.iter().filter_map(f)).map(|s| s.median)
    }
}

impl Outcome {
    pub fn by_role(&self, role: Role) -> Option<&PathResult> {
        self.results.iter().find(|r| r.spec.role == role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_leads_once_per_cycle() {
        assert_eq!(order(3, 0), [0, 1, 2]);
        assert_eq!(order(3, 1), [1, 2, 0]);
        assert_eq!(order(3, 2), [2, 0, 1]);
        assert_eq!(order(3, 3), [0, 1, 2]);
        let firsts: Vec<usize> = (0..4).map(|r| order(4, r)[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 3]);
    }

    #[test]
    fn median_and_range() {
        let s = Summary::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Summary::of([4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Summary::of(std::iter::empty()), None);
    }

    #[test]
    fn noisy_above_fifteen_percent() {
        let calm = Summary::of([100.0, 107.0, 114.0]).unwrap();
        assert!((calm.spread() - 0.14 / 1.07).abs() < 1e-9);
        assert!(!calm.noisy());
        let noisy = Summary::of([100.0, 100.0, 116.0]).unwrap();
        assert!(noisy.noisy(), "{}", noisy.spread());
    }
}
