//! Passthrough: the sniffed bytes and everything after them go to the original destination
//! untouched, never decrypted.
//!
//! The bytes never enter userspace: each direction moves socket → pipe → socket with
//! `splice(2)` (how HAProxy and Envoy's raw-buffer splice path relay), so a bulk download costs
//! no copy through Robin's memory and no per-connection buffer in its heap. A connection that
//! cannot get its pipes (descriptor limit) is relayed through userspace buffers instead.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::Duration,
};

use nix::{
    fcntl::{OFlag, SpliceFFlags},
    sys::socket::{Shutdown, shutdown},
};
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::TcpStream,
};

use super::upstream::Dialer;
use crate::capture::OrigDst;

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("connecting to {0}: {1}")]
    Connect(OrigDst, #[source] std::io::Error),
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(OrigDst),
    #[error("relaying: {0}")]
    Io(#[source] std::io::Error),
}

/// Returns bytes sent upstream (including `prefix`) and bytes sent back to the workload.
pub async fn splice(
    mut down: TcpStream,
    prefix: &[u8],
    dst: OrigDst,
    connect_timeout: Duration,
    dialer: &Dialer,
) -> Result<(u64, u64), SpliceError> {
    let mut up = tokio::time::timeout(connect_timeout, dialer.connect(dst.0))
        .await
        .map_err(|_| SpliceError::ConnectTimeout(dst))?
        .map_err(|e| SpliceError::Connect(dst, e))?;
    let _ = up.set_nodelay(true);
    up.write_all(prefix).await.map_err(SpliceError::Io)?;
    let (sent, received) = relay(&mut down, &mut up).await.map_err(SpliceError::Io)?;
    Ok((sent + prefix.len() as u64, received))
}

/// Both directions until each has seen EOF (half-closing the other side as it does), like
/// `tokio::io::copy_bidirectional`.
async fn relay(down: &mut TcpStream, up: &mut TcpStream) -> io::Result<(u64, u64)> {
    match (Pipe::new(), Pipe::new()) {
        (Ok(to_up), Ok(to_down)) => {
            let (down, up) = (&*down, &*up);
            tokio::try_join!(pump(down, up, &to_up), pump(up, down, &to_down))
        }
        _ => tokio::io::copy_bidirectional(down, up).await,
    }
}

/// A kernel pipe: the buffer a direction's bytes pass through (pages, not Robin's heap).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Self { read, write })
    }
}

/// Most bytes moved per `splice` call: a default pipe's capacity.
const CHUNK: usize = 64 * 1024;

/// `from` → `to` through `pipe` until `from` reaches EOF; then half-closes `to`.
async fn pump(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let filled = move_ready(from, Interest::READABLE, from.as_fd(), &pipe.write, CHUNK).await?;
        if filled == 0 {
            // Ignored: the peer may have gone already; the other direction reports that.
            let _ = shutdown(to.as_raw_fd(), Shutdown::Write);
            return Ok(total);
        }
        let mut left = filled;
        while left > 0 {
            left -= move_ready(to, Interest::WRITABLE, &pipe.read, to.as_fd(), left).await?;
        }
        total += filled as u64;
    }
}

/// One `splice` from `src` to `dst` as soon as `socket` is ready for `interest`; 0 means EOF.
async fn move_ready(
    socket: &TcpStream,
    interest: Interest,
    src: impl AsFd,
    dst: impl AsFd,
    len: usize,
) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        socket.ready(interest).await?;
        // `try_io` clears the readiness on EAGAIN, so the next `ready` waits for the kernel.
        match socket.try_io(interest, || {
            nix::fcntl::splice(&src, None, &dst, None, len, flags).map_err(io::Error::from)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Several MiB each way, byte for byte, with the half-close passed on in both directions:
    /// the upstream answers only after the workload's EOF, and the workload sees the upstream's.
    #[tokio::test]
    async fn relays_both_ways_through_pipes_and_passes_half_closes_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut workload, mut down) = pair(&listener).await;
        let (mut up, mut upstream) = pair(&listener).await;
        let (request, answer) = (pattern(3 << 20, 7), pattern(5 << 20, 91));
        let relayed = tokio::spawn(async move { relay(&mut down, &mut up).await });
        let (req, ans) = (request.clone(), answer.clone());
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            upstream.write_all(&ans).await.unwrap();
            upstream.shutdown().await.unwrap();
            got == req
        });
        workload.write_all(&request).await.unwrap();
        workload.shutdown().await.unwrap();
        let mut back = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), workload.read_to_end(&mut back));
        read.await.expect("the relay finishes").unwrap();
        assert!(
            server.await.unwrap(),
            "the upstream got the request byte for byte"
        );
        assert!(back == answer, "the workload got the answer byte for byte");
        let (sent, received) = relayed.await.unwrap().unwrap();
        assert_eq!(
            (sent, received),
            (request.len() as u64, answer.len() as u64)
        );
    }
}
