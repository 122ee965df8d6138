//! The one token cache every fetching source goes through: refresh ahead of expiry, keep serving
//! a still-valid token while the endpoint fails, never serve an expired one, one fetch per key
//! at a time, bounded size.
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{IdentityError, Token};

/// What a fetch returns: the token and how long its issuer says it lives.
#[derive(Debug)]
pub struct Fetched {
    pub token: Token,
    pub lifetime: Duration,
}

/// Timing knobs; the defaults suit production, tests shorten them.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// Start refreshing this long before expiry (never more than half the lifetime).
    pub refresh_ahead: Duration,
    /// Treat a token as expired this much early, for clock skew and request latency (never
    /// more than a quarter of the lifetime).
    pub skew: Duration,
    /// Issuer lifetimes are clamped into this range so a hostile `expires_in` can neither pin a
    /// token for years nor make us fetch in a tight loop.
    pub min_lifetime: Duration,
    pub max_lifetime: Duration,
    /// Most distinct keys kept; the least recently used is evicted beyond it.
    pub max_entries: usize,
    /// After a failed fetch, callers within this window get the failure (or the still-valid
    /// token) without a new fetch, so a dead endpoint is not hit once per request.
    pub failure_backoff: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            refresh_ahead: Duration::from_secs(300),
            skew: Duration::from_secs(30),
            min_lifetime: Duration::from_secs(10),
            max_lifetime: Duration::from_secs(24 * 3600),
            max_entries: 1024,
            failure_backoff: Duration::from_secs(1),
        }
    }
}

/// Everything that changes the token: source kind, inner identity, audience, scope, endpoint,
/// resource. Built by each source; never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(pub String);

#[derive(Clone)]
struct Entry {
    token: Token,
    refresh_at: Instant,
    expires_at: Instant,
}

#[derive(Default)]
struct SlotState {
    entry: Option<Entry>,
    /// Bumped after every finished fetch, so waiters can tell someone else already tried.
    attempts: u64,
    last_error: Option<(Instant, String)>,
}

struct Slot {
    state: Mutex<SlotState>,
    /// Held for the duration of a fetch: the single-flight gate.
    fetching: tokio::sync::Mutex<()>,
    last_used: Mutex<Instant>,
}

pub struct TokenCache {
    slots: Mutex<HashMap<CacheKey, Arc<Slot>>>,
    policy: CachePolicy,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.len())
            .field("policy", &self.policy)
            .finish()
    }
}

impl TokenCache {
    pub fn new(policy: CachePolicy) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            policy,
        }
    }

    pub fn policy(&self) -> &CachePolicy {
        &self.policy
    }

    pub fn len(&self) -> usize {
        self.slots.lock().expect("cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, key: &CacheKey) -> Arc<Slot> {
        let now = Instant::now();
        let mut slots = self.slots.lock().expect("cache lock");
        if let Some(slot) = slots.get(key) {
            *slot.last_used.lock().expect("slot lock") = now;
            return slot.clone();
        }
        while slots.len() >= self.policy.max_entries.max(1) {
            let oldest = slots
                .iter()
                .min_by_key(|(_, s)| *s.last_used.lock().expect("slot lock"))
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => slots.remove(&k),
                None => break,
            };
        }
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState::default()),
            fetching: tokio::sync::Mutex::new(()),
            last_used: Mutex::new(now),
        });
        slots.insert(key.clone(), slot.clone());
        slot
    }

    /// Returns the cached token for `key`, calling `fetch` when it is missing or due for refresh.
    pub async fn get<F, Fut>(&self, key: &CacheKey, fetch: F) -> Result<Token, IdentityError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, IdentityError>>,
    {
        let slot = self.slot(key);
        let now = Instant::now();
        let (entry, seen_attempts, recent_error) = {
            let state = slot.state.lock().expect("slot lock");
            let recent = state
                .last_error
                .as_ref()
                .filter(|(at, _)| now < *at + self.policy.failure_backoff)
                .map(|(_, msg)| msg.clone());
            (state.entry.clone(), state.attempts, recent)
        };
        match entry {
            Some(e) if now < e.refresh_at => return Ok(e.token),
            Some(e) if now < e.expires_at => {
                if recent_error.is_some() {
                    return Ok(e.token);
                }
                // Due for refresh but still valid: one caller refreshes, the rest keep using it.
                let Ok(_guard) = slot.fetching.try_lock() else {
                    return Ok(e.token);
                };
                if let Some(fresh) = self.fresh(&slot, seen_attempts) {
                    return Ok(fresh);
                }
                return match self.run_fetch(&slot, fetch).await {
                    Ok(token) => Ok(token),
                    Err(err) => {
                        tracing::warn!(key = %key.0, error = %err, "token refresh failed; serving cached token until it expires");
                        // Still valid (checked again, the fetch took time) or nothing.
                        match Instant::now() < e.expires_at {
                            true => Ok(e.token),
                            false => Err(err),
                        }
                    }
                };
            }
            _ => {}
        }
        if let Some(msg) = recent_error {
            return Err(IdentityError::Unavailable(msg));
        }
        // Nothing valid: everyone waits for one fetch.
        let _guard = slot.fetching.lock().await;
        {
            let state = slot.state.lock().expect("slot lock");
            if state.attempts != seen_attempts {
                // Another caller finished a fetch while we waited: share its outcome.
                if let Some(e) = &state.entry
                    && Instant::now() < e.expires_at
                {
                    return Ok(e.token.clone());
                }
                if let Some((_, msg)) = &state.last_error {
                    return Err(IdentityError::Unavailable(msg.clone()));
                }
            }
        }
        self.run_fetch(&slot, fetch).await
    }

    fn fresh(&self, slot: &Slot, seen_attempts: u64) -> Option<Token> {
        let state = slot.state.lock().expect("slot lock");
        let e = state.entry.as_ref()?;
        (state.attempts != seen_attempts && Instant::now() < e.refresh_at).then(|| e.token.clone())
    }

    async fn run_fetch<F, Fut>(&self, slot: &Slot, fetch: F) -> Result<Token, IdentityError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, IdentityError>>,
    {
        let started = Instant::now();
        let result = fetch().await;
        let mut state = slot.state.lock().expect("slot lock");
        state.attempts += 1;
        match result {
            Ok(fetched) => {
                let entry = self.entry(started, fetched);
                state.last_error = None;
                state.entry = Some(entry.clone());
                Ok(entry.token)
            }
            Err(err) => {
                state.last_error = Some((Instant::now(), err.to_string()));
                if state
                    .entry
                    .as_ref()
                    .is_some_and(|e| Instant::now() >= e.expires_at)
                {
                    state.entry = None;
                }
                Err(err)
            }
        }
    }

    fn entry(&self, issued: Instant, fetched: Fetched) -> Entry {
        let p = &self.policy;
        let lifetime = fetched
            .lifetime
            .clamp(p.min_lifetime, p.max_lifetime.max(p.min_lifetime));
        let usable = lifetime - p.skew.min(lifetime / 4);
        let ahead = p.refresh_ahead.min(usable / 2);
        Entry {
            token: fetched.token,
            refresh_at: issued + (usable - ahead),
            expires_at: issued + usable,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn policy() -> CachePolicy {
        CachePolicy {
            refresh_ahead: Duration::from_secs(30),
            skew: Duration::ZERO,
            min_lifetime: Duration::from_secs(10),
            max_lifetime: Duration::from_secs(3600),
            max_entries: 4,
            failure_backoff: Duration::from_secs(1),
        }
    }

    fn tok(s: &str) -> Token {
        Token::parse(s).unwrap()
    }

    async fn ok(token: &str, secs: u64) -> Result<Fetched, IdentityError> {
        Ok(Fetched {
            token: tok(token),
            lifetime: Duration::from_secs(secs),
        })
    }

    async fn fail() -> Result<Fetched, IdentityError> {
        Err(IdentityError::Unavailable("endpoint down".into()))
    }

    #[tokio::test(start_paused = true)]
    async fn caches_then_refreshes_ahead_of_expiry() {
        let cache = TokenCache::new(policy());
        let key = CacheKey("k".into());
        assert_eq!(cache.get(&key, || ok("a", 100)).await.unwrap(), tok("a"));
        tokio::time::advance(Duration::from_secs(60)).await;
        // Before refresh_at (70s): cached, the fetch is not called.
        assert_eq!(cache.get(&key, || ok("b", 100)).await.unwrap(), tok("a"));
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(cache.get(&key, || ok("b", 100)).await.unwrap(), tok("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn serves_valid_token_on_failure_but_never_an_expired_one() {
        let cache = TokenCache::new(policy());
        let key = CacheKey("k".into());
        cache.get(&key, || ok("a", 100)).await.unwrap();
        tokio::time::advance(Duration::from_secs(80)).await;
        assert_eq!(cache.get(&key, fail).await.unwrap(), tok("a"));
        tokio::time::advance(Duration::from_secs(21)).await;
        assert!(cache.get(&key, fail).await.is_err());
        assert!(cache.get(&key, fail).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_instead_of_fetching_per_request() {
        let cache = TokenCache::new(policy());
        let key = CacheKey("k".into());
        let calls = AtomicUsize::new(0);
        let failing = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            fail().await
        };
        for _ in 0..5 {
            assert!(cache.get(&key, failing).await.is_err());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(cache.get(&key, failing).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Still inside the new backoff window: the failure stands, no fetch.
        assert!(cache.get(&key, || ok("a", 100)).await.is_err());
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert_eq!(cache.get(&key, || ok("a", 100)).await.unwrap(), tok("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn lifetime_is_clamped_and_refresh_ahead_at_most_half() {
        let cache = TokenCache::new(policy());
        let key = CacheKey("k".into());
        // A 1s lifetime becomes 10s: refresh at 5s (half), expire at 10s.
        cache.get(&key, || ok("a", 1)).await.unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(cache.get(&key, || ok("b", 1)).await.unwrap(), tok("a"));
        // A hostile 10-year lifetime is cut to the 1h maximum.
        let key2 = CacheKey("k2".into());
        cache
            .get(&key2, || ok("x", 10 * 365 * 86400))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(cache.get(&key2, fail).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_at_expiry_share_one_fetch() {
        let cache = Arc::new(TokenCache::new(policy()));
        let key = CacheKey("k".into());
        cache.get(&key, || ok("a", 100)).await.unwrap();
        tokio::time::advance(Duration::from_secs(101)).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (cache, key, calls) = (cache.clone(), key.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&key, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        ok("b", 100).await
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), tok("b"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_with_lru_eviction() {
        let cache = TokenCache::new(policy());
        for i in 0..10 {
            let key = CacheKey(format!("k{i}"));
            cache.get(&key, || ok("a", 100)).await.unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(cache.len(), 4);
    }
}
