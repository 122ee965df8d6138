//! `admission.k8s.io/v1` AdmissionReview in, AdmissionReview with a JSON Patch out.
//!
//! A review that cannot be answered (not JSON, not an AdmissionReview v1, no request uid) is an
//! error: the server answers it with HTTP 400 and the API server applies the webhook's
//! `failurePolicy`. Everything else gets a review response: an object that is not a Pod, or a pod
//! that cannot be injected as asked, is refused (`allowed: false`) with the reason; a pod that did
//! not opt in, or any operation but CREATE, is allowed unchanged.
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    inject::{self, Settings},
    pod::Pod,
};

const API_VERSION: &str = "admission.k8s.io/v1";

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    Json(#[from] serde_json::Error),
    #[error("expected {API_VERSION} AdmissionReview, got {0} {1}")]
    Version(String, String),
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: String,
    kind: String,
    request: Option<Request>,
}

#[derive(Deserialize)]
struct Request {
    uid: String,
    kind: Gvk,
    operation: String,
    object: Option<Value>,
    #[serde(default)]
    namespace: String,
}

#[derive(Deserialize)]
struct Gvk {
    #[serde(default)]
    group: String,
    version: String,
    kind: String,
}

/// What the webhook decided for one request.
#[derive(Debug, PartialEq)]
enum Decision {
    /// Admitted; the patch is empty when there was nothing to add.
    Allow(Vec<Value>),
    Deny(String),
}

/// Answers one review body with the response review.
pub fn respond(body: &[u8], settings: &Settings) -> Result<Value, ReviewError> {
    let review: Review = serde_json::from_slice(body)?;
    if review.api_version != API_VERSION || review.kind != "AdmissionReview" {
        return Err(ReviewError::Version(review.api_version, review.kind));
    }
    let request = review.request.ok_or(ReviewError::NoRequest)?;
    let decision = decide(&request, settings);
    match &decision {
        Decision::Allow(ops) => {
            tracing::info!(namespace = %request.namespace, added = ops.len(), "pod admitted")
        }
        Decision::Deny(why) => {
            tracing::warn!(namespace = %request.namespace, reason = %why, "pod refused")
        }
    }
    Ok(response(&request.uid, decision))
}

fn decide(request: &Request, settings: &Settings) -> Decision {
    let k = &request.kind;
    if (k.group.as_str(), k.version.as_str(), k.kind.as_str()) != ("", "v1", "Pod") {
        let gv = if k.group.is_empty() {
            k.version.clone()
        } else {
            format!("{}/{}", k.group, k.version)
        };
        return Decision::Deny(format!(
            "robin webhook handles v1 Pods only, got {gv} {}: fix the webhook's rules",
            k.kind
        ));
    }
    if request.operation != "CREATE" {
        return Decision::Allow(Vec::new());
    }
    let Some(object) = &request.object else {
        return Decision::Deny("the review of a pod CREATE carries no object".into());
    };
    let pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(p) => p,
        Err(e) => return Decision::Deny(format!("request.object is not a Pod: {e}")),
    };
    if !inject::opted_in(&pod) {
        return Decision::Allow(Vec::new());
    }
    match inject::patch(&pod, settings) {
        Ok(ops) => Decision::Allow(ops),
        Err(e) => Decision::Deny(format!("robin: {e}")),
    }
}

fn response(uid: &str, decision: Decision) -> Value {
    let response = match decision {
        Decision::Allow(ops) if ops.is_empty() => json!({"uid": uid, "allowed": true}),
        Decision::Allow(ops) => {
            let patch = serde_json::to_vec(&ops).expect("JSON values serialize");
            json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            })
        }
        Decision::Deny(message) => json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": 400, "message": message},
        }),
    };
    json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response})
}
