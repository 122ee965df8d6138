//! What a pod asks for through its annotations.
use std::path::PathBuf;

use super::{NodeError, config};
use crate::kube::Pod;

pub const ANN_INJECT: &str = "robin.dev/inject";
pub const ANN_RULES: &str = "robin.dev/rules";
pub const ANN_TOKEN_PATH: &str = "robin.dev/token-path";
pub const ANN_CAPTURE_PORTS: &str = "robin.dev/capture-ports";
/// Where a pod's token is read when `robin.dev/token-path` names none (and where `robin
/// webhook` mounts it): part of the annotation contract between the webhook and the agent.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/robin-token";

/// What a pod asks for through its annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub rule_set: String,
    pub token_path: PathBuf,
    pub ports: Option<Vec<u16>>,
}

/// `None`: the pod is not opted in (or has finished). `Err`: opted in with bad annotations.
pub fn wanted(pod: &Pod) -> Result<Option<Wanted>, NodeError> {
    let ann = &pod.metadata.annotations;
    if ann.get(ANN_INJECT).map(String::as_str) != Some("true") {
        return Ok(None);
    }
    // A finished pod has no process left to serve.
    if matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let rule_set = ann
        .get(ANN_RULES)
        .cloned()
        .unwrap_or_else(|| config::DEFAULT_RULE_SET.to_owned());
    let token_path = match ann.get(ANN_TOKEN_PATH) {
        None => PathBuf::from(config::DEFAULT_TOKEN_PATH),
        Some(p) => {
            let path = PathBuf::from(p);
            let sane = path.is_absolute()
                && path
                    .components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir));
            if !sane {
                return Err(NodeError::BadTokenPath(p.clone()));
            }
            path
        }
    };
    let ports = match ann.get(ANN_CAPTURE_PORTS) {
        None => None,
        Some(raw) => {
            let ports: Option<Vec<u16>> = raw
                .split(',')
                .map(|p| p.trim().parse::<u16>().ok().filter(|&p| p != 0))
                .collect();
            match ports {
                Some(p) if !p.is_empty() => Some(p),
                _ => return Err(NodeError::BadPorts(raw.clone())),
            }
        }
    };
    Ok(Some(Wanted {
        rule_set,
        token_path,
        ports,
    }))
}

/// A container of the pod started, restarted or was replaced (by the pod watch): the process to
/// read the pod's files through may have changed.
pub fn containers_changed(old: &Pod, new: &Pod) -> bool {
    old.status.container_statuses != new.status.container_statuses
        || old.status.init_container_statuses != new.status.init_container_statuses
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn pod(ann: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.uid = "u".into();
        p.metadata.annotations = ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p
    }

    #[test]
    fn annotations_decide_capture() {
        assert!(wanted(&pod(&[])).unwrap().is_none());
        assert!(wanted(&pod(&[(ANN_INJECT, "false")])).unwrap().is_none());
        let w = wanted(&pod(&[(ANN_INJECT, "true")])).unwrap().unwrap();
        assert_eq!(w.rule_set, "default");
        assert_eq!(w.token_path, Path::new(config::DEFAULT_TOKEN_PATH));
        assert_eq!(w.ports, None);
        let w = wanted(&pod(&[
            (ANN_INJECT, "true"),
            (ANN_RULES, "broker"),
            (ANN_TOKEN_PATH, "/t/tok"),
            (ANN_CAPTURE_PORTS, "443, 8443"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.rule_set, "broker");
        assert_eq!(w.token_path, Path::new("/t/tok"));
        assert_eq!(w.ports, Some(vec![443, 8443]));
        for bad in [
            (ANN_CAPTURE_PORTS, "0"),
            (ANN_CAPTURE_PORTS, "x"),
            (ANN_CAPTURE_PORTS, ""),
            (ANN_TOKEN_PATH, "relative"),
            (ANN_TOKEN_PATH, "/a/../etc/shadow"),
        ] {
            assert!(
                wanted(&pod(&[(ANN_INJECT, "true"), bad])).is_err(),
                "{bad:?}"
            );
        }
        let mut done = pod(&[(ANN_INJECT, "true")]);
        assert!(!containers_changed(&done, &done.clone()));
        done.status.phase = Some("Succeeded".into());
        assert!(wanted(&done).unwrap().is_none());
    }

    #[test]
    fn container_starts_and_restarts_are_noticed() {
        let at = |statuses: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"uid": "u"},
                "status": statuses,
            }))
            .unwrap()
        };
        let pause_only = at(serde_json::json!({"phase": "Pending"}));
        let init = at(serde_json::json!({"initContainerStatuses": [
            {"name": "robin-await", "containerID": "containerd://1", "restartCount": 0, "started": true}
        ]}));
        let app = at(serde_json::json!({"containerStatuses": [
            {"name": "app", "containerID": "containerd://2", "restartCount": 0, "started": true}
        ]}));
        let restarted = at(serde_json::json!({"containerStatuses": [
            {"name": "app", "containerID": "containerd://3", "restartCount": 1, "started": false}
        ]}));
        assert!(containers_changed(&pause_only, &init));
        assert!(containers_changed(&pause_only, &app));
        assert!(containers_changed(&app, &restarted));
        assert!(!containers_changed(&app, &app.clone()));
        // Other status fields do not count.
        let mut ready = app.clone();
        ready.status.phase = Some("Running".into());
        assert!(!containers_changed(&app, &ready));
    }
}
