//! `cargo xtask demo`: Robin's main job on a throwaway world.
//!
//! A "pod" network namespace runs an unmodified `curl` under `robin exec`; an "upstream"
//! namespace serves HTTPS and echoes the `Authorization` header it receives. The pod trusts the
//! demo Robin CA through its system trust store (as a platform would mount it). The demo shows
//! the injected token, rotates the token file and shows the new one on the next request of the
//! same process, and shows that a host with no rule is spliced through with the upstream's own
//! certificate. Then the same pod namespace is captured by `robin node` instead ([`node`]), and
//! the demo shows `/debug/pods` and the agent's metrics. Everything is removed at the end, also
//! on failure.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{build_robin, status};

mod node;

const POD_NS: &str = "robin-demo-pod";
const UPSTREAM_NS: &str = "robin-demo-up";
const POD_IP: &str = "10.253.0.1";
const UPSTREAM_IP: &str = "10.253.0.2";
const RULED_HOST: &str = "api.demo.test";
const OTHER_HOST: &str = "other.demo.test";

const UPSTREAM_PY: &str = r#"
import http.server, json, ssl, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"host": self.headers.get("Host"),
                           "authorization": self.headers.get_all("Authorization") or []}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer((sys.argv[1], 443), Echo)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

/// Removes what the demo created, in reverse order, whatever happened.
struct World {
    dir: PathBuf,
    upstream: Option<Child>,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut child) = self.upstream.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [POD_NS, UPSTREAM_NS] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn sh(cmd: &str) -> anyhow::Result<()> {
    status(Command::new("sh").args(["-ec", cmd]))
}

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn make_ca(dir: &Path, name: &str, subject: &str) -> anyhow::Result<()> {
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{name}.key"),
        ],
        dir,
    )?;
    openssl(
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
            subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &format!("{name}.crt"),
        ],
        dir,
    )
}

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

pub fn run() -> anyhow::Result<()> {
    let robin = build_robin(false)?;
    let dir = std::env::temp_dir().join(format!("robin-demo-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let mut world = World {
        dir: dir.clone(),
        upstream: None,
    };
    for ns in [POD_NS, UPSTREAM_NS] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }

    step("A pre-provisioned Robin CA, and an upstream with its own CA");
    make_ca(&dir, "robin-ca", "/CN=Robin Demo CA")?;
    make_ca(&dir, "upstream-ca", "/CN=Demo Upstream CA")?;
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "upstream.key",
        ],
        &dir,
    )?;
    openssl(
        &[
            "req",
            "-new",
            "-key",
            "upstream.key",
            "-subj",
            "/CN=demo upstream",
            "-out",
            "upstream.csr",
        ],
        &dir,
    )?;
    fs::write(
        dir.join("upstream.ext"),
        format!("subjectAltName=DNS:{RULED_HOST},DNS:{OTHER_HOST}\nextendedKeyUsage=serverAuth\n"),
    )?;
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "upstream.csr",
            "-CA",
            "upstream-ca.crt",
            "-CAkey",
            "upstream-ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-sha256",
            "-extfile",
            "upstream.ext",
            "-out",
            "upstream.crt",
        ],
        &dir,
    )?;
    println!("robin CA: {}", dir.join("robin-ca.crt").display());

    step("Two namespaces joined by veth, no route out: a pod and an upstream");
    sh(&format!(
        "ip netns add {POD_NS}; ip netns add {UPSTREAM_NS}
         ip -n {POD_NS} link set lo up; ip -n {UPSTREAM_NS} link set lo up
         ip link add rdemo-pod netns {POD_NS} type veth peer name rdemo-up netns {UPSTREAM_NS}
         ip -n {POD_NS} addr add {POD_IP}/24 dev rdemo-pod; ip -n {POD_NS} link set rdemo-pod up
         ip -n {UPSTREAM_NS} addr add {UPSTREAM_IP}/24 dev rdemo-up; ip -n {UPSTREAM_NS} link set rdemo-up up"
    ))?;
    // The pod's view of /etc, as a platform would mount it: name resolution and a trust bundle
    // that includes the Robin CA. No proxy variable, no client flag.
    let pod_etc = Path::new("/etc/netns").join(POD_NS);
    fs::create_dir_all(pod_etc.join("ssl/certs"))?;
    fs::write(
        pod_etc.join("hosts"),
        format!("127.0.0.1 localhost\n{UPSTREAM_IP} {RULED_HOST} {OTHER_HOST}\n"),
    )?;
    let bundle = [
        fs::read_to_string(dir.join("robin-ca.crt"))?,
        fs::read_to_string(dir.join("upstream-ca.crt"))?,
    ]
    .concat();
    fs::write(pod_etc.join("ssl/certs/ca-certificates.crt"), bundle)?;

    step(&format!(
        "Upstream HTTPS server at {UPSTREAM_IP}:443, echoing the Authorization it receives"
    ));
    fs::write(dir.join("upstream.py"), UPSTREAM_PY)?;
    let mut upstream = Command::new("ip")
        .args(["netns", "exec", UPSTREAM_NS, "python3"])
        .arg(dir.join("upstream.py"))
        .args([UPSTREAM_IP])
        .arg(dir.join("upstream.crt"))
        .arg(dir.join("upstream.key"))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the upstream")?;
    let ready = {
        use std::io::BufRead;
        let stdout = upstream.stdout.take().context("upstream stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        line.starts_with("ready")
    };
    world.upstream = Some(upstream);
    if !ready {
        bail!("the demo upstream did not start");
    }

    let token = dir.join("token");
    fs::write(&token, "demo-token-1\n")?;
    let config = dir.join("robin.toml");
    fs::write(
        &config,
        format!(
            r#"[tls]
ca_cert = "{ca}"
ca_key = "{key}"
upstream_roots = "{up}"

[capture]
ports = [443]

[[inject]]
hosts = ["{RULED_HOST}"]
source = {{ kind = "file", path = "{token}" }}
"#,
            ca = dir.join("robin-ca.crt").display(),
            key = dir.join("robin-ca.key").display(),
            up = dir.join("upstream-ca.crt").display(),
            token = token.display(),
        ),
    )?;
    println!("{}", fs::read_to_string(&config)?);

    // The workload: plain curl calls with an app-side placeholder credential. Between the two
    // ruled requests it waits on a FIFO while the demo rotates the token file.
    let fifo = dir.join("rotated");
    sh(&format!("mkfifo {}", fifo.display()))?;
    let workload = format!(
        "echo '--- curl https://{RULED_HOST}/ (app sends: Authorization: Bearer app-placeholder)'
         curl -sS -H 'Authorization: Bearer app-placeholder' https://{RULED_HOST}/
         echo '--- (token file rotated) same process, next request'
         read _ < {fifo}
         curl -sS -H 'Authorization: Bearer app-placeholder' https://{RULED_HOST}/
         echo '--- certificate issuers seen by the app'
         printf '%s: ' {RULED_HOST}; curl -sS -o /dev/null -w '%{{certs}}' https://{RULED_HOST}/ | grep -m1 '^Issuer:' || true
         printf '%s: ' {OTHER_HOST}; curl -sS -o /dev/null -w '%{{certs}}' https://{OTHER_HOST}/ | grep -m1 '^Issuer:' || true
         echo '--- curl https://{OTHER_HOST}/ (no rule: spliced, never decrypted)'
         curl -sS -H 'Authorization: Bearer app-placeholder' https://{OTHER_HOST}/",
        fifo = fifo.display()
    );
    step("robin exec -- sh -c '<curl calls>'   (inside the pod namespace, no proxy settings)");
    let mut app = Command::new("ip")
        .args(["netns", "exec", POD_NS])
        .arg(&robin)
        .arg("exec")
        .arg("--config")
        .arg(&config)
        .args(["--", "sh", "-ec", &workload])
        .env("ROBIN_LOG", "warn")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .spawn()
        .context("starting robin exec")?;
    // Rotate once the first response is out, then release the workload.
    std::thread::sleep(Duration::from_millis(1500));
    fs::write(dir.join("token.new"), "demo-token-2\n")?;
    fs::rename(dir.join("token.new"), &token)?;
    fs::write(&fifo, "go\n").context("releasing the workload")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        if let Some(st) = app.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = app.kill();
            bail!("the demo workload did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !st.success() {
        bail!("robin exec exited with {st}");
    }
    node::run(&node::Act {
        robin: robin.clone(),
        dir: dir.clone(),
        pod_ns: POD_NS,
        ruled_host: RULED_HOST,
    })?;
    step("Done: the app never held the token; Robin injected the current one per request");
    drop(world);
    Ok(())
}
