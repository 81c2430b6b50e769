//! The way to the real MCP server: a pooled HTTP/1.1 client over plain TCP or mutual TLS 1.3.
//! (The connect hooks recognise the daemon's own connections by process and cgroup and never
//! redirect them.)
//!
//! With TLS, each workload gets its own client — and so its own connection pool — presenting
//! that workload's certificate from the node CA; the pool is replaced when the certificate is
//! renewed. The upstream's certificate is verified by rustls' webpki verifier against the
//! configured CA and name; an optional `server_id` (URI SAN) is checked by wrapping that
//! verifier, never by re-implementing it. A failed handshake fails the request: there is no
//! plaintext fallback. Chains it accepted are remembered for a few minutes (at most until a
//! certificate in them expires), so the full handshakes of new workloads skip the chain's
//! signature checks; the handshake signature, which proves the upstream holds the key, is
//! checked on every handshake.
//!
//! A new agent connection whose workload has no upstream connection open on its worker gets
//! one opened ahead of its first request ([`Upstream::warm`]): the TCP and TLS handshakes run
//! while the request is read, parsed, judged and recorded, and the pool's next connect takes
//! that connection (within [`AHEAD_LIFE`]; after it, it is closed unused).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{
    bpf::lock,
    ca::{Leaf, NodeCa},
    config::{RawTls, Server},
};

/// How long to wait for the upstream's TCP handshake before trying the next address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP client for one server (plain) or one (workload, server) pair (TLS).
pub type UpstreamClient = Client<MarkedConnector, Full<Bytes>>;

/// How long a connection opened ahead of a request waits for it. An agent's first request
/// follows its connect within milliseconds; one that has not come by then may never come (and
/// the upstream may close idle connections), so the connection is closed unused.
pub const AHEAD_LIFE: Duration = Duration::from_secs(2);

/// A pool's client and its connector (which opens connections ahead for it). Shared, not
/// cloned, per request: the connector holds the server name and TLS configuration.
struct Pool {
    client: UpstreamClient,
    connector: MarkedConnector,
}

/// One client (and so one pool) per worker slot.
type Pools = Box<[Arc<Pool>]>;

/// Reads the PEM certificates in `path` into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let mut n = 0;
    for item in ::pem::parse_many(&pem).map_err(|e| format!("{}: not PEM: {e}", path.display()))? {
        if item.tag() == "CERTIFICATE" {
            roots
                .add(CertificateDer::from(item.into_contents()))
                .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
            n += 1;
        }
    }
    if n == 0 {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(roots)
}

/// The upstream side of one server.
pub struct Upstream {
    addrs: Arc<[SocketAddr]>,
    upstream: Arc<str>,
    /// One pool per worker slot ([`crate::workers::slot`]): a pooled connection is driven by
    /// the event loop that opened it, so requests only use their own worker's connections.
    plain: Pools,
    tls: Option<TlsUpstream>,
    /// The `inject_headers` credential files.
    credentials: CredentialFiles,
    /// Connections opened ahead of requests, and of those, taken by one.
    pub ahead: Arc<AheadStats>,
}

/// Counts of connections opened ahead of requests ([`Upstream::warm`]).
#[derive(Debug, Default)]
pub struct AheadStats {
    pub opened: AtomicU64,
    pub used: AtomicU64,
}

/// What tells a changed file apart: device, inode, size, modification time (s, ns).
type FileStamp = (u64, u64, u64, i64, i64);

/// Contents of credential files, read again whenever a file changes (a rotated secret counts
/// from the next request), otherwise served from memory: one `statx` per request instead of
/// open, read and close.
#[derive(Default)]
pub struct CredentialFiles(Mutex<HashMap<std::path::PathBuf, (FileStamp, Credential)>>);

/// A credential read from its file, and the forms it is scrubbed from answers in.
#[derive(Clone)]
pub struct Credential {
    pub value: Arc<str>,
    pub forms: crate::mcp::SecretForms,
}

impl CredentialFiles {
    /// The credential in `path`, trailing whitespace trimmed.
    pub fn read(&self, path: &Path) -> io::Result<Credential> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let stamp = (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
        if let Some((seen, value)) = lock(&self.0).get(path)
            && *seen == stamp
        {
            return Ok(value.clone());
        }
        let value: Arc<str> = std::fs::read_to_string(path)?.trim_end().into();
        let credential = Credential {
            forms: crate::mcp::SecretForms::of(&value),
            value,
        };
        lock(&self.0).insert(path.to_owned(), (stamp, credential.clone()));
        Ok(credential)
    }
}

struct TlsUpstream {
    verifier: Arc<dyn ServerCertVerifier>,
    server_name: ServerName<'static>,
    /// Per workload id: the certificate the pools present, and a pool per worker slot.
    clients: Mutex<crate::ca::ByWorkload<(Arc<Leaf>, Pools)>>,
}

/// Why no client could be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The workload has no id (its process could not be inspected, or the template has no
    /// value for it), so no certificate and no identity assertion: with a `[ca]`, nothing is
    /// forwarded without them (an upstream that takes a missing assertion for an anonymous
    /// caller must not be reached by one).
    #[error(
        "no workload id for this process (it exited or could not be inspected, or the \
         workload_id template has no value for it), so no client certificate or identity \
         assertion: with [ca] configured nothing is forwarded without one"
    )]
    NoWorkloadId,
    /// Minting failed.
    #[error("minting the client certificate failed: {0}")]
    Mint(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

impl Upstream {
    /// Prepares the upstream side of `server` (roots and verifier built once) for `slots`
    /// worker slots ([`crate::workers::Workers::slots`]).
    pub fn new(server: &Server, slots: usize) -> Result<Self, String> {
        let addrs: Arc<[SocketAddr]> = server.upstream_addrs.clone().into();
        let upstream: Arc<str> = server.upstream.clone().into();
        let tls = server.tls.as_ref().map(TlsUpstream::new).transpose()?;
        let ahead = Arc::new(AheadStats::default());
        Ok(Self {
            plain: pools(slots, &addrs, &upstream, None, &ahead),
            addrs,
            upstream,
            tls,
            credentials: CredentialFiles::default(),
            ahead,
        })
    }

    /// The credential of an `inject_headers` entry (see [`CredentialFiles`]).
    pub fn credential(&self, path: &Path) -> io::Result<Credential> {
        self.credentials.read(path)
    }

    /// The client for a request from `workload_id`, with the calling worker's pool.
    pub fn client(
        &self,
        ca: Option<&NodeCa>,
        workload_id: Option<&str>,
    ) -> Result<UpstreamClient, Error> {
        Ok(self.pool(ca, workload_id)?.client.clone())
    }

    /// For a new agent connection of `workload_id`: when the calling worker's pool for it has
    /// no upstream connection open, opens one now (minting the workload's certificate if it
    /// has none), so that its handshakes overlap the reading, judging and recording of the
    /// agent's first request. At most one is opened ahead per pool at a time.
    pub fn warm(&self, ca: Option<&NodeCa>, workload_id: Option<&str>) {
        if let Ok(pool) = self.pool(ca, workload_id) {
            pool.connector.open_ahead();
        }
    }

    fn pool(&self, ca: Option<&NodeCa>, workload_id: Option<&str>) -> Result<Arc<Pool>, Error> {
        let slot = crate::workers::slot() % self.plain.len();
        let Some(tls) = &self.tls else {
            if ca.is_some() && workload_id.is_none() {
                return Err(Error::NoWorkloadId);
            }
            return Ok(self.plain[slot].clone());
        };
        let wid = workload_id.ok_or(Error::NoWorkloadId)?;
        let ca = ca.ok_or_else(|| Error::Mint("no [ca] configured".into()))?;
        let leaf = ca.leaf(wid).map_err(|e| Error::Mint(e.to_string()))?;
        let mut clients = lock(&tls.clients);
        if let Some((l, c)) = clients.get(wid)
            && Arc::ptr_eq(l, &leaf)
        {
            return Ok(c[slot].clone());
        }
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| Error::Tls(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(tls.verifier.clone())
                .with_client_auth_cert(leaf.chain.clone(), leaf.key())
                .map_err(|e| Error::Tls(e.to_string()))?;
        // A renewed certificate gets fresh pools: connections keep the identity they were
        // opened with. (Session resumption is on by default in rustls; the workers' pools
        // share one configuration and so its session cache.)
        let connector = TlsConnector::from(Arc::new(config));
        let pools = pools(
            self.plain.len(),
            &self.addrs,
            &self.upstream,
            Some((&connector, &tls.server_name)),
            &self.ahead,
        );
        let pool = pools[slot].clone();
        // Pools of certificates that expired (workloads gone, or renewed) go, and the oldest
        // beyond the cap: requests still using one hold their own handle.
        clients.insert(
            wid.to_owned(),
            (leaf, pools),
            std::time::SystemTime::now(),
            |(l, _)| l,
        );
        Ok(pool)
    }
}

impl TlsUpstream {
    fn new(t: &RawTls) -> Result<Self, String> {
        let roots = Arc::new(load_roots(&t.ca)?);
        let inner = WebPkiServerVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| format!("building the verifier for {}: {e}", t.ca.display()))?;
        let verifier = Arc::new(UpstreamVerifier::new(inner, t.server_id.clone()));
        let server_name = ServerName::try_from(t.server_name.clone())
            .map_err(|e| format!("server_name {:?}: {e}", t.server_name))?;
        Ok(Self {
            verifier,
            server_name,
            clients: Mutex::default(),
        })
    }
}

/// One client per worker slot (at least one), sharing `tls` (and so its session cache).
fn pools(
    slots: usize,
    addrs: &Arc<[SocketAddr]>,
    upstream: &Arc<str>,
    tls: Option<(&TlsConnector, &ServerName<'static>)>,
    stats: &Arc<AheadStats>,
) -> Pools {
    (0..slots.max(1))
        .map(|_| {
            let connector = MarkedConnector {
                addrs: addrs.clone(),
                upstream: upstream.clone(),
                tls: tls.map(|(c, n)| (c.clone(), n.clone())),
                ahead: Arc::new(Ahead::default()),
                stats: stats.clone(),
            };
            Arc::new(Pool {
                client: build(connector.clone()),
                connector,
            })
        })
        .collect()
}

/// Idle upstream connections kept per pool (a workload's, on one worker).
const MAX_IDLE_PER_POOL: usize = 32;

fn build(connector: MarkedConnector) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        // With a timer the pool closes idle connections on its own; without one only a later
        // checkout would (a departed workload's connections stayed open until its pool went).
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        // A burst of concurrent requests leaves no more than this many open afterwards (each
        // an open file, and a port towards the upstream, for 90 s).
        .pool_max_idle_per_host(MAX_IDLE_PER_POOL)
        .build(connector)
}

/// How long an accepted chain is remembered (at most; never past a certificate's `notAfter`).
const REMEMBER_CHAIN: Duration = Duration::from_secs(300);
/// Most chains remembered per server (an upstream has one or a few).
const REMEMBERED_CHAINS: usize = 64;

/// The upstream's certificate check: the webpki verifier (`inner`), plus, with `server_id`,
/// that URI SAN. Chains it accepted are remembered: each workload's first connection is a
/// full handshake (certificates differ, so no resumption), and the chain check (webpki path
/// building and ECDSA verification, ~84 µs here) was a tenth of the worker's time on them.
/// Only an identical chain for the same name, within [`REMEMBER_CHAIN`] and before any of its
/// certificates expires, is taken as verified (a cache of verification results, as browsers
/// keep); the handshake signature is always verified.
struct UpstreamVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    server_id: Option<String>,
    /// SHA-256 of (name, chain, OCSP response) → (verified at, accepted until), Unix seconds.
    accepted: Mutex<HashMap<[u8; 32], (u64, u64)>>,
}

impl std::fmt::Debug for UpstreamVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamVerifier")
            .field("inner", &self.inner)
            .field("server_id", &self.server_id)
            .finish_non_exhaustive()
    }
}

impl UpstreamVerifier {
    fn new(inner: Arc<dyn ServerCertVerifier>, server_id: Option<String>) -> Self {
        Self {
            inner,
            server_id,
            accepted: Mutex::new(HashMap::new()),
        }
    }

    /// `end_entity` carries `server_id` (if one is required) as a URI SAN.
    fn check_server_id(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let Some(server_id) = &self.server_id else {
            return Ok(());
        };
        let uris = uri_sans(end_entity);
        if uris.iter().any(|u| u == server_id) {
            return Ok(());
        }
        Err(rustls::Error::General(format!(
            "upstream certificate does not carry server_id {server_id} (its URI SANs: {})",
            if uris.is_empty() {
                "none".to_owned()
            } else {
                uris.join(", ")
            }
        )))
    }

    fn key(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
    ) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut part = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        part(format!("{server_name:?}").as_bytes());
        part(ocsp_response);
        part(end_entity);
        for c in intermediates {
            part(c);
        }
        h.finalize().into()
    }
}

/// The earliest `notAfter` among `certs` (Unix seconds); 0 if one cannot be read.
fn earliest_expiry<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> u64 {
    certs
        .into_iter()
        .map(|c| {
            x509_parser::parse_x509_certificate(c)
                .map(|(_, p)| u64::try_from(p.validity().not_after.timestamp()).unwrap_or(0))
                .unwrap_or(0)
        })
        .min()
        .unwrap_or(0)
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = Self::key(end_entity, intermediates, server_name, ocsp_response);
        let now_s = now.as_secs();
        // A clock stepped back past the verification takes nothing as verified.
        if lock(&self.accepted)
            .get(&key)
            .is_some_and(|&(at, until)| at <= now_s && now_s < until)
        {
            return Ok(ServerCertVerified::assertion());
        }
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.check_server_id(end_entity)?;
        let until = earliest_expiry(std::iter::once(end_entity).chain(intermediates))
            .min(now_s + REMEMBER_CHAIN.as_secs());
        let mut accepted = lock(&self.accepted);
        accepted.retain(|_, &mut (at, until)| at <= now_s && now_s < until);
        if accepted.len() < REMEMBERED_CHAINS {
            accepted.insert(key, (now_s, until));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The URI subject alternative names of a certificate.
pub fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// Connects to the server's resolved upstream addresses (whatever the request URI says), with
/// TLS when configured; takes the connection opened ahead for its pool, if there is one.
#[derive(Clone)]
pub struct MarkedConnector {
    addrs: Arc<[SocketAddr]>,
    upstream: Arc<str>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// This pool's connections open now, and the one opened ahead of a request.
    ahead: Arc<Ahead>,
    stats: Arc<AheadStats>,
}

/// A pool's upstream connections open now (each counted until dropped), and at most one opened
/// ahead of a request ([`Upstream::warm`]).
#[derive(Default)]
struct Ahead {
    open: AtomicUsize,
    next: Mutex<Option<Opening>>,
    /// The id the next [`Opening`] gets.
    next_id: AtomicU64,
}

/// A connection being opened, or opened, ahead of a request.
struct Opening {
    /// Told apart from a later one (its task closes only its own).
    id: u64,
    at: Instant,
    rx: tokio::sync::oneshot::Receiver<io::Result<Io>>,
}

impl MarkedConnector {
    /// Opens a connection ahead of a request when none is open or being opened for this pool
    /// (see [`Upstream::warm`]); closes it unused after [`AHEAD_LIFE`].
    fn open_ahead(&self) {
        if self.ahead.open.load(Ordering::Relaxed) > 0 {
            return;
        }
        let mut next = lock(&self.ahead.next);
        if next.as_ref().is_some_and(|o| o.at.elapsed() < AHEAD_LIFE) {
            return;
        }
        let id = self.ahead.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let at = Instant::now();
        *next = Some(Opening { id, at, rx });
        drop(next);
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        tokio::spawn(async move {
            let opened = this.open().await;
            let failed = opened.is_err();
            let _ = tx.send(opened);
            // A failure is for a request already waiting for it, not kept for a later one
            // (the upstream may be back by then); an open connection is kept until AHEAD_LIFE
            // from when it was asked for.
            if !failed {
                tokio::time::sleep_until((at + AHEAD_LIFE).into()).await;
            }
            // Not taken by then: closed (dropping it with its channel).
            let mut next = lock(&this.ahead.next);
            if next.as_ref().is_some_and(|o| o.id == id) {
                *next = None;
            }
        });
    }

    /// The connection opened ahead for this pool, if one was opened less than [`AHEAD_LIFE`]
    /// ago (an older one is closed).
    fn take_ahead(&self) -> Option<Opening> {
        lock(&self.ahead.next)
            .take()
            .filter(|o| o.at.elapsed() < AHEAD_LIFE)
    }

    /// A new connection: TCP to the first upstream address that answers, then TLS if
    /// configured.
    async fn open(&self) -> io::Result<Io> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut tcp = None;
        for &addr in self.addrs.iter() {
            match connect_marked(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some(tcp) = tcp else {
            return Err(io::Error::new(
                last.kind(),
                format!("cannot connect to upstream {}: {last}", self.upstream),
            ));
        };
        let counted = Open::new(self.ahead.clone());
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some((connector, name)) => {
                let stream =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                        })?
                        .map_err(|e| {
                            io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                format!(
                                    "TLS handshake with upstream {} failed: {e}",
                                    self.upstream
                                ),
                            )
                        })?;
                Stream::Tls(Box::new(stream))
            }
        };
        Ok(Io {
            stream,
            _open: counted,
        })
    }
}

impl tower_service::Service<http::Uri> for MarkedConnector {
    type Response = TokioIo<Io>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            // One opened ahead for this pool (still opening, perhaps): its handshake started
            // when the agent connected. Its failure is this request's (the same addresses and
            // certificate, moments ago: trying again would double the wait and the upstream's
            // failed handshakes). One the upstream has closed meanwhile (nothing reads it
            // while it waits, and hyper retries no request on a fresh connection) gives way
            // to a connection of our own.
            if let Some(opening) = this.take_ahead()
                && let Ok(opened) = opening.rx.await
            {
                let io = opened?;
                if !io.peer_closed() {
                    this.stats.used.fetch_add(1, Ordering::Relaxed);
                    return Ok(TokioIo::new(io));
                }
            }
            Ok(TokioIo::new(this.open().await?))
        })
    }
}

/// Counts a pool's connection as open while it lives.
struct Open(Arc<Ahead>);

impl Open {
    fn new(ahead: Arc<Ahead>) -> Self {
        ahead.open.fetch_add(1, Ordering::Relaxed);
        Self(ahead)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection to an upstream, counted as open in its pool while it lives.
pub struct Io {
    stream: Stream,
    _open: Open,
}

impl Io {
    /// Whether the upstream closed (or reset) the connection: a hang-up waiting on the
    /// socket. Data waiting is no sign of it (TLS 1.3 session tickets follow the handshake).
    fn peer_closed(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match &self.stream {
            Stream::Plain(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.get_ref().0.as_raw_fd(),
        };
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut poll, 1, 0) };
        n > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}

/// Plain TCP or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A TCP connection to the upstream.
pub async fn connect_marked(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_nodelay(true)?;
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts chain verifications; accepts chains whose end entity is not `b"bad"`.
    #[derive(Debug, Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl ServerCertVerifier for Counting {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if end_entity.as_ref() == b"bad" {
                return Err(rustls::Error::General("bad chain".into()));
            }
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("not used".into()))
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("not used".into()))
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            Vec::new()
        }
    }

    #[test]
    fn an_accepted_chain_is_remembered_only_as_it_was_and_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = crate::ca::init(dir.path(), "n").unwrap();
        let pem = pem::parse(std::fs::read(cert).unwrap()).unwrap();
        let good = CertificateDer::from(pem.contents().to_vec());
        let expiry = earliest_expiry([&good]);
        assert!(expiry > 0, "notAfter read");
        let inner = Arc::new(Counting::default());
        let v = UpstreamVerifier::new(inner.clone(), None);
        let calls = || inner.0.load(std::sync::atomic::Ordering::SeqCst);
        let name = ServerName::try_from("notes.test").unwrap();
        let other_name = ServerName::try_from("other.test").unwrap();
        let at = |secs: u64| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let now = expiry - 3600;
        let verify = |end: &CertificateDer<'_>, mids: &[CertificateDer<'_>], n, t| {
            v.verify_server_cert(end, mids, n, &[], t).is_ok()
        };
        assert!(verify(&good, &[], &name, at(now)));
        assert!(verify(&good, &[], &name, at(now + 10)));
        assert_eq!(calls(), 1, "the same chain for the same name is remembered");
        assert!(verify(&good, &[], &other_name, at(now + 10)));
        assert!(verify(
            &good,
            std::slice::from_ref(&good),
            &name,
            at(now + 10)
        ));
        assert_eq!(
            calls(),
            3,
            "another name or other intermediates are verified"
        );
        assert!(verify(
            &good,
            &[],
            &name,
            at(now + REMEMBER_CHAIN.as_secs() + 1)
        ));
        assert_eq!(calls(), 4, "verified again once remembered long enough");
        // Never past the certificate's own expiry, however recently it was verified.
        assert!(verify(&good, &[], &name, at(expiry - 1)));
        let before = calls();
        assert!(verify(&good, &[], &name, at(expiry)));
        assert_eq!(calls(), before + 1, "taken as verified past its notAfter");
        // A rejected chain is not remembered.
        let bad = CertificateDer::from(b"bad".to_vec());
        assert!(!verify(&bad, &[], &name, at(now)));
        assert!(!verify(&bad, &[], &name, at(now)));
        assert_eq!(calls(), before + 3);
        // Nor before the moment it was verified (a clock stepped back).
        assert!(verify(&good, &[], &name, at(now)));
        assert!(verify(&good, &[], &name, at(now - 1)));
        assert_eq!(calls(), before + 5, "taken as verified before it was");
    }

    #[test]
    fn pools_of_expired_certificates_go_when_another_workload_connects() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::ca::init(dir.path(), "n").unwrap();
        let ca = NodeCa::load(&crate::ca::RawCa {
            cert: cert.clone(),
            key,
            leaf_ttl: "2s".into(),
        })
        .unwrap();
        let server = Server {
            name: "notes".into(),
            intercept: vec![],
            upstream: "127.0.0.1:9".into(),
            upstream_addrs: vec!["127.0.0.1:9".parse().unwrap()],
            authority: "127.0.0.1:9".into(),
            tls: Some(RawTls {
                ca: cert,
                server_name: "notes.test".into(),
                server_id: None,
            }),
            inject_headers: Default::default(),
            pass_authorization: false,
            intercept_upstream: true,
            paths: None,
            session_scope: 0,
        };
        let up = Upstream::new(&server, 2).unwrap();
        let workloads = |up: &Upstream| -> Vec<String> {
            let tls = up.tls.as_ref().unwrap();
            let mut ids: Vec<String> = lock(&tls.clients).ids().cloned().collect();
            ids.sort();
            ids
        };
        up.client(Some(&ca), Some("spiffe://x/a")).unwrap();
        let gone = ca.leaf("spiffe://x/a").unwrap().not_after;
        crate::ca::sleep_until(gone - Duration::from_millis(1500));
        up.client(Some(&ca), Some("spiffe://x/b")).unwrap();
        assert_eq!(workloads(&up), ["spiffe://x/a", "spiffe://x/b"]);
        // a's certificate expired; b's is due for renewal but still valid: its pools stay.
        crate::ca::sleep_until(gone + Duration::from_millis(50));
        up.client(Some(&ca), Some("spiffe://x/c")).unwrap();
        assert_eq!(workloads(&up), ["spiffe://x/b", "spiffe://x/c"]);
    }

    #[test]
    fn credential_files_are_read_again_only_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let files = CredentialFiles::default();
        let a = files.read(&path).unwrap().value;
        assert_eq!(&*a, "first");
        assert!(
            Arc::ptr_eq(&a, &files.read(&path).unwrap().value),
            "served from memory"
        );
        // Rotation by rename (a new inode), as secret managers do.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(&*files.read(&path).unwrap().value, "second");
        // Rewritten in place with another length.
        std::fs::write(&path, "third-value").unwrap();
        assert_eq!(&*files.read(&path).unwrap().value, "third-value");
        std::fs::remove_file(&path).unwrap();
        assert!(
            files.read(&path).is_err(),
            "a removed file is an error, not the old value"
        );
    }
}
