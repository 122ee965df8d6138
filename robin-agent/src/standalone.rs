//! What the standalone modes share (`robin exec`, `robin attach`): their tokio runtime, one
//! proxy behind one capture listener in the current network namespace, and the counters logged
//! on the way out (neither mode has a metrics endpoint).
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch;

use crate::{
    capture::{CapturedListener, Capturer, NetNs},
    config::Config,
    conns::{self, Connections},
    proxy::Proxy,
    serve::Served,
};

/// Tokio's blocking pool serves only rare work here (token fetches reading a credential file,
/// start-up); the default cap of 512 let a per-request file read grow it to dozens of threads
/// contending on its queue, each with its own stack and malloc arena.
pub const MAX_BLOCKING_THREADS: usize = 8;

/// The multi-threaded runtime of `robin exec`, `robin attach`, `robin node` and `robin gateway`.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the tokio runtime")
}

/// The listener, open and served from [`Serving::start`] until [`Serving::finish`].
pub struct Serving {
    served: Served,
    conns: Arc<Connections>,
    listener_port: u16,
    // The proxy never changes here; the channel is what `Served::serve` reads it from.
    _proxy: watch::Sender<Proxy>,
}

impl Serving {
    /// Builds the proxy, logs the effective configuration, opens the listener (on
    /// `capture.listener_port`, or a free port) and starts accepting. Call it inside the runtime.
    pub fn start(cfg: &Config, capturer: &Capturer) -> anyhow::Result<Self> {
        let proxy = Proxy::new(cfg).context("starting the proxy")?;
        tracing::info!(config = ?cfg, "effective configuration");
        let nofile = conns::raise_nofile_limit();
        let conns = Connections::for_limit(cfg.capture.max_connections, nofile);
        tokio::spawn(conns::trim_when_load_falls(conns.clone()));
        let netns = NetNs::current()?;
        let listener = Arc::new(
            CapturedListener::bind(&netns, cfg.capture.listener_port, capturer.orig_dst_table())
                .context("opening the capture listener")?,
        );
        let listener_port = listener.ports().port;
        let served = Served::new(conns.clone())?;
        let (proxy_tx, proxy_rx) = watch::channel(proxy);
        served.serve(listener, proxy_rx, None, tracing::Span::current());
        Ok(Self {
            served,
            conns,
            listener_port,
            _proxy: proxy_tx,
        })
    }

    /// The port the kernel must redirect to.
    pub fn listener_port(&self) -> u16 {
        self.listener_port
    }

    /// Closes the listener, waits up to `drain` for the connections in flight, and logs what
    /// the connection cap shed and what the kernel refused.
    pub async fn finish(self, capturer: &Capturer, drain: Duration) {
        let left = self.served.drain(drain).await;
        if left > 0 {
            tracing::info!(connections_cut = left, "drain timeout reached");
        }
        tracing::info!(
            shed = self.conns.shed_total(),
            max_connections = self.conns.cap(),
            "connections shed at the connection cap"
        );
        for (reason, n) in capturer.refused_connects().snapshot() {
            if n > 0 {
                tracing::warn!(
                    reason = reason.label(),
                    refused = n,
                    "captured connects refused in the kernel"
                );
            }
        }
    }
}
