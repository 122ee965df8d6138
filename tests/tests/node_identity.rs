//! `robin node` with a `token_request` rule: each captured pod is served with a token the
//! Kubernetes API (the fake one, driven by the test) minted for *that* pod — its namespace, its
//! ServiceAccount (`default` when the pod names none), bound to it by name and uid — requested
//! with the agent's own credential. Pods are network namespaces plus kubelet-laid-out cgroups,
//! as in `node.rs`.
use std::{
    net::IpAddr,
    path::Path,
    process::{Command, Stdio},
};

use robin_e2e::{
    Cgroup, ChildGuard, Pki, TempDir, Topology, command_in, find_cgroup2_mount,
    node_fixture::{
        CgroupTree, FakeApi, HOST, MintedToken, NODE, admin_get, curl, debug_pods, free_port,
        pod_json, pod_state, pod_uid, start_upstream, wait_for,
    },
    pod_etc, require_privileges, robin_bin, unique_id,
};
use serde_json::{Value, json};

/// The token a pod's request reached its upstream with.
fn bearer(seen: &Value) -> String {
    let auth = seen["authorization"]
        .as_array()
        .filter(|a| a.len() == 1)
        .and_then(|a| a[0].as_str())
        .unwrap_or_else(|| panic!("expected one Authorization header: {seen}"));
    auth.strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not a bearer token: {seen}"))
        .to_owned()
}

fn minted_for<'a>(minted: &'a [MintedToken], token: &str) -> &'a MintedToken {
    minted
        .iter()
        .find(|m| m.token == token)
        .unwrap_or_else(|| panic!("the upstream saw a token the API never minted ({minted:?})"))
}

#[test]
fn node_agent_requests_a_bound_token_for_each_pod() {
    require_privileges();
    let dir = TempDir::new("node-ident");
    let pki = Pki::new(dir.path(), &[HOST]);
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
    let _up_a = start_upstream(&topo_a, &pki, &dir.path().join("up-a.log"));
    let _up_b = start_upstream(&topo_b, &pki, &dir.path().join("up-b.log"));

    // The agent's own credential for the API server (what its mounted token would be).
    let agent_credential = "agent-credential.robin-node.sa";
    let agent_token = dir.path().join("agent-token");
    std::fs::write(&agent_token, format!("{agent_credential}\n")).unwrap();

    // A with the systemd cgroup driver, B with cgroupfs; no token files in either: the
    // token_request rule needs none.
    let parent = find_cgroup2_mount().unwrap().join("robin-test");
    std::fs::create_dir_all(&parent).expect("creating the robin-test cgroup parent");
    let root = parent.join(format!("node{}", unique_id()));
    let mut tree = CgroupTree(vec![
        Cgroup::create(root.clone()).expect("creating cgroup root"),
    ]);
    let (uid_a, uid_b, uid_c) = (pod_uid(), pod_uid(), pod_uid());
    let cg_a = Cgroup::existing(
        tree.mkdirs(
            &root,
            &Path::new("kubepods.slice/kubepods-besteffort.slice")
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    uid_a.replace('-', "_")
                ))
                .join("cri-containerd-a.scope"),
        ),
    );
    let cg_b = Cgroup::existing(
        tree.mkdirs(
            &root,
            &Path::new("kubepods/burstable")
                .join(format!("pod{uid_b}"))
                .join("ctr-b"),
        ),
    );
    // C shares A's network namespace; its rule set names another ServiceAccount.
    let cg_c = Cgroup::existing(
        tree.mkdirs(
            &root,
            &Path::new("kubepods")
                .join(format!("pod{uid_c}"))
                .join("ctr-c"),
        ),
    );
    let _pc = ChildGuard(
        command_in(&topo_a.pod, Some(&cg_c), "sleep", &["600"])
            .spawn()
            .expect("starting pod c"),
    );
    let _pa = ChildGuard(
        command_in(&topo_a.pod, Some(&cg_a), "sleep", &["600"])
            .spawn()
            .expect("starting pod a"),
    );
    let _pb = ChildGuard(
        command_in(&topo_b.pod, Some(&cg_b), "sleep", &["600"])
            .spawn()
            .expect("starting pod b"),
    );

    let api = FakeApi::start();
    let source = |audience: &str, extra: &str| {
        format!(
            "{{ kind = \"token_request\", audience = \"{audience}\", api_server = \"{}\", allow_insecure_http = true, ca_file = {:?}, token_file = {:?}{extra} }}",
            api.url(),
            pki.file("upstream-ca.crt"),
            agent_token,
        )
    };
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nca_cert = {:?}\nca_key = {:?}\nupstream_roots = {:?}\n\n[capture]\nports = [443]\n\n\
             [[rule_sets.default.inject]]\nhosts = [\"{HOST}\"]\nsource = {}\n\n\
             [[rule_sets.other.inject]]\nhosts = [\"{HOST}\"]\nsource = {}\n\n\
             [[rule_sets.pinned.inject]]\nhosts = [\"{HOST}\"]\nsource = {}\n",
            pki.file("robin-ca.crt"),
            pki.file("robin-ca.key"),
            pki.file("upstream-ca.crt"),
            source("api.test", ""),
            source("other.test", ""),
            source("api.test", ", service_account = \"admin\""),
        ),
    )
    .unwrap();

    // Different namespaces; A names its ServiceAccount, B names none (Kubernetes: `default`).
    let pod_a = |rules: &str| {
        let mut p = pod_json(
            "alpha-0",
            &uid_a,
            "BestEffort",
            json!({"robin.dev/inject": "true", "robin.dev/rules": rules}),
        );
        p["metadata"]["namespace"] = json!("team-a");
        p["spec"]["serviceAccountName"] = json!("alpha-sa");
        p
    };
    let mut pod_b = pod_json(
        "bravo-0",
        &uid_b,
        "Burstable",
        json!({"robin.dev/inject": "true"}),
    );
    pod_b["metadata"]["namespace"] = json!("team-b");
    pod_b["spec"]
        .as_object_mut()
        .unwrap()
        .remove("serviceAccountName");
    let mut pod_c = pod_json(
        "charlie-0",
        &uid_c,
        "Guaranteed",
        json!({"robin.dev/inject": "true", "robin.dev/rules": "pinned"}),
    );
    pod_c["metadata"]["namespace"] = json!("team-a");
    pod_c["spec"]["serviceAccountName"] = json!("alpha-sa");
    api.upsert(pod_a("default"));
    api.upsert(pod_b);
    api.upsert(pod_c);
    api.open();

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
            // As verbose as Robin gets: no level may carry a token.
            .env("ROBIN_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log).unwrap())
            .spawn()
            .expect("starting robin node"),
    );
    let agent_logs = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    wait_for("/readyz 200", || {
        admin_get(admin, "/readyz").filter(|(s, _)| *s == 200)
    });
    for uid in [&uid_a, &uid_b] {
        wait_for("pods captured", || {
            pod_state(admin, uid).filter(|p| p["state"] == "captured")
        });
    }

    // A rule set naming another ServiceAccount cannot serve C (the API server would refuse to
    // bind that account's token to C): reported, not captured, nothing requested.
    let c = wait_for("pod c reported", || {
        pod_state(admin, &uid_c).filter(|p| p["error"].is_string())
    });
    assert_eq!(c["state"], "pending", "{c}");
    assert!(
        c["error"]
            .as_str()
            .unwrap()
            .contains("must be the pod's (team-a/alpha-sa)"),
        "{c}"
    );
    assert_eq!(
        curl(&topo_a.pod, &cg_c, "/c")["authorization"],
        json!([]),
        "pod c must not be captured"
    );

    let tok_a = bearer(&curl(&topo_a.pod, &cg_a, "/a"));
    let tok_b = bearer(&curl(&topo_b.pod, &cg_b, "/b"));
    assert_ne!(tok_a, tok_b, "two pods got the same token");
    let minted = api.token_requests();
    assert_eq!(minted.len(), 2, "one TokenRequest per pod: {minted:?}");
    for (tok, name, uid, ns, sa) in [
        (&tok_a, "alpha-0", &uid_a, "team-a", "alpha-sa"),
        (&tok_b, "bravo-0", &uid_b, "team-b", "default"),
    ] {
        let m = minted_for(&minted, tok);
        assert_eq!(
            (m.namespace.as_str(), m.service_account.as_str()),
            (ns, sa),
            "requested for the wrong ServiceAccount: {m:?}\n{}",
            agent_logs()
        );
        assert_eq!(
            m.request["spec"]["boundObjectRef"],
            json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid}),
            "{m:?}"
        );
        assert_eq!(m.request["spec"]["audiences"], json!(["api.test"]), "{m:?}");
        assert_eq!(
            m.authorization.as_deref(),
            Some(format!("Bearer {agent_credential}").as_str()),
            "requested with something other than the agent's credential"
        );
        assert_eq!(m.claims["sub"], format!("system:serviceaccount:{ns}:{sa}"));
        assert_eq!(m.claims["kubernetes.io"]["pod"]["uid"], uid.as_str());
    }

    // Pod A again: its token comes from the agent's cache, no new TokenRequest.
    assert_eq!(bearer(&curl(&topo_a.pod, &cg_a, "/a-again")), tok_a);
    assert_eq!(api.token_requests().len(), 2);

    // Another rule set: the pod's swapped proxy still acts for the pod.
    api.upsert(pod_a("other"));
    wait_for("rule set switched", || {
        pod_state(admin, &uid_a).filter(|p| p["rule_set"] == "other")
    });
    let tok_a2 = bearer(&curl(&topo_a.pod, &cg_a, "/a-other"));
    let minted = api.token_requests();
    assert_eq!(minted.len(), 3, "{minted:?}");
    let m = minted_for(&minted, &tok_a2);
    assert_eq!(m.request["spec"]["audiences"], json!(["other.test"]));
    assert_eq!(
        (m.namespace.as_str(), m.service_account.as_str()),
        ("team-a", "alpha-sa")
    );
    assert_eq!(m.request["spec"]["boundObjectRef"]["uid"], uid_a.as_str());

    let pods = serde_json::to_string(&debug_pods(admin)).unwrap();
    let logs = agent_logs();
    assert!(
        logs.contains("captured"),
        "the log is not the agent's: {logs}"
    );
    for secret in minted
        .iter()
        .map(|m| m.token.as_str())
        .chain([agent_credential])
    {
        assert!(!logs.contains(secret), "a token reached the agent's logs");
        assert!(!pods.contains(secret), "a token reached /debug/pods");
    }
}
