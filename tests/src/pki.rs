//! The one test PKI (rcgen, ECDSA P-256): certificate authorities and server leaves for the
//! in-process tests, the namespaced e2e tests and the upstream doubles alike.
use std::{net::IpAddr, path::Path, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A self-signed certificate authority.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Ca {
    /// A CA named `cn` (critical `CA:TRUE`, `keyCertSign` + `cRLSign`).
    pub fn new(cn: &str) -> Self {
        let key = KeyPair::generate().expect("generating a CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signing a CA");
        Self { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA key as PKCS#8 PEM (what Robin's `tls.ca_key` reads).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A server leaf for `names`: each an IP address SAN if it parses as one, else a DNS SAN.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("generating a leaf key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "upstream");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("a DNS name")),
            })
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signing a leaf");
        Leaf { cert, key }
    }

    /// Writes `{name}.crt` and `{name}.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) {
        write_pair(dir, name, &self.pem(), &self.key_pem());
    }
}

/// A server certificate and its key.
pub struct Leaf {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Leaf {
    /// The chain a server presents (the leaf alone; clients trust the CA).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.der().clone()]
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// A ring-backed rustls server config offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(self.chain(), self.key_der())
        .expect("server certificate");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Writes `{name}.crt` and `{name}.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) {
        write_pair(dir, name, &self.cert.pem(), &self.key.serialize_pem());
    }
}

fn write_pair(dir: &Path, name: &str, crt: &str, key: &str) {
    std::fs::write(dir.join(format!("{name}.crt")), crt).expect("writing a certificate");
    std::fs::write(dir.join(format!("{name}.key")), key).expect("writing a key");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn a_leaf_verifies_against_its_ca_only() {
        let ca = Ca::new("Test CA");
        let other = Ca::new("Other CA");
        let leaf = ca.leaf(&["a.test", "127.0.0.1"]);
        let verify = |ca: &Ca| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.cert.der().clone()).unwrap();
            let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap();
            ["a.test", "127.0.0.1"].map(|name| {
                v.verify_server_cert(
                    &leaf.chain()[0],
                    &[],
                    &name.try_into().unwrap(),
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .is_ok()
            })
        };
        assert_eq!(verify(&ca), [true, true]);
        assert_eq!(verify(&other), [false, false]);
    }
}
