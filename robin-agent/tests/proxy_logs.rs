//! Every tracing record of the data path, at TRACE level for every crate, is captured while
//! tokens are injected over h1, h2 and plain HTTP and refused: no record carries the token.
//! One test per binary because it installs the global subscriber.
#[path = "proxy_support/harness.rs"]
mod harness;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use harness::*;
use http::{Request, StatusCode};

const SECRET: &str = "sEcReT-tOkEn-9f8e7d6c";

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_record_contains_a_token() {
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let env = Env::new("logs");
    env.set_token(SECRET);
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;

    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, &[b"http/1.1"]))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/echo?q=query-secret", HOST)))
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), format!("Bearer {SECRET}"));
    body_string(resp).await;
    drop(send);

    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, &[b"h2"]))
        .await
        .unwrap();
    let mut send = within(h2(tls)).await;
    let req = Request::get(format!("https://{HOST}/h2path"))
        .body(ChanBody::empty())
        .unwrap();
    let resp = within(send.send_request(req)).await.unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), format!("Bearer {SECRET}"));
    body_string(resp).await;
    drop(send);

    let plain = upstream_plain().await;
    let plain_addr = front(env.rule_proxy(PLAINTEXT_LOOPBACK), plain.addr).await;
    let mut send = within(h1(tokio::net::TcpStream::connect(plain_addr)
        .await
        .unwrap()))
    .await;
    let resp = within(send.send_request(get("/plain", HOST)))
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-seen-auth"), format!("Bearer {SECRET}"));
    body_string(resp).await;
    drop(send);

    // A token with CRLF is refused; its parts must not be logged either.
    env.set_token(&format!("{SECRET}\r\nX-Evil: 1"));
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, &[b"http/1.1"]))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/refused", HOST)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    body_string(resp).await;
    drop(send);

    // Let the connection tasks finish and write their closing lines (bounded wait). A closing
    // line may read "failed": the h2 client's close can race the GOAWAY Robin's server flushes
    // in answer to its own, and that write then fails. Either record must be free of the token.
    let closing = |text: &str| {
        text.matches("connection closed").count() + text.matches("connection failed").count()
    };
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        if closing(&text) >= 4 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    assert!(!text.contains(SECRET), "token leaked into logs");
    assert!(!text.contains("query-secret"), "query string logged");
    assert!(text.contains("mode=\"intercept\""), "{text}");
    assert!(text.contains("path=\"/echo\""), "{text}");
    assert!(text.contains("path=\"/h2path\""), "{text}");
    // Request lines carry the connection span, also for h2 streams (run on their own tasks).
    for path in ["/echo", "/h2path", "/plain"] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("path=\"{path}\"")))
            .unwrap();
        assert!(line.contains("conn{id="), "{line}");
    }
    assert!(text.contains("identity unavailable"), "{text}");
    assert!(text.contains("source=file:"), "{text}");
    assert!(closing(&text) >= 4, "{text}");
    // Enough was captured for the check to mean something.
    assert!(text.lines().count() > 20, "{text}");
}
