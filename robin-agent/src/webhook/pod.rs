//! The parts of a Pod the webhook reads, as small hand-written structs (unknown fields are
//! ignored). The patch is built against the pod as received, by index, so nothing here is ever
//! serialized back.
use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Debug, Default, Deserialize)]
pub struct ObjectMeta {
    pub annotations: Option<BTreeMap<String, String>>,
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    pub init_containers: Option<Vec<Container>>,
    pub volumes: Option<Vec<Named>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub env: Option<Vec<Named>>,
    pub volume_mounts: Option<Vec<VolumeMount>>,
}

/// A volume or an environment variable: only the name matters here.
#[derive(Debug, Default, Deserialize)]
pub struct Named {
    pub name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
}

impl Pod {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(String::as_str)
    }

    pub fn has_volume(&self, name: &str) -> bool {
        self.spec.volumes.iter().flatten().any(|v| v.name == name)
    }
}

impl Container {
    pub fn has_env(&self, name: &str) -> bool {
        self.env.iter().flatten().any(|e| e.name == name)
    }

    pub fn mount_at(&self, path: &str) -> Option<&VolumeMount> {
        self.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path.trim_end_matches('/') == path.trim_end_matches('/'))
    }
}
