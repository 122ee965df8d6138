//! `robin webhook`: the mutating admission webhook that makes opting in one annotation (or
//! label). For a pod marked `robin.dev/inject: "true"` it adds what `robin node` needs and the
//! pod would otherwise hand-write: the projected token volume, the trust bundle over the system
//! store (and the variables runtimes read), the `robin await` init container and the
//! annotations. See [`inject`] for what exactly, [`review`] for the protocol.
//!
//! Served over TLS (a cert-manager Secret mounted as files, read at start-up: the Deployment is
//! restarted on renewal like any pod reading a Secret once), HTTP/1.1, `POST /mutate`; `/healthz`
//! and `/readyz` for the kubelet. It reads nothing from the API server: everything is in the
//! review, so it needs no RBAC.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub mod inject;
pub mod pod;
pub mod review;

pub use inject::{Distro, Settings};

pub const ENV_LISTEN: &str = "ROBIN_WEBHOOK_LISTEN";
pub const ENV_CERT: &str = "ROBIN_WEBHOOK_CERT";
pub const ENV_KEY: &str = "ROBIN_WEBHOOK_KEY";
pub const ENV_IMAGE: &str = "ROBIN_WEBHOOK_IMAGE";
pub const ENV_DEFAULT_AUDIENCE: &str = "ROBIN_WEBHOOK_DEFAULT_AUDIENCE";
pub const ENV_DEFAULT_DISTRO: &str = "ROBIN_WEBHOOK_DEFAULT_DISTRO";
pub const ENV_TRUST_BUNDLE: &str = "ROBIN_WEBHOOK_TRUST_BUNDLE";

/// The API server sends at most 3 MiB objects; a review wraps one (twice for UPDATE).
const MAX_BODY: usize = 8 << 20;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}: no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0}: no PEM private key")]
    NoKey(PathBuf),
    #[error("building the TLS config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

#[derive(clap::Args, Debug)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on.
    #[arg(long, env = ENV_LISTEN, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Serving certificate chain (PEM), e.g. a cert-manager Secret's tls.crt.
    #[arg(long, env = ENV_CERT, value_name = "FILE")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = ENV_KEY, value_name = "FILE")]
    pub key: PathBuf,
    /// Image of the injected `robin await` init container.
    #[arg(long, env = ENV_IMAGE)]
    pub await_image: String,
    /// Token audience for pods without a robin.dev/audience annotation (none: such pods are
    /// refused).
    #[arg(long, env = ENV_DEFAULT_AUDIENCE)]
    pub default_audience: Option<String>,
    /// Distro family for pods without a robin.dev/distro annotation.
    #[arg(long, env = ENV_DEFAULT_DISTRO, value_enum, default_value_t = Distro::Debian)]
    pub default_distro: Distro,
    /// The trust bundle ConfigMap mounted into pods (trust-manager's Bundle target).
    #[arg(long, env = ENV_TRUST_BUNDLE, default_value = "robin-trust-bundle")]
    pub trust_bundle: String,
}

impl WebhookArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            await_image: self.await_image.clone(),
            default_audience: self.default_audience.clone(),
            default_distro: self.default_distro,
            trust_bundle: self.trust_bundle.clone(),
        }
    }
}

/// The rustls server config for `cert`/`key` (PEM files), HTTP/1.1 only.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, WebhookError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| WebhookError::Read(p.to_owned(), e));
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| WebhookError::Read(cert.to_owned(), e))?;
    if certs.is_empty() {
        return Err(WebhookError::NoCertificate(cert.to_owned()));
    }
    let key_der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| WebhookError::Read(key.to_owned(), e))?
        .ok_or_else(|| WebhookError::NoKey(key.to_owned()))?;
    let mut config = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves until `shutdown` resolves. One task per connection; reviews are answered in
/// microseconds, so connections in flight are not drained.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    settings: Arc<Settings>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, settings) = (acceptor.clone(), settings.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let svc = service_fn(move |req| {
                let settings = settings.clone();
                async move { Ok::<_, Infallible>(route(req, &settings).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn route(req: Request<Incoming>, settings: &Settings) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz" | "/readyz") => {
            reply(StatusCode::OK, "text/plain", "ok\n".into())
        }
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("reading the review: {e}\n"),
                    );
                }
            };
            match review::respond(&body, settings) {
                Ok(v) => reply(StatusCode::OK, "application/json", v.to_string()),
                Err(e) => {
                    tracing::warn!(error = %e, "unanswerable review");
                    reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"))
                }
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Entry point of `robin webhook`.
pub fn main(args: WebhookArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: WebhookArgs) -> anyhow::Result<ExitCode> {
    tracing::info!(
        listen = %args.listen,
        cert = %args.cert.display(),
        await_image = %args.await_image,
        default_audience = ?args.default_audience,
        default_distro = ?args.default_distro,
        trust_bundle = %args.trust_bundle,
        "webhook starting"
    );
    let tls = tls_config(&args.cert, &args.key)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| WebhookError::Bind(args.listen, e))?;
    serve(
        listener,
        tls,
        Arc::new(args.settings()),
        crate::serve::shutdown_signal()?,
    )
    .await;
    tracing::info!("webhook stopped");
    Ok(ExitCode::SUCCESS)
}
