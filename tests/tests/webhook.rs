//! `robin webhook` and `robin node` together: a pod spec as a Deployment would submit it (only
//! opted in, with an audience) goes through the webhook; the JSON Patch is applied as the API
//! server would; the pod then runs as the patched spec says: the agent sees the patched
//! annotations through the (fake) API server, the "kubelet" writes the projected token where the
//! patched volume mount puts it, the injected init container (`robin await`, its args from the
//! patch) returns only once the pod is captured, and the app container, run with the patched
//! environment, gets the token injected into its request.
use std::{path::Path, process::Stdio};

use base64::Engine as _;
use robin_agent::webhook::{Distro, Settings, review};
use robin_e2e::{
    BpfPins, ChildGuard, Pki, command_in,
    node_fixture::{
        FakeApi, HOST, KubeletCgroups, PodNet, admin_get, default_rule_set, free_port, metric,
        pod_json, pod_process, pod_state, pod_uid, start_agent, wait_for, write_node_config,
    },
    require_privileges, robin_bin, temp_dir,
};
use serde_json::{Value, json};

/// The pod of `robin-agent/tests/fixtures/webhook/plain.json`, its token path moved under `dir`
/// (the test's "pods" share the host's filesystem), through the webhook: the patched pod.
fn patched_pod(dir: &Path) -> Value {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../robin-agent/tests/fixtures/webhook/plain.json");
    let mut review_json: Value = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    let token_path = dir.join("tokens/robin-token");
    review_json["request"]["object"]["metadata"]["annotations"]["robin.dev/token-path"] =
        json!(token_path.to_str().unwrap());
    let settings = Settings {
        await_image: "ghcr.io/robin-dev/robin:test".into(),
        default_audience: None,
        default_distro: Distro::Debian,
        trust_bundle: "robin-trust-bundle".into(),
    };
    let out = review::respond(review_json.to_string().as_bytes(), &settings).unwrap();
    assert_eq!(out["response"]["allowed"], true, "{out}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(out["response"]["patch"].as_str().expect("a patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = review_json["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

/// What the kubelet does for the projected volume: the token file at the container's mount of
/// `robin-token`, named by the volume's `path`. Its value carries the audience asked for (in the
/// token68 set, as a real JWT).
fn write_projected_token(pod: &Value, container: &Value) -> String {
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "robin-token")
        .expect("the patch adds the token volume");
    let source = &volume["projected"]["sources"][0]["serviceAccountToken"];
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "robin-token")
        .expect("the patch mounts the token volume");
    let dir = Path::new(mount["mountPath"].as_str().unwrap());
    std::fs::create_dir_all(dir).unwrap();
    let token = format!("sa-token.aud.{}", source["audience"].as_str().unwrap());
    std::fs::write(dir.join(source["path"].as_str().unwrap()), &token).unwrap();
    token
}

#[test]
fn a_webhook_patched_pod_is_captured_and_served_its_token() {
    require_privileges();
    let dir = temp_dir("webhook");
    let pki = Pki::new(dir.path(), &[HOST]);
    let net = PodNet::new(&pki, dir.path().join("up.log"));
    let pod = patched_pod(dir.path());
    let app = &pod["spec"]["containers"][0];
    let token = write_projected_token(&pod, app);

    let mut cgroups = KubeletCgroups::new();
    let uid = pod_uid();
    let cg = cgroups.systemd(&uid, "besteffort", "cri-containerd-app");
    // The pod sandbox: a process holding the pod's network namespace and cgroup.
    let _sandbox = pod_process(net.netns(), &cg);
    let config = dir.path().join("node.toml");
    write_node_config(&config, &pki, &default_rule_set());
    let api = FakeApi::start();
    // The agent sees exactly the annotations the patched pod has.
    let annotations = pod["metadata"]["annotations"].clone();
    api.upsert(pod_json("broker-client", &uid, "BestEffort", annotations));
    api.open();
    let (admin, pins, log) = (free_port(), BpfPins::new(), dir.path().join("agent.log"));
    let _agent = start_agent(&api, &config, &cgroups, &pins, admin, "info", &log);
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // The injected init container, first, with the patched args.
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["name"], "robin-await");
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let robin = robin_bin();
    let mut awaiting = ChildGuard(
        command_in(net.netns(), Some(&cg), robin.to_str().unwrap(), &args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the init container"),
    );
    let status = wait_for("the init container to finish", || {
        awaiting.0.try_wait().unwrap()
    });
    assert!(status.success(), "robin await failed:\n{}", agent_log());
    let state = pod_state(admin, &uid).expect("the pod in /debug/pods");
    assert_eq!(state["state"], "captured", "{state}");
    assert_eq!(
        state["token_path"], pod["metadata"]["annotations"]["robin.dev/token-path"],
        "{state}"
    );

    // The app container with the environment the patch gave it.
    let mut curl = command_in(
        net.netns(),
        Some(&cg),
        "curl",
        &[
            "-sS",
            "--max-time",
            "20",
            &format!("https://{HOST}/webhook"),
        ],
    );
    curl.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for e in app["env"].as_array().expect("the patch sets env") {
        curl.env(e["name"].as_str().unwrap(), e["value"].as_str().unwrap());
    }
    let out = curl.output().expect("running curl");
    assert!(
        out.status.success(),
        "curl: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent_log()
    );
    let seen: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {token}")]),
        "{}",
        agent_log()
    );
    let m = admin_get(admin, "/metrics").unwrap().1;
    assert_eq!(metric(&m, "robin_pods{state=\"captured\"}"), 1, "{m}");
    assert!(
        !agent_log().contains(&token),
        "the token reached the agent's log"
    );
}
