//! `token_request` source against the kit's fake Kubernetes API server over HTTPS (kit CA).

use robin_agent::identity::{
    IdentityContext, IdentityError, PodRef, SourceConfig, build_source_with,
};
use robin_e2e::{fake_api::FakeApi, token_endpoint::*};
use serde_json::json;

#[derive(serde::Deserialize)]
struct Rule {
    source: SourceConfig,
}

struct Api {
    ctx: IdentityContext,
    dir: robin_e2e::TempDir,
    url: String,
    fake: FakeApi,
    agent_token: String,
}

/// Mounted SA files (namespace `apps`, token for `system:serviceaccount:apps:robin`, the CA)
/// and the kit's fake API server over TLS, refusing TokenRequests with 403 when `status` is
/// not 201, as an RBAC denial does.
async fn api(name: &str, status: u16) -> Api {
    let dir = scratch(name);
    let ca = robin_e2e::pki::Ca::new("API CA");
    let agent_token = jwt(3600, json!({"sub": "system:serviceaccount:apps:robin"}));
    std::fs::write(dir.path().join("namespace"), "apps\n").unwrap();
    std::fs::write(dir.path().join("token"), &agent_token).unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
    let fake = FakeApi::start_tls(ca.leaf(&["127.0.0.1"]).server_config(&[]));
    if status != 201 {
        fake.refuse_token_requests(status, "Forbidden", "no\r\naccess");
    }
    Api {
        ctx: context(dir.path().to_owned()),
        url: fake.url(),
        dir,
        fake,
        agent_token,
    }
}

impl Api {
    /// The sources act for pod `shop/web-0` (ServiceAccount `web`), which the API knows.
    fn act_for_pod_web_0(&mut self) {
        self.fake.upsert(json!({
            "metadata": {"namespace": "shop", "name": "web-0", "uid": "0b6f-11ee"},
            "spec": {"serviceAccountName": "web"},
        }));
        self.ctx.pod = Some(PodRef {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "0b6f-11ee".into(),
            service_account: Some("web".into()),
        });
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
    let calls = a.fake.token_requests();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(
        (call.namespace.as_str(), call.service_account.as_str()),
        ("apps", "robin")
    );
    assert_eq!(
        call.authorization,
        Some(format!("Bearer {}", a.agent_token))
    );
    assert_eq!(call.request["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(call.request["kind"], "TokenRequest");
    assert_eq!(call.request["spec"]["audiences"], json!(["vault"]));
    assert_eq!(call.request["spec"]["expirationSeconds"], 600);
    assert!(call.request["spec"].get("boundObjectRef").is_none());
}

#[tokio::test]
async fn pod_known_binds_token_and_credential_is_reread() {
    let mut a = api("tr-pod", 201).await;
    a.act_for_pod_web_0();
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
    let calls = a.fake.token_requests();
    assert_eq!(
        (
            calls[0].namespace.as_str(),
            calls[0].service_account.as_str()
        ),
        ("shop", "web")
    );
    assert_eq!(
        calls[0].request["spec"]["boundObjectRef"],
        json!({"kind": "Pod", "apiVersion": "v1", "name": "web-0", "uid": "0b6f-11ee"})
    );
    assert_eq!(calls[0].request["spec"]["expirationSeconds"], 3600);
    assert_eq!(
        calls[0].authorization,
        Some(format!("Bearer {}", a.agent_token))
    );
    // The agent's credential is read per call: the rotated one is used at once.
    assert_eq!(calls[1].authorization, Some(format!("Bearer {rotated}")));
    assert_eq!(calls[1].request["spec"]["audiences"], json!(["b"]));
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
    a.act_for_pod_web_0();
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
    let call = &a.fake.token_requests()[0];
    assert_eq!(
        (call.namespace.as_str(), call.service_account.as_str()),
        ("shop", "web")
    );
}
