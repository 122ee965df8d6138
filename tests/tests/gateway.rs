//! `robin gateway`: clients that only set `HTTPS_PROXY`/`HTTP_PROXY` get their token through
//! the forward proxy, with the same interception, failure semantics and trust rules as captured
//! traffic. The gateway runs in its own namespace (its `/etc/hosts` names the upstream); clients
//! run beside it (`--clients own`) or in namespaces of their own, one per "pod", identified by
//! their source address through the (fake) API server's pod list (`--clients pods`).
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use robin_e2e::{
    ChildGuard, Netns, Pki, TempDir, Topology, command_in,
    fake_api::{FakeApi, GATEWAY_LABEL},
    logged_requests,
    node_fixture::{HOST, admin_get, metric, start_upstream},
    pod_etc, require_privileges, robin_bin, run, temp_dir, unique_id,
};
use serde_json::{Value, json};

/// A name that resolves to the upstream but no rule names: spliced.
const UNRULED: &str = "plain.test";
const TOKEN: &str = "gateway-own-token-1";
const LISTEN_PORT: u16 = 3128;
const ADMIN_PORT: u16 = 4001;
const WAIT: Duration = Duration::from_secs(30);

struct World {
    dir: TempDir,
    pki: Pki,
    topo: Topology,
    _upstream: ChildGuard,
    upstream_log: PathBuf,
}

impl World {
    fn new() -> Self {
        require_privileges();
        let dir = temp_dir("gateway");
        let pki = Pki::new(dir.path(), &[HOST, UNRULED]);
        let topo = Topology::new(0);
        let up = IpAddr::V4(topo.upstream_ip4);
        // kube-rs's client wants some system roots, even for a plain-http test API server.
        let roots = [pki.file("upstream-ca.crt")];
        pod_etc(&topo.pod, &[(HOST, up), (UNRULED, up)], &roots);
        let upstream_log = dir.path().join("upstream.log");
        let upstream = start_upstream(&topo, &pki, &upstream_log);
        Self {
            dir,
            pki,
            topo,
            _upstream: upstream,
            upstream_log,
        }
    }

    fn gateway_ns(&self) -> &Netns {
        &self.topo.pod
    }

    fn write_config(&self, source: &str) -> PathBuf {
        let path = self.dir.path().join("gateway.toml");
        let text = format!(
            "[tls]\nca_cert = {:?}\nca_key = {:?}\nupstream_roots = {:?}\n\n[[inject]]\nhosts = [\"{HOST}\"]\nsource = {source}\n",
            self.pki.file("robin-ca.crt"),
            self.pki.file("robin-ca.key"),
            self.pki.file("upstream-ca.crt"),
        );
        std::fs::write(&path, text).expect("writing the gateway config");
        path
    }

    /// `robin gateway` in the gateway namespace, ready (its `/readyz` says 200).
    fn start_gateway(&self, config: &Path, extra: &[&str]) -> ChildGuard {
        let log = std::fs::File::create(self.dir.path().join("gateway.log")).expect("log");
        let listen = format!("{}:{LISTEN_PORT}", extra_listen(extra));
        let admin = format!("127.0.0.1:{ADMIN_PORT}");
        let bin = robin_bin();
        let mut args = vec![
            "gateway",
            "--config",
            config.to_str().expect("utf-8 path"),
            "--admin-addr",
            &admin,
            "--listen",
            &listen,
        ];
        args.extend(extra.iter().filter(|a| !a.starts_with("listen=")));
        let child = command_in(self.gateway_ns(), None, bin.to_str().expect("path"), &args)
            .env("ROBIN_LOG", "info,robin_agent=debug")
            .stderr(log)
            .spawn()
            .expect("starting robin gateway");
        let guard = ChildGuard(child);
        let ns = self.gateway_ns().handle();
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = ns
                .run(|| admin_get(ADMIN_PORT, "/readyz"))
                .expect("entering the gateway namespace");
            if ready.is_some_and(|(s, _)| s == 200) {
                return guard;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready within {WAIT:?}: {}",
                self.gateway_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    fn upstream_requests(&self) -> Vec<Value> {
        logged_requests(&self.upstream_log)
    }

    /// `sh -c script` in `netns`, bounded in time.
    fn sh(&self, netns: &Netns, script: &str) -> Output {
        let mut cmd = command_in(netns, None, "timeout", &["60", "sh", "-c", script]);
        cmd.current_dir(self.dir.path());
        cmd.output().expect("running a client")
    }
}

/// `--listen` host from a test's extra arguments (`listen=IP`), loopback by default.
fn extra_listen(extra: &[&str]) -> String {
    extra
        .iter()
        .find_map(|a| a.strip_prefix("listen="))
        .unwrap_or("127.0.0.1")
        .to_owned()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "client failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Node 20 has no built-in `HTTPS_PROXY` support; this is what proxy agents do with it: a
/// CONNECT to the proxy, then TLS to the origin over that tunnel.
const NODE_CLIENT: &str = r#"
const http = require("http"), https = require("https"), tls = require("tls"), fs = require("fs");
const proxy = new URL(process.env.HTTPS_PROXY);
const target = new URL(process.argv[2]);
const ca = fs.readFileSync(process.argv[3]);
http.request({ host: proxy.hostname, port: proxy.port, method: "CONNECT", path: `${target.hostname}:443` })
  .on("connect", (res, socket) => {
    if (res.statusCode !== 200) { console.error("CONNECT", res.statusCode); process.exit(1); }
    const conn = tls.connect({ socket, servername: target.hostname, ca });
    https.get(target, { createConnection: () => conn, ca, port: 443 }, (r) => {
      let body = ""; r.on("data", (d) => (body += d)); r.on("end", () => console.log(body.trim()));
    }).on("error", (e) => { console.error(e); process.exit(1); });
  })
  .on("error", (e) => { console.error(e); process.exit(1); })
  .end();
"#;

/// The JDK's `HttpsURLConnection`, which honours `https.proxyHost`/`https.proxyPort`.
const JAVA_CLIENT: &str = r#"
import java.io.InputStream;
import java.net.URL;

public class Client {
    public static void main(String[] args) throws Exception {
        try (InputStream in = new URL(args[0]).openConnection().getInputStream()) {
            System.out.print(new String(in.readAllBytes()));
        }
    }
}
"#;

/// Every client of the brief, unmodified but for the proxy setting, gets the gateway's token
/// over TLS it verified against Robin's CA; the upstream sees TLS verified by Robin, the token,
/// and never a `Proxy-Authorization`.
#[test]
fn curl_python_node_and_java_through_https_proxy_get_the_token() {
    let w = World::new();
    let token = w.dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let config = w.write_config(&format!("{{ kind = \"file\", path = {token:?} }}"));
    let _gw = w.start_gateway(&config, &[]);
    std::fs::write(w.dir.path().join("client.js"), NODE_CLIENT).expect("client.js");
    std::fs::write(w.dir.path().join("Client.java"), JAVA_CLIENT).expect("Client.java");
    let ca = w.pki.file("robin-ca.crt");
    let ca = ca.display();
    let proxy = format!("http://127.0.0.1:{LISTEN_PORT}");
    run(
        "keytool",
        &[
            "-importcert",
            "-noprompt",
            "-alias",
            "robin",
            "-storetype",
            "PKCS12",
            "-storepass",
            "changeit",
            "-file",
            &ca.to_string(),
            "-keystore",
            &w.dir.path().join("trust.p12").display().to_string(),
        ],
    );
    let script = format!(
        "export HTTPS_PROXY={proxy} http_proxy={proxy}; \
         curl -sS --max-time 20 --cacert {ca} --proxy-header 'Proxy-Authorization: Basic dTpw' https://{HOST}/curl; echo; \
         python3 -c 'import ssl, urllib.request; print(urllib.request.urlopen(\"https://{HOST}/python\", context=ssl.create_default_context(cafile=\"{ca}\")).read().decode())'; \
         node client.js https://{HOST}/node {ca}; \
         java -Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort={LISTEN_PORT} -Djavax.net.ssl.trustStore=trust.p12 -Djavax.net.ssl.trustStorePassword=changeit Client.java https://{HOST}/java; echo; \
         curl -sS --max-time 20 -H 'Proxy-Authorization: Basic dTpw' http://{HOST}/absolute"
    );
    let lines = json_lines(&stdout(&w.sh(w.gateway_ns(), &script)));
    let paths: Vec<_> = lines.iter().map(|v| v["path"].clone()).collect();
    assert_eq!(
        paths,
        ["/curl", "/python", "/node", "/java", "/absolute"].map(|p| json!(p)),
        "{}",
        w.gateway_log()
    );
    for v in &lines {
        assert_eq!(
            v["authorization"],
            json!([format!("Bearer {TOKEN}")]),
            "{v}"
        );
        assert_eq!(v["proxy_authorization"], json!([]), "{v}");
        // The absolute-form `http://` request too: Robin originated TLS, verified for the host.
        // (Node names the port it was given: `api.test:443`.)
        let host = v["host"].as_str().map(|h| h.trim_end_matches(":443"));
        assert_eq!((v["tls"].as_bool(), host), (Some(true), Some(HOST)), "{v}");
    }
    // One registry: every client's requests under the rule, in OpenMetrics.
    let metrics = w
        .gateway_ns()
        .handle()
        .run(|| admin_get(ADMIN_PORT, "/metrics"))
        .expect("entering the gateway namespace")
        .expect("the admin plane answers")
        .1;
    let series = format!("robin_requests_total{{rule=\"{HOST}\",class=\"2xx\"}}");
    assert_eq!(metric(&metrics, &series), 5, "{metrics}");
    assert!(
        w.gateway_log().contains("resolved"),
        "the resolved address is logged: {}",
        w.gateway_log()
    );
}

/// An unruled CONNECT is a plain tunnel (the client sees the upstream's own certificate and no
/// token is added); targets the operator denied (loopback: the gateway's own admin plane) and
/// names that do not resolve are refused before any connection is made.
#[test]
fn unruled_is_tunnelled_denied_and_unresolvable_are_refused() {
    let w = World::new();
    let token = w.dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let config = w.write_config(&format!("{{ kind = \"file\", path = {token:?} }}"));
    let _gw = w.start_gateway(&config, &[]);
    let up_ca = w.pki.file("upstream-ca.crt");
    let script = format!(
        "export HTTPS_PROXY=http://127.0.0.1:{LISTEN_PORT}; \
         curl -sS --max-time 20 --cacert {} https://{UNRULED}/tunnel; echo; \
         curl -s --max-time 20 -o /dev/null -w '%{{http_connect}}\\n' https://localhost:{ADMIN_PORT}/readyz; \
         curl -s --max-time 20 -o /dev/null -w '%{{http_connect}}\\n' https://nowhere.test/",
        up_ca.display()
    );
    let out = w.sh(w.gateway_ns(), &script);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let tunnelled: Value =
        serde_json::from_str(lines.next().expect("tunnel answer")).expect("json");
    assert_eq!(tunnelled["path"], "/tunnel");
    assert_eq!(tunnelled["authorization"], json!([]));
    assert_eq!(lines.next(), Some("403"), "loopback is denied: {text}");
    assert_eq!(lines.next(), Some("502"), "unresolvable: {text}");
    assert_eq!(
        w.upstream_requests().len(),
        1,
        "only the tunnel reached the upstream"
    );
}

/// A client "pod": its own namespace, joined to the gateway's by a veth pair.
struct ClientPod {
    netns: Netns,
    ip: Ipv4Addr,
    gateway_ip: Ipv4Addr,
    /// Further addresses on the pod's link (`10.subnet.n.<host>` for each host given).
    extra: Vec<Ipv4Addr>,
}

fn client_pod(gateway: &Netns, subnet: u8, extra_hosts: &[u8]) -> ClientPod {
    let id = unique_id();
    let netns = Netns::new(format!("robin-{id}-cl"));
    let n = (id.parse::<u64>().unwrap_or(0) % 200) as u8 + 20;
    let (ip, gateway_ip) = (
        Ipv4Addr::new(10, subnet, n, 2),
        Ipv4Addr::new(10, subnet, n, 1),
    );
    let (veth_c, veth_g) = (format!("cc{id}"), format!("cg{id}"));
    run(
        "ip",
        &[
            "link",
            "add",
            &veth_c,
            "netns",
            netns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &veth_g,
            "netns",
            gateway.name(),
        ],
    );
    netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &veth_c]);
    let extra: Vec<_> = extra_hosts
        .iter()
        .map(|h| Ipv4Addr::new(10, subnet, n, *h))
        .collect();
    for ip in &extra {
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &veth_c]);
    }
    netns.ip(&["link", "set", &veth_c, "up"]);
    gateway.ip(&["addr", "add", &format!("{gateway_ip}/24"), "dev", &veth_g]);
    gateway.ip(&["link", "set", &veth_g, "up"]);
    ClientPod {
        netns,
        ip,
        gateway_ip,
        extra,
    }
}

fn labelled_pod(name: &str, namespace: &str, uid: &str, sa: &str, ip: Ipv4Addr) -> Value {
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid,
                     "labels": {GATEWAY_LABEL.0: GATEWAY_LABEL.1}},
        "spec": {"serviceAccountName": sa, "nodeName": "elsewhere"},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

/// `curl` from `pod` (from `source` when given) through the gateway: the HTTP status and body.
fn curl_via(w: &World, pod: &ClientPod, source: Option<Ipv4Addr>) -> (String, String) {
    let interface = source
        .map(|s| format!("--interface {s}"))
        .unwrap_or_default();
    let script = format!(
        "curl -s --max-time 20 {interface} -x http://{}:{LISTEN_PORT} --cacert {} -w '\\n%{{http_connect}} %{{http_code}}' https://{HOST}/",
        pod.gateway_ip,
        w.pki.file("robin-ca.crt").display()
    );
    let out = w.sh(&pod.netns, &script);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, codes) = text.rsplit_once('\n').unwrap_or(("", &text));
    (codes.trim().to_owned(), body.to_owned())
}

/// One gateway in front of two client pods: each is served with a token minted for itself (its
/// namespace, its ServiceAccount, bound to it), found by its source address; an address that
/// is no known pod is refused with 403, never served with the gateway's identity.
#[test]
fn separate_gateway_serves_each_pod_its_own_token_and_refuses_strangers() {
    let w = World::new();
    let api = w
        .gateway_ns()
        .handle()
        .run(FakeApi::start)
        .expect("entering the gateway namespace");
    // The stranger's address sits on pod A's link: only the pod table tells them apart.
    let a = client_pod(w.gateway_ns(), 233, &[99]);
    let stranger = a.extra[0];
    let b = client_pod(w.gateway_ns(), 234, &[]);
    api.upsert(labelled_pod("alpha-0", "team-a", "uid-a", "alpha-sa", a.ip));
    api.upsert(labelled_pod("bravo-0", "team-b", "uid-b", "default", b.ip));
    api.open();
    let agent_token = w.dir.path().join("agent-token");
    std::fs::write(&agent_token, "gateway-sa-token\n").expect("agent token");
    let source = format!(
        "{{ kind = \"token_request\", audience = \"{HOST}\", api_server = \"{}\", allow_insecure_http = true, ca_file = {:?}, token_file = {agent_token:?} }}",
        api.url(),
        w.pki.file("upstream-ca.crt"),
    );
    let config = w.write_config(&source);
    let api_url = api.url();
    let _gw = w.start_gateway(
        &config,
        &[
            "listen=0.0.0.0",
            "--clients",
            "pods",
            "--kube-api",
            &api_url,
        ],
    );
    let (codes_a, body_a) = curl_via(&w, &a, None);
    let (codes_b, body_b) = curl_via(&w, &b, None);
    assert_eq!(
        (codes_a.as_str(), codes_b.as_str()),
        ("200 200", "200 200"),
        "{}",
        w.gateway_log()
    );
    let auth = |body: &str| {
        serde_json::from_str::<Value>(body).expect("echo")["authorization"][0]
            .as_str()
            .expect("a token")
            .to_owned()
    };
    let (tok_a, tok_b) = (auth(&body_a), auth(&body_b));
    assert_ne!(tok_a, tok_b);
    let minted = api.token_requests();
    for (tok, ns, sa, pod) in [
        (&tok_a, "team-a", "alpha-sa", "alpha-0"),
        (&tok_b, "team-b", "default", "bravo-0"),
    ] {
        let m = minted
            .iter()
            .find(|m| format!("Bearer {}", m.token) == *tok)
            .unwrap_or_else(|| panic!("{tok} was not minted: {minted:?}"));
        assert_eq!((m.namespace.as_str(), m.service_account.as_str()), (ns, sa));
        assert_eq!(m.request["spec"]["boundObjectRef"]["name"], pod);
    }
    let (codes, body) = curl_via(&w, &a, Some(stranger));
    assert!(codes.starts_with("403"), "stranger: {codes} {body}");
    assert!(!body.contains("Bearer"), "{body}");
    assert_eq!(
        api.token_requests().len(),
        minted.len(),
        "nothing minted for a stranger"
    );
    // A second pod claiming B's address (a stale entry, a misconfigured CNI): neither is
    // served, rather than one of them with the other's identity.
    api.upsert(labelled_pod(
        "charlie-0",
        "team-c",
        "uid-c",
        "default",
        b.ip,
    ));
    let deadline = Instant::now() + WAIT;
    loop {
        let (codes, _) = curl_via(&w, &b, None);
        if codes.starts_with("403") {
            break;
        }
        assert!(Instant::now() < deadline, "still served: {codes}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
