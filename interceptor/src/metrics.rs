//! Prometheus metrics (`[daemon] metrics_addr`, off by default): the proxy's own metrics from a
//! `prometheus-client` registry, plus the kernel's redirect counters (read from the per-CPU map
//! at scrape time) and the audit writer's counters.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::daemon::Daemon;

/// The MCP methods `requests_total` names; any other method an agent sends counts as `other`.
/// Label values are kept for the daemon's life, so they must not come from agents unchecked.
const METHODS: [&str; 23] = [
    "initialize",
    "ping",
    "server/discover",
    "subscriptions/listen",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "completion/complete",
    "logging/setLevel",
    "tasks/get",
    "tasks/list",
    "tasks/result",
    "tasks/cancel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/roots/list_changed",
];

/// `method` as a `requests_total` label.
pub fn method_label(method: &str) -> &str {
    if METHODS.contains(&method) {
        method
    } else {
        "other"
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub server: String,
    pub method: String,
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub server: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The proxy's metrics.
pub struct Metrics {
    registry: Registry,
    pub connections: Counter,
    pub active_connections: Gauge,
    pub refused_connections: Counter,
    pub requests: Family<RequestLabels, Counter>,
    pub denials: Family<RuleLabels, Counter>,
    pub rejected: Counter,
    pub upstream_latency: Family<ServerLabels, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<ServerLabels, Counter>,
}

impl Metrics {
    /// The registry, with the audit log's fsync histogram from `audit`.
    pub fn new(audit: &crate::audit::Stats) -> Self {
        let mut registry = Registry::with_prefix("interceptor");
        let connections = Counter::default();
        let active_connections = Gauge::default();
        let refused_connections = Counter::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let denials = Family::<RuleLabels, Counter>::default();
        let rejected = Counter::default();
        let upstream_latency =
            Family::<ServerLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let upstream_errors = Family::<ServerLabels, Counter>::default();
        registry.register(
            "connections",
            "Agent connections accepted by the proxy",
            connections.clone(),
        );
        registry.register(
            "active_connections",
            "Agent connections being served",
            active_connections.clone(),
        );
        registry.register(
            "refused_connections",
            "Agent connections refused: their cgroup had daemon.max_connections_per_cgroup open",
            refused_connections.clone(),
        );
        registry.register(
            "requests",
            "JSON-RPC requests and notifications, by server, method and decision",
            requests.clone(),
        );
        registry.register(
            "denials",
            "Denied requests, by the rule that denied them",
            denials.clone(),
        );
        registry.register(
            "rejected_requests",
            "HTTP requests refused before any decision (malformed, ambiguous, too large)",
            rejected.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from forwarding a request to the upstream's response headers",
            upstream_latency.clone(),
        );
        registry.register(
            "audit_fsync_seconds",
            "Time each fdatasync on the audit log took",
            audit.sync_seconds.clone(),
        );
        registry.register(
            "upstream_errors",
            "Requests whose upstream could not be reached",
            upstream_errors.clone(),
        );
        Self {
            registry,
            connections,
            active_connections,
            refused_connections,
            requests,
            denials,
            rejected,
            upstream_latency,
            upstream_errors,
        }
    }

    /// The exposition text: the registry, then the kernel, audit and CA counters.
    pub fn render(&self, daemon: &Daemon) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        // `encode` ends with "# EOF" (OpenMetrics); put the extra families before it.
        if let Some(stripped) = out.strip_suffix("# EOF\n") {
            out = stripped.to_owned();
        }
        let _ = writeln!(
            out,
            "# HELP interceptor_kernel_events Redirect events counted by the eBPF programs."
        );
        let _ = writeln!(out, "# TYPE interceptor_kernel_events counter");
        for (name, value) in daemon.kernel.counters() {
            let _ = writeln!(
                out,
                "interceptor_kernel_events_total{{event=\"{name}\"}} {value}"
            );
        }
        let stats = &daemon.audit.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        for (name, help, value) in [
            ("audit_events", "Audit events written", load(&stats.events)),
            (
                "audit_failures",
                "Audit write failures (requests were refused)",
                load(&stats.failures),
            ),
            (
                "audit_fsyncs",
                "fdatasync calls on the audit log",
                load(&stats.syncs),
            ),
            (
                "worker_busy_polls",
                "Zero-timeout polls connection workers made busy polling (daemon.busy_poll)",
                daemon.workers.busy_polling().1,
            ),
            (
                "certificate_mints",
                "Workload certificates minted by the node CA",
                daemon.ca.as_ref().map_or(0, |ca| load(&ca.mints)),
            ),
        ] {
            let _ = writeln!(out, "# HELP interceptor_{name} {help}.");
            let _ = writeln!(out, "# TYPE interceptor_{name} counter");
            let _ = writeln!(out, "interceptor_{name}_total {value}");
        }
        let _ = writeln!(
            out,
            "# HELP interceptor_audit_healthy 1 while the audit log is writable.\n# TYPE interceptor_audit_healthy gauge\ninterceptor_audit_healthy {}",
            u8::from(daemon.audit.healthy())
        );
        out.push_str("# EOF\n");
        out
    }
}

/// Longest metrics token accepted (a bearer token, not a document).
const MAX_TOKEN_BYTES: usize = 4096;

/// Reads the bearer token scrapers must present (`daemon.metrics_token_file`): a file only
/// root (or the daemon's user) can read, checked on the open file, holding one line.
pub fn load_token(path: &std::path::Path) -> std::io::Result<Arc<str>> {
    use std::{
        io::Read as _,
        os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    };
    let err = |what: String| {
        std::io::Error::other(format!(
            "daemon.metrics_token_file {}: {what}",
            path.display()
        ))
    };
    use std::os::unix::fs::OpenOptionsExt as _;
    // Non-blocking: a FIFO planted there must not hang the start.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("daemon.metrics_token_file {}: {e}", path.display()),
            )
        })?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "readable by group or others (mode {mode:o}); the token must be private: chmod 600 {}",
            path.display()
        )));
    }
    if meta.uid() != 0 && meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(err(format!(
            "owned by uid {}: it must be root's (another user could change it)",
            meta.uid()
        )));
    }
    let mut text = String::new();
    (&mut file)
        .take(MAX_TOKEN_BYTES as u64 + 2)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => err("is not UTF-8 text".into()),
            _ => err(format!("cannot be read: {e}")),
        })?;
    let token = text.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(err(format!(
            "must hold one token of 1 to {MAX_TOKEN_BYTES} bytes"
        )));
    }
    if token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(err(
            "the token must be one word of visible ASCII (what an HTTP header can carry)".into(),
        ));
    }
    Ok(Arc::from(token))
}

/// Whether `headers` carry `Authorization: Bearer <token>` (their SHA-256 digests compared:
/// the time taken tells nothing of the token, its length included).
fn authorized(headers: &http::HeaderMap, token: &str) -> bool {
    use sha2::{Digest as _, Sha256};
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
    else {
        return false;
    };
    let (a, b) = (Sha256::digest(given.trim()), Sha256::digest(token));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Binds the metrics listener (so a taken address fails at start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr} (daemon.metrics_addr): {e}"),
        )
    })
}

/// Scrape connections served at once; more are closed at once (anyone on the node may connect:
/// idle connections must not use up the daemon's file descriptors, which its listeners share).
const MAX_SCRAPERS: usize = 32;
/// How long a scraper may take to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a scrape connection lives at most (a scraper reconnects).
const CONNECTION_LIFE: Duration = Duration::from_secs(60);

/// Serves `GET /metrics` until the future is dropped; with `token`, only to requests that
/// present it (`Authorization: Bearer …`; others get 401).
pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>, token: Option<Arc<str>>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics endpoint listening");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics: {MAX_SCRAPERS} scrape connections open; closing this one");
            continue;
        };
        let daemon = daemon.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let daemon = daemon.clone();
                let allowed = token
                    .as_deref()
                    .is_none_or(|t| authorized(req.headers(), t));
                async move {
                    let resp = if !allowed {
                        Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .header(
                                header::WWW_AUTHENTICATE,
                                "Bearer realm=\"interceptor metrics\"",
                            )
                            .body(Full::new(Bytes::from_static(
                                b"a bearer token is required (daemon.metrics_token_file)\n",
                            )))
                    } else if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(daemon.metrics.render(&daemon))))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                    };
                    resp.map_err(|e| std::io::Error::other(e.to_string()))
                }
            });
            // HTTP/1 only (what scrapers speak): its head timeout also runs while nothing at
            // all has arrived (a sniffing HTTP/1-or-2 builder would wait for the first bytes
            // with no limit).
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFE, connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_is_authorized_by_its_bearer_token_only() {
        let with = |value: &[u8]| {
            let mut h = http::HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                http::HeaderValue::from_bytes(value).expect("header value"),
            );
            authorized(&h, "s3cret")
        };
        assert!(with(b"Bearer s3cret"));
        assert!(with(b"bearer s3cret"));
        assert!(with(b"Bearer   s3cret "));
        for refused in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret2",
            b"Basic s3cret",
            b"Bearers3cret",
            b"s3cret",
            b"Bearer s3cr\xc3\xa9t",
        ] {
            assert!(!with(refused), "{}", String::from_utf8_lossy(refused));
        }
        assert!(!authorized(&http::HeaderMap::new(), "s3cret"));
    }

    #[test]
    fn a_token_file_is_private_one_word_and_bounded() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, text: &[u8], mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            path
        };
        let ok = file("ok", b"tok-en\n", 0o600);
        assert_eq!(&*load_token(&ok).expect("loaded"), "tok-en");
        let at_limit = file(
            "limit",
            format!("{}\n", "a".repeat(MAX_TOKEN_BYTES)).as_bytes(),
            0o600,
        );
        assert_eq!(
            load_token(&at_limit).expect("at the limit").len(),
            MAX_TOKEN_BYTES
        );
        for (path, says) in [
            (file("open", b"tok\n", 0o640), "readable by group or others"),
            (file("empty", b"\n", 0o600), "one token"),
            (file("two", b"two words\n", 0o600), "one word"),
            (
                file("long", "a".repeat(MAX_TOKEN_BYTES + 1).as_bytes(), 0o600),
                "one token",
            ),
            (file("binary", b"\xff\xfe", 0o600), "not UTF-8"),
            (dir.path().to_owned(), "not a regular file"),
        ] {
            let e = load_token(&path).expect_err("refused").to_string();
            assert!(e.contains(says), "{}: {e}", path.display());
        }
    }

    #[test]
    fn only_mcp_methods_name_a_series() {
        assert_eq!(method_label("tools/call"), "tools/call");
        assert_eq!(
            method_label("notifications/initialized"),
            "notifications/initialized"
        );
        assert_eq!(method_label("tools/call2"), "other");
        assert_eq!(method_label("notifications/x-1"), "other");
        assert_eq!(method_label(""), "other");
    }
}
