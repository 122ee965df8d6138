//! `robin node` end to end. The pod watch talks to a fake API server run by the test (a real
//! HTTP server answering list and watch for pods); below it everything is real: pods are network
//! namespaces plus cgroups laid out as the kubelet lays them out (systemd and cgroupfs drivers)
//! under a test cgroup root, with processes and token files.
use std::{path::Path, process::Stdio, thread, time::Duration};

use robin_e2e::{
    BpfPins, Cgroup, ChildGuard, Pki, command_in,
    node_fixture::{
        FakeApi, HOST, KubeletCgroups, PodNet, TwoPodNets, admin_get, curl, debug_pods,
        default_rule_set, free_port, metric, pod_cgroup_id, pod_json, pod_process, pod_state,
        pod_uid, start_agent, wait_for, write_node_config, write_node_config_with,
    },
    require_privileges, robin_bin, temp_dir,
};
use serde_json::json;

#[test]
fn node_agent_captures_annotated_pods_each_with_its_own_token() {
    require_privileges();
    let dir = temp_dir("node");
    let pki = Pki::new(dir.path(), &[HOST]);
    // Two pods, each in its own network namespace with its own upstream.
    let (net_a, net_b) = (
        PodNet::new(&pki, dir.path().join("up-a.log")),
        PodNet::new(&pki, dir.path().join("up-b.log")),
    );

    let (tok_a, tok_b, tok_a2) = ("tok-A.pod-alpha", "tok-B.pod-bravo", "tok-A2.rotated");
    let (file_a, file_b, file_a2) = (
        dir.path().join("a-token"),
        dir.path().join("b-token"),
        dir.path().join("a2-token"),
    );
    std::fs::write(&file_a, format!("{tok_a}\n")).unwrap();
    std::fs::write(&file_b, format!("{tok_b}\n")).unwrap();
    std::fs::write(&file_a2, format!("{tok_a2}\n")).unwrap();

    // The kubelet's layout under a test cgroup root: A with the systemd driver (BestEffort), B
    // with cgroupfs (Burstable), C (not annotated, Guaranteed) sharing A's network namespace.
    let mut cgroups = KubeletCgroups::new();
    let (uid_a, uid_b, uid_c) = (pod_uid(), pod_uid(), pod_uid());
    let cg_a = cgroups.systemd(&uid_a, "besteffort", "cri-containerd-a");
    let cg_b = cgroups.cgroupfs(&uid_b, "burstable", "ctr-b");
    let cg_c = cgroups.cgroupfs(&uid_c, "", "ctr-c");
    let _pa = pod_process(net_a.netns(), &cg_a);
    let _pb = pod_process(net_b.netns(), &cg_b);
    let _pc = pod_process(net_a.netns(), &cg_c);

    let config = dir.path().join("node.toml");
    write_node_config(&config, &pki, &default_rule_set());

    let api = FakeApi::start();
    let inject = |token: &Path| json!({"robin.dev/inject": "true", "robin.dev/token-path": token.to_str().unwrap()});
    api.upsert(pod_json("a", &uid_a, "BestEffort", inject(&file_a)));
    api.upsert(pod_json("b", &uid_b, "Burstable", inject(&file_b)));
    api.upsert(pod_json("c", &uid_c, "Guaranteed", json!({})));
    // An annotated pod of another node: the agent must never see it.
    let mut elsewhere = pod_json("far", &pod_uid(), "BestEffort", inject(&file_a));
    elsewhere["spec"]["nodeName"] = json!("node-b");
    api.upsert(elsewhere);
    // Opted in with unusable annotations, and opted in with a rule set the node does not have
    // (no cgroup either): reported, never captured.
    let (uid_bad, uid_unknown) = (pod_uid(), pod_uid());
    api.upsert(pod_json(
        "bad",
        &uid_bad,
        "BestEffort",
        json!({"robin.dev/inject": "true", "robin.dev/capture-ports": "https"}),
    ));
    api.upsert(pod_json(
        "unknown",
        &uid_unknown,
        "BestEffort",
        json!({"robin.dev/inject": "true", "robin.dev/rules": "nope"}),
    ));

    let admin = free_port();
    let agent_log = dir.path().join("agent.log");
    let pins = BpfPins::new();
    let _agent = start_agent(&api, &config, &cgroups, &pins, admin, "info", &agent_log);
    let agent_logs = || std::fs::read_to_string(&agent_log).unwrap_or_default();

    // Not ready while the pod list fails.
    let (status, body) = wait_for("the admin plane", || admin_get(admin, "/readyz"));
    assert_eq!(status, 503, "ready before the pod watch synced: {body}");
    assert!(body.contains("pod_watch_synced: no"), "{body}");
    assert_eq!(admin_get(admin, "/healthz").unwrap().0, 200);
    // An init container waiting for capture, started before the agent could capture anything.
    let robin = robin_bin();
    let robin = robin.to_str().unwrap();
    let mut awaiting = ChildGuard(
        command_in(
            net_a.netns(),
            Some(&cg_a),
            robin,
            &["await", "--timeout-secs", "30"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting robin await"),
    );
    thread::sleep(Duration::from_millis(600));
    assert!(
        awaiting.0.try_wait().unwrap().is_none(),
        "robin await returned before the pod was captured"
    );
    api.open();
    wait_for("/readyz 200", || {
        admin_get(admin, "/readyz").filter(|(s, _)| *s == 200)
    });

    for uid in [&uid_a, &uid_b] {
        wait_for("pods captured", || {
            pod_state(admin, uid).filter(|p| p["state"] == "captured")
        });
    }
    // `robin await`'s exit status: 0 once captured, 1 when not captured in time (pod c is not
    // annotated), 2 for bad arguments.
    let awaited = wait_for("robin await to return", || awaiting.0.try_wait().unwrap());
    assert_eq!(awaited.code(), Some(0), "{awaited}");
    let status_of = |cgroup: &Cgroup, args: &[&str]| {
        command_in(net_a.netns(), Some(cgroup), robin, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("running robin await")
            .code()
    };
    assert_eq!(status_of(&cg_c, &["await", "--timeout-secs", "1"]), Some(1));
    assert_eq!(status_of(&cg_a, &["await", "--timeout-secs", "x"]), Some(2));
    let pods = debug_pods(admin);
    assert_eq!(
        pods.len(),
        4,
        "only the annotated pods of this node: {pods:?}"
    );
    let bad = pod_state(admin, &uid_bad).unwrap();
    assert_eq!(bad["state"], "invalid", "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("capture-ports"),
        "{bad}"
    );
    let unknown = pod_state(admin, &uid_unknown).unwrap();
    assert_eq!(unknown["state"], "pending", "{unknown}");
    assert!(!serde_json::to_string(&pods).unwrap().contains("tok-"));

    // Each pod gets its own token; the pod without the annotation is untouched.
    let seen = curl(net_a.netns(), &cg_a, "/a");
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {tok_a}")]),
        "{}",
        agent_logs()
    );
    let seen = curl(net_b.netns(), &cg_b, "/b");
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {tok_b}")]),
        "{}",
        agent_logs()
    );
    let seen = curl(net_a.netns(), &cg_c, "/c");
    assert_eq!(
        seen["authorization"],
        json!([]),
        "pod c must not be captured"
    );

    let m = admin_get(admin, "/metrics").unwrap().1;
    assert_eq!(metric(&m, "robin_pods{state=\"captured\"}"), 2, "{m}");
    assert_eq!(
        metric(&m, "robin_connections_total{outcome=\"intercepted\"}"),
        2,
        "{m}"
    );
    let rule = format!("rule=\"{HOST}\"");
    assert_eq!(
        metric(&m, &format!("robin_requests_total{{{rule},class=\"2xx\"}}")),
        2,
        "{m}"
    );
    // Two token reads, both fast enough for the 5 ms bucket (a file read through /proc).
    assert_eq!(
        metric(&m, &format!("robin_identity_fetch_seconds_count{{{rule}}}")),
        2,
        "{m}"
    );
    // prometheus-client writes `le` first.
    assert_eq!(
        metric(
            &m,
            &format!("robin_identity_fetch_seconds_bucket{{le=\"+Inf\",{rule}}}")
        ),
        2,
        "{m}"
    );
    assert_eq!(
        metric(&m, "robin_upstream_responses_total{class=\"2xx\"}"),
        2,
        "{m}"
    );
    assert!(
        metric(&m, "robin_bytes_total{direction=\"from_workload\"}") > 200,
        "two TLS handshakes and requests: {m}"
    );
    assert!(
        metric(&m, "robin_bytes_total{direction=\"to_workload\"}") > 1000,
        "two leaf certificates and responses: {m}"
    );
    assert_eq!(metric(&m, "robin_ready"), 1, "{m}");
    // The states of /debug/pods, one set: `bad` is invalid, `unknown` pending.
    assert_eq!(metric(&m, "robin_pods{state=\"pending\"}"), 1, "{m}");
    assert_eq!(metric(&m, "robin_pods{state=\"invalid\"}"), 1, "{m}");

    // Annotation changed: the new token path applies.
    api.upsert(pod_json("a", &uid_a, "BestEffort", inject(&file_a2)));
    wait_for("new token path", || {
        pod_state(admin, &uid_a).filter(|p| p["token_path"] == file_a2.to_str().unwrap())
    });
    let seen = curl(net_a.netns(), &cg_a, "/a2");
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {tok_a2}")]),
        "{}",
        agent_logs()
    );

    // Deleted: detached, the pod's connections go direct again.
    api.delete(&uid_b);
    wait_for("pod b released", || {
        pod_state(admin, &uid_b).is_none().then_some(())
    });
    let seen = curl(net_b.netns(), &cg_b, "/b-after");
    assert_eq!(
        seen["authorization"],
        json!([]),
        "pod b still captured after deletion"
    );
    let m = admin_get(admin, "/metrics").unwrap().1;
    assert_eq!(metric(&m, "robin_pods{state=\"captured\"}"), 1, "{m}");
    assert_eq!(
        pins.attached_cgroups(),
        vec![pod_cgroup_id(&cg_a)],
        "the released pod's links are unpinned"
    );
    // Counters of the released pod are kept.
    assert_eq!(
        metric(&m, &format!("robin_requests_total{{{rule},class=\"2xx\"}}")),
        3,
        "{m}"
    );

    let logs = agent_logs();
    for tok in [tok_a, tok_b, tok_a2] {
        assert!(
            !logs.contains(tok),
            "a token reached the agent's logs:\n{logs}"
        );
    }
}

/// While no agent runs, the pod's ruled connects are refused in the kernel and nothing reaches
/// the upstream (with or without a token).
fn assert_refused(net: &PodNet, cgroup: &Cgroup) {
    let before = served(&net.log);
    for attempt in 0..3 {
        let out = command_in(
            net.netns(),
            Some(cgroup),
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                &format!("https://{HOST}/while-down-{attempt}"),
            ],
        )
        .output()
        .expect("running curl");
        assert_eq!(
            out.status.code(),
            Some(7),
            "curl must fail to connect while the agent is down: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        served(&net.log),
        before,
        "a request bypassed the missing agent"
    );
}

/// Requests the upstream has served so far.
fn served(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn stopped_or_killed_agent_fails_closed_and_a_restart_adopts_pinned_capture() {
    require_privileges();
    let tok = "tok-restart.pod-alpha";
    let TwoPodNets {
        dir,
        pki,
        first: net_a,
        second: net_b,
        token_file,
    } = TwoPodNets::new("restart", ("a", "b"), tok);

    let mut cgroups = KubeletCgroups::new();
    let (uid_a, uid_b) = (pod_uid(), pod_uid());
    let cg_a = cgroups.systemd(&uid_a, "besteffort", "cri-containerd-a");
    let cg_b = cgroups.cgroupfs(&uid_b, "burstable", "ctr-b");
    let mut pod_a = pod_process(net_a.netns(), &cg_a);
    let _pod_b = pod_process(net_b.netns(), &cg_b);
    let config = dir.path().join("node.toml");
    write_node_config(&config, &pki, &default_rule_set());
    let api = FakeApi::start();
    api.open();
    let inject =
        json!({"robin.dev/inject": "true", "robin.dev/token-path": token_file.to_str().unwrap()});
    api.upsert(pod_json("a", &uid_a, "BestEffort", inject.clone()));
    api.upsert(pod_json("b", &uid_b, "Burstable", inject));

    let pins = BpfPins::new();
    let admin = free_port();
    let (log1, log2) = (dir.path().join("agent1.log"), dir.path().join("agent2.log"));
    let mut agent = start_agent(&api, &config, &cgroups, &pins, admin, "info", &log1);
    for uid in [&uid_a, &uid_b] {
        wait_for("pods captured", || {
            pod_state(admin, uid).filter(|p| p["state"] == "captured" && p["adopted"] == false)
        });
    }
    let seen = curl(net_a.netns(), &cg_a, "/before");
    assert_eq!(seen["authorization"], json!([format!("Bearer {tok}")]));
    let (id_a, id_b) = (pod_cgroup_id(&cg_a), pod_cgroup_id(&cg_b));
    let mut both = vec![id_a, id_b];
    both.sort_unstable();
    assert_eq!(
        pins.attached_cgroups(),
        both,
        "each captured pod's links are pinned"
    );

    // SIGTERM (a rolling upgrade) with a stream in flight: the stream completes, then the
    // agent exits; the pinned capture stays.
    let before = served(&net_a.log);
    let stream = command_in(
        net_a.netns(),
        Some(&cg_a),
        "curl",
        &[
            "-sS",
            "-N",
            "--max-time",
            "20",
            &format!("https://{HOST}/sse"),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting curl");
    wait_for("the stream to reach the upstream", || {
        (served(&net_a.log) > before).then_some(())
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = stream.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("event-2"),
        "a stream in flight at SIGTERM was cut: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exited = wait_for("the agent to exit after draining", || {
        agent.0.try_wait().unwrap()
    });
    assert!(exited.success(), "{exited}");
    assert!(
        admin_get(admin, "/healthz").is_none(),
        "the agent is still answering"
    );
    assert_eq!(pins.attached_cgroups(), both, "pins outlive the agent");
    assert_refused(&net_a, &cg_a);

    // Pod b goes away while no agent runs.
    api.delete(&uid_b);

    agent = start_agent(&api, &config, &cgroups, &pins, admin, "info", &log2);
    let view = wait_for("pod a re-captured", || {
        pod_state(admin, &uid_a).filter(|p| p["state"] == "captured")
    });
    assert_eq!(view["adopted"], true, "{view}");
    wait_for("pod b's pins released", || {
        (pins.attached_cgroups() == vec![id_a]).then_some(())
    });
    let seen = curl(net_a.netns(), &cg_a, "/after");
    assert_eq!(seen["authorization"], json!([format!("Bearer {tok}")]));
    // Pod b's connects go direct again.
    let seen = curl(net_b.netns(), &cg_b, "/b-after");
    assert_eq!(seen["authorization"], json!([]), "pod b still captured");
    // The pod itself was never touched.
    assert!(
        pod_a.0.try_wait().unwrap().is_none(),
        "the pod's process did not survive the agent restart"
    );

    // kill -9: nothing runs on the way out, and the pod still fails closed.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    assert_eq!(pins.attached_cgroups(), vec![id_a]);
    assert_refused(&net_a, &cg_a);

    // Uninstall is removing the pins: capture goes, the pod's connects go direct.
    std::fs::remove_dir_all(pins.path()).unwrap();
    let seen = curl(net_a.netns(), &cg_a, "/uninstalled");
    assert_eq!(
        seen["authorization"],
        json!([]),
        "pins removed but still captured"
    );

    for log in [&log1, &log2] {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            !text.contains(tok),
            "a token reached the agent's logs:\n{text}"
        );
    }
}

#[test]
fn pod_sandbox_recreated_in_a_new_network_namespace_is_captured_there() {
    require_privileges();
    let tok = "tok-sandbox.pod-alpha";
    // The pod's first sandbox, and the one the kubelet recreates it with (same pod, same cgroup).
    let TwoPodNets {
        dir,
        pki,
        first,
        second,
        token_file,
    } = TwoPodNets::new("sandbox", ("1", "2"), tok);
    let mut cgroups = KubeletCgroups::new();
    let uid = pod_uid();
    let cg = cgroups.systemd(&uid, "besteffort", "cri-containerd-a");
    let old_process = pod_process(first.netns(), &cg);
    let config = dir.path().join("node.toml");
    write_node_config(&config, &pki, &default_rule_set());
    let api = FakeApi::start();
    api.open();
    api.upsert(pod_json(
        "a",
        &uid,
        "BestEffort",
        json!({"robin.dev/inject": "true", "robin.dev/token-path": token_file.to_str().unwrap()}),
    ));
    let pins = BpfPins::new();
    let admin = free_port();
    let log = dir.path().join("agent.log");
    let _agent = start_agent(&api, &config, &cgroups, &pins, admin, "info", &log);
    wait_for("pod captured", || {
        pod_state(admin, &uid).filter(|p| p["state"] == "captured")
    });
    let seen = curl(first.netns(), &cg, "/first-sandbox");
    assert_eq!(seen["authorization"], json!([format!("Bearer {tok}")]));

    drop(old_process);
    let new_process = pod_process(second.netns(), &cg);
    let new_pid = new_process.0.id();
    wait_for("capture in the new network namespace", || {
        pod_state(admin, &uid).filter(|p| p["state"] == "captured" && p["pid"] == new_pid)
    });
    let seen = curl(second.netns(), &cg, "/second-sandbox");
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {tok}")]),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        served(&second.log),
        1,
        "the request left from the new sandbox"
    );
    assert_eq!(pins.attached_cgroups(), vec![pod_cgroup_id(&cg)]);
}

/// Connects from inside the pod to `ip:port` until file `stop` exists (at most 20 s and 10,000
/// attempts) and counts how they ended: `{"ok": n, "refused": n, "other": n, "errors": [...]}`.
const CONNECT_LOOP: &str = r#"
import json, os, socket, sys, time
ip, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
end = time.monotonic() + 20
ok = refused = other = 0
errors = []
while time.monotonic() < end and ok + refused + other < 10000 and not os.path.exists(stop):
    try:
        s = socket.create_connection((ip, port), timeout=2)
        s.close()
        ok += 1
    except ConnectionRefusedError:
        refused += 1
    except OSError as e:
        other += 1
        errors.append(str(e))
    time.sleep(0.002)
print(json.dumps({"ok": ok, "refused": refused, "other": other, "errors": errors[:5]}))
"#;

/// With a fixed listener port (the shipped `listener_port = 15001`), changing a pod's capture
/// ports keeps the bound listener: connects running meanwhile are never refused and the agent
/// never tries to bind the port twice (before: "Address already in use" and up to a second of
/// refused connects).
#[test]
fn capture_ports_change_with_a_fixed_listener_port_refuses_nothing() {
    require_privileges();
    let dir = temp_dir("ports");
    let pki = Pki::new(dir.path(), &[HOST]);
    let net = PodNet::new(&pki, dir.path().join("up.log"));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "tok-ports.pod-alpha").unwrap();
    let mut cgroups = KubeletCgroups::new();
    let uid = pod_uid();
    let cg = cgroups.systemd(&uid, "besteffort", "cri-containerd-a");
    let _pod = pod_process(net.netns(), &cg);
    let config = dir.path().join("node.toml");
    write_node_config_with(&config, &pki, "listener_port = 15001", &default_rule_set());
    let api = FakeApi::start();
    api.open();
    let pod = |ports: &str| {
        pod_json(
            "a",
            &uid,
            "BestEffort",
            json!({"robin.dev/inject": "true", "robin.dev/token-path": token_file.to_str().unwrap(), "robin.dev/capture-ports": ports}),
        )
    };
    api.upsert(pod("443"));
    let pins = BpfPins::new();
    let admin = free_port();
    let log = dir.path().join("agent.log");
    let _agent = start_agent(&api, &config, &cgroups, &pins, admin, "info", &log);
    let view = wait_for("pod captured", || {
        pod_state(admin, &uid).filter(|p| p["state"] == "captured")
    });
    assert_eq!(view["listener_port"], 15001, "{view}");

    let upstream = net.topo.upstream_ip4.to_string();
    let stop = dir.path().join("stop-connecting");
    let client = command_in(
        net.netns(),
        Some(&cg),
        "python3",
        &["-c", CONNECT_LOOP, &upstream, "443", stop.to_str().unwrap()],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting the connect loop");
    // Three changes while the loop runs.
    for (i, ports) in ["443,8443", "443", "443,9443"].into_iter().enumerate() {
        thread::sleep(Duration::from_millis(600));
        api.upsert(pod(ports));
        let want: Vec<u16> = ports.split(',').map(|p| p.parse().unwrap()).collect();
        wait_for("new capture ports", || {
            pod_state(admin, &uid).filter(|p| p["ports"] == json!(want) && p["state"] == "captured")
        });
        assert_eq!(
            pod_state(admin, &uid).unwrap()["listener_port"],
            15001,
            "change {i}"
        );
    }
    thread::sleep(Duration::from_millis(300));
    std::fs::write(&stop, "").unwrap();
    let out = client.wait_with_output().expect("the connect loop");
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "connect loop output ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        counts["ok"].as_u64().unwrap() > 100,
        "the loop hardly ran: {counts}"
    );
    assert_eq!(
        (counts["refused"].as_u64(), counts["other"].as_u64()),
        (Some(0), Some(0)),
        "connects failed while the capture ports changed: {counts}\n{logs}"
    );
    assert!(
        !logs.contains("Address already in use"),
        "the listener port was bound twice:\n{logs}"
    );
    // Still served, with the token, on the port that stayed captured.
    let seen = curl(net.netns(), &cg, "/after");
    assert_eq!(seen["authorization"], json!(["Bearer tok-ports.pod-alpha"]));
}
