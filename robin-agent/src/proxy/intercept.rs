//! The intercepting HTTP server: one per terminated connection. For each request it fetches a
//! fresh token, rewrites the credential header, and forwards on the connection's upstream,
//! streaming bodies both ways.
use std::{
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use bytes::Bytes;
use http::{
    HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header::{CONNECTION, CONTENT_TYPE, HOST},
    uri::{Authority, Scheme},
};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{Instrument, debug, info, warn};

use super::{
    ProxyStats, Rule,
    inject::{set_credential, strip_hop_by_hop, wants_upgrade},
    upstream::{Proto, SendError, Upstream, UpstreamBody, UpstreamError},
};
use crate::{config::normalize_host, identity::IdentityError};

pub type Body = Either<UpstreamBody, Full<Bytes>>;

/// What every request on one intercepted connection shares.
pub struct ConnCtx {
    pub rule: Arc<Rule>,
    /// The name the connection was matched on (SNI, or the first request's Host).
    pub name: String,
    pub scheme: Scheme,
    pub upstream: Upstream,
    pub stats: Arc<ProxyStats>,
}

fn text(status: StatusCode, msg: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(msg.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    // The path only: query strings often carry secrets.
    let path = req.uri().path().to_owned();
    let resp = forward(&ctx, req).await;
    let status = resp.status();
    ctx.stats.count_status(status);
    ctx.rule.stats.requests.count(status);
    info!(
        %method,
        path,
        status = status.as_u16(),
        ms = start.elapsed().as_millis() as u64,
        rule = %ctx.rule.label,
        "request"
    );
    Ok(resp)
}

async fn forward(ctx: &ConnCtx, mut req: Request<Incoming>) -> Response<Body> {
    let downstream_h1 = req.version() < Version::HTTP_2;
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let authority = host.clone().unwrap_or_else(|| ctx.name.clone());
    let Ok(authority) = authority.parse::<Authority>() else {
        return text(StatusCode::BAD_REQUEST, "robin: invalid host\n");
    };

    // Inject only for hosts the connection's rule covers; another virtual host on the same
    // connection gets the request untouched.
    let inject = match &host {
        Some(h) => ctx.rule.cfg.matches(&normalize_host(h)),
        // Without a host, only the verified SNI vouches for the destination.
        None => ctx.scheme == Scheme::HTTPS,
    };
    if inject {
        let fetch_start = Instant::now();
        let token = ctx.rule.source.token().await;
        ctx.rule.stats.identity_fetch.observe(fetch_start.elapsed());
        let token = match token {
            Ok(t) => t,
            Err(e) => {
                ctx.stats.identity_errors.fetch_add(1, Ordering::Relaxed);
                ctx.rule
                    .stats
                    .identity_errors
                    .fetch_add(1, Ordering::Relaxed);
                warn!(source = %ctx.rule.source.describe(), error = %e, "identity unavailable, answering 503");
                // The OAuth error code is already sanitized (printable ASCII, truncated) and
                // tells the workload's operator why; nothing else about the source is shown.
                let reason = match &e {
                    IdentityError::OAuth { code, .. } => {
                        format!(
                            "robin: workload identity unavailable: token endpoint error {code}\n"
                        )
                    }
                    _ => "robin: workload identity unavailable\n".to_owned(),
                };
                return text(StatusCode::SERVICE_UNAVAILABLE, reason);
            }
        };
        let Ok(value) = HeaderValue::from_str(&ctx.rule.cfg.format.render(token.expose())) else {
            // Unreachable for a parsed token and a validated format; refuse rather than guess.
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "robin: workload identity unavailable\n",
            );
        };
        set_credential(req.headers_mut(), &ctx.rule.cfg.header, value);
    }

    let upgrade = downstream_h1 && wants_upgrade(req.headers());
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let unavailable = |e: UpstreamError| {
        ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, "upstream unavailable, answering 502");
        text(StatusCode::BAD_GATEWAY, "robin: upstream unavailable\n")
    };
    let mut checkout = match ctx.upstream.checkout().await {
        Ok(c) => c,
        Err(e) => return unavailable(e),
    };
    let mut redialled = false;
    let mut resp = loop {
        if upgrade && checkout.proto() == Proto::H2 {
            return text(
                StatusCode::BAD_GATEWAY,
                "robin: upstream cannot upgrade over h2\n",
            );
        }
        if let Err(resp) = fit_to(&mut req, checkout.proto(), &ctx.scheme, authority.clone()) {
            return *resp;
        }
        match ctx.upstream.send(checkout, req).await {
            Ok(r) => break r,
            // A pooled connection found closed before any byte of the request was written
            // (see `Upstream::send`): one fresh dial, never a second pooled connection. A fresh
            // connection never hands a request back, so this happens at most once.
            Err(SendError::Unsent(r)) if !redialled => {
                ctx.stats.upstream_retries.fetch_add(1, Ordering::Relaxed);
                debug!(
                    "pooled upstream connection closed before the request was written, dialling once"
                );
                redialled = true;
                req = *r;
                checkout = match ctx.upstream.dial().await {
                    Ok(c) => c,
                    Err(e) => return unavailable(e),
                };
            }
            Err(SendError::Unsent(_)) => {
                ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                warn!("upstream connection closed before the request was written, answering 502");
                return text(StatusCode::BAD_GATEWAY, "robin: upstream request failed\n");
            }
            Err(SendError::Failed(e)) if e.is_request_body() => {
                // The workload's own body was malformed (e.g. bad chunking): its fault, and the
                // connection's framing is lost, so close it.
                warn!(error = %e, "request body failed, answering 400");
                let mut r = text(StatusCode::BAD_REQUEST, "robin: malformed request body\n");
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
            Err(SendError::Failed(e)) => {
                ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "upstream request failed, answering 502");
                return text(StatusCode::BAD_GATEWAY, "robin: upstream request failed\n");
            }
        }
    };

    ctx.stats.upstream_responses.count(resp.status());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(down) = downstream_upgrade else {
            return text(StatusCode::BAD_GATEWAY, "robin: unexpected upgrade\n");
        };
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(down, up).in_current_span());
        return resp.map(Either::Left);
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    resp.map(Either::Left)
}

/// Rewrites the request target for the upstream protocol: h2 wants scheme + `:authority` (and
/// no Host), HTTP/1.1 wants origin-form plus Host.
fn fit_to(
    req: &mut Request<Incoming>,
    proto: Proto,
    scheme: &Scheme,
    authority: Authority,
) -> Result<(), Box<Response<Body>>> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let bad = || {
        Box::new(text(
            StatusCode::BAD_REQUEST,
            "robin: invalid request target\n",
        ))
    };
    if req.method() == Method::CONNECT {
        return Err(bad());
    }
    match proto {
        Proto::H2 => {
            let uri = Uri::builder()
                .scheme(scheme.clone())
                .authority(authority)
                .path_and_query(path)
                .build()
                .map_err(|_| bad())?;
            *req.uri_mut() = uri;
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(HOST);
        }
        Proto::Http1 => {
            // An h2 `:authority` (or absolute-form target) takes precedence over any Host
            // header (RFC 9113 §8.3.1), so the upstream sees the host the rule matched.
            let had_authority = req.uri().authority().is_some();
            *req.uri_mut() = path.parse().map_err(|_| bad())?;
            *req.version_mut() = Version::HTTP_11;
            if had_authority || !req.headers().contains_key(HOST) {
                let host = HeaderValue::from_str(authority.as_str()).map_err(|_| bad())?;
                req.headers_mut().insert(HOST, host);
            }
            // Only the upgrade handshake keeps a Connection header.
            if let Some(c) = req.headers_mut().remove(CONNECTION)
                && c.as_bytes().eq_ignore_ascii_case(b"upgrade")
            {
                req.headers_mut().insert(CONNECTION, c);
            }
        }
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
