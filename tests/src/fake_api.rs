//! The one fake Kubernetes API server of the test kit: a real HTTP/1.1 server answering what
//! kube-rs sends: the pod list (`resourceVersion=0`, `limit`, a `spec.nodeName` field selector or the
//! gateway's label selector),
//! the pod watch (`watch=true`, bookmarks allowed, `timeoutSeconds`) driven by the test, and
//! TokenRequests (`POST .../serviceaccounts/{sa}/token`), minted as unsigned JWTs shaped like
//! bound ServiceAccount tokens. One request per connection (`Connection: close`). Plain HTTP
//! ([`FakeApi::start`]) or HTTPS with a kit certificate ([`FakeApi::start_tls`]); TokenRequests
//! can be refused with a `Status` ([`FakeApi::refuse_token_requests`]).
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

/// The node whose pods the fake serves; a list or watch for any other selector is refused.
pub const NODE: &str = "node-a";

/// The label a `robin gateway` selects its client pods by (its default `--pod-selector`); a
/// list or watch with this label selector is answered with the pods carrying it.
pub const GATEWAY_LABEL: (&str, &str) = ("robin.dev/gateway", "true");

/// Which pods a list asks for: a node's (`robin node`) or the gateway's labelled clients.
fn selected(target: &str) -> Option<fn(&Value) -> bool> {
    let node = format!("fieldSelector=spec.nodeName%3D{NODE}");
    let label = format!(
        "labelSelector={}%3D{}",
        GATEWAY_LABEL.0.replace('/', "%2F"),
        GATEWAY_LABEL.1
    );
    if target.contains(&node) {
        Some(|p| p["spec"]["nodeName"] == NODE)
    } else if target.contains(&label) {
        Some(|p| p["metadata"]["labels"][GATEWAY_LABEL.0] == GATEWAY_LABEL.1)
    } else {
        None
    }
}

#[derive(Default)]
pub struct ApiState {
    pub pods: BTreeMap<String, Value>,
    rv: u64,
    watchers: Vec<mpsc::Sender<String>>,
    /// Until opened, lists fail (500): the agent cannot have synced.
    open: bool,
    minted: Vec<MintedToken>,
    /// The request line target of every GET, in order.
    requests: Vec<String>,
    /// Set: every TokenRequest is answered with this status line and `Status` body.
    token_refusal: Option<(String, Value)>,
}

/// A TokenRequest the fake API answered
/// (`POST /api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token`).
#[derive(Clone, Debug)]
pub struct MintedToken {
    pub namespace: String,
    pub service_account: String,
    /// The caller's `Authorization` header.
    pub authorization: Option<String>,
    /// The TokenRequest body as sent.
    pub request: Value,
    /// The JWT it answered (unsigned), and that JWT's claims.
    pub token: String,
    pub claims: Value,
}

pub struct FakeApi {
    addr: std::net::SocketAddr,
    tls: bool,
    state: Arc<Mutex<ApiState>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl FakeApi {
    pub fn start() -> Self {
        Self::serve(None)
    }

    /// Served over TLS with `server` (a kit leaf for 127.0.0.1: `pki::Leaf::server_config`).
    pub fn start_tls(server: Arc<rustls::ServerConfig>) -> Self {
        Self::serve(Some(server))
    }

    fn serve(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding fake api");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(ApiState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, server) = (state.clone(), stop.clone(), tls.clone());
        let accept = thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, sp, server) = (st.clone(), sp.clone(), server.clone());
                        thread::spawn(move || serve_conn(conn, server, &st, &sp));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            addr,
            tls: tls.is_some(),
            state,
            stop,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// From now on every TokenRequest is refused, as an RBAC denial is: `code` with a `Status`
    /// naming `reason` and `message`; nothing is minted or recorded.
    pub fn refuse_token_requests(&self, code: u16, reason: &str, message: &str) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": reason, "message": message, "code": code});
        self.state.lock().unwrap().token_refusal = Some((format!("{code} {reason}"), status));
    }

    pub fn open(&self) {
        self.state.lock().unwrap().open = true;
    }

    pub fn event(&self, kind: &str, uid: &str, pod: Option<Value>) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv.to_string();
        let mut obj = match pod {
            Some(p) => p,
            None => s.pods.remove(uid).expect("deleting an unknown pod"),
        };
        obj["metadata"]["resourceVersion"] = json!(rv);
        if kind != "DELETED" {
            s.pods.insert(uid.to_owned(), obj.clone());
        }
        let line = json!({"type": kind, "object": obj}).to_string();
        s.watchers.retain(|w| w.send(line.clone()).is_ok());
    }

    pub fn upsert(&self, pod: Value) {
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
        let kind = if self.state.lock().unwrap().pods.contains_key(&uid) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.event(kind, &uid, Some(pod));
    }

    pub fn delete(&self, uid: &str) {
        self.event("DELETED", uid, None);
    }

    /// Ends every open watch as the API server does when its watch cache has moved past the
    /// client's version: an `ERROR` event with a 410 `Status`. The client must relist.
    pub fn expire_watches(&self) {
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version"}});
        let mut s = self.state.lock().unwrap();
        s.watchers.retain(|w| w.send(gone.to_string()).is_ok());
    }

    /// The targets (path and query) of the GETs served so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Every TokenRequest answered so far, in order.
    pub fn token_requests(&self) -> Vec<MintedToken> {
        self.state.lock().unwrap().minted.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve_conn(
    conn: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: &Mutex<ApiState>,
    stop: &AtomicBool,
) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match tls {
        None => serve_api(conn, state, stop),
        Some(cfg) => {
            let session = rustls::ServerConnection::new(cfg).expect("a tls session");
            serve_api(rustls::StreamOwned::new(session, conn), state, stop);
        }
    }
}

fn serve_api(mut conn: impl Read + Write, state: &Mutex<ApiState>, stop: &AtomicBool) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    if head.starts_with("POST ") {
        serve_token_request(conn, &head, &target, state);
        return;
    }
    state.lock().unwrap().requests.push(target.clone());
    // The agent must ask only for its own node's pods, a gateway only for its labelled clients.
    let filter = selected(&target);
    let Some(filter) = filter.filter(|_| target.starts_with("/api/v1/pods?")) else {
        let _ = conn.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    };
    if !target.contains("watch=true") {
        let body = {
            let s = state.lock().unwrap();
            if !s.open {
                let _ = conn.write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                return;
            }
            json!({
                "kind": "PodList",
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": s.pods.values().filter(|p| filter(p)).collect::<Vec<_>>(),
            })
            .to_string()
        };
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let (tx, rx) = mpsc::channel();
    state.lock().unwrap().watchers.push(tx);
    if conn
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .is_err()
    {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let last = serde_json::from_str::<Value>(&line).is_ok_and(|v| v["type"] == "ERROR");
                let line = format!("{line}\n");
                if write!(conn, "{:x}\r\n{line}\r\n", line.len()).is_err() || last {
                    let _ = conn.write_all(b"0\r\n\r\n");
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn respond(conn: &mut impl Write, status: &str, body: &Value) {
    let body = body.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Mints an unsigned JWT shaped like a bound ServiceAccount token (the `kubernetes.io` claims
/// of a real one), records the request and answers it as the API server does (201).
fn serve_token_request(
    mut conn: impl Read + Write,
    head: &str,
    target: &str,
    state: &Mutex<ApiState>,
) {
    let parts: Vec<&str> = target.split('/').collect();
    let (namespace, sa) = match parts[..] {
        [
            "",
            "api",
            "v1",
            "namespaces",
            ns,
            "serviceaccounts",
            sa,
            "token",
        ] if !ns.is_empty() && !sa.is_empty() => (ns.to_owned(), sa.to_owned()),
        _ => return respond(&mut conn, "404 Not Found", &json!({"kind": "Status"})),
    };
    let authorization = header(head, "authorization").map(str::to_owned);
    if !authorization
        .as_deref()
        .is_some_and(|a| a.starts_with("Bearer "))
    {
        return respond(&mut conn, "401 Unauthorized", &json!({"kind": "Status"}));
    }
    let len: usize = header(head, "content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(1 << 20)];
    if conn.read_exact(&mut body).is_err() {
        return;
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return respond(&mut conn, "400 Bad Request", &json!({"kind": "Status"}));
    };
    let refusal = state.lock().unwrap().token_refusal.clone();
    if let Some((status, body)) = refusal {
        return respond(&mut conn, &status, &body);
    }
    let spec = &request["spec"];
    if request["kind"] != "TokenRequest"
        || request["apiVersion"] != "authentication.k8s.io/v1"
        || spec["audiences"].as_array().is_none_or(|a| a.is_empty())
    {
        return respond(&mut conn, "400 Bad Request", &json!({"kind": "Status"}));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = now + spec["expirationSeconds"].as_u64().unwrap_or(3600);
    let bound = &spec["boundObjectRef"];
    let mut state = state.lock().unwrap();
    if bound["kind"] == "Pod" {
        // As the API server does: the pod is looked up in the ServiceAccount's namespace and
        // must run as that ServiceAccount, with the uid given.
        let pod = state.pods.values().find(|p| {
            p["metadata"]["namespace"] == namespace.as_str()
                && p["metadata"]["name"] == bound["name"]
        });
        let refused = match pod {
            None => Some("404 Not Found"),
            Some(p) if p["metadata"]["uid"] != bound["uid"] => Some("409 Conflict"),
            Some(p)
                if p["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    != sa =>
            {
                Some("400 Bad Request")
            }
            Some(_) => None,
        };
        if let Some(status) = refused {
            drop(state);
            return respond(&mut conn, status, &json!({"kind": "Status"}));
        }
    }
    let mut claims = json!({
        "iss": "https://fake-api.test",
        "sub": format!("system:serviceaccount:{namespace}:{sa}"),
        "aud": spec["audiences"],
        "iat": now,
        "exp": exp,
        "jti": format!("minted-{}", state.minted.len() + 1),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": sa}},
    });
    if bound["kind"] == "Pod" {
        claims["kubernetes.io"]["pod"] = json!({"name": bound["name"], "uid": bound["uid"]});
    }
    let token = format!(
        "{}.{}.c2ln",
        b64url(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    );
    let mut answer = request.clone();
    let expires = k8s_openapi::jiff::Timestamp::from_second(exp as i64)
        .expect("a time within the next hours")
        .to_string();
    answer["status"] = json!({"token": token, "expirationTimestamp": expires});
    state.minted.push(MintedToken {
        namespace,
        service_account: sa,
        authorization,
        request,
        token,
        claims,
    });
    drop(state);
    respond(&mut conn, "201 Created", &answer);
}

/// Base64url without padding (JWT segments).
fn b64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}
