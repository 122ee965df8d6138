//! Lingering close for intercepted connections (as nginx's `lingering_close`).
//!
//! When hyper ends a connection early — a 431 for an oversized header section, a 400 for bad
//! framing — the client may still be sending. Closing a socket with unread input makes the
//! kernel send RST, which can destroy the error response before the client reads it. hyper gets
//! the socket wrapped in a [`Handback`], which returns it instead of closing it when hyper lets
//! go; Robin can then send FIN and discard what the client still sends, for a bounded time and
//! volume. One descriptor per client connection, never a duplicate.
use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

type Slot = Arc<Mutex<Option<TcpStream>>>;

/// The client socket as hyper sees it; dropped, it hands the socket to its [`Returned`].
pub struct Handback {
    stream: Option<TcpStream>,
    slot: Slot,
}

/// Where a [`Handback`]'s socket lands. If this is dropped first (an upgraded connection
/// outlives the request handling), the socket is simply closed when the `Handback` goes.
pub struct Returned(Slot);

impl Handback {
    pub fn new(stream: TcpStream) -> (Self, Returned) {
        let slot = Slot::default();
        (
            Self {
                stream: Some(stream),
                slot: slot.clone(),
            },
            Returned(slot),
        )
    }

    fn stream(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        Pin::new(
            self.get_mut()
                .stream
                .as_mut()
                .expect("the stream leaves only on drop"),
        )
    }
}

impl Drop for Handback {
    fn drop(&mut self) {
        if let (Some(stream), Ok(mut slot)) = (self.stream.take(), self.slot.lock()) {
            *slot = Some(stream);
        }
    }
}

impl Returned {
    /// The socket, once whoever held it has dropped it.
    pub fn take(self) -> Option<TcpStream> {
        self.0.lock().ok()?.take()
    }
}

impl AsyncRead for Handback {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Handback {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

pub async fn lingering_close(mut stream: TcpStream) {
    // FIN after whatever hyper already queued (the error response, TLS close_notify).
    let _ = stream.shutdown().await;
    let mut buf = vec![0u8; 4 * 1024];
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
