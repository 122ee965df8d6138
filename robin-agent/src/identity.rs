//! Workload identity: where a token comes from, and the one type allowed to hold it.
//!
//! Every source implements [`IdentitySource`]; a rule in the config names its source with
//! `source = { kind = "...", ... }` ([`SourceConfig`]). A token value lives only inside [`Token`],
//! whose `Debug`/`Display` print `<redacted>`, so it cannot reach a log record by accident.
//!
//! Sources: [`file`] (checked per request, re-read on change), [`token_request`] (Kubernetes TokenRequest),
//! [`spiffe`] (JWT-SVIDs), [`exchange`] (OAuth token exchange / JWT client assertion of an inner
//! source). The fetching ones share one [`TokenCache`] (through [`IdentityContext`]) and reach the
//! network only through hardened clients: [`crate::kube::Endpoint`] for the Kubernetes API,
//! [`http::HttpClient`] for token endpoints. Config reference: `identity/README.md`.
use std::{
    fmt,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use serde::Deserialize;

pub mod cache;
pub mod exchange;
pub mod file;
pub mod http;
pub mod spiffe;
pub mod token_request;

pub use crate::{
    kube::PodRef,
    secret::{MAX_TOKEN_LEN, Token, TokenError},
};
pub use cache::{CacheKey, CachePolicy, TokenCache};
pub use http::HttpSettings;

/// Why a source could not produce a token. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file inside a pod's root (`robin node`), or a path that would leave it.
    #[error("reading {path}: {source}")]
    ReadInPod {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid token from {origin}: {source}")]
    Invalid {
        origin: String,
        #[source]
        source: TokenError,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("invalid identity source config: {0}")]
    Config(String),
    #[error("{origin}: {source}")]
    Http {
        origin: String,
        #[source]
        source: http::HttpError,
    },
    /// An OAuth error response; both fields are already sanitized (printable ASCII, truncated).
    #[error("{origin}: token endpoint refused: {code}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    OAuth {
        origin: String,
        code: String,
        description: Option<String>,
    },
    #[error("{origin}: unexpected response: {detail}")]
    Protocol { origin: String, detail: String },
}

pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<Token, IdentityError>> + Send + 'a>>;

/// A source of the workload's current token. `token()` is called once per forwarded request, so
/// it must be cheap when nothing changed (sources that fetch over the network cache).
pub trait IdentitySource: Send + Sync + fmt::Debug {
    /// A short label for logs and metrics, e.g. `file:/var/run/secrets/tokens/robin-token`.
    fn describe(&self) -> String;
    fn token(&self) -> TokenFuture<'_>;
    /// The key this source's tokens are cached under, for sources that cache. An `exchange`
    /// keys on it so two pods whose inner tokens differ never share an exchanged token (the
    /// label alone does not name the pod).
    fn cache_key(&self) -> Option<&CacheKey> {
        None
    }
}

/// `source = { kind = "...", ... }` of an `[[inject]]` rule.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// A projected ServiceAccount token (or any token file), checked on every request and
    /// re-read when it changed.
    File { path: PathBuf },
    /// A Kubernetes TokenRequest for a ServiceAccount, cached until near expiry.
    TokenRequest(token_request::TokenRequestConfig),
    /// A JWT-SVID from the SPIFFE Workload API.
    Spiffe(spiffe::SpiffeConfig),
    /// An OAuth token exchange (RFC 8693) or JWT client assertion (RFC 7523) of an inner token.
    Exchange(exchange::ExchangeConfig),
}

impl SourceConfig {
    /// The audience this source asks its tokens for, when it names one: what the destination
    /// of its tokens is expected to accept (see the proxy's audience check).
    pub fn audience(&self) -> Option<&str> {
        match self {
            Self::File { .. } => None,
            Self::TokenRequest(c) => Some(&c.audience),
            Self::Spiffe(c) => Some(&c.audience),
            Self::Exchange(c) => c.audience.as_deref(),
        }
    }
}

/// What all sources built by one agent share: the single token cache, timeouts, defaults.
#[derive(Debug, Clone)]
pub struct IdentityContext {
    pub cache: Arc<TokenCache>,
    pub http: HttpSettings,
    /// Where the mounted ServiceAccount files (`namespace`, `token`, `ca.crt`) live.
    pub service_account_dir: PathBuf,
    /// Default Workload API socket (`ROBIN_SPIFFE_SOCKET`), used when a rule names none.
    pub spiffe_socket: Option<PathBuf>,
    pub pod: Option<PodRef>,
    /// `robin node`: the pod's filesystem. `file` sources (also an `exchange`'s inner one) are
    /// then paths inside the pod's root, never the agent's.
    pub pod_fs: Option<Arc<crate::podfs::PodFs>>,
}

/// Default Workload API socket for `spiffe` sources.
pub const ENV_SPIFFE_SOCKET: &str = "ROBIN_SPIFFE_SOCKET";
pub const DEFAULT_SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl IdentityContext {
    pub fn new(policy: CachePolicy) -> Self {
        Self {
            cache: Arc::new(TokenCache::new(policy)),
            http: HttpSettings::default(),
            service_account_dir: PathBuf::from(DEFAULT_SERVICE_ACCOUNT_DIR),
            spiffe_socket: None,
            pod: None,
            pod_fs: None,
        }
    }

    /// Production defaults, with the socket taken from `lookup(ENV_SPIFFE_SOCKET)`; pass
    /// `|k| std::env::var(k).ok()` in `main`, a map in tests.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let mut ctx = Self::new(CachePolicy::default());
        ctx.spiffe_socket = lookup(ENV_SPIFFE_SOCKET)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        ctx
    }

    /// The same context (same cache, same settings) acting for `pod`: one cache serves every
    /// pod, and the keys of fetching sources name the pod so entries never cross pods.
    pub fn for_pod(&self, pod: PodRef) -> Self {
        Self {
            pod: Some(pod),
            ..self.clone()
        }
    }

    /// The same context reading `file` sources inside the pod's root filesystem.
    pub fn in_pod_fs(&self, fs: Arc<crate::podfs::PodFs>) -> Self {
        Self {
            pod_fs: Some(fs),
            ..self.clone()
        }
    }
}

/// The process-wide context (environment defaults, one cache, no pod). `robin exec` builds its
/// sources in it; `robin node` derives each pod's context from it with
/// [`IdentityContext::for_pod`], so the whole agent has one token cache.
pub fn process_context() -> &'static IdentityContext {
    static DEFAULT: OnceLock<IdentityContext> = OnceLock::new();
    DEFAULT.get_or_init(|| IdentityContext::from_env(|k| std::env::var(k).ok()))
}

/// Builds the runtime source for a rule's configuration in the [`process_context`]. Prefer
/// [`build_source_with`] where a context is at hand.
pub fn build_source(cfg: &SourceConfig) -> Result<Arc<dyn IdentitySource>, IdentityError> {
    build_source_with(cfg, process_context())
}

/// Builds the runtime source for a rule's configuration within `ctx`.
pub fn build_source_with(
    cfg: &SourceConfig,
    ctx: &IdentityContext,
) -> Result<Arc<dyn IdentitySource>, IdentityError> {
    Ok(match cfg {
        SourceConfig::File { path } => Arc::new(match &ctx.pod_fs {
            Some(fs) => {
                file::FileSource::in_pod(crate::podfs::PodPath::new(fs.clone(), path.clone()))
            }
            None => file::FileSource::new(path.clone()),
        }),
        SourceConfig::TokenRequest(c) => Arc::new(token_request::TokenRequestSource::new(c, ctx)?),
        SourceConfig::Spiffe(c) => Arc::new(spiffe::SpiffeSource::new(c, ctx)?),
        SourceConfig::Exchange(c) => Arc::new(exchange::ExchangeSource::new(c, ctx)?),
    })
}

/// The claims of a JWT we care about, read without verifying the signature: the token is our
/// own (or the workload's), we only want to know when to refresh it.
#[derive(Debug, Default, Deserialize)]
pub struct JwtClaims {
    pub exp: Option<i64>,
    pub sub: Option<String>,
    /// RFC 7519 §4.1.3: one string or an array of strings.
    pub aud: Option<Audience>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Self::One(a) => a == aud,
            Self::Many(all) => all.iter().any(|a| a == aud),
        }
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::One(a) => f.write_str(a),
            Self::Many(all) => f.write_str(&all.join(",")),
        }
    }
}

/// Decodes the payload of a compact JWT; `None` when it is not one.
pub fn jwt_claims(token: &Token) -> Option<JwtClaims> {
    let payload = token.expose().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Why a token may not go to a destination that expects another audience.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token audience {found} is not the expected {expected}")]
pub struct AudienceMismatch {
    pub expected: String,
    /// The token's `aud` claim, or `<none>` when the JWT has none.
    pub found: String,
}

/// Checks a token's `aud` claim against `expected` without verifying its signature (the
/// destination does that): only a compact JWT (three dot-separated parts whose payload is a
/// JSON object) is checked; any other token passes, since it carries no audience to read.
pub fn check_audience(token: &Token, expected: &str) -> Result<(), AudienceMismatch> {
    if token.expose().split('.').count() != 3 {
        return Ok(());
    }
    let Some(claims) = jwt_claims(token) else {
        return Ok(());
    };
    match claims.aud {
        Some(aud) if aud.contains(expected) => Ok(()),
        found => Err(AudienceMismatch {
            expected: expected.to_owned(),
            found: found.map_or_else(|| "<none>".to_owned(), |a| a.to_string()),
        }),
    }
}

/// Remaining lifetime from a JWT `exp` claim (zero when already past).
pub fn jwt_lifetime(token: &Token) -> Option<Duration> {
    let exp = jwt_claims(token)?.exp?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(Duration::from_secs(exp.saturating_sub(now).max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Rule {
        source: SourceConfig,
    }

    /// Keeps the config reference honest: every example in it must parse.
    #[test]
    fn readme_examples_parse() {
        let readme = include_str!("identity/README.md");
        let examples: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|b| b.split("```").next().unwrap())
            .collect();
        assert_eq!(examples.len(), 6);
        for ex in examples {
            toml::from_str::<Rule>(ex).unwrap_or_else(|e| panic!("{ex}: {e}"));
        }
    }

    #[test]
    fn nested_exchange_parses_and_unknown_fields_are_rejected() {
        let rule: Rule = toml::from_str(
            r#"source = { kind = "exchange", grant = "token_exchange", token_endpoint = "https://sts/t", inner = { kind = "spiffe", audience = "sts" } }"#,
        )
        .unwrap();
        let SourceConfig::Exchange(x) = rule.source else {
            panic!("not an exchange");
        };
        assert_eq!(x.grant, exchange::Grant::TokenExchange);
        assert!(matches!(*x.inner, SourceConfig::Spiffe(_)));
        for bad in [
            r#"source = { kind = "file", path = "/t", extra = 1 }"#,
            r#"source = { kind = "spiffe", audience = "a", audiences = ["b"] }"#,
            r#"source = { kind = "exchange", grant = "password", token_endpoint = "https://sts/t", inner = { kind = "file", path = "/t" } }"#,
            r#"source = { kind = "exchange", grant = "token_exchange", token_endpoint = "https://sts/t", inner = { kind = "file", path = "/t", x = 1 } }"#,
            r#"source = { kind = "ldap" }"#,
        ] {
            assert!(toml::from_str::<Rule>(bad).is_err(), "{bad}");
        }
    }

    /// In a pod's context every `file` source, also an `exchange`'s inner one, is a path in
    /// the pod's root: the same absolute path in the agent's filesystem is never read.
    #[tokio::test]
    async fn file_sources_in_a_pod_context_read_inside_the_pod_root() {
        use crate::podfs::{PodFs, PodRoot};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("root/run")).unwrap();
        std::fs::write(dir.join("root/run/token"), "pod-token").unwrap();
        // What the path names in the agent's own view.
        std::fs::write(dir.join("agent-token"), "agent-token").unwrap();
        std::os::unix::fs::symlink(dir.join("agent-token"), dir.join("root/leak")).unwrap();
        let fs = PodFs::new(PodRoot::at_dir(&dir.join("root"), 9), Box::new(|_| None));
        let ctx = IdentityContext::new(CachePolicy::default()).in_pod_fs(fs);
        let file = |p: &str| SourceConfig::File { path: p.into() };
        let own = build_source_with(&file("/run/token"), &ctx).unwrap();
        assert_eq!(own.token().await.unwrap().expose(), "pod-token");
        let leak = build_source_with(&file("/leak"), &ctx).unwrap();
        let err = leak.token().await.unwrap_err();
        assert!(matches!(err, IdentityError::ReadInPod { .. }), "{err}");
        let inner: SourceConfig = toml::from_str::<Rule>(
            r#"source = { kind = "exchange", grant = "token_exchange", token_endpoint = "https://sts/t", inner = { kind = "file", path = "/run/token" } }"#,
        )
        .unwrap()
        .source;
        let exchange = build_source_with(&inner, &ctx).unwrap();
        assert!(
            exchange
                .describe()
                .contains("inner=(file:/run/token (in the pod))"),
            "{}",
            exchange.describe()
        );
    }

    #[test]
    fn audience_check_reads_string_or_array_and_skips_non_jwts() {
        let jwt = |claims: &str| {
            let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
            Token::parse(&format!("{}.{}.c2ln", b64(b"{}"), b64(claims.as_bytes()))).unwrap()
        };
        assert!(check_audience(&jwt(r#"{"aud":"broker"}"#), "broker").is_ok());
        assert!(check_audience(&jwt(r#"{"aud":["a","broker"]}"#), "broker").is_ok());
        let e = check_audience(&jwt(r#"{"aud":["a","b"]}"#), "broker").unwrap_err();
        assert_eq!((e.expected.as_str(), e.found.as_str()), ("broker", "a,b"));
        let e = check_audience(&jwt(r#"{"sub":"x"}"#), "broker").unwrap_err();
        assert_eq!(e.found, "<none>");
        // Not a JWT (opaque, two or four parts, undecodable payload): nothing to check.
        for t in ["opaque", "a.b", "exchanged.tok-A.123.broker", "a.%%%.c"] {
            if let Ok(t) = Token::parse(t) {
                assert!(check_audience(&t, "broker").is_ok(), "{t:?}");
            }
        }
    }

    #[test]
    fn jwt_claims_are_read_without_verification() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"exp":4102444800,"sub":"system:serviceaccount:a:b"}"#);
        let t = Token::parse(&format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln")).unwrap();
        let c = jwt_claims(&t).unwrap();
        assert_eq!(c.exp, Some(4102444800));
        assert_eq!(c.sub.as_deref(), Some("system:serviceaccount:a:b"));
        assert!(jwt_lifetime(&t).unwrap() > Duration::from_secs(86400));
        assert!(jwt_claims(&Token::parse("opaque").unwrap()).is_none());
    }
}
