//! Every server of the benchmark (the upstream, each peer) runs in a cgroup of its own under
//! `robin-bench`, so the CPU a peer spent during a run is read from its cgroup's `cpu.stat`:
//! all of its processes and threads (nginx's workers, squid's helpers, Envoy's threads), as
//! Robin's is read from /proc of `robin exec`. The name is fixed, like the namespaces', so a
//! run killed half-way is cleaned up by the next.
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

const ROOT: &str = "robin-bench";

/// Where cgroup v2 is mounted (`/sys/fs/cgroup/unified` on the CI machines).
fn mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(at))
        })
        .context("no cgroup2 file system is mounted: the benchmark reads peers' CPU from it")
}

/// The cgroup of `server`.
pub fn dir(server: &str) -> anyhow::Result<PathBuf> {
    Ok(mount()?.join(ROOT).join(server))
}

/// A fresh, empty `robin-bench` (a leftover's processes are killed first).
pub fn reset() -> anyhow::Result<()> {
    let root = mount()?.join(ROOT);
    remove(&root)?;
    fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))
}

/// Kills what is left in `robin-bench` and removes it; waits up to 2 s for the processes to go.
pub fn remove_all() -> anyhow::Result<()> {
    remove(&mount()?.join(ROOT))
}

fn remove(root: &Path) -> anyhow::Result<()> {
    if !root.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14) SIGKILLs every process below it.
    fs::write(root.join("cgroup.kill"), "1")
        .with_context(|| format!("killing what runs in {}", root.display()))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match remove_tree(root) {
            Ok(()) => return Ok(()),
            // A killed process leaves its cgroup a moment after the signal.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).with_context(|| format!("removing {}", root.display())),
        }
    }
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// Starts `cmd` (whose program is `ip netns exec …`) in `server`'s cgroup, before it runs
/// anything, so that every process it forks is counted. `ip netns exec` mounts a sysfs of the
/// namespace's own, without the cgroup file system, so the child cannot move itself: it waits
/// on stdin until the parent has moved it, then `exec`s the command.
pub fn spawn_in(
    server: &str,
    mut cmd: Command,
    program: &str,
    args: &[&str],
) -> anyhow::Result<Child> {
    let dir = dir(server)?;
    if dir.exists() {
        bail!("two servers named {server}: each needs a cgroup of its own");
    }
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut child = cmd
        .args([
            "sh",
            "-c",
            r#"read -r _ && exec "$@" < /dev/null"#,
            "sh",
            program,
        ])
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let moved = fs::write(dir.join("cgroup.procs"), child.id().to_string())
        .with_context(|| format!("moving {program} into {}", dir.display()));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let go = moved.and_then(|()| Ok(stdin.write_all(b"go\n")?));
    if let Err(e) = go {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// CPU seconds `server`'s processes have used so far (user and system).
pub fn cpu_s(server: &str) -> anyhow::Result<f64> {
    let path = dir(server)?.join("cpu.stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    usage_s(&text).with_context(|| format!("no usage_usec in {}", path.display()))
}

fn usage_s(cpu_stat: &str) -> Option<f64> {
    let usec = cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?;
    Some(usec.trim().parse::<f64>().ok()? / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_in_seconds() {
        let stat = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n";
        assert_eq!(usage_s(stat), Some(2.5));
        assert_eq!(usage_s("user_usec 1\n"), None);
    }
}
