//! `token_request` source against a Kubernetes API double (HTTPS with a test CA).

use std::sync::{Arc, Mutex};

use robin_agent::identity::{
    IdentityContext, IdentityError, PodRef, SourceConfig, build_source_with,
};
use robin_e2e::token_endpoint::*;
use serde_json::json;

#[derive(serde::Deserialize)]
struct Rule {
    source: SourceConfig,
}

#[derive(Clone)]
struct Call {
    path: String,
    auth: String,
    body: serde_json::Value,
}

struct Api {
    ctx: IdentityContext,
    dir: robin_e2e::TempDir,
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
    agent_token: String,
}

/// Mounted SA files (namespace `apps`, token for `system:serviceaccount:apps:robin`, CA) and an
/// API double that issues `issued-<n>` JWTs, or answers `status` when not 201.
async fn api(name: &str, status: u16) -> Api {
    let dir = scratch(name);
    let ca = test_ca();
    let agent_token = jwt(3600, json!({"sub": "system:serviceaccount:apps:robin"}));
    std::fs::write(dir.path().join("namespace"), "apps\n").unwrap();
    std::fs::write(dir.path().join("token"), &agent_token).unwrap();
    std::fs::write(dir.path().join("ca.crt"), &ca.ca_pem).unwrap();
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let c = calls.clone();
    let (addr, _) = serve(
        handler(move |req: Req| {
            let c = c.clone();
            async move {
                let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
                let n = {
                    let mut c = c.lock().unwrap();
                    c.push(Call {
                        path: req.path.clone(),
                        auth: req.headers["authorization"].to_str().unwrap().to_owned(),
                        body: body.clone(),
                    });
                    c.len()
                };
                if status != 201 {
                    return Resp::json(
                        status,
                        json!({"kind": "Status", "reason": "Forbidden", "message": "no\r\naccess"}),
                    );
                }
                let mut resp = body;
                resp["status"] = json!({
                    "token": jwt(600, json!({"n": n})),
                    "expirationTimestamp": "2030-01-01T00:00:00Z"
                });
                Resp::json(201, resp)
            }
        }),
        Some(ca.server.clone()),
    )
    .await;
    Api {
        ctx: context(dir.path().to_owned()),
        dir,
        url: format!("https://localhost:{}", addr.port()),
        calls,
        agent_token,
    }
}

fn source(toml_src: &str) -> SourceConfig {
    toml::from_str::<Rule>(toml_src).unwrap().source
}

#[tokio::test]
async fn standalone_defaults_from_mounted_service_account() {
    let a = api("tr-standalone", 201).await;
    let cfg = source(&format!(
        r#"source = {{ kind = "token_request", audience = "vault", expiration_seconds = 600, api_server = "{}" }}"#,
        a.url
    ));
    let src = build_source_with(&cfg, &a.ctx).unwrap();
    let t = src.token().await.unwrap();
    assert_eq!(src.token().await.unwrap(), t);
    let calls = a.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(
        call.path,
        "/api/v1/namespaces/apps/serviceaccounts/robin/token"
    );
    assert_eq!(call.auth, format!("Bearer {}", a.agent_token));
    assert_eq!(call.body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(call.body["kind"], "TokenRequest");
    assert_eq!(call.body["spec"]["audiences"], json!(["vault"]));
    assert_eq!(call.body["spec"]["expirationSeconds"], 600);
    assert!(call.body["spec"].get("boundObjectRef").is_none());
}

#[tokio::test]
async fn pod_known_binds_token_and_credential_is_reread() {
    let mut a = api("tr-pod", 201).await;
    a.ctx.pod = Some(PodRef {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: "0b6f-11ee".into(),
        service_account: Some("web".into()),
    });
    let cfg = |aud: &str| {
        source(&format!(
            r#"source = {{ kind = "token_request", audience = "{aud}", api_server = "{}" }}"#,
            a.url
        ))
    };
    let one = build_source_with(&cfg("a"), &a.ctx).unwrap();
    let two = build_source_with(&cfg("b"), &a.ctx).unwrap();
    let t1 = one.token().await.unwrap();
    let rotated = jwt(
        3600,
        json!({"sub": "system:serviceaccount:apps:robin", "rotated": true}),
    );
    std::fs::write(a.dir.path().join("token"), &rotated).unwrap();
    let t2 = two.token().await.unwrap();
    assert_ne!(t1, t2);
    let calls = a.calls.lock().unwrap().clone();
    assert_eq!(
        calls[0].path,
        "/api/v1/namespaces/shop/serviceaccounts/web/token"
    );
    assert_eq!(
        calls[0].body["spec"]["boundObjectRef"],
        json!({"kind": "Pod", "apiVersion": "v1", "name": "web-0", "uid": "0b6f-11ee"})
    );
    assert_eq!(calls[0].body["spec"]["expirationSeconds"], 3600);
    assert_eq!(calls[0].auth, format!("Bearer {}", a.agent_token));
    assert_eq!(calls[1].auth, format!("Bearer {rotated}"));
    assert_eq!(calls[1].body["spec"]["audiences"], json!(["b"]));
}

#[tokio::test]
async fn api_error_is_reported_sanitized() {
    let a = api("tr-forbidden", 403).await;
    let cfg = source(&format!(
        r#"source = {{ kind = "token_request", audience = "vault", api_server = "{}", namespace = "apps", service_account = "robin" }}"#,
        a.url
    ));
    let err = build_source_with(&cfg, &a.ctx)
        .unwrap()
        .token()
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::Protocol { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("403") && msg.contains("Forbidden") && !msg.contains('\n'),
        "{msg}"
    );
    assert!(!msg.contains(&a.agent_token));
}

#[tokio::test]
async fn config_rejects_unknown_fields_and_bad_names() {
    let bad: Result<Rule, _> =
        toml::from_str(r#"source = { kind = "token_request", audience = "a", audiences = ["b"] }"#);
    assert!(bad.is_err());
    let a = api("tr-names", 201).await;
    let cfg = source(&format!(
        r#"source = {{ kind = "token_request", audience = "a", api_server = "{}", namespace = "../../x" }}"#,
        a.url
    ));
    assert!(matches!(
        build_source_with(&cfg, &a.ctx),
        Err(IdentityError::Config(_))
    ));
}

/// A token bound to a pod must be for the pod's own namespace and ServiceAccount (the API server
/// refuses anything else): a rule naming another account fails when the pod's proxy is built.
#[tokio::test]
async fn pod_known_explicit_account_must_be_the_pods() {
    let mut a = api("tr-pod-explicit", 201).await;
    a.ctx.pod = Some(PodRef {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: "0b6f-11ee".into(),
        service_account: Some("web".into()),
    });
    let with = |extra: &str| {
        source(&format!(
            r#"source = {{ kind = "token_request", audience = "a", api_server = "{}" {extra} }}"#,
            a.url
        ))
    };
    for other in [
        r#", service_account = "admin""#,
        r#", namespace = "kube-system""#,
    ] {
        let err = build_source_with(&with(other), &a.ctx).unwrap_err();
        assert!(
            matches!(&err, IdentityError::Config(m) if m.contains("must be the pod's (shop/web)")),
            "{err}"
        );
    }
    // Naming the pod's own account is allowed.
    let same = build_source_with(
        &with(r#", namespace = "shop", service_account = "web""#),
        &a.ctx,
    )
    .unwrap();
    same.token().await.unwrap();
    assert_eq!(
        a.calls.lock().unwrap()[0].path,
        "/api/v1/namespaces/shop/serviceaccounts/web/token"
    );
}
