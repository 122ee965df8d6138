//! Serving capture listeners, the same for `robin exec` and every pod of `robin node`: accept,
//! admit under the connection cap, hand the connection to the listener's current proxy on one of
//! the [`Workers`]; on shutdown stop every accept loop and wait, bounded, for the connections in
//! flight.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use futures_util::FutureExt as _;
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::{
    capture::CapturedListener,
    conns::{Admitted, Connections},
    proxy::Proxy,
    workers::{Movable, Workers},
};

/// A connect the agent answers itself instead of proxying it (`robin await` asking whether its
/// pod is captured).
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub ip: IpAddr,
    pub answer: &'static [u8],
}

/// A listener [`Served::serve_listener`] drives: TCP or a Unix socket.
pub trait Listener: Send + 'static {
    type Conn: Movable;
    type Peer: Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Conn, Self::Peer)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    type Peer = SocketAddr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Conn, Self::Peer)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Listener for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Conn, Self::Peer)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

/// Every accept loop and connection task of the process, so one drain covers them all.
#[derive(Clone)]
pub struct Served {
    conns: Arc<Connections>,
    workers: Arc<Workers>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Served {
    /// Starts the worker runtimes the connections are served on.
    pub fn new(conns: Arc<Connections>) -> anyhow::Result<Self> {
        Ok(Self {
            conns,
            workers: Arc::new(Workers::start()?),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.conns
    }

    /// Serves `listener` in its own task (inside `span`) until the returned token or the drain
    /// stops it; the listener closes when the loop ends. Each connection is served by the proxy
    /// `proxy` holds when it is accepted, so a new proxy applies to new connections only.
    pub fn serve(
        &self,
        listener: Arc<CapturedListener>,
        proxy: watch::Receiver<Proxy>,
        probe: Option<Probe>,
        span: tracing::Span,
    ) -> CancellationToken {
        let stop = self.stop.child_token();
        let this = self.clone();
        // On the tracker too, so a finished drain means every listener is closed.
        self.tasks.spawn(
            this.accept_loop(listener, proxy, probe, stop.clone())
                .instrument(span),
        );
        stop
    }

    async fn accept_loop(
        self,
        listener: Arc<CapturedListener>,
        proxy: watch::Receiver<Proxy>,
        probe: Option<Probe>,
        stop: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, orig, client)) => {
                    if let Some(p) = probe.filter(|p| p.ip == orig.0.ip()) {
                        self.tasks.spawn(answer(stream, p.answer));
                        continue;
                    }
                    let Some(conn) = self.conns.admit() else {
                        continue;
                    };
                    let proxy = proxy.borrow().clone();
                    let tracked = self.tasks.token();
                    self.workers.serve(stream, move |stream| {
                        let served = proxy.serve_admitted(stream, orig, client, conn);
                        served.map(move |()| drop(tracked))
                    });
                }
                Err(e) => self.conns.accept_failed(&e).await,
            }
        }
    }

    /// Serves a plain listener (`robin gateway`, `robin proxy`) in its own task until the
    /// drain: each connection admitted under the cap goes to `handle` with its peer's address.
    pub fn serve_listener<L, H, F>(&self, listener: L, handle: H, span: tracing::Span)
    where
        L: Listener,
        H: Fn(L::Conn, L::Peer, Admitted) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        let handle = Arc::new(handle);
        let stop = self.stop.child_token();
        let accept_loop = async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        if let Some(conn) = this.conns.admit() {
                            let (handle, tracked) = (handle.clone(), this.tasks.token());
                            this.workers.serve(stream, move |stream| async move {
                                handle(stream, peer, conn).await;
                                drop(tracked);
                            });
                        }
                    }
                    Err(e) => this.conns.accept_failed(&e).await,
                }
            }
        };
        self.tasks.spawn(accept_loop.instrument(span));
    }

    /// Cancelled when the drain begins: a connection that can end gracefully (an HTTP server
    /// connection between requests) watches it.
    pub fn draining(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// Stops every accept loop (their listeners close), then waits up to `timeout` for the
    /// connections in flight; returns how many were still open.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(timeout, self.tasks.wait()).await;
        self.tasks.len()
    }
}

async fn answer(mut stream: tokio::net::TcpStream, answer: &'static [u8]) {
    use tokio::io::AsyncWriteExt as _;
    let _ = stream.write_all(answer).await;
    let _ = stream.shutdown().await;
}

/// SIGTERM (the kubelet) or SIGINT (a terminal), for the modes that stop on either (webhook,
/// OIDC gateway).
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn drain_waits_for_tasks_and_counts_the_rest() {
        let served = Served::new(Connections::new(4)).unwrap();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        served.tasks.spawn(async move {
            let _ = done_rx.await;
        });
        served.tasks.spawn(std::future::pending::<()>());
        let drain = served.drain(Duration::from_secs(5));
        tokio::pin!(drain);
        // The first task finishes during the drain, the second never does.
        tokio::select! {
            _ = &mut drain => panic!("drained with tasks in flight"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let _ = done_tx.send(());
        assert_eq!(drain.await, 1);
        assert!(served.stop.is_cancelled());
    }
}
