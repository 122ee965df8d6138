//! In-process tests of the upstream pool: upstream connections are reused across downstream
//! connections, only for the same destination and verified name, and a pooled connection the
//! upstream closed never costs the next client a 502 or a duplicated request.
#[path = "proxy_support/harness.rs"]
mod harness;

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use harness::*;
use http::{Request, StatusCode};
use robin_agent::metrics::StatusClass;

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

/// One request on a fresh TLS client connection, which is closed afterwards.
async fn one_request(env: &Env, addr: std::net::SocketAddr, sni: &str, alpn: &[&[u8]]) {
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), sni, alpn))
        .await
        .unwrap();
    let resp = if alpn == H2 {
        let mut send = within(h2(tls)).await;
        let req = Request::get(format!("https://{sni}/echo"))
            .body(ChanBody::empty())
            .unwrap();
        within(send.send_request(req)).await.unwrap()
    } else {
        let mut send = within(h1(tls)).await;
        within(send.send_request(get("/echo", sni))).await.unwrap()
    };
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
    assert_eq!(body_string(resp).await, "ok");
}

#[tokio::test]
async fn sequential_client_connections_share_one_upstream_connection() {
    for alpn in [H1, H2] {
        let env = Env::new(if alpn == H1 { "reuse-h1" } else { "reuse-h2" });
        let up = upstream_tls(&env.upstream_ca).await;
        let proxy = env.proxy();
        let addr = front(proxy.clone(), up.addr).await;
        one_request(&env, addr, HOST, alpn).await;
        one_request(&env, addr, HOST, alpn).await;
        assert_eq!(up.requests(), 2);
        assert_eq!(count(&up.seen.conns), 1, "one upstream accept ({alpn:?})");
        assert_eq!(proxy.stats().upstream_connects.get(), 1);
        assert_eq!(proxy.stats().upstream_reused.get(), 1);
    }
}

#[tokio::test]
async fn plain_http_client_connections_share_one_upstream_connection() {
    let env = Env::new("reuse-plain");
    let up = upstream_plain().await;
    let addr = front(env.rule_proxy(PLAINTEXT_LOOPBACK), up.addr).await;
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut send = within(h1(tcp)).await;
        let resp = within(send.send_request(get("/echo", HOST))).await.unwrap();
        assert_eq!(header(&resp, "x-seen-auth"), "Bearer tok-1");
        body_string(resp).await;
    }
    assert_eq!(up.requests(), 2);
    assert_eq!(count(&up.seen.conns), 1);
}

#[tokio::test]
async fn pooled_connections_are_not_shared_across_server_names() {
    let env = Env::new("reuse-names");
    // One address whose certificate covers both names: only the pool key keeps them apart.
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    one_request(&env, addr, HOST, H1).await;
    one_request(&env, addr, WILD_HOST, H1).await;
    one_request(&env, addr, HOST, H1).await;
    assert_eq!(up.requests(), 3);
    assert_eq!(count(&up.seen.conns), 2);
    let names: Vec<String> = up
        .seen
        .last
        .lock()
        .unwrap()
        .iter()
        .map(|(_, h)| h.get("host").unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, [HOST, WILD_HOST, HOST]);
}

#[tokio::test]
async fn upstream_closing_an_idle_pooled_connection_is_neither_502_nor_resent() {
    let env = Env::new("reuse-closed");
    let up = upstream_tls_idle_close(&env.upstream_ca, Duration::from_millis(100)).await;
    let proxy = env.proxy();
    let addr = front(proxy.clone(), up.addr).await;
    one_request(&env, addr, HOST, H1).await;
    // The upstream drops the pooled connection while it sits idle.
    within(async {
        while count(&up.seen.closed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    one_request(&env, addr, HOST, H1).await;
    assert_eq!(
        up.requests(),
        2,
        "each request reached the upstream exactly once"
    );
    assert_eq!(count(&up.seen.conns), 2);
    assert_eq!(proxy.stats().upstream_errors.get(), 0);
    assert_eq!(
        proxy.rules()[0]
            .stats
            .requests
            .get(StatusClass::ServerError),
        0
    );
}

#[tokio::test]
async fn concurrent_clients_each_get_a_connection_and_all_return_to_the_pool() {
    let env = Env::new("reuse-concurrent");
    let up = upstream_tls_alpn(&env.upstream_ca, H1).await;
    let proxy = env.proxy();
    let addr = front(proxy.clone(), up.addr).await;
    let env = std::sync::Arc::new(env);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let env = env.clone();
        set.spawn(async move {
            let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
                .await
                .unwrap();
            let mut send = within(h1(tls)).await;
            // The SSE response stays open until released: four requests in flight at once.
            let resp = within(send.send_request(get("/sse", HOST))).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp
        });
    }
    let mut open = Vec::new();
    while let Some(r) = within(set.join_next()).await {
        open.push(r.unwrap());
    }
    assert_eq!(
        count(&up.seen.conns),
        4,
        "a busy connection is never shared"
    );
    for _ in 0..4 {
        up.seen.release.notify_one();
    }
    for resp in open {
        body_string(resp).await;
    }
    // All four went back to the pool: four more clients dial nothing.
    for _ in 0..4 {
        one_request(&env, addr, HOST, H1).await;
    }
    assert_eq!(count(&up.seen.conns), 4);
    assert_eq!(up.requests(), 8);
}

#[tokio::test]
async fn h2_streams_past_the_per_connection_cap_open_another_connection() {
    use http_body_util::BodyExt;
    let env = Env::new("reuse-h2-cap");
    let up = upstream_tls(&env.upstream_ca).await;
    let send = h2_via_robin(&env, &up).await;
    let mut set = tokio::task::JoinSet::new();
    // 120 streams held open at once (each SSE response waits after its first event).
    for _ in 0..120 {
        let mut send = send.clone();
        set.spawn(async move {
            let req = Request::get(format!("https://{HOST}/sse"))
                .body(ChanBody::empty())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let mut body = resp.into_body();
            body.frame().await.unwrap().unwrap();
            body
        });
    }
    let mut open = Vec::new();
    while let Some(r) = within(set.join_next()).await {
        open.push(r.unwrap());
    }
    assert_eq!(up.requests(), 120);
    assert_eq!(
        count(&up.seen.conns),
        2,
        "100 streams on the first connection, the rest on a second"
    );
}

/// A proxy whose idle connections, its pooled upstream ones included, park after 50 ms.
fn parking_proxy(env: &Env) -> robin_agent::proxy::Proxy {
    env.proxy_with(robin_agent::proxy::Limits {
        park_after: Duration::from_millis(50),
        ..Default::default()
    })
}

/// Waits until the pool has parked an upstream connection, and its stream is back.
async fn parked(proxy: &robin_agent::proxy::Proxy) {
    within(async {
        while proxy.stats().upstream_parked.get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // hyper's connection hands the stream back as soon as its task sees the sender gone.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn an_idle_pooled_connection_parks_and_carries_the_next_request() {
    let env = Env::new("reuse-parked");
    let up = upstream_tls_alpn(&env.upstream_ca, H1).await;
    let proxy = parking_proxy(&env);
    let addr = front(proxy.clone(), up.addr).await;
    for round in 1..=2 {
        one_request(&env, addr, HOST, H1).await;
        parked(&proxy).await;
        assert_eq!(up.requests(), round);
    }
    assert_eq!(
        count(&up.seen.conns),
        1,
        "one upstream connection, parked and reused"
    );
    assert_eq!(proxy.stats().upstream_connects.get(), 1);
    assert_eq!(proxy.stats().upstream_reused.get(), 1);
    assert!(
        proxy.stats().upstream_parked.get() >= 2,
        "parked after each use"
    );
    assert_eq!(count(&up.seen.closed), 0);
}

#[tokio::test]
async fn a_parked_connection_the_upstream_closed_is_dialled_afresh_not_resent() {
    let env = Env::new("reuse-parked-closed");
    let up = upstream_tls_idle_close(&env.upstream_ca, Duration::from_millis(300)).await;
    let proxy = parking_proxy(&env);
    let addr = front(proxy.clone(), up.addr).await;
    one_request(&env, addr, HOST, H1).await;
    parked(&proxy).await;
    within(async {
        while count(&up.seen.closed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    one_request(&env, addr, HOST, H1).await;
    assert_eq!(up.requests(), 2, "each request reached the upstream once");
    assert_eq!(count(&up.seen.conns), 2);
    // Seen closed while parked: a new dial, not the redial of a request found unsent.
    assert_eq!(proxy.stats().upstream_retries.get(), 0);
    assert_eq!(proxy.stats().upstream_reused.get(), 0);
    assert_eq!(proxy.stats().upstream_errors.get(), 0);
}
