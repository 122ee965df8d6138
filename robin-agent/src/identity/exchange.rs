//! The `exchange` source: trades an inner source's token at an OAuth token endpoint, either as
//! an RFC 8693 token exchange or as an RFC 7523 JWT client assertion, and caches the result.
use std::{path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;

use super::{
    IdentityContext, IdentityError, IdentitySource, SourceConfig, Token, TokenFuture,
    build_source_with,
    cache::{CacheKey, Fetched, TokenCache},
    http::{HttpClient, form_encode, sanitize},
    jwt_lifetime,
};

pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const ASSERTION_TYPE_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Used when the endpoint gives neither `expires_in` nor a JWT `exp` (then clamped by the cache).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Longest OAuth `error`/`error_description` we repeat in logs and 503 bodies.
const MAX_ERROR_TEXT: usize = 128;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// RFC 8693: the inner token is the `subject_token`.
    TokenExchange,
    /// RFC 7523 client authentication: the inner JWT is the `client_assertion` of a
    /// `client_credentials` grant.
    JwtClientAssertion,
}

/// `source = { kind = "exchange", grant = "...", token_endpoint = "...", inner = { ... } }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    pub grant: Grant,
    pub token_endpoint: String,
    pub inner: Box<SourceConfig>,
    pub audience: Option<String>,
    pub scope: Option<String>,
    pub resource: Option<String>,
    /// token_exchange only; defaults to `urn:ietf:params:oauth:token-type:jwt`.
    pub subject_token_type: Option<String>,
    /// token_exchange only.
    pub requested_token_type: Option<String>,
    /// jwt_client_assertion only (optional; many servers take it from the assertion's `sub`).
    pub client_id: Option<String>,
    /// Trust only this CA bundle for the endpoint; default: system roots.
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_insecure_http: bool,
}

pub struct ExchangeSource {
    cfg: ExchangeConfig,
    inner: Arc<dyn IdentitySource>,
    client: HttpClient,
    cache: Arc<TokenCache>,
    key: CacheKey,
}

impl std::fmt::Debug for ExchangeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    token_type: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: Option<String>,
    error_description: Option<String>,
}

impl ExchangeSource {
    pub fn new(cfg: &ExchangeConfig, ctx: &IdentityContext) -> Result<Self, IdentityError> {
        let origin = format!("exchange:{}", cfg.token_endpoint);
        let client = HttpClient::new(
            cfg.ca_file.as_deref(),
            cfg.allow_insecure_http,
            ctx.http.clone(),
        )
        .map_err(|source| IdentityError::Http {
            origin: origin.clone(),
            source,
        })?;
        client
            .check_url(&cfg.token_endpoint)
            .map_err(|source| IdentityError::Http { origin, source })?;
        let inner = build_source_with(&cfg.inner, ctx)?;
        let opt = |o: &Option<String>| o.clone().unwrap_or_default();
        // The inner source's own key, not its label: a per-pod inner source (token_request,
        // delegated spiffe) has one label for many pods. The pod uid on top keeps exchanged
        // tokens per pod whatever the inner kind.
        let inner_key = inner
            .cache_key()
            .map(|k| k.0.clone())
            .unwrap_or_else(|| inner.describe());
        let pod_uid = ctx.pod.as_ref().map(|p| p.uid.as_str()).unwrap_or("");
        let key = CacheKey(format!(
            "exchange|{:?}|{}|inner=({inner_key})|pod={pod_uid}|aud={}|scope={}|resource={}|client={}|stt={}|rtt={}",
            cfg.grant,
            cfg.token_endpoint,
            opt(&cfg.audience),
            opt(&cfg.scope),
            opt(&cfg.resource),
            opt(&cfg.client_id),
            opt(&cfg.subject_token_type),
            opt(&cfg.requested_token_type),
        ));
        Ok(Self {
            cfg: cfg.clone(),
            inner,
            client,
            cache: ctx.cache.clone(),
            key,
        })
    }

    fn form(&self, inner: &Token) -> String {
        let c = &self.cfg;
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        match c.grant {
            Grant::TokenExchange => {
                pairs.push(("grant_type", GRANT_TOKEN_EXCHANGE));
                pairs.push(("subject_token", inner.expose()));
                pairs.push((
                    "subject_token_type",
                    c.subject_token_type.as_deref().unwrap_or(TOKEN_TYPE_JWT),
                ));
                if let Some(v) = &c.requested_token_type {
                    pairs.push(("requested_token_type", v));
                }
            }
            Grant::JwtClientAssertion => {
                pairs.push(("grant_type", "client_credentials"));
                pairs.push(("client_assertion_type", ASSERTION_TYPE_JWT_BEARER));
                pairs.push(("client_assertion", inner.expose()));
                if let Some(v) = &c.client_id {
                    pairs.push(("client_id", v));
                }
            }
        }
        for (name, value) in [
            ("audience", &c.audience),
            ("scope", &c.scope),
            ("resource", &c.resource),
        ] {
            if let Some(v) = value {
                pairs.push((name, v));
            }
        }
        form_encode(&pairs)
    }

    async fn fetch(&self) -> Result<Fetched, IdentityError> {
        let origin = self.describe();
        let inner = self.inner.token().await?;
        let body = self.form(&inner).into_bytes();
        let resp = self
            .client
            .post(
                &self.cfg.token_endpoint,
                "application/x-www-form-urlencoded",
                body,
            )
            .await
            .map_err(|source| IdentityError::Http {
                origin: origin.clone(),
                source,
            })?;
        if !resp.status.is_success() {
            let parsed = serde_json::from_slice::<ErrorResponse>(&resp.body).ok();
            let code = parsed
                .as_ref()
                .and_then(|e| e.error.as_deref())
                .map(|e| sanitize(e, MAX_ERROR_TEXT))
                .unwrap_or_else(|| format!("http_{}", resp.status.as_u16()));
            let description = parsed
                .and_then(|e| e.error_description)
                .map(|d| sanitize(&d, MAX_ERROR_TEXT));
            return Err(IdentityError::OAuth {
                origin,
                code,
                description,
            });
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&resp.body).map_err(|e| IdentityError::Protocol {
                origin: origin.clone(),
                detail: format!("bad token response json: {e}"),
            })?;
        if let Some(tt) = &parsed.token_type
            && !tt.eq_ignore_ascii_case("bearer")
            && !tt.eq_ignore_ascii_case("n_a")
        {
            tracing::debug!(source = %origin, token_type = %sanitize(tt, 32), "non-bearer token_type");
        }
        let raw = parsed.access_token.ok_or_else(|| IdentityError::Protocol {
            origin: origin.clone(),
            detail: "no access_token in response".into(),
        })?;
        let token = Token::parse(&raw).map_err(|source| IdentityError::Invalid {
            origin: origin.clone(),
            source,
        })?;
        // Some servers send expires_in as a string; the cache clamps whatever we get.
        let expires_in = match parsed.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
            _ => None,
        }
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs(s.min(u32::MAX as f64) as u64));
        let lifetime = expires_in
            .or_else(|| jwt_lifetime(&token))
            .unwrap_or(DEFAULT_LIFETIME);
        Ok(Fetched { token, lifetime })
    }
}

impl IdentitySource for ExchangeSource {
    fn describe(&self) -> String {
        let aud = self.cfg.audience.as_deref().unwrap_or("");
        format!(
            "exchange:{} aud={aud} inner=({})",
            self.cfg.token_endpoint,
            self.inner.describe()
        )
    }

    fn token(&self) -> TokenFuture<'_> {
        Box::pin(self.cache.get(&self.key, || self.fetch()))
    }

    fn cache_key(&self) -> Option<&CacheKey> {
        Some(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CachePolicy, PodRef};

    fn pod(name: &str, uid: &str) -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
            service_account: Some("web".into()),
        }
    }

    fn exchange_over(inner: SourceConfig) -> ExchangeConfig {
        ExchangeConfig {
            grant: Grant::TokenExchange,
            token_endpoint: "https://sts.example.com/token".into(),
            inner: Box::new(inner),
            audience: Some("billing".into()),
            scope: None,
            resource: None,
            subject_token_type: None,
            requested_token_type: None,
            client_id: None,
            ca_file: None,
            allow_insecure_http: false,
        }
    }

    fn key(cfg: &ExchangeConfig, ctx: &IdentityContext) -> String {
        ExchangeSource::new(cfg, ctx)
            .unwrap()
            .cache_key()
            .unwrap()
            .0
            .clone()
    }

    /// Two pods with the same namespace and ServiceAccount give the inner source the same
    /// label; their exchanged tokens must still be cached apart, and one pod's twice together.
    #[test]
    fn per_pod_inner_sources_keep_exchanged_tokens_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, crate::tls::tests::test_ca("API CA").0).unwrap();
        let base = IdentityContext::new(CachePolicy::default());
        let (a, b) = (
            base.for_pod(pod("web-0", "uid-a")),
            base.for_pod(pod("web-1", "uid-b")),
        );
        let token_request =
            SourceConfig::TokenRequest(super::super::token_request::TokenRequestConfig {
                audience: "sts".into(),
                expiration_seconds: 3600,
                api_server: "https://kubernetes.default.svc".into(),
                namespace: None,
                service_account: None,
                ca_file: Some(ca),
                token_file: Some(dir.join("token")),
                allow_insecure_http: false,
            });
        let delegated = SourceConfig::Spiffe(super::super::spiffe::SpiffeConfig {
            audience: "sts".into(),
            socket: Some("/run/spire/admin.sock".into()),
            delegated: true,
            ..Default::default()
        });
        for inner in [token_request, delegated] {
            let cfg = exchange_over(inner);
            let inner_a = build_source_with(&cfg.inner, &a).unwrap();
            let inner_b = build_source_with(&cfg.inner, &b).unwrap();
            assert_eq!(inner_a.describe(), inner_b.describe());
            let (ka, kb) = (key(&cfg, &a), key(&cfg, &b));
            assert_ne!(ka, kb);
            assert!(ka.contains("uid-a") && kb.contains("uid-b"), "{ka} {kb}");
            assert_eq!(ka, key(&cfg, &a));
        }
        // A file inner source has no cache key: its label (the path) stands in.
        let file = exchange_over(SourceConfig::File {
            path: "/proc/7/root/t".into(),
        });
        assert!(key(&file, &base).contains("inner=(file:/proc/7/root/t)"));
    }
}
