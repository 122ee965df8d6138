//! The pod watch through kube-rs against the test kit's fake API server, in process (no
//! privileges): what it asks for (a `resourceVersion=0` list, a bookmarked watch), the events
//! the reconciler gets, and the relist after the watch expires (410).
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use robin_agent::kube::{PodEvent, PodSelector, run_pod_watch};
use robin_e2e::fake_api::{FakeApi, NODE};
use serde_json::json;
use tokio::sync::mpsc;

fn pod(name: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "n", "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "containers": []},
    })
}

async fn next(rx: &mut mpsc::Receiver<PodEvent>) -> PodEvent {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("an event in time")
        .expect("the watch runs")
}

fn uids(ev: &PodEvent) -> Vec<String> {
    match ev {
        PodEvent::Restarted(pods) => pods.iter().map(|p| p.metadata.uid.clone()).collect(),
        PodEvent::Applied(p) | PodEvent::Deleted(p) => vec![p.metadata.uid.clone()],
    }
}

#[tokio::test]
async fn watch_lists_from_the_cache_streams_changes_and_relists_after_410() {
    let api = FakeApi::start();
    api.upsert(pod("a", NODE));
    api.upsert(pod("elsewhere", "node-b"));
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let synced = Arc::new(AtomicBool::new(false));
    let watch = tokio::spawn(run_pod_watch(
        client,
        PodSelector::OnNode(NODE.into()),
        tx,
        synced.clone(),
    ));
    // Lists fail until the server is open: retried with backoff, never synced meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!synced.load(Ordering::Relaxed));
    api.open();
    let first = next(&mut rx).await;
    assert!(matches!(first, PodEvent::Restarted(_)), "{first:?}");
    assert_eq!(uids(&first), ["uid-a"]);
    assert!(synced.load(Ordering::Relaxed));

    // Changes arrive once the watch is open (the fake does not replay from a version).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !api.requests().iter().any(|r| r.contains("watch=true")) {
        assert!(std::time::Instant::now() < deadline, "no watch opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.upsert(pod("b", NODE));
    let ev = next(&mut rx).await;
    assert!(
        matches!(ev, PodEvent::Applied(_)) && uids(&ev) == ["uid-b"],
        "{ev:?}"
    );
    api.delete("uid-a");
    let ev = next(&mut rx).await;
    assert!(
        matches!(ev, PodEvent::Deleted(_)) && uids(&ev) == ["uid-a"],
        "{ev:?}"
    );

    api.expire_watches();
    let ev = next(&mut rx).await;
    assert!(matches!(ev, PodEvent::Restarted(_)), "{ev:?}");
    assert_eq!(uids(&ev), ["uid-b"]);

    let requests = api.requests();
    let lists: Vec<_> = requests
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .collect();
    let watches: Vec<_> = requests
        .iter()
        .filter(|r| r.contains("watch=true"))
        .collect();
    assert!(lists.len() >= 3, "{requests:?}");
    for l in &lists {
        assert!(
            l.contains("resourceVersion=0"),
            "list not from the cache: {l}"
        );
    }
    assert!(
        watches[0].contains("allowWatchBookmarks=true"),
        "{watches:?}"
    );
    watch.abort();
}
