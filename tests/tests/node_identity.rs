//! `robin node` with a `token_request` rule: each captured pod is served with a token the
//! Kubernetes API (the fake one, driven by the test) minted for *that* pod — its namespace, its
//! ServiceAccount (`default` when the pod names none), bound to it by name and uid — requested
//! with the agent's own credential. Pods are network namespaces plus kubelet-laid-out cgroups,
//! as in `node.rs`.
use robin_e2e::{
    BpfPins, Pki,
    node_fixture::{
        FakeApi, HOST, KubeletCgroups, MintedToken, PodNet, admin_get, curl, debug_pods, free_port,
        pod_json, pod_process, pod_state, pod_uid, start_agent, wait_for, write_node_config,
    },
    require_privileges, temp_dir,
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
    let dir = temp_dir("node-ident");
    let pki = Pki::new(dir.path(), &[HOST]);
    let (net_a, net_b) = (
        PodNet::new(&pki, dir.path().join("up-a.log")),
        PodNet::new(&pki, dir.path().join("up-b.log")),
    );

    // The agent's own credential for the API server (what its mounted token would be).
    let agent_credential = "agent-credential.robin-node.sa";
    let agent_token = dir.path().join("agent-token");
    std::fs::write(&agent_token, format!("{agent_credential}\n")).unwrap();

    // A with the systemd cgroup driver, B with cgroupfs; no token files in either: the
    // token_request rule needs none.
    let mut cgroups = KubeletCgroups::new();
    let (uid_a, uid_b, uid_c) = (pod_uid(), pod_uid(), pod_uid());
    let cg_a = cgroups.systemd(&uid_a, "besteffort", "cri-containerd-a");
    let cg_b = cgroups.cgroupfs(&uid_b, "burstable", "ctr-b");
    // C shares A's network namespace; its rule set names another ServiceAccount.
    let cg_c = cgroups.cgroupfs(&uid_c, "", "ctr-c");
    let _pa = pod_process(net_a.netns(), &cg_a);
    let _pb = pod_process(net_b.netns(), &cg_b);
    let _pc = pod_process(net_a.netns(), &cg_c);

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
    write_node_config(
        &config,
        &pki,
        &format!(
            "[[rule_sets.default.inject]]\nhosts = [\"{HOST}\"]\nsource = {}\n\n\
             [[rule_sets.other.inject]]\nhosts = [\"{HOST}\"]\nsource = {}\n\n\
             [[rule_sets.pinned.inject]]\nhosts = [\"{HOST}\"]\nsource = {}\n",
            source("api.test", ""),
            source("other.test", ""),
            source("api.test", ", service_account = \"admin\""),
        ),
    );

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
    let pins = BpfPins::new();
    // As verbose as Robin gets: no level may carry a token.
    let _agent = start_agent(&api, &config, &cgroups, &pins, admin, "debug", &agent_log);
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
        curl(net_a.netns(), &cg_c, "/c")["authorization"],
        json!([]),
        "pod c must not be captured"
    );

    let tok_a = bearer(&curl(net_a.netns(), &cg_a, "/a"));
    let tok_b = bearer(&curl(net_b.netns(), &cg_b, "/b"));
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
    assert_eq!(bearer(&curl(net_a.netns(), &cg_a, "/a-again")), tok_a);
    assert_eq!(api.token_requests().len(), 2);

    // Another rule set: the pod's swapped proxy still acts for the pod.
    api.upsert(pod_a("other"));
    wait_for("rule set switched", || {
        pod_state(admin, &uid_a).filter(|p| p["rule_set"] == "other")
    });
    let tok_a2 = bearer(&curl(net_a.netns(), &cg_a, "/a-other"));
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
