//! The data path's threads: one single-threaded tokio runtime per core, each serving whole
//! connections. A connection, the tasks it spawns (hyper's h2 streams and h2 upstream connection
//! drivers) and the upstream connections it uses stay on one thread, as in
//! nginx's or Envoy's workers: a request crosses no thread and wakes no parked worker on its way
//! from the workload to the upstream and back.
//!
//! Why not tokio's work-stealing runtime: in the TLS keep-alive benchmark every request woke the
//! other worker at least once (the downstream task hands the request to the upstream
//! connection's driver task, which may run anywhere), and one worker alone served as many
//! requests as two (`bench/README.md`). The control plane (accept loops, pod watch, admin
//! endpoint, drain) stays on the process's multi-threaded runtime; accepted sockets move here.
use std::{
    cell::Cell,
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context as _;
use futures_util::{
    FutureExt as _,
    future::{self, Either},
};
use tokio::{runtime, sync::oneshot};

use crate::{conns::Counted, heap};

/// Blocking-pool threads per worker runtime: token reads that must block are rare here (see
/// `standalone::MAX_BLOCKING_THREADS` for why the pool is capped at all).
const BLOCKING_THREADS_PER_WORKER: usize = 2;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// How many worker runtimes a process runs: `TOKIO_WORKER_THREADS` when set (tokio's own knob,
/// which also sizes the control runtime's default), else the CPUs this process may use (the
/// cgroup's CPU quota and affinity included).
pub fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
            .unwrap_or(1)
    })
}

/// The worker runtime the calling thread belongs to, if any: per-worker state (the upstream
/// pool's shards) is chosen by it.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

struct Worker {
    handle: runtime::Handle,
    /// Connections placed here and not yet finished.
    live: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

/// A set of worker runtimes. Dropping it stops them: their threads end and the tasks still on
/// them are dropped (the drain has waited for the connections by then).
pub struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts [`count`] worker runtimes.
    pub fn start() -> anyhow::Result<Self> {
        let workers = (0..count())
            .map(start_worker)
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { workers })
    }

    /// Serves `stream` with `serve` on the least busy worker: the socket leaves the accepting
    /// runtime's I/O driver and joins the worker's, so its readiness wakes that worker only.
    pub fn serve<S, M, F>(&self, stream: S, serve: M)
    where
        S: Movable,
        M: FnOnce(S) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let detached = match stream.detach() {
            Ok(d) => d,
            Err(e) => return tracing::warn!(error = %e, "dropping an accepted connection"),
        };
        // On the worker: registration happens with its I/O driver. Combinators, as in `spawn`.
        let attached = future::lazy(move |_| S::attach(detached));
        self.spawn(attached.then(move |attached| match attached {
            Ok(stream) => Either::Left(serve(stream)),
            Err(e) => {
                tracing::warn!(error = %e, "dropping an accepted connection");
                Either::Right(future::ready(()))
            }
        }));
    }

    /// Runs `task` on the least busy worker (ties go to the first, so connections made one
    /// after another share one worker and its pooled upstream connections).
    fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.live.load(Ordering::Relaxed))
            .expect("at least one worker");
        let live = Counted::on(&worker.live);
        // A combinator, not `async move { task.await }`: an async block stores the future it
        // awaits twice (rust-lang/rust#62958), and this one holds a whole connection.
        worker.handle.spawn(task.map(move |()| drop(live)));
    }
}

/// A socket that can move from the runtime that accepted it to a worker's.
pub trait Movable: Sized + Send + 'static {
    type Detached: Send + 'static;
    fn detach(self) -> std::io::Result<Self::Detached>;
    /// Call on the runtime that is to drive the socket.
    fn attach(detached: Self::Detached) -> std::io::Result<Self>;
}

impl Movable for tokio::net::TcpStream {
    type Detached = std::net::TcpStream;
    fn detach(self) -> std::io::Result<Self::Detached> {
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        Self::from_std(detached)
    }
}

impl Movable for tokio::net::UnixStream {
    type Detached = std::os::unix::net::UnixStream;
    fn detach(self) -> std::io::Result<Self::Detached> {
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        Self::from_std(detached)
    }
}

fn start_worker(index: usize) -> anyhow::Result<Worker> {
    let rt = runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS_PER_WORKER)
        .build()
        .context("starting a worker runtime")?;
    let handle = rt.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("robin-worker-{index}"))
        .spawn(move || {
            CURRENT.with(|c| c.set(Some(index)));
            // Ends when the `Workers` is dropped (the sender goes with it).
            rt.block_on(async {
                tokio::select! {
                    _ = stopped => {}
                    () = heap::flush_thread_cache_when_quiet() => {}
                }
            });
        })
        .context("starting a worker thread")?;
    Ok(Worker {
        handle,
        live: Arc::default(),
        _stop: stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn connections_go_to_the_least_busy_worker_and_stay_on_its_thread() {
        let workers = Workers::start().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        for _ in 0..workers.workers.len() * 2 {
            let (tx, mut release) = (tx.clone(), release_rx.clone());
            workers.spawn(async move {
                let before = (current(), std::thread::current().id());
                // A task spawned by a connection runs on the same thread.
                let spawned = tokio::spawn(async { (current(), std::thread::current().id()) });
                let after = spawned.await.unwrap();
                tx.send((before, after)).unwrap();
                let _ = release.wait_for(|r| *r).await;
            });
        }
        let mut per_worker = vec![0; workers.workers.len()];
        for _ in 0..workers.workers.len() * 2 {
            let (before, after) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(before, after, "a connection's tasks stay on its worker");
            per_worker[before.0.expect("runs on a worker")] += 1;
        }
        assert!(per_worker.iter().all(|&n| n == 2), "{per_worker:?}");
        assert!(current().is_none(), "the test thread is no worker");
        release_tx.send(true).unwrap();
    }

    /// A socket accepted on another runtime is read and written by a worker, and the
    /// accepting runtime's I/O driver lets go of it.
    #[tokio::test(flavor = "current_thread")]
    async fn an_accepted_socket_is_served_on_a_worker() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let workers = Workers::start().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (served_on, on_worker) = oneshot::channel();
        workers.serve(
            accepted,
            move |mut stream: tokio::net::TcpStream| async move {
                let mut ping = [0u8; 4];
                stream.read_exact(&mut ping).await.unwrap();
                stream.write_all(b"pong").await.unwrap();
                let _ = served_on.send(current());
            },
        );
        client.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut pong))
            .await
            .expect("the worker answers")
            .unwrap();
        assert_eq!(&pong, b"pong");
        assert!(on_worker.await.unwrap().is_some(), "served on a worker");
        // The connection task ended and dropped the socket: the client reads end of stream.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
