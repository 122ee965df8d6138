//! Header surgery on forwarded messages: the injected credential and hop-by-hop headers.
use std::sync::Mutex;

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE},
};

use crate::secret::Token;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Replaces every instance of `name` (header names are case-insensitive, so the map already
/// folds case) with exactly one `value`, marked sensitive so HPACK never indexes it.
pub fn set_credential(headers: &mut HeaderMap, name: &HeaderName, mut value: HeaderValue) {
    value.set_sensitive(true);
    // `insert` drops every existing value for the name.
    headers.insert(name.clone(), value);
}

/// A rule's last credential header value and the token it was made from. A request whose
/// token is that token (sources hand out clones of what they cached, so this is mostly a
/// pointer comparison) reuses the value: rendering, header validation and the audience check's
/// JWT parse, each a pass over a token of about 1 KiB, are paid once per token instead of once
/// per request. Only a value that passed every check is kept; a failure is recomputed (and
/// counted) on every request.
#[derive(Default)]
pub struct RenderedCredential(Mutex<Option<(Token, HeaderValue)>>);

impl RenderedCredential {
    /// The value made from `token`, when it is the one kept.
    pub fn get(&self, token: &Token) -> Option<HeaderValue> {
        let kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        kept.as_ref()
            .filter(|(t, _)| t == token)
            .map(|(_, value)| value.clone())
    }

    /// Keeps `value` as the one made from `token`, replacing the previous token's.
    pub fn keep(&self, token: Token, value: HeaderValue) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((token, value));
    }
}

/// Says whether a value is kept, never the value.
impl std::fmt::Debug for RenderedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `try_lock`: formatting must not wait on (or deadlock with) a request.
        let kept = self.0.try_lock().ok().map(|k| k.is_some());
        f.debug_struct("RenderedCredential")
            .field("kept", &kept)
            .finish()
    }
}

/// True when `Connection` lists `upgrade` and an `Upgrade` header names a protocol other than
/// `h2c` (HTTP/1.1 only). An h2c upgrade (RFC 7540 §3.2, dropped by RFC 9113) is not relayed:
/// it would turn the rest of the connection into h2 frames Robin passes as opaque bytes, so the
/// request is forwarded as plain HTTP/1.1 and the server answers it as such.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let protocols = headers
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_ascii_lowercase())
        .filter(|p| !p.is_empty());
    let mut any = false;
    let mut only_h2c = true;
    for p in protocols {
        any = true;
        only_h2c &= p == "h2c";
    }
    any && !only_h2c && connection_tokens(headers).any(|t| t == "upgrade")
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named in `Connection`, `Connection`
/// itself, `Keep-Alive`, `Proxy-*`, `Transfer-Encoding`, `TE` unless it is exactly `trailers`
/// (gRPC needs it end to end), and `Upgrade`. When `upgrade` is set, the message is an upgrade
/// handshake being relayed, so `Connection: upgrade` and `Upgrade` are rebuilt as the only
/// connection options.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if !upgrade && !headers.keys().any(may_be_hop_by_hop) {
        return;
    }
    let named: Vec<String> = connection_tokens(headers).collect();
    for name in named {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes())
            && !(upgrade && name == UPGRADE)
        {
            headers.remove(name);
        }
    }
    headers.remove(CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(TRANSFER_ENCODING);
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for k in proxy {
        headers.remove(k);
    }
    let te_trailers = headers.get_all(TE).iter().count() == 1
        && headers
            .get(TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(TE);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// A name the stripping below acts on, whatever its value. Most messages carry none: one pass
/// over their names then costs less than the eight hashed lookups the full strip makes. A name
/// listed in `Connection` is only hop-by-hop when `Connection` itself is present.
fn may_be_hop_by_hop(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "connection" | "keep-alive" | "transfer-encoding" | "te" | "upgrade"
    ) || name.starts_with("proxy-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn credential_replaces_all_instances() {
        let mut h = map(&[
            ("Authorization", "placeholder"),
            ("authorization", "second"),
            ("x-other", "1"),
        ]);
        let name = HeaderName::from_static("authorization");
        set_credential(&mut h, &name, HeaderValue::from_static("Bearer t"));
        let all: Vec<_> = h.get_all(&name).iter().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0], "Bearer t");
        assert!(all[0].is_sensitive());
        assert_eq!(h.get("x-other").unwrap(), "1");
    }

    #[test]
    fn a_credential_is_reused_for_its_own_token_only() {
        let rendered = RenderedCredential::default();
        let first = Token::parse("first").unwrap();
        assert!(rendered.get(&first).is_none(), "nothing kept yet");
        rendered.keep(first.clone(), HeaderValue::from_static("Bearer first"));
        assert_eq!(rendered.get(&first).unwrap(), "Bearer first");
        // The same value read again (another allocation) is the same token.
        assert_eq!(
            rendered.get(&Token::parse("first\n").unwrap()).unwrap(),
            "Bearer first"
        );
        let second = Token::parse("second").unwrap();
        assert!(
            rendered.get(&second).is_none(),
            "a rotated token is rendered anew"
        );
        rendered.keep(second.clone(), HeaderValue::from_static("Bearer second"));
        assert!(
            rendered.get(&first).is_none(),
            "only the latest token is kept"
        );
        assert_eq!(rendered.get(&second).unwrap(), "Bearer second");
    }

    #[test]
    fn strips_hop_by_hop() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Custom"),
            ("keep-alive", "timeout=5"),
            ("x-custom", "1"),
            ("proxy-authorization", "secret"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("content-length", "3"),
            ("x-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["content-length", "x-end"]);
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_as_it_is() {
        let pairs = [
            ("host", "api.example"),
            ("authorization", "Bearer t"),
            ("x-connection", "keep-alive"),
            ("accept", "*/*"),
        ];
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, map(&pairs));
        // One hop-by-hop name anywhere takes the message through the whole strip.
        let mut h = map(&[("x-a", "1"), ("connection", "x-a"), ("x-b", "2")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-b"]);
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_handshake() {
        let mut h = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get(TE).unwrap(), "trailers");

        let mut h = map(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get("sec-websocket-key").unwrap(), "k");
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
        // An h2c upgrade is answered as plain HTTP/1.1: nothing of it goes upstream.
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        assert!(!wants_upgrade(&h));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }
}
