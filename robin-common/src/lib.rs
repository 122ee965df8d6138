//! Map types shared by Robin's eBPF programs and its userspace agent.
//!
//! Every type is `#[repr(C)]`, `Copy`, free of padding holes the verifier would reject on a
//! stack copy, and has the same layout for `bpfel-unknown-none` and the host. Addresses are kept
//! exactly as `struct bpf_sock_addr` carries them: each `u32` word holds network-order bytes, so
//! userspace turns a word back into octets with `u32::to_ne_bytes`.
// Host unit tests need std's test harness; everything else stays `no_std`.
#![cfg_attr(not(test), no_std)]

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

/// The last word of `::1` (network order); the first three are zero.
pub const LOOPBACK6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

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

    /// Whether connects to `port` (host order) are redirected; `0` never is (unused slots).
    /// Bounded loops only: this runs in the eBPF programs too.
    #[inline(always)]
    pub fn captures_port(&self, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_CAPTURE_PORTS {
            if self.ports[i] == port {
                return port != 0;
            }
            i += 1;
        }
        false
    }

    /// Whether an IPv4 destination (network-order word) stays uncaptured. Loopback and the
    /// unspecified address always do: the listener itself lives on loopback, and a local
    /// service is not an egress.
    #[inline(always)]
    pub fn excludes4(&self, ip: u32) -> bool {
        let first_octet = ip.to_ne_bytes()[0];
        if first_octet == 127 || ip == 0 {
            return true;
        }
        let n = self.n_exclude4 as usize;
        let mut i = 0;
        while i < MAX_EXCLUDES && i < n {
            let p = self.exclude4[i];
            if ip & p.mask == p.addr {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether an IPv6 destination (network-order words) stays uncaptured; `::` and `::1`
    /// always do.
    #[inline(always)]
    pub fn excludes6(&self, ip: &[u32; 4]) -> bool {
        if ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == LOOPBACK6_LAST) {
            return true;
        }
        let n = self.n_exclude6 as usize;
        let mut i = 0;
        while i < MAX_EXCLUDES && i < n {
            let p = self.exclude6[i];
            if ip[0] & p.mask[0] == p.addr[0]
                && ip[1] & p.mask[1] == p.addr[1]
                && ip[2] & p.mask[2] == p.addr[2]
                && ip[3] & p.mask[3] == p.addr[3]
            {
                return true;
            }
            i += 1;
        }
        false
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
// The crate denies `unsafe_code`; aya's `Pod` is an unsafe marker trait and nothing else is.
#[allow(unsafe_code)]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and have explicit
    // padding fields, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockRecord {}
    unsafe impl aya::Pod for super::PeerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_ne_bytes([a, b, c, d])
    }

    #[test]
    fn ports_match_only_configured_nonzero_slots() {
        let mut cfg = CaptureConfig::empty(15001);
        cfg.ports[0] = 80;
        cfg.ports[MAX_CAPTURE_PORTS - 1] = 443;
        assert!(cfg.captures_port(80));
        assert!(cfg.captures_port(443));
        assert!(!cfg.captures_port(8080));
        // Unused slots hold 0; port 0 is never captured.
        assert!(!cfg.captures_port(0));
    }

    #[test]
    fn ipv4_loopback_unspecified_and_configured_prefixes_are_excluded() {
        let mut cfg = CaptureConfig::empty(15001);
        assert!(cfg.excludes4(w(127, 0, 0, 1)));
        assert!(cfg.excludes4(w(127, 9, 9, 9)));
        assert!(cfg.excludes4(0));
        assert!(!cfg.excludes4(w(10, 1, 2, 3)));
        cfg.exclude4[0] = Prefix4 {
            addr: w(10, 0, 0, 0),
            mask: w(255, 0, 0, 0),
        };
        // Not counted yet: slots beyond `n_exclude4` are ignored.
        assert!(!cfg.excludes4(w(10, 1, 2, 3)));
        cfg.n_exclude4 = 1;
        assert!(cfg.excludes4(w(10, 1, 2, 3)));
        assert!(!cfg.excludes4(w(11, 1, 2, 3)));
    }

    #[test]
    fn ipv6_loopback_unspecified_and_configured_prefixes_are_excluded() {
        let mut cfg = CaptureConfig::empty(15001);
        assert!(cfg.excludes6(&[0, 0, 0, 0]));
        assert!(cfg.excludes6(&[0, 0, 0, LOOPBACK6_LAST]));
        let doc = [w(0x20, 0x01, 0x0d, 0xb8), 0, 0, w(0, 0, 0, 5)];
        assert!(!cfg.excludes6(&doc));
        // 2001:db8::/32
        cfg.exclude6[0] = Prefix6 {
            addr: [w(0x20, 0x01, 0x0d, 0xb8), 0, 0, 0],
            mask: [u32::MAX, 0, 0, 0],
        };
        cfg.n_exclude6 = 1;
        assert!(cfg.excludes6(&doc));
        assert!(!cfg.excludes6(&[w(0x20, 0x01, 0x0d, 0xb9), 0, 0, 1]));
    }
}
