//! `robin exec -- CMD`: standalone mode. A transient cgroup is created under the cgroup2 mount,
//! CMD is started inside it (same network namespace, untouched environment), its connects are
//! captured and served until it exits, and Robin exits with CMD's status.
use std::{
    ffi::CString,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;

use crate::{
    capture::{self, CaptureSettings, Capturer, Cgroup, Cgroup2Mount},
    config::{self, ConfigArgs},
    standalone::{self, Serving},
};

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The command to run, after `--`.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// Parent cgroup for transient ones; created if missing.
const EXEC_CGROUP_PARENT: &str = "robin.exec";

pub fn main(args: ExecArgs) -> anyhow::Result<ExitCode> {
    // Configuration first: a bad file is the most likely mistake and deserves the first word.
    let cfg = config::load(&args.config)?;
    capture::check_capabilities(false).map_err(anyhow::Error::msg)?;
    standalone::runtime()?.block_on(run(args, cfg))
}

async fn run(args: ExecArgs, cfg: config::Config) -> anyhow::Result<ExitCode> {
    let mut capturer = Capturer::load().context("loading eBPF capture")?;
    let serving = Serving::start(&cfg, &capturer)?;
    let cgroup2 = Cgroup2Mount::find_or_mount()?;
    let parent = cgroup2.path().join(EXEC_CGROUP_PARENT);
    if !parent.exists() {
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let cgroup = Cgroup::create_own(parent.join(format!("exec-{}", std::process::id())))?;
    let settings = CaptureSettings::new(cfg.capture.ports.clone(), serving.listener_port());
    let attachment = capturer.attach(&cgroup, &settings)?;
    tracing::info!(
        cgroup = %cgroup.path().display(),
        listener_port = settings.listener_port,
        ports = ?settings.ports,
        "capturing"
    );

    let status = spawn_in_cgroup(&args.command, cgroup.path().to_owned())?
        .wait()
        .await
        .context("waiting for the command")?;
    serving.finish(&capturer, DRAIN_TIMEOUT).await;
    capturer.detach(attachment);
    drop(cgroup);
    drop(cgroup2);
    Ok(exit_code(status))
}

/// Longest wait, once CMD has exited, for its connections to finish (and be logged).
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts `command` already inside `cgroup`: the child moves itself between fork and exec, so
/// not one connect happens uncaptured. It also dies with Robin (PDEATHSIG): a workload must never
/// outlive its interceptor and keep running uncaptured.
fn spawn_in_cgroup(command: &[String], cgroup: PathBuf) -> anyhow::Result<tokio::process::Child> {
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .context("cgroup path")?;
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    // SAFETY: only async-signal-safe calls (open, write, close, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", command[0]))
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => ExitCode::from(128u8.wrapping_add(signal as u8)),
        _ => ExitCode::FAILURE,
    }
}
