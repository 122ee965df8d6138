//! `robin await`: run as a pod's init container, returns once the node agent captures the pod,
//! so the application containers never start uncaptured.
//!
//! The probe is a connect to `192.0.2.1:PORT` (TEST-NET-1, RFC 5737: never a real destination)
//! on a captured port. Once the pod is captured the kernel redirects it to the agent's listener
//! in the pod, and the agent answers [`PROBE_ANSWER`] instead of proxying. Before that the
//! connect fails or times out, and the probe is retried until the deadline.
//!
//! Exit status: `0` captured, `1` not captured within `--timeout-secs`, `2` bad arguments.
use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

pub const PROBE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
pub const PROBE_ANSWER: &[u8] = b"robin: captured\n";
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
const RETRY_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum AwaitError {
    #[error(
        "the pod was not captured within {0:?} (is robin node running on this node, and the pod annotated robin.dev/inject: \"true\"?)"
    )]
    Timeout(Duration),
}

#[derive(clap::Args, Debug)]
pub struct AwaitArgs {
    /// A port the pod's capture covers (robin.dev/capture-ports, default 80 and 443).
    #[arg(long, default_value_t = 443)]
    pub port: u16,
    /// Give up (and fail the init container) after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// One probe: `true` when the agent answered for this pod.
pub fn probe(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(PROBE_IP, port), ATTEMPT_TIMEOUT)
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(ATTEMPT_TIMEOUT * 4));
    let mut buf = [0u8; 32];
    let mut got = 0;
    while got < PROBE_ANSWER.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    &buf[..got] == PROBE_ANSWER
}

pub fn wait(args: &AwaitArgs) -> Result<(), AwaitError> {
    let limit = Duration::from_secs(args.timeout_secs);
    let deadline = Instant::now() + limit;
    loop {
        if probe(args.port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(AwaitError::Timeout(limit));
        }
        std::thread::sleep(RETRY_EVERY);
    }
}

/// Exit status when the pod was not captured in time (the kubelet then restarts the init
/// container). `0`: captured; `2`: bad arguments (from the argument parser).
pub const EXIT_NOT_CAPTURED: u8 = 1;

pub fn main(args: AwaitArgs) -> anyhow::Result<ExitCode> {
    match wait(&args) {
        Ok(()) => {
            tracing::info!(port = args.port, "pod captured");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            tracing::error!(port = args.port, "{e}");
            Ok(ExitCode::from(EXIT_NOT_CAPTURED))
        }
    }
}
