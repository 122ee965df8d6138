//! A proxy built for a pod (`robin node`) acts for that pod: its `token_request` source asks
//! the Kubernetes API (an in-process double) for the pod's ServiceAccount token bound to the
//! pod, and an `exchange` over such a source never hands one pod's exchanged token to another.
//! All pods share one token cache.
#[path = "proxy_support/harness.rs"]
mod harness;
mod identity_common;

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use harness::{Env, HOST, front, get, h1, header, tls_connect, upstream_tls, within};
use identity_common::{Req, Resp, handler, jwt, serve};
use robin_agent::{
    config::{self, ConfigArgs},
    identity::{CachePolicy, IdentityContext, PodRef, SourceConfig, build_source_with},
    proxy::{Dialer, Limits, Proxy},
};
use serde_json::{Value, json};

const H1: &[&[u8]] = &[b"http/1.1"];

#[derive(Clone, Debug)]
struct Call {
    path: String,
    body: Value,
}

type Calls = Arc<Mutex<Vec<Call>>>;

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

/// A plain-http Kubernetes API double on loopback: records every TokenRequest and mints a
/// JWT naming the ServiceAccount from the path and the pod from `boundObjectRef`.
async fn kube_api() -> (String, Calls) {
    let calls: Calls = Arc::default();
    let c = calls.clone();
    let (addr, _) = serve(
        handler(move |req: Req| {
            let c = c.clone();
            async move {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                let parts: Vec<&str> = req.path.split('/').collect();
                let (ns, sa) = match parts[..] {
                    [
                        "",
                        "api",
                        "v1",
                        "namespaces",
                        ns,
                        "serviceaccounts",
                        sa,
                        "token",
                    ] => (ns.to_owned(), sa.to_owned()),
                    _ => return Resp::json(404, json!({"kind": "Status", "reason": "NotFound"})),
                };
                let n = {
                    let mut c = c.lock().unwrap();
                    c.push(Call {
                        path: req.path.clone(),
                        body: body.clone(),
                    });
                    c.len()
                };
                let bound = &body["spec"]["boundObjectRef"];
                let token = jwt(
                    3600,
                    json!({
                        "sub": format!("system:serviceaccount:{ns}:{sa}"),
                        "aud": body["spec"]["audiences"],
                        "pod": bound["name"],
                        "uid": bound["uid"],
                        "n": n,
                    }),
                );
                let mut resp = body;
                resp["status"] = json!({"token": token});
                Resp::json(201, resp)
            }
        }),
        None,
    )
    .await;
    (format!("http://127.0.0.1:{}", addr.port()), calls)
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
    let (api, calls) = kube_api().await;
    let cfg = proxy_config(&env, &token_request(&env, &api, "broker"));
    // One process-wide context, one cache; each pod's proxy gets a context bound to it.
    let agent = IdentityContext::new(CachePolicy::default());
    let a = pod("shop", "web-0", "uid-a", "web");
    let b = pod("billing", "pay-0", "uid-b", "default");
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
        assert_eq!(c["pod"], p.name.as_str(), "{c}");
        assert_eq!(c["uid"], p.uid.as_str(), "{c}");
        assert_eq!(
            c["sub"],
            format!("system:serviceaccount:{}:{sa}", p.namespace),
            "{c}"
        );
        assert_eq!(c["aud"], json!(["broker"]), "{c}");
    }

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for (call, p, sa) in [(&calls[0], &a, "web"), (&calls[1], &b, "default")] {
        assert_eq!(
            call.path,
            format!(
                "/api/v1/namespaces/{}/serviceaccounts/{sa}/token",
                p.namespace
            )
        );
        assert_eq!(
            call.body["spec"]["boundObjectRef"],
            json!({"kind": "Pod", "apiVersion": "v1", "name": p.name, "uid": p.uid})
        );
        assert_eq!(call.body["spec"]["audiences"], json!(["broker"]));
    }
    // Two pods, two entries in the one shared cache.
    assert_eq!(agent.cache.len(), 2);

    // Pod A again: served from the shared cache, same token, no new TokenRequest.
    let again = authorization_seen(&env, proxy_a, up.addr).await;
    assert_eq!(again, seen_a);
    assert_eq!(agent.cache.len(), 2);
}

/// The exchange double: answers a JWT recording which subject token (by its `n`) it traded.
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
                        "access_token": jwt(600, json!({"for_pod": traded["pod"], "from_n": traded["n"]})),
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
    let (api, calls) = kube_api().await;
    let (endpoint, subjects) = sts().await;
    let src = format!(
        r#"source = {{ kind = "exchange", grant = "token_exchange", token_endpoint = "{endpoint}", allow_insecure_http = true, audience = "billing", inner = {} }}"#,
        token_request(&env, &api, "sts")
    );
    #[derive(serde::Deserialize)]
    struct Rule {
        source: SourceConfig,
    }
    let cfg = toml::from_str::<Rule>(&src).unwrap().source;
    let agent = IdentityContext::new(CachePolicy::default());
    // Same namespace and ServiceAccount: only the pod (name, uid) tells them apart.
    let a = pod("shop", "web-0", "uid-a", "web");
    let b = pod("shop", "web-1", "uid-b", "web");
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
    assert_eq!(calls.lock().unwrap().len(), 2);
    let subjects = subjects.lock().unwrap().clone();
    assert_eq!(subjects.len(), 2);
    assert_ne!(subjects[0], subjects[1]);
    // Inner and exchanged token per pod: four entries in the one cache.
    assert_eq!(agent.cache.len(), 4);
}
