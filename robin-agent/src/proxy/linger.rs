//! Lingering close for intercepted connections (as nginx's `lingering_close`).
//!
//! When hyper ends a connection early — a 431 for an oversized header section, a 400 for bad
//! framing — the client may still be sending. Closing a socket with unread input makes the
//! kernel send RST, which can destroy the error response before the client reads it. Robin keeps
//! a duplicate of the socket's descriptor, so after hyper lets go it can send FIN and discard
//! what the client still sends, for a bounded time and volume.
use std::{os::fd::OwnedFd, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

pub async fn lingering_close(fd: OwnedFd) {
    let std = std::net::TcpStream::from(fd);
    if std.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(mut stream) = TcpStream::from_std(std) else {
        return;
    };
    // FIN after whatever hyper already queued (the error response, TLS close_notify).
    let _ = stream.shutdown().await;
    let mut buf = vec![0u8; 16 * 1024];
    let drain = async {
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}
