//! The agent's configuration: a TOML file whose scalars can be overridden by `ROBIN_*`
//! environment variables and by flags (flags > env > file), validated once at start-up.
//!
//! Host patterns: `broker.example.com` matches exactly; `*.api.example.com` matches exactly one
//! extra leftmost label (`a.api.example.com`, not `api.example.com` nor `a.b.api.example.com`),
//! as TLS wildcard certificates do.
use std::{
    borrow::Cow,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use http::HeaderName;
use serde::Deserialize;

use crate::{
    identity::SourceConfig,
    tls::{CertAuthority, TlsError},
};

pub const ENV_CONFIG: &str = "ROBIN_CONFIG";
pub const ENV_CA_CERT: &str = "ROBIN_CA_CERT";
pub const ENV_CA_KEY: &str = "ROBIN_CA_KEY";
pub const ENV_UPSTREAM_ROOTS: &str = "ROBIN_UPSTREAM_ROOTS";
pub const ENV_CAPTURE_PORTS: &str = "ROBIN_CAPTURE_PORTS";
pub const ENV_LISTENER_PORT: &str = "ROBIN_LISTENER_PORT";
pub const ENV_MAX_CONNECTIONS: &str = "ROBIN_MAX_CONNECTIONS";

pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
pub const DEFAULT_HEADER: &str = "Authorization";
pub const DEFAULT_FORMAT: &str = "Bearer {token}";
/// Port a plain-HTTP request for a ruled host is originated over TLS to (`upstream_tls_port`).
pub const DEFAULT_UPSTREAM_TLS_PORT: u16 = 443;
const PLACEHOLDER: &str = "{token}";

/// Headers a rule may not set: framing, routing and hop-by-hop headers.
const DENIED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "keep-alive",
    "proxy-connection",
];

/// Flags, each with its environment variable (clap's `env` feature gives flags > env).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long = "config", env = ENV_CONFIG, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PEM certificate of the CA that signs minted leaves.
    #[arg(long, env = ENV_CA_CERT, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// PEM PKCS#8 private key of that CA.
    #[arg(long, env = ENV_CA_KEY, value_name = "FILE")]
    pub ca_key: Option<PathBuf>,
    /// Extra PEM roots trusted upstream, in addition to the system roots.
    #[arg(long, env = ENV_UPSTREAM_ROOTS, value_name = "FILE")]
    pub upstream_roots: Option<PathBuf>,
    /// Destination ports to capture, comma-separated.
    #[arg(long, env = ENV_CAPTURE_PORTS, value_delimiter = ',', value_name = "PORTS")]
    pub capture_ports: Option<Vec<u16>>,
    /// Port of the proxy listener; 0 picks a free one.
    #[arg(long, env = ENV_LISTENER_PORT, value_name = "PORT")]
    pub listener_port: Option<u16>,
    /// Most client connections served at once; beyond it the newest idle ones are shed.
    /// Default: derived from the descriptor limit.
    #[arg(long, env = ENV_MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("{key}: {source}")]
    Ca {
        key: &'static str,
        #[source]
        source: TlsError,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

// ---- the file, as written ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    capture: RawCapture,
    #[serde(default)]
    inject: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
    upstream_roots: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    ports: Option<Vec<u16>>,
    listener_port: Option<u16>,
    max_connections: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    hosts: Vec<String>,
    source: SourceConfig,
    header: Option<String>,
    format: Option<String>,
    upstream_tls_port: Option<u16>,
    plaintext: Option<RawPlaintext>,
    expect_audience: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlaintext {
    allow_cidrs: Vec<String>,
}

// ---- the validated config ----

#[derive(Clone, Debug)]
pub struct Config {
    pub tls: TlsSettings,
    pub capture: CaptureSettings,
    pub inject: Vec<InjectRule>,
}

/// Paths plus the loaded CA. `Debug` shows paths only; the CA's own `Debug` redacts its key.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub upstream_roots: Option<PathBuf>,
    pub ca: Arc<CertAuthority>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSettings {
    pub ports: Vec<u16>,
    /// 0 = pick a free port.
    pub listener_port: u16,
    /// Cap on client connections; `None`: derived from `RLIMIT_NOFILE` (see `conns`).
    pub max_connections: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectRule {
    pub hosts: Vec<HostPattern>,
    pub source: SourceConfig,
    /// Lower-case, validated.
    pub header: HeaderName,
    pub format: TokenFormat,
    /// Where a plain-HTTP request for a ruled host is sent over TLS (on the dialled IP).
    pub upstream_tls_port: u16,
    /// `Some`: inject over plain HTTP, but only to dialled IPs in these prefixes (and never
    /// originate TLS for this rule).
    pub plaintext: Option<Vec<Cidr>>,
    /// The `aud` a JWT must carry to be injected: `expect_audience`, else the source's own.
    pub audience: Option<String>,
}

impl InjectRule {
    pub fn matches(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| p.matches(host))
    }

    /// Whether plain HTTP may carry this rule's token to `ip` (the dialled address).
    pub fn plaintext_allows(&self, ip: IpAddr) -> bool {
        self.plaintext
            .as_ref()
            .is_some_and(|cidrs| cidrs.iter().any(|c| c.contains(ip)))
    }

    /// A short label for logs: the first host pattern.
    pub fn label(&self) -> String {
        self.hosts
            .first()
            .map(|h| h.to_string())
            .unwrap_or_default()
    }
}

/// A lower-case host name, or `*.` followed by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// `*.suffix`, stored without the `*.`.
    Wildcard(String),
}

impl HostPattern {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let host = raw.trim().to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host);
        let (wild, rest) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host),
        };
        if rest.contains('*') || host == "*" {
            return Err(format!(
                "{raw:?}: a wildcard must be a whole leftmost label, as in \"*.example.com\""
            ));
        }
        if !crate::tls::mint::is_dns_name(rest) {
            return Err(format!("{raw:?} is not a valid host name"));
        }
        Ok(if wild {
            Self::Wildcard(rest.to_owned())
        } else {
            Self::Exact(rest.to_owned())
        })
    }

    /// `host` must already be lower-case without port or trailing dot (see [`normalize_host`]).
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h == host,
            Self::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .and_then(|l| l.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(h) => f.write_str(h),
            Self::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// Lower-cases a Host/SNI value and removes a port and a trailing dot. Borrows when the value
/// needs no lower-casing, as nearly every client sends it: this runs on every request.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let raw = raw.trim();
    let host = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => return Cow::Owned(format!("{}]", raw.to_ascii_lowercase())),
        }
    } else {
        raw.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(raw, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// An address prefix, `10.0.0.0/8` or `fd00::/8`. IPv4-mapped IPv6 addresses match IPv4
/// prefixes (a dual-stack socket reports an IPv4 peer that way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (addr, len) = raw
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{raw:?} is not a prefix like \"10.0.0.0/8\""))?;
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{raw:?}: {addr:?} is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{raw:?}: prefix length must be 0..={max}"))?;
        let cidr = Self { net, len };
        if cidr.mask(net) != net {
            return Err(format!(
                "{raw:?} has host bits set (did you mean {}/{len}?)",
                cidr.mask(net)
            ));
        }
        Ok(cidr)
    }

    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & m).into())
            }
            IpAddr::V6(v6) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & m).into())
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && self.mask(ip) == self.net
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

/// `format` split around its single `{token}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFormat {
    pub prefix: String,
    pub suffix: String,
}

impl TokenFormat {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut parts = raw.split(PLACEHOLDER);
        let (Some(prefix), Some(suffix), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("must contain {PLACEHOLDER} exactly once"));
        };
        if let Some(b) = raw
            .bytes()
            .find(|&b| !(b == b'\t' || (0x20..0x7f).contains(&b)))
        {
            return Err(format!(
                "contains byte 0x{b:02x}, not allowed in a header value"
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    /// The header value for `token`. Tokens are token68 (see `Token::parse`) and the format was
    /// checked, so the result is always a valid header value.
    pub fn render(&self, token: &str) -> String {
        let mut v = String::with_capacity(self.prefix.len() + token.len() + self.suffix.len());
        v.push_str(&self.prefix);
        v.push_str(token);
        v.push_str(&self.suffix);
        v
    }
}

fn parse_header(raw: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(raw.as_bytes())
        .map_err(|_| format!("{raw:?} is not a valid header name"))?;
    if DENIED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("proxy-") {
        return Err(format!(
            "{raw:?} controls framing or routing and cannot be set"
        ));
    }
    Ok(name)
}

/// Loads the file named by `--config`/`ROBIN_CONFIG` (if any), applies overrides, validates, and
/// loads the CA.
pub fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
    let text = match &args.config {
        Some(path) => {
            Some(std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.clone(), e))?)
        }
        None => None,
    };
    let path = args.config.as_deref().unwrap_or(Path::new("<none>"));
    from_toml(text.as_deref().unwrap_or(""), path, args)
}

/// As [`load`], from TOML text; `path` only labels errors.
pub fn from_toml(text: &str, path: &Path, args: &ConfigArgs) -> Result<Config, ConfigError> {
    let raw = parse_raw(text, path)?;
    // Validation order is part of the contract: the first bad key is the one reported.
    let tls = tls_settings(raw.tls, args)?;
    let capture = capture_settings(raw.capture, args)?;
    let inject = raw
        .inject
        .into_iter()
        .enumerate()
        .map(|(i, rule)| inject_rule(i, rule))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Config {
        tls,
        capture,
        inject,
    })
}

fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        // toml's message spans several lines with a source excerpt; keep the first.
        let msg = e.message().lines().next().unwrap_or_default().to_owned();
        let at = e
            .span()
            .map(|s| line_of(text, s.start))
            .map(|l| format!(" (line {l})"))
            .unwrap_or_default();
        ConfigError::Parse(path.to_owned(), format!("{msg}{at}"))
    })
}

/// CLI/env overrides win over the file; the CA is loaded here so a bad one fails at startup.
fn tls_settings(raw: RawTls, args: &ConfigArgs) -> Result<TlsSettings, ConfigError> {
    let ca_cert = args.ca_cert.clone().or(raw.ca_cert).ok_or_else(|| {
        invalid(
            "tls.ca_cert",
            format!("required (or --ca-cert / {ENV_CA_CERT})"),
        )
    })?;
    let ca_key = args.ca_key.clone().or(raw.ca_key).ok_or_else(|| {
        invalid(
            "tls.ca_key",
            format!("required (or --ca-key / {ENV_CA_KEY})"),
        )
    })?;
    let upstream_roots = args.upstream_roots.clone().or(raw.upstream_roots);
    if let Some(roots) = &upstream_roots {
        check_upstream_roots(roots)?;
    }
    let ca = CertAuthority::load(&ca_cert, &ca_key).map_err(|e| ConfigError::Ca {
        key: match e {
            TlsError::BadKey(..) | TlsError::KeyMismatch { .. } => "tls.ca_key",
            TlsError::Read(ref p, _) if *p == ca_key => "tls.ca_key",
            _ => "tls.ca_cert",
        },
        source: e,
    })?;
    Ok(TlsSettings {
        ca_cert,
        ca_key,
        upstream_roots,
        ca: Arc::new(ca),
    })
}

/// Parses the roots now (and drops them) so a bad bundle is a config error, not a
/// per-connection one.
fn check_upstream_roots(roots: &Path) -> Result<(), ConfigError> {
    let pem = std::fs::read(roots).map_err(|e| {
        invalid(
            "tls.upstream_roots",
            format!("reading {}: {e}", roots.display()),
        )
    })?;
    crate::tls::UpstreamTls::from_pem_roots(&pem).map_err(|e| ConfigError::Ca {
        key: "tls.upstream_roots",
        source: e,
    })?;
    Ok(())
}

fn capture_settings(raw: RawCapture, args: &ConfigArgs) -> Result<CaptureSettings, ConfigError> {
    let ports = args
        .capture_ports
        .clone()
        .or(raw.ports)
        .unwrap_or_else(|| DEFAULT_PORTS.to_vec());
    if ports.is_empty() || ports.contains(&0) {
        return Err(invalid(
            "capture.ports",
            "must list at least one port, none of them 0",
        ));
    }
    let listener_port = args.listener_port.or(raw.listener_port).unwrap_or(0);
    let max_connections = args.max_connections.or(raw.max_connections);
    if max_connections == Some(0) {
        return Err(invalid("capture.max_connections", "must be at least 1"));
    }
    Ok(CaptureSettings {
        ports,
        listener_port,
        max_connections,
    })
}

/// Validates `inject[i]`; errors name the rule by index so they point at the file.
fn inject_rule(i: usize, rule: RawRule) -> Result<InjectRule, ConfigError> {
    let key = |k: &str| format!("inject[{i}].{k}");
    if rule.hosts.is_empty() {
        return Err(invalid(key("hosts"), "must list at least one host"));
    }
    let hosts = rule
        .hosts
        .iter()
        .map(|h| HostPattern::parse(h))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|r| invalid(key("hosts"), r))?;
    let header = parse_header(rule.header.as_deref().unwrap_or(DEFAULT_HEADER))
        .map_err(|r| invalid(key("header"), r))?;
    let format = TokenFormat::parse(rule.format.as_deref().unwrap_or(DEFAULT_FORMAT))
        .map_err(|r| invalid(key("format"), r))?;
    let upstream_tls_port = match rule.upstream_tls_port {
        Some(0) => return Err(invalid(key("upstream_tls_port"), "must not be 0")),
        p => p.unwrap_or(DEFAULT_UPSTREAM_TLS_PORT),
    };
    let plaintext = rule
        .plaintext
        .map(|p| parse_cidrs(&p.allow_cidrs))
        .transpose()
        .map_err(|r| invalid(key("plaintext.allow_cidrs"), r))?;
    if rule.expect_audience.as_deref().is_some_and(str::is_empty) {
        return Err(invalid(key("expect_audience"), "must not be empty"));
    }
    // An explicit audience wins; otherwise the source's own audience (if it has one).
    let audience = rule
        .expect_audience
        .or_else(|| rule.source.audience().map(str::to_owned));
    Ok(InjectRule {
        hosts,
        source: rule.source,
        header,
        format,
        upstream_tls_port,
        plaintext,
        audience,
    })
}

fn parse_cidrs(raw: &[String]) -> Result<Vec<Cidr>, String> {
    if raw.is_empty() {
        return Err("must list at least one prefix (omit `plaintext` to allow none)".into());
    }
    raw.iter().map(|c| Cidr::parse(c)).collect()
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A scratch directory holding a test CA, removed on drop.
    struct Scratch(tempfile::TempDir);

    impl Scratch {
        fn new(name: &str) -> Self {
            let tmp = tempfile::Builder::new()
                .prefix(&format!("robin-config-{name}-"))
                .tempdir()
                .unwrap();
            let (cert, key) = crate::tls::tests::test_ca("Config CA");
            std::fs::write(tmp.path().join("ca.crt"), cert).unwrap();
            std::fs::write(tmp.path().join("ca.key"), key).unwrap();
            Self(tmp)
        }

        fn toml(&self, body: &str) -> String {
            format!(
                "[tls]\nca_cert = {:?}\nca_key = {:?}\n{body}",
                self.0.path().join("ca.crt"),
                self.0.path().join("ca.key")
            )
        }

        fn load(&self, body: &str) -> Result<Config, ConfigError> {
            from_toml(
                &self.toml(body),
                Path::new("t.toml"),
                &ConfigArgs::default(),
            )
        }
    }

    fn err_line(r: Result<Config, ConfigError>) -> String {
        let e = r.unwrap_err().to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    const RULE: &str = r#"
[[inject]]
hosts = ["Broker.Example.com", "*.api.example.com"]
source = { kind = "file", path = "/tok" }
"#;

    #[test]
    fn full_example_with_defaults() {
        let s = Scratch::new("full");
        let c = s.load(RULE).unwrap();
        assert_eq!(c.capture.ports, vec![80, 443]);
        assert_eq!(c.capture.listener_port, 0);
        let r = &c.inject[0];
        assert_eq!(r.header.as_str(), "authorization");
        assert_eq!(r.format.render("T"), "Bearer T");
        assert_eq!(r.hosts[0], HostPattern::Exact("broker.example.com".into()));
        assert_eq!(
            r.source,
            SourceConfig::File {
                path: "/tok".into()
            }
        );
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("PRIVATE KEY") && dbg.contains("<redacted>"));
    }

    #[test]
    fn unknown_keys_are_rejected_everywhere() {
        let s = Scratch::new("unknown");
        for body in [
            "extra = 1",
            "[capture]\nportz = [1]",
            "[[inject]]\nhosts=[\"a.b\"]\nsource={kind=\"file\",path=\"/t\"}\nheadr=\"x\"",
            "[[inject]]\nhosts=[\"a.b\"]\nsource={kind=\"file\",path=\"/t\",mode=1}",
        ] {
            let e = err_line(s.load(body));
            assert!(e.contains("unknown"), "{body}: {e}");
        }
        let e = err_line(from_toml(
            "[tls]\nca_certt = \"x\"",
            Path::new("t.toml"),
            &ConfigArgs::default(),
        ));
        assert!(e.contains("ca_certt") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn ca_problems_name_the_key() {
        let s = Scratch::new("ca");
        let missing = format!(
            "[tls]\nca_cert = {:?}\nca_key = {:?}\n",
            s.0.path().join("nope.crt"),
            s.0.path().join("ca.key")
        );
        let e = err_line(from_toml(&missing, Path::new("t"), &ConfigArgs::default()));
        assert!(e.starts_with("tls.ca_cert: reading"), "{e}");

        let (_, other_key) = crate::tls::tests::test_ca("Other");
        std::fs::write(s.0.path().join("other.key"), other_key).unwrap();
        let args = ConfigArgs {
            ca_key: Some(s.0.path().join("other.key")),
            ..Default::default()
        };
        let e = err_line(from_toml(&s.toml(""), Path::new("t"), &args));
        assert!(
            e.starts_with("tls.ca_key:") && e.contains("does not match"),
            "{e}"
        );

        let e = err_line(from_toml("", Path::new("t"), &ConfigArgs::default()));
        assert!(e.starts_with("tls.ca_cert: required"), "{e}");
    }

    #[test]
    fn wildcards_only_as_whole_leftmost_label() {
        assert!(HostPattern::parse("*.x.y").is_ok());
        for bad in ["a*.x", "x.*.y", "*", "*.", "*.*.x", "a b.c", "", "x..y"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
        let s = Scratch::new("wild");
        let e = err_line(
            s.load("[[inject]]\nhosts = [\"x.*.y\"]\nsource = { kind = \"file\", path = \"/t\" }"),
        );
        assert!(
            e.starts_with("inject[0].hosts:") && e.contains("leftmost"),
            "{e}"
        );
    }

    #[test]
    fn host_matching() {
        let exact = HostPattern::parse("Broker.Example.COM.").unwrap();
        assert!(exact.matches("broker.example.com"));
        assert!(!exact.matches("xbroker.example.com"));
        let wild = HostPattern::parse("*.api.example.com").unwrap();
        assert!(wild.matches("a.api.example.com"));
        assert!(!wild.matches("api.example.com"));
        assert!(!wild.matches("a.b.api.example.com"));
        assert!(!wild.matches(".api.example.com"));
        assert!(!wild.matches("aapi.example.com"));
        assert_eq!(normalize_host("A.Example.com:8443"), "a.example.com");
        assert_eq!(normalize_host("a.example.com."), "a.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("[::1"), "[::1]");
        assert!(matches!(
            normalize_host("a.example.com:8443"),
            Cow::Borrowed("a.example.com")
        ));
    }

    #[test]
    fn header_validation() {
        let s = Scratch::new("header");
        for bad in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "TE",
            "Upgrade",
            "Connection",
            "bad header",
            "x:y",
            "",
        ] {
            let body = format!(
                "[[inject]]\nhosts = [\"a.b\"]\nsource = {{ kind = \"file\", path = \"/t\" }}\nheader = {bad:?}"
            );
            let e = err_line(s.load(&body));
            assert!(e.starts_with("inject[0].header:"), "{bad}: {e}");
        }
        let ok = "[[inject]]\nhosts = [\"a.b\"]\nsource = { kind = \"file\", path = \"/t\" }\nheader = \"X-Robin-Token\"";
        assert_eq!(
            s.load(ok).unwrap().inject[0].header.as_str(),
            "x-robin-token"
        );
    }

    #[test]
    fn format_validation() {
        assert!(TokenFormat::parse("{token}").is_ok());
        assert_eq!(
            TokenFormat::parse("Token t={token};v=1")
                .unwrap()
                .render("X"),
            "Token t=X;v=1"
        );
        for bad in [
            "Bearer",
            "{token}{token}",
            "Bearer {token}\r\nX: y",
            "B\u{e9} {token}",
            "{tok}",
        ] {
            assert!(TokenFormat::parse(bad).is_err(), "{bad:?}");
        }
        let s = Scratch::new("format");
        let e = err_line(s.load(
            "[[inject]]\nhosts = [\"a.b\"]\nsource = { kind = \"file\", path = \"/t\" }\nformat = \"Bearer\"",
        ));
        assert!(
            e.starts_with("inject[0].format:") && e.contains("exactly once"),
            "{e}"
        );
    }

    #[test]
    fn plaintext_tls_port_and_audience() {
        let s = Scratch::new("plaintext");
        let c = s.load(RULE).unwrap();
        let r = &c.inject[0];
        assert_eq!(
            (r.upstream_tls_port, &r.plaintext, &r.audience),
            (443, &None, &None)
        );
        assert!(!r.plaintext_allows("10.0.0.1".parse().unwrap()));

        let c = s
            .load(&format!(
                "{RULE}upstream_tls_port = 8443\nexpect_audience = \"broker\"\nplaintext = {{ allow_cidrs = [\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.7/32\"] }}\n"
            ))
            .unwrap();
        let r = &c.inject[0];
        assert_eq!(r.upstream_tls_port, 8443);
        assert_eq!(r.audience.as_deref(), Some("broker"));
        for (ip, allowed) in [
            ("10.1.2.3", true),
            ("11.0.0.1", false),
            ("::ffff:10.9.9.9", true),
            ("fd12::1", true),
            ("fe80::1", false),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
        ] {
            assert_eq!(r.plaintext_allows(ip.parse().unwrap()), allowed, "{ip}");
        }

        // The source's own audience is the default.
        let c = s
            .load("[[inject]]\nhosts = [\"a.b\"]\nsource = { kind = \"token_request\", audience = \"vault\" }")
            .unwrap();
        assert_eq!(c.inject[0].audience.as_deref(), Some("vault"));

        for (extra, key) in [
            ("plaintext = { allow_cidrs = [] }", "plaintext.allow_cidrs"),
            (
                "plaintext = { allow_cidrs = [\"10.0.0.0\"] }",
                "plaintext.allow_cidrs",
            ),
            (
                "plaintext = { allow_cidrs = [\"10.0.0.1/8\"] }",
                "plaintext.allow_cidrs",
            ),
            (
                "plaintext = { allow_cidrs = [\"10.0.0.0/33\"] }",
                "plaintext.allow_cidrs",
            ),
            (
                "plaintext = { allow_cidrs = [\"::/129\"] }",
                "plaintext.allow_cidrs",
            ),
            (
                "plaintext = { allow_cidrs = [\"host/8\"] }",
                "plaintext.allow_cidrs",
            ),
            ("upstream_tls_port = 0", "upstream_tls_port"),
            ("expect_audience = \"\"", "expect_audience"),
        ] {
            let e = err_line(s.load(&format!("{RULE}{extra}\n")));
            assert!(e.starts_with(&format!("inject[0].{key}:")), "{extra}: {e}");
        }
        let e = err_line(s.load(&format!("{RULE}plaintext = {{ allow = [] }}\n")));
        assert!(e.contains("unknown field"), "{e}");
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConfigArgs,
    }

    /// The child half of `env_overrides_file_and_flags_override_env`: that test re-runs this
    /// binary with the variables set (so no process calls `set_var`); in a normal run there is no
    /// `ROBIN_TEST_CHILD_FILE` and this returns at once.
    #[test]
    fn env_child() {
        let Ok(file) = std::env::var("ROBIN_TEST_CHILD_FILE") else {
            return;
        };
        let c = load(
            &Cli::try_parse_from(["robin", "--config", &file])
                .unwrap()
                .args,
        )
        .unwrap();
        assert_eq!(c.capture.ports, vec![8443, 9443]);
        assert_eq!(c.capture.listener_port, 15002);
        let args = Cli::try_parse_from(["robin", "--listener-port", "15003"])
            .unwrap()
            .args;
        assert_eq!(args.config.as_deref(), Some(Path::new("/from/env.toml")));
        assert_eq!(args.listener_port, Some(15003));
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let s = Scratch::new("env");
        let file = s.0.path().join("robin.toml");
        std::fs::write(&file, s.toml("[capture]\nports = [1]\nlistener_port = 1\n")).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "config::tests::env_child", "--nocapture"])
            .env("ROBIN_TEST_CHILD_FILE", &file)
            .env(ENV_CAPTURE_PORTS, "8443,9443")
            .env(ENV_LISTENER_PORT, "15002")
            .env(ENV_CONFIG, "/from/env.toml")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("1 passed"), "{stdout}");
    }

    #[test]
    fn ports_and_flag_precedence() {
        let s = Scratch::new("flags");
        let file = s.0.path().join("robin.toml");
        std::fs::write(
            &file,
            s.toml("[capture]\nports = [8080]\nlistener_port = 15001\n"),
        )
        .unwrap();
        let c = load(&ConfigArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.capture.ports.clone(), c.capture.listener_port),
            (vec![8080], 15001)
        );

        let cli = Cli::try_parse_from([
            "robin",
            "--config",
            file.to_str().unwrap(),
            "--capture-ports",
            "80,443,8443",
            "--listener-port",
            "0",
        ])
        .unwrap();
        let c = load(&cli.args).unwrap();
        assert_eq!(c.capture.ports, vec![80, 443, 8443]);
        assert_eq!(c.capture.listener_port, 0);

        let e = err_line(s.load("[capture]\nports = []"));
        assert!(e.starts_with("capture.ports:"), "{e}");
        let e = err_line(s.load("[capture]\nports = [70000]"));
        assert!(e.contains("t.toml"), "{e}");
    }
}
