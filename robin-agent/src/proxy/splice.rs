//! Passthrough: the sniffed bytes and everything after them go to the original destination
//! untouched, never decrypted.
use std::time::Duration;

use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::upstream::Dialer;
use crate::capture::OrigDst;

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("connecting to {0}: {1}")]
    Connect(OrigDst, #[source] std::io::Error),
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(OrigDst),
    #[error("relaying: {0}")]
    Io(#[source] std::io::Error),
}

/// Returns bytes sent upstream (including `prefix`) and bytes sent back to the workload.
pub async fn splice(
    mut down: TcpStream,
    prefix: &[u8],
    dst: OrigDst,
    connect_timeout: Duration,
    dialer: &Dialer,
) -> Result<(u64, u64), SpliceError> {
    let mut up = tokio::time::timeout(connect_timeout, dialer.connect(dst.0))
        .await
        .map_err(|_| SpliceError::ConnectTimeout(dst))?
        .map_err(|e| SpliceError::Connect(dst, e))?;
    let _ = up.set_nodelay(true);
    up.write_all(prefix).await.map_err(SpliceError::Io)?;
    let (sent, received) = tokio::io::copy_bidirectional(&mut down, &mut up)
        .await
        .map_err(SpliceError::Io)?;
    Ok((sent + prefix.len() as u64, received))
}
