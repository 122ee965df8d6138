//! Finding a pod's cgroup v2 directory and one of its processes, as the kubelet lays them out.
//!
//! Both kubelet cgroup drivers are understood, for every QoS class (Guaranteed pods sit directly
//! under `kubepods`):
//!
//! | driver | path under the cgroup root |
//! | --- | --- |
//! | systemd | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice` |
//! | cgroupfs | `kubepods/burstable/pod<uid>` |
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::podfs::PodRoot;

#[derive(Debug, thiserror::Error)]
pub enum PodCgroupError {
    #[error("no cgroup for pod {uid} under {root} (tried {tried})")]
    NotFound {
        uid: String,
        root: PathBuf,
        tried: String,
    },
    #[error("pod cgroup {0} has no process yet")]
    NoProcess(PathBuf),
    #[error("process {0} left the pod while it was being chosen")]
    ProcessLeft(u32),
    #[error("reading {0}: {1}")]
    Io(PathBuf, #[source] io::Error),
    #[error("{0:?} is not a pod uid")]
    BadUid(String),
    #[error(
        "{0} is not a cgroup2 mount, and has no cgroup2 `unified` directory (on hybrid-cgroup hosts point ROBIN_CGROUP_ROOT at the cgroup2 mount)"
    )]
    NotCgroup2(PathBuf),
}

/// `status.qosClass` of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [Self::Guaranteed, Self::Burstable, Self::BestEffort];

    /// The API's spelling; `None` when absent or unknown (then every class is tried).
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    fn dir_name(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

/// Where the systemd driver puts a pod: dashes in the uid become underscores (a dash separates
/// slice levels in systemd unit names).
pub fn systemd_path(uid: &str, qos: QosClass) -> PathBuf {
    let uid = uid.replace('-', "_");
    let mut p = PathBuf::from("kubepods.slice");
    match qos.dir_name() {
        None => p.push(format!("kubepods-pod{uid}.slice")),
        Some(q) => {
            p.push(format!("kubepods-{q}.slice"));
            p.push(format!("kubepods-{q}-pod{uid}.slice"));
        }
    }
    p
}

/// Where the cgroupfs driver puts a pod.
pub fn cgroupfs_path(uid: &str, qos: QosClass) -> PathBuf {
    let mut p = PathBuf::from("kubepods");
    if let Some(q) = qos.dir_name() {
        p.push(q);
    }
    p.push(format!("pod{uid}"));
    p
}

/// Candidate paths (relative to the cgroup root), most likely first.
pub fn candidates(uid: &str, qos: Option<QosClass>) -> Vec<PathBuf> {
    let classes: Vec<QosClass> = match qos {
        Some(q) => vec![q],
        None => QosClass::ALL.to_vec(),
    };
    classes
        .iter()
        .flat_map(|&q| [systemd_path(uid, q), cgroupfs_path(uid, q)])
        .collect()
}

/// The pod's cgroup directory under `root` (the cgroup2 mount, or a test root laid out the same).
pub fn find(root: &Path, uid: &str, qos: Option<QosClass>) -> Result<PathBuf, PodCgroupError> {
    // The uid becomes a path component: refuse anything that could walk elsewhere.
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(PodCgroupError::BadUid(uid.to_owned()));
    }
    let tried = candidates(uid, qos);
    for rel in &tried {
        let p = root.join(rel);
        if p.is_dir() {
            return Ok(p);
        }
    }
    Err(PodCgroupError::NotFound {
        uid: uid.to_owned(),
        root: root.to_owned(),
        tried: tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn is_cgroup2(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The cgroup2 directory to look for pods under, given the configured root. On hybrid-cgroup
/// hosts `/sys/fs/cgroup` holds the v1 controllers and cgroup2 is mounted at
/// `/sys/fs/cgroup/unified`; a root that is not cgroup2 but has such a child means that child.
pub fn cgroup2_root(root: &Path) -> Result<PathBuf, PodCgroupError> {
    if is_cgroup2(root) {
        return Ok(root.to_owned());
    }
    let unified = root.join("unified");
    if is_cgroup2(&unified) {
        tracing::info!(configured = %root.display(), using = %unified.display(), "hybrid cgroup layout: using the cgroup2 mount");
        return Ok(unified);
    }
    Err(PodCgroupError::NotCgroup2(root.to_owned()))
}

/// Most cgroups visited below a pod (pod → containers is two levels in practice).
const MAX_CGROUPS_VISITED: usize = 64;

/// Processes of the pod: its own `cgroup.procs` (empty on real nodes) then its children's
/// (the containers), breadth first and bounded.
pub fn pids(pod_cgroup: &Path) -> Result<Vec<u32>, PodCgroupError> {
    let mut queue = std::collections::VecDeque::from([pod_cgroup.to_owned()]);
    let mut out = Vec::new();
    let mut visited = 0;
    while let Some(dir) = queue.pop_front() {
        visited += 1;
        if visited > MAX_CGROUPS_VISITED {
            break;
        }
        let procs = dir.join("cgroup.procs");
        match fs::read_to_string(&procs) {
            Ok(text) => out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
            // A container cgroup removed while we walk: skip it.
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != pod_cgroup => continue,
            Err(e) => return Err(PodCgroupError::Io(procs, e)),
        }
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != pod_cgroup => continue,
            Err(e) => return Err(PodCgroupError::Io(dir, e)),
        };
        let mut children: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.path())
            .collect();
        children.sort();
        queue.extend(children);
    }
    Ok(out)
}

/// Most processes of a pod looked at when choosing one: a pod runs a handful; the bound keeps
/// a pod that forks thousands from making each choice expensive.
const MAX_PIDS_TRIED: usize = 64;

/// A process of the pod and its root, preferring one whose root holds `file` as a regular file
/// (the pause container has no volume mounts, an application container does), looked up inside
/// that root ([`crate::podfs`]); failing that, any process (enough for the netns).
pub fn pick(pod_cgroup: &Path, file: &Path) -> Result<(PodRoot, bool), PodCgroupError> {
    let pids = pids(pod_cgroup)?;
    let mut any = None;
    for &pid in pids.iter().take(MAX_PIDS_TRIED) {
        let Ok(root) = PodRoot::open(pid) else {
            continue;
        };
        if root.is_file(file) {
            return still_in_pod(pod_cgroup, root, true);
        }
        any.get_or_insert(root);
    }
    match any {
        Some(root) => still_in_pod(pod_cgroup, root, false),
        None => Err(PodCgroupError::NoProcess(pod_cgroup.to_owned())),
    }
}

/// The root was opened by pid: the pid still being in the pod's cgroup afterwards means it is
/// the root of a process of the pod, not of one that reused the pid meanwhile.
fn still_in_pod(
    pod_cgroup: &Path,
    root: PodRoot,
    visible: bool,
) -> Result<(PodRoot, bool), PodCgroupError> {
    if pids(pod_cgroup)?.contains(&root.pid()) {
        Ok((root, visible))
    } else {
        Err(PodCgroupError::ProcessLeft(root.pid()))
    }
}

/// The root of a process of the pod that shows `file`, if any does.
pub fn root_showing(pod_cgroup: &Path, file: &Path) -> Option<PodRoot> {
    match pick(pod_cgroup, file) {
        Ok((root, true)) => Some(root),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b6c1c2e-59d4-4a7e-9a5e-6f1d2c3b4a59";

    #[test]
    fn systemd_layout_for_every_class() {
        assert_eq!(
            systemd_path(UID, QosClass::Guaranteed),
            Path::new("kubepods.slice/kubepods-pod0b6c1c2e_59d4_4a7e_9a5e_6f1d2c3b4a59.slice")
        );
        assert_eq!(
            systemd_path(UID, QosClass::Burstable),
            Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b6c1c2e_59d4_4a7e_9a5e_6f1d2c3b4a59.slice"
            )
        );
        assert_eq!(
            systemd_path(UID, QosClass::BestEffort),
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b6c1c2e_59d4_4a7e_9a5e_6f1d2c3b4a59.slice"
            )
        );
    }

    #[test]
    fn cgroupfs_layout_for_every_class() {
        assert_eq!(
            cgroupfs_path(UID, QosClass::Guaranteed),
            Path::new(&format!("kubepods/pod{UID}"))
        );
        assert_eq!(
            cgroupfs_path(UID, QosClass::Burstable),
            Path::new(&format!("kubepods/burstable/pod{UID}"))
        );
        assert_eq!(
            cgroupfs_path(UID, QosClass::BestEffort),
            Path::new(&format!("kubepods/besteffort/pod{UID}"))
        );
    }

    #[test]
    fn qos_parse() {
        assert_eq!(QosClass::parse("Burstable"), Some(QosClass::Burstable));
        assert_eq!(QosClass::parse(""), None);
        assert_eq!(candidates(UID, None).len(), 6);
        assert_eq!(candidates(UID, Some(QosClass::BestEffort)).len(), 2);
    }

    #[test]
    fn finds_each_driver_and_class_in_a_real_tree() {
        for qos in QosClass::ALL {
            for layout in [systemd_path, cgroupfs_path] {
                let s = tempfile::tempdir().unwrap();
                let dir = s.path().join(layout(UID, qos));
                fs::create_dir_all(&dir).unwrap();
                // Known class and unknown class both find it.
                assert_eq!(find(s.path(), UID, Some(qos)).unwrap(), dir);
                assert_eq!(find(s.path(), UID, None).unwrap(), dir);
                // Another uid does not.
                assert!(matches!(
                    find(s.path(), "1111-2222", None),
                    Err(PodCgroupError::NotFound { .. })
                ));
            }
        }
    }

    #[test]
    fn cgroup_root_must_be_cgroup2_or_hold_the_unified_mount() {
        let s = tempfile::tempdir().unwrap();
        assert!(matches!(
            cgroup2_root(s.path()),
            Err(PodCgroupError::NotCgroup2(_))
        ));
        // This machine's cgroup2 mount is accepted as is; its parent (on hybrid hosts the v1
        // tmpfs) leads to it through `unified`.
        let mount = crate::capture::find_cgroup2_mount().expect("a cgroup2 mount");
        assert_eq!(cgroup2_root(&mount).unwrap(), mount);
        if mount.file_name() == Some(std::ffi::OsStr::new("unified")) {
            let parent = mount.parent().unwrap();
            assert_eq!(cgroup2_root(parent).unwrap(), mount);
        }
    }

    #[test]
    fn refuses_path_like_uids() {
        let s = tempfile::tempdir().unwrap();
        for bad in ["../x", "", "a/b", "pod uid"] {
            assert!(matches!(
                find(s.path(), bad, None),
                Err(PodCgroupError::BadUid(_))
            ));
        }
    }

    #[test]
    fn pids_come_from_the_pod_and_its_containers() {
        let s = tempfile::tempdir().unwrap();
        let pod = s.path().join("pod");
        fs::create_dir_all(pod.join("ctr-a")).unwrap();
        fs::create_dir_all(pod.join("ctr-b")).unwrap();
        fs::write(pod.join("cgroup.procs"), "").unwrap();
        fs::write(pod.join("ctr-a/cgroup.procs"), "11\n12\n").unwrap();
        fs::write(pod.join("ctr-b/cgroup.procs"), "13\n").unwrap();
        assert_eq!(pids(&pod).unwrap(), vec![11, 12, 13]);
        fs::write(pod.join("ctr-a/cgroup.procs"), "").unwrap();
        fs::write(pod.join("ctr-b/cgroup.procs"), "").unwrap();
        assert!(matches!(
            pick(&pod, Path::new("/x")),
            Err(PodCgroupError::NoProcess(_))
        ));
    }

    #[test]
    fn pick_prefers_a_process_that_sees_the_file() {
        let s = tempfile::tempdir().unwrap();
        let pod = s.path().join("pod");
        fs::create_dir_all(&pod).unwrap();
        let me = std::process::id();
        fs::write(pod.join("cgroup.procs"), format!("{me}\n")).unwrap();
        let file = s.path().join("token");
        fs::write(&file, "t").unwrap();
        let picked = |f: &Path| pick(&pod, f).map(|(r, v)| (r.pid(), v)).unwrap();
        assert_eq!(picked(&file), (me, true));
        assert_eq!(picked(&s.path().join("absent")), (me, false));
        // A directory is not a token file.
        assert_eq!(picked(s.path()), (me, false));
        assert_eq!(root_showing(&pod, &file).map(|r| r.pid()), Some(me));
        assert!(root_showing(&pod, &s.path().join("absent")).is_none());
    }
}
