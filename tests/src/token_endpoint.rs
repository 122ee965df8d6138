//! Token-endpoint doubles for the identity tests (OAuth token endpoints, STS, a TLS API
//! server answering TokenRequests with chosen statuses): an HTTP(S) server on 127.0.0.1 running
//! a handler, JWT and form helpers, and an identity context with short timeouts.
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use robin_agent::identity::{CachePolicy, HttpSettings, IdentityContext};
use tempfile::TempDir;

pub struct Req {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Req {
    pub fn form(&self) -> HashMap<String, String> {
        form_decode(std::str::from_utf8(&self.body).unwrap())
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.to_string(),
        }
    }
}

pub type Handler = Arc<dyn Fn(Req) -> Pin<Box<dyn Future<Output = Resp> + Send>> + Send + Sync>;

pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    Arc::new(move |r| Box::pin(f(r)))
}

/// A test CA and a server certificate for `localhost` / 127.0.0.1 signed by it.
pub struct TestCa {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

pub fn test_ca() -> TestCa {
    let ca = crate::pki::Ca::new("Identity Test CA");
    TestCa {
        ca_pem: ca.pem(),
        server: ca.leaf(&["localhost", "127.0.0.1"]).server_config(&[]),
    }
}

/// Serves `handler` on 127.0.0.1 (TLS when `tls` is given); counts requests.
pub async fn serve(
    handler: Handler,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (handler, counter, tls) = (handler.clone(), counter.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (handler, counter) = (handler.clone(), counter.clone());
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let r = handler(Req {
                            method: parts.method,
                            path: parts.uri.path().to_owned(),
                            headers: parts.headers,
                            body,
                        })
                        .await;
                        let mut resp =
                            Response::builder().status(StatusCode::from_u16(r.status).unwrap());
                        for (k, v) in r.headers {
                            resp = resp.header(k, v);
                        }
                        Ok::<_, std::convert::Infallible>(
                            resp.body(Full::new(Bytes::from(r.body))).unwrap(),
                        )
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(cfg) => {
                        let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await
                        else {
                            return;
                        };
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                }
            });
        }
    });
    (addr, count)
}

pub fn count(c: &AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

/// An unsigned-looking compact JWT with `exp` = now + `exp_in` seconds and `extra` claims.
pub fn jwt(exp_in: i64, extra: serde_json::Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut claims = extra;
    claims["exp"] = serde_json::json!(now + exp_in);
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.c2ln",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

/// The fields of an `application/x-www-form-urlencoded` body.
pub fn form_decode(s: &str) -> HashMap<String, String> {
    form_urlencoded::parse(s.as_bytes()).into_owned().collect()
}

/// A fresh scratch directory per test, removed when dropped (also when the test fails).
pub fn scratch(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("robin-id-{name}-"))
        .tempdir()
        .expect("creating a scratch directory")
}

/// Short real-time knobs so refresh and expiry happen within a second or two.
pub fn fast_policy() -> CachePolicy {
    CachePolicy {
        refresh_ahead: Duration::from_secs(1),
        skew: Duration::ZERO,
        min_lifetime: Duration::from_secs(1),
        max_lifetime: Duration::from_secs(3600),
        max_entries: 100,
        failure_backoff: Duration::from_millis(100),
    }
}

pub fn context(sa_dir: PathBuf) -> IdentityContext {
    let mut ctx = IdentityContext::new(fast_policy());
    ctx.http = HttpSettings {
        connect_timeout: Duration::from_millis(500),
        total_timeout: Duration::from_millis(500),
        ..HttpSettings::default()
    };
    ctx.service_account_dir = sa_dir;
    ctx
}
