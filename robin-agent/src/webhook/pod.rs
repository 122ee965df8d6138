//! The webhook reads a Pod as k8s-openapi's type, the schema the API server sends; these are
//! the questions it asks of one. The patch is built against the pod as received, by index, so
//! the typed pod is never serialized back (a field this k8s-openapi version does not know is
//! never dropped from the admitted pod).
use std::sync::OnceLock;

pub use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};

/// What the injector asks of a pod.
pub trait PodExt {
    fn annotation(&self, key: &str) -> Option<&str>;
    fn label(&self, key: &str) -> Option<&str>;
    fn has_volume(&self, name: &str) -> bool;
    /// The spec, or an empty one (an API server never sends a pod without one).
    fn spec(&self) -> &PodSpec;
}

impl PodExt for Pod {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(String::as_str)
    }

    fn has_volume(&self, name: &str) -> bool {
        self.spec().volumes.iter().flatten().any(|v| v.name == name)
    }

    fn spec(&self) -> &PodSpec {
        static EMPTY: OnceLock<PodSpec> = OnceLock::new();
        self.spec
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(PodSpec::default))
    }
}

/// What the injector asks of a container.
pub trait ContainerExt {
    fn has_env(&self, name: &str) -> bool;
    fn mount_at(&self, path: &str) -> Option<&k8s_openapi::api::core::v1::VolumeMount>;
}

impl ContainerExt for Container {
    fn has_env(&self, name: &str) -> bool {
        self.env.iter().flatten().any(|e| e.name == name)
    }

    fn mount_at(&self, path: &str) -> Option<&k8s_openapi::api::core::v1::VolumeMount> {
        self.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path.trim_end_matches('/') == path.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_pod_of_the_api_schema() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"annotations": {"a": "1"}, "labels": {"l": "2"}},
            "spec": {
                "containers": [{"name": "app", "env": [{"name": "E", "value": "v"}],
                    "volumeMounts": [{"name": "v", "mountPath": "/var/run/x/"}]}],
                "volumes": [{"name": "v", "emptyDir": {}}],
                "someFutureField": true
            }
        }))
        .unwrap();
        assert_eq!(pod.annotation("a"), Some("1"));
        assert_eq!(pod.label("l"), Some("2"));
        assert!(pod.has_volume("v") && !pod.has_volume("w"));
        let app = &pod.spec().containers[0];
        assert!(app.has_env("E") && !app.has_env("F"));
        assert_eq!(
            app.mount_at("/var/run/x").map(|m| m.name.as_str()),
            Some("v")
        );
        let bare = Pod::default();
        assert!(bare.spec().containers.is_empty() && bare.annotation("a").is_none());
    }
}
