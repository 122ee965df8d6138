//! Classifies a connection from its first bytes: a TLS ClientHello (and its SNI), bytes that
//! start like a plain HTTP request, or anything else. The parsers never index past what they
//! were given. A ClientHello with a malformed shape has "no name" (splice); bytes that start
//! like HTTP are HTTP however the rest looks, because hyper, not this classifier, parses them
//! (and answers 400/431 to what it cannot accept): nothing that reads as a request is ever
//! spliced on the strength of a guess made here.
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{config::normalize_host, tls::mint::is_dns_name};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Tls {
        sni: Option<String>,
    },
    /// Starts like an HTTP request (`METHOD SP target SP HTTP/x.y`). `host` is the first
    /// request's Host when its header section was already complete and clean: for logs only,
    /// since every request is routed on hyper's own parse.
    Http {
        host: Option<String>,
    },
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    Done(Sniffed),
    NeedMore,
}

/// Largest TLS record payload allowed (RFC 8446 §5.1, plus the TLS 1.2 expansion allowance).
const MAX_RECORD: usize = 16384 + 2048;
const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const MAX_HTTP_HEADERS: usize = 128;
/// Longest method token taken for HTTP (the longest registered method is 17 bytes).
const MAX_METHOD: usize = 24;

pub fn sniff(buf: &[u8]) -> Parse {
    match buf.first() {
        None => Parse::NeedMore,
        Some(&HANDSHAKE) => match buf.get(1) {
            None => Parse::NeedMore,
            Some(3) => sniff_tls(buf),
            Some(_) => Parse::Done(Sniffed::Unknown),
        },
        Some(_) => match skip_empty_lines(buf) {
            [] => Parse::NeedMore,
            [b, ..] if is_tchar(*b) => sniff_http(skip_empty_lines(buf)),
            _ => Parse::Done(Sniffed::Unknown),
        },
    }
}

/// Empty lines before a request line, which servers ignore (RFC 9112 §2.2) and so do hyper and
/// httparse: a request behind them is still a request.
fn skip_empty_lines(buf: &[u8]) -> &[u8] {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    &buf[start..]
}

/// What the bytes are when no more will be read (buffer bound, EOF or timeout) before
/// [`sniff`] decided: a request line still being sent is HTTP (hyper then answers it, e.g. 414
/// or 431 for a huge one, 400 for a truncated one); anything else is unknown.
pub fn sniff_final(buf: &[u8]) -> Sniffed {
    match sniff(buf) {
        Parse::Done(s) => s,
        Parse::NeedMore if starts_like_request(skip_empty_lines(buf)) => {
            Sniffed::Http { host: None }
        }
        Parse::NeedMore => Sniffed::Unknown,
    }
}

/// Reads until [`sniff`] decides, `max` bytes are buffered, EOF, or `wait` has passed. Returns
/// the bytes read, which the caller must replay.
pub async fn read_prefix<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    wait: Duration,
) -> std::io::Result<(Vec<u8>, Sniffed)> {
    read_prefix_after(Vec::with_capacity(1024.min(max)), r, max, wait).await
}

/// As [`read_prefix`], for a stream whose first bytes (`buf`) were already read, e.g. the
/// start of a ClientHello sent right behind a CONNECT.
pub async fn read_prefix_after<R: AsyncRead + Unpin>(
    mut buf: Vec<u8>,
    r: &mut R,
    max: usize,
    wait: Duration,
) -> std::io::Result<(Vec<u8>, Sniffed)> {
    let deadline = tokio::time::Instant::now() + wait;
    // Each pass reads at least one byte, so this ends after at most `max` passes.
    loop {
        if !buf.is_empty()
            && let Parse::Done(s) = sniff(&buf)
        {
            return Ok((buf, s));
        }
        if buf.len() >= max {
            let s = sniff_final(&buf);
            return Ok((buf, s));
        }
        let mut chunk = vec![0u8; (max - buf.len()).min(4096)];
        match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Err(_) | Ok(Ok(0)) => {
                let s = sniff_final(&buf);
                return Ok((buf, s));
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

fn sniff_tls(buf: &[u8]) -> Parse {
    let no_sni = Parse::Done(Sniffed::Tls { sni: None });
    let mut handshake = Vec::new();
    let mut pos = 0usize;
    // Each pass consumes one non-empty record from `buf`, so the loop is bounded by its length.
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return Parse::NeedMore;
        };
        if header[0] != HANDSHAKE || header[1] != 3 {
            // A non-handshake record before the ClientHello is complete.
            return no_sni;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return no_sni;
        }
        let Some(body) = buf.get(pos + 5..pos + 5 + len) else {
            return Parse::NeedMore;
        };
        handshake.extend_from_slice(body);
        pos += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != CLIENT_HELLO {
                return no_sni;
            }
            let hello_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if let Some(hello) = handshake.get(4..4 + hello_len) {
                return Parse::Done(Sniffed::Tls {
                    sni: client_hello_sni(hello),
                });
            }
        }
    }
}

/// A bounds-checked reader over a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The server_name from a ClientHello body (after the 4-byte handshake header).
fn client_hello_sni(hello: &[u8]) -> Option<String> {
    let mut c = Cursor(hello);
    let _version = c.u16()?;
    let _random = c.take(32)?;
    let session_id = c.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    let _suites = c.vec16()?;
    let _compression = c.vec8()?;
    let mut exts = Cursor(c.vec16()?);
    let mut sni = None;
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty != EXT_SERVER_NAME {
            continue;
        }
        if sni.is_some() {
            // Duplicate extensions are illegal (RFC 8446 §4.2); don't guess which one counts.
            return None;
        }
        let mut ext = Cursor(data);
        let mut list = Cursor(ext.vec16()?);
        if !ext.0.is_empty() {
            return None;
        }
        let name_type = list.u8()?;
        let name = list.vec16()?;
        if name_type != 0 {
            return None;
        }
        let name = std::str::from_utf8(name).ok()?;
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if !is_dns_name(&name) {
            return None;
        }
        sni = Some(name);
    }
    sni
}

/// RFC 9110 `tchar`: the bytes of a method token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Starts with a method token and a space.
fn method_sp(buf: &[u8]) -> bool {
    buf.iter()
        .position(|&b| b == b' ')
        .is_some_and(|sp| sp > 0 && sp <= MAX_METHOD && buf[..sp].iter().all(|&b| is_tchar(b)))
}

/// `METHOD SP` followed by visible ASCII so far, with no line end yet: a request line that has
/// not been completely received.
fn starts_like_request(buf: &[u8]) -> bool {
    // A line cut between its CR and LF is still a request line.
    let buf = buf.strip_suffix(b"\r").unwrap_or(buf);
    method_sp(buf)
        && buf
            .iter()
            .all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
}

/// Decides on the request line: `METHOD SP target SP HTTP/d.d` is HTTP (hyper parses the
/// rest); any other complete first line is not.
fn sniff_http(buf: &[u8]) -> Parse {
    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
        let method_so_far = buf.len() <= MAX_METHOD && buf.iter().all(|&b| is_tchar(b));
        return if method_so_far || starts_like_request(buf) {
            Parse::NeedMore
        } else {
            Parse::Done(Sniffed::Unknown)
        };
    };
    let line = &buf[..eol];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let version = line.len().checked_sub(8).map(|at| &line[at..]);
    let is_request = method_sp(line)
        && version.is_some_and(|v| {
            v[..5].eq_ignore_ascii_case(b"http/")
                && v[5].is_ascii_digit()
                && v[6] == b'.'
                && v[7].is_ascii_digit()
        });
    if !is_request {
        return Parse::Done(Sniffed::Unknown);
    }
    Parse::Done(Sniffed::Http {
        host: clean_host(buf),
    })
}

/// The Host of a complete, cleanly parsed HTTP/1.x header section with exactly one Host.
fn clean_host(buf: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HTTP_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(buf) else {
        return None;
    };
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    match (hosts.next(), hosts.next()) {
        (Some(h), None) => std::str::from_utf8(h.value)
            .ok()
            .map(|h| normalize_host(h).into_owned())
            .filter(|h| is_dns_name(h)),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello with the given SNI extension data, split into records of at most
    /// `record` bytes.
    pub fn client_hello(sni_ext: Option<Vec<u8>>, record: usize) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        let mut exts = Vec::new();
        // An unrelated extension first.
        exts.extend([0x00, 0x0b, 0, 2, 1, 0]);
        if let Some(data) = sni_ext {
            exts.extend([0, 0]);
            exts.extend((data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut out = Vec::new();
        for chunk in hs.chunks(record) {
            out.extend([HANDSHAKE, 3, 1]);
            out.extend((chunk.len() as u16).to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    pub fn sni_ext(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name);
        let mut v = (entry.len() as u16).to_be_bytes().to_vec();
        v.extend(entry);
        v
    }

    fn tls(sni: Option<&str>) -> Parse {
        Parse::Done(Sniffed::Tls {
            sni: sni.map(str::to_owned),
        })
    }

    #[test]
    fn finds_sni_whole_and_split_over_records() {
        let hello = client_hello(Some(sni_ext(b"Broker.Example.com")), 4096);
        assert_eq!(sniff(&hello), tls(Some("broker.example.com")));
        for record in [1, 3, 7, 40] {
            let hello = client_hello(Some(sni_ext(b"broker.example.com")), record);
            assert_eq!(sniff(&hello), tls(Some("broker.example.com")), "{record}");
        }
    }

    #[test]
    fn every_truncation_needs_more_never_panics() {
        let hello = client_hello(Some(sni_ext(b"a.example.com")), 50);
        for cut in 0..hello.len() {
            assert_eq!(sniff(&hello[..cut]), Parse::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn no_sni_and_hostile_sni() {
        assert_eq!(sniff(&client_hello(None, 4096)), tls(None));
        for bad in [&b""[..], b"a b.com", b"a\r\nb", b"\xff\xfe", &[b'a'; 300]] {
            assert_eq!(sniff(&client_hello(Some(sni_ext(bad)), 4096)), tls(None));
        }
        // List length past the extension end.
        assert_eq!(
            sniff(&client_hello(Some(vec![0xff, 0xff, 0, 0, 1, b'a']), 4096)),
            tls(None)
        );
        // Name length past the list end.
        assert_eq!(
            sniff(&client_hello(Some(vec![0, 4, 0, 0xff, 0xff, b'a']), 4096)),
            tls(None)
        );
        // Zero-length extension.
        assert_eq!(sniff(&client_hello(Some(vec![]), 4096)), tls(None));
        // Non-host-name type.
        let mut other = sni_ext(b"a.com");
        other[2] = 1;
        assert_eq!(sniff(&client_hello(Some(other), 4096)), tls(None));
    }

    #[test]
    fn hostile_record_and_handshake_headers() {
        // Zero-length record.
        assert_eq!(sniff(&[0x16, 3, 1, 0, 0]), tls(None));
        // Oversized record length.
        assert_eq!(sniff(&[0x16, 3, 1, 0xff, 0xff, 1]), tls(None));
        // Not a ClientHello.
        assert_eq!(sniff(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]), tls(None));
        // Hello claims 16 MiB: waits for more (the caller's buffer bound ends it).
        assert_eq!(
            sniff(&[0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]),
            Parse::NeedMore
        );
        // Hello body lengths pointing past the end.
        let mut hs = vec![CLIENT_HELLO, 0, 0, 36, 3, 3];
        hs.extend([0u8; 32]);
        hs.extend([0xff, 0]);
        let mut rec = vec![0x16, 3, 1, 0, hs.len() as u8];
        rec.extend(hs);
        assert_eq!(sniff(&rec), tls(None));
        // Alert record interleaved before the hello completed.
        let mut hello = client_hello(Some(sni_ext(b"a.com")), 10);
        hello[15] = 0x15;
        assert_eq!(sniff(&hello), tls(None));
        // TLS-looking first byte, wrong version.
        assert_eq!(sniff(&[0x16, 9, 9]), Parse::Done(Sniffed::Unknown));
    }

    fn http(host: Option<&str>) -> Parse {
        Parse::Done(Sniffed::Http {
            host: host.map(str::to_owned),
        })
    }

    #[test]
    fn http_host() {
        let r = b"GET /x?y HTTP/1.1\r\nUser-Agent: t\r\nHost: Broker.Example.com:80\r\n\r\n";
        assert_eq!(sniff(r), http(Some("broker.example.com")));
        assert_eq!(sniff(&r[..12]), Parse::NeedMore);
        // The request line decides; a header section still arriving has no host (logs only).
        assert_eq!(sniff(&r[..20]), http(None));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n\r\n"), http(None));
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n"),
            http(None)
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), http(None));
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), http(None));
        // Leading empty lines are skipped, as servers skip them.
        assert_eq!(
            sniff(b"\r\n\nGET / HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            http(Some("a.com"))
        );
        assert_eq!(sniff(b"\r\n"), Parse::NeedMore);
        assert_eq!(sniff_final(b"\r\nGET /x"), Sniffed::Http { host: None });
        assert_eq!(sniff(b"\r\n\x00"), Parse::Done(Sniffed::Unknown));
    }

    /// The shapes a lenient upstream parser might accept but the old classifier spliced: each is
    /// HTTP here, so hyper answers it instead of the ruled host's own parser.
    #[test]
    fn unusual_requests_are_http_not_unknown() {
        for raw in [
            &b"GET / HTTP/1.0\r\nHost: broker.test\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: broker.test\r\nX: a\r\n  folded\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: broker.test\r\nTransfer-Encoding : chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nAuthorization : x\r\n\r\n",
            b"get /lower HTTP/1.1\r\n\r\n",
            b"GET http://broker.test/abs HTTP/1.1\r\n\r\n",
            b"GET \x00 HTTP/1.1\r\n",
        ] {
            assert!(
                matches!(sniff(raw), Parse::Done(Sniffed::Http { .. })),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // A header section over the sniff bound, and a request line that never ends.
        let mut big = b"GET / HTTP/1.1\r\nHost: broker.test\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 20_000));
        assert_eq!(sniff_final(&big[..16 * 1024]), Sniffed::Http { host: None });
        let mut line = b"GET /".to_vec();
        line.extend(std::iter::repeat_n(b'a', 20_000));
        assert_eq!(sniff(&line), Parse::NeedMore);
        assert_eq!(sniff_final(&line), Sniffed::Http { host: None });
        // Truncated after the method: still a request being sent.
        assert_eq!(
            sniff_final(b"GET /x HTTP/1.1\r\nHost: bro"),
            Sniffed::Http { host: None }
        );
    }

    #[test]
    fn other_protocols_are_unknown() {
        for raw in [
            &b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"[..],
            b"\x00\x01garbage",
            b"SET key value\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"GET /\r\n",
            b"EHLO mail.example.com\r\n",
        ] {
            assert_eq!(
                sniff_final(raw),
                Sniffed::Unknown,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(sniff_final(b"GET"), Sniffed::Unknown);
        assert_eq!(sniff_final(b""), Sniffed::Unknown);
    }

    #[tokio::test]
    async fn read_prefix_is_bounded_in_size_and_time() {
        // Huge request line: stops at the bound, still HTTP (hyper answers it).
        let mut big = b"GET /".to_vec();
        big.extend(std::iter::repeat_n(b'a', 100_000));
        let (buf, s) = read_prefix(&mut &big[..], 16 * 1024, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((buf.len(), s), (16 * 1024, Sniffed::Http { host: None }));
        // Binary: decided on the first read.
        let junk = vec![0x80u8; 100_000];
        let (buf, s) = read_prefix(&mut &junk[..], 16 * 1024, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((buf.len(), s), (4096, Sniffed::Unknown));
        // A client that sends half a hello and stalls: times out with what it has.
        let (mut client, mut server) = tokio::io::duplex(1024);
        let hello = client_hello(Some(sni_ext(b"a.com")), 4096);
        tokio::io::AsyncWriteExt::write_all(&mut client, &hello[..20])
            .await
            .unwrap();
        let t = std::time::Instant::now();
        let (buf, s) = read_prefix(&mut server, 16 * 1024, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!((buf.len(), s), (20, Sniffed::Unknown));
        assert!(t.elapsed() < Duration::from_secs(2));
        // Split across writes: waits and then finds the name.
        let (mut client, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            for part in hello.chunks(9) {
                tokio::io::AsyncWriteExt::write_all(&mut client, part)
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let (_, s) = read_prefix(&mut server, 16 * 1024, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            s,
            Sniffed::Tls {
                sni: Some("a.com".into())
            }
        );
        drop(task.await.unwrap());
    }
}
