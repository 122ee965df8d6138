//! `robin proxy`: the original Robin's sidecar contract, drop-in. The app sends plain HTTP to a
//! loopback listener (or a Unix socket whose peers are checked by UID); every request goes to
//! `ROBIN_UPSTREAM_URL` with `Authorization: Bearer <token>`, bodies streamed both ways.
//!
//! There is no second HTTP client: each accepted stream is handed to the proxy pipeline
//! ([`Proxy::serve_fixed`], routed by its fixed-upstream route), so tokens, hop-by-hop
//! headers, the verified and pooled upstream, and Robin's own 503 (no identity, nothing sent)
//! and 502 (upstream unreachable or unverifiable) are those of the transparent modes. Nothing
//! is minted, so no CA is needed ([`Proxy::forwarding`]).
//!
//! DNS: the upstream host is resolved at start (bounded retries, then a clear error) and again
//! every [`DNS_REFRESH`]. Requests use the latest answer; the connection pool is keyed by
//! address, so connections to an address that left the answer are not reused and age out. The
//! current address is kept while it is still in the answer, so a round-robin answer does not
//! churn connections.
use std::{
    net::SocketAddr, os::unix::fs::PermissionsExt, path::Path, process::ExitCode, sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use http::uri::Scheme;
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::watch,
};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    admin::{Admin, Readiness, ReadyCheck},
    config::{DEFAULT_FORMAT, DEFAULT_HEADER, HostPattern, InjectRule, TokenFormat},
    conns::{self, Admitted, Connections},
    identity::{CachePolicy, IdentityContext, IdentitySource, SourceConfig, spiffe::SpiffeConfig},
    metrics::Scrape,
    proxy::{FixedUpstream, Limits, Proxy, ProxyStats},
    serve::Served,
};

pub mod env;

use env::{ProxyArgs, Settings, TokenSource, UpstreamUrl};

/// How often the upstream's name is resolved again.
pub const DNS_REFRESH: Duration = Duration::from_secs(30);
/// Start-up resolution: attempts, one second apart, before giving up.
const DNS_START_ATTEMPTS: u32 = 10;
/// Longest wait, on SIGTERM, for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving {0}: no address")]
    NoAddress(String),
}

pub fn main(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.env_file {
        Some(path) => env::read_env_file(path)?,
        None => Default::default(),
    };
    let process_env = |k: &str| std::env::var(k).ok();
    let layers = env::Layered(vec![&args, &process_env, &file]);
    let settings = Settings::from_lookup(&layers, nix::unistd::getuid().as_raw())?;
    crate::standalone::runtime()?.block_on(run(settings))
}

/// The rule `robin proxy` injects with: the original Robin's `Authorization: Bearer <token>`.
pub fn inject_rule(s: &Settings) -> InjectRule {
    let source = match &s.token {
        TokenSource::File(path) => SourceConfig::File { path: path.clone() },
        TokenSource::Jwtsvid { audience, socket } => SourceConfig::Spiffe(SpiffeConfig {
            audience: audience.clone(),
            socket: Some(socket.display().to_string()),
            ..SpiffeConfig::default()
        }),
    };
    InjectRule {
        // Names the rule in logs; routing ignores it (every request goes upstream).
        hosts: vec![HostPattern::Exact(s.upstream.host.to_ascii_lowercase())],
        audience: source.audience().map(str::to_owned),
        source,
        header: http::HeaderName::from_static("authorization"),
        format: TokenFormat::parse(DEFAULT_FORMAT).expect("the default format is valid"),
        upstream_tls_port: s.upstream.port,
        plaintext: None,
    }
}

async fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    info!(config = ?settings, header = DEFAULT_HEADER, "effective configuration");
    let mut identity = IdentityContext::new(CachePolicy {
        refresh_ahead: settings.svid_refresh_before,
        ..CachePolicy::default()
    });
    if let TokenSource::Jwtsvid { socket, .. } = &settings.token {
        identity.spiffe_socket = Some(socket.clone());
    }
    // The process's one metrics registry: the proxy's families and the peer refusals.
    let mut registry = Registry::default();
    let stats = Arc::new(ProxyStats::register(&mut registry));
    let refused: Counter = Counter::default();
    registry.register(
        "robin_proxy_peercred_refused",
        "Unix socket peers closed because SO_PEERCRED named a UID not allowed.",
        refused.clone(),
    );
    let proxy = Proxy::forwarding(
        &[inject_rule(&settings)],
        settings.upstream_ca_file.as_deref(),
        Limits::default(),
        &identity,
        stats,
    )
    .with_context(|| format!("{} / {}", env::ENV_TOKEN_SOURCE, env::ENV_UPSTREAM_CA_FILE))?;
    let rule = proxy.rules()[0].clone();
    let dst = resolve_at_start(&settings.upstream).await?;
    let (dst_tx, dst_rx) = watch::channel(dst);
    tokio::spawn(refresh_dns(settings.upstream.clone(), dst_tx));
    let upstream = Arc::new(fixed_upstream(&settings.upstream, rule.clone(), dst_rx));
    serve_admin(&settings, rule.source.clone(), registry).await?;
    let served = Served::new(Connections::for_limit(None, conns::raise_nofile_limit()))?;
    if let Some(addr) = settings.listen {
        listen_tcp(&served, addr, proxy.clone(), upstream.clone()).await?;
    }
    if let Some(uds) = settings.uds.clone() {
        listen_uds(&served, uds, proxy, upstream, refused)?;
    }
    crate::serve::shutdown_signal()?.await;
    info!("stopping: draining requests in flight");
    // Connections are not cut at SIGTERM: the drain waits (bounded) for them to end, and a
    // native sidecar is stopped only after the app, whose connections are closed by then.
    let open = served.drain(DRAIN_TIMEOUT).await;
    if open > 0 {
        warn!(open, "connections still open at the drain timeout");
    }
    if let Some(uds) = &settings.uds {
        let _ = std::fs::remove_file(&uds.path);
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves the app's plain HTTP on `addr` (`ROBIN_LISTEN_ADDR`).
async fn listen_tcp(
    served: &Served,
    addr: SocketAddr,
    proxy: Proxy,
    upstream: Arc<FixedUpstream>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{}: binding {addr}", env::ENV_LISTEN_ADDR))?;
    info!(%addr, "listening");
    let handle = move |stream: TcpStream, peer: SocketAddr, conn| {
        let _ = stream.set_nodelay(true);
        serve_conn(
            proxy.clone(),
            upstream.clone(),
            stream,
            peer.to_string(),
            conn,
        )
    };
    served.serve_listener(listener, handle, info_span!("tcp"));
    Ok(())
}

/// Serves the app on a Unix socket (`ROBIN_LISTEN_UDS`), to peers whose `SO_PEERCRED` UID is
/// allowed; any other peer is closed before a byte is read and counted in `refused`.
fn listen_uds(
    served: &Served,
    uds: env::UdsListen,
    proxy: Proxy,
    upstream: Arc<FixedUpstream>,
    refused: Counter,
) -> anyhow::Result<()> {
    let listener = bind_uds(&uds.path)
        .with_context(|| format!("{}: binding {}", env::ENV_LISTEN_UDS, uds.path.display()))?;
    info!(path = %uds.path.display(), allow_uids = ?uds.allow_uids, "listening");
    let allow = Arc::new(uds.allow_uids);
    let handle = move |stream: UnixStream, _, conn| {
        let (proxy, upstream) = (proxy.clone(), upstream.clone());
        let (allow, refused) = (allow.clone(), refused.clone());
        async move {
            match peer_allowed(&stream, &allow) {
                Ok(uid) => serve_conn(proxy, upstream, stream, format!("uid:{uid}"), conn).await,
                Err(why) => {
                    refused.inc();
                    // Dropping the stream closes it before a byte is read.
                    warn!(peer = %why, "unix socket peer refused");
                }
            }
        }
    };
    served.serve_listener(listener, handle, info_span!("uds"));
    Ok(())
}

fn fixed_upstream(
    url: &UpstreamUrl,
    rule: Arc<crate::proxy::Rule>,
    dst: watch::Receiver<SocketAddr>,
) -> FixedUpstream {
    FixedUpstream {
        rule,
        scheme: url.scheme.clone(),
        authority: url.authority.clone(),
        tls_name: (url.scheme == Scheme::HTTPS).then(|| url.host.clone()),
        dst,
    }
}

/// One app connection, served until it ends or is shed at the connection cap.
async fn serve_conn<IO>(
    proxy: Proxy,
    upstream: Arc<FixedUpstream>,
    io: IO,
    client: String,
    conn: Admitted,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let span = info_span!("conn", client);
    let serve = proxy.serve_fixed(io, upstream, conn.activity());
    tokio::select! {
        res = serve.instrument(span.clone()) => {
            if let Err(e) = res {
                debug!(parent: &span, error = %e, "connection ended");
            }
        }
        () = conn.shed() => debug!(parent: &span, "idle connection shed at the connection cap"),
    }
}

/// The peer's UID (SO_PEERCRED) if it is allowed, else what was found.
fn peer_allowed(stream: &UnixStream, allow: &[u32]) -> Result<u32, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("no credentials: {e}"))?;
    let uid = cred.uid();
    if allow.contains(&uid) {
        Ok(uid)
    } else {
        Err(format!(
            "uid {uid} (pid {}) not in {}",
            cred.pid().map_or_else(|| "?".to_owned(), |p| p.to_string()),
            env::ENV_PEERCRED_ALLOW_UIDS
        ))
    }
}

/// Binds the Unix socket, replacing a stale one a previous run left. Anyone may connect: the
/// UID check on every accepted peer is the gate, not the file mode.
fn bind_uds(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

async fn serve_admin(
    settings: &Settings,
    source: Arc<dyn IdentitySource>,
    registry: Registry,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(settings.admin)
        .await
        .with_context(|| format!("{}: binding {}", env::ENV_ADMIN_ADDR, settings.admin))?;
    let mut plane = Admin::new(Readiness::default());
    plane.add_check("identity", Arc::new(IdentityCheck(source)));
    plane.register("/metrics", Arc::new(Scrape(registry)));
    info!(addr = %settings.admin, "admin plane listening");
    tokio::spawn(plane.serve(listener));
    Ok(())
}

/// Ready only while a token can be had now: the same call a request makes.
struct IdentityCheck(Arc<dyn IdentitySource>);

impl ReadyCheck for IdentityCheck {
    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move { self.0.token().await.map(drop).map_err(|e| e.to_string()) })
    }
}

async fn resolve(url: &UpstreamUrl) -> Result<Vec<SocketAddr>, SidecarError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|source| SidecarError::Resolve {
            host: url.host.clone(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(SidecarError::NoAddress(url.host.clone()));
    }
    Ok(addrs)
}

/// Keeps `current` while the answer still holds it, else the resolver's first choice.
fn choose(addrs: &[SocketAddr], current: Option<SocketAddr>) -> Option<SocketAddr> {
    current
        .filter(|c| addrs.contains(c))
        .or_else(|| addrs.first().copied())
}

async fn resolve_at_start(url: &UpstreamUrl) -> anyhow::Result<SocketAddr> {
    let mut attempt = 1;
    loop {
        match resolve(url).await {
            Ok(addrs) => {
                let dst = choose(&addrs, None).expect("resolve returns an address");
                info!(host = url.host, %dst, "upstream resolved");
                return Ok(dst);
            }
            Err(e) if attempt >= DNS_START_ATTEMPTS => {
                return Err(e).context(env::ENV_UPSTREAM_URL);
            }
            Err(e) => warn!(error = %e, attempt, "resolving the upstream, retrying"),
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Re-resolves every [`DNS_REFRESH`]; a failure keeps the last good address.
async fn refresh_dns(url: UpstreamUrl, dst: watch::Sender<SocketAddr>) {
    let mut tick = tokio::time::interval(DNS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match resolve(&url).await {
            Ok(addrs) => {
                let current = *dst.borrow();
                if let Some(next) = choose(&addrs, Some(current))
                    && next != current
                {
                    info!(host = url.host, from = %current, to = %next, "upstream address changed");
                    dst.send_replace(next);
                }
            }
            Err(e) => {
                warn!(error = %e, keeping = %*dst.borrow(), "re-resolving the upstream failed")
            }
        }
        if dst.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_address_is_kept_while_the_answer_holds_it() {
        let a: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:443".parse().unwrap();
        assert_eq!(choose(&[a, b], None), Some(a));
        assert_eq!(choose(&[a, b], Some(b)), Some(b));
        assert_eq!(choose(&[a], Some(b)), Some(a));
        assert_eq!(choose(&[], Some(b)), None);
    }

    #[test]
    fn the_rule_is_robins_bearer_header_with_the_source_mapped() {
        let vars: std::collections::BTreeMap<String, String> = [
            (env::ENV_UPSTREAM_URL, "https://API.example.com:8443"),
            (env::ENV_TOKEN_SOURCE, "jwtsvid"),
            (env::ENV_AUDIENCE, "api"),
            (env::ENV_SPIFFE_SOCKET, "/run/spire.sock"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let s = Settings::from_lookup(&vars, 0).unwrap();
        let rule = inject_rule(&s);
        assert_eq!(rule.header.as_str(), "authorization");
        assert_eq!(rule.format.render("t"), "Bearer t");
        assert_eq!(rule.audience.as_deref(), Some("api"));
        assert_eq!(rule.label(), "api.example.com");
        let SourceConfig::Spiffe(c) = &rule.source else {
            panic!("jwtsvid maps to the spiffe source");
        };
        assert_eq!(c.socket.as_deref(), Some("/run/spire.sock"));
        let (_tx, rx) = watch::channel("127.0.0.1:1".parse().unwrap());
        let rule = Arc::new(crate::proxy::Rule {
            source: crate::identity::build_source(&rule.source).unwrap(),
            label: rule.label(),
            cfg: rule,
            stats: Default::default(),
            rendered: Default::default(),
        });
        let f = fixed_upstream(&s.upstream, rule, rx);
        assert_eq!(f.tls_name.as_deref(), Some("API.example.com"));
        assert_eq!(f.authority.as_str(), "API.example.com:8443");
    }
}
