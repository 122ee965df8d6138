//! Leaf certificates minted per SNI, signed by the Robin CA, cached in a bounded map.
use std::{
    collections::{HashMap, VecDeque},
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{
    ServerConfig,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::{CertAuthority, TlsError};

/// How long a minted leaf is valid for.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Not-before is set this far in the past to tolerate client clock skew.
pub const LEAF_BACKDATE: Duration = Duration::from_secs(3600);
/// A cached leaf is re-minted after this long, well before it expires.
pub const LEAF_REFRESH: Duration = Duration::from_secs(12 * 3600);
/// Default cache size.
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;

/// Mints a leaf for `name`: SAN = `name`, ECDSA P-256, short validity. The chain is
/// `[leaf, CA]`.
pub fn mint_leaf(ca: &CertAuthority, name: &str) -> Result<CertifiedKey, TlsError> {
    let err = |e: &dyn std::fmt::Display| TlsError::Mint(name.to_owned(), e.to_string());
    if !is_dns_name(name) {
        return Err(err(&"not a DNS name"));
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(&e))?;
    let mut params = CertificateParams::default();
    let dns = name.to_owned().try_into().map_err(|e| err(&e))?;
    params.subject_alt_names = vec![SanType::DnsName(dns)];
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = SystemTime::now();
    params.not_before = (now - LEAF_BACKDATE).into();
    params.not_after = (now + LEAF_VALIDITY).into();
    // Random serial so two leaves for one name are never confused.
    let mut serial = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| err(&"no randomness"))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params
        .signed_by(&key, &ca.issuer, &ca.key)
        .map_err(|e| err(&e))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|e| err(&e))?;
    Ok(CertifiedKey::new(
        vec![cert.der().clone(), ca.cert_der.clone()],
        signing,
    ))
}

/// A syntactically valid DNS host name (LDH labels, `_` tolerated), at most 253 bytes.
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// What a leaf cache lookup did: the `result` label of `robin_leaf_cache_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeafResult {
    Hit,
    Mint,
    MintError,
}

impl EncodeLabelValue for LeafResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::Hit => "hit",
            Self::Mint => "mint",
            Self::MintError => "mint_error",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeafLabels {
    result: LeafResult,
}

/// Counters for metrics, one per [`LeafResult`]. Clones count into the same series.
#[derive(Clone, Debug, Default)]
pub struct LeafStats {
    pub hits: Counter,
    pub mints: Counter,
    pub mint_errors: Counter,
}

impl LeafStats {
    /// The `robin_leaf_cache` family, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let family = Family::<LeafLabels, Counter>::default();
        registry.register(
            "robin_leaf_cache",
            "Leaf certificate cache lookups by result",
            family.clone(),
        );
        let result = |result| family.get_or_create_owned(&LeafLabels { result });
        Self {
            hits: result(LeafResult::Hit),
            mints: result(LeafResult::Mint),
            mint_errors: result(LeafResult::MintError),
        }
    }
}

struct Cached {
    key: Arc<CertifiedKey>,
    minted: Instant,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<String, Cached>,
    /// Insertion order, for evicting the oldest.
    order: VecDeque<String>,
}

/// A bounded leaf cache. Minting happens under the lock, so concurrent handshakes for one name
/// mint once; a mint is a P-256 key generation and one signature, well under a millisecond.
pub struct LeafCache {
    ca: Arc<CertAuthority>,
    capacity: usize,
    inner: Mutex<CacheInner>,
    pub stats: LeafStats,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    pub fn new(ca: Arc<CertAuthority>, capacity: usize, stats: LeafStats) -> Self {
        Self {
            ca,
            capacity: capacity.max(1),
            inner: Mutex::new(CacheInner::default()),
            stats,
        }
    }

    pub fn get(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let name = name.to_ascii_lowercase();
        // A poisoned lock only means another mint panicked; the map is still consistent.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = inner.map.get(&name)
            && c.minted.elapsed() < LEAF_REFRESH
        {
            self.stats.hits.inc();
            return Ok(c.key.clone());
        }
        let key = match mint_leaf(&self.ca, &name) {
            Ok(k) => Arc::new(k),
            Err(e) => {
                self.stats.mint_errors.inc();
                return Err(e);
            }
        };
        self.stats.mints.inc();
        let fresh = Cached {
            key: key.clone(),
            minted: Instant::now(),
        };
        if inner.map.insert(name.clone(), fresh).is_none() {
            inner.order.push_back(name);
        }
        while inner.map.len() > self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.map.remove(&oldest);
        }
        Ok(key)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Picks the leaf for the ClientHello's SNI; no SNI means no certificate (handshake fails),
/// which never happens on the intercept path since interception requires a matched SNI.
#[derive(Debug)]
pub struct MintingResolver {
    cache: Arc<LeafCache>,
}

impl MintingResolver {
    pub fn new(cache: Arc<LeafCache>) -> Self {
        Self { cache }
    }
}

impl ResolvesServerCert for MintingResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        match self.cache.get(name) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(error = %e, "leaf mint failed");
                None
            }
        }
    }
}

/// The server side of interception: minted leaves, ALPN h2 and http/1.1, and our suite order
/// (AES-128-GCM/SHA-256 first, see [`super::provider`]) rather than the client's, which for
/// OpenSSL and rustls clients starts with AES-256-GCM/SHA-384.
pub fn server_config(cache: Arc<LeafCache>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(MintingResolver::new(cache)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::tests::test_ca;

    fn cache(cap: usize) -> LeafCache {
        let (c, k) = test_ca("Cache CA");
        let ca = CertAuthority::from_pem(&c, &k, "c".as_ref(), "k".as_ref()).unwrap();
        LeafCache::new(Arc::new(ca), cap, LeafStats::default())
    }

    #[test]
    fn caches_and_counts() {
        let c = cache(4);
        let a = c.get("a.example.com").unwrap();
        let b = c.get("A.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(c.stats.mints.get(), 1);
        assert_eq!(c.stats.hits.get(), 1);
    }

    #[test]
    fn evicts_oldest_beyond_capacity() {
        let c = cache(2);
        for n in ["a.x", "b.x", "c.x"] {
            c.get(n).unwrap();
        }
        assert_eq!(c.len(), 2);
        c.get("b.x").unwrap();
        c.get("c.x").unwrap();
        assert_eq!(c.stats.hits.get(), 2);
        c.get("a.x").unwrap();
        assert_eq!(c.stats.mints.get(), 4);
    }

    #[test]
    fn concurrent_requests_mint_once() {
        let c = Arc::new(cache(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || c.get("same.example.com").unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.stats.mints.get(), 1);
        assert_eq!(c.stats.hits.get(), 7);
    }

    #[test]
    fn invalid_name_is_an_error() {
        let c = cache(2);
        assert!(c.get("bad name").is_err());
        assert_eq!(c.stats.mint_errors.get(), 1);
    }
}
