//! Loading Robin's eBPF object and attaching it to cgroups.
//!
//! One [`Capturer`] per process: the object is loaded once, then every captured cgroup gets the
//! same five programs and an entry in `CAPTURE_CONFIG` keyed by its cgroup id. Attachments are
//! bpf_links, which the kernel always treats as multi-attach (other cgroup programs keep
//! working); it rejects any attach flag on a link, hence `CgroupAttachMode::Single` (flags 0).
//!
//! Two lifetimes. `robin exec` owns its links: they go when the process goes, together with the
//! workload it started. `robin node` pins maps and links in bpffs ([`PinDir`]): a captured pod
//! stays captured while the agent is down or restarting, so its connects keep being redirected
//! to a listener that no longer exists and are refused (fail closed), and a new agent adopts the
//! pinned attachments instead of leaving a gap.
use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        links::{FdLink, PinnedLink},
        sock_ops::SockOpsLinkId,
    },
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::counter::ConstCounter,
};
use robin_common::{
    AF_INET, AF_INET6, CaptureConfig, MAX_CAPTURE_PORTS, MAX_EXCLUDES, PeerKey, Prefix4, Prefix6,
    RefusalReason, SockRecord, names,
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
    #[error("eBPF link of {0}: {1}")]
    Link(&'static str, #[source] aya::programs::links::LinkError),
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
    #[error(
        "{0} is not on a bpf filesystem: mount the host's bpffs there (in Kubernetes a hostPath \
         volume of /sys/fs/bpf), otherwise capture would not survive an agent restart"
    )]
    NotBpffs(PathBuf),
    #[error("{op} {path}: {source}")]
    Pin {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn pin_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CaptureError + 'a {
    move |source| CaptureError::Pin {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Version of the map layouts in `robin-common`. Maps are pinned under `maps/v<N>/`, so an agent
/// with another layout never reuses (and misreads) maps pinned by an older one.
const MAP_ABI_VERSION: u32 = 1;

/// Where `robin node` pins its state (default `/sys/fs/bpf/robin`):
///
/// ```text
/// maps/v1/{CAPTURE_CONFIG,SOCK_ORIG_DST,ORIG_DST_BY_PEER,CAPTURE_REFUSED}
/// cgroups/<cgroup id>/{sock_ops,getpeername4,getpeername6,connect4,connect6}   (links)
/// ```
///
/// Removing a link's file (with no process holding it) detaches it; removing the whole directory
/// uninstalls Robin from the node.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// Checks the directory is on bpffs (pins elsewhere are impossible, and a private bpffs
    /// instance would die with the agent's mount namespace) and creates it.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, CaptureError> {
        let path = path.into();
        let mut existing = path.as_path();
        while !existing.exists() {
            existing = existing
                .parent()
                .ok_or_else(|| CaptureError::NotBpffs(path.clone()))?;
        }
        let on_bpffs = Self::is_bpffs(existing).map_err(|e| CaptureError::Pin {
            op: "statfs",
            path: existing.to_owned(),
            source: e,
        })?;
        if !on_bpffs {
            return Err(CaptureError::NotBpffs(path));
        }
        let dir = Self(path);
        for d in [dir.maps(), dir.cgroups()] {
            fs::create_dir_all(&d).map_err(pin_err("creating", &d))?;
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Whether `path` is on a bpf filesystem.
    pub fn is_bpffs(path: &Path) -> std::io::Result<bool> {
        let fs = nix::sys::statfs::statfs(path)?;
        Ok(fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
    }

    fn maps(&self) -> PathBuf {
        self.0.join("maps").join(format!("v{MAP_ABI_VERSION}"))
    }

    fn cgroups(&self) -> PathBuf {
        self.0.join("cgroups")
    }

    fn cgroup(&self, cgroup_id: u64) -> PathBuf {
        self.cgroups().join(cgroup_id.to_string())
    }

    /// Map directories of other layout versions: their maps are only referenced by programs of
    /// adopted links, which are replaced, so the pins can go.
    fn stale_map_dirs(&self) -> Vec<PathBuf> {
        let current = self.maps();
        fs::read_dir(self.0.join("maps"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| *p != current)
            .collect()
    }
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

/// Captured connects the kernel refused, by reason (see `robin_common::RefusalReason`).
pub struct RefusedConnects {
    map: Mutex<PerCpuArray<MapData, u64>>,
}

impl std::fmt::Debug for RefusedConnects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusedConnects").finish_non_exhaustive()
    }
}

/// The `reason` label of `robin_capture_refused_total` (`RefusalReason` lives in the no_std
/// crate, which knows no metrics library).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// Read from the kernel at each scrape.
impl Collector for RefusedConnects {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = self.snapshot().into_iter().map(|(reason, n)| {
            let labels = RefusalLabels {
                reason: reason.label(),
            };
            (labels, ConstCounter::new(n))
        });
        crate::metrics::encode_family(
            &mut encoder,
            "robin_capture_refused",
            "Captured connects refused in the kernel (never let through uncaptured), by reason.",
            samples,
        )
    }
}

impl RefusedConnects {
    /// Each reason with its count, summed over CPUs. An unreadable slot reads as 0.
    pub fn snapshot(&self) -> Vec<(RefusalReason, u64)> {
        let map = self.map.lock().expect("refusal map lock");
        RefusalReason::ALL
            .iter()
            .map(|&r| {
                let n = map
                    .get(&(r as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (r, n)
            })
            .collect()
    }
}

/// A failed [`Capturer::attach_replacing`]: the error, and the previous attachment, still in
/// place, if there was one.
#[derive(Debug)]
pub struct ReplaceError {
    pub error: CaptureError,
    pub previous: Option<Attachment>,
}

/// Handle on one attached cgroup; pass it back to [`Capturer::detach`].
#[derive(Debug)]
pub struct Attachment {
    cgroup_id: u64,
    links: Links,
}

#[derive(Debug)]
enum Links {
    /// Owned by the loaded programs: detached when the [`Capturer`] goes.
    Owned {
        sock_addr: Vec<(&'static str, CgroupSockAddrLinkId)>,
        sock_ops: Option<SockOpsLinkId>,
    },
    /// Pinned in bpffs: attached until the pins are removed ([`Capturer::detach`]). Dropping
    /// this closes the agent's file descriptors only.
    Pinned(Vec<(&'static str, PinnedLink)>),
}

impl Attachment {
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// Whether the attachment outlives the agent.
    pub fn is_pinned(&self) -> bool {
        matches!(self.links, Links::Pinned(_))
    }
}

pub struct Capturer {
    ebpf: Ebpf,
    config: BpfHashMap<MapData, u64, CaptureConfig>,
    sockets: BpfHashMap<MapData, u64, SockRecord>,
    table: Arc<OrigDstTable>,
    refused: Arc<RefusedConnects>,
    pins: Option<PinDir>,
}

/// The loader for Robin's object, without the kernel's BTF: aya needs it only for CO-RE
/// relocations, which Robin's programs have none of (a test checks). `Ebpf::load` parses the
/// kernel's BTF twice and holds both (a 48 MiB peak RSS for a process that idles at 11);
/// `EbpfLoader::new` still parses it once, dropped here at once, as aya has no loader that
/// skips it (aya-rs/aya#1172).
fn loader<'a>() -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    loader
}

impl Capturer {
    /// Loads the object and its programs into the kernel (nothing is attached yet). Links and
    /// maps belong to this process.
    pub fn load() -> Result<Self, CaptureError> {
        Self::load_with(loader().load(EBPF_OBJECT)?, None)
    }

    /// Like [`Capturer::load`], but maps are pinned under `pins` (reused if an earlier agent
    /// pinned them) and every attachment is pinned too. Attachments an earlier agent left are
    /// returned by [`Capturer::adopt_pinned`].
    pub fn load_pinned(pins: PinDir) -> Result<Self, CaptureError> {
        let maps = pins.maps();
        let paths = [
            names::CAPTURE_CONFIG,
            names::SOCK_ORIG_DST,
            names::ORIG_DST_BY_PEER,
            names::CAPTURE_REFUSED,
        ]
        .map(|name| (name, maps.join(name)));
        let mut loader = loader();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(EBPF_OBJECT)?;
        Self::load_with(ebpf, Some(pins))
    }

    fn load_with(mut ebpf: Ebpf, pins: Option<PinDir>) -> Result<Self, CaptureError> {
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
        let refused = ebpf
            .take_map(names::CAPTURE_REFUSED)
            .ok_or(CaptureError::Missing(names::CAPTURE_REFUSED))?;
        let refused = PerCpuArray::try_from(refused)
            .map_err(|e| CaptureError::Map(names::CAPTURE_REFUSED, e))?;
        // Loading parses the kernel's BTF twice (~19 MiB of short-lived allocations), ~15 of
        // the ~25 MiB RSS of an idle agent unless handed back.
        crate::heap::purge();
        Ok(Self {
            ebpf,
            config,
            sockets,
            table: Arc::new(OrigDstTable {
                map: Mutex::new(by_peer),
            }),
            refused: Arc::new(RefusedConnects {
                map: Mutex::new(refused),
            }),
            pins,
        })
    }

    /// Attachments pinned by an earlier agent, by cgroup id. Each stays attached (and keeps its
    /// cgroup's connects redirected) until it is passed to [`Capturer::attach_replacing`] or
    /// [`Capturer::detach`]. Unreadable entries are reported and left in place.
    pub fn adopt_pinned(&self) -> HashMap<u64, Attachment> {
        let Some(pins) = &self.pins else {
            return HashMap::new();
        };
        for stale in pins.stale_map_dirs() {
            if let Err(e) = fs::remove_dir_all(&stale) {
                tracing::warn!(path = %stale.display(), error = %e, "removing old map pins");
            }
        }
        let mut adopted = HashMap::new();
        for entry in fs::read_dir(pins.cgroups()).into_iter().flatten().flatten() {
            let dir = entry.path();
            let Some(cgroup_id) = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u64>().ok())
            else {
                tracing::warn!(path = %dir.display(), "ignoring an unexpected pin");
                continue;
            };
            let mut links = Vec::new();
            for link in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = link.path();
                let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(program_name)
                else {
                    tracing::warn!(path = %path.display(), "ignoring an unexpected pin");
                    continue;
                };
                match PinnedLink::from_pin(&path) {
                    Ok(l) => links.push((name, l)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "opening a pinned link")
                    }
                }
            }
            adopted.insert(
                cgroup_id,
                Attachment {
                    cgroup_id,
                    links: Links::Pinned(links),
                },
            );
        }
        adopted
    }

    pub fn orig_dst_table(&self) -> Arc<OrigDstTable> {
        self.table.clone()
    }

    /// Counters of captured connects the kernel refused rather than let through uncaptured.
    pub fn refused_connects(&self) -> Arc<RefusedConnects> {
        self.refused.clone()
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
        self.attach_replacing(cgroup, settings, None)
            .map_err(|e| e.error)
    }

    /// Attaches `cgroup` and then retires `previous` (an adopted or older attachment of the same
    /// cgroup). The new links are in place before the old ones go, so there is no instant in
    /// which the cgroup's connects are not redirected: while both are attached the first
    /// program rewrites the destination to loopback, which the second leaves alone.
    ///
    /// On failure the previous attachment is still attached and is handed back.
    pub fn attach_replacing(
        &mut self,
        cgroup: &Cgroup,
        settings: &CaptureSettings,
        previous: Option<Attachment>,
    ) -> Result<Attachment, Box<ReplaceError>> {
        let fail = |error, previous| Box::new(ReplaceError { error, previous });
        let prepared = settings.to_kernel().and_then(|cfg| {
            let cgroup_id = cgroup.id()?;
            let dir = std::fs::File::open(cgroup.path())
                .map_err(|e| CaptureError::OpenCgroup(cgroup.path().display().to_string(), e))?;
            Ok((cfg, cgroup_id, dir))
        });
        let (kernel_cfg, cgroup_id, dir) = match prepared {
            Ok(p) => p,
            Err(e) => return Err(fail(e, previous)),
        };
        // Old pins are removed from bpffs first (their links stay attached through our file
        // descriptors) so the new links can be pinned at the same paths.
        let previous = match previous {
            Some(p) => match self.unpin(p) {
                Ok(fds) => Some(fds),
                // Whatever was unpinned before the failure is detached by now; nothing to return.
                Err(e) => return Err(fail(e, None)),
            },
            None => None,
        };
        if let Err(e) = self.config.insert(cgroup_id, kernel_cfg, 0) {
            let previous = previous.and_then(|p| self.restore(cgroup_id, p));
            return Err(fail(CaptureError::Map(names::CAPTURE_CONFIG, e), previous));
        }
        let mut sock_addr = Vec::new();
        let mut sock_ops = None;
        // Bookkeeping programs first, redirection last: a connect is never redirected
        // before the programs that track it are in place.
        let result = (|| {
            let ops: &mut SockOps = self.program(SOCK_OPS_PROGRAM)?;
            sock_ops = Some(
                ops.attach(&dir, LINK_MODE)
                    .map_err(|e| CaptureError::Program(SOCK_OPS_PROGRAM, e))?,
            );
            for name in SOCK_ADDR_PROGRAMS {
                let prog: &mut CgroupSockAddr = self.program(name)?;
                let link = prog
                    .attach(&dir, LINK_MODE)
                    .map_err(|e| CaptureError::Program(name, e))?;
                sock_addr.push((name, link));
            }
            Ok(())
        })();
        let owned = Attachment {
            cgroup_id,
            links: Links::Owned {
                sock_addr,
                sock_ops,
            },
        };
        let attached = match result {
            Ok(()) if self.pins.is_some() => self.pin(owned),
            Ok(()) => Ok(owned),
            Err(e) => {
                self.detach(owned);
                Err(e)
            }
        };
        match attached {
            Ok(attachment) => {
                // Dropping the unpinned old links detaches them.
                drop(previous);
                Ok(attachment)
            }
            Err(e) => {
                let previous = previous.and_then(|p| self.restore(cgroup_id, p));
                Err(fail(e, previous))
            }
        }
    }

    /// Puts back an attachment taken out by [`Capturer::unpin`] after a failed replacement:
    /// better the previous capture than an uncaptured cgroup. Without a pin directory the old
    /// links cannot be kept (they are dropped, i.e. detached).
    fn restore(
        &mut self,
        cgroup_id: u64,
        (links, cfg): (Vec<(&'static str, FdLink)>, CaptureConfig),
    ) -> Option<Attachment> {
        let _ = self.config.insert(cgroup_id, cfg, 0);
        let Some(pins) = self.pins.clone() else {
            tracing::warn!(
                cgroup_id,
                "replacing the capture failed; previous links dropped"
            );
            return None;
        };
        let dir = pins.cgroup(cgroup_id);
        let _ = fs::create_dir_all(&dir);
        let mut pinned = Vec::new();
        for (name, link) in links {
            match link.pin(dir.join(name)) {
                Ok(l) => pinned.push((name, l)),
                Err(e) => {
                    tracing::warn!(cgroup_id, program = name, error = %e, "re-pinning the previous link")
                }
            }
        }
        Some(Attachment {
            cgroup_id,
            links: Links::Pinned(pinned),
        })
    }

    /// Moves owned links into bpffs.
    fn pin(&mut self, attachment: Attachment) -> Result<Attachment, CaptureError> {
        let pins = self.pins.clone().expect("pinned capturer");
        let cgroup_id = attachment.cgroup_id;
        let Links::Owned {
            sock_addr,
            sock_ops,
        } = attachment.links
        else {
            return Ok(attachment);
        };
        // On any error below, the links taken so far are dropped, which detaches them.
        let fd_links = self.take_fd_links(sock_addr, sock_ops)?;
        let dir = pins.cgroup(cgroup_id);
        fs::create_dir_all(&dir).map_err(pin_err("creating", &dir))?;
        let mut pinned = Vec::new();
        for (name, link) in fd_links {
            let path = dir.join(name);
            match link.pin(&path) {
                Ok(p) => pinned.push((name, p)),
                Err(e) => {
                    for (_, p) in pinned {
                        let _ = p.unpin();
                    }
                    return Err(CaptureError::Pin {
                        op: "pinning",
                        path,
                        source: std::io::Error::other(e.to_string()),
                    });
                }
            }
        }
        Ok(Attachment {
            cgroup_id,
            links: Links::Pinned(pinned),
        })
    }

    /// Takes owned links out of the programs' bookkeeping: each stays attached as long as its
    /// file descriptor is open.
    fn take_fd_links(
        &mut self,
        sock_addr: Vec<(&'static str, CgroupSockAddrLinkId)>,
        sock_ops: Option<SockOpsLinkId>,
    ) -> Result<Vec<(&'static str, FdLink)>, CaptureError> {
        let mut fd_links = Vec::new();
        if let Some(id) = sock_ops {
            let ops: &mut SockOps = self.program(SOCK_OPS_PROGRAM)?;
            let link = ops
                .take_link(id)
                .map_err(|e| CaptureError::Program(SOCK_OPS_PROGRAM, e))?;
            let link =
                FdLink::try_from(link).map_err(|e| CaptureError::Link(SOCK_OPS_PROGRAM, e))?;
            fd_links.push((SOCK_OPS_PROGRAM, link));
        }
        for (name, id) in sock_addr {
            let prog: &mut CgroupSockAddr = self.program(name)?;
            let link = prog
                .take_link(id)
                .map_err(|e| CaptureError::Program(name, e))?;
            let link = FdLink::try_from(link).map_err(|e| CaptureError::Link(name, e))?;
            fd_links.push((name, link));
        }
        Ok(fd_links)
    }

    /// Takes an attachment's links out of bpffs (or out of the programs' bookkeeping), keeping
    /// them attached through the returned file descriptors, with the cgroup's current kernel
    /// configuration.
    #[allow(clippy::type_complexity)]
    fn unpin(
        &mut self,
        attachment: Attachment,
    ) -> Result<(Vec<(&'static str, FdLink)>, CaptureConfig), CaptureError> {
        let cfg = self
            .config
            .get(&attachment.cgroup_id, 0)
            .unwrap_or(CaptureConfig::empty(0));
        let links = match attachment.links {
            Links::Owned {
                sock_addr,
                sock_ops,
            } => self.take_fd_links(sock_addr, sock_ops)?,
            Links::Pinned(links) => {
                let dir = self
                    .pins
                    .as_ref()
                    .map(|p| p.cgroup(attachment.cgroup_id))
                    .unwrap_or_default();
                let mut out = Vec::new();
                for (name, link) in links {
                    let fd = link
                        .unpin()
                        .map_err(pin_err("unpinning", &dir.join(name)))?;
                    out.push((name, fd));
                }
                out
            }
        };
        Ok((links, cfg))
    }

    /// Stops capturing: redirection is removed first, then bookkeeping and configuration.
    /// Pinned attachments are unpinned, which detaches them.
    pub fn detach(&mut self, attachment: Attachment) {
        match attachment.links {
            Links::Owned {
                sock_addr,
                sock_ops,
            } => {
                for (name, link) in sock_addr.into_iter().rev() {
                    match self.program::<CgroupSockAddr>(name) {
                        Ok(prog) => {
                            if let Err(e) = prog.detach(link) {
                                tracing::warn!(program = name, error = %e, "detaching");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "detaching"),
                    }
                }
                if let Some(link) = sock_ops
                    && let Ok(ops) = self.program::<SockOps>(SOCK_OPS_PROGRAM)
                    && let Err(e) = ops.detach(link)
                {
                    tracing::warn!(program = SOCK_OPS_PROGRAM, error = %e, "detaching");
                }
            }
            Links::Pinned(mut links) => {
                // Redirection first: the connect programs sort last in `SOCK_ADDR_PROGRAMS`,
                // sock_ops (not in it) goes last.
                links.sort_by_key(|(name, _)| {
                    std::cmp::Reverse(
                        SOCK_ADDR_PROGRAMS
                            .iter()
                            .position(|p| p == name)
                            .map_or(0, |i| i + 1),
                    )
                });
                for (_, link) in links {
                    if let Err(e) = link.unpin() {
                        tracing::warn!(cgroup_id = attachment.cgroup_id, error = %e, "unpinning");
                    }
                }
                if let Some(pins) = &self.pins {
                    let _ = fs::remove_dir(pins.cgroup(attachment.cgroup_id));
                }
            }
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

/// The program a pinned link belongs to, from its pin's file name (`connect4`, …).
fn program_name(file_name: &str) -> Option<&'static str> {
    SOCK_ADDR_PROGRAMS
        .iter()
        .chain([&SOCK_OPS_PROGRAM])
        .find(|name| **name == file_name)
        .copied()
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

    /// `loader` gives aya no kernel BTF: that holds only while the object asks for no CO-RE
    /// relocation. The object does carry BTF.ext (line and function info), so "no relocation"
    /// is read from it, not from its absence.
    #[test]
    fn the_object_needs_no_kernel_btf() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        assert!(object.btf_ext.is_some(), "the object lost its BTF.ext");
        assert!(!object.has_btf_relocations());
    }

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
    fn pin_dir_must_be_on_bpffs() {
        let dir = std::env::temp_dir().join(format!("robin-pins-{}", std::process::id()));
        let err = PinDir::open(dir.join("robin")).unwrap_err();
        assert!(matches!(err, CaptureError::NotBpffs(_)), "{err}");
        assert!(err.to_string().contains("bpf filesystem"), "{err}");
        assert!(!dir.exists(), "nothing is created outside bpffs");
    }

    #[test]
    fn pinned_program_names_round_trip() {
        for name in SOCK_ADDR_PROGRAMS.iter().chain([&SOCK_OPS_PROGRAM]) {
            assert_eq!(program_name(name), Some(*name));
        }
        assert_eq!(program_name("connect4.tmp"), None);
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
