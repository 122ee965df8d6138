//! Idle upstream HTTP/1 connections park, as the workload's do ([`crate::proxy::park`]): a
//! pooled connection unused for `park_after` gives up hyper's client connection (its dispatch
//! channel and two buffers, about 29 KiB; `Http1Conn::park`) and the pool keeps only its stream.
//! The next checkout makes a new hyper connection on that stream, which costs no I/O.
use std::os::fd::AsRawFd;

use nix::{
    errno::Errno,
    sys::socket::{MsgFlags, recv},
};
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// An upstream connection's stream: plain TCP or verified TLS.
pub type UpstreamIo = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// A parked stream, boxed: the TLS stream is 1.1 KiB, and the pool moves its entries.
pub type ParkedIo = Box<UpstreamIo>;

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
