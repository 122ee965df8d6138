//! The downstream socket with the sniffed bytes replayed in front of it, counting bytes in each
//! direction for the connection log.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from (`up`) and written to (`down`) the workload.
#[derive(Debug, Default)]
pub struct ByteCounts {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

pub struct Rewind<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
    counts: Arc<ByteCounts>,
}

impl<T> Rewind<T> {
    /// `prefix` was already read from `inner` (and counted by the caller if wanted).
    pub fn new(prefix: Vec<u8>, inner: T, counts: Arc<ByteCounts>) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
            counts,
        }
    }

    /// The bytes still to be replayed.
    pub fn unread_prefix(&self) -> &[u8] {
        &self.prefix[self.pos..]
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        this.counts.up.fetch_add(n as u64, Ordering::Relaxed);
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = res {
            self.counts.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.counts.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn replays_prefix_then_reads_inner_and_counts() {
        let (mut a, b) = tokio::io::duplex(64);
        let counts = Arc::new(ByteCounts::default());
        let mut r = Rewind::new(b"hello ".to_vec(), b, counts.clone());
        a.write_all(b"world").await.unwrap();
        drop(a);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
        assert_eq!(counts.up.load(Ordering::Relaxed), 5);
    }
}
