//! Hostile input on one captured connection: names that disagree (SNI, Host, `:authority`),
//! credential headers the workload smuggles in, malformed first bytes, and tokens minted for
//! another audience.
#[path = "proxy_support/harness.rs"]
mod harness;

use std::net::SocketAddr;

use base64::Engine as _;
use harness::*;
use http::{Request, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];

#[tokio::test]
async fn sni_ruled_and_authority_of_another_host_gets_no_token_h1_and_h2() {
    let env = Env::new("sni-authority");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H2))
        .await
        .unwrap();
    let mut send = within(h2(tls)).await;
    let req = Request::get(format!("https://{OTHER_HOST}/h2"))
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-auth"), "");

    // h1: an absolute-form target naming another host than the Host header is refused.
    let mut tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let raw = format!(
        "GET http://{OTHER_HOST}/abs HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    );
    within(tls.write_all(raw.as_bytes())).await.unwrap();
    let mut out = Vec::new();
    let _ = within(tls.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn sni_unruled_and_host_ruled_is_spliced_without_token() {
    let env = Env::new("sni-unruled");
    let up = upstream_tls(&env.upstream_ca).await;
    let proxy = env.proxy();
    let addr = front(proxy.clone(), up.addr).await;
    let tls = within(tls_connect(addr, &env.upstream_ca.pem(), OTHER_HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "");
    assert_eq!(proxy.leaf_stats().mints.get(), 0);
}

#[tokio::test]
async fn smuggled_credentials_leave_exactly_the_injected_one() {
    let env = Env::new("smuggled-auth");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let raw = format!(
        "GET /echo HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: mine\r\nauthorization: second\r\nProxy-Authorization: Basic eA==\r\nConnection: close\r\n\r\n"
    );
    let mut tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    within(tls.write_all(raw.as_bytes())).await.unwrap();
    let mut out = Vec::new();
    let _ = within(tls.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("x-seen-auth: Bearer tok-1\r\n"), "{out}");
    assert!(out.contains("x-seen-auth-count: 1\r\n"), "{out}");
    assert!(up.last_headers().get("proxy-authorization").is_none());

    // Space before the colon and an obs-fold continuation: refused before any upstream.
    for raw in [
        format!("GET /echo HTTP/1.1\r\nHost: {HOST}\r\nAuthorization : x\r\n\r\n"),
        format!("GET /echo HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: x\r\n y\r\n\r\n"),
    ] {
        let mut tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
            .await
            .unwrap();
        within(tls.write_all(raw.as_bytes())).await.unwrap();
        let mut out = Vec::new();
        let _ = within(tls.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 400"), "{raw:?} -> {out}");
    }
    assert_eq!(up.requests(), 1);
}

/// A ClientHello with `ext` as its extensions block (already length-prefixed entries), in one
/// TLS record per 16 KiB.
fn client_hello(exts: &[u8]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01, 1, 0]);
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut hs = vec![1];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut out = Vec::new();
    for chunk in hs.chunks(16 * 1024) {
        out.extend([0x16, 3, 1]);
        out.extend((chunk.len() as u16).to_be_bytes());
        out.extend(chunk);
    }
    out
}

fn sni_ext(name: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0];
    v.extend(((name.len() + 5) as u16).to_be_bytes());
    v.extend(((name.len() + 3) as u16).to_be_bytes());
    v.push(0);
    v.extend((name.len() as u16).to_be_bytes());
    v.extend(name);
    v
}

/// Sends `bytes` then closes the write side; returns what came back before the close.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = within(TcpStream::connect(addr)).await.unwrap();
    let _ = within(tcp.write_all(bytes)).await;
    let _ = tcp.shutdown().await;
    let mut out = Vec::new();
    let _ = within(tcp.read_to_end(&mut out)).await;
    out
}

/// Garbage and broken ClientHellos: no panic, nothing decrypted or minted; what is not HTTP is
/// spliced byte for byte (the echo server returns it), and the proxy keeps serving.
#[tokio::test]
async fn hostile_first_bytes_are_spliced_or_closed_without_panic() {
    let env = Env::new("hostile-bytes");
    let echo = upstream_echo().await;
    let proxy = env.proxy();
    let addr = front(proxy.clone(), echo).await;
    let mut long_name = b"a.".repeat(130);
    long_name.extend(b"broker.test");
    // A ruled SNI followed by padding up to the 64 KiB extensions limit: the hello outgrows the
    // 16 KiB sniff buffer, so its name is never read and the connection is spliced.
    let mut exts_64k = sni_ext(HOST.as_bytes());
    let pad = 65535 - exts_64k.len() - 4;
    exts_64k.extend([0xff, 0x01]);
    exts_64k.extend((pad as u16).to_be_bytes());
    exts_64k.extend(vec![0u8; pad]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\xff\x13garbage \r\n\r\n".to_vec()),
        (
            "truncated hello",
            client_hello(&sni_ext(HOST.as_bytes()))[..40].to_vec(),
        ),
        (
            "sni with NUL",
            client_hello(&sni_ext(b"broker.test\0.evil")),
        ),
        (
            "non-ascii sni",
            client_hello(&sni_ext("br\u{f6}ker.test".as_bytes())),
        ),
        ("sni over 255", client_hello(&sni_ext(&long_name))),
        ("64 KiB extensions", client_hello(&exts_64k)),
    ];
    for (what, bytes) in &cases {
        let back = send_raw(addr, bytes).await;
        assert_eq!(&back, bytes, "{what}: spliced byte for byte");
    }
    assert_eq!(proxy.leaf_stats().mints.get(), 0);
    assert_eq!(proxy.stats().conn_intercepted.get(), 0);
    // Counted when each splice ends, which may be just after the client saw the close.
    for _ in 0..200 {
        if proxy.stats().conn_spliced.get() == cases.len() as u64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(proxy.stats().conn_spliced.get(), cases.len() as u64);

    // Still serving: a normal intercepted request after all of that.
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(proxy, up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
}

fn jwt(claims: serde_json::Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.c2ln",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

#[tokio::test]
async fn token_for_another_audience_is_503_and_never_sent() {
    let env = Env::new("audience");
    let up = upstream_tls(&env.upstream_ca).await;
    let proxy = env.rule_proxy(r#"expect_audience = "broker""#);
    let addr = front(proxy.clone(), up.addr).await;
    let request = || async {
        let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
            .await
            .unwrap();
        let mut send = within(h1(tls)).await;
        within(send.send_request(get("/echo", HOST))).await.unwrap()
    };

    env.set_token(&jwt(serde_json::json!({"aud": "billing", "sub": "x"})));
    let resp = request().await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body_string(resp).await, "robin: audience mismatch\n");
    env.set_token(&jwt(serde_json::json!({"sub": "no-aud"})));
    assert_eq!(request().await.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.requests(), 0);
    let rule = &proxy.rules()[0];
    assert_eq!(rule.stats.audience_mismatches.get(), 2);

    // The expected audience among several, and a token that is no JWT: injected.
    let ok = jwt(serde_json::json!({"aud": ["billing", "broker"]}));
    env.set_token(&ok);
    let resp = request().await;
    assert_eq!(header(&resp, "x-seen-auth"), format!("Bearer {ok}"));
    env.set_token("opaque-token");
    let resp = request().await;
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer opaque-token");
    assert_eq!(rule.stats.audience_mismatches.get(), 2);
}
