//! Who dialed: the kernel's record (captured in `connect()`, in the caller's context) enriched
//! from `/proc` in userspace. aya has no CO-RE, so the kernel side does not walk `task_struct`;
//! everything beyond pid/uid/gid/comm/cgroup id is read here, and checked against the record so a
//! reused pid is reported rather than trusted.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use interceptor_common::{ConnRecord, exec_gen};
use serde::Serialize;

use crate::{
    bpf::lock,
    config::Naming,
    workload::{self, Placement, placement},
};

/// Whether the process that connected is still the one behind `pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Liveness {
    /// The process exists and started before the connect.
    Alive,
    /// `/proc/<pid>` is gone: the process exited before we looked.
    Exited,
    /// A process with that pid exists but started after the connect: the pid was reused, and
    /// the enrichment below (exe, cgroup path) is withheld.
    PidReused,
}

impl fmt::Display for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Liveness::Alive => "alive",
            Liveness::Exited => "exited",
            Liveness::PidReused => "pid-reused",
        })
    }
}

/// The identity of the process behind one redirected connection.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    /// Process id (thread-group id).
    pub pid: u32,
    /// Thread id that called `connect()`.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    /// cgroup v2 id at connect time.
    pub cgroup_id: u64,
    /// cgroup v2 path (relative to the mount), if the process could be inspected.
    pub cgroup: Option<String>,
    /// Executable path, if the process could be inspected.
    pub exe: Option<String>,
    /// Process start time, ns since boot (`/proc/<pid>/stat` field 22).
    pub start_time_ns: Option<u64>,
    pub liveness: Liveness,
    /// Network namespace cookie of the caller.
    pub netns_cookie: u64,
    /// The address the agent dialed.
    pub original_dst: SocketAddr,
    /// Container and pod, parsed from the cgroup path.
    pub placement: Placement,
    /// The stable workload id (from `[identity] workload_id`); none when the process could
    /// not be inspected (its cgroup path is unknown).
    pub workload_id: Option<String>,
}

/// What `/proc/<pid>` says about a process.
#[derive(Debug, Clone, Default)]
struct ProcFacts {
    /// Start time, ns since boot; `None`: the process is gone.
    start_time_ns: Option<u64>,
    exe: Option<String>,
    cgroup: Option<String>,
}

impl ProcFacts {
    /// Reads them for the process behind `record` from `proc_root` (normally `/proc`).
    /// With `cgroup_id` (the id of a cgroup path), only the cgroup the kernel saw at connect
    /// is kept: a process that moved since (its `/proc` shows another) is judged as of no
    /// cgroup, and by no executable (a `/proc` entry in another cgroup may not be the caller
    /// at all: a daemon outside the host's pid namespace reads another process under the same
    /// number).
    fn of(record: &ConnRecord, proc_root: &Path, cgroup_id: Option<CgroupIds<'_>>) -> Self {
        // Every file is read through one handle on the process's directory: if the process
        // exits and its number is taken by another meanwhile, the reads fail (the handle
        // stays the first process's) instead of mixing two processes' facts.
        let Ok(dir) = std::fs::File::open(proc_root.join(record.tgid.to_string())) else {
            return Self::default();
        };
        let mut facts = Self::read(&dir, record.connect_boot_ns);
        let connected_from = |f: &Self| match cgroup_id {
            Some(id) => f.cgroup.as_deref().and_then(id) == Some(record.cgroup_id),
            None => false,
        };
        let mut matched = connected_from(&facts);
        // The kernel recorded the cgroup of the thread that connected; in a threaded cgroup
        // subtree it is not the process's (the thread's own file says; read only then).
        if record.pid != record.tgid && facts.cgroup.is_some() && !matched {
            let task = format!("task/{}/cgroup", record.pid);
            if let Some(own) = read_proc(&dir, &task).ok().and_then(unified_path) {
                facts.cgroup = Some(own);
                matched = connected_from(&facts);
            }
        }
        if cgroup_id.is_some() && !matched {
            facts.cgroup = None;
            facts.exe = None;
        }
        facts
    }

    /// Reads them; exe and cgroup only from a process that started before `connect_boot_ns`
    /// (otherwise it is not the caller).
    fn read(dir: &std::fs::File, connect_boot_ns: u64) -> Self {
        // A process may give itself any name, and `stat` carries it: bytes that are not UTF-8
        // are replaced (the fields after the name are digits).
        let start_time_ns = read_proc(dir, "stat")
            .ok()
            .and_then(|stat| start_time_ticks(&String::from_utf8_lossy(&stat)))
            .map(ticks_to_ns);
        let mut facts = Self {
            start_time_ns,
            ..Self::default()
        };
        if liveness(start_time_ns, connect_boot_ns) == Liveness::Alive {
            // Paths that are not UTF-8 give no exe / no cgroup (and so no workload id), which
            // bindings never match: replaced bytes would let two paths share one identity.
            // Only in the daemon's user namespace: a process in one of its own (any process
            // may make one) may point its executable link at any file (`prctl(PR_SET_MM_MAP)`
            // asks for CAP_CHECKPOINT_RESTORE there, which it then has). Asked after the
            // link is read: a process can enter a user namespace, never leave one.
            let exe = nix::fcntl::readlinkat(dir, "exe").ok();
            facts.exe = exe
                .filter(|_| in_own_user_namespace(dir))
                .and_then(|p| p.into_string().ok());
            facts.cgroup = read_proc(dir, "cgroup").ok().and_then(unified_path);
        }
        facts
    }
}

/// The id of a cgroup path (its directory's inode), if it exists.
type CgroupIds<'a> = &'a dyn Fn(&str) -> Option<u64>;

/// Whether the process of `/proc` entry `dir` is in the daemon's user namespace.
fn in_own_user_namespace(dir: &std::fs::File) -> bool {
    static OWN: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
    let own = OWN.get_or_init(|| {
        std::fs::read_link("/proc/self/ns/user")
            .ok()
            .map(std::path::PathBuf::into_os_string)
    });
    own.is_some() && nix::fcntl::readlinkat(dir, "ns/user").ok() == *own
}

/// The cgroup v2 path in a `/proc/…/cgroup` file (its `0::` line), if it is UTF-8.
fn unified_path(bytes: Vec<u8>) -> Option<String> {
    String::from_utf8(bytes)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(|p| p.trim_end().to_owned()))
}

/// Reads a small `/proc` file in one `read(2)` and one that sees the end (`read_to_string`
/// asks `statx` for a length, which `/proc` reports as 0, then grows its buffer from 32 bytes:
/// eight syscalls for `stat`).
fn read_proc(dir: &std::fs::File, name: &str) -> std::io::Result<Vec<u8>> {
    use nix::{fcntl::OFlag, sys::stat::Mode};
    use std::io::Read;
    let fd = nix::fcntl::openat(dir, name, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut file = std::fs::File::from(fd);
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Whether a process that started at `start_time_ns` can have connected at `connect_boot_ns`.
fn liveness(start_time_ns: Option<u64>, connect_boot_ns: u64) -> Liveness {
    match start_time_ns {
        None => Liveness::Exited,
        // One tick of slack: start times are only tick-precise.
        Some(start) if start > connect_boot_ns.saturating_add(ticks_to_ns(1)) => {
            Liveness::PidReused
        }
        Some(_) => Liveness::Alive,
    }
}

/// How long a cached reading of `/proc` is used at most, even with no change reported: bounds
/// how long a renamed cgroup keeps its old path in identities.
const CACHE_TTL: Duration = Duration::from_secs(10);
/// Processes kept; beyond that, expired readings are dropped, or all of them.
const CACHE_CAPACITY: usize = 16_384;

/// Readings of `/proc` by (process id, cgroup id), each kept with the kernel's change counter
/// of its process slot as it was *before* the reading. A reading is used only while that
/// counter has not moved: the `proc_exec`/`proc_exit` tracepoints bump it when a process of the
/// slot execs (new executable) or one of its tasks exits (a process id is reused only after
/// its last task exits). A process that moves to another cgroup has another key, and a reading
/// is kept only if its cgroup path is the one the connection was made from.
#[derive(Default)]
pub struct ProcCache {
    entries: Mutex<HashMap<(u32, u64), Cached>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Cached {
    changes: u64,
    read_at: Instant,
    facts: ProcFacts,
}

/// Use counts of a [`ProcCache`], for status.
#[derive(Debug, Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
}

impl ProcCache {
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: lock(&self.entries).len(),
        }
    }

    /// The facts about the process behind `record`: cached while `changes` (the kernel's
    /// counter for the process's slot, `None` when unknown) stays put, read otherwise.
    /// `cgroup_id` gives the id of a cgroup path: a reading is kept only if its path is the
    /// cgroup the record was made in (a process that moved in between would otherwise leave
    /// its new path under the old cgroup's key; a move does not count as a change).
    fn facts(
        &self,
        record: &ConnRecord,
        proc_root: &Path,
        changes: impl Fn(u32) -> Option<u64>,
        cgroup_id: impl Fn(&str) -> Option<u64>,
    ) -> ProcFacts {
        // Only the cgroup the kernel saw at connect (no cgroup binding, no workload id for a
        // process that moved since, never the one it moved to; see `ProcFacts::of`).
        let read = || ProcFacts::of(record, proc_root, Some(&cgroup_id));
        let without_exe = |mut facts: ProcFacts| {
            facts.exe = None;
            facts
        };
        // Read before /proc: a change during the reading moves it past what is stored. With
        // no counter (the tracepoints could not be attached, or the map read failed) nothing
        // tells whether the process exec'd since the connect: no executable.
        let Some(before) = changes(record.tgid) else {
            return without_exe(read());
        };
        // An exec in the process's slot since the connect: the executable `/proc` shows may
        // not be the one that connected. Not a race to win by luck only: a socket with
        // `TCP_FASTOPEN_CONNECT` sends nothing (so reaches no proxy) until its first write,
        // which may come after the process has exec'd a binary that bindings trust.
        let exec_since_connect = |changes: u64| exec_gen(changes) != record.exec_gen;
        if exec_since_connect(before) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return without_exe(read());
        }
        let key = (record.tgid, record.cgroup_id);
        {
            let entries = lock(&self.entries);
            if let Some(c) = entries.get(&key)
                && c.changes == before
                && c.read_at.elapsed() < CACHE_TTL
            {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return c.facts.clone();
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let facts = read();
        // And after: an exec during the reading.
        if changes(record.tgid).is_none_or(exec_since_connect) {
            return without_exe(facts);
        }
        // Only a complete reading of a live process, in the cgroup it connected from.
        if facts.exe.is_some() && facts.cgroup.is_some() {
            let mut entries = lock(&self.entries);
            if entries.len() >= CACHE_CAPACITY {
                entries.retain(|_, c| c.read_at.elapsed() < CACHE_TTL);
                if entries.len() >= CACHE_CAPACITY {
                    entries.clear();
                }
            }
            entries.insert(
                key,
                Cached {
                    changes: before,
                    read_at: Instant::now(),
                    facts: facts.clone(),
                },
            );
        }
        facts
    }
}

impl Identity {
    /// Builds the identity for `record`, reading `/proc` under `proc_root`, with none of the
    /// kernel's change counters (tests of the reading itself; the daemon goes through
    /// [`Identity::from_record_cached`], which also tells an exec since the connect).
    #[cfg(test)]
    pub fn from_record(record: &ConnRecord, proc_root: &Path, naming: &Naming) -> Self {
        Self::build(record, ProcFacts::of(record, proc_root, None), naming)
    }

    /// Like [`Identity::from_record`], through `cache` (see [`ProcCache`]); `changes` reads the
    /// kernel's change counter of a process's slot, `cgroup_id` the id of a cgroup path.
    pub fn from_record_cached(
        record: &ConnRecord,
        proc_root: &Path,
        naming: &Naming,
        cache: &ProcCache,
        changes: impl Fn(u32) -> Option<u64>,
        cgroup_id: impl Fn(&str) -> Option<u64>,
    ) -> Self {
        let facts = cache.facts(record, proc_root, changes, cgroup_id);
        Self::build(record, facts, naming)
    }

    fn build(record: &ConnRecord, facts: ProcFacts, naming: &Naming) -> Self {
        let liveness = liveness(facts.start_time_ns, record.connect_boot_ns);
        // A cached reading is of the process alive now; the connect may predate it (pid reused).
        let (exe, cgroup) = if liveness == Liveness::Alive {
            (facts.exe, facts.cgroup)
        } else {
            (None, None)
        };
        let placement = cgroup.as_deref().map(placement).unwrap_or_default();
        let comm = record.comm().to_owned();
        let workload_id = cgroup.as_deref().and_then(|cgroup_path| {
            workload_id(
                naming,
                cgroup_path,
                (record.uid, record.gid),
                exe.as_deref(),
                &comm,
                &placement,
            )
        });
        Self {
            placement,
            workload_id,
            pid: record.tgid,
            tid: record.pid,
            uid: record.uid,
            gid: record.gid,
            comm,
            cgroup_id: record.cgroup_id,
            cgroup,
            exe,
            start_time_ns: facts.start_time_ns,
            liveness,
            netns_cookie: record.netns_cookie,
            original_dst: record.orig_dst.into(),
        }
    }
}

impl Identity {
    /// The `identity` object of audit events, as JSON text.
    pub fn audit_json(&self) -> String {
        AuditIdentity {
            kind: "agent",
            pid: Some(self.pid),
            tid: Some(self.tid),
            uid: self.uid,
            gid: self.gid,
            comm: &self.comm,
            exe: self.exe.as_deref(),
            cgroup: self.cgroup.as_deref(),
            cgroup_id: Some(self.cgroup_id),
            placement: &self.placement,
            workload_id: self.workload_id.as_deref(),
            process: Some(self.liveness),
        }
        .to_json()
    }
}

/// The workload id `[identity] workload_id` gives a process.
fn workload_id(
    naming: &Naming,
    cgroup_path: &str,
    (uid, gid): (u32, u32),
    exe: Option<&str>,
    comm: &str,
    placement: &Placement,
) -> Option<String> {
    workload::render(
        &naming.template,
        &workload::Fields {
            trust_domain: &naming.trust_domain,
            node: &naming.node,
            cgroup_path,
            uid,
            gid,
            exe: exe.unwrap_or(""),
            comm,
            container: placement.container.as_deref().unwrap_or(""),
            pod: placement.pod.as_deref().unwrap_or(""),
        },
    )
}

/// The `identity` object of audit events (docs/audit.md), for a connection's process and for
/// an [`Actor`] alike.
struct AuditIdentity<'a> {
    /// `agent`, `admin` or `daemon`.
    kind: &'static str,
    /// None: not known (an admin client in another pid namespace).
    pid: Option<u32>,
    tid: Option<u32>,
    uid: u32,
    gid: u32,
    comm: &'a str,
    exe: Option<&'a str>,
    cgroup: Option<&'a str>,
    cgroup_id: Option<u64>,
    placement: &'a Placement,
    workload_id: Option<&'a str>,
    /// None: not looked at (no pid).
    process: Option<Liveness>,
}

impl AuditIdentity<'_> {
    fn to_json(&self) -> String {
        serde_json::json!({
            "kind": self.kind,
            "pid": self.pid,
            "tid": self.tid,
            "uid": self.uid,
            "gid": self.gid,
            "comm": self.comm,
            "exe": self.exe,
            "cgroup": self.cgroup,
            "cgroup_id": self.cgroup_id,
            "container": self.placement.container,
            "runtime": self.placement.runtime,
            "pod": self.placement.pod,
            "qos": self.placement.qos,
            "workload_id": self.workload_id,
            "process": self.process,
        })
        .to_string()
    }
}

/// Who caused an audit event that no agent connection caused: the admin client behind a tag,
/// revocation or reload (its credentials from the admin socket), or the daemon itself (start,
/// stop, the config file's tags, a reload on SIGHUP, a repaired log).
#[derive(Debug, Clone, Copy)]
pub struct Actor {
    kind: ActorKind,
    /// None: not known (the kernel gives 0 for a peer outside the daemon's pid namespace).
    pid: Option<u32>,
    uid: u32,
    gid: u32,
    /// CLOCK_BOOTTIME (ns) when it was seen asking: a process with its pid that started later
    /// is another one (the pid was reused).
    seen_boot_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActorKind {
    Admin,
    Daemon,
}

impl Actor {
    /// This daemon.
    pub fn daemon() -> Self {
        Self {
            kind: ActorKind::Daemon,
            pid: Some(std::process::id()),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            // Its own pid cannot be reused while it runs.
            seen_boot_ns: u64::MAX,
        }
    }

    /// An admin client with these socket credentials, asking now.
    pub fn admin(pid: Option<i32>, uid: u32, gid: u32) -> Self {
        Self {
            kind: ActorKind::Admin,
            pid: pid.and_then(|p| u32::try_from(p).ok()).filter(|&p| p != 0),
            uid,
            gid,
            seen_boot_ns: boot_ns(),
        }
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The `identity` object of its audit events, as JSON text: the members of a connection's
    /// identity, read from `/proc` now (`tid` is the pid; `process` is `exited` when the
    /// process is already gone and `pid-reused` when its pid names a later process, both with
    /// no exe or cgroup; with no pid known, null). `cgroup_id` looks a cgroup path's id up.
    pub fn audit_json(
        &self,
        proc_root: &Path,
        naming: &Naming,
        cgroup_id: impl Fn(&str) -> Option<u64>,
    ) -> String {
        let (facts, comm, process) = match self.pid {
            Some(pid) => match std::fs::File::open(proc_root.join(pid.to_string())) {
                Ok(dir) => {
                    let facts = ProcFacts::read(&dir, self.seen_boot_ns);
                    let process = liveness(facts.start_time_ns, self.seen_boot_ns);
                    let comm = if process == Liveness::Alive {
                        read_proc(&dir, "comm")
                            .map(|b| String::from_utf8_lossy(&b).trim_end().to_owned())
                            .unwrap_or_default()
                    } else {
                        String::new()
                    };
                    (facts, comm, Some(process))
                }
                Err(_) => (ProcFacts::default(), String::new(), Some(Liveness::Exited)),
            },
            None => (ProcFacts::default(), String::new(), None),
        };
        let placement = facts.cgroup.as_deref().map(placement).unwrap_or_default();
        let workload_id = facts.cgroup.as_deref().and_then(|cgroup_path| {
            workload_id(
                naming,
                cgroup_path,
                (self.uid, self.gid),
                facts.exe.as_deref(),
                &comm,
                &placement,
            )
        });
        AuditIdentity {
            kind: match self.kind {
                ActorKind::Admin => "admin",
                ActorKind::Daemon => "daemon",
            },
            pid: self.pid,
            tid: self.pid,
            uid: self.uid,
            gid: self.gid,
            comm: &comm,
            exe: facts.exe.as_deref(),
            cgroup: facts.cgroup.as_deref(),
            cgroup_id: facts.cgroup.as_deref().and_then(cgroup_id),
            placement: &placement,
            workload_id: workload_id.as_deref(),
            process,
        }
        .to_json()
    }
}

/// CLOCK_BOOTTIME now, ns: the clock of `/proc/<pid>/stat` start times and of the kernel's
/// connect records.
fn boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        })
        // No clock: no reuse check (as before there was one).
        .unwrap_or(u64::MAX)
}

/// Field 22 (`starttime`, clock ticks since boot) of a `/proc/<pid>/stat` line. `comm` (field 2)
/// may contain spaces and parentheses, so fields are counted after its last `)`.
fn start_time_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3 (state), 4, ...; field 22 is the 20th of them.
    after.split_whitespace().nth(19)?.parse().ok()
}

fn ticks_to_ns(ticks: u64) -> u64 {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&v| v > 0)
        .unwrap_or(100) as u64;
    ticks.saturating_mul(1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_hostile_comm() {
        let stat = "4242 (evil) (x y) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time_ticks(stat), Some(987654));
        assert_eq!(start_time_ticks("garbage"), None);
    }

    fn record_for_self(connect_boot_ns: u64) -> ConnRecord {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"test");
        ConnRecord {
            tgid: std::process::id(),
            pid: std::process::id(),
            connect_boot_ns,
            comm,
            orig_dst: "127.0.0.2:8080".parse::<SocketAddr>().unwrap().into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_actor_is_described_like_a_connection_from_proc() {
        let read = |actor: Actor| -> serde_json::Value {
            serde_json::from_str(&actor.audit_json(Path::new("/proc"), &naming(), |_| Some(42)))
                .unwrap()
        };
        let me = std::process::id();
        let json = read(Actor::daemon());
        assert_eq!(json["kind"], "daemon");
        assert_eq!(json["pid"], me);
        assert_eq!(json["tid"], me);
        assert_eq!(json["uid"], nix::unistd::getuid().as_raw());
        assert_eq!(json["process"], "alive");
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(json["comm"], comm.trim_end());
        assert_eq!(
            json["exe"],
            std::env::current_exe().unwrap().to_str().unwrap()
        );
        assert!(
            json["cgroup"].as_str().is_some_and(|c| c.starts_with('/')),
            "{json}"
        );
        assert_eq!(json["cgroup_id"], 42);
        assert!(json["workload_id"].is_string(), "{json}");
        // An admin client that asked now: the same, as admin.
        let admin = read(Actor::admin(Some(me as i32), 0, 0));
        assert_eq!(admin["kind"], "admin");
        assert_eq!(
            (&admin["exe"], &admin["process"]),
            (&json["exe"], &json["process"])
        );
        // Gone, or its pid taken by a process that started after it asked: said so, nothing
        // of the other process taken.
        let gone = read(Actor::admin(Some(i32::MAX - 1), 0, 0));
        assert_eq!(gone["process"], "exited");
        assert!(gone["exe"].is_null() && gone["cgroup"].is_null() && gone["workload_id"].is_null());
        let mut earlier = Actor::admin(Some(me as i32), 0, 0);
        earlier.seen_boot_ns = 0;
        let reused = read(earlier);
        assert_eq!(reused["process"], "pid-reused");
        assert!(reused["exe"].is_null() && reused["comm"] == "", "{reused}");
        // A peer in another pid namespace (the kernel gives pid 0): no pid, nothing looked up.
        let unknown = read(Actor::admin(Some(0), 0, 0));
        assert!(
            unknown["pid"].is_null() && unknown["process"].is_null(),
            "{unknown}"
        );
        assert!(unknown["exe"].is_null(), "{unknown}");
    }

    fn naming() -> Naming {
        Naming {
            trust_domain: "example.org".into(),
            node: "n1".into(),
            template: workload::DEFAULT_TEMPLATE.into(),
            assertion_header: "interceptor-identity".into(),
            assertion_ttl: std::time::Duration::from_secs(60),
        }
    }

    #[test]
    fn own_process_is_alive_and_enriched() {
        let id = Identity::from_record(
            &record_for_self(u64::MAX / 2),
            Path::new("/proc"),
            &naming(),
        );
        assert_eq!(id.liveness, Liveness::Alive);
        assert!(id.exe.is_some());
        assert!(id.cgroup.as_deref().is_some_and(|c| c.starts_with('/')));
        assert_eq!(id.original_dst, "127.0.0.2:8080".parse().unwrap());
        assert_eq!(id.comm, "test");
        let wid = id.workload_id.expect("workload id");
        assert!(
            wid.starts_with("spiffe://example.org/node/n1/cgroup/"),
            "{wid}"
        );
        assert!(wid.ends_with(&format!("/uid/{}", id.uid)), "{wid}");
    }

    #[test]
    fn a_process_younger_than_the_connect_is_a_reused_pid() {
        // Connect "happened" at boot: our process started later, so the pid cannot be the caller.
        let id = Identity::from_record(&record_for_self(0), Path::new("/proc"), &naming());
        assert_eq!(id.liveness, Liveness::PidReused);
        assert!(id.exe.is_none() && id.cgroup.is_none());
    }

    /// A fake `/proc/<tgid>` with start time tick 100, `exe` → `exe` and cgroup `cgroup`.
    fn opened(dir: &Path) -> std::fs::File {
        std::fs::File::open(dir).unwrap()
    }

    fn fake_proc(root: &Path, tgid: u32, exe: &str, cgroup: &str) {
        let dir = root.join(tgid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let stat = format!("{tgid} (agent) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0");
        std::fs::write(dir.join("stat"), stat).unwrap();
        let _ = std::fs::remove_file(dir.join("exe"));
        std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
        std::fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        let _ = std::fs::remove_file(dir.join("ns/user"));
        let own = std::fs::read_link("/proc/self/ns/user").unwrap();
        std::os::unix::fs::symlink(own, dir.join("ns/user")).unwrap();
    }

    #[test]
    fn a_thread_is_judged_by_the_cgroup_it_connected_from() {
        let root = tempfile::tempdir().unwrap();
        let mut record = record_for_self(u64::MAX / 2);
        (record.tgid, record.pid) = (4247, 4250);
        fake_proc(root.path(), 4247, "/usr/bin/agent", "/agents/a");
        let task = root.path().join("4247/task/4250");
        std::fs::create_dir_all(&task).unwrap();
        std::fs::write(task.join("cgroup"), "0::/agents/a/worker\n").unwrap();
        let ids = |path: &str| match path {
            "/agents/a" => Some(7),
            "/agents/a/worker" => Some(8),
            _ => None,
        };
        // A threaded subtree: the thread connected from its own cgroup.
        record.cgroup_id = 8;
        let facts = ProcFacts::of(&record, root.path(), Some(&ids));
        assert_eq!(facts.cgroup.as_deref(), Some("/agents/a/worker"));
        // From the process's cgroup: that one (the thread's file is not read).
        record.cgroup_id = 7;
        std::fs::remove_file(task.join("cgroup")).unwrap();
        let facts = ProcFacts::of(&record, root.path(), Some(&ids));
        assert_eq!(facts.cgroup.as_deref(), Some("/agents/a"));
        assert_eq!(facts.exe.as_deref(), Some("/usr/bin/agent"));
        // From neither (moved since): no cgroup, no executable.
        record.cgroup_id = 9;
        let facts = ProcFacts::of(&record, root.path(), Some(&ids));
        assert_eq!((facts.cgroup, facts.exe), (None, None));
    }

    #[test]
    fn every_fact_comes_from_the_process_first_opened() {
        // Its number taken by another process between two reads (here: the entry replaced
        // after the handle was opened): the reads stay with the first.
        let root = tempfile::tempdir().unwrap();
        fake_proc(root.path(), 4248, "/usr/bin/agent", "/agents/a");
        let dir = opened(&root.path().join("4248"));
        std::fs::rename(root.path().join("4248"), root.path().join("gone")).unwrap();
        fake_proc(root.path(), 4248, "/usr/bin/trusted", "/ops");
        let facts = ProcFacts::read(&dir, u64::MAX / 2);
        assert_eq!(facts.exe.as_deref(), Some("/usr/bin/agent"));
        assert_eq!(facts.cgroup.as_deref(), Some("/agents/a"));
    }

    #[test]
    fn a_process_in_a_user_namespace_of_its_own_has_no_executable() {
        let root = tempfile::tempdir().unwrap();
        fake_proc(root.path(), 4246, "/usr/bin/trusted", "/agents/a");
        let dir = root.path().join("4246");
        assert_eq!(
            ProcFacts::read(&opened(&dir), u64::MAX / 2).exe.as_deref(),
            Some("/usr/bin/trusted")
        );
        std::fs::remove_file(dir.join("ns/user")).unwrap();
        std::os::unix::fs::symlink("user:[4026532999]", dir.join("ns/user")).unwrap();
        let facts = ProcFacts::read(&opened(&dir), u64::MAX / 2);
        assert_eq!(facts.exe, None);
        assert_eq!(facts.cgroup.as_deref(), Some("/agents/a"));
    }

    #[test]
    fn a_name_that_is_not_utf8_is_read_a_path_that_is_not_is_not_guessed() {
        use std::os::unix::ffi::OsStrExt;
        let root = tempfile::tempdir().unwrap();
        fake_proc(root.path(), 4242, "/usr/bin/agent", "/agents/a");
        let stat = root.path().join("4242/stat");
        std::fs::write(
            &stat,
            b"4242 (ag\xff\xfe) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0",
        )
        .unwrap();
        let facts = ProcFacts::read(&opened(&root.path().join("4242")), u64::MAX / 2);
        assert_eq!(facts.start_time_ns, Some(ticks_to_ns(100)));
        assert_eq!(facts.exe.as_deref(), Some("/usr/bin/agent"));
        assert_eq!(facts.cgroup.as_deref(), Some("/agents/a"));
        // Paths that are not UTF-8 are not guessed at.
        std::fs::write(root.path().join("4242/cgroup"), b"0::/agents/a\xff\n").unwrap();
        let exe = root.path().join("4242/exe");
        std::fs::remove_file(&exe).unwrap();
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(b"/usr/bin/ag\xffent"), &exe)
            .unwrap();
        let facts = ProcFacts::read(&opened(&root.path().join("4242")), u64::MAX / 2);
        assert_eq!(facts.cgroup, None);
        assert_eq!(facts.exe, None);
        assert!(facts.start_time_ns.is_some());
    }

    #[test]
    fn the_cache_serves_a_process_until_the_kernel_reports_a_change() {
        let root = tempfile::tempdir().unwrap();
        let mut record = record_for_self(u64::MAX / 2);
        record.tgid = 4242;
        record.cgroup_id = 7;
        fake_proc(root.path(), 4242, "/usr/bin/agent", "/agents/a");
        let cache = ProcCache::default();
        let id = |record: &ConnRecord, changes: Option<u64>| {
            Identity::from_record_cached(
                record,
                root.path(),
                &naming(),
                &cache,
                |tgid| {
                    assert_eq!(tgid, 4242);
                    changes
                },
                |path| (path == "/agents/a").then_some(record.cgroup_id),
            )
        };
        assert_eq!(id(&record, Some(3)).exe.as_deref(), Some("/usr/bin/agent"));
        // The process execs: /proc says so at once, the cache until the counter moves.
        fake_proc(root.path(), 4242, "/tmp/other", "/agents/a");
        let cached = id(&record, Some(3));
        assert_eq!(cached.exe.as_deref(), Some("/usr/bin/agent"));
        assert_eq!(cached.cgroup.as_deref(), Some("/agents/a"));
        assert_eq!(cached.liveness, Liveness::Alive);
        assert_eq!(id(&record, Some(4)).exe.as_deref(), Some("/tmp/other"));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 2, 1));
        // No counter (tracepoints missing, map unreadable): always read, never cached, and
        // no executable (an exec since the connect could not be told).
        fake_proc(root.path(), 4242, "/usr/bin/third", "/agents/a");
        let uncounted = id(&record, None);
        assert_eq!(uncounted.exe, None);
        assert_eq!(uncounted.cgroup.as_deref(), Some("/agents/a"));
        assert_eq!(cache.stats().hits, 1);
        // Another cgroup id is another key.
        let mut moved = record;
        moved.cgroup_id = 8;
        assert_eq!(id(&moved, Some(4)).exe.as_deref(), Some("/usr/bin/third"));
        assert_eq!(cache.stats().entries, 2);
    }

    #[test]
    fn an_exec_since_the_connect_withholds_the_executable() {
        let root = tempfile::tempdir().unwrap();
        let mut record = record_for_self(u64::MAX / 2);
        record.tgid = 4245;
        record.cgroup_id = 7;
        record.exec_gen = 2;
        fake_proc(root.path(), 4245, "/usr/bin/trusted", "/agents/a");
        let cache = ProcCache::default();
        let exec = interceptor_common::PROC_EXEC_STEP;
        let at_a = |path: &str| (path == "/agents/a").then_some(7);
        // The counters the daemon reads, in turn (before and after the reading of /proc).
        let id = |seen: &[Option<u64>]| {
            let seen = std::cell::RefCell::new(seen.iter().copied());
            Identity::from_record_cached(
                &record,
                root.path(),
                &naming(),
                &cache,
                |_| seen.borrow_mut().next().flatten(),
                at_a,
            )
        };
        // The connecting image execs before the proxy reads /proc: whatever /proc names now
        // did not connect.
        let id_now = id(&[Some(3 * exec + 5)]);
        assert_eq!(id_now.exe, None);
        assert_eq!(id_now.cgroup.as_deref(), Some("/agents/a"));
        // An exec while /proc is read.
        assert_eq!(id(&[Some(2 * exec + 5), Some(3 * exec + 5)]).exe, None);
        assert_eq!(id(&[Some(2 * exec + 5), None]).exe, None);
        assert_eq!(cache.stats().entries, 0);
        // Task exits (the low half) change nothing of that: the executable is named, cached.
        assert_eq!(
            id(&[Some(2 * exec + 5), Some(2 * exec + 5)]).exe.as_deref(),
            Some("/usr/bin/trusted")
        );
        assert_eq!(
            id(&[Some(2 * exec + 5)]).exe.as_deref(),
            Some("/usr/bin/trusted")
        );
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.entries), (1, 1));
        // A cached reading is not served past an exec since the connect either.
        assert_eq!(id(&[Some(3 * exec + 5)]).exe, None);
    }

    #[test]
    fn a_process_that_moved_after_connecting_has_no_cgroup_and_is_not_cached() {
        let root = tempfile::tempdir().unwrap();
        let mut record = record_for_self(u64::MAX / 2);
        record.tgid = 4244;
        record.cgroup_id = 7;
        // Connected from cgroup 7; /proc already shows its new cgroup (id 8).
        fake_proc(root.path(), 4244, "/usr/bin/agent", "/agents/b");
        let cache = ProcCache::default();
        for _ in 0..2 {
            let id = Identity::from_record_cached(
                &record,
                root.path(),
                &naming(),
                &cache,
                |_| Some(1),
                |path| (path == "/agents/b").then_some(8),
            );
            // Not the cgroup it moved to: judged as of no cgroup and no executable (no
            // binding matches).
            assert_eq!(id.cgroup, None);
            assert_eq!(id.workload_id, None);
            assert_eq!(id.exe, None);
        }
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (0, 2, 0));
    }

    #[test]
    fn a_cached_process_younger_than_the_connect_is_still_a_reused_pid() {
        let root = tempfile::tempdir().unwrap();
        let mut record = record_for_self(u64::MAX / 2);
        record.tgid = 4243;
        fake_proc(root.path(), 4243, "/usr/bin/agent", "/agents/a");
        let cache = ProcCache::default();
        let changes = |_| Some(1);
        let at_a = |_: &str| Some(0);
        let id =
            Identity::from_record_cached(&record, root.path(), &naming(), &cache, changes, at_a);
        assert_eq!(id.liveness, Liveness::Alive);
        // A connect recorded before that process started (start tick 100) is not its own.
        record.connect_boot_ns = 0;
        let id =
            Identity::from_record_cached(&record, root.path(), &naming(), &cache, changes, at_a);
        assert_eq!(id.liveness, Liveness::PidReused);
        assert!(id.exe.is_none() && id.cgroup.is_none() && id.workload_id.is_none());
        assert_eq!(cache.stats().hits, 1);
    }

    #[test]
    fn a_vanished_process_is_exited() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::from_record(&record_for_self(1), dir.path(), &naming());
        assert_eq!(id.liveness, Liveness::Exited);
    }
}
