//! The outbound side: one GET per fetch to the API server's non-resource discovery URLs,
//! through [`crate::kube::Endpoint`] (Robin's one Kubernetes client), authenticated with the
//! gateway's ServiceAccount token read on every fetch. Nothing but the configured API server is
//! ever dialled: no proxy, no redirects.
use http::Request;

use crate::kube::{CallError, Endpoint};

/// Why a fetch failed. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Call(#[from] CallError),
    #[error("upstream response is not json: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("upstream response is not a json object")]
    NotObject,
}

/// The API server the documents come from.
#[derive(Debug)]
pub struct Upstream {
    endpoint: Endpoint,
}

impl Upstream {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    /// GETs `path` (below the upstream URL's path) and returns the parsed JSON object.
    pub async fn fetch(&self, path: &str) -> Result<serde_json::Value, UpstreamError> {
        let request = Request::get(path)
            .header(
                http::header::USER_AGENT,
                concat!("robin-oidc-gateway/", env!("CARGO_PKG_VERSION")),
            )
            .body(Vec::new())
            .expect("a path from Document::path is a valid request target");
        let body = self.endpoint.call(request).await?;
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(UpstreamError::NotJson)?;
        if !value.is_object() {
            return Err(UpstreamError::NotObject);
        }
        Ok(value)
    }
}
