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

use crate::capture::{self, CaptureSettings, CapturedListener, Capturer, Cgroup, NetNs};

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// TCP destination ports to capture.
    #[arg(long = "capture-port", env = "ROBIN_CAPTURE_PORTS", value_delimiter = ',', default_values_t = [80u16, 443])]
    pub capture_ports: Vec<u16>,
    /// Listener port on 127.0.0.1/::1 (0 picks a free one).
    #[arg(long, env = "ROBIN_LISTENER_PORT", default_value_t = 0)]
    pub listener_port: u16,
    /// The command to run, after `--`.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// Parent cgroup for transient ones; created if missing.
const EXEC_CGROUP_PARENT: &str = "robin.exec";

pub fn main(args: ExecArgs) -> anyhow::Result<ExitCode> {
    capture::check_capabilities(false).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let mut capturer = Capturer::load().context("loading eBPF capture")?;
    let netns = NetNs::current()?;
    let listener = Arc::new(
        CapturedListener::bind(&netns, args.listener_port, capturer.orig_dst_table())
            .context("opening the capture listener")?,
    );
    let root = capture::find_cgroup2_mount()?;
    let parent = root.join(EXEC_CGROUP_PARENT);
    if !parent.exists() {
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let cgroup = Cgroup::create(parent.join(format!("exec-{}", std::process::id())))?;
    let settings = CaptureSettings::new(args.capture_ports.clone(), listener.ports().port);
    let attachment = capturer.attach(&cgroup, &settings)?;
    tracing::info!(
        cgroup = %cgroup.path().display(),
        listener_port = settings.listener_port,
        ports = ?settings.ports,
        "capturing"
    );

    let serve = tokio::spawn(accept_loop(listener.clone()));
    let status = spawn_in_cgroup(&args.command, cgroup.path().to_owned())?
        .wait()
        .await
        .context("waiting for the command")?;
    serve.abort();
    capturer.detach(attachment);
    drop(cgroup);
    Ok(exit_code(status))
}

async fn accept_loop(listener: Arc<CapturedListener>) {
    loop {
        match listener.accept().await {
            Ok((stream, orig, client)) => {
                tokio::spawn(async move {
                    match tokio::net::TcpStream::connect(orig.0).await {
                        Ok(mut upstream) => {
                            let mut stream = stream;
                            let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
                        }
                        Err(e) => {
                            tracing::warn!(%orig, %client, error = %e, "upstream connect failed")
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

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
