//! The kernel side as the daemon sees it: load the embedded object, attach its programs once at
//! the configured cgroup, pin maps and links under bpffs (so a restart re-adopts them instead of
//! attaching twice, and tags survive), and typed handles on the maps.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, RawTracePoint, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use interceptor_common::{
    BlockKey, BlockValue, ConnRecord, ListenKey, Listener, ServerValue, State, TagValue, TupleKey,
    maps as names, programs, stats,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::cgroup::{self, Hierarchy};

/// The eBPF object built by `build.rs` from `interceptor-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

/// Where bpffs is normally mounted; mounted there on demand.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Errors setting up or using the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `bpffs_dir` is not on a bpf filesystem and none could be mounted.
    #[error(
        "{dir} is not on a bpf filesystem ({message}); mount one with `mount -t bpf bpf {BPFFS_MOUNT}` \
         or set daemon.bpffs_dir to a folder under a bpffs mount"
    )]
    Bpffs { dir: PathBuf, message: String },
    /// A file or folder under bpffs could not be created or removed.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },

    #[error(
        "{dir} is in use by another interceptor daemon (it holds the lock on its pins); stop \
         that daemon first (to run a second one beside it, give it its own daemon.bpffs_dir)"
    )]
    PinsInUse { dir: PathBuf },

    #[error(
        "{dir}: {message}; the pins decide what is intercepted and revoked, so only root may \
         write there: remove it (interceptor uninstall) or fix its owner and mode"
    )]
    PinsUnsafe { dir: PathBuf, message: String },
    /// Another interceptor's programs already run for the connects this one would redirect.
    #[error(
        "another interceptor daemon's connect program (program id {ids}) already runs for the \
         connects of processes in {cgroup} (attached {attached}, with other pins than {dir}): \
         two daemons would both redirect those connections. Stop that daemon and remove its \
         programs (`interceptor uninstall --config <its config>`), or give this one a \
         daemon.cgroup_root outside that daemon's (and the same daemon.bpffs_dir to run it in \
         its place)"
    )]
    Foreign {
        cgroup: String,
        /// Where: "there or above", or the cgroup below it.
        attached: String,
        dir: PathBuf,
        ids: String,
    },
    /// The object could not be loaded (maps created or opened from their pins).
    #[error(
        "loading the eBPF object failed: {0}; interceptor needs root (CAP_BPF, CAP_NET_ADMIN) on \
         Linux >= 6.1 with BTF"
    )]
    Load(Box<aya::EbpfError>),
    /// A program could not be loaded into the kernel or attached.
    #[error("program {name}: {error}{hint}")]
    Program {
        name: &'static str,
        error: Box<ProgramError>,
        /// What to do about it, when the kernel's version says (see [`older_kernel_hint`]).
        hint: &'static str,
    },
    /// A link's kernel details could not be read.
    #[error("program {name}: link: {message}")]
    Link { name: &'static str, message: String },
    /// A link could not be pinned.
    #[error("pinning link {path}: {message}")]
    Pin { path: PathBuf, message: String },
    /// A map operation failed.
    #[error("map {name}: {error}")]
    Map {
        name: &'static str,
        error: Box<MapError>,
    },
    /// The attach cgroup is unusable.
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |e| Error::Map {
        name,
        error: Box::new(e),
    }
}

/// One attached program, as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub program: &'static str,
    pub link_id: u32,
    pub program_id: u32,
    /// True when the link was found pinned from an earlier run and kept.
    pub adopted: bool,
}

/// A raw tracepoint program attached for as long as the daemon runs, as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Tracepoint {
    pub program: &'static str,
    pub tracepoint: &'static str,
    pub link_id: u32,
    pub program_id: u32,
}

/// The loaded kernel side: links held open, maps ready for use.
pub struct Kernel {
    pub attachments: Vec<Attachment>,
    /// The process-change tracepoints; empty when they could not be attached (the identity
    /// cache is then off and every connection reads `/proc`).
    pub tracepoints: Vec<Tracepoint>,
    // Holding the links keeps them alive even if someone removes the pins meanwhile.
    _links: Vec<FdLink>,
    /// Per-slot change counters of processes, bumped by the tracepoints; `None` without them.
    proc_changes: Option<Array<MapData, u64>>,
    /// When (CLOCK_BOOTTIME, ns) the process-change tracepoints were attached: a record of a
    /// connect before then (a socket whose SYN waited across a restart, or a connect while
    /// this daemon was starting) carries an exec count no tracepoint of this daemon kept.
    tracking_since_ns: u64,
    pub tags: Mutex<HashMap<MapData, u64, TagValue>>,
    pub servers: Mutex<HashMap<MapData, interceptor_common::Addr, ServerValue>>,
    /// The ports of `servers` (see [`interceptor_common::maps::PORTS`]).
    pub ports: Mutex<Array<MapData, u64>>,
    pub listeners: Mutex<HashMap<MapData, u64, Listener>>,
    /// The proxy's listening sockets; the kernel redirects only to one that is in here.
    listen_socks: Mutex<SockHash<MapData, ListenKey>>,
    conns: TupleRecords,
    /// The same map through a second descriptor, for walks (see [`Kernel::drop_conns`]).
    conns_walk: Mutex<HashMap<MapData, TupleKey, ConnRecord>>,
    /// Records by socket cookie, from `connect*` to the handshake (walked: the fill, and a
    /// previous daemon's dropped at start).
    socks: Mutex<HashMap<MapData, u64, ConnRecord>>,
    pub blocks: Mutex<HashMap<MapData, BlockKey, BlockValue>>,
    pub state: Mutex<Array<MapData, State>>,
    stats: PerCpuArray<MapData, u64>,
    pub bpffs_dir: PathBuf,
    /// The exclusive lock on `bpffs_dir`, held for the daemon's life: one daemon per pins.
    _pins_lock: nix::fcntl::Flock<std::fs::File>,
}

/// Locks a map handle. A poisoned lock only means another task panicked mid-call; the map
/// itself lives in the kernel and is still consistent.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Kernel {
    /// Loads the object with its maps pinned under `bpffs_dir` (reusing existing pins) and makes
    /// sure each program is attached exactly once at `attach_cgroup` of `hierarchy`.
    pub fn install(
        bpffs_dir: &Path,
        hierarchy: &Hierarchy,
        attach_cgroup: &str,
    ) -> Result<Self, Error> {
        ensure_bpffs(bpffs_dir)?;
        let links_dir = bpffs_dir.join("links");
        refuse_foreign(bpffs_dir, &links_dir, hierarchy, attach_cgroup)?;

        for dir in [bpffs_dir, links_dir.as_path()] {
            // Root only, whatever the umask (the folder is checked below).
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|error| Error::Io {
                    path: dir.to_owned(),
                    error,
                })?;
        }
        let pins_lock = lock_pins(bpffs_dir, &links_dir)?;
        // The loader takes a pinned map as it is: an older daemon's counter map, with fewer
        // counters than this one's programs write, would never count the new ones. Replaced
        // (its counts start again); the programs still using it are replaced below.
        let stats_pin = bpffs_dir.join(names::STATS);
        if aya::maps::MapInfo::from_pin(&stats_pin).is_ok_and(|m| m.max_entries() < stats::COUNT) {
            info!(pin = %stats_pin.display(), "replacing an older daemon's counter map");
            std::fs::remove_file(&stats_pin).map_err(|error| Error::Io {
                path: stats_pin.clone(),
                error,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs_dir)
            .load(OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        open_every_port(&mut ebpf)?;

        let mut attachments = Vec::new();
        let mut links = Vec::new();
        // A connect program left running from an earlier daemon reads that daemon's process
        // change counters (not pinned: gone with it), never this one's.
        let mut stale_connect = false;
        // A sock_ops program left from an earlier daemon drops a dying connection's tuple
        // record only while the socket's own record is there, which `sock_release` removes
        // at `close()`: the two go together.
        let mut stale_sock_ops = false;
        for name in programs::ALL {
            let pin = links_dir.join(name);
            if name == programs::SOCK_RELEASE && stale_sock_ops {
                warn!(
                    "not attaching sock_release beside the earlier daemon's sock_ops program \
                     (its replacement failed, above); `interceptor uninstall` and a start \
                     attach this binary's programs"
                );
                if let Ok(link) = PinnedLink::from_pin(&pin) {
                    // Detached when dropped.
                    let _ = link.unpin();
                }
                continue;
            }
            let (link, adopted) = match adopt(&pin) {
                Some(link) => {
                    // This binary's program replaces the one the link runs (an upgrade takes
                    // effect at restart, with no moment without a program: the kernel swaps it).
                    if let Err(e) = replace_program(&mut ebpf, name, &pin) {
                        stale_connect |= matches!(name, programs::CONNECT4 | programs::CONNECT6);
                        stale_sock_ops |= name == programs::SOCK_OPS;
                        warn!(program = name, error = %e,
                            "cannot replace the program of the pinned link; it keeps running the \
                             program of the daemon that attached it (`interceptor uninstall` \
                             and a start attach this one)");
                    }
                    (link, true)
                }
                None => {
                    let cgroup = hierarchy.open(attach_cgroup)?;
                    (attach(&mut ebpf, name, cgroup, &pin)?, false)
                }
            };
            let info = link.info().map_err(|e| Error::Pin {
                path: pin.clone(),
                message: e.to_string(),
            })?;
            attachments.push(Attachment {
                program: name,
                link_id: info.id(),
                program_id: info.program_id(),
                adopted,
            });
            links.push(link);
        }

        let tracked = if stale_connect {
            Err(Error::Link {
                name: programs::CONNECT4,
                message: "a connect program of an earlier daemon still runs (its replacement \
                          failed, above): what it records of an exec is not counted where \
                          this daemon reads"
                    .into(),
            })
        } else {
            track_processes(&mut ebpf, &mut links)
        };
        let tracking_since_ns = boot_time_ns();
        let (tracepoints, proc_changes) = match tracked {
            Ok((tracepoints, map)) => (tracepoints, Some(map)),
            Err(e) => {
                warn!(
                    error = %e,
                    "the process-change tracepoints could not be attached: identities carry no \
                     executable (an exec since the connect could not be told), so no `exe` \
                     binding matches; the identity cache is off (every connection reads /proc)"
                );
                (Vec::new(), None)
            }
        };
        let mut take = |name| take_map(&mut ebpf, name);
        let tags = take(names::TAGS)?;
        let servers = take(names::SERVERS)?;
        let ports = take(names::PORTS)?;
        let listeners = take(names::LISTENERS)?;
        let listen_socks = take(names::LISTEN_SOCKS)?;
        let conns = take(names::CONNS)?;
        let socks = take(names::SOCKS)?;
        // A second handle on the records, from their pin: walked (a closed listener's records
        // dropped, the fill counted) without holding up `take_conn` on every accept.
        let conns_walk = aya::maps::MapData::from_pin(bpffs_dir.join(names::CONNS))
            .map_err(map_err(names::CONNS))?;
        let stats_map = take(names::STATS)?;
        let blocks = take(names::BLOCKS)?;
        let state = take(names::STATE)?;
        let kernel = Self {
            attachments,
            tracepoints,
            _links: links,
            proc_changes,
            tracking_since_ns,
            tags: Mutex::new(HashMap::try_from(tags).map_err(map_err(names::TAGS))?),
            servers: Mutex::new(HashMap::try_from(servers).map_err(map_err(names::SERVERS))?),
            ports: Mutex::new(Array::try_from(ports).map_err(map_err(names::PORTS))?),
            listeners: Mutex::new(HashMap::try_from(listeners).map_err(map_err(names::LISTENERS))?),
            listen_socks: Mutex::new(
                SockHash::try_from(listen_socks).map_err(map_err(names::LISTEN_SOCKS))?,
            ),
            conns: TupleRecords::new(conns)?,
            conns_walk: Mutex::new(
                HashMap::try_from(aya::maps::Map::HashMap(conns_walk))
                    .map_err(map_err(names::CONNS))?,
            ),
            socks: Mutex::new(HashMap::try_from(socks).map_err(map_err(names::SOCKS))?),
            blocks: Mutex::new(HashMap::try_from(blocks).map_err(map_err(names::BLOCKS))?),
            state: Mutex::new(Array::try_from(state).map_err(map_err(names::STATE))?),
            stats: PerCpuArray::try_from(stats_map).map_err(map_err(names::STATS))?,
            bpffs_dir: bpffs_dir.to_owned(),
            _pins_lock: pins_lock,
        };
        // Listener entries of a previous daemon (a crash leaves them; a graceful stop removes
        // them): this daemon registers its own, and the scan those of the namespaces it serves.
        // Kept, those of namespaces gone meanwhile would fill the map for good.
        let stale = kernel.drop_listeners();
        if stale > 0 {
            info!(
                entries = stale,
                "dropped listener entries of a previous daemon"
            );
        }
        // Records of connections a previous daemon never accepted (reset with its listener)
        // name no live connection; this daemon's listeners are not registered yet, so none
        // is new. Kept, one could be claimed by a process dialling the proxy port directly
        // from the same source port.
        let stale = kernel.drop_conns(|_| true);
        if stale > 0 {
            info!(records = stale, "dropped connection records no daemon took");
        }
        // Likewise the records of sockets that had not started their handshake (a
        // `TCP_FASTOPEN_CONNECT` one before its first write, one disconnected with
        // `AF_UNSPEC`): they name servers by their place in the previous daemon's
        // configuration, which may have changed. Such a socket's connection is then refused
        // (no record), as one no daemon accepted.
        let stale = kernel.drop_socks();
        if stale > 0 {
            info!(
                records = stale,
                "dropped socket records of a previous daemon"
            );
        }
        Ok(kernel)
    }

    /// Kernel counters summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        (0..stats::COUNT)
            .map(|i| {
                let total = self
                    .stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (stats::NAMES[i as usize], total)
            })
            .collect()
    }

    /// Entries in each map, for status.
    pub fn map_fill(&self) -> Vec<(&'static str, usize, u32)> {
        use interceptor_common::capacity;
        vec![
            (names::TAGS, lock(&self.tags).keys().count(), capacity::TAGS),
            (
                names::SERVERS,
                lock(&self.servers).keys().count(),
                capacity::SERVERS,
            ),
            (
                names::PORTS,
                // Ports set, of 65,536.
                lock(&self.ports)
                    .iter()
                    .filter_map(Result::ok)
                    .map(|word| word.count_ones() as usize)
                    .sum(),
                capacity::PORT_WORDS * 64,
            ),
            (
                names::LISTENERS,
                lock(&self.listeners).keys().count(),
                capacity::LISTENERS,
            ),
            (
                names::LISTEN_SOCKS,
                lock(&self.listen_socks).keys().count(),
                capacity::LISTEN_SOCKS,
            ),
            (
                names::SOCKS,
                lock(&self.socks)
                    .keys()
                    .count()
                    .min(capacity::SOCKS as usize),
                capacity::SOCKS,
            ),
            (
                names::CONNS,
                // A record taken meanwhile may restart the walk: never more than the map holds.
                lock(&self.conns_walk)
                    .keys()
                    .count()
                    .min(capacity::CONNS as usize),
                capacity::CONNS,
            ),
            (
                names::BLOCKS,
                lock(&self.blocks).keys().count(),
                capacity::BLOCKS,
            ),
        ]
    }

    /// Whether process changes are tracked (the identity cache is on).
    pub fn tracks_processes(&self) -> bool {
        self.proc_changes.is_some()
    }

    /// The change counter of the slot of process `tgid`: it moves whenever a process in that
    /// slot execs or one of its tasks exits. `None` when the tracepoints are not attached or
    /// the read failed: nothing about the process may then be taken from a cache.
    pub fn process_changes(&self, tgid: u32) -> Option<u64> {
        let map = self.proc_changes.as_ref()?;
        map.get(&(tgid % interceptor_common::capacity::PROC_SLOTS), 0)
            .ok()
    }

    /// [`Kernel::process_changes`] for a process that connected at `connect_boot_ns`: `None`
    /// for a connect before this daemon's tracepoints were attached (its record's exec count
    /// is not one they kept).
    pub fn process_changes_since(&self, tgid: u32, connect_boot_ns: u64) -> Option<u64> {
        (connect_boot_ns >= self.tracking_since_ns)
            .then(|| self.process_changes(tgid))
            .flatten()
    }

    /// Registers the proxy's listening sockets of the namespace `netns_cookie`: until then (and
    /// once they close: the kernel drops them) its tagged MCP connects are refused.
    pub fn register_listen_sockets(
        &self,
        netns_cookie: u64,
        sockets: &[socket2::Socket],
    ) -> io::Result<()> {
        let mut map = lock(&self.listen_socks);
        for socket in sockets {
            let v6 = socket.local_addr()?.is_ipv6();
            let key = ListenKey {
                netns_cookie,
                family: if v6 {
                    interceptor_common::AF_INET6
                } else {
                    interceptor_common::AF_INET
                },
                _pad: 0,
            };
            let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
            map.insert(key, fd, 0).map_err(|e| {
                io::Error::other(format!(
                    "cannot register a proxy listener with the kernel ({}): {e}",
                    names::LISTEN_SOCKS
                ))
            })?;
        }
        Ok(())
    }

    /// Drops the records of connections to the listener of the namespace `netns_cookie`,
    /// which closed: none will be taken (one left would be served to whoever binds its source
    /// port and dials the proxy port there).
    pub fn drop_conns_of(&self, netns_cookie: u64) -> usize {
        self.drop_conns(|k| k.netns_cookie == netns_cookie)
    }

    /// Drops every socket record (only at start, before this daemon registers its listeners:
    /// until then `connect*` records none).
    fn drop_socks(&self) -> usize {
        clear(&mut lock(&self.socks))
    }

    /// Drops every listener entry (only at start, before this daemon registers its own).
    fn drop_listeners(&self) -> usize {
        clear(&mut lock(&self.listeners))
    }

    /// Drops the connection records whose tuple `stale` picks; how many.
    /// Walked through the second handle: up to 65,536 records, a syscall each, while every
    /// worker takes records on accepts through the first.
    /// (A record taken meanwhile may restart the walk: keys are collected once each.)
    fn drop_conns(&self, stale: impl Fn(&TupleKey) -> bool) -> usize {
        let mut conns = lock(&self.conns_walk);
        let stale: HashSet<TupleKey> = conns
            .keys()
            .filter_map(Result::ok)
            .filter(|k| stale(k))
            .collect();
        for key in &stale {
            let _ = conns.remove(key);
        }
        stale.len()
    }

    /// Takes (reads and removes) the record of the connection `key`.
    pub fn take_conn(&self, key: &TupleKey) -> Option<ConnRecord> {
        // Consumed: a later connection reusing the tuple must not inherit this identity.
        self.conns.take(key)
    }
}

/// The tuple records (`ICPT_CONNS`), each taken with one `BPF_MAP_LOOKUP_AND_DELETE_ELEM`
/// (hash maps since Linux 5.14): a read and a remove were two system calls on every accepted
/// connection, under a lock the workers shared.
struct TupleRecords(MapData);

impl TupleRecords {
    fn new(map: aya::maps::Map) -> Result<Self, Error> {
        // The map type and the key and value sizes, checked as aya checks them.
        HashMap::<_, TupleKey, ConnRecord>::try_from(&map).map_err(map_err(names::CONNS))?;
        match map {
            aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => Ok(Self(data)),
            // Refused by `try_from` above.
            _ => Err(map_err(names::CONNS)(MapError::InvalidName {
                name: names::CONNS.to_owned(),
            })),
        }
    }

    /// The record of `key`, removed from the map; `None` when there is none (or the kernel
    /// refused the call: no record is served then either).
    fn take(&self, key: &TupleKey) -> Option<ConnRecord> {
        const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
        // The `bpf_attr` member of the `BPF_MAP_*_ELEM` commands; explicit padding, zero.
        #[repr(C)]
        struct Elem {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut record = std::mem::MaybeUninit::<ConnRecord>::uninit();
        let mut elem = Elem {
            map_fd: self.0.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: record.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `key` points at a `TupleKey` and `value` at room for a `ConnRecord`, the
        // map's key and value sizes (checked in `new`), both alive for the call.
        unsafe { bpf_call(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut elem) }.ok()?;
        // SAFETY: the kernel wrote the whole value (the call succeeded); every bit pattern is a
        // valid `ConnRecord` (plain integers: `aya::Pod`).
        Some(unsafe { record.assume_init() })
    }
}

/// Removes every entry of `map` (keys collected once: a walk restarts when its key goes);
/// how many.
fn clear<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
) -> usize {
    let keys: HashSet<K> = map.keys().filter_map(Result::ok).collect();
    for key in &keys {
        let _ = map.remove(key);
    }
    keys.len()
}

/// Sets every port's bit in the port bitmap, before programs that read it run: until the
/// daemon writes the exact bitmap (with the server map, at start), every connect goes on to
/// the server-map lookup, as without the bitmap. An upgrade from a daemon without it, or a
/// bitmap an older binary left stale while it changed the server map, must not let a
/// connect to a configured server through meanwhile.
fn open_every_port(ebpf: &mut Ebpf) -> Result<(), Error> {
    let map = ebpf.map_mut(names::PORTS).ok_or(Error::Map {
        name: names::PORTS,
        error: Box::new(MapError::InvalidName {
            name: names::PORTS.to_owned(),
        }),
    })?;
    let mut ports: Array<&mut aya::maps::MapData, u64> =
        Array::try_from(map).map_err(map_err(names::PORTS))?;
    for index in 0..interceptor_common::capacity::PORT_WORDS {
        if ports.get(&index, 0).ok() != Some(u64::MAX) {
            ports
                .set(index, u64::MAX, 0)
                .map_err(map_err(names::PORTS))?;
        }
    }
    Ok(())
}

/// Takes the map `name` out of the loaded object.
fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::Map {
        name,
        error: Box::new(MapError::InvalidName {
            name: name.to_owned(),
        }),
    })
}

/// A pinned link from an earlier run, if the pin exists and is a valid link.
fn adopt(pin: &Path) -> Option<FdLink> {
    if !pin.exists() {
        return None;
    }
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            info!(pin = %pin.display(), "re-adopting pinned link");
            Some(FdLink::from(link))
        }
        Err(e) => {
            warn!(pin = %pin.display(), error = %e, "stale link pin; replacing it");
            let _ = std::fs::remove_file(pin);
            None
        }
    }
}

fn program_error(name: &'static str) -> impl Fn(ProgramError) -> Error + Copy {
    move |e| Error::Program {
        name,
        error: Box::new(e),
        hint: older_kernel_hint(),
    }
}

/// Whether a kernel release (`5.19.0-50-generic`) is older than 6.1; `false` when unreadable.
fn before_6_1(release: &str) -> bool {
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    matches!(
        (parts.next().flatten(), parts.next().flatten()),
        (Some(major), Some(minor)) if (major, minor) < (6, 1)
    )
}

/// What a program failing to load means on a kernel older than 6.1 (its release): the
/// connect and sendmsg programs refuse with `bpf_set_retval`, which those hooks only have
/// from 6.1 on. Empty on a newer kernel, or when the release cannot be read.
fn older_kernel_hint() -> &'static str {
    let older = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .is_ok_and(|release| before_6_1(&release));
    if older {
        "; this kernel is older than Linux 6.1, which interceptor needs (its connect and sendmsg \
         programs call bpf_set_retval, which those hooks have from 6.1 on): upgrade the kernel"
    } else {
        ""
    }
}

/// Program `name` of the object.
fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, Error> {
    ebpf.program_mut(name)
        .ok_or_else(|| program_error(name)(ProgramError::UnexpectedProgramType))
}

/// The cgroup program `$name` of `$program` loaded as its aya type, bound to `$p` in `$body`
/// (the types share no trait for loading and attaching).
macro_rules! loaded {
    ($name:expr, $program:expr, $prog_err:expr, |$p:ident| $body:expr) => {
        if $name == programs::SOCK_OPS {
            let $p: &mut SockOps = $program.try_into().map_err($prog_err)?;
            $p.load().map_err($prog_err)?;
            $body
        } else if $name == programs::SOCK_RELEASE {
            let $p: &mut CgroupSock = $program.try_into().map_err($prog_err)?;
            $p.load().map_err($prog_err)?;
            $body
        } else {
            let $p: &mut CgroupSockAddr = $program.try_into().map_err($prog_err)?;
            $p.load().map_err($prog_err)?;
            $body
        }
    };
}

/// Loads program `name` and makes the link pinned at `pin` run it.
fn replace_program(ebpf: &mut Ebpf, name: &'static str, pin: &Path) -> Result<(), Error> {
    let prog_err = program_error(name);
    let program = program(ebpf, name)?;
    let fd = loaded!(name, program, prog_err, |p| p
        .fd()
        .map_err(prog_err)?
        .as_fd()
        .as_raw_fd());
    update_link(pin, fd).map_err(|e| Error::Pin {
        path: pin.to_owned(),
        message: format!("BPF_LINK_UPDATE: {e}"),
    })?;
    info!(program = name, pin = %pin.display(), "program replaced in its pinned link");
    Ok(())
}

/// `bpf(cmd, attr)`: `attr` a `bpf_attr` member (repr(C), its padding explicit and zero: the
/// kernel refuses non-zero bytes past the fields a command uses), which the kernel may write
/// back to. The result or the error.
///
/// # Safety
/// Every pointer inside `attr` (a path, a buffer of ids) must be valid for what `cmd` does
/// with it, for the length `attr` gives, during the call.
unsafe fn bpf_call<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is valid for reads and writes of its own size for the call; the pointers
    // in it are the caller's to vouch for.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Refuses to install where another daemon's programs, with other pins than `bpffs_dir`'s, run
/// for the connects of processes in `attach_cgroup`: attached there or above (the kernel's
/// effective list), or to a cgroup below it (its subtree walked; a daemon attaching there
/// after this walk refuses to start, seeing this one above it). Both would redirect those
/// connections. The program behind this daemon's own pin is read again after the query: a
/// running daemon of these pins replacing it meanwhile is no foreign one (that start then
/// fails on the pins' lock).
fn refuse_foreign(
    bpffs_dir: &Path,
    links_dir: &Path,
    hierarchy: &Hierarchy,
    attach_cgroup: &str,
) -> Result<(), Error> {
    let own_program = || {
        PinnedLink::from_pin(links_dir.join(programs::CONNECT4))
            .ok()
            .and_then(|link| FdLink::from(link).info().ok())
            .map(|info| info.program_id())
    };
    let cgroup = hierarchy.open(attach_cgroup)?;
    let mut foreign = Vec::new();
    let mut own = None;
    for _ in 0..3 {
        own = own_program();
        foreign = foreign_redirectors(&cgroup, own, true, &mut None).map_err(|e| Error::Io {
            path: hierarchy.dir(attach_cgroup),
            error: io::Error::new(e.kind(), format!("BPF_PROG_QUERY (connect4): {e}")),
        })?;
        if own_program() == own {
            break;
        }
    }
    let mut attached = "there or above".to_owned();
    if foreign.is_empty() {
        let Some((below, ids)) = foreign_below(&hierarchy.dir(attach_cgroup), own) else {
            return Ok(());
        };
        let below = below.strip_prefix(&hierarchy.mount).unwrap_or(&below);
        attached = format!("to /{} below it", below.display());
        foreign = ids;
    }
    Err(Error::Foreign {
        cgroup: attach_cgroup.to_owned(),
        attached,
        dir: bpffs_dir.to_owned(),
        ids: foreign
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The first cgroup below the cgroup folder `top` (depth first) to which another interceptor's
/// connect program is attached, with the programs' ids. Cgroups that vanish or cannot be
/// queried meanwhile are passed over: this guards against a mistake of configuration, not
/// against a race with a daemon starting at the same moment.
fn foreign_below(top: &Path, own: Option<u32>) -> Option<(PathBuf, Vec<u32>)> {
    let mut folders = vec![top.to_owned()];
    let mut interceptors = None;
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            let found = std::fs::File::open(&path)
                .and_then(|cgroup| foreign_redirectors(&cgroup, own, false, &mut interceptors))
                .unwrap_or_default();
            if !found.is_empty() {
                return Some((path, found));
            }
            folders.push(path);
        }
    }
    None
}

/// The connect (IPv4) programs of another interceptor attached to `cgroup` (an open cgroup v2
/// folder), or with `effective` that run for its processes (attached to it or to an ancestor:
/// the kernel's effective list), other than `own`, told by their name and by a map of theirs
/// named as ours are (`interceptors`: [`interceptor_programs`], filled when first needed).
fn foreign_redirectors(
    cgroup: &std::fs::File,
    own: Option<u32>,
    effective: bool,
    interceptors: &mut Option<HashSet<u32>>,
) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_F_QUERY_EFFECTIVE: u32 = 1;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut ids = vec![0u32; 64];
    loop {
        let mut query = Query {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET4_CONNECT,
            query_flags: if effective { BPF_F_QUERY_EFFECTIVE } else { 0 },
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            _pad: 0,
            prog_attach_flags: 0,
            link_ids: 0,
            link_attach_flags: 0,
            revision: 0,
        };
        // SAFETY: `prog_ids` points at `ids`, of `prog_cnt` ids; the other pointers are null.
        match unsafe { bpf_call(BPF_PROG_QUERY, &mut query) } {
            Ok(_) => {
                ids.truncate(query.prog_cnt as usize);
                break;
            }
            // More than the room given: the kernel said how many.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOSPC)
                    && query.prog_cnt as usize > ids.len() =>
            {
                ids = vec![0; query.prog_cnt as usize];
            }
            Err(e) => return Err(e),
        }
    }
    ids.retain(|id| Some(*id) != own);
    if ids.is_empty() {
        return Ok(ids);
    }
    let interceptors = interceptors.get_or_insert_with(interceptor_programs);
    ids.retain(|id| interceptors.contains(id));
    Ok(ids)
}

/// The ids of the loaded programs that are an interceptor's connect program: named as ours,
/// with a map named as ours are (the loaded programs walked once).
fn interceptor_programs() -> HashSet<u32> {
    let ours = |info: &aya::programs::ProgramInfo| {
        info.name_as_str() == Some(programs::CONNECT4)
            && info.map_ids().ok().flatten().is_some_and(|maps| {
                maps.iter().any(|m| {
                    aya::maps::MapInfo::from_id(*m)
                        .is_ok_and(|m| m.name_as_str().is_some_and(|n| n.starts_with("ICPT_")))
                })
            })
    };
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(ours)
        .map(|info| info.id())
        .collect()
}

/// `BPF_LINK_UPDATE` of the link pinned at `pin` to program `prog_fd` (aya 0.14 offers it only
/// for XDP and TC links): the kernel swaps the program atomically.
fn update_link(pin: &Path, prog_fd: std::os::fd::RawFd) -> io::Result<()> {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    // The `bpf_attr` members of the two commands; explicit padding, all of it zero (the kernel
    // refuses non-zero bytes past the fields a command uses).
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `pathname` points at `path`, a NUL-terminated string that outlives the call.
    let fd = unsafe { bpf_call(BPF_OBJ_GET, &mut get) }?;
    // SAFETY: a descriptor the kernel just gave us, owned from here on.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: no pointers in this command's attributes.
    unsafe { bpf_call(BPF_LINK_UPDATE, &mut update) }.map(drop)
}

fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: std::fs::File,
    pin: &Path,
) -> Result<FdLink, Error> {
    let prog_err = program_error(name);
    let program = program(ebpf, name)?;
    // aya 0.14 on kernels >= 5.7 attaches cgroup programs as BPF links, which always coexist;
    // `Single` is the only mode the kernel accepts for links (AllowMultiple gives EINVAL).
    let link: FdLink = loaded!(name, program, prog_err, |p| {
        let id = p
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(prog_err)?;
        p.take_link(id)
            .map_err(prog_err)?
            .try_into()
            .map_err(|e: LinkError| Error::Pin {
                path: pin.to_owned(),
                message: e.to_string(),
            })?
    });
    let pinned = link.pin(pin).map_err(|e| Error::Pin {
        path: pin.to_owned(),
        message: e.to_string(),
    })?;
    info!(program = name, pin = %pin.display(), "attached and pinned");
    Ok(FdLink::from(pinned))
}

/// Loads and attaches the process-change tracepoints and takes their counter map, all or
/// none; their links join `links` (not pinned: they serve this daemon's cache and go with it).
/// CLOCK_BOOTTIME now, in ns (the clock of `bpf_ktime_get_boot_ns`); 0 if unreadable.
fn boot_time_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

fn track_processes(
    ebpf: &mut Ebpf,
    links: &mut Vec<FdLink>,
) -> Result<(Vec<Tracepoint>, Array<MapData, u64>), Error> {
    let mut attached = Vec::new();
    // Dropped (detached) on an error below: half of the set would only cost.
    let mut own = Vec::new();
    for (name, tracepoint) in programs::TRACEPOINTS {
        let (link, info) = attach_tracepoint(ebpf, name, tracepoint)?;
        attached.push(info);
        own.push(link);
    }
    // Optional: older kernels lack it (an exec's window before `sched_process_exec` then
    // stays unguarded, and the daemon says so).
    let tracepoint = programs::PREPARE_EXEC_TRACEPOINT;
    match attach_tracepoint(ebpf, programs::PROC_PREPARE_EXEC, tracepoint) {
        Ok((link, info)) => {
            attached.push(info);
            own.push(link);
        }
        Err(e) => warn!(
            tracepoint,
            error = %e,
            "cannot attach to the start of an exec (Linux >= 6.10 has it): an executable read \
             while a process execs may be the new one, for a connection the old one made"
        ),
    }
    let map = Array::try_from(take_map(ebpf, names::PROC_CHANGES)?)
        .map_err(map_err(names::PROC_CHANGES))?;
    links.append(&mut own);
    Ok((attached, map))
}

/// Loads raw tracepoint program `name` and attaches it to `tracepoint`: its link (detached
/// when dropped) and what status reports of it.
fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &'static str,
) -> Result<(FdLink, Tracepoint), Error> {
    let prog_err = |e: ProgramError| Error::Program {
        name,
        error: Box::new(e),
        hint: older_kernel_hint(),
    };
    let program: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| prog_err(ProgramError::UnexpectedProgramType))?
        .try_into()
        .map_err(prog_err)?;
    program.load().map_err(prog_err)?;
    let id = program.attach(tracepoint).map_err(prog_err)?;
    let link = FdLink::from(program.take_link(id).map_err(prog_err)?);
    let info = link.info().map_err(|e| Error::Link {
        name,
        message: e.to_string(),
    })?;
    let attached = Tracepoint {
        program: name,
        tracepoint,
        link_id: info.id(),
        program_id: info.program_id(),
    };
    Ok((link, attached))
}

/// Takes the exclusive lock on the pin folder `dir` (a second daemon on the same pins would drop
/// the first one's connection records and intercept addresses), after checking that only root
/// can write to it and to `links` (anyone who can could unlink the tag or revocation maps, and
/// the next start would begin with empty ones).
fn lock_pins(dir: &Path, links_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    for d in [dir, links_dir] {
        let meta = std::fs::symlink_metadata(d).map_err(|error| Error::Io {
            path: d.to_owned(),
            error,
        })?;
        let message = if !meta.is_dir() {
            Some("not a directory".to_owned())
        } else if meta.uid() != euid {
            Some(format!(
                "owned by uid {}, not this daemon's ({euid})",
                meta.uid()
            ))
        } else if meta.mode() & 0o022 != 0 {
            Some(format!("mode {:o} lets others write", meta.mode() & 0o7777))
        } else {
            None
        };
        if let Some(message) = message {
            return Err(Error::PinsUnsafe {
                dir: d.to_owned(),
                message,
            });
        }
    }
    let file = std::fs::File::open(dir).map_err(|error| Error::Io {
        path: dir.to_owned(),
        error,
    })?;
    lock_exclusive(file, dir)
}

/// The exclusive lock on the pin folder open as `file`; [`Error::PinsInUse`] while a daemon
/// holds it.
fn lock_exclusive(
    file: std::fs::File,
    dir: &Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => Error::PinsInUse {
                dir: dir.to_owned(),
            },
            e => Error::Io {
                path: dir.to_owned(),
                error: e.into(),
            },
        },
    )
}

/// The process holding the daemon's lock on the pins under `dir` (see [`lock_pins`]), as
/// `/proc/locks` names it in this pid namespace; `None` when no one holds it or `dir` is not
/// there.
pub fn pins_holder(dir: &Path) -> io::Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let (major, minor) = (
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
    );
    Ok(lock_holder(
        &std::fs::read_to_string("/proc/locks")?,
        (major, minor, meta.ino()),
    ))
}

/// In `/proc/locks` text, the pid holding a `FLOCK` on file `(major, minor, inode)`. Lines:
/// `1: FLOCK  ADVISORY  WRITE 28246 fe:00:10010721 0 EOF` (device numbers in hex); a
/// waiter's line has `->` after the index and holds nothing.
fn lock_holder(locks: &str, (major, minor, inode): (u64, u64, u64)) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, "FLOCK", _, _, pid, file, ..] = fields.as_slice() else {
            return None;
        };
        let mut parts = file.split(':');
        let (ma, mi, ino) = (parts.next()?, parts.next()?, parts.next()?);
        let same = u64::from_str_radix(ma, 16).ok()? == major
            && u64::from_str_radix(mi, 16).ok()? == minor
            && ino.parse::<u64>().ok()? == inode;
        same.then(|| pid.parse().ok()).flatten()
    })
}

/// Makes sure `dir` is on bpffs, mounting bpffs at /sys/fs/bpf when that is where it belongs.
pub fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    let mount = Path::new(BPFFS_MOUNT);
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    if cgroup::is_bpffs(probe) {
        return Ok(());
    }
    if dir.starts_with(mount) && mount.is_dir() && !cgroup::is_bpffs(mount) {
        // In a mount namespace of its own (a container without the host's /sys/fs/bpf), a
        // bpffs mounted here would end with the namespace: the pinned links with it, so a
        // restarted container would leave tagged agents unintercepted for a while, and lose
        // every tag and revocation.
        // The host's init is pid 1 only in the host's pid namespace (its inode is fixed).
        const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
        let host_pids = std::fs::metadata("/proc/self/ns/pid")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == PROC_PID_INIT_INO);
        let own = std::fs::read_link("/proc/self/ns/mnt").ok();
        if !host_pids || own.is_none() || own != std::fs::read_link("/proc/1/ns/mnt").ok() {
            return Err(Error::Bpffs {
                dir: dir.to_owned(),
                message: format!(
                    "{} is not bpffs and this process is not in the host's mount and pid \
                     namespaces (a bpffs mounted here would go with its container); mount the \
                     host's {BPFFS_MOUNT} into the container, and run it with the host's pids",
                    probe.display()
                ),
            });
        }
        nix::mount::mount(
            Some("bpf"),
            mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            // Root only (the kernel's default is 1777: anyone could create the pin folder).
            Some("mode=0700"),
        )
        .map_err(|e| Error::Bpffs {
            dir: dir.to_owned(),
            message: format!("mounting bpffs at {BPFFS_MOUNT} failed: {e}"),
        })?;
        info!("mounted bpffs at {BPFFS_MOUNT}");
        return Ok(());
    }
    Err(Error::Bpffs {
        dir: dir.to_owned(),
        message: format!("{} is not bpffs", probe.display()),
    })
}

/// What `uninstall` removed.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    pub links: Vec<String>,
    pub maps: Vec<String>,
    /// The revocations that were in force (selector and reason): gone with their map.
    pub revocations: Vec<String>,
}

/// Detaches every pinned link and removes every pin under `bpffs_dir`. Interception stops for
/// all tagged cgroups; tags are forgotten.
pub fn uninstall(bpffs_dir: &Path) -> Result<Removed, Error> {
    let mut removed = Removed::default();
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |error| Error::Io { path, error }
    };
    // Not under a daemon that holds the pins (whatever its admin socket says).
    let _pins_lock = match std::fs::File::open(bpffs_dir) {
        Ok(dir) => Some(lock_exclusive(dir, bpffs_dir)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(bpffs_dir)(e)),
    };
    // The revocations that end with their map, to say so.
    let blocks = bpffs_dir.join(names::BLOCKS);
    let readable = aya::maps::MapData::from_pin(&blocks).ok().and_then(|data| {
        HashMap::<MapData, BlockKey, BlockValue>::try_from(aya::maps::Map::HashMap(data)).ok()
    });
    if readable.is_none() && blocks.exists() {
        removed.revocations.push(format!(
            "those in {} (unreadable by this version: another layout?)",
            blocks.display()
        ));
    }
    if let Some(map) = readable {
        removed.revocations = map
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| {
                let reason = v.reason();
                if reason.is_empty() {
                    v.label().to_owned()
                } else {
                    format!("{} ({reason})", v.label())
                }
            })
            .collect();
        removed.revocations.sort();
    }
    let links_dir = bpffs_dir.join("links");
    // Every link pinned there, not only this version's programs: a newer daemon's (after a
    // downgrade) would otherwise stay attached, and the folder could not be removed.
    let mut pinned: Vec<String> = match std::fs::read_dir(&links_dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(&links_dir)(e)),
    };
    pinned.sort();
    for name in pinned {
        let pin = links_dir.join(&name);
        match PinnedLink::from_pin(&pin) {
            // Unpinning drops the last reference the pin held: the link detaches when the
            // returned fd closes (unless a running daemon still holds it).
            Ok(link) => drop(link.unpin().map_err(io_err(&pin))?),
            Err(_) => std::fs::remove_file(&pin).map_err(io_err(&pin))?,
        }
        removed.links.push(name);
    }
    for name in names::ALL {
        let pin = bpffs_dir.join(name);
        if pin.exists() {
            std::fs::remove_file(&pin).map_err(io_err(&pin))?;
            removed.maps.push(name.to_owned());
        }
    }
    for dir in [links_dir.as_path(), bpffs_dir] {
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(dir)(e)),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod kernel_release_tests {
    #[test]
    fn kernels_before_6_1_are_told_apart() {
        for older in ["5.18.0", "5.19.0-50-generic", "6.0.19-arch1-1"] {
            assert!(super::before_6_1(older), "{older}");
        }
        for newer in ["6.1.0", "6.18.2\n", "7.0", "", "unknown"] {
            assert!(!super::before_6_1(newer), "{newer:?}");
        }
        // This machine's: no hint on a kernel that loads the programs.
        assert!(
            super::older_kernel_hint().is_empty()
                || super::before_6_1(
                    &std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()
                )
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pins_lock_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 700 fe:00:42 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 28246 fe:00:10010721 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 999 00:1f:77 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 31337 00:1f:77 0 EOF\n";
        assert_eq!(lock_holder(locks, (0xfe, 0, 10010721)), Some(28246));
        // The holder, not a waiter; a POSIX lock is not the daemon's.
        assert_eq!(lock_holder(locks, (0, 0x1f, 77)), Some(31337));
        assert_eq!(lock_holder(locks, (0xfe, 0, 42)), None);
        assert_eq!(lock_holder(locks, (0xfe, 1, 10010721)), None);
        assert_eq!(lock_holder("", (0, 0, 1)), None);
    }

    #[test]
    fn a_held_lock_is_found_on_this_kernel() {
        // On tmpfs where there is one: /proc/locks names a file's superblock device, which
        // `stat` does not give on btrfs (its subvolumes' devices). Pins are on bpffs.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("tempdir");
        assert_eq!(pins_holder(dir.path()).expect("read"), None);
        let file = std::fs::File::open(dir.path()).expect("open");
        let _lock = lock_exclusive(file, dir.path()).expect("lock");
        assert_eq!(
            pins_holder(dir.path()).expect("read"),
            Some(std::process::id())
        );
        assert_eq!(pins_holder(&dir.path().join("absent")).expect("read"), None);
    }
}
