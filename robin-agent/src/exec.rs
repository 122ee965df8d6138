//! `robin exec -- CMD`: standalone mode. A transient cgroup is created under the cgroup2 mount,
//! CMD is started inside it (same network namespace, untouched environment), its connects are
//! captured and served until it exits, and Robin exits with CMD's status.
use std::{
    ffi::CString,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context as _;
use tokio::sync::watch;

use crate::{
    capture::{self, CaptureSettings, CapturedListener, Capturer, Cgroup, Cgroup2Mount, NetNs},
    config::{self, ConfigArgs},
    conns::{self, Connections},
    proxy::Proxy,
    serve::Served,
};

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The command to run, after `--`.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// Tokio's blocking pool serves only rare work here (token fetches reading a credential file,
/// start-up); the default cap of 512 let a per-request file read grow it to dozens of threads
/// contending on its queue, each with its own stack and malloc arena.
pub const MAX_BLOCKING_THREADS: usize = 8;

/// Parent cgroup for transient ones; created if missing.
const EXEC_CGROUP_PARENT: &str = "robin.exec";

pub fn main(args: ExecArgs) -> anyhow::Result<ExitCode> {
    // Configuration first: a bad file is the most likely mistake and deserves the first word.
    let cfg = config::load(&args.config)?;
    capture::check_capabilities(false).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args, cfg))
}

async fn run(args: ExecArgs, cfg: config::Config) -> anyhow::Result<ExitCode> {
    let proxy = Proxy::new(&cfg).context("starting the proxy")?;
    tracing::info!(config = ?cfg, "effective configuration");
    let nofile = conns::raise_nofile_limit();
    let conns = Connections::for_limit(cfg.capture.max_connections, nofile);
    tokio::spawn(conns::trim_when_load_falls(conns.clone()));
    let mut capturer = Capturer::load().context("loading eBPF capture")?;
    let netns = NetNs::current()?;
    let listener = Arc::new(
        CapturedListener::bind(&netns, cfg.capture.listener_port, capturer.orig_dst_table())
            .context("opening the capture listener")?,
    );
    let cgroup2 = Cgroup2Mount::find_or_mount()?;
    let parent = cgroup2.path().join(EXEC_CGROUP_PARENT);
    if !parent.exists() {
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let cgroup = Cgroup::create(parent.join(format!("exec-{}", std::process::id())))?;
    let settings = CaptureSettings::new(cfg.capture.ports.clone(), listener.ports().port);
    let attachment = capturer.attach(&cgroup, &settings)?;
    tracing::info!(
        cgroup = %cgroup.path().display(),
        listener_port = settings.listener_port,
        ports = ?settings.ports,
        "capturing"
    );

    let served = Served::new(conns.clone());
    // The proxy never changes here; the channel is what `serve` reads it from.
    let (_proxy, proxy_rx) = watch::channel(proxy);
    served.serve(listener, proxy_rx, None, tracing::Span::current());
    let status = spawn_in_cgroup(&args.command, cgroup.path().to_owned())?
        .wait()
        .await
        .context("waiting for the command")?;
    served.drain(DRAIN_TIMEOUT).await;
    // `robin exec` has no metrics endpoint: the cap's effect goes in the last log record.
    tracing::info!(
        shed = conns.shed_total(),
        max_connections = conns.cap(),
        "connections shed at the connection cap"
    );
    for (reason, n) in capturer.refused_connects().snapshot() {
        if n > 0 {
            tracing::warn!(
                reason = reason.label(),
                refused = n,
                "captured connects refused in the kernel"
            );
        }
    }
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
