//! The `file` source: a projected ServiceAccount token (or any token file), checked on every
//! request so a kubelet-style atomic swap (symlinked `..data` directory or rename) or an in-place
//! rewrite is seen on the very next request, and re-read only when it changed.
//!
//! The check is one synchronous `stat` on the runtime worker, not a hop to tokio's blocking
//! pool: projected volumes are tmpfs, pure in-memory lookups of a few µs, far cheaper than two
//! `spawn_blocking` round trips per request (which the benchmark profile showed as a third of
//! Robin's CPU).
//!
//! In node mode the path is a [`PodPath`], resolved inside the pod's root (see [`crate::podfs`]),
//! never in the agent's filesystem. There the check is `openat2(O_PATH)` + `fstat`, and a
//! re-read reads through that same handle, so what is cached is exactly the file checked.
use std::{
    fs::{File, Metadata},
    io::Read as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::PathBuf,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{IdentityError, IdentitySource, Token, TokenFuture};
use crate::podfs::{self, PodPath};

/// Files larger than this are not tokens; refuse rather than read them into memory.
const MAX_FILE_LEN: u64 = 64 * 1024;

/// A file changed less than this long before it was read may change again without its
/// timestamps moving: the kernel stamps files from a coarse clock (one tick, up to 10 ms) and
/// some filesystems keep whole seconds. Such a read is not trusted; the file is re-read on every
/// request until it is older than this (git's "racily clean" rule).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// What identifies one version of the file: a rename or symlink flip changes the inode, a rewrite
/// changes mtime/ctime (and usually the length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Version {
    fn of(m: &Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// True when the file changed within `window` of `now` (or in the future of it).
    fn is_racy(&self, now: SystemTime, window: Duration) -> bool {
        let (secs, nanos) = self.ctime;
        let Ok(secs) = u64::try_from(secs) else {
            return false;
        };
        let changed = UNIX_EPOCH + Duration::new(secs, nanos.clamp(0, 999_999_999) as u32);
        match now.duration_since(changed) {
            Ok(age) => age < window,
            Err(_) => true,
        }
    }
}

struct Cached {
    version: Version,
    token: Token,
}

/// Where the token file is.
#[derive(Debug)]
enum Location {
    /// A path of this process's filesystem (`robin exec`).
    Local(PathBuf),
    /// A path inside a pod's root (`robin node`).
    InPod(PodPath),
}

impl Location {
    /// What the path names now (symlinks followed): one `stat` for a local path; for a pod
    /// path (which cannot be stat'ed without a lookup in the pod's root) `openat2` + `fstat`,
    /// keeping the `O_PATH` handle so a re-read reads exactly the file checked.
    fn probe(&self) -> std::io::Result<(Metadata, Option<File>)> {
        match self {
            Self::Local(p) => Ok((std::fs::metadata(p)?, None)),
            Self::InPod(p) => {
                let handle = p.locate()?;
                Ok((handle.metadata()?, Some(handle)))
            }
        }
    }

    /// Opens the file for reading: the one `handle` names, else the local path again, without
    /// blocking (a FIFO swapped in meanwhile is refused by the check on the open descriptor).
    fn open(&self, handle: Option<&File>) -> std::io::Result<File> {
        match (self, handle) {
            (_, Some(h)) => podfs::reopen_for_reading(h),
            (Self::Local(p), None) => File::options()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(p),
            (Self::InPod(p), None) => podfs::reopen_for_reading(&p.locate()?),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => p.display().fmt(f),
            Self::InPod(p) => p.fmt(f),
        }
    }
}

#[derive(Debug)]
pub struct FileSource {
    path: Location,
    cached: Mutex<Option<Cached>>,
    racy_window: Duration,
    #[cfg(test)]
    reads: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self::at(Location::Local(path))
    }

    /// A token file inside a pod's root filesystem.
    pub fn in_pod(path: PodPath) -> Self {
        Self::at(Location::InPod(path))
    }

    fn at(path: Location) -> Self {
        Self {
            path,
            cached: Mutex::new(None),
            racy_window: RACY_WINDOW,
            #[cfg(test)]
            reads: Default::default(),
        }
    }

    fn read_err(&self, source: std::io::Error) -> IdentityError {
        match &self.path {
            Location::Local(path) => IdentityError::Read {
                path: path.clone(),
                source,
            },
            Location::InPod(path) => IdentityError::ReadInPod {
                path: path.to_string(),
                source,
            },
        }
    }

    /// Refuses what is not a token file: too large to be one, or not a regular file (a FIFO
    /// would block the reader, a device could have side effects).
    fn check(&self, meta: &Metadata) -> Result<(), IdentityError> {
        if !meta.is_file() {
            return Err(IdentityError::Unavailable(format!(
                "{} is not a regular file",
                self.path
            )));
        }
        if meta.len() > MAX_FILE_LEN {
            return Err(IdentityError::Unavailable(format!(
                "{} is {} bytes, larger than a token can be",
                self.path,
                meta.len()
            )));
        }
        Ok(())
    }

    fn current(&self) -> Result<Token, IdentityError> {
        // The lookup follows symlinks, so a `..data` flip shows up as another inode.
        let (meta, handle) = self.path.probe().map_err(|e| self.read_err(e))?;
        self.check(&meta)?;
        let seen = Version::of(&meta);
        {
            // A poisoned lock only means a panic elsewhere; the cached pair is still whole.
            let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cached.as_ref()
                && c.version == seen
            {
                return Ok(c.token.clone());
            }
        }
        self.reread(handle.as_ref())
    }

    /// Reads the file `handle` names and caches the token under the version stat'ed on the open
    /// descriptor before reading: a change during or after the read moves the version, so the
    /// next request reads again.
    fn reread(&self, handle: Option<&File>) -> Result<Token, IdentityError> {
        #[cfg(test)]
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut file = self.path.open(handle).map_err(|e| self.read_err(e))?;
        let meta = file.metadata().map_err(|e| self.read_err(e))?;
        self.check(&meta)?;
        let version = Version::of(&meta);
        let mut raw = String::new();
        file.by_ref()
            .take(MAX_FILE_LEN + 1)
            .read_to_string(&mut raw)
            .map_err(|e| self.read_err(e))?;
        let parsed = Token::parse(&raw).map_err(|source| IdentityError::Invalid {
            origin: self.describe(),
            source,
        });
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        *cached = match &parsed {
            Ok(token) if !self.racy(&version) => Some(Cached {
                version,
                token: token.clone(),
            }),
            // Errors are not cached: every request re-reads until the file is fixed.
            _ => None,
        };
        parsed
    }

    fn racy(&self, version: &Version) -> bool {
        !self.racy_window.is_zero() && version.is_racy(SystemTime::now(), self.racy_window)
    }
}

impl IdentitySource for FileSource {
    fn describe(&self) -> String {
        format!("file:{}", self.path)
    }

    fn token(&self) -> TokenFuture<'_> {
        Box::pin(std::future::ready(self.current()))
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::FileExt as _, sync::atomic::Ordering};

    use super::*;

    /// A source that trusts even a just-written file, so the tests exercise the version
    /// comparison itself rather than the racy-read fallback.
    fn trusting(path: PathBuf) -> FileSource {
        FileSource {
            racy_window: Duration::ZERO,
            ..FileSource::new(path)
        }
    }

    fn reads(src: &FileSource) -> u64 {
        src.reads.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn sees_atomic_rename_swap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let src = trusting(path.clone());
        assert_eq!(src.token().await.unwrap().expose(), "first");
        // Same length, so only the inode tells the versions apart.
        std::fs::write(dir.join("token.new"), "other\n").unwrap();
        std::fs::rename(dir.join("token.new"), &path).unwrap();
        assert_eq!(src.token().await.unwrap().expose(), "other");
    }

    #[tokio::test]
    async fn sees_kubelet_symlink_swap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v1/token"), "one").unwrap();
        std::fs::write(dir.join("..v2/token"), "two").unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", dir.join("token")).unwrap();
        let src = trusting(dir.join("token"));
        assert_eq!(src.token().await.unwrap().expose(), "one");
        assert_eq!(src.token().await.unwrap().expose(), "one");
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        assert_eq!(src.token().await.unwrap().expose(), "two");
    }

    #[tokio::test]
    async fn unchanged_file_is_read_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("token");
        std::fs::write(&path, "steady").unwrap();
        let src = trusting(path);
        for _ in 0..5 {
            assert_eq!(src.token().await.unwrap().expose(), "steady");
        }
        assert_eq!(reads(&src), 1);
    }

    #[tokio::test]
    async fn in_place_rewrite_of_same_length_is_seen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("token");
        std::fs::write(&path, "aaaa").unwrap();
        // The production window: a rewrite within the same clock tick keeps mtime, ctime, inode
        // and length, so only the racy-read rule can catch it.
        let src = FileSource::new(path.clone());
        assert_eq!(src.token().await.unwrap().expose(), "aaaa");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"bbbb", 0)
            .unwrap();
        assert_eq!(src.token().await.unwrap().expose(), "bbbb");
    }

    #[tokio::test]
    async fn recent_file_is_not_trusted_until_it_settles() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("token");
        std::fs::write(&path, "fresh").unwrap();
        let src = FileSource::new(path);
        src.token().await.unwrap();
        src.token().await.unwrap();
        assert_eq!(reads(&src), 2);
    }

    #[tokio::test]
    async fn deleted_file_is_an_error_not_the_cached_token() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("token");
        std::fs::write(&path, "was-here").unwrap();
        let src = trusting(path.clone());
        assert_eq!(src.token().await.unwrap().expose(), "was-here");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(src.token().await, Err(IdentityError::Read { .. })));
        std::fs::write(&path, "back").unwrap();
        assert_eq!(src.token().await.unwrap().expose(), "back");
    }

    #[tokio::test]
    async fn invalid_rotation_is_an_error_not_the_cached_token() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("token");
        std::fs::write(&path, "good").unwrap();
        let src = trusting(path.clone());
        assert_eq!(src.token().await.unwrap().expose(), "good");
        std::fs::write(dir.join("t.new"), "bad\r\nX-Evil: 1").unwrap();
        std::fs::rename(dir.join("t.new"), &path).unwrap();
        let err = src.token().await.unwrap_err();
        assert!(matches!(err, IdentityError::Invalid { .. }), "{err}");
        // Still refused on the next request: errors are not cached as "unchanged".
        assert!(matches!(
            src.token().await,
            Err(IdentityError::Invalid { .. })
        ));
        std::fs::write(&path, vec![b'a'; MAX_FILE_LEN as usize + 1]).unwrap();
        assert!(matches!(
            src.token().await,
            Err(IdentityError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_fifo_or_directory_is_refused_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR).unwrap();
        for path in [fifo, dir.to_path_buf()] {
            let err = FileSource::new(path).token().await.unwrap_err();
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
    }

    #[tokio::test]
    async fn missing_empty_and_crlf_are_errors_without_the_value() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let src = FileSource::new(dir.join("absent"));
        assert!(matches!(src.token().await, Err(IdentityError::Read { .. })));
        std::fs::write(dir.join("empty"), "\n").unwrap();
        let src = FileSource::new(dir.join("empty"));
        assert!(matches!(
            src.token().await,
            Err(IdentityError::Invalid { .. })
        ));
        std::fs::write(dir.join("crlf"), "secretpart\r\nInjected: yes").unwrap();
        let err = FileSource::new(dir.join("crlf")).token().await.unwrap_err();
        assert!(!err.to_string().contains("secretpart"));
    }
}
