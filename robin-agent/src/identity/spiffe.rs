//! The `spiffe` source: a JWT-SVID for the rule's audience from the SPIFFE Workload API
//! (`/SpiffeWorkloadAPI/FetchJWTSVID`, gRPC over a Unix socket). The gRPC is done by hand —
//! hyper http2, 5-byte message framing, prost messages — to keep tonic out of the tree.
use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use serde::Deserialize;

use super::{
    IdentityContext, IdentityError, IdentitySource, Token, TokenFuture,
    cache::{CacheKey, Fetched, TokenCache},
    http::sanitize,
    jwt_lifetime,
};

pub const FETCH_JWT_SVID_PATH: &str = "/SpiffeWorkloadAPI/FetchJWTSVID";
/// SPIRE agent admin API (Delegated Identity), for a node agent fetching on a workload's behalf.
pub const FETCH_JWT_SVIDS_PATH: &str =
    "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/FetchJWTSVIDs";
/// Workload API responses are a few KiB.
const MAX_RESPONSE: usize = 64 * 1024;

/// Messages of `WorkloadAPI` (spiffe/go-spiffe `proto/spiffe/workload/workload.proto`),
/// written out by hand so no protoc is needed.
pub mod proto {
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct JwtsvidRequest {
        #[prost(string, repeated, tag = "1")]
        pub audience: Vec<String>,
        #[prost(string, tag = "2")]
        pub spiffe_id: String,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct JwtsvidResponse {
        #[prost(message, repeated, tag = "1")]
        pub svids: Vec<Jwtsvid>,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Jwtsvid {
        #[prost(string, tag = "1")]
        pub spiffe_id: String,
        #[prost(string, tag = "2")]
        pub svid: String,
        #[prost(string, tag = "3")]
        pub hint: String,
    }

    /// `spire.api.types.Selector`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Selector {
        #[prost(string, tag = "1")]
        pub r#type: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `spire.api.agent.delegatedidentity.v1.FetchJWTSVIDsRequest`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct FetchJwtsvidsRequest {
        #[prost(string, repeated, tag = "1")]
        pub audience: Vec<String>,
        #[prost(message, repeated, tag = "2")]
        pub selectors: Vec<Selector>,
    }

    /// `spire.api.agent.delegatedidentity.v1.FetchJWTSVIDsResponse`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct FetchJwtsvidsResponse {
        #[prost(message, repeated, tag = "1")]
        pub svids: Vec<TypesJwtsvid>,
    }

    /// `spire.api.types.SPIFFEID`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct SpiffeId {
        #[prost(string, tag = "1")]
        pub trust_domain: String,
        #[prost(string, tag = "2")]
        pub path: String,
    }

    /// `spire.api.types.JWTSVID`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct TypesJwtsvid {
        #[prost(string, tag = "1")]
        pub token: String,
        #[prost(message, optional, tag = "2")]
        pub id: Option<SpiffeId>,
        #[prost(int64, tag = "3")]
        pub expires_at: i64,
        #[prost(int64, tag = "4")]
        pub issued_at: i64,
        #[prost(string, tag = "5")]
        pub hint: String,
    }
}

/// `source = { kind = "spiffe", audience = "...", socket = "/run/spire/agent.sock" }`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SpiffeConfig {
    pub audience: String,
    /// Workload API socket; defaults to `ROBIN_SPIFFE_SOCKET`. A `unix://` prefix is accepted.
    pub socket: Option<String>,
    /// Ask for this SPIFFE ID when the workload has several.
    pub spiffe_id: Option<String>,
    /// Node mode: `socket` is the SPIRE agent admin socket and the SVID is fetched on the
    /// workload's behalf through the Delegated Identity API (the agent must be an authorized
    /// delegate).
    #[serde(default)]
    pub delegated: bool,
    /// Delegated mode: `type:value` selectors of the workload, e.g. `k8s:pod-uid:<uid>`;
    /// default `k8s:pod-uid:` of the pod the agent acts for.
    #[serde(default)]
    pub selectors: Vec<String>,
}

/// The pod's selectors as SPIRE's `k8s` workload attestor produces them (a subset: the ones
/// registration entries are usually written with).
fn pod_selectors(pod: &super::PodRef) -> Vec<String> {
    let sa = pod.service_account.as_deref().unwrap_or("default");
    vec![
        format!("k8s:ns:{}", pod.namespace),
        format!("k8s:sa:{sa}"),
        format!("k8s:pod-uid:{}", pod.uid),
        format!("k8s:pod-name:{}", pod.name),
    ]
}

pub struct SpiffeSource {
    socket: PathBuf,
    audience: String,
    spiffe_id: String,
    /// `Some` in delegated (node) mode.
    selectors: Option<Vec<proto::Selector>>,
    timeout: Duration,
    cache: Arc<TokenCache>,
    key: CacheKey,
}

impl std::fmt::Debug for SpiffeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Frames one gRPC message: uncompressed flag, 4-byte big-endian length, payload.
pub fn grpc_frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).expect("buffer has capacity");
    buf.freeze()
}

/// Reads the first gRPC message out of a response body.
pub fn grpc_unframe<M: Message + Default>(mut body: Bytes) -> Result<M, String> {
    if body.len() < 5 {
        return Err("response has no grpc message".into());
    }
    if body.get_u8() != 0 {
        return Err("compressed grpc message not supported".into());
    }
    let len = body.get_u32() as usize;
    if body.len() < len {
        return Err("truncated grpc message".into());
    }
    M::decode(body.slice(..len)).map_err(|e| format!("bad protobuf: {e}"))
}

/// The rule's `socket` (a `unix://` prefix allowed), else the agent-wide default.
fn socket_path(cfg: &SpiffeConfig, ctx: &IdentityContext) -> Result<PathBuf, IdentityError> {
    match &cfg.socket {
        Some(s) => Ok(PathBuf::from(s.strip_prefix("unix://").unwrap_or(s))),
        None => ctx.spiffe_socket.clone().ok_or_else(|| {
            IdentityError::Config(format!(
                "spiffe source needs `socket` or {}",
                super::ENV_SPIFFE_SOCKET
            ))
        }),
    }
}

/// `Some` selectors in delegated mode, `None` for a plain Workload API call; rejects the
/// combinations that would hand a workload the wrong identity.
fn request_selectors(
    cfg: &SpiffeConfig,
    pod: Option<&super::PodRef>,
) -> Result<Option<Vec<proto::Selector>>, IdentityError> {
    if cfg.delegated {
        let raw = delegated_selectors(&cfg.selectors, pod)?;
        let parsed = raw
            .into_iter()
            .map(parse_selector)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(parsed))
    } else if !cfg.selectors.is_empty() {
        Err(IdentityError::Config(
            "spiffe selectors need delegated = true".into(),
        ))
    } else if let Some(pod) = pod {
        // The Workload API attests the caller, i.e. Robin: every pod would get Robin's SVID.
        Err(IdentityError::Config(format!(
            "spiffe source for pod {}/{} must set delegated = true (the Workload API would \
             attest the agent, not the pod)",
            pod.namespace, pod.name
        )))
    } else {
        Ok(None)
    }
}

/// The selectors (as `type:value` text) to fetch on a workload's behalf.
fn delegated_selectors(
    configured: &[String],
    pod: Option<&super::PodRef>,
) -> Result<Vec<String>, IdentityError> {
    match (configured, pod) {
        // What SPIRE's k8s workload attestor would say of the pod: entries registered by
        // namespace and ServiceAccount, or by pod, match.
        ([], Some(pod)) => Ok(pod_selectors(pod)),
        ([], None) => Err(IdentityError::Config(
            "delegated spiffe source needs selectors or a known pod".into(),
        )),
        // A rule set shared by many pods must not pick whose identity they get.
        (_, Some(pod)) => Err(IdentityError::Config(format!(
            "spiffe selectors cannot be set in node mode: pod {}/{} is described by \
             its own (k8s:ns, k8s:sa, k8s:pod-uid, k8s:pod-name)",
            pod.namespace, pod.name
        ))),
        (s, None) => Ok(s.to_vec()),
    }
}

fn parse_selector(sel: String) -> Result<proto::Selector, IdentityError> {
    let (t, v) = sel
        .split_once(':')
        .filter(|(t, v)| !t.is_empty() && !v.is_empty())
        .ok_or_else(|| {
            IdentityError::Config(format!(
                "selector {:?} is not type:value",
                sanitize(&sel, 64)
            ))
        })?;
    Ok(proto::Selector {
        r#type: t.to_owned(),
        value: v.to_owned(),
    })
}

/// Everything that changes the token asked for goes into the key, so rules never share a
/// cached SVID they should not.
fn cache_key(
    cfg: &SpiffeConfig,
    socket: &std::path::Path,
    spiffe_id: &str,
    selectors: Option<&[proto::Selector]>,
) -> CacheKey {
    let selector_key: Vec<String> = selectors
        .iter()
        .copied()
        .flatten()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    CacheKey(format!(
        "spiffe|{}|aud={}|id={spiffe_id}|delegated={}|sel={}",
        socket.display(),
        cfg.audience,
        cfg.delegated,
        selector_key.join(",")
    ))
}

impl SpiffeSource {
    pub fn new(cfg: &SpiffeConfig, ctx: &IdentityContext) -> Result<Self, IdentityError> {
        let socket = socket_path(cfg, ctx)?;
        if cfg.audience.is_empty() {
            return Err(IdentityError::Config("spiffe audience is empty".into()));
        }
        let spiffe_id = cfg.spiffe_id.clone().unwrap_or_default();
        let selectors = request_selectors(cfg, ctx.pod.as_ref())?;
        let key = cache_key(cfg, &socket, &spiffe_id, selectors.as_deref());
        Ok(Self {
            socket,
            audience: cfg.audience.clone(),
            spiffe_id,
            selectors,
            timeout: ctx.http.total_timeout,
            cache: ctx.cache.clone(),
            key,
        })
    }

    fn err(&self, detail: impl Into<String>) -> IdentityError {
        IdentityError::Protocol {
            origin: self.describe(),
            detail: detail.into(),
        }
    }

    async fn fetch(&self) -> Result<Fetched, IdentityError> {
        match tokio::time::timeout(self.timeout, self.call()).await {
            Ok(r) => r,
            Err(_) => Err(self.err("workload api call timed out")),
        }
    }

    async fn call(&self) -> Result<Fetched, IdentityError> {
        let (raw, id) = match &self.selectors {
            None => {
                let msg = proto::JwtsvidRequest {
                    audience: vec![self.audience.clone()],
                    spiffe_id: self.spiffe_id.clone(),
                };
                let body = self.unary(FETCH_JWT_SVID_PATH, grpc_frame(&msg)).await?;
                let response: proto::JwtsvidResponse =
                    grpc_unframe(body).map_err(|e| self.err(e))?;
                response
                    .svids
                    .into_iter()
                    .find(|s| self.spiffe_id.is_empty() || s.spiffe_id == self.spiffe_id)
                    .map(|s| (s.svid, s.spiffe_id))
                    .ok_or_else(|| self.err("no JWT-SVID in response"))?
            }
            Some(selectors) => {
                let msg = proto::FetchJwtsvidsRequest {
                    audience: vec![self.audience.clone()],
                    selectors: selectors.clone(),
                };
                let body = self.unary(FETCH_JWT_SVIDS_PATH, grpc_frame(&msg)).await?;
                let response: proto::FetchJwtsvidsResponse =
                    grpc_unframe(body).map_err(|e| self.err(e))?;
                response
                    .svids
                    .into_iter()
                    .map(|s| {
                        let id =
                            s.id.map(|id| format!("spiffe://{}{}", id.trust_domain, id.path))
                                .unwrap_or_default();
                        (s.token, id)
                    })
                    .find(|(_, id)| self.spiffe_id.is_empty() || *id == self.spiffe_id)
                    .ok_or_else(|| self.err("no JWT-SVID in response"))?
            }
        };
        tracing::debug!(source = %self.describe(), spiffe_id = %sanitize(&id, 256), "fetched JWT-SVID");
        let token = Token::parse(&raw).map_err(|source| IdentityError::Invalid {
            origin: self.describe(),
            source,
        })?;
        let lifetime = jwt_lifetime(&token).ok_or_else(|| self.err("JWT-SVID has no exp"))?;
        Ok(Fetched { token, lifetime })
    }

    /// One unary gRPC call over a fresh HTTP/2 connection; returns the response body.
    async fn unary(&self, path: &str, frame: Bytes) -> Result<Bytes, IdentityError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| IdentityError::Read {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| self.err(format!("http2 handshake: {e}")))?;
        let conn = tokio::spawn(conn);
        let result = async {
            let mut request = Request::post(format!("http://localhost{path}"))
                .header(header::CONTENT_TYPE, "application/grpc")
                .header(header::TE, "trailers");
            if self.selectors.is_none() {
                // Required by the Workload API: proves the caller is not a browser/SSRF relay.
                request = request.header("workload.spiffe.io", "true");
            }
            let request = request
                .body(Full::new(frame))
                .map_err(|e| self.err(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| self.err(format!("request: {e}")))?;
            let (parts, body) = response.into_parts();
            if !parts.status.is_success() {
                return Err(self.err(format!("http status {}", parts.status.as_u16())));
            }
            let collected = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| self.err(format!("reading response: {e}")))?;
            // A trailers-only response carries grpc-status in the headers.
            let trailers = collected.trailers().cloned().unwrap_or_default();
            let status = trailers
                .get("grpc-status")
                .or_else(|| parts.headers.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if status != "0" {
                let message = trailers
                    .get("grpc-message")
                    .or_else(|| parts.headers.get("grpc-message"))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                return Err(self.err(format!(
                    "grpc-status {:?}: {}",
                    sanitize(status, 8),
                    sanitize(message, 128)
                )));
            }
            Ok(collected.to_bytes())
        }
        .await;
        conn.abort();
        result
    }
}

impl IdentitySource for SpiffeSource {
    fn describe(&self) -> String {
        let mode = if self.selectors.is_some() {
            " delegated"
        } else {
            ""
        };
        format!(
            "spiffe:{}{mode} aud={}",
            self.socket.display(),
            self.audience
        )
    }

    fn token(&self) -> TokenFuture<'_> {
        Box::pin(self.cache.get(&self.key, || self.fetch()))
    }

    fn cache_key(&self) -> Option<&CacheKey> {
        Some(&self.key)
    }
}
