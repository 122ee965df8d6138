//! The intercepting HTTP server: one per terminated TLS or plain-HTTP connection. For each
//! request it asks [`super::route`] where the request goes and with whose token, fetches a fresh
//! token, rewrites the credential header, and forwards, streaming bodies both ways.
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
    route::{Refusal, Route, Routes},
    upstream::{Pool, Proto, SendError, Upstream, UpstreamBody, UpstreamError},
};
use crate::identity::{IdentityError, check_audience};

pub type Body = Either<UpstreamBody, Full<Bytes>>;

/// What every request on one intercepted connection shares.
pub struct ConnCtx {
    pub routes: Routes,
    pub pool: Arc<Pool>,
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
    let (resp, rule) = match ctx.routes.route(req.uri(), req.headers(), req.version()) {
        Ok(route) => {
            let rule = route.rule.clone();
            (forward(&ctx, route, req).await, rule)
        }
        Err(refusal) => (refuse(&refusal), None),
    };
    let status = resp.status();
    ctx.stats.count_status(status);
    let label = match &rule {
        Some(rule) => {
            rule.stats.requests.count(status);
            rule.label.as_str()
        }
        None => "-",
    };
    info!(
        %method,
        path,
        status = status.as_u16(),
        ms = start.elapsed().as_millis() as u64,
        rule = label,
        "request"
    );
    Ok(resp)
}

/// Robin's own answer to a request it will not forward; nothing of it reaches any upstream.
fn refuse(refusal: &Refusal) -> Response<Body> {
    match refusal {
        Refusal::InvalidHost => text(StatusCode::BAD_REQUEST, "robin: invalid host\n"),
        Refusal::ConflictingHost => {
            warn!(error = %refusal, "ambiguous request host, answering 400");
            // A smuggling shape: whatever follows on this connection is not trusted either.
            let mut r = text(StatusCode::BAD_REQUEST, "robin: conflicting host\n");
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        }
        Refusal::PlaintextRefused { .. } => {
            warn!(error = %refusal, "plaintext injection refused, answering 421");
            text(
                StatusCode::MISDIRECTED_REQUEST,
                "robin: plaintext to this address is not allowed for this host\n",
            )
        }
    }
}

/// The rule's credential header value for this request, or Robin's 503 answer.
async fn credential(ctx: &ConnCtx, rule: &Rule) -> Result<HeaderValue, Response<Body>> {
    let fetch_start = Instant::now();
    let token = rule.source.token().await;
    rule.stats.identity_fetch.observe(fetch_start.elapsed());
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            ctx.stats.identity_errors.fetch_add(1, Ordering::Relaxed);
            rule.stats.identity_errors.fetch_add(1, Ordering::Relaxed);
            warn!(source = %rule.source.describe(), error = %e, "identity unavailable, answering 503");
            // The OAuth error code is already sanitized (printable ASCII, truncated) and
            // tells the workload's operator why; nothing else about the source is shown.
            let reason = match &e {
                IdentityError::OAuth { code, .. } => {
                    format!("robin: workload identity unavailable: token endpoint error {code}\n")
                }
                _ => "robin: workload identity unavailable\n".to_owned(),
            };
            return Err(text(StatusCode::SERVICE_UNAVAILABLE, reason));
        }
    };
    if let Some(expected) = &rule.cfg.audience
        && let Err(m) = check_audience(&token, expected)
    {
        rule.stats
            .audience_mismatches
            .fetch_add(1, Ordering::Relaxed);
        warn!(rule = %rule.label, expected = %m.expected, found = %m.found, "token audience mismatch, answering 503");
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "robin: audience mismatch\n",
        ));
    }
    HeaderValue::from_str(&rule.cfg.format.render(token.expose())).map_err(|_| {
        // Unreachable for a parsed token and a validated format; refuse rather than guess.
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "robin: workload identity unavailable\n",
        )
    })
}

async fn forward(ctx: &ConnCtx, route: Route, mut req: Request<Incoming>) -> Response<Body> {
    let downstream_h1 = req.version() < Version::HTTP_2;
    // Hop-by-hop headers go first: a `Connection` option naming the credential header must not
    // remove the injected value.
    let upgrade = downstream_h1 && wants_upgrade(req.headers());
    strip_hop_by_hop(req.headers_mut(), upgrade);
    if let Some(rule) = &route.rule {
        match credential(ctx, rule).await {
            Ok(value) => set_credential(req.headers_mut(), &rule.cfg.header, value),
            Err(resp) => return resp,
        }
    }
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let upstream = Upstream::new(route.target, ctx.pool.clone());
    let mut resp = match send(ctx, &upstream, &route.scheme, route.authority, upgrade, req).await {
        Ok(r) => r,
        Err(resp) => return *resp,
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

/// Sends `req` on a checked-out upstream connection, with the one redial rule of
/// [`Upstream::send`]; every failure is Robin's own answer.
async fn send(
    ctx: &ConnCtx,
    upstream: &Upstream,
    scheme: &Scheme,
    authority: Authority,
    upgrade: bool,
    mut req: Request<Incoming>,
) -> Result<Response<UpstreamBody>, Box<Response<Body>>> {
    let unavailable = |e: UpstreamError| {
        ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, "upstream unavailable, answering 502");
        Box::new(text(
            StatusCode::BAD_GATEWAY,
            "robin: upstream unavailable\n",
        ))
    };
    let mut checkout = upstream.checkout().await.map_err(unavailable)?;
    let mut redialled = false;
    loop {
        if upgrade && checkout.proto() == Proto::H2 {
            return Err(Box::new(text(
                StatusCode::BAD_GATEWAY,
                "robin: upstream cannot upgrade over h2\n",
            )));
        }
        fit_to(&mut req, checkout.proto(), scheme, authority.clone())?;
        match upstream.send(checkout, req).await {
            Ok(r) => return Ok(r),
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
                checkout = upstream.dial().await.map_err(unavailable)?;
            }
            Err(SendError::Unsent(_)) => {
                ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                warn!("upstream connection closed before the request was written, answering 502");
                return Err(Box::new(text(
                    StatusCode::BAD_GATEWAY,
                    "robin: upstream request failed\n",
                )));
            }
            Err(SendError::Failed(e)) if e.is_request_body() => {
                // The workload's own body was malformed (e.g. bad chunking): its fault, and the
                // connection's framing is lost, so close it.
                warn!(error = %e, "request body failed, answering 400");
                let mut r = text(StatusCode::BAD_REQUEST, "robin: malformed request body\n");
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                return Err(Box::new(r));
            }
            Err(SendError::Failed(e)) => {
                ctx.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "upstream request failed, answering 502");
                return Err(Box::new(text(
                    StatusCode::BAD_GATEWAY,
                    "robin: upstream request failed\n",
                )));
            }
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
