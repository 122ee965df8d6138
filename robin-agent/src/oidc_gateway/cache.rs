//! The in-memory cache: one slot per document, a TTL, one upstream fetch at a time per document
//! (single-flight), and the last good copy kept for when the API server fails (stale-on-error).
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{
    metrics::Metrics,
    upstream::{Upstream, UpstreamError},
};

/// After a failed fetch, requests serve what is cached (or 502) for this long, at most, instead
/// of each queuing another upstream attempt: an outage must not turn into a request storm.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(5);

/// The documents the gateway serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Document {
    /// `/.well-known/openid-configuration`
    Discovery = 0,
    /// `/openid/v1/jwks`
    Jwks = 1,
}

impl Document {
    pub const ALL: [Document; 2] = [Document::Discovery, Document::Jwks];

    /// The path on both the API server and the gateway.
    pub fn path(self) -> &'static str {
        match self {
            Document::Discovery => "/.well-known/openid-configuration",
            Document::Jwks => "/openid/v1/jwks",
        }
    }

    /// The `document` label in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Document::Discovery => "openid-configuration",
            Document::Jwks => "jwks",
        }
    }

    /// What the API server itself sends for each.
    pub fn content_type(self) -> &'static str {
        match self {
            Document::Discovery => "application/json",
            Document::Jwks => "application/jwk-set+json",
        }
    }

    pub fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.path() == path)
    }
}

/// One cached rendering of a document.
#[derive(Debug)]
pub struct Entry {
    pub body: Bytes,
    /// Strong validator, quoted: `"<16 hex digits>"`.
    pub etag: String,
    fetched_at: Instant,
}

/// What a lookup produced; metrics are counted by [`Cache::get`].
pub enum Lookup {
    /// A fresh copy that this request did not have to fetch.
    Hit(Arc<Entry>),
    /// A copy this request fetched.
    Miss(Arc<Entry>),
    /// The last good copy, past its TTL, because the upstream failed.
    Stale(Arc<Entry>),
    /// The upstream failed and nothing is cached.
    Unavailable,
}

#[derive(Default)]
struct State {
    entry: Option<Arc<Entry>>,
    failed_at: Option<Instant>,
}

#[derive(Default)]
struct Slot {
    state: Mutex<State>,
    /// Held across the upstream fetch: whoever waits on it re-checks the slot afterwards and
    /// finds the copy the holder fetched.
    fetching: tokio::sync::Mutex<()>,
}

pub struct Cache {
    slots: [Slot; 2],
    ttl: Duration,
    error_backoff: Duration,
    pretty: bool,
    upstream: Upstream,
    pub(super) metrics: Metrics,
}

impl Cache {
    pub fn new(upstream: Upstream, ttl: Duration, pretty: bool) -> Self {
        Self {
            slots: Default::default(),
            ttl,
            error_backoff: ttl.min(MAX_ERROR_BACKOFF),
            pretty,
            upstream,
            metrics: Metrics::default(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Ready once every document has been fetched once; an outage later does not revoke it,
    /// since stale copies are still served.
    pub fn is_ready(&self) -> bool {
        self.slots.iter().all(|s| lock(&s.state).entry.is_some())
    }

    pub async fn get(&self, doc: Document) -> Lookup {
        let slot = &self.slots[doc as usize];
        if let Some(entry) = self.fresh(slot) {
            self.metrics.hit(doc);
            return Lookup::Hit(entry);
        }
        let _fetching = slot.fetching.lock().await;
        if let Some(entry) = self.fresh(slot) {
            self.metrics.hit(doc);
            return Lookup::Hit(entry);
        }
        if !self.backing_off(slot) {
            self.metrics.miss(doc);
            if let Ok(entry) = self.fetch_locked(doc, slot).await {
                return Lookup::Miss(entry);
            }
        }
        match lock(&slot.state).entry.clone() {
            Some(entry) => {
                self.metrics.stale(doc);
                Lookup::Stale(entry)
            }
            None => Lookup::Unavailable,
        }
    }

    /// Fetches `doc` unless a fresh copy is cached; for warming up, outside any request.
    pub async fn refresh(&self, doc: Document) -> Result<(), UpstreamError> {
        let slot = &self.slots[doc as usize];
        let _fetching = slot.fetching.lock().await;
        if self.fresh(slot).is_some() {
            return Ok(());
        }
        self.fetch_locked(doc, slot).await.map(drop)
    }

    fn fresh(&self, slot: &Slot) -> Option<Arc<Entry>> {
        let state = lock(&slot.state);
        state
            .entry
            .as_ref()
            .filter(|e| e.fetched_at.elapsed() < self.ttl)
            .cloned()
    }

    fn backing_off(&self, slot: &Slot) -> bool {
        lock(&slot.state)
            .failed_at
            .is_some_and(|t| t.elapsed() < self.error_backoff)
    }

    /// Call only while holding `slot.fetching`.
    async fn fetch_locked(&self, doc: Document, slot: &Slot) -> Result<Arc<Entry>, UpstreamError> {
        match self.upstream.fetch(doc.path()).await {
            Ok(value) => {
                let entry = Arc::new(self.render(&value));
                let mut state = lock(&slot.state);
                state.entry = Some(entry.clone());
                state.failed_at = None;
                tracing::debug!(document = doc.label(), etag = %entry.etag, "fetched");
                Ok(entry)
            }
            Err(e) => {
                self.metrics.upstream_error(doc);
                lock(&slot.state).failed_at = Some(Instant::now());
                tracing::warn!(document = doc.label(), error = %e, "upstream fetch failed");
                Err(e)
            }
        }
    }

    /// Re-serializes instead of passing bytes through: the body is then canonical (sorted keys),
    /// so every replica computes the same ETag for the same content.
    fn render(&self, value: &serde_json::Value) -> Entry {
        let mut body = if self.pretty {
            serde_json::to_vec_pretty(value)
        } else {
            serde_json::to_vec(value)
        }
        .expect("a serde_json::Value always serializes");
        body.push(b'\n');
        Entry {
            etag: format!("\"{:016x}\"", fnv1a64(&body)),
            body: Bytes::from(body),
            fetched_at: Instant::now(),
        }
    }
}

/// A poisoned lock only means another request panicked mid-update of plain data; keep serving.
fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// FNV-1a, 64 bits: stable across builds and replicas (unlike `DefaultHasher`), and an ETag
/// only has to tell a handful of versions of one document apart.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_known_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn documents_round_trip_their_paths() {
        for doc in Document::ALL {
            assert_eq!(Document::from_path(doc.path()), Some(doc));
        }
        assert_eq!(Document::from_path("/openid/v1/jwks/"), None);
    }
}
