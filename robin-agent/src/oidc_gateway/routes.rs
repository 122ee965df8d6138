//! The inbound side: routing, conditional requests, cache headers, HEAD.
use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode,
    header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_NONE_MATCH, WARNING},
};
use http_body_util::Full;

use super::{
    cache::{Cache, Document, Lookup},
    metrics,
};

/// Says where a response came from: `hit`, `miss` or `stale`.
pub const X_ROBIN_CACHE: &str = "x-robin-cache";
/// RFC 7234 warn-code 110, still what most clients and proxies recognize.
pub const STALE_WARNING: &str = "110 - \"Response is Stale\"";

enum Route {
    Healthz,
    Readyz,
    Metrics,
    Document(Document),
}

pub async fn handle<B>(cache: &Cache, request: Request<B>) -> Response<Full<Bytes>> {
    let route = match request.uri().path() {
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        "/metrics" => Route::Metrics,
        path => match Document::from_path(path) {
            Some(doc) => Route::Document(doc),
            None => return text(StatusCode::NOT_FOUND, "not found\n", false),
        },
    };
    let head = request.method() == Method::HEAD;
    if !head && request.method() != Method::GET {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n",
            false,
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match route {
        Route::Healthz => text(StatusCode::OK, "ok\n", head),
        Route::Readyz if cache.is_ready() => text(StatusCode::OK, "ready\n", head),
        Route::Readyz => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "documents not fetched yet\n",
            head,
        ),
        Route::Metrics => {
            let body = cache.metrics.render(cache.is_ready());
            with_body(
                Response::builder()
                    .status(StatusCode::OK)
                    .header(CONTENT_TYPE, metrics::CONTENT_TYPE),
                Bytes::from(body),
                head,
            )
        }
        Route::Document(doc) => document(cache, doc, request.headers(), head).await,
    }
}

async fn document(
    cache: &Cache,
    doc: Document,
    headers: &HeaderMap,
    head: bool,
) -> Response<Full<Bytes>> {
    let (entry, source) = match cache.get(doc).await {
        Lookup::Hit(e) => (e, "hit"),
        Lookup::Miss(e) => (e, "miss"),
        Lookup::Stale(e) => (e, "stale"),
        Lookup::Unavailable => {
            return text(StatusCode::BAD_GATEWAY, "upstream unavailable\n", head);
        }
    };
    let stale = source == "stale";
    // A stale copy should not be kept downstream: brokers come back soon and get the fresh one.
    let max_age = if stale { 0 } else { cache.ttl().as_secs() };
    let mut builder = Response::builder()
        .header(ETAG, &entry.etag)
        .header(CACHE_CONTROL, format!("public, max-age={max_age}"))
        .header(X_ROBIN_CACHE, source);
    if stale {
        builder = builder.header(WARNING, STALE_WARNING);
    }
    if none_match(headers, &entry.etag) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Full::default())
            .expect("static response parts are valid");
    }
    with_body(
        builder
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, doc.content_type()),
        entry.body.clone(),
        head,
    )
}

/// `If-None-Match` uses the weak comparison (RFC 9110 §13.1.2): `W/` prefixes are ignored.
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

fn text(status: StatusCode, body: &'static str, head: bool) -> Response<Full<Bytes>> {
    with_body(
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(CACHE_CONTROL, "no-store"),
        Bytes::from_static(body.as_bytes()),
        head,
    )
}

/// HEAD gets the same headers, `Content-Length` included, and no body.
fn with_body(builder: http::response::Builder, body: Bytes, head: bool) -> Response<Full<Bytes>> {
    let builder = builder.header(CONTENT_LENGTH, body.len());
    let body = if head { Bytes::new() } else { body };
    builder
        .body(Full::new(body))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn if_none_match_lists_weak_and_wildcard() {
        let tag = "\"00112233aabbccdd\"";
        assert!(none_match(&headers(tag), tag));
        assert!(none_match(&headers(&format!("\"x\", W/{tag}")), tag));
        assert!(none_match(&headers("*"), tag));
        assert!(!none_match(&headers("\"00112233aabbccde\""), tag));
        assert!(!none_match(&HeaderMap::new(), tag));
    }
}
