//! The daemon: state shared by every connection ([`Daemon`], one `Arc`), start-up in a fixed
//! order (kernel, servers, tags, listeners, admin socket), and shutdown.

use std::{
    collections::HashSet,
    path::Path,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use interceptor_common::{Addr, BlockKey, ServerValue, TagValue};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{
    accept::Proxy,
    admin::AdminServer,
    audit::{self, Audit},
    bpf::{self, Kernel, lock},
    ca::NodeCa,
    cgroup::{self, Hierarchy},
    config::{self, Config},
    identity::Actor,
    mcp::{Sessions, Streams},
    policy::Policy,
    revoke::{Revocation, Selector},
    upstream::Upstream,
    workers::Workers,
};

/// Errors that stop the daemon from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kernel side (load, attach, pins, maps).
    #[error(transparent)]
    Bpf(#[from] bpf::Error),
    /// cgroup discovery or a configured tag.
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    /// A configured tag cannot be applied.
    #[error("config {path}: `tag[{index}].cgroup`: {message}")]
    Tag {
        path: String,
        index: usize,
        message: String,
    },
    /// Listeners or the admin socket.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The audit log cannot be opened: the daemon does not serve unaudited.
    #[error(transparent)]
    Audit(#[from] crate::audit::Error),
    /// The node CA cannot be used.
    #[error("config {path}: [ca]: {error}")]
    Ca {
        path: String,
        error: crate::ca::Error,
    },
    /// A server's upstream TLS settings cannot be used.
    #[error("config {path}: server {server}: {message}")]
    Upstream {
        path: String,
        server: String,
        message: String,
    },
    /// The daemon stopped serving without being asked to.
    #[error("{0}; the daemon stopped (see the log before this line), start it again")]
    Stopped(&'static str),
}

/// Userspace counters (the kernel keeps its own; `status` reports both).
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted by the proxy.
    pub accepted: AtomicU64,
    /// Connections the control plane accepted for a stalled worker (see
    /// `accept::STALL_CHECK`).
    pub stall_takeovers: AtomicU64,
    /// Accepted connections without a kernel record (closed).
    pub no_record: AtomicU64,
    /// Accepted connections refused because their cgroup had as many as
    /// `daemon.max_connections_per_cgroup` open.
    pub over_limit: AtomicU64,
    /// Request bodies and upstream answers not read: the buffer budget was spent
    /// (`proxy.max_buffered_bytes`, `…_per_cgroup`).
    pub over_budget: AtomicU64,
    /// Requests refused because their cgroup (or the node) had as many in flight as
    /// `proxy.max_requests_in_flight*` allow.
    pub over_in_flight: AtomicU64,
    /// Requests refused because their cgroup sent more than
    /// `proxy.max_requests_per_second_per_cgroup` allows.
    pub over_rate: AtomicU64,
    /// When (Unix seconds) a refusal over the limit was last logged.
    pub over_limit_logged: AtomicU64,
    /// When a connection without a kernel record was last logged (unix seconds).
    pub no_record_logged: AtomicU64,
    /// Refused connections being answered (see `accept::refuse_over_limit`).
    pub lingering: AtomicU64,
    /// Connections currently being relayed.
    pub active: AtomicU64,
    /// Bytes relayed agent → upstream.
    pub relayed_up: AtomicU64,
    /// Bytes relayed upstream → agent.
    pub relayed_down: AtomicU64,
    /// Requests whose upstream could not be reached or broke.
    pub upstream_errors: AtomicU64,
    /// JSON-RPC requests and notifications allowed by policy.
    pub allowed: AtomicU64,
    /// JSON-RPC requests and notifications denied by policy.
    pub denied: AtomicU64,
    /// HTTP requests refused before any decision (malformed, ambiguous, too large).
    pub rejected: AtomicU64,
}

/// Shared state, one per daemon.
pub struct Daemon {
    pub config: Config,
    pub kernel: Kernel,
    pub hierarchy: Hierarchy,
    /// Cookie of the network namespace the proxy listens in.
    pub netns_cookie: u64,
    pub listener: interceptor_common::Listener,
    pub counters: Counters,
    /// The policy in force; replaced whole on reload, read per request.
    policy: RwLock<Arc<Policy>>,
    /// Bumped when a reload changes the policy: server streams, judged when they opened,
    /// are judged again (see `Conn::stream_withdrawn`).
    pub policy_changes: tokio::sync::watch::Sender<u64>,
    /// Held through a reload, from reading the file to the swap: two at once (SIGHUP and
    /// `interceptor reload`) could otherwise end with the older file's policy in force.
    reloading: std::sync::Mutex<()>,
    /// Held through a revoke or unrevoke, from the check to the change: an unrevoke recorded
    /// before it applies must not remove a revocation made meanwhile.
    revoking: std::sync::Mutex<()>,
    /// Held (shared) by each admin request and SIGHUP reload while it runs (see
    /// [`Daemon::change`]), taken whole by the stop before `daemon.stop` is recorded: what
    /// they change (and record) comes before it.
    changes: Arc<tokio::sync::RwLock<()>>,
    /// The way to each server's upstream, by server index.
    pub upstreams: Vec<Upstream>,
    /// The node CA, when `[ca]` is configured.
    pub ca: Option<NodeCa>,
    /// Live 2024-11-05 SSE sessions.
    pub sessions: Sessions,
    /// Live server-to-agent streams (GET streams, `subscriptions/listen`), for notifications.
    pub streams: Streams,
    /// Streamable HTTP sessions and the identities that opened them.
    pub bound_sessions: crate::mcp::BoundSessions,
    /// MCP tasks started through the proxy, and by whom.
    pub tasks: crate::mcp::tasks::Tasks,
    /// Requests whose answers are owed on a resumed stream (see [`crate::mcp::Parked`]).
    pub parked: crate::mcp::Parked,
    /// The bytes of bodies read whole held now (`proxy.max_buffered_bytes`).
    pub buffers: Arc<crate::mcp::budget::Budget>,
    /// Requests and streams in flight (`proxy.max_requests_in_flight*`): each holds an
    /// upstream connection, and those hold descriptors every agent (and `revoke`) needs.
    pub in_flight: Arc<crate::mcp::budget::Budget>,
    /// Requests a second per cgroup (`proxy.max_requests_per_second_per_cgroup`), if bounded.
    pub rate: Option<crate::mcp::rate::RateLimit>,
    /// The daemon's own `identity` object (JSON text), for the events it causes itself.
    own_identity: String,
    /// The audit log.
    pub audit: Audit,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// Revocations in force (the pinned block map is their persistent form).
    revocations: RwLock<Vec<Revocation>>,
    /// Proxy listeners opened inside other network namespaces, by namespace inode.
    ns_listeners: std::sync::Mutex<std::collections::HashMap<u64, NsListener>>,
    /// Set on SIGTERM: connections finish their in-flight requests and close.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// Set once drained: the programs forget the daemon's identity (its exemption), which
    /// its upstream connections need until then.
    stopped: AtomicBool,
    /// Live agent connections, by connection number, so a revocation can close them.
    pub live: std::sync::Mutex<std::collections::HashMap<u64, Arc<crate::mcp::Conn>>>,
    /// Live agent connections per cgroup id, for `daemon.max_connections_per_cgroup`.
    pub per_cgroup: std::sync::Mutex<std::collections::HashMap<u64, u32>>,
    /// The threads agent connections are served on.
    pub workers: crate::workers::Workers,
    /// What `/proc` said about agent processes, while the kernel reports no change to them.
    pub proc_cache: crate::identity::ProcCache,
    /// Identity assertions signed ahead for workloads' next requests.
    pub presigns: crate::mcp::WorkloadPresigns,
    /// Tools' `x-mcp-header` annotations, learned from the lists relayed (`Mcp-Param-*`).
    pub mirrors: crate::mcp::params::Mirrors,
    started: Instant,
}

/// A listener inside another network namespace.
struct NsListener {
    cookie: u64,
    entry: interceptor_common::Listener,
    /// A process of a tagged cgroup seen in the namespace when it was opened.
    pid: u32,
    task: tokio::task::JoinHandle<()>,
    opened: Instant,
}

/// How often the tagged cgroups are scanned for processes in other network namespaces.
const NAMESPACE_SCAN: std::time::Duration = std::time::Duration::from_millis(500);

/// The inode of a process's network namespace.
fn netns_inode(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Every how many scans each process's namespace is looked up again even when the kernel
/// reported no change (a process can `setns`/`unshare` without exec or exit; until then its
/// connects from the new namespace are refused, fail closed).
const NAMESPACE_FULL_SCAN: u64 = 10;

/// What earlier scans learnt: per process, its slot's change counter (from the process-change
/// tracepoints) when its namespace was looked up, and the namespace's inode. Each lookup walks
/// `/proc/<pid>/ns/net` (~10 µs); with a thousand tagged processes, scanning every 500 ms cost
/// 2.5 % of a core.
#[derive(Default)]
struct NetnsCache {
    known: std::collections::HashMap<u32, (u64, u64)>,
    scans: u64,
    /// Namespaces whose listener could not be opened or ended, by inode (backing off: each
    /// attempt enters the namespace on a thread of its own).
    refused: std::collections::HashMap<u64, Retry>,
    /// cgroups with more namespaces than get a listener (warned about once while they do).
    crowded: HashSet<std::path::PathBuf>,
}

/// Network namespaces served per cgroup (a pod or container has one).
const MAX_NAMESPACES_PER_CGROUP: usize = 8;

/// A namespace's listener failures: how many in a row, when to try again, and whether it had
/// a listener (then it keeps its place under the per-cgroup cap while it waits).
#[derive(Debug, Clone, Copy)]
struct Retry {
    failures: u32,
    next: Instant,
    held: bool,
}

impl NetnsCache {
    /// Counts a failure of namespace `ino`'s listener (`held`: one that had been open ended):
    /// failures in a row, and the wait before the next attempt (doubling, to
    /// [`NAMESPACE_RETRY_MAX`]).
    fn back_off(&mut self, ino: u64, held: bool) -> (u32, Duration) {
        let last = self.refused.get(&ino);
        let failures = last.map_or(0, |r| r.failures) + 1;
        let held = held || last.is_some_and(|r| r.held);
        let wait = NAMESPACE_RETRY
            .saturating_mul(1 << failures.min(8))
            .min(NAMESPACE_RETRY_MAX);
        self.refused.insert(
            ino,
            Retry {
                failures,
                next: Instant::now() + wait,
                held,
            },
        );
        (failures, wait)
    }

    /// Whether namespace `ino` waits out a failure now.
    fn waiting(&self, ino: u64, now: Instant) -> bool {
        self.refused.get(&ino).is_some_and(|r| now < r.next)
    }
}

/// The wait before opening a refused namespace's listener again, doubling per failure.
const NAMESPACE_RETRY: Duration = Duration::from_millis(500);
const NAMESPACE_RETRY_MAX: Duration = Duration::from_secs(60);

/// Network namespaces (inode → a pid in it) of the processes under the cgroup directories.
/// A process's namespace is taken from `cache` while its change counter (`changes`, read
/// before any lookup) has not moved since, except on every [`NAMESPACE_FULL_SCAN`]th scan.
/// A network namespace the scan found: a tagged process in it, the cgroups its tagged
/// processes are in, and how many there are.
#[derive(Debug)]
struct NsSeen {
    pid: u32,
    cgroups: Vec<std::path::PathBuf>,
    procs: usize,
}

/// The network namespaces of the processes under `dirs`, and whether the scan is complete: a
/// cgroup that could not be read (no descriptor left, say), unlike one removed meanwhile,
/// leaves it incomplete — what it holds is unknown, not gone.
fn namespaces_under(
    dirs: &[std::path::PathBuf],
    cache: &mut NetnsCache,
    changes: impl Fn(u32) -> Option<u64>,
) -> (std::collections::HashMap<u64, NsSeen>, bool) {
    // Only a shortage makes a cgroup's contents unknown: a cgroup removed while it was
    // walked, or one whose processes cannot be listed (a threaded one: EOPNOTSUPP; a path past
    // PATH_MAX), holds none this scan can serve, and an agent that makes one must not stop
    // every scan on the node.
    let gone = |e: &std::io::Error| {
        !matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
        )
    };
    let mut complete = true;
    let full = cache.scans.is_multiple_of(NAMESPACE_FULL_SCAN);
    cache.scans += 1;
    let mut known = std::collections::HashMap::new();
    let mut found = std::collections::HashMap::new();
    let mut stack: Vec<std::path::PathBuf> = dirs.to_vec();
    // Nested tags (`/agents` and `/agents/a`) would walk a cgroup twice.
    let mut walked = HashSet::new();
    while let Some(dir) = stack.pop() {
        if !walked.insert(dir.clone()) {
            continue;
        }
        // A threaded cgroup lists no processes (EOPNOTSUPP): its threads, whose /proc entries
        // name their namespaces as a process's do.
        let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                std::fs::read_to_string(dir.join("cgroup.threads"))
            }
            read => read,
        };
        let procs = match procs {
            Ok(procs) => procs,
            Err(e) => {
                complete &= gone(&e);
                String::new()
            }
        };
        for pid in procs.lines() {
            let Ok(p) = pid.parse::<u32>() else { continue };
            let counter = changes(p);
            let ino = match (counter, cache.known.get(&p)) {
                (Some(now), Some(&(then, ino))) if !full && now == then => Some(ino),
                _ => netns_inode(pid),
            };
            if let Some(ino) = ino {
                let seen = found.entry(ino).or_insert_with(|| NsSeen {
                    pid: p,
                    cgroups: Vec::new(),
                    procs: 0,
                });
                seen.procs += 1;
                if !seen.cgroups.contains(&dir) {
                    seen.cgroups.push(dir.clone());
                }
                if let Some(counter) = counter {
                    known.insert(p, (counter, ino));
                }
            }
        }
        match std::fs::read_dir(&dir) {
            Ok(entries) => stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            ),
            Err(e) => complete &= gone(&e),
        }
    }
    // Processes gone from the tagged cgroups are forgotten.
    cache.known = known;
    (found, complete)
}

/// [`Daemon::namespaces_to_serve`]'s choice, given the namespaces served (`served`) at `now`.
fn pick_namespaces(
    served: &HashSet<u64>,
    found: &std::collections::HashMap<u64, NsSeen>,
    cache: &mut NetnsCache,
    now: Instant,
) -> std::collections::HashMap<u64, u32> {
    let waiting = |ino: &u64| cache.waiting(*ino, now);
    // Lost its listener: keeps its place, and is opened again once its wait is over.
    let held = |ino: &u64| cache.refused.get(ino).is_some_and(|r| r.held);
    let mut wanted: std::collections::HashMap<u64, u32> = found
        .iter()
        .filter(|(ino, _)| served.contains(ino) || (held(ino) && !waiting(ino)))
        .map(|(ino, seen)| (*ino, seen.pid))
        .collect();
    // Per cgroup, in path order: its namespaces; and how many places they take.
    let mut members: std::collections::BTreeMap<&Path, Vec<u64>> = Default::default();
    let mut taken: std::collections::HashMap<&Path, usize> = Default::default();
    for (ino, seen) in found {
        let takes = served.contains(ino) || held(ino);
        for dir in &seen.cgroups {
            members.entry(dir).or_default().push(*ino);
            *taken.entry(dir).or_default() += usize::from(takes);
        }
    }
    let mut crowded = HashSet::new();
    for (&dir, inos) in &members {
        if inos.len() > MAX_NAMESPACES_PER_CGROUP {
            if !cache.crowded.contains(dir) {
                warn!(
                    cgroup = %dir.display(),
                    namespaces = inos.len(),
                    "more network namespaces in this cgroup than get a listener \
                     ({MAX_NAMESPACES_PER_CGROUP}); the others' MCP connects stay refused \
                     (logged once while it lasts)"
                );
            }
            crowded.insert(dir.to_owned());
        }
        let mut candidates: Vec<(usize, u64)> = inos
            .iter()
            .filter(|ino| !served.contains(ino) && !held(ino) && !waiting(ino))
            .filter(|ino| !wanted.contains_key(ino))
            .map(|ino| (found[ino].procs, *ino))
            .collect();
        candidates.sort_unstable_by_key(|(procs, ino)| (std::cmp::Reverse(*procs), *ino));
        for (_, ino) in candidates {
            // A place in every cgroup it is in, not only this one; but a cgroup with none yet
            // gets its first whatever the others hold (a container sharing its pod's
            // namespace with a crowded one must not go without).
            let cgroups = &found[&ino].cgroups;
            let room = taken[dir] == 0
                || cgroups
                    .iter()
                    .all(|c| taken[c.as_path()] < MAX_NAMESPACES_PER_CGROUP);
            if room {
                for c in cgroups {
                    *taken.entry(c.as_path()).or_default() += 1;
                }
                wanted.insert(ino, found[&ino].pid);
            }
        }
    }
    cache.crowded = crowded;
    wanted
}

/// This process's id and cgroup id, for the programs to recognise its own connections.
fn own_identity() -> (u32, u64) {
    let cgroup_id = crate::cgroup::process_cgroup(std::process::id())
        .ok()
        .and_then(|p| {
            crate::cgroup::cgroup2_mount()
                .ok()
                .map(|m| Hierarchy { mount: m })
                .and_then(|h| h.id(&p).ok())
        })
        .unwrap_or(0);
    (std::process::id(), cgroup_id)
}

/// What a reload did.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    /// The policy differs from the one it replaced.
    pub policy_changed: bool,
    pub roles: usize,
    pub bindings: usize,
    /// Sections that changed in the file but only take effect at the next start.
    pub not_applied: Vec<&'static str>,
    /// Server streams that were sent `notifications/tools/list_changed`.
    pub notified_streams: usize,
    /// The file re-read: the one the daemon was started with.
    pub config: std::path::PathBuf,
    /// What is valid but likely a mistake in it (also logged).
    pub warnings: Vec<String>,
}

/// A tag as `status` lists it.
#[derive(Debug, Serialize)]
pub struct TagStatus {
    pub cgroup: String,
    pub id: u64,
    /// False when the cgroup was removed after tagging.
    pub exists: bool,
    /// Why the tag may not hold (see `Hierarchy::delegation_warning`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl Daemon {
    /// How many reloads have changed the policy: read before a decision, it tells a server
    /// stream whether the policy changed since it was judged.
    pub fn policy_generation(&self) -> u64 {
        *self.policy_changes.borrow()
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `change` (an admin request, a reload: blocking, it may read /proc, update maps,
    /// resolve names) off the async threads, before the stop records `daemon.stop` (see
    /// `changes`); its result once it has run.
    pub async fn change<R: Send + 'static>(
        self: &Arc<Self>,
        change: impl FnOnce(&Daemon) -> R + Send + 'static,
    ) -> tokio::task::JoinHandle<R> {
        let running = self.changes.clone().read_owned().await;
        let daemon = self.clone();
        tokio::task::spawn_blocking(move || {
            let _running = running;
            change(&daemon)
        })
    }

    /// Records `daemon.stop` with `fields`, the last event: tried whatever the pace of
    /// retries of a failing log; then closes the log (its closing checkpoint and last sync,
    /// whoever still holds the daemon).
    async fn record_stop(&self, by: &str, fields: Value) {
        self.audit.try_now();
        if let Err(e) = self
            .audit
            .record(self.event_by(by, "daemon.stop", fields))
            .await
        {
            warn!(error = %e, "could not record daemon.stop");
        }
        // Joins the audit thread (its last sync): off this worker where the runtime allows.
        match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => self.audit.close(),
            _ => tokio::task::block_in_place(|| self.audit.close()),
        }
    }

    /// Re-reads the config file and applies its policy to the next request on every
    /// connection. An invalid file changes nothing and says why. Blocking (it reads the file
    /// and resolves names): run it through [`Daemon::change`].
    pub fn reload(&self, by: &str) -> Result<ReloadReport, String> {
        let _one_at_a_time = lock(&self.reloading);
        let new = match Config::load(&self.config.path) {
            Ok(new) => new,
            Err(e) => {
                let reason = e.to_string();
                self.audit.record_later(self.event_by(
                    by,
                    "policy.reload",
                    json!({"outcome": "refused", "reason": reason}),
                ));
                return Err(format!(
                    "reload refused, the current policy stays active: {reason}"
                ));
            }
        };
        let mut not_applied = Vec::new();
        if new.daemon != self.config.daemon {
            not_applied.push("[daemon]");
        }
        if new.servers != self.config.servers {
            not_applied.push("[[server]]");
        }
        if new.tags != self.config.tags {
            not_applied.push("[[tag]] (use interceptor tag/untag)");
        }
        if new.proxy != self.config.proxy {
            not_applied.push("[proxy]");
        }
        if new.audit != self.config.audit {
            not_applied.push("[audit]");
        }
        if new.naming != self.config.naming {
            not_applied.push("[identity]");
        }
        if new.ca != self.config.ca {
            not_applied.push("[ca]");
        } else if let (Some(ca), Some(raw)) = (&self.ca, &new.ca)
            && ca.files_changed(raw)
        {
            // The same paths, other contents: a renewed or replaced CA is not taken on.
            not_applied.push("[ca] (its certificate or key file changed)");
        }
        let warnings = new.warnings();
        for warning in &warnings {
            warn!("{warning}");
        }
        let policy_changed = new.policy.fingerprint != self.policy().fingerprint;
        let roles = new.policy.role_names().len();
        let bindings = new.policy.binding_count();
        // On record before it applies (a request judged by the new policy comes after it in
        // the log), or not applied.
        self.record_before(
            by,
            "policy.reload",
            json!({
                "outcome": "applied",
                "policy_changed": policy_changed,
                "roles": roles,
                "bindings": bindings,
                "not_applied": not_applied,
            }),
            "reload refused, the current policy stays active:",
        )?;
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new.policy);
        // Server streams the new policy no longer allows end; agents with one that goes on
        // re-list their tools; those without see the new policy on their next request anyway
        // (decisions are never cached).
        let notified_streams = if policy_changed {
            self.policy_changes
                .send_modify(|generation| *generation += 1);
            crate::mcp::notify_tools_changed(&self.streams)
        } else {
            0
        };
        info!(policy_changed, roles, bindings, notified_streams, not_applied = ?not_applied, "policy reloaded");
        Ok(ReloadReport {
            config: self.config.path.clone(),
            warnings,
            policy_changed,
            roles,
            bindings,
            not_applied,
            notified_streams,
        })
    }

    /// Opens a listener in every network namespace where a tagged process lives, and closes
    /// those whose namespace has no tagged process any more. Until a namespace has its listener,
    /// its tagged processes' MCP connects are refused (fail closed).
    async fn refresh_namespaces(self: &Arc<Self>, cache: &mut NetnsCache) {
        let own = netns_inode("self");
        let dirs: Vec<std::path::PathBuf> = self
            .tags()
            .into_iter()
            .filter(|t| t.exists)
            .map(|t| self.hierarchy.dir(&t.cgroup))
            .collect();
        let mut taken = std::mem::take(cache);
        let daemon = self.clone();
        let (found, complete) = match tokio::task::spawn_blocking(move || {
            let found =
                namespaces_under(&dirs, &mut taken, |pid| daemon.kernel.process_changes(pid));
            (found, taken)
        })
        .await
        {
            Ok(((found, complete), taken)) => {
                *cache = taken;
                (found, complete)
            }
            Err(_) => (Default::default(), false),
        };
        if !complete {
            // What the unread cgroups hold is unknown, not gone: no listener is closed and no
            // failure forgotten on such a scan (descriptors ran out: the next one reads them);
            // the namespaces found are served.
            warn!(
                "namespace scan incomplete (a tagged cgroup could not be read: out of descriptors or memory); no listener closed"
            );
        }
        let found: std::collections::HashMap<u64, NsSeen> = found
            .into_iter()
            .filter(|(ino, _)| Some(*ino) != own)
            .collect();
        let wanted = self.namespaces_to_serve(&found, cache);
        // Failures are remembered while the namespace lives (picked or not): forgotten only
        // for one a complete scan no longer finds.
        if complete {
            cache.refused.retain(|ino, _| found.contains_key(ino));
        }
        let stale: Vec<u64> = lock(&self.ns_listeners)
            .keys()
            .filter(|ino| complete && !wanted.contains_key(ino))
            .copied()
            .collect();
        for ino in stale {
            if let Some(l) = lock(&self.ns_listeners).remove(&ino) {
                l.task.abort();
                let _ = lock(&self.kernel.listeners).remove(&l.cookie);
                self.kernel.drop_conns_of(l.cookie);
                info!(
                    netns.inode = ino,
                    netns.cookie = l.cookie,
                    "listener closed: no tagged process left in its network namespace"
                );
            }
        }
        for (ino, pid) in wanted {
            {
                let mut listeners = lock(&self.ns_listeners);
                match listeners.get(&ino) {
                    Some(l) if l.task.is_finished() => {
                        // Its listener died (closed under the daemon: whoever owns the
                        // namespace may `ss -K` it): opened again after a wait, as a failed
                        // one, so that closing it in a loop costs the daemon little.
                        let _ = lock(&self.kernel.listeners).remove(&l.cookie);
                        self.kernel.drop_conns_of(l.cookie);
                        // A listener that served a while starts its count afresh; one closed
                        // again soon after it opened waits longer each time.
                        if l.opened.elapsed() > NAMESPACE_RETRY_MAX {
                            cache.refused.remove(&ino);
                        }
                        listeners.remove(&ino);
                        let (failures, wait) = cache.back_off(ino, true);
                        if failures == 1 {
                            warn!(
                                netns.inode = ino,
                                retry_in = ?wait,
                                "the listener in this network namespace ended; opening it again"
                            );
                        }
                        continue;
                    }
                    Some(_) => continue,
                    None => {}
                }
            }
            let ns = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
            let bound = Proxy::bind_in(&ns, ino, self.config.daemon.listen_port)
                .await
                .and_then(|proxy| {
                    let (cookie, entry) = (proxy.netns_cookie, proxy.entry);
                    let accepting = proxy.start(self)?;
                    lock(&self.kernel.listeners)
                        .insert(cookie, entry, 0)
                        .map_err(|e| std::io::Error::other(format!("registering it: {e}")))?;
                    Ok((cookie, entry, accepting))
                });
            match bound {
                Ok((cookie, entry, accepting)) => {
                    let task = tokio::spawn(accepting);
                    info!(
                        netns.inode = ino,
                        netns.cookie = cookie,
                        pid,
                        "listener opened in another network namespace"
                    );
                    lock(&self.ns_listeners).insert(
                        ino,
                        NsListener {
                            cookie,
                            entry,
                            pid,
                            task,
                            opened: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    let (failures, wait) = cache.back_off(ino, false);
                    // Once per namespace, not per attempt: an agent can make them at will.
                    if failures == 1 {
                        warn!(netns.inode = ino, pid, error = %e, retry_in = ?wait, "cannot open a listener in the network namespace; its tagged processes stay refused (tried again with a growing wait, logged once)");
                    } else {
                        debug!(netns.inode = ino, pid, error = %e, failures, retry_in = ?wait, "still cannot open a listener in the network namespace");
                    }
                }
            }
        }
    }

    /// Which found namespaces get a listener: every one served already, and per cgroup new
    /// ones up to [`MAX_NAMESPACES_PER_CGROUP`], counting those it has served, those picked for
    /// an earlier cgroup (cgroups in path order), and those that lost their listener and wait
    /// to open it again (they keep their place); new ones with the most tagged processes first,
    /// none waiting out a failure. A namespace counts in every cgroup it has tagged processes
    /// in. An agent that may make network namespaces (root in a container, or anyone in a user
    /// namespace of its own) would otherwise fill the node's listener entries, and every other
    /// namespace's MCP connects would be refused; a served one is never closed for it (its
    /// connections stay).
    fn namespaces_to_serve(
        &self,
        found: &std::collections::HashMap<u64, NsSeen>,
        cache: &mut NetnsCache,
    ) -> std::collections::HashMap<u64, u32> {
        let served: HashSet<u64> = lock(&self.ns_listeners).keys().copied().collect();
        pick_namespaces(&served, found, cache, Instant::now())
    }

    fn unregister_ns_listeners(&self) {
        for (_, l) in lock(&self.ns_listeners).drain() {
            l.task.abort();
            let _ = lock(&self.kernel.listeners).remove(&l.cookie);
        }
    }

    /// Revokes `selector`: kernel block (persisted), live connections closed, audit event.
    /// Returns the revocation and how many live connections were closed.
    pub fn revoke(
        &self,
        selector: Selector,
        reason: &str,
        all_egress: bool,
        by: &str,
    ) -> Result<(Revocation, usize), String> {
        let _one_at_a_time = lock(&self.revoking);
        if let Selector::Cgroup(cgroup) = &selector {
            // Outside the attach point its connections are never intercepted: nothing to
            // refuse, and a kernel row there would claim an enforcement that never happens.
            config::seen_by_programs(cgroup, &self.config.daemon.cgroup_root)?;
        }
        let (selector, key) = selector.key(&self.hierarchy, &self.config.naming)?;
        // The label is how the revocation is rebuilt after a restart: it must fit whole.
        if selector.label().len() > interceptor_common::BLOCK_TEXT {
            return Err(format!(
                "{} is longer than {} bytes and cannot be stored; revoke a shorter selector \
                 (its cgroup, uid or pid) instead",
                selector.label(),
                interceptor_common::BLOCK_TEXT
            ));
        }
        if all_egress && !matches!(selector, Selector::Cgroup(_)) {
            return Err("--all-egress applies to a cgroup (--cgroup P)".into());
        }
        let revocation = Revocation {
            selector,
            all_egress,
            reason: if reason.is_empty() {
                "revoked by operator".into()
            } else {
                reason.to_owned()
            },
            since: crate::ca::unix_now(),
            key,
        };
        lock(&self.kernel.blocks)
            .insert(key, revocation.row(), 0)
            .map_err(|e| format!("cannot store the revocation: {e}"))?;
        {
            let mut list = self.revocations.write().unwrap_or_else(|p| p.into_inner());
            // This one replaces any earlier revocation of the same selector (one of a cgroup
            // made again since, under its old id, would otherwise be followed to the new id
            // over this one).
            let replaced: Vec<BlockKey> = list
                .iter()
                .filter(|r| r.key != key && r.selector == revocation.selector)
                .map(|r| r.key)
                .collect();
            if !replaced.is_empty() {
                let mut blocks = lock(&self.kernel.blocks);
                for old in &replaced {
                    let _ = blocks.remove(old);
                }
            }
            list.retain(|r| r.key != key && r.selector != revocation.selector);
            list.push(revocation.clone());
        }
        // The kernel's block counts first (until then its connect programs skip the block
        // lookups of a first revocation); then the live connections, closed whatever the
        // sync's outcome: the revocation is already in force at the proxy.
        let synced = self.sync_block_state();
        let closed = self.close_revoked();
        synced?;
        warn!(revoked = %revocation.selector.label(), reason = %revocation.reason, all_egress, closed, "revoked");
        self.audit.record_later(self.event_by(
            by,
            "revoke",
            json!({
                "selector": revocation.selector,
                "reason": revocation.reason,
                "all_egress": all_egress,
                "closed_connections": closed,
            }),
        ));
        Ok((revocation, closed))
    }

    /// Lifts the revocation of `selector`.
    pub fn unrevoke(&self, selector: Selector, by: &str) -> Result<Selector, String> {
        let _one_at_a_time = lock(&self.revoking);
        let selector = selector.normalized()?;
        // Found by what was revoked, not only by the current key: a revoked cgroup may have
        // been removed, or re-created at its path (another id), since.
        let current = selector
            .clone()
            .key(&self.hierarchy, &self.config.naming)
            .ok()
            .map(|(_, k)| k);
        let revoked = |r: &Revocation| r.selector == selector || Some(r.key) == current;
        if !self
            .revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(revoked)
        {
            return Err(format!(
                "{} is not revoked; `interceptor status` lists the revocations",
                selector.label()
            ));
        }
        // On record before the identity is let through again, or not made.
        let fields = json!({"selector": selector});
        self.record_before(
            by,
            "unrevoke",
            fields.clone(),
            &format!("unrevoke of {} refused:", selector.label()),
        )?;
        let removed: Vec<BlockKey> = {
            let mut list = self.revocations.write().unwrap_or_else(|p| p.into_inner());
            let (gone, kept) = std::mem::take(&mut *list)
                .into_iter()
                .partition(|r: &Revocation| revoked(r));
            *list = kept;
            gone.into_iter().map(|r| r.key).collect()
        };
        if removed.is_empty() {
            // Checked above, under the same lock: only if the list changed another way.
            let why = format!("{} is not revoked", selector.label());
            self.not_made(by, "unrevoke", fields, &why);
            return Err(why);
        }
        {
            let mut blocks = lock(&self.kernel.blocks);
            for key in &removed {
                let _ = blocks.remove(key);
            }
        }
        if let Err(e) = self.sync_block_state() {
            self.not_made(by, "unrevoke", fields, &e);
            return Err(e);
        }
        info!(unrevoked = %selector.label(), "unrevoked");
        Ok(selector)
    }

    /// The revocation that applies to `identity`, if any (its reason).
    pub fn revocation_for(&self, identity: &crate::identity::Identity) -> Option<String> {
        let list = self.revocations.read().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = list.iter().find(|r| r.selector.matches(identity)) {
            return Some(format!("{} ({})", r.reason, r.selector.label()));
        }
        // An identity whose cgroup or workload id could not be established (its process
        // exited, or left the cgroup it connected from: a connect whose SYN was deferred to a
        // later write, `TCP_FASTOPEN_CONNECT`, made by a child that exited since) cannot be
        // cleared of revocations by them. Fail closed.
        let by = |kind: fn(&Selector) -> bool| list.iter().any(|r| kind(&r.selector));
        if by(|s| matches!(s, Selector::Cgroup(_))) && identity.cgroup.is_none() {
            return Some(
                "the caller's cgroup could not be established while cgroup revocations are in force"
                    .to_owned(),
            );
        }
        (by(|s| matches!(s, Selector::WorkloadId(_))) && identity.workload_id.is_none()).then(|| {
            "the caller's identity could not be established while workload-id revocations are in force"
                .to_owned()
        })
    }

    /// Revokes every live connection a revocation now covers; returns how many.
    fn close_revoked(&self) -> usize {
        let live: Vec<Arc<crate::mcp::Conn>> = lock(&self.live).values().cloned().collect();
        live.iter()
            .filter_map(|c| self.revocation_for(&c.identity).map(|why| c.revoke(why)))
            .count()
    }

    /// Tells the programs how many blocks exist (0 lets them skip the lookups).
    fn sync_block_state(&self) -> Result<(), String> {
        let list = self.revocations.read().unwrap_or_else(|p| p.into_inner());
        let kernel: Vec<&Revocation> = list.iter().filter(|r| r.in_kernel()).collect();
        let (daemon_tgid, daemon_cgroup) = if self.stopped.load(Ordering::Relaxed) {
            (0, 0)
        } else {
            own_identity()
        };
        let state = interceptor_common::State {
            egress_blocks: kernel.iter().filter(|r| r.all_egress).count() as u32,
            mcp_blocks: kernel.len() as u32,
            daemon_tgid,
            _pad: 0,
            daemon_cgroup,
        };
        lock(&self.kernel.state)
            .set(0, state, 0)
            .map_err(|e| format!("cannot update the programs' state: {e}"))
    }

    /// Loads the revocations persisted in the pinned map (at start).
    fn load_revocations(&self) -> Result<(), String> {
        let rows: Vec<Revocation> = lock(&self.kernel.blocks)
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Revocation::from_row(k, &v))
            .collect();
        if !rows.is_empty() {
            info!(
                count = rows.len(),
                "revocations re-adopted from the pinned map"
            );
        }
        *self.revocations.write().unwrap_or_else(|p| p.into_inner()) = rows;
        self.sync_block_state()
    }

    /// Revocations in force.
    pub fn revocations(&self) -> Vec<Revocation> {
        self.revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Tags `cgroup` (relative to the cgroup v2 mount). Idempotent.
    pub fn tag(&self, cgroup: &str, by: &str) -> Result<TagStatus, String> {
        let cgroup = config::taggable(cgroup, &self.config.daemon.cgroup_root)?;
        let id = self.hierarchy.id(&cgroup).map_err(|e| e.to_string())?;
        lock(&self.kernel.tags)
            .insert(id, TagValue::new(&cgroup), 0)
            .map_err(|e| format!("cannot tag {cgroup}: {e}"))?;
        info!(cgroup = %cgroup, cgroup.id = id, "tagged");
        let warning = self
            .hierarchy
            .delegation_warning(&cgroup, crate::cgroup::Act::Tag);
        if let Some(w) = &warning {
            warn!("{w}");
        }
        self.audit.record_later(self.event_by(
            by,
            "tag",
            json!({"cgroup": cgroup, "cgroup_id": id}),
        ));
        Ok(TagStatus {
            cgroup,
            id,
            exists: true,
            warning,
        })
    }

    /// A configured tag whose cgroup does not exist yet: kept under a key no cgroup has (so
    /// it matches nothing) until [`Daemon::follow_tags`] finds the cgroup.
    fn tag_pending(&self, cgroup: &str) -> Result<TagStatus, String> {
        let cgroup = config::taggable(cgroup, &self.config.daemon.cgroup_root)?;
        let id = pending_tag_key(&cgroup);
        lock(&self.kernel.tags)
            .insert(id, TagValue::new(&cgroup), 0)
            .map_err(|e| format!("cannot tag {cgroup}: {e}"))?;
        warn!(cgroup = %cgroup, "tagged cgroup does not exist yet; tagged once it is created \
            (until then its processes are not redirected: tag a parent that exists)");
        self.audit.record_later(self.event_by(
            &self.own_identity,
            "tag",
            json!({"cgroup": cgroup, "cgroup_id": null, "pending": true}),
        ));
        Ok(TagStatus {
            cgroup,
            id,
            exists: false,
            warning: None,
        })
    }

    /// Tags follow their cgroup's path: a tagged cgroup created (configured before it
    /// existed) or re-created (removed and made again: a new id) is tagged under its id now,
    /// and its entry under the old id goes (ids are not reused; a service whose cgroup is made
    /// anew at each restart must not fill the map). Between the cgroup's creation and this (at
    /// most [`NAMESPACE_SCAN`]) its processes are not redirected: tag a parent that exists for
    /// cgroups created on the fly. (A tagged cgroup renamed away loses its tag once another
    /// is made at its old path.)
    pub fn follow_tags(&self) {
        let mut tags = lock(&self.kernel.tags);
        let entries: Vec<(u64, TagValue)> = tags.iter().filter_map(Result::ok).collect();
        let mut known: HashSet<u64> = entries.iter().map(|(k, _)| *k).collect();
        for (key, value) in entries {
            // A path cut to fit (from an older daemon) names another cgroup, if any.
            if value.path().len() >= interceptor_common::TAG_PATH_MAX {
                continue;
            }
            let Ok(id) = self.hierarchy.id(value.path()) else {
                continue;
            };
            if id == key {
                continue;
            }
            if known.contains(&id) {
                // Tagged under its id already (`tag`, or another entry of the path followed).
                let _ = tags.remove(&key);
                continue;
            }
            match tags.insert(id, value, 0) {
                Ok(()) => {
                    known.insert(id);
                    let _ = tags.remove(&key);
                    info!(cgroup = %value.path(), cgroup.id = id, "tagged cgroup (re)created: tagged");
                    self.audit.record_later(self.event_by(
                        &self.own_identity,
                        "tag",
                        json!({"cgroup": value.path(), "cgroup_id": id, "followed": true}),
                    ));
                }
                Err(e) => {
                    warn!(cgroup = %value.path(), error = %e, "cannot tag the (re)created cgroup; its processes are not redirected");
                }
            }
        }
    }

    /// Cgroup revocations follow their path as tags do: a revoked cgroup removed and made
    /// again (a service restarted) is refused by the kernel under its new id too — all of its
    /// egress, with `--all-egress`, which the proxy cannot enforce. (Its MCP connections the
    /// proxy refuses by path meanwhile.)
    pub fn follow_revocations(&self) {
        use interceptor_common::block;
        // Looked at under the read lock (a revocation check of a new connection takes it):
        // written only when a revoked cgroup has a new id.
        let moved: Vec<(BlockKey, u64)> = {
            let list = self.revocations.read().unwrap_or_else(|p| p.into_inner());
            list.iter()
                .filter_map(|r| match &r.selector {
                    Selector::Cgroup(path) if r.key.kind == block::CGROUP => {
                        let id = self.hierarchy.id(path).ok()?;
                        (id != r.key.id).then_some((r.key, id))
                    }
                    _ => None,
                })
                .collect()
        };
        if moved.is_empty() {
            return;
        }
        let mut list = self.revocations.write().unwrap_or_else(|p| p.into_inner());
        let mut stale = Vec::new();
        for (old, id) in moved {
            // Found again under the write lock: a revoke or unrevoke may have come between.
            let Some(i) = list.iter().position(|r| r.key == old) else {
                continue;
            };
            let r = &mut list[i];
            let key = BlockKey { id, ..r.key };
            let mut blocks = lock(&self.kernel.blocks);
            if blocks.get(&key, 0).is_ok() {
                // Revoked again under its new id meanwhile: that revocation stands; this one
                // (the old id's) goes.
                let _ = blocks.remove(&r.key);
                stale.push(i);
                continue;
            }
            match blocks.insert(key, r.row(), 0) {
                Ok(()) => {
                    let _ = blocks.remove(&r.key);
                    r.key = key;
                    info!(cgroup = %r.selector.label(), cgroup.id = id, "revoked cgroup (re)created: refused under its new id");
                }
                Err(e) => {
                    warn!(cgroup = %r.selector.label(), error = %e, "cannot follow the revoked cgroup's new id; the proxy still refuses its MCP connections");
                }
            }
        }
        stale.sort_unstable_by(|a, b| b.cmp(a));
        for i in stale {
            list.remove(i);
        }
        drop(list);
        let _ = self.sync_block_state();
    }

    /// Removes the tag of `cgroup`. New connections from it are no longer redirected.
    pub fn untag(&self, cgroup: &str, by: &str) -> Result<TagStatus, String> {
        let cgroup = config::normalize_cgroup_path(cgroup)?;
        let mut tags = lock(&self.kernel.tags);
        // Every entry of the cgroup: by its id, and by the recorded path (a cgroup removed or
        // re-created since, one configured before it existed), so none is tagged again later.
        let current = self.hierarchy.id(&cgroup).ok();
        let mut ids: Vec<u64> = tags
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| Some(*k) == current || v.path() == cgroup)
            .map(|(k, _)| k)
            .collect();
        ids.sort_unstable_by_key(|k| Some(*k) != current);
        let Some(&id) = ids.first() else {
            return Err(format!(
                "{cgroup} is not tagged; `interceptor status` lists the tags"
            ));
        };
        // On record before its agents reach MCP servers directly, or not made.
        let fields = json!({"cgroup": cgroup, "cgroup_id": id});
        self.record_before(
            by,
            "untag",
            fields.clone(),
            &format!("untag of {cgroup} refused:"),
        )?;
        for key in &ids {
            if let Err(e) = tags.remove(key) {
                let why = format!("cannot untag {cgroup}: {e}");
                self.not_made(by, "untag", fields, &why);
                return Err(why);
            }
        }
        info!(cgroup = %cgroup, cgroup.id = id, "untagged");
        let exists = self.hierarchy.id(&cgroup).is_ok_and(|cur| cur == id);
        Ok(TagStatus {
            cgroup,
            id,
            exists,
            warning: None,
        })
    }

    /// Records a change that widens access (`name`, `fields`) before it applies, synced in
    /// `fsync` mode; when the log cannot take it, the change is refused (`refused`: how the
    /// error begins) and, as its event may be in the file all the same (written, its sync
    /// failed), followed by one saying it was not made.
    fn record_before(
        &self,
        by: &str,
        name: &str,
        fields: Value,
        refused: &str,
    ) -> Result<(), String> {
        self.audit
            .record_blocking(self.event_by(by, name, fields.clone()))
            .map_err(|e| {
                let why = format!("the audit log cannot record it ({e})");
                self.not_made(by, name, fields, &why);
                format!("{refused} {why}")
            })
    }

    /// Follows the record of a change that was then not made: the same event, with `outcome`
    /// `refused` and the `reason`.
    fn not_made(&self, by: &str, name: &str, mut fields: Value, reason: &str) {
        fields["outcome"] = json!("refused");
        fields["reason"] = json!(reason);
        self.audit.record_later(self.event_by(by, name, fields));
    }

    /// An audit event caused by the process whose `identity` object (JSON text) is `by`.
    fn event_by(&self, by: &str, name: &str, fields: serde_json::Value) -> audit::Event {
        audit::event(name, fields).raw("identity", by)
    }

    /// The `identity` object of `by`'s audit events, read from `/proc` now.
    pub fn identity_of(&self, by: Actor) -> String {
        identity_json(by, &self.config.naming, &self.hierarchy)
    }

    /// Every tag in the (pinned) map.
    pub fn tags(&self) -> Vec<TagStatus> {
        let tags = lock(&self.kernel.tags);
        let mut list: Vec<TagStatus> = tags
            .iter()
            .filter_map(Result::ok)
            .map(|(id, v)| {
                let exists = self.hierarchy.id(v.path()).is_ok_and(|cur| cur == id);
                TagStatus {
                    cgroup: v.path().to_owned(),
                    id,
                    exists,
                    warning: exists
                        .then(|| {
                            self.hierarchy
                                .delegation_warning(v.path(), crate::cgroup::Act::Tag)
                        })
                        .flatten(),
                }
            })
            .collect();
        list.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        list
    }

    /// Everything `interceptor status` shows.
    pub fn status(&self) -> Value {
        let c = &self.counters;
        let counters = self.kernel.counters();
        let mut kernel: serde_json::Map<String, Value> = counters
            .iter()
            .map(|&(k, v)| (k.to_owned(), json!(v)))
            .collect();
        // All refusals, whatever the reason (each is listed too).
        let refused: u64 = counters
            .iter()
            .filter(|(k, _)| k.starts_with("refused_"))
            .map(|&(_, v)| v)
            .sum();
        kernel.insert("refused".into(), json!(refused));
        let (up, down) = (
            c.relayed_up.load(Ordering::Relaxed),
            c.relayed_down.load(Ordering::Relaxed),
        );
        let mut status = json!({
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs(),
            "drain_grace_ms": u64::try_from(self.config.daemon.drain_grace.as_millis()).unwrap_or(u64::MAX),
            "open_files_limit": nix::sys::resource::getrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
            )
            .map_or(0, |(soft, _)| soft),
            "workers": self.workers.count(),
            "config": self.config.path,
            "cgroup_mount": self.hierarchy.mount,
            "attach_cgroup": self.config.daemon.cgroup_root,
            "bpffs_dir": self.kernel.bpffs_dir,
            "listeners": std::iter::once(json!({
                "netns_cookie": self.netns_cookie,
                "port4": self.listener.port4,
                "port6": self.listener.port6,
                "own": true,
            }))
            .chain(lock(&self.ns_listeners).iter().map(|(ino, l)| json!({
                "netns_cookie": l.cookie,
                "netns_inode": ino,
                "port4": l.entry.port4,
                "port6": l.entry.port6,
                "pid": l.pid,
                "own": false,
            })))
            .collect::<Vec<_>>(),
            "programs": self.kernel.attachments,
            "tracepoints": self.kernel.tracepoints,
            "identity_cache": {
                "enabled": self.kernel.tracks_processes(),
                "stats": self.proc_cache.stats(),
            },
            "tags": self.tags(),
            "revocations": self.revocations(),
            "maps": self.kernel.map_fill().into_iter().map(|(name, used, cap)| json!({
                "name": name, "entries": used, "capacity": cap,
            })).collect::<Vec<_>>(),
            "policy": {
                "roles": self.policy().role_names(),
                "bindings": self.policy().binding_count(),
            },
            "servers": self.config.servers.iter().zip(&self.upstreams).map(|(s, u)| json!({
                "name": s.name,
                "intercept": s.intercept.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "upstream": s.upstream,
                "upstream_intercepted": s.upstream_intercepted(),
                // Upstream connections started as agents connected (failed ones included),
                // and of those, taken by a request.
                "connections_ahead": {
                    "opened": u.ahead.opened.load(Ordering::Relaxed),
                    "used": u.ahead.used.load(Ordering::Relaxed),
                },
            })).collect::<Vec<_>>(),
            "ca": self.ca.as_ref().map(|ca| json!({
                "mints": ca.mints.load(Ordering::Relaxed),
                "kid": ca.kid(),
                "not_after": humantime::format_rfc3339_seconds(ca.not_after()).to_string(),
            })),
            "audit": {
                "path": self.audit.config.path,
                "durability": format!("{:?}", self.audit.config.durability).to_lowercase(),
                "healthy": self.audit.healthy(),
                "events": self.audit.stats.events.load(Ordering::Relaxed),
                // The last line's seq: a log whose last records were deleted ends before it.
                "seq": self.audit.last_seq(),
                // write(2) calls: concurrent requests share them.
                "writes": self.audit.stats.writes.load(Ordering::Relaxed),
                "failures": self.audit.stats.failures.load(Ordering::Relaxed),
                // Events dropped while the log stayed unwritable, or over the bound on deferred
                // events while it was writable (an audit.lost event says so).
                "lost": self.audit.stats.lost.load(Ordering::Relaxed),
                "syncs": self.audit.stats.syncs.load(Ordering::Relaxed),
                // Total time in fdatasync, µs (the mean over syncs is what fsync mode adds).
                "sync_us": self.audit.stats.sync_micros.load(Ordering::Relaxed),
                // audit.checkpoint events written, and the last record one signs (null: no
                // [ca], or none yet): a copy of the log verifies through it.
                "checkpoints": self.audit.stats.checkpoints.load(Ordering::Relaxed),
                "signed_through": match self.audit.stats.signed_through.load(Ordering::Relaxed) {
                    0 => None,
                    seq => Some(seq),
                },
            },
            "counters": {
                "kernel": kernel,
                "proxy": {
                    "accepted": c.accepted.load(Ordering::Relaxed),
                    "no_record": c.no_record.load(Ordering::Relaxed),
                    "over_limit": c.over_limit.load(Ordering::Relaxed),
                    "over_budget": c.over_budget.load(Ordering::Relaxed),
                    "over_in_flight": c.over_in_flight.load(Ordering::Relaxed),
                    "stall_takeovers": c.stall_takeovers.load(Ordering::Relaxed),
                    "active": c.active.load(Ordering::Relaxed),
                    // Streamable HTTP sessions bound to the identity that opened them.
                    "bound_sessions": self.bound_sessions.count(),
                    // MCP tasks started through the proxy (only their starter may name them).
                    "tasks": self.tasks.count(),
                    // Agent-caused log lines not written (over their call site's rate).
                    "log_lines_suppressed": crate::telemetry::suppressed(),
                    // Bytes of request bodies and JSON answers held now (read whole).
                    "buffered_bytes": self.buffers.used(),
                    "relayed_bytes": up + down,
                    "relayed_bytes_up": up,
                    "relayed_bytes_down": down,
                    "upstream_errors": c.upstream_errors.load(Ordering::Relaxed),
                    "requests_allowed": c.allowed.load(Ordering::Relaxed),
                    "requests_denied": c.denied.load(Ordering::Relaxed),
                    "requests_rejected": c.rejected.load(Ordering::Relaxed),
                },
            },
        });
        let (busy_poll, busy_polls) = self.workers.busy_polling();
        status["busy_poll_us"] = json!(u64::try_from(busy_poll.as_micros()).unwrap_or(u64::MAX));
        status["busy_polls"] = json!(busy_polls);
        // Beside `over_in_flight` (the macro above is at its recursion limit).
        status["counters"]["proxy"]["over_rate"] = json!(c.over_rate.load(Ordering::Relaxed));
        status
    }

    /// Makes the kernel's server map (and its port bitmap) equal to the config: new ports and
    /// entries first, then stale ones removed, so no configured address is ever briefly
    /// missing (that would let it go direct).
    fn sync_servers(&self) -> Result<(), bpf::Error> {
        let wanted = intercepted(&self.config.servers);
        let words = port_words(wanted.keys().map(std::net::SocketAddr::port));
        let mut ports = lock(&self.kernel.ports);
        // Each word set to the wanted ports, and (`keep`) those set now.
        let write_ports = |ports: &mut aya::maps::Array<aya::maps::MapData, u64>, keep: bool| {
            for (index, &word) in (0u32..).zip(&words) {
                let current = ports.get(&index, 0).unwrap_or(0);
                let new = if keep { word | current } else { word };
                if new != current {
                    ports.set(index, new, 0).map_err(|e| bpf::Error::Map {
                        name: interceptor_common::maps::PORTS,
                        error: Box::new(e),
                    })?;
                }
            }
            Ok::<(), bpf::Error>(())
        };
        write_ports(&mut ports, true)?;
        let mut servers = lock(&self.kernel.servers);
        for (&addr, &id) in &wanted {
            servers
                .insert(
                    Addr::from(addr),
                    ServerValue {
                        server_id: id as u32,
                        _pad: 0,
                    },
                    0,
                )
                .map_err(|e| bpf::Error::Map {
                    name: interceptor_common::maps::SERVERS,
                    error: Box::new(e),
                })?;
        }
        let wanted: HashSet<Addr> = wanted.keys().map(|&a| Addr::from(a)).collect();
        let stale: Vec<Addr> = servers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            let _ = servers.remove(&key);
        }
        // The ports of addresses gone, now that no entry names them.
        write_ports(&mut ports, false)
    }

    fn register_listener(&self) -> Result<(), bpf::Error> {
        lock(&self.kernel.listeners)
            .insert(self.netns_cookie, self.listener, 0)
            .map_err(|e| bpf::Error::Map {
                name: interceptor_common::maps::LISTENERS,
                error: Box::new(e),
            })
    }

    /// After this, tagged MCP connects in our namespace are refused by the kernel (fail closed)
    /// until a daemon registers again.
    fn unregister_listener(&self) {
        let _ = lock(&self.kernel.listeners).remove(&self.netns_cookie);
    }
}

/// The tag key of a cgroup that does not exist yet: the top bit set (cgroup ids are inode
/// numbers, far below it), so it matches no cgroup.
fn pending_tag_key(cgroup: &str) -> u64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(cgroup.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(bytes) | PENDING_TAG
}

/// The bit that marks [`pending_tag_key`]s.
pub const PENDING_TAG: u64 = 1 << 63;

/// Every address the kernel redirects, and the server each one is: first the `intercept`
/// addresses; then each plain-HTTP server's own upstream addresses (an agent dialling the
/// real server directly must not pass policy by; an mTLS upstream refuses a caller without a
/// node-issued certificate anyway, and may share its address with unrelated services behind
/// the same load balancer); then the addresses that reach a loopback one without
/// naming it (a connect to `0.0.0.0:P` goes to `127.0.0.1:P`, one to `[::]:P` to `[::1]:P`,
/// or to `127.0.0.1:P` from a socket bound to a v4-mapped address: the kernel fills in
/// loopback); and `0.0.0.0:P` for every other intercepted port P (from a socket bound to an
/// address, `0.0.0.0:P` goes to that address: the programs look it up). An address already
/// taken keeps its server.
pub fn intercepted(
    servers: &[crate::config::Server],
) -> std::collections::BTreeMap<std::net::SocketAddr, usize> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let mut map = std::collections::BTreeMap::new();
    for (id, server) in servers.iter().enumerate() {
        for &addr in &server.intercept {
            map.entry(addr).or_insert(id);
        }
    }
    for (id, server) in servers
        .iter()
        .enumerate()
        .filter(|(_, s)| s.upstream_intercepted())
    {
        for &addr in &server.upstream_addrs {
            map.entry(addr).or_insert(id);
        }
    }
    let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    // An unspecified address configured (an intercept of `0.0.0.0:P`, a plain upstream on
    // `[::]:P`) is where the kernel sends it: loopback (the programs look `0.0.0.0:P` up as
    // 127.0.0.1:P from an unbound socket).
    let configured: Vec<(SocketAddr, usize)> = map.iter().map(|(&a, &id)| (a, id)).collect();
    for (addr, id) in configured {
        let reached = crate::config::stands_for(addr);
        if reached != addr {
            map.entry(reached).or_insert(id);
        }
    }
    let direct: Vec<(SocketAddr, usize)> = map.iter().map(|(&a, &id)| (a, id)).collect();
    // [::1]:P before 127.0.0.1:P for [::]:P: that is where an ordinary IPv6 socket goes.
    for v6_first in [true, false] {
        for &(addr, id) in &direct {
            let aliases: &[IpAddr] = match addr.ip() {
                IpAddr::V6(ip) if ip == Ipv6Addr::LOCALHOST && v6_first => &[any6],
                IpAddr::V4(ip) if ip == Ipv4Addr::LOCALHOST && !v6_first => &[any4, any6],
                _ => &[],
            };
            for &ip in aliases {
                map.entry(SocketAddr::new(ip, addr.port())).or_insert(id);
            }
        }
    }
    // `0.0.0.0:P` for every intercepted port P: a connect to it goes to the socket's bound
    // address (or 127.0.0.1), which the programs look up instead (the entry tells them P is
    // worth the look).
    for &(addr, id) in &direct {
        map.entry(SocketAddr::new(any4, addr.port())).or_insert(id);
    }
    map
}

/// The bitmap of `ports` as [`interceptor_common::maps::PORTS`] holds it.
fn port_words(ports: impl Iterator<Item = u16>) -> Vec<u64> {
    let mut words = vec![0u64; interceptor_common::capacity::PORT_WORDS as usize];
    for port in ports {
        words[usize::from(port >> 6)] |= 1 << (port & 63);
    }
    words
}

/// Below this many open files the daemon warns that it may run out of descriptors.
const FEW_FILES: u64 = 16_384;

/// Raises the soft limit on open files to the hard one (each agent connection takes two
/// descriptors, one more per upstream connection; a service manager's default soft limit,
/// often 1,024, would cap the daemon at a few hundred connections while the hard limit is far
/// higher). Returns the limit in force.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    // The kernel refuses more than fs.nr_open, which may have been lowered since.
    let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map_or(hard, |n| n.min(hard));
    if soft < most && setrlimit(Resource::RLIMIT_NOFILE, most, hard).is_ok() {
        return Some(most);
    }
    Some(soft)
}

/// The `identity` object (JSON text) of `by`'s audit events, read from `/proc` now.
fn identity_json(by: Actor, naming: &config::Naming, hierarchy: &Hierarchy) -> String {
    by.audit_json(Path::new("/proc"), naming, |cgroup| {
        hierarchy.id(cgroup).ok()
    })
}

/// How long the stop waits for admin requests and reloads still running (see
/// [`Daemon::change`]).
const CHANGES_AT_STOP: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts the daemon and serves until SIGTERM or SIGINT; `on_ready` runs once it serves (the
/// binary hands start-up garbage back to the kernel there).
pub async fn run(config: Config, on_ready: fn()) -> Result<(), Error> {
    // First of all: a SIGTERM while the daemon starts (its start event written, tags applied
    // with their events deferred) waits for the stop it asks for, not the default action
    // (which would end it with no `daemon.stop` and deferred events unwritten).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    if let Some(limit) = raise_fd_limit().filter(|&l| l < FEW_FILES) {
        warn!(
            open_files = limit,
            "the daemon may hold at most this many open files (its RLIMIT_NOFILE, raised as far \
             as the hard limit allows): agent connections beyond about half of it fail; raise \
             the hard limit (e.g. LimitNOFILE= in the service's unit)"
        );
    }
    let hierarchy = Hierarchy::discover()?;
    // Who the daemon's own events name (read once: its process does not change).
    let daemon_identity = identity_json(Actor::daemon(), &config.naming, &hierarchy);
    // First: nothing is served unless it can be audited.
    let audit = Audit::open(config.audit.clone(), &daemon_identity)?;
    let metrics_token = config
        .daemon
        .metrics_token_file
        .as_deref()
        .map(crate::metrics::load_token)
        .transpose()?;
    let path = config.path.display().to_string();
    let ca = config
        .ca
        .as_ref()
        .map(NodeCa::load)
        .transpose()
        .map_err(|error| Error::Ca {
            path: path.clone(),
            error,
        })?;
    match &ca {
        Some(ca) => audit.sign_checkpoints(ca.checkpoint_signer(), &config.naming.node),
        None => info!(
            "no [ca]: the audit log is hash-chained but not signed (no audit.checkpoint events)"
        ),
    }
    let worker_count = config.daemon.worker_count();
    let upstreams = config
        .servers
        .iter()
        .map(|s| {
            Upstream::new(s, Workers::slots(worker_count)).map_err(|message| Error::Upstream {
                path: path.clone(),
                server: s.name.clone(),
                message,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let kernel = Kernel::install(
        &config.daemon.bpffs_dir,
        &hierarchy,
        &config.daemon.cgroup_root,
    )?;
    let proxy = Proxy::bind(config.daemon.listen_port).await?;
    let netns_cookie = proxy.netns_cookie;
    let admin = AdminServer::bind(&config.daemon.admin_socket)?;
    let metrics_listener = match config.daemon.metrics_addr {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let workers = Workers::start(worker_count, config.daemon.busy_poll, audit.idle_flusher())?;
    let metrics = crate::metrics::Metrics::new(&audit.stats);
    let daemon = Arc::new(Daemon {
        workers,
        policy: RwLock::new(Arc::new(config.policy.clone())),
        policy_changes: tokio::sync::watch::Sender::new(0),
        reloading: std::sync::Mutex::new(()),
        revoking: std::sync::Mutex::new(()),
        changes: Arc::new(tokio::sync::RwLock::new(())),
        upstreams,
        ca,
        sessions: Sessions::default(),
        bound_sessions: Default::default(),
        tasks: Default::default(),
        parked: Default::default(),
        buffers: {
            let (total, per_cgroup) = config.proxy.buffered();
            crate::mcp::budget::Budget::new(total, per_cgroup, crate::mcp::budget::Counted::Bytes)
        },
        rate: config
            .proxy
            .rate()
            .map(|(per_second, burst)| crate::mcp::rate::RateLimit::new(per_second, burst)),
        in_flight: {
            let (total, per_cgroup) = config.proxy.in_flight();
            crate::mcp::budget::Budget::new(
                total,
                per_cgroup,
                crate::mcp::budget::Counted::Requests,
            )
        },
        streams: Streams::default(),
        own_identity: daemon_identity.clone(),
        audit,
        metrics,
        revocations: RwLock::new(Vec::new()),
        draining: tokio::sync::watch::Sender::new(false),
        stopped: AtomicBool::new(false),
        ns_listeners: std::sync::Mutex::new(std::collections::HashMap::new()),
        live: std::sync::Mutex::new(std::collections::HashMap::new()),
        per_cgroup: std::sync::Mutex::new(std::collections::HashMap::new()),
        listener: proxy.entry,
        netns_cookie,
        kernel,
        hierarchy,
        counters: Counters::default(),
        proc_cache: crate::identity::ProcCache::default(),
        presigns: crate::mcp::WorkloadPresigns::default(),
        mirrors: crate::mcp::params::Mirrors::default(),
        started: Instant::now(),
        config,
    });
    daemon
        .audit
        .record(daemon.event_by(
            &daemon_identity,
            "daemon.start",
            json!({
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "config": daemon.config.path,
                "programs": daemon.kernel.attachments,
            }),
        ))
        .await?;
    let starting = async {
        daemon
            .load_revocations()
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        daemon.sync_servers()?;
        for (index, cgroup) in daemon.config.tags.iter().enumerate() {
            let missing = config::normalize_cgroup_path(cgroup)
                .is_ok_and(|c| daemon.hierarchy.id(&c).is_err());
            if missing {
                daemon.tag_pending(cgroup)
            } else {
                daemon.tag(cgroup, &daemon_identity)
            }
            .map_err(|message| Error::Tag {
                path: daemon.config.path.display().to_string(),
                index,
                message,
            })?;
        }
        let accepting = proxy.start(&daemon)?;
        daemon.register_listener()?;
        Ok::<_, Error>(accepting)
    };
    let accepting = match starting.await {
        Ok(accepting) => accepting,
        Err(e) => {
            // Its start is on record: so is its end, and the programs forget its identity
            // (a later process with its pid would be exempt from redirection).
            daemon.stopped.store(true, Ordering::Relaxed);
            let _ = daemon.sync_block_state();
            daemon.workers.stop();
            let stop = json!({"pid": std::process::id(), "error": e.to_string()});
            daemon.record_stop(&daemon_identity, stop).await;
            return Err(e);
        }
    };
    for warning in daemon.config.warnings() {
        warn!("{warning}");
    }
    info!(
        port = daemon.listener.port4,
        port6 = daemon.listener.port6,
        cgroup_mount = %daemon.hierarchy.mount.display(),
        attach_cgroup = %daemon.config.daemon.cgroup_root,
        admin_socket = %daemon.config.daemon.admin_socket.display(),
        servers = daemon.config.servers.len(),
        tags = daemon.tags().len(),
        "interceptor ready"
    );
    on_ready();

    let socket_path = daemon.config.daemon.admin_socket.clone();
    let mut proxy_task = tokio::spawn(accepting);
    let mut admin_task = tokio::spawn(admin.run(daemon.clone()));
    let metrics_task = metrics_listener
        .map(|l| tokio::spawn(crate::metrics::serve(l, daemon.clone(), metrics_token)));
    let ns_task = tokio::spawn({
        let daemon = daemon.clone();
        async move {
            let mut cache = NetnsCache::default();
            loop {
                daemon.follow_tags();
                daemon.follow_revocations();
                daemon.refresh_namespaces(&mut cache).await;
                tokio::time::sleep(NAMESPACE_SCAN).await;
            }
        }
    });
    // Set when a part the daemon cannot serve without ended on its own: it still drains and
    // stops as for a signal, then exits with an error (a supervisor restarts it on failure).
    let mut failed: Option<&str> = None;
    loop {
        tokio::select! {
            _ = &mut proxy_task => {
                warn!("proxy listeners stopped");
                failed = Some("the proxy listeners stopped");
                break;
            }
            () = daemon.workers.failure() => {
                failed = Some("a connection worker panicked");
                break;
            }
            _ = &mut admin_task => {
                warn!("admin socket stopped");
                failed = Some("the admin socket stopped");
                break;
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                // Off this loop (a reload resolves names): a SIGTERM meanwhile is not held up.
                let by = daemon_identity.clone();
                drop(daemon.change(move |d| {
                    if let Err(e) = d.reload(&by) {
                        warn!(error = %e, "SIGHUP reload failed");
                    }
                }).await);
            }
        }
    }
    // Drain: stop accepting, refuse new tagged connects in the kernel (fail closed), let
    // in-flight requests finish up to the grace period.
    proxy_task.abort();
    ns_task.abort();
    daemon.unregister_listener();
    daemon.unregister_ns_listeners();
    daemon.draining.send_replace(true);
    let grace = daemon.config.daemon.drain_grace;
    let deadline = Instant::now() + grace;
    while daemon.counters.active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let left = daemon.counters.active.load(Ordering::Relaxed);
    if left > 0 {
        warn!(connections = left, grace = ?grace, "grace period over; closing the remaining connections");
    } else {
        info!("drained");
    }
    // Closes what is left (their tasks end with their workers' event loops).
    daemon.workers.stop();
    // Requests still waiting for a resumed stream: cancelled, recorded before daemon.stop.
    daemon.parked.cancel_all();
    // Forget the daemon's identity in the programs (a later process reusing the pid gets no
    // exemption); kept while draining, for the upstream connections of requests in flight.
    daemon.stopped.store(true, Ordering::Relaxed);
    let _ = daemon.sync_block_state();
    admin_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    // Admin requests and reloads still running finish first (held from here on: none starts).
    let held = tokio::time::timeout(CHANGES_AT_STOP, daemon.changes.clone().write_owned()).await;
    if held.is_err() {
        warn!(
            "an admin request or reload still runs after 10 s (a name lookup that does not \
             end?); stopping without it"
        );
    }
    daemon
        .record_stop(&daemon_identity, json!({"pid": std::process::id()}))
        .await;
    info!("stopped; programs, maps and tags stay pinned (interceptor uninstall removes them)");
    match failed {
        None => Ok(()),
        Some(what) => Err(Error::Stopped(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intercepted_addresses_cover_upstreams_and_loopback_aliases() {
        let config = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            r#"
[[server]]
name = "a"
intercept = ["127.0.0.1:8080"]
upstream = "127.0.0.3:9000"
[[server]]
name = "b"
intercept = ["[::1]:8081", "127.0.0.1:8081", "127.0.0.1:9000"]
upstream = "127.0.0.1:8081"
"#,
        )
        .unwrap();
        let map = intercepted(&config.servers);
        let at = |a: &str| map.get(&a.parse().unwrap()).copied();
        assert_eq!(at("127.0.0.1:8080"), Some(0));
        assert_eq!(at("0.0.0.0:8080"), Some(0));
        // [::]:8080 from a socket bound to a v4-mapped address goes to 127.0.0.1:8080.
        assert_eq!(at("[::]:8080"), Some(0));
        // a's upstream, dialled directly.
        assert_eq!(at("127.0.0.3:9000"), Some(0));
        // [::]:8081 is where an ordinary IPv6 socket reaches [::1]:8081.
        assert_eq!((at("[::]:8081"), at("0.0.0.0:8081")), (Some(1), Some(1)));
        // An intercept address keeps its server over another server's upstream.
        assert_eq!(at("127.0.0.1:9000"), Some(1));
        assert_eq!(map.len(), 11, "{map:?}");
        // An unspecified address configured stands for loopback (where the kernel sends it).
        let mut servers = config.servers.clone();
        servers[0].intercept = vec!["0.0.0.0:7001".parse().unwrap()];
        assert_eq!(
            intercepted(&servers).get(&"127.0.0.1:7001".parse().unwrap()),
            Some(&0)
        );
        // 0.0.0.0:P for every port, not only loopback's: from a socket bound to the address,
        // it reaches the server there.
        let mut servers = config.servers.clone();
        servers[1].intercept = vec!["127.0.0.2:7000".parse().unwrap()];
        assert_eq!(
            intercepted(&servers).get(&"0.0.0.0:7000".parse().unwrap()),
            Some(&1)
        );
        // An mTLS upstream's address is not: it refuses callers without a node certificate,
        // and may be shared with unrelated services.
        let mut servers = config.servers.clone();
        servers[0].tls = Some(crate::config::RawTls {
            ca: "ca.pem".into(),
            server_name: "notes".into(),
            server_id: None,
        });
        assert_eq!(
            intercepted(&servers).get(&"127.0.0.3:9000".parse().unwrap()),
            None
        );
        // Nor one the operator says shares its address.
        let mut servers = config.servers.clone();
        servers[0].intercept_upstream = false;
        assert_eq!(
            intercepted(&servers).get(&"127.0.0.3:9000".parse().unwrap()),
            None
        );
    }

    #[test]
    fn port_words_hold_each_port_once() {
        let words = port_words([0u16, 63, 64, 8080, 65535, 8080].into_iter());
        assert_eq!(words.len(), 1024);
        assert_eq!(words[0], 1 | 1 << 63);
        assert_eq!(words[1], 1);
        assert_eq!(words[8080 / 64], 1 << (8080 % 64));
        assert_eq!(words[1023], 1 << 63);
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 5);
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Start below the hard limit (this test process's own limit; restored below).
        let lower = (hard / 2).max(64).min(hard);
        setrlimit(Resource::RLIMIT_NOFILE, lower, hard).unwrap();
        let raised = raise_fd_limit().unwrap();
        assert!(raised > lower, "{raised} <= {lower}");
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (raised, hard));
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    }

    /// Namespaces `inos`, each with `procs` tagged processes in each of `cgroups`.
    fn seen(
        found: &mut std::collections::HashMap<u64, NsSeen>,
        inos: std::ops::Range<u64>,
        procs: usize,
        cgroups: &[&str],
    ) {
        for ino in inos {
            let entry = found.entry(ino).or_insert_with(|| NsSeen {
                pid: ino as u32,
                cgroups: Vec::new(),
                procs: 0,
            });
            entry.procs += procs;
            entry
                .cgroups
                .extend(cgroups.iter().map(std::path::PathBuf::from));
        }
    }

    fn picked(map: &std::collections::HashMap<u64, u32>) -> Vec<u64> {
        let mut v: Vec<u64> = map.keys().copied().collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn each_cgroup_gets_listeners_for_eight_namespaces_and_keeps_them() {
        let now = Instant::now();
        let mut cache = NetnsCache::default();
        let mut found = Default::default();
        // Ten in one cgroup: the eight with the most tagged processes.
        seen(&mut found, 1..11, 1, &["/a"]);
        seen(&mut found, 9..11, 5, &[]);
        let first = pick_namespaces(&HashSet::new(), &found, &mut cache, now);
        assert_eq!(picked(&first), [1, 2, 3, 4, 5, 6, 9, 10]);
        assert!(cache.crowded.contains(std::path::Path::new("/a")));
        // Served ones stay, whatever the ranking says now.
        seen(&mut found, 7..9, 9, &[]);
        let served: HashSet<u64> = first.keys().copied().collect();
        let again = pick_namespaces(&served, &found, &mut cache, now);
        assert_eq!(picked(&again), picked(&first));
        // One that lost its listener keeps its place while it waits; no other takes it.
        let mut served = served;
        served.remove(&3);
        cache.back_off(3, true);
        let waiting = pick_namespaces(&served, &found, &mut cache, now);
        assert_eq!(picked(&waiting), [1, 2, 4, 5, 6, 9, 10]);
        // Once its wait is over it is picked again (busier newcomers notwithstanding).
        let later = now + NAMESPACE_RETRY_MAX;
        let back = pick_namespaces(&served, &found, &mut cache, later);
        assert_eq!(picked(&back), picked(&first));
        assert!(!cache.crowded.is_empty());
        // One that never had a listener holds no place while it waits, and is tried again
        // once its wait is over.
        let mut cache = NetnsCache::default();
        cache.back_off(9, false);
        let without = pick_namespaces(&HashSet::new(), &found, &mut cache, now);
        assert!(!without.contains_key(&9));
        assert_eq!(without.len(), 8);
        let retried = pick_namespaces(&HashSet::new(), &found, &mut cache, later);
        assert!(retried.contains_key(&9));
    }

    #[test]
    fn a_namespace_in_several_cgroups_counts_in_each() {
        let now = Instant::now();
        let mut cache = NetnsCache::default();
        let mut found = Default::default();
        // /a has eight of its own (busier) and shares eight with /b: /a's are picked for /a
        // first (path order); /b's eight shared ones would put /a at sixteen, so /b gets
        // only its first (a cgroup with none gets one whatever the others hold).
        seen(&mut found, 1..9, 3, &["/a"]);
        seen(&mut found, 11..19, 1, &["/a", "/b"]);
        let picked_now = pick_namespaces(&HashSet::new(), &found, &mut cache, now);
        let mut expected: Vec<u64> = (1..9).collect();
        expected.push(11);
        assert_eq!(picked(&picked_now), expected);
    }

    #[test]
    fn namespace_lookups_are_cached_until_the_kernel_reports_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        std::fs::write(dir.path().join("cgroup.procs"), format!("{me}\n")).unwrap();
        let dirs = vec![dir.path().to_owned()];
        let real = netns_inode("self").unwrap();
        let mut cache = NetnsCache::default();
        let scan = |cache: &mut NetnsCache, counter: Option<u64>| {
            let (found, complete) = namespaces_under(&dirs, cache, |_| counter);
            assert!(complete);
            assert_eq!(found.len(), 1, "{found:?}");
            let (ino, seen) = found.into_iter().next().unwrap();
            assert_eq!(seen.pid, me);
            assert_eq!(seen.cgroups, [dir.path().to_owned()]);
            assert_eq!(seen.procs, 1);
            ino
        };
        assert_eq!(scan(&mut cache, Some(7)), real);
        assert_eq!(cache.known.get(&me), Some(&(7, real)));
        // Counter unchanged: no lookup (a planted inode is what the scan reports).
        cache.known.insert(me, (7, 12345));
        assert_eq!(scan(&mut cache, Some(7)), 12345);
        // The process execed or exited: looked up again.
        assert_eq!(scan(&mut cache, Some(8)), real);
        // Every NAMESPACE_FULL_SCAN-th scan looks up everything (setns/unshare move no counter).
        cache.known.insert(me, (8, 12345));
        cache.scans = NAMESPACE_FULL_SCAN * 3;
        assert_eq!(scan(&mut cache, Some(8)), real);
        // Without the counters nothing is cached.
        assert_eq!(scan(&mut cache, None), real);
        assert!(cache.known.is_empty());
        // A process gone from the cgroups is forgotten.
        scan(&mut cache, Some(9));
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        let (found, complete) = namespaces_under(&dirs, &mut cache, |_| Some(9));
        assert!(found.is_empty() && complete);
        assert!(cache.known.is_empty());
        // A cgroup removed meanwhile, or one whose processes cannot be listed (a threaded
        // cgroup refuses it), holds none: the scan is complete (only a shortage of
        // descriptors or memory leaves it incomplete, and keeps every listener).
        let removed = vec![dir.path().join("removed")];
        assert!(namespaces_under(&removed, &mut cache, |_| None).1);
        std::fs::remove_file(dir.path().join("cgroup.procs")).unwrap();
        std::fs::create_dir(dir.path().join("cgroup.procs")).unwrap();
        let (found, complete) = namespaces_under(&dirs, &mut cache, |_| None);
        assert!(found.is_empty() && complete);
    }
}
