//! Robin's own answers. The forwarding path ([`super::intercept`]) only returns a
//! [`ProxyError`]; this is the one place that turns it into a synthetic response: the status,
//! the short reason body, whether the connection closes, and the level it is logged at
//! (linkerd2-proxy `app/core/src/errors/respond.rs`). Nothing of such a response reaches any
//! upstream, and no body names more than the workload's operator needs.
use bytes::Bytes;
use http::{
    HeaderValue, Response, StatusCode,
    header::{CONNECTION, CONTENT_TYPE},
};
use http_body_util::{Either, Full};
use tracing::{debug, info, warn};

use super::{
    route::Refusal,
    upstream::{UpstreamBody, UpstreamError},
};
use crate::identity::{AudienceMismatch, IdentityError};

/// A response body: the upstream's, streamed, or one of Robin's own.
pub type Body = Either<UpstreamBody, Full<Bytes>>;

/// Why a request was not forwarded, or its response not relayed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// `origin`: the source's description (never a secret).
    #[error("identity from {origin} unavailable: {error}")]
    IdentityUnavailable {
        origin: String,
        error: IdentityError,
    },
    #[error("rule {rule}: {mismatch}")]
    AudienceMismatch {
        rule: String,
        mismatch: AudienceMismatch,
    },
    /// Unreachable for a parsed token and a validated format; refused rather than guessed.
    #[error("credential header value could not be rendered")]
    CredentialUnrenderable,
    #[error("invalid request target")]
    InvalidTarget,
    /// The upstream could not be reached (or not verified): no connection at all.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(UpstreamError),
    #[error("upstream cannot upgrade over h2")]
    UpgradeOverH2,
    #[error("upstream switched protocols without an upgrade request")]
    UnexpectedUpgrade,
    /// A fresh connection closed before any byte of the request was written.
    #[error("upstream connection closed before the request was written")]
    UpstreamUnsent,
    /// The workload's own request body was malformed (e.g. bad chunking).
    #[error("request body failed: {0}")]
    RequestBody(UpstreamError),
    #[error("upstream request failed: {0}")]
    UpstreamFailed(UpstreamError),
}

/// The status a refusal is answered with (also by `robin gateway` for a CONNECT, which it
/// answers before any HTTP server is involved).
pub fn refusal_status(r: &Refusal) -> StatusCode {
    match r {
        Refusal::PlaintextRefused { .. } => StatusCode::MISDIRECTED_REQUEST,
        Refusal::DestinationDenied { .. } => StatusCode::FORBIDDEN,
        Refusal::Unresolvable(_) => StatusCode::BAD_GATEWAY,
        Refusal::InvalidHost | Refusal::ConflictingHost | Refusal::NotAbsolute => {
            StatusCode::BAD_REQUEST
        }
    }
}

impl ProxyError {
    /// Sorts a failed send: the workload's broken body is its own fault (400), anything else
    /// the upstream's (502).
    pub fn from_send(e: UpstreamError) -> Self {
        if e.is_request_body() {
            Self::RequestBody(e)
        } else {
            Self::UpstreamFailed(e)
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Refused(r) => refusal_status(r),
            Self::InvalidTarget | Self::RequestBody(_) => StatusCode::BAD_REQUEST,
            Self::IdentityUnavailable { .. }
            | Self::AudienceMismatch { .. }
            | Self::CredentialUnrenderable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnavailable(_)
            | Self::UpgradeOverH2
            | Self::UnexpectedUpgrade
            | Self::UpstreamUnsent
            | Self::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The body: short, fixed text; only a sanitized OAuth error code is ever interpolated.
    fn reason(&self) -> Bytes {
        Bytes::from_static(match self {
            Self::Refused(Refusal::InvalidHost) => b"robin: invalid host\n",
            Self::Refused(Refusal::ConflictingHost) => b"robin: conflicting host\n",
            Self::Refused(Refusal::PlaintextRefused { .. }) => {
                b"robin: plaintext to this address is not allowed for this host\n"
            }
            Self::Refused(Refusal::NotAbsolute) => {
                b"robin: a forward proxy needs an absolute http:// target (CONNECT for https)\n"
            }
            Self::Refused(Refusal::Unresolvable(_)) => b"robin: destination does not resolve\n",
            Self::Refused(Refusal::DestinationDenied { .. }) => b"robin: destination not allowed\n",
            // The OAuth error code is already sanitized (printable ASCII, truncated) and tells
            // the workload's operator why; nothing else about the source is shown.
            Self::IdentityUnavailable {
                error: IdentityError::OAuth { code, .. },
                ..
            } => {
                return Bytes::from(format!(
                    "robin: workload identity unavailable: token endpoint error {code}\n"
                ));
            }
            Self::IdentityUnavailable { .. } | Self::CredentialUnrenderable => {
                b"robin: workload identity unavailable\n"
            }
            Self::AudienceMismatch { .. } => b"robin: audience mismatch\n",
            Self::InvalidTarget => b"robin: invalid request target\n",
            Self::UpstreamUnavailable(_) => b"robin: upstream unavailable\n",
            Self::UpgradeOverH2 => b"robin: upstream cannot upgrade over h2\n",
            Self::UnexpectedUpgrade => b"robin: unexpected upgrade\n",
            Self::UpstreamUnsent | Self::UpstreamFailed(_) => b"robin: upstream request failed\n",
            Self::RequestBody(_) => b"robin: malformed request body\n",
        })
    }

    /// A smuggling shape or lost framing: nothing that follows on this connection is trusted.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::Refused(Refusal::ConflictingHost) | Self::RequestBody(_)
        )
    }

    /// Failures an operator acts on are warnings; the workload's own malformed requests that
    /// carry no sign of an attack are debug.
    fn log(&self) {
        let status = self.status().as_u16();
        match self {
            Self::Refused(Refusal::InvalidHost | Refusal::NotAbsolute)
            | Self::InvalidTarget
            | Self::UpgradeOverH2
            | Self::UnexpectedUpgrade => debug!(error = %self, status, "answering"),
            Self::Refused(Refusal::ConflictingHost) => {
                warn!(error = %self, "ambiguous request host, answering 400");
            }
            Self::Refused(Refusal::PlaintextRefused { .. }) => {
                warn!(error = %self, "plaintext injection refused, answering 421");
            }
            Self::Refused(Refusal::Unresolvable(_) | Refusal::DestinationDenied { .. }) => {
                info!(error = %self, status, "forward-proxy target refused");
            }
            Self::IdentityUnavailable { origin, error } => {
                warn!(source = %origin, error = %error, "identity unavailable, answering 503");
            }
            Self::AudienceMismatch { rule, mismatch } => warn!(
                rule = %rule,
                expected = %mismatch.expected,
                found = %mismatch.found,
                "token audience mismatch, answering 503"
            ),
            Self::CredentialUnrenderable => warn!(error = %self, "answering 503"),
            Self::UpstreamUnavailable(e) => {
                warn!(error = %e, "upstream unavailable, answering 502");
            }
            Self::UpstreamUnsent => {
                warn!("upstream connection closed before the request was written, answering 502");
            }
            Self::RequestBody(e) => warn!(error = %e, "request body failed, answering 400"),
            Self::UpstreamFailed(e) => warn!(error = %e, "upstream request failed, answering 502"),
        }
    }
}

/// Robin's synthetic response for `err`, logged once here.
pub fn respond(err: &ProxyError) -> Response<Body> {
    err.log();
    let mut r = Response::new(Either::Right(Full::new(err.reason())));
    *r.status_mut() = err.status();
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if err.closes_connection() {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn answer(err: ProxyError) -> (StatusCode, Option<HeaderValue>, String) {
        let r = respond(&err);
        let close = r.headers().get(CONNECTION).cloned();
        let status = r.status();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, close, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn each_error_has_its_status_body_and_connection_fate() {
        let (s, close, body) = answer(Refusal::ConflictingHost.into()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(close.unwrap(), "close");
        assert_eq!(body, "robin: conflicting host\n");

        let (s, close, body) = answer(ProxyError::AudienceMismatch {
            rule: "r".into(),
            mismatch: AudienceMismatch {
                expected: "a".into(),
                found: "b".into(),
            },
        })
        .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(close.is_none());
        assert_eq!(body, "robin: audience mismatch\n");

        let (s, _, body) = answer(ProxyError::UpstreamUnsent).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY);
        assert_eq!(body, "robin: upstream request failed\n");
    }

    #[tokio::test]
    async fn only_the_oauth_code_reaches_the_body() {
        let err = ProxyError::IdentityUnavailable {
            origin: "https://idp.test/secret-path".into(),
            error: IdentityError::OAuth {
                origin: "https://idp.test/secret-path".into(),
                code: "invalid_grant".into(),
                description: Some("detail".into()),
            },
        };
        let (s, _, body) = answer(err).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "robin: workload identity unavailable: token endpoint error invalid_grant\n"
        );
    }
}
