//! The first request head on a gateway connection, read before anything is decided: a
//! `CONNECT host:port` opens a tunnel (the head is consumed), any other method is a
//! forward-proxy request (the head is replayed to the proxy's HTTP server, which parses it
//! again with every check it applies to captured plain HTTP).
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Most headers parsed in a CONNECT head; a client sends a handful.
const MAX_HEADERS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("connection closed before a request head")]
    Closed,
    #[error("no request head within the time allowed")]
    Timeout,
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed request head")]
    Malformed,
    #[error("CONNECT target {0:?} is not host:port")]
    BadAuthority(String),
    #[error("reading the request head: {0}")]
    Io(String),
}

/// What the first request asks of the gateway.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// `CONNECT host:port`; `rest`: bytes the client sent after the head (the start of its
    /// ClientHello, for an eager client).
    Connect {
        host: String,
        port: u16,
        rest: Vec<u8>,
    },
    /// Any other method; `bytes`: everything read so far, head included, to be replayed.
    Forward { bytes: Vec<u8> },
}

/// Reads until the first request head is complete, bounded by `max` bytes and `wait`.
pub async fn read<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    wait: Duration,
) -> Result<Head, HeadError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = Vec::with_capacity(1024);
    // Each pass reads at least one byte, so this ends after at most `max` passes.
    loop {
        if let Some(head) = parse(&buf)? {
            return Ok(head);
        }
        if buf.len() >= max {
            return Err(HeadError::TooLarge(max));
        }
        let mut chunk = vec![0u8; (max - buf.len()).min(4096)];
        match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Err(_) => return Err(HeadError::Timeout),
            Ok(Ok(0)) => return Err(HeadError::Closed),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(HeadError::Io(e.to_string())),
        }
    }
}

/// `None` while the head is incomplete.
fn parse(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HeadError::Malformed),
    };
    if req.method != Some("CONNECT") {
        return Ok(Some(Head::Forward {
            bytes: buf.to_vec(),
        }));
    }
    let target = req.path.unwrap_or_default();
    let (host, port) = split_authority(target)?;
    Ok(Some(Head::Connect {
        host,
        port,
        rest: buf[len..].to_vec(),
    }))
}

/// `host:port` or `[v6]:port`, as RFC 9110 §9.3.6 requires of a CONNECT target.
fn split_authority(target: &str) -> Result<(String, u16), HeadError> {
    let bad = || HeadError::BadAuthority(target.chars().take(256).collect());
    let authority: http::uri::Authority = target.parse().map_err(|_| bad())?;
    if authority.as_str() != target || target.contains('@') {
        return Err(bad());
    }
    let port = authority.port_u16().filter(|p| *p != 0).ok_or_else(bad)?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_now(bytes: &[u8]) -> Result<Head, HeadError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(read(&mut &bytes[..], 1024, Duration::from_secs(1)))
    }

    #[test]
    fn connect_is_consumed_and_what_follows_kept() {
        let head =
            read_now(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n\x16\x03\x01");
        assert_eq!(
            head,
            Ok(Head::Connect {
                host: "api.test".into(),
                port: 443,
                rest: vec![0x16, 3, 1],
            })
        );
        let v6 = read_now(b"CONNECT [fd00::1]:8443 HTTP/1.1\r\n\r\n");
        assert!(matches!(v6, Ok(Head::Connect { host, port: 8443, .. }) if host == "fd00::1"));
    }

    #[test]
    fn other_methods_are_replayed_whole() {
        let raw = b"GET http://api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\nbody";
        assert_eq!(
            read_now(raw),
            Ok(Head::Forward {
                bytes: raw.to_vec()
            })
        );
    }

    #[test]
    fn bad_heads_are_refused() {
        for target in ["api.test", "api.test:0", "user@api.test:443", ":443", "/x"] {
            let raw = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
            assert!(
                matches!(read_now(raw.as_bytes()), Err(HeadError::BadAuthority(_))),
                "{target}"
            );
        }
        assert_eq!(
            read_now(b"GET / HT\x00TP/1.1\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(read_now(b"GET / HTTP/1.1\r\n"), Err(HeadError::Closed));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(read_now(huge.as_bytes()), Err(HeadError::TooLarge(1024)));
    }
}
