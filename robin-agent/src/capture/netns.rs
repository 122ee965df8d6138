//! Network namespaces by file descriptor. Entering one is confined to a synchronous closure on
//! the current thread: setns, run, restore — never held across an `.await`, because a tokio task
//! can resume on another thread that would silently stay in the wrong namespace.
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("opening network namespace {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("entering network namespace {0}: {1}")]
    Enter(String, nix::Error),
}

/// Identity of a network namespace (see [`NetNs::id`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetNsId {
    dev: u64,
    ino: u64,
}

#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    label: String,
}

impl NetNs {
    /// `/var/run/netns/NAME`, `/proc/PID/ns/net`, or any bind mount of one.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetNsError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| NetNsError::Open(path.to_owned(), e))?;
        Ok(Self {
            fd: file.into(),
            label: path.display().to_string(),
        })
    }

    /// The namespace of the calling *thread* (`/proc/thread-self`, not `/proc/self`: another
    /// thread of this process may be inside a different one).
    pub fn current() -> Result<Self, NetNsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Which namespace this is: the nsfs device and inode, equal for every handle on the same
    /// namespace (what `ip netns identify` compares).
    pub fn id(&self) -> std::io::Result<NetNsId> {
        let st = nix::sys::stat::fstat(self.fd.as_raw_fd()).map_err(std::io::Error::from)?;
        Ok(NetNsId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// The identity of the namespace at `path` (e.g. `/proc/PID/ns/net`) without keeping it open.
    pub fn id_of(path: impl AsRef<Path>) -> std::io::Result<NetNsId> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path)?;
        Ok(NetNsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Runs `f` with the calling thread inside this namespace, then moves it back.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetNsError> {
        let home = Self::current()?;
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetNsError::Enter(self.label.clone(), e))?;
        let out = f();
        // A thread left in the wrong namespace would open later sockets there: abort instead.
        setns(home.fd.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("restoring the thread's original network namespace");
        Ok(out)
    }
}

impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}
