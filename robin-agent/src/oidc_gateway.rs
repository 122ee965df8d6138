//! `robin oidc-gateway`: serves the cluster's OIDC discovery document and JWKS to external
//! brokers, so that a cluster running with `--anonymous-auth=false` need not open them to
//! anonymous callers. Both documents are fetched from the API server with the gateway's own
//! ServiceAccount token, cached (TTL, single-flight, stale-on-error) and served with ETags.
//!
//! Stages: [`upstream`] (the one outbound client) → [`cache`] → [`routes`] (inbound HTTP).
use std::{
    convert::Infallible, future::Future, net::SocketAddr, path::PathBuf, process::ExitCode,
    sync::Arc, time::Duration,
};

use anyhow::Context as _;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    conns::{self, Admitted, Connections},
    kube::{CallLimits, Endpoint, EndpointConfig},
    serve::Served,
};

pub mod cache;
pub mod metrics;
pub mod routes;
pub mod upstream;

pub use cache::Document;

pub const ENV_LISTEN: &str = "ROBIN_OIDC_LISTEN";
pub const ENV_UPSTREAM: &str = "ROBIN_OIDC_UPSTREAM";
pub const ENV_TOKEN_FILE: &str = "ROBIN_OIDC_TOKEN_FILE";
pub const ENV_CA_FILE: &str = "ROBIN_OIDC_CA_FILE";
pub const ENV_SYSTEM_ROOTS: &str = "ROBIN_OIDC_SYSTEM_ROOTS";
pub const ENV_CACHE_TTL: &str = "ROBIN_OIDC_CACHE_TTL";
pub const ENV_CONNECT_TIMEOUT: &str = "ROBIN_OIDC_CONNECT_TIMEOUT";
pub const ENV_UPSTREAM_TIMEOUT: &str = "ROBIN_OIDC_UPSTREAM_TIMEOUT";
pub const ENV_MAX_BODY_BYTES: &str = "ROBIN_OIDC_MAX_BODY_BYTES";
pub const ENV_PRETTY: &str = "ROBIN_OIDC_PRETTY";

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_UPSTREAM: &str = "https://kubernetes.default.svc";
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
pub const DEFAULT_CACHE_TTL: &str = "60s";
pub const DEFAULT_CONNECT_TIMEOUT: &str = "3s";
pub const DEFAULT_UPSTREAM_TIMEOUT: &str = "10s";
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long open connections get to finish after a shutdown signal before they are dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound clients must send their request head within this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Warm-up retry delays: doubling from the first to the last.
const WARM_UP_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(30));

#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Address to serve on.
    #[arg(long, env = ENV_LISTEN, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// API server base URL. https only, except to a loopback IP literal.
    #[arg(long, env = ENV_UPSTREAM, default_value = DEFAULT_UPSTREAM)]
    pub upstream: String,
    /// Bearer token file, re-read on every fetch (projected tokens rotate).
    #[arg(long, env = ENV_TOKEN_FILE, default_value = DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,
    /// PEM bundle of the CAs trusted for the upstream; nothing else is trusted by default.
    #[arg(long, env = ENV_CA_FILE, default_value = DEFAULT_CA_FILE)]
    pub ca_file: PathBuf,
    /// Also trust the system's root certificates.
    #[arg(long, env = ENV_SYSTEM_ROOTS)]
    pub system_roots: bool,
    /// How long a fetched document is served before it is fetched again (e.g. 500ms, 60s, 5m).
    #[arg(long, env = ENV_CACHE_TTL, default_value = DEFAULT_CACHE_TTL, value_parser = parse_duration)]
    pub cache_ttl: Duration,
    /// Upstream TCP connect timeout.
    #[arg(long, env = ENV_CONNECT_TIMEOUT, default_value = DEFAULT_CONNECT_TIMEOUT, value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Upstream timeout for a whole fetch: token, connect, TLS, request, body.
    #[arg(long, env = ENV_UPSTREAM_TIMEOUT, default_value = DEFAULT_UPSTREAM_TIMEOUT, value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Largest upstream response body accepted.
    #[arg(long, env = ENV_MAX_BODY_BYTES, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Serve pretty-printed JSON.
    #[arg(long, env = ENV_PRETTY)]
    pub pretty: bool,
}

impl Default for GatewayArgs {
    /// The same values clap uses when neither flag nor variable is given.
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("valid default listen address"),
            upstream: DEFAULT_UPSTREAM.to_owned(),
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            ca_file: PathBuf::from(DEFAULT_CA_FILE),
            system_roots: false,
            cache_ttl: parse_duration(DEFAULT_CACHE_TTL).expect("valid default"),
            connect_timeout: parse_duration(DEFAULT_CONNECT_TIMEOUT).expect("valid default"),
            upstream_timeout: parse_duration(DEFAULT_UPSTREAM_TIMEOUT).expect("valid default"),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            pretty: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid duration {0:?}: expected a number with an optional ms, s, m or h suffix")]
    Duration(String),
    #[error("upstream: {0}")]
    Upstream(#[from] crate::kube::ConfigError),
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// Parses `500ms`, `30s`, `5m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, Error> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| Error::Duration(s.to_owned()))?;
    let per_unit_ms = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(Error::Duration(s.to_owned())),
    };
    n.checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| Error::Duration(s.to_owned()))
}

/// The gateway: cache, upstream client and HTTP handler. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    cache: Arc<cache::Cache>,
}

impl Gateway {
    /// Validates the configuration and loads the CA bundle; makes no network call.
    pub fn new(args: &GatewayArgs) -> Result<Self, Error> {
        let upstream = build_upstream(args)?;
        Ok(Self {
            cache: Arc::new(cache::Cache::new(upstream, args.cache_ttl, args.pretty)),
        })
    }

    pub fn is_ready(&self) -> bool {
        self.cache.is_ready()
    }

    /// Fetches every document in the background, retrying with backoff, until each has been
    /// fetched once: that is what makes `/readyz` pass without probes touching the API server.
    pub fn spawn_warm_up(&self) -> tokio::task::JoinHandle<()> {
        let cache = self.cache.clone();
        tokio::spawn(async move {
            let mut delay = WARM_UP_BACKOFF.0;
            loop {
                let mut ok = true;
                for doc in Document::ALL {
                    // Failures are logged and counted by the cache.
                    ok &= cache.refresh(doc).await.is_ok();
                }
                if ok {
                    tracing::info!("documents fetched; ready");
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(WARM_UP_BACKOFF.1);
            }
        })
    }

    /// Serves `listener` on [`Served`] (the accept loop, connection cap and drain every mode
    /// shares) until `shutdown` resolves, then lets open connections finish (bounded by
    /// [`DRAIN_TIMEOUT`]).
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let served = Served::new(Connections::for_limit(None, conns::raise_nofile_limit()))?;
        let cache = self.cache.clone();
        let draining = served.draining();
        served.serve_listener(
            listener,
            move |stream, client: SocketAddr, conn| {
                let span = tracing::debug_span!("conn", %client);
                serve_connection(cache.clone(), stream, conn, draining.clone()).instrument(span)
            },
            tracing::info_span!("oidc-gateway"),
        );
        shutdown.await;
        let remaining = served.drain(DRAIN_TIMEOUT).await;
        if remaining > 0 {
            tracing::warn!(
                remaining,
                "connections still open after the drain timeout; closing them"
            );
        }
        Ok(())
    }
}

/// One client connection: served until it ends, is shed under the connection cap, or the
/// drain begins (then the request in flight finishes and the connection closes).
async fn serve_connection(
    cache: Arc<cache::Cache>,
    stream: tokio::net::TcpStream,
    conn: Admitted,
    draining: CancellationToken,
) {
    let activity = conn.activity();
    let service = hyper::service::service_fn(move |request| {
        let cache = cache.clone();
        // Busy (never shed) from the request's arrival to the end of its response body.
        conns::busy::tracked(activity.busy(), async move {
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let response = routes::handle(&cache, request).await;
            tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
            Ok::<_, Infallible>(response)
        })
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = conn.shed() => return,
        () = draining.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Trusts exactly the configured CA bundle (plus system roots only when asked): the gateway
/// sends a credential, so it must reach the API server and nothing that merely has a public
/// certificate. Plain http only to a loopback address (tests).
fn build_upstream(args: &GatewayArgs) -> Result<upstream::Upstream, Error> {
    let endpoint = Endpoint::new(EndpointConfig {
        url: &args.upstream,
        ca_file: Some(&args.ca_file),
        system_roots: args.system_roots,
        token_file: args.token_file.clone(),
        allow_plain_loopback: true,
        limits: CallLimits {
            connect_timeout: args.connect_timeout,
            total_timeout: args.upstream_timeout,
            max_body: args.max_body_bytes,
        },
    })?;
    Ok(upstream::Upstream::new(endpoint))
}

/// Entry point of `robin oidc-gateway`.
pub fn main(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    // The token is never read here: only its path is logged.
    tracing::info!(
        listen = %args.listen,
        upstream = %args.upstream,
        token_file = %args.token_file.display(),
        ca_file = %args.ca_file.display(),
        system_roots = args.system_roots,
        cache_ttl = ?args.cache_ttl,
        connect_timeout = ?args.connect_timeout,
        upstream_timeout = ?args.upstream_timeout,
        max_body_bytes = args.max_body_bytes,
        pretty = args.pretty,
        "oidc gateway starting"
    );
    let gateway = Gateway::new(&args)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| Error::Bind(args.listen, e))?;
    let warm_up = gateway.spawn_warm_up();
    gateway
        .serve(listener, crate::serve::shutdown_signal()?)
        .await?;
    warm_up.abort();
    tracing::info!("oidc gateway stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "s", "5d", "-1s", "1.5s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn upstream_err(url: &str) -> Error {
        let args = GatewayArgs {
            upstream: url.to_owned(),
            ..GatewayArgs::default()
        };
        match build_upstream(&args) {
            Err(e) => e,
            Ok(_) => panic!("{url} accepted"),
        }
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(matches!(
            upstream_err("http://kubernetes.default.svc"),
            Error::Upstream(..)
        ));
        assert!(matches!(
            upstream_err("http://10.0.0.1:6443"),
            Error::Upstream(..)
        ));
        assert!(matches!(
            upstream_err("ftp://127.0.0.1"),
            Error::Upstream(..)
        ));
        assert!(matches!(
            upstream_err("https://user:pw@host"),
            Error::Upstream(..)
        ));
        // Loopback over http needs no CA bundle at all.
        for ok in ["http://127.0.0.1:8081", "http://[::1]:8081/prefix/"] {
            let args = GatewayArgs {
                upstream: ok.to_owned(),
                ca_file: PathBuf::from("/nonexistent"),
                ..GatewayArgs::default()
            };
            build_upstream(&args).unwrap();
        }
    }

    #[test]
    fn https_needs_a_readable_ca() {
        let args = GatewayArgs {
            upstream: "https://127.0.0.1:6443".to_owned(),
            ca_file: PathBuf::from("/nonexistent/ca.crt"),
            ..GatewayArgs::default()
        };
        assert!(matches!(
            build_upstream(&args),
            Err(Error::Upstream(crate::kube::ConfigError::Read(..)))
        ));
    }
}
