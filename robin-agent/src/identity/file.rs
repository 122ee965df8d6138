//! The `file` source: a projected ServiceAccount token (or any token file) read on every request,
//! so a kubelet-style atomic swap (symlinked `..data` directory or rename) is seen immediately.
use std::path::PathBuf;

use super::{IdentityError, IdentitySource, Token, TokenFuture};

/// Files larger than this are not tokens; refuse rather than read them into memory.
const MAX_FILE_LEN: u64 = 64 * 1024;

#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    async fn read(&self) -> Result<Token, IdentityError> {
        let read_err = |source| IdentityError::Read {
            path: self.path.clone(),
            source,
        };
        // Opening by path each time follows the symlink swap the kubelet does on rotation.
        let meta = tokio::fs::metadata(&self.path).await.map_err(read_err)?;
        if meta.len() > MAX_FILE_LEN {
            return Err(IdentityError::Unavailable(format!(
                "{} is {} bytes, larger than a token can be",
                self.path.display(),
                meta.len()
            )));
        }
        let raw = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(read_err)?;
        Token::parse(&raw).map_err(|source| IdentityError::Invalid {
            origin: self.describe(),
            source,
        })
    }
}

impl IdentitySource for FileSource {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn token(&self) -> TokenFuture<'_> {
        Box::pin(self.read())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("robin-file-src-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn sees_atomic_rename_swap() {
        let dir = scratch("rename");
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let src = FileSource::new(path.clone());
        assert_eq!(src.token().await.unwrap().expose(), "first");
        std::fs::write(dir.join("token.new"), "second").unwrap();
        std::fs::rename(dir.join("token.new"), &path).unwrap();
        assert_eq!(src.token().await.unwrap().expose(), "second");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn sees_kubelet_symlink_swap() {
        let dir = scratch("symlink");
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v1/token"), "one").unwrap();
        std::fs::write(dir.join("..v2/token"), "two").unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", dir.join("token")).unwrap();
        let src = FileSource::new(dir.join("token"));
        assert_eq!(src.token().await.unwrap().expose(), "one");
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        assert_eq!(src.token().await.unwrap().expose(), "two");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn missing_empty_and_crlf_are_errors_without_the_value() {
        let dir = scratch("bad");
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
        std::fs::remove_dir_all(dir).unwrap();
    }
}
