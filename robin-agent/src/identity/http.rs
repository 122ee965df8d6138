//! The hardened outbound client `exchange` uses to reach OAuth token endpoints (the Kubernetes
//! API goes through `crate::kube::Endpoint`): one request per connection, https only (plain
//! http only to loopback or in-cluster `*.svc` hosts when the rule allows it), no redirects, no
//! proxy environment variables, bounded time and bounded response size.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub use crate::secret::sanitize;

/// Token responses are small; anything larger is refused rather than buffered.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid endpoint url {0:?}")]
    BadUrl(String),
    #[error(
        "refusing plain http to {0} (https required; http only for loopback or *.svc with allow_insecure_http)"
    )]
    InsecureRefused(String),
    #[error("reading ca file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ca file {0} holds no usable certificate")]
    NoCa(PathBuf),
    #[error("building tls config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("connecting to {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("connect to {0} timed out")]
    ConnectTimeout(String),
    #[error("request to {0} timed out")]
    Timeout(String),
    #[error("http exchange with {0}: {1}")]
    Hyper(String, #[source] hyper::Error),
    #[error("building request: {0}")]
    Request(#[from] http::Error),
    #[error("endpoint {0} answered with redirect {1}; redirects are not followed")]
    Redirect(String, StatusCode),
    #[error("response from {0} is larger than {1} bytes")]
    TooLarge(String, usize),
}

/// Settings shared by every source's client; tests shorten the timeouts.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    pub max_body: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(15),
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// A response with its whole (bounded) body. 3xx never gets here.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

pub struct HttpClient {
    tls: TlsConnector,
    settings: HttpSettings,
    allow_insecure_http: bool,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("settings", &self.settings)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish_non_exhaustive()
    }
}

/// Target of a request, checked once before any byte goes out.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
}

impl HttpClient {
    /// `ca_file`: trust only these roots (PEM); otherwise the system roots.
    pub fn new(
        ca_file: Option<&Path>,
        allow_insecure_http: bool,
        settings: HttpSettings,
    ) -> Result<Self, HttpError> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| HttpError::CaFile {
                    path: path.to_owned(),
                    source,
                })?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|source| HttpError::CaFile {
                        path: path.to_owned(),
                        source,
                    })?;
                    // A bad extra certificate in a bundle should not void the good ones.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(HttpError::NoCa(path.to_owned()));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
            settings,
            allow_insecure_http,
        })
    }

    /// Checks scheme and host without sending anything (also used at build time so a bad rule
    /// fails at startup).
    pub fn check_url(&self, url: &str) -> Result<(), HttpError> {
        self.target(url).map(|_| ())
    }

    fn target(&self, url: &str) -> Result<Target, HttpError> {
        let uri: Uri = url.parse().map_err(|_| HttpError::BadUrl(url.to_owned()))?;
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| HttpError::BadUrl(url.to_owned()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(HttpError::BadUrl(url.to_owned()));
        }
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => {
                if !(self.allow_insecure_http && insecure_host_ok(&host)) {
                    return Err(HttpError::InsecureRefused(host));
                }
                false
            }
            _ => return Err(HttpError::BadUrl(url.to_owned())),
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        Ok(Target {
            tls,
            host,
            port,
            authority,
        })
    }

    /// POSTs `body` and returns the status and bounded body. A 3xx is an error.
    pub async fn post(
        &self,
        url: &str,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> Result<Response, HttpError> {
        let target = self.target(url)?;
        let uri: Uri = url.parse().map_err(|_| HttpError::BadUrl(url.to_owned()))?;
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, target.authority.as_str())
            .header(header::CONTENT_TYPE, content_type)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "robin-agent")
            .body(Full::new(Bytes::from(body)))?;
        let host = target.host.clone();
        match tokio::time::timeout(self.settings.total_timeout, self.send(target, request)).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout(host)),
        }
    }

    async fn send(
        &self,
        target: Target,
        request: Request<Full<Bytes>>,
    ) -> Result<Response, HttpError> {
        let host = target.host.clone();
        // Resolves with the system resolver and connects directly: proxy variables are never read.
        let tcp = tokio::time::timeout(
            self.settings.connect_timeout,
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| HttpError::ConnectTimeout(host.clone()))?
        .map_err(|e| HttpError::Connect(host.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        if target.tls {
            let name = match host.parse::<IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(host.clone())
                    .map_err(|_| HttpError::BadUrl(host.clone()))?,
            };
            let tls =
                tokio::time::timeout(self.settings.connect_timeout, self.tls.connect(name, tcp))
                    .await
                    .map_err(|_| HttpError::ConnectTimeout(host.clone()))?
                    .map_err(|e| HttpError::Connect(host.clone(), e))?;
            self.exchange(&host, TokioIo::new(tls), request).await
        } else {
            self.exchange(&host, TokioIo::new(tcp), request).await
        }
    }

    async fn exchange<I>(
        &self,
        host: &str,
        io: I,
        request: Request<Full<Bytes>>,
    ) -> Result<Response, HttpError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let hyper_err = |e| HttpError::Hyper(host.to_owned(), e);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(hyper_err)?;
        // The connection task ends when the response is read or the future is dropped.
        let conn = tokio::spawn(conn);
        let result = async {
            let response = sender.send_request(request).await.map_err(hyper_err)?;
            let status = response.status();
            if status.is_redirection() {
                return Err(HttpError::Redirect(host.to_owned(), status));
            }
            let limit = self.settings.max_body;
            if response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|len| len > limit as u64)
            {
                return Err(HttpError::TooLarge(host.to_owned(), limit));
            }
            let body = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(e) => hyper_err(*e),
                    Err(_) => HttpError::TooLarge(host.to_owned(), limit),
                })?
                .to_bytes();
            Ok(Response { status, body })
        }
        .await;
        conn.abort();
        result
    }
}

/// Plain http is tolerable only where the network path cannot leave the node or cluster.
fn insecure_host_ok(host: &str) -> bool {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".svc") || host.ends_with(".svc.cluster.local")
}

/// `application/x-www-form-urlencoded` encoding of name/value pairs.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_component(k, &mut out);
        out.push('=');
        encode_component(v, &mut out);
    }
    out
}

fn encode_component(s: &str, out: &mut String) {
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(insecure: bool) -> HttpClient {
        HttpClient::new(None, insecure, HttpSettings::default()).unwrap()
    }

    #[test]
    fn http_only_for_loopback_and_svc_when_allowed() {
        let strict = client(false);
        assert!(strict.check_url("https://sts.example.com/token").is_ok());
        assert!(matches!(
            strict.check_url("http://127.0.0.1:8080/token"),
            Err(HttpError::InsecureRefused(_))
        ));
        let lax = client(true);
        assert!(lax.check_url("http://127.0.0.1:8080/token").is_ok());
        assert!(lax.check_url("http://[::1]:8080/token").is_ok());
        assert!(lax.check_url("http://sts.auth.svc/token").is_ok());
        assert!(lax.check_url("http://sts.auth.svc.cluster.local/t").is_ok());
        assert!(lax.check_url("http://sts.example.com/token").is_err());
        assert!(lax.check_url("http://10.0.0.1/token").is_err());
        assert!(lax.check_url("ftp://127.0.0.1/token").is_err());
        assert!(lax.check_url("https://user@host/token").is_err());
    }

    #[test]
    fn form_encoding_and_sanitize() {
        assert_eq!(
            form_encode(&[("grant_type", "urn:a b"), ("x", "é&=")]),
            "grant_type=urn%3Aa+b&x=%C3%A9%26%3D"
        );
        assert_eq!(sanitize("bad\r\nX: y\u{7f}é", 128), "badX: y");
        assert_eq!(sanitize(&"a".repeat(200), 128).len(), 131);
    }
}
