//! The kernel half of capture on a real kernel: cgroup connect redirection, original-destination
//! recovery, getpeername restoration, refusal of direct connects, detach, and a concurrent burst.
//!
//! World per test: a "pod" and an "upstream" network namespace joined by veth (no route out), a
//! workload cgroup, Robin's listener opened inside the pod namespace by this process, and an
//! upstream that answers "direct" to whatever reaches it uncaptured.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use robin_agent::capture::{Attachment, CaptureSettings, CapturedListener, Capturer, PinDir};
use robin_common::{RefusalReason, SockRecord};
use robin_e2e::{
    BpfPins, Cgroup, Topology, command_in, output_within, require_privileges, workload_cgroup,
    workload_script,
};
use tokio::io::AsyncWriteExt;

const CAPTURED_PORT: u16 = 8443;
const OTHER_PORT: u16 = 9000;
const LIMIT: Duration = Duration::from_secs(30);

struct World {
    topo: Topology,
    capturer: Capturer,
    listener: Arc<CapturedListener>,
    cgroup: Cgroup,
    attachment: Option<Attachment>,
    served: Arc<AtomicUsize>,
}

impl World {
    async fn new(extra_addrs: u8, ports: Vec<u16>) -> Self {
        require_privileges();
        let capturer = Capturer::load().expect("loading the eBPF object");
        Self::with_capturer(capturer, extra_addrs, ports).await
    }

    async fn with_capturer(mut capturer: Capturer, extra_addrs: u8, ports: Vec<u16>) -> Self {
        let topo = Topology::new(extra_addrs);
        let listener = Arc::new(
            CapturedListener::bind(&topo.pod.handle(), 0, capturer.orig_dst_table())
                .expect("binding the listener in the pod netns"),
        );
        assert!(
            listener.ports().ipv6,
            "the pod namespace has ::1, so the IPv6 listener must bind"
        );
        let served = Arc::new(AtomicUsize::new(0));
        tokio::spawn(answer_with_orig_dst(listener.clone(), served.clone()));
        start_direct_upstream(&topo);
        let cgroup = workload_cgroup();
        let settings = CaptureSettings::new(ports, listener.ports().port);
        let attachment = Some(capturer.attach(&cgroup, &settings).expect("attaching"));
        Self {
            topo,
            capturer,
            listener,
            cgroup,
            attachment,
            served,
        }
    }

    /// Runs the workload script with `args` in the pod netns, inside the captured cgroup or
    /// not, within `limit`; its stdout, once it has succeeded.
    async fn run(&self, captured: bool, args: &[&str], limit: Duration) -> Vec<u8> {
        let script = workload_script();
        let mut argv = vec![script.to_str().expect("utf-8 path")];
        argv.extend_from_slice(args);
        let cmd = command_in(
            &self.topo.pod,
            captured.then_some(&self.cgroup),
            "python3",
            &argv,
        );
        let out = output_within(cmd, limit).await;
        assert!(
            out.status.success(),
            "workload {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs the workload's `connect` in the pod netns, inside the captured cgroup or not.
    async fn connect(
        &self,
        captured: bool,
        family: &str,
        host: IpAddr,
        port: u16,
    ) -> (String, u16, String) {
        let (host, port) = (host.to_string(), port.to_string());
        let out = self
            .run(captured, &["connect", family, &host, &port], LIMIT)
            .await;
        let v: serde_json::Value = serde_json::from_slice(&out).expect("workload JSON");
        (
            v["peer"][0].as_str().expect("peer host").to_owned(),
            v["peer"][1].as_u64().expect("peer port") as u16,
            v["reply"].as_str().expect("reply").to_owned(),
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(a) = self.attachment.take() {
            self.capturer.detach(a);
        }
    }
}

/// Stands in for the proxy: tells the workload which original destination the kernel recorded.
async fn answer_with_orig_dst(listener: Arc<CapturedListener>, served: Arc<AtomicUsize>) {
    loop {
        let Ok((mut stream, orig, _client)) = listener.accept().await else {
            continue;
        };
        served.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _ = stream.write_all(format!("robin {orig}\n").as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// TCP servers on the upstream addresses (captured and other port) and a UDP echo, answering
/// "direct": anything that reaches them was not captured.
fn start_direct_upstream(topo: &Topology) {
    let ns = topo.upstream.handle();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for ip in topo.upstream_ips() {
        addrs.push(SocketAddr::new(ip, CAPTURED_PORT));
        addrs.push(SocketAddr::new(ip, OTHER_PORT));
    }
    let (tcp, udp) = ns
        .run(|| {
            let tcp: Vec<_> = addrs
                .iter()
                .map(|a| std::net::TcpListener::bind(a).expect("binding upstream"))
                .collect();
            let udp =
                std::net::UdpSocket::bind(SocketAddr::new(topo.upstream_ip4.into(), CAPTURED_PORT))
                    .expect("binding upstream udp");
            (tcp, udp)
        })
        .expect("entering upstream netns");
    for l in tcp {
        l.set_nonblocking(true).expect("nonblocking");
        let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(b"direct\n").await;
                    let _ = s.shutdown().await;
                });
            }
        });
    }
    udp.set_nonblocking(true).expect("nonblocking");
    let udp = tokio::net::UdpSocket::from_std(udp).expect("tokio udp");
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(b"direct\n", from).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_connect_is_redirected_with_its_original_destination() {
    let w = World::new(0, vec![CAPTURED_PORT]).await;
    let up = IpAddr::from(w.topo.upstream_ip4);
    let (peer, port, reply) = w.connect(true, "4", up, CAPTURED_PORT).await;
    assert_eq!(reply, format!("robin {up}:{CAPTURED_PORT}"));
    assert_eq!(
        (peer.as_str(), port),
        (up.to_string().as_str(), CAPTURED_PORT),
        "getpeername must show the dialled address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_connect_is_redirected_with_its_original_destination() {
    let w = World::new(0, vec![CAPTURED_PORT]).await;
    let up = IpAddr::from(w.topo.upstream_ip6);
    let (peer, port, reply) = w.connect(true, "6", up, CAPTURED_PORT).await;
    assert_eq!(reply, format!("robin [{up}]:{CAPTURED_PORT}"));
    assert_eq!(
        (peer.as_str(), port),
        (up.to_string().as_str(), CAPTURED_PORT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_mapped_connect_is_redirected_and_reported_as_ipv4() {
    let w = World::new(0, vec![CAPTURED_PORT]).await;
    let up = IpAddr::from(w.topo.upstream_ip4);
    let (peer, port, reply) = w.connect(true, "mapped", up, CAPTURED_PORT).await;
    assert_eq!(reply, format!("robin {up}:{CAPTURED_PORT}"));
    assert_eq!(
        (peer.as_str(), port),
        (format!("::ffff:{up}").as_str(), CAPTURED_PORT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncaptured_cgroup_other_ports_and_udp_go_direct() {
    let w = World::new(0, vec![CAPTURED_PORT]).await;
    let up = IpAddr::from(w.topo.upstream_ip4);
    let (_, _, reply) = w.connect(false, "4", up, CAPTURED_PORT).await;
    assert_eq!(
        reply, "direct",
        "a process outside the captured cgroup is never redirected"
    );
    let (_, _, reply) = w.connect(true, "4", up, OTHER_PORT).await;
    assert_eq!(
        reply, "direct",
        "a port outside the capture set is never redirected"
    );
    let (_, _, reply) = w
        .connect(true, "6", w.topo.upstream_ip6.into(), OTHER_PORT)
        .await;
    assert_eq!(reply, "direct");

    let (up, port) = (up.to_string(), CAPTURED_PORT.to_string());
    let out = w.run(true, &["udp", &up, &port], LIMIT).await;
    assert!(
        String::from_utf8_lossy(&out).contains("direct"),
        "UDP is never redirected"
    );
    assert_eq!(w.served.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_connect_to_the_listener_is_closed_unserved() {
    let w = World::new(0, vec![CAPTURED_PORT]).await;
    let port = w.listener.ports().port;
    for (family, ip) in [("4", "127.0.0.1"), ("6", "::1")] {
        let (_, _, reply) = w.connect(true, family, ip.parse().expect("ip"), port).await;
        assert_eq!(
            reply, "",
            "a connection the kernel did not redirect gets no bytes"
        );
    }
    assert_eq!(
        w.served.load(Ordering::SeqCst),
        0,
        "nothing reached the handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_restores_direct_connects() {
    let mut w = World::new(0, vec![CAPTURED_PORT]).await;
    let up = IpAddr::from(w.topo.upstream_ip4);
    let (_, _, reply) = w.connect(true, "4", up, CAPTURED_PORT).await;
    assert!(
        reply.starts_with("robin "),
        "captured before detach: {reply}"
    );
    let attachment = w.attachment.take().expect("attached");
    w.capturer.detach(attachment);
    let (peer, _, reply) = w.connect(true, "4", up, CAPTURED_PORT).await;
    assert_eq!(reply, "direct");
    assert_eq!(peer, up.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_connects_each_recover_their_own_destination() {
    const TOTAL: usize = 3000;
    let ports: Vec<u16> = (0..8).map(|i| CAPTURED_PORT + 1 + i).collect();
    let w = World::new(8, ports.clone()).await;
    let mut targets = Vec::new();
    for ip in &w.topo.extra_upstream_ip4 {
        for port in &ports {
            targets.push(format!("{ip}:{port}"));
        }
    }
    let mut args = vec!["burst".to_owned(), "200".into(), TOTAL.to_string()];
    args.extend(targets);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w.run(true, &args, Duration::from_secs(120)).await;
    let v: serde_json::Value = serde_json::from_slice(&out).expect("burst JSON");
    assert_eq!(v["ok"].as_u64(), Some(TOTAL as u64), "burst result: {v}");
    assert_eq!(w.served.load(Ordering::SeqCst), TOTAL);

    // Every per-peer record was consumed at accept; per-socket records go when sockets close.
    let table = w.capturer.orig_dst_table();
    assert_eq!(table.len(), 0, "unclaimed per-peer records leaked");
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.capturer.tracked_sockets() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        w.capturer.tracked_sockets(),
        0,
        "per-socket records leaked after close"
    );
}

/// Pins a plain (non-LRU) hash map with room for one record where `Capturer::load_pinned` looks
/// for `SOCK_ORIG_DST`, so the kernel really fails to store a second record (`E2BIG`); the
/// production map is an LRU, whose inserts practically never fail, so this is how a test gets
/// the failure the programs must handle.
#[allow(
    unsafe_code,
    reason = "raw bpf(2) calls: pins a map of the wrong shape, which aya cannot make"
)]
fn pin_one_slot_record_map(pins: &BpfPins) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u8; 112],
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        rest: [u8; 112],
    }
    let dir = pins.path().join("maps/v1");
    std::fs::create_dir_all(&dir).expect("creating the map pin directory");
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: 8,
        value_size: std::mem::size_of::<SockRecord>() as u32,
        max_entries: 1,
        rest: [0; 112],
    };
    // SAFETY: `attr` is a valid, zero-padded `union bpf_attr` for BPF_MAP_CREATE of its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const attr,
            std::mem::size_of::<MapCreate>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let path = std::ffi::CString::new(
        dir.join("SOCK_ORIG_DST")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("pin path");
    let pin = ObjPin {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
        rest: [0; 112],
    };
    // SAFETY: `pin` points at a NUL-terminated path that outlives the call; `fd` is ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &raw const pin,
            std::mem::size_of::<ObjPin>(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the descriptor this function created; the pin keeps the map.
    unsafe { libc::close(fd as libc::c_int) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_whose_record_cannot_be_stored_is_refused_and_counted() {
    require_privileges();
    let pins = BpfPins::new();
    pin_one_slot_record_map(&pins);
    let capturer = Capturer::load_pinned(PinDir::open(pins.path()).expect("pin dir"))
        .expect("loading the eBPF object over the pinned map");
    let refused = capturer.refused_connects();
    let w = World::with_capturer(capturer, 0, vec![CAPTURED_PORT]).await;
    let up = IpAddr::from(w.topo.upstream_ip4);

    // The first connection holds the only record slot while the second is dialled.
    let (ip, port) = (up.to_string(), CAPTURED_PORT.to_string());
    let out = w.run(true, &["hold-then-connect", &ip, &port], LIMIT).await;
    let v: serde_json::Value = serde_json::from_slice(&out).expect("workload JSON");
    assert_eq!(v["first"], format!("robin {up}:{CAPTURED_PORT}"), "{v}");
    assert_eq!(
        v["second"],
        serde_json::Value::Null,
        "the second connect must not get through (\"direct\" = uncaptured): {v}"
    );
    assert_eq!(v["second_error"], "EPERM", "{v}");
    assert_eq!(
        w.served.load(Ordering::SeqCst),
        1,
        "only the first reached Robin"
    );
    assert_eq!(
        refused.snapshot(),
        vec![(RefusalReason::RecordStore, 1)],
        "the refusal is counted by reason"
    );
}

/// `robin exec` names its cgroup by its pid. One left by a killed `robin exec` whose pid is
/// reused is empty and is made afresh; one with a process in it is never taken over.
#[test]
fn a_leftover_empty_cgroup_is_replaced_and_a_populated_one_refused() {
    use std::os::unix::fs::MetadataExt as _;
    require_privileges();
    let parent = workload_cgroup();
    let path = parent.path().join("exec-leftover");
    std::fs::create_dir(&path).expect("the leftover cgroup");
    let leftover_id = std::fs::metadata(&path).unwrap().ino();
    let fresh = Cgroup::create_own(&path).expect("the empty leftover is replaced");
    let fresh_id = std::fs::metadata(fresh.path()).unwrap().ino();
    assert_ne!(fresh_id, leftover_id, "a new cgroup, not the leftover");

    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawning sleep");
    fresh.add_pid(sleeper.id()).expect("moving sleep in");
    let refused = Cgroup::create_own(fresh.path());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let err = refused.expect_err("a populated cgroup is not taken over");
    assert!(err.to_string().contains("has processes in it"), "{err}");
    assert!(fresh.path().exists(), "the populated cgroup was left alone");
}
