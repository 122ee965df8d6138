//! A 256 MiB upload streamed through interception keeps the process's memory flat. Its own
//! binary so no other test's allocations move VmRSS while it measures.
#[path = "proxy_support/harness.rs"]
mod harness;

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use harness::*;
use http::{Request, StatusCode};
use hyper::body::Frame;

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_with_flat_memory() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 256;
    let env = Env::new("upload");
    let up = upstream_tls(&env.upstream_ca).await;
    let addr = front(env.proxy(), up.addr).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, &[b"http/1.1"]))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let (tx, body) = ChanBody::channel(2);
    let before = vm_rss_kib();
    let producer = tokio::spawn(async move {
        let chunk = Bytes::from(vec![0x5a; CHUNK]);
        for _ in 0..CHUNKS {
            if tx.send(Frame::data(chunk.clone())).await.is_err() {
                break;
            }
        }
    });
    let req = Request::post("/upload")
        .header("host", HOST)
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(240), send.send_request(req))
        .await
        .expect("upload timed out")
        .unwrap();
    producer.await.unwrap();
    let after = vm_rss_kib();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-body-len"), (CHUNK * CHUNKS).to_string());
    assert_eq!(
        up.seen.body_bytes.load(Ordering::SeqCst),
        (CHUNK * CHUNKS) as u64
    );
    let growth_mib = after.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 64,
        "RSS grew by {growth_mib} MiB for a 256 MiB upload"
    );
}
