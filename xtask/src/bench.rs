//! `cargo xtask bench [--smoke]`: Robin side by side with the direct path and with proxies users
//! pick instead, measured in one run on one machine and reported as ratios.
//!
//! Topology: a "client" namespace and an "upstream" namespace joined by veth (no route out).
//! nginx in the upstream namespace serves `/small`, `/large` and a gRPC unary method over HTTPS
//! (h1 + h2), plain HTTP, and an HTTP/1.1-only TLS listener on a second address. Load
//! generators run in the client namespace: wrk (HTTP/1.1), h2load (HTTP/2, gRPC), curl (bulk).
//!
//! Robin is measured as users run it: `robin exec -- <load generator>`. Peers inject the same
//! header with the same cores: nginx, haproxy and Envoy as explicit reverse proxies, squid
//! (`ssl-bump`) and mitmproxy transparently behind an iptables REDIRECT. Every path of a
//! scenario runs in interleaved rounds after a warm-up (`rounds`); the report shows the median
//! and the spread, and a sanity guard (`guard`) rejects a run where a proxied path beats direct.
//! See bench/README.md for the method.
use std::{fs, path::PathBuf};

use anyhow::bail;

use crate::{build_robin, workspace_root};
use assets::TOKEN;

mod assets;
mod cgroups;
mod guard;
mod idle;
mod load;
mod peers;
mod pki;
mod report;
mod resources;
mod rounds;
mod sections;
mod world;

const CLIENT_NS: &str = "robin-bench-client";
const UPSTREAM_NS: &str = "robin-bench-up";
const CLIENT_IP: &str = "10.254.0.1";
const UPSTREAM_IP: &str = "10.254.0.2";
/// The upstream's HTTP/1.1-only listener.
const H1_IP: &str = "10.254.0.3";
const RULED: &str = "bench.test";
/// A ruled name served only over HTTP/1.1 (on `H1_IP`).
const H1_HOST: &str = "h1.test";
const UNRULED: &str = "bulk.test";
/// Names under this suffix match a wildcard rule: one minted leaf per distinct name.
const MINT_SUFFIX: &str = "mint.test";
/// Concurrent connections of the throughput rows.
const CONNECTIONS: u32 = 16;

/// How long and how often to measure.
pub struct Settings {
    pub smoke: bool,
    /// Seconds per timed run of the main table.
    pub seconds: u32,
    /// Seconds of each path's warm-up run, before the rounds.
    pub warmup_seconds: u32,
    /// Interleaved rounds per scenario (the order of paths rotates each round).
    pub rounds: usize,
    pub large_mib: u64,
    /// Envoy, squid, mitmproxy (slow to install): full mode only.
    pub full_peers: bool,
    pub idle_connections: u32,
    pub mint_names: u32,
    /// Seconds per timed run of the capture-cost section.
    pub cap_seconds: u32,
}

impl Settings {
    fn new(smoke: bool) -> Self {
        if smoke {
            Settings {
                smoke,
                seconds: 1,
                warmup_seconds: 1,
                rounds: 5,
                large_mib: 64,
                full_peers: false,
                idle_connections: 1000,
                mint_names: 30,
                cap_seconds: 1,
            }
        } else {
            Settings {
                smoke,
                seconds: 5,
                warmup_seconds: 2,
                rounds: 5,
                large_mib: 1024,
                full_peers: true,
                idle_connections: 1000,
                mint_names: 200,
                cap_seconds: 5,
            }
        }
    }

    /// Worker processes or threads for Robin's peers and the upstream: one per core, as Robin.
    fn workers() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

pub fn run(smoke: bool) -> anyhow::Result<()> {
    let s = Settings::new(smoke);
    peers::ensure_tools()?;
    let tools = if s.full_peers {
        Some(peers::ensure_full_tools()?)
    } else {
        None
    };
    // ROBIN_BENCH_BIN: benchmark a given binary instead of building this tree's.
    let robin_bin = match std::env::var_os("ROBIN_BENCH_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => build_robin(true)?,
    };
    let experiment = sections::Experiment::from_env();
    let header = report::Header::now(&s)?;
    let world = world::World::build(&s, tools.as_ref())?;
    let main = sections::main_table(&s, &world, &robin_bin, &experiment)?;
    if experiment.is_set() {
        let extras = if experiment.selects_resources() {
            resources::measure(&s, &world, &robin_bin)?
        } else {
            Default::default()
        };
        drop(world);
        return write_experiment(&header.finish(), &s, &main, &extras, &experiment);
    }
    let capture = sections::capture_cost(&s, &world, &robin_bin)?;
    let extras = resources::measure(&s, &world, &robin_bin)?;
    drop(world);

    let violations = guard::check(main.iter().chain(&capture));
    let text = report::render(&header.finish(), &s, &main, &capture, &extras, &violations)?;
    print!("{text}");
    let out = workspace_root().join("bench/results");
    fs::create_dir_all(&out)?;
    let stem = if smoke { "smoke" } else { "latest" };
    if violations.is_empty() {
        fs::write(out.join(format!("{stem}.md")), &text)?;
        println!("written to bench/results/{stem}.md");
        return Ok(());
    }
    // Never publish an impossible ratio: the report goes aside and the run fails.
    let rejected = format!("{stem}.rejected.md");
    fs::write(out.join(&rejected), &text)?;
    bail!(
        "sanity guard: {} proxied path(s) beat direct by more than the noise; report kept as \
         bench/results/{rejected}, not published:\n{}",
        violations.len(),
        violations
            .iter()
            .map(|v| format!("  {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// An experiment's table goes to `bench/results/experiments/`, named by its time, with the
/// settings that made it; `smoke.md` and `latest.md` stay the published runs.
fn write_experiment(
    header: &report::Header,
    s: &Settings,
    main: &[rounds::Outcome],
    extras: &resources::Extras,
    experiment: &sections::Experiment,
) -> anyhow::Result<()> {
    let violations = guard::check(main.iter());
    let table = report::render(header, s, main, &[], extras, &violations)?;
    let text = format!("Experiment: {experiment:?}\n\n{table}");
    print!("{text}");
    let dir = workspace_root().join("bench/results/experiments");
    fs::create_dir_all(&dir)?;
    let stamp: String = header.date.chars().filter(char::is_ascii_digit).collect();
    let name = unused_name(&stamp, |n| dir.join(n).exists());
    fs::write(dir.join(&name), &text)?;
    println!("written to bench/results/experiments/{name}");
    Ok(())
}

/// `experiment-<stamp>.md`, or with `-2`, `-3`… when that is `taken`: the stamp has minutes
/// only, and two short experiments can end in the same minute.
fn unused_name(stamp: &str, taken: impl Fn(&str) -> bool) -> String {
    std::iter::once(format!("experiment-{stamp}.md"))
        .chain((2..).map(|i| format!("experiment-{stamp}-{i}.md")))
        .find(|n| !taken(n))
        .expect("an unbounded sequence of names")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_experiment_never_overwrites_one_from_the_same_minute() {
        let taken = ["experiment-202612031012.md", "experiment-202612031012-2.md"];
        let name = unused_name("202612031012", |n| taken.contains(&n));
        assert_eq!(name, "experiment-202612031012-3.md");
        assert_eq!(
            unused_name("202612031013", |n| taken.contains(&n)),
            "experiment-202612031013.md"
        );
    }
}
