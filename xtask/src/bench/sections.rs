//! What is measured: the main table (Robin, direct and the peers per scenario) and the cost of
//! the capture mechanism alone. Each scenario runs in interleaved rounds (`rounds`).
use std::path::{Path, PathBuf};

use super::{
    CONNECTIONS, H1_HOST, RULED, Settings, UNRULED,
    load::Load,
    peers::{
        ENVOY, ENVOY_PORT, HAPROXY, HAPROXY_H1_PORT, HAPROXY_PLAIN_PORT, HAPROXY_PORT,
        HAPROXY_TCP_PORT, MITM_PORT, MITMPROXY, NGINX, NGINX_H1_PORT, NGINX_PLAIN_PORT, NGINX_PORT,
        SQUID, SQUID_PORT,
    },
    rounds::{self, Outcome, PathSpec, Plan, Role, Scenario, Via},
    world::{CAP_DIRECT, CAP_IP, CAP_NAT_NS, CAP_NS, GRPC_PATH, GRPC_REQUEST, World},
};

const REVERSE: &str = "explicit reverse proxy";
const TRANSPARENT: &str = "iptables REDIRECT (transparent)";

fn path(label: &'static str, capture: &'static str, role: Role, url: String, via: Via) -> PathSpec {
    PathSpec {
        label,
        capture,
        role,
        url,
        via,
        enter_ns: None,
        server: None,
    }
}

/// A peer's path; `server` is its cgroup, where its CPU is read.
fn peer(
    label: &'static str,
    server: &'static str,
    capture: &'static str,
    url: String,
    via: Via,
) -> PathSpec {
    PathSpec {
        server: Some(server),
        ..path(label, capture, Role::Peer, url, via)
    }
}

/// Which peers a scenario has: each speaks what the scenario needs (squid no h2, Envoy and
/// mitmproxy only in full mode, the HTTP/1.1-only upstream behind nginx and haproxy only).
#[derive(Clone, Copy)]
enum Peers {
    None,
    /// nginx and haproxy fronts of the HTTP/1.1-only upstream.
    H1Upstream,
    /// The main fronts; `squid` when the scenario is HTTP/1.1.
    Main {
        squid: bool,
    },
    /// nginx and haproxy as main fronts only (plain-HTTP fronts for an `http://` URL): the
    /// added latency of the proxies users tune for it.
    Fronts,
}

struct Paths<'a> {
    s: &'a Settings,
    config: &'a Path,
}

impl Paths<'_> {
    /// Direct and Robin to `url`, then the peers, each with the same path as `url`.
    fn of(&self, url: &str, peers: Peers) -> Vec<PathSpec> {
        let robin = Via::Robin(self.config.to_owned());
        let mut v = vec![
            path("direct", "none", Role::Direct, url.into(), Via::Plain),
            path(
                "robin",
                "eBPF connect redirect",
                Role::Robin,
                url.into(),
                robin,
            ),
        ];
        let (scheme, rest) = url.split_once("://").unwrap_or(("https", ""));
        let at = |port: u16| {
            let path = rest.find('/').map_or("/", |i| &rest[i..]);
            format!("{scheme}://127.0.0.1:{port}{path}")
        };
        let (nginx, haproxy) = match peers {
            Peers::None => return v,
            Peers::H1Upstream => (NGINX_H1_PORT, HAPROXY_H1_PORT),
            Peers::Fronts if scheme == "http" => (NGINX_PLAIN_PORT, HAPROXY_PLAIN_PORT),
            Peers::Main { .. } | Peers::Fronts => (NGINX_PORT, HAPROXY_PORT),
        };
        v.push(peer("nginx", NGINX, REVERSE, at(nginx), Via::Plain));
        v.push(peer("haproxy", HAPROXY, REVERSE, at(haproxy), Via::Plain));
        if let (Peers::Main { squid }, true) = (peers, self.s.full_peers) {
            v.push(peer("envoy", ENVOY, REVERSE, at(ENVOY_PORT), Via::Plain));
            if squid {
                let redirect = Via::Redirect(SQUID_PORT);
                v.push(peer(
                    "squid ssl-bump",
                    SQUID,
                    TRANSPARENT,
                    url.into(),
                    redirect,
                ));
            }
            let redirect = Via::Redirect(MITM_PORT);
            v.push(peer(
                "mitmproxy",
                MITMPROXY,
                TRANSPARENT,
                url.into(),
                redirect,
            ));
        }
        v
    }
}

fn scenario(title: &str, load: Load, paths: Vec<PathSpec>) -> Scenario {
    Scenario {
        title: title.into(),
        load,
        paths,
        unguarded: None,
        polling_idle: false,
    }
}

/// With a new connection per request, the direct path pays the upstream's TLS handshake
/// (nginx, OpenSSL 3.0) and a pooling proxy pays its own instead: a proxy with a cheaper
/// handshake can beat direct for real (Envoy on BoringSSL did, 1.22×, in the old full run).
/// Requests per curl run in the forward-proxy comparison.
const SEQUENCE_REQUESTS: u32 = 300;

const HANDSHAKE_SWAP: &str = "a pooling proxy's own TLS handshake replaces the upstream's";

fn main_scenarios(s: &Settings, world: &World) -> Vec<Scenario> {
    let config = world.dir.join("robin.toml");
    let p = Paths { s, config: &config };
    let c = CONNECTIONS;
    let wrk = |connections, close| Load::Wrk { connections, close };
    let h2 = |grpc_body| Load::H2load {
        connections: c,
        streams: 10,
        grpc_body,
    };
    let small = format!("https://{RULED}/small");
    let plain = format!("http://{RULED}/small");
    let grpc = format!("https://{RULED}{GRPC_PATH}");
    let main = |squid| Peers::Main { squid };
    // An h2 client cannot reach the HTTP/1.1-only listener directly (h2load falls back to
    // h1); its direct path is the same upstream's h2 listener, the best the client could get.
    let mut h1_up = p.of(&format!("https://{H1_HOST}/small"), Peers::H1Upstream);
    h1_up[0] = path(
        "direct (h2 listener)",
        "none",
        Role::Direct,
        small.clone(),
        Via::Plain,
    );
    vec![
        scenario(
            "TLS intercept + inject, HTTP/1.1 keep-alive",
            wrk(c, false),
            p.of(&small, main(true)),
        ),
        scenario(
            "TLS intercept + inject, HTTP/2 (10 streams/conn)",
            h2(None),
            p.of(&small, main(false)),
        ),
        scenario(
            "TLS intercept + inject, h2 client → HTTP/1.1-only upstream (10 streams/conn)",
            h2(None),
            h1_up,
        ),
        scenario(
            "gRPC unary over h2, TLS intercept + inject (10 streams/conn)",
            h2(Some(world.dir.join(GRPC_REQUEST))),
            p.of(&grpc, main(false)),
        ),
        Scenario {
            unguarded: Some(HANDSHAKE_SWAP),
            ..scenario(
                "TLS intercept + inject, new connection per request",
                wrk(c, true),
                p.of(&small, main(true)),
            )
        },
        scenario(
            "plain HTTP inject, keep-alive",
            wrk(c, false),
            p.of(&plain, Peers::None),
        ),
        // Added latency is what one request pays with nothing queued in front of it.
        // The peers show what the second hop costs any proxy on this machine.
        Scenario {
            polling_idle: true,
            ..scenario(
                "plain HTTP inject, 1 connection (latency)",
                wrk(1, false),
                p.of(&plain, Peers::Fronts),
            )
        },
        Scenario {
            polling_idle: true,
            ..scenario(
                "TLS intercept + inject, 1 connection (latency)",
                wrk(1, false),
                p.of(&small, Peers::Fronts),
            )
        },
        // What an app that can only be pointed at a proxy gets (`robin gateway`), against the
        // same client captured by eBPF: one curl, requests in a row on one connection.
        scenario(
            "TLS intercept + inject, curl on one keep-alive connection: eBPF capture vs forward proxy",
            Load::CurlSequence {
                requests: SEQUENCE_REQUESTS,
            },
            {
                let mut v = p.of(&small, Peers::None);
                v.push(path(
                    "robin gateway",
                    "forward proxy (CONNECT)",
                    Role::Peer,
                    small.clone(),
                    Via::Gateway(config.clone()),
                ));
                v
            },
        ),
        scenario(
            &format!("passthrough (splice), {} MiB download", s.large_mib),
            Load::Curl,
            {
                let large = format!("https://{UNRULED}/large");
                let mut v = p.of(&large, Peers::None);
                v.push(peer(
                    "haproxy (mode tcp, splice)",
                    HAPROXY,
                    "explicit TCP proxy (curl --connect-to)",
                    large,
                    Via::ConnectTo(HAPROXY_TCP_PORT),
                ));
                v
            },
        ),
    ]
}

pub fn main_table(
    s: &Settings,
    world: &World,
    robin_bin: &Path,
    experiment: &Experiment,
) -> anyhow::Result<Vec<Outcome>> {
    let plan = Plan {
        rounds: s.rounds,
        seconds: s.seconds,
        warmup_seconds: s.warmup_seconds,
    };
    main_scenarios(s, world)
        .into_iter()
        .filter(|scn| experiment.selects(&scn.title))
        .map(|scn| experiment.with_baseline(scn))
        .map(|scn| rounds::run(&scn, &plan, robin_bin))
        .collect()
}

/// What a profiling or before/after session changes in a run (environment variables):
/// `ROBIN_BENCH_ONLY` runs only the main scenarios whose title contains it (and nothing else;
/// `resources` runs Robin's resource figures: RSS idle and with 1,000 connections, mint time);
/// `ROBIN_BENCH_BASELINE` adds, next to Robin in every scenario, the same path run by another
/// `robin` binary, interleaved in the same rounds, so a change is measured against the build
/// before it in one run. Such a run is an experiment: it never replaces the published results.
#[derive(Debug, Default)]
pub struct Experiment {
    pub only: Option<String>,
    pub baseline: Option<PathBuf>,
}

impl Experiment {
    pub fn from_env() -> Self {
        let var = |k| std::env::var_os(k).filter(|v| !v.is_empty());
        Self {
            only: var("ROBIN_BENCH_ONLY").map(|v| v.to_string_lossy().to_lowercase()),
            baseline: var("ROBIN_BENCH_BASELINE").map(PathBuf::from),
        }
    }

    pub fn is_set(&self) -> bool {
        self.only.is_some() || self.baseline.is_some()
    }

    /// `ROBIN_BENCH_ONLY=resources`: the resource figures (with Robin's binary only).
    pub fn selects_resources(&self) -> bool {
        self.only.as_deref() == Some("resources")
    }

    fn selects(&self, title: &str) -> bool {
        self.only
            .as_deref()
            .is_none_or(|o| title.to_lowercase().contains(o))
    }

    fn with_baseline(&self, mut scn: Scenario) -> Scenario {
        let Some(bin) = &self.baseline else {
            return scn;
        };
        let Some(at) = scn.paths.iter().position(|p| p.role == Role::Robin) else {
            return scn;
        };
        let Via::Robin(config) = scn.paths[at].via.clone() else {
            return scn;
        };
        let base = PathSpec {
            label: "robin (baseline binary)",
            role: Role::Peer,
            via: Via::RobinBinary {
                bin: bin.clone(),
                config,
            },
            ..scn.paths[at].clone()
        };
        scn.paths.insert(at + 1, base);
        scn
    }
}

/// The capture mechanism alone: the same trivial server (nginx on 127.0.0.1:CAP_PORT in a
/// namespace of its own) reached directly, through Robin's eBPF connect redirection, and through
/// an iptables REDIRECT. Robin's proxy only serves connections that carry its kernel record, so
/// an iptables-redirected connection cannot reach it; instead `robin exec` (in the client
/// namespace, listener port CAP_PORT) wraps a load generator that enters the capture namespace,
/// where the connect hook rewrites `CAP_IP:80` to `127.0.0.1:CAP_PORT`: nginx, not Robin. What
/// differs between the paths is only how the connect reaches the server. The iptables path has
/// its own identical namespace (a nat table hooks conntrack into its namespace for good, which
/// would tax the other two paths).
pub fn capture_cost(s: &Settings, world: &World, robin_bin: &Path) -> anyhow::Result<Vec<Outcome>> {
    let plan = Plan {
        rounds: s.rounds,
        seconds: s.cap_seconds,
        warmup_seconds: s.warmup_seconds,
    };
    let robin = Via::Robin(world.dir.join("robin-cap.toml"));
    let in_ns = |ns, mut spec: PathSpec| {
        spec.enter_ns = Some(ns);
        spec
    };
    let paths = vec![
        in_ns(
            CAP_NS,
            path(
                "direct",
                "",
                Role::Direct,
                format!("http://{CAP_DIRECT}/small"),
                Via::Plain,
            ),
        ),
        in_ns(
            CAP_NS,
            path(
                "eBPF connect4 redirect (robin exec)",
                "",
                Role::Robin,
                format!("http://{CAP_IP}/small"),
                robin,
            ),
        ),
        in_ns(
            CAP_NAT_NS,
            path(
                "iptables nat REDIRECT",
                "",
                Role::Peer,
                format!("http://{CAP_IP}/small"),
                Via::Plain,
            ),
        ),
    ];
    [("keep-alive", false), ("new connection per request", true)]
        .into_iter()
        .map(|(title, close)| {
            let load = Load::Wrk {
                connections: CONNECTIONS,
                close,
            };
            rounds::run(&scenario(title, load, paths.clone()), &plan, robin_bin)
        })
        .collect()
}
