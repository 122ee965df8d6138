//! The userspace half of capture: load the eBPF object once, attach it per cgroup, open the
//! listener inside the workload's network namespace, and accept only connections the kernel
//! redirected, each paired with the destination the workload dialled.
use std::{fmt, net::SocketAddr};

pub mod cgroup;
pub mod ebpf;
pub mod listener;
pub mod netns;

pub use cgroup::{Cgroup, Cgroup2Mount, find_cgroup2_mount};
pub use ebpf::{
    Attachment, CaptureSettings, Capturer, OrigDstTable, PinDir, RefusedConnects, ReplaceError,
};
pub use listener::{CapturedListener, ListenerPorts};
pub use netns::NetNs;

/// The destination the workload dialled, recovered from the kernel at accept. IPv4-mapped IPv6
/// destinations are given back as plain IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The workload's end of an accepted connection (its loopback address and ephemeral port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Capabilities the agent needs, checked once at start-up so a missing one is named clearly
/// instead of surfacing as an `EPERM` from deep inside a syscall.
pub fn check_capabilities(need_setns: bool) -> Result<(), String> {
    use caps::{CapSet, Capability};
    let mut wanted = vec![
        (Capability::CAP_BPF, "load eBPF programs"),
        (Capability::CAP_NET_ADMIN, "attach cgroup socket programs"),
        (Capability::CAP_PERFMON, "read socket cookies in eBPF"),
    ];
    if need_setns {
        wanted.push((Capability::CAP_SYS_ADMIN, "enter pod network namespaces"));
    }
    let effective =
        caps::read(None, CapSet::Effective).map_err(|e| format!("reading capabilities: {e}"))?;
    // CAP_SYS_ADMIN implies CAP_BPF and CAP_PERFMON on the kernels we support.
    let admin = effective.contains(&Capability::CAP_SYS_ADMIN);
    let missing: Vec<String> = wanted
        .into_iter()
        .filter(|(cap, _)| {
            let implied = admin && matches!(cap, Capability::CAP_BPF | Capability::CAP_PERFMON);
            !(effective.contains(cap) || implied)
        })
        .map(|(cap, why)| format!("{cap} (to {why})"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing capabilities: {}; run as root or grant them to the robin binary",
            missing.join(", ")
        ))
    }
}
