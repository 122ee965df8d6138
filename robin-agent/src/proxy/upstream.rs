//! The upstream side of an intercepted connection: dial the original destination IP (never
//! re-resolve), verify its certificate for the workload's SNI, and keep the resulting HTTP
//! connection for the downstream connection's lifetime.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hyper::{Request, Response, body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::Mutex,
};
use tracing::{Instrument, debug};

use crate::{
    capture::{NetNs, OrigDst},
    tls::{UpstreamTls, upstream::Alpn},
};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(OrigDst, #[source] std::io::Error),
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(OrigDst),
    #[error("invalid server name {0:?}")]
    ServerName(String),
    #[error("tls with {0}: {1}")]
    Tls(OrigDst, #[source] std::io::Error),
    #[error("http handshake with {0}: {1}")]
    Handshake(OrigDst, #[source] hyper::Error),
    #[error("sending request: {0}")]
    Send(#[source] hyper::Error),
    #[error("{0} (shared with requests that were waiting for that dial)")]
    Shared(String),
}

impl UpstreamError {
    /// The request failed because reading the workload's request body failed.
    pub fn is_request_body(&self) -> bool {
        match self {
            // hyper reports a failing request body as a user error (`User(Body)`).
            Self::Send(e) => e.is_user(),
            _ => false,
        }
    }
}

/// Where upstream sockets are created. `InNetNs`: inside the workload's network namespace, so
/// its connections leave with the workload's address (node mode); only the socket creation
/// happens in the namespace, the connect runs outside the closure.
#[derive(Clone, Debug, Default)]
pub enum Dialer {
    #[default]
    Host,
    InNetNs(Arc<NetNs>),
}

impl Dialer {
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        match self {
            Self::Host => TcpStream::connect(addr).await,
            Self::InNetNs(netns) => {
                let socket = netns
                    .run(|| {
                        if addr.is_ipv4() {
                            TcpSocket::new_v4()
                        } else {
                            TcpSocket::new_v6()
                        }
                    })
                    .map_err(std::io::Error::other)??;
                socket.connect(addr).await
            }
        }
    }
}

/// HTTP version spoken upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    H2,
}

/// How to reach the upstream of one downstream connection.
#[derive(Clone, Debug)]
pub struct Target {
    pub dst: OrigDst,
    /// `Some(sni)` for TLS upstreams.
    pub tls_name: Option<String>,
    /// What the workload negotiated with us; decides the ALPN offered upstream.
    pub alpn: Alpn,
    pub connect_timeout: Duration,
    pub dialer: Dialer,
}

enum Sender {
    Http1(conn::http1::SendRequest<Incoming>),
    H2(conn::http2::SendRequest<Incoming>),
}

#[derive(Default)]
struct Pool {
    h2: Option<conn::http2::SendRequest<Incoming>>,
    /// Idle HTTP/1 connections (usually at most one: downstream HTTP/1 is sequential).
    http1: Vec<conn::http1::SendRequest<Incoming>>,
    /// When and why the last dial failed.
    failed: Option<(Instant, String)>,
}

/// One per downstream connection. The lock is held across a dial so concurrent h2 streams
/// share a single upstream connection instead of racing to open one each.
pub struct Upstream {
    target: Target,
    tls: UpstreamTls,
    pool: Mutex<Pool>,
}

/// A connection checked out for one request.
pub struct Checkout {
    sender: Sender,
}

impl Checkout {
    pub fn proto(&self) -> Proto {
        match self.sender {
            Sender::Http1(_) => Proto::Http1,
            Sender::H2(_) => Proto::H2,
        }
    }
}

impl Upstream {
    pub fn new(target: Target, tls: UpstreamTls) -> Self {
        Self {
            target,
            tls,
            pool: Mutex::new(Pool::default()),
        }
    }

    /// A ready connection: a pooled one if alive, else exactly one dial.
    pub async fn checkout(&self) -> Result<Checkout, UpstreamError> {
        let asked = Instant::now();
        let mut pool = self.pool.lock().await;
        // Requests queued behind a dial that failed share its outcome instead of each waiting
        // out its own connect timeout against a dead destination.
        if let Some((at, why)) = &pool.failed
            && *at >= asked
        {
            return Err(UpstreamError::Shared(why.clone()));
        }
        if let Some(h2) = &pool.h2 {
            if !h2.is_closed() {
                return Ok(Checkout {
                    sender: Sender::H2(h2.clone()),
                });
            }
            pool.h2 = None;
        }
        // Bounded by the pool size; dead connections are dropped, nothing was sent on them.
        while let Some(mut s) = pool.http1.pop() {
            if s.ready().await.is_ok() {
                return Ok(Checkout {
                    sender: Sender::Http1(s),
                });
            }
        }
        let sender = match self.dial().await {
            Ok(s) => s,
            Err(e) => {
                pool.failed = Some((Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        if let Sender::H2(h2) = &sender {
            pool.h2 = Some(h2.clone());
        }
        Ok(Checkout { sender })
    }

    /// Sends on a checked-out connection; an HTTP/1 connection goes back to the pool unless
    /// the response upgraded it.
    pub async fn send(
        &self,
        checkout: Checkout,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match checkout.sender {
            Sender::H2(mut s) => s.send_request(req).await.map_err(UpstreamError::Send),
            Sender::Http1(mut s) => {
                let resp = s.send_request(req).await.map_err(UpstreamError::Send)?;
                if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS && !s.is_closed() {
                    self.pool.lock().await.http1.push(s);
                }
                Ok(resp)
            }
        }
    }

    async fn dial(&self) -> Result<Sender, UpstreamError> {
        let t = &self.target;
        let tcp = tokio::time::timeout(t.connect_timeout, t.dialer.connect(t.dst.0))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(t.dst))?
            .map_err(|e| UpstreamError::Connect(t.dst, e))?;
        let _ = tcp.set_nodelay(true);
        match &t.tls_name {
            None => self.http1(TokioIo::new(tcp)).await,
            Some(name) => {
                let server_name = ServerName::try_from(name.clone())
                    .map_err(|_| UpstreamError::ServerName(name.clone()))?;
                let connector = tokio_rustls::TlsConnector::from(self.tls.config(t.alpn));
                // The handshake verifies the chain and name; on failure nothing is sent.
                let tls =
                    tokio::time::timeout(t.connect_timeout, connector.connect(server_name, tcp))
                        .await
                        .map_err(|_| UpstreamError::ConnectTimeout(t.dst))?
                        .map_err(|e| UpstreamError::Tls(t.dst, e))?;
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                debug!(
                    upstream_alpn = if h2 { "h2" } else { "http/1.1" },
                    "upstream tls established"
                );
                if h2 {
                    self.h2(TokioIo::new(tls)).await
                } else {
                    self.http1(TokioIo::new(tls)).await
                }
            }
        }
    }

    async fn http1<T>(&self, io: TokioIo<T>) -> Result<Sender, UpstreamError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Handshake(self.target.dst, e))?;
        tokio::spawn(
            async move {
                if let Err(e) = connection.with_upgrades().await {
                    debug!(error = %e, "upstream http/1 connection ended");
                }
            }
            .in_current_span(),
        );
        Ok(Sender::Http1(sender))
    }

    async fn h2<T>(&self, io: TokioIo<T>) -> Result<Sender, UpstreamError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Handshake(self.target.dst, e))?;
        tokio::spawn(
            async move {
                if let Err(e) = connection.await {
                    debug!(error = %e, "upstream h2 connection ended");
                }
            }
            .in_current_span(),
        );
        Ok(Sender::H2(sender))
    }
}
