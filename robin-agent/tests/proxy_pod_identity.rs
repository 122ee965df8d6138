//! A proxy built for a pod (`robin node`) acts for that pod: its `token_request` source asks
//! the Kubernetes API (the test kit's fake API server) for the pod's ServiceAccount token bound to the
//! pod, and an `exchange` over such a source never hands one pod's exchanged token to another.
//! All pods share one token cache.
#[path = "proxy_support/harness.rs"]
mod harness;

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use harness::{Env, HOST, front, get, h1, header, tls_connect, upstream_tls, within};
use robin_agent::{
    config::{self, ConfigArgs},
    identity::{CachePolicy, IdentityContext, PodRef, SourceConfig, build_source_with},
    proxy::{Dialer, Limits, Proxy},
};
use robin_e2e::fake_api::FakeApi;
use robin_e2e::token_endpoint::{Req, Resp, handler, jwt, serve};
use serde_json::{Value, json};

const H1: &[&[u8]] = &[b"http/1.1"];

fn pod(namespace: &str, name: &str, uid: &str, sa: &str) -> PodRef {
    PodRef {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
        service_account: Some(sa.into()),
    }
}

/// The claims of a compact JWT (unverified).
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a compact JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// The kit's fake API server knowing `pods` (it binds a token only to a pod it knows, with
/// that pod's uid and ServiceAccount, as the API server does).
fn kube_api(pods: &[&PodRef]) -> FakeApi {
    let api = FakeApi::start();
    for p in pods {
        api.upsert(json!({
            "metadata": {"namespace": p.namespace, "name": p.name, "uid": p.uid},
            "spec": {"serviceAccountName": p.service_account},
        }));
    }
    api
}

/// The pod a minted token is bound to, from its claims.
fn bound_pod(claims: &Value) -> &Value {
    &claims["kubernetes.io"]["pod"]
}

/// `source = { kind = "token_request", ... }` against `api`, with the agent's credential in
/// `env.dir`.
fn token_request(env: &Env, api: &str, audience: &str) -> String {
    let agent = env.dir.join("agent-token");
    std::fs::write(
        &agent,
        jwt(
            3600,
            json!({"sub": "system:serviceaccount:robin-system:robin-node"}),
        ),
    )
    .unwrap();
    format!(
        r#"{{ kind = "token_request", audience = "{audience}", api_server = "{api}", allow_insecure_http = true, ca_file = {:?}, token_file = {agent:?} }}"#,
        env.dir.join("up.crt"),
    )
}

fn proxy_config(env: &Env, source: &str) -> config::Config {
    let toml = format!(
        "[tls]\nca_cert = {:?}\nca_key = {:?}\nupstream_roots = {:?}\n\n[[inject]]\nhosts = [\"{HOST}\"]\nsource = {source}\n",
        env.dir.join("ca.crt"),
        env.dir.join("ca.key"),
        env.dir.join("up.crt"),
    );
    config::from_toml(&toml, Path::new("pod.toml"), &ConfigArgs::default()).unwrap()
}

/// One request through `proxy` to an upstream that reports the Authorization it received.
async fn authorization_seen(env: &Env, proxy: Proxy, upstream: std::net::SocketAddr) -> String {
    let addr = front(proxy, upstream).await;
    let tls = within(tls_connect(addr, &env.robin_ca.pem(), HOST, H1))
        .await
        .unwrap();
    let mut send = within(h1(tls)).await;
    let resp = within(send.send_request(get("/who", HOST))).await.unwrap();
    assert_eq!(resp.status(), 200);
    header(&resp, "x-seen-auth")
}

#[tokio::test]
async fn proxy_for_a_pod_requests_that_pods_token_bound_to_it() {
    let env = Env::new("pod-identity");
    let up = upstream_tls(&env.upstream_ca).await;
    let a = pod("shop", "web-0", "uid-a", "web");
    let b = pod("billing", "pay-0", "uid-b", "default");
    let api = kube_api(&[&a, &b]);
    let cfg = proxy_config(&env, &token_request(&env, &api.url(), "broker"));
    // One process-wide context, one cache; each pod's proxy gets a context bound to it.
    let agent = IdentityContext::new(CachePolicy::default());
    let build = |p: &PodRef| {
        Proxy::with_dialer_and_identity(
            &cfg,
            Limits::default(),
            Dialer::Host,
            &agent.for_pod(p.clone()),
        )
        .unwrap()
    };
    let (proxy_a, proxy_b) = (build(&a), build(&b));

    let seen_a = authorization_seen(&env, proxy_a.clone(), up.addr).await;
    let seen_b = authorization_seen(&env, proxy_b, up.addr).await;
    let tok_a = seen_a.strip_prefix("Bearer ").expect(&seen_a);
    let tok_b = seen_b.strip_prefix("Bearer ").expect(&seen_b);
    assert_ne!(tok_a, tok_b);
    for (tok, p, sa) in [(tok_a, &a, "web"), (tok_b, &b, "default")] {
        let c = claims(tok);
        assert_eq!(bound_pod(&c)["name"], p.name.as_str(), "{c}");
        assert_eq!(bound_pod(&c)["uid"], p.uid.as_str(), "{c}");
        assert_eq!(
            c["sub"],
            format!("system:serviceaccount:{}:{sa}", p.namespace),
            "{c}"
        );
        assert_eq!(c["aud"], json!(["broker"]), "{c}");
    }

    let calls = api.token_requests();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for (call, p, sa) in [(&calls[0], &a, "web"), (&calls[1], &b, "default")] {
        assert_eq!(
            (call.namespace.as_str(), call.service_account.as_str()),
            (p.namespace.as_str(), sa)
        );
        assert_eq!(
            call.request["spec"]["boundObjectRef"],
            json!({"kind": "Pod", "apiVersion": "v1", "name": p.name, "uid": p.uid})
        );
        assert_eq!(call.request["spec"]["audiences"], json!(["broker"]));
    }
    // Two pods, two entries in the one shared cache.
    assert_eq!(agent.cache.len(), 2);

    // Pod A again: served from the shared cache, same token, no new TokenRequest.
    let again = authorization_seen(&env, proxy_a, up.addr).await;
    assert_eq!(again, seen_a);
    assert_eq!(agent.cache.len(), 2);
}

/// The exchange double: answers a JWT recording which pod's subject token it traded.
async fn sts() -> (String, Arc<Mutex<Vec<String>>>) {
    let subjects: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = subjects.clone();
    let (addr, _) = serve(
        handler(move |req: Req| {
            let s = s.clone();
            async move {
                let subject = req.form()["subject_token"].clone();
                let traded = claims(&subject);
                s.lock().unwrap().push(subject);
                Resp::json(
                    200,
                    json!({
                        "access_token": jwt(600, json!({"for_pod": bound_pod(&traded)["name"], "from": traded["jti"]})),
                        "token_type": "Bearer",
                        "expires_in": 600,
                    }),
                )
            }
        }),
        None,
    )
    .await;
    (format!("http://127.0.0.1:{}/token", addr.port()), subjects)
}

#[tokio::test]
async fn exchange_over_a_per_pod_inner_source_keeps_pods_apart() {
    let env = Env::new("pod-exchange");
    // Same namespace and ServiceAccount: only the pod (name, uid) tells them apart.
    let a = pod("shop", "web-0", "uid-a", "web");
    let b = pod("shop", "web-1", "uid-b", "web");
    let api = kube_api(&[&a, &b]);
    let (endpoint, subjects) = sts().await;
    let src = format!(
        r#"source = {{ kind = "exchange", grant = "token_exchange", token_endpoint = "{endpoint}", allow_insecure_http = true, audience = "billing", inner = {} }}"#,
        token_request(&env, &api.url(), "sts")
    );
    #[derive(serde::Deserialize)]
    struct Rule {
        source: SourceConfig,
    }
    let cfg = toml::from_str::<Rule>(&src).unwrap().source;
    let agent = IdentityContext::new(CachePolicy::default());
    let src_a = build_source_with(&cfg, &agent.for_pod(a.clone())).unwrap();
    let src_b = build_source_with(&cfg, &agent.for_pod(b.clone())).unwrap();
    assert_ne!(src_a.cache_key(), src_b.cache_key());

    let tok_a = src_a.token().await.unwrap();
    let tok_b = src_b.token().await.unwrap();
    assert_ne!(tok_a, tok_b);
    assert_eq!(claims(tok_a.expose())["for_pod"], "web-0");
    assert_eq!(claims(tok_b.expose())["for_pod"], "web-1");
    // A again: both layers cached, nothing new fetched.
    assert_eq!(src_a.token().await.unwrap(), tok_a);
    assert_eq!(api.token_requests().len(), 2);
    let subjects = subjects.lock().unwrap().clone();
    assert_eq!(subjects.len(), 2);
    assert_ne!(subjects[0], subjects[1]);
    // Inner and exchanged token per pod: four entries in the one cache.
    assert_eq!(agent.cache.len(), 4);
}
