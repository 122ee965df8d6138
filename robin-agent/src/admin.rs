//! The admin plane, on its own port, for whichever mode has one: `/healthz` (the process
//! answers), `/readyz` (200 once every registered start-up task has marked itself ready; the
//! body names each task with `ok` or `no`, and each live [`ReadyCheck`] with `ok` or its reason)
//! and the paths the mode registers as [`AdminHandler`]s. It knows no mode: `robin node`
//! registers `/metrics` (its metrics registry, [`crate::metrics::Scrape`]) and `/debug/pods`,
//! `robin proxy` a check that a token resolves now.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write as _,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// What a mode serves on one admin path (GET only).
pub trait AdminHandler: Send + Sync {
    fn get(&self) -> Response<Full<Bytes>>;
}

/// A condition `/readyz` evaluates on every request, unlike a start-up latch: ready may turn
/// back into not ready. `Err` carries the reason shown in the body (never a secret).
pub trait ReadyCheck: Send + Sync {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// Start-up tasks that must finish before the process is ready, in registration order.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<Vec<(&'static str, bool)>>>);

/// One registered task: ready once [`ReadyLatch::mark_ready`] is called. Dropped unmarked (the
/// task failed), the process stays not ready.
#[must_use = "the task stays pending until marked ready"]
pub struct ReadyLatch {
    readiness: Readiness,
    task: &'static str,
}

impl Readiness {
    pub fn register(&self, task: &'static str) -> ReadyLatch {
        self.0.lock().expect("readiness lock").push((task, false));
        ReadyLatch {
            readiness: self.clone(),
            task,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.0.lock().expect("readiness lock").iter().all(|t| t.1)
    }

    /// One line per task: `name: ok` or `name: no`.
    pub fn report(&self) -> String {
        let mut body = String::new();
        for (task, ready) in self.0.lock().expect("readiness lock").iter() {
            let _ = writeln!(body, "{task}: {}", if *ready { "ok" } else { "no" });
        }
        body
    }
}

impl ReadyLatch {
    pub fn mark_ready(self) {
        let mut tasks = self.readiness.0.lock().expect("readiness lock");
        for t in tasks.iter_mut().filter(|t| t.0 == self.task) {
            t.1 = true;
        }
    }
}

/// The admin server: readiness plus the handlers a mode registered, by path.
#[derive(Default)]
pub struct Admin {
    readiness: Readiness,
    checks: Vec<(&'static str, Arc<dyn ReadyCheck>)>,
    handlers: BTreeMap<&'static str, Arc<dyn AdminHandler>>,
}

impl Admin {
    pub fn new(readiness: Readiness) -> Self {
        Self {
            readiness,
            checks: Vec::new(),
            handlers: BTreeMap::new(),
        }
    }

    /// Adds a live condition to `/readyz`, after the start-up tasks.
    pub fn add_check(&mut self, name: &'static str, check: Arc<dyn ReadyCheck>) {
        self.checks.push((name, check));
    }

    pub fn register(&mut self, path: &'static str, handler: Arc<dyn AdminHandler>) {
        self.handlers.insert(path, handler);
    }

    /// Serves until the task is dropped. One task per connection, each bounded by a header
    /// timeout.
    pub async fn serve(self, listener: TcpListener) {
        let admin = Arc::new(self);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.route(&req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    pub async fn route<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => self.readyz().await,
            path => match self.handlers.get(path) {
                Some(h) => h.get(),
                None => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
            },
        }
    }
}

impl Admin {
    async fn readyz(&self) -> Response<Full<Bytes>> {
        let mut ready = self.readiness.is_ready();
        let mut body = self.readiness.report();
        for (name, check) in &self.checks {
            match check.check().await {
                Ok(()) => _ = writeln!(body, "{name}: ok"),
                Err(reason) => {
                    ready = false;
                    _ = writeln!(body, "{name}: no ({reason})");
                }
            }
        }
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        text(status, "text/plain", body)
    }
}

pub fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    struct Fixed(&'static str);

    impl AdminHandler for Fixed {
        fn get(&self) -> Response<Full<Bytes>> {
            text(StatusCode::OK, "text/plain", self.0.into())
        }
    }

    async fn get(admin: &Admin, path: &str) -> (StatusCode, String) {
        let req = Request::get(path).body(()).unwrap();
        let resp = admin.route(&req).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_waits_for_every_latch_and_names_them() {
        let readiness = Readiness::default();
        let first = readiness.register("programs_loaded");
        let second = readiness.register("pod_watch_synced");
        let mut admin = Admin::new(readiness.clone());
        admin.register("/debug/x", Arc::new(Fixed("x\n")));
        let (status, body) = get(&admin, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "programs_loaded: no\npod_watch_synced: no\n");
        first.mark_ready();
        // A task that gave up (its latch dropped unmarked) keeps the process not ready.
        drop(second);
        let (status, body) = get(&admin, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "programs_loaded: ok\npod_watch_synced: no\n");
        readiness.register("late").mark_ready();
        assert!(!readiness.is_ready());
        assert_eq!(
            get(&admin, "/debug/x").await,
            (StatusCode::OK, "x\n".into())
        );
        assert_eq!(get(&admin, "/nope").await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(&admin, "/healthz").await.0, StatusCode::OK);
    }

    struct Flag(Arc<Mutex<Option<String>>>);

    impl ReadyCheck for Flag {
        fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
            let failing = self.0.lock().unwrap().clone();
            Box::pin(async move { failing.map_or(Ok(()), Err) })
        }
    }

    #[tokio::test]
    async fn live_checks_turn_readyz_both_ways_with_their_reason() {
        let failing = Arc::new(Mutex::new(Some("no token".to_owned())));
        let mut admin = Admin::new(Readiness::default());
        admin.add_check("identity", Arc::new(Flag(failing.clone())));
        assert_eq!(
            get(&admin, "/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "identity: no (no token)\n".into()
            )
        );
        *failing.lock().unwrap() = None;
        assert_eq!(
            get(&admin, "/readyz").await,
            (StatusCode::OK, "identity: ok\n".into())
        );
        *failing.lock().unwrap() = Some("gone".into());
        assert_eq!(
            get(&admin, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
