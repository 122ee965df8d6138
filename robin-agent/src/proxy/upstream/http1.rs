//! An upstream HTTP/1 connection, driven by whoever holds it rather than by a task of its own.
//!
//! hyper's client splits a connection into a sender and a `Connection` future that does the
//! I/O, usually spawned. Spawned, every request crosses two tasks: the sender queues it and wakes
//! the connection's task, which writes it, reads the response and wakes the request's task
//! through a oneshot, and every response chunk crosses a channel again. Robin holds an HTTP/1
//! connection either in one request (a request never shares it) or idle in its worker's pool,
//! so the `Connection` lives next to its sender and is polled by its holder: by the request's
//! task while the request is sent ([`Http1Conn::send`]), by the response body's polls while the
//! body is read (`UpstreamBody`), and without a waker by the pool when it takes, returns or
//! sweeps the connection ([`Http1Conn::settle`]). Nothing watches an idle connection in between:
//! an upstream's close is seen at the next checkout or sweep (`Limits::park_after`, 1 s), and a
//! request that went out on a connection found closed then is handed back unsent, as hyper
//! guarantees (`Upstream::send`).
//!
//! A connection made for a request asking to upgrade is the exception: hyper hands its upgraded
//! stream to the tunnel only from a `with_upgrades` connection, which runs in a task of its own.
use std::{
    future::{Future, poll_fn},
    pin::{Pin, pin},
    task::{Context, Poll, Waker},
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{self, TrySendError},
};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tracing::{Instrument, debug};

use super::{
    UpstreamError,
    parked::{ParkedIo, UpstreamIo},
};
use crate::capture::OrigDst;

type Connection = conn::http1::Connection<TokioIo<UpstreamIo>, Incoming>;

enum Driver {
    /// Polled by the connection's holder. Boxed: the pool moves connections, and hyper's
    /// dispatcher is about 1 KiB.
    Inline(Box<Connection>),
    /// `with_upgrades`, in a task of its own; never parks.
    Task,
    /// hyper ended it: the upstream closed, an error, or a 101 nobody asked for.
    Ended,
}

/// hyper's sender and, unless a task drives it, its connection.
pub struct Http1Conn {
    sender: conn::http1::SendRequest<Incoming>,
    driver: Driver,
}

impl Http1Conn {
    /// hyper's HTTP/1 client connection on `io` (no I/O happens here). `upgradeable`: for a
    /// request asking to upgrade, driven by a task of its own.
    pub async fn handshake(
        dst: OrigDst,
        io: UpstreamIo,
        upgradeable: bool,
    ) -> Result<Self, UpstreamError> {
        let (sender, connection) = conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Handshake(dst, e))?;
        if !upgradeable {
            return Ok(Self {
                sender,
                driver: Driver::Inline(Box::new(connection)),
            });
        }
        // Not in the dialling request's span: the connection outlives it.
        let span = tracing::debug_span!("upstream", %dst);
        tokio::spawn(
            async move {
                if let Err(e) = connection.with_upgrades().await {
                    debug!(error = %e, "upstream http/1 connection ended");
                }
            }
            .instrument(span),
        );
        Ok(Self {
            sender,
            driver: Driver::Task,
        })
    }

    /// Lets hyper write, read and hand over what it read; `Ready` once the connection ended.
    /// An ended connection is closed here, and dropping hyper's part of it answers a request it
    /// still held: with the request itself when it never wrote it.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Driver::Inline(connection) = &mut self.driver else {
            return match self.driver {
                Driver::Ended => Poll::Ready(()),
                _ => Poll::Pending,
            };
        };
        let res = std::task::ready!(connection.poll_without_shutdown(cx));
        if let Err(e) = res {
            debug!(error = %e, "upstream http/1 connection ended");
        }
        self.end();
        Poll::Ready(())
    }

    /// Whether it can take a request now, after driving it once without a waker: that finishes
    /// an exchange whose response was read to its end, notices an upstream's close, and leaves
    /// no task's waker registered on an idle stream (it would keep that task's memory alive).
    pub fn settle(&mut self) -> bool {
        let _ = self.drive(&mut Context::from_waker(Waker::noop()));
        !self.has_ended() && self.sender.is_ready()
    }

    /// Whether hyper ended it: it can never take another request.
    pub fn has_ended(&self) -> bool {
        matches!(self.driver, Driver::Ended)
    }

    /// Drives it until it can take another request (`true`) or ends.
    pub async fn ready(&mut self) -> bool {
        poll_fn(|cx| {
            if self.drive(cx).is_ready() {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }

    /// Sends `req` and drives the connection until its response head arrives. hyper hands the
    /// request back (`TrySendError::take_message`) only when it never wrote a byte of it.
    pub async fn send(
        &mut self,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Incoming>>> {
        let mut response = pin!(self.sender.try_send_request(req));
        poll_fn(|cx| {
            if let Poll::Ready(res) = response.as_mut().poll(cx) {
                return Poll::Ready(res);
            }
            // Whether it progressed or ended, the response future may now have hyper's answer.
            let _ = self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }

    /// Whether [`Self::park`] can keep its stream.
    pub fn can_park(&self) -> bool {
        matches!(self.driver, Driver::Inline(_))
    }

    /// Ends hyper's connection and keeps only the stream (`None`: it cannot park, or the upstream
    /// sent bytes nobody asked for, which an HTTP/1 server never does on a healthy connection).
    pub fn park(mut self) -> Option<ParkedIo> {
        let Driver::Inline(connection) = std::mem::replace(&mut self.driver, Driver::Ended) else {
            return None;
        };
        let parts = connection.into_parts();
        if !parts.read_buf.is_empty() {
            debug!("upstream sent bytes after its response; closed");
            close(parts.io.into_inner());
            return None;
        }
        Some(Box::new(parts.io.into_inner()))
    }

    fn end(&mut self) {
        if let Driver::Inline(connection) = std::mem::replace(&mut self.driver, Driver::Ended) {
            close(connection.into_parts().io.into_inner());
        }
    }
}

impl Drop for Http1Conn {
    fn drop(&mut self) {
        self.end();
    }
}

/// Closes a stream as hyper would have, without waiting: TLS's close_notify and the FIN are
/// written if the socket takes them now; the socket is closed either way.
fn close(mut io: UpstreamIo) {
    let _ = Pin::new(&mut io).poll_shutdown(&mut Context::from_waker(Waker::noop()));
}
