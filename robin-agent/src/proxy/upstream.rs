//! The upstream side of an intercepted connection: dial the original destination IP (never
//! re-resolve), verify its certificate for the workload's SNI, and reuse the resulting HTTP
//! connections across the proxy's downstream connections.
//!
//! The [`Pool`] is per proxy, and a proxy serves one identity context (one `robin exec`, one pod
//! in node mode). Connections are keyed by everything that decides where a token may go: the
//! original destination address, the verified server name (or none, for plain HTTP) and the
//! ALPN offered. A pooled connection is therefore only ever handed to a request for the very
//! destination and name it was dialled and verified for. HTTP/1 connections return to the pool
//! once their response is complete; an h2 connection is shared by the requests of its key, up to
//! [`H2_STREAMS_PER_CONN`] at a time.
//!
//! The pool is sharded by worker runtime ([`crate::workers`]), as Envoy's pools are per worker
//! thread: a request only ever uses upstream connections driven by its own worker, so it never
//! waits on another thread. The idle limits are the process's, split evenly between the shards
//! (nginx's `keepalive` is per worker process instead), so the memory they bound does not grow
//! with the number of workers.
//!
//! An HTTP/1 connection is driven by the task that uses it ([`http1`]): the request's, while it
//! is checked out; none while it is idle. Idle in the pool for [`PoolLimits::park_after`], it
//! parks ([`parked`]): the pool keeps its stream and drops hyper's connection until the next
//! checkout.
mod http1;
mod parked;

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{self, TrySendError},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::either::Either;
use tracing::{Instrument, debug};

use self::http1::Http1Conn;
use self::parked::{ParkedIo, UpstreamIo};
use super::{ProxyStats, h2_limits};
use crate::{
    capture::{NetNs, OrigDst},
    conns::Counted,
    tls::{UpstreamTls, upstream::Alpn},
    workers,
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

/// How to reach the upstream of one downstream connection; also the pool key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub dst: OrigDst,
    /// `Some(sni)` for TLS upstreams: the name the certificate is verified for.
    pub tls_name: Option<String>,
    /// What the workload negotiated with us; decides the ALPN offered upstream.
    pub alpn: Alpn,
}

/// Bounds of the upstream pool.
#[derive(Clone, Debug)]
pub struct PoolLimits {
    /// Idle HTTP/1 connections kept per key; more are closed when their response completes.
    pub idle_per_key: usize,
    /// Idle HTTP/1 connections kept over all keys.
    pub idle_total: usize,
    /// An idle HTTP/1 connection, or an h2 connection nobody checked out, is closed after this.
    pub idle_timeout: Duration,
    /// An idle HTTP/1 connection parks after this (up to twice it): only its stream is kept.
    pub park_after: Duration,
    pub connect_timeout: Duration,
}

/// Open streams per shared h2 connection before another connection is opened for the key: the
/// smallest `SETTINGS_MAX_CONCURRENT_STREAMS` common servers announce (haproxy and Apache 100,
/// nginx 128). Past the server's limit, new requests would queue behind open streams (and a
/// long-lived gRPC or SSE stream can hold its slot indefinitely); several connections also let
/// the runtime's workers share the framing work.
pub const H2_STREAMS_PER_CONN: usize = 100;

enum Sender {
    Http1(Http1Conn),
    /// With its open stream counted until the response body ends or is dropped.
    H2(conn::http2::SendRequest<Incoming>, Counted),
}

/// A shared h2 connection and its open streams.
struct H2Conn {
    sender: conn::http2::SendRequest<Incoming>,
    streams: Arc<AtomicUsize>,
    last_used: Instant,
}

/// An upstream response body. On h2 it holds its stream's slot until it ends; on HTTP/1 it
/// drives its connection while it is read (hyper reads the body as the connection is polled)
/// and returns it to the pool when it ends, from the task that read it.
pub struct UpstreamBody {
    inner: Incoming,
    stream: Option<Counted>,
    release: Option<Release>,
}

impl UpstreamBody {
    fn end(&mut self) {
        self.stream = None;
        if let Some(release) = self.release.take() {
            release.run();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(release) = &mut self.release {
            // An ended connection has handed the body its end or its error.
            let _ = release.conn.drive(cx);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.end(),
            // An error closes the connection: nothing to return.
            Poll::Ready(Some(Err(_))) => {
                self.stream = None;
                self.release = None;
            }
            // hyper stops polling a body that reports its end after its last frame.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.end(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves the response half read: the connection closes.
        if self.inner.is_end_stream() {
            self.end();
        }
    }
}

/// An HTTP/1 connection to return to the pool once its response is complete.
struct Release {
    pool: Arc<Pool>,
    key: Target,
    conn: Http1Conn,
}

impl Release {
    /// Pools the connection at once when it settles ready for the next request (the usual case:
    /// the body's end was the exchange's end); else, while hyper still writes the request body
    /// the upstream answered early, a task drives it until it is ready or closes.
    fn run(self) {
        let Self {
            pool,
            key,
            mut conn,
        } = self;
        if conn.settle() {
            return pool.put(key, conn);
        }
        if conn.has_ended() {
            return;
        }
        // Off any runtime (a body dropped by a test thread) the connection just closes.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = Arc::downgrade(&pool);
        runtime.spawn(async move {
            // Settled again: the stream must not keep this finished task's waker.
            if conn.ready().await
                && conn.settle()
                && let Some(pool) = pool.upgrade()
            {
                pool.put(key, conn);
            }
        });
    }
}

struct Idle {
    conn: IdleConn,
    since: Instant,
}

/// An idle HTTP/1 connection, as the sweep moves it along.
enum IdleConn {
    Live(Http1Conn),
    Parked(ParkedIo),
}

impl IdleConn {
    /// One sweep's step: parks a connection idle for `park_after`. `None`: the connection is
    /// closed (dropping it closes its stream).
    fn swept(self, idle_for: Duration, park_after: Duration, parked: &Counter) -> Option<Self> {
        match self {
            Self::Live(mut c) => {
                if !c.settle() {
                    return None;
                }
                if idle_for < park_after || !c.can_park() {
                    return Some(Self::Live(c));
                }
                let io = c.park()?;
                parked.inc();
                Some(Self::Parked(io))
            }
            Self::Parked(io) => parked::reusable(&io).then_some(Self::Parked(io)),
        }
    }

    /// The connection if it can take a request now.
    fn take(self) -> Option<Pooled> {
        match self {
            Self::Live(mut c) => c.settle().then_some(Pooled::Ready(Sender::Http1(c))),
            Self::Parked(io) => parked::reusable(&io).then_some(Pooled::Parked(io)),
        }
    }
}

/// What the pool hands out: a connection ready for a request, or a parked stream to make one on.
enum Pooled {
    Ready(Sender),
    Parked(ParkedIo),
}

/// Serializes dials that may yield a shared h2 connection; holds when and why the last one
/// failed.
type DialLock = Arc<tokio::sync::Mutex<Option<(Instant, String)>>>;

/// What is pooled for one key.
struct Entry {
    h2: Vec<H2Conn>,
    /// Most recently returned last: reusing the warmest connection makes it the least likely
    /// one to have hit the upstream's own idle timeout.
    idle: Vec<Idle>,
    /// The last dial got http/1.1: dials no longer wait for a would-be shared h2 connection.
    http1_only: bool,
    /// Serializes dials that may yield the shared h2 connection, so concurrent requests make one
    /// connection instead of racing to open one each; holds when and why the last such dial
    /// failed, so requests queued behind it share the outcome instead of each waiting out its
    /// own connect timeout against a dead destination.
    dial: DialLock,
}

impl Entry {
    fn new() -> Self {
        Self {
            h2: Vec::new(),
            idle: Vec::new(),
            http1_only: false,
            dial: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }
}

#[derive(Default)]
struct State {
    keys: HashMap<Target, Entry>,
    idle_total: usize,
    sweeper: bool,
}

/// The proxy's upstream connections. Its locks are never held across an `.await`.
pub struct Pool {
    limits: PoolLimits,
    tls: UpstreamTls,
    dialer: Dialer,
    stats: Arc<ProxyStats>,
    /// One per worker runtime; only that worker's tasks use it, so its lock is uncontended.
    shards: Box<[Mutex<State>]>,
}

impl Pool {
    /// A pool with one shard per worker; `limits` are the process's, split evenly.
    pub fn new(
        limits: PoolLimits,
        tls: UpstreamTls,
        dialer: Dialer,
        stats: Arc<ProxyStats>,
    ) -> Arc<Self> {
        Self::sharded(limits, tls, dialer, stats, workers::count())
    }

    fn sharded(
        mut limits: PoolLimits,
        tls: UpstreamTls,
        dialer: Dialer,
        stats: Arc<ProxyStats>,
        shards: usize,
    ) -> Arc<Self> {
        limits.idle_per_key = limits.idle_per_key.div_ceil(shards);
        limits.idle_total = limits.idle_total.div_ceil(shards);
        Arc::new(Self {
            limits,
            tls,
            dialer,
            stats,
            shards: (0..shards).map(|_| Mutex::default()).collect(),
        })
    }

    /// The calling worker's shard (the first one off the workers: tests, the control runtime).
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        let shard = &self.shards[workers::current().unwrap_or(0) % self.shards.len()];
        // A poisoned lock only means a panic elsewhere; every update leaves the map whole.
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pooled connection for `key` that hyper reports ready, or a parked stream still open.
    fn take(&self, key: &Target) -> Option<Pooled> {
        let mut st = self.state();
        let State {
            keys, idle_total, ..
        } = &mut *st;
        let entry = keys.get_mut(key)?;
        entry.h2.retain(|c| c.sender.is_ready());
        // First fit: load concentrates on the oldest connections, so a spare one goes idle and
        // is closed by the sweep.
        if let Some(c) = entry
            .h2
            .iter_mut()
            .find(|c| c.streams.load(Ordering::Relaxed) < H2_STREAMS_PER_CONN)
        {
            c.last_used = Instant::now();
            return Some(Pooled::Ready(Sender::H2(
                c.sender.clone(),
                Counted::on(&c.streams),
            )));
        }
        // The warmest first.
        while let Some(idle) = entry.idle.pop() {
            *idle_total -= 1;
            if idle.since.elapsed() >= self.limits.idle_timeout {
                continue;
            }
            // Dropping one that cannot serve closes it; nothing is in flight on it.
            if let Some(pooled) = idle.conn.take() {
                return Some(pooled);
            }
        }
        None
    }

    /// The dial lock when a dial for `key` may yield the shared h2 connection.
    fn dial_lock(&self, key: &Target) -> Option<DialLock> {
        if key.alpn != Alpn::H2 {
            return None;
        }
        let mut st = self.state();
        let entry = st.keys.entry(key.clone()).or_insert_with(Entry::new);
        (!entry.http1_only).then(|| entry.dial.clone())
    }

    /// Records what a dial for `key` negotiated; an h2 connection is shared from now on.
    fn dialled(&self, key: &Target, sender: &Sender) {
        let mut st = self.state();
        let entry = st.keys.entry(key.clone()).or_insert_with(Entry::new);
        match sender {
            Sender::H2(h2, stream) => {
                entry.http1_only = false;
                entry.h2.push(H2Conn {
                    sender: h2.clone(),
                    streams: stream.gauge().clone(),
                    last_used: Instant::now(),
                });
            }
            Sender::Http1(_) => entry.http1_only = key.alpn == Alpn::H2,
        }
    }

    fn put(self: &Arc<Self>, key: Target, conn: Http1Conn) {
        let mut st = self.state();
        if st.idle_total >= self.limits.idle_total {
            return;
        }
        let entry = st.keys.entry(key).or_insert_with(Entry::new);
        if entry.idle.len() >= self.limits.idle_per_key {
            return;
        }
        entry.idle.push(Idle {
            conn: IdleConn::Live(conn),
            since: Instant::now(),
        });
        st.idle_total += 1;
        if !st.sweeper {
            st.sweeper = true;
            tokio::spawn(sweep(Arc::downgrade(self), self.limits.sweep_every()));
        }
    }

    /// Closes the calling worker's connections idle past the timeout (or already closed), parks
    /// those idle past `park_after`, and forgets its empty keys; each shard's sweeper runs on
    /// the shard's worker.
    fn sweep(&self) {
        let PoolLimits {
            idle_timeout: timeout,
            park_after,
            ..
        } = self.limits;
        let parked = &self.stats.upstream_parked;
        let mut st = self.state();
        let State {
            keys, idle_total, ..
        } = &mut *st;
        keys.retain(|_, e| {
            let before = e.idle.len();
            // Collected in place: the vector's allocation is reused.
            e.idle = std::mem::take(&mut e.idle)
                .into_iter()
                .filter_map(|Idle { conn, since }| {
                    let idle_for = since.elapsed();
                    if idle_for >= timeout {
                        return None;
                    }
                    let conn = conn.swept(idle_for, park_after, parked)?;
                    Some(Idle { conn, since })
                })
                .collect();
            *idle_total -= before - e.idle.len();
            e.h2.retain(|c| {
                !c.sender.is_closed()
                    && (c.streams.load(Ordering::Relaxed) > 0 || c.last_used.elapsed() < timeout)
            });
            // An entry whose dial lock is held (or waited on) is still in use.
            !e.h2.is_empty() || !e.idle.is_empty() || Arc::strong_count(&e.dial) > 1
        });
    }

    /// A new connection for `t`; `upgradeable` for a request asking to upgrade (see
    /// [`Http1Conn::handshake`]).
    async fn dial(&self, t: &Target, upgradeable: bool) -> Result<Sender, UpstreamError> {
        let timeout = self.limits.connect_timeout;
        let tcp = tokio::time::timeout(timeout, self.dialer.connect(t.dst.0))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(t.dst))?
            .map_err(|e| UpstreamError::Connect(t.dst, e))?;
        let _ = tcp.set_nodelay(true);
        let sender = match &t.tls_name {
            None => http1(t.dst, Either::Left(tcp), upgradeable).await?,
            Some(name) => {
                let server_name = ServerName::try_from(name.clone())
                    .map_err(|_| UpstreamError::ServerName(name.clone()))?;
                let connector = tokio_rustls::TlsConnector::from(self.tls.config(t.alpn));
                // The handshake verifies the chain and name; on failure nothing is sent.
                let tls = tokio::time::timeout(timeout, connector.connect(server_name, tcp))
                    .await
                    .map_err(|_| UpstreamError::ConnectTimeout(t.dst))?
                    .map_err(|e| UpstreamError::Tls(t.dst, e))?;
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                debug!(
                    upstream_alpn = if h2 { "h2" } else { "http/1.1" },
                    "upstream tls established"
                );
                if h2 {
                    h2_handshake(t.dst, TokioIo::new(tls)).await?
                } else {
                    http1(t.dst, Either::Right(tls), upgradeable).await?
                }
            }
        };
        self.stats.upstream_connects.inc();
        Ok(sender)
    }
}

impl PoolLimits {
    /// Often enough to close idle connections within 1.5 timeouts and park within 2 `park_after`s.
    fn sweep_every(&self) -> Duration {
        (self.idle_timeout / 2)
            .min(self.park_after)
            .max(Duration::from_millis(100))
    }
}

async fn sweep(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        // The proxy is gone: so is the pool.
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep();
    }
}

async fn http1(dst: OrigDst, io: UpstreamIo, upgradeable: bool) -> Result<Sender, UpstreamError> {
    Ok(Sender::Http1(
        Http1Conn::handshake(dst, io, upgradeable).await?,
    ))
}

async fn h2_handshake<T>(dst: OrigDst, io: TokioIo<T>) -> Result<Sender, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = conn::http2::Builder::new(super::spawn::SpawnBoxed);
    h2_limits::shared!(
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .max_header_list_size(h2_limits::MAX_HEADER_LIST)
    );
    let (sender, connection) = builder
        .handshake(io)
        .await
        .map_err(|e| UpstreamError::Handshake(dst, e))?;
    tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "upstream h2 connection ended");
            }
        }
        .instrument(tracing::debug_span!("upstream", %dst)),
    );
    Ok(Sender::H2(sender, Counted::on(&Arc::default())))
}

/// One downstream connection's view of the pool: its key.
pub struct Upstream {
    target: Target,
    pool: Arc<Pool>,
}

/// A connection checked out for one request.
pub struct Checkout {
    sender: Sender,
    /// Taken from the pool rather than dialled for this request.
    reused: bool,
}

impl Checkout {
    pub fn proto(&self) -> Proto {
        match self.sender {
            Sender::Http1(_) => Proto::Http1,
            Sender::H2(..) => Proto::H2,
        }
    }
}

/// Why [`Upstream::send`] failed.
pub enum SendError {
    /// The request went out on a pooled connection that turned out closed before hyper wrote
    /// any byte of it; it is handed back untouched (see [`Upstream::send`]).
    Unsent(Box<Request<Incoming>>),
    Failed(UpstreamError),
}

impl Upstream {
    pub fn new(target: Target, pool: Arc<Pool>) -> Self {
        Self { target, pool }
    }

    /// A pooled connection hyper reports ready (or a parked one, given a new hyper
    /// connection), counted as a reuse.
    async fn take_pooled(&self) -> Option<Checkout> {
        let sender = match self.pool.take(&self.target)? {
            Pooled::Ready(sender) => sender,
            // A handshake without I/O: it fails only on a stream it never reads. Boxed, as the
            // dial is: inline it would size every request's future.
            Pooled::Parked(io) => Box::pin(http1(self.target.dst, *io, false)).await.ok()?,
        };
        self.pool.stats.upstream_reused.inc();
        Some(Checkout {
            sender,
            reused: true,
        })
    }

    /// A ready connection: a pooled one if hyper reports one ready, else exactly one dial.
    pub async fn checkout(&self) -> Result<Checkout, UpstreamError> {
        if let Some(reused) = self.take_pooled().await {
            return Ok(reused);
        }
        // Taken only when the pool had nothing: no clock read on a reuse.
        let asked = Instant::now();
        let Some(lock) = self.pool.dial_lock(&self.target) else {
            return self.dial().await;
        };
        let mut failed = lock.lock().await;
        if let Some((at, why)) = &*failed
            && *at >= asked
        {
            return Err(UpstreamError::Shared(why.clone()));
        }
        // The dial we waited for may have made a shared h2 connection with room.
        if let Some(reused) = self.take_pooled().await {
            return Ok(reused);
        }
        let res = self.dial().await;
        if let Err(e) = &res {
            *failed = Some((Instant::now(), e.to_string()));
        }
        res
    }

    /// Exactly one dial, for a request whose pooled connection was closed before it was sent.
    pub async fn dial(&self) -> Result<Checkout, UpstreamError> {
        self.dial_with(false).await
    }

    /// A connection of its own for a request asking to upgrade (WebSocket): hyper hands an
    /// upgraded connection's stream to the tunnel, which a pooled connection, made to park,
    /// cannot do.
    pub async fn dial_upgradeable(&self) -> Result<Checkout, UpstreamError> {
        self.dial_with(true).await
    }

    async fn dial_with(&self, upgradeable: bool) -> Result<Checkout, UpstreamError> {
        // Boxed: the dial (TCP, TLS, h2 handshakes) is the cold path, and inline it would size
        // every request's future, which hyper keeps allocated for the connection's life.
        let sender = Box::pin(self.pool.dial(&self.target, upgradeable)).await?;
        self.pool.dialled(&self.target, &sender);
        Ok(Checkout {
            sender,
            reused: false,
        })
    }

    /// Sends on a checked-out connection; an HTTP/1 connection goes back to the pool when the
    /// response body ends ([`UpstreamBody`]) unless the response upgraded it.
    ///
    /// The one retry rule: when the connection came from the pool and hyper hands the request
    /// back (`TrySendError::take_message`), hyper guarantees it never started writing it (the
    /// connection was found closed first: an idle connection the upstream closed just before we
    /// used it). Only then is the request returned as [`SendError::Unsent`], and the caller may
    /// send it once more on a fresh dial ([`Upstream::dial`], never the pool). Every other
    /// failure, including a connection that closes after the request was written, is final:
    /// the upstream may have acted on it, so it is never sent twice.
    pub async fn send(
        &self,
        checkout: Checkout,
        req: Request<Incoming>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let reused = checkout.reused;
        let unsent = |mut e: TrySendError<Request<Incoming>>| match e.take_message() {
            Some(req) if reused => SendError::Unsent(Box::new(req)),
            _ => SendError::Failed(UpstreamError::Send(e.into_error())),
        };
        match checkout.sender {
            Sender::H2(mut s, stream) => {
                let resp = s.try_send_request(req).await.map_err(unsent)?;
                Ok(resp.map(|inner| UpstreamBody {
                    inner,
                    stream: Some(stream),
                    release: None,
                }))
            }
            Sender::Http1(mut conn) => {
                let resp = conn.send(req).await.map_err(unsent)?;
                // An upgraded connection belongs to the tunnel from now on.
                let release =
                    (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| Release {
                        pool: self.pool.clone(),
                        key: self.target.clone(),
                        conn,
                    });
                Ok(resp.map(|inner| UpstreamBody {
                    inner,
                    stream: None,
                    release,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(limits: PoolLimits) -> Arc<Pool> {
        let tls =
            UpstreamTls::from_pem_roots(crate::tls::tests::test_ca("Pool Test CA").0.as_bytes())
                .unwrap();
        Pool::sharded(limits, tls, Dialer::Host, Arc::default(), 1)
    }

    fn limits() -> PoolLimits {
        PoolLimits {
            idle_per_key: 2,
            idle_total: 3,
            idle_timeout: Duration::from_secs(30),
            park_after: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn target(port: u16, name: Option<&str>) -> Target {
        Target {
            dst: OrigDst(SocketAddr::from(([127, 0, 0, 1], port))),
            tls_name: name.map(str::to_owned),
            alpn: Alpn::Http1,
        }
    }

    /// A plain HTTP/1 server that answers every request with 200 and keeps connections open.
    async fn server() -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let a = accepts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    TokioIo::new(tcp),
                    hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                            bytes::Bytes,
                        >::new(
                        )))
                    }),
                ));
            }
        });
        (addr, accepts)
    }

    async fn dial(pool: &Arc<Pool>, t: &Target) -> Http1Conn {
        match pool.dial(t, false).await.unwrap() {
            Sender::Http1(c) => c,
            Sender::H2(..) => unreachable!("plain upstream"),
        }
    }

    fn ready(pooled: Option<Pooled>) -> bool {
        matches!(pooled, Some(Pooled::Ready(Sender::Http1(_))))
    }

    fn idle(pool: &Pool, t: &Target) -> usize {
        pool.state().keys.get(t).map_or(0, |e| e.idle.len())
    }

    #[tokio::test]
    async fn keys_are_separate_and_bounded() {
        let (addr, _) = server().await;
        let p = pool(limits());
        let a = target(addr.port(), None);
        // Same address, but a different verified name: never shares a connection with `a`.
        let b = target(addr.port(), Some("other.test"));
        for _ in 0..3 {
            let s = dial(&p, &a).await;
            p.put(a.clone(), s);
        }
        assert_eq!(idle(&p, &a), 2, "per-key cap");
        assert!(p.take(&b).is_none());
        let s = dial(&p, &a).await;
        p.put(b.clone(), s);
        assert_eq!(p.state().idle_total, 3);
        let s = dial(&p, &a).await;
        p.put(b.clone(), s);
        assert_eq!(idle(&p, &b), 1, "total cap");
        assert!(ready(p.take(&b)));
        assert_eq!(p.state().idle_total, 2);
    }

    /// No task watches an idle connection: the checkout itself must see the upstream's close.
    #[tokio::test]
    async fn a_pooled_connection_the_upstream_closed_is_not_handed_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t = target(listener.local_addr().unwrap().port(), None);
        let p = pool(limits());
        let mut s = dial(&p, &t).await;
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(s.settle(), "a fresh connection takes a request");
        p.put(t.clone(), s);
        drop(accepted);
        // The FIN crosses loopback in microseconds.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(p.take(&t).is_none(), "a closed connection was handed out");
        assert_eq!(p.state().idle_total, 0);
    }

    #[tokio::test]
    async fn closed_and_expired_connections_are_not_handed_out() {
        let (addr, accepts) = server().await;
        let p = pool(PoolLimits {
            idle_timeout: Duration::from_millis(200),
            ..limits()
        });
        let t = target(addr.port(), None);
        let s = dial(&p, &t).await;
        p.put(t.clone(), s);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(p.take(&t).is_none(), "expired");
        assert_eq!(p.state().idle_total, 0);

        let s = dial(&p, &t).await;
        p.put(t.clone(), s);
        p.sweep();
        assert_eq!(idle(&p, &t), 1, "fresh connections survive a sweep");
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.sweep();
        assert!(p.state().keys.is_empty(), "empty keys are forgotten");
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
    }
}
