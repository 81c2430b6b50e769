//! The daemon's TOML configuration, in two layers: the raw serde layer ([`RawConfig`], which
//! rejects unknown keys) and the validated [`Config`] with addresses resolved, produced once at
//! load by [`Config::load`] / [`Config::parse`]. Errors name the file, the key and the fix.

use std::{
    collections::{BTreeMap, HashMap},
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    audit::RawAudit,
    ca::RawCa,
    policy::{Policy, RawBinding, RawPolicyOptions, RawRole},
    workload::RawIdentity,
};

/// Where the CLI looks for the config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/interceptor/interceptor.toml";
/// Default proxy port on 127.0.0.1 and [::1].
pub const DEFAULT_LISTEN_PORT: u16 = 15001;
/// Default bpffs folder for pinned maps and links.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/interceptor";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/interceptor/admin.sock";

/// A configuration problem, reported with the file and the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error(
        "cannot read config {path}: {error}; pass the daemon's config with --config FILE \
         (examples/interceptor.toml shows every key)"
    )]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is well-formed TOML but not acceptable.
    #[error("config {path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The file as written. Every table rejects keys it does not know.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub daemon: RawDaemon,
    /// `[[tag]]` tables: cgroups tagged at every start.
    #[serde(default, rename = "tag")]
    pub tags: Vec<RawTag>,
    /// `[[server]]` tables: the MCP servers whose addresses are intercepted.
    #[serde(default, rename = "server")]
    pub servers: Vec<RawServer>,
    /// `[[role]]` tables: what may be used.
    #[serde(default, rename = "role")]
    pub roles: Vec<RawRole>,
    /// `[[binding]]` tables: who gets which role.
    #[serde(default, rename = "binding")]
    pub bindings: Vec<RawBinding>,
    /// `[policy]`: how denials look.
    #[serde(default)]
    pub policy: RawPolicyOptions,
    /// `[proxy]`: request limits.
    #[serde(default)]
    pub proxy: RawProxy,
    /// `[audit]`: the audit log.
    #[serde(default)]
    pub audit: RawAudit,
    /// `[identity]`: how workloads are named.
    #[serde(default)]
    pub identity: RawIdentity,
    /// `[ca]`: the node CA (client certificates, identity assertions).
    #[serde(default)]
    pub ca: Option<RawCa>,
}

/// Validated `[identity]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub trust_domain: String,
    /// The node name (the host name when the config says "").
    pub node: String,
    /// The workload id template.
    pub template: String,
    /// Header carrying the signed identity assertion (lowercase).
    pub assertion_header: String,
    /// Lifetime of an assertion.
    pub assertion_ttl: std::time::Duration,
}

/// `[proxy]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProxy {
    /// Largest request body accepted (bytes); larger ones get HTTP 413.
    pub max_body_bytes: usize,
    /// Deepest JSON nesting accepted in a request.
    pub max_json_depth: usize,
    /// Largest JSON response body the proxy buffers to filter (bytes).
    pub max_response_bytes: usize,
    /// Most JSON values (object keys included) accepted in a request.
    pub max_json_values: usize,
    /// Most messages accepted in a JSON-RPC batch.
    pub max_batch: usize,
    /// Most JSON values in an upstream answer or SSE event, objects counting 16.
    pub max_response_values: usize,
    /// How long an agent may take to send a request body once its head is read
    /// (`"30s"`, humantime).
    #[serde(deserialize_with = "duration")]
    pub body_timeout: std::time::Duration,
    /// Most bytes of request bodies and JSON answers held at once, node-wide (default 256 MiB,
    /// or the per-cgroup bound if that is more).
    pub max_buffered_bytes: Option<usize>,
    /// Most of those held at once for the agents of one cgroup (default an eighth of
    /// `max_buffered_bytes`, or what one exchange may hold, `max_body_bytes` +
    /// `max_response_bytes`, if that is more).
    pub max_buffered_bytes_per_cgroup: Option<usize>,
    /// Most requests in flight at once, node-wide: from a request's head to its answer's last
    /// byte (a stream for as long as it is open), each holding an upstream connection.
    pub max_requests_in_flight: usize,
    /// Most of those at once for the agents of one cgroup (default 256, or
    /// `max_requests_in_flight` if that is less).
    pub max_requests_in_flight_per_cgroup: Option<usize>,
    /// Requests a second the agents of one cgroup may send (0: no limit).
    pub max_requests_per_second_per_cgroup: u32,
    /// How many of those may come at once (default: a second's worth).
    pub request_burst_per_cgroup: Option<u32>,
}

/// A humantime duration (`"30s"`, `"1m 30s"`).
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({e}); write e.g. \"30s\""
        ))
    })
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_json_values: DEFAULT_MAX_JSON_VALUES,
            max_batch: DEFAULT_MAX_BATCH,
            max_response_values: DEFAULT_MAX_RESPONSE_VALUES,
            body_timeout: std::time::Duration::from_secs(30),
            max_buffered_bytes: None,
            max_buffered_bytes_per_cgroup: None,
            max_requests_in_flight: DEFAULT_MAX_REQUESTS_IN_FLIGHT,
            max_requests_in_flight_per_cgroup: None,
            max_requests_per_second_per_cgroup: 0,
            request_burst_per_cgroup: None,
        }
    }
}

impl RawProxy {
    /// (`max_requests_in_flight`, `max_requests_in_flight_per_cgroup`), defaults applied.
    pub fn in_flight(&self) -> (usize, usize) {
        let per_cgroup = self
            .max_requests_in_flight_per_cgroup
            .unwrap_or(DEFAULT_MAX_REQUESTS_IN_FLIGHT_PER_CGROUP.min(self.max_requests_in_flight));
        (self.max_requests_in_flight, per_cgroup)
    }

    /// (`max_requests_per_second_per_cgroup`, `request_burst_per_cgroup`), the burst's default
    /// applied; `None` without a rate.
    pub fn rate(&self) -> Option<(u32, u32)> {
        let rate = self.max_requests_per_second_per_cgroup;
        (rate > 0).then(|| (rate, self.request_burst_per_cgroup.unwrap_or(rate)))
    }

    /// (`max_buffered_bytes`, `max_buffered_bytes_per_cgroup`), defaults applied.
    pub fn buffered(&self) -> (usize, usize) {
        let exchange = self.max_body_bytes.saturating_add(self.max_response_bytes);
        // An eighth of the node-wide bound (so long as an exchange fits): eight agents each
        // holding what they may leave the others room.
        let per_cgroup = self.max_buffered_bytes_per_cgroup.unwrap_or_else(|| {
            let total = self
                .max_buffered_bytes
                .unwrap_or(DEFAULT_MAX_BUFFERED_BYTES);
            (total / 8).max(exchange)
        });
        let total = self
            .max_buffered_bytes
            .unwrap_or(DEFAULT_MAX_BUFFERED_BYTES.max(per_cgroup));
        (total, per_cgroup)
    }

    /// The bounds a request body is parsed within.
    pub fn limits(&self) -> crate::mcp::jsonrpc::Limits {
        crate::mcp::jsonrpc::Limits {
            max_depth: self.max_json_depth,
            max_values: self.max_json_values,
            max_batch: self.max_batch,
        }
    }
}

/// Default `proxy.max_body_bytes`: 4 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
/// Default `proxy.max_json_depth`.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 64;
/// Highest `proxy.max_json_depth` accepted (serde_json's own recursion limit is 128).
pub const MAX_JSON_DEPTH_LIMIT: usize = 120;
/// Default `proxy.max_json_values`: tool arguments rarely hold more than a few thousand; a
/// body of tiny objects this large parses into ~25 MB (unbounded, 4 MiB of them: ~400 MB).
pub const DEFAULT_MAX_JSON_VALUES: usize = 100_000;
/// Default `proxy.max_response_values`: a 500-tool list with schemas is ~200,000; at most
/// ~80 MB parsed (16 MiB of tiny objects unbounded: ~1.7 GB).
pub const DEFAULT_MAX_RESPONSE_VALUES: usize = 2_000_000;
/// Default `proxy.max_batch` (batches were removed from MCP in 2025-06-18).
pub const DEFAULT_MAX_BATCH: usize = 100;
/// Default `proxy.max_response_bytes`: 16 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Default `proxy.max_buffered_bytes`: 256 MiB.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 256 << 20;
/// Default `proxy.max_requests_in_flight`.
pub const DEFAULT_MAX_REQUESTS_IN_FLIGHT: usize = 4096;
/// Default `proxy.max_requests_in_flight_per_cgroup`.
pub const DEFAULT_MAX_REQUESTS_IN_FLIGHT_PER_CGROUP: usize = 256;
/// Highest `proxy.max_requests_per_second_per_cgroup` and `request_burst_per_cgroup`.
pub const MAX_REQUEST_RATE: u32 = 1_000_000;

/// Most `daemon.workers` accepted.
pub const MAX_WORKERS: usize = 1024;
/// Default `daemon.busy_poll`.
pub const DEFAULT_BUSY_POLL: &str = "50us";
/// Default `daemon.max_connections_per_cgroup`.
pub const DEFAULT_MAX_CONNECTIONS_PER_CGROUP: u32 = 1024;

/// `[daemon]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDaemon {
    /// The proxy listens on 127.0.0.1 and [::1] at this port.
    pub listen_port: u16,
    /// Where the programs attach, relative to the cgroup v2 mount; "" means the mount itself
    /// (every process on the node passes through them; tags select which are redirected).
    pub cgroup_root: String,
    /// bpffs folder for the pinned maps and links.
    pub bpffs_dir: PathBuf,
    /// Admin socket (root only, mode 0600) used by `tag`, `untag`, `status`.
    pub admin_socket: PathBuf,
    /// Prometheus endpoint (`ip:port`, serving `/metrics`); "" = off.
    pub metrics_addr: String,
    /// A file holding the bearer token scrapers must present; "" = none.
    pub metrics_token_file: String,
    /// On SIGTERM, how long in-flight requests may take to finish before the daemon exits.
    pub drain_grace: String,
    /// Threads serving agent connections, each with its own event loop and upstream pools;
    /// 0 = one per CPU.
    pub workers: usize,
    /// Agent connections served at once for one cgroup; more are refused; 0 = no limit.
    pub max_connections_per_cgroup: u32,
    /// How long a connection worker keeps polling for I/O, without sleeping, once its
    /// connections have nothing to do; "0" = off.
    pub busy_poll: String,
}

impl Default for RawDaemon {
    fn default() -> Self {
        Self {
            listen_port: DEFAULT_LISTEN_PORT,
            cgroup_root: String::new(),
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            metrics_addr: String::new(),
            metrics_token_file: String::new(),
            drain_grace: "10s".into(),
            workers: 0,
            max_connections_per_cgroup: DEFAULT_MAX_CONNECTIONS_PER_CGROUP,
            busy_poll: DEFAULT_BUSY_POLL.into(),
        }
    }
}

/// `[[tag]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTag {
    /// A cgroup path relative to the cgroup v2 mount, e.g. "/agents"; descendants included.
    pub cgroup: String,
}

/// `[[server]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// A short unique name (letters, digits, `_`, `-`, `.`).
    pub name: String,
    /// Addresses agents dial, as `ip:port`, `[ipv6]:port` or `host:port` (resolved at load).
    pub intercept: Vec<String>,
    /// Where the proxy connects: `host:port` or `http://host:port` (plain), or
    /// `https://host:port` (mutual TLS; needs `tls` and `[ca]`).
    pub upstream: String,
    /// How the upstream's certificate is verified (https upstreams).
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Headers added to every forwarded request, their values read from files (credentials the
    /// agent never holds).
    #[serde(default)]
    pub inject_headers: BTreeMap<String, RawInject>,
    /// Forward the agent's own `Authorization` header (dropped by default).
    #[serde(default)]
    pub pass_authorization: bool,
    /// Intercept a plain-HTTP upstream's own addresses too (default true); false for an
    /// upstream that shares its address with other services (an ingress).
    #[serde(default = "yes")]
    pub intercept_upstream: bool,
    /// The request paths of the server agents may use (`/mcp`; an entry ending in `/` covers
    /// the paths below it: `/messages/`); unset, any path. Other endpoints the upstream serves
    /// on the same port are then out of reach.
    #[serde(default)]
    pub paths: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

/// `tls = { … }` of a `[[server]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// CA certificate(s) (PEM) that issued the upstream's certificate.
    pub ca: PathBuf,
    /// The name the upstream's certificate must carry (DNS name or IP address).
    pub server_name: String,
    /// Optional: a URI SAN the upstream's certificate must also carry, e.g. its SPIFFE id.
    #[serde(default)]
    pub server_id: Option<String>,
}

/// One `inject_headers` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInject {
    /// File holding the value (re-read for every request, so it can be rotated).
    pub file: PathBuf,
    /// Put before the file's content, e.g. "Bearer ".
    #[serde(default)]
    pub prefix: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    pub daemon: Daemon,
    /// Cgroup paths (relative to the cgroup v2 mount) tagged at start.
    pub tags: Vec<String>,
    pub servers: Vec<Server>,
    pub policy: Policy,
    pub proxy: RawProxy,
    pub audit: RawAudit,
    pub naming: Naming,
    pub ca: Option<RawCa>,
}

impl Config {
    /// What is valid but likely a mistake: the policy's warnings, and credential files any
    /// user of the node may read (an agent could then send the credential itself, from an
    /// address nobody intercepts).
    pub fn warnings(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = self.policy.warnings();
        if let Some(addr) = self.daemon.metrics_addr.filter(|a| !a.ip().is_loopback()) {
            out.push(format!(
                "daemon.metrics_addr {addr} is reachable from beyond this node's loopback: the \
                 metrics name the policy's rules (denials by rule) and take any connection \
                 (32 at once); bind it to 127.0.0.1 or let only the scraper reach it{}",
                if self.daemon.metrics_token_file.is_some() {
                    " (daemon.metrics_token_file keeps others from reading them, not from \
                     holding its connections)"
                } else {
                    ", and require a token (daemon.metrics_token_file)"
                }
            ));
        }
        let optional: Vec<&str> = ["{exe}", "{comm}", "{container}", "{pod}"]
            .into_iter()
            .filter(|p| self.naming.template.contains(p))
            .collect();
        // Values the process chooses: where they tell workloads apart, one can take another's
        // id (its certificate, its assertion's `sub`, its workload bindings and revocation).
        let anchored = ["{cgroup_path}", "{pod}", "{container}"]
            .iter()
            .any(|p| self.naming.template.contains(p));
        let chosen: Vec<&str> = ["{comm}", "{exe}"]
            .into_iter()
            .filter(|p| self.naming.template.contains(p) && (*p == "{comm}" || !anchored))
            .collect();
        if !chosen.is_empty() {
            out.push(format!(
                "[identity] workload_id uses {}, which a process sets itself (its name with \
                 prctl; an executable path in its own filesystem): a process can render \
                 another workload's id (its certificate, assertions and workload-id \
                 revocation); build ids from {{cgroup_path}} (or {{pod}}/{{container}}) and \
                 {{uid}}",
                chosen.join(" ")
            ));
        }
        if !optional.is_empty() {
            out.push(format!(
                "[identity] workload_id uses {}: a process without one (no known executable: \
                 another user namespace, an exec since its connect; no pod or container in \
                 its cgroup path) gets no workload id (so no certificate or assertion with a \
                 [ca], and no workload_id binding matches it), and is refused while \
                 workload-id revocations are in force",
                optional.join(" ")
            ));
        }
        for s in &self.servers {
            if !s.inject_headers.is_empty() && s.paths.is_none() {
                out.push(format!(
                    "server {:?} injects credentials but has no `paths`: agents may send requests \
                     (with those credentials) to any path of its upstream, endpoints it serves \
                     beside MCP included; list its MCP endpoint(s), e.g. paths = [\"/mcp\"]",
                    s.name
                ));
            }
            for (name, inject) in &s.inject_headers {
                let mode = std::fs::metadata(&inject.file).map_or(0, |m| m.permissions().mode());
                // Readable by others, in folders others (or a group) may pass through.
                // (Group root's members too: a container may run as any uid in gid 0.)
                let passable = |dir: &std::path::Path| {
                    std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o011 != 0)
                };
                let folders_open = inject
                    .file
                    .canonicalize()
                    .is_ok_and(|f| f.ancestors().skip(1).all(passable));
                if mode & 0o004 != 0 && folders_open {
                    out.push(format!(
                        "server {:?} inject_headers.{name}: {} (mode {:o}) can be read by \
                         users of this node other than the daemon's (every user, or a group's \
                         members, through its folders), agents included; make it readable by \
                         the daemon's user only (chmod 600, or 640 with a group agents are not \
                         in)",
                        s.name,
                        inject.file.display(),
                        mode & 0o777
                    ));
                }
            }
        }
        out
    }
}

/// Where a daemon's admin socket and pins are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonPaths {
    pub admin_socket: PathBuf,
    pub bpffs_dir: PathBuf,
}

/// Validated `[daemon]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    pub listen_port: u16,
    /// Relative to the cgroup v2 mount; "/" for the mount itself.
    pub cgroup_root: String,
    pub bpffs_dir: PathBuf,
    pub admin_socket: PathBuf,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The file of the bearer token `/metrics` requires, if any.
    pub metrics_token_file: Option<PathBuf>,
    /// SIGTERM grace period.
    pub drain_grace: std::time::Duration,
    /// Connection worker threads as configured (0 = one per CPU; see [`Daemon::worker_count`]).
    pub workers: usize,
    /// Agent connections served at once per cgroup (0 = no limit).
    pub max_connections_per_cgroup: u32,
    /// How long a connection worker polls without sleeping after its work (zero: off).
    pub busy_poll: std::time::Duration,
}

impl Daemon {
    /// Connection worker threads to start: `workers`, or one per CPU for 0. Resolved when the
    /// daemon starts (kept unresolved here so a reload compares what was written).
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Validated `[[server]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    /// Every address (names resolved) that is redirected to the proxy.
    pub intercept: Vec<SocketAddr>,
    /// The upstream as written (`host:port`, `http://host:port` or `https://host:port`).
    pub upstream: String,
    /// The upstream's resolved addresses, tried in order.
    pub upstream_addrs: Vec<SocketAddr>,
    /// `host:port` of the upstream (without scheme), for the Host header.
    pub authority: String,
    /// Mutual TLS towards the upstream.
    pub tls: Option<RawTls>,
    pub inject_headers: BTreeMap<String, RawInject>,
    pub pass_authorization: bool,
    pub intercept_upstream: bool,
    /// See [`RawServer::paths`].
    pub paths: Option<Vec<String>>,
    /// The first server with the same upstream (same authority or an address in common):
    /// sessions live at the upstream, so their owners are kept per upstream, not per entry (two
    /// entries for one server, with different policies, must not open each other's sessions).
    pub session_scope: usize,
}

impl Server {
    /// Whether the upstream's own addresses are intercepted too: a plain-HTTP upstream's,
    /// unless `intercept_upstream = false` (an `https://` one refuses callers without a
    /// node-issued certificate).
    pub fn upstream_intercepted(&self) -> bool {
        self.tls.is_none() && self.intercept_upstream
    }
}

/// The top-level keys of the file: [`RawConfig`]'s tables.
const SECTIONS: [&str; 10] = [
    "daemon", "tag", "server", "role", "binding", "policy", "proxy", "audit", "identity", "ca",
];

/// The section `name` of the file at `path` (its defaults when absent); the rest of the file
/// need only be TOML with known sections (a misspelt `[deamon]`, or daemon keys written above
/// the `[daemon]` header, would otherwise leave the command on the defaults: another
/// daemon's socket and pins).
fn load_section<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
    name: &str,
) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|error| Error::Read {
        path: path.to_owned(),
        error,
    })?;
    let parse_err = |message: String| Error::Parse {
        path: path.to_owned(),
        message,
    };
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| parse_err(e.to_string().trim_end().to_owned()))?;
    if let Some(unknown) = table.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
        return Err(parse_err(format!(
            "unknown top-level key `{unknown}`: the file's sections are [daemon], [[tag]], \
             [[server]], [[role]], [[binding]], [policy], [proxy], [audit], [identity] and \
             [ca], and every setting belongs under one (a misspelt section would leave its \
             settings at their defaults); `interceptor check --config {}` lists every error",
            path.display()
        )));
    }
    match table.get(name) {
        Some(v) => v.clone().try_into().map_err(|e: toml::de::Error| {
            parse_err(format!("[{name}]: {}", e.to_string().trim_end()))
        }),
        None => Ok(T::default()),
    }
}

impl Server {
    /// Whether agents may use the request path `path` (raw, as sent) of this server: as sent
    /// and percent-decoded, both must be one of its paths (routers differ on decoding: axum
    /// and Express match the raw path, Starlette the decoded one), with no dot segment (also
    /// `..;`, which Tomcat resolves), empty segment or backslash.
    pub fn serves_path(&self, path: &str) -> bool {
        let Some(paths) = &self.paths else {
            return true;
        };
        let Ok(decoded) = percent_encoding::percent_decode_str(path).decode_utf8() else {
            return false;
        };
        let listed = |path: &str| {
            !odd_path(path)
                && paths.iter().any(|p| {
                    path == p
                        || p.ends_with('/') && path.starts_with(p.as_str())
                        || p.ends_with('/') && path == &p[..p.len() - 1]
                })
        };
        listed(path) && listed(&decoded)
    }
}

/// Whether a request path (raw or decoded) is one servers may resolve to another: a dot
/// segment (also `..;`, which Tomcat resolves), an empty segment or a backslash.
pub fn odd_path(path: &str) -> bool {
    path.contains("//")
        || path.contains('\\')
        || path.split('/').skip(1).any(|segment| {
            let bare = segment.split(';').next().unwrap_or("");
            bare == "." || bare == ".."
        })
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text`, reporting errors against `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let mut message = e.to_string().trim_end().to_owned();
            if message.ends_with("invalid type: map, expected a sequence") {
                message.push_str(
                    "\n(the tables that repeat are written with double brackets: [[tag]], \
                     [[server]], [[role]], [[binding]])",
                );
            }
            Error::Parse {
                path: path.to_owned(),
                message,
            }
        })?;
        Validator { path }.validate(raw)
    }

    /// Only where the daemon's admin socket and pins are, for the commands that talk to it
    /// or remove its pins: a mistake elsewhere in `[daemon]` (a metrics address, a duration)
    /// must not keep `revoke` from reaching a running daemon.
    pub fn load_daemon_paths(path: &Path) -> Result<DaemonPaths, Error> {
        let raw: RawDaemon = load_section(path, "daemon")?;
        Validator { path }.daemon_paths(&raw)
    }

    /// Only the `[ca]` section, for `ca jwks`: printing the public keys needs nothing else
    /// (an unrelated mistake, or a host name that does not resolve here, must not stop it).
    pub fn load_ca(path: &Path) -> Result<Option<RawCa>, Error> {
        load_section::<Option<RawCa>>(path, "ca")
    }

    /// Only the `[audit]` section, for `audit tail`: it reads the log, nothing else.
    pub fn load_audit(path: &Path) -> Result<RawAudit, Error> {
        load_section(path, "audit")
    }

    /// The built-in [`DaemonPaths`] (no file).
    pub fn default_daemon_paths() -> Result<DaemonPaths, Error> {
        Validator {
            path: Path::new(DEFAULT_CONFIG_PATH),
        }
        .daemon_paths(&RawDaemon::default())
    }

    /// The index of the server named `name`.
    pub fn server_id(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }

    /// The server with this id (its index, as the kernel records it).
    pub fn server(&self, id: u32) -> Option<&Server> {
        self.servers.get(id as usize)
    }
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// `path` must be absolute: the daemon runs from `/` under its service manager, so a path
    /// `check` found from another directory would not be found there.
    fn absolute(&self, key: impl Into<String>, path: &Path) -> Result<(), Error> {
        if path.is_absolute() {
            return Ok(());
        }
        Err(self.invalid(
            key,
            format!(
                "{} is a relative path; write it absolute (the daemon does not run from the \
                 directory `check` was run in)",
                path.display()
            ),
        ))
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, Error> {
        let daemon = self.daemon(raw.daemon)?;
        let tags = raw
            .tags
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                taggable(&t.cgroup, &daemon.cgroup_root)
                    .map_err(|m| self.invalid(format!("tag[{i}].cgroup"), m))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut servers = Vec::with_capacity(raw.servers.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut owners: HashMap<SocketAddr, String> = HashMap::new();
        for (i, s) in raw.servers.into_iter().enumerate() {
            let key = |k: &str| format!("server[{i}].{k}");
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                return Err(self.invalid(
                    key("name"),
                    format!(
                        "{:?} is not a valid server name; use letters, digits, '_', '-' or '.'",
                        s.name
                    ),
                ));
            }
            if let Some(first) = names.insert(s.name.clone(), i) {
                return Err(self.invalid(
                    key("name"),
                    format!(
                        "server name {:?} is already used by server[{first}]; names must be unique",
                        s.name
                    ),
                ));
            }
            if s.intercept.is_empty() {
                return Err(self.invalid(
                    key("intercept"),
                    "no addresses; list the addresses agents dial, e.g. [\"127.0.0.2:8080\"]",
                ));
            }
            let mut intercept = Vec::new();
            for (j, text) in s.intercept.iter().enumerate() {
                let k = format!("server[{i}].intercept[{j}]");
                for addr in resolve(text).map_err(|m| self.invalid(&k, m))? {
                    let normalized = normalize(addr);
                    // Where the kernel sends it: one address whichever way it is written.
                    let reached = stands_for(normalized);
                    if is_proxy_listener(reached, daemon.listen_port) {
                        return Err(self.invalid(
                            &k,
                            format!(
                                "{text:?} is the proxy's own listener (port {}); \
                                 intercept the server's address, not the proxy's",
                                daemon.listen_port
                            ),
                        ));
                    }
                    if let Some(other) = owners.insert(reached, s.name.clone()) {
                        if other != s.name {
                            let also = if reached == normalized {
                                String::new()
                            } else {
                                format!(" (where the kernel sends {normalized})")
                            };
                            return Err(self.invalid(
                                &k,
                                format!(
                                    "{reached}{also} is already intercepted for server {other:?}; \
                                     an address can belong to one server only"
                                ),
                            ));
                        }
                    } else {
                        intercept.push(normalized);
                    }
                }
            }
            let (https, authority) = match s.upstream.split_once("://") {
                Some(("https", rest)) => (true, rest.trim_end_matches('/').to_owned()),
                Some(("http", rest)) => (false, rest.trim_end_matches('/').to_owned()),
                Some((scheme, _)) => {
                    return Err(self.invalid(
                        key("upstream"),
                        format!("scheme {scheme:?} is not supported; use https://host:port or http://host:port"),
                    ));
                }
                None => (false, s.upstream.clone()),
            };
            if let Some((_, path)) = authority.split_once('/') {
                return Err(self.invalid(
                    key("upstream"),
                    format!(
                        "{:?} has a path (/{path}): an upstream is where the proxy connects, \
                         host:port only; the agent's request path is forwarded as sent \
                         (restrict it with paths = [\"/{path}\"])",
                        s.upstream
                    ),
                ));
            }
            let upstream_addrs =
                resolve(&authority).map_err(|m| self.invalid(key("upstream"), m))?;
            if let Some(own) = upstream_addrs
                .iter()
                .map(|&a| stands_for(normalize(a)))
                .find(|&a| is_proxy_listener(a, daemon.listen_port))
            {
                return Err(self.invalid(
                    key("upstream"),
                    format!(
                        "{} reaches {own}, the proxy's own listener (port {}); the upstream is \
                         the real server's address",
                        s.upstream, daemon.listen_port
                    ),
                ));
            }
            match (&s.tls, https) {
                (None, true) => {
                    return Err(self.invalid(
                        key("tls"),
                        format!(
                            "upstream {} is https: add tls = {{ ca = \"…\", server_name = \"…\" }} to say how its certificate is verified",
                            s.upstream
                        ),
                    ));
                }
                (Some(_), false) => {
                    return Err(self.invalid(
                        key("upstream"),
                        format!("tls is set but upstream {} is not https://", s.upstream),
                    ));
                }
                (Some(tls), true) => {
                    self.absolute(format!("server[{i}].tls.ca"), &tls.ca)?;
                    if let Some(id) = &tls.server_id
                        && url::Url::parse(id).is_err()
                    {
                        return Err(self.invalid(
                            format!("server[{i}].tls.server_id"),
                            format!(
                                "{id:?} is not a URI: write the URI SAN the upstream's \
                                 certificate carries, e.g. \"spiffe://example.org/notes\""
                            ),
                        ));
                    }
                    crate::upstream::load_roots(&tls.ca)
                        .map_err(|m| self.invalid(format!("server[{i}].tls.ca"), m))?;
                    if rustls::pki_types::ServerName::try_from(tls.server_name.as_str()).is_err() {
                        return Err(self.invalid(
                            format!("server[{i}].tls.server_name"),
                            format!("{:?} is not a DNS name or IP address", tls.server_name),
                        ));
                    }
                }
                (None, false) => {}
            }
            for (j, path) in s.paths.iter().flatten().enumerate() {
                if !path.starts_with('/') || path.contains(['?', '#']) {
                    return Err(self.invalid(
                        format!("server[{i}].paths[{j}]"),
                        format!(
                            "{path:?} is not a request path: write it as the agent's request \
                             starts, e.g. \"/mcp\", or \"/messages/\" for the paths below it"
                        ),
                    ));
                }
            }
            for (name, inject) in &s.inject_headers {
                let k = format!("server[{i}].inject_headers.{name}");
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(self.invalid(k, format!("{name:?} is not a valid header name")));
                }
                self.absolute(format!("{k}.file"), &inject.file)?;
                if !inject.file.is_file() {
                    return Err(self.invalid(
                        k,
                        format!("{} does not exist or is not a file", inject.file.display()),
                    ));
                }
            }
            servers.push(Server {
                name: s.name,
                intercept,
                upstream: s.upstream,
                upstream_addrs,
                authority,
                tls: s.tls,
                inject_headers: s.inject_headers,
                pass_authorization: s.pass_authorization,
                intercept_upstream: s.intercept_upstream,
                paths: s.paths,
                session_scope: servers.len(),
            });
        }
        // Entries are one upstream when their authorities are equal, or an address of one is
        // an address of the other — loopback addresses of one port counted as one (a server
        // bound to 0.0.0.0 answers on each); grouped transitively.
        let one_upstream = |a: &Server, b: &Server| {
            let same = |x: &SocketAddr, y: &SocketAddr| {
                let (x, y) = (normalize(*x), normalize(*y));
                let local = |ip: std::net::IpAddr| ip.is_loopback() || ip.is_unspecified();
                x == y || x.port() == y.port() && local(x.ip()) && local(y.ip())
            };
            a.authority == b.authority
                || a.upstream_addrs
                    .iter()
                    .any(|x| b.upstream_addrs.iter().any(|y| same(x, y)))
        };
        let mut scope: Vec<usize> = (0..servers.len()).collect();
        loop {
            let mut merged = false;
            for i in 0..servers.len() {
                for j in 0..i {
                    if scope[i] != scope[j] && one_upstream(&servers[i], &servers[j]) {
                        let (from, to) = (scope[i].max(scope[j]), scope[i].min(scope[j]));
                        scope
                            .iter_mut()
                            .filter(|s| **s == from)
                            .for_each(|s| *s = to);
                        merged = true;
                    }
                }
            }
            if !merged {
                break;
            }
        }
        for (server, scope) in servers.iter_mut().zip(scope) {
            server.session_scope = scope;
        }
        if raw.proxy.max_body_bytes == 0 || raw.proxy.max_response_bytes == 0 {
            return Err(self.invalid(
                "proxy",
                "max_body_bytes and max_response_bytes must be at least 1",
            ));
        }
        let exchange = raw
            .proxy
            .max_body_bytes
            .saturating_add(raw.proxy.max_response_bytes);
        let (total, per_cgroup) = raw.proxy.buffered();
        if per_cgroup < exchange || total < per_cgroup {
            // Named as written: a per-cgroup bound left to its default is derived from the
            // total, which is then what to change.
            let (key, what) = match raw.proxy.max_buffered_bytes_per_cgroup {
                Some(_) => ("proxy.max_buffered_bytes_per_cgroup", "it"),
                None => (
                    "proxy.max_buffered_bytes",
                    "the per-cgroup bound (max_buffered_bytes_per_cgroup, not set: an eighth of \
                     this, at least max_body_bytes + max_response_bytes)",
                ),
            };
            return Err(self.invalid(
                key,
                format!(
                    "gives a per-cgroup bound of {per_cgroup}: {what} must be at least \
                     max_body_bytes + max_response_bytes ({exchange}: a request's body stays \
                     counted while its answer is read, else an exchange within them could never \
                     complete) and at most max_buffered_bytes ({total})"
                ),
            ));
        }
        let (flights, per_cgroup) = raw.proxy.in_flight();
        if flights == 0 {
            return Err(self.invalid(
                "proxy.max_requests_in_flight",
                "is 0: no request could ever be served; at least 1",
            ));
        }
        if per_cgroup == 0 || flights < per_cgroup {
            return Err(self.invalid(
                "proxy.max_requests_in_flight_per_cgroup",
                format!(
                    "is {per_cgroup}: it must be at least 1 and at most max_requests_in_flight \
                     ({flights})"
                ),
            ));
        }
        if raw.proxy.max_requests_per_second_per_cgroup > MAX_REQUEST_RATE {
            return Err(self.invalid(
                "proxy.max_requests_per_second_per_cgroup",
                format!("is over {MAX_REQUEST_RATE}; 0 for no limit"),
            ));
        }
        match (raw.proxy.rate(), raw.proxy.request_burst_per_cgroup) {
            (None, Some(_)) => {
                return Err(self.invalid(
                    "proxy.request_burst_per_cgroup",
                    "is set without proxy.max_requests_per_second_per_cgroup: set the rate too, \
                     or remove the burst",
                ));
            }
            (Some(_), Some(burst)) if burst == 0 || burst > MAX_REQUEST_RATE => {
                return Err(self.invalid(
                    "proxy.request_burst_per_cgroup",
                    format!("is {burst}: it must be from 1 to {MAX_REQUEST_RATE}"),
                ));
            }
            _ => {}
        }
        if raw.proxy.body_timeout.is_zero() {
            return Err(self.invalid("proxy.body_timeout", "must be more than 0s"));
        }
        if raw.proxy.max_json_values < 16
            || raw.proxy.max_batch == 0
            || raw.proxy.max_response_values < 1024
        {
            return Err(self.invalid(
                "proxy",
                "max_json_values must be at least 16, max_response_values at least 1024 and \
                 max_batch at least 1",
            ));
        }
        if !(1..=MAX_JSON_DEPTH_LIMIT).contains(&raw.proxy.max_json_depth) {
            return Err(self.invalid(
                "proxy.max_json_depth",
                format!("must be from 1 to {MAX_JSON_DEPTH_LIMIT} (the JSON parser's own limit)"),
            ));
        }
        let audit = raw.audit;
        if !audit.path.is_absolute() {
            return Err(self.invalid(
                "audit.path",
                format!("{} is not an absolute path", audit.path.display()),
            ));
        }
        if audit.path.is_dir() {
            return Err(self.invalid(
                "audit.path",
                format!(
                    "{} is a directory; name the log file in it (e.g. {})",
                    audit.path.display(),
                    audit.path.join("audit.jsonl").display()
                ),
            ));
        }
        if audit.max_file_bytes < 4096 {
            return Err(self.invalid("audit.max_file_bytes", "must be at least 4096"));
        }
        if audit.max_files == 1 {
            return Err(self.invalid(
                "audit.max_files",
                "must be 0 (keep every rotated file) or at least 2 (the live file and one rotated \
                 one): 1 would delete each file as it is rotated",
            ));
        }
        audit
            .checkpoint_every()
            .map_err(|m| self.invalid("audit.checkpoint_interval", m))?;
        for (i, k) in audit.redact_keys.iter().enumerate() {
            let why = match crate::audit::redact_key_pattern(k) {
                Some(Err(m)) => m,
                None if crate::audit::key_form(k).is_empty() => format!(
                    "{k:?} has nothing left to match once case, '_', '-', '.' and spaces are set \
                     aside: it would redact every key; name a word such as \"token\""
                ),
                _ => continue,
            };
            return Err(self.invalid(format!("audit.redact_keys[{i}]"), why));
        }
        let id = raw.identity;
        if id.trust_domain.is_empty()
            || !id.trust_domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            })
        {
            return Err(self.invalid(
                "identity.trust_domain",
                format!(
                    "{:?} is not a valid trust domain; use lowercase letters, digits, '.', '-', '_' (e.g. \"example.org\")",
                    id.trust_domain
                ),
            ));
        }
        crate::workload::check_template(&id.workload_id)
            .map_err(|m| self.invalid("identity.workload_id", m))?;
        if http::HeaderName::from_bytes(id.assertion_header.as_bytes()).is_err() {
            return Err(self.invalid(
                "identity.assertion_header",
                format!("{:?} is not a valid header name", id.assertion_header),
            ));
        }
        let assertion_ttl = crate::ca::parse_ttl(&id.assertion_ttl)
            .map_err(|m| self.invalid("identity.assertion_ttl", m))?;
        if let Some(ca) = &raw.ca {
            self.absolute("ca.cert", &ca.cert)?;
            self.absolute("ca.key", &ca.key)?;
            crate::ca::parse_ttl(&ca.leaf_ttl).map_err(|m| self.invalid("ca.leaf_ttl", m))?;
        } else if let Some(i) = servers.iter().position(|s| s.tls.is_some()) {
            return Err(self.invalid(
                format!("server[{i}].upstream"),
                "an https upstream needs client certificates: configure [ca] (interceptor ca init --dir D creates one)",
            ));
        }
        let naming = Naming {
            assertion_header: id.assertion_header.to_ascii_lowercase(),
            assertion_ttl,
            node: if id.node.is_empty() {
                crate::workload::host_name()
            } else {
                id.node
            },
            trust_domain: id.trust_domain,
            template: id.workload_id,
        };
        let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
        let policy = Policy::compile(&raw.roles, &raw.bindings, &raw.policy, &names)
            .map_err(|(key, message)| self.invalid(key, message))?;
        Ok(Config {
            path: self.path.to_owned(),
            daemon,
            tags,
            servers,
            policy,
            proxy: raw.proxy,
            audit,
            naming,
            ca: raw.ca,
        })
    }

    fn daemon_paths(&self, raw: &RawDaemon) -> Result<DaemonPaths, Error> {
        for (key, p) in [
            ("daemon.bpffs_dir", &raw.bpffs_dir),
            ("daemon.admin_socket", &raw.admin_socket),
        ] {
            if !p.is_absolute() {
                return Err(self.invalid(key, format!("{} is not an absolute path", p.display())));
            }
        }
        Ok(DaemonPaths {
            admin_socket: raw.admin_socket.clone(),
            bpffs_dir: raw.bpffs_dir.clone(),
        })
    }

    fn daemon(&self, raw: RawDaemon) -> Result<Daemon, Error> {
        if raw.listen_port == 0 {
            return Err(self.invalid(
                "daemon.listen_port",
                "0 is not a usable port; pick a free one, e.g. 15001",
            ));
        }
        let cgroup_root = if raw.cgroup_root.is_empty() {
            "/".to_owned()
        } else {
            normalize_cgroup_path(&raw.cgroup_root)
                .map_err(|m| self.invalid("daemon.cgroup_root", m))?
        };
        let DaemonPaths {
            admin_socket,
            bpffs_dir,
        } = self.daemon_paths(&raw)?;
        let metrics_addr = if raw.metrics_addr.is_empty() {
            None
        } else {
            Some(raw.metrics_addr.parse::<SocketAddr>().map_err(|_| {
                self.invalid(
                    "daemon.metrics_addr",
                    format!(
                        "{:?} is not ip:port; write e.g. \"127.0.0.1:9464\", or \"\" to turn metrics off",
                        raw.metrics_addr
                    ),
                )
            })?)
        };
        let metrics_token_file = if raw.metrics_token_file.is_empty() {
            None
        } else {
            let path = PathBuf::from(&raw.metrics_token_file);
            self.absolute("daemon.metrics_token_file", &path)?;
            if metrics_addr.is_none() {
                return Err(self.invalid(
                    "daemon.metrics_token_file",
                    "is set but daemon.metrics_addr is not: there is no metrics endpoint to \
                     protect; set both, or neither",
                ));
            }
            Some(path)
        };
        let drain_grace = humantime::parse_duration(&raw.drain_grace).map_err(|e| {
            self.invalid(
                "daemon.drain_grace",
                format!(
                    "{:?} is not a duration ({e}); write e.g. \"10s\"",
                    raw.drain_grace
                ),
            )
        })?;
        let workers = raw.workers;
        if workers > MAX_WORKERS {
            return Err(self.invalid(
                "daemon.workers",
                format!("{workers} is more than {MAX_WORKERS}; write 0 for one per CPU"),
            ));
        }
        let busy_poll = match humantime::parse_duration(&raw.busy_poll) {
            Err(e) => Err(format!("is not a duration ({e})")),
            Ok(d) if !d.is_zero() && d < std::time::Duration::from_micros(1) => {
                Err("is under a microsecond".to_owned())
            }
            Ok(d) if d > crate::workers::MAX_BUSY_POLL => Err(format!(
                "is more than {}: a worker would spend whole time slices polling",
                humantime::format_duration(crate::workers::MAX_BUSY_POLL)
            )),
            Ok(d) => Ok(d),
        }
        .map_err(|why| {
            self.invalid(
                "daemon.busy_poll",
                format!(
                    "{:?} {why}; write e.g. \"50us\", or \"0\" to turn busy polling off",
                    raw.busy_poll
                ),
            )
        })?;
        Ok(Daemon {
            drain_grace,
            busy_poll,
            workers,
            max_connections_per_cgroup: raw.max_connections_per_cgroup,
            listen_port: raw.listen_port,
            cgroup_root,
            bpffs_dir,
            admin_socket,
            metrics_addr,
            metrics_token_file,
        })
    }
}

/// Checks a cgroup path relative to the cgroup v2 mount: it starts with `/`, has no `.`/`..`
/// components and no NUL. Trailing slashes are dropped.
pub fn normalize_cgroup_path(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!(
            "{p:?} must start with '/' (it is relative to the cgroup v2 mount), e.g. \"/agents\""
        ));
    }
    if p.contains('\0') {
        return Err(format!("{p:?} contains a NUL byte"));
    }
    let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
    if parts.iter().any(|s| *s == "." || *s == "..") {
        return Err(format!("{p:?} may not contain '.' or '..' components"));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// `cgroup` normalised, if it can be tagged: at or below `root` (`daemon.cgroup_root`, where
/// the programs are attached: they see nothing outside it), and short enough for its path to
/// be kept whole in the pinned tag (tags are followed and untagged by it).
pub fn taggable(cgroup: &str, root: &str) -> Result<String, String> {
    let cgroup = seen_by_programs(cgroup, root)?;
    if cgroup.len() >= interceptor_common::TAG_PATH_MAX {
        return Err(format!(
            "{cgroup} is {} bytes long; a tagged cgroup's path must be shorter than {} (tag a \
             parent)",
            cgroup.len(),
            interceptor_common::TAG_PATH_MAX
        ));
    }
    Ok(cgroup)
}

/// `cgroup` (normalised) if the kernel programs can act on it: below `root` (the attach
/// point) and at most [`interceptor_common::MAX_CGROUP_DEPTH`]` - 1` levels deep (the
/// programs look at that many levels of a process's ancestry). Tags and cgroup revocations
/// must be.
pub fn seen_by_programs(cgroup: &str, root: &str) -> Result<String, String> {
    let cgroup = normalize_cgroup_path(cgroup)?;
    let depth = cgroup.split('/').filter(|c| !c.is_empty()).count();
    if depth >= interceptor_common::MAX_CGROUP_DEPTH as usize {
        return Err(format!(
            "{cgroup} is {depth} levels deep; the kernel programs look at the first {} levels \
             of a process's cgroup ancestry: use an ancestor at most {} levels deep",
            interceptor_common::MAX_CGROUP_DEPTH,
            interceptor_common::MAX_CGROUP_DEPTH - 1
        ));
    }
    let below = root == "/"
        || cgroup == root
        || cgroup
            .strip_prefix(root)
            .is_some_and(|r| r.starts_with('/'));
    if !below {
        return Err(format!(
            "{cgroup} is outside daemon.cgroup_root {root}, where the programs are attached: its \
             connections are never seen; use a cgroup below {root}, or attach higher \
             (daemon.cgroup_root)"
        ));
    }
    Ok(cgroup)
}

/// Where the kernel sends a connection to `addr`: loopback for the unspecified address
/// (`0.0.0.0:P` to `127.0.0.1:P`, `[::]:P` to `[::1]:P`), else `addr`.
pub(crate) fn stands_for(addr: SocketAddr) -> SocketAddr {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Whether a connection to `reached` (as [`stands_for`] gives it) lands on the proxy's own
/// listener: `127.0.0.1:port` or `[::1]:port`, the addresses it binds and the programs redirect
/// to. Another loopback address at that port (`127.0.0.3:port`) is another socket.
fn is_proxy_listener(reached: SocketAddr, port: u16) -> bool {
    use std::net::{Ipv4Addr, Ipv6Addr};
    reached.port() == port
        && (reached.ip() == Ipv4Addr::LOCALHOST || reached.ip() == Ipv6Addr::LOCALHOST)
}

/// IPv4-mapped IPv6 addresses become IPv4: one address, one key.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// `ip:port`, `[ipv6]:port`, or `host:port` resolved through the system resolver.
fn resolve(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!(
                "{text:?} has port 0; give the port the server listens on"
            ));
        }
        return Ok(vec![addr]);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} is not host:port; write e.g. \"127.0.0.2:8080\", \"[::1]:8080\" or \"mcp.internal:8080\""
        ));
    };
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(format!(
                "{text:?} has an invalid port {port:?}; use a number from 1 to 65535"
            ));
        }
    };
    if host.is_empty() || host.starts_with('[') || host.contains(':') {
        return Err(format!(
            "{text:?} is not host:port; put IPv6 addresses in brackets, e.g. \"[::1]:8080\""
        ));
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            format!(
                "cannot resolve host name {host:?} ({e}); use an IP address, or make the name \
                 resolvable on this node (DNS or /etc/hosts)"
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(format!("host name {host:?} resolved to no address"));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_one_section_commands_refuse_a_file_with_an_unknown_section() {
        // Every name in SECTIONS is one RawConfig knows (a wrong type, not an unknown field).
        for name in super::SECTIONS {
            let e = toml::from_str::<super::RawConfig>(&format!("{name} = 1"))
                .unwrap_err()
                .to_string();
            assert!(!e.contains("unknown field"), "{name}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.toml");
        let fine = "[daemon]\nadmin_socket = \"/tmp/x.sock\"\n";
        std::fs::write(&path, fine).unwrap();
        let paths = super::Config::load_daemon_paths(&path).unwrap();
        assert_eq!(paths.admin_socket, std::path::Path::new("/tmp/x.sock"));
        for (text, unknown) in [
            (fine.replace("daemon", "deamon"), "deamon"),
            (fine.replace("[daemon]\n", ""), "admin_socket"),
        ] {
            std::fs::write(&path, &text).unwrap();
            for e in [
                super::Config::load_daemon_paths(&path).err(),
                super::Config::load_audit(&path).err(),
                super::Config::load_ca(&path).err(),
            ] {
                let e = e.expect("refused").to_string();
                assert!(
                    e.contains(&format!("unknown top-level key `{unknown}`"))
                        && e.contains("interceptor check --config"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn an_upstream_with_a_path_is_told_where_the_path_goes() {
        let text = "[[server]]\nname = \"a\"\nintercept = [\"127.0.0.2:1\"]\n\
                    upstream = \"http://127.0.0.3:9000/mcp\"\n";
        let e = super::Config::parse(std::path::Path::new("t.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has a path (/mcp)") && e.contains("paths = [\"/mcp\"]"),
            "{e}"
        );
    }

    #[test]
    fn files_the_daemon_reads_are_named_by_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        let server = "[[server]]\nname = \"a\"\nintercept = [\"127.0.0.2:1\"]\n";
        let cases = [
            (
                format!(
                    "{server}upstream = \"127.0.0.3:1\"\ninject_headers = {{ X = {{ file = \"token\" }} }}\n"
                ),
                "server[0].inject_headers.X.file",
            ),
            (
                format!(
                    "{server}upstream = \"https://127.0.0.3:1\"\ntls = {{ ca = \"ca.pem\", server_name = \"a\" }}\n[ca]\ncert = \"/x/ca.pem\"\nkey = \"/x/k.pem\"\n"
                ),
                "server[0].tls.ca",
            ),
            (
                "[ca]\ncert = \"ca.pem\"\nkey = \"/x/k.pem\"\n".to_owned(),
                "ca.cert",
            ),
            (
                "[ca]\ncert = \"/x/ca.pem\"\nkey = \"k.pem\"\n".to_owned(),
                "ca.key",
            ),
        ];
        for (text, key) in cases {
            let e = super::Config::parse(&dir.path().join("t.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(key) && e.contains("is a relative path"),
                "{key}: {e}"
            );
        }
        let text = format!(
            "{server}upstream = \"https://127.0.0.3:1\"\n\
             tls = {{ ca = \"/nonexistent/ca.pem\", server_name = \"a\", server_id = \"notaurl\" }}\n\
             [ca]\ncert = \"/x/ca.pem\"\nkey = \"/x/k.pem\"\n"
        );
        let e = super::Config::parse(&dir.path().join("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls.server_id") && e.contains("not a URI"),
            "{e}"
        );
    }

    #[test]
    fn a_credential_file_every_user_may_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret").unwrap();
        let text = format!(
            "[[server]]\nname = \"a\"\nintercept = [\"127.0.0.2:1\"]\nupstream = \"127.0.0.3:1\"\n\
             paths = [\"/mcp\"]\ninject_headers = {{ Authorization = {{ file = \"{}\" }} }}\n",
            token.display()
        );
        let warnings = |mode: u32| {
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
            super::Config::parse(std::path::Path::new("t.toml"), &text)
                .unwrap()
                .warnings()
        };
        let w = warnings(0o644);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("inject_headers.Authorization") && w[0].contains("mode 644"),
            "{w:?}"
        );
        assert!(warnings(0o640).is_empty());
        assert!(warnings(0o600).is_empty());
        // Credentials injected on any path of the upstream.
        let anywhere = text.replace("paths = [\"/mcp\"]\n", "");
        let w = super::Config::parse(std::path::Path::new("t.toml"), &anywhere)
            .unwrap()
            .warnings();
        assert!(
            w.len() == 1 && w[0].contains("injects credentials but has no `paths`"),
            "{w:?}"
        );
        // A metrics endpoint beyond loopback.
        for (addr, warned) in [("0.0.0.0:9464", true), ("127.0.0.1:9464", false)] {
            let with_metrics = format!("[daemon]\nmetrics_addr = \"{addr}\"\n{text}");
            let w = super::Config::parse(std::path::Path::new("t.toml"), &with_metrics)
                .unwrap()
                .warnings();
            let named = w.iter().any(|w| w.contains("daemon.metrics_addr"));
            assert_eq!(named, warned, "{addr}: {w:?}");
        }
        // A workload id template with a value a process may lack, with a CA.
        let with_exe = format!(
            "{text}\n[identity]\nworkload_id = \"spiffe://{{trust_domain}}/exe{{exe}}\"\n\
             [ca]\ncert = \"{0}\"\nkey = \"{0}\"\n",
            token.display()
        );
        let w = super::Config::parse(std::path::Path::new("t.toml"), &with_exe)
            .unwrap()
            .warnings();
        assert!(w.iter().any(|w| w.contains("uses {exe}")), "{w:?}");
        assert!(
            w.iter()
                .any(|w| w.contains("{exe}, which a process sets itself")),
            "{w:?}"
        );
        // {comm} tells workloads apart by a name any process picks, anchored or not.
        let with_comm = with_exe.replace("/exe{exe}", "/cgroup{cgroup_path}/comm/{comm}");
        let w = super::Config::parse(std::path::Path::new("t.toml"), &with_comm)
            .unwrap()
            .warnings();
        assert!(
            w.iter()
                .any(|w| w.contains("{comm}, which a process sets itself")),
            "{w:?}"
        );
        // In a folder others cannot pass through, nobody else reads it; one its group may
        // pass, that group's members may.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(warnings(0o644).is_empty());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(warnings(0o644).len(), 1, "its group may pass");
    }

    #[test]
    fn a_server_with_paths_serves_those_and_below_a_trailing_slash_only() {
        let config = super::Config::parse(
            std::path::Path::new("t.toml"),
            "[[server]]\nname = \"a\"\nintercept = [\"127.0.0.2:1\"]\nupstream = \"127.0.0.3:1\"\n\
             paths = [\"/mcp\", \"/messages/\"]\n",
        )
        .unwrap();
        let s = &config.servers[0];
        for ok in [
            "/mcp",
            "/messages/",
            "/messages",
            "/messages/x",
            "/messages/a%20b",
        ] {
            assert!(s.serves_path(ok), "{ok}");
        }
        for no in [
            "/",
            "/mcp/",
            "/mcpx",
            "/MCP",
            "/admin",
            "/mcp/../admin",
            "/messages/../admin",
            "//mcp",
            "/messages/%2e%2e/admin",
            "/messages\\x",
            "/%ff",
            // Decoded, a listed path; raw, not (axum and Express route the raw one).
            "/%6Dcp",
            "/messages%2Fx",
            // Tomcat drops ;params before resolving dot segments.
            "/messages/..;/admin",
        ] {
            assert!(!s.serves_path(no), "{no}");
        }
        let e = super::Config::parse(
            std::path::Path::new("t.toml"),
            "[[server]]\nname = \"a\"\nintercept = [\"127.0.0.2:1\"]\nupstream = \"127.0.0.3:1\"\n\
             paths = [\"mcp\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("server[0].paths[0]"), "{e}");
    }

    #[test]
    fn servers_on_one_upstream_share_their_sessions_scope() {
        let config = super::Config::parse(
            std::path::Path::new("t.toml"),
            r#"
[[server]]
name = "ro"
intercept = ["127.0.0.2:8080"]
upstream = "127.0.0.3:9000"
[[server]]
name = "admin"
intercept = ["127.0.0.2:8081"]
upstream = "http://127.0.0.3:9000"
[[server]]
name = "other"
intercept = ["127.0.0.2:8082"]
upstream = "10.9.9.9:9000"
[[server]]
name = "v6"
intercept = ["127.0.0.2:8083"]
upstream = "[::1]:7000"
[[server]]
name = "v4"
intercept = ["127.0.0.2:8084"]
upstream = "127.0.0.1:7000"
[[server]]
name = "mapped"
intercept = ["127.0.0.2:8085"]
upstream = "[::ffff:10.9.9.9]:9000"
"#,
        )
        .unwrap();
        let scopes: Vec<usize> = config.servers.iter().map(|s| s.session_scope).collect();
        // Loopback addresses of one port are one server; a v4-mapped address its IPv4 one.
        assert_eq!(scopes, [0, 0, 2, 3, 3, 2]);
    }

    #[test]
    fn the_programs_see_cgroups_below_the_attach_point_31_levels_deep() {
        let deep = |n: usize| (0..n).map(|i| format!("/l{i}")).collect::<String>();
        assert_eq!(
            super::seen_by_programs(&deep(31), "").as_deref(),
            Ok(&*deep(31))
        );
        let e = super::seen_by_programs(&deep(32), "").unwrap_err();
        assert!(e.contains("32 levels deep"), "{e}");
        assert!(super::taggable(&deep(32), "/").is_err());
        let e = super::seen_by_programs("/other/x", "/agents").unwrap_err();
        assert!(e.contains("outside daemon.cgroup_root"), "{e}");
        assert!(super::seen_by_programs("/agents/x", "/agents").is_ok());
    }
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(Path::new("test.toml"), text)
    }

    const GOOD: &str = r#"
        [daemon]
        listen_port = 15001
        cgroup_root = ""
        bpffs_dir = "/sys/fs/bpf/interceptor"
        admin_socket = "/run/interceptor/admin.sock"

        [[tag]]
        cgroup = "/agents/"

        [[server]]
        name = "notes"
        intercept = ["127.0.0.2:8080", "[::1]:8080", "[::ffff:127.0.0.5]:81", "localhost:8081"]
        upstream = "127.0.0.3:9000"
    "#;

    #[test]
    fn accepts_the_documented_example() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.daemon.listen_port, 15001);
        assert_eq!(c.daemon.cgroup_root, "/");
        assert_eq!(c.tags, vec!["/agents".to_owned()]);
        let s = &c.servers[0];
        assert!(s.intercept.contains(&"127.0.0.2:8080".parse().unwrap()));
        assert!(s.intercept.contains(&"[::1]:8080".parse().unwrap()));
        // v4-mapped is normalised to IPv4
        assert!(s.intercept.contains(&"127.0.0.5:81".parse().unwrap()));
        // names are resolved at load
        assert!(s.intercept.contains(&"127.0.0.1:8081".parse().unwrap()));
        assert_eq!(s.upstream_addrs, vec!["127.0.0.3:9000".parse().unwrap()]);
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").expect("valid");
        assert_eq!(c.daemon.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(c.daemon.bpffs_dir, Path::new(DEFAULT_BPFFS_DIR));
        assert!(c.servers.is_empty());
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be rejected").to_string()
    }

    #[test]
    fn workers_default_to_one_per_cpu_and_are_bounded() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(parse("").expect("valid").daemon.worker_count(), cpus);
        assert_eq!(
            parse("[daemon]\nworkers = 3\n")
                .expect("valid")
                .daemon
                .worker_count(),
            3
        );
        let e = err("[daemon]\nworkers = 5000\n");
        assert!(
            e.contains("daemon.workers") && e.contains("5000") && e.contains("write 0"),
            "{e}"
        );
    }

    #[test]
    fn a_metrics_token_file_is_absolute_and_protects_an_endpoint() {
        let c =
            parse("[daemon]\nmetrics_addr = \"127.0.0.1:9464\"\nmetrics_token_file = \"/etc/t\"\n")
                .expect("valid");
        assert_eq!(
            c.daemon.metrics_token_file.as_deref(),
            Some(Path::new("/etc/t"))
        );
        let e = err("[daemon]\nmetrics_addr = \"127.0.0.1:9464\"\nmetrics_token_file = \"t\"\n");
        assert!(
            e.contains("metrics_token_file") && e.contains("absolute"),
            "{e}"
        );
        let e = err("[daemon]\nmetrics_token_file = \"/etc/t\"\n");
        assert!(e.contains("metrics_addr is not"), "{e}");
    }

    #[test]
    fn busy_poll_is_a_bounded_duration() {
        let d = |text: &str| parse(text).expect("valid").daemon.busy_poll;
        assert_eq!(d(""), std::time::Duration::from_micros(50));
        assert_eq!(
            d("[daemon]\nbusy_poll = \"0\"\n"),
            std::time::Duration::ZERO
        );
        assert_eq!(
            d("[daemon]\nbusy_poll = \"200us\"\n"),
            std::time::Duration::from_micros(200)
        );
        for (text, says) in [
            ("[daemon]\nbusy_poll = \"20ms\"\n", "more than 10ms"),
            ("[daemon]\nbusy_poll = \"fast\"\n", "not a duration"),
            ("[daemon]\nbusy_poll = \"500ns\"\n", "under a microsecond"),
        ] {
            let e = err(text);
            assert!(
                e.contains("daemon.busy_poll") && e.contains(says) && e.contains("\"0\""),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("[daemon]\nlisten_prot = 1\n");
        assert!(e.contains("test.toml") && e.contains("listen_prot"), "{e}");
    }

    #[test]
    fn bad_address_names_key_and_fix() {
        let e = err("[[server]]\nname='a'\nintercept=['127.0.0.2']\nupstream='127.0.0.1:1'\n");
        assert!(
            e.contains("server[0].intercept[0]") && e.contains("host:port"),
            "{e}"
        );
        let e =
            err("[[server]]\nname='a'\nintercept=['127.0.0.2:99999']\nupstream='127.0.0.1:1'\n");
        assert!(e.contains("invalid port"), "{e}");
        let e = err("[[server]]\nname='a'\nintercept=['::1:80']\nupstream='127.0.0.1:1'\n");
        assert!(e.contains("brackets"), "{e}");
    }

    #[test]
    fn tags_and_redaction_keys_that_cannot_work_are_refused() {
        let e = err("[daemon]\ncgroup_root = '/agents'\n[[tag]]\ncgroup = '/other'\n");
        assert!(
            e.contains("tag[0].cgroup") && e.contains("outside daemon.cgroup_root"),
            "{e}"
        );
        let long = format!("/agents/{}", "x".repeat(300));
        let e = err(&format!("[[tag]]\ncgroup = '{long}'\n"));
        assert!(
            e.contains("tag[0].cgroup") && e.contains("tag a parent"),
            "{e}"
        );
        let e = err("[audit]\nredact_keys = ['token', '-_']\n");
        assert!(e.contains("audit.redact_keys[1]"), "{e}");
        let e = err("[audit]\nredact_keys = ['token', 'pin_[']\n");
        assert!(
            e.contains("audit.redact_keys[1]") && e.contains("invalid glob"),
            "{e}"
        );
        let e = err("[audit]\nredact_keys = ['^ssn']\n");
        assert!(
            e.contains("audit.redact_keys[0]") && e.contains("anchored"),
            "{e}"
        );
        parse("[audit]\nredact_keys = ['*_pin', '^ssn[0-9]?$']\n").expect("patterns are valid");
        let e = err("[proxy]\nbody_timeout = 'soon'\n");
        assert!(e.contains("\"soon\" is not a duration"), "{e}");
        let e = err("[proxy]\nbody_timeout = '0s'\n");
        assert!(e.contains("proxy.body_timeout"), "{e}");
        // A request rate: the burst defaults to a second's worth, needs a rate, is at least 1.
        let rate = |text: &str| parse(text).expect("valid").proxy.rate();
        assert_eq!(rate(""), None);
        assert_eq!(
            rate("[proxy]\nmax_requests_per_second_per_cgroup = 20\n"),
            Some((20, 20))
        );
        assert_eq!(
            rate(
                "[proxy]\nmax_requests_per_second_per_cgroup = 20\nrequest_burst_per_cgroup = 5\n"
            ),
            Some((20, 5))
        );
        let e = err("[proxy]\nrequest_burst_per_cgroup = 5\n");
        assert!(
            e.contains("proxy.request_burst_per_cgroup") && e.contains("without"),
            "{e}"
        );
        let e =
            err("[proxy]\nmax_requests_per_second_per_cgroup = 2\nrequest_burst_per_cgroup = 0\n");
        assert!(e.contains("from 1 to"), "{e}");
        let e = err("[proxy]\nmax_requests_per_second_per_cgroup = 1000001\n");
        assert!(
            e.contains("proxy.max_requests_per_second_per_cgroup"),
            "{e}"
        );
        // Requests in flight: each bound named, the per-cgroup default within the total.
        let e = err("[proxy]\nmax_requests_in_flight = 0\n");
        assert!(e.contains("proxy.max_requests_in_flight`"), "{e}");
        let e =
            err("[proxy]\nmax_requests_in_flight = 10\nmax_requests_in_flight_per_cgroup = 11\n");
        assert!(
            e.contains("proxy.max_requests_in_flight_per_cgroup") && e.contains("at most"),
            "{e}"
        );
        let e = err("[proxy]\nmax_requests_in_flight_per_cgroup = 0\n");
        assert!(e.contains("at least 1"), "{e}");
        let c = parse("[proxy]\nmax_requests_in_flight = 100\n").expect("the default follows");
        assert_eq!(c.proxy.in_flight(), (100, 100));
        assert_eq!(parse("").expect("defaults").proxy.in_flight(), (4096, 256));
        let e = err("[proxy]\nmax_buffered_bytes_per_cgroup = 1000\n");
        assert!(
            e.contains("at least max_body_bytes + max_response_bytes"),
            "{e}"
        );
        let e = err(
            "[proxy]\nmax_buffered_bytes = 30000000\nmax_buffered_bytes_per_cgroup = 40000000\n",
        );
        assert!(e.contains("at most max_buffered_bytes"), "{e}");
        // The per-cgroup bound left to its default: the key set is named.
        let e = err("[proxy]\nmax_body_bytes = 10\nmax_buffered_bytes = 5\n");
        assert!(
            e.contains("`proxy.max_buffered_bytes`") && e.contains("not set"),
            "{e}"
        );
        // A node-wide bound set lower takes the per-cgroup default down to an eighth of it
        // (not under what one exchange may hold).
        let c = Config::parse(
            Path::new("t.toml"),
            "[proxy]\nmax_buffered_bytes = 200000000\n",
        )
        .unwrap();
        assert_eq!(c.proxy.buffered(), (200_000_000, 25_000_000));
        let c = Config::parse(
            Path::new("t.toml"),
            "[proxy]\nmax_buffered_bytes = 30000000\n",
        )
        .unwrap();
        assert_eq!(c.proxy.buffered(), (30_000_000, 20 << 20));
        let e = err("[proxy]\nmax_batch = 0\n");
        assert!(e.contains("max_batch at least 1"), "{e}");
        let e = err("[audit]\ncheckpoint_interval = '10ms'\n");
        assert!(
            e.contains("audit.checkpoint_interval") && e.contains("from 100ms"),
            "{e}"
        );
        let e = err("[audit]\nmax_files = 1\n");
        assert!(
            e.contains("audit.max_files") && e.contains("at least 2"),
            "{e}"
        );
    }

    #[test]
    fn unresolvable_name_is_reported() {
        let e = err(
            "[[server]]\nname='a'\nintercept=['no-such-host.invalid:80']\nupstream='127.0.0.1:1'\n",
        );
        assert!(
            e.contains("cannot resolve host name \"no-such-host.invalid\""),
            "{e}"
        );
    }

    #[test]
    fn duplicate_names_and_addresses_are_rejected() {
        let e = err(
            "[[server]]\nname='a'\nintercept=['127.0.0.2:80']\nupstream='127.0.0.1:1'\n\
             [[server]]\nname='a'\nintercept=['127.0.0.3:80']\nupstream='127.0.0.1:1'\n",
        );
        assert!(e.contains("server[1].name") && e.contains("unique"), "{e}");
        let e = err(
            "[[server]]\nname='a'\nintercept=['127.0.0.2:80']\nupstream='127.0.0.1:1'\n\
             [[server]]\nname='b'\nintercept=['[::ffff:127.0.0.2]:80']\nupstream='127.0.0.1:1'\n",
        );
        assert!(e.contains("already intercepted for server \"a\""), "{e}");
    }

    #[test]
    fn proxy_port_cannot_be_intercepted() {
        let e =
            err("[[server]]\nname='a'\nintercept=['127.0.0.1:15001']\nupstream='127.0.0.1:1'\n");
        assert!(e.contains("proxy's own listener"), "{e}");
        let e = err("[[server]]\nname='a'\nintercept=['0.0.0.0:15001']\nupstream='127.0.0.1:1'\n");
        assert!(e.contains("proxy's own listener"), "{e}");
        let e = err("[[server]]\nname='a'\nintercept=['127.0.0.2:80']\nupstream='[::]:15001'\n");
        assert!(e.contains("proxy's own listener"), "{e}");
        // Another loopback address at the proxy's port is another socket (a test's upstream
        // bound to 127.0.0.3 with a port the kernel chose).
        parse("[[server]]\nname='a'\nintercept=['127.0.0.3:15001']\nupstream='127.0.0.4:15001'\n")
            .expect("another loopback address is another socket");
    }

    #[test]
    fn cgroup_paths_are_checked() {
        assert_eq!(normalize_cgroup_path("/a//b/").unwrap(), "/a/b");
        assert_eq!(normalize_cgroup_path("/").unwrap(), "/");
        assert!(normalize_cgroup_path("agents").is_err());
        assert!(normalize_cgroup_path("/a/../b").is_err());
        let e = err("[[tag]]\ncgroup='agents'\n");
        assert!(e.contains("tag[0].cgroup"), "{e}");
    }

    #[test]
    fn bad_server_name() {
        let e = err("[[server]]\nname='a b'\nintercept=['127.0.0.2:80']\nupstream='127.0.0.1:1'\n");
        assert!(e.contains("server[0].name"), "{e}");
    }
}
