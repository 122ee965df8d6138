//! CA private keys in the encodings platforms actually hand out. cert-manager and
//! `openssl ecparam -genkey` write SEC1 (`EC PRIVATE KEY`), older tooling PKCS#1
//! (`RSA PRIVATE KEY`); rcgen's ring backend reads only PKCS#8. Both older forms are wrapped into
//! PKCS#8 (RFC 5208 `PrivateKeyInfo`) unchanged, so no key material is reinterpreted.
use rcgen::KeyPair;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::der;

/// DER of OID 1.2.840.10045.2.1 (id-ecPublicKey).
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// DER of OID 1.2.840.113549.1.1.1 (rsaEncryption) followed by NULL parameters.
const OID_RSA_WITH_NULL: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
const INTEGER_ZERO: &[u8] = &[0x02, 0x01, 0x00];
const OCTET_STRING: u8 = 0x04;
const CONTEXT_0: u8 = 0xa0;

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
        _ => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
    }
    out.extend_from_slice(content);
    out
}

fn pkcs8(algorithm: &[u8], private_key: &[u8]) -> Vec<u8> {
    let body = [
        INTEGER_ZERO,
        &tlv(der::SEQUENCE, algorithm),
        &tlv(OCTET_STRING, private_key),
    ]
    .concat();
    tlv(der::SEQUENCE, &body)
}

/// The named-curve OID (as a whole TLV) inside a SEC1 `ECPrivateKey`'s `[0]` parameters.
fn sec1_curve(sec1: &[u8]) -> Option<&[u8]> {
    let (outer, _) = der::read(sec1)?;
    if outer.tag != der::SEQUENCE {
        return None;
    }
    let mut rest = outer.content;
    while !rest.is_empty() {
        let (element, next) = der::read(rest)?;
        if element.tag == CONTEXT_0 {
            let (oid, _) = der::read(element.content)?;
            return (oid.tag == der::OID).then_some(oid.raw);
        }
        rest = next;
    }
    None
}

/// Reads the first private key of a PEM file in PKCS#8, SEC1 or PKCS#1 form.
pub fn key_pair_from_pem(pem: &str) -> Result<KeyPair, String> {
    let key = rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| format!("reading PEM: {e}"))?
        .ok_or("no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block")?;
    let pkcs8_der = match &key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Sec1(k) => {
            let curve =
                sec1_curve(k.secret_sec1_der()).ok_or("EC key without named-curve parameters")?;
            pkcs8(&[OID_EC_PUBLIC_KEY, curve].concat(), k.secret_sec1_der())
        }
        PrivateKeyDer::Pkcs1(k) => pkcs8(OID_RSA_WITH_NULL, k.secret_pkcs1_der()),
        _ => return Err("unsupported private key encoding".into()),
    };
    KeyPair::try_from(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8_der)))
        .map_err(|e| format!("unusable key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl ecparam -name prime256v1 -genkey -noout` output (a throwaway test key).
    const SEC1_P256: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIGyMISCtKl5fGFiLttCxaChny4FoHY5o93tmf2azRUOcoAoGCCqGSM49
AwEHoUQDQgAEEn6zfC5zJeLVgy7zvXezhvGozLkx07mPriV4Axv3CaAOB/bOJhJV
P6NOeDXDx4iCNkR1Rx8UlSmr3wCycW9FQw==
-----END EC PRIVATE KEY-----
";

    #[test]
    fn pkcs8_round_trips() {
        let generated = KeyPair::generate().unwrap();
        let loaded = key_pair_from_pem(&generated.serialize_pem()).unwrap();
        assert_eq!(loaded.public_key_der(), generated.public_key_der());
    }

    #[test]
    fn sec1_ec_key_is_wrapped_into_pkcs8() {
        let key = key_pair_from_pem(SEC1_P256).unwrap();
        assert!(key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(key_pair_from_pem("not a key").is_err());
        let truncated = SEC1_P256.replace("P6NOeDXDx4iCNkR1Rx8UlSmr3wCycW9FQw==\n", "");
        assert!(key_pair_from_pem(&truncated).is_err());
    }
}
