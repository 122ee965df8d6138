//! Idle HTTP/1 connections give hyper's buffers back ("parking").
//!
//! hyper's HTTP/1 server keeps an 8 KiB read buffer, an 8 KiB write buffer and a slot sized
//! for a request's future for as long as its connection lives, between requests too: with
//! 1,000 held keep-alive connections that was most of Robin's heap. nginx frees its buffers as
//! soon as a keep-alive connection goes idle (`ngx_http_set_keepalive`); hyper has no such
//! mode. So one to two [`Park::after`]s after a connection's last request ended, Robin ends
//! hyper's connection *without closing the stream*, keeps only the (TLS) stream, and serves
//! the workload's next request with a new hyper connection once its first byte arrives.
//!
//! Parking never loses or invents a byte:
//! * hyper is asked to end only between exchanges. `graceful_shutdown` on an idle connection
//!   ends it within the same poll; when that poll does not end it, hyper was mid-exchange (a
//!   request body still arriving, a response still being flushed) and ends it itself once the
//!   exchange is done, after which the stream is closed as before — never reused;
//! * bytes hyper had read but not parsed (the start of the next request's head) come back from
//!   `into_parts` and are replayed to the next hyper connection;
//! * a hyper connection that has not yet begun a request is never asked: hyper counts it busy
//!   and would answer it with `Connection: close`. So a head that stalls is bounded by hyper's
//!   own header-read timeout, as without parking;
//! * an upgraded (WebSocket) connection is hyper's to hand over, as without parking.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use hyper::{
    body::{Body, Incoming},
    server::conn::http1::{self, UpgradeableConnection},
    service::HttpService,
};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a parked stream's close (TLS `close_notify`) may take; the pool's parked upstream
/// streams close within it too.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// When and for how long a connection parks.
#[derive(Clone, Debug)]
pub struct Park {
    /// No request begun or in flight for this long (checked every `after`) parks the
    /// connection.
    pub after: Duration,
    /// The keep-alive idle time and header-read time allowed in all, parked or not.
    pub header_read_timeout: Duration,
    /// Counts parks.
    pub parked: Counter,
}

/// What a connection's requests tell its serving loop; shared with its service.
#[derive(Debug, Default)]
pub struct Requests {
    in_flight: AtomicUsize,
    started: AtomicU64,
    /// Set while hyper is being ended for a park: its shutdown must not close the stream.
    parking: AtomicBool,
}

impl Requests {
    /// Marks a request in flight until the guard (moved into its response body) drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }
}

/// One request in flight on its connection.
#[derive(Debug)]
pub struct InFlight(Arc<Requests>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Serves HTTP/1.1 on `io` with `builder`, parking the connection whenever it idles.
pub fn serve<T, S, B>(
    io: T,
    builder: http1::Builder,
    svc: S,
    requests: Arc<Requests>,
    park: Park,
) -> Serve<T, S>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Clone + Unpin + Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    let stream = Parkable {
        inner: io,
        replay: Bytes::new(),
        requests: requests.clone(),
    };
    let mut serve = Serve {
        phase: Phase::Done,
        builder,
        svc,
        requests,
        timer: Box::pin(tokio::time::sleep(park.after)),
        park,
        first: 0,
        started: 0,
        tried: false,
    };
    serve.phase = serve.connect(stream);
    serve
}

/// The connection's future: a hand-written state machine rather than an `async fn`, whose
/// layout would keep the stream (in its loop variable) and hyper's connection (which owns the
/// stream) side by side for the connection's life.
pub struct Serve<T, S: HttpService<Incoming>> {
    phase: Phase<T, S>,
    builder: http1::Builder,
    svc: S,
    requests: Arc<Requests>,
    park: Park,
    /// While serving: when to look for an idle connection. Parked: the idle deadline.
    timer: Pin<Box<Sleep>>,
    /// `requests.started` when this hyper connection was made, and when the timer last fired.
    first: u64,
    started: u64,
    /// hyper was asked to end and was mid-exchange: it closes when that ends.
    tried: bool,
}

enum Phase<T, S: HttpService<Incoming>> {
    /// Boxed: hyper's connection (about 1.9 KiB with a TLS stream) would otherwise size the
    /// connection's task for its whole life, parked too. One allocation per hyper connection,
    /// next to the 16 KiB of buffers hyper allocates for it anyway.
    Serving(Box<UpgradeableConnection<TokioIo<Parkable<T>>, S>>),
    /// hyper's connection is gone; waiting for the workload's next byte.
    Parked(Parkable<T>),
    /// Idle past the deadline or at EOF: TLS `close_notify`, then FIN.
    Closing(Parkable<T>),
    Done,
}

impl<T, S, B> Serve<T, S>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Clone + Unpin + Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// A new hyper connection on `stream`.
    fn connect(&mut self, stream: Parkable<T>) -> Phase<T, S> {
        self.first = self.requests.started.load(Relaxed);
        self.started = self.first;
        self.tried = false;
        self.timer.as_mut().reset(Instant::now() + self.park.after);
        let conn = self
            .builder
            .serve_connection(TokioIo::new(stream), self.svc.clone());
        Phase::Serving(Box::new(conn.with_upgrades()))
    }

    /// `Ready(true)` once hyper's connection should be asked to end for a park. The timer is
    /// not moved per request (a timer-wheel update on the hot path): when it fires after a
    /// request began or while one is in flight, it is set again, so a connection parks between
    /// one and two `after`s past its last request.
    fn idle(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let now = self.requests.started.load(Relaxed);
        // Until its first request, hyper counts a connection busy: it would close, not park.
        if self.tried || now == self.first {
            return Poll::Pending;
        }
        ready!(self.timer.as_mut().poll(cx));
        if now != self.started || self.requests.in_flight.load(Relaxed) > 0 {
            self.started = now;
            self.timer.as_mut().reset(Instant::now() + self.park.after);
            ready!(self.timer.as_mut().poll(cx));
        }
        Poll::Ready(true)
    }

    /// Asks an idle-looking hyper connection to end: `Some(stream)` when it ended within the
    /// same poll (it was between exchanges); else hyper finishes its exchange and then closes.
    fn park(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Parkable<T>>, BoxError>> {
        let Phase::Serving(conn) = &mut self.phase else {
            unreachable!("parking a connection that is not served")
        };
        self.tried = true;
        self.requests.parking.store(true, Relaxed);
        Pin::new(&mut **conn).graceful_shutdown();
        let polled = Pin::new(conn).poll(cx);
        self.requests.parking.store(false, Relaxed);
        match polled {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => return Poll::Pending,
        }
        let Phase::Serving(conn) = std::mem::replace(&mut self.phase, Phase::Done) else {
            unreachable!()
        };
        // `None`: upgraded in that last poll, the stream is hyper's to hand over.
        let Some(parts) = (*conn).into_parts() else {
            return Poll::Ready(Ok(None));
        };
        self.park.parked.inc();
        let mut stream = parts.io.into_inner();
        stream.replay = join(parts.read_buf, std::mem::take(&mut stream.replay));
        Poll::Ready(Ok(Some(stream)))
    }

    /// `Ready(Ok(true))` when the connection is finished; `Ready(Ok(false))` on a new phase.
    fn poll_serving(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, BoxError>> {
        let Phase::Serving(conn) = &mut self.phase else {
            unreachable!()
        };
        if let Poll::Ready(ended) = Pin::new(conn).poll(cx) {
            return Poll::Ready(ended.map(|()| true).map_err(Into::into));
        }
        ready!(self.idle(cx));
        let Some(stream) = ready!(self.park(cx))? else {
            return Poll::Ready(Ok(true));
        };
        self.phase = if stream.replay.is_empty() {
            let idle = self
                .park
                .header_read_timeout
                .saturating_sub(self.park.after);
            self.timer.as_mut().reset(Instant::now() + idle);
            Phase::Parked(stream)
        } else {
            // Part of the next head had arrived: hyper's header timeout bounds the rest.
            self.connect(stream)
        };
        Poll::Ready(Ok(false))
    }

    /// Parked: the next byte makes a new hyper connection; EOF, an error or the idle deadline
    /// closes the stream.
    fn poll_parked(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Phase::Parked(stream) = &mut self.phase else {
            unreachable!()
        };
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let got = match Pin::new(&mut stream.inner).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => buf.filled().len() == 1,
            Poll::Ready(Err(_)) => false,
            Poll::Pending => {
                ready!(self.timer.as_mut().poll(cx));
                false
            }
        };
        let Phase::Parked(mut stream) = std::mem::replace(&mut self.phase, Phase::Done) else {
            unreachable!()
        };
        self.phase = if got {
            stream.replay = Bytes::copy_from_slice(&byte);
            self.connect(stream)
        } else {
            self.timer.as_mut().reset(Instant::now() + CLOSE_TIMEOUT);
            Phase::Closing(stream)
        };
        Poll::Ready(false)
    }

    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Phase::Closing(stream) = &mut self.phase else {
            unreachable!()
        };
        let shut = Pin::new(&mut stream.inner).poll_shutdown(cx).is_ready();
        if !shut && self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(true)
    }
}

impl<T, S, B> Future for Serve<T, S>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Clone + Unpin + Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            let finished = match this.phase {
                Phase::Serving(_) => ready!(this.poll_serving(cx)),
                Phase::Parked(_) => Ok(ready!(this.poll_parked(cx))),
                Phase::Closing(_) => Ok(ready!(this.poll_closing(cx))),
                Phase::Done => Ok(true),
            };
            if finished.as_ref().is_ok_and(|f| !f) {
                continue;
            }
            this.phase = Phase::Done;
            return Poll::Ready(finished.map(|_| ()));
        }
    }
}

/// `a` then `b`, in a buffer of their own: `a` is a view of hyper's whole read buffer, which
/// it would keep alive (usually empty, else a part of a head).
fn join(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() && b.is_empty() {
        return Bytes::new();
    }
    let mut both = BytesMut::with_capacity(a.len() + b.len());
    both.extend_from_slice(&a);
    both.extend_from_slice(&b);
    both.freeze()
}

/// The stream as one hyper connection sees it: bytes the previous one had read replayed
/// first, and a shutdown that leaves the stream open while parking.
struct Parkable<T> {
    inner: T,
    replay: Bytes,
    requests: Arc<Requests>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Parkable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.replay.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.replay.len().min(buf.remaining());
        buf.put_slice(&self.replay[..n]);
        self.replay.advance(n);
        if self.replay.is_empty() {
            self.replay = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Parkable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.requests.parking.load(Relaxed) {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioTimer;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;
    use crate::conns::busy::tracked;

    const AFTER: Duration = Duration::from_millis(40);
    const SETTLE: Duration = Duration::from_millis(200);
    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

    struct Served {
        client: DuplexStream,
        parked: Counter,
        done: tokio::task::JoinHandle<Result<(), BoxError>>,
    }

    /// A connection served by `serve`, answering `ok` after `delay`; a `GET /ws` is upgraded
    /// and then sends `upgraded` on the raw stream.
    fn start(header_read_timeout: Duration, delay: Duration) -> Served {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let requests = Arc::new(Requests::default());
        let in_flight = requests.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            tracked(in_flight.begin(), async move {
                tokio::time::sleep(delay).await;
                if req.uri().path() == "/ws" {
                    tokio::spawn(async move {
                        let up = hyper::upgrade::on(req).await.expect("upgrade");
                        let mut up = TokioIo::new(up);
                        up.write_all(b"upgraded").await.unwrap();
                    });
                    let resp = Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("connection", "upgrade")
                        .header("upgrade", "test")
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    return Ok::<_, Infallible>(resp);
                }
                Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
            })
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        let parked = Counter::default();
        let park = Park {
            after: AFTER,
            header_read_timeout,
            parked: parked.clone(),
        };
        let done = tokio::spawn(serve(server, builder, svc, requests, park));
        Served {
            client,
            parked,
            done,
        }
    }

    /// Reads one `ok` response (content-length 2), failing after 5 s.
    async fn read_ok(client: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let read = async {
            while !got.ends_with(b"\r\n\r\nok") {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("response in time");
        String::from_utf8(got).unwrap()
    }

    #[tokio::test]
    async fn an_idle_connection_parks_and_serves_its_next_requests() {
        let mut s = start(Duration::from_secs(30), Duration::ZERO);
        for round in 1..=3 {
            s.client.write_all(GET).await.unwrap();
            let resp = read_ok(&mut s.client).await;
            assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
            assert!(!resp.contains("connection: close"), "{resp}");
            tokio::time::sleep(SETTLE).await;
            assert_eq!(s.parked.get(), round, "parks after request {round}");
        }
        drop(s.client);
        tokio::time::timeout(Duration::from_secs(5), s.done)
            .await
            .expect("ends on EOF")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_head_split_across_a_park_is_replayed() {
        let mut s = start(Duration::from_secs(30), Duration::ZERO);
        s.client.write_all(GET).await.unwrap();
        read_ok(&mut s.client).await;
        s.client.write_all(&GET[..12]).await.unwrap();
        tokio::time::sleep(SETTLE).await;
        assert_eq!(
            s.parked.get(),
            1,
            "silent with part of a head, the connection parks"
        );
        s.client.write_all(&GET[12..]).await.unwrap();
        let resp = read_ok(&mut s.client).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(!resp.contains("connection: close"), "{resp}");
    }

    #[tokio::test]
    async fn a_request_in_flight_keeps_its_connection_unparked() {
        let mut s = start(Duration::from_secs(30), 5 * AFTER);
        s.client.write_all(GET).await.unwrap();
        let resp = read_ok(&mut s.client).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert_eq!(s.parked.get(), 0, "no park while the response was pending");
    }

    #[tokio::test]
    async fn a_parked_connection_closes_when_idle_too_long() {
        let mut s = start(Duration::from_millis(300), Duration::ZERO);
        s.client.write_all(GET).await.unwrap();
        read_ok(&mut s.client).await;
        let mut buf = [0u8; 16];
        let eof = tokio::time::timeout(Duration::from_secs(5), s.client.read(&mut buf)).await;
        assert_eq!(eof.expect("closed in time").unwrap(), 0, "EOF, no bytes");
        assert_eq!(s.parked.get(), 1);
        assert!(s.done.await.unwrap().is_ok(), "an idle close is no error");
    }

    #[tokio::test]
    async fn a_stalled_head_still_meets_the_header_timeout() {
        let mut s = start(Duration::from_millis(300), Duration::ZERO);
        s.client.write_all(GET).await.unwrap();
        read_ok(&mut s.client).await;
        s.client.write_all(&GET[..12]).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), s.done)
            .await
            .expect("a stalled head ends the connection");
        assert!(ended.unwrap().is_err(), "hyper's header timeout");
        assert_eq!(
            s.parked.get(),
            1,
            "parked once, then never before a request"
        );
    }

    #[tokio::test]
    async fn a_parked_connection_still_upgrades() {
        let mut s = start(Duration::from_secs(30), Duration::ZERO);
        s.client.write_all(GET).await.unwrap();
        read_ok(&mut s.client).await;
        tokio::time::sleep(SETTLE).await;
        assert_eq!(s.parked.get(), 1);
        let upgrade =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n";
        s.client.write_all(upgrade).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let read = async {
            while !got.ends_with(b"upgraded") {
                let n = s.client.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("upgraded in time");
        let got = String::from_utf8(got).unwrap();
        assert!(
            got.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{got}"
        );
    }
}
