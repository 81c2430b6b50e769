//! The MCP-aware handling stage: the connection the kernel handed over is served as HTTP
//! (HTTP/1.1 with keep-alive and pipelining, or h2c with prior knowledge), every JSON-RPC
//! message is parsed strictly and authorised, and what is forwarded upstream is the proxy's own
//! serialisation of exactly what was authorised.
//!
//! All three wire generations go through the same path:
//! - 2024-11-05 HTTP+SSE: `GET` opens a stream whose `endpoint` event names the POST URL; the
//!   proxy registers that URL as a session bound to this identity. Responses travel on the
//!   stream, so a denied request's error is injected into that stream.
//! - 2025-03-26 … 2025-11-25 Streamable HTTP: `POST` answered with JSON or SSE, `GET` stream,
//!   `DELETE`; headers pass through.
//! - 2026-07-28 stateless: `Mcp-Method` / `Mcp-Name` must agree with the body (HTTP 400,
//!   -32020 otherwise); the decision is made on the body.

pub mod framing;
pub mod jsonrpc;
pub mod sse;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex, atomic::Ordering},
};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::Value;
use tokio::{net::TcpStream, sync::mpsc};
use tracing::{debug, info, warn};

use self::jsonrpc::{Body, Message, RpcError, code};
use crate::{
    bpf::lock,
    daemon::Daemon,
    identity::Identity,
    policy::{Call, Decision, DenyStyle, Policy, Subject},
};

/// Errors carried by response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every proxy response.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How long an agent may take to send a complete HTTP/1 request head.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The first protocol revision whose requests must carry `Mcp-Method` / `Mcp-Name`.
const STATELESS_VERSION: &str = "2026-07-28";

/// List methods whose results are filtered, with the array member and the item's name member.
fn list_shape(method: &str) -> Option<(&'static str, &'static str)> {
    match method {
        "tools/list" => Some(("tools", "name")),
        "prompts/list" => Some(("prompts", "name")),
        "resources/list" => Some(("resources", "uri")),
        "resources/templates/list" => Some(("resourceTemplates", "uriTemplate")),
        _ => None,
    }
}

/// A 2024-11-05 SSE session: the POST URL announced by the `endpoint` event, bound to the
/// identity that opened the stream.
pub struct LegacySession {
    owner: (u32, u64),
    /// Request id → list method, for filtering responses that arrive on the stream.
    pending: Mutex<HashMap<String, String>>,
    /// Events the proxy adds to the stream (errors for denied requests).
    inject: mpsc::UnboundedSender<Bytes>,
}

/// Live legacy sessions, keyed by `"<server id> <path?query>"`.
pub type Sessions = Mutex<HashMap<String, Arc<LegacySession>>>;

/// Live server-to-agent streams by a stream number: where notifications can be injected.
#[derive(Default)]
pub struct Streams {
    next: std::sync::atomic::AtomicU64,
    live: Mutex<HashMap<u64, mpsc::UnboundedSender<Bytes>>>,
}

impl Streams {
    fn register(&self, tx: mpsc::UnboundedSender<Bytes>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.live).insert(id, tx);
        id
    }

    fn remove(&self, id: u64) {
        lock(&self.live).remove(&id);
    }
}

/// Sends `notifications/tools/list_changed` on every live server stream; returns how many.
pub fn notify_tools_changed(streams: &Streams) -> usize {
    let event =
        sse::Event::message(r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#);
    let live = lock(&streams.live);
    live.values()
        .filter(|tx| tx.send(event.clone()).is_ok())
        .count()
}

/// Everything one agent connection's requests need.
pub struct Conn {
    pub daemon: Arc<Daemon>,
    pub identity: Identity,
    pub server_id: usize,
    /// Framing verdicts for HTTP/1 request heads, in order (see [`framing`]).
    verdicts: framing::Verdicts,
}

impl Conn {
    pub fn new(daemon: Arc<Daemon>, identity: Identity, server_id: usize) -> Self {
        Self {
            daemon,
            identity,
            server_id,
            verdicts: framing::Verdicts::default(),
        }
    }
}

/// Serves one redirected connection until the agent closes it.
pub async fn serve(stream: TcpStream, conn: Conn) {
    let stream = framing::Watched::new(stream, conn.verdicts.clone());
    let conn = Arc::new(conn);
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // An agent that shuts down its write side after the request still gets the response.
        .half_close(true)
        // A client that trickles a request head forever does not hold a task forever.
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(error = %e, "agent connection ended with an error");
    }
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn empty(status: StatusCode) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// Refuses ambiguous HTTP framing before the body is read: duplicate `Content-Length`,
/// `Content-Length` with `Transfer-Encoding`, or any `Transfer-Encoding` other than a plain
/// `chunked`. (The upstream request is re-framed anyway; this keeps a desync attempt from
/// being served at all.)
fn check_framing(headers: &HeaderMap) -> Result<(), String> {
    let cl = headers.get_all(header::CONTENT_LENGTH).iter().count();
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if cl > 1 {
        return Err("more than one Content-Length header".into());
    }
    if cl == 1 && !te.is_empty() {
        return Err("both Content-Length and Transfer-Encoding".into());
    }
    if te.len() > 1 || te.first().is_some_and(|v| v.as_bytes() != b"chunked") {
        return Err("Transfer-Encoding other than a single \"chunked\"".into());
    }
    Ok(())
}

/// Hop-by-hop headers and those the proxy sets itself.
fn skip_header(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// A header value as text, decoding the `=?base64?…?=` form MCP uses for non-ASCII values.
fn header_text(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    if let Some(inner) = s
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(inner)
            .ok()?;
        return String::from_utf8(bytes).ok();
    }
    Some(s.to_owned())
}

/// 2026-07-28: `Mcp-Method` / `Mcp-Name` must agree with the body (and are required from that
/// revision on). Never authorise on them; only check them.
fn check_mcp_headers(headers: &HeaderMap, body: &Body) -> Result<(), RpcError> {
    let mismatch = |msg: String, id: Option<&Value>| RpcError {
        code: code::HEADER_MISMATCH,
        message: msg,
        id: id.cloned(),
    };
    let stateless = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v >= STATELESS_VERSION);
    let method_h = headers.get("mcp-method");
    let name_h = headers.get("mcp-name");
    if body.batch {
        if method_h.is_some() || name_h.is_some() {
            return Err(mismatch(
                "Mcp-Method/Mcp-Name headers on a batch".into(),
                None,
            ));
        }
        return Ok(());
    }
    let Some(msg) = body.messages.first() else {
        return Ok(());
    };
    let id = msg.id();
    match (method_h.map(header_text), msg.method()) {
        (Some(Some(h)), Some(m)) if h != m => {
            return Err(mismatch(
                format!("Mcp-Method header {h:?} does not match the body's method {m:?}"),
                id,
            ));
        }
        (Some(None), _) => return Err(mismatch("Mcp-Method header is not valid text".into(), id)),
        (Some(_), None) => {
            return Err(mismatch("Mcp-Method header on a response".into(), id));
        }
        (None, Some(m)) if stateless => {
            return Err(mismatch(
                format!(
                    "Mcp-Method header is required (protocol {STATELESS_VERSION}); body has {m:?}"
                ),
                id,
            ));
        }
        _ => {}
    }
    match (name_h.map(header_text), msg.target()) {
        (Some(Some(h)), Some(t)) if h != t => Err(mismatch(
            format!("Mcp-Name header {h:?} does not match the body's {t:?}"),
            id,
        )),
        (Some(None), _) => Err(mismatch("Mcp-Name header is not valid text".into(), id)),
        (Some(_), None) => Err(mismatch(
            "Mcp-Name header on a request that names nothing".into(),
            id,
        )),
        (None, Some(t)) if stateless => Err(mismatch(
            format!("Mcp-Name header is required (protocol {STATELESS_VERSION}); body names {t:?}"),
            id,
        )),
        _ => Ok(()),
    }
}

fn id_key(id: &Value) -> String {
    id.to_string()
}

impl Conn {
    fn subject(&self) -> Subject<'_> {
        Subject {
            cgroup: self.identity.cgroup.as_deref(),
            uid: self.identity.uid,
            gid: self.identity.gid,
            exe: self.identity.exe.as_deref(),
            comm: &self.identity.comm,
        }
    }

    fn server_name(&self) -> &str {
        &self.daemon.config.servers[self.server_id].name
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let watched = if req.version() < http::Version::HTTP_2 {
            lock(&self.verdicts).pop_front().unwrap_or(Ok(()))
        } else {
            Ok(())
        };
        if let Err(why) = watched.and_then(|()| check_framing(req.headers())) {
            self.daemon
                .counters
                .rejected
                .fetch_add(1, Ordering::Relaxed);
            info!(http.method = %req.method(), reason = %why, "request refused: ambiguous framing");
            let err = RpcError::new(
                code::INVALID_REQUEST,
                format!("ambiguous HTTP framing: {why}"),
            );
            return json_response(StatusCode::BAD_REQUEST, &err.to_response());
        }
        let (parts, body) = req.into_parts();
        let limit = self.daemon.config.proxy.max_body_bytes;
        let bytes = match Limited::new(body, limit).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                self.daemon
                    .counters
                    .rejected
                    .fetch_add(1, Ordering::Relaxed);
                let too_large = e.is::<http_body_util::LengthLimitError>();
                info!(too_large, error = %e, "request body refused");
                let (status, msg) = if too_large {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("request body over {limit} bytes (proxy.max_body_bytes)"),
                    )
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("reading request body: {e}"),
                    )
                };
                let err = RpcError::new(code::INVALID_REQUEST, msg);
                return json_response(status, &err.to_response());
            }
        };
        if parts.method == Method::POST {
            self.post(parts, bytes).await
        } else {
            // GET (server stream), DELETE (end session), anything else: no JSON-RPC to judge.
            self.forward(parts, bytes, HashMap::new(), false).await
        }
    }

    fn session_key(&self, uri: &http::Uri) -> String {
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        format!("{} {pq}", self.server_id)
    }

    fn owner(&self) -> (u32, u64) {
        (self.identity.uid, self.identity.cgroup_id)
    }

    async fn post(
        self: &Arc<Self>,
        parts: http::request::Parts,
        bytes: Bytes,
    ) -> Response<ProxyBody> {
        let counters = &self.daemon.counters;
        let body = match jsonrpc::parse(&bytes, self.daemon.config.proxy.max_json_depth) {
            Ok(b) => b,
            Err(e) => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                info!(error = %e, "request refused: malformed JSON-RPC");
                return json_response(StatusCode::BAD_REQUEST, &e.to_response());
            }
        };
        if let Err(e) = check_mcp_headers(&parts.headers, &body) {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            info!(error = %e, "request refused: Mcp-* header disagrees with the body");
            return json_response(StatusCode::BAD_REQUEST, &e.to_response());
        }
        let legacy = {
            let sessions = lock(&self.daemon.sessions);
            sessions.get(&self.session_key(&parts.uri)).cloned()
        };
        if let Some(s) = &legacy
            && s.owner != self.owner()
        {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            warn!("request refused: legacy SSE session belongs to another identity");
            let err = RpcError::new(
                code::INVALID_REQUEST,
                "this session belongs to another identity",
            );
            return json_response(StatusCode::FORBIDDEN, &err.to_response());
        }

        // The wire generation, for logs: a legacy SSE session, else the negotiated header.
        let protocol = match (&legacy, parts.headers.get("mcp-protocol-version")) {
            (Some(_), _) => "2024-11-05".to_owned(),
            (None, Some(v)) => v.to_str().unwrap_or("invalid").to_owned(),
            (None, None) => "unspecified".to_owned(),
        };
        let policy = self.daemon.policy();
        let decisions: Vec<Option<Decision>> = body
            .messages
            .iter()
            .map(|m| self.decide(&policy, m, &protocol))
            .collect();
        let denied = decisions.iter().flatten().any(|d| !d.allow);
        if denied {
            let errors: Vec<Value> = body
                .messages
                .iter()
                .zip(&decisions)
                .filter_map(|(m, d)| {
                    let id = m.id()?.clone();
                    Some(match d {
                        Some(d) if !d.allow => denial(&policy, m, Some(id)),
                        _ => jsonrpc::error_response(
                            Some(id),
                            code::INVALID_REQUEST,
                            "batch refused: another request in it was refused by policy",
                        ),
                    })
                })
                .collect();
            if let Some(session) = legacy {
                // 2024-11-05: the answer travels on the SSE stream.
                for e in &errors {
                    let _ = session.inject.send(sse::Event::message(&e.to_string()));
                }
                return empty(StatusCode::ACCEPTED);
            }
            return match (body.batch, errors.len()) {
                (_, 0) => empty(StatusCode::ACCEPTED),
                (false, _) => json_response(StatusCode::OK, &errors[0]),
                (true, _) => json_response(StatusCode::OK, &Value::Array(errors)),
            };
        }
        let lists: HashMap<String, String> = body
            .messages
            .iter()
            .filter_map(|m| match m {
                Message::Request { id, method, .. } if list_shape(method).is_some() => {
                    Some((id_key(id), method.clone()))
                }
                _ => None,
            })
            .collect();
        if let Some(session) = &legacy {
            lock(&session.pending).extend(lists.clone());
        }
        // 2026-07-28: subscriptions/listen keeps its response open as the server stream.
        let listen = !body.batch && body.messages[0].method() == Some("subscriptions/listen");
        self.forward(parts, Bytes::from(body.to_bytes()), lists, listen)
            .await
    }

    /// Decides one message (responses to server requests carry no method and pass).
    fn decide(&self, policy: &Policy, m: &Message, protocol: &str) -> Option<Decision> {
        let method = m.method()?;
        let call = Call {
            method,
            name: m.target(),
            arguments: m.arguments(),
        };
        let d = policy.check(&self.subject(), self.server_name(), &call);
        let counters = &self.daemon.counters;
        let id = m.id().map(ToString::to_string).unwrap_or_default();
        let name = call.name.unwrap_or("");
        if d.allow {
            counters.allowed.fetch_add(1, Ordering::Relaxed);
            debug!(mcp.method = method, mcp.name = name, mcp.id = %id, mcp.protocol = protocol,
                server.name = self.server_name(), authz.decision = "allow", authz.rule = %d.rule,
                "mcp request");
        } else {
            counters.denied.fetch_add(1, Ordering::Relaxed);
            info!(mcp.method = method, mcp.name = name, mcp.id = %id, mcp.protocol = protocol,
                server.name = self.server_name(), authz.decision = "deny", authz.rule = %d.rule,
                "mcp request");
        }
        Some(d)
    }

    async fn forward(
        self: &Arc<Self>,
        parts: http::request::Parts,
        bytes: Bytes,
        lists: HashMap<String, String>,
        server_stream: bool,
    ) -> Response<ProxyBody> {
        let server = &self.daemon.config.servers[self.server_id];
        let from_get = parts.method == Method::GET;
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri = match format!("http://{}{pq}", server.upstream).parse::<http::Uri>() {
            Ok(u) => u,
            Err(e) => {
                let err = RpcError::new(code::INVALID_REQUEST, format!("bad request target: {e}"));
                return json_response(StatusCode::BAD_REQUEST, &err.to_response());
            }
        };
        let mut builder = Request::builder().method(parts.method.clone()).uri(uri);
        for (name, value) in &parts.headers {
            if !skip_header(name) {
                builder = builder.header(name, value);
            }
        }
        builder = builder.header(header::HOST, server.upstream.as_str());
        let up_len = bytes.len() as u64;
        let request = match builder.body(Full::new(bytes)) {
            Ok(r) => r,
            Err(e) => {
                let err = RpcError::new(code::INVALID_REQUEST, format!("cannot forward: {e}"));
                return json_response(StatusCode::BAD_REQUEST, &err.to_response());
            }
        };
        let response = match self.daemon.upstreams[self.server_id].request(request).await {
            Ok(r) => r,
            Err(e) => {
                self.daemon
                    .counters
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                let cause = std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| e.to_string());
                warn!(server.name = %server.name, error = %cause, "upstream request failed");
                let err = RpcError::new(
                    code::INTERNAL_ERROR,
                    format!(
                        "interceptor: upstream {} of server {} failed: {cause}",
                        server.upstream, server.name
                    ),
                );
                return json_response(StatusCode::BAD_GATEWAY, &err.to_response());
            }
        };
        self.daemon
            .counters
            .relayed_up
            .fetch_add(up_len, Ordering::Relaxed);
        self.respond(response, lists, from_get, server_stream || from_get)
            .await
    }

    async fn respond(
        self: &Arc<Self>,
        response: Response<Incoming>,
        lists: HashMap<String, String>,
        from_get: bool,
        server_stream: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        // Content-Length stays for bodies passed through unchanged (a rewritten body gets a
        // fresh one from its new length).
        let content_length = parts.headers.get(header::CONTENT_LENGTH).cloned();
        parts.headers.retain_non_hop();
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("text/event-stream") {
            let body = self
                .clone()
                .sse_stream(body, lists, from_get, server_stream);
            return Response::from_parts(parts, body);
        }
        if content_type.starts_with("application/json") && !lists.is_empty() {
            let limit = self.daemon.config.proxy.max_response_bytes;
            let bytes = match Limited::new(body, limit).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    warn!(error = %e, "upstream response unreadable or too large");
                    let err =
                        RpcError::new(code::INTERNAL_ERROR, format!("upstream response: {e}"));
                    return json_response(StatusCode::BAD_GATEWAY, &err.to_response());
                }
            };
            let out = match serde_json::from_slice::<Value>(&bytes) {
                Ok(mut v) => {
                    match &mut v {
                        Value::Array(items) => {
                            for item in items {
                                self.filter_response(&lists, item);
                            }
                        }
                        item => self.filter_response(&lists, item),
                    }
                    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
                }
                Err(_) => bytes,
            };
            self.daemon
                .counters
                .relayed_down
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            return Response::from_parts(parts, full(out));
        }
        if let Some(cl) = content_length {
            parts.headers.insert(header::CONTENT_LENGTH, cl);
        }
        let daemon = self.daemon.clone();
        let counted = body.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                daemon
                    .counters
                    .relayed_down
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            f
        });
        Response::from_parts(parts, counted.map_err(BoxError::from).boxed())
    }

    /// Filters a list result in `response` if it answers one of `lists`' requests.
    fn filter_response(&self, lists: &HashMap<String, String>, response: &mut Value) {
        let Some(method) = response.get("id").and_then(|id| lists.get(&id_key(id))) else {
            return;
        };
        self.filter_list(method, response);
    }

    fn filter_list(&self, method: &str, response: &mut Value) {
        let Some((member, key)) = list_shape(method) else {
            return;
        };
        let policy = self.daemon.policy();
        let subject = self.subject();
        let server = self.server_name();
        let Some(result) = response.get_mut("result").and_then(Value::as_object_mut) else {
            return;
        };
        if let Some(items) = result.get_mut(member).and_then(Value::as_array_mut) {
            let before = items.len();
            items.retain(|item| {
                item.get(key)
                    .and_then(Value::as_str)
                    .is_some_and(|name| policy.shows(&subject, server, method, name))
            });
            debug!(
                mcp.method = method,
                shown = items.len(),
                hidden = before - items.len(),
                "list filtered"
            );
        }
        // 2026-07-28 cache hints: this answer is specific to this identity.
        if result.contains_key("cacheScope") {
            result.insert("cacheScope".into(), Value::from("private"));
        }
    }

    /// Relays an SSE body event by event: list results filtered, legacy `endpoint` events
    /// registered as sessions, injected events (errors for denied legacy requests) merged in.
    fn sse_stream(
        self: Arc<Self>,
        body: Incoming,
        lists: HashMap<String, String>,
        from_get: bool,
        server_stream: bool,
    ) -> ProxyBody {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream_id = server_stream.then(|| self.daemon.streams.register(tx.clone()));
        let state = SseState {
            stream_id,
            conn: self,
            body,
            parser: sse::Parser::default(),
            lists,
            from_get,
            tx: Some(tx),
            rx,
            queue: std::collections::VecDeque::new(),
            session: None,
            done: false,
        };
        let s = stream::unfold(state, |mut st| async move {
            loop {
                if let Some(b) = st.queue.pop_front() {
                    st.conn
                        .daemon
                        .counters
                        .relayed_down
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    return Some((Ok(Frame::data(b)), st));
                }
                if st.done {
                    return None;
                }
                tokio::select! {
                    frame = st.body.frame() => match frame {
                        Some(Ok(f)) => {
                            if let Some(d) = f.data_ref() {
                                let events = st.parser.push(d);
                                for e in events {
                                    let out = st.event(e);
                                    st.queue.push_back(out);
                                }
                            }
                        }
                        Some(Err(e)) => {
                            st.done = true;
                            return Some((Err(BoxError::from(e)), st));
                        }
                        None => {
                            st.done = true;
                            let rest = st.parser.finish();
                            if !rest.is_empty() {
                                st.queue.push_back(rest);
                            }
                        }
                    },
                    Some(b) = st.rx.recv(), if st.session.is_some() || st.stream_id.is_some() => {
                        st.queue.push_back(b);
                    }
                }
            }
        });
        StreamBody::new(s).boxed()
    }
}

/// Per-stream state of [`Conn::sse_stream`].
struct SseState {
    conn: Arc<Conn>,
    body: Incoming,
    parser: sse::Parser,
    lists: HashMap<String, String>,
    from_get: bool,
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    rx: mpsc::UnboundedReceiver<Bytes>,
    queue: std::collections::VecDeque<Bytes>,
    /// The legacy session this stream carries, removed from the registry on drop.
    session: Option<(String, Arc<LegacySession>)>,
    /// Registration in [`Streams`] of a server stream, removed on drop.
    stream_id: Option<u64>,
    done: bool,
}

impl SseState {
    fn event(&mut self, e: sse::Event) -> Bytes {
        if self.from_get && e.event == "endpoint" && self.session.is_none() {
            self.register(&e.data);
            return e.raw;
        }
        let Ok(mut v) = serde_json::from_str::<Value>(&e.data) else {
            return e.raw;
        };
        let Some(id) = v
            .get("id")
            .filter(|_| v.get("method").is_none())
            .map(id_key)
        else {
            return e.raw;
        };
        let method = match &self.session {
            Some((_, s)) => lock(&s.pending).remove(&id),
            None => self.lists.get(&id).cloned(),
        };
        match method {
            Some(m) => {
                self.conn.filter_list(&m, &mut v);
                e.with_data(&v.to_string())
            }
            None => e.raw,
        }
    }

    fn register(&mut self, endpoint: &str) {
        let Some(tx) = self.tx.take() else { return };
        // The endpoint may be relative ("/messages/?session_id=…") or absolute.
        let pq = match endpoint.parse::<http::Uri>() {
            Ok(u) => u
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| endpoint.to_owned()),
            Err(_) => endpoint.to_owned(),
        };
        let key = format!("{} {pq}", self.conn.server_id);
        let session = Arc::new(LegacySession {
            owner: self.conn.owner(),
            pending: Mutex::new(HashMap::new()),
            inject: tx,
        });
        lock(&self.conn.daemon.sessions).insert(key.clone(), session.clone());
        debug!(session = %pq, "legacy SSE session registered");
        self.session = Some((key, session));
    }
}

impl Drop for SseState {
    fn drop(&mut self) {
        if let Some(id) = self.stream_id.take() {
            self.conn.daemon.streams.remove(id);
        }
        if let Some((key, session)) = self.session.take() {
            let mut sessions = lock(&self.conn.daemon.sessions);
            // Only remove our own registration (a reconnect may have replaced it).
            if sessions.get(&key).is_some_and(|s| Arc::ptr_eq(s, &session)) {
                sessions.remove(&key);
            }
        }
    }
}

/// The answer to a denied request: -32602 for calls that name a target (the code MCP uses for
/// an unknown tool), -32601 for other methods.
fn denial(policy: &Policy, m: &Message, id: Option<Value>) -> Value {
    let method = m.method().unwrap_or("");
    match (method, m.target()) {
        ("tools/call", Some(tool)) if policy.deny_style == DenyStyle::UnknownTool => {
            jsonrpc::error_response(id, code::INVALID_PARAMS, &format!("Unknown tool: {tool}"))
        }
        (_, Some(target)) => jsonrpc::error_response(
            id,
            code::INVALID_PARAMS,
            &format!("{method} {target:?} refused by policy (interceptor)"),
        ),
        _ => jsonrpc::error_response(
            id,
            code::METHOD_NOT_FOUND,
            &format!("{method} refused by policy (interceptor)"),
        ),
    }
}

trait RetainNonHop {
    fn retain_non_hop(&mut self);
}

impl RetainNonHop for HeaderMap {
    fn retain_non_hop(&mut self) {
        let drop: Vec<header::HeaderName> =
            self.keys().filter(|k| skip_header(k)).cloned().collect();
        for k in drop {
            self.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(check_framing(&headers(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(
            check_framing(&headers(&[
                ("content-length", "5"),
                ("content-length", "5")
            ]))
            .is_err()
        );
        assert!(
            check_framing(&headers(&[
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ]))
            .is_err()
        );
        assert!(check_framing(&headers(&[("transfer-encoding", "xchunked")])).is_err());
        assert!(check_framing(&headers(&[("transfer-encoding", "chunked, identity")])).is_err());
    }

    fn body(text: &str) -> Body {
        jsonrpc::parse(text.as_bytes(), 64).unwrap()
    }

    #[test]
    fn mcp_headers_must_match_the_body() {
        let call =
            body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read"}}"#);
        let v = ("mcp-protocol-version", "2026-07-28");
        assert!(
            check_mcp_headers(
                &headers(&[v, ("mcp-method", "tools/call"), ("mcp-name", "read")]),
                &call
            )
            .is_ok()
        );
        let e = check_mcp_headers(
            &headers(&[v, ("mcp-method", "tools/call"), ("mcp-name", "delete")]),
            &call,
        )
        .unwrap_err();
        assert_eq!(e.code, code::HEADER_MISMATCH);
        let e = check_mcp_headers(
            &headers(&[v, ("mcp-method", "tools/list"), ("mcp-name", "read")]),
            &call,
        )
        .unwrap_err();
        assert_eq!(e.code, code::HEADER_MISMATCH);
        // Required from 2026-07-28 on, optional before.
        assert!(check_mcp_headers(&headers(&[v]), &call).is_err());
        assert!(
            check_mcp_headers(&headers(&[("mcp-protocol-version", "2025-06-18")]), &call).is_ok()
        );
        // Non-ASCII names travel base64-encoded.
        let uni =
            body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"lire_é"}}"#);
        let enc = format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode("lire_é")
        );
        assert!(
            check_mcp_headers(
                &headers(&[v, ("mcp-method", "tools/call"), ("mcp-name", &enc)]),
                &uni
            )
            .is_ok()
        );
    }
}
