//! In-process tests of `Proxy::serve`: injection over TLS (h1, h2) and plain HTTP, rotation,
//! passthrough, failure answers, streaming, upgrades and limits.
#[path = "proxy_support/harness.rs"]
mod harness;

use std::{sync::atomic::Ordering, time::Duration};

use harness::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use robin_agent::metrics::StatusClass;
use robin_agent::proxy::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];

#[tokio::test]
async fn injects_over_tls_h1_replacing_placeholders() {
    let env = Env::new("inject-h1");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut send = within(h1(tls)).await;
    let req = Request::get("/echo?secret=1")
        .header("host", HOST)
        .header("Authorization", "Bearer placeholder")
        .header("authorization", "Basic second")
        .header("x-keep", "yes")
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
    assert_eq!(header(&resp, "x-seen-auth-count"), "1");
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/1.1");
    assert_eq!(body_string(resp).await, "ok");
    let seen = up.last_headers();
    assert_eq!(seen.get("x-keep").unwrap(), "yes");
    assert_eq!(seen.get("host").unwrap(), HOST);
}

#[tokio::test]
async fn aes128_gcm_sha256_is_chosen_downstream_and_offered_first_upstream() {
    use rustls::CipherSuite as S;
    let env = Env::new("suites");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    // The client (rustls defaults) lists AES-256-GCM first; Robin's order wins.
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(suite, S::TLS13_AES_128_GCM_SHA256);
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The upstream (rustls, honouring the client's order) picks what Robin offered first.
    assert_eq!(
        *up.seen.suites.lock().unwrap(),
        vec![S::TLS13_AES_128_GCM_SHA256]
    );

    // TLS 1.2 clients get the ECDHE-ECDSA AES-128 suite (minted leaves are P-256).
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates({
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut env.robin_ca.pem().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    })
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = within(
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(HOST.try_into().unwrap(), tcp),
    )
    .await
    .unwrap();
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(suite, S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
}

#[tokio::test]
async fn injects_over_tls_h2_and_wildcard_host() {
    let env = Env::new("inject-h2");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), WILD_HOST, H2))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut send = within(h2(tls)).await;
    let req = Request::get(format!("https://{WILD_HOST}/echo"))
        .header("authorization", "placeholder")
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
    assert_eq!(header(&resp, "x-seen-auth-count"), "1");
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/2.0");
}

#[tokio::test]
async fn h2_workload_to_http1_only_upstream() {
    let env = Env::new("h2-to-h1");
    let up = upstream_tls_alpn(&env.upstream_ca, &[b"http/1.1"]).await;
    let send = h2_via_robin(&env, &up).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut send = send.clone();
        set.spawn(async move {
            let req = Request::get(format!("https://{HOST}/echo"))
                .body(ChanBody::empty())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            (
                header(&resp, "x-seen-auth"),
                header(&resp, "x-seen-version"),
            )
        });
    }
    while let Some(r) = within(set.join_next()).await {
        assert_eq!(r.unwrap(), ("Bearer tok-1".into(), "HTTP/1.1".into()));
    }
    assert_eq!(up.requests(), 4);
    assert_eq!(up.last_headers().get("host").unwrap(), HOST);
}

#[tokio::test]
async fn injects_over_allowed_plain_http_and_forwards_other_hosts_untouched() {
    let env = Env::new("plain");
    let up = upstream_plain().await;
    let addr = front(env.rule_proxy(PLAINTEXT_LOOPBACK), up.addr).await;
    let mut send = within(h1(tokio::net::TcpStream::connect(addr).await.unwrap())).await;
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");

    // No rule for this Host: forwarded with the workload's own credential, no token.
    let mut send = within(h1(tokio::net::TcpStream::connect(addr).await.unwrap())).await;
    let req = Request::get("/echo")
        .header("host", OTHER_HOST)
        .header("authorization", "mine")
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "mine");
}

#[tokio::test]
async fn rotation_is_seen_between_requests_on_one_connection() {
    let env = Env::new("rotate");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
    body_string(resp).await;
    env.set_token("tok-2");
    within(send.ready()).await.unwrap();
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-2");
    // Both requests used one upstream connection.
    assert_eq!(up.seen.conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn passthrough_presents_the_upstream_certificate() {
    let env = Env::new("passthrough");
    let up = upstream_tls(&env.upstream_ca).await;
    let proxy = env.proxy();
    let addr = front(proxy.clone(), up.addr).await;
    // The client trusts only the upstream CA: this works only if Robin did not terminate.
    let tls = within(tls_connect(addr, &env.upstream_ca.pem(), OTHER_HOST, H1))
        .await
        .unwrap();
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(Some(peer), up.leaf.clone());
    let mut send = within(h1(tls)).await;
    let req = Request::get("/echo")
        .header("host", OTHER_HOST)
        .header("authorization", "mine")
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "mine");
    assert_eq!(proxy.leaf_stats().mints.get(), 0);
}

#[tokio::test]
async fn no_sni_and_unknown_protocols_are_spliced() {
    let env = Env::new("no-sni");
    let up = upstream_tls(&env.upstream_ca).await;
    let proxy = env.proxy();
    let addr = front(proxy.clone(), up.addr).await;
    // An IP address as server name: rustls sends no SNI.
    let tls = within(tls_connect(addr, &env.upstream_ca.pem(), "127.0.0.1", H1))
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.peer_certificates().unwrap()[0],
        up.leaf.clone().unwrap()
    );
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    // Even though the Host header matches a rule, nothing was decrypted or injected.
    assert_eq!(header(&resp, "x-seen-auth"), "");

    let echo = upstream_echo().await;
    let addr = front(proxy.clone(), echo).await;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    within(tcp.write_all(b"\x00\x01 not http, not tls"))
        .await
        .unwrap();
    let mut buf = [0u8; 20];
    within(tcp.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"\x00\x01 not http, not tls");
    assert_eq!(proxy.stats().conn_intercepted.get(), 0);
    assert_eq!(proxy.leaf_stats().mints.get(), 0);
}

#[tokio::test]
async fn other_host_on_an_intercepted_connection_gets_no_token() {
    let env = Env::new("fronting");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/echo", OTHER_HOST)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-auth"), "");
    assert_eq!(up.last_headers().get("host").unwrap(), OTHER_HOST);
}

#[tokio::test]
async fn identity_unavailable_is_503_and_nothing_is_forwarded() {
    let env = Env::new("503");
    let up = upstream_tls(&env.upstream_ca).await;
    let proxy = env.proxy();
    let addr = front(proxy.clone(), up.addr).await;
    std::fs::remove_file(&env.token_path).unwrap();
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(header(&resp, "content-type").starts_with("text/plain"));
    let body = body_string(resp).await;
    assert!(body.contains("identity unavailable"), "{body}");

    // A token that would split the header is refused the same way.
    env.set_token("abc\r\nX-Evil: 1");
    within(send.ready()).await.unwrap();
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = body_string(resp).await;
    assert!(!body.contains("abc"), "{body}");

    assert_eq!(up.requests(), 0);
    // Not even connected.
    assert_eq!(up.seen.conns.load(Ordering::SeqCst), 0);
    let rule = &proxy.rules()[0].stats;
    assert_eq!(rule.identity_errors.get(), 2);
    assert_eq!(rule.requests.get(StatusClass::ServerError), 2);
}

#[tokio::test]
async fn dead_upstream_port_is_502_once() {
    let env = Env::new("502-dead");
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let proxy = env.proxy();
    let addr = front(proxy.clone(), dead).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(proxy.stats().upstream_errors.get(), 1);

    // h2: concurrent streams all get 502 promptly.
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H2))
        .await
        .unwrap();
    let send = within(h2(tls)).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let mut send = send.clone();
        set.spawn(async move {
            let req = Request::get(format!("https://{HOST}/echo"))
                .body(ChanBody::empty())
                .unwrap();
            send.send_request(req).await.unwrap().status()
        });
    }
    while let Some(status) = within(set.join_next()).await {
        assert_eq!(status.unwrap(), StatusCode::BAD_GATEWAY);
    }
}

#[tokio::test]
async fn untrusted_upstream_is_502_and_receives_nothing() {
    let env = Env::new("502-untrusted");
    let rogue_ca = TestCa::new("Rogue CA");
    let up = upstream_tls(&rogue_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    for alpn in [H1, H2] {
        let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, alpn))
            .await
            .unwrap();
        let resp = if alpn == H1 {
            let mut send = within(h1(tls)).await;
            within(send.send_request(get("/echo", HOST))).await.unwrap()
        } else {
            let mut send = within(h2(tls)).await;
            let req = Request::get(format!("https://{HOST}/echo"))
                .body(ChanBody::empty())
                .unwrap();
            within(send.send_request(req)).await.unwrap()
        };
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    }
    assert_eq!(up.requests(), 0);
    assert_eq!(up.seen.conns.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn h2_with_100_concurrent_streams_on_one_upstream_connection() {
    let env = Env::new("h2-100");
    let up = upstream_tls(&env.upstream_ca).await;
    let send = h2_via_robin(&env, &up).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut send = send.clone();
        set.spawn(async move {
            let req = Request::post(format!("https://{HOST}/echo?i={i}"))
                .body(ChanBody::full(vec![b'x'; i]))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            (
                resp.status(),
                header(&resp, "x-seen-auth"),
                header(&resp, "x-body-len"),
                i,
            )
        });
    }
    let mut done = 0;
    while let Some(r) = within(set.join_next()).await {
        let (status, auth, len, i) = r.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(auth, "Bearer tok-1");
        assert_eq!(len, i.to_string());
        done += 1;
    }
    assert_eq!(done, 100);
    assert_eq!(up.requests(), 100);
    assert_eq!(up.seen.conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn grpc_trailers_and_te_pass_through_h2() {
    let env = Env::new("grpc");
    let up = upstream_tls(&env.upstream_ca).await;
    let mut send = h2_via_robin(&env, &up).await;
    let req = Request::post(format!("https://{HOST}/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(ChanBody::full(&b"\0\0\0\0\0"[..]))
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = within(resp.into_body().collect()).await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(trailers.get("x-seen-te").unwrap(), "trailers");
    assert_eq!(collected.to_bytes().len(), 5);
}

#[tokio::test]
async fn websocket_upgrade_echoes_through_interception() {
    let env = Env::new("ws");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let req = Request::get("/ws")
        .header("host", HOST)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(ChanBody::empty())
        .unwrap();
    let mut resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = within(hyper::upgrade::on(&mut resp)).await.unwrap();
    let mut io = TokioIo::new(upgraded);
    for msg in [&b"ping"[..], b"second message"] {
        within(io.write_all(msg)).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        within(io.read_exact(&mut buf)).await.unwrap();
        assert_eq!(buf, msg);
    }
    let seen = up.last_headers();
    assert_eq!(seen.get("authorization").unwrap(), "Bearer tok-1");
    assert_eq!(seen.get("upgrade").unwrap(), "websocket");
}

#[tokio::test]
async fn sse_first_event_arrives_before_the_stream_ends() {
    let env = Env::new("sse");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    assert_sse_streams(&mut send, &up).await;
}

#[tokio::test]
async fn oversized_header_section_is_431() {
    let env = Env::new("431");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let req = Request::get("/echo")
        .header("host", HOST)
        .header("x-big", "a".repeat(100 * 1024))
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(up.requests(), 0);
}

/// Writes raw bytes over an intercepted TLS connection and reads until the proxy closes it.
async fn raw_exchange(env: &Env, addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    within(tls.write_all(raw)).await.unwrap();
    let mut out = Vec::new();
    // Ends when the proxy closes the connection (bounded by STEP).
    let _ = within(tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn cl_te_smuggling_never_reaches_upstream_as_two_requests() {
    let env = Env::new("smuggle");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let raw = format!(
        "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
    );
    let out = raw_exchange(&env, addr, raw.as_bytes()).await;
    // hyper 1.x treats Transfer-Encoding as authoritative, drops Content-Length, answers the
    // first request and closes: the trailing bytes are never parsed as a request.
    let paths: Vec<String> = up
        .seen
        .last
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    assert!(!paths.iter().any(|p| p == "/smuggled"), "{paths:?}");
    assert!(paths.len() <= 1, "{paths:?}");
    if let Some((_, h)) = up.seen.last.lock().unwrap().first() {
        assert!(h.get("content-length").is_none());
    }
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    assert!(out.contains("connection: close"), "{out}");
}

#[tokio::test]
async fn malformed_framing_is_400_and_closed() {
    let env = Env::new("badframe");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    for raw in [
        format!(
            "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
        ),
        format!(
            "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
        ),
        format!("POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: abc\r\n\r\n"),
    ] {
        let out = raw_exchange(&env, addr, raw.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{raw:?} -> {out:?}");
    }
    assert_eq!(up.requests(), 0);

    // Bad chunk size: the headers were fine, so the request started upstream, but its body never
    // completes there and the workload gets 400 and a closed connection.
    let raw = format!(
        "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    );
    let out = raw_exchange(&env, addr, raw.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    assert!(out.contains("connection: close"), "{out:?}");
    assert_eq!(up.seen.bodies_ok.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn header_read_timeout_closes_stalled_and_idle_clients() {
    let env = Env::new("slow");
    let up = upstream_tls(&env.upstream_ca).await;
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let addr = front(env.proxy_with(limits), up.addr).await;
    let mut tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    tls.write_all(b"GET /echo HTTP/1.1\r\nHost: broker")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let _ = within(tls.read_to_end(&mut out)).await;
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(up.requests(), 0);

    // The same timer closes an idle keep-alive connection after a complete exchange.
    let mut tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    tls.write_all(format!("GET /echo HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let _ = within(tls.read_to_end(&mut out)).await;
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert_eq!(up.requests(), 1);
}
