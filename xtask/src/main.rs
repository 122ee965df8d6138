//! Robin's task runner: `cargo xtask setup | test | demo | manifests`.
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
mod manifests;
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
    /// Show Robin's main job end to end on throwaway namespaces.
    Demo,
    /// Render every kustomization under deploy/ and validate it against the Kubernetes schemas
    /// (offline).
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
    match cli.command {
        Task::Setup => setup::ensure(),
        Task::Test { args } => test(&args),
        Task::Demo => {
            setup::ensure()?;
            demo::run()
        }
        Task::Manifests => {
            setup::ensure_manifest_validator()?;
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
/// returns its path.
pub fn build_robin(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "robin-agent", "--bin", "robin"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
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
    status(
        cargo()
            .args(["test", "--workspace", "--exclude", "robin-ebpf", "--"])
            .args(["--test-threads=2"])
            .args(extra)
            .env("ROBIN_BIN", &robin),
    )
}
