//! `robin oidc-gateway` against an upstream double: a real HTTPS server on 127.0.0.1 with a
//! throwaway CA, which checks the bearer token and counts its calls per document.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::TokioIo;
use robin_agent::oidc_gateway::{Gateway, GatewayArgs};
use robin_e2e::{TempDir, pki::Ca, temp_dir};
use tokio::{net::TcpListener, sync::oneshot};

const DISCOVERY: &str = "/.well-known/openid-configuration";
const JWKS: &str = "/openid/v1/jwks";
/// Upper bound for any polling loop in these tests.
const POLL_LIMIT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Fixtures

#[derive(Default)]
struct DoubleState {
    expected_token: Mutex<String>,
    last_bearer: Mutex<Option<String>>,
    discovery_calls: AtomicUsize,
    jwks_calls: AtomicUsize,
    other_calls: AtomicUsize,
    bad_auth: AtomicUsize,
    /// Answer 500 to everything.
    failing: AtomicBool,
    /// Changes the served JWKS, so a new ETag is expected.
    jwks_version: AtomicUsize,
    delay: Mutex<Duration>,
}

impl DoubleState {
    fn calls(&self, path: &str) -> usize {
        match path {
            DISCOVERY => self.discovery_calls.load(Ordering::SeqCst),
            JWKS => self.jwks_calls.load(Ordering::SeqCst),
            _ => self.other_calls.load(Ordering::SeqCst),
        }
    }

    fn total_calls(&self) -> usize {
        self.calls(DISCOVERY) + self.calls(JWKS) + self.calls("")
    }
}

/// The API server stand-in.
struct Double {
    addr: SocketAddr,
    ca: Ca,
    state: Arc<DoubleState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Double {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Double {
    async fn start(token: &str) -> Self {
        let ca = Ca::new("OIDC Test CA");
        let config = ca.leaf(&["127.0.0.1"]).server_config(&[b"http/1.1"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(DoubleState::default());
        *state.expected_token.lock().unwrap() = token.to_owned();
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = task_state.clone();
                tokio::spawn(async move {
                    // A client that does not trust our CA fails here; nothing to serve.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca,
            state,
            task,
        }
    }
}

async fn answer<B>(state: &DoubleState, req: Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        DISCOVERY => state.discovery_calls.fetch_add(1, Ordering::SeqCst),
        JWKS => state.jwks_calls.fetch_add(1, Ordering::SeqCst),
        _ => state.other_calls.fetch_add(1, Ordering::SeqCst),
    };
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    *state.last_bearer.lock().unwrap() = bearer.clone();
    let respond = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    if bearer.as_deref() != Some(state.expected_token.lock().unwrap().as_str()) {
        state.bad_auth.fetch_add(1, Ordering::SeqCst);
        return respond(StatusCode::UNAUTHORIZED, r#"{"kind":"Status"}"#.to_owned());
    }
    if state.failing.load(Ordering::SeqCst) {
        return respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"kind":"Status"}"#.to_owned(),
        );
    }
    match path.as_str() {
        DISCOVERY => respond(
            StatusCode::OK,
            r#"{"issuer":"https://kubernetes.default.svc.cluster.local","jwks_uri":"https://10.0.0.1:6443/openid/v1/jwks","response_types_supported":["id_token"],"subject_types_supported":["public"],"id_token_signing_alg_values_supported":["RS256"]}"#.to_owned(),
        ),
        JWKS => respond(
            StatusCode::OK,
            format!(
                r#"{{"keys":[{{"use":"sig","kty":"RSA","kid":"key-{}","alg":"RS256","n":"xyz","e":"AQAB"}}]}}"#,
                state.jwks_version.load(Ordering::SeqCst)
            ),
        ),
        _ => respond(StatusCode::NOT_FOUND, "{}".to_owned()),
    }
}

/// A gateway serving on 127.0.0.1, configured against a [`Double`].
struct Harness {
    gateway: Gateway,
    addr: SocketAddr,
    double: Double,
    dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

impl Harness {
    /// `tweak` adjusts the defaults below; the gateway does not warm up unless asked to.
    async fn start(name: &str, tweak: impl FnOnce(&mut GatewayArgs)) -> Self {
        let double = Double::start("token-one").await;
        let dir = temp_dir(&format!("oidc-{name}"));
        std::fs::write(dir.path().join("token"), "token-one\n").unwrap();
        std::fs::write(dir.path().join("ca.crt"), double.ca.pem()).unwrap();
        let mut args = GatewayArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: format!("https://{}", double.addr),
            token_file: dir.path().join("token"),
            ca_file: dir.path().join("ca.crt"),
            cache_ttl: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(1),
            upstream_timeout: Duration::from_secs(2),
            ..GatewayArgs::default()
        };
        tweak(&mut args);
        let gateway = Gateway::new(&args).unwrap();
        let listener = TcpListener::bind(args.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let serving = tokio::spawn({
            let gateway = gateway.clone();
            async move {
                gateway
                    .serve(listener, async move {
                        let _ = rx.await;
                    })
                    .await
            }
        });
        Self {
            gateway,
            addr,
            double,
            dir,
            shutdown: Some(tx),
            serving,
        }
    }

    fn upstream(&self) -> &DoubleState {
        &self.double.state
    }

    async fn get(&self, path: &str) -> Reply {
        request(self.addr, Method::GET, path, &[]).await
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// One request on a fresh connection.
async fn request(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = sender
        .send_request(builder.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    driver.abort();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn poll_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + POLL_LIMIT;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one sample line in the exposition, e.g. `name{document="jwks"}`.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_both_documents_with_validators_and_cache_headers() {
    let h = Harness::start("serve", |_| {}).await;
    let discovery = h.get(DISCOVERY).await;
    assert_eq!(discovery.status, StatusCode::OK);
    assert_eq!(discovery.header("content-type"), Some("application/json"));
    assert_eq!(
        discovery.header("cache-control"),
        Some("public, max-age=60")
    );
    let json: serde_json::Value = serde_json::from_slice(&discovery.body).unwrap();
    assert_eq!(
        json["issuer"],
        "https://kubernetes.default.svc.cluster.local"
    );
    let jwks = h.get(JWKS).await;
    assert_eq!(jwks.status, StatusCode::OK);
    assert_eq!(
        jwks.header("content-type"),
        Some("application/jwk-set+json")
    );
    let json: serde_json::Value = serde_json::from_slice(&jwks.body).unwrap();
    assert_eq!(json["keys"][0]["kid"], "key-0");
    // Strong ETag: quoted, no W/ prefix, and different documents differ.
    let (a, b) = (
        discovery.header("etag").unwrap(),
        jwks.header("etag").unwrap(),
    );
    assert!(a.starts_with('"') && a.ends_with('"') && a.len() > 2, "{a}");
    assert_ne!(a, b);
    assert_eq!(h.upstream().bad_auth.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gets_make_one_upstream_call() {
    let h = Harness::start("cache", |_| {}).await;
    let first = h.get(JWKS).await;
    let second = h.get(JWKS).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(first.header("x-robin-cache"), Some("miss"));
    assert_eq!(second.header("x-robin-cache"), Some("hit"));
    assert_eq!(first.body, second.body);
    assert_eq!(first.header("etag"), second.header("etag"));
    assert_eq!(h.upstream().calls(JWKS), 1);
    assert_eq!(h.upstream().calls(DISCOVERY), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_burst_is_single_flight() {
    let h = Harness::start("burst", |_| {}).await;
    // Slow upstream: the whole burst arrives while the first fetch is in flight.
    *h.upstream().delay.lock().unwrap() = Duration::from_millis(300);
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..100 {
        let addr = h.addr;
        let path = if i % 2 == 0 { DISCOVERY } else { JWKS };
        requests.spawn(async move { request(addr, Method::GET, path, &[]).await });
    }
    let mut bodies = std::collections::HashSet::new();
    while let Some(reply) = requests.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        bodies.insert(reply.body);
    }
    assert_eq!(bodies.len(), 2);
    assert_eq!(h.upstream().calls(DISCOVERY), 1);
    assert_eq!(h.upstream().calls(JWKS), 1);
    let metrics = String::from_utf8(h.get("/metrics").await.body.to_vec()).unwrap();
    for doc in ["openid-configuration", "jwks"] {
        let misses = format!("robin_oidc_cache_misses_total{{document=\"{doc}\"}}");
        let hits = format!("robin_oidc_cache_hits_total{{document=\"{doc}\"}}");
        assert_eq!(sample(&metrics, &misses), 1, "{metrics}");
        assert_eq!(sample(&metrics, &hits), 49, "{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_copy_served_when_upstream_fails_after_ttl() {
    let ttl = Duration::from_millis(300);
    let h = Harness::start("stale", |a| a.cache_ttl = ttl).await;
    let fresh = h.get(JWKS).await;
    assert_eq!(fresh.status, StatusCode::OK);
    h.upstream().failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;

    let stale = h.get(JWKS).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.body, fresh.body);
    assert_eq!(stale.header("etag"), fresh.header("etag"));
    assert_eq!(stale.header("x-robin-cache"), Some("stale"));
    assert_eq!(stale.header("warning"), Some("110 - \"Response is Stale\""));
    assert_eq!(stale.header("cache-control"), Some("public, max-age=0"));
    // It did try the upstream once more before falling back.
    assert_eq!(h.upstream().calls(JWKS), 2);

    let metrics = String::from_utf8(h.get("/metrics").await.body.to_vec()).unwrap();
    assert_eq!(
        sample(&metrics, "robin_oidc_stale_served_total{document=\"jwks\"}"),
        1
    );
    assert_eq!(
        sample(
            &metrics,
            "robin_oidc_upstream_errors_total{document=\"jwks\"}"
        ),
        1
    );

    // Recovery: after the error backoff (here the TTL) the next request fetches again.
    h.upstream().failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let recovered = h.get(JWKS).await;
    assert_eq!(recovered.header("x-robin-cache"), Some("miss"));
    assert_eq!(recovered.header("warning"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_failure_is_502() {
    let h = Harness::start("cold-502", |_| {}).await;
    h.upstream().failing.store(true, Ordering::SeqCst);
    let reply = h.get(DISCOVERY).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.header("etag"), None);
    assert_eq!(h.upstream().calls(DISCOVERY), 1);
    assert!(!h.gateway.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_revalidates_with_304() {
    let ttl = Duration::from_millis(200);
    let h = Harness::start("etag", |a| a.cache_ttl = ttl).await;
    let first = h.get(JWKS).await;
    let etag = first.header("etag").unwrap().to_owned();

    let same = request(h.addr, Method::GET, JWKS, &[("if-none-match", &etag)]).await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED);
    assert!(same.body.is_empty());
    assert_eq!(same.header("etag"), Some(etag.as_str()));
    assert!(same.header("cache-control").is_some());

    let weak_in_list = format!("\"nope\", W/{etag}");
    let listed = request(
        h.addr,
        Method::GET,
        JWKS,
        &[("if-none-match", &weak_in_list)],
    )
    .await;
    assert_eq!(listed.status, StatusCode::NOT_MODIFIED);

    let other = request(h.addr, Method::GET, JWKS, &[("if-none-match", "\"nope\"")]).await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.body, first.body);

    // Keys rotate upstream: once the TTL passes, the old validator no longer matches.
    h.upstream().jwks_version.store(1, Ordering::SeqCst);
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let rotated = request(h.addr, Method::GET, JWKS, &[("if-none-match", &etag)]).await;
    assert_eq!(rotated.status, StatusCode::OK);
    assert_ne!(rotated.header("etag"), Some(etag.as_str()));
    assert_ne!(rotated.body, first.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_other_path_is_404_and_other_methods_405() {
    let h = Harness::start("404", |_| {}).await;
    for path in [
        "/",
        "/openid/v1/jwks/",
        "/openid/v1",
        "/.well-known/openid-configuration/x",
        "/.well-known/oauth-authorization-server",
        "/api/v1/namespaces",
        "/metricsz",
    ] {
        let reply = h.get(path).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
    }
    let post = request(h.addr, Method::POST, JWKS, &[]).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    // Nothing above reached the API server.
    assert_eq!(h.upstream().total_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_has_the_get_headers_and_no_body() {
    let h = Harness::start("head", |_| {}).await;
    let head = request(h.addr, Method::HEAD, DISCOVERY, &[]).await;
    let get = h.get(DISCOVERY).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert!(!get.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    for name in ["etag", "cache-control", "content-type"] {
        assert_eq!(head.header(name), get.header(name), "{name}");
    }
    let probe = request(h.addr, Method::HEAD, "/healthz", &[]).await;
    assert_eq!(probe.status, StatusCode::OK);
    assert!(probe.body.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_reread_after_rotation() {
    let ttl = Duration::from_millis(200);
    let h = Harness::start("rotation", |a| a.cache_ttl = ttl).await;
    assert_eq!(h.get(JWKS).await.status, StatusCode::OK);
    assert_eq!(
        h.upstream().last_bearer.lock().unwrap().as_deref(),
        Some("token-one")
    );

    // The kubelet swaps the file; the API server now only accepts the new token.
    std::fs::write(h.dir.path().join("token"), "token-two\n").unwrap();
    *h.upstream().expected_token.lock().unwrap() = "token-two".to_owned();
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;

    let reply = h.get(JWKS).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-robin-cache"), Some("miss"));
    assert_eq!(
        h.upstream().last_bearer.lock().unwrap().as_deref(),
        Some("token-two")
    );
    assert_eq!(h.upstream().bad_auth.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_after_warm_up_and_probes_never_hit_upstream() {
    let h = Harness::start("ready", |a| a.cache_ttl = Duration::from_millis(100)).await;
    h.upstream().failing.store(true, Ordering::SeqCst);
    let warm_up = h.gateway.spawn_warm_up();
    poll_until("a failed warm-up fetch", async || {
        h.upstream().total_calls() > 0
    })
    .await;
    assert_eq!(
        h.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(h.get("/healthz").await.status, StatusCode::OK);

    h.upstream().failing.store(false, Ordering::SeqCst);
    poll_until("readyz", async || {
        h.get("/readyz").await.status == StatusCode::OK
    })
    .await;
    tokio::time::timeout(POLL_LIMIT, warm_up)
        .await
        .expect("warm-up ends once ready")
        .unwrap();

    let calls = h.upstream().total_calls();
    // Probes and metrics are served from memory, even with every cached copy expired.
    tokio::time::sleep(Duration::from_millis(150)).await;
    for path in ["/readyz", "/healthz", "/metrics", "/readyz"] {
        assert_eq!(h.get(path).await.status, StatusCode::OK, "{path}");
    }
    assert_eq!(h.upstream().total_calls(), calls);
    // Readiness survives a later outage: stale copies are still served.
    h.upstream().failing.store(true, Ordering::SeqCst);
    assert_eq!(h.get(JWKS).await.header("x-robin-cache"), Some("stale"));
    assert_eq!(h.get("/readyz").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exposition_format() {
    let h = Harness::start("metrics", |_| {}).await;
    h.get(JWKS).await;
    h.get(JWKS).await;
    let reply = h.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    // OpenMetrics: a counter family is named without `_total`; its samples carry it.
    for family in [
        "robin_oidc_cache_hits",
        "robin_oidc_cache_misses",
        "robin_oidc_stale_served",
        "robin_oidc_upstream_errors",
    ] {
        assert!(text.contains(&format!("# HELP {family} ")), "{text}");
        assert!(
            text.contains(&format!("# TYPE {family} counter\n")),
            "{text}"
        );
    }
    assert_eq!(
        sample(&text, "robin_oidc_cache_hits_total{document=\"jwks\"}"),
        1
    );
    assert_eq!(
        sample(&text, "robin_oidc_cache_misses_total{document=\"jwks\"}"),
        1
    );
    assert_eq!(
        sample(
            &text,
            "robin_oidc_cache_misses_total{document=\"openid-configuration\"}"
        ),
        0
    );
    assert!(text.ends_with("\n# EOF\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_a_certificate_from_another_ca_is_refused() {
    let other = Ca::new("Other CA");
    let dir = temp_dir("oidc-other-ca");
    let other_ca = dir.path().join("other.crt");
    std::fs::write(&other_ca, other.pem()).unwrap();
    let h = Harness::start("untrusted", |a| a.ca_file = other_ca.clone()).await;
    assert_eq!(h.get(JWKS).await.status, StatusCode::BAD_GATEWAY);
    // The handshake failed: no request, so no token, ever reached the server.
    assert_eq!(h.upstream().total_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_upstream_response_is_refused() {
    let h = Harness::start("too-large", |a| a.max_body_bytes = 32).await;
    assert_eq!(h.get(DISCOVERY).await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(h.upstream().calls(DISCOVERY), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_printing_is_optional() {
    let h = Harness::start("pretty", |a| a.pretty = true).await;
    let reply = h.get(DISCOVERY).await;
    let text = std::str::from_utf8(&reply.body).unwrap();
    assert!(text.starts_with("{\n  \""), "{text}");
    let compact = Harness::start("compact", |_| {}).await;
    let reply = compact.get(DISCOVERY).await;
    assert!(!reply.body.contains(&b'\n') || reply.body.ends_with(b"}\n"));
    assert_eq!(reply.body.iter().filter(|&&b| b == b'\n').count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_serving() {
    let mut h = Harness::start("shutdown", |_| {}).await;
    assert_eq!(h.get("/healthz").await.status, StatusCode::OK);
    h.shutdown.take().unwrap().send(()).unwrap();
    tokio::time::timeout(POLL_LIMIT, &mut h.serving)
        .await
        .expect("serve returns after the shutdown signal")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(h.addr).await.is_err());
}

/// Set in the child process of [`token_never_reaches_a_log_line`].
const LOG_CHILD_ENV: &str = "ROBIN_OIDC_TEST_LOG_CHILD";

/// Every log record, at TRACE, of a fetch that succeeds and of one refused with 401 must leave
/// the token out. Runs in a child process of this test binary: only there can a global
/// subscriber be installed, and a thread-local one misses records whose callsites other tests'
/// threads registered first.
#[test]
fn token_never_reaches_a_log_line() {
    if std::env::var_os(LOG_CHILD_ENV).is_some() {
        return log_child();
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "token_never_reaches_a_log_line",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LOG_CHILD_ENV, "1")
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed:\n{logs}");
    // The records are there at all: otherwise the last check proves nothing.
    assert!(logs.contains("upstream fetch failed"), "{logs}");
    assert!(logs.contains("answered 401"), "{logs}");
    assert!(logs.contains("fetched"), "{logs}");
    assert!(!logs.contains("token-one"), "{logs}");
}

fn log_child() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let h = Harness::start("no-token-logs", |_| {}).await;
        assert_eq!(h.get(JWKS).await.status, StatusCode::OK);
        *h.upstream().expected_token.lock().unwrap() = "something-else".to_owned();
        assert_eq!(h.get(DISCOVERY).await.status, StatusCode::BAD_GATEWAY);
    });
}
