//! `spiffe` source against a Workload API double: hyper http2 over a temp Unix socket speaking
//! gRPC framing with the same prost messages.

use std::{
    convert::Infallible,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use robin_agent::identity::{
    IdentityContext, PodRef, SourceConfig, build_source_with,
    spiffe::{
        FETCH_JWT_SVID_PATH, FETCH_JWT_SVIDS_PATH, SpiffeConfig, grpc_frame, grpc_unframe, proto,
    },
};
use robin_e2e::token_endpoint::*;
use serde_json::json;

/// A response body: one data frame, then trailers.
struct GrpcBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

#[derive(Default)]
struct Seen {
    metadata: Vec<Option<String>>,
    requests: Vec<proto::JwtsvidRequest>,
    delegated: Vec<proto::FetchJwtsvidsRequest>,
}

/// Serves FetchJWTSVID; `status` != 0 answers with that grpc-status and no message.
fn workload_api(socket: PathBuf, status: u32) -> (Arc<Mutex<Seen>>, Arc<AtomicUsize>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let (s, c) = (seen.clone(), calls.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (s, c) = (s.clone(), c.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (s, c) = (s.clone(), c.clone());
                    async move {
                        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                        let path = req.uri().path().to_owned();
                        assert_eq!(req.headers()["content-type"], "application/grpc");
                        assert_eq!(req.headers()["te"], "trailers");
                        let meta = req
                            .headers()
                            .get("workload.spiffe.io")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        if path == FETCH_JWT_SVIDS_PATH {
                            // Delegated Identity API (admin socket): no workload metadata.
                            let msg: proto::FetchJwtsvidsRequest = grpc_unframe(body).unwrap();
                            let svid = jwt(600, json!({"aud": msg.audience.clone(), "n": n}));
                            s.lock().unwrap().delegated.push(msg);
                            let resp = proto::FetchJwtsvidsResponse {
                                svids: vec![proto::TypesJwtsvid {
                                    token: svid,
                                    id: Some(proto::SpiffeId {
                                        trust_domain: "example.org".into(),
                                        path: "/web".into(),
                                    }),
                                    ..Default::default()
                                }],
                            };
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", HeaderValue::from(0));
                            return Ok(Response::builder()
                                .header("content-type", "application/grpc")
                                .body(GrpcBody {
                                    data: Some(grpc_frame(&resp)),
                                    trailers: Some(trailers),
                                })
                                .unwrap());
                        }
                        assert_eq!(path, FETCH_JWT_SVID_PATH);
                        let msg: proto::JwtsvidRequest = grpc_unframe(body).unwrap();
                        let aud = msg.audience.join(",");
                        {
                            let mut s = s.lock().unwrap();
                            s.metadata.push(meta.clone());
                            s.requests.push(msg);
                        }
                        let mut trailers = HeaderMap::new();
                        let (code, data) = if meta.as_deref() != Some("true") {
                            // What SPIRE does without the security header.
                            (3, None)
                        } else if status != 0 {
                            (status, None)
                        } else {
                            let svid = jwt(
                                3600,
                                json!({"sub": "spiffe://example.org/web", "aud": [aud.clone()], "n": n}),
                            );
                            let resp = proto::JwtsvidResponse {
                                svids: vec![proto::Jwtsvid {
                                    spiffe_id: "spiffe://example.org/web".into(),
                                    svid,
                                    hint: String::new(),
                                }],
                            };
                            (0, Some(grpc_frame(&resp)))
                        };
                        trailers.insert("grpc-status", HeaderValue::from(code));
                        if code != 0 {
                            trailers.insert(
                                "grpc-message",
                                HeaderValue::from_static("denied\tby test"),
                            );
                        }
                        let resp = Response::builder()
                            .header("content-type", "application/grpc")
                            .body(GrpcBody {
                                data,
                                trailers: Some(trailers),
                            })
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (seen, calls)
}

fn setup(
    name: &str,
    status: u32,
) -> (
    IdentityContext,
    robin_e2e::TempDir,
    Arc<Mutex<Seen>>,
    Arc<AtomicUsize>,
) {
    let dir = scratch(name);
    let socket = dir.path().join("agent.sock");
    let (seen, calls) = workload_api(socket.clone(), status);
    // The default socket comes from ROBIN_SPIFFE_SOCKET, read through a lookup, not set_var.
    let env = socket.display().to_string();
    let mut ctx = IdentityContext::from_env(|k| (k == "ROBIN_SPIFFE_SOCKET").then(|| env.clone()));
    ctx.http = context(dir.path().to_owned()).http;
    (ctx, dir, seen, calls)
}

fn spiffe(audience: &str) -> SourceConfig {
    SourceConfig::Spiffe(SpiffeConfig {
        audience: audience.into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn fetches_jwt_svid_with_metadata_and_caches_by_exp() {
    let (ctx, _dir, seen, calls) = setup("svid", 0);
    let src = build_source_with(&spiffe("https://vault.example"), &ctx).unwrap();
    let t1 = src.token().await.unwrap();
    assert_eq!(t1.expose().split('.').count(), 3);
    assert_eq!(src.token().await.unwrap(), t1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.metadata, vec![Some("true".to_owned())]);
    assert_eq!(
        seen.requests[0].audience,
        vec!["https://vault.example".to_owned()]
    );
    assert_eq!(seen.requests[0].spiffe_id, "");
}

#[tokio::test]
async fn two_audiences_give_two_svids() {
    let (ctx, _dir, _, calls) = setup("svid-aud", 0);
    let a = build_source_with(&spiffe("a"), &ctx).unwrap();
    let b = build_source_with(&spiffe("b"), &ctx).unwrap();
    let (ta, tb) = (a.token().await.unwrap(), b.token().await.unwrap());
    assert_ne!(ta, tb);
    assert_eq!(a.token().await.unwrap(), ta);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn grpc_error_status_is_reported() {
    let (ctx, _dir, _, _) = setup("svid-err", 7);
    let src = build_source_with(&spiffe("a"), &ctx).unwrap();
    let err = src.token().await.unwrap_err().to_string();
    assert!(err.contains("grpc-status \"7\""), "{err}");
    assert!(err.contains("denied"), "{err}");
}

#[tokio::test]
async fn missing_socket_is_a_config_error_and_absent_socket_fails_fast() {
    let ctx = IdentityContext::from_env(|_| None);
    assert!(build_source_with(&spiffe("a"), &ctx).is_err());
    let cfg = SourceConfig::Spiffe(SpiffeConfig {
        audience: "a".into(),
        socket: Some("unix:///nonexistent/robin/agent.sock".into()),
        ..Default::default()
    });
    let src = build_source_with(&cfg, &ctx).unwrap();
    assert!(src.describe().contains("/nonexistent/robin/agent.sock"));
    assert!(src.token().await.is_err());
}

#[tokio::test]
async fn delegated_mode_fetches_for_the_pod_by_selector() {
    let (mut ctx, _dir, seen, calls) = setup("svid-delegated", 0);
    ctx.pod = Some(PodRef {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: "0b6f-11ee".into(),
        service_account: None,
    });
    let cfg = SourceConfig::Spiffe(SpiffeConfig {
        audience: "vault".into(),
        delegated: true,
        ..Default::default()
    });
    let src = build_source_with(&cfg, &ctx).unwrap();
    let t = src.token().await.unwrap();
    assert_eq!(src.token().await.unwrap(), t);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let explicit = SourceConfig::Spiffe(SpiffeConfig {
        audience: "vault".into(),
        delegated: true,
        selectors: vec!["k8s:ns:shop".into(), "k8s:sa:web".into()],
        spiffe_id: Some("spiffe://example.org/web".into()),
        ..Default::default()
    });
    // For a pod, a rule set may not choose the selectors (every pod using it would get that
    // workload's SVID), nor use the Workload API (which attests the agent itself).
    let err = build_source_with(&explicit, &ctx).unwrap_err().to_string();
    assert!(err.contains("cannot be set in node mode"), "{err}");
    let workload_api = SourceConfig::Spiffe(SpiffeConfig {
        audience: "vault".into(),
        ..Default::default()
    });
    let err = build_source_with(&workload_api, &ctx)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must set delegated = true"), "{err}");
    // Without a pod (an agent acting for a known workload), explicit selectors are the way.
    let pod = ctx.pod.take();
    let t2 = build_source_with(&explicit, &ctx)
        .unwrap()
        .token()
        .await
        .unwrap();
    ctx.pod = pod;
    assert_ne!(t, t2);
    let seen = seen.lock().unwrap();
    assert!(seen.metadata.is_empty());
    let sel = |r: &proto::FetchJwtsvidsRequest| -> Vec<(String, String)> {
        r.selectors
            .iter()
            .map(|s| (s.r#type.clone(), s.value.clone()))
            .collect()
    };
    assert_eq!(seen.delegated[0].audience, vec!["vault".to_owned()]);
    assert_eq!(
        sel(&seen.delegated[0]),
        vec![
            ("k8s".into(), "ns:shop".into()),
            ("k8s".into(), "sa:default".into()),
            ("k8s".into(), "pod-uid:0b6f-11ee".into()),
            ("k8s".into(), "pod-name:web-0".into()),
        ]
    );
    assert_eq!(
        sel(&seen.delegated[1]),
        vec![
            ("k8s".into(), "ns:shop".into()),
            ("k8s".into(), "sa:web".into())
        ]
    );
    // Selectors without delegated mode, or delegated without pod or selectors, are config errors.
    let bad = SourceConfig::Spiffe(SpiffeConfig {
        audience: "vault".into(),
        selectors: vec!["k8s:ns:shop".into()],
        ..Default::default()
    });
    assert!(build_source_with(&bad, &ctx).is_err());
    ctx.pod = None;
    assert!(build_source_with(&cfg, &ctx).is_err());
}

/// `robin proxy` with `ROBIN_TOKEN_SOURCE=jwtsvid`: its settings map to a `spiffe` source that
/// asks the socket they name for `ROBIN_AUDIENCE`, and the SVID passes the rule's audience
/// check (what the proxy does before injecting).
#[tokio::test]
async fn sidecar_jwtsvid_settings_fetch_the_audience_from_their_socket() {
    use robin_agent::sidecar::{env, inject_rule};
    let (ctx, dir, seen, _) = setup("sidecar", 0);
    let socket = format!("unix://{}", dir.path().join("agent.sock").display());
    let vars: std::collections::BTreeMap<String, String> = [
        (env::ENV_UPSTREAM_URL, "https://api.example.com"),
        (env::ENV_TOKEN_SOURCE, "jwtsvid"),
        (env::ENV_AUDIENCE, "https://api.example.com"),
        (env::ENV_SPIFFE_SOCKET, socket.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let rule = inject_rule(&env::Settings::from_lookup(&vars, 0).unwrap());
    // No agent-wide default socket: the settings' socket is the one used.
    let ctx = IdentityContext {
        spiffe_socket: None,
        ..ctx
    };
    let src = build_source_with(&rule.source, &ctx).unwrap();
    let token = src.token().await.unwrap();
    robin_agent::identity::check_audience(&token, rule.audience.as_deref().unwrap()).unwrap();
    assert_eq!(
        seen.lock().unwrap().requests[0].audience,
        vec!["https://api.example.com".to_owned()]
    );
}
