//! Just enough DER to read an X.509 certificate's subject and public key, so the CA can be
//! loaded without a full X.509 parser in the dependency tree.

/// One tag-length-value element: `raw` is the whole element, `content` its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    pub tag: u8,
    pub content: &'a [u8],
    pub raw: &'a [u8],
}

pub const SEQUENCE: u8 = 0x30;
pub const SET: u8 = 0x31;
pub const OID: u8 = 0x06;
const CONTEXT_0: u8 = 0xa0;

/// Reads one element from the front of `input`, returning it and the rest. Only single-byte tags
/// and definite lengths up to 4 length bytes: all that certificates use.
pub fn read(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    let raw = &input[..header + len];
    Some((
        Tlv {
            tag,
            content: &rest[..len],
            raw,
        },
        &rest[len..],
    ))
}

fn expect(input: &[u8], tag: u8) -> Option<(Tlv<'_>, &[u8])> {
    read(input).filter(|(t, _)| t.tag == tag)
}

/// The parts of a certificate the CA needs.
#[derive(Debug)]
pub struct CertParts<'a> {
    /// The whole `subject` Name element.
    pub subject: Tlv<'a>,
    /// The whole `issuer` Name element.
    pub issuer: Tlv<'a>,
    /// The whole SubjectPublicKeyInfo element.
    pub spki: &'a [u8],
}

pub fn cert_parts(cert: &[u8]) -> Option<CertParts<'_>> {
    let (cert, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(cert.content, SEQUENCE)?;
    let mut rest = tbs.content;
    // Optional explicit version.
    if rest.first() == Some(&CONTEXT_0) {
        rest = read(rest)?.1;
    }
    let (_serial, rest) = read(rest)?;
    let (_sig_alg, rest) = expect(rest, SEQUENCE)?;
    let (issuer, rest) = expect(rest, SEQUENCE)?;
    let (_validity, rest) = expect(rest, SEQUENCE)?;
    let (subject, rest) = expect(rest, SEQUENCE)?;
    let (spki, _) = expect(rest, SEQUENCE)?;
    Some(CertParts {
        subject,
        issuer,
        spki: spki.raw,
    })
}

/// Decodes an OBJECT IDENTIFIER's content into arcs.
pub fn oid_arcs(content: &[u8]) -> Option<Vec<u64>> {
    let mut arcs = Vec::new();
    let mut value: u64 = 0;
    let mut in_progress = false;
    for &b in content {
        if value > (u64::MAX >> 7) {
            return None;
        }
        value = (value << 7) | u64::from(b & 0x7f);
        in_progress = b & 0x80 != 0;
        if !in_progress {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    if in_progress || arcs.is_empty() {
        return None;
    }
    Some(arcs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_short_and_long_lengths() {
        let (t, rest) = read(&[0x04, 0x02, 0xaa, 0xbb, 0xff]).unwrap();
        assert_eq!(
            (t.tag, t.content, rest),
            (0x04, &[0xaa, 0xbb][..], &[0xff][..])
        );
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend(std::iter::repeat_n(0u8, 0x80));
        assert_eq!(read(&long).unwrap().0.content.len(), 0x80);
    }

    #[test]
    fn rejects_truncated_and_oversized() {
        assert!(read(&[]).is_none());
        assert!(read(&[0x30]).is_none());
        assert!(read(&[0x30, 0x05, 0x00]).is_none());
        assert!(read(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert!(read(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(cert_parts(&[0x30, 0x00]).is_none());
    }

    #[test]
    fn decodes_oids() {
        // 2.5.4.3 (commonName)
        assert_eq!(oid_arcs(&[0x55, 0x04, 0x03]), Some(vec![2, 5, 4, 3]));
        // 1.2.840.113549
        assert_eq!(
            oid_arcs(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            Some(vec![1, 2, 840, 113549])
        );
        assert_eq!(oid_arcs(&[0x86]), None);
        assert_eq!(oid_arcs(&[]), None);
    }
}
