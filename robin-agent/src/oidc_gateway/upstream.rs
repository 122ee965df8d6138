//! The outbound side: one HTTP/1.1 request per fetch to the API server, authenticated with the
//! gateway's ServiceAccount token. Fetches are rare (once per cache TTL), so a fresh connection
//! each time is cheap and means no pool, no proxy, no redirects: nothing but the configured
//! upstream is ever dialled.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderValue, Request, StatusCode,
    header::{ACCEPT, AUTHORIZATION, HOST, USER_AGENT},
};
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt as _;
use tokio_rustls::TlsConnector;

use crate::identity::{MAX_TOKEN_LEN, Token, TokenError};

/// Why a fetch failed. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("reading the token file {}: {}", .0.display(), .1)]
    ReadToken(PathBuf, #[source] std::io::Error),
    #[error("token file {}: {}", .0.display(), .1)]
    InvalidToken(PathBuf, #[source] TokenError),
    #[error("connecting to {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("connecting to {0}: timed out after {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("tls handshake with {0}: {1}")]
    Tls(String, #[source] std::io::Error),
    #[error("http exchange with the upstream: {0}")]
    Http(#[source] hyper::Error),
    #[error("building the upstream request: {0}")]
    Request(#[source] http::Error),
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
    #[error("upstream answered {0}")]
    Status(StatusCode),
    #[error("upstream response is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the upstream response: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("upstream response is not json: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("upstream response is not a json object")]
    NotObject,
}

/// A validated upstream: where to connect, what to call it in TLS and `Host`, and how.
pub struct Upstream {
    /// `None` for plain HTTP (allowed only to a loopback address, for tests).
    pub(super) tls: Option<TlsConnector>,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) server_name: ServerName<'static>,
    /// `host[:port]` as given, for the `Host` header.
    pub(super) authority: String,
    /// Path prefix of the upstream URL, without a trailing slash.
    pub(super) base_path: String,
    pub(super) token_file: PathBuf,
    pub(super) connect_timeout: Duration,
    pub(super) total_timeout: Duration,
    pub(super) max_body: usize,
}

/// Aborts the spawned connection driver when the fetch ends, also on timeout or cancellation.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Upstream {
    /// GETs `path` (below the base path) and returns the parsed JSON object. The token file is
    /// read on every call: projected tokens rotate.
    pub async fn fetch(&self, path: &str) -> Result<serde_json::Value, UpstreamError> {
        match tokio::time::timeout(self.total_timeout, self.fetch_inner(path)).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout(self.total_timeout)),
        }
    }

    async fn fetch_inner(&self, path: &str) -> Result<serde_json::Value, UpstreamError> {
        let token = read_token(&self.token_file).await?;
        let mut bearer = HeaderValue::try_from(format!("Bearer {}", token.expose()))
            .expect("Token::parse admits only token68 characters, all valid in a header");
        // `Debug` of the request then prints `Sensitive`, not the value.
        bearer.set_sensitive(true);
        let request = Request::get(format!("{}{path}", self.base_path))
            .header(HOST, &self.authority)
            .header(AUTHORIZATION, bearer)
            .header(ACCEPT, "application/json")
            .header(
                USER_AGENT,
                concat!("robin-oidc-gateway/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(UpstreamError::Request)?;

        let tcp = match tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(UpstreamError::Connect(self.authority.clone(), e)),
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout(
                    self.authority.clone(),
                    self.connect_timeout,
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        let response = match &self.tls {
            Some(tls) => {
                let stream = tls
                    .connect(self.server_name.clone(), tcp)
                    .await
                    .map_err(|e| UpstreamError::Tls(self.authority.clone(), e))?;
                send(TokioIo::new(stream), request, self.max_body).await?
            }
            None => send(TokioIo::new(tcp), request, self.max_body).await?,
        };
        let (parts, body) = response;
        if parts.status != StatusCode::OK {
            return Err(UpstreamError::Status(parts.status));
        }
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(UpstreamError::NotJson)?;
        if !value.is_object() {
            return Err(UpstreamError::NotObject);
        }
        Ok(value)
    }
}

async fn send<T>(
    io: T,
    request: Request<Empty<Bytes>>,
    max: usize,
) -> Result<(http::response::Parts, Bytes), UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(UpstreamError::Http)?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(UpstreamError::Http)?;
    let (parts, body) = response.into_parts();
    let collected = Limited::new(body, max).collect().await.map_err(|e| {
        if e.downcast_ref::<LengthLimitError>().is_some() {
            UpstreamError::TooLarge(max)
        } else {
            UpstreamError::Body(e)
        }
    })?;
    Ok((parts, collected.to_bytes()))
}

/// Reads and validates the token; a file far larger than any token is not read whole.
async fn read_token(path: &Path) -> Result<Token, UpstreamError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| UpstreamError::ReadToken(path.to_owned(), e))?;
    let mut raw = String::new();
    file.take(MAX_TOKEN_LEN as u64 + 64)
        .read_to_string(&mut raw)
        .await
        .map_err(|e| UpstreamError::ReadToken(path.to_owned(), e))?;
    Token::parse(&raw).map_err(|e| UpstreamError::InvalidToken(path.to_owned(), e))
}

/// Whether plain HTTP may be used towards `host`: only a loopback IP literal, so a test double
/// can run without TLS but a real API server never can.
pub(super) fn is_loopback_literal(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

pub(super) fn connector(config: rustls::ClientConfig) -> TlsConnector {
    TlsConnector::from(Arc::new(config))
}
