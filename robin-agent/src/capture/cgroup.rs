//! cgroup v2 directories: finding the hierarchy, creating a transient cgroup for `robin exec`,
//! moving processes in, and removing it once they are gone.
use std::{
    fs,
    io::{self, BufRead},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(io::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The cgroup2 mount point: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones such as these CI machines.
pub fn find_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let file = fs::File::open("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    for line in io::BufReader::new(file).lines() {
        let line = line.map_err(CgroupError::MountInfo)?;
        // "36 35 0:30 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw"
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() == Some("cgroup2")
            && let Some(mount_point) = pre.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount_point.replace("\\040", " ")));
        }
    }
    Err(CgroupError::NoCgroup2)
}

/// Where Robin mounts the cgroup2 hierarchy when none is visible in its mount namespace.
const PRIVATE_CGROUP2_MOUNT: &str = "/run/robin/cgroup2";

/// A cgroup2 mount Robin made itself; unmounted on drop.
#[derive(Debug)]
pub struct Cgroup2Mount {
    path: PathBuf,
    owned: bool,
}

impl Cgroup2Mount {
    /// The visible cgroup2 mount, or a fresh one. `ip netns exec` (and some container runtimes)
    /// give their command a new mount namespace with `/sys` remounted, which hides cgroup2;
    /// mounting it again shows the same single hierarchy.
    pub fn find_or_mount() -> Result<Self, CgroupError> {
        match find_cgroup2_mount() {
            Ok(path) => Ok(Self { path, owned: false }),
            Err(CgroupError::NoCgroup2) => {
                let path = PathBuf::from(PRIVATE_CGROUP2_MOUNT);
                fs::create_dir_all(&path).map_err(io_err("creating", &path))?;
                nix::mount::mount(
                    Some("cgroup2"),
                    &path,
                    Some("cgroup2"),
                    nix::mount::MsFlags::MS_NOSUID
                        | nix::mount::MsFlags::MS_NODEV
                        | nix::mount::MsFlags::MS_NOEXEC,
                    None::<&str>,
                )
                .map_err(|e| CgroupError::Io {
                    op: "mounting cgroup2 at",
                    path: path.clone(),
                    source: e.into(),
                })?;
                Ok(Self { path, owned: true })
            }
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup2Mount {
    fn drop(&mut self) {
        if self.owned {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A cgroup v2 directory. `Cgroup::create` makes a transient one that is removed on drop (after
/// any process still in it is killed); `Cgroup::existing` only refers to one.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    owned: bool,
}

impl Cgroup {
    pub fn existing(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            owned: false,
        }
    }

    pub fn create(path: impl Into<PathBuf>) -> Result<Self, CgroupError> {
        let path = path.into();
        fs::create_dir(&path).map_err(io_err("creating cgroup", &path))?;
        Ok(Self { path, owned: true })
    }

    /// As [`Cgroup::create`], under a name only this process can hold (`robin exec` uses its
    /// pid). A `robin exec` that was killed (SIGKILL skips its cleanup) leaves its cgroup; once
    /// its pid is reused, that empty leftover is removed and made afresh. One with processes in
    /// it is someone's and stays: an error.
    pub fn create_own(path: impl Into<PathBuf>) -> Result<Self, CgroupError> {
        let path = path.into();
        if path.exists() {
            if !Self::existing(path.clone()).pids()?.is_empty() {
                return Err(io_err("creating cgroup", &path)(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "it exists and has processes in it",
                )));
            }
            tracing::info!(path = %path.display(), "removing an empty cgroup left by a killed robin exec");
            fs::remove_dir(&path).map_err(io_err("removing leftover cgroup", &path))?;
        }
        Self::create(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup v2 id the kernel reports to eBPF (`bpf_get_current_cgroup_id`): the inode
    /// number of the directory in the cgroup2 filesystem.
    pub fn id(&self) -> Result<u64, CgroupError> {
        Ok(fs::metadata(&self.path)
            .map_err(io_err("reading cgroup", &self.path))?
            .ino())
    }

    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(io_err("moving process into", &procs))
    }

    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let procs = self.path.join("cgroup.procs");
        let text = fs::read_to_string(&procs).map_err(io_err("reading", &procs))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Kills everything left in the cgroup and removes it, waiting (bounded) for the processes to
    /// exit since a populated cgroup cannot be removed.
    pub fn remove(&mut self) -> Result<(), CgroupError> {
        if !self.path.exists() {
            self.owned = false;
            return Ok(());
        }
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => {
                    self.owned = false;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(io_err("removing cgroup", &self.path)(e)),
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.owned
            && let Err(e) = self.remove()
        {
            tracing::warn!(error = %e, "leaving cgroup behind");
        }
    }
}
