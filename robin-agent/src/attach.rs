//! `robin attach --cgroup DIR`: capture a cgroup that already exists (a systemd service or
//! slice, a VM's scope) and serve it, in the current network namespace, until SIGTERM/SIGINT.
//! Robin neither creates nor removes the cgroup and starts no process.
//!
//! Capture is pinned in bpffs, as in `robin node`: while `robin attach` is down (crashed,
//! stopped, restarting) the cgroup's captured connects are still redirected to the listener
//! port, find nothing there and are refused; they never go direct. A restarted `robin attach`
//! adopts the pinned attachment and replaces it without a gap. Only `--release` removes the
//! capture. The listener port must therefore be fixed: it is what the pinned redirect names.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    capture::{self, Attachment, CaptureSettings, Capturer, Cgroup, PinDir},
    config::{self, ConfigArgs},
    serve,
    standalone::{self, Serving},
};

pub const ENV_BPFFS_PINS: &str = "ROBIN_ATTACH_BPFFS_PINS";

/// Parent of the default pin directories (`robin node` pins under `/sys/fs/bpf/robin`).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/robin-attach";

#[derive(clap::Args, Debug)]
pub struct AttachArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The existing cgroup2 directory to capture (it and every cgroup below it), e.g.
    /// /sys/fs/cgroup/system.slice/app.service.
    #[arg(long, value_name = "DIR")]
    pub cgroup: PathBuf,
    /// Where the capture is pinned (on bpffs); what keeps the cgroup's connects refused while
    /// robin attach is down. Default: /sys/fs/bpf/robin-attach/<the cgroup's path below the
    /// cgroup2 mount, escaped like systemd-escape --path>.
    #[arg(long, env = ENV_BPFFS_PINS, value_name = "DIR")]
    pub bpffs_pins: Option<PathBuf>,
    /// Remove the pinned capture (the cgroup's connects go direct again) and exit. Stop the
    /// running robin attach first: it holds the capture until it exits.
    #[arg(long)]
    pub release: bool,
    /// On SIGTERM/SIGINT, how long connections in flight may take to finish, e.g. `10s`.
    #[arg(long, env = crate::node::args::ENV_DRAIN_TIMEOUT, default_value = "10s", value_parser = crate::oidc_gateway::parse_duration)]
    pub drain_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "{0} is not a cgroup2 directory: --cgroup takes an existing cgroup under the cgroup2 \
         mount, e.g. /sys/fs/cgroup/system.slice/app.service (robin attach does not create it)"
    )]
    NotCgroup2(PathBuf),
    #[error(
        "robin attach needs a fixed listener port (capture.listener_port or --listener-port): \
         the pinned capture keeps redirecting to it while robin attach is down or restarting"
    )]
    NoListenerPort,
}

pub fn main(args: AttachArgs) -> anyhow::Result<ExitCode> {
    let pins = args
        .bpffs_pins
        .clone()
        .unwrap_or_else(|| default_pin_dir(&args.cgroup));
    if args.release {
        capture::check_capabilities(false).map_err(anyhow::Error::msg)?;
        return release(&pins);
    }
    // Configuration first: a bad file is the most likely mistake and deserves the first word.
    let cfg = config::load(&args.config)?;
    if cfg.capture.listener_port == 0 {
        return Err(AttachError::NoListenerPort.into());
    }
    let cgroup = cgroup2_dir(&args.cgroup)?;
    capture::check_capabilities(false).map_err(anyhow::Error::msg)?;
    standalone::runtime()?.block_on(run(args, cfg, cgroup, pins))
}

async fn run(
    args: AttachArgs,
    cfg: config::Config,
    cgroup: Cgroup,
    pins: PathBuf,
) -> anyhow::Result<ExitCode> {
    // Installed first, so a stop request during start-up waits for a clean exit.
    let shutdown = serve::shutdown_signal()?;
    let pin_dir = PinDir::open(&pins).context("opening the bpffs pin directory")?;
    let mut capturer = Capturer::load_pinned(pin_dir).context("loading eBPF capture")?;
    let serving = Serving::start(&cfg, &capturer)?;
    let cgroup_id = cgroup.id()?;
    let previous = adopt(&mut capturer, cgroup_id);
    let adopted = previous.is_some();
    let settings = CaptureSettings::new(cfg.capture.ports.clone(), serving.listener_port());
    // On failure an adopted attachment stays pinned (dropping the handle keeps the pins), so
    // the cgroup stays fail-closed.
    let _attachment = capturer
        .attach_replacing(&cgroup, &settings, previous)
        .map_err(|e| e.error)
        .context("attaching capture")?;
    tracing::info!(
        cgroup = %cgroup.path().display(),
        cgroup_id,
        pin_dir = %pins.display(),
        adopted,
        listener_port = settings.listener_port,
        ports = ?settings.ports,
        "capturing"
    );
    shutdown.await;
    serving.finish(&capturer, args.drain_timeout).await;
    tracing::info!(
        "stopped; the pinned capture stays in place (captured connects are refused) until \
         `robin attach --release`"
    );
    Ok(ExitCode::SUCCESS)
}

/// Takes this cgroup's pinned attachment, if an earlier `robin attach` left one. Attachments of
/// other cgroups are released only when their cgroup is gone (the unit restarted and got a new
/// cgroup): a pin directory shared by mistake must not uncapture a live cgroup.
fn adopt(capturer: &mut Capturer, cgroup_id: u64) -> Option<Attachment> {
    let mut adopted = capturer.adopt_pinned();
    let mine = adopted.remove(&cgroup_id);
    let root = capture::find_cgroup2_mount().ok();
    for (id, attachment) in adopted {
        if root.as_deref().is_some_and(|r| !cgroup_exists(r, id)) {
            tracing::info!(
                cgroup_id = id,
                "releasing the capture of a cgroup that is gone"
            );
            capturer.detach(attachment);
        } else {
            tracing::warn!(
                cgroup_id = id,
                "the pin directory also holds the capture of another live cgroup; left in place"
            );
        }
    }
    mine
}

/// `--release`: detaches every pinned attachment (redirection first) and removes the pins.
fn release(pins: &Path) -> anyhow::Result<ExitCode> {
    if !pins.exists() {
        tracing::info!(pin_dir = %pins.display(), "nothing pinned; nothing to release");
        return Ok(ExitCode::SUCCESS);
    }
    let pin_dir = PinDir::open(pins).context("opening the bpffs pin directory")?;
    let mut capturer = Capturer::load_pinned(pin_dir).context("loading eBPF capture")?;
    let adopted = capturer.adopt_pinned();
    let released = adopted.len();
    for (_, attachment) in adopted {
        capturer.detach(attachment);
    }
    drop(capturer);
    fs::remove_dir_all(pins).with_context(|| format!("removing {}", pins.display()))?;
    tracing::info!(
        pin_dir = %pins.display(),
        released,
        "capture released; the cgroup's connects go direct"
    );
    Ok(ExitCode::SUCCESS)
}

/// An existing directory on a cgroup2 filesystem.
fn cgroup2_dir(path: &Path) -> Result<Cgroup, AttachError> {
    let on_cgroup2 = path.is_dir()
        && nix::sys::statfs::statfs(path)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    if on_cgroup2 {
        Ok(Cgroup::existing(path))
    } else {
        Err(AttachError::NotCgroup2(path.to_owned()))
    }
}

/// `/sys/fs/bpf/robin-attach/<name>`, the name derived from the cgroup's path below the
/// cgroup2 mount (the whole path when it is not below it), so that one cgroup always gets the
/// same directory, also once the cgroup is gone (for `--release`).
pub fn default_pin_dir(cgroup: &Path) -> PathBuf {
    let mount = capture::find_cgroup2_mount().ok();
    let relative = mount
        .as_deref()
        .and_then(|m| cgroup.strip_prefix(m).ok())
        .unwrap_or(cgroup);
    Path::new(DEFAULT_PIN_ROOT).join(escape_path(relative))
}

/// `systemd-escape --path`: components joined by `-`; bytes other than ASCII alphanumerics,
/// `:`, `_` and a non-leading `.` become `\xNN`, so distinct paths get distinct names.
fn escape_path(path: &Path) -> String {
    let parts: Vec<&[u8]> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.as_encoded_bytes()),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        return "-".to_owned();
    }
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, &b) in part.iter().enumerate() {
            let plain = b.is_ascii_alphanumeric() || b == b':' || b == b'_';
            if plain || (b == b'.' && !(i == 0 && j == 0)) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    out
}

/// Most directories looked at for a cgroup id; a host has hundreds to a few thousand.
const MAX_CGROUPS_WALKED: usize = 100_000;

/// Whether a cgroup with this id (its directory's inode) exists below `root`.
fn cgroup_exists(root: &Path, id: u64) -> bool {
    let mut stack = vec![root.to_owned()];
    let mut walked = 0;
    while let Some(dir) = stack.pop() {
        walked += 1;
        if walked > MAX_CGROUPS_WALKED {
            // Unknown: assume it exists, so nothing live is released.
            return true;
        }
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return true;
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_escape_like_systemd() {
        assert_eq!(
            escape_path(Path::new("system.slice/app.service")),
            "system.slice-app.service"
        );
        assert_eq!(
            escape_path(Path::new("robin.slice/robin-app.slice/")),
            "robin.slice-robin\\x2dapp.slice"
        );
        // `a/b-c` and `a-b/c` must not share a pin directory.
        assert_ne!(
            escape_path(Path::new("a/b-c")),
            escape_path(Path::new("a-b/c"))
        );
        assert_eq!(escape_path(Path::new("/.hidden x")), "\\x2ehidden\\x20x");
        assert_eq!(escape_path(Path::new("/")), "-");
    }

    #[test]
    fn default_pin_dir_is_below_the_attach_root() {
        let dir = default_pin_dir(Path::new("/no/such/cgroup.service"));
        assert!(dir.starts_with(DEFAULT_PIN_ROOT), "{}", dir.display());
        assert_eq!(dir.components().count(), 6, "one level: {}", dir.display());
        if let Ok(mount) = capture::find_cgroup2_mount() {
            assert_eq!(
                default_pin_dir(&mount.join("system.slice/app.service")),
                Path::new(DEFAULT_PIN_ROOT).join("system.slice-app.service")
            );
        }
    }

    #[test]
    fn only_cgroup2_directories_are_attached() {
        let tmp = std::env::temp_dir();
        let err = cgroup2_dir(&tmp).unwrap_err();
        assert!(err.to_string().contains("not a cgroup2 directory"), "{err}");
        assert!(cgroup2_dir(Path::new("/no/such/dir")).is_err());
        if let Ok(mount) = capture::find_cgroup2_mount() {
            assert!(cgroup2_dir(&mount).is_ok());
            assert!(cgroup2_dir(&mount.join("cgroup.procs")).is_err(), "a file");
            let id = fs::metadata(&mount).unwrap().ino();
            assert!(cgroup_exists(&mount, id));
        }
    }
}
