//! `robin proxy`'s settings: the original Robin's flat `ROBIN_*` variables, with its names and
//! defaults. Each is read from, highest first: its flag (`--upstream-url` for
//! `ROBIN_UPSTREAM_URL`, ...), the environment, then the `KEY=value` file named by `--env-file`.
//! An empty value counts as unset at that layer. Values are read through [`Lookup`], so tests
//! pass maps and never touch the process environment (linkerd2-proxy `app/src/env.rs`).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use http::{Uri, uri::Scheme};

pub const ENV_UPSTREAM_URL: &str = "ROBIN_UPSTREAM_URL";
pub const ENV_TOKEN_SOURCE: &str = "ROBIN_TOKEN_SOURCE";
pub const ENV_TOKEN_FILE: &str = "ROBIN_TOKEN_FILE";
pub const ENV_AUDIENCE: &str = "ROBIN_AUDIENCE";
pub const ENV_SPIFFE_SOCKET: &str = crate::identity::ENV_SPIFFE_SOCKET;
pub const ENV_SVID_REFRESH_BEFORE: &str = "ROBIN_SVID_REFRESH_BEFORE";
pub const ENV_LISTEN_ADDR: &str = "ROBIN_LISTEN_ADDR";
pub const ENV_LISTEN_UDS: &str = "ROBIN_LISTEN_UDS";
pub const ENV_PEERCRED_ALLOW_UIDS: &str = "ROBIN_PEERCRED_ALLOW_UIDS";
pub const ENV_ADMIN_ADDR: &str = "ROBIN_ADMIN_ADDR";
pub const ENV_UPSTREAM_CA_FILE: &str = "ROBIN_UPSTREAM_CA_FILE";

pub const DEFAULT_TOKEN_SOURCE: &str = "file";
/// The projected ServiceAccount token every pod gets.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const DEFAULT_SVID_REFRESH_BEFORE: &str = "5m";
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:4000";
/// `:port` means every address, as in Go.
pub const DEFAULT_ADMIN_ADDR: &str = ":4001";

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0} is set but has no effect without {1}")]
    Useless(&'static str, &'static str),
    #[error("env file {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("env file {path}, line {line}: expected KEY=value")]
    Syntax { path: PathBuf, line: usize },
}

fn invalid(var: &'static str, value: &str, reason: impl Into<String>) -> EnvError {
    EnvError::Invalid {
        var,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Where variables are read from.
pub trait Lookup {
    fn get(&self, var: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> Lookup for F {
    fn get(&self, var: &str) -> Option<String> {
        self(var)
    }
}

impl Lookup for BTreeMap<String, String> {
    fn get(&self, var: &str) -> Option<String> {
        BTreeMap::get(self, var).cloned()
    }
}

/// Layers, highest precedence first; the first non-empty value wins.
pub struct Layered<'a>(pub Vec<&'a dyn Lookup>);

impl Lookup for Layered<'_> {
    fn get(&self, var: &str) -> Option<String> {
        self.0
            .iter()
            .find_map(|l| l.get(var).filter(|v| !v.trim().is_empty()))
    }
}

/// Flags, one per variable; `--env-file` names the lowest layer.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ProxyArgs {
    /// A `KEY=value` file read below the environment (flags > environment > this file).
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// ROBIN_UPSTREAM_URL: where every request goes (`https://host[:port]` or `http://...`).
    #[arg(long, value_name = "URL")]
    pub upstream_url: Option<String>,
    /// ROBIN_TOKEN_SOURCE: `file` (default) or `jwtsvid`.
    #[arg(long, value_name = "KIND")]
    pub token_source: Option<String>,
    /// ROBIN_TOKEN_FILE: the token file (default: the projected ServiceAccount token).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<String>,
    /// ROBIN_AUDIENCE: the JWT-SVID audience (jwtsvid).
    #[arg(long, value_name = "AUD")]
    pub audience: Option<String>,
    /// ROBIN_SPIFFE_SOCKET: the SPIFFE Workload API socket (jwtsvid).
    #[arg(long, value_name = "PATH")]
    pub spiffe_socket: Option<String>,
    /// ROBIN_SVID_REFRESH_BEFORE: refresh a JWT-SVID this long before it expires (default 5m).
    #[arg(long, value_name = "DURATION")]
    pub svid_refresh_before: Option<String>,
    /// ROBIN_LISTEN_ADDR: the loopback listener (default 127.0.0.1:4000).
    #[arg(long, value_name = "ADDR")]
    pub listen_addr: Option<String>,
    /// ROBIN_LISTEN_UDS: also (or, without ROBIN_LISTEN_ADDR, only) listen on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub listen_uds: Option<String>,
    /// ROBIN_PEERCRED_ALLOW_UIDS: UIDs allowed on the Unix socket (default: Robin's own).
    #[arg(long, value_name = "UIDS")]
    pub peercred_allow_uids: Option<String>,
    /// ROBIN_ADMIN_ADDR: /healthz, /readyz, /metrics (default :4001).
    #[arg(long, value_name = "ADDR")]
    pub admin_addr: Option<String>,
    /// ROBIN_UPSTREAM_CA_FILE: PEM roots trusted for the upstream, besides the system's.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca_file: Option<String>,
}

impl Lookup for ProxyArgs {
    fn get(&self, var: &str) -> Option<String> {
        match var {
            ENV_UPSTREAM_URL => &self.upstream_url,
            ENV_TOKEN_SOURCE => &self.token_source,
            ENV_TOKEN_FILE => &self.token_file,
            ENV_AUDIENCE => &self.audience,
            ENV_SPIFFE_SOCKET => &self.spiffe_socket,
            ENV_SVID_REFRESH_BEFORE => &self.svid_refresh_before,
            ENV_LISTEN_ADDR => &self.listen_addr,
            ENV_LISTEN_UDS => &self.listen_uds,
            ENV_PEERCRED_ALLOW_UIDS => &self.peercred_allow_uids,
            ENV_ADMIN_ADDR => &self.admin_addr,
            ENV_UPSTREAM_CA_FILE => &self.upstream_ca_file,
            _ => &None,
        }
        .clone()
    }
}

/// Parses a `.env`-style file: `KEY=value` lines, `#` comments, blank lines, an optional
/// `export ` prefix, and one pair of matching quotes around a value.
pub fn parse_env_file(text: &str, path: &Path) -> Result<BTreeMap<String, String>, EnvError> {
    let mut vars = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty() && !k.trim().contains(char::is_whitespace))
            .ok_or_else(|| EnvError::Syntax {
                path: path.to_owned(),
                line: i + 1,
            })?;
        let value = value.trim();
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
            .unwrap_or(value);
        vars.insert(key.trim().to_owned(), unquoted.to_owned());
    }
    Ok(vars)
}

pub fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>, EnvError> {
    let text = std::fs::read_to_string(path).map_err(|e| EnvError::Read(path.to_owned(), e))?;
    parse_env_file(&text, path)
}

/// The one upstream, from `ROBIN_UPSTREAM_URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    /// Without brackets for an IPv6 literal: what DNS resolves and the certificate names.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written: the Host the upstream is sent.
    pub authority: http::uri::Authority,
}

/// Where the token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    Jwtsvid { audience: String, socket: PathBuf },
}

/// The Unix socket listener and who may use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdsListen {
    pub path: PathBuf,
    pub allow_uids: Vec<u32>,
}

/// The effective settings. Nothing here is secret (tokens are read at request time), so
/// `Debug` is the start-up log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub upstream: UpstreamUrl,
    pub token: TokenSource,
    pub svid_refresh_before: Duration,
    /// `None` when only the Unix socket is served.
    pub listen: Option<SocketAddr>,
    pub uds: Option<UdsListen>,
    pub admin: SocketAddr,
    pub upstream_ca_file: Option<PathBuf>,
}

impl Settings {
    /// `own_uid`: the default of `ROBIN_PEERCRED_ALLOW_UIDS`.
    pub fn from_lookup(vars: &dyn Lookup, own_uid: u32) -> Result<Self, EnvError> {
        let upstream = vars
            .get(ENV_UPSTREAM_URL)
            .ok_or(EnvError::Missing(ENV_UPSTREAM_URL))?;
        let uds_path = vars.get(ENV_LISTEN_UDS);
        let allow = vars.get(ENV_PEERCRED_ALLOW_UIDS);
        let uds = match (uds_path, allow) {
            (None, Some(_)) => {
                return Err(EnvError::Useless(ENV_PEERCRED_ALLOW_UIDS, ENV_LISTEN_UDS));
            }
            (None, None) => None,
            (Some(path), allow) => Some(UdsListen {
                path: PathBuf::from(path),
                allow_uids: match allow {
                    Some(a) => parse_uids(&a)?,
                    None => vec![own_uid],
                },
            }),
        };
        // A Unix socket alone is served alone: a TCP listener would bypass its UID check.
        let listen = match (vars.get(ENV_LISTEN_ADDR), &uds) {
            (Some(a), _) => Some(parse_addr(ENV_LISTEN_ADDR, &a)?),
            (None, Some(_)) => None,
            (None, None) => Some(parse_addr(ENV_LISTEN_ADDR, DEFAULT_LISTEN_ADDR)?),
        };
        let refresh = get_or(vars, ENV_SVID_REFRESH_BEFORE, DEFAULT_SVID_REFRESH_BEFORE);
        Ok(Self {
            upstream: parse_upstream(&upstream)?,
            token: token_source(vars)?,
            svid_refresh_before: crate::oidc_gateway::parse_duration(&refresh).map_err(|_| {
                invalid(
                    ENV_SVID_REFRESH_BEFORE,
                    &refresh,
                    "not a duration like 30s or 5m",
                )
            })?,
            listen,
            uds,
            admin: parse_addr(
                ENV_ADMIN_ADDR,
                &get_or(vars, ENV_ADMIN_ADDR, DEFAULT_ADMIN_ADDR),
            )?,
            upstream_ca_file: vars.get(ENV_UPSTREAM_CA_FILE).map(PathBuf::from),
        })
    }
}

fn get_or(vars: &dyn Lookup, var: &str, default: &str) -> String {
    vars.get(var).unwrap_or_else(|| default.to_owned())
}

fn token_source(vars: &dyn Lookup) -> Result<TokenSource, EnvError> {
    let kind = get_or(vars, ENV_TOKEN_SOURCE, DEFAULT_TOKEN_SOURCE);
    match kind.as_str() {
        "file" => Ok(TokenSource::File(PathBuf::from(get_or(
            vars,
            ENV_TOKEN_FILE,
            DEFAULT_TOKEN_FILE,
        )))),
        "jwtsvid" => {
            let audience = vars
                .get(ENV_AUDIENCE)
                .ok_or(EnvError::Missing(ENV_AUDIENCE))?;
            let socket = vars
                .get(ENV_SPIFFE_SOCKET)
                .ok_or(EnvError::Missing(ENV_SPIFFE_SOCKET))?;
            let socket = socket.strip_prefix("unix://").unwrap_or(&socket).to_owned();
            Ok(TokenSource::Jwtsvid {
                audience,
                socket: PathBuf::from(socket),
            })
        }
        _ => Err(invalid(ENV_TOKEN_SOURCE, &kind, "must be file or jwtsvid")),
    }
}

fn parse_upstream(raw: &str) -> Result<UpstreamUrl, EnvError> {
    let bad = |reason: &str| invalid(ENV_UPSTREAM_URL, raw, reason);
    let uri: Uri = raw.trim().parse().map_err(|_| bad("not a URL"))?;
    let scheme = uri
        .scheme()
        .filter(|s| **s == Scheme::HTTPS || **s == Scheme::HTTP)
        .ok_or_else(|| bad("must start with https:// or http://"))?
        .clone();
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?.clone();
    if authority.as_str().contains('@') {
        return Err(bad("must not carry credentials"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad("must have no path or query (requests keep their own)"));
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
    Ok(UpstreamUrl {
        port: authority.port_u16().unwrap_or(default_port),
        host: host.to_owned(),
        scheme,
        authority,
    })
}

/// `host:port`, `[v6]:port`, or `:port` for every IPv4 address.
fn parse_addr(var: &'static str, raw: &str) -> Result<SocketAddr, EnvError> {
    let raw = raw.trim();
    if let Some(port) = raw.strip_prefix(':') {
        let port = port
            .parse()
            .map_err(|_| invalid(var, raw, "not a port after ':'"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Some(("localhost", port)) = raw.rsplit_once(':') {
        let port = port.parse().map_err(|_| invalid(var, raw, "not a port"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    raw.parse()
        .map_err(|_| invalid(var, raw, "not an address like 127.0.0.1:4000 or :4001"))
}

fn parse_uids(raw: &str) -> Result<Vec<u32>, EnvError> {
    let uids = raw
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse()
                .map_err(|_| invalid(ENV_PEERCRED_ALLOW_UIDS, raw, format!("{u:?} is not a UID")))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    if uids.is_empty() {
        return Err(invalid(ENV_PEERCRED_ALLOW_UIDS, raw, "names no UID"));
    }
    Ok(uids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, EnvError> {
        Settings::from_lookup(&map(pairs), 1000)
    }

    const URL: (&str, &str) = (ENV_UPSTREAM_URL, "https://api.example.com");

    #[test]
    fn defaults_are_the_original_robins() {
        let s = settings(&[URL]).unwrap();
        assert_eq!(s.upstream.host, "api.example.com");
        assert_eq!(s.upstream.port, 443);
        assert_eq!(s.upstream.authority.as_str(), "api.example.com");
        assert_eq!(s.token, TokenSource::File(DEFAULT_TOKEN_FILE.into()));
        assert_eq!(s.listen, Some("127.0.0.1:4000".parse().unwrap()));
        assert_eq!(s.admin, "0.0.0.0:4001".parse().unwrap());
        assert_eq!(s.svid_refresh_before, Duration::from_secs(300));
        assert_eq!((s.uds, s.upstream_ca_file), (None, None));
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let flags = ProxyArgs {
            listen_addr: Some("127.0.0.1:7001".into()),
            ..ProxyArgs::default()
        };
        let env = map(&[
            (ENV_LISTEN_ADDR, "127.0.0.1:7002"),
            (ENV_ADMIN_ADDR, "127.0.0.1:7003"),
            // Empty counts as unset: the file's value shows through.
            (ENV_TOKEN_FILE, ""),
        ]);
        let file = parse_env_file(
            "# comment\nexport ROBIN_UPSTREAM_URL=\"http://10.0.0.1:8080\"\n\
             ROBIN_LISTEN_ADDR=127.0.0.1:7004\nROBIN_ADMIN_ADDR=127.0.0.1:7005\n\
             ROBIN_TOKEN_FILE='/run/t'\n",
            Path::new("test.env"),
        )
        .unwrap();
        let s = Settings::from_lookup(&Layered(vec![&flags, &env, &file]), 0).unwrap();
        assert_eq!(s.listen, Some("127.0.0.1:7001".parse().unwrap()));
        assert_eq!(s.admin, "127.0.0.1:7003".parse().unwrap());
        assert_eq!(s.token, TokenSource::File("/run/t".into()));
        assert_eq!(s.upstream.scheme, Scheme::HTTP);
        assert_eq!(
            (s.upstream.host.as_str(), s.upstream.port),
            ("10.0.0.1", 8080)
        );
    }

    #[test]
    fn jwtsvid_needs_audience_and_socket() {
        let jwt = (ENV_TOKEN_SOURCE, "jwtsvid");
        let e = settings(&[URL, jwt]).unwrap_err();
        assert_eq!(e.to_string(), "ROBIN_AUDIENCE is required");
        let e = settings(&[URL, jwt, (ENV_AUDIENCE, "api")]).unwrap_err();
        assert_eq!(e.to_string(), "ROBIN_SPIFFE_SOCKET is required");
        let s = settings(&[
            URL,
            jwt,
            (ENV_AUDIENCE, "api"),
            (ENV_SPIFFE_SOCKET, "unix:///run/spire/agent.sock"),
            (ENV_SVID_REFRESH_BEFORE, "90s"),
        ])
        .unwrap();
        assert_eq!(
            s.token,
            TokenSource::Jwtsvid {
                audience: "api".into(),
                socket: "/run/spire/agent.sock".into()
            }
        );
        assert_eq!(s.svid_refresh_before, Duration::from_secs(90));
    }

    #[test]
    fn a_unix_socket_alone_replaces_the_tcp_listener() {
        let uds = (ENV_LISTEN_UDS, "/run/robin.sock");
        let s = settings(&[URL, uds]).unwrap();
        assert_eq!(s.listen, None);
        assert_eq!(s.uds.as_ref().unwrap().allow_uids, vec![1000]);
        let s = settings(&[
            URL,
            uds,
            (ENV_PEERCRED_ALLOW_UIDS, "0, 65532"),
            (ENV_LISTEN_ADDR, "127.0.0.1:4000"),
        ])
        .unwrap();
        assert_eq!(s.uds.unwrap().allow_uids, vec![0, 65532]);
        assert!(s.listen.is_some());
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "ROBIN_UPSTREAM_URL is required"),
            (&[(ENV_UPSTREAM_URL, "ftp://x")], "ROBIN_UPSTREAM_URL="),
            (&[(ENV_UPSTREAM_URL, "https://u:p@x")], "credentials"),
            (&[(ENV_UPSTREAM_URL, "https://x/api")], "no path"),
            (&[URL, (ENV_TOKEN_SOURCE, "vault")], "ROBIN_TOKEN_SOURCE="),
            (&[URL, (ENV_LISTEN_ADDR, "4000")], "ROBIN_LISTEN_ADDR="),
            (&[URL, (ENV_ADMIN_ADDR, ":x")], "ROBIN_ADMIN_ADDR="),
            (
                &[URL, (ENV_SVID_REFRESH_BEFORE, "soon")],
                "ROBIN_SVID_REFRESH_BEFORE=",
            ),
            (
                &[URL, (ENV_PEERCRED_ALLOW_UIDS, "0")],
                "ROBIN_PEERCRED_ALLOW_UIDS is set but has no effect without ROBIN_LISTEN_UDS",
            ),
            (
                &[
                    URL,
                    (ENV_LISTEN_UDS, "/s"),
                    (ENV_PEERCRED_ALLOW_UIDS, "root"),
                ],
                "ROBIN_PEERCRED_ALLOW_UIDS=",
            ),
        ];
        for (pairs, want) in cases {
            let e = settings(pairs).unwrap_err().to_string();
            assert!(e.contains(want), "{pairs:?}: {e}");
        }
        let e = parse_env_file("A=1\nnot a pair\n", Path::new("x.env")).unwrap_err();
        assert_eq!(e.to_string(), "env file x.env, line 2: expected KEY=value");
    }

    #[test]
    fn ipv6_and_localhost_addresses() {
        let s = settings(&[
            (ENV_UPSTREAM_URL, "https://[::1]:8443"),
            (ENV_LISTEN_ADDR, "localhost:4000"),
        ])
        .unwrap();
        assert_eq!((s.upstream.host.as_str(), s.upstream.port), ("::1", 8443));
        assert_eq!(s.upstream.authority.as_str(), "[::1]:8443");
        assert_eq!(s.listen, Some("127.0.0.1:4000".parse().unwrap()));
    }
}
