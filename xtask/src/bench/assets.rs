//! Peer configurations and client scripts, kept as files under `bench/assets/` and filled in
//! with `@NAME@` placeholders (a syntax none of nginx, haproxy, YAML, squid or Python uses).
use anyhow::bail;

pub const NGINX_UPSTREAM: &str = include_str!("../../../bench/assets/nginx-upstream.conf");
pub const NGINX_PEER: &str = include_str!("../../../bench/assets/nginx-peer.conf");
pub const NGINX_CAPTURE: &str = include_str!("../../../bench/assets/nginx-capture.conf");
pub const HAPROXY: &str = include_str!("../../../bench/assets/haproxy.cfg");
pub const ENVOY: &str = include_str!("../../../bench/assets/envoy.yaml");
pub const SQUID: &str = include_str!("../../../bench/assets/squid.conf");
pub const MITM_INJECT: &str = include_str!("../../../bench/assets/mitm-inject.py");
pub const ROBIN: &str = include_str!("../../../bench/assets/robin.toml");
pub const IDLE_CONNS_PY: &str = include_str!("../../../bench/assets/idle_conns.py");
pub const MINT_PY: &str = include_str!("../../../bench/assets/mint.py");
/// The injected credential: shaped and sized as a projected ServiceAccount token (a 1,088-byte
/// RS256 JWT with `aud`, `kubernetes.io` and the other claims the kubelet's tokens carry; the
/// signature is random bytes, nothing verifies it). A short placeholder would hide what a
/// proxy pays per request for a real token's size.
pub const TOKEN: &str = include_str!("../../../bench/assets/token.jwt");

/// Replaces every `@NAME@` in `template` by its value; a placeholder left without a value is
/// an error, so a renamed variable cannot reach a peer as literal text.
pub fn fill(template: &str, vars: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut out = template.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("@{name}@"), value);
    }
    if let Some(left) = placeholder(&out) {
        bail!("asset placeholder @{left}@ has no value");
    }
    Ok(out)
}

/// The first `@NAME@` (upper case, digits, `_`) in `text`.
fn placeholder(text: &str) -> Option<&str> {
    let mut rest = text;
    while let Some(start) = rest.find('@') {
        let after = &rest[start + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        if len > 0 && after[len..].starts_with('@') {
            return Some(&after[..len]);
        }
        rest = after;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_every_occurrence() {
        let out = fill(
            "listen @IP@:@PORT@; # @IP@",
            &[("IP", "1.2.3.4"), ("PORT", "80")],
        )
        .unwrap();
        assert_eq!(out, "listen 1.2.3.4:80; # 1.2.3.4");
    }

    #[test]
    fn a_placeholder_without_value_is_an_error() {
        let err = fill("a @KNOWN@ b @MISSING@", &[("KNOWN", "x")]).unwrap_err();
        assert!(err.to_string().contains("@MISSING@"), "{err}");
    }

    #[test]
    fn other_at_signs_are_left_alone() {
        // Envoy's "@type" and a mail address are not placeholders.
        let text = "\"@type\": x # root@example.org";
        assert_eq!(fill(text, &[]).unwrap(), text);
    }

    #[test]
    fn python_scripts_have_no_placeholders() {
        assert!(placeholder(IDLE_CONNS_PY).is_none());
        assert!(placeholder(MINT_PY).is_none());
    }
}
