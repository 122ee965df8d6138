//! Robin's listener inside a workload's network namespace: 127.0.0.1:PORT and [::1]:PORT,
//! accepting only connections the kernel redirected.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    sync::Arc,
};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, listen, setsockopt,
    socket, sockopt,
};
use tokio::net::{TcpListener, TcpStream};

use super::{ClientAddr, NetNs, OrigDst, OrigDstTable, netns::NetNsError};

/// Linux `SO_NETNS_COOKIE` (5.14+); not yet in the libc crate for every target.
const SO_NETNS_COOKIE: libc::c_int = 71;
const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error("listening on {0}: {1}")]
    Bind(SocketAddr, #[source] io::Error),
    #[error("reading the netns cookie of the listener: {0}")]
    Cookie(#[source] io::Error),
}

/// Ports the listener actually got (the IPv6 one is absent where the namespace has no ::1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerPorts {
    pub port: u16,
    pub ipv6: bool,
}

pub struct CapturedListener {
    v4: TcpListener,
    v6: Option<TcpListener>,
    netns_cookie: u64,
    table: Arc<OrigDstTable>,
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?
        }
    }
    listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN))?;
    Ok(std::net::TcpListener::from(fd))
}

fn netns_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl CapturedListener {
    /// Opens the listener inside `netns` (`port` 0 picks a free one). Only the socket creation
    /// happens inside the namespace; the sockets keep their namespace once created.
    pub fn bind(netns: &NetNs, port: u16, table: Arc<OrigDstTable>) -> Result<Self, ListenerError> {
        let (v4, v6, cookie) = netns.run(|| -> Result<_, ListenerError> {
            let want = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let v4 = bind_one(want).map_err(|e| ListenerError::Bind(want, e))?;
            let port = v4.local_addr().map_err(|e| ListenerError::Bind(want, e))?.port();
            let want6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            // No ::1 (IPv6 disabled): IPv6 connects stay redirected to a closed port, i.e.
            // refused — fail closed, never bypassed.
            let v6 = match bind_one(want6) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(addr = %want6, error = %e, "no IPv6 listener; captured IPv6 connects will be refused");
                    None
                }
            };
            let cookie = netns_cookie(&v4).map_err(ListenerError::Cookie)?;
            Ok((v4, v6, cookie))
        })??;
        let to_tokio = |l: std::net::TcpListener| {
            let addr = l.local_addr().expect("bound listener has an address");
            TcpListener::from_std(l).map_err(|e| ListenerError::Bind(addr, e))
        };
        Ok(Self {
            v4: to_tokio(v4)?,
            v6: v6.map(to_tokio).transpose()?,
            netns_cookie: cookie,
            table,
        })
    }

    pub fn ports(&self) -> ListenerPorts {
        ListenerPorts {
            port: self.v4.local_addr().map(|a| a.port()).unwrap_or(0),
            ipv6: self.v6.is_some(),
        }
    }

    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    async fn accept_any(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match &self.v6 {
            Some(v6) => tokio::select! {
                r = self.v4.accept() => r,
                r = v6.accept() => r,
            },
            None => self.v4.accept().await,
        }
    }

    /// The next redirected connection with the destination its workload dialled. Connections
    /// the kernel did not redirect (someone dialling the listener directly) are closed here,
    /// unserved.
    pub async fn accept(&self) -> io::Result<(TcpStream, OrigDst, ClientAddr)> {
        loop {
            let (stream, peer) = self.accept_any().await?;
            match self.table.take(self.netns_cookie, peer) {
                Some(orig) => return Ok((stream, orig, ClientAddr(peer))),
                None => {
                    tracing::warn!(client = %peer, "closing a connection the kernel did not redirect");
                    drop(stream);
                }
            }
        }
    }
}
