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

pub mod budget;
pub mod filter;
pub mod framing;
pub mod headers;
pub mod jsonrpc;
pub mod params;
pub mod rate;
pub mod session;
pub mod sse;
pub mod tasks;

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::Value;
use tokio::{net::TcpStream, sync::mpsc};
use tracing::{debug, info, warn};

pub use self::session::{BoundSessions, Sessions, Streams};
use self::{
    headers::{
        check_charset, check_framing, check_mcp_headers, check_target, check_value_shapes,
        skip_header,
    },
    jsonrpc::{Message, RpcError, code},
    session::{INJECT_QUEUE, LegacySession, Owner, SessionUse, request_names, session_key},
};
use crate::{
    audit,
    bpf::lock,
    daemon::Daemon,
    identity::Identity,
    policy::{Call, Decision, DenyStyle, Grant, Policy, Subject},
};

/// A UTF-8 byte order mark.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Whether a lenient JSON reader would take `text` for a JSON object or array: its first byte
/// past whitespace (and a byte order mark) opens one.
fn looks_like_json(text: &[u8]) -> bool {
    // UTF-16 or UTF-32, as Python's json.loads(bytes) detects them (a byte order mark, or a
    // NUL in the first two bytes: the other half of an ASCII character): JSON the proxy could
    // not read.
    if text.starts_with(&[0xfe, 0xff])
        || text.starts_with(&[0xff, 0xfe])
        || text.iter().take(2).any(|b| *b == 0)
    {
        return true;
    }
    let text = text.strip_prefix(UTF8_BOM).unwrap_or(text);
    text.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| matches!(b, b'{' | b'['))
}

/// Where `text/event-stream` starts in a Content-Type value (in any case), if it is there.
fn event_stream_at(value: &HeaderValue) -> Option<usize> {
    const STREAM: &[u8] = b"text/event-stream";
    value
        .as_bytes()
        .windows(STREAM.len())
        .position(|w| w.eq_ignore_ascii_case(STREAM))
}

/// Whether the first bytes of an answer hold one that tells JSON from an event stream: not
/// whitespace, nor (part of) a UTF-8 byte order mark, which may come split across frames.
fn decides(head: &[u8]) -> bool {
    !(head.len() < UTF8_BOM.len() && UTF8_BOM.starts_with(head))
        && head
            .strip_prefix(UTF8_BOM)
            .unwrap_or(head)
            .iter()
            .any(|b| !b.is_ascii_whitespace())
}

/// Reads `body` into `head` until its first byte that is not whitespace (nor a UTF-8 byte
/// order mark) is in, the body ends, or `limit` bytes are read.
async fn first_bytes(
    body: &mut Incoming,
    head: &mut Vec<u8>,
    limit: usize,
) -> Result<(), BoxError> {
    while !decides(head) && head.len() < limit {
        match body.frame().await {
            Some(frame) => {
                if let Some(d) = frame?.data_ref() {
                    head.extend_from_slice(d);
                }
            }
            None => break,
        }
    }
    Ok(())
}

/// Whether `body`, read as an event stream (as lenient clients read any answer), holds an event
/// whose data looks like JSON.
fn holds_json_events(body: &[u8], max_event: usize) -> bool {
    let mut parser = sse::Parser::new(max_event);
    let (events, fits) = parser.push(body);
    if fits.is_err() {
        return true;
    }
    events
        .into_iter()
        .chain(parser.finish())
        .any(|e| looks_like_json(e.data.as_bytes()))
}

/// Errors carried by response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every proxy response.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How long an agent may take to send a complete HTTP/1 request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest method, tool or resource name written to the audit log as is.
const MAX_AUDIT_NAME: usize = 1024;
/// Concurrent h2c streams per agent connection (each may buffer up to `max_body_bytes`).
const MAX_H2_STREAMS: u32 = 16;

/// Credentials the proxy injected into a request (`inject_headers`), kept out of the answer
/// the agent gets: an upstream that echoes the header it was sent (an error page quoting the
/// token it refused, a debug endpoint) would otherwise hand the agent the secret it must
/// never hold. Exact occurrences in headers, bodies and SSE events become `[REDACTED]` (also
/// JSON-escaped with `\/` and percent-encoded). Taken when the request is sent: a stream
/// open across a rotation of the credential file is scrubbed of the value it was sent.
/// Identity assertions are scrubbed by their node's JWS header, whatever the request they
/// were sent with (a legacy SSE stream carries the answers to other requests than its own).
#[derive(Default)]
pub struct Secrets {
    exact: Vec<SecretForms>,
    /// Starts of tokens (`<JWS header>.`): each occurrence and the token characters that
    /// follow it are scrubbed.
    tokens: Vec<Arc<Needle>>,
}

/// A searcher for one byte string, built once (building one costs more than searching a
/// short answer with it).
pub type Needle = memchr::memmem::Finder<'static>;

/// `text` with each occurrence of `needle`, and the `tail(rest)` bytes after it, replaced by
/// `[REDACTED]`; `None` when it does not occur.
fn redact(text: &[u8], needle: &Needle, tail: impl Fn(&[u8]) -> usize) -> Option<Vec<u8>> {
    needle.find(text)?;
    let mut replaced = Vec::with_capacity(text.len());
    let mut at = 0;
    for hit in needle.find_iter(text) {
        if hit < at {
            continue;
        }
        replaced.extend_from_slice(&text[at..hit]);
        replaced.extend_from_slice(b"[REDACTED]");
        at = hit + needle.needle().len();
        at += tail(&text[at..]);
    }
    replaced.extend_from_slice(&text[at..]);
    Some(replaced)
}

/// The forms an injected credential is scrubbed in (see [`SecretForms::of`]), built once per
/// value of its file, not per request.
#[derive(Clone, Default)]
pub struct SecretForms(Arc<[Needle]>);

/// `text` with the hex digits of its `%XX` escapes in lower case.
fn lower_hex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut hex_left = 0;
    for c in text.chars() {
        if c == '%' {
            hex_left = 2;
            out.push(c);
        } else if hex_left > 0 {
            hex_left -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Shortest credential scrubbed from answers (shorter text occurs by chance).
const SHORTEST_SCRUBBED: usize = 8;

impl SecretForms {
    /// `secret`, and the forms an echo may take it in: as a JSON string escapes it (`\"`,
    /// `\\`, control characters; Go's `\u003c`, `\u003e`, `\u0026`; `\/` as PHP writes
    /// it), and percent-encoded as encoders do it (every byte but letters and digits, or but
    /// RFC 3986's unreserved `-._~`; upper- or lower-case hex). None for a secret shorter than
    /// [`SHORTEST_SCRUBBED`].
    pub fn of(secret: &str) -> Self {
        const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        if secret.len() < SHORTEST_SCRUBBED {
            return Self::default();
        }
        let quoted = serde_json::to_string(secret).unwrap_or_default();
        let json = quoted
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .unwrap_or(&quoted);
        let go = json
            .replace('<', "\\u003c")
            .replace('>', "\\u003e")
            .replace('&', "\\u0026");
        let mut forms = Vec::new();
        for escaped in [secret, json, &go] {
            forms.push(escaped.to_owned());
            forms.push(escaped.replace('/', "\\/"));
        }
        for set in [percent_encoding::NON_ALPHANUMERIC, UNRESERVED] {
            let upper = percent_encoding::utf8_percent_encode(secret, set).to_string();
            forms.push(lower_hex(&upper));
            forms.push(upper);
        }
        forms.sort();
        forms.dedup();
        // The secret itself last, as it was sent.
        forms.retain(|f| f != secret);
        forms.push(secret.to_owned());
        Self(
            forms
                .iter()
                .map(|f| memchr::memmem::Finder::new(f.as_bytes()).into_owned())
                .collect(),
        )
    }
}

impl Secrets {
    /// An injected credential, in each of its `forms`.
    fn add(&mut self, forms: SecretForms) {
        if !forms.0.is_empty() {
            self.exact.push(forms);
        }
    }

    /// Every token that starts with `prefix` (a JWS header and its dot), whole.
    fn add_token_prefix(&mut self, prefix: Arc<Needle>) {
        if !self.tokens.iter().any(|t| t.needle() == prefix.needle()) {
            self.tokens.push(prefix);
        }
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.tokens.is_empty()
    }

    /// `bytes` with every occurrence of a secret replaced (the same bytes when none occurs):
    /// exact secrets, and tokens from their prefix up to the first byte that cannot be part of
    /// a compact JWS (base64url and dots).
    fn scrub(&self, bytes: Bytes) -> Bytes {
        let token_byte = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        let token_tail = |rest: &[u8]| rest.iter().take_while(|b| token_byte(b)).count();
        let mut out: Option<Vec<u8>> = None;
        let tokens = self.tokens.iter().map(|t| (&**t, true));
        let exact = self
            .exact
            .iter()
            .flat_map(|f| f.0.iter())
            .map(|n| (n, false));
        for (needle, token) in tokens.chain(exact) {
            let text = out.as_deref().unwrap_or(&bytes);
            if let Some(replaced) = redact(
                text,
                needle,
                |rest| {
                    if token { token_tail(rest) } else { 0 }
                },
            ) {
                out = Some(replaced);
            }
        }
        out.map_or(bytes, Bytes::from)
    }

    fn scrub_headers(&self, headers: &mut http::HeaderMap) {
        if self.is_empty() {
            return;
        }
        for value in headers.values_mut() {
            let scrubbed = self.scrub(Bytes::copy_from_slice(value.as_bytes()));
            if scrubbed != value.as_bytes()
                && let Ok(v) = HeaderValue::from_maybe_shared(scrubbed)
            {
                *value = v;
            }
        }
    }

    fn scrub_event(&self, e: sse::Event) -> sse::Event {
        if self.is_empty() {
            return e;
        }
        let raw = self.scrub(e.raw.clone());
        if raw == e.raw {
            return e;
        }
        let data = self.scrub(Bytes::from(e.data.clone().into_bytes()));
        sse::Event {
            raw,
            data: String::from_utf8_lossy(&data).into_owned(),
            ..e
        }
    }
}

/// `s` cut to [`MAX_AUDIT_NAME`] bytes (on a character boundary), marked when cut.
fn capped(s: &str) -> String {
    if s.len() <= MAX_AUDIT_NAME {
        return s.to_owned();
    }
    let mut end = MAX_AUDIT_NAME;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated]", &s[..end])
}

/// Sends `notifications/tools/list_changed` on every live server stream; returns how many.
pub fn notify_tools_changed(streams: &Streams) -> usize {
    streams.broadcast(&sse::Event::message(
        r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#,
    ))
}

/// A server stream (a GET's answer, a `subscriptions/listen`'s) as it was judged: the
/// resources it subscribes to, and the policy generation its decision was taken under (see
/// [`Conn::stream_withdrawn`]).
struct ServerStream {
    subscribed: Vec<String>,
    /// The tasks it subscribes to (`notifications.taskIds`).
    tasks: Vec<String>,
    generation: u64,
}

/// The next change of policy a server stream watches for (never, for other streams).
async fn policy_changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match changes {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// What a `subscriptions/listen` subscribes to under `params.notifications.<member>`: the
/// resources (`resourceSubscriptions`; the parser refused any other shape) or the tasks
/// (`taskIds`).
fn subscribed(m: &Message, member: &str) -> Vec<String> {
    m.params()
        .and_then(|p| p.get("notifications"))
        .and_then(|n| n.get(member))
        .and_then(Value::as_array)
        .map(|uris| {
            uris.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Everything one agent connection's requests need.
pub struct Conn {
    pub daemon: Arc<Daemon>,
    pub identity: Identity,
    pub server_id: usize,
    /// Framing verdicts for HTTP/1 request heads, in order (see [`framing`]).
    verdicts: framing::Verdicts,
    /// The `identity` object of this connection's audit events, as JSON text.
    pub who: Arc<str>,
    up: AtomicU64,
    down: AtomicU64,
    requests: AtomicU64,
    /// Set (with the reason) when the identity is revoked: in-flight requests are answered
    /// with an error naming it and the connection closes.
    revoked: Revocation,
    /// Tier 1 of the policy for this identity and server, resolved once per policy generation.
    grant: std::sync::Mutex<Option<(Arc<Policy>, Arc<Grant>)>>,
    /// The identity assertion for this connection's next request, signed while the previous
    /// one waited for its upstream (see [`Conn::presign`]).
    presigner: Presigner,
    /// Key of this connection's workload in [`WorkloadPresigns`]; `None` without assertions.
    presign_key: Option<Arc<str>>,
    opened: Instant,
}

impl Drop for Conn {
    /// `connection.close`, once nothing of the connection is left: its requests' last audit
    /// events (held by their handlers and streams, which on HTTP/2 run as tasks of their own)
    /// come before it.
    fn drop(&mut self) {
        let (up, down, requests) = self.totals();
        self.daemon.audit.record_later(
            audit::Event::new("connection.close")
                .raw("identity", &self.who)
                .field("server", self.server_name())
                .field("duration_ms", &(self.opened.elapsed().as_millis() as u64))
                .field("bytes_up", &up)
                .field("bytes_down", &down)
                .field("requests", &requests),
        );
    }
}

/// An identity assertion signed ahead of the request that will carry it: its own `jti`, used
/// at most once.
struct Presigned {
    /// The roles it names; a request granted by other roles gets a fresh signature.
    roles: Vec<String>,
    /// When its claims (`iat`) were taken.
    at: Instant,
    token: String,
}

/// A pre-signed assertion and the pace of the requests it is for: at most one assertion
/// waits, and each is handed out once.
#[derive(Default)]
struct PresignState {
    waiting: Option<Presigned>,
    /// When the last request was forwarded.
    last_forward: Option<Instant>,
}

impl PresignState {
    /// The waiting assertion, if it names `roles` and was signed less than
    /// [`PRESIGNED_MAX_AGE`] before `now`. A waiting one is used up either way.
    fn take(&mut self, roles: &[String], now: Instant) -> Option<String> {
        let p = self.waiting.take()?;
        (p.roles == roles && now.saturating_duration_since(p.at) < PRESIGNED_MAX_AGE)
            .then_some(p.token)
    }

    /// Whether to sign one for the next request, this one being forwarded at `now`: only if
    /// the previous request was forwarded less than [`PRESIGNED_MAX_AGE`] earlier (the next
    /// will likely come as soon) and none is waiting.
    fn wanted(&mut self, now: Instant) -> bool {
        let previous = self.last_forward.replace(now);
        self.waiting.is_none()
            && previous.is_some_and(|p| now.saturating_duration_since(p) < PRESIGNED_MAX_AGE)
    }

    /// Whether it serves nothing any more at `now`.
    fn stale(&self, now: Instant) -> bool {
        self.last_forward
            .is_none_or(|t| now.saturating_duration_since(t) >= PRESIGNED_MAX_AGE)
            && self
                .waiting
                .as_ref()
                .is_none_or(|p| now.saturating_duration_since(p.at) >= PRESIGNED_MAX_AGE)
    }
}

/// A connection's pre-signed assertion (for its own next request).
#[derive(Default)]
struct Presigner(std::sync::Mutex<PresignState>);

impl Presigner {
    fn take(&self, roles: &[String], now: Instant) -> Option<String> {
        lock(&self.0).take(roles, now)
    }

    /// What to sign ahead as this connection forwards a request at `now`.
    fn pace(&self, now: Instant) -> Pace {
        let mut state = lock(&self.0);
        let first = state.last_forward.is_none();
        if state.wanted(now) {
            Pace::Connection
        } else if first {
            Pace::Workload
        } else {
            Pace::Nothing
        }
    }

    /// Keeps `p` for the next request (replacing any waiting one).
    fn offer(&self, p: Presigned) {
        lock(&self.0).waiting = Some(p);
    }
}

/// The claims of an identity assertion (README: "Identity and mTLS"), serialised straight into
/// the JWS payload.
#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
    uid: u32,
    exe: Option<&'a str>,
    cgroup: Option<&'a str>,
    container: Option<&'a str>,
    pod: Option<&'a str>,
    roles: &'a [String],
}

/// What a forwarded request pre-signs for (see [`Conn::presign`]).
#[derive(Debug, PartialEq, Eq)]
enum Pace {
    /// The connection's own next request.
    Connection,
    /// The workload's next request on any connection, if the workload's pace wants one (only
    /// from a connection's first request: a connection never has two waiting).
    Workload,
    Nothing,
}

/// Assertions pre-signed for a workload's next request on any connection (a new one, above
/// all: agents that open a connection per call), by everything their claims share besides the
/// roles (server, workload id, uid, exe, cgroup, container, pod; see [`Conn::presign_key`]).
/// Paced like a connection's own, over all of the workload's requests that had none.
#[derive(Default)]
pub struct WorkloadPresigns(std::sync::Mutex<Tracked>);

#[derive(Default)]
struct Tracked {
    map: HashMap<Arc<str>, PresignState>,
    /// When a full map was last looked through for idle workloads.
    swept: Option<Instant>,
}

/// Most workloads tracked: when full, those idle for [`PRESIGNED_MAX_AGE`] are dropped (looked
/// for at most every [`PRESIGN_SWEEP_EVERY`]: with more workloads active than this, every new
/// one would walk them all); if none is, a new workload is not tracked (its requests sign
/// inline).
const WORKLOAD_PRESIGNS: usize = 4096;
const PRESIGN_SWEEP_EVERY: Duration = Duration::from_millis(100);

impl WorkloadPresigns {
    fn take(&self, key: &str, roles: &[String], now: Instant) -> Option<String> {
        lock(&self.0).map.get_mut(key)?.take(roles, now)
    }

    fn wanted(&self, key: &Arc<str>, now: Instant) -> bool {
        let mut tracked = lock(&self.0);
        let Tracked { map, swept } = &mut *tracked;
        if map.len() >= WORKLOAD_PRESIGNS && !map.contains_key(key) {
            if swept.is_some_and(|t| now.saturating_duration_since(t) < PRESIGN_SWEEP_EVERY) {
                return false;
            }
            *swept = Some(now);
            map.retain(|_, state| !state.stale(now));
            if map.len() >= WORKLOAD_PRESIGNS {
                return false;
            }
        }
        map.entry(key.clone()).or_default().wanted(now)
    }

    fn offer(&self, key: &str, p: Presigned) {
        if let Some(state) = lock(&self.0).map.get_mut(key) {
            state.waiting = Some(p);
        }
    }
}

/// Oldest a pre-signed assertion may be when a request takes it (its `iat` lags by at most
/// this); an older one is dropped and the request signs its own.
const PRESIGNED_MAX_AGE: Duration = Duration::from_secs(1);

/// Shortest `identity.assertion_ttl` with which assertions are pre-signed: with shorter ones
/// the second of age could leave too little validity.
const PRESIGN_MIN_TTL: Duration = Duration::from_secs(10);

/// A forwarded request waiting for its response (for `mcp.response` events).
#[derive(Debug, Clone)]
pub struct Pending {
    method: String,
    target: Option<String>,
    started: Instant,
    session: Option<String>,
    /// The HTTP request that carried it (see [`next_post`]): a failed legacy POST takes back
    /// its own requests from the session, not a later one's that reused an id.
    post: u64,
    /// Who sent it (the `identity` of its events): a legacy session's answers come on the
    /// stream its opener holds, and another process of the same workload may post to it.
    who: Arc<str>,
}

/// Gives back a legacy session's charge on the buffer budget once nothing awaits an answer on
/// its stream (`p`, its pending map, locked: pending before charged, as everywhere). Between,
/// the charge is followed up as requests are moved in (see [`Conn::move_to_session`]).
fn release_if_answered(session: &LegacySession, p: &PendingMap) {
    if p.is_empty()
        && let Some(held) = lock(&session.charged).as_mut()
    {
        // Taking nothing more cannot go over.
        let _ = held.hold_exactly(0);
    }
}

impl Pending {
    /// About what this record, awaited under `id`, holds in memory (for the buffer budget).
    fn weight(&self, id: &str) -> usize {
        const RECORD: usize = 160;
        RECORD
            + id.len()
            + self.method.len()
            + self.target.as_ref().map_or(0, String::len)
            + self.session.as_ref().map_or(0, String::len)
    }
}

/// A number for each HTTP request carrying JSON-RPC requests.
fn next_post() -> u64 {
    static POSTS: AtomicU64 = AtomicU64::new(0);
    POSTS.fetch_add(1, Ordering::Relaxed)
}

/// Pending requests by JSON-RPC id (as JSON text).
pub type PendingMap = HashMap<String, Pending>;

/// Requests of one agent request whose `mcp.response` is not recorded yet. Whatever is still
/// in it when it is dropped is recorded as `cancelled`: the agent went away before the answer
/// (closed its connection or stream), or the daemon stopped. So every audited request that is
/// allowed gets one `mcp.response`, however its exchange ends.
pub struct Awaiting {
    conn: Arc<Conn>,
    map: PendingMap,
    /// The requests came as a batch (answered by an array, however many await an answer).
    batch: bool,
}

impl Awaiting {
    fn new(conn: &Arc<Conn>, map: PendingMap, batch: bool) -> Self {
        Self {
            conn: conn.clone(),
            map,
            batch,
        }
    }

    /// Forgets the requests: their `mcp.request` events were not written, so no response is
    /// recorded either.
    fn forget(&mut self) {
        self.map.clear();
    }

    /// Records the requests still awaited as answered with `outcome` (and JSON-RPC error
    /// `code`, if the proxy answered with one).
    fn settle(&mut self, outcome: &str, code: Option<i64>) {
        if !self.map.is_empty() {
            let map = std::mem::take(&mut self.map);
            self.conn.audit_failed(map, outcome, code);
        }
    }
}

impl std::ops::Deref for Awaiting {
    type Target = PendingMap;
    fn deref(&self) -> &PendingMap {
        &self.map
    }
}

impl std::ops::DerefMut for Awaiting {
    fn deref_mut(&mut self) -> &mut PendingMap {
        &mut self.map
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        self.settle("cancelled", None);
    }
}

/// Most POSTs parked at once (see [`Parked`]); beyond, a closed stream's requests are settled
/// `no_response` at once.
const MAX_PARKED: usize = 4096;
/// Most POSTs parked at once per workload: one agent cannot take every place.
const MAX_PARKED_PER_OWNER: usize = 256;
/// How long a parked POST's requests wait for a GET that resumes their stream.
const PARK_TTL: Duration = Duration::from_secs(300);

/// Requests whose answers are owed on a resumed stream: the upstream closed a POST's event
/// stream after an event `id` (2025-11-25 "polling": the client reconnects with a GET and
/// `Last-Event-ID`, and the answers come there). Kept by session until an answer arrives on a
/// GET stream of the session, the session ends, [`PARK_TTL`] passes (`no_response`) or the
/// daemon stops (`cancelled`); their `mcp.response` is recorded by the connection that posted
/// them, with the answer's outcome.
#[derive(Default)]
pub struct Parked {
    inner: std::sync::Mutex<ParkedInner>,
}

#[derive(Default)]
struct ParkedInner {
    by_session: HashMap<(usize, String), Vec<ParkedPost>>,
    count: usize,
    next: u64,
}

/// A parked POST's requests, and the timer that settles them when no answer comes.
struct ParkedPost {
    ticket: u64,
    pending: Awaiting,
    timer: Option<tokio::task::AbortHandle>,
}

impl ParkedPost {
    /// Its requests, moved out (an empty set stays behind).
    fn take_pending(&mut self) -> Awaiting {
        let conn = self.pending.conn.clone();
        std::mem::replace(
            &mut self.pending,
            Awaiting::new(&conn, PendingMap::new(), false),
        )
    }
}

impl Drop for ParkedPost {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
    }
}

impl Parked {
    /// Parks `pending` under `session`; gives it back when the table is full.
    fn park(&self, scope: usize, session: &str, pending: Awaiting) -> Result<u64, Awaiting> {
        let mut inner = lock(&self.inner);
        if inner.count >= MAX_PARKED {
            return Err(pending);
        }
        let owner = pending.conn.session_owner();
        let own = inner
            .by_session
            .values()
            .flatten()
            .filter(|p| p.pending.conn.session_owner() == owner)
            .count();
        if own >= MAX_PARKED_PER_OWNER {
            return Err(pending);
        }
        inner.next += 1;
        let ticket = inner.next;
        inner.count += 1;
        inner
            .by_session
            .entry((scope, session.to_owned()))
            .or_default()
            .push(ParkedPost {
                ticket,
                pending,
                timer: None,
            });
        Ok(ticket)
    }

    /// Keeps `timer` with what `ticket` parked (aborted when it goes); aborts it at once if
    /// that is gone already.
    fn arm(&self, scope: usize, session: &str, ticket: u64, timer: tokio::task::AbortHandle) {
        let mut inner = lock(&self.inner);
        match inner
            .by_session
            .get_mut(&(scope, session.to_owned()))
            .and_then(|list| list.iter_mut().find(|p| p.ticket == ticket))
        {
            Some(post) => post.timer = Some(timer),
            None => timer.abort(),
        }
    }

    /// Takes what `ticket` parked, if still there.
    fn take(&self, scope: usize, session: &str, ticket: u64) -> Option<Awaiting> {
        let mut inner = lock(&self.inner);
        let key = (scope, session.to_owned());
        let list = inner.by_session.get_mut(&key)?;
        let at = list.iter().position(|p| p.ticket == ticket)?;
        let mut post = list.swap_remove(at);
        if list.is_empty() {
            inner.by_session.remove(&key);
        }
        inner.count -= 1;
        // The timer is the caller (or is no longer needed): not aborted from here.
        post.timer = None;
        Some(post.take_pending())
    }

    /// Takes everything parked under `session` (it ended), or everywhere (`None`: the daemon
    /// stops).
    fn take_all(&self, session: Option<(usize, &str)>) -> Vec<Awaiting> {
        let mut inner = lock(&self.inner);
        let lists: Vec<Vec<ParkedPost>> = match session {
            Some((scope, id)) => inner
                .by_session
                .remove(&(scope, id.to_owned()))
                .into_iter()
                .collect(),
            None => inner.by_session.drain().map(|(_, l)| l).collect(),
        };
        let taken: Vec<Awaiting> = lists
            .into_iter()
            .flatten()
            .map(|mut post| post.take_pending())
            .collect();
        inner.count -= taken.len();
        taken
    }

    /// Records the answers in `message` (read on a GET stream of `session`) of requests
    /// parked there.
    fn answered(&self, scope: usize, session: &str, message: &Value) {
        let mut inner = lock(&self.inner);
        let key = (scope, session.to_owned());
        let Some(list) = inner.by_session.get_mut(&key) else {
            return;
        };
        // One answer settles one request: the first parked POST that awaits its id.
        for post in list.iter_mut() {
            let pending = &mut post.pending;
            let before = pending.map.len();
            let conn = pending.conn.clone();
            conn.audit_response(&mut pending.map, message);
            if pending.map.len() < before && !message.is_array() {
                break;
            }
        }
        let before = list.len();
        list.retain(|p| !p.pending.map.is_empty());
        let done = before - list.len();
        if list.is_empty() {
            inner.by_session.remove(&key);
        }
        inner.count -= done;
    }

    /// Settles every parked request as `cancelled` (the daemon stops: recorded before its
    /// `daemon.stop`).
    pub fn cancel_all(&self) {
        drop(self.take_all(None));
    }
}

/// A connection's revocation: set once, with its reason; whoever waits for it is woken. (A
/// `watch` channel would do, at ~350 bytes more per connection.)
#[derive(Default)]
struct Revocation {
    reason: std::sync::OnceLock<String>,
    notify: tokio::sync::Notify,
}

impl Revocation {
    /// Sets the reason and wakes the waiters; a later call changes nothing.
    fn set(&self, reason: String) {
        if self.reason.set(reason).is_ok() {
            self.notify.notify_waiters();
        }
    }

    fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    /// Resolves once revoked (at once if it already is; never, if it never is).
    async fn wait(&self) {
        loop {
            // Registered before the check: `notify_waiters` reaches a `Notified` from its
            // creation on, so a revocation between the check and the await is not missed.
            let notified = self.notify.notified();
            if self.reason().is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// Resolves once the flag is set (never, if it is not).
async fn until_set(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The HTTP/2 connection preface (h2c with prior knowledge); anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the agent opens with the HTTP/2 preface, looked at without consuming it: hyper then
/// reads the first request itself, into a buffer sized for it (handing it a pre-read prefix,
/// as a version-sniffing wrapper does, made its 8 KiB read buffer grow to 16 KiB on every
/// connection). `None`: the agent closed or failed before sending anything.
async fn speaks_h2(stream: &TcpStream) -> Option<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if !H2_PREFACE.starts_with(&buf[..n]) {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // Part of the preface so far (rare: clients send it in one piece). Peeking again would
        // return at once, so wait, longer each time: a client that stops mid-preface costs a
        // few wake-ups until the caller's timeout, not a busy loop.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Serves one redirected connection until the agent closes it.
pub async fn serve(stream: TcpStream, conn: Arc<Conn>) {
    let mut closers = Closers {
        draining: conn.daemon.draining.subscribe(),
        revoked_at_start: conn.revoked_reason().is_some(),
        conn: conn.clone(),
    };
    // A client that never sends a byte does not hold a task forever either; draining and a
    // revocation close an idle connection at once.
    let h2 = tokio::select! {
        found = tokio::time::timeout(HEADER_READ_TIMEOUT, speaks_h2(&stream)) => match found {
            Ok(Some(h2)) => h2,
            _ => return,
        },
        _ = until_set(&mut closers.draining) => return,
        _ = closers.conn.revoked.wait(), if !closers.revoked_at_start => return,
    };
    let io = TokioIo::new(framing::Watched::new(stream, conn.verdicts.clone()));
    // The request handler's future lives on the heap while a request is in flight: hyper
    // reserves room for it for the connection's lifetime otherwise, ~3.5 KiB per idle
    // connection.
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        Box::pin(async move { Ok::<_, Infallible>(conn.handle_counted(req).await) })
    });
    // The connections are built inside the awaited expressions, never held in a local: a
    // moved-from local still takes room in this future's state.
    if h2 {
        // HTTP/2's connection state is large and rare; on the heap, HTTP/1 connections do not
        // reserve room for it.
        Box::pin(async move {
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder.max_concurrent_streams(MAX_H2_STREAMS);
            drive(
                std::pin::pin!(builder.serve_connection(io, service)),
                |c| c.graceful_shutdown(),
                closers,
            )
            .await
        })
        .await;
    } else {
        drive(
            std::pin::pin!(
                hyper::server::conn::http1::Builder::new()
                    // An agent that shuts down its write side after the request still gets the
                    // response.
                    .half_close(true)
                    // A client that trickles a request head forever does not hold a task forever.
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(io, service)
            ),
            |c| c.graceful_shutdown(),
            closers,
        )
        .await;
    }
}

/// What ends a connection early: SIGTERM (`draining`) and a revocation made after it was
/// accepted (one revoked before is served, so every request gets an answer naming the
/// revocation, then `Connection: close`, rather than a bare reset).
struct Closers {
    draining: tokio::sync::watch::Receiver<bool>,
    /// The connection, for its revocation.
    conn: Arc<Conn>,
    revoked_at_start: bool,
}

/// Runs a served connection to its end, shutting it down gracefully on SIGTERM or revocation.
async fn drive<F, E>(
    mut connection: Pin<&mut F>,
    graceful_shutdown: impl Fn(Pin<&mut F>),
    mut closers: Closers,
) where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let result = tokio::select! {
        r = connection.as_mut() => r,
        _ = until_set(&mut closers.draining) => {
            // SIGTERM: finish what is in flight, then close (the daemon bounds the wait).
            graceful_shutdown(connection.as_mut());
            connection.as_mut().await
        }
        _ = closers.conn.revoked.wait(), if !closers.revoked_at_start => {
            // In-flight requests answer with the revocation; then the connection closes.
            graceful_shutdown(connection.as_mut());
            match tokio::time::timeout(Duration::from_millis(500), connection.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "agent connection ended with an error");
    }
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// HTTP 503 for a request refused for the buffer budget or the bound on requests in flight
/// (`Retry-After: 1`).
fn busy(over: budget::Over) -> Response<ProxyBody> {
    retry_after(
        1,
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            code::INTERNAL_ERROR,
            format!("interceptor: request not read: {}", over.reason()),
        ),
    )
}

/// The answer to a request over its cgroup's rate, which may come again after `wait`.
fn too_many(wait: Duration) -> Response<ProxyBody> {
    // Whole seconds, rounded up.
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    retry_after(
        seconds.max(1),
        error_response(
            StatusCode::TOO_MANY_REQUESTS,
            code::INTERNAL_ERROR,
            format!(
                "interceptor: request not read: this cgroup's agents send more requests than \
                 proxy.max_requests_per_second_per_cgroup allows; try again in {} ms",
                wait.as_millis().max(1)
            ),
        ),
    )
}

/// `response` with `Retry-After: seconds` (a bound on what agents hold at once, or on their
/// rate, was reached).
fn retry_after(seconds: u64, mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
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

fn error_response(
    status: StatusCode,
    code: i64,
    message: impl Into<String>,
) -> Response<ProxyBody> {
    json_response(status, &RpcError::new(code, message).to_response())
}

/// `resp` with `Connection: close`: the rest of this connection is not to be served.
fn closing(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn empty(status: StatusCode) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// Whether a response body is encoded in a way the proxy cannot inspect.
fn encoded(headers: &HeaderMap) -> bool {
    // Every value and every coding in it: clients that decode a list of codings (httpx)
    // would read `identity` then a second header's `gzip`.
    headers.get_all(header::CONTENT_ENCODING).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|c| !c.eq_ignore_ascii_case(b"identity"))
    })
}

impl Conn {
    pub fn new(daemon: Arc<Daemon>, identity: Identity, server_id: usize) -> Self {
        Self {
            who: identity.audit_json().into(),
            server_id,
            verdicts: framing::Verdicts::default(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            revoked: Revocation::default(),
            grant: std::sync::Mutex::new(None),
            presigner: Presigner::default(),
            presign_key: Self::presign_key(&daemon, &identity, server_id),
            daemon,
            identity,
            opened: Instant::now(),
        }
    }

    /// Everything an assertion's claims take from the connection (all but `iat`, `exp`, `jti`
    /// and the roles): connections with equal keys get identical assertions.
    fn presign_key(daemon: &Daemon, identity: &Identity, server_id: usize) -> Option<Arc<str>> {
        daemon.ca.as_ref()?;
        let claims = (
            server_id,
            identity.workload_id.as_deref()?,
            identity.uid,
            &identity.exe,
            &identity.cgroup,
            &identity.placement.container,
            &identity.placement.pod,
        );
        // Plain data: serialising it cannot fail.
        serde_json::to_string(&claims).ok().map(Into::into)
    }

    /// The claims of an identity assertion for a request granted by `roles`.
    fn assertion_claims<'a>(&'a self, workload_id: &'a str, roles: &'a [String]) -> Claims<'a> {
        let naming = &self.daemon.config.naming;
        let now = crate::ca::unix_now();
        Claims {
            iss: &naming.node,
            sub: workload_id,
            aud: self.server_name(),
            iat: now,
            exp: now + naming.assertion_ttl.as_secs(),
            jti: crate::ca::random_id(),
            uid: self.identity.uid,
            exe: self.identity.exe.as_deref(),
            cgroup: self.identity.cgroup.as_deref(),
            container: self.identity.placement.container.as_deref(),
            pod: self.identity.placement.pod.as_deref(),
            roles,
        }
    }

    /// The identity assertion for a request granted by `roles`: a pre-signed one (this
    /// connection's, else its workload's) if it names the same roles and is fresh, otherwise
    /// signed now (ES256 costs tens of µs).
    fn assertion(&self, ca: &crate::ca::NodeCa, workload_id: &str, roles: &[String]) -> String {
        let now = Instant::now();
        if let Some(token) = self.presigner.take(roles, now) {
            return token;
        }
        if let Some(key) = &self.presign_key
            && let Some(token) = self.daemon.presigns.take(key, roles, now)
        {
            return token;
        }
        ca.sign(&self.assertion_claims(workload_id, roles))
    }

    /// Signs the assertion for the next request in a task of its own, which the worker runs
    /// while this request waits for the upstream: at `concurrency 1` the signature is then off
    /// the request path. Only when it will likely be used: for this connection, if the agent
    /// forwarded its previous request on it less than [`PRESIGNED_MAX_AGE`] ago; on a
    /// connection's first request, for the workload's next request on any connection, if the
    /// workload's previous such request came as recently (agents that connect per call). Never
    /// while an unused one waits (concurrent HTTP/2 streams), and only when assertions live
    /// long enough ([`PRESIGN_MIN_TTL`]) for the age not to matter.
    fn presign(self: &Arc<Self>, roles: &[String]) {
        // No key: no assertions (no CA, or no workload id).
        let Some(key) = &self.presign_key else {
            return;
        };
        if self.daemon.config.naming.assertion_ttl < PRESIGN_MIN_TTL {
            return;
        }
        let now = Instant::now();
        let for_workload = match self.presigner.pace(now) {
            Pace::Connection => None,
            Pace::Workload if self.daemon.presigns.wanted(key, now) => Some(key.clone()),
            Pace::Workload | Pace::Nothing => return,
        };
        let conn = self.clone();
        let roles = roles.to_vec();
        tokio::spawn(async move {
            // Behind the pooled connection's task, which is about to write this request: the
            // upstream gets it first, then the worker signs while waiting for the answer.
            tokio::task::yield_now().await;
            let (Some(ca), Some(wid)) = (&conn.daemon.ca, &conn.identity.workload_id) else {
                return;
            };
            let at = Instant::now();
            let token = ca.sign(&conn.assertion_claims(wid, &roles));
            let p = Presigned { roles, at, token };
            match for_workload {
                None => conn.presigner.offer(p),
                Some(key) => conn.daemon.presigns.offer(&key, p),
            }
        });
    }

    /// The current policy and this connection's tier-1 grant under it.
    fn policy(&self) -> (Arc<Policy>, Arc<Grant>) {
        let policy = self.daemon.policy();
        let mut cached = lock(&self.grant);
        if let Some((p, g)) = cached.as_ref()
            && Arc::ptr_eq(p, &policy)
        {
            return (policy, g.clone());
        }
        let grant = Arc::new(policy.grant(&self.subject(), self.server_name()));
        *cached = Some((policy.clone(), grant.clone()));
        (policy, grant)
    }

    /// Opens this workload's upstream connection ahead of its first request when its pool on
    /// this worker has none open ([`crate::upstream::Upstream::warm`]): only for a server a
    /// role of this identity grants, and not once revoked. (The grant, resolved here once per
    /// connection and policy, is the first request's unless the policy is reloaded between:
    /// then one connection may have been opened that no request uses.)
    pub fn warm_upstream(&self) {
        if self.revoked_reason().is_some() || !self.policy().1.grants_server() {
            return;
        }
        self.daemon.upstreams[self.server_id].warm(
            self.daemon.ca.as_ref(),
            self.identity.workload_id.as_deref(),
        );
    }

    /// Revokes this connection (idempotent).
    pub fn revoke(&self, reason: String) {
        self.revoked.set(reason);
    }

    fn revoked_reason(&self) -> Option<&str> {
        self.revoked.reason()
    }

    /// The answer to a request of a revoked identity.
    fn revoked_error(reason: &str, id: Option<Value>) -> Value {
        jsonrpc::error_response(
            id,
            code::INTERNAL_ERROR,
            &format!("interceptor: access revoked: {reason}"),
        )
    }

    /// (bytes forwarded up, bytes relayed down, JSON-RPC messages) so far.
    pub fn totals(&self) -> (u64, u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    /// Records one `mcp.response` event for `response` if it answers a pending request.
    fn audit_response(&self, pending: &mut PendingMap, response: &Value) {
        let items: Vec<&Value> = match response {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for r in items {
            if r.get("method").is_some() {
                continue;
            }
            let Some(p) = r.get("id").and_then(|id| pending.remove(&id.to_string())) else {
                continue;
            };
            let id = r.get("id").cloned().unwrap_or(Value::Null);
            let (outcome, code) = match (r.get("result"), r.get("error")) {
                (Some(res), _) if res.get("isError") == Some(&Value::Bool(true)) => {
                    ("tool_error", None)
                }
                (Some(_), _) => ("result", None),
                // JSON-RPC codes are integers; anything else the server sends is not recorded
                // (it could be any size).
                (None, Some(e)) => (
                    "error",
                    e.get("code").filter(|c| c.is_i64() || c.is_u64()).cloned(),
                ),
                (None, None) => ("unknown", None),
            };
            // A tools/call answered with a task: its id names it from now on, for its
            // starter only.
            let task = r
                .get("result")
                .filter(|_| p.method == "tools/call")
                .and_then(tasks::started);
            if let (Some((task_id, ttl)), Some(tool)) = (task, &p.target)
                && !self.daemon.tasks.started(
                    self.session_scope(),
                    task_id,
                    &self.session_owner(),
                    tool,
                    ttl,
                )
            {
                warn!(
                    server.name = self.server_name(),
                    "an MCP task could not be remembered (its id is over 256 bytes, or the task \
                     table is full): requests naming it will be refused"
                );
            }
            self.audit_response_event(&p, id, outcome, code, task.map(|(t, _)| t));
        }
    }

    /// Records the `mcp.response` event of pending request `p`.
    fn audit_response_event(
        &self,
        p: &Pending,
        id: Value,
        outcome: &str,
        code: Option<Value>,
        task: Option<&str>,
    ) {
        let mut event = audit::Event::new("mcp.response")
            .raw("identity", &p.who)
            .field("server", self.server_name())
            .field("method", &p.method)
            .field("tool", &self.tool_of(&p.method, p.target.as_deref()))
            .field("name", &p.target)
            .field("id", &id)
            .field("outcome", outcome)
            .field("error_code", &code)
            .field("latency_us", &(p.started.elapsed().as_micros() as u64))
            .field("session", &p.session);
        if let Some(task) = task {
            event = event.field("task_id", &self.recorded(task));
        }
        self.daemon.audit.record_later(event);
    }

    /// The tool a request's events name: a `tools/call`'s, or the one that started the task a
    /// `tasks/…` request names (`target`: as the events name it).
    fn tool_of(&self, method: &str, target: Option<&str>) -> Option<String> {
        let target = target?;
        if method == "tools/call" {
            Some(target.to_owned())
        } else if tasks::names_task(method) {
            self.daemon.tasks.tool(self.session_scope(), target)
        } else {
            None
        }
    }

    /// The answer when the upstream side fails: the pending requests are audited as
    /// `upstream_error`, and the agent gets HTTP 502 with JSON-RPC -32603 saying why.
    fn upstream_failed(
        &self,
        mut pending: Awaiting,
        message: impl Into<String>,
    ) -> Response<ProxyBody> {
        let message = message.into();
        let body = Self::errors_for(&pending, |id| {
            jsonrpc::error_response(id, code::INTERNAL_ERROR, &message)
        });
        pending.settle("upstream_error", None);
        json_response(StatusCode::BAD_GATEWAY, &body)
    }

    /// The answer to requests that get no upstream answer: `error(id)` for each request
    /// awaiting one, by its id (a client matches answers by id), as an array for a batch; with
    /// none awaited (notifications only), one with no id.
    fn errors_for(pending: &Awaiting, error: impl Fn(Option<Value>) -> Value) -> Value {
        let mut ids: Vec<Value> = pending
            .keys()
            .filter_map(|k| serde_json::from_str(k).ok())
            .collect();
        match (pending.batch, ids.len()) {
            (_, 0) => error(None),
            (false, _) => error(ids.pop()),
            (true, _) => Value::Array(ids.into_iter().map(|id| error(Some(id))).collect()),
        }
    }

    /// `mcp.response` events for requests that will get no upstream answer.
    fn audit_failed(&self, pending: PendingMap, outcome: &str, code: Option<i64>) {
        let code = code.map(Value::from);
        for (id, p) in pending {
            let id = serde_json::from_str::<Value>(&id).unwrap_or(Value::Null);
            self.audit_response_event(&p, id, outcome, code.clone(), None);
        }
    }

    fn subject(&self) -> Subject<'_> {
        Subject {
            cgroup: self.identity.cgroup.as_deref(),
            uid: Some(self.identity.uid),
            gid: Some(self.identity.gid),
            exe: self.identity.exe.as_deref(),
            comm: Some(&self.identity.comm),
            workload_id: self.identity.workload_id.as_deref(),
        }
    }

    fn owner(&self) -> Owner {
        Owner {
            uid: self.identity.uid,
            gid: self.identity.gid,
            cgroup_id: self.identity.cgroup_id,
            exe: self.identity.exe.clone(),
        }
    }

    /// Who a Streamable HTTP session belongs to: the workload (uid, gid, cgroup), not the
    /// executable (an upgraded agent's reads "… (deleted)" until it restarts).
    fn session_owner(&self) -> Owner {
        Owner {
            uid: self.identity.uid,
            gid: self.identity.gid,
            cgroup_id: self.identity.cgroup_id,
            exe: None,
        }
    }

    /// Where this connection's sessions live: its upstream (see
    /// [`crate::config::Server::session_scope`]).
    fn session_scope(&self) -> usize {
        self.daemon.config.servers[self.server_id].session_scope
    }

    pub(crate) fn server_name(&self) -> &str {
        &self.daemon.config.servers[self.server_id].name
    }

    fn rejected(&self) {
        self.daemon
            .counters
            .rejected
            .fetch_add(1, Ordering::Relaxed);
    }

    /// [`Conn::handle`] within the bound on requests in flight (`proxy.max_requests_in_flight`,
    /// `…_per_cgroup`): each is counted from its head until its answer's last byte is handed on
    /// (a stream for as long as it is open), for each holds an upstream connection, and one
    /// agent with many connections of many HTTP/2 streams would otherwise take every
    /// descriptor the daemon has (and with them the admin socket `revoke` needs).
    async fn handle_counted(self: &Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let mut slot = self.daemon.in_flight.hold(self.identity.cgroup_id);
        if let Err(over) = slot.take(1) {
            self.rejected();
            self.daemon
                .counters
                .over_in_flight
                .fetch_add(1, Ordering::Relaxed);
            info!(http.method = %req.method(), reason = over.reason(), "request refused: too many in flight");
            return self.refused_unread(&req, busy(over));
        }
        // After the bound on requests in flight: one refused there spends no request of the
        // rate.
        if let Some(rate) = &self.daemon.rate
            && let Err(wait) = rate.take(self.identity.cgroup_id, Instant::now())
        {
            self.rejected();
            self.daemon
                .counters
                .over_rate
                .fetch_add(1, Ordering::Relaxed);
            info!(http.method = %req.method(), wait_ms = wait.as_millis() as u64, "request refused: over its cgroup's request rate (proxy.max_requests_per_second_per_cgroup)");
            return self.refused_unread(&req, too_many(wait));
        }
        self.handle(req)
            .await
            .map(|body| budget::WithHeld::new(body, slot).boxed())
    }

    /// `response` to `req`, refused before its body is read: on HTTP/1 this request's framing
    /// verdict is taken (the next request's must be the next one's), and the connection
    /// closed: a body left unread would be taken for the next request.
    fn refused_unread(
        &self,
        req: &Request<Incoming>,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        if req.version() < http::Version::HTTP_2 {
            lock(&self.verdicts).pop_front();
            return closing(response);
        }
        response
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let watched =
            if req.version() < http::Version::HTTP_2 {
                // No verdict: the watch lost this connection's framing (a chunk size or head it
                // could not parse) and cannot vouch for this request. Fail closed.
                lock(&self.verdicts).pop_front().unwrap_or_else(|| {
                    Err("the request framing on this connection could not be followed (a malformed \
                     chunk size or request head); reconnect"
                    .into())
                })
            } else {
                Ok(())
            };
        if let Err(why) = watched.and_then(|()| check_framing(req.headers())) {
            self.rejected();
            info!(http.method = %req.method(), reason = %why, "request refused: ambiguous framing");
            // The rest of this connection's byte stream cannot be trusted either.
            return closing(error_response(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                format!("ambiguous HTTP framing: {why}"),
            ));
        }
        // MCP uses POST (messages), GET (server stream) and DELETE (end session); anything else
        // would reach the upstream unjudged.
        let method = req.method().clone();
        if method != Method::POST && method != Method::GET && method != Method::DELETE {
            self.rejected();
            info!(http.method = %method, "request refused: HTTP method not used by MCP");
            let mut resp = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                code::INVALID_REQUEST,
                format!("HTTP method {method} is not used by MCP; use POST, GET or DELETE"),
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST, GET, DELETE"));
            return resp;
        }
        if let Err(why) = check_target(req.uri()) {
            self.rejected();
            info!(http.method = %method, reason = %why, "request refused: request target");
            return error_response(StatusCode::BAD_REQUEST, code::INVALID_REQUEST, why);
        }
        if !self.daemon.config.servers[self.server_id].serves_path(req.uri().path()) {
            self.rejected();
            // The path only: a query string may carry tokens.
            info!(http.method = %method, path = %self.redacted(req.uri().path()), "request refused: path not in the server's paths");
            return error_response(
                StatusCode::NOT_FOUND,
                code::INVALID_REQUEST,
                format!(
                    "{} is not a path of server {} agents may use (its paths in the \
                     interceptor's config)",
                    req.uri().path(),
                    self.server_name()
                ),
            );
        }
        if let Err(why) = check_value_shapes(req.headers()) {
            self.rejected();
            info!(http.method = %method, reason = %why, "request refused: Mcp-* header value");
            return error_response(StatusCode::BAD_REQUEST, code::INVALID_REQUEST, why);
        }
        let (parts, body) = req.into_parts();
        let limit = self.daemon.config.proxy.max_body_bytes;
        // Bounded in time too (HTTP/1 and HTTP/2): a body trickled in would hold its buffer
        // and its connection slot for good. And in all: see `budget`.
        let deadline = self.daemon.config.proxy.body_timeout;
        let mut held = self.daemon.buffers.hold(self.identity.cgroup_id);
        let read = tokio::time::timeout(deadline, held.collect(body, limit));
        let Ok(read) = read.await else {
            self.rejected();
            info!(http.method = %method, "request refused: body not sent in time");
            return closing(error_response(
                StatusCode::REQUEST_TIMEOUT,
                code::INVALID_REQUEST,
                format!(
                    "the request body did not arrive within {} (proxy.body_timeout)",
                    humantime::format_duration(deadline)
                ),
            ));
        };
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(budget::Refused::TooLarge) => {
                self.rejected();
                info!(too_large = true, "request body refused");
                return error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    code::INVALID_REQUEST,
                    format!("request body over {limit} bytes (proxy.max_body_bytes)"),
                );
            }
            Err(budget::Refused::Over(over)) => {
                self.rejected();
                self.daemon
                    .counters
                    .over_budget
                    .fetch_add(1, Ordering::Relaxed);
                info!(reason = over.reason(), "request body refused: buffers full");
                return busy(over);
            }
            Err(budget::Refused::Read(e)) => {
                self.rejected();
                info!(error = %e, "request body refused");
                return error_response(
                    StatusCode::BAD_REQUEST,
                    code::INVALID_REQUEST,
                    format!("reading request body: {e}"),
                );
            }
        };
        if method == Method::POST {
            // The body's bytes stay counted until it is judged and forwarded.
            let response = self.post(parts, bytes).await;
            drop(held);
            return response;
        }
        if !bytes.is_empty() {
            self.rejected();
            info!(http.method = %method, "request refused: body on a GET/DELETE");
            return error_response(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                format!("a {method} request carries no body in MCP"),
            );
        }
        if let Some(reason) = self.revoked_reason() {
            self.record_http_refusal(&parts, "access revoked");
            return closing(error_response(
                StatusCode::FORBIDDEN,
                code::INTERNAL_ERROR,
                format!("interceptor: access revoked: {reason}"),
            ));
        }
        // No JSON-RPC to judge, but the server itself must be granted (tier 1).
        let generation = self.daemon.policy_generation();
        let (policy, grant) = self.policy();
        let decision = policy.check_server_granted(&grant, self.server_name());
        if !decision.allow {
            // Refusals are recorded while the log is writable (they must not pile up in its
            // backlog otherwise).
            if self.daemon.audit.healthy() {
                let event = self.http_request_event(&parts, &decision);
                self.daemon.audit.record_later(event);
            }
            return self.server_refused(method.as_str(), &decision);
        }
        if let Some((refused, why)) = self.foreign_session(&parts.headers) {
            // On record, as refused POSTs are: an attempt on another identity's session.
            self.record_http_refusal(&parts, why);
            return refused;
        }
        if let Some(refused) = self.not_mcp_shaped(&method, &parts) {
            return refused;
        }
        // Forwarded without a JSON-RPC message (a stream opened, a session ended, any path
        // when the server has no `paths`): on record first, as a request would be.
        if let Err(e) = self
            .daemon
            .audit
            .record(self.http_request_event(&parts, &decision))
            .await
        {
            warn!(error = %e, "audit log unavailable; request not forwarded");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                code::INTERNAL_ERROR,
                format!("interceptor: request not forwarded: {e}"),
            );
        }
        // A GET's answer is a server stream, judged again by its server's grant alone.
        let stream = (method == Method::GET).then(|| ServerStream {
            subscribed: Vec::new(),
            tasks: Vec::new(),
            generation,
        });
        self.forward(
            parts,
            Bytes::new(),
            stream,
            Awaiting::new(self, PendingMap::new(), false),
            &decision.roles,
        )
        .await
    }

    /// Records a GET or DELETE refused before any policy rule (`http.request`, denied with
    /// `why`), while the log is writable (refusals must not pile up in its backlog).
    fn record_http_refusal(&self, parts: &http::request::Parts, why: &str) {
        if self.daemon.audit.healthy() {
            let decision = Decision::refused(format!("refused before policy: {why}"));
            self.daemon
                .audit
                .record_later(self.http_request_event(parts, &decision));
        }
    }

    /// A GET or DELETE that is not what MCP sends (`Some` is the refusal): a DELETE ends the
    /// Streamable HTTP session its `Mcp-Session-Id` names, so one without it is no MCP
    /// request (on a server without `paths`, it would reach any endpoint of the upstream);
    /// a legacy SSE session's message URL takes POSTs only (a GET or DELETE there would reach
    /// another identity's session past the owner check, which judges POSTs).
    fn not_mcp_shaped(
        &self,
        method: &Method,
        parts: &http::request::Parts,
    ) -> Option<Response<ProxyBody>> {
        let refuse = |why: &str| {
            self.rejected();
            info!(http.method = %method, path = %self.redacted(parts.uri.path()), reason = why, "request refused: not an MCP request");
            // On record, as other refused requests are (an attempt on another identity's
            // session included).
            self.record_http_refusal(parts, why);
            error_response(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                why.to_owned(),
            )
        };
        if method == Method::DELETE && !parts.headers.contains_key("mcp-session-id") {
            return Some(refuse(
                "a DELETE ends the MCP session its Mcp-Session-Id header names; this one names none",
            ));
        }
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let Ok(key) = session_key(self.session_scope(), pq) else {
            return Some(refuse("ambiguous request target"));
        };
        let (own_url, any_live) = {
            let sessions = lock(&self.daemon.sessions);
            (sessions.get(&key).is_some(), sessions.any_live())
        };
        // By a query parameter naming a session (its name or id), not by the path alone: a
        // session's message path may be where streams are opened too (the Go SDK announces
        // `/sse?sessionid=…`, its GET path), and a path reaches no session without its id.
        let names_live = own_url || any_live && self.names_live_session(&key, pq, false);
        names_live.then(|| {
            refuse("a legacy SSE session's message URL takes POSTs only (its stream is the GET of the endpoint that announced it)")
        })
    }

    /// Whether a request to `key` (at the raw `pq`) names a live legacy SSE session
    /// ([`request_names`]), by its path too or only by its query (`by_path`). What it names is
    /// built before the sessions are locked (a query may hold thousands of pairs).
    fn names_live_session(&self, key: &str, pq: &str, by_path: bool) -> bool {
        let names = request_names(key, pq);
        // The path is named first.
        let names = if by_path { &names[..] } else { &names[1..] };
        lock(&self.daemon.sessions).names_any(names)
    }

    /// The answer to an HTTP request that carries nothing to judge but the server (a GET or
    /// DELETE, or a POST of responses to the server's requests) when no role grants the server.
    fn server_refused(&self, what: &str, decision: &Decision) -> Response<ProxyBody> {
        self.daemon.counters.denied.fetch_add(1, Ordering::Relaxed);
        info!(http.method = what, server.name = self.server_name(),
            authz.decision = "deny", authz.rule = %decision.rule, "mcp request");
        error_response(
            StatusCode::FORBIDDEN,
            code::INVALID_REQUEST,
            format!(
                "server {} refused by policy (interceptor)",
                self.server_name()
            ),
        )
    }

    /// A Streamable HTTP session the request names must be the caller's own (see
    /// [`session::BoundSessions`]); `Some` is the refusal.
    fn foreign_session(
        &self,
        headers: &http::HeaderMap,
    ) -> Option<(Response<ProxyBody>, &'static str)> {
        let mut ids = headers.get_all("mcp-session-id").iter();
        let id = ids.next()?;
        if ids.next().is_some() {
            self.rejected();
            info!("request refused: repeated Mcp-Session-Id");
            let why = "repeated Mcp-Session-Id header";
            return Some((
                error_response(StatusCode::BAD_REQUEST, code::INVALID_REQUEST, why),
                why,
            ));
        }
        // Session ids are visible ASCII (the specification); a value with anything else
        // (h2 keeps a trailing tab that HTTP/1 parsers and servers trim) would be another
        // key here but the same session upstream.
        if !id.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b)) {
            self.rejected();
            info!("request refused: Mcp-Session-Id is not visible ASCII");
            return Some((
                error_response(
                    StatusCode::BAD_REQUEST,
                    code::INVALID_REQUEST,
                    "Mcp-Session-Id must be visible ASCII (0x21-0x7E), without spaces or tabs",
                ),
                "the Mcp-Session-Id is not visible ASCII",
            ));
        }
        match self.daemon.bound_sessions.check(
            self.session_scope(),
            id.as_bytes(),
            &self.session_owner(),
        ) {
            SessionUse::Own | SessionUse::Unbound => None,
            // Its owner was forgotten for room (closed, so it cannot be taken over): an
            // expired session, which clients answer by starting a new one.
            SessionUse::Forgotten => {
                self.rejected();
                info!("request refused: the Mcp-Session-Id was ended or forgotten for room");
                Some((
                    error_response(
                        StatusCode::NOT_FOUND,
                        code::INVALID_REQUEST,
                        "session ended or expired at the interceptor (ended by a DELETE, or \
                         idle longest when room was needed); start a new session",
                    ),
                    "the session was ended or forgotten for room",
                ))
            }
            SessionUse::Foreign => {
                self.rejected();
                warn!("request refused: the Mcp-Session-Id belongs to another identity");
                Some((
                    error_response(
                        StatusCode::FORBIDDEN,
                        code::INVALID_REQUEST,
                        "this session belongs to another identity",
                    ),
                    "the session belongs to another identity",
                ))
            }
        }
    }

    /// Records the requests and notifications of a body refused before any policy decision
    /// (every JSON-RPC request is in the audit log, refused ones too), denied with `why`.
    fn record_refused(&self, parts: &http::request::Parts, body: &jsonrpc::Body, why: &str) {
        // While the log is unwritable nothing is recorded (requests are refused without events
        // then too): refusals must not pile up in its backlog.
        if !self.daemon.audit.healthy() {
            return;
        }
        let headers = &parts.headers;
        let path = self.audit_path(parts);
        let decision = Decision::refused(format!("refused before policy: {}", capped(why)));
        let session = headers.get("mcp-session-id").and_then(|v| v.to_str().ok());
        let protocol = headers
            .get("mcp-protocol-version")
            .map_or("unspecified", |v| v.to_str().unwrap_or("invalid"));
        for m in body.messages.iter().filter(|m| m.method().is_some()) {
            self.daemon.audit.record_later(
                self.request_event(m, &decision, &self.audit_target(m), session, protocol)
                    .field("path", &path),
            );
        }
    }

    /// The request's path and query as its events record them: redacted (a query may carry
    /// a token) and capped.
    fn audit_path(&self, parts: &http::request::Parts) -> String {
        self.recorded(parts.uri.path_and_query().map_or("/", |pq| pq.as_str()))
    }

    /// Agent text as events record it: secrets of a known shape redacted, capped.
    fn recorded(&self, text: &str) -> String {
        capped(&self.redacted(text))
    }

    /// Agent text as the daemon's log lines show it: secrets of a known shape redacted.
    fn redacted<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        self.daemon.audit.redactor.redact_text(text)
    }

    async fn post(
        self: &Arc<Self>,
        parts: http::request::Parts,
        bytes: Bytes,
    ) -> Response<ProxyBody> {
        // What is judged must be what is read: no compressed (or otherwise encoded) bodies.
        if let Some(encoding) = parts
            .headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .find(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            self.rejected();
            info!(content_encoding = ?encoding, "request refused: encoded body");
            return error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code::INVALID_REQUEST,
                format!(
                    "Content-Encoding {encoding:?} is not accepted on MCP requests (the \
                     interceptor reads what it judges); send the JSON uncompressed"
                ),
            );
        }
        if let Err(why) = check_charset(&parts.headers) {
            self.rejected();
            info!(reason = %why, "request refused: charset");
            return error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code::INVALID_REQUEST,
                why,
            );
        }
        let body = match jsonrpc::parse(&bytes, &self.daemon.config.proxy.limits()) {
            Ok(b) => b,
            Err(e) => {
                self.rejected();
                info!(error = %e, "request refused: malformed JSON-RPC");
                return json_response(StatusCode::BAD_REQUEST, &e.to_response());
            }
        };
        if let Some(reason) = self.revoked_reason() {
            info!(reason = %reason, "request refused: identity revoked");
            self.record_refused(&parts, &body, &format!("access revoked: {reason}"));
            let errors: Vec<Value> = body
                .messages
                .iter()
                .filter_map(|m| {
                    m.id()
                        .map(|id| Self::revoked_error(reason, Some(id.clone())))
                })
                .collect();
            return closing(match (body.batch, errors.len()) {
                (_, 0) => error_response(
                    StatusCode::FORBIDDEN,
                    code::INTERNAL_ERROR,
                    format!("interceptor: access revoked: {reason}"),
                ),
                (false, _) => json_response(StatusCode::FORBIDDEN, &errors[0]),
                (true, _) => json_response(StatusCode::FORBIDDEN, &Value::Array(errors)),
            });
        }
        if let Err(e) = check_mcp_headers(&parts.headers, &body).and_then(|()| {
            self.daemon
                .mirrors
                .check(self.session_scope(), &parts.headers, &body)
        }) {
            self.rejected();
            info!(error = %e, "request refused: Mcp-* header disagrees with the body");
            self.record_refused(&parts, &body, &e.message);
            return json_response(StatusCode::BAD_REQUEST, &e.to_response());
        }
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let key = match session_key(self.session_scope(), pq) {
            Ok(k) => k,
            Err(why) => {
                self.rejected();
                info!(reason = %why, "request refused: ambiguous request target");
                self.record_refused(&parts, &body, &why);
                return error_response(StatusCode::BAD_REQUEST, code::INVALID_REQUEST, why);
            }
        };
        let (legacy, any_live) = {
            let sessions = lock(&self.daemon.sessions);
            (sessions.get(&key).cloned(), sessions.any_live())
        };
        let names_live = legacy.is_none() && any_live && self.names_live_session(&key, pq, true);
        if names_live {
            self.rejected();
            warn!(path = %self.redacted(parts.uri.path()), "request refused: names a live legacy SSE session, but not by its URL");
            self.record_refused(
                &parts,
                &body,
                "names a live legacy SSE session, but not by its URL",
            );
            // 400, not 404: a Streamable HTTP client takes 404 for "session gone" and would
            // start over, into the same refusal.
            return error_response(
                StatusCode::BAD_REQUEST,
                code::INVALID_REQUEST,
                "no legacy SSE session has this URL, but it names one (its path, session \
                 parameter or id): post to the URL of your stream's endpoint event, as given",
            );
        }
        if let Some(s) = &legacy
            && s.owner != self.owner()
        {
            self.rejected();
            warn!("request refused: legacy SSE session belongs to another identity");
            self.record_refused(&parts, &body, "the session belongs to another identity");
            return error_response(
                StatusCode::FORBIDDEN,
                code::INVALID_REQUEST,
                "this session belongs to another identity",
            );
        }
        if let Some((refused, why)) = self.foreign_session(&parts.headers) {
            self.record_refused(&parts, &body, why);
            return refused;
        }

        // The wire generation, for logs: a legacy SSE session, else the negotiated header.
        let protocol = match (&legacy, parts.headers.get("mcp-protocol-version")) {
            (Some(_), _) => "2024-11-05".to_owned(),
            (None, Some(v)) => v.to_str().unwrap_or("invalid").to_owned(),
            (None, None) => "unspecified".to_owned(),
        };
        // Where it went: the server may serve more than MCP on its port.
        let path = self.audit_path(&parts);
        // As recorded (and kept with each pending request until its answer): capped, so a
        // session URL padded to the head limit is not copied into every event of the session.
        // A legacy session's is its URL, recorded as the path (an endpoint may carry a
        // credential beside the session id).
        let session_id = match &legacy {
            Some(_) => Some(path.clone()),
            None => parts
                .headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .map(capped),
        };
        let generation = self.daemon.policy_generation();
        let (policy, grant) = self.policy();
        // Responses to the server's requests have no method to judge (they pass, audited as
        // `mcp.client_response`), but they reach the server only if it is granted (tier 1).
        if body.messages.iter().any(|m| m.method().is_none()) {
            let decision = policy.check_server_granted(&grant, self.server_name());
            if !decision.allow {
                self.record_refused(
                    &parts,
                    &body,
                    &format!("no role grants the server ({})", decision.rule),
                );
                return self.server_refused("POST (responses)", &decision);
            }
        }
        // A sampling result with `tool_use` content (sampling with tools) has the server run
        // those tools for the agent's model: the agent's answer to `sampling/createMessage`
        // (2025-11-25), or a request's `params.inputResponses` (2026-07-28). Each is judged as
        // a call of that tool by this identity: a request carrying a denied one is denied (in
        // `decide`); an answer holding one is recorded as refused and reaches the server as an
        // error for its request (which then fails at once instead of waiting for an answer).
        let refused_answers: Vec<Option<Decision>> = body
            .messages
            .iter()
            .map(|m| match m {
                Message::Response { .. } => self.judge_tool_uses(&policy, &grant, m),
                _ => None,
            })
            .collect();
        let decisions: Vec<Option<Decision>> = body
            .messages
            .iter()
            .map(|m| self.decide(&policy, &grant, m, &protocol))
            .collect();
        self.requests
            .fetch_add(body.messages.len() as u64, Ordering::Relaxed);
        // Write-ahead: every request and notification is in the audit log before anything is
        // forwarded; if the log cannot be written, allowed requests are refused (fail closed).
        let denied = decisions.iter().flatten().any(|d| !d.allow);
        // What each message is named by in its events (request, and response): redacted once.
        let targets: Vec<Option<String>> =
            body.messages.iter().map(|m| self.audit_target(m)).collect();
        let events: Vec<audit::Event> = body
            .messages
            .iter()
            .zip(&decisions)
            .zip(&targets)
            .zip(&refused_answers)
            .map(|(((m, d), target), refused)| match d {
                Some(d) => self
                    .request_event(m, d, target, session_id.as_deref(), &protocol)
                    .field("path", &path),
                // The agent's answers to the server's requests (sampling, elicitation, roots)
                // are what the server acts on: on record too (not forwarded when the batch
                // they came in is refused, nor when this write fails).
                None => {
                    let event = self
                        .client_response_event(m, session_id.as_deref(), &protocol)
                        .field("batch_refused", &denied)
                        .field("path", &path);
                    match refused {
                        Some(r) => event.field("decision", "deny").field("rule", &r.rule),
                        None => event,
                    }
                }
            })
            .collect();
        // The allowed requests' answers are owed from here on: built before their events are
        // written, so one dropped meanwhile (agent gone, daemon stopping) still gets its
        // `cancelled` after them.
        let post = next_post();
        let map: PendingMap = body
            .messages
            .iter()
            .zip(&decisions)
            .zip(targets)
            .filter_map(|((m, d), target)| match (m, d) {
                (Message::Request { id, method, .. }, Some(d)) if d.allow => Some((
                    id.to_string(),
                    // Kept until the response: as long as the audit event names them, no longer
                    // (a URI or method may be megabytes; a session holds thousands).
                    Pending {
                        method: capped(method),
                        target,
                        started: Instant::now(),
                        session: session_id.clone(),
                        post,
                        who: self.who.clone(),
                    },
                )),
                _ => None,
            })
            .collect();
        let mut pending = Awaiting::new(self, map, body.batch);
        if let Err(e) = self.daemon.audit.record_all(events).await {
            match e {
                // In the file, not on stable storage: answered with the error below (or, in a
                // batch refused for a denied request, with -32600 further down).
                audit::Error::NotDurable(_) => {
                    if !denied {
                        pending.settle("error", Some(code::INTERNAL_ERROR));
                    }
                }
                // Not recorded: no response is either.
                _ => pending.forget(),
            }
            warn!(error = %e, "audit log unavailable; request not forwarded");
            if !denied {
                let first = &body.messages[0];
                let id = if body.batch || first.method().is_none() {
                    None
                } else {
                    first.id().cloned()
                };
                return json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &jsonrpc::error_response(
                        id,
                        code::INTERNAL_ERROR,
                        &format!("interceptor: request not forwarded: {e}"),
                    ),
                );
            }
        }
        if denied {
            // The allowed requests of a refused batch are answered -32600 below.
            pending.settle("error", Some(code::INVALID_REQUEST));
            let errors: Vec<Value> = body
                .messages
                .iter()
                .zip(&decisions)
                .filter_map(|(m, d)| {
                    // An answer to the server's request is owed no answer (its id is the
                    // server's, and may be one of the agent's own).
                    m.method()?;
                    let id = m.id()?.clone();
                    // A request refused for the sampling results it carries is not refused
                    // for its own method or tool: said so, not as a denial of those.
                    let carries_uses = tool_uses(m).map_or(true, |uses| !uses.is_empty());
                    Some(match d {
                        Some(d) if !d.allow && carries_uses => jsonrpc::error_response(
                            Some(id),
                            code::INVALID_PARAMS,
                            "a sampling result in params.inputResponses is refused by policy \
                             (interceptor)",
                        ),
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
                    if session
                        .inject
                        .try_send(sse::Event::message(&e.to_string()))
                        .is_err()
                    {
                        warn!("legacy SSE stream is not being read; refusing the request");
                        return error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            code::INTERNAL_ERROR,
                            "the session's event stream is not being read",
                        );
                    }
                }
                return empty(StatusCode::ACCEPTED);
            }
            return match (body.batch, errors.len()) {
                (_, 0) => empty(StatusCode::ACCEPTED),
                (false, _) => json_response(StatusCode::OK, &errors[0]),
                (true, _) => json_response(StatusCode::OK, &Value::Array(errors)),
            };
        }
        // 2024-11-05: responses arrive on the session's stream, unless it has ended meanwhile
        // (then the POST's own answer settles them).
        let moved = match &legacy {
            Some(session) => match self.move_to_session(session, &mut pending) {
                Ok(moved) => moved,
                Err(over) => return self.refused_for_budget(pending, over),
            },
            None => Vec::new(),
        };
        // 2026-07-28: subscriptions/listen keeps its response open as the server stream,
        // judged again with the resources it subscribes to when the policy changes.
        let listen = (!body.batch && body.messages[0].method() == Some("subscriptions/listen"))
            .then(|| ServerStream {
                subscribed: subscribed(&body.messages[0], "resourceSubscriptions"),
                tasks: subscribed(&body.messages[0], "taskIds"),
                generation,
            });
        let mut roles: Vec<String> = decisions
            .iter()
            .flatten()
            .flat_map(|d| d.roles.clone())
            .collect();
        roles.sort();
        roles.dedup();
        // A refused answer reaches the server as an error for its request (recorded above as
        // the agent sent it, refused).
        let mut body = body;
        for (m, refused) in body.messages.iter_mut().zip(&refused_answers) {
            if let (Message::Response { body: answer, .. }, Some(_)) = (m, refused) {
                *answer = serde_json::Map::from_iter([(
                    "error".to_owned(),
                    serde_json::json!({
                        "code": code::INVALID_REQUEST,
                        "message": "the client's answer was refused by policy (interceptor)",
                    }),
                )]);
            }
        }
        let response = self
            .forward(parts, Bytes::from(body.to_bytes()), listen, pending, &roles)
            .await;
        if let Some(session) = &legacy
            && !moved.is_empty()
            && !response.status().is_success()
        {
            // The POST failed (upstream unreachable, refused it, revoked): no answer will come
            // on the stream for the requests it carried.
            let taken = Self::take_back_from_session(session, &moved, post);
            let outcome = match self.revoked_reason() {
                Some(_) => "revoked",
                None => "upstream_error",
            };
            self.audit_failed(taken, outcome, None);
        }
        response
    }

    /// The requests `ids` of POST `post` still awaited in the legacy session (an id a later
    /// POST reused is that POST's, and stays).
    fn take_back_from_session(session: &LegacySession, ids: &[String], post: u64) -> PendingMap {
        let mut taken = PendingMap::new();
        if let Some(p) = lock(&session.pending).as_mut() {
            for id in ids {
                if p.get(id).is_some_and(|e| e.post == post)
                    && let Some((id, request)) = p.remove_entry(id)
                {
                    taken.insert(id, request);
                }
            }
            release_if_answered(session, p);
        }
        taken
    }

    /// Moves `pending` into the legacy session's map, whose stream carries their answers, and
    /// returns their ids; leaves them if the stream has ended or the map is full. A request
    /// whose id is still awaited in the session displaces that one, recorded as
    /// `no_response` (one answer cannot be told from the other). The records are charged to
    /// the cgroup's buffer budget (an agent that never reads its stream must not hold memory
    /// without end): `Err` when that would go over it, nothing moved.
    fn move_to_session(
        &self,
        session: &LegacySession,
        pending: &mut Awaiting,
    ) -> Result<Vec<String>, budget::Over> {
        let mut displaced = PendingMap::new();
        let moved = {
            let mut p = lock(&session.pending);
            let Some(p) = p
                .as_mut()
                .filter(|p| p.len() + pending.len() <= session::MAX_PENDING)
            else {
                return Ok(Vec::new());
            };
            // What the records will hold (those answered since are counted until the next
            // move: an upper bound), taken before anything moves.
            let bytes: usize = p
                .iter()
                .chain(pending.iter())
                .map(|(id, r)| r.weight(id))
                .sum();
            lock(&session.charged)
                .get_or_insert_with(|| self.daemon.buffers.hold(self.identity.cgroup_id))
                .hold_exactly(bytes)?;
            pending
                .drain()
                .map(|(id, request)| {
                    // An integer id beyond 2^53 is one with its neighbours to a JavaScript
                    // server (2^53 + 1 is read as 2^53): an earlier one of them is displaced
                    // as a reused id is, so that no answer is recorded for the other.
                    if let Some(read) = jsonrpc::rounded_by_some_readers(&id) {
                        let aliases: Vec<String> = p
                            .keys()
                            .filter(|k| **k != id)
                            .filter(|k| jsonrpc::rounded_by_some_readers(k) == Some(read))
                            .cloned()
                            .collect();
                        for k in aliases {
                            if let Some(earlier) = p.remove(&k) {
                                displaced.insert(k, earlier);
                            }
                        }
                    }
                    if let Some(earlier) = p.insert(id.clone(), request) {
                        displaced.insert(id.clone(), earlier);
                    }
                    id
                })
                .collect()
        };
        self.audit_failed(displaced, "no_response", None);
        Ok(moved)
    }

    /// The answer to requests refused for the buffer budget after they were judged (and
    /// recorded): each gets a JSON-RPC error by its id (`mcp.response` outcome `error`), HTTP
    /// 503 with `Retry-After: 1`; nothing was forwarded.
    fn refused_for_budget(&self, mut pending: Awaiting, over: budget::Over) -> Response<ProxyBody> {
        self.daemon
            .counters
            .over_budget
            .fetch_add(1, Ordering::Relaxed);
        info!(reason = over.reason(), "request refused: buffers full");
        let message = format!("interceptor: request not forwarded: {}", over.reason());
        let body = Self::errors_for(&pending, |id| {
            jsonrpc::error_response(id, code::INTERNAL_ERROR, &message)
        });
        pending.settle("error", Some(code::INTERNAL_ERROR));
        retry_after(1, json_response(StatusCode::SERVICE_UNAVAILABLE, &body))
    }

    /// The `mcp.request` event for one message, named by `target` (its [`Conn::audit_target`]).
    fn request_event(
        &self,
        m: &Message,
        d: &Decision,
        target: &Option<String>,
        session: Option<&str>,
        protocol: &str,
    ) -> audit::Event {
        let method = m.method().unwrap_or("");
        let redactor = &self.daemon.audit.redactor;
        let arguments = match (method, m.params()) {
            ("tools/call", _) => m.arguments().map(|a| redactor.redact(a)),
            (_, Some(p)) => Some(redactor.redact_object(p)),
            (_, None) => None,
        };
        // A tools/call's other params members (`_meta`, `task`, anything else) go to the
        // server too: on record beside the arguments.
        let other_params = match (method, m.params()) {
            ("tools/call", Some(p)) if p.keys().any(|k| k != "name" && k != "arguments") => {
                let other: serde_json::Map<String, Value> = p
                    .iter()
                    .filter(|(k, _)| *k != "name" && *k != "arguments")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Some(redactor.redact_object(&other))
            }
            _ => None,
        };
        audit::Event::new("mcp.request")
            .raw("identity", &self.who)
            .field("server", self.server_name())
            .field("method", &capped(method))
            .field("tool", &self.tool_of(method, target.as_deref()))
            .field("name", &target)
            .field("id", &m.id())
            .raw("arguments", arguments.as_deref().unwrap_or("null"))
            .raw("other_params", other_params.as_deref().unwrap_or("null"))
            .field("decision", if d.allow { "allow" } else { "deny" })
            .field("rule", &d.rule)
            .field("roles", &d.roles)
            .field("session", &session)
            .field("protocol", protocol)
    }

    /// `http.request`: a GET or DELETE, which carries no JSON-RPC message but reaches the
    /// server (its path and query redacted: a query may carry a token).
    fn http_request_event(&self, parts: &http::request::Parts, d: &Decision) -> audit::Event {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .map(|v| capped(&String::from_utf8_lossy(v.as_bytes())))
        };
        audit::Event::new("http.request")
            .raw("identity", &self.who)
            .field("server", self.server_name())
            .field("method", parts.method.as_str())
            .field("path", &self.audit_path(parts))
            .field("decision", if d.allow { "allow" } else { "deny" })
            .field("rule", &d.rule)
            .field("roles", &d.roles)
            .field("session", &header("mcp-session-id"))
            .field("protocol", &header("mcp-protocol-version"))
            .field("last_event_id", &header("last-event-id"))
    }

    /// Records `mcp.server_request` for each request of the server in `message` (one message
    /// or a batch, read on a stream): what the server asks the agent to do (sampling — with
    /// the prompt and any tools it offers the agent's model —, elicitation, roots), which
    /// the agent's answer (`mcp.client_response`, by the same `id`) then carries out.
    fn record_server_requests(&self, message: &Value, session: Option<&str>) {
        let items: Vec<&Value> = match message {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for m in items {
            let (Some(method), Some(id)) = (m.get("method").and_then(Value::as_str), m.get("id"))
            else {
                continue;
            };
            let params = m
                .get("params")
                .and_then(Value::as_object)
                .map(|p| self.daemon.audit.redactor.redact_object(p));
            self.daemon.audit.record_later(
                audit::Event::new("mcp.server_request")
                    .raw("identity", &self.who)
                    .field("server", self.server_name())
                    .field("method", &capped(method))
                    .field(
                        "id",
                        &match id {
                            // The server's: any size.
                            Value::String(text) => Value::from(capped(text)),
                            other => other.clone(),
                        },
                    )
                    .raw("params", params.as_deref().unwrap_or("null"))
                    .field("session", &session.map(capped)),
            );
        }
    }

    /// `mcp.client_response`: the agent answering a request of the server (no method to
    /// judge; it reaches the server only if a role grants the server).
    fn client_response_event(
        &self,
        m: &Message,
        session: Option<&str>,
        protocol: &str,
    ) -> audit::Event {
        let (outcome, body) = match m {
            Message::Response { body, .. } => (
                if body.contains_key("error") {
                    "error"
                } else {
                    "result"
                },
                Some(self.daemon.audit.redactor.redact_object(body)),
            ),
            _ => ("result", None),
        };
        audit::Event::new("mcp.client_response")
            .raw("identity", &self.who)
            .field("server", self.server_name())
            .field("id", &m.id())
            .field("outcome", outcome)
            .raw("body", body.as_deref().unwrap_or("null"))
            .field("session", &session)
            .field("protocol", protocol)
    }

    /// What a message's audit events name it by (tool, prompt, resource URI), redacted: a
    /// resource URI may carry credentials (`postgres://user:password@…`).
    fn audit_target(&self, m: &Message) -> Option<String> {
        m.named().or_else(|| m.task_id()).map(|t| self.recorded(t))
    }

    /// Why a server stream opened under an earlier policy may not go on under the current
    /// one: its server no longer granted, or (`subscriptions/listen`) a resource it
    /// subscribed to no longer allowed. `None`: it goes on.
    fn stream_withdrawn(&self, subscribed: &[String], tasks: &[String]) -> Option<String> {
        let (policy, grant) = self.policy();
        if !grant.grants_server() {
            return Some(format!(
                "no role of this identity grants server {:?} any more",
                self.server_name()
            ));
        }
        let task = tasks.iter().find_map(|id| {
            self.task_denial(&policy, &grant, id)
                .map(|d| format!("its task subscription is no longer allowed ({})", d.rule))
        });
        task.or_else(|| {
            subscribed.iter().find_map(|uri| {
                let call = Call::named("resources/subscribe", uri);
                let d = policy.check_granted(&grant, self.server_name(), &call);
                (!d.allow).then(|| {
                    format!(
                        "its subscription to {} is no longer allowed ({})",
                        self.recorded(uri),
                        d.rule
                    )
                })
            })
        })
    }

    /// 2026-07-28: `subscriptions/listen` subscribes to resources too
    /// (`params.notifications.resourceSubscriptions`, which replaces `resources/subscribe`):
    /// each URI is judged as a `resources/subscribe` of it; the first denial, if any.
    fn judge_subscriptions(&self, policy: &Policy, grant: &Grant, m: &Message) -> Option<Decision> {
        let notifications = m.params()?.get("notifications")?;
        // Task status subscriptions (the tasks extension) carry the task's result: judged as
        // naming the task.
        if let Some(ids) = notifications.get("taskIds") {
            let Some(ids) = ids.as_array() else {
                return Some(Decision::refused(
                    "notifications.taskIds is not a list of task ids",
                ));
            };
            for id in ids {
                let Some(id) = id.as_str() else {
                    return Some(Decision::refused(
                        "notifications.taskIds holds something other than a task id",
                    ));
                };
                if let Some(d) = self.task_denial(policy, grant, id) {
                    return Some(d);
                }
            }
        }
        let subscriptions = notifications.get("resourceSubscriptions")?;
        let Some(uris) = subscriptions.as_array() else {
            return Some(Decision::refused(
                "notifications.resourceSubscriptions is not a list of URIs",
            ));
        };
        uris.iter().find_map(|uri| {
            let Some(uri) = uri.as_str() else {
                return Some(Decision::refused(
                    "notifications.resourceSubscriptions holds something other than a URI",
                ));
            };
            let call = Call::named("resources/subscribe", uri);
            let d = policy.check_granted(grant, self.server_name(), &call);
            (!d.allow).then_some(d)
        })
    }

    /// Whether this identity may name task `id`: its workload started it through this proxy,
    /// and a role of it allows the task's tool (argument constraints aside). The denial, if
    /// not (its metrics label without the id, which is the agent's).
    fn task_denial(&self, policy: &Policy, grant: &Grant, id: &str) -> Option<Decision> {
        let shown = || self.recorded(id);
        let refused = |why: &str, generic: &str| {
            Some(Decision::refused_quoting(
                format!("task {:?} {why}", shown()),
                generic.to_owned(),
            ))
        };
        match self
            .daemon
            .tasks
            .check(self.session_scope(), id, &self.session_owner())
        {
            tasks::TaskUse::Own(tool) if policy.tool_usable(grant, &tool) => None,
            tasks::TaskUse::Own(tool) => refused(
                &format!(
                    "started by tool {:?}, which no role of this identity allows",
                    capped(&tool)
                ),
                "the task's tool is not allowed",
            ),
            tasks::TaskUse::Foreign => refused(
                "was started by another identity (or two were answered with its id)",
                "task of another identity",
            ),
            tasks::TaskUse::Unknown => refused(
                "was not started by this identity through this proxy (or was forgotten: \
                 expired, or before a restart)",
                "task unknown to the proxy",
            ),
        }
    }

    /// Drops from `message` (one message or a batch) the task notifications this identity may
    /// not see (they carry the task, its result too: only its starter's); how many, or `None`
    /// when nothing is left (an emptied batch is no message either).
    fn drop_foreign_task_notices(&self, message: &mut Value) -> Option<usize> {
        let dropped = match &mut *message {
            Value::Array(items) => {
                let before = items.len();
                items.retain(|m| !self.foreign_task_notice(m));
                before - items.len()
            }
            m => usize::from(self.foreign_task_notice(m)),
        };
        let emptied = dropped > 0 && message.as_array().is_none_or(Vec::is_empty);
        (!emptied).then_some(dropped)
    }

    /// Whether `m` is a task notification (`notifications/tasks…`) about a task this identity
    /// may not name (or about none): not relayed.
    fn foreign_task_notice(&self, m: &Value) -> bool {
        // Asked of every message of every stream: the policy only for a task notification.
        m.get("method")
            .and_then(Value::as_str)
            .is_some_and(|method| method.starts_with("notifications/tasks"))
            && m.get("params")
                .and_then(|p| p.get("taskId"))
                .and_then(Value::as_str)
                .is_none_or(|id| {
                    let (policy, grant) = self.policy();
                    self.task_denial(&policy, &grant, id).is_some()
                })
    }

    /// The refusal for the sampling results `m` hands the server, if any ([`tool_uses`]): a
    /// `tool_use` of a tool this identity may not call, or a member spelled two ways. Counted
    /// and logged here.
    fn judge_tool_uses(&self, policy: &Policy, grant: &Grant, m: &Message) -> Option<Decision> {
        let (tool, d) = match tool_uses(m) {
            Err(Ambiguous) => (
                None,
                Decision::refused(
                    "a sampling result spells one of its members (content, type, name, input, \
                     inputResponses) two ways: the server might read the one not judged",
                ),
            ),
            Ok(uses) => uses.into_iter().find_map(|(name, input)| {
                let d = policy.check_granted(grant, self.server_name(), &Call::tool(name, input));
                (!d.allow).then_some((Some(name), d))
            })?,
        };
        if m.method().is_none() {
            // (A request's denial is counted with the request's, in `decide`.)
            self.count_denial(&d);
        }
        match tool {
            Some(tool) => {
                warn!(tool = %capped(tool), authz.rule = %d.rule, "refused: a sampling result asks the server to run a tool the policy denies")
            }
            None => {
                warn!(authz.rule = %d.rule, "refused: a sampling result spells a member two ways")
            }
        }
        Some(d)
    }

    /// Counts a policy denial: in all, and by its rule (without what the agent sent).
    fn count_denial(&self, d: &Decision) {
        self.daemon.counters.denied.fetch_add(1, Ordering::Relaxed);
        self.daemon
            .metrics
            .denials
            .get_or_create(&crate::metrics::RuleLabels {
                server: self.server_name().to_owned(),
                rule: d.rule_label().to_owned(),
            })
            .inc();
    }

    /// Decides one message (responses to server requests carry no method and pass).
    fn decide(
        &self,
        policy: &Policy,
        grant: &Grant,
        m: &Message,
        protocol: &str,
    ) -> Option<Decision> {
        let method = m.method()?;
        let (name, reference) = match m.completion_ref() {
            Some((kind, name)) => (name, Some(kind)),
            None => (m.target(), None),
        };
        let call = Call {
            method,
            name,
            arguments: m.arguments(),
            reference,
        };
        let mut d = policy.check_granted(grant, self.server_name(), &call);
        if d.allow && method == "subscriptions/listen" {
            d = self.judge_subscriptions(policy, grant, m).unwrap_or(d);
        }
        if d.allow && tasks::names_task(method) {
            // A string (the parser checked).
            if let Some(id) = m.task_id() {
                d = self.task_denial(policy, grant, id).unwrap_or(d);
            }
        }
        if d.allow {
            d = self.judge_tool_uses(policy, grant, m).unwrap_or(d);
        }
        let counters = &self.daemon.counters;
        let metrics = &self.daemon.metrics;
        metrics
            .requests
            .get_or_create(&crate::metrics::RequestLabels {
                server: self.server_name().to_owned(),
                method: crate::metrics::method_label(method).to_owned(),
                decision: if d.allow { "allow" } else { "deny" }.to_owned(),
            })
            .inc();
        let id = m.id().map(ToString::to_string).unwrap_or_default();
        // Capped (a resource URI or prompt name is the agent's and may be megabytes) and
        // redacted, as in the audit log; only when a line is written.
        let name = || self.audit_target(m).unwrap_or_default();
        if d.allow {
            counters.allowed.fetch_add(1, Ordering::Relaxed);
            debug!(mcp.method = method, mcp.name = name(), mcp.id = %id, mcp.protocol = protocol,
                server.name = self.server_name(), authz.decision = "allow", authz.rule = %d.rule,
                "mcp request");
        } else {
            self.count_denial(&d);
            info!(mcp.method = method, mcp.name = name(), mcp.id = %id, mcp.protocol = protocol,
                server.name = self.server_name(), authz.decision = "deny", authz.rule = %d.rule,
                "mcp request");
        }
        Some(d)
    }

    async fn forward(
        self: &Arc<Self>,
        parts: http::request::Parts,
        bytes: Bytes,
        stream: Option<ServerStream>,
        mut pending: Awaiting,
        roles: &[String],
    ) -> Response<ProxyBody> {
        let server = &self.daemon.config.servers[self.server_id];
        let naming = &self.daemon.config.naming;
        let client = match self.daemon.upstreams[self.server_id].client(
            self.daemon.ca.as_ref(),
            self.identity.workload_id.as_deref(),
        ) {
            Ok(c) => c,
            Err(e) => {
                warn!(server.name = %server.name, error = %e, "no upstream client");
                return self.upstream_failed(
                    pending,
                    format!(
                        "interceptor: upstream {} of server {}: {e}",
                        server.upstream, server.name
                    ),
                );
            }
        };
        let from_get = parts.method == Method::GET;
        let session = parts.headers.get("mcp-session-id").cloned();
        let ending = parts.method == Method::DELETE;
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        // A GET's stream may carry a legacy `endpoint` relative to its path.
        let get_target = from_get.then(|| pq.to_owned());
        // The authority without the configured scheme: hyper's client takes the request
        // target from this URI's path, and TLS (if any) is the pool's business.
        let uri = match format!("http://{}{pq}", server.authority).parse::<http::Uri>() {
            Ok(u) => u,
            Err(e) => {
                pending.settle("error", Some(code::INVALID_REQUEST));
                return error_response(
                    StatusCode::BAD_REQUEST,
                    code::INVALID_REQUEST,
                    format!("bad request target: {e}"),
                );
            }
        };
        let mut builder = Request::builder().method(parts.method.clone()).uri(uri);
        for (name, value) in &parts.headers {
            // The agent may not speak for the node (assertion header) nor, unless the server
            // allows it, pass its own credentials. Nor send a name with `_`: servers behind
            // CGI-style gateways (WSGI, PHP, Django, Rack) read `Mcp_Session_Id` as
            // `Mcp-Session-Id`, a name the proxy judges (sessions, `Mcp-Method`) or drops
            // (`Interceptor_Identity`, `X_Forwarded_For`) under its spelling with `-` only
            // (nginx drops them too, by default).
            let dropped = skip_header(name)
                || name.as_str().contains('_')
                || name == header::CONTENT_TYPE
                || name.as_str() == naming.assertion_header
                || (name == header::AUTHORIZATION && !server.pass_authorization)
                || server
                    .inject_headers
                    .keys()
                    .any(|k| k.eq_ignore_ascii_case(name.as_str()));
            if !dropped {
                builder = builder.header(name, value);
            }
        }
        // The proxy must read what comes back, so it asks for no content encoding.
        builder = builder
            .header(header::HOST, server.authority.as_str())
            .header(header::ACCEPT_ENCODING, "identity");
        if parts.method == Method::POST {
            // What is forwarded is the canonical UTF-8 JSON the proxy judged.
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        // The injected credentials, to keep out of what goes back to the agent.
        let mut secrets = Secrets::default();
        for (name, inject) in &server.inject_headers {
            match self.daemon.upstreams[self.server_id].credential(&inject.file) {
                Ok(v) => {
                    builder =
                        builder.header(name.as_str(), format!("{}{}", inject.prefix, v.value));
                    secrets.add(v.forms);
                }
                Err(e) => {
                    warn!(server.name = %server.name, file = %inject.file.display(), error = %e, "credential file unreadable");
                    return self.upstream_failed(
                        pending,
                        format!(
                            "interceptor: credential for server {} unavailable",
                            server.name
                        ),
                    );
                }
            }
        }
        if let (Some(ca), Some(wid)) = (&self.daemon.ca, &self.identity.workload_id) {
            let token = self.assertion(ca, wid, roles);
            // A bearer token for its lifetime: an upstream echoing it (an error page quoting
            // the request's headers) must not hand it to the agent; nor any other of this
            // node's (a legacy stream answers other requests than the GET that opened it).
            secrets.add_token_prefix(ca.token_prefix());
            builder = builder.header(naming.assertion_header.as_str(), token);
        }
        let up_len = bytes.len() as u64;
        let request = match builder.body(Full::new(bytes)) {
            Ok(r) => r,
            Err(e) => {
                pending.settle("error", Some(code::INVALID_REQUEST));
                return error_response(
                    StatusCode::BAD_REQUEST,
                    code::INVALID_REQUEST,
                    format!("cannot forward: {e}"),
                );
            }
        };
        let sent = Instant::now();
        let labels = crate::metrics::ServerLabels {
            server: server.name.clone(),
        };
        if stream.is_none() {
            // Streams (GET, subscriptions/listen) are long-lived: no next request to sign for.
            self.presign(roles);
        }
        // Checked again after the audit write and before anything leaves; the revocation
        // branch is polled first.
        let result = tokio::select! {
            biased;
            _ = self.revoked.wait() => {
                let reason = self.revoked_reason().unwrap_or_default();
                let body = Self::errors_for(&pending, |id| Self::revoked_error(reason, id));
                pending.settle("revoked", None);
                return json_response(StatusCode::FORBIDDEN, &body);
            }
            r = client.request(request) => r,
        };
        self.daemon
            .metrics
            .upstream_latency
            .get_or_create(&labels)
            .observe(sent.elapsed().as_secs_f64());
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                self.daemon
                    .metrics
                    .upstream_errors
                    .get_or_create(&labels)
                    .inc();
                self.daemon
                    .counters
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                let cause = std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| e.to_string());
                warn!(server.name = %server.name, error = %cause, "upstream request failed");
                return self.upstream_failed(
                    pending,
                    format!(
                        "interceptor: upstream {} of server {} failed: {cause}",
                        server.upstream, server.name
                    ),
                );
            }
        };
        self.daemon
            .counters
            .relayed_up
            .fetch_add(up_len, Ordering::Relaxed);
        self.up.fetch_add(up_len, Ordering::Relaxed);
        // Sessions are bound by MCP answers only: a GET's is an event stream (a `/.well-known/`
        // document or another endpoint's page, relayed or not, tells nothing of a session).
        let mcp_answer = !from_get
            || response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(event_stream_at)
                == Some(0);
        if response.status().is_success() && mcp_answer {
            let sessions = &self.daemon.bound_sessions;
            let named = response.headers().get("mcp-session-id");
            match (named, &session) {
                // A session this request ended is forgotten, and so are requests that waited
                // for a resumed stream of it.
                (_, Some(id)) if ending => {
                    sessions.end(self.session_scope(), id.as_bytes(), &self.session_owner());
                    if let Ok(id) = id.to_str() {
                        for mut parked in self
                            .daemon
                            .parked
                            .take_all(Some((self.session_scope(), id)))
                        {
                            parked.settle("no_response", None);
                        }
                    }
                }
                // Named by the upstream (the answer to initialize, which carries none): the
                // caller's from now on. The id the request carried, echoed back (as the SDKs
                // do on every answer), names nothing new: it binds only a session no one holds
                // (else the answer that arrives last would take a session from its owner).
                (Some(id), requested) => sessions.bind(
                    self.session_scope(),
                    id.as_bytes(),
                    &self.session_owner(),
                    requested
                        .as_ref()
                        .is_none_or(|r| r.as_bytes() != id.as_bytes()),
                ),
                // A session the upstream accepted from the caller: its, unless bound already.
                (None, Some(id)) => sessions.bind(
                    self.session_scope(),
                    id.as_bytes(),
                    &self.session_owner(),
                    false,
                ),
                (None, None) => {}
            }
        }
        let session = session
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.respond(response, get_target, stream, pending, secrets, session)
            .await
    }

    /// Relays the upstream's answer: SSE event by event, anything else read whole (bounded) so
    /// list results are filtered. What the proxy cannot inspect is refused, not passed.
    async fn respond(
        self: &Arc<Self>,
        response: Response<Incoming>,
        get_target: Option<String>,
        server_stream: Option<ServerStream>,
        mut pending: Awaiting,
        secrets: Secrets,
        session: Option<String>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        // The upstream's own reason phrase (hyper keeps one that is not the standard text, to
        // write it back out) may quote what it was sent: the agent gets the standard one.
        parts.extensions.remove::<hyper::ext::ReasonPhrase>();
        secrets.scrub_headers(&mut parts.headers);
        if !self.daemon.config.servers[self.server_id]
            .inject_headers
            .is_empty()
        {
            // A session the upstream opens for the credentials the proxy injected (a cookie
            // minted from an injected token) would be a credential in the agent's hands, usable
            // wherever the upstream is reachable without the proxy.
            parts.headers.remove(header::SET_COOKIE);
        }
        if encoded(&parts.headers) {
            warn!("upstream answered with a content encoding the proxy cannot inspect");
            return self.upstream_failed(
                pending,
                "upstream response is content-encoded; the proxy asked for identity encoding",
            );
        }
        parts.headers.retain_non_hop();
        // Clients disagree on what is an event stream: the Python SDK reads an answer whose
        // Content-Type starts `application/json` as JSON, the TypeScript SDK and httpx-sse
        // read one that contains `text/event-stream` anywhere as a stream (and the TypeScript
        // SDK every successful answer to a GET). Declared a stream only: a stream. Ambiguous:
        // its first bytes decide (JSON cannot hold a `data:` line, an event stream cannot
        // start with `{`), so that every reader's view is the one judged.
        let declared = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(event_stream_at)
            == Some(0);
        // A GET is answered with an event stream (or an error): anything else is no MCP
        // answer (on a server without `paths`, a GET may name any endpoint of the upstream:
        // what it serves beside MCP is not relayed). But for the metadata clients fetch for
        // OAuth discovery (RFC 8615 `/.well-known/`: RFC 9728, RFC 8414), public by design,
        // read as any JSON answer is.
        let metadata = get_target.as_deref().is_some_and(|t| {
            // The path, as sent and decoded, with nothing a server resolves elsewhere
            // (`/.well-known/../admin` is no metadata).
            let path = t.split(['?', '#']).next().unwrap_or("");
            let clean = |p: &str| p.starts_with("/.well-known/") && !crate::config::odd_path(p);
            clean(path)
                && percent_encoding::percent_decode_str(path)
                    .decode_utf8()
                    .is_ok_and(|decoded| clean(&decoded))
        });
        if get_target.is_some() && parts.status.is_success() && !declared && !metadata {
            warn!(status = %parts.status, "upstream answered a GET with something other than an event stream");
            return self.upstream_failed(
                pending,
                "the upstream answered a GET with something other than an event stream \
                 (text/event-stream): not an MCP server stream, not relayed",
            );
        }
        let mentioned = parts
            .headers
            .get_all(header::CONTENT_TYPE)
            .iter()
            .any(|v| event_stream_at(v).is_some());
        let limit = self.daemon.config.proxy.max_response_bytes;
        let deadline = self.daemon.config.proxy.body_timeout;
        // One deadline for the first bytes and the rest of a JSON answer.
        let until = tokio::time::Instant::now() + deadline;
        let mut body = body;
        let mut head = Vec::new();
        if mentioned && !declared {
            let peek = tokio::time::timeout_at(until, first_bytes(&mut body, &mut head, limit));
            if !matches!(peek.await, Ok(Ok(()))) {
                return self.upstream_failed(
                    pending,
                    "upstream answer unreadable, or its first bytes not received in time",
                );
            }
        }
        if declared || (mentioned && !looks_like_json(&head)) {
            let body = self.clone().sse_stream(
                body,
                Bytes::from(head),
                StreamOf {
                    get_target: get_target.as_deref(),
                    session,
                },
                server_stream,
                pending,
                secrets,
            );
            return Response::from_parts(parts, body);
        }
        // Once its head is here, a JSON answer's body comes within `body_timeout` too: an
        // upstream trickling it would hold the agent's connection slot and its buffer. Counted
        // as the agent's (see `budget`) until relayed.
        let rest = limit.saturating_sub(head.len());
        let mut held = self.daemon.buffers.hold(self.identity.cgroup_id);
        if let Err(over) = held.take(head.len()) {
            return self.over_budget(pending, over);
        }
        let read = tokio::time::timeout_at(until, held.collect(body, rest));
        let Ok(read) = read.await else {
            warn!("upstream answer body not received in time");
            return self.upstream_failed(
                pending,
                format!(
                    "upstream answer body did not arrive within {} (proxy.body_timeout)",
                    humantime::format_duration(deadline)
                ),
            );
        };
        let bytes = match read {
            Ok(c) if head.is_empty() => c,
            Ok(c) => {
                head.extend_from_slice(&c);
                Bytes::from(head)
            }
            Err(budget::Refused::Over(over)) => return self.over_budget(pending, over),
            Err(e) => {
                let e = match e {
                    budget::Refused::Read(e) => e.to_string(),
                    _ => "too large".to_owned(),
                };
                warn!(error = %e, "upstream response unreadable or too large");
                return self.upstream_failed(
                    pending,
                    format!("upstream response unreadable or over {limit} bytes: {e}"),
                );
            }
        };
        let bytes = secrets.scrub(bytes);
        // Whatever its content type says, a body that parses as JSON is filtered: a lenient
        // client would read it as JSON too (also behind a UTF-8 BOM, which Python's json
        // skips; such a body goes out re-serialised, without it).
        let text = bytes.strip_prefix(UTF8_BOM).unwrap_or(&bytes);
        let out = match jsonrpc::parse_answer(text, self.daemon.config.proxy.max_response_values) {
            Ok((mut v, duplicate)) => {
                // As in a stream's events (`SseState::event`): a JSON answer may carry other
                // messages beside the response (a batch), which clients hand to their handlers
                // alike. Task notifications only for the task's starter; requests to the agent
                // on record.
                let kept = self.drop_foreign_task_notices(&mut v);
                let (emptied, dropped) = (kept.is_none(), kept.unwrap_or(0));
                self.record_server_requests(&v, session.as_deref());
                self.audit_response(&mut pending, &v);
                if emptied && !pending.is_empty() {
                    // Requests await answers the upstream did not give: each gets an error (a
                    // 202 would leave the client waiting for them).
                    return self.upstream_failed(
                        pending,
                        "the upstream's answer held no response to this request (only \
                         notifications of another identity's task, which are not passed on)",
                    );
                } else if emptied {
                    // Nothing left to pass on: answered as a notification is.
                    parts.status = StatusCode::ACCEPTED;
                    parts.headers.remove(header::CONTENT_TYPE);
                    Bytes::new()
                } else if self.filter(&mut v) + dropped > 0
                    || duplicate
                    || text.len() != bytes.len()
                {
                    // Written anew, escapes the scrub looked through may be undone.
                    secrets.scrub(Bytes::from(serde_json::to_vec(&v).unwrap_or_default()))
                } else {
                    bytes
                }
            }
            // What a lenient client would still read as JSON (Python's json takes NaN and
            // Infinity) is refused: it could carry a list the filter never saw.
            Err(e) if looks_like_json(text) => {
                warn!(error = %e, "upstream answer looks like JSON but is not strict JSON or is over proxy.max_response_values");
                return self.upstream_failed(
                    pending,
                    format!(
                        "upstream answer is not strict JSON or is over \
                         proxy.max_response_values ({e}); the interceptor must read what it \
                         passes on"
                    ),
                );
            }
            // Neither JSON nor declared a stream, but read as one by a lenient client: refused
            // when it holds an event with JSON in it.
            Err(_) if holds_json_events(&bytes, limit) => {
                warn!("upstream answer holds SSE events but is not declared a stream");
                return self.upstream_failed(
                    pending,
                    "upstream answer holds event-stream events with JSON but is not declared \
                     text/event-stream; the interceptor must read what it passes on",
                );
            }
            Err(_) => bytes,
        };
        // Requests a 202 or a non-JSON answer leaves without a JSON-RPC response.
        pending.settle("no_response", None);
        self.daemon
            .counters
            .relayed_down
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        self.down.fetch_add(out.len() as u64, Ordering::Relaxed);
        let body = budget::HeldBody::new(out, held)
            .map_err(|e| match e {})
            .boxed();
        Response::from_parts(parts, body)
    }

    /// The answer when an upstream answer would go over the buffer budget: its requests are
    /// audited as `upstream_error`, the agent gets HTTP 502 (the upstream has acted on them:
    /// no invitation to retry).
    fn over_budget(&self, pending: Awaiting, over: budget::Over) -> Response<ProxyBody> {
        self.count_over_budget("upstream answer not read", over);
        self.upstream_failed(
            pending,
            format!(
                "interceptor: the upstream answered but its answer was not read: {}",
                over.reason()
            ),
        )
    }

    /// Counts and logs what the buffer budget refused (`what`: what was not read).
    fn count_over_budget(&self, what: &str, over: budget::Over) {
        self.daemon
            .counters
            .over_budget
            .fetch_add(1, Ordering::Relaxed);
        warn!(reason = over.reason(), "{what}: buffers full");
    }

    /// Filters list-shaped results in `message`; returns how many items were hidden.
    fn filter(&self, message: &mut Value) -> usize {
        // Before filtering: a tool this identity may not see can still be called by another.
        self.daemon.mirrors.learn(self.session_scope(), message);
        let (policy, grant) = self.policy();
        // Only for a `tasks` array (rare): no work per answer otherwise.
        let own_task = |id: &str| {
            matches!(
                self.daemon
                    .tasks
                    .check(self.session_scope(), id, &self.session_owner()),
                tasks::TaskUse::Own(_)
            )
        };
        let hidden =
            filter::filter_granted(&policy, &grant, self.server_name(), &own_task, message);
        if hidden > 0 {
            debug!(hidden, "list filtered");
        }
        hidden
    }

    /// Relays an SSE body event by event: list results filtered, legacy `endpoint` events
    /// registered as sessions, injected events (errors for denied legacy requests,
    /// notifications) merged in.
    fn sse_stream(
        self: Arc<Self>,
        body: Incoming,
        first: Bytes,
        of: StreamOf<'_>,
        server_stream: Option<ServerStream>,
        pending: Awaiting,
        secrets: Secrets,
    ) -> ProxyBody {
        let StreamOf {
            get_target,
            session: session_id,
        } = of;
        let from_get = get_target.is_some();
        let (tx, rx) = mpsc::channel(INJECT_QUEUE);
        let stream_id = server_stream
            .is_some()
            .then(|| self.daemon.streams.register(tx.clone()));
        // A change since the stream was judged counts, one before this point too.
        let policy_changes = server_stream.as_ref().map(|s| {
            let mut rx = self.daemon.policy_changes.subscribe();
            if *rx.borrow() != s.generation {
                rx.mark_changed();
            }
            rx
        });
        let max = self.daemon.config.proxy.max_response_bytes;
        let held = self.daemon.buffers.hold(self.identity.cgroup_id);
        let state = SseState {
            pending,
            parser: sse::Parser::new(max),
            stream_id,
            conn: self,
            body,
            from_get,
            get_target: get_target.unwrap_or_default().to_owned(),
            tx: Some(tx),
            rx,
            queue: VecDeque::new(),
            session: None,
            session_id,
            resumable: false,
            held,
            error: None,
            done: false,
            ended: "cancelled",
            secrets,
            first: (!first.is_empty()).then_some(first),
            tasks: server_stream
                .as_ref()
                .map(|s| s.tasks.clone())
                .unwrap_or_default(),
            subscribed: server_stream.map(|s| s.subscribed).unwrap_or_default(),
            policy_changes,
        };
        let s = stream::unfold(state, |mut st| async move {
            loop {
                if let Some(b) = st.queue.pop_front() {
                    st.conn
                        .daemon
                        .counters
                        .relayed_down
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    st.conn.down.fetch_add(b.len() as u64, Ordering::Relaxed);
                    return Some((Ok(Frame::data(b)), st));
                }
                if st.done {
                    // What was queued went first; then the stream breaks off if it failed.
                    return st.error.take().map(|e| (Err(e), st));
                }
                // What was read to tell the answer a stream comes first.
                if let Some(first) = st.first.take() {
                    st.chunk(&first);
                    continue;
                }
                let listening = st.session.is_some() || st.stream_id.is_some();
                tokio::select! {
                    _ = st.conn.revoked.wait() => {
                        let conn = st.conn.clone();
                        let reason = conn.revoked_reason().unwrap_or_default();
                        st.end("revoked", |id| Conn::revoked_error(reason, id));
                    }
                    frame = st.body.frame() => match frame {
                        Some(Ok(f)) => {
                            let Some(d) = f.data_ref() else { continue };
                            st.chunk(d);
                        }
                        Some(Err(e)) => {
                            st.ended = "upstream_error";
                            st.done = true;
                            return Some((Err(BoxError::from(e)), st));
                        }
                        None => {
                            st.ended = "no_response";
                            st.done = true;
                            if let Some(e) = st.parser.finish() {
                                let out = st.event(e);
                                st.queue.push_back(out);
                            }
                            st.park();
                        }
                    },
                    Some(b) = st.rx.recv(), if listening => st.queue.push_back(b),
                    Some(()) = policy_changed(&mut st.policy_changes) => {
                        let conn = st.conn.clone();
                        if let Some(why) = conn.stream_withdrawn(&st.subscribed, &st.tasks) {
                            info!(server.name = conn.server_name(), reason = %why,
                                "server stream ended: the reloaded policy no longer allows it");
                            let message = format!("interceptor: stream ended by a policy reload: {why}");
                            st.end("policy_changed", |id| {
                                jsonrpc::error_response(id, code::INTERNAL_ERROR, &message)
                            });
                        }
                    }
                }
            }
        });
        StreamBody::new(s).boxed()
    }
}

/// The request an event stream answers: the target of a GET (none for a POST), and its
/// Streamable HTTP session (`Mcp-Session-Id`).
struct StreamOf<'a> {
    get_target: Option<&'a str>,
    session: Option<String>,
}

/// Per-stream state of [`Conn::sse_stream`].
struct SseState {
    conn: Arc<Conn>,
    body: Incoming,
    parser: sse::Parser,
    from_get: bool,
    /// The target of the GET this stream answers: what a relative `endpoint` is relative to.
    get_target: String,
    tx: Option<mpsc::Sender<Bytes>>,
    rx: mpsc::Receiver<Bytes>,
    queue: VecDeque<Bytes>,
    /// The legacy session this stream carries, removed from the registry on drop.
    session: Option<(String, Arc<LegacySession>)>,
    /// The Streamable HTTP session (`Mcp-Session-Id`) of the request this stream answers, or
    /// the legacy session URL this stream carries (capped, as its POSTs' events name it).
    session_id: Option<String>,
    /// An event with an `id` came: the client may resume the stream (see [`Parked`]).
    resumable: bool,
    /// What the parser holds of an incomplete event, counted in the buffer budget.
    held: budget::Held,
    /// Why the stream breaks off once what is queued is relayed.
    error: Option<BoxError>,
    /// Registration in [`Streams`] of a server stream, removed on drop.
    stream_id: Option<u64>,
    /// A server stream's changes of policy (see [`Conn::stream_withdrawn`]), and the resources
    /// and tasks it subscribed to (`subscriptions/listen`).
    policy_changes: Option<tokio::sync::watch::Receiver<u64>>,
    subscribed: Vec<String>,
    tasks: Vec<String>,
    /// Requests of the POST this stream answers.
    pending: Awaiting,
    done: bool,
    /// The outcome of requests (this POST's, or the legacy session's) still unanswered when
    /// the stream ends: `no_response` if the upstream ended it, `upstream_error`, `revoked`,
    /// or `cancelled` if the agent went away first.
    ended: &'static str,
    /// The credentials injected into the request this stream answers.
    secrets: Secrets,
    /// The first bytes, read before the stream was relayed (to tell it a stream).
    first: Option<Bytes>,
}

impl SseState {
    /// The upstream closed a POST's stream after an event id, answers still owed: the client
    /// resumes it with a GET, where they come (see [`Parked`]). Its requests wait there.
    fn park(&mut self) {
        let (false, true, Some(session)) = (self.from_get, self.resumable, &self.session_id) else {
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        let conn = self.conn.clone();
        let pending = std::mem::replace(
            &mut self.pending,
            Awaiting::new(&conn, PendingMap::new(), false),
        );
        let scope = conn.session_scope();
        match conn.daemon.parked.park(scope, session, pending) {
            Ok(ticket) => {
                let daemon = conn.daemon.clone();
                let key = session.clone();
                let timer = tokio::spawn(async move {
                    tokio::time::sleep(PARK_TTL).await;
                    if let Some(mut left) = daemon.parked.take(scope, &key, ticket) {
                        left.settle("no_response", None);
                    }
                });
                conn.daemon
                    .parked
                    .arm(scope, session, ticket, timer.abort_handle());
            }
            // Full: settled when the stream goes, as if not resumable.
            Err(pending) => self.pending = pending,
        }
    }

    /// Ends the stream as `outcome`: each request still waiting on it is answered with
    /// `error` (of its id) and settled.
    fn end(&mut self, outcome: &'static str, error: impl Fn(Option<Value>) -> Value) {
        for id in self.pending.keys() {
            let e = error(serde_json::from_str(id).ok());
            self.queue.push_back(sse::Event::message(&e.to_string()));
        }
        self.pending.settle(outcome, None);
        self.ended = outcome;
        self.done = true;
    }

    /// Parses a chunk of the upstream's stream and queues its events, judged; an error ends
    /// the stream (fail closed: never pass an event the proxy could not judge) once what was
    /// queued is relayed (`error`).
    fn chunk(&mut self, d: &[u8]) {
        let (events, fits) = self.parser.push(d);
        // The whole events first (also those before an event over the size limit): answered,
        // judged, relayed as any.
        for e in events {
            if self.done {
                break;
            }
            let out = self.event(e);
            self.queue.push_back(out);
        }
        if let Err(e) = fits {
            warn!(error = %e, "closing the stream");
            self.ended = "upstream_error";
            self.done = true;
            self.error = Some(BoxError::from(e));
        }
        if !self.done
            && let Err(over) = self.held.hold_exactly(self.parser.pending())
        {
            // An event of megabytes trickled in by every stream at once must not hold memory
            // past the budget: the stream ends, its requests (a legacy session's too)
            // answered with an error, and what was read of the event goes at once.
            self.conn
                .count_over_budget("upstream event stream ended", over);
            let message = format!(
                "interceptor: the upstream's stream was ended: {}",
                over.reason()
            );
            self.end_all("upstream_error", |id| {
                jsonrpc::error_response(id, code::INTERNAL_ERROR, &message)
            });
        }
        if self.done {
            self.parser.clear();
            let _ = self.held.hold_exactly(0);
        }
    }

    /// [`SseState::end`], and the requests of the legacy session this stream carries too
    /// (taken: not settled again when the stream goes).
    fn end_all(&mut self, outcome: &'static str, error: impl Fn(Option<Value>) -> Value) {
        self.end(outcome, &error);
        let waiting = self
            .session
            .as_ref()
            .and_then(|(_, s)| lock(&s.pending).take());
        if let Some(waiting) = waiting {
            for id in waiting.keys() {
                let e = error(serde_json::from_str(id).ok());
                self.queue.push_back(sse::Event::message(&e.to_string()));
            }
            self.conn.audit_failed(waiting, outcome, None);
        }
    }

    fn event(&mut self, e: sse::Event) -> Bytes {
        let e = self.secrets.scrub_event(e);
        if e.id.as_deref().is_some_and(|id| !id.is_empty()) {
            self.resumable = true;
        }
        if self.from_get && e.event == "endpoint" && self.session.is_none() {
            return if self.register(&e.data) {
                e.raw
            } else {
                Bytes::new()
            };
        }
        match jsonrpc::parse_answer(
            e.data.as_bytes(),
            self.conn.daemon.config.proxy.max_response_values,
        ) {
            Ok((mut v, duplicate)) => {
                let Some(dropped) = self.conn.drop_foreign_task_notices(&mut v) else {
                    // Nothing left: no event.
                    return Bytes::new();
                };
                self.conn
                    .record_server_requests(&v, self.session_id.as_deref());
                match &self.session {
                    Some((_, s)) => {
                        if let Some(p) = lock(&s.pending).as_mut() {
                            self.conn.audit_response(p, &v);
                            release_if_answered(s, p);
                        }
                    }
                    None => {
                        self.conn.audit_response(&mut self.pending, &v);
                        // A resumed stream carries answers owed to earlier POSTs.
                        if let (true, Some(session)) = (self.from_get, &self.session_id) {
                            self.conn.daemon.parked.answered(
                                self.conn.session_scope(),
                                session,
                                &v,
                            );
                        }
                    }
                }
                if self.conn.filter(&mut v) + dropped > 0 || duplicate {
                    // Written anew, escapes the scrub looked through may be undone.
                    self.secrets.scrub(e.with_data(&v.to_string()))
                } else {
                    e.raw
                }
            }
            // Not passed: a lenient client could read it as a list the filter never saw. The
            // stream ends there, its requests answered with an error (else they would wait
            // for answers that never come).
            Err(err) if looks_like_json(e.data.as_bytes()) => {
                warn!(error = %err, "SSE event from the upstream looks like JSON but is not strict JSON or is over proxy.max_response_values; stream ended");
                let message = format!(
                    "interceptor: an event of the upstream was refused (not strict JSON or over \
                     proxy.max_response_values): {err}"
                );
                self.end_all("upstream_error", |id| {
                    jsonrpc::error_response(id, code::INTERNAL_ERROR, &message)
                });
                Bytes::new()
            }
            Err(_) => e.raw,
        }
    }

    /// Registers the legacy session an `endpoint` event names; `false` when its identity has
    /// as many live sessions as it may (the stream then ends, the event not relayed).
    fn register(&mut self, endpoint: &str) -> bool {
        let Some(tx) = self.tx.take() else {
            return true;
        };
        let pq = endpoint_target(&self.get_target, endpoint);
        // Logged by its path: the query holds the session id, which is the session's key.
        let path = pq.split_once('?').map_or(pq.as_str(), |(path, _)| path);
        if !self.conn.daemon.config.servers[self.conn.server_id].serves_path(path) {
            warn!(endpoint.path = %path, server.name = self.conn.server_name(), "the legacy SSE endpoint is outside the server's paths: its POSTs will be refused (add it to paths)");
        }
        let key = match session_key(self.conn.session_scope(), &pq) {
            Ok(k) => k,
            Err(why) => {
                warn!(endpoint.path = %path, reason = %why, "legacy SSE endpoint not registered");
                return true;
            }
        };
        let session = Arc::new(LegacySession {
            owner: self.conn.owner(),
            inject: tx,
            pending: std::sync::Mutex::new(Some(PendingMap::new())),
            charged: std::sync::Mutex::new(None),
        });
        if !lock(&self.conn.daemon.sessions).insert(key.clone(), &pq, session.clone()) {
            warn!(endpoint.path = %path, limit = crate::mcp::session::MAX_LEGACY_PER_OWNER,
                "legacy SSE stream ended: its identity has as many live sessions as it may");
            self.done = true;
            return false;
        }
        debug!(endpoint.path = %path, "legacy SSE session registered");
        self.session = Some((key, session));
        self.session_id = Some(self.conn.recorded(&pq));
        true
    }
}

/// The request target a legacy `endpoint` event names, resolved as the clients resolve it
/// (RFC 3986, `urljoin` / `new URL`) against the stream's own URL (`get_target`): absolute
/// (`http://host/messages/?…`), absolute-path (`/messages/?…`) or relative (`messages?…`,
/// `../messages?…`, `?sessionId=…`); without its fragment.
fn endpoint_target(get_target: &str, endpoint: &str) -> String {
    let base = url::Url::parse("http://stream.invalid/")
        .and_then(|b| b.join(get_target))
        .and_then(|b| b.join(endpoint.trim()));
    match base {
        Ok(u) => match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        },
        Err(_) => endpoint.trim().to_owned(),
    }
}

impl Drop for SseState {
    fn drop(&mut self) {
        if let Some(id) = self.stream_id.take() {
            self.conn.daemon.streams.remove(id);
        }
        if let Some((key, session)) = self.session.take() {
            lock(&self.conn.daemon.sessions).remove(&key, &session);
            // Closed: requests posted from now on are settled by their own POST's answer.
            let unanswered = lock(&session.pending).take();
            if let Some(unanswered) = unanswered {
                self.conn.audit_failed(unanswered, self.ended, None);
            }
        }
        self.pending.settle(self.ended, None);
    }
}

/// Whether member name `key` is `name` as a lenient reader takes it: whatever its case, `_`
/// and `-` (`Name`, `input_responses` for `inputResponses`).
fn key_is(key: &str, name: &str) -> bool {
    // Compared as they go: every request's params keys are looked through.
    fn loose(s: &str) -> impl Iterator<Item = u8> + '_ {
        s.bytes()
            .filter(|b| !matches!(b, b'_' | b'-'))
            .map(|b| b.to_ascii_lowercase())
    }
    loose(key).eq(loose(name))
}

/// A member the [`tool_uses`] scan reads is spelled more than one way (`_type` beside
/// `type`): the proxy would judge one spelling and the server might read another.
struct Ambiguous;

/// The one member of `map` named `name` as [`key_is`] reads keys.
fn member_of<'v>(
    map: &'v serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<&'v Value>, Ambiguous> {
    let mut found = map.iter().filter(|(k, _)| key_is(k, name)).map(|(_, v)| v);
    let first = found.next();
    match found.next() {
        Some(_) => Err(Ambiguous),
        None => Ok(first),
    }
}

/// [`member_of`] for any value (`None` for what is not an object).
fn member<'v>(value: &'v Value, name: &str) -> Result<Option<&'v Value>, Ambiguous> {
    value
        .as_object()
        .map_or(Ok(None), |map| member_of(map, name))
}

/// The tools a message asks the server to run for the agent's model, by name, with their
/// input: the `tool_use` blocks of the sampling results it hands the server — its answer to a
/// server request (`result.content`, one block or a list), or a request's
/// `params.inputResponses` (2026-07-28: the answers to the server's input requests, each a
/// result or holding one). Keys are read as lenient servers read them ([`key_is`]); a member
/// spelled two ways is [`Ambiguous`]; a block without a name gives "" (which no policy
/// allows).
fn tool_uses(m: &Message) -> Result<Vec<(&str, Option<&Value>)>, Ambiguous> {
    let mut results: Vec<&Value> = Vec::new();
    match m {
        Message::Response { body, .. } => results.extend(body.get("result")),
        _ => {
            if let Some(Value::Object(answers)) = m
                .params()
                .map(|p| member_of(p, "inputResponses"))
                .transpose()?
                .flatten()
            {
                for answer in answers.values() {
                    results.push(answer);
                    results.extend(member(answer, "result")?);
                }
            }
        }
    }
    let mut uses = Vec::new();
    for result in results {
        let blocks: Vec<&Value> = match member(result, "content")? {
            Some(Value::Array(items)) => items.iter().collect(),
            Some(block) => vec![block],
            None => continue,
        };
        for block in blocks {
            let kind = member(block, "type")?.and_then(Value::as_str);
            if kind.is_some_and(|k| key_is(k, "tool_use")) {
                let name = member(block, "name")?.and_then(Value::as_str).unwrap_or("");
                uses.push((name, member(block, "input")?));
            }
        }
    }
    Ok(uses)
}

/// The answer to a denied request: -32602 for calls that name a target (the code MCP uses for
/// an unknown tool), -32601 for other methods.
fn denial(policy: &Policy, m: &Message, id: Option<Value>) -> Value {
    let method = m.method().unwrap_or("");
    match (method, m.named()) {
        // The method is allowed; what it completes for was refused (named or not).
        ("completion/complete", None) => jsonrpc::error_response(
            id,
            code::INVALID_PARAMS,
            "completion/complete refused by policy (interceptor)",
        ),
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

    #[test]
    fn endpoints_resolve_as_clients_resolve_them() {
        use super::endpoint_target;
        for (get, endpoint, target) in [
            ("/sse", "/messages/?session_id=a", "/messages/?session_id=a"),
            (
                "/sse",
                "http://h:1/messages/?session_id=a",
                "/messages/?session_id=a",
            ),
            (
                "/mcp/sse",
                "messages?sessionId=a",
                "/mcp/messages?sessionId=a",
            ),
            ("/sse", "messages?sessionId=a", "/messages?sessionId=a"),
            ("", "messages?x", "/messages?x"),
            (
                "/mcp/sse",
                "../messages?sessionId=a",
                "/messages?sessionId=a",
            ),
            ("/mcp/sse", "./messages?x", "/mcp/messages?x"),
            ("/sse?x=1", "?sessionId=a", "/sse?sessionId=a"),
            ("/sse", "//h:1/messages?x", "/messages?x"),
            ("/sse", "/a/../m?x#frag", "/m?x"),
        ] {
            assert_eq!(endpoint_target(get, endpoint), target, "{get} {endpoint}");
        }
    }

    #[test]
    fn any_coding_but_identity_in_any_content_encoding_is_encoded() {
        let with = |values: &[&'static str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(header::CONTENT_ENCODING, HeaderValue::from_static(v));
            }
            encoded(&h)
        };
        assert!(!with(&[]));
        assert!(!with(&["identity"]));
        assert!(!with(&["Identity, identity"]));
        assert!(with(&["identity", "gzip"]));
        assert!(with(&["identity, br"]));
        assert!(with(&["gzip"]));
    }

    #[test]
    fn an_answer_is_told_by_a_byte_that_is_not_whitespace_nor_a_byte_order_mark() {
        for undecided in [
            &b""[..],
            b" \r\n",
            b"\xef",
            b"\xef\xbb",
            b"\xef\xbb\xbf",
            b"\xef\xbb\xbf \n",
        ] {
            assert!(!decides(undecided), "{undecided:?}");
        }
        for decided in [&b"{"[..], b"\xef\xbb\xbf{", b"  data: x", b"\xefx"] {
            assert!(decides(decided), "{decided:?}");
        }
        assert!(looks_like_json(b"\xef\xbb\xbf {"));
    }

    #[test]
    fn events_in_a_body_not_declared_a_stream_are_found() {
        assert!(holds_json_events(b"data: {\"a\":1}\n\n", 1 << 20));
        assert!(holds_json_events(b"event: message\r\ndata: [1]", 1 << 20));
        assert!(!holds_json_events(b"invalid key [REDACTED]", 1 << 20));
        assert!(!holds_json_events(b"data: plain text\n\n", 1 << 20));
    }

    #[test]
    fn injected_credentials_are_scrubbed_from_answers() {
        let mut secrets = Secrets::default();
        secrets.add(SecretForms::of("tok-12345678"));
        secrets.add(SecretForms::of("short"));
        secrets.add(SecretForms::of("k/ey+12345"));
        secrets.add(SecretForms::of("sk-live/abc+1234"));
        assert_eq!(
            secrets.scrub(Bytes::from_static(
                b"a=sk-live%2Fabc%2B1234&b=sk-live%2fabc%2b1234"
            )),
            Bytes::from_static(b"a=[REDACTED]&b=[REDACTED]")
        );
        assert_eq!(
            secrets.scrub(Bytes::from_static(
                br#"{"e":"k\/ey+12345","q":"k%2Fey%2B12345","r":"k/ey+12345"}"#
            )),
            Bytes::from_static(br#"{"e":"[REDACTED]","q":"[REDACTED]","r":"[REDACTED]"}"#)
        );
        let body = Bytes::from_static(b"bad tok-12345678, again tok-12345678; short stays");
        assert_eq!(
            secrets.scrub(body),
            Bytes::from_static(b"bad [REDACTED], again [REDACTED]; short stays")
        );
        // As JSON encoders escape it.
        secrets.add(SecretForms::of(r#"p"w\d<&>/12"#));
        assert_eq!(
            secrets.scrub(Bytes::from_static(
                br#"["p\"w\\d<&>/12","p\"w\\d\u003c\u0026\u003e\/12"]"#
            )),
            Bytes::from_static(br#"["[REDACTED]","[REDACTED]"]"#)
        );
        let clean = Bytes::from_static(b"nothing here");
        assert_eq!(
            secrets.scrub(clean.clone()).as_ptr(),
            clean.as_ptr(),
            "not copied"
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "www-authenticate",
            HeaderValue::from_static("Bearer tok-12345678"),
        );
        secrets.scrub_headers(&mut headers);
        assert_eq!(headers["www-authenticate"], "Bearer [REDACTED]");
        let event = sse::Event {
            raw: Bytes::from_static(b"data: {\"k\":\"tok-12345678\"}\n\n"),
            event: String::new(),
            data: r#"{"k":"tok-12345678"}"#.into(),
            id: None,
        };
        let e = secrets.scrub_event(event);
        assert_eq!(
            e.raw,
            Bytes::from_static(b"data: {\"k\":\"[REDACTED]\"}\n\n")
        );
        assert_eq!(e.data, r#"{"k":"[REDACTED]"}"#);

        // Tokens by their start: every assertion of the node, whole, whichever request it
        // came with; the text around them stays.
        let mut tokens = Secrets::default();
        let prefix = || Arc::new(Needle::new(b"eyJhbGci."));
        tokens.add_token_prefix(prefix());
        tokens.add_token_prefix(prefix());
        assert_eq!(tokens.tokens.len(), 1);
        assert_eq!(
            tokens.scrub(Bytes::from_static(
                b"{\"seen\":\"eyJhbGci.eyJzdWIi.c2ln-_x\",\"b\":\"eyJhbGci.eyJ.s2\"} eyJhbGci"
            )),
            Bytes::from_static(b"{\"seen\":\"[REDACTED]\",\"b\":\"[REDACTED]\"} eyJhbGci")
        );
    }

    #[test]
    fn what_a_lenient_reader_takes_for_json() {
        for text in [&b"{}"[..], b"  [1]", b"\xEF\xBB\xBF {\"x\":NaN}", b"\n{"] {
            assert!(super::looks_like_json(text), "{text:?}");
        }
        for text in [&b""[..], b"ok", b"event: x", b"\"str\"", b"<html>"] {
            assert!(!super::looks_like_json(text), "{text:?}");
        }
    }
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_revocation_wakes_its_waiters_once_with_the_first_reason() {
        let r = Arc::new(Revocation::default());
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no revocation yet");
        r.set("first".into());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter is woken")
            .expect("waiter");
        r.set("second".into());
        assert_eq!(r.reason(), Some("first"));
        // Already revoked: resolves at once.
        tokio::time::timeout(Duration::from_secs(5), r.wait())
            .await
            .expect("resolves at once");
    }

    /// A loopback connection: (client end, server end).
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// What `speaks_h2` says about a connection whose client sends `parts` (pausing between
    /// them) and then closes.
    async fn sniff(parts: &'static [&'static [u8]]) -> Option<bool> {
        let (mut c, server) = connected().await;
        let client = tokio::spawn(async move {
            for part in parts {
                c.write_all(part).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let found = speaks_h2(&server).await;
        client.await.expect("client");
        found
    }

    #[test]
    fn a_presigned_assertion_is_used_once_for_the_same_roles_while_fresh() {
        let roles = vec!["readers".to_owned()];
        let t0 = Instant::now();
        let offer = |p: &Presigner, at: Instant, token: &str| {
            p.offer(Presigned {
                roles: roles.clone(),
                at,
                token: token.to_owned(),
            })
        };
        let p = Presigner::default();
        // The first request of a connection may pre-sign for its workload only; one after a
        // pause pre-signs nothing.
        assert_eq!(p.pace(t0), Pace::Workload);
        assert_eq!(p.pace(t0 + PRESIGNED_MAX_AGE * 2), Pace::Nothing);
        // Requests coming quickly do, for the connection.
        assert_eq!(
            p.pace(t0 + PRESIGNED_MAX_AGE * 2 + Duration::from_millis(5)),
            Pace::Connection
        );
        offer(&p, t0, "a");
        // Not while one is waiting (concurrent streams), for the workload neither.
        assert_eq!(
            p.pace(t0 + PRESIGNED_MAX_AGE * 2 + Duration::from_millis(6)),
            Pace::Nothing
        );
        assert_eq!(
            p.take(&roles, t0 + Duration::from_millis(10)),
            Some("a".into())
        );
        // Used once.
        assert_eq!(p.take(&roles, t0 + Duration::from_millis(11)), None);
        // Other roles: not used, and used up.
        offer(&p, t0, "b");
        assert_eq!(p.take(&["writers".to_owned()], t0), None);
        assert_eq!(p.take(&roles, t0), None);
        // Too old: not used.
        offer(&p, t0, "c");
        assert_eq!(p.take(&roles, t0 + PRESIGNED_MAX_AGE), None);
    }

    #[test]
    fn a_workload_presign_serves_its_next_request_on_any_connection_once() {
        let roles = vec!["readers".to_owned()];
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let presigns = WorkloadPresigns::default();
        let (a, b): (Arc<str>, Arc<str>) =
            ("[0,\"spiffe://a\"]".into(), "[0,\"spiffe://b\"]".into());
        let offer = |key: &str, token: &str| {
            presigns.offer(
                key,
                Presigned {
                    roles: roles.clone(),
                    at: t0,
                    token: token.to_owned(),
                },
            )
        };
        // A workload's first request pre-signs nothing; its next one within the second does.
        assert!(!presigns.wanted(&a, t0));
        assert!(presigns.wanted(&a, t0 + ms(5)));
        offer(&a, "a1");
        // Another workload neither sees it nor is paced by it.
        assert_eq!(presigns.take(&b, &roles, t0 + ms(6)), None);
        assert!(!presigns.wanted(&b, t0 + ms(6)));
        // Not while one waits; then taken once, by whichever connection comes first.
        assert!(!presigns.wanted(&a, t0 + ms(7)));
        assert_eq!(presigns.take(&a, &roles, t0 + ms(8)), Some("a1".into()));
        assert_eq!(presigns.take(&a, &roles, t0 + ms(9)), None);
        // Other roles: not used, and used up.
        offer(&a, "a2");
        assert_eq!(
            presigns.take(&a, &["writers".to_owned()], t0 + ms(10)),
            None
        );
        assert_eq!(presigns.take(&a, &roles, t0 + ms(11)), None);
        // An offer for a workload nobody tracks is dropped.
        offer("[1]", "x");
        assert_eq!(presigns.take("[1]", &roles, t0 + ms(12)), None);
        // A full table drops the workloads idle for a second before tracking a new one.
        for i in 0..WORKLOAD_PRESIGNS {
            presigns.wanted(&Arc::from(format!("[{i}]")), t0);
        }
        let later = t0 + PRESIGNED_MAX_AGE * 2;
        assert!(!presigns.wanted(&Arc::from("[new]"), later));
        assert!(lock(&presigns.0).map.len() < 10, "idle workloads dropped");
        // A table full of active workloads tracks no new one.
        for i in 0..WORKLOAD_PRESIGNS {
            presigns.wanted(&Arc::from(format!("[{i}]")), later);
        }
        let key: Arc<str> = Arc::from("[newer]");
        assert!(!presigns.wanted(&key, later + ms(1)));
        assert!(!presigns.wanted(&key, later + ms(2)));
        assert!(!lock(&presigns.0).map.contains_key(&key));
        // Once they are idle, the table is looked through again, but not more often than
        // every PRESIGN_SWEEP_EVERY.
        let idle = later + PRESIGNED_MAX_AGE * 2;
        lock(&presigns.0).swept = Some(idle);
        assert!(!presigns.wanted(&key, idle + ms(1)));
        assert!(!lock(&presigns.0).map.contains_key(&key), "swept too soon");
        presigns.wanted(&key, idle + PRESIGN_SWEEP_EVERY);
        assert!(
            lock(&presigns.0).map.contains_key(&key),
            "idle ones dropped"
        );
    }

    #[tokio::test]
    async fn the_h2_preface_is_recognised_without_being_consumed() {
        assert_eq!(sniff(&[H2_PREFACE]).await, Some(true));
        // The preface in pieces: the sniffer waits for the rest.
        assert_eq!(
            sniff(&[b"PRI * HT", b"TP/2.0\r\n\r\nSM\r\n\r\n"]).await,
            Some(true)
        );
        assert_eq!(sniff(&[b"POST /mcp HTTP/1.1\r\n"]).await, Some(false));
        // Diverges from the preface after a common start.
        assert_eq!(sniff(&[b"PRI * HTTP/1.1\r\n"]).await, Some(false));
        // A short HTTP/1 request is not held up waiting for 24 bytes.
        assert_eq!(sniff(&[b"GET / HTTP/1.0\r\n\r\n"]).await, Some(false));
        assert_eq!(sniff(&[]).await, None);
        // Nothing is consumed: the bytes are still there for hyper.
        let (mut c, server) = connected().await;
        c.write_all(b"POST /mcp HTTP/1.1\r\n").await.expect("write");
        assert_eq!(speaks_h2(&server).await, Some(false));
        let mut buf = [0u8; 20];
        let n = server.try_read(&mut buf).expect("read");
        assert_eq!(&buf[..n], b"POST /mcp HTTP/1.1\r\n");
    }
}
