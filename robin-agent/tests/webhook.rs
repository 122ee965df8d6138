//! `robin webhook`: AdmissionReview fixtures in (tests/fixtures/webhook), the JSON Patch out,
//! applied with an independent RFC 6902 implementation (`json-patch`), the patched pod checked
//! field by field, re-reviewed (idempotence) and validated against the Kubernetes 1.33 schemas
//! with the validator `cargo xtask manifests` uses. One test runs the real TLS server.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
};

use base64::Engine as _;
use robin_agent::webhook::{self, Distro, Settings, review};
use serde_json::{Value, json};

const IMAGE: &str = "ghcr.io/robin-dev/robin:0.1.0";

fn settings() -> Settings {
    Settings {
        await_image: IMAGE.into(),
        default_audience: None,
        default_distro: Distro::Debian,
        trust_bundle: "robin-trust-bundle".into(),
    }
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/webhook")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The response of a review, and the pod with its patch (if any) applied.
fn mutate(review_json: &Value, s: &Settings) -> (Value, Value) {
    let out = review::respond(review_json.to_string().as_bytes(), s).unwrap();
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    let resp = out["response"].clone();
    assert_eq!(
        resp["uid"], review_json["request"]["uid"],
        "the uid is echoed"
    );
    let mut pod = review_json["request"]["object"].clone();
    if let Some(patch) = resp["patch"].as_str() {
        assert_eq!(resp["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    (resp, pod)
}

/// Reviews the patched pod again, as the API server does on reinvocation: nothing to add.
fn assert_idempotent(review_json: &Value, patched: &Value, s: &Settings) {
    let mut again = review_json.clone();
    again["request"]["object"] = patched.clone();
    let (resp, pod) = mutate(&again, s);
    assert_eq!(resp["allowed"], true);
    assert!(
        resp.get("patch").is_none(),
        "re-invoked webhook patched again: {resp}"
    );
    assert_eq!(&pod, patched);
}

fn validator() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("tools/venv/bin/kubernetes-validate")
}

/// The patched pod is a valid v1 Pod for Kubernetes 1.33 (strict: unknown fields fail). A
/// ReplicaSet's pod reaches admission with `generateName` only; the name is filled in as the API
/// server does after admission (the validator needs one).
fn assert_valid_pod(pod: &Value) {
    let mut pod = pod.clone();
    if pod["metadata"].get("name").is_none() {
        let generated = format!("{}x7k2p", pod["metadata"]["generateName"].as_str().unwrap());
        pod["metadata"]["name"] = json!(generated);
    }
    let bin = validator();
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask setup`",
        bin.display()
    );
    let mut child = Command::new(&bin)
        .args(["--strict", "-k", "1.33.0", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pod.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("passed for resource"),
        "invalid pod:\n{text}\n{pod:#}"
    );
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

fn mount_at<'a>(container: &'a Value, path: &str) -> Option<&'a Value> {
    container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"] == path)
}

fn volume<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == name)
}

#[test]
fn plain_pod_gets_token_trust_and_await() {
    let review_json = fixture("plain.json");
    let (resp, pod) = mutate(&review_json, &settings());
    assert_eq!(resp["allowed"], true);
    let init = &pod["spec"]["initContainers"];
    assert_eq!(init.as_array().unwrap().len(), 1);
    assert_eq!(init[0]["name"], "robin-await");
    assert_eq!(init[0]["image"], IMAGE);
    assert_eq!(
        init[0]["args"],
        json!(["await", "--port", "443", "--timeout-secs", "120"])
    );
    let token =
        &volume(&pod, "robin-token").unwrap()["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "broker.example.com");
    assert_eq!(token["path"], "robin-token");
    assert_eq!(
        volume(&pod, "robin-trust-bundle").unwrap()["configMap"]["name"],
        "robin-trust-bundle"
    );
    let app = &pod["spec"]["containers"][0];
    assert_eq!(
        mount_at(app, "/var/run/secrets/tokens").unwrap()["name"],
        "robin-token"
    );
    let store = "/etc/ssl/certs/ca-certificates.crt";
    assert_eq!(
        mount_at(app, store).unwrap()["subPath"],
        "ca-certificates.crt"
    );
    for var in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"] {
        assert_eq!(env_of(app, var), Some(store), "{var}");
    }
    assert_eq!(env_of(app, "JAVA_TOOL_OPTIONS"), None);
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["robin.dev/inject"], "true");
    assert_eq!(
        ann["robin.dev/token-path"],
        "/var/run/secrets/tokens/robin-token"
    );
    // What was there stays.
    assert!(mount_at(app, "/var/run/secrets/kubernetes.io/serviceaccount").is_some());
    assert_idempotent(&review_json, &pod, &settings());
    assert_valid_pod(&pod);
}

#[test]
fn busy_pod_keeps_its_own_parts_and_gets_await_first() {
    let review_json = fixture("busy.json");
    let (resp, pod) = mutate(&review_json, &settings());
    assert_eq!(resp["allowed"], true, "{resp}");
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    let names: Vec<_> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["robin-await", "migrate"]);
    // The first capture port of robin.dev/capture-ports is probed.
    assert_eq!(init[0]["args"][2], "8443");
    // Labelled only: the annotation robin node reads is added, the others are kept.
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["robin.dev/inject"], "true");
    assert_eq!(ann["robin.dev/rules"], "internal-apis");
    let rhel = "/etc/pki/tls/certs/ca-bundle.crt";
    let (app, sidecar, migrate) = (
        &pod["spec"]["containers"][0],
        &pod["spec"]["containers"][1],
        &init[1],
    );
    for c in [app, sidecar, migrate] {
        assert_eq!(
            mount_at(c, "/var/run/secrets/tokens").unwrap()["name"],
            "robin-token"
        );
        assert_eq!(mount_at(c, rhel).unwrap()["name"], "robin-trust-bundle");
        assert_eq!(
            mount_at(c, "/etc/robin/trust/bundle.jks").unwrap()["subPath"],
            "bundle.jks"
        );
        assert!(
            env_of(c, "JAVA_TOOL_OPTIONS")
                .unwrap()
                .contains("trustStore=/etc/robin/trust/bundle.jks")
        );
        assert_eq!(env_of(c, "NODE_EXTRA_CA_CERTS"), Some(rhel));
    }
    assert_eq!(env_of(app, "JAVA_OPTS"), Some("-Xmx512m"));
    assert_eq!(env_of(migrate, "DB_HOST"), Some("db"));
    assert!(mount_at(app, "/data").is_some());
    // A container's own variable wins.
    assert_eq!(env_of(sidecar, "SSL_CERT_FILE"), Some("/opt/certs/own.pem"));
    assert_eq!(env_of(app, "SSL_CERT_FILE"), Some(rhel));
    let token =
        &volume(&pod, "robin-token").unwrap()["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "api://billing");
    assert!(volume(&pod, "data").is_some());
    assert_idempotent(&review_json, &pod, &settings());
    assert_valid_pod(&pod);
}

#[test]
fn a_pod_that_did_not_opt_in_is_admitted_unchanged() {
    let review_json = fixture("not-opted-in.json");
    let (resp, pod) = mutate(&review_json, &settings());
    assert_eq!(resp["allowed"], true);
    assert!(resp.get("patch").is_none());
    assert_eq!(pod, review_json["request"]["object"]);
}

fn denial(review_json: &Value, s: &Settings) -> String {
    let (resp, _) = mutate(review_json, s);
    assert_eq!(resp["allowed"], false, "{resp}");
    assert!(resp.get("patch").is_none());
    assert_eq!(resp["status"]["code"], 400);
    resp["status"]["message"].as_str().unwrap().to_owned()
}

#[test]
fn something_else_at_the_token_path_is_refused() {
    let msg = denial(&fixture("token-path-taken.json"), &settings());
    assert!(
        msg.contains(
            r#"container "app" already mounts volume "tokens" at /var/run/secrets/tokens"#
        ),
        "{msg}"
    );
    // The same pod with another token path is fine.
    let mut moved = fixture("token-path-taken.json");
    moved["request"]["object"]["metadata"]["annotations"]["robin.dev/token-path"] =
        json!("/var/run/secrets/robin/token");
    let (resp, pod) = mutate(&moved, &settings());
    assert_eq!(resp["allowed"], true, "{resp}");
    let app = &pod["spec"]["containers"][0];
    assert_eq!(
        mount_at(app, "/var/run/secrets/robin").unwrap()["name"],
        "robin-token"
    );
    assert_valid_pod(&pod);
}

#[test]
fn no_audience_is_refused_unless_there_is_a_default() {
    let review_json = fixture("no-audience.json");
    let msg = denial(&review_json, &settings());
    assert!(
        msg.contains("annotate the pod with robin.dev/audience"),
        "{msg}"
    );
    let s = Settings {
        default_audience: Some("sts.example.com".into()),
        ..settings()
    };
    let (resp, pod) = mutate(&review_json, &s);
    assert_eq!(resp["allowed"], true);
    let token =
        &volume(&pod, "robin-token").unwrap()["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "sts.example.com");
}

#[test]
fn bad_annotations_are_refused_with_the_annotation_named() {
    let cases = [
        (
            "robin.dev/distro",
            "gentoo",
            "robin.dev/distro: \"gentoo\" is not one of",
        ),
        (
            "robin.dev/token-path",
            "tokens/robin",
            "robin.dev/token-path: \"tokens/robin\" must be an absolute",
        ),
        (
            "robin.dev/token-path",
            "/robin-token",
            "robin.dev/token-path: \"/robin-token\"",
        ),
        (
            "robin.dev/capture-ports",
            "https",
            "robin.dev/capture-ports: \"https\"",
        ),
    ];
    for (key, value, expect) in cases {
        let mut r = fixture("plain.json");
        r["request"]["object"]["metadata"]["annotations"][key] = json!(value);
        let msg = denial(&r, &settings());
        assert!(msg.contains(expect), "{key}={value}: {msg}");
    }
}

#[test]
fn other_kinds_and_malformed_reviews_are_refused() {
    let msg = denial(&fixture("deployment.json"), &settings());
    assert!(
        msg.contains("v1 Pods only, got apps/v1 Deployment"),
        "{msg}"
    );
    let mut not_a_pod = fixture("plain.json");
    not_a_pod["request"]["object"]["spec"]["containers"] = json!("app");
    assert!(denial(&not_a_pod, &settings()).contains("request.object is not a Pod"));
    // No uid to answer to: an error (HTTP 400), so the API server applies failurePolicy.
    for body in [
        &b"{"[..],
        br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    ] {
        assert!(
            review::respond(body, &settings()).is_err(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[tokio::test]
async fn the_tls_server_answers_reviews() {
    use http_body_util::{BodyExt as _, Full};
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["robin-webhook.robin-system.svc".into()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let tls = webhook::tls_config(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(webhook::serve(listener, tls, Arc::new(settings()), async {
        let _ = stop_rx.await;
    }));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(robin_agent::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("robin-webhook.robin-system.svc").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut post = |body: Vec<u8>| {
        let req = http::Request::post("/mutate")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        send.send_request(req)
    };
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        post(fixture("plain.json").to_string().into_bytes()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["response"]["allowed"], true);
    assert_eq!(body["response"]["patchType"], "JSONPatch");
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        post(b"not json".to_vec()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status(), 400);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("not an AdmissionReview"));
    let _ = stop_tx.send(());
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}
