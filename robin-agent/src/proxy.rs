//! The userspace data path for one captured connection: sniff the first bytes, then either
//! intercept (terminate TLS with a minted leaf, inject the workload's token, forward to the
//! original destination over verified TLS), serve plain HTTP request by request (see
//! [`route`]), or splice bytes through untouched.
use std::{
    path::Path,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{FutureExt as _, TryFutureExt as _, future::Either};
use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::conn::auto,
};
use rustls::ServerConfig;
use tokio::{io::AsyncBufReadExt as _, net::TcpStream};
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::{
    capture::{ClientAddr, OrigDst},
    config::{Config, InjectRule},
    conns::{Activity, Admitted},
    identity::{
        IdentityContext, IdentityError, IdentitySource, build_source_with, process_context,
    },
    tls::{LeafCache, LeafStats, TlsError, UpstreamTls, mint, upstream::Alpn},
};

mod inject;
mod intercept;
mod linger;
pub mod metrics;
pub mod park;
mod respond;
mod rewind;
mod route;
pub mod sniff;
mod spawn;
mod splice;
mod upstream;

pub use metrics::{ProxyStats, RuleStats};
pub use respond::refusal_status;
use rewind::{ByteCounts, Rewind};
pub use route::FixedUpstream;
use route::Routes;
pub use route::{Refusal, Resolve};
use sniff::Sniffed;
pub use upstream::Dialer;
use upstream::{Pool, PoolLimits};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("inject[{0}].source: {1}")]
    Source(usize, #[source] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Bounds on what one connection may cost.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most bytes buffered while classifying a connection.
    pub sniff_bytes: usize,
    /// How long to wait for the first bytes before splicing.
    pub sniff_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// HTTP/1 read buffer, which bounds the request header section (hyper answers 431 past it;
    /// at least 8 KiB).
    pub max_header_bytes: usize,
    /// Time allowed to receive a request's header section, including keep-alive idle time.
    pub header_read_timeout: Duration,
    /// An intercepted HTTP/1 connection with no request for this long (up to twice it) gives
    /// hyper's buffers back until its next request ([`park`]); so does an idle upstream one
    /// in the pool.
    pub park_after: Duration,
    /// HTTP/2 PING interval and timeout for idle or dead connections.
    pub h2_keep_alive: Duration,
    pub h2_max_concurrent_streams: u32,
    pub connect_timeout: Duration,
    /// Idle upstream HTTP/1 connections kept per (destination, server name, ALPN); split
    /// evenly between the workers' pool shards.
    pub upstream_idle_per_key: usize,
    /// Idle upstream HTTP/1 connections kept in all; split likewise.
    pub upstream_idle_total: usize,
    /// How long an idle upstream connection is kept for reuse.
    pub upstream_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            sniff_bytes: 16 * 1024,
            sniff_timeout: Duration::from_secs(5),
            tls_handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            // Long enough that a busy keep-alive connection never parks between requests,
            // short enough that a pool of idle ones costs little within seconds.
            park_after: Duration::from_secs(1),
            h2_keep_alive: Duration::from_secs(30),
            h2_max_concurrent_streams: 256,
            connect_timeout: Duration::from_secs(10),
            // An h2 workload multiplexes: 16 connections x 10 streams are 160 concurrent
            // requests, each needing its own HTTP/1.1 upstream connection. With fewer idle slots
            // than that, connections returned in a burst were closed and re-dialled (a TLS
            // handshake each): 0.19x nginx on the h2 -> HTTP/1.1 row. nginx's `keepalive 256`.
            upstream_idle_per_key: 256,
            upstream_idle_total: 1024,
            // Below the idle timeouts of common servers and load balancers (60-75 s), so we
            // usually close first instead of racing their FIN.
            upstream_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// HTTP/2 limits Robin applies both as a server (to workloads) and as a client (to upstreams),
/// set explicitly rather than inherited from library defaults that change between releases.
pub(crate) mod h2_limits {
    /// Stream resets by the peer not yet accepted by Robin before the connection is closed
    /// with ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487).
    pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;
    /// Streams Robin itself resets because of the peer's protocol errors before the connection
    /// is closed (CVE-2024-2653-style CONTINUATION / malformed-frame floods).
    pub const MAX_LOCAL_ERROR_RESETS: usize = 256;
    /// Flow-control windows: what a peer may have in flight unread, per stream and per
    /// connection, which bounds the memory one connection can make Robin buffer.
    pub const STREAM_WINDOW: u32 = 1 << 20;
    pub const CONNECTION_WINDOW: u32 = 2 << 20;
    pub const MAX_FRAME_SIZE: u32 = 16 * 1024;
    /// Bytes queued for sending per stream.
    pub const MAX_SEND_BUF: usize = 256 * 1024;
    /// Decoded size of an upstream's response header section (HPACK bombs stop here); towards
    /// workloads `Limits::max_header_bytes` (64 KiB) applies.
    pub const MAX_HEADER_LIST: u32 = 64 * 1024;

    /// Sets the limits above that a server and a client builder share (reset floods, windows,
    /// frame and send-buffer sizes) on any of hyper's h2 builders; they have no common trait.
    macro_rules! shared {
        ($builder:expr) => {
            $builder
                .max_pending_accept_reset_streams(
                    $crate::proxy::h2_limits::MAX_PENDING_ACCEPT_RESETS,
                )
                .max_local_error_reset_streams($crate::proxy::h2_limits::MAX_LOCAL_ERROR_RESETS)
                .initial_stream_window_size($crate::proxy::h2_limits::STREAM_WINDOW)
                .initial_connection_window_size($crate::proxy::h2_limits::CONNECTION_WINDOW)
                .max_frame_size($crate::proxy::h2_limits::MAX_FRAME_SIZE)
                .max_send_buf_size($crate::proxy::h2_limits::MAX_SEND_BUF)
        };
    }
    pub(crate) use shared;
}

/// A rule with its identity source built.
#[derive(Debug)]
pub struct Rule {
    pub cfg: InjectRule,
    pub source: Arc<dyn IdentitySource>,
    /// The rule's first host pattern: names it in logs and metrics.
    pub label: String,
    pub stats: RuleStats,
    pub rendered: inject::RenderedCredential,
}

/// What TLS interception needs: leaves minted by the configured CA. A proxy that only
/// forwards plain HTTP (`robin proxy`) has none and needs no CA.
struct Minting {
    /// Its certificate resolver owns the leaf cache.
    server_tls: Arc<ServerConfig>,
}

struct Inner {
    rules: Arc<[Arc<Rule>]>,
    mint: Option<Minting>,
    upstream: Arc<Pool>,
    limits: Limits,
    stats: Arc<ProxyStats>,
    next_id: AtomicU64,
    dialer: Dialer,
}

/// The proxy. Cheap to clone; all clones share rules, leaf cache and counters.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("rules", &self.inner.rules.len())
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// A connection's log span, made on first use: by its first request, or when it is spliced.
/// A connection that never gets that far (idle, or stalled in its handshake) makes none. The
/// subscriber pools per-span state and keeps it, so a flood of idle connections that each made
/// a span would leave that state scattered over the heap, pinning pages the flood freed.
struct ConnSpan {
    id: u64,
    client: ClientAddr,
    orig: OrigDst,
    span: OnceLock<Span>,
}

impl ConnSpan {
    fn get(&self) -> Span {
        self.span
            .get_or_init(
                || info_span!("conn", id = self.id, client = %self.client, dst = %self.orig),
            )
            .clone()
    }

    /// The span if one was made, for the connection's closing line.
    fn made(&self) -> Span {
        self.span.get().cloned().unwrap_or_else(Span::none)
    }
}

enum Mode {
    /// TLS for a ruled SNI, or plain HTTP routed request by request; with the sniffed name.
    Intercept(Front, String),
    Splice,
}

/// How a connection reached the proxy.
pub enum Entry {
    /// Captured, or tunnelled by a gateway's CONNECT: sniffed, then intercepted or spliced.
    /// `initial`: bytes already read from it.
    Sniff { initial: Vec<u8> },
    /// A forward proxy's connection (`robin gateway`): absolute-form requests, each routed on
    /// its own target, resolved by `resolver`. `initial`: the bytes of its first request the
    /// gateway already read.
    Forward {
        initial: Vec<u8>,
        resolver: Arc<dyn Resolve>,
    },
}

/// How the requests of an intercepted connection are routed.
enum Front {
    /// TLS terminated for this rule.
    Tls(Arc<Rule>),
    /// Plain HTTP to the captured destination.
    Plain,
    /// Plain HTTP to a forward proxy: each request names its own target.
    Forward(Arc<dyn Resolve>),
}

/// A connection whose first bytes were read.
struct SniffedConn {
    stream: TcpStream,
    prefix: Vec<u8>,
    sniffed: Sniffed,
    start: Instant,
    conn_span: Arc<ConnSpan>,
}

/// What an intercepted connection's log record needs once it ends.
struct Intercepted {
    seen: Seen,
    counts: Arc<ByteCounts>,
    handback: linger::Returned,
    label: String,
    conn_span: Arc<ConnSpan>,
}

/// What a connection's closing log line says about it.
struct Seen {
    start: Instant,
    client: ClientAddr,
    orig: OrigDst,
    tls: bool,
    /// The sniffed SNI or Host, `-` when there was none.
    name: String,
}

impl Proxy {
    pub fn new(cfg: &Config) -> Result<Self, ProxyError> {
        Self::with_limits(cfg, Limits::default())
    }

    pub fn with_limits(cfg: &Config, limits: Limits) -> Result<Self, ProxyError> {
        Self::with_dialer(cfg, limits, Dialer::Host)
    }

    /// As [`Proxy::with_limits`], with upstream sockets created by `dialer`.
    pub fn with_dialer(cfg: &Config, limits: Limits, dialer: Dialer) -> Result<Self, ProxyError> {
        Self::with_dialer_and_identity(cfg, limits, dialer, process_context())
    }

    /// As [`Proxy::with_dialer`], with the rules' sources built in `identity`: `robin node`
    /// passes a context bound to the pod it serves (see [`IdentityContext::for_pod`]), so
    /// TokenRequest, delegated SPIFFE and exchange sources act for that pod.
    pub fn with_dialer_and_identity(
        cfg: &Config,
        limits: Limits,
        dialer: Dialer,
        identity: &IdentityContext,
    ) -> Result<Self, ProxyError> {
        let stats = Arc::new(ProxyStats::default());
        Self::with_stats(cfg, limits, dialer, identity, stats)
    }

    /// As [`Proxy::with_dialer_and_identity`], counting into `stats`: `robin node` passes the
    /// one registered set every pod's proxy shares.
    pub fn with_stats(
        cfg: &Config,
        limits: Limits,
        dialer: Dialer,
        identity: &IdentityContext,
        stats: Arc<ProxyStats>,
    ) -> Result<Self, ProxyError> {
        let rules = build_rules(&cfg.inject, identity, &stats)?;
        let leaves = Arc::new(LeafCache::new(
            cfg.tls.ca.clone(),
            mint::DEFAULT_CACHE_CAPACITY,
            stats.leaf.clone(),
        ));
        let server_tls = mint::server_config(leaves.clone())?;
        let mint = Minting { server_tls };
        let upstream_tls = UpstreamTls::new(cfg.tls.upstream_roots.as_deref())?;
        Ok(Self::assemble(
            rules,
            Some(mint),
            upstream_tls,
            limits,
            dialer,
            stats,
        ))
    }

    /// A proxy that terminates no TLS and so mints nothing (no CA): it serves plain-HTTP
    /// streams handed to [`Proxy::serve_fixed`] (`robin proxy`), with `rules` built in
    /// `identity` and upstreams verified against the system roots plus `upstream_roots`.
    pub fn forwarding(
        rules: &[InjectRule],
        upstream_roots: Option<&Path>,
        limits: Limits,
        identity: &IdentityContext,
        stats: Arc<ProxyStats>,
    ) -> Result<Self, ProxyError> {
        let rules = build_rules(rules, identity, &stats)?;
        let upstream_tls = UpstreamTls::new(upstream_roots)?;
        Ok(Self::assemble(
            rules,
            None,
            upstream_tls,
            limits,
            Dialer::Host,
            stats,
        ))
    }

    fn assemble(
        rules: Arc<[Arc<Rule>]>,
        mint: Option<Minting>,
        upstream_tls: UpstreamTls,
        limits: Limits,
        dialer: Dialer,
        stats: Arc<ProxyStats>,
    ) -> Self {
        let upstream = Pool::new(
            PoolLimits {
                idle_per_key: limits.upstream_idle_per_key,
                idle_total: limits.upstream_idle_total,
                idle_timeout: limits.upstream_idle_timeout,
                park_after: limits.park_after,
                connect_timeout: limits.connect_timeout,
            },
            upstream_tls,
            dialer.clone(),
            stats.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                rules,
                mint,
                upstream,
                limits,
                stats,
                next_id: AtomicU64::new(1),
                dialer,
            }),
        }
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.inner.stats
    }

    /// Leaves minted and served from cache (all zero for a proxy that mints nothing).
    pub fn leaf_stats(&self) -> &LeafStats {
        &self.inner.stats.leaf
    }

    /// The proxy's rules, in config order (for per-rule metrics).
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.inner.rules
    }

    fn rule_for(&self, host: &str) -> Option<Arc<Rule>> {
        self.inner
            .rules
            .iter()
            .find(|r| r.cfg.matches(host))
            .cloned()
    }

    /// Handles one captured connection to completion.
    pub async fn serve(&self, stream: TcpStream, orig: OrigDst, client: ClientAddr) {
        self.serve_tracked(stream, orig, client, Activity::none())
            .await
    }

    /// As [`Proxy::serve`], for a connection admitted under the connection cap: it is dropped
    /// (closed) if shed, and marks itself busy while a request is in flight or it is spliced.
    ///
    /// This future is the task of every held connection, so the layers under it are plain
    /// functions returning their inner future, or combinators, wherever they can be: each
    /// `async fn` or `async` block keeps its arguments for the connection's whole life, next
    /// to the future it awaits (rust-lang/rust#62958).
    pub fn serve_admitted(
        self,
        stream: TcpStream,
        orig: OrigDst,
        client: ClientAddr,
        conn: Admitted,
    ) -> impl Future<Output = ()> + Send + 'static {
        let entry = Entry::Sniff {
            initial: Vec::new(),
        };
        self.serve_entry(stream, entry, orig, client, conn)
    }

    /// As [`Proxy::serve_admitted`], for a connection that reached the proxy through `entry`
    /// (`robin gateway`: a CONNECT tunnel to `orig`, or a forward-proxy connection, for which
    /// `orig` is the gateway's own address and only names the connection in logs).
    pub fn serve_entry(
        self,
        stream: TcpStream,
        entry: Entry,
        orig: OrigDst,
        client: ClientAddr,
        conn: Admitted,
    ) -> impl Future<Output = ()> + Send + 'static {
        let span = self.conn_span(orig, client);
        let activity = conn.activity();
        let named = span.clone();
        let shed = move || {
            let (client, dst) = (named.client, named.orig);
            debug!(%client, %dst, "idle connection shed at the connection cap");
        };
        let served = async move { self.serve_inner(stream, entry, activity, span).await };
        conn.until_shed(served, shed)
    }

    /// Serves one accepted plain-HTTP stream (TCP or Unix) whose every request goes to
    /// `upstream` with its rule's token (`robin proxy`): the per-request path of an
    /// intercepted connection (fresh token, hop-by-hop headers, pooled verified upstream,
    /// Robin's own 502/503), routed by [`Routes::Fixed`]. Runs in the caller's span.
    pub async fn serve_fixed<IO>(
        &self,
        io: IO,
        upstream: Arc<FixedUpstream>,
        activity: Activity,
    ) -> Result<(), String>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let stats = &self.inner.stats;
        stats.conn_intercepted.inc();
        let routes = Routes::Fixed(upstream);
        let span = Span::current();
        let res = self
            .serve_http(HttpServer::Detect, io, routes, activity, move || {
                span.clone()
            })
            .await
            .map_err(|e| format!("serving http: {e}"));
        if res.is_err() {
            stats.conn_failed.inc();
        }
        res
    }

    async fn serve_tracked(
        &self,
        stream: TcpStream,
        orig: OrigDst,
        client: ClientAddr,
        activity: Activity,
    ) {
        let entry = Entry::Sniff {
            initial: Vec::new(),
        };
        let span = self.conn_span(orig, client);
        self.serve_inner(stream, entry, activity, span).await
    }

    fn conn_span(&self, orig: OrigDst, client: ClientAddr) -> Arc<ConnSpan> {
        Arc::new(ConnSpan {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            client,
            orig,
            span: OnceLock::new(),
        })
    }

    /// A plain function: see [`Proxy::serve_admitted`].
    fn serve_inner(
        &self,
        stream: TcpStream,
        entry: Entry,
        activity: Activity,
        conn_span: Arc<ConnSpan>,
    ) -> impl Future<Output = ()> + '_ {
        let start = Instant::now();
        let _ = stream.set_nodelay(true);
        match entry {
            Entry::Sniff { initial } => {
                let sniffed = self.sniff(stream, initial, start, conn_span);
                Either::Left(sniffed.then(move |sniffed| match sniffed {
                    Some(s) => Either::Left(self.serve_sniffed(s, activity)),
                    None => Either::Right(std::future::ready(())),
                }))
            }
            Entry::Forward { initial, resolver } => {
                let seen = Seen {
                    start,
                    client: conn_span.client,
                    orig: conn_span.orig,
                    tls: false,
                    name: "-".into(),
                };
                let front = Front::Forward(resolver);
                let served =
                    self.serve_intercepted(stream, initial, front, seen, activity, conn_span);
                Either::Right(served)
            }
        }
    }

    /// Reads the first bytes, until they tell TLS from HTTP and name the destination; `None`
    /// (logged) when they could not be read.
    async fn sniff(
        &self,
        mut stream: TcpStream,
        initial: Vec<u8>,
        start: Instant,
        conn_span: Arc<ConnSpan>,
    ) -> Option<SniffedConn> {
        let (orig, client) = (conn_span.orig, conn_span.client);
        let limits = &self.inner.limits;
        let read = sniff::read_prefix_after(
            initial,
            &mut stream,
            limits.sniff_bytes,
            limits.sniff_timeout,
        );
        let (prefix, sniffed) = match read.await {
            Ok(p) => p,
            Err(e) => {
                debug!(%client, dst = %orig, error = %e, "reading first bytes failed");
                self.inner.stats.conn_failed.inc();
                return None;
            }
        };
        Some(SniffedConn {
            stream,
            prefix,
            sniffed,
            start,
            conn_span,
        })
    }

    /// Intercepted or spliced, as the sniffed name and the rules say.
    fn serve_sniffed(
        &self,
        conn: SniffedConn,
        activity: Activity,
    ) -> impl Future<Output = ()> + '_ {
        let SniffedConn {
            stream,
            prefix,
            sniffed,
            start,
            conn_span,
        } = conn;
        let (name, tls) = match &sniffed {
            Sniffed::Tls { sni } => (sni.clone(), true),
            Sniffed::Http { host } => (host.clone(), false),
            Sniffed::Unknown => (None, false),
        };
        let seen = Seen {
            start,
            client: conn_span.client,
            orig: conn_span.orig,
            tls,
            name: name.clone().unwrap_or_else(|| "-".into()),
        };
        match self.mode_for(&sniffed, name) {
            Mode::Splice => {
                let busy = activity.busy();
                let spliced = self.splice(stream, prefix, seen, conn_span);
                Either::Left(spliced.map(move |()| drop(busy)))
            }
            Mode::Intercept(front, name) => {
                let seen = Seen { name, ..seen };
                let served =
                    self.serve_intercepted(stream, prefix, front, seen, activity, conn_span);
                Either::Right(served)
            }
        }
    }

    /// Plain HTTP is always served by hyper, every request routed on its own host; TLS is
    /// intercepted only for a ruled SNI; anything else is spliced.
    fn mode_for(&self, sniffed: &Sniffed, name: Option<String>) -> Mode {
        match (sniffed, name) {
            (Sniffed::Http { .. }, name) => {
                Mode::Intercept(Front::Plain, name.unwrap_or_else(|| "-".into()))
            }
            (_, Some(n)) => match self.rule_for(&n) {
                Some(rule) => Mode::Intercept(Front::Tls(rule), n),
                None => Mode::Splice,
            },
            (_, None) => Mode::Splice,
        }
    }

    async fn splice(
        &self,
        stream: TcpStream,
        prefix: Vec<u8>,
        seen: Seen,
        conn_span: Arc<ConnSpan>,
    ) {
        let span = conn_span.get();
        let limits = &self.inner.limits;
        let res = splice::splice(
            stream,
            &prefix,
            seen.orig,
            limits.connect_timeout,
            &self.inner.dialer,
        )
        .instrument(span.clone())
        .await;
        let ms = seen.start.elapsed().as_millis() as u64;
        let (client, orig, name, tls) = (seen.client, seen.orig, seen.name.as_str(), seen.tls);
        let stats = &self.inner.stats;
        match res {
            Ok((up, down)) => {
                stats.conn_spliced.inc();
                stats.bytes_from_workload.inc_by(up);
                stats.bytes_to_workload.inc_by(down);
                info!(parent: &span, %client, dst = %orig, name, tls, rule = "-", mode = "splice", bytes_up = up, bytes_down = down, ms, "connection closed");
            }
            Err(e) => {
                stats.conn_splice_failed.inc();
                warn!(parent: &span, %client, dst = %orig, name, tls, rule = "-", mode = "splice", ms, error = %e, "connection failed");
            }
        }
    }

    /// Intercepts with `front`; the connection's log record once it ends.
    fn serve_intercepted(
        &self,
        stream: TcpStream,
        prefix: Vec<u8>,
        front: Front,
        seen: Seen,
        activity: Activity,
        conn_span: Arc<ConnSpan>,
    ) -> impl Future<Output = ()> + '_ {
        self.inner.stats.conn_intercepted.inc();
        let counts = Arc::new(ByteCounts::default());
        counts.up.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        // The socket comes back when hyper drops it, so an error close can linger
        // without a second descriptor held for the connection's life.
        let (socket, handback) = linger::Handback::new(stream);
        let io = Rewind::new(prefix, socket, counts.clone());
        let label = match &front {
            Front::Tls(rule) => rule.label.clone(),
            Front::Plain | Front::Forward(_) => "-".to_owned(),
        };
        let name = seen.name.clone();
        let ended = Intercepted {
            seen,
            counts,
            handback,
            label,
            conn_span: conn_span.clone(),
        };
        self.intercept(io, front, name, activity, conn_span)
            .map(move |res| self.intercepted_ended(ended, res))
    }

    fn intercepted_ended(&self, ended: Intercepted, res: Result<(), String>) {
        let Intercepted {
            seen,
            counts,
            handback,
            label,
            conn_span,
        } = ended;
        // Only an error close needs it (a 431 or 400 with the client still sending);
        // after an upgrade the tunnel still owns the socket and nothing is handed back.
        if let (Some(stream), true) = (handback.take(), res.is_err()) {
            tokio::spawn(linger::lingering_close(stream));
        }
        let stats = &self.inner.stats;
        let ms = seen.start.elapsed().as_millis() as u64;
        let up = counts.up.load(Ordering::Relaxed);
        let down = counts.down.load(Ordering::Relaxed);
        stats.bytes_from_workload.inc_by(up);
        stats.bytes_to_workload.inc_by(down);
        let span = conn_span.made();
        let (client, orig, name, tls) = (seen.client, seen.orig, seen.name.as_str(), seen.tls);
        match res {
            Ok(()) => {
                info!(parent: &span, %client, dst = %orig, name, tls, rule = %label, mode = "intercept", bytes_up = up, bytes_down = down, ms, "connection closed")
            }
            Err(e) => {
                stats.conn_failed.inc();
                warn!(parent: &span, %client, dst = %orig, name, tls, rule = %label, mode = "intercept", bytes_up = up, bytes_down = down, ms, error = %e, "connection failed");
            }
        }
    }

    fn intercept(
        &self,
        io: Rewind<linger::Handback>,
        front: Front,
        name: String,
        activity: Activity,
        conn_span: Arc<ConnSpan>,
    ) -> impl Future<Output = Result<(), String>> + '_ {
        let rules = self.inner.rules.clone();
        let routes = match front {
            Front::Tls(rule) => {
                return Either::Left(self.serve_tls(io, rule, name, activity, conn_span));
            }
            Front::Plain => Routes::Plain {
                rules,
                orig: conn_span.orig,
            },
            Front::Forward(resolver) => Routes::Forward { rules, resolver },
        };
        // HTTP/1.0, 1.1 and h2 with prior knowledge: hyper parses every request. The sniffed
        // request line tells them apart, so a plain HTTP/1 connection gets the server that
        // parks; a forward proxy's first bytes were read by the gateway, so hyper-util looks.
        let server = match &routes {
            Routes::Plain { .. } if io.unread_prefix().starts_with(H2_PREFACE_LINE) => {
                HttpServer::Http2
            }
            Routes::Plain { .. } => HttpServer::Http1,
            _ => HttpServer::Detect,
        };
        let serving = self.serve_http(server, io, routes, activity, move || conn_span.get());
        Either::Right(serving.map_err(|e| format!("serving http: {e}")))
    }

    /// TLS terminated with a leaf for `name`, then HTTP/1.1 or h2 as the workload's ALPN says.
    /// A combinator: the handshake's state and the serving connection take turns in one slot.
    fn serve_tls(
        &self,
        io: Rewind<linger::Handback>,
        rule: Arc<Rule>,
        name: String,
        activity: Activity,
        conn_span: Arc<ConnSpan>,
    ) -> impl Future<Output = Result<(), String>> + '_ {
        self.accept_tls(io).and_then(move |(stream, alpn)| {
            let server = match alpn {
                Alpn::H2 => HttpServer::Http2,
                Alpn::Http1 => HttpServer::Http1,
            };
            let routes = Routes::Tls {
                rule,
                name,
                alpn,
                orig: conn_span.orig,
            };
            self.serve_http(server, stream, routes, activity, move || conn_span.get())
                .map_err(|e| format!("serving https: {e}"))
        })
    }

    /// The workload's TLS handshake, then the wait for its first bytes. The stream is returned,
    /// never borrowed by the caller: a borrowed local stays in the connection's future for its
    /// whole life.
    async fn accept_tls(
        &self,
        io: Rewind<linger::Handback>,
    ) -> Result<(WorkloadTls, Alpn), String> {
        let timeout = self.inner.limits.tls_handshake_timeout;
        let Some(mint) = &self.inner.mint else {
            return Err("no CA to intercept tls with".to_owned());
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(mint.server_tls.clone());
        let mut stream = tokio::time::timeout(timeout, acceptor.accept(io))
            .await
            .map_err(|_| "tls handshake with workload timed out".to_owned())?
            .map_err(|e| format!("tls handshake with workload: {e}"))?;
        let alpn = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => Alpn::H2,
            _ => Alpn::Http1,
        };
        // hyper's connection (8 KiB read and 8 KiB write buffers) is made when the first
        // request's bytes are here, not for a connection that has only shaken hands. An error
        // or EOF is hyper's to meet and report.
        let _ = stream.fill_buf().await;
        Ok((stream, alpn))
    }

    /// Serves the requests of one intercepted connection, each through [`intercept::handle`].
    /// A plain function returning hyper's own connection future: as an `async fn` it would
    /// hold `io` a second time for the connection's life.
    fn serve_http<T>(
        &self,
        server: HttpServer,
        io: T,
        routes: Routes,
        activity: Activity,
        span: impl Fn() -> Span + Clone + Unpin + Send + Sync + 'static,
    ) -> impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + 'static
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let ctx = Arc::new(intercept::ConnCtx {
            routes,
            pool: self.inner.upstream.clone(),
            stats: self.inner.stats.clone(),
        });
        let requests = Arc::new(park::Requests::default());
        let in_flight = requests.clone();
        // hyper runs each h2 stream on its own task: carry the connection span explicitly.
        let svc = service_fn(move |req| {
            crate::conns::busy::tracked(
                (activity.busy(), in_flight.begin()),
                intercept::handle(ctx.clone(), req).instrument(span()),
            )
        });
        let limits = &self.inner.limits;
        match server {
            HttpServer::Http1 => {
                let mut http1 = http1::Builder::new();
                http1_limits!(http1, limits);
                // The strict cap, checked on the parsed head too: `max_buf_size` alone bounds
                // hyper's buffer, which a head can outgrow between two checks when the reads
                // come in large chunks (hyper-util's auto builder does not offer this setting).
                http1.max_header_size(limits.max_header_bytes);
                let park = park::Park {
                    after: limits.park_after,
                    header_read_timeout: limits.header_read_timeout,
                    parked: self.inner.stats.conn_parked.clone(),
                };
                Either::Left(Either::Left(park::serve(io, http1, svc, requests, park)))
            }
            HttpServer::Http2 => {
                let mut http2 = http2::Builder::new(spawn::SpawnBoxed);
                http2_limits!(http2, limits);
                let conn = http2.serve_connection(TokioIo::new(io), svc);
                // Boxed, as the detecting server below: the larger of them would otherwise size
                // every HTTP/1 connection's task, parked ones included.
                Either::Left(Either::Right(Box::pin(conn.map_err(Into::into))))
            }
            HttpServer::Detect => {
                let auto = auto_server(limits);
                let conn = auto.serve_connection_with_upgrades(TokioIo::new(io), svc);
                Either::Right(Box::pin(conn.into_owned()))
            }
        }
    }
}

/// An intercepted connection after Robin's TLS handshake with the workload.
type WorkloadTls = tokio_rustls::server::TlsStream<Rewind<linger::Handback>>;

/// The request line of the h2 connection preface (RFC 9113 §3.4): plain HTTP that starts with
/// it is h2 with prior knowledge.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Which of hyper's servers serves a connection's HTTP.
enum HttpServer {
    /// The workload's ALPN chose HTTP/1.1 (or none), or plain HTTP/1. Not hyper-util's version
    /// detection: its 24-byte first read makes hyper grow its read buffer to 16 KiB for the
    /// connection's life, and its connection cannot hand the stream back to park.
    Http1,
    /// The workload's ALPN chose h2, or plain HTTP began with the h2 preface.
    Http2,
    /// A stream nothing was sniffed from (`robin proxy`, a forward-proxy connection):
    /// hyper-util reads the preface.
    Detect,
}

/// The rules with their sources built in `identity`.
fn build_rules(
    rules: &[InjectRule],
    identity: &IdentityContext,
    stats: &ProxyStats,
) -> Result<Arc<[Arc<Rule>]>, ProxyError> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(Arc::new(Rule {
                cfg: r.clone(),
                source: build_source_with(&r.source, identity)
                    .map_err(|e| ProxyError::Source(i, e))?,
                label: r.label(),
                stats: stats.rule(&r.label()),
                rendered: Default::default(),
            }))
        })
        .collect()
}

/// The workload-facing HTTP/1 limits: header timeout and size caps. A macro because hyper's
/// own builder and hyper-util's auto builder have the same methods but no common trait.
macro_rules! http1_limits {
    ($builder:expr, $limits:expr) => {
        $builder
            .timer(TokioTimer::new())
            .header_read_timeout($limits.header_read_timeout)
            .max_buf_size($limits.max_header_bytes.max(8192))
            .keep_alive(true)
    };
}

/// The workload-facing HTTP/2 limits (see `h2_limits`), for either builder as above.
macro_rules! http2_limits {
    ($builder:expr, $limits:expr) => {
        h2_limits::shared!(
            $builder
                .timer(TokioTimer::new())
                .keep_alive_interval($limits.h2_keep_alive)
                .keep_alive_timeout($limits.h2_keep_alive)
                .max_concurrent_streams($limits.h2_max_concurrent_streams)
                .max_header_list_size(u32::try_from($limits.max_header_bytes).unwrap_or(u32::MAX))
        )
    };
}
use {http1_limits, http2_limits};

/// hyper-util's server that detects the version, with both versions' limits.
fn auto_server(limits: &Limits) -> auto::Builder<spawn::SpawnBoxed> {
    let mut builder = auto::Builder::new(spawn::SpawnBoxed);
    http1_limits!(builder.http1(), limits);
    http2_limits!(builder.http2(), limits);
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, F: Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every held connection pays for these futures whole: the connection's task, and hyper's
    /// slot for a request's future, allocated once at its largest. The cold paths (dialling
    /// upstream, the splice) are boxed or apart so an idle keep-alive connection stays small.
    /// Before, the two were 16.7 KiB and 21.3 KiB (`cargo +nightly rustc -- -Zprint-type-sizes`).
    ///
    /// The connection's bound keeps its task in jemalloc's 2 KiB size class: tokio adds 96
    /// bytes (header, ids, trailer) to the future. The release build's task is 2,048 bytes
    /// (3,840, in the 4 KiB class, while the layers above the hyper connection were `async`).
    #[test]
    fn an_idle_connection_holds_small_futures() {
        let request = future_size(intercept::handle);
        assert!(request <= 4 * 1024, "request future: {request} bytes");
        let connection = future_size(|p: Proxy, (s, o, c, a)| p.serve_admitted(s, o, c, a));
        assert!(
            connection <= 2048 - 96,
            "connection future: {connection} bytes"
        );
    }
}
