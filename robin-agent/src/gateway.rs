//! `robin gateway`: an HTTP forward proxy for where eBPF capture cannot go (gVisor, Kata,
//! Fargate-like nodes, locked-down clusters, laptops). Clients set `HTTPS_PROXY`/`HTTP_PROXY`.
//!
//! The same pipeline as a captured connection, through another front door:
//! - `CONNECT host:port`: Robin resolves `host` itself, answers `200`, and serves the tunnel
//!   exactly like a captured connection to that address (sniffed; a ruled SNI is intercepted
//!   with a minted leaf and forwarded over TLS verified for that SNI, anything else spliced).
//! - absolute-form `GET http://host/...`: each request resolved and routed as captured plain
//!   HTTP (a ruled host is originated over verified TLS, or cleartext where the rule allows the
//!   resolved address).
//! - `Proxy-*` headers are hop-by-hop: consumed, never forwarded.
//!
//! Whose identity a request carries is decided per connection by [`clients`]: the gateway's
//! own (`--clients own`, a gateway in the client's pod) or the client pod's, found by source
//! address (`--clients pods`, a separate Deployment); an unknown client gets `403`.
use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::{debug, info, warn};

use crate::{
    admin::{Admin, Readiness},
    capture::{ClientAddr, OrigDst},
    config::{self, ConfigArgs},
    conns::{self, Admitted, Connections},
    identity::process_context,
    kube::{self, KubeArgs, PodSelector},
    metrics::Scrape,
    proxy::{Dialer, Entry, Limits, Proxy, ProxyStats, Resolve},
    serve::{Served, shutdown_signal},
};

mod clients;
mod head;
mod resolve;

pub use clients::{Clients, Unknown};
pub use resolve::DEFAULT_DENY;

pub const ENV_GATEWAY_LISTEN: &str = "ROBIN_GATEWAY_LISTEN";

/// Whose identity the gateway's clients get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientsMode {
    /// The gateway's own identity, for clients in the allowed prefixes (its own pod or host).
    Own,
    /// Each client pod's own identity, the pod found by the connection's source address.
    Pods,
}

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Address the clients' HTTPS_PROXY / HTTP_PROXY point at.
    #[arg(long, env = ENV_GATEWAY_LISTEN, default_value = "127.0.0.1:3128")]
    pub listen: SocketAddr,
    #[arg(long, value_enum, default_value_t = ClientsMode::Own)]
    pub clients: ClientsMode,
    /// `--clients own`: the source prefixes allowed to use the gateway.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.0/8,::1/128")]
    pub allow_clients: Vec<String>,
    /// `--clients pods`: label selector of the client pods, watched cluster-wide.
    #[arg(long, default_value = "robin.dev/gateway=true")]
    pub pod_selector: String,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Destinations never connected to, checked after resolution (comma-separated prefixes;
    /// empty to allow all).
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_DENY)]
    pub deny_destinations: Vec<String>,
    /// Admin plane: /healthz, /readyz, /metrics.
    #[arg(long, env = "ROBIN_ADMIN_ADDR", default_value = "0.0.0.0:4001")]
    pub admin_addr: SocketAddr,
    /// On SIGTERM, how long connections in flight may take to finish.
    #[arg(long, default_value = "10s", value_parser = crate::oidc_gateway::parse_duration)]
    pub drain_timeout: Duration,
}

/// Bounds on a client's first request head.
const HEAD_MAX_BYTES: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

pub fn main(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::load(&args.config)?;
    if args.clients == ClientsMode::Pods {
        clients::check_per_pod(&cfg)?;
    }
    crate::standalone::runtime()?.block_on(run(args, cfg))
}

/// What every gateway connection shares.
struct Gateway {
    clients: Clients,
    resolver: Arc<resolve::Dns>,
    local: SocketAddr,
}

async fn run(args: GatewayArgs, cfg: config::Config) -> anyhow::Result<ExitCode> {
    tracing::info!(config = ?cfg, clients = ?args.clients, "effective configuration");
    let readiness = Readiness::default();
    let deny = resolve::parse_cidrs(&args.deny_destinations)
        .map_err(|e| anyhow::anyhow!("--deny-destinations: {e}"))?;
    // The process's one metrics registry: every client's proxy counts into the same families.
    let mut registry = Registry::default();
    let stats = Arc::new(ProxyStats::register(&mut registry));
    let clients = clients(&args, cfg, stats, &readiness).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr().unwrap_or(args.listen);
    let nofile = conns::raise_nofile_limit();
    let conns = Connections::for_limit(None, nofile);
    registry.register_collector(Box::new(conns.clone()));
    serve_admin(&args, readiness, registry).await?;
    let gateway = Arc::new(Gateway {
        clients,
        resolver: Arc::new(resolve::Dns::new(deny)),
        local,
    });
    let served = Served::new(conns)?;
    served.serve_listener(
        listener,
        move |stream, peer, conn| serve_client(gateway.clone(), stream, peer, conn),
        tracing::info_span!("gateway"),
    );
    info!(addr = %local, "gateway listening");
    shutdown_signal()?.await;
    let left = served.drain(args.drain_timeout).await;
    info!(connections_cut = left, "shutting down");
    Ok(ExitCode::SUCCESS)
}

async fn clients(
    args: &GatewayArgs,
    cfg: config::Config,
    stats: Arc<ProxyStats>,
    readiness: &Readiness,
) -> anyhow::Result<Clients> {
    let allowed = resolve::parse_cidrs(&args.allow_clients)
        .map_err(|e| anyhow::anyhow!("--allow-clients: {e}"))?;
    if args.clients == ClientsMode::Own {
        let identity = process_context();
        let proxy = Proxy::with_stats(&cfg, Limits::default(), Dialer::Host, identity, stats)
            .context("starting the proxy")?;
        return Ok(Clients::Own { proxy, allowed });
    }
    // Sources that cannot be built (a missing CA file, say) fail here, not at a client's first
    // request.
    let probe = crate::identity::PodRef {
        namespace: "probe".into(),
        name: "probe".into(),
        uid: "probe".into(),
        service_account: Some(kube::DEFAULT_SERVICE_ACCOUNT.into()),
    };
    let identity = process_context().for_pod(probe);
    Proxy::with_dialer_and_identity(&cfg, Limits::default(), Dialer::Host, &identity)
        .context("building the rules for a client pod")?;
    let synced = readiness.register("pod_watch_synced");
    let client = kube::client(&args.kube)
        .await
        .context("configuring the Kubernetes client")?;
    let pods = Arc::new(clients::PodClients::new(
        cfg,
        process_context().clone(),
        stats,
    ));
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let selector = PodSelector::Labelled(args.pod_selector.clone());
    tokio::spawn(kube::run_pod_watch(client, selector, tx, Arc::default()));
    tokio::spawn(pods.clone().follow(rx, synced));
    Ok(Clients::Pods(pods))
}

async fn serve_admin(
    args: &GatewayArgs,
    readiness: Readiness,
    registry: Registry,
) -> anyhow::Result<()> {
    let admin = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin plane on {}", args.admin_addr))?;
    let mut plane = Admin::new(readiness);
    plane.register("/metrics", Arc::new(Scrape(registry)));
    tokio::spawn(plane.serve(admin));
    Ok(())
}

/// One client connection: its first request head decides between a tunnel and forward-proxy
/// requests; its source address decides whose identity they carry.
async fn serve_client(gw: Arc<Gateway>, mut stream: TcpStream, peer: SocketAddr, conn: Admitted) {
    let head = match head::read(&mut stream, HEAD_MAX_BYTES, HEAD_TIMEOUT).await {
        Ok(h) => h,
        Err(e) => {
            debug!(client = %peer, error = %e, "no usable request head");
            let _ = stream
                .write_all(&answer(400, "malformed request head"))
                .await;
            return;
        }
    };
    let proxy = match gw.clients.proxy_for(peer.ip()) {
        Ok(p) => p,
        Err(why) => {
            warn!(client = %peer, reason = ?why, "unknown gateway client, answering 403");
            let _ = stream.write_all(&answer(403, "not a known client")).await;
            return;
        }
    };
    let client = ClientAddr(peer);
    match head {
        head::Head::Connect { host, port, rest } => {
            let Some(dst) = connect(&gw, &mut stream, &host, port, peer).await else {
                return;
            };
            let entry = Entry::Sniff { initial: rest };
            proxy.serve_entry(stream, entry, dst, client, conn).await;
        }
        head::Head::Forward { bytes } => {
            let resolver: Arc<dyn Resolve> = gw.resolver.clone();
            let entry = Entry::Forward {
                initial: bytes,
                resolver,
            };
            let local = OrigDst(gw.local);
            proxy.serve_entry(stream, entry, local, client, conn).await;
        }
    }
}

/// Resolves a CONNECT target and answers the client: `200` with the tunnel's destination, or
/// Robin's refusal and `None`.
async fn connect(
    gw: &Gateway,
    stream: &mut TcpStream,
    host: &str,
    port: u16,
    peer: SocketAddr,
) -> Option<OrigDst> {
    match gw.resolver.lookup(host, port).await {
        Ok(dst) => {
            info!(client = %peer, host, resolved = %dst, "CONNECT");
            let ok = b"HTTP/1.1 200 Connection established\r\n\r\n";
            stream.write_all(ok).await.ok()?;
            Some(OrigDst(dst))
        }
        Err(refusal) => {
            let status = crate::proxy::refusal_status(&refusal).as_u16();
            info!(client = %peer, host, error = %refusal, status, "CONNECT refused");
            let _ = stream
                .write_all(&answer(status, "destination refused"))
                .await;
            None
        }
    }
}

/// One of the gateway's own short answers, closing the connection.
fn answer(status: u16, reason: &str) -> Vec<u8> {
    let phrase = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let body = format!("robin: {reason}\n");
    format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
