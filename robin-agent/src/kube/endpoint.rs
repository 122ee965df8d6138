//! An API server reached with a credential file read on every call: TokenRequest on behalf of
//! a pod, the OIDC gateway's discovery documents. The same kube-rs client as the pod watch
//! (same TLS, no proxy), with what these calls need on top:
//! - the bearer is set per request from the file, so a rotated projected token is used at once
//!   (kube-rs's own token-file auth re-reads at most once a minute);
//! - each call is bounded in time and in response size, and a non-2xx answer becomes a
//!   [`CallError::Status`] carrying the API `Status` reason and message (RBAC's "forbidden"
//!   text), sanitized;
//! - kube-rs's typed helpers are not used for the response: on a decoding error they log the
//!   whole body at `warn`, and a TokenRequest body holds a token.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde::Deserialize;
use tokio::io::AsyncReadExt as _;

use super::config::{ConfigError, harden, read_roots, refuse_remote_plain};
use crate::secret::{MAX_TOKEN_LEN, Token, TokenError, sanitize};

/// Bounds of one call.
#[derive(Debug, Clone)]
pub struct CallLimits {
    pub connect_timeout: Duration,
    /// Credential read, connect, TLS, request and the whole body.
    pub total_timeout: Duration,
    pub max_body: usize,
}

/// Where and as whom.
#[derive(Debug, Clone)]
pub struct EndpointConfig<'a> {
    /// `https://host[:port][/prefix]`; `http://` only to a loopback address, and only with
    /// `allow_plain_loopback` (test doubles, `kubectl proxy`).
    pub url: &'a str,
    /// Trust only these roots (PEM); otherwise the system's. Not read for plain http.
    pub ca_file: Option<&'a Path>,
    /// With `ca_file`: trust the system's roots as well.
    pub system_roots: bool,
    pub token_file: PathBuf,
    pub allow_plain_loopback: bool,
    pub limits: CallLimits,
}

/// Why a call failed. Messages never contain the credential or a response body.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("reading the credential {}: {source}", .path.display())]
    ReadCredential {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credential {}: {source}", .path.display())]
    InvalidCredential {
        path: PathBuf,
        #[source]
        source: TokenError,
    },
    #[error("answered {code}{}", if .detail.is_empty() { String::new() } else { format!(": {}", .detail) })]
    Status { code: u16, detail: String },
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Transport(#[source] kube::Error),
    #[error("reading the response: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub struct Endpoint {
    config: kube::Config,
    /// Built on first use: kube-rs needs a runtime to build one, and most pods' sources are
    /// never called before their cache is warm.
    client: tokio::sync::OnceCell<kube::Client>,
    server: String,
    token_file: PathBuf,
    limits: CallLimits,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("server", &self.server)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Checks the URL and reads the CA now, so a misconfiguration fails at start-up.
    pub fn new(cfg: EndpointConfig<'_>) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::BadUrl(format!("{} ({why})", cfg.url));
        let uri: http::Uri = cfg.url.parse().map_err(|_| bad("not a url"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if cfg.allow_plain_loopback => refuse_remote_plain(&uri).map(|_| false)?,
            Some("http") => return Err(bad("plain http not allowed")),
            _ => return Err(bad("https required")),
        };
        if uri.host().is_none() || uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(bad("needs a host and no userinfo"));
        }
        if uri.query().is_some() {
            return Err(bad("a query is not allowed"));
        }
        let mut kcfg = kube::Config::new(uri);
        if https {
            kcfg.root_cert = roots(cfg.ca_file, cfg.system_roots)?;
        }
        kcfg.connect_timeout = Some(cfg.limits.connect_timeout);
        kcfg.read_timeout = Some(cfg.limits.total_timeout);
        Ok(Self {
            config: harden(kcfg),
            client: tokio::sync::OnceCell::new(),
            server: cfg.url.trim_end_matches('/').to_owned(),
            token_file: cfg.token_file,
            limits: cfg.limits,
        })
    }

    /// The URL, for logs and cache keys.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Sends `request` (a path below the endpoint's URL) with the credential read now, and
    /// returns the body of a 2xx answer.
    pub async fn call(&self, request: Request<Vec<u8>>) -> Result<Bytes, CallError> {
        let total = self.limits.total_timeout;
        tokio::time::timeout(total, self.call_inner(request))
            .await
            .map_err(|_| CallError::Timeout(total))?
    }

    async fn call_inner(&self, mut request: Request<Vec<u8>>) -> Result<Bytes, CallError> {
        let credential = read_credential(&self.token_file).await?;
        let mut bearer = HeaderValue::try_from(format!("Bearer {}", credential.expose()))
            .expect("Token::parse admits only token68 characters, all valid in a header");
        // `Debug` of the request then prints `Sensitive`, not the value.
        bearer.set_sensitive(true);
        request.headers_mut().insert(header::AUTHORIZATION, bearer);
        request
            .headers_mut()
            .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let client = self
            .client
            .get_or_try_init(|| async { kube::Client::try_from(self.config.clone()) })
            .await
            .map_err(CallError::Transport)?;
        let response = client
            .send(request.map(kube::client::Body::from))
            .await
            .map_err(CallError::Transport)?;
        let (parts, body) = response.into_parts();
        let max = self.limits.max_body;
        let body = Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| match e.downcast_ref::<LengthLimitError>() {
                Some(_) => CallError::TooLarge(max),
                None => CallError::Body(e),
            })?
            .to_bytes();
        if !parts.status.is_success() {
            return Err(CallError::Status {
                code: parts.status.as_u16(),
                detail: status_detail(&body),
            });
        }
        Ok(body)
    }
}

/// `None`: kube-rs's platform verifier (the system's roots).
fn roots(ca_file: Option<&Path>, system_roots: bool) -> Result<Option<Vec<Vec<u8>>>, ConfigError> {
    let Some(ca) = ca_file else {
        return Ok(None);
    };
    let mut der = read_roots(ca)?;
    if system_roots {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "loading a system root certificate");
        }
        if native.certs.is_empty() {
            return Err(ConfigError::NoSystemRoots);
        }
        der.extend(native.certs.into_iter().map(|c| c.to_vec()));
    }
    Ok(Some(der))
}

/// The `reason` and `message` of an API `Status`, sanitized; empty when the body is none.
fn status_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ApiStatus {
        message: Option<String>,
        reason: Option<String>,
    }
    let Ok(status) = serde_json::from_slice::<ApiStatus>(body) else {
        return String::new();
    };
    let text = format!(
        "{} {}",
        status.reason.unwrap_or_default(),
        status.message.unwrap_or_default()
    );
    sanitize(text.trim(), 160)
}

/// Reads and validates the credential; a file far larger than any token is not read whole.
async fn read_credential(path: &Path) -> Result<Token, CallError> {
    let read_err = |source| CallError::ReadCredential {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_err)?;
    let mut raw = String::new();
    file.take(MAX_TOKEN_LEN as u64 + 64)
        .read_to_string(&mut raw)
        .await
        .map_err(read_err)?;
    Token::parse(&raw).map_err(|source| CallError::InvalidCredential {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CallLimits {
        CallLimits {
            connect_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(2),
            max_body: 64,
        }
    }

    fn endpoint(url: &str, allow_plain_loopback: bool) -> Result<Endpoint, ConfigError> {
        Endpoint::new(EndpointConfig {
            url,
            ca_file: None,
            system_roots: false,
            token_file: PathBuf::from("/nonexistent"),
            allow_plain_loopback,
            limits: limits(),
        })
    }

    #[tokio::test]
    async fn plain_http_only_to_loopback_and_only_when_allowed() {
        assert!(endpoint("http://127.0.0.1:8080", true).is_ok());
        assert!(endpoint("http://[::1]:8080", true).is_ok());
        for (url, allow) in [
            ("http://127.0.0.1:8080", false),
            ("http://kubernetes.default.svc", true),
            ("http://10.0.0.1:6443", true),
            ("ftp://127.0.0.1", true),
            ("https://user:pw@host", true),
            ("https://host/?a=b", true),
            ("not a url", true),
        ] {
            let err = endpoint(url, allow).unwrap_err();
            assert!(matches!(err, ConfigError::BadUrl(_)), "{url}: {err}");
        }
    }

    #[test]
    fn status_detail_is_one_sanitized_line() {
        let body = br#"{"kind":"Status","reason":"Forbidden","message":"no\r\naccess"}"#;
        assert_eq!(status_detail(body), "Forbidden noaccess");
        assert_eq!(status_detail(b"<html>"), "");
    }

    /// The body cap holds, and the credential never appears in an error.
    #[tokio::test]
    async fn caps_the_body_and_reads_the_credential_per_call() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for body in ["{}", &"x".repeat(1000)] {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = vec![0u8; 4096];
                let n = conn.read(&mut head).await.unwrap();
                seen.push(String::from_utf8_lossy(&head[..n]).into_owned());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(resp.as_bytes()).await.unwrap();
            }
            seen
        });
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        let ep = Endpoint::new(EndpointConfig {
            url: &url,
            ca_file: None,
            system_roots: false,
            token_file: token_file.clone(),
            allow_plain_loopback: true,
            limits: limits(),
        })
        .unwrap();
        let get = || Request::get("/x").body(Vec::new()).unwrap();
        let missing = ep.call(get()).await.unwrap_err();
        assert!(
            matches!(missing, CallError::ReadCredential { .. }),
            "{missing}"
        );
        std::fs::write(&token_file, "first.secret\n").unwrap();
        assert_eq!(&ep.call(get()).await.unwrap()[..], b"{}");
        std::fs::write(&token_file, "second.secret").unwrap();
        let big = ep.call(get()).await.unwrap_err();
        assert!(matches!(big, CallError::TooLarge(64)), "{big}");
        assert!(!big.to_string().contains("secret"));
        let seen = server.await.unwrap();
        assert!(
            seen[0].contains("authorization: Bearer first.secret\r\n"),
            "{seen:?}"
        );
        assert!(
            seen[1].contains("authorization: Bearer second.secret\r\n"),
            "{seen:?}"
        );
    }
}
