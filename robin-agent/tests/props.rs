//! Property-based fuzzing of the parsers hostile input reaches first: the SNI/Host sniffer, the
//! config parser (rules, prefixes) and the token validator.
//!
//! Bounded in the normal suite (`PROPTEST_CASES`, default 256 per property: seconds);
//! `cargo xtask fuzz --seconds N` runs this file repeatedly with fresh seeds and more cases.
use std::net::IpAddr;

use proptest::prelude::*;
use robin_agent::{
    config::{self, Cidr, ConfigArgs},
    identity::{Token, check_audience},
    proxy::sniff::{Parse, Sniffed, sniff, sniff_final},
};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn is_dns_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

/// A ClientHello carrying `name` as SNI (when given), cut into records of `record` bytes.
fn client_hello(name: Option<&[u8]>, record: usize) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
    let mut exts = vec![0x00, 0x0b, 0, 2, 1, 0];
    if let Some(name) = name {
        exts.extend([0, 0]);
        exts.extend(((name.len() + 5) as u16).to_be_bytes());
        exts.extend(((name.len() + 3) as u16).to_be_bytes());
        exts.push(0);
        exts.extend((name.len() as u16).to_be_bytes());
        exts.extend(name);
    }
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut hs = vec![1];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut out = Vec::new();
    for chunk in hs.chunks(record) {
        out.extend([0x16, 3, 1]);
        out.extend((chunk.len() as u16).to_be_bytes());
        out.extend(chunk);
    }
    out
}

fn label() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            (b'a'..=b'z').prop_map(char::from),
            (b'A'..=b'Z').prop_map(char::from),
            (b'0'..=b'9').prop_map(char::from),
        ],
        1..20,
    )
    .prop_map(|c| c.into_iter().collect())
}

fn dns_name() -> impl Strategy<Value = String> {
    proptest::collection::vec(label(), 1..5).prop_map(|l| l.join("."))
}

fn tchar_method() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            (b'A'..=b'Z').prop_map(char::from),
            (b'a'..=b'z').prop_map(char::from),
            Just('-'),
            Just('_'),
        ],
        1..17,
    )
    .prop_map(|c| c.into_iter().collect())
}

/// Visible ASCII without spaces: a request target as hostile clients write them.
fn target() -> impl Strategy<Value = String> {
    proptest::collection::vec((0x21u8..0x7f).prop_map(char::from), 1..200)
        .prop_map(|c| c.into_iter().collect())
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn sniffer_never_panics_and_only_names_dns_names(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        for s in [sniff_final(&bytes), match sniff(&bytes) { Parse::Done(s) => s, Parse::NeedMore => Sniffed::Unknown }] {
            match s {
                Sniffed::Tls { sni: Some(n) } | Sniffed::Http { host: Some(n) } => {
                    prop_assert!(is_dns_name(&n), "{n:?}");
                }
                _ => {}
            }
        }
    }

    #[test]
    fn sniffer_never_panics_on_tls_shaped_bytes(tail in proptest::collection::vec(any::<u8>(), 0..600), record in 1usize..80) {
        let mut bytes = client_hello(Some(b"a.example"), record);
        let cut = tail.len() % bytes.len().max(1);
        bytes.truncate(cut);
        bytes.extend(&tail);
        let _ = sniff(&bytes);
        let _ = sniff_final(&bytes);
    }

    #[test]
    fn sni_is_found_in_any_record_split(name in dns_name(), record in 1usize..300) {
        prop_assume!(name.len() <= 253);
        let hello = client_hello(Some(name.as_bytes()), record);
        prop_assert_eq!(
            sniff(&hello),
            Parse::Done(Sniffed::Tls { sni: Some(name.to_ascii_lowercase()) })
        );
        // Every strict prefix waits for more; nothing is decided on part of a hello.
        let cut = record.min(hello.len() - 1);
        prop_assert_eq!(sniff(&hello[..cut]), Parse::NeedMore);
    }

    #[test]
    fn hostile_sni_bytes_never_become_a_name(name in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Parse::Done(Sniffed::Tls { sni: Some(n) }) = sniff(&client_hello(Some(&name), 4096)) {
            prop_assert!(is_dns_name(&n), "{n:?}");
            let lower = name.to_ascii_lowercase();
            let expected = lower.strip_suffix(b".").unwrap_or(&lower);
            prop_assert_eq!(n.as_bytes(), expected);
        }
    }

    /// Anything shaped like a request line is HTTP (and so parsed by hyper), whatever follows.
    #[test]
    fn request_lines_are_http(method in tchar_method(), target in target(), minor in 0u8..2, rest in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut bytes = format!("{method} {target} HTTP/1.{minor}\r\n").into_bytes();
        bytes.extend(&rest);
        let http = matches!(sniff(&bytes), Parse::Done(Sniffed::Http { .. }));
        prop_assert!(http, "not http");
        // Cut anywhere after the method and space: still HTTP once no more bytes come.
        let cut = method.len() + 1 + rest.len() % (bytes.len() - method.len());
        let http = matches!(sniff_final(&bytes[..cut]), Sniffed::Http { .. });
        prop_assert!(http, "{:?}", String::from_utf8_lossy(&bytes[..cut]));
    }

    #[test]
    fn tokens_that_parse_cannot_split_a_header(raw in ".{0,64}", bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        for raw in [raw, String::from_utf8_lossy(&bytes).into_owned()] {
            if let Ok(t) = Token::parse(&raw) {
                let v = t.expose();
                prop_assert!(!v.is_empty());
                prop_assert!(v.bytes().all(|b| b.is_ascii_graphic()));
                let value = format!("Bearer {v}");
                prop_assert!(http::HeaderValue::from_str(&value).is_ok(), "header split");
                let _ = check_audience(&t, "aud");
            }
        }
    }

    #[test]
    fn audience_check_never_panics_and_matches_what_was_minted(aud in "[a-z:/.]{1,20}", other in "[a-z]{1,20}", many in any::<bool>()) {
        use base64::Engine as _;
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let claim = if many { serde_json::json!([other, aud]) } else { serde_json::json!(aud) };
        let payload = serde_json::json!({ "aud": claim }).to_string();
        let t = Token::parse(&format!("{}.{}.sig", b64(b"{}"), b64(payload.as_bytes()))).unwrap();
        prop_assert!(check_audience(&t, &aud).is_ok());
        let wrong = format!("{aud}x");
        prop_assert!(check_audience(&t, &wrong).is_err() || (many && other == wrong));
    }

    #[test]
    fn cidrs_parse_round_trip_and_contain_their_network(raw in ".{0,40}", v4 in any::<u32>(), v6 in any::<u128>(), len4 in 0u8..=32, len6 in 0u8..=128) {
        let _ = Cidr::parse(&raw);
        for (ip, len) in [(IpAddr::from(v4.to_be_bytes()), len4), (IpAddr::from(v6.to_be_bytes()), len6)] {
            // Host bits set is an error that names the network to write instead.
            let net = match Cidr::parse(&format!("{ip}/{len}")) {
                Ok(c) => c,
                Err(e) => {
                    let suggested = e.split("did you mean ").nth(1).unwrap().trim_end_matches("?)");
                    Cidr::parse(suggested).unwrap()
                }
            };
            prop_assert!(net.contains(ip), "{net} should contain {ip}");
            prop_assert_eq!(Cidr::parse(&net.to_string()).unwrap(), net);
        }
    }

    #[test]
    fn config_text_never_panics(text in ".{0,300}") {
        let _ = config::from_toml(&text, "fuzz.toml".as_ref(), &ConfigArgs::default());
    }
}

/// A scratch directory holding a CA, removed on drop.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        robin_e2e::pki::Ca::new("Props CA").write(dir.path(), "ca");
        Self(dir)
    }

    fn tls_section(&self) -> String {
        format!(
            "[tls]\nca_cert = {:?}\nca_key = {:?}\n",
            self.0.path().join("ca.crt"),
            self.0.path().join("ca.key")
        )
    }
}

#[test]
fn config_rules_never_panic_and_errors_are_one_line() {
    let scratch = Scratch::new();
    let tls = scratch.tls_section();
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let list = |v: &[String]| v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
    let rule = (
        proptest::collection::vec(".{0,30}", 0..3),
        ".{0,20}",
        ".{0,30}",
        proptest::collection::vec(".{0,20}", 0..3),
        any::<u16>(),
        ".{0,10}",
    );
    let mut runner = proptest::test_runner::TestRunner::new(cfg());
    runner
        .run(&rule, |(hosts, header, format, cidrs, port, aud)| {
            let toml = format!(
                "{tls}\n[[inject]]\nhosts = [{}]\nsource = {{ kind = \"file\", path = \"/t\" }}\nheader = {}\nformat = {}\nupstream_tls_port = {port}\nexpect_audience = {}\nplaintext = {{ allow_cidrs = [{}] }}\n",
                list(&hosts),
                q(&header),
                q(&format),
                q(&aud),
                list(&cidrs),
            );
            match config::from_toml(&toml, "fuzz.toml".as_ref(), &ConfigArgs::default()) {
                Ok(c) => {
                    let r = &c.inject[0];
                    prop_assert!(r.upstream_tls_port != 0);
                    prop_assert!(!r.hosts.is_empty());
                    prop_assert!(r.plaintext.as_ref().is_some_and(|p| !p.is_empty()));
                }
                Err(e) => prop_assert!(!e.to_string().contains('\n'), "{e}"),
            }
            Ok(())
        })
        .unwrap();
}
