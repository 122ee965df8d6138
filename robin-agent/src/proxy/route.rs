//! Per-request routing: which rule's token (if any) a request carries and where it goes.
//!
//! A token only ever travels to a peer that proved it is the ruled host, or to an address the
//! rule explicitly allows in cleartext:
//! - TLS the workload opened for a ruled SNI: to the dialled address over TLS verified for that
//!   SNI, injected when the request's host is covered by the rule.
//! - Plain HTTP: each request is routed on its own host (hyper's parse, never a sniffed guess).
//!   A ruled host is originated over TLS to the dialled IP on the rule's `upstream_tls_port`,
//!   verified for the host; with `plaintext.allow_cidrs` it goes in cleartext to a dialled IP in
//!   those prefixes and is refused (421) elsewhere. Any other host goes to the dialled address
//!   unchanged, without a token.
//! - A forward proxy's request (`robin gateway`, absolute-form `http://host/...`): as plain
//!   HTTP, with the "dialled address" being what the gateway resolved the target's host to.
//! - Fixed (`robin proxy`): every request goes to the one configured upstream with its rule's
//!   token, whatever host the workload named; the upstream is told its own authority.
use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use http::{
    HeaderMap, Uri, Version,
    header::HOST,
    uri::{Authority, Scheme},
};

use tokio::sync::watch;

use super::{Rule, upstream::Target};
use crate::{capture::OrigDst, config::normalize_host, tls::upstream::Alpn};

/// How the requests of one connection are routed.
pub enum Routes {
    /// TLS terminated for `rule`, whose pattern matched the SNI `name`.
    Tls {
        rule: Arc<Rule>,
        name: String,
        alpn: Alpn,
        orig: OrigDst,
    },
    /// Plain HTTP to `orig`; every rule may apply, request by request.
    Plain {
        rules: Arc<[Arc<Rule>]>,
        orig: OrigDst,
    },
    /// A forward proxy's absolute-form requests: each to its own target, resolved by
    /// `resolver`, then routed as plain HTTP to that address.
    Forward {
        rules: Arc<[Arc<Rule>]>,
        resolver: Arc<dyn Resolve>,
    },
    /// Every request to one configured upstream.
    Fixed(Arc<FixedUpstream>),
}

/// The one upstream of `robin proxy`, and the rule whose token every request carries.
#[derive(Debug)]
pub struct FixedUpstream {
    pub rule: Arc<Rule>,
    pub scheme: Scheme,
    /// Sent as the upstream request's Host (or `:authority`).
    pub authority: Authority,
    /// The name the upstream's certificate is verified for; `None` for plain `http`.
    pub tls_name: Option<String>,
    /// The upstream's current address; whoever resolves its name keeps it up to date.
    pub dst: watch::Receiver<SocketAddr>,
}

/// Turns a request target's host and port into the address a forward proxy connects to, or
/// refuses it (unresolvable, or an address the operator did not allow).
pub trait Resolve: Send + Sync {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = Result<SocketAddr, Refusal>> + Send + 'a>>;
}

/// Where one request goes, and with whose token.
pub struct Route {
    /// Inject this rule's credential.
    pub rule: Option<Arc<Rule>>,
    pub target: Target,
    pub scheme: Scheme,
    /// The host (and port) the upstream is asked for.
    pub authority: Authority,
}

/// Why a request is answered by Robin without being forwarded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("invalid host")]
    InvalidHost,
    /// Several Host headers, or a Host that differs from the request target's authority: a
    /// smuggling shape, never guessed at.
    #[error("conflicting host")]
    ConflictingHost,
    /// A ruled host whose plaintext prefixes do not hold the dialled address.
    #[error("{host} is not allowed in plaintext to {dst}")]
    PlaintextRefused { host: String, dst: OrigDst },
    /// A forward proxy's request without an absolute `http://` target.
    #[error("not an absolute http:// target")]
    NotAbsolute,
    /// A forward proxy's target host that does not resolve.
    #[error("{0} does not resolve")]
    Unresolvable(String),
    /// A forward proxy's target the operator did not allow (loopback, link-local, ...).
    #[error("{host} resolves to {ip}, which is not allowed")]
    DestinationDenied { host: String, ip: std::net::IpAddr },
}

/// The request's host as sent: the target's authority (absolute form, h2 `:authority`) or the
/// one Host header; both present must agree.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Result<Option<&'a str>, Refusal> {
    let mut hosts = headers.get_all(HOST).iter();
    let header = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(h), None) => Some(h.to_str().map_err(|_| Refusal::InvalidHost)?),
        (Some(_), Some(_)) => return Err(Refusal::ConflictingHost),
    };
    match (uri.authority().map(Authority::as_str), header) {
        (Some(a), Some(h)) if normalize_host(a) != normalize_host(h) => {
            Err(Refusal::ConflictingHost)
        }
        (Some(a), _) => Ok(Some(a)),
        (None, h) => Ok(h),
    }
}

impl Routes {
    /// `version`: the workload's HTTP version; an h2 request is originated offering h2 too
    /// (gRPC servers often speak nothing else).
    pub async fn route(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        version: Version,
    ) -> Result<Route, Refusal> {
        let host = request_host(uri, headers)?;
        match self {
            Self::Tls {
                rule,
                name,
                alpn,
                orig,
            } => tls_route(rule, name, *alpn, *orig, host),
            Self::Plain { rules, orig } => plain_route(rules, *orig, host, version),
            Self::Forward { rules, resolver } => {
                let orig = forward_target(uri, resolver.as_ref()).await?;
                plain_route(rules, orig, host, version)
            }
            Self::Fixed(fixed) => Ok(fixed_route(fixed, version)),
        }
    }

    /// Whether the workload's Host is replaced by the route's authority: with a fixed
    /// upstream the workload addressed Robin (`127.0.0.1:4000`), not the upstream.
    pub fn rewrites_host(&self) -> bool {
        matches!(self, Self::Fixed(_))
    }
}

fn fixed_route(fixed: &FixedUpstream, version: Version) -> Route {
    let alpn = if version == Version::HTTP_2 && fixed.tls_name.is_some() {
        Alpn::H2
    } else {
        Alpn::Http1
    };
    Route {
        rule: Some(fixed.rule.clone()),
        target: Target {
            dst: OrigDst(*fixed.dst.borrow()),
            tls_name: fixed.tls_name.clone(),
            alpn,
        },
        scheme: fixed.scheme.clone(),
        authority: fixed.authority.clone(),
    }
}

/// Where a forward proxy's request goes: its absolute `http://` target, resolved. Anything
/// else (origin form, `https://` which a client must CONNECT for) is refused.
async fn forward_target(uri: &Uri, resolver: &dyn Resolve) -> Result<OrigDst, Refusal> {
    let authority = match (uri.scheme(), uri.authority()) {
        (Some(s), Some(a)) if *s == Scheme::HTTP => a,
        _ => return Err(Refusal::NotAbsolute),
    };
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    resolver.resolve(host, port).await.map(OrigDst)
}

/// A request on a connection whose TLS was terminated for `rule` (SNI `name`).
fn tls_route(
    rule: &Arc<Rule>,
    name: &str,
    alpn: Alpn,
    orig: OrigDst,
    host: Option<&str>,
) -> Result<Route, Refusal> {
    // Without a host, only the verified SNI vouches for the destination.
    let inject = host.is_none_or(|h| rule.cfg.matches(&normalize_host(h)));
    Ok(Route {
        rule: inject.then(|| rule.clone()),
        target: Target {
            dst: orig,
            tls_name: Some(name.to_owned()),
            alpn,
        },
        scheme: Scheme::HTTPS,
        authority: parse_authority(host.unwrap_or(name))?,
    })
}

/// A plain-HTTP request: the first rule matching its host, if any, decides.
fn plain_route(
    rules: &[Arc<Rule>],
    orig: OrigDst,
    host: Option<&str>,
    version: Version,
) -> Result<Route, Refusal> {
    let normalized = host.map(normalize_host);
    let rule = normalized
        .as_deref()
        .and_then(|h| rules.iter().find(|r| r.cfg.matches(h)));
    let authority = match host {
        Some(h) => parse_authority(h)?,
        None => parse_authority(&orig.0.to_string())?,
    };
    match (rule, normalized) {
        (Some(rule), Some(name)) => {
            let alpn = if version == Version::HTTP_2 {
                Alpn::H2
            } else {
                Alpn::Http1
            };
            plain_ruled(rule, name.into_owned(), orig, authority, alpn)
        }
        _ => Ok(Route {
            rule: None,
            target: plain_target(orig),
            scheme: Scheme::HTTP,
            authority,
        }),
    }
}

/// A plain-HTTP request for a ruled host: cleartext only where the rule allows the dialled
/// address, else TLS originated to that address, verified for the host.
fn plain_ruled(
    rule: &Arc<Rule>,
    name: String,
    orig: OrigDst,
    authority: Authority,
    alpn: Alpn,
) -> Result<Route, Refusal> {
    if rule.cfg.plaintext.is_some() {
        if !rule.cfg.plaintext_allows(orig.0.ip()) {
            return Err(Refusal::PlaintextRefused {
                host: name,
                dst: orig,
            });
        }
        return Ok(Route {
            rule: Some(rule.clone()),
            target: plain_target(orig),
            scheme: Scheme::HTTP,
            authority,
        });
    }
    let dst = OrigDst(std::net::SocketAddr::new(
        orig.0.ip(),
        rule.cfg.upstream_tls_port,
    ));
    Ok(Route {
        rule: Some(rule.clone()),
        target: Target {
            dst,
            tls_name: Some(name),
            alpn,
        },
        scheme: Scheme::HTTPS,
        authority,
    })
}

fn plain_target(orig: OrigDst) -> Target {
    Target {
        dst: orig,
        tls_name: None,
        alpn: Alpn::Http1,
    }
}

fn parse_authority(raw: &str) -> Result<Authority, Refusal> {
    raw.parse().map_err(|_| Refusal::InvalidHost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn host(uri: &str, hosts: &[&str]) -> Result<Option<String>, Refusal> {
        let mut h = HeaderMap::new();
        for v in hosts {
            h.append(HOST, HeaderValue::from_str(v).unwrap());
        }
        request_host(&uri.parse().unwrap(), &h).map(|host| host.map(str::to_owned))
    }

    #[test]
    fn host_comes_from_the_target_or_the_one_host_header() {
        assert_eq!(host("/x", &["a.test"]), Ok(Some("a.test".into())));
        assert_eq!(host("http://a.test/x", &[]), Ok(Some("a.test".into())));
        assert_eq!(
            host("http://A.test:80/x", &["a.test"]),
            Ok(Some("A.test:80".into()))
        );
        assert_eq!(host("/x", &[]), Ok(None));
        assert_eq!(
            host("/x", &["a.test", "a.test"]),
            Err(Refusal::ConflictingHost)
        );
        assert_eq!(
            host("http://b.test/", &["a.test"]),
            Err(Refusal::ConflictingHost)
        );
    }
}
