//! The intercepting HTTP server: one per terminated TLS or plain-HTTP connection. For each
//! request it asks [`super::route`] where the request goes and with whose token, fetches a fresh
//! token, rewrites the credential header, and forwards, streaming bodies both ways. Every
//! failure is a [`ProxyError`]; [`respond`] alone turns it into Robin's own answer.
use std::{convert::Infallible, sync::Arc, time::Instant};

use http::{
    HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header::{CONNECTION, HOST},
    uri::{Authority, Scheme},
};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{Instrument, debug, info, warn};

use super::{
    ProxyStats, Rule,
    inject::{set_credential, strip_hop_by_hop, wants_upgrade},
    respond::{Body, ProxyError, respond},
    route::{Route, Routes},
    upstream::{Pool, Proto, SendError, Upstream, UpstreamBody},
};
use crate::identity::check_audience;

/// What every request on one intercepted connection shares.
pub struct ConnCtx {
    pub routes: Routes,
    pub pool: Arc<Pool>,
    pub stats: Arc<ProxyStats>,
}

pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    // A clone shares the parsed target's bytes; only its path is logged (query strings often
    // carry secrets).
    let target = req.uri().clone();
    let routed = ctx.routes.route(req.uri(), req.headers(), req.version());
    let (result, rule) = match routed.await {
        Ok(route) => {
            let rule = route.rule.clone();
            (forward(&ctx, route, req).await, rule)
        }
        Err(refusal) => (Err(refusal.into()), None),
    };
    let resp = result.unwrap_or_else(|e| respond(&e));
    let status = resp.status();
    let label = match &rule {
        Some(rule) => {
            rule.stats.requests.count(status);
            rule.label.as_str()
        }
        None => {
            ctx.stats.unruled_requests.count(status);
            super::metrics::NO_RULE
        }
    };
    info!(
        %method,
        path = target.path(),
        status = status.as_u16(),
        ms = start.elapsed().as_millis() as u64,
        rule = label,
        "request"
    );
    Ok(resp)
}

/// The rule's credential header value for this request: made and checked once per token
/// ([`super::inject::RenderedCredential`]).
async fn credential(rule: &Rule) -> Result<HeaderValue, ProxyError> {
    let fetch_start = Instant::now();
    let token = rule.source.token().await;
    rule.stats.identity_fetch.observe(fetch_start.elapsed());
    let token = token.map_err(|error| {
        rule.stats.identity_errors.inc();
        ProxyError::IdentityUnavailable {
            origin: rule.source.describe().to_string(),
            error,
        }
    })?;
    if let Some(value) = rule.rendered.get(&token) {
        return Ok(value);
    }
    if let Some(expected) = &rule.cfg.audience {
        check_audience(&token, expected).map_err(|mismatch| {
            rule.stats.audience_mismatches.inc();
            ProxyError::AudienceMismatch {
                rule: rule.label.clone(),
                mismatch,
            }
        })?;
    }
    let value = HeaderValue::from_str(&rule.cfg.format.render(token.expose()))
        .map_err(|_| ProxyError::CredentialUnrenderable)?;
    rule.rendered.keep(token, value.clone());
    Ok(value)
}

async fn forward(
    ctx: &ConnCtx,
    route: Route,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    // Hop-by-hop headers go first: a `Connection` option naming the credential header must not
    // remove the injected value.
    let upgrade = req.version() < Version::HTTP_2 && wants_upgrade(req.headers());
    strip_hop_by_hop(req.headers_mut(), upgrade);
    if ctx.routes.rewrites_host() {
        // `fit_to` then sets the upstream's authority.
        req.headers_mut().remove(HOST);
    }
    if let Some(rule) = &route.rule {
        let value = credential(rule).await?;
        set_credential(req.headers_mut(), &rule.cfg.header, value);
    }
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let upstream = Upstream::new(route.target, ctx.pool.clone());
    let sent = send(ctx, &upstream, &route.scheme, route.authority, upgrade, req).await;
    let mut resp = sent.inspect_err(|e| count_send_error(ctx, e))?;
    ctx.stats.upstream_responses.count(resp.status());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let down = downstream_upgrade.ok_or(ProxyError::UnexpectedUpgrade)?;
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(down, up).in_current_span());
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    Ok(resp.map(Either::Left))
}

/// The upstream failures the proxy counts as upstream errors (a workload's broken body or an
/// impossible upgrade is not the upstream's fault).
fn count_send_error(ctx: &ConnCtx, e: &ProxyError) {
    if matches!(
        e,
        ProxyError::UpstreamUnavailable(_)
            | ProxyError::UpstreamUnsent
            | ProxyError::UpstreamFailed(_)
    ) {
        ctx.stats.upstream_errors.inc();
    }
}

/// Sends `req` on a checked-out upstream connection, with the one redial rule of
/// [`Upstream::send`].
async fn send(
    ctx: &ConnCtx,
    upstream: &Upstream,
    scheme: &Scheme,
    authority: Authority,
    upgrade: bool,
    mut req: Request<Incoming>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let checkout = if upgrade {
        upstream.dial_upgradeable().await
    } else {
        upstream.checkout().await
    };
    let mut checkout = checkout.map_err(ProxyError::UpstreamUnavailable)?;
    let mut redialled = false;
    loop {
        if upgrade && checkout.proto() == Proto::H2 {
            return Err(ProxyError::UpgradeOverH2);
        }
        fit_to(&mut req, checkout.proto(), scheme, authority.clone())?;
        match upstream.send(checkout, req).await {
            Ok(r) => return Ok(r),
            // A pooled connection found closed before any byte of the request was written
            // (see `Upstream::send`): one fresh dial, never a second pooled connection. A fresh
            // connection never hands a request back, so this happens at most once.
            Err(SendError::Unsent(r)) if !redialled => {
                ctx.stats.upstream_retries.inc();
                debug!(
                    "pooled upstream connection closed before the request was written, dialling once"
                );
                redialled = true;
                req = *r;
                checkout = upstream
                    .dial()
                    .await
                    .map_err(ProxyError::UpstreamUnavailable)?;
            }
            Err(SendError::Unsent(_)) => return Err(ProxyError::UpstreamUnsent),
            Err(SendError::Failed(e)) => return Err(ProxyError::from_send(e)),
        }
    }
}

/// Rewrites the request target for the upstream protocol: h2 wants scheme + `:authority` (and
/// no Host), HTTP/1.1 wants origin-form plus Host.
fn fit_to(
    req: &mut Request<Incoming>,
    proto: Proto,
    scheme: &Scheme,
    authority: Authority,
) -> Result<(), ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::InvalidTarget);
    }
    match proto {
        Proto::H2 => fit_h2(req, scheme, authority),
        Proto::Http1 => fit_http1(req, &authority),
    }
}

/// The request target's path and query, `/` when it has none (an authority-only target).
fn path_of(req: &Request<Incoming>) -> String {
    req.uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned()
}

fn fit_h2(
    req: &mut Request<Incoming>,
    scheme: &Scheme,
    authority: Authority,
) -> Result<(), ProxyError> {
    *req.uri_mut() = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority)
        .path_and_query(path_of(req))
        .build()
        .map_err(|_| ProxyError::InvalidTarget)?;
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut().remove(HOST);
    Ok(())
}

fn fit_http1(req: &mut Request<Incoming>, authority: &Authority) -> Result<(), ProxyError> {
    // An h2 `:authority` (or absolute-form target) takes precedence over any Host header
    // (RFC 9113 §8.3.1), so the upstream sees the host the rule matched.
    let had_authority = req.uri().authority().is_some();
    // An origin-form target, what HTTP/1.1 clients send, is already the upstream's.
    if had_authority || req.uri().scheme().is_some() {
        *req.uri_mut() = path_of(req)
            .parse()
            .map_err(|_| ProxyError::InvalidTarget)?;
    }
    *req.version_mut() = Version::HTTP_11;
    if had_authority || !req.headers().contains_key(HOST) {
        let host =
            HeaderValue::from_str(authority.as_str()).map_err(|_| ProxyError::InvalidTarget)?;
        req.headers_mut().insert(HOST, host);
    }
    // Only the upgrade handshake keeps a Connection header.
    if let Some(c) = req.headers_mut().remove(CONNECTION)
        && c.as_bytes().eq_ignore_ascii_case(b"upgrade")
    {
        req.headers_mut().insert(CONNECTION, c);
    }
    Ok(())
}

/// Relays an upgraded (e.g. WebSocket) connection byte for byte.
async fn tunnel(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            warn!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((sent, received)) => info!(sent, received, "upgraded stream closed"),
        Err(e) => info!(error = %e, "upgraded stream ended"),
    }
}
