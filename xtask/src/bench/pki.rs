//! The benchmark's certificates, made with the openssl CLI: Robin's CA, the upstream's CA and
//! leaf, the peers' front leaf (from Robin's CA, a fair stand-in for the leaf Robin mints), and
//! the RSA CA squid and mitmproxy mint from.
use std::{fs, path::Path, process::Command};

use anyhow::bail;

use super::{H1_HOST, MINT_SUFFIX, RULED, UNRULED};

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn ec_key(dir: &Path, name: &str) -> anyhow::Result<()> {
    let out = format!("{name}.key");
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &out,
        ],
    )
}

const CA_EXT: [&str; 4] = [
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
];

fn ec_ca(dir: &Path, name: &str, cn: &str) -> anyhow::Result<()> {
    ec_key(dir, name)?;
    let (key, crt, subj) = (
        format!("{name}.key"),
        format!("{name}.crt"),
        format!("/CN={cn}"),
    );
    let mut args = vec![
        "req", "-x509", "-new", "-key", &key, "-sha256", "-days", "1", "-subj", &subj,
    ];
    args.extend(CA_EXT);
    args.extend(["-out", &crt]);
    openssl(dir, &args)
}

fn leaf(dir: &Path, name: &str, ca: &str) -> anyhow::Result<()> {
    ec_key(dir, name)?;
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            "/CN=bench",
            "-out",
            &csr,
        ],
    )?;
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-sha256",
            "-extfile",
            "leaf.ext",
            "-out",
            &crt,
        ],
    )
}

/// Writes every certificate and key into `dir`.
pub fn make(dir: &Path) -> anyhow::Result<()> {
    ec_ca(dir, "robin-ca", "Bench Robin CA")?;
    ec_ca(dir, "upstream-ca", "Bench Upstream CA")?;
    fs::write(
        dir.join("leaf.ext"),
        format!(
            "subjectAltName=DNS:{RULED},DNS:{H1_HOST},DNS:{UNRULED},DNS:*.{MINT_SUFFIX},IP:127.0.0.1\n\
             extendedKeyUsage=serverAuth\n"
        ),
    )?;
    leaf(dir, "upstream", "upstream-ca")?;
    leaf(dir, "peer", "robin-ca")?;
    concat(dir, "peer.pem", &["peer.crt", "peer.key"])?;
    // The CA squid and mitmproxy mint their leaves from (RSA: both accept it as is).
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "mitm-ca.key",
        "-sha256",
        "-days",
        "1",
        "-subj",
        "/CN=Bench MITM CA",
    ];
    args.extend(CA_EXT);
    args.extend(["-out", "mitm-ca.crt"]);
    openssl(dir, &args)?;
    concat(dir, "mitm-ca.pem", &["mitm-ca.key", "mitm-ca.crt"])
}

fn concat(dir: &Path, out: &str, parts: &[&str]) -> anyhow::Result<()> {
    let mut pem = String::new();
    for part in parts {
        pem.push_str(&fs::read_to_string(dir.join(part))?);
    }
    Ok(fs::write(dir.join(out), pem)?)
}
