//! `exchange` source against a real HTTPS OAuth token endpoint double (test CA from rcgen).

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use robin_agent::identity::{
    IdentityContext, IdentityError, SourceConfig, build_source_with, http::HttpError,
};
use robin_e2e::token_endpoint::*;
use serde_json::json;

#[derive(serde::Deserialize)]
struct Rule {
    source: SourceConfig,
}

fn parse(toml_src: &str) -> SourceConfig {
    toml::from_str::<Rule>(toml_src).unwrap().source
}

struct Fixture {
    ctx: IdentityContext,
    /// Holds the files below until the test ends.
    _dir: robin_e2e::TempDir,
    ca_file: std::path::PathBuf,
    subject_file: std::path::PathBuf,
    ca: TestCa,
}

fn fixture(name: &str) -> Fixture {
    let dir = scratch(name);
    let ca = test_ca();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let subject_file = dir.path().join("subject");
    std::fs::write(&subject_file, "subject.jwt.value\n").unwrap();
    Fixture {
        ctx: context(dir.path().to_owned()),
        _dir: dir,
        ca_file,
        subject_file,
        ca,
    }
}

fn rule(f: &Fixture, endpoint: &str, grant: &str, extra: &str) -> SourceConfig {
    parse(&format!(
        r#"source = {{ kind = "exchange", grant = "{grant}", token_endpoint = "{endpoint}", ca_file = "{}", inner = {{ kind = "file", path = "{}" }} {extra} }}"#,
        f.ca_file.display(),
        f.subject_file.display()
    ))
}

type Seen = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// An endpoint that records each form and answers `tok-<audience>-<n>` with `expires_in`.
async fn recording_endpoint(
    f: &Fixture,
    expires_in: u64,
) -> (String, Seen, Arc<std::sync::atomic::AtomicUsize>) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let (addr, calls) = serve(
        handler(move |req: Req| {
            let s = s.clone();
            async move {
                assert_eq!(req.method, http::Method::POST);
                assert_eq!(req.path, "/oauth2/token");
                assert_eq!(
                    req.headers.get("content-type").unwrap(),
                    "application/x-www-form-urlencoded"
                );
                let form = req.form();
                // Token68 has no ':' or '/': keep only what a token may contain.
                let aud = form
                    .get("audience")
                    .map(|a| a.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
                    .unwrap_or_default();
                let n = {
                    let mut s = s.lock().unwrap();
                    s.push(form);
                    s.len()
                };
                Resp::json(
                    200,
                    json!({"access_token": format!("tok-{aud}-{n}"), "expires_in": expires_in, "token_type": "Bearer"}),
                )
            }
        }),
        Some(f.ca.server.clone()),
    )
    .await;
    (
        format!("https://localhost:{}/oauth2/token", addr.port()),
        seen,
        calls,
    )
}

#[tokio::test]
async fn token_exchange_sends_rfc8693_parameters_and_caches() {
    let f = fixture("rfc8693");
    let (url, seen, calls) = recording_endpoint(&f, 3600).await;
    let cfg = rule(
        &f,
        &url,
        "token_exchange",
        r#", audience = "api://billing", scope = "read write", resource = "https://billing.example/", requested_token_type = "urn:ietf:params:oauth:token-type:access_token""#,
    );
    let src = build_source_with(&cfg, &f.ctx).unwrap();
    assert_eq!(src.token().await.unwrap().expose(), "tok-api___billing-1");
    assert_eq!(src.token().await.unwrap().expose(), "tok-api___billing-1");
    assert_eq!(count(&calls), 1);
    let form = seen.lock().unwrap()[0].clone();
    let expect = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", "subject.jwt.value"),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        (
            "requested_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("audience", "api://billing"),
        ("scope", "read write"),
        ("resource", "https://billing.example/"),
    ];
    for (k, v) in expect {
        assert_eq!(form.get(k).map(String::as_str), Some(v), "parameter {k}");
    }
    assert_eq!(form.len(), expect.len());
}

#[tokio::test]
async fn jwt_client_assertion_sends_rfc7523_parameters() {
    let f = fixture("rfc7523");
    let (url, seen, _) = recording_endpoint(&f, 3600).await;
    let cfg = rule(
        &f,
        &url,
        "jwt_client_assertion",
        r#", client_id = "robin-client", scope = "s1", audience = "aud1""#,
    );
    let src = build_source_with(&cfg, &f.ctx).unwrap();
    assert_eq!(src.token().await.unwrap().expose(), "tok-aud1-1");
    let form = seen.lock().unwrap()[0].clone();
    let expect = [
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", "subject.jwt.value"),
        ("client_id", "robin-client"),
        ("scope", "s1"),
        ("audience", "aud1"),
    ];
    for (k, v) in expect {
        assert_eq!(form.get(k).map(String::as_str), Some(v), "parameter {k}");
    }
    assert_eq!(form.len(), expect.len());
    assert!(!form.contains_key("subject_token"));
}

#[tokio::test]
async fn audience_per_destination_gives_different_tokens() {
    let f = fixture("two-aud");
    let (url, _, calls) = recording_endpoint(&f, 3600).await;
    let a = build_source_with(
        &rule(&f, &url, "token_exchange", r#", audience = "a""#),
        &f.ctx,
    )
    .unwrap();
    let b = build_source_with(
        &rule(&f, &url, "token_exchange", r#", audience = "b""#),
        &f.ctx,
    )
    .unwrap();
    let (ta, tb) = (a.token().await.unwrap(), b.token().await.unwrap());
    assert_ne!(ta, tb);
    assert!(ta.expose().starts_with("tok-a-"));
    assert!(tb.expose().starts_with("tok-b-"));
    assert_eq!(a.token().await.unwrap(), ta);
    assert_eq!(b.token().await.unwrap(), tb);
    assert_eq!(count(&calls), 2);
}

#[tokio::test]
async fn refreshes_ahead_of_expiry() {
    let f = fixture("refresh");
    // Lifetime 2s, refresh ahead 1s: the second second triggers a refresh.
    let (url, _, calls) = recording_endpoint(&f, 2).await;
    let src = build_source_with(
        &rule(&f, &url, "token_exchange", r#", audience = "x""#),
        &f.ctx,
    )
    .unwrap();
    assert_eq!(src.token().await.unwrap().expose(), "tok-x-1");
    assert_eq!(src.token().await.unwrap().expose(), "tok-x-1");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(src.token().await.unwrap().expose(), "tok-x-2");
    assert_eq!(count(&calls), 2);
}

#[tokio::test]
async fn serves_still_valid_token_on_failure_and_refuses_expired() {
    let f = fixture("failover");
    let failing = Arc::new(AtomicBool::new(false));
    let fl = failing.clone();
    let (addr, calls) = serve(
        handler(move |_req: Req| {
            let fl = fl.clone();
            async move {
                if fl.load(Ordering::SeqCst) {
                    Resp::json(503, json!({"error": "temporarily_unavailable"}))
                } else {
                    Resp::json(200, json!({"access_token": "good-token", "expires_in": 2}))
                }
            }
        }),
        Some(f.ca.server.clone()),
    )
    .await;
    let url = format!("https://localhost:{}/token", addr.port());
    let src = build_source_with(&rule(&f, &url, "token_exchange", ""), &f.ctx).unwrap();
    assert_eq!(src.token().await.unwrap().expose(), "good-token");
    failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // In the refresh window: the refresh fails, the still-valid token is served.
    assert_eq!(src.token().await.unwrap().expose(), "good-token");
    assert_eq!(count(&calls), 2);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Past expiry: an error, never the expired token.
    let err = src.token().await.unwrap_err();
    assert!(err.to_string().contains("temporarily_unavailable"), "{err}");
}

#[tokio::test]
async fn two_hundred_callers_at_expiry_cause_one_fetch() {
    let f = fixture("single-flight");
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let nn = n.clone();
    let (addr, calls) = serve(
        handler(move |_req: Req| {
            let n = nn.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Resp::json(
                    200,
                    json!({"access_token": format!("t{n}"), "expires_in": 1}),
                )
            }
        }),
        Some(f.ca.server.clone()),
    )
    .await;
    let url = format!("https://localhost:{}/token", addr.port());
    let src = build_source_with(&rule(&f, &url, "token_exchange", ""), &f.ctx).unwrap();
    assert_eq!(src.token().await.unwrap().expose(), "t1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let src = src.clone();
        tasks.spawn(async move { src.token().await });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap().expose(), "t2");
        done += 1;
    }
    assert_eq!(done, 200);
    assert_eq!(count(&calls), 2);
}

#[tokio::test]
async fn oauth_error_code_is_sanitized_and_surfaced() {
    let f = fixture("oauth-error");
    let (addr, _) = serve(
        handler(|_req: Req| async {
            Resp::json(
                400,
                json!({"error": "invalid_grant\r\nX-Evil: 1", "error_description": "x".repeat(500)}),
            )
        }),
        Some(f.ca.server.clone()),
    )
    .await;
    let url = format!("https://localhost:{}/token", addr.port());
    let src = build_source_with(&rule(&f, &url, "token_exchange", ""), &f.ctx).unwrap();
    let err = src.token().await.unwrap_err();
    let IdentityError::OAuth {
        code, description, ..
    } = &err
    else {
        panic!("expected OAuth error, got {err}");
    };
    assert_eq!(code, "invalid_grantX-Evil: 1");
    assert!(description.as_ref().unwrap().len() <= 131);
    let msg = err.to_string();
    assert!(msg.contains("invalid_grant") && !msg.contains('\r') && !msg.contains('\n'));
    assert!(!msg.contains("subject.jwt.value"));
}

#[tokio::test]
async fn redirect_is_not_followed() {
    let f = fixture("redirect");
    let (target, target_calls) = serve(
        handler(|_req: Req| async { Resp::json(200, json!({"access_token": "stolen"})) }),
        Some(f.ca.server.clone()),
    )
    .await;
    let location = format!("https://localhost:{}/token", target.port());
    let (addr, _) = serve(
        handler(move |_req: Req| {
            let location = location.clone();
            async move {
                Resp {
                    status: 307,
                    headers: vec![("location", location)],
                    body: String::new(),
                }
            }
        }),
        Some(f.ca.server.clone()),
    )
    .await;
    let url = format!("https://localhost:{}/token", addr.port());
    let src = build_source_with(&rule(&f, &url, "token_exchange", ""), &f.ctx).unwrap();
    let err = src.token().await.unwrap_err();
    assert!(
        matches!(
            &err,
            IdentityError::Http {
                source: HttpError::Redirect(..),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(count(&target_calls), 0);
}

#[tokio::test]
async fn plain_http_endpoint_is_refused_unless_loopback_and_allowed() {
    let f = fixture("http");
    let (addr, calls) = serve(
        handler(|_req: Req| async {
            Resp::json(200, json!({"access_token": "plain", "expires_in": 60}))
        }),
        None,
    )
    .await;
    let url = format!("http://127.0.0.1:{}/token", addr.port());
    let err = build_source_with(&rule(&f, &url, "token_exchange", ""), &f.ctx).unwrap_err();
    assert!(
        matches!(
            &err,
            IdentityError::Http {
                source: HttpError::InsecureRefused(_),
                ..
            }
        ),
        "{err}"
    );
    let err = build_source_with(
        &rule(
            &f,
            "http://sts.example.com/token",
            "token_exchange",
            ", allow_insecure_http = true",
        ),
        &f.ctx,
    )
    .unwrap_err();
    assert!(matches!(
        &err,
        IdentityError::Http {
            source: HttpError::InsecureRefused(_),
            ..
        }
    ));
    assert_eq!(count(&calls), 0);
    let src = build_source_with(
        &rule(&f, &url, "token_exchange", ", allow_insecure_http = true"),
        &f.ctx,
    )
    .unwrap();
    assert_eq!(src.token().await.unwrap().expose(), "plain");
}

#[tokio::test]
async fn crlf_token_from_endpoint_is_refused() {
    let f = fixture("crlf");
    let (addr, _) = serve(
        handler(|_req: Req| async {
            Resp::json(
                200,
                json!({"access_token": "abc\r\nX-Evil: 1", "expires_in": 60}),
            )
        }),
        Some(f.ca.server.clone()),
    )
    .await;
    let url = format!("https://localhost:{}/token", addr.port());
    let src = build_source_with(&rule(&f, &url, "token_exchange", ""), &f.ctx).unwrap();
    let err = src.token().await.unwrap_err();
    assert!(matches!(err, IdentityError::Invalid { .. }), "{err}");
}

#[tokio::test]
async fn slow_endpoint_times_out() {
    let f = fixture("slow");
    let (addr, _) = serve(
        handler(|_req: Req| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Resp::json(200, json!({"access_token": "late", "expires_in": 60}))
        }),
        Some(f.ca.server.clone()),
    )
    .await;
    let url = format!("https://localhost:{}/token", addr.port());
    let src = build_source_with(&rule(&f, &url, "token_exchange", ""), &f.ctx).unwrap();
    let started = Instant::now();
    let err = src.token().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(
            &err,
            IdentityError::Http {
                source: HttpError::Timeout(_),
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn untrusted_certificate_is_refused() {
    let f = fixture("untrusted");
    let other = test_ca();
    let (addr, calls) = serve(
        handler(|_req: Req| async { Resp::json(200, json!({"access_token": "x"})) }),
        Some(other.server.clone()),
    )
    .await;
    let url = format!("https://localhost:{}/token", addr.port());
    let src = build_source_with(&rule(&f, &url, "token_exchange", ""), &f.ctx).unwrap();
    assert!(src.token().await.is_err());
    assert_eq!(count(&calls), 0);
    assert!(Path::new(&f.ca_file).exists());
}

#[tokio::test]
async fn oversized_response_is_refused() {
    let f = fixture("oversized");
    let (addr, _) = serve(
        handler(|_req: Req| async {
            let padding = "x".repeat(100 * 1024);
            Resp::json(
                200,
                json!({"access_token": "big", "expires_in": 60, "pad": padding}),
            )
        }),
        Some(f.ca.server.clone()),
    )
    .await;
    let url = format!("https://localhost:{}/token", addr.port());
    let src = build_source_with(&rule(&f, &url, "token_exchange", ""), &f.ctx).unwrap();
    let err = src.token().await.unwrap_err();
    assert!(
        matches!(
            &err,
            IdentityError::Http {
                source: HttpError::TooLarge(..),
                ..
            }
        ),
        "{err}"
    );
}
