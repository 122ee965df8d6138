//! Map types shared by Robin's eBPF programs and its userspace agent.
//!
//! Every type is `#[repr(C)]`, `Copy`, free of padding holes the verifier would reject on a
//! stack copy, and has the same layout for `bpfel-unknown-none` and the host. Addresses are kept
//! exactly as `struct bpf_sock_addr` carries them: each `u32` word holds network-order bytes, so
//! userspace turns a word back into octets with `u32::to_ne_bytes`.
#![no_std]

/// Pinning directory and map names; userspace looks maps up by these names.
pub mod names {
    pub const CAPTURE_CONFIG: &str = "CAPTURE_CONFIG";
    pub const SOCK_ORIG_DST: &str = "SOCK_ORIG_DST";
    pub const ORIG_DST_BY_PEER: &str = "ORIG_DST_BY_PEER";
    pub const CAPTURE_REFUSED: &str = "CAPTURE_REFUSED";
}

/// `AF_INET` / `AF_INET6` as the kernel spells them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Most capture ports one cgroup can name (80 and 443 are the usual two).
pub const MAX_CAPTURE_PORTS: usize = 16;
/// Most extra excluded IPv4 / IPv6 prefixes per cgroup (loopback is always excluded).
pub const MAX_EXCLUDES: usize = 8;
/// How far up the cgroup hierarchy the programs look for a captured ancestor. Containers of a
/// pod live one or two levels below the pod cgroup, which itself sits 3-5 levels below the root.
pub const MAX_CGROUP_DEPTH: usize = 16;

/// Capacity of the per-socket and per-peer LRU maps.
pub const MAX_TRACKED_SOCKETS: u32 = 65_536;
/// Capacity of the per-cgroup configuration map (one entry per captured pod).
pub const MAX_CAPTURED_CGROUPS: u32 = 4_096;

/// An IPv4 prefix: `addr` and `mask` are network-order words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefix4 {
    pub addr: u32,
    pub mask: u32,
}

/// An IPv6 prefix as four network-order words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefix6 {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
}

/// What a captured cgroup wants redirected, keyed by cgroup v2 id in `CAPTURE_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Destination ports (host order) whose TCP connects are redirected; `0` marks unused slots.
    pub ports: [u16; MAX_CAPTURE_PORTS],
    /// Robin's listener port (host order) on 127.0.0.1 and ::1 inside the workload's netns.
    pub listener_port: u16,
    /// Number of valid entries in `exclude4` / `exclude6`.
    pub n_exclude4: u16,
    pub n_exclude6: u16,
    pub _pad: u16,
    pub exclude4: [Prefix4; MAX_EXCLUDES],
    pub exclude6: [Prefix6; MAX_EXCLUDES],
}

impl CaptureConfig {
    pub const fn empty(listener_port: u16) -> Self {
        Self {
            ports: [0; MAX_CAPTURE_PORTS],
            listener_port,
            n_exclude4: 0,
            n_exclude6: 0,
            _pad: 0,
            exclude4: [Prefix4 { addr: 0, mask: 0 }; MAX_EXCLUDES],
            exclude6: [Prefix6 {
                addr: [0; 4],
                mask: [0; 4],
            }; MAX_EXCLUDES],
        }
    }
}

/// The destination a workload dialled, as it dialled it (`family` is the socket's address
/// family, so an IPv4-mapped IPv6 destination stays `AF_INET6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub family: u16,
    /// Host order.
    pub port: u16,
    /// IPv4 in `addr[0]`; IPv6 in all four words. Network-order words.
    pub addr: [u32; 4],
}

/// Per-socket record written by `connect4/6`, keyed by the workload socket's cookie in
/// `SOCK_ORIG_DST`. It lives as long as the socket (sock_ops deletes it on close) so that
/// `getpeername` can keep answering with the dialled address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    pub orig: OrigDst,
    /// Family of the redirected connection on the wire: `AF_INET` for IPv4 and for IPv4-mapped
    /// IPv6 (those reach the 127.0.0.1 listener), `AF_INET6` for native IPv6.
    pub wire_family: u16,
    pub _pad: [u16; 3],
}

/// Key of `ORIG_DST_BY_PEER`: what the proxy can name from a socket it accepted — the netns it
/// listens in, the peer's (workload's) port and the wire family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub netns_cookie: u64,
    /// Host order.
    pub client_port: u16,
    pub wire_family: u16,
    pub _pad: u32,
}

/// Why `connect4` / `connect6` refused a captured connect (the workload sees `EPERM`). The
/// value indexes the per-CPU `u64` counters of `CAPTURE_REFUSED`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The socket's original-destination record could not be stored: redirecting would leave
    /// the proxy unable to attribute the connection, and letting it through would bypass
    /// capture.
    RecordStore = 0,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 1] = [RefusalReason::RecordStore];

    /// The `reason` label of `robin_capture_refused_total`.
    pub const fn label(self) -> &'static str {
        match self {
            RefusalReason::RecordStore => "record_store_failed",
        }
    }
}

/// Entries of `CAPTURE_REFUSED`: one per [`RefusalReason`].
pub const REFUSAL_REASONS: u32 = RefusalReason::ALL.len() as u32;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and have explicit
    // padding fields, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockRecord {}
    unsafe impl aya::Pod for super::PeerKey {}
}
