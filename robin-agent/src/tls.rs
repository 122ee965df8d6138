//! TLS for the intercepting proxy: the pre-provisioned CA ([`CertAuthority`]), per-SNI leaf
//! minting with a bounded cache ([`mint`]), and the verifying upstream client ([`upstream`]).
//! Everything uses the `ring` provider.
use std::{fmt, path::Path, path::PathBuf, sync::Arc};

use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, IsCa, KeyPair};
use rustls::{crypto::CryptoProvider, pki_types::CertificateDer};

mod der;
mod keys;
pub mod mint;
pub mod upstream;

pub use mint::{LeafCache, LeafStats, MintingResolver};
pub use upstream::UpstreamTls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}: no PEM certificate found")]
    NoCertificate(PathBuf),
    #[error("{0}: not a PEM certificate: {1}")]
    BadCertificate(PathBuf, String),
    #[error("{0}: not a usable PEM private key (PKCS#8, SEC1 or PKCS#1): {1}")]
    BadKey(PathBuf, String),
    #[error("{key}: private key does not match the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{0}: CA subject cannot be reproduced in minted leaves: {1}")]
    UnsupportedSubject(PathBuf, String),
    #[error("minting leaf for {0}: {1}")]
    Mint(String, String),
    #[error("building TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// The `ring` provider, the only one Robin uses, with the AES-128-GCM/SHA-256 suites first.
///
/// The defaults put `TLS13_AES_256_GCM_SHA384` first; its SHA-384 runs on ring's portable
/// SHA-512 code on CPUs without SHA-512 instructions (4.6 % of a per-connection profile), while
/// SHA-256 has a hardware path and AES-128 is cheaper per byte. Both suites are equally
/// acceptable, so the cheaper one is offered (upstream) and chosen (for workloads) first.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::CipherSuite as S;
    let mut p = rustls::crypto::ring::default_provider();
    // Stable: the remaining suites keep their default order.
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

/// The CA that signs minted leaves. Its `Debug` shows only the certificate path and never the
/// key.
pub struct CertAuthority {
    cert_path: PathBuf,
    /// The CA certificate exactly as provisioned; sent after each leaf.
    cert_der: CertificateDer<'static>,
    /// An rcgen issuer carrying the CA's subject (its DER is never used).
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert", &self.cert_path)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertAuthority {
    /// Reads a PEM certificate and a PEM PKCS#8 key and checks that they belong together.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let cert_pem = std::fs::read_to_string(cert_path)
            .map_err(|e| TlsError::Read(cert_path.to_owned(), e))?;
        let key_pem = std::fs::read_to_string(key_path)
            .map_err(|e| TlsError::Read(key_path.to_owned(), e))?;
        Self::from_pem(&cert_pem, &key_pem, cert_path, key_path)
    }

    /// As [`load`](Self::load), from PEM text; the paths only label errors.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, TlsError> {
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| TlsError::NoCertificate(cert_path.to_owned()))?
            .map_err(|e| TlsError::BadCertificate(cert_path.to_owned(), e.to_string()))?;
        let key = keys::key_pair_from_pem(key_pem)
            .map_err(|e| TlsError::BadKey(key_path.to_owned(), e))?;
        let parts = der::cert_parts(&cert_der).ok_or_else(|| {
            TlsError::BadCertificate(cert_path.to_owned(), "malformed DER".into())
        })?;
        if parts.spki != key.public_key_der().as_slice() {
            return Err(TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let unsupported =
            |why: &str| TlsError::UnsupportedSubject(cert_path.to_owned(), why.into());
        let dn = distinguished_name(parts.subject.content).map_err(unsupported)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = params
            .self_signed(&key)
            .map_err(|e| unsupported(&e.to_string()))?;
        let ca = Self {
            cert_path: cert_path.to_owned(),
            cert_der: cert_der.clone(),
            issuer,
            key,
        };
        // Chain building compares names byte for byte: prove our re-encoding of the subject is
        // exact before serving a single leaf.
        let probe = ca
            .mint("probe.robin.invalid")
            .map_err(|e| unsupported(&e.to_string()))?;
        let probe_issuer = der::cert_parts(probe.cert[0].as_ref())
            .map(|p| p.issuer.raw.to_vec())
            .unwrap_or_default();
        if probe_issuer != parts.subject.raw {
            return Err(unsupported(
                "re-encoded subject differs (repeated attribute or unusual string type)",
            ));
        }
        Ok(ca)
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Mints a leaf for `name` (see [`mint::mint_leaf`]).
    pub fn mint(&self, name: &str) -> Result<rustls::sign::CertifiedKey, TlsError> {
        mint::mint_leaf(self, name)
    }
}

/// Rebuilds an rcgen name from a DER `Name`'s content, keeping attribute order and string types.
fn distinguished_name(mut rdns: &[u8]) -> Result<DistinguishedName, &'static str> {
    let mut dn = DistinguishedName::new();
    while !rdns.is_empty() {
        let (set, rest) = der::read(rdns).ok_or("malformed name")?;
        rdns = rest;
        if set.tag != der::SET {
            return Err("malformed name");
        }
        let (atv, extra) = der::read(set.content).ok_or("malformed name")?;
        if !extra.is_empty() {
            return Err("multi-valued RDN");
        }
        let (oid, value) = der::read(atv.content).ok_or("malformed name")?;
        let (value, _) = der::read(value).ok_or("malformed name")?;
        if oid.tag != der::OID {
            return Err("malformed name");
        }
        let arcs = der::oid_arcs(oid.content).ok_or("malformed attribute type")?;
        let text = std::str::from_utf8(value.content).map_err(|_| "non-UTF-8 attribute")?;
        let value = match value.tag {
            0x0c => DnValue::Utf8String(text.to_owned()),
            0x13 => DnValue::PrintableString(text.try_into().map_err(|_| "bad PrintableString")?),
            0x16 => DnValue::Ia5String(text.try_into().map_err(|_| "bad IA5String")?),
            _ => return Err("unsupported attribute string type"),
        };
        dn.push(DnType::from_oid(&arcs), value);
    }
    Ok(dn)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh CA as (cert PEM, key PEM).
    pub fn test_ca(cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Robin Test");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn aes128_gcm_sha256_suites_come_first_and_none_is_lost() {
        use rustls::CipherSuite as S;
        let ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            ours[..3],
            [
                S::TLS13_AES_128_GCM_SHA256,
                S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            ]
        );
        let mut defaults: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut sorted = ours.clone();
        defaults.sort_by_key(|s| u16::from(*s));
        sorted.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, defaults);
    }

    #[test]
    fn loads_matching_ca_and_mints_chained_leaf() {
        let (cert, key) = test_ca("Robin Test CA");
        let ca = CertAuthority::from_pem(&cert, &key, "c".as_ref(), "k".as_ref()).unwrap();
        let leaf = ca.mint("broker.example.com").unwrap();
        assert_eq!(leaf.cert.len(), 2);
        assert_eq!(&leaf.cert[1], ca.cert_der());
        let dbg = format!("{ca:?}");
        assert!(dbg.contains("<redacted>") && !dbg.contains("PRIVATE"));
    }

    #[test]
    fn rejects_key_of_another_ca() {
        let (cert, _) = test_ca("A");
        let (_, other_key) = test_ca("B");
        let err =
            CertAuthority::from_pem(&cert, &other_key, "c".as_ref(), "k".as_ref()).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn rejects_garbage_pem() {
        let (cert, key) = test_ca("A");
        assert!(matches!(
            CertAuthority::from_pem("nope", &key, "c".as_ref(), "k".as_ref()),
            Err(TlsError::NoCertificate(_))
        ));
        assert!(matches!(
            CertAuthority::from_pem(&cert, "nope", "c".as_ref(), "k".as_ref()),
            Err(TlsError::BadKey(..))
        ));
    }

    #[test]
    fn unreproducible_subject_is_refused_not_misissued() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "x");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let mut cert_der = params.self_signed(&key).unwrap().der().to_vec();
        // Swap the subject CN's string type to BMPString (0x1e), which we do not re-encode
        // (the subject comes after the issuer).
        let cn = cert_der
            .windows(5)
            .rposition(|w| w == [0x55, 0x04, 0x03, 0x0c, 0x01])
            .unwrap();
        cert_der[cn + 3] = 0x1e;
        let pem = pem_encode(&cert_der);
        let err = CertAuthority::from_pem(&pem, &key.serialize_pem(), "c".as_ref(), "k".as_ref())
            .unwrap_err();
        assert!(matches!(err, TlsError::UnsupportedSubject(..)), "{err}");
    }

    fn pem_encode(der: &[u8]) -> String {
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        let mut line = 0;
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
            line += 4;
            if line == 64 {
                out.push('\n');
                line = 0;
            }
        }
        out.push_str("\n-----END CERTIFICATE-----\n");
        out
    }
}
