//! Client connections as one budget per process, shared by every accept loop of `robin exec`
//! and `robin node`:
//!
//! * the descriptor limit is raised to the hard limit at start-up ([`raise_nofile_limit`]);
//! * a cap on client connections served at once ([`Connections::admit`]). At the cap the newest
//!   *idle* connection (still in its TLS handshake or sniff, or between requests) is shed to
//!   make room, so established keep-alive connections outlive a flood of new ones; when every
//!   open connection is busy, the new one is closed instead;
//! * a descriptor reserve: a client connection holds one descriptor, a request in flight one
//!   more for its upstream (h2 upstreams carry up to 100 requests each). The default cap is
//!   `(RLIMIT_NOFILE - DESCRIPTOR_RESERVE) * 3 / 4`, so at the cap a quarter of the budget plus
//!   the reserve remain for upstream dials, token reads and the admin plane. Should accept still
//!   fail for want of descriptors, the newest idle connection is shed ([`Connections::shed_one`]);
//! * heap handed back to the kernel once a storm is over ([`trim_when_load_falls`]).
use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use prometheus_client::{
    collector::Collector,
    encoding::DescriptorEncoder,
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use tokio::sync::{Notify, futures::OwnedNotified};

pub mod busy;

/// Descriptors kept free at the default connection cap.
pub const DESCRIPTOR_RESERVE: u64 = 256;

/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How often [`trim_when_load_falls`] looks at the connection count.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// A storm smaller than this leaves too little freed heap to be worth a trim.
const TRIM_MIN_PEAK: usize = 64;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the default soft limit, 1024, is far
/// below what thousands of connections need) and returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "reading RLIMIT_NOFILE");
            return 1024;
        }
    };
    if soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(soft, hard, error = %e, "raising RLIMIT_NOFILE");
        return soft;
    }
    tracing::info!(
        from = soft,
        to = hard,
        "descriptor limit (RLIMIT_NOFILE) raised"
    );
    hard
}

/// The connection cap for a descriptor limit: three quarters of what is left after the reserve.
pub fn default_cap(nofile: u64) -> usize {
    let usable = nofile.saturating_sub(DESCRIPTOR_RESERVE) / 4 * 3;
    usize::try_from(usable).unwrap_or(usize::MAX).max(1)
}

#[derive(Debug, Default)]
struct Slot {
    /// Requests in flight (or 1 for a spliced connection): 0 means idle, sheddable.
    busy: AtomicUsize,
    /// In its own `Arc` so a connection's future can own its wait ([`UntilShed`]).
    shed: Arc<Notify>,
}

/// The process's client connections.
#[derive(Debug)]
pub struct Connections {
    cap: usize,
    /// By admission order, so the newest is last.
    slots: Mutex<BTreeMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    shed: AtomicU64,
    /// Most connections open since the last trim check.
    peak: AtomicUsize,
}

impl Connections {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            slots: Mutex::default(),
            next_id: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            peak: AtomicUsize::new(0),
        })
    }

    /// The cap for a configured value (`None`: derived from `nofile`). A value the descriptor
    /// limit cannot carry is lowered, with a warning.
    pub fn for_limit(configured: Option<usize>, nofile: u64) -> Arc<Self> {
        let max = default_cap(nofile);
        let cap = match configured {
            Some(c) if c > max => {
                tracing::warn!(
                    configured = c,
                    cap = max,
                    nofile,
                    "max_connections lowered to fit the descriptor limit"
                );
                max
            }
            Some(c) => c,
            None => max,
        };
        tracing::info!(
            max_connections = cap,
            nofile,
            reserve = DESCRIPTOR_RESERVE,
            "connection cap"
        );
        Self::new(cap)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.slots.lock().expect("connections lock").len()
    }

    /// Connections closed by the cap: shed idle ones and new ones refused.
    pub fn shed_total(&self) -> u64 {
        self.shed.load(Relaxed)
    }

    /// Registers a just-accepted connection. At the cap the newest idle connection is shed to
    /// make room; if none is idle, `None`: close the new one.
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut slots = self.slots.lock().expect("connections lock");
        if slots.len() >= self.cap && !self.shed_newest_idle(&mut slots) {
            self.shed.fetch_add(1, Relaxed);
            tracing::debug!(
                cap = self.cap,
                "connection cap reached with every connection busy; closing the new one"
            );
            return None;
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let slot = Arc::new(Slot::default());
        slots.insert(id, slot.clone());
        self.peak.fetch_max(slots.len(), Relaxed);
        Some(Admitted {
            id,
            slot,
            conns: self.clone(),
        })
    }

    /// Sheds the newest idle connection (when accept runs out of descriptors); whether there
    /// was one.
    pub fn shed_one(&self) -> bool {
        let mut slots = self.slots.lock().expect("connections lock");
        self.shed_newest_idle(&mut slots)
    }

    /// What an accept loop does when accept fails: out of descriptors, shed the newest idle
    /// connection to free one; in any case back off instead of spinning.
    pub async fn accept_failed(&self, e: &std::io::Error) {
        let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        let shed = out_of_fds && self.shed_one();
        tracing::warn!(error = %e, shed, "accept failed");
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }

    /// A request arriving in the instant between the choice and the close is cut like any
    /// reset connection; the client sees the connection close before any response.
    fn shed_newest_idle(&self, slots: &mut BTreeMap<u64, Arc<Slot>>) -> bool {
        let victim = slots
            .iter()
            .rev()
            .find(|(_, s)| s.busy.load(Relaxed) == 0)
            .map(|(&id, _)| id);
        let Some(slot) = victim.and_then(|id| slots.remove(&id)) else {
            return false;
        };
        // A stored permit: the connection's task sees it even if it is not waiting yet.
        slot.shed.notify_one();
        self.shed.fetch_add(1, Relaxed);
        true
    }
}

/// The cap's families, read at each scrape (`robin node` registers the process's one
/// [`Connections`] as a collector).
impl Collector for Connections {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use crate::metrics::encode_one;
        encode_one(
            &mut encoder,
            "robin_connections_open",
            "Client connections open now.",
            &ConstGauge::new(self.open()),
        )?;
        encode_one(
            &mut encoder,
            "robin_connections_max",
            "The connection cap (max_connections).",
            &ConstGauge::new(self.cap()),
        )?;
        encode_one(
            &mut encoder,
            "robin_connections_shed",
            "Client connections closed at the connection cap (newest idle first).",
            &ConstCounter::new(self.shed_total()),
        )
    }
}

/// One admitted connection; dropping it (when the connection's task ends) frees its place.
#[derive(Debug)]
pub struct Admitted {
    id: u64,
    slot: Arc<Slot>,
    conns: Arc<Connections>,
}

impl Admitted {
    /// Resolves when the connection is shed: its task drops the connection.
    pub async fn shed(&self) {
        self.slot.shed.notified().await
    }

    /// A handle the connection's requests mark themselves busy with.
    pub fn activity(&self) -> Activity {
        Activity(Some(self.slot.clone()))
    }

    /// `serve` until it ends, or until the connection is shed (then `serve`, and with it the
    /// connection, is dropped). As `select!` on [`Admitted::shed`], without an `async` layer
    /// keeping its arguments for the connection's life.
    pub fn until_shed<F, S>(self, serve: F, on_shed: S) -> UntilShed<F, S>
    where
        F: Future<Output = ()>,
        S: FnOnce(),
    {
        UntilShed {
            serve,
            shed: self.slot.shed.clone().notified_owned(),
            on_shed: Some(on_shed),
            _admitted: self,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Admitted::until_shed`].
    pub struct UntilShed<F, S> {
        #[pin]
        serve: F,
        #[pin]
        shed: OwnedNotified,
        on_shed: Option<S>,
        _admitted: Admitted,
    }
}

impl<F: Future<Output = ()>, S: FnOnce()> Future for UntilShed<F, S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.serve.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        ready!(this.shed.poll(cx));
        if let Some(on_shed) = this.on_shed.take() {
            on_shed();
        }
        Poll::Ready(())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.conns
            .slots
            .lock()
            .expect("connections lock")
            .remove(&self.id);
    }
}

/// Marks a connection busy while a [`Busy`] from it lives. `Activity::none()` tracks nothing
/// (connections served outside any cap).
#[derive(Clone, Debug, Default)]
pub struct Activity(Option<Arc<Slot>>);

impl Activity {
    pub fn none() -> Self {
        Self(None)
    }

    pub fn busy(&self) -> Busy {
        if let Some(s) = &self.0 {
            s.busy.fetch_add(1, Relaxed);
        }
        Busy(self.0.clone())
    }
}

/// Keeps its connection from being shed.
#[derive(Debug)]
pub struct Busy(Option<Arc<Slot>>);

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.busy.fetch_sub(1, Relaxed);
        }
    }
}

/// One holder counted in a shared gauge for as long as it lives: a worker's live connections,
/// an upstream h2 connection's open streams.
#[derive(Debug)]
pub struct Counted(Arc<AtomicUsize>);

impl Counted {
    pub fn on(gauge: &Arc<AtomicUsize>) -> Self {
        gauge.fetch_add(1, Relaxed);
        Self(gauge.clone())
    }

    pub fn gauge(&self) -> &Arc<AtomicUsize> {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Trims the heap whenever the connection count has fallen to half of its peak since the last
/// look (a storm ending), checking every [`TRIM_INTERVAL`], and once more on the next look:
/// what closed connections leave behind (lingering closes, pooled upstreams) is freed a little
/// later than the connections themselves. Runs forever.
pub async fn trim_when_load_falls(conns: Arc<Connections>) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trims_due = 0u8;
    loop {
        tick.tick().await;
        let open = conns.open();
        let peak = conns.peak.swap(open, Relaxed);
        if peak >= TRIM_MIN_PEAK && open <= peak / 2 {
            trims_due = 2;
        }
        if trims_due > 0 {
            trims_due -= 1;
            let _ = tokio::task::spawn_blocking(crate::heap::purge).await;
            tracing::debug!(peak, open, "heap trimmed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cap_keeps_the_reserve() {
        assert_eq!(default_cap(1024), 576);
        assert_eq!(default_cap(20_000), 14_808);
        assert_eq!(default_cap(100), 1, "never zero");
    }

    #[tokio::test]
    async fn at_the_cap_the_newest_idle_connection_is_shed() {
        let conns = Connections::new(3);
        let old = conns.admit().expect("room");
        let busy = conns.admit().expect("room");
        let _in_flight = busy.activity().busy();
        let newest = conns.admit().expect("room");
        assert_eq!(conns.open(), 3);

        let fourth = conns.admit().expect("the newest idle one makes room");
        tokio::time::timeout(Duration::from_secs(1), newest.shed())
            .await
            .expect("the newest idle connection is told to go");
        assert_eq!(conns.shed_total(), 1);
        assert_eq!(conns.open(), 3);

        // With the fourth busy, `old` is the only idle one; busy connections are never shed.
        let _hold = fourth.activity().busy();
        let _fifth = conns.admit().expect("old makes room");
        tokio::time::timeout(Duration::from_secs(1), old.shed())
            .await
            .expect("old shed last");
        assert_eq!(conns.shed_total(), 2);
    }

    /// The connection's future is dropped when it is shed (its place freed, the hook run
    /// once); one that ends first ends the wait and frees its place too.
    #[tokio::test]
    async fn until_shed_drops_the_connection_when_shed() {
        let conns = Connections::new(1);
        let shed_runs = Arc::new(AtomicUsize::new(0));
        let runs = shed_runs.clone();
        let held = conns.admit().expect("room");
        let dropped = Arc::new(AtomicUsize::new(0));
        let guard = DropCounter(dropped.clone());
        let served = held.until_shed(
            async move {
                let _guard = guard;
                std::future::pending::<()>().await
            },
            move || {
                runs.fetch_add(1, Relaxed);
            },
        );
        let task = tokio::spawn(served);
        tokio::task::yield_now().await;
        let newer = conns.admit().expect("the idle one is shed to make room");
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the shed connection's future ends")
            .unwrap();
        assert_eq!(dropped.load(Relaxed), 1, "the connection was dropped");
        assert_eq!(shed_runs.load(Relaxed), 1);

        drop(newer);
        let done = conns
            .admit()
            .expect("room")
            .until_shed(async {}, || panic!("not shed"));
        done.await;
        assert_eq!(conns.open(), 0, "a finished connection frees its place");
    }

    struct DropCounter(Arc<AtomicUsize>);

    impl Drop for DropCounter {
        fn drop(&mut self) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    #[test]
    fn a_new_connection_is_refused_when_every_open_one_is_busy() {
        let conns = Connections::new(1);
        let only = conns.admit().expect("room");
        let _b = only.activity().busy();
        assert!(conns.admit().is_none());
        assert_eq!(conns.shed_total(), 1);
        drop(_b);
        drop(only);
        assert_eq!(conns.open(), 0);
        assert!(conns.admit().is_some());
    }
}
