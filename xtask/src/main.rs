//! Robin's task runner: `cargo xtask setup | test | fuzz | demo | manifests | bench`.
//!
//! Building the eBPF object is `robin-agent/build.rs`'s job; xtask installs what that build and
//! the privileged tests need, then runs things.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod fuzz;
mod helm;
mod manifests;
mod progress;
mod setup;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools (idempotent; fast when all is present).
    Setup,
    /// Run the whole suite: unit, in-process and privileged end-to-end tests, and manifests.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Property-based fuzzing of the SNI/Host sniffer, the config parser and the token
    /// validator, with fresh seeds round after round for about N seconds.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Show Robin's main job end to end on throwaway namespaces.
    Demo,
    /// Render every kustomization under deploy/ and every documented values combination of the
    /// Helm chart, and validate them against the Kubernetes schemas (offline).
    Manifests,
    /// Benchmark Robin against the direct path and peer proxies (writes bench/results/).
    Bench {
        /// A few seconds per scenario: keeps the harness from rotting (run in CI).
        #[arg(long)]
        smoke: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let task = match &cli.command {
        Task::Setup => "setup",
        Task::Test { .. } => "test",
        Task::Fuzz { .. } => "fuzz",
        Task::Demo => "demo",
        Task::Manifests => "manifests",
        Task::Bench { .. } => "bench",
    };
    progress::init(task)?;
    match cli.command {
        Task::Setup => setup::ensure(),
        Task::Test { args } => test(&args),
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Demo => {
            setup::ensure()?;
            demo::run()
        }
        Task::Manifests => {
            setup::ensure_manifest_validator()?;
            helm::ensure()?;
            manifests::run()
        }
        Task::Bench { smoke } => {
            setup::ensure()?;
            bench::run(smoke)
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_owned()
}

/// `CARGO_TARGET_DIR`, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

/// Builds the `robin` binary (debug for tests and the demo, release for benchmarks) and
/// returns its path. The build's output goes to the run's log (see [`progress`]).
pub fn build_robin(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "robin-agent", "--bin", "robin"]);
    if release {
        cmd.arg("--release");
    }
    let profile = if release { "release" } else { "debug" };
    progress::step(&format!("building robin ({profile})"), &mut cmd)?;
    Ok(target_dir().join(if release {
        "release/robin"
    } else {
        "debug/robin"
    }))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::ensure()?;
    // SAFETY-free checks up front so a missing privilege fails with a reason, not deep in a test.
    let euid = String::from_utf8(Command::new("id").arg("-u").output()?.stdout)?;
    if euid.trim() != "0" {
        bail!("the privileged tests (eBPF attach, netns, cgroups) must run as root");
    }
    let robin = build_robin(false)?;
    manifests::run()?;
    // Privileged tests share kernel state (cgroup2 tree, netns names); two threads keep the
    // suite quick while every world is uniquely named.
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", "robin-ebpf", "--"])
        .args(["--test-threads=2"])
        .args(extra)
        .env("ROBIN_BIN", &robin)
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("spawning cargo test")?;
    // Every line goes through as it comes; the per-binary results are added up so the run ends
    // with one total (the last binary cargo runs is a doc-test run with nothing in it).
    let mut totals = TestTotals::default();
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        totals.add(&line);
    }
    let st = child.wait().context("waiting for cargo test")?;
    println!(
        "\nsuite: {} passed, {} failed, {} ignored ({} test binaries)",
        totals.passed, totals.failed, totals.ignored, totals.binaries
    );
    if !st.success() {
        bail!("cargo test failed with {st}");
    }
    if totals.passed == 0 {
        bail!("cargo test ran no test");
    }
    println!("{} passed, {} failed", totals.passed, totals.failed);
    Ok(())
}

/// Sums of libtest's `test result: ok. N passed; N failed; N ignored; ...` lines.
#[derive(Default, Debug, PartialEq, Eq)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
    binaries: u64,
}

impl TestTotals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn totals_add_up_libtest_result_lines() {
        let mut t = TestTotals::default();
        for line in [
            "test result: ok. 79 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.26s",
            "running 2 tests",
            "test result: FAILED. 1 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 3.10s",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ] {
            t.add(line);
        }
        assert_eq!(
            t,
            TestTotals {
                passed: 80,
                failed: 1,
                ignored: 2,
                binaries: 3
            }
        );
    }
}
