//! The Markdown report (`bench/results/smoke.md`, `latest.md`): date, machine, the table of
//! medians with their spread, the sanity guard's verdict, the capture-cost section and Robin's
//! resources. Rendering is a pure function of the figures, so it is unit-tested.
use std::{fmt::Write as _, fs, process::Command};

use super::{
    CONNECTIONS, Settings,
    guard::{self, Violation},
    peers,
    resources::Extras,
    rounds::{NOISY_SPREAD, Outcome, PathResult, Role, Summary},
};

/// When and where the run happened.
pub struct Header {
    pub date: String,
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub load_start: String,
    pub load_end: String,
    pub robin: String,
    pub versions: Vec<String>,
}

impl Header {
    /// Taken before the run starts; `finish` adds what is known only at its end.
    pub fn now(s: &Settings) -> anyhow::Result<Header> {
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()?
            .stdout;
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Ok(Header {
            date: String::from_utf8_lossy(&date).trim().to_owned(),
            cores: Settings::workers(),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map_or("unknown CPU".into(), |(_, v)| v.trim().to_owned()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or("unknown".into(), |k| k.trim().to_owned()),
            load_start: loadavg(),
            load_end: String::new(),
            robin: match std::env::var_os("ROBIN_BENCH_BIN") {
                Some(bin) => format!("robin from ROBIN_BENCH_BIN={}", bin.to_string_lossy()),
                None => "robin (this tree, release build)".into(),
            },
            versions: peers::versions(s.full_peers),
        })
    }

    pub fn finish(mut self) -> Header {
        self.load_end = loadavg();
        self
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ")
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.3}"))
}

fn rate(v: f64, unit: &str) -> String {
    if unit == "req/s" {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

pub fn render(
    h: &Header,
    s: &Settings,
    main: &[Outcome],
    capture: &[Outcome],
    extras: &Extras,
    violations: &[Violation],
) -> anyhow::Result<String> {
    let mut r = String::new();
    intro(&mut r, h, s)?;
    main_table(&mut r, main)?;
    added_latency(&mut r, main)?;
    verdict(&mut r, violations, main.iter().chain(capture))?;
    capture_table(&mut r, capture, s)?;
    cpu_per_work(&mut r, main)?;
    robin_figures(&mut r, extras)?;
    writeln!(r, "Versions: {}; {}.", h.robin, h.versions.join("; "))?;
    Ok(r)
}

fn intro(r: &mut String, h: &Header, s: &Settings) -> std::fmt::Result {
    let mode = if s.smoke { " (smoke)" } else { "" };
    writeln!(r, "# Robin benchmark{mode} — {}\n", h.date)?;
    writeln!(
        r,
        "Machine: {} cores, {}, Linux {}. Load average (1/5/15 min) {} at the start, {} at the end; \
         compare ratios from quiet runs only.\n",
        h.cores, h.cpu, h.kernel, h.load_start, h.load_end
    )?;
    writeln!(
        r,
        "Every path of a scenario ran once to warm up ({} s), then in {} interleaved rounds of {} s, \
         the order rotated each round. Shown: the median, the range over the rounds and the spread \
         ((max − min) ÷ median; above {:.0} % the row is marked noisy). {CONNECTIONS} connections \
         unless the scenario says otherwise; load from wrk (h1), h2load (h2, gRPC), curl (download). \
         Robin captures with eBPF (`robin exec -- <load>`); each peer injects the same header, runs \
         one worker per core ({} here) and is reached as the `capture` column says. \
         `robin ÷ this` is Robin's rate over the row's within each round (the two ran minutes \
         apart at most, so a drift of the shared host cancels), as the median of those ratios and \
         their range. The 1-connection (latency) rows run with idle CPUs polling instead of \
         halting, for every path alike (`/dev/cpu_dma_latency` held at 0, as tuned's \
         latency-performance profile does): on a virtual machine each wake-up of a halted vCPU \
         costs tens of µs through the hypervisor, which the added latency would otherwise mostly \
         measure.\n",
        s.warmup_seconds,
        s.rounds,
        s.seconds,
        NOISY_SPREAD * 100.0,
        h.cores
    )
}

fn main_table(r: &mut String, main: &[Outcome]) -> std::fmt::Result {
    writeln!(
        r,
        "| scenario | path | capture | median | min–max | spread | p50 ms | p99 ms | mean ms | robin ÷ this |"
    )?;
    writeln!(
        r,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for o in main {
        let robin = o.by_role(Role::Robin);
        for res in &o.results {
            let cells = rate_cells(res, o.unit);
            let ratio = match (robin, res.spec.role) {
                (Some(rb), Role::Direct | Role::Peer) => ratio_cell(paired_ratio(rb, res)),
                _ => "–".into(),
            };
            writeln!(
                r,
                "| {} | {} | {} | {cells} | {} | {} | {} | {ratio} |",
                o.title,
                res.spec.label,
                res.spec.capture,
                opt(res.median_of(|m| m.p50_ms)),
                opt(res.median_of(|m| m.p99_ms)),
                opt(res.median_of(|m| m.mean_ms)),
            )?;
        }
    }
    writeln!(r)
}

/// `a`'s rate over `b`'s, round by round: both ran in every round, close in time, so a slow
/// drift of the shared host divides out instead of landing on one path's median. `None` when
/// either lacks a round (a failed peer).
fn paired_ratio(a: &PathResult, b: &PathResult) -> Option<Summary> {
    if a.runs.len() != b.runs.len() || b.runs.iter().any(|m| m.rate <= 0.0) {
        return None;
    }
    Summary::of(a.runs.iter().zip(&b.runs).map(|(a, b)| a.rate / b.rate))
}

/// "median (min–max)" of a per-round ratio.
fn ratio_cell(ratio: Option<Summary>) -> String {
    match ratio {
        Some(r) if r.min == r.max => format!("{:.2}", r.median),
        Some(r) => format!("{:.2} ({:.2}–{:.2})", r.median, r.min, r.max),
        None => "–".into(),
    }
}

/// "median | min–max | spread" of a path's rate, or its failure across the three cells.
fn rate_cells(res: &PathResult, unit: &str) -> String {
    if let Some(e) = &res.error {
        return format!("failed: {} | |", e.replace('|', "/"));
    }
    match res.rate() {
        Some(sum) => format!(
            "{} {unit} | {}–{} | {:.0} %{}",
            rate(sum.median, unit),
            rate(sum.min, unit),
            rate(sum.max, unit),
            sum.spread() * 100.0,
            if sum.noisy() { " **noisy**" } else { "" }
        ),
        None => "– | – | –".into(),
    }
}

fn added_latency(r: &mut String, main: &[Outcome]) -> std::fmt::Result {
    let before = r.len();
    for o in main.iter().filter(|o| o.title.ends_with("(latency)")) {
        let p50 = |p: &PathResult| p.median_of(|m| m.p50_ms);
        let Some(direct) = o.by_role(Role::Direct).and_then(p50) else {
            continue;
        };
        let added: Vec<String> = o
            .results
            .iter()
            .filter(|p| p.spec.role != Role::Direct)
            .filter_map(|p| {
                let ms = p50(p)?;
                Some(format!(
                    "{} {:+.0} µs ({ms:.3} ms)",
                    p.spec.label,
                    (ms - direct) * 1000.0
                ))
            })
            .collect();
        if !added.is_empty() {
            writeln!(
                r,
                "Added p50, {}: {} against direct {direct:.3} ms (medians).",
                o.title.trim_end_matches(" (latency)"),
                added.join(", "),
            )?;
        }
    }
    if r.len() > before {
        writeln!(r)?;
    }
    Ok(())
}

fn verdict<'a>(
    r: &mut String,
    violations: &[Violation],
    outcomes: impl Iterator<Item = &'a Outcome>,
) -> std::fmt::Result {
    let unguarded: Vec<String> = outcomes
        .filter_map(|o| Some(format!("{} ({})", o.title, o.unguarded?)))
        .collect();
    let unguarded = if unguarded.is_empty() {
        String::new()
    } else {
        format!(" Not judged: {}.", unguarded.join("; "))
    };
    if violations.is_empty() {
        return writeln!(
            r,
            "**Sanity guard: passed** — no proxied path's worst round beats direct's best round × {}.{unguarded}\n",
            guard::MARGIN
        );
    }
    writeln!(
        r,
        "**Sanity guard: FAILED** — these proxied paths beat direct by more than the noise, so the \
         measurement is broken and this report must not be quoted:\n"
    )?;
    for v in violations {
        writeln!(r, "* {v}")?;
    }
    writeln!(r, "{}", unguarded.trim_start())
}

fn capture_table(r: &mut String, capture: &[Outcome], s: &Settings) -> std::fmt::Result {
    if capture.is_empty() {
        return Ok(());
    }
    writeln!(
        r,
        "Capture mechanism alone (trivial nginx on loopback of a namespace of its own; Robin's proxy \
         is not on this path; {} interleaved rounds of {} s per path, medians; `÷ direct` as in the \
         table above, round by round):\n",
        s.rounds, s.cap_seconds
    )?;
    writeln!(
        r,
        "| connections | path | req/s | min–max | spread | p50 ms | ÷ direct req/s, per round | p50 − direct µs |"
    )?;
    writeln!(r, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for o in capture {
        let direct = o.by_role(Role::Direct);
        let d_p50 = direct.and_then(|d| d.median_of(|m| m.p50_ms));
        for res in &o.results {
            let p50 = res.median_of(|m| m.p50_ms);
            let ratio = ratio_cell(direct.and_then(|d| paired_ratio(res, d)));
            let dp50 = match (p50, d_p50) {
                (Some(a), Some(b)) => format!("{:+.0}", (a - b) * 1000.0),
                _ => "–".into(),
            };
            let cells = rate_cells(res, o.unit);
            writeln!(
                r,
                "| {} | {} | {cells} | {} | {ratio} | {dp50} |",
                o.title,
                res.spec.label,
                opt(p50)
            )?;
        }
    }
    writeln!(r)
}

/// What each proxy spent per unit of work: Robin's CPU from /proc of `robin exec`, each peer's
/// from its cgroup, both counted while the load ran. Unlike a rate, CPU per request does not
/// depend on how the shared cores were divided in a round, so it compares the proxies' own cost.
fn cpu_per_work(r: &mut String, main: &[Outcome]) -> std::fmt::Result {
    let mut proxies: Vec<&str> = Vec::new();
    for res in main.iter().flat_map(|o| &o.results) {
        if res.spec.role != Role::Direct && !proxies.contains(&res.spec.label) {
            proxies.push(res.spec.label);
        }
    }
    writeln!(
        r,
        "CPU each proxy used while the load ran, per 10k requests (per GiB for a download), median over the rounds; in brackets, that over Robin's. Robin's is read from /proc of the `robin exec` process (start-up left out), each peer's from its cgroup's `cpu.stat` (every process and thread of it). Last column: Robin's peak RSS.\n"
    )?;
    writeln!(
        r,
        "| scenario | {} | Robin peak RSS MiB |",
        proxies.join(" | ")
    )?;
    writeln!(r, "| --- |{} ---: |", " ---: |".repeat(proxies.len()))?;
    for o in main {
        let robin = o.by_role(Role::Robin).and_then(cpu_per_unit);
        let cells: Vec<String> = proxies
            .iter()
            .map(|label| {
                let res = o.results.iter().find(|res| res.spec.label == *label);
                cpu_cell(res, robin)
            })
            .collect();
        let hwm = o
            .by_role(Role::Robin)
            .and_then(|res| res.runs.iter().filter_map(|m| m.robin_hwm_kib).max());
        let hwm = hwm.map_or("–".into(), |k| format!("{:.1}", k as f64 / 1024.0));
        writeln!(r, "| {} | {} | {hwm} |", o.title, cells.join(" | "))?;
    }
    writeln!(r)
}

/// A path's figure, and a peer's over Robin's; `–` where the path is not in the scenario or
/// has no figure.
fn cpu_cell(res: Option<&PathResult>, robin: Option<f64>) -> String {
    let Some((res, cpu)) = res.and_then(|res| Some((res, cpu_per_unit(res)?))) else {
        return "–".into();
    };
    match robin {
        Some(rb) if res.spec.role == Role::Peer => format!("{cpu:.3} ({:.2}×)", cpu / rb),
        _ => format!("{cpu:.3}"),
    }
}

/// A path's median CPU seconds per 10k requests, or per GiB downloaded.
fn cpu_per_unit(res: &PathResult) -> Option<f64> {
    res.median_of(|m| {
        let cpu = m.proxy_cpu_s?;
        match m.downloaded_mib {
            Some(mib) => Some(cpu / mib * 1024.0),
            None => (m.requests > 0.0).then(|| cpu / m.requests * 10_000.0),
        }
    })
}

fn robin_figures(r: &mut String, e: &Extras) -> std::fmt::Result {
    let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
    writeln!(r, "| Robin figure | value |\n| --- | ---: |")?;
    if let Some(k) = e.idle_rss_kib {
        writeln!(
            r,
            "| RSS idle (after start-up, no connection), MiB | {} |",
            mib(k)
        )?;
    }
    if let Some(k) = e.bpf_maps_kib {
        writeln!(
            r,
            "| eBPF maps, kernel memory (not RSS; charged to Robin's cgroup), MiB | {} |",
            mib(k)
        )?;
    }
    if let Some((n, hs, req, settled)) = e.conns_rss_kib {
        writeln!(
            r,
            "| RSS with {n} idle TLS connections (handshake done, no request), MiB | {} |",
            mib(hs)
        )?;
        writeln!(
            r,
            "| RSS with {n} idle TLS connections 1 s after one request each (upstream connections open), MiB | {} |",
            mib(req)
        )?;
        writeln!(
            r,
            "| the same 11 s after the requests, connections still held (past the periodic heap trim), MiB | {} |",
            mib(settled)
        )?;
    }
    if let Some((same, distinct, n)) = e.mint_ms {
        writeln!(
            r,
            "| client TLS handshake, cached leaf (median), ms | {same:.3} |"
        )?;
        writeln!(
            r,
            "| client TLS handshake, new name → leaf minted (median of {n}), ms | {distinct:.3} |"
        )?;
        writeln!(
            r,
            "| leaf mint time (difference), ms | {:.3} |",
            distinct - same
        )?;
    }
    if let Some((a, b)) = e.attach_ms {
        writeln!(
            r,
            "| `robin exec` start → command running in captured cgroup (median of 7), ms | {a:.1} |"
        )?;
        writeln!(
            r,
            "| same without Robin (fork/exec of `date`, baseline), ms | {b:.1} |"
        )?;
    }
    for n in &e.notes {
        writeln!(r, "\nNote: {n}")?;
    }
    writeln!(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{
        load::Measurement,
        rounds::{PathSpec, Via},
    };

    fn result(label: &'static str, role: Role, rates: &[f64], error: Option<&str>) -> PathResult {
        PathResult {
            spec: PathSpec {
                label,
                capture: "cap",
                role,
                url: String::new(),
                via: Via::Plain,
                enter_ns: None,
                server: None,
            },
            runs: rates
                .iter()
                .map(|&rate| Measurement {
                    rate,
                    p50_ms: Some(rate / 100.0),
                    ..Default::default()
                })
                .collect(),
            error: error.map(Into::into),
        }
    }

    fn header() -> Header {
        Header {
            date: "2026-12-02 06:00 UTC".into(),
            cores: 2,
            cpu: "Test CPU".into(),
            kernel: "6.1.0".into(),
            load_start: "0.10 / 0.20 / 0.30".into(),
            load_end: "1.00 / 0.50 / 0.40".into(),
            robin: "robin".into(),
            versions: vec!["nginx 1".into()],
        }
    }

    fn outcome() -> Outcome {
        Outcome {
            title: "keep-alive".into(),
            unit: "req/s",
            results: vec![
                result("direct", Role::Direct, &[200.0, 210.0, 220.0], None),
                result("robin", Role::Robin, &[100.0, 100.0, 130.0], None),
                result("nginx", Role::Peer, &[80.0, 80.0, 80.0], None),
                result("squid", Role::Peer, &[], Some("a | b")),
            ],
            unguarded: None,
        }
    }

    #[test]
    fn table_shows_median_range_spread_and_ratio() {
        let s = Settings::new(true);
        let text = render(&header(), &s, &[outcome()], &[], &Extras::default(), &[]).unwrap();
        assert!(text.contains("2 cores, Test CPU, Linux 6.1.0"), "{text}");
        assert!(
            text.contains("| keep-alive | direct | cap | 210 req/s | 200–220 | 10 % | 2.100 |"),
            "{text}"
        );
        // Robin: median 100, range 100–130, spread 30 % → noisy.
        assert!(
            text.contains("| robin | cap | 100 req/s | 100–130 | 30 % **noisy** |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| nginx | cap | 80 req/s | 80–80 | 0 % | 0.800 | – | – | 1.25 (1.25–1.62) |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| squid | cap | failed: a / b | | |"),
            "{text}"
        );
        assert!(text.contains("Sanity guard: passed"), "{text}");
    }

    #[test]
    fn ratios_are_taken_round_by_round() {
        // The host slowed down threefold in round 2 for both paths alike: Robin is at half of
        // direct in every round, which a ratio of the two medians (150 ÷ 100) would hide.
        let o = Outcome {
            title: "drift".into(),
            unit: "req/s",
            results: vec![
                result("direct", Role::Direct, &[100.0, 300.0, 100.0], None),
                result("robin", Role::Robin, &[50.0, 150.0, 50.0], None),
                result("late", Role::Peer, &[100.0, 100.0], None),
            ],
            unguarded: None,
        };
        let s = Settings::new(true);
        let text = render(&header(), &s, &[o], &[], &Extras::default(), &[]).unwrap();
        assert!(text.contains("| drift | direct | cap | 100 req/s | 100–300 | 200 % **noisy** | 1.000 | – | – | 0.50 |"), "{text}");
        assert!(
            text.contains("| drift | late | cap | 100 req/s | 100–100 | 0 % | 1.000 | – | – | – |"),
            "a peer missing a round has no pairs: {text}"
        );
    }

    #[test]
    fn a_download_gives_robins_cpu_per_gib() {
        let mut robin = result("robin", Role::Robin, &[500.0], None);
        robin.runs[0].proxy_cpu_s = Some(0.75);
        robin.runs[0].downloaded_mib = Some(512.0);
        let o = Outcome {
            title: "download".into(),
            unit: "MiB/s",
            results: vec![result("direct", Role::Direct, &[600.0], None), robin],
            unguarded: None,
        };
        let s = Settings::new(true);
        let text = render(&header(), &s, &[o], &[], &Extras::default(), &[]).unwrap();
        // 0.75 s for half a GiB.
        assert!(
            text.contains("| scenario | robin | Robin peak RSS MiB |"),
            "{text}"
        );
        assert!(text.contains("| download | 1.500 | – |"), "{text}");
    }

    #[test]
    fn each_peers_cpu_per_request_is_shown_against_robins() {
        let mut o = outcome();
        let cpu = [("robin", 0.2), ("nginx", 0.3)];
        for res in &mut o.results {
            for m in &mut res.runs {
                m.requests = 20_000.0;
                m.proxy_cpu_s = cpu.iter().find(|c| c.0 == res.spec.label).map(|c| c.1);
            }
        }
        let s = Settings::new(true);
        let text = render(&header(), &s, &[o], &[], &Extras::default(), &[]).unwrap();
        assert!(
            text.contains("| scenario | robin | nginx | squid | Robin peak RSS MiB |"),
            "{text}"
        );
        // 0.2 s and 0.3 s for 20k requests; squid failed and has no figure.
        assert!(
            text.contains("| keep-alive | 0.100 | 0.150 (1.50×) | – | – |"),
            "{text}"
        );
    }

    #[test]
    fn added_latency_is_given_for_robin_and_each_peer() {
        let s = Settings::new(true);
        let latency = Outcome {
            title: "TLS (latency)".into(),
            ..outcome()
        };
        let text = render(&header(), &s, &[latency], &[], &Extras::default(), &[]).unwrap();
        // p50 = rate / 100 ms: direct 2.100, robin 1.000, nginx 0.800; squid has no runs.
        assert!(
            text.contains(
                "Added p50, TLS: robin -1100 µs (1.000 ms), nginx -1300 µs (0.800 ms) against direct 2.100 ms (medians)."
            ),
            "{text}"
        );
    }

    #[test]
    fn a_failed_guard_is_in_the_report() {
        let s = Settings::new(true);
        let v = [Violation {
            scenario: "bulk".into(),
            path: "robin",
            unit: "MiB/s",
            min: 800.0,
            direct_max: 300.0,
        }];
        let text = render(&header(), &s, &[], &[], &Extras::default(), &v).unwrap();
        assert!(text.contains("Sanity guard: FAILED"), "{text}");
        assert!(
            text.contains("* bulk: robin's worst round 800.0 MiB/s > direct's best round 300.0"),
            "{text}"
        );
    }
}
