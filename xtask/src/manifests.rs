//! `cargo xtask manifests`: renders every kustomization under `deploy/` with `kubectl kustomize`
//! and every documented values combination of the Helm chart (see [`crate::helm`]), and
//! validates each rendered object against the Kubernetes OpenAPI schemas, offline and
//! strict (unknown fields are errors). The schemas come bundled with `kubernetes-validate` from
//! PyPI, installed by `cargo xtask setup` into a venv under the target dir.
//!
//! Kinds with no bundled schema (the cert-manager, trust-manager and prometheus-operator CRDs) cannot be checked:
//! they are listed as skipped. A schema-less kind outside those CRD groups fails, since it is
//! most likely a typo in `kind` or `apiVersion`.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{target_dir, workspace_root};

/// The PyPI `kubernetes-validate` release installed by `cargo xtask setup`.
pub const VALIDATOR_VERSION: &str = "1.37.0";
/// The Kubernetes release the manifests must be valid for: older than the newest bundled
/// schemas, so a field only recent clusters know is caught.
pub const KUBERNETES_VERSION: &str = "1.33.0";
/// API groups of the CRDs the overlays use; their objects are skipped, not failed.
const CRD_GROUPS: &[&str] = &[
    "cert-manager.io",
    "trust.cert-manager.io",
    "monitoring.coreos.com",
];

pub fn venv() -> PathBuf {
    target_dir().join("tools/venv")
}

pub fn validator() -> PathBuf {
    venv().join("bin/kubernetes-validate")
}

/// Whether the pinned validator is in the venv (a file check, no Python start-up).
pub fn validator_installed() -> bool {
    let dist_info = format!("kubernetes_validate-{VALIDATOR_VERSION}.dist-info");
    validator().exists()
        && std::fs::read_dir(venv().join("lib"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("site-packages").join(&dist_info).exists())
}

pub fn run() -> anyhow::Result<()> {
    if !validator_installed() {
        bail!(
            "kubernetes-validate {VALIDATOR_VERSION} is not installed in {}: run `cargo xtask setup`",
            venv().display()
        );
    }
    let root = workspace_root();
    let mut dirs = Vec::new();
    find_kustomizations(&root.join("deploy"), &mut dirs)?;
    dirs.sort();
    let mut base = None;
    for dir in &dirs {
        let shown = dir.strip_prefix(&root).unwrap_or(dir).display().to_string();
        let rendered = render(dir)?;
        check_rendered(&shown, &rendered)?;
        if shown == "deploy/k8s/base" {
            base = Some(rendered);
        }
    }
    crate::helm::check(&base.context("deploy/k8s/base has no kustomization")?)
}

/// Validates every object of a render; `shown` names it in the report.
pub fn check_rendered(shown: &str, rendered: &str) -> anyhow::Result<()> {
    let objects = rendered.lines().filter(|l| l.starts_with("kind: ")).count();
    let out = validate(rendered).with_context(|| format!("validating {shown}"))?;
    let checked = check(&out, objects)
        .with_context(|| format!("{shown} is not valid for Kubernetes {KUBERNETES_VERSION}"))?;
    println!(
        "manifests: {shown}: {} of {objects} objects valid for Kubernetes {KUBERNETES_VERSION}",
        checked.passed
    );
    for s in &checked.skipped {
        println!("manifests: {shown}: skipped (no schema for this CRD): {s}");
    }
    for w in &checked.warnings {
        println!("manifests: {shown}: warning: {w}");
    }
    Ok(())
}

fn render(dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

struct Output {
    success: bool,
    text: String,
}

/// Runs the validator on `yaml` (stdin); its report goes to stdout, one line per object.
fn validate(yaml: &str) -> anyhow::Result<Output> {
    let mut child = Command::new(validator())
        .args(["--strict", "-k", KUBERNETES_VERSION, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", validator().display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(Output {
        success: out.status.success(),
        text,
    })
}

#[derive(Debug, Default, PartialEq)]
struct Checked {
    passed: usize,
    /// `Kind (apiVersion)` of objects of known CRD groups.
    skipped: Vec<String>,
    warnings: Vec<String>,
}

/// Reads the validator's report of `objects` rendered objects: every object must have passed
/// or be a skipped CRD; anything else is an error carrying the validator's message.
fn check(out: &Output, objects: usize) -> anyhow::Result<Checked> {
    let mut checked = Checked::default();
    let mut errors = Vec::new();
    for line in out.text.lines() {
        if line.starts_with("INFO ") && line.contains(" passed for resource ") {
            checked.passed += 1;
        } else if let Some((kind, api_version)) = no_schema(line) {
            let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
            if CRD_GROUPS.contains(&group) {
                checked.skipped.push(format!("{kind} ({api_version})"));
            } else {
                errors.push(format!(
                    "no schema for kind {kind} in {api_version}: a typo in kind or apiVersion? (a new CRD group goes into CRD_GROUPS)"
                ));
            }
        } else if let Some(w) = line.strip_prefix("WARN ") {
            checked.warnings.push(w.to_owned());
        } else if !line.trim().is_empty() && !line.starts_with("INFO ") {
            errors.push(line.to_owned());
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    if !out.success {
        bail!("kubernetes-validate failed:\n{}", out.text);
    }
    let seen = checked.passed + checked.skipped.len();
    if seen != objects {
        bail!(
            "kubernetes-validate reported {seen} objects, kubectl rendered {objects}:\n{}",
            out.text
        );
    }
    Ok(checked)
}

/// `WARN <file> Couldn't find schema for kind K with api version G/V for kubernetes version X`.
fn no_schema(line: &str) -> Option<(&str, &str)> {
    let rest = line
        .strip_prefix("WARN ")?
        .split_once("Couldn't find schema for kind ")?
        .1;
    let (kind, rest) = rest.split_once(" with api version ")?;
    let api_version = rest.split_whitespace().next()?;
    Some((kind, api_version))
}

fn find_kustomizations(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            find_kustomizations(&path, out)?;
        } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            out.push(dir.to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(success: bool, text: &str) -> Output {
        Output {
            success,
            text: text.to_owned(),
        }
    }

    const PASSED: &str = "INFO - passed for resource daemonset/robin-node against version 1.33\n";
    const CERT: &str = "WARN - Couldn't find schema for kind Certificate with api version cert-manager.io/v1 for kubernetes version 1.33\n";

    #[test]
    fn passes_and_lists_skipped_crds() {
        let c = check(&out(true, &format!("{PASSED}{CERT}")), 2).unwrap();
        assert_eq!(c.passed, 1);
        assert_eq!(c.skipped, vec!["Certificate (cert-manager.io/v1)"]);
    }

    #[test]
    fn errors_and_unknown_kinds_fail_with_the_message() {
        let bad = "ERROR - did not validate for resource daemonset/robin-node against version 1.33: spec.template.spec: Additional properties are not allowed ('hostNetworking' was unexpected)\n";
        let e = check(&out(false, bad), 1).unwrap_err().to_string();
        assert!(e.contains("'hostNetworking' was unexpected"), "{e}");
        let typo = "WARN - Couldn't find schema for kind Deploymnet with api version apps/v1 for kubernetes version 1.33\n";
        let e = check(&out(true, typo), 1).unwrap_err().to_string();
        assert!(
            e.contains("no schema for kind Deploymnet in apps/v1"),
            "{e}"
        );
        // An object the validator never reported is not a pass.
        assert!(check(&out(true, PASSED), 2).is_err());
        assert!(check(&out(false, PASSED), 1).is_err());
    }
}
