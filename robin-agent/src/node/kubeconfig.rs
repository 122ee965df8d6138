//! `KUBECONFIG` files, for running the agent outside a pod (development against `kind` or a
//! test cluster). Only what an agent that lists and watches pods needs is read: the selected
//! context's server, CA, TLS server name and credentials (bearer token, token file or client
//! certificate). Whatever would make the agent run commands, refresh tokens elsewhere, skip
//! verification or go through a proxy (`exec`, `auth-provider`, basic auth,
//! `insecure-skip-tls-verify`, `proxy-url`) is refused with an error naming it, never ignored.
//!
//! Several files (`KUBECONFIG=a:b`) merge as kubectl merges them: the first file to name a
//! cluster, user or context, or to set `current-context`, wins.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use serde::Deserialize;

use crate::identity::Token;

pub const ENV_KUBECONFIG: &str = "KUBECONFIG";

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("reading kubeconfig {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("parsing kubeconfig {0}: {1}")]
    Parse(PathBuf, #[source] serde_norway::Error),
    #[error("kubeconfig: no context selected (set current-context or pass --kube-context)")]
    NoContext,
    #[error("kubeconfig: no {kind} named {name:?}")]
    Missing { kind: &'static str, name: String },
    #[error("kubeconfig: cluster {0:?} has no server")]
    NoServer(String),
    #[error("kubeconfig: {what} of {owner:?} is not supported by robin ({why})")]
    Unsupported {
        what: &'static str,
        owner: String,
        why: &'static str,
    },
    #[error("kubeconfig: {field} of {owner:?} is not valid base64")]
    Base64 { field: &'static str, owner: String },
    #[error(
        "kubeconfig: user {0:?} sets a client certificate without its key, or a key without its certificate"
    )]
    HalfClientCert(String),
    #[error("kubeconfig: token of user {0:?} is not a valid bearer token")]
    BadToken(String),
}

/// How the agent authenticates to the API server.
#[derive(Debug, Clone)]
pub enum ApiAuth {
    None,
    /// Re-read for every request (in-cluster ServiceAccount tokens rotate).
    TokenFile(PathBuf),
    Token(Token),
    /// PEM certificate chain and private key for mutual TLS.
    ClientCert {
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    },
}

/// Everything needed to reach one API server.
#[derive(Debug, Clone)]
pub struct ApiEndpoint {
    pub server: String,
    /// PEM roots; `None` means the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Overrides the name the server certificate is verified against.
    pub tls_server_name: Option<String>,
    pub auth: ApiAuth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default)]
    current_context: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Debug, Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Debug, Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: Option<String>,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    tls_server_name: Option<String>,
    proxy_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    #[serde(rename = "client-certificate")]
    client_certificate: Option<PathBuf>,
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: Option<String>,
    #[serde(rename = "client-key")]
    client_key: Option<PathBuf>,
    #[serde(rename = "client-key-data")]
    client_key_data: Option<String>,
    exec: Option<serde_norway::Value>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde_norway::Value>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: Option<String>,
}

/// Paths named by `KUBECONFIG` (colon-separated; empty entries skipped).
pub fn paths_from_env(value: &str) -> Vec<PathBuf> {
    std::env::split_paths(value)
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

/// Reads `paths` (missing files are skipped, as kubectl does) and resolves `context`, or the
/// merged `current-context`.
pub fn load(paths: &[PathBuf], context: Option<&str>) -> Result<ApiEndpoint, KubeconfigError> {
    let mut clusters: BTreeMap<String, (Cluster, PathBuf)> = BTreeMap::new();
    let mut users: BTreeMap<String, (User, PathBuf)> = BTreeMap::new();
    let mut contexts: BTreeMap<String, Context> = BTreeMap::new();
    let mut current = None;
    for path in paths {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(KubeconfigError::Read(path.clone(), e)),
        };
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_norway::from_str(&text).map_err(|e| KubeconfigError::Parse(path.clone(), e))?
        };
        // Relative paths in a kubeconfig are relative to the file that names them.
        let dir = path.parent().map(Path::to_owned).unwrap_or_default();
        for c in file.clusters {
            clusters.entry(c.name).or_insert((c.cluster, dir.clone()));
        }
        for u in file.users {
            users.entry(u.name).or_insert((u.user, dir.clone()));
        }
        for c in file.contexts {
            contexts.entry(c.name).or_insert(c.context);
        }
        if current.is_none() {
            current = file.current_context.filter(|c| !c.is_empty());
        }
    }
    let name = context
        .map(str::to_owned)
        .or(current)
        .ok_or(KubeconfigError::NoContext)?;
    let ctx = contexts
        .get(&name)
        .ok_or_else(|| KubeconfigError::Missing {
            kind: "context",
            name: name.clone(),
        })?;
    let (cluster, cluster_dir) =
        clusters
            .get(&ctx.cluster)
            .ok_or_else(|| KubeconfigError::Missing {
                kind: "cluster",
                name: ctx.cluster.clone(),
            })?;
    let endpoint = resolve_cluster(&ctx.cluster, cluster, cluster_dir)?;
    let auth = match &ctx.user {
        None => ApiAuth::None,
        Some(user_name) => {
            let (user, dir) = users
                .get(user_name)
                .ok_or_else(|| KubeconfigError::Missing {
                    kind: "user",
                    name: user_name.clone(),
                })?;
            resolve_user(user_name, user, dir)?
        }
    };
    Ok(ApiEndpoint { auth, ..endpoint })
}

fn resolve_cluster(name: &str, c: &Cluster, dir: &Path) -> Result<ApiEndpoint, KubeconfigError> {
    let unsupported = |what, why| KubeconfigError::Unsupported {
        what,
        owner: name.to_owned(),
        why,
    };
    if c.insecure_skip_tls_verify {
        return Err(unsupported(
            "insecure-skip-tls-verify",
            "the api server is always verified",
        ));
    }
    if c.proxy_url.is_some() {
        return Err(unsupported(
            "proxy-url",
            "outbound clients never use a proxy",
        ));
    }
    let server = c
        .server
        .clone()
        .ok_or_else(|| KubeconfigError::NoServer(name.to_owned()))?;
    let ca_pem = match (&c.certificate_authority_data, &c.certificate_authority) {
        (Some(data), _) => Some(decode("certificate-authority-data", name, data)?),
        (None, Some(path)) => Some(read(&dir.join(path))?),
        (None, None) => None,
    };
    Ok(ApiEndpoint {
        server,
        ca_pem,
        tls_server_name: c.tls_server_name.clone(),
        auth: ApiAuth::None,
    })
}

fn resolve_user(name: &str, u: &User, dir: &Path) -> Result<ApiAuth, KubeconfigError> {
    let unsupported = |what, why| KubeconfigError::Unsupported {
        what,
        owner: name.to_owned(),
        why,
    };
    if u.exec.is_some() {
        return Err(unsupported(
            "exec",
            "the agent does not run credential plugins; use a token or a client certificate",
        ));
    }
    if u.auth_provider.is_some() {
        return Err(unsupported(
            "auth-provider",
            "use a token or a client certificate",
        ));
    }
    if u.username.is_some() || u.password.is_some() {
        return Err(unsupported("username/password", "basic auth is not used"));
    }
    let cert = match (&u.client_certificate_data, &u.client_certificate) {
        (Some(d), _) => Some(decode("client-certificate-data", name, d)?),
        (None, Some(p)) => Some(read(&dir.join(p))?),
        (None, None) => None,
    };
    let key = match (&u.client_key_data, &u.client_key) {
        (Some(d), _) => Some(decode("client-key-data", name, d)?),
        (None, Some(p)) => Some(read(&dir.join(p))?),
        (None, None) => None,
    };
    match (cert, key) {
        (Some(cert_pem), Some(key_pem)) => return Ok(ApiAuth::ClientCert { cert_pem, key_pem }),
        (None, None) => {}
        _ => return Err(KubeconfigError::HalfClientCert(name.to_owned())),
    }
    if let Some(token) = &u.token {
        let token = Token::parse(token).map_err(|_| KubeconfigError::BadToken(name.to_owned()))?;
        return Ok(ApiAuth::Token(token));
    }
    if let Some(file) = &u.token_file {
        return Ok(ApiAuth::TokenFile(dir.join(file)));
    }
    Ok(ApiAuth::None)
}

fn decode(field: &'static str, owner: &str, data: &str) -> Result<Vec<u8>, KubeconfigError> {
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|_| KubeconfigError::Base64 {
            field,
            owner: owner.to_owned(),
        })
}

fn read(path: &Path) -> Result<Vec<u8>, KubeconfigError> {
    std::fs::read(path).map_err(|e| KubeconfigError::Read(path.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("robin-kcfg-{}-{tag}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const KIND: &str = r#"
apiVersion: v1
kind: Config
current-context: kind-dev
clusters:
- name: kind-dev
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==
    tls-server-name: kubernetes
- name: other
  cluster:
    server: https://10.0.0.1
    certificate-authority: certs/ca.pem
contexts:
- name: kind-dev
  context: {cluster: kind-dev, user: kind-dev}
- name: other
  context: {cluster: other, user: token-file}
users:
- name: kind-dev
  user:
    client-certificate-data: Y2VydA==
    client-key-data: a2V5
- name: token-file
  user:
    tokenFile: tokens/agent
"#;

    #[test]
    fn current_context_with_inline_data() {
        let s = Scratch::new("kind");
        let path = s.write("config", KIND);
        let ep = load(&[path], None).unwrap();
        assert_eq!(ep.server, "https://127.0.0.1:6443");
        assert_eq!(ep.tls_server_name.as_deref(), Some("kubernetes"));
        assert!(
            ep.ca_pem
                .unwrap()
                .starts_with(b"-----BEGIN CERTIFICATE-----")
        );
        let ApiAuth::ClientCert { cert_pem, key_pem } = ep.auth else {
            panic!("expected a client certificate");
        };
        assert_eq!(
            (cert_pem.as_slice(), key_pem.as_slice()),
            (&b"cert"[..], &b"key"[..])
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let s = Scratch::new("rel");
        std::fs::create_dir_all(s.0.join("certs")).unwrap();
        s.write("certs/ca.pem", "PEM");
        let path = s.write("config", KIND);
        let ep = load(&[path], Some("other")).unwrap();
        assert_eq!(ep.ca_pem.as_deref(), Some(&b"PEM"[..]));
        let ApiAuth::TokenFile(f) = ep.auth else {
            panic!("expected a token file");
        };
        assert_eq!(f, s.0.join("tokens/agent"));
    }

    #[test]
    fn first_file_wins_and_missing_files_are_skipped() {
        let s = Scratch::new("merge");
        let a = s.write(
            "a",
            "clusters:\n- name: c\n  cluster: {server: 'https://first'}\nusers:\n- name: u\n  user: {token: first.token}\n",
        );
        let b = s.write(
            "b",
            "current-context: x\nclusters:\n- name: c\n  cluster: {server: 'https://second'}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n",
        );
        let ep = load(&[s.0.join("absent"), a, b], None).unwrap();
        assert_eq!(ep.server, "https://first");
        let ApiAuth::Token(t) = ep.auth else {
            panic!("expected a token");
        };
        assert_eq!(t.expose(), "first.token");
        assert!(!format!("{t:?}").contains("first.token"));
    }

    #[test]
    fn refuses_what_robin_will_not_do() {
        let s = Scratch::new("refuse");
        let cases = [
            (
                "users:\n- name: u\n  user:\n    exec: {command: aws}\n",
                "exec",
            ),
            (
                "users:\n- name: u\n  user:\n    auth-provider: {name: oidc}\n",
                "auth-provider",
            ),
            (
                "users:\n- name: u\n  user: {username: a, password: b}\n",
                "username/password",
            ),
            (
                "users:\n- name: u\n  user: {client-certificate-data: Y2VydA==}\n",
                "without its key",
            ),
            (
                "users:\n- name: u\n  user: {token: \"a\\r\\nX-Evil: 1\"}\n",
                "not a valid bearer token",
            ),
        ];
        for (user, expect) in cases {
            let p = s.write(
                "c",
                &format!(
                    "current-context: x\nclusters:\n- name: c\n  cluster: {{server: 'https://k'}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\n{user}"
                ),
            );
            let err = load(&[p], None).unwrap_err().to_string();
            assert!(err.contains(expect), "{expect}: {err}");
        }
        for (cluster, expect) in [
            (
                "{server: 'https://k', insecure-skip-tls-verify: true}",
                "insecure-skip-tls-verify",
            ),
            (
                "{server: 'https://k', proxy-url: 'http://p:3128'}",
                "proxy-url",
            ),
            ("{certificate-authority-data: '!!'}", "has no server"),
            (
                "{server: 'https://k', certificate-authority-data: '!!'}",
                "not valid base64",
            ),
        ] {
            let p = s.write(
                "c",
                &format!(
                    "current-context: x\nclusters:\n- name: c\n  cluster: {cluster}\ncontexts:\n- name: x\n  context: {{cluster: c}}\n"
                ),
            );
            let err = load(&[p], None).unwrap_err().to_string();
            assert!(err.contains(expect), "{expect}: {err}");
        }
    }

    #[test]
    fn missing_context_and_names_are_errors() {
        let s = Scratch::new("missing");
        let p = s.write("c", "clusters: []\n");
        assert!(matches!(
            load(std::slice::from_ref(&p), None),
            Err(KubeconfigError::NoContext)
        ));
        let err = load(&[p], Some("nope")).unwrap_err().to_string();
        assert!(err.contains("no context named \"nope\""), "{err}");
        assert_eq!(
            paths_from_env("/a::/b"),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }
}
