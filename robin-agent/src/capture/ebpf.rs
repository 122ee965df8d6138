//! Loading Robin's eBPF object and attaching it to cgroups.
//!
//! One [`Capturer`] per process: the object is loaded once, then every captured cgroup gets the
//! same five programs and an entry in `CAPTURE_CONFIG` keyed by its cgroup id. Attachments are
//! bpf_links, which the kernel always treats as multi-attach (other cgroup programs keep
//! working); it rejects any attach flag on a link, hence `CgroupAttachMode::Single` (flags 0).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, MapError},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        cgroup_sock_addr::CgroupSockAddrLinkId, sock_ops::SockOpsLinkId,
    },
};
use robin_common::{
    AF_INET, AF_INET6, CaptureConfig, MAX_CAPTURE_PORTS, MAX_EXCLUDES, PeerKey, Prefix4, Prefix6,
    SockRecord, names,
};

use super::{Cgroup, OrigDst, cgroup::CgroupError};

/// The object built by `build.rs` from `robin-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/robin-ebpf"));

const SOCK_ADDR_PROGRAMS: [&str; 4] = ["getpeername4", "getpeername6", "connect4", "connect6"];
const SOCK_OPS_PROGRAM: &str = "sock_ops";
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0}: {1}")]
    Program(&'static str, #[source] ProgramError),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, #[source] MapError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("opening cgroup {0}: {1}")]
    OpenCgroup(String, #[source] std::io::Error),
    #[error("at most {MAX_CAPTURE_PORTS} capture ports per cgroup, got {0}")]
    TooManyPorts(usize),
    #[error("at most {MAX_EXCLUDES} excluded IPv4 and {MAX_EXCLUDES} IPv6 prefixes per cgroup")]
    TooManyExcludes,
    #[error("capture port 0 is not a port")]
    PortZero,
    #[error("prefix length {1} is too long for {0}")]
    BadPrefix(IpAddr, u8),
}

/// What one cgroup captures. Loopback is always excluded in the kernel; `exclude` adds to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSettings {
    pub ports: Vec<u16>,
    pub listener_port: u16,
    pub exclude: Vec<(IpAddr, u8)>,
}

impl CaptureSettings {
    /// Link-local is excluded by default: cloud metadata (169.254.169.254) and IPv6 neighbours
    /// are node plumbing, not workload egress.
    pub fn default_excludes() -> Vec<(IpAddr, u8)> {
        vec![
            (IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16),
            (IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
        ]
    }

    pub fn new(ports: Vec<u16>, listener_port: u16) -> Self {
        Self {
            ports,
            listener_port,
            exclude: Self::default_excludes(),
        }
    }

    fn to_kernel(&self) -> Result<CaptureConfig, CaptureError> {
        let mut cfg = CaptureConfig::empty(self.listener_port);
        if self.ports.len() > MAX_CAPTURE_PORTS {
            return Err(CaptureError::TooManyPorts(self.ports.len()));
        }
        for (slot, &port) in cfg.ports.iter_mut().zip(&self.ports) {
            if port == 0 {
                return Err(CaptureError::PortZero);
            }
            *slot = port;
        }
        for &(ip, len) in &self.exclude {
            match ip {
                IpAddr::V4(v4) => {
                    if len > 32 {
                        return Err(CaptureError::BadPrefix(ip, len));
                    }
                    let n = usize::from(cfg.n_exclude4);
                    if n == MAX_EXCLUDES {
                        return Err(CaptureError::TooManyExcludes);
                    }
                    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                    let mask = mask.to_be();
                    cfg.exclude4[n] = Prefix4 {
                        addr: u32::from_ne_bytes(v4.octets()) & mask,
                        mask,
                    };
                    cfg.n_exclude4 += 1;
                }
                IpAddr::V6(v6) => {
                    if len > 128 {
                        return Err(CaptureError::BadPrefix(ip, len));
                    }
                    let n = usize::from(cfg.n_exclude6);
                    if n == MAX_EXCLUDES {
                        return Err(CaptureError::TooManyExcludes);
                    }
                    let mask128 = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                    let mask_bytes = mask128.to_be_bytes();
                    let addr_bytes = v6.octets();
                    let mut p = Prefix6::default();
                    for i in 0..4 {
                        let m: [u8; 4] = mask_bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes");
                        let a: [u8; 4] = addr_bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes");
                        p.mask[i] = u32::from_ne_bytes(m);
                        p.addr[i] = u32::from_ne_bytes(a) & p.mask[i];
                    }
                    cfg.exclude6[n] = p;
                    cfg.n_exclude6 += 1;
                }
            }
        }
        Ok(cfg)
    }
}

/// Converts the kernel's record into a socket address; IPv4-mapped IPv6 becomes IPv4.
pub(crate) fn orig_dst_from_kernel(raw: &robin_common::OrigDst) -> Option<OrigDst> {
    let ip = match raw.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(raw.addr[0].to_ne_bytes())),
        AF_INET6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(raw.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Ipv6Addr::from(octets).to_canonical()
        }
        _ => return None,
    };
    Some(OrigDst(SocketAddr::new(ip, raw.port)))
}

/// The table the kernel fills at handshake time and the proxy drains at accept.
pub struct OrigDstTable {
    map: Mutex<BpfHashMap<MapData, PeerKey, robin_common::OrigDst>>,
}

impl OrigDstTable {
    /// Reads and deletes the record for a connection accepted in the netns with `netns_cookie`
    /// from `client` (the workload's loopback address and port). `None`: the kernel did not
    /// redirect this connection.
    pub fn take(&self, netns_cookie: u64, client: SocketAddr) -> Option<OrigDst> {
        let key = PeerKey {
            netns_cookie,
            client_port: client.port(),
            wire_family: if client.is_ipv4() { AF_INET } else { AF_INET6 },
            _pad: 0,
        };
        let mut map = self.map.lock().expect("orig-dst map lock");
        let raw = map.get(&key, 0).ok()?;
        // Deleting can only fail if the entry is already gone; either way it is consumed.
        let _ = map.remove(&key);
        orig_dst_from_kernel(&raw)
    }

    /// Records not yet claimed by an accept (for leak checks and metrics).
    pub fn len(&self) -> usize {
        self.map.lock().expect("orig-dst map lock").keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Handle on one attached cgroup; pass it back to [`Capturer::detach`].
#[derive(Debug)]
pub struct Attachment {
    cgroup_id: u64,
    sock_addr: Vec<(&'static str, CgroupSockAddrLinkId)>,
    sock_ops: Option<SockOpsLinkId>,
}

impl Attachment {
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }
}

pub struct Capturer {
    ebpf: Ebpf,
    config: BpfHashMap<MapData, u64, CaptureConfig>,
    sockets: BpfHashMap<MapData, u64, SockRecord>,
    table: Arc<OrigDstTable>,
}

impl Capturer {
    /// Loads the object and its programs into the kernel (nothing is attached yet).
    pub fn load() -> Result<Self, CaptureError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(CaptureError::Missing(name))?
                .try_into()
                .map_err(|e| CaptureError::Program(name, e))?;
            prog.load().map_err(|e| CaptureError::Program(name, e))?;
        }
        let ops: &mut SockOps = ebpf
            .program_mut(SOCK_OPS_PROGRAM)
            .ok_or(CaptureError::Missing(SOCK_OPS_PROGRAM))?
            .try_into()
            .map_err(|e| CaptureError::Program(SOCK_OPS_PROGRAM, e))?;
        ops.load()
            .map_err(|e| CaptureError::Program(SOCK_OPS_PROGRAM, e))?;

        let config = take_hash_map(&mut ebpf, names::CAPTURE_CONFIG)?;
        let sockets = take_hash_map(&mut ebpf, names::SOCK_ORIG_DST)?;
        let by_peer = take_hash_map(&mut ebpf, names::ORIG_DST_BY_PEER)?;
        Ok(Self {
            ebpf,
            config,
            sockets,
            table: Arc::new(OrigDstTable {
                map: Mutex::new(by_peer),
            }),
        })
    }

    pub fn orig_dst_table(&self) -> Arc<OrigDstTable> {
        self.table.clone()
    }

    /// Per-socket records alive in the kernel (sockets redirected and not yet closed).
    pub fn tracked_sockets(&self) -> usize {
        self.sockets.keys().count()
    }

    /// Starts capturing connects from `cgroup` (and the cgroups below it).
    pub fn attach(
        &mut self,
        cgroup: &Cgroup,
        settings: &CaptureSettings,
    ) -> Result<Attachment, CaptureError> {
        let kernel_cfg = settings.to_kernel()?;
        let cgroup_id = cgroup.id()?;
        let dir = std::fs::File::open(cgroup.path())
            .map_err(|e| CaptureError::OpenCgroup(cgroup.path().display().to_string(), e))?;
        self.config
            .insert(cgroup_id, kernel_cfg, 0)
            .map_err(|e| CaptureError::Map(names::CAPTURE_CONFIG, e))?;
        let mut attachment = Attachment {
            cgroup_id,
            sock_addr: Vec::new(),
            sock_ops: None,
        };
        // Bookkeeping programs first, redirection last: a connect is never redirected
        // before the programs that track it are in place.
        let result = (|| {
            let ops: &mut SockOps = self.program(SOCK_OPS_PROGRAM)?;
            attachment.sock_ops = Some(
                ops.attach(&dir, LINK_MODE)
                    .map_err(|e| CaptureError::Program(SOCK_OPS_PROGRAM, e))?,
            );
            for name in SOCK_ADDR_PROGRAMS {
                let prog: &mut CgroupSockAddr = self.program(name)?;
                let link = prog
                    .attach(&dir, LINK_MODE)
                    .map_err(|e| CaptureError::Program(name, e))?;
                attachment.sock_addr.push((name, link));
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(attachment),
            Err(e) => {
                self.detach(attachment);
                Err(e)
            }
        }
    }

    /// Stops capturing: redirection is removed first, then bookkeeping and configuration.
    pub fn detach(&mut self, attachment: Attachment) {
        for (name, link) in attachment.sock_addr.into_iter().rev() {
            match self.program::<CgroupSockAddr>(name) {
                Ok(prog) => {
                    if let Err(e) = prog.detach(link) {
                        tracing::warn!(program = name, error = %e, "detaching");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "detaching"),
            }
        }
        if let Some(link) = attachment.sock_ops
            && let Ok(ops) = self.program::<SockOps>(SOCK_OPS_PROGRAM)
            && let Err(e) = ops.detach(link)
        {
            tracing::warn!(program = SOCK_OPS_PROGRAM, error = %e, "detaching");
        }
        let _ = self.config.remove(&attachment.cgroup_id);
    }

    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, CaptureError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(CaptureError::Missing(name))?
            .try_into()
            .map_err(|e| CaptureError::Program(name, e))
    }
}

fn take_hash_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, CaptureError> {
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing(name))?;
    BpfHashMap::try_from(map).map_err(|e| CaptureError::Map(name, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_masked_in_network_order() {
        let s = CaptureSettings {
            ports: vec![443],
            listener_port: 15001,
            exclude: vec![(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 8)],
        };
        let cfg = s.to_kernel().unwrap();
        assert_eq!(cfg.n_exclude4, 1);
        assert_eq!(cfg.exclude4[0].addr.to_ne_bytes(), [10, 0, 0, 0]);
        assert_eq!(cfg.exclude4[0].mask.to_ne_bytes(), [255, 0, 0, 0]);
    }

    #[test]
    fn rejects_bad_settings() {
        let too_many = CaptureSettings::new((1..=17).collect(), 1);
        assert!(matches!(
            too_many.to_kernel(),
            Err(CaptureError::TooManyPorts(17))
        ));
        assert!(matches!(
            CaptureSettings::new(vec![0], 1).to_kernel(),
            Err(CaptureError::PortZero)
        ));
    }

    #[test]
    fn mapped_orig_dst_is_canonical_v4() {
        let mapped = Ipv6Addr::from(Ipv4Addr::new(10, 9, 8, 7).to_ipv6_mapped().octets());
        let o = mapped.octets();
        let mut addr = [0u32; 4];
        for i in 0..4 {
            addr[i] = u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap());
        }
        let raw = robin_common::OrigDst {
            family: AF_INET6,
            port: 443,
            addr,
        };
        assert_eq!(
            orig_dst_from_kernel(&raw).unwrap().0,
            "10.9.8.7:443".parse().unwrap()
        );
    }
}
