//! What the webhook adds to an opted-in pod, as RFC 6902 JSON Patch operations against the pod
//! as received. Every addition is skipped when already present, so a re-invoked webhook
//! (`reinvocationPolicy: IfNeeded`) adds nothing twice.
use std::path::{Component, Path};

use serde_json::{Value, json};

use super::pod::{Container, ContainerExt as _, Pod, PodExt as _};
use crate::node::annotations::{self, DEFAULT_TOKEN_PATH};

pub const ANN_AUDIENCE: &str = "robin.dev/audience";
pub const ANN_DISTRO: &str = "robin.dev/distro";
pub const ANN_JAVA: &str = "robin.dev/java";
pub const ANN_TRUST: &str = "robin.dev/trust";
/// Also a label: labels, unlike annotations, can be selected on by the webhook configuration.
pub const OPT_IN: &str = annotations::ANN_INJECT;

pub const TOKEN_VOLUME: &str = "robin-token";
pub const TRUST_VOLUME: &str = "robin-trust-bundle";
pub const AWAIT_CONTAINER: &str = "robin-await";
/// The ConfigMap keys trust-manager writes (`target.configMap.key`, `additionalFormats.jks`).
pub const BUNDLE_PEM_KEY: &str = "ca-certificates.crt";
pub const BUNDLE_JKS_KEY: &str = "bundle.jks";
const JKS_PATH: &str = "/etc/robin/trust/bundle.jks";
/// trust-manager's default JKS password: the store holds public certificates only.
const JKS_PASSWORD: &str = "changeit";
const TOKEN_EXPIRATION_SECS: u64 = 3600;
/// `robin await`'s own default: the agent normally captures a pod within a second or two.
const AWAIT_TIMEOUT_SECS: u64 = 120;
const TRUST_ENV: &[&str] = &["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InjectError {
    #[error(
        "no token audience: annotate the pod with {ANN_AUDIENCE} (or start the webhook with --default-audience)"
    )]
    NoAudience,
    #[error("{ANN_DISTRO}: {0:?} is not one of debian, alpine, rhel, distroless")]
    UnknownDistro(String),
    #[error(
        "{ann}: {0:?} must be an absolute file path without `..`",
        ann = annotations::ANN_TOKEN_PATH
    )]
    BadTokenPath(String),
    #[error(
        "{ann}: {0:?} is not a comma-separated list of ports (1-65535)",
        ann = annotations::ANN_CAPTURE_PORTS
    )]
    BadPorts(String),
    #[error(
        "container {container:?} already mounts volume {volume:?} at {path}, where robin node reads the pod's token: remove that mount or choose another directory with the {ann} annotation",
        ann = annotations::ANN_TOKEN_PATH
    )]
    TokenPathTaken {
        container: String,
        volume: String,
        path: String,
    },
}

/// The distro family of a pod's images: where its system trust store lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Distro {
    Debian,
    Alpine,
    Rhel,
    Distroless,
}

impl Distro {
    pub fn parse(s: &str) -> Result<Self, InjectError> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| InjectError::UnknownDistro(s.to_owned()))
    }

    /// The PEM bundle OpenSSL, Go, rustls-native-certs and friends read by default.
    pub fn store_path(self) -> &'static str {
        match self {
            Self::Debian | Self::Alpine | Self::Distroless => "/etc/ssl/certs/ca-certificates.crt",
            Self::Rhel => "/etc/pki/tls/certs/ca-bundle.crt",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Image of the `robin await` init container (the webhook's own).
    pub await_image: String,
    pub default_audience: Option<String>,
    pub default_distro: Distro,
    /// The trust-manager Bundle's ConfigMap (same name in every namespace).
    pub trust_bundle: String,
}

/// Whether the pod asked for Robin (annotation or label `robin.dev/inject: "true"`).
pub fn opted_in(pod: &Pod) -> bool {
    pod.annotation(OPT_IN) == Some("true") || pod.label(OPT_IN) == Some("true")
}

/// What a pod asked for, read from its annotations (with the settings' defaults).
struct Wanted {
    audience: String,
    token_dir: String,
    token_file: String,
    token_path_annotated: bool,
    await_port: u16,
    /// The trust store path, when the trust bundle is wanted.
    store: Option<&'static str>,
    java: bool,
}

fn wanted(pod: &Pod, s: &Settings) -> Result<Wanted, InjectError> {
    let audience = pod
        .annotation(ANN_AUDIENCE)
        .map(str::to_owned)
        .or_else(|| s.default_audience.clone())
        .filter(|a| !a.is_empty())
        .ok_or(InjectError::NoAudience)?;
    let distro = pod
        .annotation(ANN_DISTRO)
        .map_or(Ok(s.default_distro), Distro::parse)?;
    let token_path = pod.annotation(annotations::ANN_TOKEN_PATH);
    let (token_dir, token_file) = split_token_path(token_path.unwrap_or(DEFAULT_TOKEN_PATH))?;
    Ok(Wanted {
        audience,
        token_dir,
        token_file,
        token_path_annotated: token_path.is_some(),
        await_port: await_port(pod.annotation(annotations::ANN_CAPTURE_PORTS))?,
        store: (pod.annotation(ANN_TRUST) != Some("false")).then(|| distro.store_path()),
        java: pod.annotation(ANN_JAVA) == Some("true"),
    })
}

fn split_token_path(p: &str) -> Result<(String, String), InjectError> {
    let bad = || InjectError::BadTokenPath(p.to_owned());
    let path = Path::new(p);
    let sane = path.is_absolute()
        && path
            .components()
            .all(|c| !matches!(c, Component::ParentDir));
    let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
        return Err(bad());
    };
    if !sane || dir == Path::new("/") {
        return Err(bad());
    }
    Ok((
        dir.display().to_string(),
        file.to_string_lossy().into_owned(),
    ))
}

/// The first capture port: `robin await` probes one port the pod's capture covers.
fn await_port(ann: Option<&str>) -> Result<u16, InjectError> {
    let Some(list) = ann else {
        return Ok(443);
    };
    let first = list.split(',').next().unwrap_or_default().trim();
    match first.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(InjectError::BadPorts(list.to_owned())),
    }
}

/// The JSON Patch for an opted-in pod; empty when everything is already there.
pub fn patch(pod: &Pod, s: &Settings) -> Result<Vec<Value>, InjectError> {
    let w = wanted(pod, s)?;
    let mut ops = annotations(pod, &w);
    volumes(pod, &w, s, &mut ops);
    let inits = pod.spec().init_containers.as_deref().unwrap_or_default();
    for (i, c) in pod.spec().containers.iter().enumerate() {
        container(c, &format!("/spec/containers/{i}"), &w, &mut ops)?;
    }
    for (i, c) in inits.iter().enumerate() {
        if c.name != AWAIT_CONTAINER {
            container(c, &format!("/spec/initContainers/{i}"), &w, &mut ops)?;
        }
    }
    // Last: inserting at index 0 shifts the indices the operations above use.
    if !inits.iter().any(|c| c.name == AWAIT_CONTAINER) {
        let await_c = await_container(s, w.await_port);
        ops.push(match pod.spec().init_containers {
            None => json!({"op": "add", "path": "/spec/initContainers", "value": [await_c]}),
            Some(_) => json!({"op": "add", "path": "/spec/initContainers/0", "value": await_c}),
        });
    }
    Ok(ops)
}

/// The annotations robin node reads: the opt-in (a pod may have opted in by label only) and
/// the token path, written out so the pod says where its token is.
fn annotations(pod: &Pod, w: &Wanted) -> Vec<Value> {
    let mut add = Vec::new();
    if pod.annotation(OPT_IN) != Some("true") {
        add.push((OPT_IN, "true".to_owned()));
    }
    if !w.token_path_annotated {
        add.push((annotations::ANN_TOKEN_PATH, DEFAULT_TOKEN_PATH.to_owned()));
    }
    if pod.metadata.annotations.is_none() && !add.is_empty() {
        let map: serde_json::Map<_, _> =
            add.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        return vec![json!({"op": "add", "path": "/metadata/annotations", "value": map})];
    }
    add.into_iter()
        .map(|(k, v)| json!({"op": "add", "path": format!("/metadata/annotations/{}", escape(k)), "value": v}))
        .collect()
}

fn volumes(pod: &Pod, w: &Wanted, s: &Settings, ops: &mut Vec<Value>) {
    let mut add = Vec::new();
    if !pod.has_volume(TOKEN_VOLUME) {
        // Short-lived, audience-bound, rotated by the kubelet.
        add.push(json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": w.audience, "expirationSeconds": TOKEN_EXPIRATION_SECS, "path": w.token_file,
        }}]}}));
    }
    if (w.store.is_some() || w.java) && !pod.has_volume(TRUST_VOLUME) {
        add.push(json!({"name": TRUST_VOLUME, "configMap": {"name": s.trust_bundle}}));
    }
    append(ops, "/spec/volumes", pod.spec().volumes.is_none(), add);
}

fn container(c: &Container, at: &str, w: &Wanted, ops: &mut Vec<Value>) -> Result<(), InjectError> {
    let mut mounts = Vec::new();
    match c.mount_at(&w.token_dir) {
        Some(m) if m.name == TOKEN_VOLUME => {}
        Some(m) => {
            return Err(InjectError::TokenPathTaken {
                container: c.name.clone(),
                volume: m.name.clone(),
                path: w.token_dir.clone(),
            });
        }
        None => {
            mounts.push(json!({"name": TOKEN_VOLUME, "mountPath": w.token_dir, "readOnly": true}))
        }
    }
    let mut env = Vec::new();
    // A container that mounts its own store keeps it, and its variables.
    if let Some(store) = w.store.filter(|p| c.mount_at(p).is_none()) {
        mounts.push(trust_mount(store, BUNDLE_PEM_KEY));
        for name in TRUST_ENV.iter().filter(|n| !c.has_env(n)) {
            env.push(json!({"name": name, "value": store}));
        }
    }
    if w.java && c.mount_at(JKS_PATH).is_none() {
        mounts.push(trust_mount(JKS_PATH, BUNDLE_JKS_KEY));
        if !c.has_env("JAVA_TOOL_OPTIONS") {
            let opts = format!(
                "-Djavax.net.ssl.trustStore={JKS_PATH} -Djavax.net.ssl.trustStorePassword={JKS_PASSWORD} -Djavax.net.ssl.trustStoreType=JKS"
            );
            env.push(json!({"name": "JAVA_TOOL_OPTIONS", "value": opts}));
        }
    }
    append(
        ops,
        &format!("{at}/volumeMounts"),
        c.volume_mounts.is_none(),
        mounts,
    );
    append(ops, &format!("{at}/env"), c.env.is_none(), env);
    Ok(())
}

/// One key of the bundle ConfigMap as a file (subPath: the rest of the directory stays).
fn trust_mount(path: &str, key: &str) -> Value {
    json!({"name": TRUST_VOLUME, "mountPath": path, "subPath": key, "readOnly": true})
}

/// Adds `items` to the array at `path`: the whole array when it is absent, else one by one.
fn append(ops: &mut Vec<Value>, path: &str, absent: bool, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    if absent {
        ops.push(json!({"op": "add", "path": path, "value": items}));
        return;
    }
    for item in items {
        ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": item}));
    }
}

fn await_container(s: &Settings, port: u16) -> Value {
    json!({
        "name": AWAIT_CONTAINER,
        "image": s.await_image,
        "args": ["await", "--port", port.to_string(), "--timeout-secs", AWAIT_TIMEOUT_SECS.to_string()],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
    })
}

/// RFC 6901: `~` and `/` in a key (annotation names have a `/`).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}
