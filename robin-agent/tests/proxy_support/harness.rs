//! Shared fixtures for the proxy tests: CAs (the kit's `robin_e2e::pki`), a recording upstream (TLS or plain), a front
//! listener that hands accepted sockets to `Proxy::serve`, and hyper clients.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use robin_agent::{
    capture::{ClientAddr, OrigDst},
    config::{self, ConfigArgs},
    proxy::{Limits, Proxy},
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc},
};

pub const HOST: &str = "broker.test";
pub const WILD_HOST: &str = "a.api.test";
pub const OTHER_HOST: &str = "other.test";
/// Every test step is bounded by this.
pub const STEP: Duration = Duration::from_secs(20);

pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

/// The kit's CA (`robin_e2e::pki`), under the name these tests use.
pub use robin_e2e::pki::Ca as TestCa;

/// A scratch directory with a Robin CA, an upstream CA, a token file and a loaded config.
pub struct Env {
    /// Removed when the `Env` drops, also when the test panics.
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub robin_ca: TestCa,
    pub upstream_ca: TestCa,
    pub token_path: PathBuf,
    pub cfg: config::Config,
}

impl Env {
    pub fn new(name: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("robin-proxy-{name}-"))
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_owned();
        let robin_ca = TestCa::new("Robin Test CA");
        let upstream_ca = TestCa::new("Upstream Test CA");
        std::fs::write(dir.join("ca.crt"), robin_ca.pem()).unwrap();
        std::fs::write(dir.join("ca.key"), robin_ca.key_pem()).unwrap();
        std::fs::write(dir.join("up.crt"), upstream_ca.pem()).unwrap();
        let token_path = dir.join("token");
        std::fs::write(&token_path, "tok-1\n").unwrap();
        let cfg = load_config(&dir, &token_path, "");
        Self {
            _tmp: tmp,
            dir,
            robin_ca,
            upstream_ca,
            token_path,
            cfg,
        }
    }

    pub fn proxy(&self) -> Proxy {
        Proxy::new(&self.cfg).unwrap()
    }

    /// The config with `extra` TOML lines appended to the rule (e.g. `upstream_tls_port = N`).
    pub fn config_with(&self, extra: &str) -> config::Config {
        load_config(&self.dir, &self.token_path, extra)
    }

    /// A proxy whose rule has `extra` TOML lines appended.
    pub fn rule_proxy(&self, extra: &str) -> Proxy {
        Proxy::new(&self.config_with(extra)).unwrap()
    }

    pub fn proxy_with(&self, limits: Limits) -> Proxy {
        Proxy::with_limits(&self.cfg, limits).unwrap()
    }

    pub fn set_token(&self, value: &str) {
        // Atomic replace, as the kubelet does.
        let tmp = self.dir.join("token.tmp");
        std::fs::write(&tmp, value).unwrap();
        std::fs::rename(tmp, &self.token_path).unwrap();
    }
}

/// The rule's lines that let its token go in cleartext to loopback upstreams.
pub const PLAINTEXT_LOOPBACK: &str = r#"plaintext = { allow_cidrs = ["127.0.0.0/8"] }"#;

/// Originates TLS for the rule's hosts to `port` on the dialled IP.
pub fn tls_port(port: u16) -> String {
    format!("upstream_tls_port = {port}")
}

fn load_config(dir: &std::path::Path, token_path: &std::path::Path, extra: &str) -> config::Config {
    let toml = format!(
        r#"
[tls]
ca_cert = {ca:?}
ca_key = {key:?}
upstream_roots = {up:?}

[[inject]]
hosts = ["{HOST}", "*.api.test"]
source = {{ kind = "file", path = {tok:?} }}
{extra}
"#,
        ca = dir.join("ca.crt"),
        key = dir.join("ca.key"),
        up = dir.join("up.crt"),
        tok = token_path,
    );
    config::from_toml(&toml, "test.toml".as_ref(), &ConfigArgs::default()).unwrap()
}

// ---- a body fed by a channel, for streaming in both directions ----

pub struct ChanBody {
    rx: Option<mpsc::Receiver<Frame<Bytes>>>,
}

impl ChanBody {
    pub fn empty() -> Self {
        Self { rx: None }
    }

    pub fn channel(cap: usize) -> (mpsc::Sender<Frame<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(cap);
        (tx, Self { rx: Some(rx) })
    }

    pub fn full(data: impl Into<Bytes>) -> Self {
        let (tx, body) = Self::channel(1);
        tx.try_send(Frame::data(data.into())).unwrap();
        body
    }
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.rx {
            None => Poll::Ready(None),
            Some(rx) => rx.poll_recv(cx).map(|f| f.map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.rx.is_none() {
            hyper::body::SizeHint::with_exact(0)
        } else {
            hyper::body::SizeHint::default()
        }
    }
}

// ---- the upstream ----

#[derive(Default)]
pub struct Seen {
    /// Requests whose headers reached the upstream.
    pub requests: AtomicU64,
    /// Requests whose body was read completely.
    pub bodies_ok: AtomicU64,
    pub body_bytes: AtomicU64,
    pub conns: AtomicU64,
    /// Connections the upstream has finished serving (closed on its side).
    pub closed: AtomicU64,
    /// Negotiated cipher suite of each TLS connection.
    pub suites: Mutex<Vec<rustls::CipherSuite>>,
    pub last: Mutex<Vec<(String, HeaderMap)>>,
    /// Lets the SSE handler send its second event.
    pub release: Notify,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    pub leaf: Option<CertificateDer<'static>>,
}

impl Upstream {
    pub fn requests(&self) -> u64 {
        self.seen.requests.load(Ordering::SeqCst)
    }

    pub fn last_headers(&self) -> HeaderMap {
        self.seen.last.lock().unwrap().last().unwrap().1.clone()
    }
}

/// A TLS upstream for HOST, WILD_HOST, OTHER_HOST and 127.0.0.1 with a leaf from `ca`.
pub async fn upstream_tls(ca: &TestCa) -> Upstream {
    upstream_tls_alpn(ca, &[b"h2", b"http/1.1"]).await
}

/// As [`upstream_tls`], offering only `alpn`.
pub async fn upstream_tls_alpn(ca: &TestCa, alpn: &[&[u8]]) -> Upstream {
    upstream_tls_with(ca, alpn, None).await
}

/// An HTTP/1.1-only TLS upstream that closes a keep-alive connection after `idle` without a
/// request, as servers with a short keep-alive timeout do.
pub async fn upstream_tls_idle_close(ca: &TestCa, idle: Duration) -> Upstream {
    upstream_tls_with(ca, &[b"http/1.1"], Some(idle)).await
}

async fn upstream_tls_with(ca: &TestCa, alpn: &[&[u8]], idle_close: Option<Duration>) -> Upstream {
    let leaf = ca.leaf(&[HOST, WILD_HOST, OTHER_HOST, "127.0.0.1"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(leaf.server_config(alpn));
    let leaf = leaf.cert.der().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let s = s.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                s.conns.fetch_add(1, Ordering::SeqCst);
                if let Some(suite) = tls.get_ref().1.negotiated_cipher_suite() {
                    s.suites.lock().unwrap().push(suite.suite());
                }
                serve_upstream(TokioIo::new(tls), s, idle_close).await;
            });
        }
    });
    Upstream {
        addr,
        seen,
        leaf: Some(leaf),
    }
}

pub async fn upstream_plain() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let s = s.clone();
            s.conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_upstream(TokioIo::new(tcp), s, None));
        }
    });
    Upstream {
        addr,
        seen,
        leaf: None,
    }
}

async fn serve_upstream<I>(io: I, seen: Arc<Seen>, idle_close: Option<Duration>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let s = seen.clone();
    let svc = hyper::service::service_fn(move |req| upstream_handler(s.clone(), req));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Some(idle) = idle_close {
        // hyper's header read timer also runs while a keep-alive connection waits.
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(idle);
    }
    let _ = builder.serve_connection_with_upgrades(io, svc).await;
    seen.closed.fetch_add(1, Ordering::SeqCst);
}

fn joined(h: &HeaderMap, name: &str) -> String {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("?"))
        .collect::<Vec<_>>()
        .join(" | ")
}

async fn upstream_handler(
    seen: Arc<Seen>,
    mut req: Request<Incoming>,
) -> Result<Response<ChanBody>, Infallible> {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    seen.last
        .lock()
        .unwrap()
        .push((path.clone(), req.headers().clone()));
    let mut resp = Response::new(ChanBody::empty());
    let auth = joined(req.headers(), "authorization");
    let auth_count = req.headers().get_all("authorization").iter().count();
    resp.headers_mut()
        .insert("x-seen-auth", HeaderValue::from_str(&auth).unwrap());
    resp.headers_mut()
        .insert("x-seen-auth-count", auth_count.into());
    resp.headers_mut().insert(
        "x-seen-version",
        HeaderValue::from_str(&format!("{:?}", req.version())).unwrap(),
    );
    match path.as_str() {
        "/ws" => {
            let up = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = up.await else { return };
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                // Echo until the client closes; bounded by STEP.
                let _ = tokio::time::timeout(STEP, async {
                    loop {
                        let n = io.read(&mut buf).await.unwrap_or(0);
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                })
                .await;
            });
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert("upgrade", HeaderValue::from_static("websocket"));
            resp.headers_mut()
                .insert("connection", HeaderValue::from_static("Upgrade"));
        }
        "/sse" => {
            let (tx, body) = ChanBody::channel(4);
            tokio::spawn(async move {
                let _ = tx
                    .send(Frame::data(Bytes::from_static(b"data: one\n\n")))
                    .await;
                let _ = tokio::time::timeout(STEP, seen.release.notified()).await;
                let _ = tx
                    .send(Frame::data(Bytes::from_static(b"data: two\n\n")))
                    .await;
            });
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            *resp.body_mut() = body;
        }
        "/grpc" => {
            let te = joined(req.headers(), "te");
            let n = drain(req.into_body()).await;
            if n.is_some() {
                seen.bodies_ok.fetch_add(1, Ordering::SeqCst);
            }
            let (tx, body) = ChanBody::channel(4);
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("x-seen-te", HeaderValue::from_str(&te).unwrap());
            tx.try_send(Frame::data(Bytes::from_static(b"\0\0\0\0\0")))
                .unwrap();
            tx.try_send(Frame::trailers(trailers)).unwrap();
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            *resp.body_mut() = body;
        }
        _ => {
            if let Some(n) = drain(req.into_body()).await {
                seen.bodies_ok.fetch_add(1, Ordering::SeqCst);
                seen.body_bytes.fetch_add(n, Ordering::SeqCst);
                resp.headers_mut().insert("x-body-len", n.into());
            }
            *resp.body_mut() = ChanBody::full("ok");
        }
    }
    Ok(resp)
}

/// Reads a body to the end without keeping it.
async fn drain(mut body: Incoming) -> Option<u64> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            n += data.len() as u64;
        }
    }
    Some(n)
}

/// A raw TCP echo server (not HTTP, not TLS).
pub async fn upstream_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::time::timeout(STEP, tokio::io::copy(&mut r, &mut w)).await;
            });
        }
    });
    addr
}

// ---- the proxy front and clients ----

/// A listener whose every connection goes to `proxy.serve` with `orig` as the destination.
pub async fn front(proxy: Proxy, orig: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.serve(tcp, OrigDst(orig), ClientAddr(peer)).await });
        }
    });
    addr
}

pub fn client_config(root_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

pub async fn tls_connect(
    addr: SocketAddr,
    root_pem: &str,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<ClientTls> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(client_config(root_pem, alpn));
    connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
}

pub async fn h1<I>(io: I) -> hyper::client::conn::http1::SendRequest<ChanBody>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

pub async fn h2<I>(io: I) -> hyper::client::conn::http2::SendRequest<ChanBody>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

pub fn get(uri: &str, host: &str) -> Request<ChanBody> {
    Request::get(uri)
        .header("host", host)
        .body(ChanBody::empty())
        .unwrap()
}

pub async fn body_string(resp: Response<Incoming>) -> String {
    let bytes = within(resp.into_body().collect()).await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub fn header(resp: &Response<Incoming>, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// An h2 client of Robin (TLS for HOST, Robin's CA trusted) whose dialled address is `up`.
pub async fn h2_via_robin(
    env: &Env,
    up: &Upstream,
) -> hyper::client::conn::http2::SendRequest<ChanBody> {
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, &[b"h2"]))
        .await
        .unwrap();
    within(h2(tls)).await
}

/// Reads the upstream's `/sse` stream: the first event must arrive while the upstream still
/// holds the second back (it sends it once released).
pub async fn assert_sse_streams(
    send: &mut hyper::client::conn::http1::SendRequest<ChanBody>,
    up: &Upstream,
) {
    let resp = within(send.send_request(get("/sse", HOST))).await.unwrap();
    let mut body = resp.into_body();
    let first = within(body.frame()).await.unwrap().unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: one\n\n")
    );
    up.seen.release.notify_one();
    let second = within(body.frame()).await.unwrap().unwrap();
    assert_eq!(
        second.into_data().unwrap(),
        Bytes::from_static(b"data: two\n\n")
    );
}
