//! Robin's resources beyond the per-run figures: RSS idle and with many idle TLS connections,
//! leaf mint time, and `robin exec` start-to-command time.
use std::{fs, path::Path, process::Command};

use anyhow::bail;

use super::{CLIENT_NS, MINT_SUFFIX, RULED, Settings, UPSTREAM_IP, assets, world::World};

#[derive(Default)]
pub struct Extras {
    pub idle_rss_kib: Option<u64>,
    /// Kernel memory of the eBPF maps Robin holds (their `memlock`), charged to its cgroup.
    pub bpf_maps_kib: Option<u64>,
    /// (connections held, RSS after handshakes, RSS 1 s after one request each, RSS 11 s
    /// after, the connections still held).
    pub conns_rss_kib: Option<(u32, u64, u64, u64)>,
    /// (median handshake ms, same name; median ms, distinct names; names).
    pub mint_ms: Option<(f64, f64, u32)>,
    /// (median ms robin exec → command, median ms plain fork/exec baseline).
    pub attach_ms: Option<(f64, f64)>,
    pub notes: Vec<String>,
}

pub fn measure(s: &Settings, world: &World, robin_bin: &Path) -> anyhow::Result<Extras> {
    println!("== Robin's resources");
    let mut extras = Extras::default();
    let config = world.dir.join("robin.toml");
    let robin = (robin_bin, config.as_path());
    idle_connections(s, world, robin, &mut extras)?;
    mint(s, world, robin, &mut extras)?;
    extras.attach_ms = attach(world, robin_bin)?;
    Ok(extras)
}

/// Runs `script` in the client namespace and returns its stdout (no Robin figures appended).
fn client_output(wrapper: Option<(&Path, &Path)>, script: &str) -> anyhow::Result<String> {
    // 1,000 held connections are 2,000 descriptors in Robin (downstream + upstream).
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=16384:16384", "ip", "netns", "exec", CLIENT_NS]);
    if let Some((bin, config)) = wrapper {
        cmd.arg(bin)
            .arg("exec")
            .arg("--config")
            .arg(config)
            .arg("--");
    }
    cmd.args(["sh", "-ec", script]).env("ROBIN_LOG", "warn");
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "{script}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `n`th whitespace-separated value after `key` on the line starting with it.
fn field<T: std::str::FromStr>(text: &str, key: &str, n: usize) -> Option<T> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().nth(n)?.parse().ok())
}

fn idle_connections(
    s: &Settings,
    world: &World,
    robin: (&Path, &Path),
    extras: &mut Extras,
) -> anyhow::Result<()> {
    let script = world.dir.join("idle.py");
    fs::write(&script, assets::IDLE_CONNS_PY)?;
    let cmd = format!(
        "ROBIN_PID=$PPID /usr/bin/python3 {} {} {RULED} {UPSTREAM_IP}",
        script.display(),
        s.idle_connections
    );
    match client_output(Some(robin), &cmd) {
        Ok(text) => {
            extras.idle_rss_kib = field(&text, "IDLE_RSS", 0);
            extras.bpf_maps_kib = field(&text, "BPF_MAPS", 0);
            extras.conns_rss_kib = (|| {
                Some((
                    field(&text, "CONNS_RSS", 0)?,
                    field(&text, "CONNS_RSS", 1)?,
                    field(&text, "CONNS_RSS", 2)?,
                    field(&text, "CONNS_RSS", 3)?,
                ))
            })();
        }
        Err(e) => extras
            .notes
            .push(format!("idle connections run failed: {e:#}")),
    }
    Ok(())
}

/// Each name is new to this Robin process (a fresh `robin exec`), so every distinct-name
/// handshake mints; the same-name handshakes hit the leaf cache.
fn mint(
    s: &Settings,
    world: &World,
    robin: (&Path, &Path),
    extras: &mut Extras,
) -> anyhow::Result<()> {
    let script = world.dir.join("mint.py");
    fs::write(&script, assets::MINT_PY)?;
    let cmd = format!(
        "/usr/bin/python3 {} {UPSTREAM_IP} {} {MINT_SUFFIX} h",
        script.display(),
        s.mint_names
    );
    match client_output(Some(robin), &cmd) {
        Ok(text) => {
            extras.mint_ms = (|| {
                Some((
                    field(&text, "MINT", 0)?,
                    field(&text, "MINT", 1)?,
                    field(&text, "MINT", 2)?,
                ))
            })();
        }
        Err(e) => extras.notes.push(format!("mint run failed: {e:#}")),
    }
    Ok(())
}

/// Start-to-command: wall time from just before `robin exec` is started until the command
/// inside the new, captured cgroup prints the clock; the same with no Robin is the baseline.
fn attach(world: &World, robin_bin: &Path) -> anyhow::Result<Option<(f64, f64)>> {
    let (rb, d) = (robin_bin.display(), world.dir.display());
    let script = format!(
        "for i in 1 2 3 4 5 6 7; do
           t0=$(date +%s%N); t1=$({rb} exec --config {d}/robin.toml -- date +%s%N); echo ATTACH $((t1 - t0))
           t0=$(date +%s%N); t1=$(date +%s%N); echo BASE $((t1 - t0))
         done"
    );
    let text = client_output(None, &script)?;
    let median_ms = |key: &str| {
        let mut v: Vec<f64> = text
            .lines()
            .filter_map(|l| l.strip_prefix(key)?.trim().parse::<f64>().ok())
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).map(|ns| ns / 1e6)
    };
    Ok(median_ms("ATTACH ").zip(median_ms("BASE ")))
}
