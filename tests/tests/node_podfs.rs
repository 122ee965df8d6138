//! `robin node` reads a pod's files inside the pod's own root, never in the agent's. Pods here
//! are like real containers: a network namespace, kubelet-laid-out cgroups, and a mount
//! namespace of their own whose mounts (a tmpfs over `/run`, a private volume) the test's own
//! view — the agent's — does not have.
use std::path::Path;

use robin_e2e::{
    BpfPins, ChildGuard, Pki, TempDir,
    node_fixture::{
        FakeApi, HOST, KubeletCgroups, PodNet, admin_get, curl_status, default_rule_set, free_port,
        pod_json, pod_process, pod_process_with_mounts, pod_state, pod_uid, start_agent, wait_for,
        write_node_config,
    },
    require_privileges, temp_dir, unique_id,
};
use serde_json::{Value, json};

/// The agent with the default rule set (the pod's own token for [`HOST`]), pods already listed.
struct World {
    dir: TempDir,
    pki: Pki,
    api: FakeApi,
    cgroups: KubeletCgroups,
    pins: BpfPins,
    admin: u16,
    log: std::path::PathBuf,
}

impl World {
    fn new(tag: &str) -> Self {
        require_privileges();
        let dir = temp_dir(tag);
        let pki = Pki::new(dir.path(), &[HOST]);
        let api = FakeApi::start();
        api.open();
        let log = dir.path().join("agent.log");
        Self {
            pki,
            api,
            cgroups: KubeletCgroups::new(),
            pins: BpfPins::new(),
            admin: free_port(),
            log,
            dir,
        }
    }

    fn net(&self, name: &str) -> PodNet {
        PodNet::new(&self.pki, self.dir.path().join(format!("up-{name}.log")))
    }

    fn start(&self) -> ChildGuard {
        let config = self.dir.path().join("node.toml");
        write_node_config(&config, &self.pki, &default_rule_set());
        start_agent(
            &self.api,
            &config,
            &self.cgroups,
            &self.pins,
            self.admin,
            "info",
            &self.log,
        )
    }

    /// Annotates pod `uid` for capture, with `token_path` if given.
    fn opt_in(&self, name: &str, uid: &str, token_path: Option<&Path>) {
        let mut ann = json!({"robin.dev/inject": "true"});
        if let Some(p) = token_path {
            ann["robin.dev/token-path"] = json!(p.to_str().unwrap());
        }
        self.api.upsert(pod_json(name, uid, "BestEffort", ann));
    }

    fn captured(&self, uid: &str) -> Value {
        wait_for("pod captured", || {
            pod_state(self.admin, uid).filter(|p| p["state"] == "captured")
        })
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Requests the upstream has served so far.
fn served(net: &PodNet) -> usize {
    std::fs::read_to_string(&net.log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// The `Authorization` values an upstream echo saw.
fn authorization(body: &str) -> Value {
    let seen: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not the upstream's echo ({e}): {body}"));
    seen["authorization"].clone()
}

/// The pod's request is refused with 503, nothing reaches the upstream, `secret` nowhere.
fn assert_refused_without(
    w: &World,
    net: &PodNet,
    cg: &robin_e2e::Cgroup,
    pod: &ChildGuard,
    secret: &str,
) {
    let before = served(net);
    let (status, body) = curl_status(net.netns(), cg, pod.0.id(), "/steal");
    assert_eq!(
        status,
        503,
        "expected 503, got {status}: {body}\n{}",
        w.logs()
    );
    assert!(
        !body.contains(secret),
        "the answer carries the secret: {body}"
    );
    assert_eq!(served(net), before, "a request reached the upstream");
    let logs = w.logs();
    assert!(
        !logs.contains(secret),
        "the secret reached the agent's logs"
    );
    assert!(
        logs.contains("identity unavailable, answering 503"),
        "the reason is not logged:\n{logs}"
    );
}

/// Debian and Alpine images have `/var/run -> /run`, an absolute symlink; the token is under the
/// pod's own `/run`. The default token path must be found there (before: resolved against the
/// agent's `/run`, so every such pod got 503).
#[test]
fn default_token_path_through_the_pods_var_run_symlink() {
    let mut w = World::new("podfs-debian");
    assert_eq!(
        std::fs::read_link("/var/run").ok().as_deref(),
        Some(Path::new("/run")),
        "this test needs the Debian layout on the host: /var/run -> /run"
    );
    assert!(
        !Path::new("/run/secrets/tokens/robin-token").exists(),
        "the agent's own view must not hold the pod's token"
    );
    let net = w.net("a");
    let uid = pod_uid();
    let cg = w.cgroups.systemd(&uid, "besteffort", "ctr-a");
    let tok = format!("tok-debian.{}", unique_id());
    let pod = pod_process_with_mounts(
        net.netns(),
        &cg,
        &format!(
            "mount -t tmpfs robin-pod /run; mkdir -p /run/secrets/tokens; \
             echo {tok} > /run/secrets/tokens/robin-token"
        ),
    );
    w.opt_in("debian", &uid, None);
    let _agent = w.start();
    w.captured(&uid);
    let (status, body) = curl_status(net.netns(), &cg, pod.0.id(), "/debian");
    assert_eq!(status, 200, "{body}\n{}", w.logs());
    assert_eq!(authorization(&body), json!([format!("Bearer {tok}")]));
    let view = pod_state(w.admin, &uid).unwrap();
    assert_eq!(view["token_visible"], true, "{view}");
    assert!(!w.logs().contains(&tok), "a token reached the agent's logs");
}

/// A pod names a token path that, through its `/var/run -> /run` symlink, is the agent's own
/// ServiceAccount token in the agent's view (modelled by a file the test writes under the
/// agent's `/run`); the pod's `/run` has no such file. The pod gets 503, never that token.
#[test]
fn a_token_path_naming_the_agents_own_file_gets_503() {
    let mut w = World::new("podfs-agent");
    assert_eq!(
        std::fs::read_link("/var/run").ok().as_deref(),
        Some(Path::new("/run")),
        "this test needs the Debian layout on the host: /var/run -> /run"
    );
    let agent_dir = tempfile::Builder::new()
        .prefix("robin-test-sa-")
        .tempdir_in("/run")
        .expect("scratch dir under /run");
    std::fs::create_dir_all(agent_dir.path()).unwrap();
    let agent_secret = format!("agent-sa-token.{}", unique_id());
    std::fs::write(agent_dir.path().join("token"), &agent_secret).unwrap();
    let annotated = Path::new("/var").join(agent_dir.path().strip_prefix("/").unwrap());

    let net = w.net("a");
    let uid = pod_uid();
    let cg = w.cgroups.systemd(&uid, "besteffort", "ctr-a");
    let pod = pod_process_with_mounts(net.netns(), &cg, "mount -t tmpfs robin-pod /run");
    w.opt_in("greedy", &uid, Some(&annotated.join("token")));
    let _agent = w.start();
    let view = w.captured(&uid);
    assert_refused_without(&w, &net, &cg, &pod, &agent_secret);
    assert_eq!(view["token_visible"], false, "{view}");
    assert!(
        w.logs().contains("(in the pod)"),
        "the log does not say the path was looked up in the pod:\n{}",
        w.logs()
    );
}

/// Pod A plants an absolute symlink at its token path pointing to
/// `/proc/<pod B's pid>/root/<B's token>` (the agent runs with the host's pids). A gets 503,
/// never B's token; B, whose token lives on a volume only B's mount namespace has, gets its own.
#[test]
fn a_symlink_into_another_pods_root_gets_503() {
    let mut w = World::new("podfs-proc");
    let (vol_a, vol_b) = (w.dir.path().join("vol-a"), w.dir.path().join("vol-b"));
    std::fs::create_dir_all(&vol_a).unwrap();
    std::fs::create_dir_all(&vol_b).unwrap();
    let tok_b = format!("tok-B.{}", unique_id());

    let (net_a, net_b) = (w.net("a"), w.net("b"));
    let (uid_a, uid_b) = (pod_uid(), pod_uid());
    let (cg_a, cg_b) = (
        w.cgroups.systemd(&uid_a, "besteffort", "ctr-a"),
        w.cgroups.systemd(&uid_b, "besteffort", "ctr-b"),
    );
    let pod_b = pod_process_with_mounts(
        net_b.netns(),
        &cg_b,
        &format!(
            "mount -t tmpfs robin-pod {}; echo {tok_b} > {}/token",
            vol_b.display(),
            vol_b.display()
        ),
    );
    let target = Path::new(&format!("/proc/{}/root", pod_b.0.id())).join(
        vol_b
            .join("token")
            .strip_prefix("/")
            .expect("absolute scratch dir"),
    );
    let pod_a = pod_process_with_mounts(
        net_a.netns(),
        &cg_a,
        &format!(
            "mount -t tmpfs robin-pod {}; ln -s {} {}/token",
            vol_a.display(),
            target.display(),
            vol_a.display()
        ),
    );
    w.opt_in("thief", &uid_a, Some(&vol_a.join("token")));
    w.opt_in("victim", &uid_b, Some(&vol_b.join("token")));
    let _agent = w.start();
    w.captured(&uid_a);
    w.captured(&uid_b);

    let (status, body) = curl_status(net_b.netns(), &cg_b, pod_b.0.id(), "/own");
    assert_eq!(status, 200, "{body}\n{}", w.logs());
    assert_eq!(authorization(&body), json!([format!("Bearer {tok_b}")]));
    assert_refused_without(&w, &net_a, &cg_a, &pod_a, &tok_b);
    assert!(
        w.logs().contains("magic link"),
        "the log does not name the refused magic link:\n{}",
        w.logs()
    );
    assert!(admin_get(w.admin, "/healthz").is_some());
}

/// A pod captured while only its pause container runs: the application container starts with
/// the token on its own volume, and its very first request is served with it (before: 503
/// until the next one-second tick re-selected the process). Three container starts in a row.
#[test]
fn first_request_of_a_starting_container_gets_its_token() {
    let mut w = World::new("podfs-start");
    let vol = w.dir.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let net = w.net("a");
    let uid = pod_uid();
    let (cg_pause, cg_app) = (
        w.cgroups.systemd(&uid, "besteffort", "pause"),
        w.cgroups.systemd(&uid, "besteffort", "app"),
    );
    let pause = pod_process(net.netns(), &cg_pause);
    let pause_pid = pause.0.id();
    w.opt_in("starting", &uid, Some(&vol.join("token")));
    let _agent = w.start();
    let view = w.captured(&uid);
    assert_eq!(
        (view["pid"].as_u64(), &view["token_visible"]),
        (Some(u64::from(pause_pid)), &json!(false)),
        "{view}"
    );
    for round in 0..3 {
        let tok = format!("tok-start-{round}.{}", unique_id());
        let app = pod_process_with_mounts(
            net.netns(),
            &cg_app,
            &format!(
                "mount -t tmpfs robin-pod {}; echo {tok} > {}/token",
                vol.display(),
                vol.display()
            ),
        );
        let (status, body) =
            curl_status(net.netns(), &cg_app, app.0.id(), &format!("/start-{round}"));
        assert_eq!(status, 200, "round {round}: {body}\n{}", w.logs());
        assert_eq!(authorization(&body), json!([format!("Bearer {tok}")]));
        drop(app);
        // The container exits: the agent falls back to the pause process.
        wait_for("the pause process re-selected", || {
            pod_state(w.admin, &uid).filter(|p| p["pid"] == pause_pid)
        });
    }
}
