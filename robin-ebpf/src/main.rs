//! Robin's kernel half.
//!
//! * `connect4` / `connect6` (cgroup_sock_addr): a TCP connect from a captured cgroup to a
//!   capture port is rewritten to Robin's listener on loopback *in the workload's own netns*;
//!   the dialled address is stored under the socket cookie.
//! * `sock_ops`: once the redirected connection is established, the record is re-keyed by what the
//!   proxy can see from its accepted socket (netns cookie + workload port); socket-cookie records
//!   are deleted when the socket closes.
//! * `getpeername4` / `getpeername6`: the workload is told the address it dialled.
//!
//! Capture fails closed. A captured connect is refused (return 0: the workload sees `EPERM`) when
//! its original-destination record cannot be stored, and counted by reason in `CAPTURE_REFUSED`;
//! it is never let through uncaptured. Otherwise every program returns 1 (allow), and with no
//! listener a redirected connect is refused by the kernel.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        EbpfContext,
        bindings::{
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
            BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
        },
        helpers::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie,
        },
        macros::{cgroup_sock_addr, map, sock_ops},
        maps::{HashMap, LruHashMap, PerCpuArray},
        programs::{SockAddrContext, SockOpsContext},
    };
    use robin_common::{
        AF_INET, AF_INET6, CaptureConfig, LOOPBACK6_LAST, MAX_CAPTURED_CGROUPS, MAX_CGROUP_DEPTH,
        MAX_TRACKED_SOCKETS, OrigDst, PeerKey, REFUSAL_REASONS, RefusalReason, SockRecord,
    };

    const SOCK_STREAM: u32 = 1;
    const IPPROTO_TCP: u32 = 6;

    /// cgroup v2 id → capture configuration. Written by the agent on attach.
    #[map]
    static CAPTURE_CONFIG: HashMap<u64, CaptureConfig> =
        HashMap::with_max_entries(MAX_CAPTURED_CGROUPS, 0);

    /// Workload socket cookie → dialled destination, for the socket's lifetime.
    #[map]
    static SOCK_ORIG_DST: LruHashMap<u64, SockRecord> =
        LruHashMap::with_max_entries(MAX_TRACKED_SOCKETS, 0);

    /// (netns cookie, workload port, wire family) → dialled destination. Read once and deleted by
    /// the proxy at accept.
    #[map]
    static ORIG_DST_BY_PEER: LruHashMap<PeerKey, OrigDst> =
        LruHashMap::with_max_entries(MAX_TRACKED_SOCKETS, 0);

    /// Refused captured connects by [`RefusalReason`]; read and summed over CPUs by the agent.
    #[map]
    static CAPTURE_REFUSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(REFUSAL_REASONS, 0);

    const ALLOW: i32 = 1;
    const REFUSE: i32 = 0;

    /// Counts the refusal and returns the verdict that makes `connect()` fail with `EPERM`.
    #[inline(always)]
    fn refuse(reason: RefusalReason) -> i32 {
        if let Some(n) = CAPTURE_REFUSED.get_ptr_mut(reason as u32) {
            // SAFETY: the pointer is this CPU's slot of a live map entry, valid for the
            // program's run; a program is not migrated off its CPU while it runs.
            unsafe { *n += 1 };
        }
        REFUSE
    }

    const fn ipv4(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_ne_bytes([a, b, c, d])
    }
    const LOOPBACK4: u32 = ipv4(127, 0, 0, 1);
    const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// The configuration of the nearest captured cgroup: the task's own, or an ancestor's
    /// (containers sit below the pod cgroup the agent attached to).
    #[inline(always)]
    fn capture_config() -> Option<&'static CaptureConfig> {
        // SAFETY: a helper without arguments, callable from cgroup_sock_addr programs.
        let own = unsafe { bpf_get_current_cgroup_id() };
        if let Some(cfg) = CAPTURE_CONFIG.get_ptr(own) {
            // SAFETY: a pointer into a live map value; the agent only replaces whole entries
            // and the reference does not outlive this program run.
            return Some(unsafe { &*cfg });
        }
        for level in 1..MAX_CGROUP_DEPTH as i32 {
            // SAFETY: `level` is a plain integer; the helper returns 0 beyond the root.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
            if id == 0 || id == own {
                break;
            }
            if let Some(cfg) = CAPTURE_CONFIG.get_ptr(id) {
                // SAFETY: as above, a live map value read within this program run.
                return Some(unsafe { &*cfg });
            }
        }
        None
    }

    #[inline(always)]
    fn is_tcp(ctx: &SockAddrContext) -> bool {
        // SAFETY: `sock_addr` is the kernel's context for this run; read only.
        let sa = unsafe { &*ctx.sock_addr };
        sa.type_ == SOCK_STREAM && sa.protocol == IPPROTO_TCP
    }

    #[inline(always)]
    fn remember(
        ctx: &SockAddrContext,
        orig: OrigDst,
        wire_family: u16,
    ) -> Result<(), RefusalReason> {
        // SAFETY: `ctx` is the program's own `bpf_sock_addr` context, valid for this call.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let record = SockRecord {
            orig,
            wire_family,
            _pad: [0; 3],
        };
        SOCK_ORIG_DST
            .insert(cookie, record, 0)
            .map_err(|_| RefusalReason::RecordStore)
    }

    #[cgroup_sock_addr(connect4)]
    pub fn connect4(ctx: SockAddrContext) -> i32 {
        match try_connect4(&ctx) {
            Ok(()) => ALLOW,
            Err(reason) => refuse(reason),
        }
    }

    fn try_connect4(ctx: &SockAddrContext) -> Result<(), RefusalReason> {
        if !is_tcp(ctx) {
            return Ok(());
        }
        let Some(cfg) = capture_config() else {
            return Ok(());
        };
        // SAFETY: `sock_addr` is the kernel's context for this run, writable by
        // cgroup_sock_addr programs; no other reference to it exists.
        let sa = unsafe { &mut *ctx.sock_addr };
        let ip = sa.user_ip4;
        let port = u16::from_be(sa.user_port as u16);
        if !cfg.captures_port(port) || cfg.excludes4(ip) {
            return Ok(());
        }
        let orig = OrigDst {
            family: AF_INET,
            port,
            addr: [ip, 0, 0, 0],
        };
        // Record first: a connection the proxy cannot attribute is not redirected, and not let
        // through either — the `?` refuses the connect.
        remember(ctx, orig, AF_INET)?;
        sa.user_ip4 = LOOPBACK4;
        sa.user_port = u32::from(cfg.listener_port.to_be());
        Ok(())
    }

    #[cgroup_sock_addr(connect6)]
    pub fn connect6(ctx: SockAddrContext) -> i32 {
        match try_connect6(&ctx) {
            Ok(()) => ALLOW,
            Err(reason) => refuse(reason),
        }
    }

    fn try_connect6(ctx: &SockAddrContext) -> Result<(), RefusalReason> {
        if !is_tcp(ctx) {
            return Ok(());
        }
        let Some(cfg) = capture_config() else {
            return Ok(());
        };
        // SAFETY: `sock_addr` is the kernel's context for this run, writable by
        // cgroup_sock_addr programs; no other reference to it exists.
        let sa = unsafe { &mut *ctx.sock_addr };
        let ip = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        let port = u16::from_be(sa.user_port as u16);
        if !cfg.captures_port(port) {
            return Ok(());
        }
        let orig = OrigDst {
            family: AF_INET6,
            port,
            addr: ip,
        };
        let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX;
        if mapped {
            // An IPv4 destination dialled from a dual-stack socket travels as IPv4: send it to
            // the 127.0.0.1 listener as ::ffff:127.0.0.1.
            if cfg.excludes4(ip[3]) {
                return Ok(());
            }
            remember(ctx, orig, AF_INET)?;
            sa.user_ip6[3] = LOOPBACK4;
        } else {
            if cfg.excludes6(&ip) {
                return Ok(());
            }
            remember(ctx, orig, AF_INET6)?;
            sa.user_ip6[0] = 0;
            sa.user_ip6[1] = 0;
            sa.user_ip6[2] = 0;
            sa.user_ip6[3] = LOOPBACK6_LAST;
        }
        sa.user_port = u32::from(cfg.listener_port.to_be());
        Ok(())
    }

    #[sock_ops]
    pub fn sock_ops(ctx: SockOpsContext) -> u32 {
        let _ = try_sock_ops(&ctx);
        1
    }

    fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i64> {
        let op = ctx.op();
        if op != BPF_SOCK_OPS_TCP_CONNECT_CB
            && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
            && op != BPF_SOCK_OPS_STATE_CB
        {
            return Ok(());
        }
        // SAFETY: `ctx` is the program's own `bpf_sock_ops` context, valid for this call.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let Some(record) = SOCK_ORIG_DST.get_ptr(cookie) else {
            return Ok(());
        };
        // SAFETY: a live map value of a `Copy` type, copied out at once.
        let record = unsafe { *record };
        match op {
            BPF_SOCK_OPS_TCP_CONNECT_CB => {
                // Ask for state changes so the record is dropped when the socket closes,
                // including a connect that never completes (agent down: refused).
                let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
                ctx.set_cb_flags(flags as i32).map_err(i64::from)?;
            }
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                // Runs before the final ACK of the handshake is sent, so the entry exists before
                // the listener can accept the connection.
                let key = PeerKey {
                    // SAFETY: `ctx` is the program's own `bpf_sock_ops` context.
                    netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
                    client_port: ctx.local_port() as u16,
                    wire_family: record.wire_family,
                    _pad: 0,
                };
                ORIG_DST_BY_PEER
                    .insert(key, record.orig, 0)
                    .map_err(i64::from)?;
            }
            BPF_SOCK_OPS_STATE_CB => {
                if ctx.arg(1) == BPF_TCP_CLOSE {
                    SOCK_ORIG_DST.remove(cookie).map_err(i64::from)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn getpeername4(ctx: SockAddrContext) -> i32 {
        // SAFETY: `ctx` is the program's own `bpf_sock_addr` context, valid for this call.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(record) = SOCK_ORIG_DST.get_ptr(cookie) {
            // SAFETY: a live map value of a `Copy` type, copied out at once.
            let record = unsafe { *record };
            if record.orig.family == AF_INET {
                // SAFETY: `sock_addr` is the kernel's context for this run, writable by
                // getpeername programs; no other reference to it exists.
                let sa = unsafe { &mut *ctx.sock_addr };
                sa.user_ip4 = record.orig.addr[0];
                sa.user_port = u32::from(record.orig.port.to_be());
            }
        }
        1
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn getpeername6(ctx: SockAddrContext) -> i32 {
        // SAFETY: `ctx` is the program's own `bpf_sock_addr` context, valid for this call.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(record) = SOCK_ORIG_DST.get_ptr(cookie) {
            // SAFETY: a live map value of a `Copy` type, copied out at once.
            let record = unsafe { *record };
            if record.orig.family == AF_INET6 {
                // SAFETY: `sock_addr` is the kernel's context for this run, writable by
                // getpeername programs; no other reference to it exists.
                let sa = unsafe { &mut *ctx.sock_addr };
                sa.user_ip6[0] = record.orig.addr[0];
                sa.user_ip6[1] = record.orig.addr[1];
                sa.user_ip6[2] = record.orig.addr[2];
                sa.user_ip6[3] = record.orig.addr[3];
                sa.user_port = u32::from(record.orig.port.to_be());
            }
        }
        1
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    // SAFETY: the kernel reads the license from this section; the name is unique in the object.
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// Host builds (clippy, `cargo build --workspace`) see an empty binary; the real object is built
/// for `bpfel-unknown-none` by `robin-agent/build.rs`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
