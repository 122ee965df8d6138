//! `robin node` end to end. The pod watch talks to a fake API server run by the test (a real
//! HTTP server answering list and watch for pods); below it everything is real: pods are network
//! namespaces plus cgroups laid out as the kubelet lays them out (systemd and cgroupfs drivers)
//! under a test cgroup root, with processes and token files.
use std::{
    net::IpAddr,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use robin_e2e::{
    Cgroup, ChildGuard, Pki, TempDir, Topology, command_in, find_cgroup2_mount,
    node_fixture::{
        CgroupTree, FakeApi, HOST, NODE, admin_get, curl, debug_pods, free_port, metric, pod_json,
        pod_state, pod_uid, start_upstream, wait_for,
    },
    pod_etc, require_privileges, robin_bin, unique_id,
};
use serde_json::json;

#[test]
fn node_agent_captures_annotated_pods_each_with_its_own_token() {
    require_privileges();
    let dir = TempDir::new("node");
    let pki = Pki::new(dir.path(), &[HOST]);
    // Two pods, each in its own network namespace with its own upstream.
    let topo_a = Topology::new(0);
    let topo_b = Topology::new(0);
    let cas = [pki.file("robin-ca.crt"), pki.file("upstream-ca.crt")];
    pod_etc(
        &topo_a.pod,
        &[(HOST, IpAddr::from(topo_a.upstream_ip4))],
        &cas,
    );
    pod_etc(
        &topo_b.pod,
        &[(HOST, IpAddr::from(topo_b.upstream_ip4))],
        &cas,
    );
    let (log_a, log_b) = (dir.path().join("up-a.log"), dir.path().join("up-b.log"));
    let _up_a = start_upstream(&topo_a, &pki, &log_a);
    let _up_b = start_upstream(&topo_b, &pki, &log_b);

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
    let parent = find_cgroup2_mount().unwrap().join("robin-test");
    std::fs::create_dir_all(&parent).expect("creating the robin-test cgroup parent");
    let root = parent.join(format!("node{}", unique_id()));
    let mut tree = CgroupTree(vec![
        Cgroup::create(root.clone()).expect("creating cgroup root"),
    ]);
    let (uid_a, uid_b, uid_c) = (pod_uid(), pod_uid(), pod_uid());
    let cg_a = tree.mkdirs(
        &root,
        &Path::new("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid_a.replace('-', "_")
            ))
            .join("cri-containerd-a.scope"),
    );
    let cg_b = tree.mkdirs(
        &root,
        &Path::new("kubepods/burstable")
            .join(format!("pod{uid_b}"))
            .join("ctr-b"),
    );
    let cg_c = tree.mkdirs(
        &root,
        &Path::new("kubepods")
            .join(format!("pod{uid_c}"))
            .join("ctr-c"),
    );
    let (cg_a, cg_b, cg_c) = (
        Cgroup::existing(cg_a),
        Cgroup::existing(cg_b),
        Cgroup::existing(cg_c),
    );
    let spawn_sleeper = |netns, cg| {
        ChildGuard(
            command_in(netns, Some(cg), "sleep", &["600"])
                .spawn()
                .expect("starting a pod process"),
        )
    };
    let _pa = spawn_sleeper(&topo_a.pod, &cg_a);
    let _pb = spawn_sleeper(&topo_b.pod, &cg_b);
    let _pc = spawn_sleeper(&topo_a.pod, &cg_c);

    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nca_cert = {:?}\nca_key = {:?}\nupstream_roots = {:?}\n\n[capture]\nports = [443]\n\n[[rule_sets.default.inject]]\nhosts = [\"{HOST}\"]\n",
            pki.file("robin-ca.crt"),
            pki.file("robin-ca.key"),
            pki.file("upstream-ca.crt"),
        ),
    )
    .unwrap();

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
    let _agent = ChildGuard(
        Command::new(robin_bin())
            .args(["node", "--node-name", NODE, "--kube-api", &api.url()])
            .arg("--config")
            .arg(&config)
            .arg("--cgroup-root")
            .arg(&root)
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .env("ROBIN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .expect("starting robin node"),
    );
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
            &topo_a.pod,
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
    let seen = curl(&topo_a.pod, &cg_a, "/a");
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {tok_a}")]),
        "{}",
        agent_logs()
    );
    let seen = curl(&topo_b.pod, &cg_b, "/b");
    assert_eq!(
        seen["authorization"],
        json!([format!("Bearer {tok_b}")]),
        "{}",
        agent_logs()
    );
    let seen = curl(&topo_a.pod, &cg_c, "/c");
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
    assert_eq!(metric(&m, "robin_requests_total{class=\"2xx\"}"), 2, "{m}");
    assert_eq!(metric(&m, "robin_ready"), 1, "{m}");
    assert_eq!(metric(&m, "robin_pods{state=\"not_captured\"}"), 2, "{m}");

    // Annotation changed: the new token path applies.
    api.upsert(pod_json("a", &uid_a, "BestEffort", inject(&file_a2)));
    wait_for("new token path", || {
        pod_state(admin, &uid_a).filter(|p| p["token_path"] == file_a2.to_str().unwrap())
    });
    let seen = curl(&topo_a.pod, &cg_a, "/a2");
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
    let seen = curl(&topo_b.pod, &cg_b, "/b-after");
    assert_eq!(
        seen["authorization"],
        json!([]),
        "pod b still captured after deletion"
    );
    let m = admin_get(admin, "/metrics").unwrap().1;
    assert_eq!(metric(&m, "robin_pods{state=\"captured\"}"), 1, "{m}");
    // Counters of the released pod are kept.
    assert_eq!(metric(&m, "robin_requests_total{class=\"2xx\"}"), 3, "{m}");

    let logs = agent_logs();
    for tok in [tok_a, tok_b, tok_a2] {
        assert!(
            !logs.contains(tok),
            "a token reached the agent's logs:\n{logs}"
        );
    }
}
