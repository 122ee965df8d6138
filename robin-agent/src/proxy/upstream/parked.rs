//! Idle upstream HTTP/1 connections park, as the workload's do ([`crate::proxy::park`]): a
//! pooled connection unused for `park_after` gives up hyper's client connection (its dispatch
//! channel, two buffers and driving task: about 29 KiB) and the pool keeps only its stream. The
//! next checkout makes a new hyper connection on that stream, which costs no I/O.
//!
//! hyper hands the stream back itself: a connection driven with `without_shutdown` ends once
//! every sender is gone and no exchange is open, and returns its I/O and any unread bytes. So
//! parking is dropping the pooled sender; the connection's task then passes the stream on.
use std::os::fd::AsRawFd;

use hyper::{body::Incoming, client::conn};
use hyper_util::rt::TokioIo;
use nix::{
    errno::Errno,
    sys::socket::{MsgFlags, recv},
};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::oneshot};
use tokio_util::either::Either;
use tracing::{Instrument, debug};

use super::UpstreamError;
use crate::capture::OrigDst;
use crate::proxy::park::CLOSE_TIMEOUT;

/// An upstream connection's stream: plain TCP or verified TLS.
pub type UpstreamIo = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// A parked stream, boxed: the channel that brings it back is allocated with every connection,
/// and the TLS stream is 1.1 KiB.
pub type ParkedIo = Box<UpstreamIo>;

/// An HTTP/1 upstream connection: hyper's sender, and where its stream comes back once it is
/// parked (`None`: a connection that may upgrade, which is never parked).
pub struct Http1Conn {
    pub sender: conn::http1::SendRequest<Incoming>,
    handback: Option<oneshot::Receiver<ParkedIo>>,
}

impl Http1Conn {
    /// Where the stream comes back once this connection's sender is dropped; `None` for a
    /// connection that cannot park.
    pub fn take_handback(&mut self) -> Option<oneshot::Receiver<ParkedIo>> {
        self.handback.take()
    }
}

/// hyper's HTTP/1 client connection on `io`, driven by a task of its own. `upgradeable`: for a
/// request asking to upgrade, which hyper hands the stream to (`with_upgrades`); such a
/// connection closes instead of parking.
pub async fn http1(
    dst: OrigDst,
    io: UpstreamIo,
    upgradeable: bool,
) -> Result<Http1Conn, UpstreamError> {
    let (sender, connection) = conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::Handshake(dst, e))?;
    // Not in the dialling request's span: the connection outlives it.
    let span = tracing::debug_span!("upstream", %dst);
    if upgradeable {
        tokio::spawn(
            async move {
                if let Err(e) = connection.with_upgrades().await {
                    debug!(error = %e, "upstream http/1 connection ended");
                }
            }
            .instrument(span),
        );
        return Ok(Http1Conn {
            sender,
            handback: None,
        });
    }
    let (tx, rx) = oneshot::channel();
    // Boxed: the stream keeps this task's waker registered after it moved on to the pool, and
    // with it the task's allocation; boxed, the connection's state is freed when it ends.
    tokio::spawn(Box::pin(
        async move {
            match connection.without_shutdown().await {
                Ok(parts) if parts.read_buf.is_empty() => {
                    hand_back(tx, Box::new(parts.io.into_inner())).await
                }
                // An HTTP/1 server sends nothing unasked: the stream is not reusable.
                Ok(_) => debug!("upstream sent bytes after its response; closed"),
                Err(e) => debug!(error = %e, "upstream http/1 connection ended"),
            }
        }
        .instrument(span),
    ));
    Ok(Http1Conn {
        sender,
        handback: Some(rx),
    })
}

/// Passes the stream to the pool if it parked this connection; else closes it as hyper would
/// have (a TLS close_notify, then FIN).
async fn hand_back(tx: oneshot::Sender<ParkedIo>, io: ParkedIo) {
    if let Err(mut io) = tx.send(io) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, io.shutdown()).await;
    }
}

/// Whether a parked stream can carry a request: still open, and nothing arrived while it was
/// parked (for HTTP/1 that is the server's close_notify, or bytes nobody asked for). One
/// non-blocking `MSG_PEEK`.
pub fn reusable(io: &ParkedIo) -> bool {
    let tcp = match &**io {
        Either::Left(tcp) => tcp,
        Either::Right(tls) => tls.get_ref().0,
    };
    let mut byte = [0u8; 1];
    let peeked = recv(
        tcp.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    );
    peeked == Err(Errno::EAGAIN)
}
