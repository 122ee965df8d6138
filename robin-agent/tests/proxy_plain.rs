//! Plain HTTP on a captured port: every request is parsed by hyper and routed on its own host.
//! A ruled host's token travels only over TLS that Robin originates to the dialled IP (verified
//! for the host), or in cleartext to a prefix the rule allows; other hosts get no token.
#[path = "proxy_support/harness.rs"]
mod harness;

use std::{net::SocketAddr, sync::atomic::Ordering};

use harness::*;
use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use robin_agent::metrics::StatusClass;
use robin_agent::proxy::{Limits, Proxy};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

async fn plain(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<ChanBody> {
    h1(within(TcpStream::connect(addr)).await.unwrap()).await
}

/// Writes `raw` on a plain connection and reads until the proxy closes it.
async fn raw(addr: SocketAddr, raw: &[u8]) -> String {
    let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
    // The proxy may answer and close before it read everything (e.g. 431): ignore write errors.
    let _ = within(tcp.write_all(raw)).await;
    let mut out = Vec::new();
    let _ = within(tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn conns(up: &Upstream) -> u64 {
    up.seen.conns.load(Ordering::SeqCst)
}

/// The exfiltration: a captured process names a ruled host but dials its own server. Before
/// TLS origination, Robin sent the token to it in clear text.
#[tokio::test]
async fn ruled_host_dialled_at_another_address_gets_no_token() {
    let attacker = upstream_plain().await;
    let env = Env::new("exfil");
    // Default rule: TLS is originated to the dialled IP on port 443, where nothing answers.
    let proxy = env.proxy();
    let addr = front(proxy.clone(), attacker.addr).await;
    let mut send = within(plain(addr)).await;
    let resp = within(send.send_request(get("/steal", HOST)))
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "", "token sent in clear text");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(attacker.requests(), 0);

    // The attacker's server answers on the TLS port too: it gets a ClientHello, no request.
    let proxy = env.rule_proxy(&tls_port(attacker.addr.port()));
    let addr = front(proxy.clone(), attacker.addr).await;
    let mut send = within(plain(addr)).await;
    let resp = within(send.send_request(get("/steal", HOST)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(attacker.requests(), 0);
    assert_eq!(proxy.stats().upstream_errors.get(), 1);
}

#[tokio::test]
async fn ruled_host_is_originated_over_verified_tls_request_by_request() {
    let env = Env::new("originate");
    let up = upstream_tls(&env.upstream_ca).await;
    // The dialled address: nothing may reach it for the ruled host.
    let decoy = upstream_plain().await;
    let proxy = env.rule_proxy(&tls_port(up.addr.port()));
    let addr = front(proxy.clone(), decoy.addr).await;
    let mut send = within(plain(addr)).await;
    let req = Request::get("/echo?q=1")
        .header("host", HOST)
        .header("authorization", "mine")
        .header("proxy-authorization", "Basic cHJveHk=")
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
    assert_eq!(header(&resp, "x-seen-auth-count"), "1");
    body_string(resp).await;
    let seen = up.last_headers();
    assert!(seen.get("proxy-authorization").is_none(), "{seen:?}");
    assert_eq!(seen.get("host").unwrap(), HOST);

    // Same connection, an unruled host: to the dialled address, untouched, no token.
    within(send.ready()).await.unwrap();
    let req = Request::get("/other")
        .header("host", OTHER_HOST)
        .header("authorization", "mine")
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "mine");
    body_string(resp).await;

    // And the ruled host again, after the other: still over TLS.
    within(send.ready()).await.unwrap();
    let resp = within(send.send_request(get("/again", HOST)))
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
    body_string(resp).await;
    assert_eq!((up.requests(), decoy.requests()), (2, 1));
    assert_eq!(conns(&up), 1, "the originated connection is pooled");
}

#[tokio::test]
async fn origination_streams_and_upgrades_as_interception_does() {
    let env = Env::new("originate-stream");
    let up = upstream_tls(&env.upstream_ca).await;
    let decoy = upstream_plain().await;
    let addr = front(env.rule_proxy(&tls_port(up.addr.port())), decoy.addr).await;

    let mut send = within(plain(addr)).await;
    assert_sse_streams(&mut send, &up).await;

    let mut send = within(plain(addr)).await;
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
    let mut io = TokioIo::new(within(hyper::upgrade::on(&mut resp)).await.unwrap());
    within(io.write_all(b"ping")).await.unwrap();
    let mut buf = [0u8; 4];
    within(io.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(
        up.last_headers().get("authorization").unwrap(),
        "Bearer tok-1"
    );
    assert_eq!(decoy.requests(), 0);
}

#[tokio::test]
async fn untrusted_certificate_on_origination_is_502_and_nothing_is_sent() {
    let env = Env::new("originate-rogue");
    let rogue = upstream_tls(&TestCa::new("Rogue CA")).await;
    let proxy = env.rule_proxy(&tls_port(rogue.addr.port()));
    let addr = front(proxy.clone(), rogue.addr).await;
    let mut send = within(plain(addr)).await;
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(body_string(resp).await.contains("upstream unavailable"));
    assert_eq!((rogue.requests(), conns(&rogue)), (0, 0));
}

#[tokio::test]
async fn plaintext_is_injected_only_inside_allow_cidrs() {
    let env = Env::new("allow-cidrs");
    let up = upstream_plain().await;
    let inside = env.rule_proxy(r#"plaintext = { allow_cidrs = ["10.0.0.0/8", "127.0.0.0/30"] }"#);
    let addr = front(inside, up.addr).await;
    let resp = within(within(plain(addr)).await.send_request(get("/in", HOST)))
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
    assert_eq!(up.requests(), 1);

    let outside = env.rule_proxy(r#"plaintext = { allow_cidrs = ["10.0.0.0/8", "::1/128"] }"#);
    let proxy = outside.clone();
    let addr = front(outside, up.addr).await;
    let resp = within(within(plain(addr)).await.send_request(get("/out", HOST)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
    assert!(body_string(resp).await.contains("plaintext"));
    assert_eq!(up.requests(), 1, "nothing forwarded");
    // Refused before any rule applied: counted under `rule="-"`.
    assert_eq!(
        proxy.stats().unruled_requests.get(StatusClass::ClientError),
        1
    );
}

/// Shapes the old classifier spliced raw to a ruled destination. Each is now parsed by hyper:
/// served through the rule (over TLS) or refused, and the dialled address sees nothing.
#[tokio::test]
async fn unusual_plain_requests_are_parsed_by_hyper_never_spliced() {
    let env = Env::new("plain-parse");
    let up = upstream_tls(&env.upstream_ca).await;
    let decoy = upstream_plain().await;
    let addr = front(env.rule_proxy(&tls_port(up.addr.port())), decoy.addr).await;

    // A request behind empty lines (which servers skip) is still parsed and routed.
    let out = raw(
        addr,
        format!("\r\n\r\nGET /lead HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(out.contains("x-seen-auth: Bearer tok-1\r\n"), "{out}");
    // HTTP/1.0 is served, with the token, over TLS.
    let out = raw(
        addr,
        format!("GET /ten HTTP/1.0\r\nHost: {HOST}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(out.contains("x-seen-auth: Bearer tok-1"), "{out}");
    // A header section past the 16 KiB sniff buffer but within the header limit is served.
    let big = "a".repeat(20 * 1024);
    let out = raw(
        addr,
        format!("GET /big HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out:.200}");
    assert!(out.contains("x-seen-auth: Bearer tok-1"), "{out:.400}");
    assert_eq!(up.requests(), 3);
    assert_eq!((decoy.requests(), conns(&decoy)), (0, 0), "nothing spliced");
}

/// Requests hyper refuses (or Robin, for conflicting hosts) are answered by Robin; the dialled
/// address never sees a byte of them. The old classifier spliced each of them there.
#[tokio::test]
async fn malformed_plain_requests_are_refused_never_spliced() {
    let env = Env::new("plain-refuse");
    let decoy = upstream_plain().await;
    let addr = front(env.proxy(), decoy.addr).await;
    for (req, status) in [
        (
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nX: a\r\n  folded\r\n\r\n"),
            "400",
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
            ),
            "400",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nAuthorization : x\r\n\r\n"),
            "400",
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Huge: {}\r\n\r\n",
                "a".repeat(100 * 1024)
            ),
            "431",
        ),
        (
            format!(
                "GET /{} HTTP/1.1\r\nHost: {HOST}\r\n\r\n",
                "a".repeat(1 << 20)
            ),
            "4",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nHost: {OTHER_HOST}\r\n\r\n"),
            "400",
        ),
        (
            format!("GET http://{OTHER_HOST}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
            "400",
        ),
    ] {
        let out = raw(addr, req.as_bytes()).await;
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")),
            "{:.120} -> {out:.200}",
            req
        );
    }
    assert_eq!((decoy.requests(), conns(&decoy)), (0, 0), "nothing spliced");
}

#[tokio::test]
async fn absolute_form_and_h2c_prior_knowledge_are_routed_by_their_authority() {
    let env = Env::new("plain-absolute");
    let up = upstream_tls(&env.upstream_ca).await;
    let decoy = upstream_plain().await;
    let addr = front(env.rule_proxy(&tls_port(up.addr.port())), decoy.addr).await;
    let out = raw(
        addr,
        format!("GET http://{HOST}/abs HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: a\r\nAuthorization: b\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.contains("x-seen-auth: Bearer tok-1\r\n"), "{out}");
    assert!(out.contains("x-seen-auth-count: 1\r\n"), "{out}");

    // h2 with prior knowledge over plain TCP: hyper serves it too.
    let mut send = h2(within(TcpStream::connect(addr)).await.unwrap()).await;
    let req = Request::get(format!("http://{HOST}/h2c"))
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
    // Originated offering h2, which the upstream chose.
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/2.0");
    assert_eq!((up.requests(), decoy.requests()), (2, 0));
}

/// `Connection: close, Authorization` names the credential header as hop-by-hop; stripping it
/// after injection deleted the token.
#[tokio::test]
async fn connection_option_naming_the_credential_header_keeps_the_token() {
    let env = Env::new("hop-by-hop");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, &[b"http/1.1"]))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let req = Request::get("/echo")
        .header("host", HOST)
        .header("connection", "close, Authorization")
        .header("authorization", "mine")
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");

    let plain_up = upstream_plain().await;
    let addr = front(env.rule_proxy(PLAINTEXT_LOOPBACK), plain_up.addr).await;
    let out = raw(
        addr,
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close, Authorization\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(out.contains("x-seen-auth: Bearer tok-1\r\n"), "{out}");
}

/// An idle keep-alive connection parks (hyper's connection ended, the socket kept) and serves
/// its next requests as before, each with the token current at that time.
#[tokio::test]
async fn an_idle_keep_alive_connection_parks_and_keeps_injecting() {
    let env = Env::new("park");
    let up = upstream_plain().await;
    let limits = Limits {
        park_after: std::time::Duration::from_millis(50),
        ..Limits::default()
    };
    let cfg = env.config_with(r#"plaintext = { allow_cidrs = ["127.0.0.0/8"] }"#);
    let proxy = Proxy::with_limits(&cfg, limits).unwrap();
    let addr = front(proxy.clone(), up.addr).await;
    let mut send = within(plain(addr)).await;
    for parks in 1..=3 {
        if parks == 3 {
            env.set_token("tok-2");
        }
        let resp = within(send.send_request(get("/p", HOST))).await.unwrap();
        let want = if parks == 3 {
            "Bearer tok-2"
        } else {
            "Bearer tok-1"
        };
        assert_eq!(header(&resp, "x-seen-auth"), want);
        body_string(resp).await;
        let parked = || proxy.stats().conn_parked.get();
        within(async {
            while parked() < parks {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
    }
    assert_eq!(up.requests(), 3);
    assert_eq!(
        proxy.stats().conn_intercepted.get(),
        1,
        "one client connection"
    );
}
