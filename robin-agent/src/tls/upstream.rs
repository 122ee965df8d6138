//! The upstream TLS client: system roots plus the configured extra roots, TLS 1.2+, ALPN chosen
//! to match what the workload negotiated with us, AES-128-GCM/SHA-256 offered first.
//!
//! One `ClientConfig` per ALPN per proxy, shared by every dial through `Arc`: its session store
//! (rustls' in-memory default, 256 entries) is what lets a new dial resume instead of doing a
//! full handshake.
use std::{path::Path, sync::Arc};

use rustls::{ClientConfig, RootCertStore};

use super::TlsError;

/// Which application protocols to offer upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// The workload negotiated h2: offer h2, with http/1.1 as a fallback.
    H2,
    /// The workload speaks HTTP/1.1.
    Http1,
}

#[derive(Clone, Debug)]
pub struct UpstreamTls {
    h2: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    /// How many roots were loaded (system + extra), for the start-up log.
    pub root_count: usize,
}

impl UpstreamTls {
    /// System roots (unreadable system certificates are skipped, as rustls-native-certs reports
    /// them per file) plus every certificate in `extra_roots`.
    pub fn new(extra_roots: Option<&Path>) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = extra_roots {
            let pem = std::fs::read(path).map_err(|e| TlsError::Read(path.to_owned(), e))?;
            Self::add_pem(&mut roots, &pem, path)?;
        }
        Self::with_roots(roots)
    }

    /// Only the roots in `pem`; used by tests that must not trust the system store.
    pub fn from_pem_roots(pem: &[u8]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        Self::add_pem(&mut roots, pem, Path::new("<pem>"))?;
        Self::with_roots(roots)
    }

    fn add_pem(roots: &mut RootCertStore, pem: &[u8], path: &Path) -> Result<(), TlsError> {
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert =
                cert.map_err(|e| TlsError::BadCertificate(path.to_owned(), e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::BadCertificate(path.to_owned(), e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsError::NoCertificate(path.to_owned()));
        }
        Ok(())
    }

    fn with_roots(roots: RootCertStore) -> Result<Self, TlsError> {
        let root_count = roots.len();
        let roots = Arc::new(roots);
        let build = |alpn: Vec<Vec<u8>>| -> Result<Arc<ClientConfig>, TlsError> {
            let mut cfg = ClientConfig::builder_with_provider(super::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            cfg.alpn_protocols = alpn;
            Ok(Arc::new(cfg))
        };
        Ok(Self {
            h2: build(vec![b"h2".to_vec(), b"http/1.1".to_vec()])?,
            http1: build(vec![b"http/1.1".to_vec()])?,
            root_count,
        })
    }

    pub fn config(&self, alpn: Alpn) -> Arc<ClientConfig> {
        match alpn {
            Alpn::H2 => self.h2.clone(),
            Alpn::Http1 => self.http1.clone(),
        }
    }
}
