//! Paths inside a pod's root filesystem, resolved by the kernel the way the pod resolves them.
//!
//! The node agent runs in its own mount namespace with the host's pids. Resolving
//! `/proc/<pid>/root/<path>` the ordinary way follows an absolute symlink met on the way from
//! the *agent's* root: an image with `/var/run -> /run` would read the agent's `/run/...`, and a
//! symlink a pod plants pointing at `/proc/<other pid>/root/...` would read another pod's files.
//! Here every lookup is one `openat2(2)` from a descriptor of the pod process's root, with
//! `RESOLVE_IN_ROOT` (absolute symlinks and `..` stay inside that root) and
//! `RESOLVE_NO_MAGICLINKS` (no `/proc/*/root` or `/proc/*/fd/*` jumps out of it). Linux 5.6+;
//! [`probe`] checks once at start-up.
//!
//! A path inside a pod is a [`PodPath`], never a rewritten `PathBuf`, so nothing can open it
//! with ordinary resolution by accident.
use std::{
    fmt,
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::OpenOptionsExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, OpenHow, ResolveFlag, openat2},
};

/// `openat2` may fail with EAGAIN when a rename raced the lookup; a retry then succeeds.
const EAGAIN_RETRIES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PodFsError {
    #[error(
        "this kernel has no openat2(2): robin node needs Linux 5.6 or later to read pod files inside the pod's own root"
    )]
    NoOpenat2,
    #[error("probing openat2(2): {0}")]
    Probe(#[source] io::Error),
    #[error("opening the root of process {pid}: {source}")]
    Root {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

/// `path` looked up below `dir` as if `dir` were `/`, never through a magic link; the result is
/// an `O_PATH` handle (nothing is opened for reading, no device is touched).
fn open_in_root(dir: &OwnedFd, path: &Path) -> io::Result<File> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let mut attempts = 0;
    loop {
        match openat2(dir.as_raw_fd(), path, how) {
            // SAFETY: openat2 returned a new descriptor that nothing else owns.
            Ok(fd) => return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) })),
            Err(Errno::EAGAIN) if attempts < EAGAIN_RETRIES => attempts += 1,
            Err(e) => return Err(explain(e)),
        }
    }
}

/// ELOOP from `RESOLVE_NO_MAGICLINKS` reads as "too many symlinks"; say what it means here.
fn explain(e: Errno) -> io::Error {
    match e {
        Errno::ELOOP => io::Error::other(
            "the path crosses a /proc magic link or too many symlinks (refused: it would leave the pod's root)",
        ),
        Errno::EXDEV => io::Error::other("the path leaves the pod's root"),
        e => io::Error::from(e),
    }
}

/// Fails with [`PodFsError::NoOpenat2`] on kernels without `openat2` (before 5.6).
pub fn probe() -> Result<(), PodFsError> {
    let root = File::open("/").map_err(PodFsError::Probe)?;
    match open_in_root(&OwnedFd::from(root), Path::new("/")) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Err(PodFsError::NoOpenat2),
        Err(e) => Err(PodFsError::Probe(e)),
    }
}

/// Opens the file an `O_PATH` handle names, for reading. The handle already pins the inode, so
/// this reaches exactly the file that was looked up, whatever happened to the path since.
pub fn reopen_for_reading(handle: &File) -> io::Result<File> {
    File::open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

/// The root directory of one process of a pod, as that process sees it. Holding the descriptor
/// keeps naming that root even if the pid is reused.
pub struct PodRoot {
    dir: OwnedFd,
    pid: u32,
}

impl PodRoot {
    pub fn open(pid: u32) -> Result<Self, PodFsError> {
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(format!("/proc/{pid}/root"))
            .map_err(|source| PodFsError::Root { pid, source })?;
        Ok(Self {
            dir: dir.into(),
            pid,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Any directory standing in for a pod process's root, for tests.
    #[cfg(test)]
    pub(crate) fn at_dir(dir: &Path, pid: u32) -> Self {
        Self {
            dir: File::open(dir).expect("test root").into(),
            pid,
        }
    }

    /// An `O_PATH` handle on `path` inside this root.
    pub fn locate(&self, path: &Path) -> io::Result<File> {
        open_in_root(&self.dir, path)
    }

    /// Whether `path` names a regular file inside this root.
    pub fn is_file(&self, path: &Path) -> bool {
        self.locate(path)
            .and_then(|f| f.metadata())
            .is_ok_and(|m| m.is_file())
    }
}

impl fmt::Debug for PodRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PodRoot(pid {})", self.pid)
    }
}

/// Finds a process of the pod whose root shows a path (the node reconciler provides it).
pub type Reselect = Box<dyn Fn(&Path) -> Option<PodRoot> + Send + Sync>;

/// Where a pod's files are read: the root of one of its processes. That process may be the
/// pause container (no volumes) or exit with its container; when a path is not found the
/// reselect hook is asked, synchronously, for a process that sees it, and its root is kept.
pub struct PodFs {
    root: Mutex<Arc<PodRoot>>,
    reselect: Reselect,
}

impl PodFs {
    pub fn new(root: PodRoot, reselect: Reselect) -> Arc<Self> {
        Arc::new(Self {
            root: Mutex::new(Arc::new(root)),
            reselect,
        })
    }

    fn current(&self) -> Arc<PodRoot> {
        self.root.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The process whose root is read through now.
    pub fn pid(&self) -> u32 {
        self.current().pid
    }

    pub fn replace(&self, root: PodRoot) {
        *self.root.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(root);
    }

    /// An `O_PATH` handle on `path` in the pod. Not found in the current process's view: the
    /// reselect hook is asked once for another process, which is kept if it sees the path.
    pub fn locate(&self, path: &Path) -> io::Result<File> {
        let root = self.current();
        match root.locate(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let Some(other) = (self.reselect)(path).filter(|r| r.pid != root.pid) else {
                    return Err(e);
                };
                let found = other.locate(path)?;
                tracing::info!(pid = other.pid, path = %path.display(), "pod process re-selected for a file");
                self.replace(other);
                Ok(found)
            }
            r => r,
        }
    }
}

impl fmt::Debug for PodFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PodFs(pid {})", self.pid())
    }
}

/// A path inside a pod's root filesystem. It has no ordinary `Path` form on purpose.
#[derive(Clone)]
pub struct PodPath {
    fs: Arc<PodFs>,
    path: PathBuf,
}

impl PodPath {
    pub fn new(fs: Arc<PodFs>, path: PathBuf) -> Self {
        Self { fs, path }
    }

    /// An `O_PATH` handle on the file, resolved inside the pod's root.
    pub fn locate(&self) -> io::Result<File> {
        self.fs.locate(&self.path)
    }
}

impl fmt::Display for PodPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (in the pod)", self.path.display())
    }
}

impl fmt::Debug for PodPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PodPath({:?} via pid {})", self.path, self.fs.pid())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn root_at(dir: &Path) -> PodRoot {
        PodRoot::at_dir(dir, 0)
    }

    #[test]
    fn absolute_symlinks_and_dotdot_stay_inside_the_root() {
        probe().expect("openat2 on the test kernel");
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let root = d.join("root");
        std::fs::create_dir_all(root.join("run/secrets")).unwrap();
        std::fs::write(root.join("run/secrets/t"), "inside").unwrap();
        // A file outside the root, named by its absolute path from inside.
        std::fs::write(d.join("outside"), "agent").unwrap();
        symlink("/run", root.join("var-run")).unwrap();
        symlink("../../../../../run/secrets/t", root.join("up")).unwrap();
        symlink(d.join("outside"), root.join("leak")).unwrap();
        let r = root_at(&root);
        let read = |p: &str| {
            io::read_to_string(reopen_for_reading(&r.locate(Path::new(p)).unwrap()).unwrap())
                .unwrap()
        };
        assert_eq!(read("/var-run/secrets/t"), "inside");
        assert_eq!(read("up"), "inside");
        assert!(r.is_file(Path::new("/run/secrets/t")));
        assert!(!r.is_file(Path::new("/run/secrets")), "a directory");
        let e = r.locate(Path::new("/leak")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }

    #[test]
    fn magic_links_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        symlink(
            format!("/proc/{}/root/etc", std::process::id()),
            d.join("jump"),
        )
        .unwrap();
        // The real root as the pod root: /proc is the real procfs, so the link is magic.
        let r = root_at(Path::new("/"));
        let inside = d.strip_prefix("/").unwrap().join("jump/hostname");
        let e = r.locate(&inside).unwrap_err();
        assert!(e.to_string().contains("magic link"), "{e}");
    }

    #[test]
    fn a_missing_file_asks_for_another_process_once() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("app")).unwrap();
        std::fs::create_dir_all(d.join("pause")).unwrap();
        std::fs::write(d.join("app/token"), "t").unwrap();
        let app = d.join("app");
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = asked.clone();
        let fs = PodFs::new(
            root_at(&d.join("pause")),
            Box::new(move |_| {
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut r = root_at(&app);
                r.pid = 7;
                Some(r)
            }),
        );
        let p = PodPath::new(fs.clone(), "/token".into());
        assert!(p.locate().is_ok());
        assert_eq!(fs.pid(), 7, "the process that sees the file is kept");
        assert!(p.locate().is_ok());
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1);
        let gone = PodPath::new(fs, "/absent".into());
        assert_eq!(gone.locate().unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
