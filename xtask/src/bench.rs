//! `cargo xtask bench [--smoke]`: Robin side by side with the direct path and with proxies users
//! pick instead, measured in one run on one machine and reported as ratios.
//!
//! Topology: a "client" namespace and an "upstream" namespace joined by veth (no route out).
//! nginx in the upstream namespace serves `/small` (a few bytes) and `/large` over HTTPS (h1 +
//! h2) and plain HTTP. Load generators run in the client namespace: wrk (HTTP/1.1, latency
//! percentiles), h2load (HTTP/2), curl (bulk download).
//!
//! Robin is measured as users run it: `robin exec -- <load generator>`, i.e. the load
//! generator's connects are captured by eBPF. Peers (nginx, haproxy TLS fronts injecting the same
//! header) run as explicit reverse proxies in the client namespace: the load generator dials them
//! directly (no transparent capture), which favours them slightly.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{build_robin, status, workspace_root};

const CLIENT_NS: &str = "robin-bench-client";
const UPSTREAM_NS: &str = "robin-bench-up";
const CLIENT_IP: &str = "10.254.0.1";
const UPSTREAM_IP: &str = "10.254.0.2";
const RULED: &str = "bench.test";
const UNRULED: &str = "bulk.test";
const TOKEN: &str = "bench-token-0123456789";
const NGINX_PEER_PORT: u16 = 8443;
const HAPROXY_PEER_PORT: u16 = 8444;
const CONNECTIONS: u32 = 16;

const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("/usr/bin/wrk", "wrk"),
    ("/usr/bin/h2load", "nghttp2-client"),
    ("/usr/sbin/nginx", "nginx-light"),
    ("/usr/sbin/haproxy", "haproxy"),
];

struct Settings {
    seconds: u32,
    large_mib: u64,
    peers: bool,
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
}

struct Row {
    scenario: String,
    direct: Measurement,
    robin: Measurement,
    peers: Vec<(&'static str, Measurement)>,
}

struct World {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for World {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [CLIENT_NS, UPSTREAM_NS] {
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
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Debian's postinst would start the daemons on the host; we start our own.
            .env("RUNLEVEL", "1"),
    )?;
    let _ = Command::new("pkill").args(["-x", "nginx"]).status();
    let _ = Command::new("pkill").args(["-x", "haproxy"]).status();
    Ok(())
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
            "subjectAltName=DNS:{RULED},DNS:{UNRULED},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
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
    Ok(())
}

fn spawn_in(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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

fn build_world(s: &Settings) -> anyhow::Result<World> {
    let dir = std::env::temp_dir().join(format!("robin-bench-{}", std::process::id()));
    fs::create_dir_all(dir.join("www"))?;
    let mut world = World {
        dir: dir.clone(),
        children: Vec::new(),
    };
    for ns in [CLIENT_NS, UPSTREAM_NS] {
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

    fs::write(
        dir.join("robin.toml"),
        format!(
            "[tls]\nca_cert = \"{d}/robin-ca.crt\"\nca_key = \"{d}/robin-ca.key\"\nupstream_roots = \"{d}/upstream-ca.crt\"\n\n\
             [capture]\nports = [80, 443]\n\n[[inject]]\nhosts = [\"{RULED}\"]\nsource = {{ kind = \"file\", path = \"{d}/token\" }}\n"
        ),
    )?;
    Ok(world)
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

pub fn run(smoke: bool) -> anyhow::Result<()> {
    let s = if smoke {
        Settings {
            seconds: 2,
            large_mib: 64,
            peers: true,
        }
    } else {
        Settings {
            seconds: 10,
            large_mib: 1024,
            peers: true,
        }
    };
    ensure_tools()?;
    let robin_bin = build_robin(true)?;
    let world = build_world(&s)?;
    let config = world.dir.join("robin.toml");
    let robin = Some((robin_bin.as_path(), config.as_path()));
    let d = s.seconds;
    let c = CONNECTIONS;
    let wrk = |url: &str, extra: &str| format!("wrk -t1 -c{c} -d{d}s --latency {extra} {url}");
    let h2 = |url: &str| format!("h2load -c{c} -m10 -D{d} {url}");

    let mut rows = Vec::new();
    let keepalive = wrk(&format!("https://{RULED}/small"), "");
    let mut peers = Vec::new();
    if s.peers {
        peers.push((
            "nginx",
            measure(
                None,
                &wrk(&format!("https://127.0.0.1:{NGINX_PEER_PORT}/small"), ""),
                parse_wrk,
            )?,
        ));
        peers.push((
            "haproxy",
            measure(
                None,
                &wrk(&format!("https://127.0.0.1:{HAPROXY_PEER_PORT}/small"), ""),
                parse_wrk,
            )?,
        ));
    }
    rows.push(Row {
        scenario: "TLS intercept + inject, HTTP/1.1 keep-alive".into(),
        direct: measure(None, &keepalive, parse_wrk)?,
        robin: measure(robin, &keepalive, parse_wrk)?,
        peers,
    });
    let h2url = format!("https://{RULED}/small");
    let mut peers = Vec::new();
    if s.peers {
        peers.push((
            "nginx",
            measure(
                None,
                &h2(&format!("https://127.0.0.1:{NGINX_PEER_PORT}/small")),
                parse_h2load,
            )?,
        ));
    }
    rows.push(Row {
        scenario: "TLS intercept + inject, HTTP/2 (10 streams/conn)".into(),
        direct: measure(None, &h2(&h2url), parse_h2load)?,
        robin: measure(robin, &h2(&h2url), parse_h2load)?,
        peers,
    });
    let per_conn = wrk(&format!("https://{RULED}/small"), "-H 'Connection: close'");
    rows.push(Row {
        scenario: "TLS intercept + inject, new connection per request".into(),
        direct: measure(None, &per_conn, parse_wrk)?,
        robin: measure(robin, &per_conn, parse_wrk)?,
        peers: Vec::new(),
    });
    let plain = wrk(&format!("http://{RULED}/small"), "");
    rows.push(Row {
        scenario: "plain HTTP inject, keep-alive".into(),
        direct: measure(None, &plain, parse_wrk)?,
        robin: measure(robin, &plain, parse_wrk)?,
        peers: Vec::new(),
    });
    let bulk = format!(
        "echo SPEED $(curl -sS -o /dev/null -w '%{{speed_download}}' https://{UNRULED}/large)"
    );
    rows.push(Row {
        scenario: format!("passthrough (splice), {} MiB download", s.large_mib),
        direct: measure(None, &bulk, parse_curl_speed)?,
        robin: measure(robin, &bulk, parse_curl_speed)?,
        peers: Vec::new(),
    });
    drop(world);

    let report = render(&rows, &s, smoke)?;
    print!("{report}");
    let out = workspace_root().join("bench/results");
    fs::create_dir_all(&out)?;
    let name = if smoke { "smoke.md" } else { "latest.md" };
    fs::write(out.join(name), &report)?;
    println!("written to bench/results/{name}");
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

fn render(rows: &[Row], s: &Settings, smoke: bool) -> anyhow::Result<String> {
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
         Ratios are taken within this run. Peers are explicit reverse proxies (the client dials them); \
         Robin captures transparently with eBPF.",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        s.seconds
    )?;
    writeln!(r)?;
    writeln!(
        r,
        "| scenario | path | req/s | p50 ms | p99 ms | mean ms | MiB/s | robin ÷ this |"
    )?;
    writeln!(r, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for row in rows {
        let robin_rate = row.robin.mib_s.unwrap_or(row.robin.rps);
        let mut line = |path: &str, m: &Measurement, ratio: bool| -> std::fmt::Result {
            let rate = m.mib_s.unwrap_or(m.rps);
            let ratio = if ratio && rate > 0.0 {
                format!("{:.2}", robin_rate / rate)
            } else {
                "–".into()
            };
            writeln!(
                r,
                "| {} | {path} | {} | {} | {} | {} | {} | {ratio} |",
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
        line("direct", &row.direct, true)?;
        line("robin", &row.robin, false)?;
        for (name, m) in &row.peers {
            line(name, m, true)?;
        }
    }
    writeln!(r)?;
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
    writeln!(
        r,
        "Versions: {}; {}; {}; {}; {}; {}.",
        version("robin", &["--version"]).replace("not installed", "robin (this tree)"),
        version("nginx", &["-v"]),
        version("haproxy", &["-v"]),
        version("wrk", &["--version"]),
        version("h2load", &["--version"]),
        version("curl", &["--version"]),
    )?;
    Ok(r)
}
