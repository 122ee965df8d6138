//! A small Kubernetes client: list and watch the pods of one node, nothing else.
//!
//! Hand-rolled over hyper (already a dependency) instead of kube-rs + k8s-openapi: the agent needs
//! one resource, five fields of it and two verbs, and the generated API crates would add far more
//! to the build than the whole agent. One connection per request; a token file is re-read for
//! every request because in-cluster tokens rotate. Where the API server is and how to
//! authenticate comes from in-cluster config, flags, or a kubeconfig (`super::kubeconfig`).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::mpsc,
};

use super::kubeconfig::{ApiAuth, ApiEndpoint};
use crate::identity::{PodRef, Token};

pub const ENV_SERVICE_HOST: &str = "KUBERNETES_SERVICE_HOST";
pub const ENV_SERVICE_PORT: &str = "KUBERNETES_SERVICE_PORT";
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const LIST_TIMEOUT: Duration = Duration::from_secs(60);
/// The server ends a watch after this; a fresh one resumes from the last resourceVersion.
const WATCH_SECONDS: u64 = 290;
/// No byte (not even a bookmark) for this long: the watch is dead.
const WATCH_IDLE: Duration = Duration::from_secs(WATCH_SECONDS + 30);
const MAX_LIST_BYTES: usize = 64 * 1024 * 1024;
const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("not in a cluster: {ENV_SERVICE_HOST} is not set (pass --kube-api)")]
    NotInCluster,
    #[error("invalid api server url {0:?}")]
    BadUrl(String),
    #[error("reading {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} holds no usable CA certificate")]
    NoCa(PathBuf),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("connecting to the api server {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("api server {0}: timed out")]
    Timeout(String),
    #[error("api server: {0}")]
    Http(#[from] hyper::Error),
    #[error("api server answered {0} to {1}")]
    Status(StatusCode, String),
    #[error("api server response too large")]
    TooLarge,
    #[error("decoding api server response: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("watch expired (410 Gone): relisting")]
    Gone,
    #[error("building request: {0}")]
    Request(#[from] http::Error),
    #[error("client certificate: {0}")]
    ClientCert(&'static str),
    #[error("token in {0}: {1}")]
    BadToken(PathBuf, #[source] crate::identity::TokenError),
}

// ---- the part of a Pod the agent reads ----

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub resource_version: String,
    pub annotations: BTreeMap<String, String>,
    pub deletion_timestamp: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSpec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodStatus {
    pub qos_class: Option<String>,
    pub phase: Option<String>,
    /// Read only to notice a container starting or restarting: its process is then the one
    /// whose filesystem view holds the pod's volumes.
    pub container_statuses: Vec<ContainerStatus>,
    pub init_container_statuses: Vec<ContainerStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerStatus {
    pub name: String,
    #[serde(rename = "containerID")]
    pub container_id: Option<String>,
    pub restart_count: u32,
    pub started: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    pub status: PodStatus,
}

/// The ServiceAccount of a pod whose spec names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

impl Pod {
    /// `namespace/name`, for logs and the debug endpoint.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// Who this pod is, for the identity sources that act on its behalf.
    pub fn identity(&self) -> PodRef {
        let sa = self
            .spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
        PodRef {
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
            uid: self.metadata.uid.clone(),
            service_account: Some(sa.to_owned()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default)]
    resource_version: String,
}

#[derive(Debug, Deserialize)]
struct PodList {
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
struct RawWatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

/// What the watch tells the reconciler.
#[derive(Debug)]
pub enum PodEvent {
    /// A fresh list: the complete set of pods on the node (anything else is gone).
    Restarted(Vec<Pod>),
    Applied(Pod),
    Deleted(Pod),
}

// ---- the client ----

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The bearer credential sent with every request, if any (client certificates live in the TLS
/// config).
#[derive(Clone, Debug)]
enum Bearer {
    None,
    /// Re-read for every request: in-cluster tokens rotate.
    File(PathBuf),
    Static(Token),
}

#[derive(Clone)]
pub struct ApiClient {
    /// `host:port` to connect to.
    authority: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    bearer: Bearer,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("authority", &self.authority)
            .field("tls", &self.tls.is_some())
            .field("bearer", &self.bearer)
            .finish()
    }
}

impl ApiClient {
    /// The in-cluster api server, its CA and this pod's ServiceAccount token.
    pub fn in_cluster(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, KubeError> {
        let host = lookup(ENV_SERVICE_HOST).ok_or(KubeError::NotInCluster)?;
        let port = lookup(ENV_SERVICE_PORT).unwrap_or_else(|| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let sa = Path::new(SA_DIR);
        Self::new(
            &format!("https://{host}:{port}"),
            Some(sa.join("token")),
            Some(&sa.join("ca.crt")),
        )
    }

    /// `url` is `https://host:port` (verified against `ca`) or `http://host:port` (tests, or a
    /// local `kubectl proxy`).
    pub fn new(
        url: &str,
        token_file: Option<PathBuf>,
        ca: Option<&Path>,
    ) -> Result<Self, KubeError> {
        let ca_pem = match ca {
            Some(ca) => Some(std::fs::read(ca).map_err(|e| KubeError::Read(ca.to_owned(), e))?),
            None => None,
        };
        let auth = token_file.map_or(ApiAuth::None, ApiAuth::TokenFile);
        Self::from_endpoint(&ApiEndpoint {
            server: url.to_owned(),
            ca_pem,
            tls_server_name: None,
            auth,
        })
        .map_err(|e| match (e, ca) {
            (KubeError::NoCa(_), Some(ca)) => KubeError::NoCa(ca.to_owned()),
            (e, _) => e,
        })
    }

    /// The context of a kubeconfig. Plain `http://` only to a loopback address (`kubectl
    /// proxy`): anything else would send credentials in the clear.
    pub fn from_kubeconfig(endpoint: &ApiEndpoint) -> Result<Self, KubeError> {
        let uri: Uri = endpoint
            .server
            .parse()
            .map_err(|_| KubeError::BadUrl(endpoint.server.clone()))?;
        if uri.scheme_str() == Some("http") {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(KubeError::BadUrl(format!(
                    "{} (plain http only to loopback)",
                    endpoint.server
                )));
            }
        }
        Self::from_endpoint(endpoint)
    }

    fn from_endpoint(endpoint: &ApiEndpoint) -> Result<Self, KubeError> {
        let url = endpoint.server.as_str();
        let uri: Uri = url.parse().map_err(|_| KubeError::BadUrl(url.into()))?;
        let host = uri.host().ok_or_else(|| KubeError::BadUrl(url.into()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(KubeError::BadUrl(url.into())),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let tls = if https {
            let mut roots = rustls::RootCertStore::empty();
            match &endpoint.ca_pem {
                Some(pem) => {
                    for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                        let _ = roots.add(cert);
                    }
                    if roots.is_empty() {
                        return Err(KubeError::NoCa(PathBuf::from("the configured CA")));
                    }
                }
                None => {
                    for cert in rustls_native_certs::load_native_certs().certs {
                        let _ = roots.add(cert);
                    }
                }
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots);
            let cfg = match &endpoint.auth {
                ApiAuth::ClientCert { cert_pem, key_pem } => {
                    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
                        .collect::<Result<_, _>>()
                        .map_err(|_| KubeError::ClientCert("unreadable certificate PEM"))?;
                    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
                        .ok()
                        .flatten()
                        .ok_or(KubeError::ClientCert("no private key in the key PEM"))?;
                    if certs.is_empty() {
                        return Err(KubeError::ClientCert(
                            "no certificate in the certificate PEM",
                        ));
                    }
                    builder.with_client_auth_cert(certs, key)?
                }
                _ => builder.with_no_client_auth(),
            };
            let server_name = endpoint
                .tls_server_name
                .clone()
                .unwrap_or_else(|| host.trim_matches(['[', ']']).to_owned());
            let name =
                ServerName::try_from(server_name).map_err(|_| KubeError::BadUrl(url.into()))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(cfg)), name))
        } else {
            None
        };
        let bearer = match &endpoint.auth {
            ApiAuth::TokenFile(f) => Bearer::File(f.clone()),
            ApiAuth::Token(t) => Bearer::Static(t.clone()),
            ApiAuth::None | ApiAuth::ClientCert { .. } => Bearer::None,
        };
        Ok(Self {
            authority,
            tls,
            bearer,
        })
    }

    async fn get(&self, path_and_query: &str) -> Result<hyper::Response<Incoming>, KubeError> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| KubeError::Timeout(self.authority.clone()))?
            .map_err(|e| KubeError::Connect(self.authority.clone(), e))?;
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => Box::new(
                tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| KubeError::Timeout(self.authority.clone()))?
                    .map_err(|e| KubeError::Connect(self.authority.clone(), e))?,
            ),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::get(path_and_query)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        let token = match &self.bearer {
            Bearer::None => None,
            Bearer::Static(t) => Some(t.clone()),
            Bearer::File(file) => {
                let raw =
                    std::fs::read_to_string(file).map_err(|e| KubeError::Read(file.clone(), e))?;
                Some(Token::parse(&raw).map_err(|e| KubeError::BadToken(file.clone(), e))?)
            }
        };
        if let Some(token) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new())?)
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(resp),
            StatusCode::GONE => Err(KubeError::Gone),
            s => Err(KubeError::Status(s, path_and_query.to_owned())),
        }
    }

    /// All pods of `node` and the list's resourceVersion.
    pub async fn list_pods(&self, node: &str) -> Result<(Vec<Pod>, String), KubeError> {
        let path = format!("/api/v1/pods?fieldSelector={}", selector(node));
        let fut = async {
            let resp = self.get(&path).await?;
            let body = http_body_util::Limited::new(resp.into_body(), MAX_LIST_BYTES)
                .collect()
                .await
                .map_err(|_| KubeError::TooLarge)?
                .to_bytes();
            let list: PodList = serde_json::from_slice(&body)?;
            Ok((list.items, list.metadata.resource_version))
        };
        tokio::time::timeout(LIST_TIMEOUT, fut)
            .await
            .map_err(|_| KubeError::Timeout(self.authority.clone()))?
    }

    /// Streams changes after `rv` to `tx` until the server ends the watch (Ok) or it fails.
    /// `rv` is advanced as events arrive.
    async fn watch_pods(
        &self,
        node: &str,
        rv: &mut String,
        tx: &mpsc::Sender<PodEvent>,
    ) -> Result<(), KubeError> {
        let path = format!(
            "/api/v1/pods?fieldSelector={}&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={rv}",
            selector(node)
        );
        let mut body = self.get(&path).await?.into_body();
        let mut buf = BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(WATCH_IDLE, body.frame()).await {
                Err(_) => return Err(KubeError::Timeout(self.authority.clone())),
                Ok(None) => return Ok(()),
                Ok(Some(f)) => f?,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(nl + 1);
                let line = &line[..nl];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if let Some(ev) = decode_event(line, rv)?
                    && tx.send(ev).await.is_err()
                {
                    return Ok(());
                }
            }
            if buf.len() > MAX_EVENT_BYTES {
                return Err(KubeError::TooLarge);
            }
        }
    }
}

/// `spec.nodeName=NODE`, percent-encoded for a query string.
fn selector(node: &str) -> String {
    let mut s = String::from("spec.nodeName%3D");
    for b in node.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// One line of a watch stream; bookmarks only move `rv`.
fn decode_event(line: &[u8], rv: &mut String) -> Result<Option<PodEvent>, KubeError> {
    let ev: RawWatchEvent = serde_json::from_slice(line)?;
    match ev.kind.as_str() {
        "ERROR" => {
            let code = ev.object.get("code").and_then(|c| c.as_u64()).unwrap_or(0);
            Err(if code == 410 {
                KubeError::Gone
            } else {
                KubeError::Status(
                    StatusCode::from_u16(code as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    "watch".into(),
                )
            })
        }
        "BOOKMARK" => {
            if let Some(v) = ev
                .object
                .pointer("/metadata/resourceVersion")
                .and_then(|v| v.as_str())
            {
                *rv = v.to_owned();
            }
            Ok(None)
        }
        kind => {
            let pod: Pod = serde_json::from_value(ev.object)?;
            if !pod.metadata.resource_version.is_empty() {
                rv.clone_from(&pod.metadata.resource_version);
            }
            Ok(match kind {
                "ADDED" | "MODIFIED" => Some(PodEvent::Applied(pod)),
                "DELETED" => Some(PodEvent::Deleted(pod)),
                _ => None,
            })
        }
    }
}

/// List, then watch from the list's version, forever: relist on 410 or any failure (with
/// bounded backoff). `synced` turns true after the first complete list.
pub async fn run_pod_watch(
    client: ApiClient,
    node: String,
    tx: mpsc::Sender<PodEvent>,
    synced: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (pods, mut rv) = match client.list_pods(&node).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing pods failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if tx.send(PodEvent::Restarted(pods)).await.is_err() {
            return;
        }
        synced.store(true, Ordering::Relaxed);
        backoff = Duration::from_millis(200);
        loop {
            match client.watch_pods(&node, &mut rv, &tx).await {
                Ok(()) if tx.is_closed() => return,
                // Normally after WATCH_SECONDS; a server ending watches at once must not
                // turn this into a busy loop.
                Ok(()) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(KubeError::Gone) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch failed; relisting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_defaults_the_service_account() {
        let named = br#"{"metadata":{"name":"web-0","namespace":"shop","uid":"u1"},"spec":{"serviceAccountName":"web"}}"#;
        let pod: Pod = serde_json::from_slice(named).unwrap();
        assert_eq!(
            pod.identity(),
            PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "u1".into(),
                service_account: Some("web".into()),
            }
        );
        let unnamed: Pod =
            serde_json::from_slice(br#"{"metadata":{"name":"p","namespace":"n","uid":"u2"}}"#)
                .unwrap();
        assert_eq!(
            unnamed.identity().service_account.as_deref(),
            Some(DEFAULT_SERVICE_ACCOUNT)
        );
    }

    #[test]
    fn selector_is_encoded() {
        assert_eq!(selector("node-1.a"), "spec.nodeName%3Dnode-1.a");
        assert_eq!(selector("a b"), "spec.nodeName%3Da%20b");
    }

    #[test]
    fn decodes_events_and_tracks_versions() {
        let mut rv = "1".to_owned();
        let added = br#"{"type":"ADDED","object":{"metadata":{"name":"p","namespace":"n","uid":"u1","resourceVersion":"5","annotations":{"robin.dev/inject":"true"}},"spec":{"nodeName":"k"},"status":{"qosClass":"BestEffort"}}}"#;
        let Some(PodEvent::Applied(p)) = decode_event(added, &mut rv).unwrap() else {
            panic!("not applied");
        };
        assert_eq!(rv, "5");
        assert_eq!(p.key(), "n/p");
        assert_eq!(p.metadata.annotations["robin.dev/inject"], "true");
        assert_eq!(p.status.qos_class.as_deref(), Some("BestEffort"));
        let bookmark = br#"{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}"#;
        assert!(decode_event(bookmark, &mut rv).unwrap().is_none());
        assert_eq!(rv, "9");
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","code":410}}"#;
        assert!(matches!(decode_event(gone, &mut rv), Err(KubeError::Gone)));
        let deleted =
            br#"{"type":"DELETED","object":{"metadata":{"uid":"u1","resourceVersion":"10"}}}"#;
        assert!(matches!(
            decode_event(deleted, &mut rv).unwrap(),
            Some(PodEvent::Deleted(_))
        ));
    }

    #[test]
    fn urls() {
        assert!(ApiClient::new("http://127.0.0.1:8080", None, None).is_ok());
        assert!(ApiClient::new("ftp://x", None, None).is_err());
        assert!(matches!(
            ApiClient::in_cluster(|_| None),
            Err(KubeError::NotInCluster)
        ));
    }

    /// A scripted api server: list, a watch that ends in 410, a relist; one request per
    /// connection, as the client makes them.
    #[tokio::test]
    async fn lists_watches_and_relists_after_gone() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let pod = |uid: &str, rv: &str| {
            format!(
                r#"{{"metadata":{{"name":"p-{uid}","namespace":"n","uid":"{uid}","resourceVersion":"{rv}"}},"spec":{{"nodeName":"k"}}}}"#
            )
        };
        let replies = vec![
            (
                "GET /api/v1/pods?fieldSelector=spec.nodeName%3Dk HTTP".to_owned(),
                format!(
                    r#"{{"metadata":{{"resourceVersion":"7"}},"items":[{}]}}"#,
                    pod("u1", "7")
                ),
            ),
            (
                "watch=1".to_owned(),
                format!(
                    "{{\"type\":\"ADDED\",\"object\":{}}}\n{{\"type\":\"ERROR\",\"object\":{{\"code\":410}}}}\n",
                    pod("u2", "8")
                ),
            ),
            (
                "GET /api/v1/pods?fieldSelector=spec.nodeName%3Dk HTTP".to_owned(),
                r#"{"metadata":{"resourceVersion":"9"},"items":[]}"#.to_owned(),
            ),
        ];
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (expect, body) in replies {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    conn.read_exact(&mut b).await.unwrap();
                    head.push(b[0]);
                }
                let head = String::from_utf8(head).unwrap();
                assert!(head.contains(&expect), "{head}");
                seen.push(head.lines().next().unwrap().to_owned());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{body}"
                );
                conn.write_all(resp.as_bytes()).await.unwrap();
            }
            seen
        });
        let client = ApiClient::new(&url, None, None).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let synced = Arc::new(AtomicBool::new(false));
        let watch = tokio::spawn(run_pod_watch(client, "k".into(), tx, synced.clone()));
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an event in time")
                .expect("watch running")
        };
        let PodEvent::Restarted(pods) = next().await else {
            panic!("expected the list first");
        };
        assert_eq!(pods.len(), 1);
        assert!(synced.load(Ordering::Relaxed));
        let PodEvent::Applied(p) = next().await else {
            panic!("expected the watched pod");
        };
        assert_eq!(p.metadata.uid, "u2");
        let PodEvent::Restarted(pods) = next().await else {
            panic!("expected a relist after 410");
        };
        assert!(pods.is_empty());
        let seen = server.await.unwrap();
        assert!(seen[1].contains("resourceVersion=7"), "{seen:?}");
        watch.abort();
    }

    /// An HTTPS api server double that requires a client certificate from `client_ca` (or a
    /// bearer token), serving one pod list per connection. Returns its URL and what it saw.
    async fn tls_api(
        server_names: Vec<String>,
        client_ca: Option<String>,
        want_bearer: Option<&'static str>,
    ) -> (String, String, tokio::task::JoinHandle<Vec<String>>) {
        use rcgen::{CertificateParams, IsCa, KeyPair};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(server_names)
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match &client_ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let cfg = builder
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut conn) = acceptor.accept(tcp).await else {
                seen.push("handshake refused".to_owned());
                return seen;
            };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut b).await.unwrap();
                head.push(b[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let authorized = match want_bearer {
                Some(t) => head.contains(&format!("authorization: Bearer {t}\r\n")),
                None => conn.get_ref().1.peer_certificates().is_some(),
            };
            seen.push(head.lines().next().unwrap().to_owned());
            let resp = if authorized {
                "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"metadata\":{\"resourceVersion\":\"3\"},\"items\":[]}"
            } else {
                "HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            };
            conn.write_all(resp.as_bytes()).await.unwrap();
            let _ = conn.shutdown().await;
            seen
        });
        (url, ca.pem(), server)
    }

    #[tokio::test]
    async fn kubeconfig_client_certificate_and_tls_server_name() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = ca_params.self_signed(&ca_key).unwrap();
        let client_ca = issuer.pem();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node-agent");
        let client_cert = params.signed_by(&client_key, &issuer, &ca_key).unwrap();
        // The certificate names "kubernetes", not the address dialled: tls-server-name decides.
        let (url, server_ca, server) =
            tls_api(vec!["kubernetes".into()], Some(client_ca), None).await;
        let dir = std::env::temp_dir().join(format!("robin-kube-mtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("config");
        std::fs::write(
            &cfg,
            format!(
                "current-context: k\nclusters:\n- name: c\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\n    tls-server-name: kubernetes\ncontexts:\n- name: k\n  context: {{cluster: c, user: u}}\nusers:\n- name: u\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(&server_ca),
                b64(&client_cert.pem()),
                b64(&client_key.serialize_pem()),
            ),
        )
        .unwrap();
        let endpoint = crate::node::kubeconfig::load(&[cfg], None).unwrap();
        let client = ApiClient::from_kubeconfig(&endpoint).unwrap();
        let (pods, rv) = client.list_pods("k").await.unwrap();
        assert!(pods.is_empty());
        assert_eq!(rv, "3");
        let seen = server.await.unwrap();
        assert!(seen[0].starts_with("GET /api/v1/pods?"), "{seen:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn kubeconfig_token_and_refusals() {
        let (url, server_ca, server) =
            tls_api(vec!["127.0.0.1".into()], None, Some("agent.tok")).await;
        let endpoint = ApiEndpoint {
            server: url.clone(),
            ca_pem: Some(server_ca.into_bytes()),
            tls_server_name: None,
            auth: ApiAuth::Token(Token::parse("agent.tok").unwrap()),
        };
        let client = ApiClient::from_kubeconfig(&endpoint).unwrap();
        client.list_pods("k").await.unwrap();
        server.await.unwrap();
        assert!(!format!("{client:?}").contains("agent.tok"));
        // Plain http with credentials only to loopback.
        let remote = ApiEndpoint {
            server: "http://10.0.0.1:8080".into(),
            ..endpoint.clone()
        };
        assert!(matches!(
            ApiClient::from_kubeconfig(&remote),
            Err(KubeError::BadUrl(_))
        ));
        let local = ApiEndpoint {
            server: "http://127.0.0.1:8001".into(),
            ..endpoint
        };
        assert!(ApiClient::from_kubeconfig(&local).is_ok());
    }
}
