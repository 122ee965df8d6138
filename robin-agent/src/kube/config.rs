//! Where the API server is and how to authenticate: `--kube-api` (tests, `kubectl proxy`), a
//! kubeconfig (`--kubeconfig`/`KUBECONFIG`, else `~/.kube/config` outside a pod) or in-cluster
//! config, all as a `kube::Config`. kube-rs does the loading (merging several files as kubectl
//! does, resolving relative paths, re-reading token files as they rotate); Robin adds:
//! - no proxy: a kubeconfig `proxy-url` is refused and `HTTPS_PROXY` ignored (the agent runs in
//!   the host network namespace and talks to the API server directly);
//! - what would make the agent run commands, refresh tokens elsewhere, send a password or skip
//!   verification (`exec`, `auth-provider`, basic auth, `insecure-skip-tls-verify`) is refused
//!   with an error naming it, never ignored;
//! - plain `http://` from a kubeconfig only to loopback (`kubectl proxy`).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use kube::config::{KubeConfigOptions, Kubeconfig};

pub const ENV_KUBECONFIG: &str = "KUBECONFIG";
pub const ENV_SERVICE_HOST: &str = "KUBERNETES_SERVICE_HOST";
pub const ENV_KUBE_API: &str = "ROBIN_KUBE_API";
pub const ENV_KUBE_TOKEN_FILE: &str = "ROBIN_KUBE_TOKEN_FILE";
pub const ENV_KUBE_CA: &str = "ROBIN_KUBE_CA";

/// Where the API server is, for every mode that watches pods (`robin node`, `robin gateway`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// API server URL (default: in-cluster config). `http://` only for tests or `kubectl proxy`.
    #[arg(long, env = ENV_KUBE_API, value_name = "URL")]
    pub kube_api: Option<String>,
    /// Bearer token file for --kube-api.
    #[arg(long, env = ENV_KUBE_TOKEN_FILE, value_name = "FILE")]
    pub kube_token_file: Option<PathBuf>,
    /// CA bundle for an https --kube-api.
    #[arg(long, env = ENV_KUBE_CA, value_name = "FILE")]
    pub kube_ca: Option<PathBuf>,
    /// Kubeconfig file(s), colon-separated, used when --kube-api is not given (outside a
    /// cluster). Default when not in a pod: ~/.kube/config.
    #[arg(long, env = ENV_KUBECONFIG, value_name = "FILES")]
    pub kubeconfig: Option<String>,
    /// Kubeconfig context (default: its current-context).
    #[arg(long, value_name = "NAME")]
    pub kube_context: Option<String>,
}

/// No byte (not even a bookmark) on a connection for this long: it is dead. Watches end after
/// the watcher's 290 s `timeoutSeconds`.
const READ_IDLE: Duration = Duration::from_secs(320);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no API server: not in a cluster ({ENV_SERVICE_HOST} unset), no --kube-api, no kubeconfig"
    )]
    NotInCluster,
    #[error("invalid api server url {0:?}")]
    BadUrl(String),
    #[error("reading {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} holds no usable CA certificate")]
    NoCa(PathBuf),
    #[error("loading the system root certificates: none found")]
    NoSystemRoots,
    #[error("token file {0}: {1}")]
    BadToken(PathBuf, &'static str),
    #[error("kubeconfig: no context selected (set current-context or pass --kube-context)")]
    NoContext,
    #[error("kubeconfig: no context named {0:?}")]
    NoSuchContext(String),
    #[error("kubeconfig: {what} of {owner:?} is not supported by robin ({why})")]
    Unsupported {
        what: &'static str,
        owner: String,
        why: &'static str,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("in-cluster config: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// The one Kubernetes client of a mode.
pub async fn client(args: &KubeArgs) -> Result<kube::Client, ConfigError> {
    let cfg = config(args, |k| std::env::var(k).ok()).await?;
    tracing::info!(server = %cfg.cluster_url, "kubernetes api server");
    Ok(kube::Client::try_from(harden(cfg))?)
}

/// In kube-rs's order: `--kube-api`; else a kubeconfig named by `--kubeconfig`/`KUBECONFIG`;
/// else in-cluster config; else `~/.kube/config`.
async fn config(
    args: &KubeArgs,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<kube::Config, ConfigError> {
    if let Some(url) = &args.kube_api {
        return flag_config(
            url,
            args.kube_token_file.as_deref(),
            args.kube_ca.as_deref(),
        );
    }
    let context = args.kube_context.as_deref();
    if let Some(files) = args.kubeconfig.as_deref().filter(|f| !f.is_empty()) {
        return from_kubeconfig(&paths_from_env(files), context).await;
    }
    if lookup(ENV_SERVICE_HOST).is_some() {
        return Ok(kube::Config::incluster()?);
    }
    let home = lookup("HOME").map(PathBuf::from);
    match home.map(|h| h.join(".kube/config")).filter(|p| p.exists()) {
        Some(p) => from_kubeconfig(&[p], context).await,
        None => Err(ConfigError::NotInCluster),
    }
}

/// What Robin adds to any configuration before it becomes a client.
pub(super) fn harden(mut cfg: kube::Config) -> kube::Config {
    // kube-rs fills this from HTTPS_PROXY when a kubeconfig names none.
    cfg.proxy_url = None;
    cfg.read_timeout = Some(READ_IDLE);
    cfg
}

/// `url` is `https://host:port` (verified against `ca`, else the system roots) or
/// `http://host:port` on a loopback address (tests, or a local `kubectl proxy`): the one rule
/// for plain HTTP to an API server, also in [`super::Endpoint`].
fn flag_config(
    url: &str,
    token_file: Option<&Path>,
    ca: Option<&Path>,
) -> Result<kube::Config, ConfigError> {
    let uri: http::Uri = url.parse().map_err(|_| ConfigError::BadUrl(url.into()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(ConfigError::BadUrl(url.into()));
    }
    refuse_remote_plain(&uri)?;
    let mut cfg = kube::Config::new(uri);
    cfg.root_cert = ca.map(read_roots).transpose()?;
    if let Some(f) = token_file {
        check_token_file(f)?;
        // kube-rs re-reads a token file as it rotates.
        cfg.auth_info.token_file = Some(f.display().to_string());
    }
    Ok(cfg)
}

/// The DER certificates of a PEM bundle, for `kube::Config::root_cert`.
pub(super) fn read_roots(ca: &Path) -> Result<Vec<Vec<u8>>, ConfigError> {
    let pem = std::fs::read(ca).map_err(|e| ConfigError::Read(ca.to_owned(), e))?;
    let der: Vec<Vec<u8>> = rustls_pemfile::certs(&mut pem.as_slice())
        .flatten()
        .map(|c| c.to_vec())
        .collect();
    if der.is_empty() {
        return Err(ConfigError::NoCa(ca.to_owned()));
    }
    Ok(der)
}

/// kube-rs sends a token file's content verbatim: a trailing newline (`echo tok > file`) would
/// fail every request with an opaque header error, so it is refused here, once, by name.
fn check_token_file(path: &Path) -> Result<(), ConfigError> {
    let raw = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
    if raw.trim() != raw {
        return Err(ConfigError::BadToken(
            path.to_owned(),
            "leading or trailing whitespace (write the token without a newline)",
        ));
    }
    crate::secret::Token::parse(&raw)
        .map(drop)
        .map_err(|_| ConfigError::BadToken(path.to_owned(), "not a valid bearer token"))
}

/// Paths named by `KUBECONFIG` (colon-separated; empty entries skipped).
pub fn paths_from_env(value: &str) -> Vec<PathBuf> {
    std::env::split_paths(value)
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

/// Reads `paths` (missing files are skipped, as kubectl does; the first file to name something
/// wins) and resolves `context`, or the merged `current-context`.
async fn from_kubeconfig(
    paths: &[PathBuf],
    context: Option<&str>,
) -> Result<kube::Config, ConfigError> {
    let mut merged: Option<Kubeconfig> = None;
    for path in paths.iter().filter(|p| p.exists()) {
        let next = Kubeconfig::read_from(path)?;
        merged = Some(match merged {
            Some(m) => m.merge(next)?,
            None => next,
        });
    }
    let kc = merged.unwrap_or_default();
    refuse_unsupported(&kc, context)?;
    tracing::info!(?paths, "using kubeconfig");
    let opts = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let cfg = kube::Config::from_custom_kubeconfig(kc, &opts).await?;
    refuse_remote_plain(&cfg.cluster_url)?;
    Ok(cfg)
}

/// The one rule for plain HTTP to an API server: only to a loopback address.
pub(super) fn refuse_remote_plain(uri: &http::Uri) -> Result<(), ConfigError> {
    if uri.scheme_str() == Some("http") && !is_loopback(uri) {
        return Err(ConfigError::BadUrl(format!(
            "{uri} (plain http only to loopback)"
        )));
    }
    Ok(())
}

fn is_loopback(uri: &http::Uri) -> bool {
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses, by name, what the selected context asks for and Robin will not do.
fn refuse_unsupported(kc: &Kubeconfig, context: Option<&str>) -> Result<(), ConfigError> {
    let name = context
        .map(str::to_owned)
        .or_else(|| kc.current_context.clone())
        .ok_or(ConfigError::NoContext)?;
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == name)
        .and_then(|c| c.context.as_ref())
        .ok_or_else(|| ConfigError::NoSuchContext(name.clone()))?;
    let unsupported = |what, owner: &str, why| ConfigError::Unsupported {
        what,
        owner: owner.to_owned(),
        why,
    };
    let cluster = kc.clusters.iter().find(|c| c.name == ctx.cluster);
    if let Some((owner, c)) = cluster.and_then(|c| Some((&c.name, c.cluster.as_ref()?))) {
        if c.proxy_url.is_some() {
            return Err(unsupported("proxy-url", owner, "no proxies"));
        }
        if c.insecure_skip_tls_verify == Some(true) {
            let why = "the server must be verified";
            return Err(unsupported("insecure-skip-tls-verify", owner, why));
        }
    }
    let user = kc
        .auth_infos
        .iter()
        .find(|u| Some(&u.name) == ctx.user.as_ref());
    if let Some((owner, u)) = user.and_then(|u| Some((&u.name, u.auth_info.as_ref()?))) {
        if u.exec.is_some() {
            return Err(unsupported("exec", owner, "the agent runs no commands"));
        }
        if u.auth_provider.is_some() {
            return Err(unsupported(
                "auth-provider",
                owner,
                "no token refresh elsewhere",
            ));
        }
        if u.username.is_some() || u.password.is_some() {
            return Err(unsupported("username/password", owner, "no basic auth"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Pod;

    use super::*;

    /// A scratch directory, removed when dropped.
    struct Scratch(tempfile::TempDir);

    impl Scratch {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    fn with_context(cluster: &str, user: &str) -> String {
        format!(
            "current-context: x\nclusters:\n- name: c\n  cluster: {cluster}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\nusers:\n- name: u\n  user: {user}\n"
        )
    }

    #[tokio::test]
    async fn refuses_what_robin_will_not_do() {
        let s = Scratch::new();
        let server = "{server: 'https://k'}";
        let cases = [
            (server, "{exec: {command: aws}}", "exec"),
            (server, "{auth-provider: {name: oidc}}", "auth-provider"),
            (server, "{username: a, password: b}", "username/password"),
            (
                "{server: 'https://k', insecure-skip-tls-verify: true}",
                "{}",
                "insecure-skip-tls-verify",
            ),
            (
                "{server: 'https://k', proxy-url: 'http://p:3128'}",
                "{}",
                "proxy-url",
            ),
        ];
        for (cluster, user, expect) in cases {
            let p = s.write("c", &with_context(cluster, user));
            let err = from_kubeconfig(&[p], None).await.unwrap_err();
            assert!(
                matches!(&err, ConfigError::Unsupported { what, .. } if *what == expect),
                "{expect}: {err}"
            );
            assert!(err.to_string().contains(expect), "{err}");
        }
    }

    #[tokio::test]
    async fn first_file_wins_and_missing_files_are_skipped() {
        let s = Scratch::new();
        let a = s.write(
            "a",
            "clusters:\n- name: c\n  cluster: {server: 'https://first:6443'}\nusers:\n- name: u\n  user: {token: first.token}\n",
        );
        let b = s.write(
            "b",
            "current-context: x\nclusters:\n- name: c\n  cluster: {server: 'https://second'}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n",
        );
        let cfg = from_kubeconfig(&[s.0.path().join("absent"), a, b], None)
            .await
            .unwrap();
        assert_eq!(cfg.cluster_url.host(), Some("first"));
        assert!(cfg.auth_info.token.is_some());
        assert!(!format!("{cfg:?}").contains("first.token"));
    }

    #[tokio::test]
    async fn missing_context_plain_http_and_urls() {
        let s = Scratch::new();
        let p = s.write("c", "clusters: []\n");
        assert!(matches!(
            from_kubeconfig(std::slice::from_ref(&p), None).await,
            Err(ConfigError::NoContext)
        ));
        let err = from_kubeconfig(&[p], Some("nope")).await.unwrap_err();
        assert!(
            err.to_string().contains("no context named \"nope\""),
            "{err}"
        );
        assert_eq!(
            paths_from_env("/a::/b"),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        // Plain http with credentials only to loopback.
        let remote = s.write("r", &with_context("{server: 'http://10.0.0.1:8080'}", "{}"));
        let err = from_kubeconfig(&[remote], None).await.unwrap_err();
        assert!(matches!(err, ConfigError::BadUrl(_)), "{err}");
        let local = s.write(
            "l",
            &with_context("{server: 'http://127.0.0.1:8001'}", "{}"),
        );
        assert!(from_kubeconfig(&[local], None).await.is_ok());
        assert!(flag_config("http://127.0.0.1:8080", None, None).is_ok());
        assert!(flag_config("http://10.0.0.1:8080", None, None).is_err());
        assert!(flag_config("ftp://x", None, None).is_err());
        assert!(matches!(
            flag_config("https://k", None, Some(&s.write("ca", "not a pem"))),
            Err(ConfigError::NoCa(_))
        ));
    }

    #[test]
    fn no_proxy_ever() {
        let mut cfg = kube::Config::new("https://k".parse().unwrap());
        cfg.proxy_url = Some("http://proxy:3128".parse().unwrap());
        assert!(harden(cfg).proxy_url.is_none());
    }

    /// An HTTPS api server double that requires a client certificate from `client_ca` (or a
    /// bearer token), answering one pod list. Returns its URL, its CA and what it saw.
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

    async fn list_pods(cfg: kube::Config) -> Result<usize, kube::Error> {
        let client = kube::Client::try_from(harden(cfg))?;
        let api = kube::Api::<Pod>::all(client);
        Ok(api
            .list(&kube::api::ListParams::default())
            .await?
            .items
            .len())
    }

    #[tokio::test]
    async fn kubeconfig_client_certificate_and_tls_server_name() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = ca_params.self_signed(&ca_key).unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node-agent");
        let client_cert = params.signed_by(&client_key, &issuer, &ca_key).unwrap();
        // The certificate names "kubernetes", not the address dialled: tls-server-name decides.
        let (url, server_ca, server) =
            tls_api(vec!["kubernetes".into()], Some(issuer.pem()), None).await;
        let s = Scratch::new();
        let cluster = format!(
            "{{server: '{url}', certificate-authority-data: {}, tls-server-name: kubernetes}}",
            b64(&server_ca)
        );
        let user = format!(
            "{{client-certificate-data: {}, client-key-data: {}}}",
            b64(&client_cert.pem()),
            b64(&client_key.serialize_pem())
        );
        let cfg = from_kubeconfig(&[s.write("config", &with_context(&cluster, &user))], None)
            .await
            .unwrap();
        assert_eq!(list_pods(cfg).await.unwrap(), 0);
        let seen = server.await.unwrap();
        assert!(seen[0].starts_with("GET /api/v1/pods?"), "{seen:?}");
    }

    #[tokio::test]
    async fn kube_api_flag_with_token_file_and_ca() {
        let (url, server_ca, server) =
            tls_api(vec!["127.0.0.1".into()], None, Some("agent.tok")).await;
        let s = Scratch::new();
        let ca = s.write("ca.pem", &server_ca);
        let newline = s.write("token", "agent.tok\n");
        let err = flag_config(&url, Some(&newline), Some(&ca)).unwrap_err();
        assert!(matches!(err, ConfigError::BadToken(..)), "{err}");
        let token = s.write("token", "agent.tok");
        let cfg = flag_config(&url, Some(&token), Some(&ca)).unwrap();
        assert_eq!(list_pods(cfg).await.unwrap(), 0);
        let seen = server.await.unwrap();
        assert!(seen[0].starts_with("GET /api/v1/pods?"), "{seen:?}");
    }
}
