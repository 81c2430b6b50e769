//! Types shared by the kernel programs (`interceptor-ebpf`) and the daemon (`interceptor`).
//!
//! Everything here is `#[repr(C)]`, `Copy`, and laid out without implicit padding (explicit
//! `_pad` fields, `u32` flags instead of `bool`): map keys are hashed byte for byte, so every
//! byte of a key must be written by whoever builds it.
#![no_std]

/// Names of the maps. They are also the file names of the pins under the bpffs folder, so a
/// restarted daemon finds the same maps (and the tags in them) again. At most 15 bytes each
/// (`BPF_OBJ_NAME_LEN` - 1).
pub mod maps {
    /// Tagged cgroups: cgroup id → [`crate::TagValue`].
    pub const TAGS: &str = "ICPT_TAGS";
    /// Intercepted destinations: [`crate::Addr`] → [`crate::ServerValue`].
    pub const SERVERS: &str = "ICPT_SERVERS";
    /// The ports of [`SERVERS`]' addresses as a bitmap: word `port / 64`, bit `port % 64`
    /// (an array read settles most connects, which go to no such port, before the hash
    /// lookup). A port's bit is set before its first address is added and cleared after its
    /// last is removed.
    pub const PORTS: &str = "ICPT_PORTS";
    /// Proxy listeners by network-namespace cookie: `u64` → [`crate::Listener`].
    pub const LISTENERS: &str = "ICPT_LISTENERS";
    /// Records of redirected sockets by socket cookie: `u64` → [`crate::ConnRecord`].
    /// Read by `getpeername*`; removed when the socket closes.
    pub const SOCKS: &str = "ICPT_SOCKS";
    /// Records of redirected connections by tuple: [`crate::TupleKey`] → [`crate::ConnRecord`].
    /// Consumed (removed) by the proxy when it accepts the connection.
    pub const CONNS: &str = "ICPT_CONNS";
    /// Per-CPU counters, indexed by [`crate::stats`].
    pub const STATS: &str = "ICPT_STATS";
    /// Revocations: [`crate::BlockKey`] → [`crate::BlockValue`].
    pub const BLOCKS: &str = "ICPT_BLOCKS";
    /// Global switches the programs read, one [`crate::State`] at index 0.
    pub const STATE: &str = "ICPT_STATE";
    /// Change counters of processes, by slot `tgid % capacity::PROC_SLOTS`: a `u64` bumped on
    /// every `exec` and every task exit of a process in the slot; an exec adds
    /// [`crate::PROC_EXEC_STEP`], so the high half counts execs alone. Not pinned: it serves the
    /// running daemon's identity cache, which starts empty, and lives as long as the daemon
    /// holds it.
    pub const PROC_CHANGES: &str = "ICPT_PROC_CHANGES";

    /// The proxy's listening sockets: [`crate::ListenKey`] → socket (a `SOCKHASH`). The kernel
    /// drops a socket from it when the socket closes, so a redirect goes only to a listener
    /// the daemon still holds: after a crash, a process that binds the freed port (any user
    /// can) receives nothing.
    pub const LISTEN_SOCKS: &str = "ICPT_LISTEN_SK";

    /// Every map the daemon pins, for status and uninstall.
    pub const ALL: [&str; 10] = [
        TAGS,
        SERVERS,
        PORTS,
        LISTENERS,
        LISTEN_SOCKS,
        SOCKS,
        CONNS,
        STATS,
        BLOCKS,
        STATE,
    ];
}

/// Names of the programs in the object; also the file names of their pinned links.
pub mod programs {
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const GETPEERNAME4: &str = "getpeername4";
    pub const GETPEERNAME6: &str = "getpeername6";
    pub const SENDMSG4: &str = "sendmsg4";
    pub const SENDMSG6: &str = "sendmsg6";
    pub const SOCK_OPS: &str = "sock_ops";
    pub const SOCK_RELEASE: &str = "sock_release";

    /// Every program the daemon attaches to the cgroup (links pinned).
    pub const ALL: [&str; 8] = [
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
        SENDMSG4,
        SENDMSG6,
        SOCK_OPS,
        SOCK_RELEASE,
    ];

    /// Raw tracepoint `sched_process_exec`: bumps [`crate::maps::PROC_CHANGES`].
    pub const PROC_EXEC: &str = "proc_exec";
    /// Raw tracepoint `sched_process_exit`: bumps [`crate::maps::PROC_CHANGES`].
    pub const PROC_EXIT: &str = "proc_exit";
    /// Raw tracepoint `sched_prepare_exec` (Linux >= 6.10): bumps the exec generation when an
    /// exec starts replacing the process, before its executable changes (`sched_process_exec`
    /// comes only after the new image is set up: `/proc/<pid>/exe` names it in between).
    /// Attached when the kernel has it.
    pub const PROC_PREPARE_EXEC: &str = "proc_prepare_exec";
    /// `PROC_PREPARE_EXEC`'s tracepoint.
    pub const PREPARE_EXEC_TRACEPOINT: &str = "sched_prepare_exec";
    /// The raw tracepoint programs, attached while the daemon runs (not pinned), with the
    /// tracepoint each one serves (raw tracepoints need no tracefs).
    pub const TRACEPOINTS: [(&str, &str); 2] = [
        (PROC_EXEC, "sched_process_exec"),
        (PROC_EXIT, "sched_process_exit"),
    ];
}

/// Map capacities. The record maps are LRU so that records nobody consumes (a client that
/// connected and vanished before the proxy accepted) age out instead of filling the map.
/// What an `exec` adds to a [`names::PROC_CHANGES`] counter (a task exit adds 1): the high
/// half of the counter is the slot's exec generation.
pub const PROC_EXEC_STEP: u64 = 1 << 32;

/// The exec generation in a [`names::PROC_CHANGES`] counter.
pub const fn exec_gen(changes: u64) -> u32 {
    (changes >> 32) as u32
}

pub mod capacity {
    pub const TAGS: u32 = 4096;
    pub const SERVERS: u32 = 4096;
    /// Words of [`crate::maps::PORTS`]: 64 ports each.
    pub const PORT_WORDS: u32 = 65536 / 64;
    pub const LISTENERS: u32 = 1024;
    /// Two sockets (IPv4, IPv6) per listener.
    pub const LISTEN_SOCKS: u32 = 2 * LISTENERS;
    pub const SOCKS: u32 = 65536;
    pub const CONNS: u32 = 65536;
    pub const BLOCKS: u32 = 4096;
    /// Slots of [`crate::maps::PROC_CHANGES`] (512 KiB). Processes whose ids share a slot
    /// invalidate each other's cached identity: a cache miss, never a stale hit.
    pub const PROC_SLOTS: u32 = 65536;
}

/// Indexes into the per-CPU counter array.
pub mod stats {
    /// Connections rewritten to a proxy listener.
    pub const REDIRECTED: u32 = 0;
    /// Connections refused because no listener exists in the caller's network namespace.
    pub const REFUSED_NO_LISTENER: u32 = 1;
    /// Connections refused because their record could not be stored (fail closed).
    pub const REFUSED_NO_RECORD: u32 = 2;
    /// Records published by tuple from `sock_ops`.
    pub const PUBLISHED: u32 = 3;
    /// `getpeername()` answers rewritten to the dialed address.
    pub const PEERNAME_REWRITTEN: u32 = 4;
    /// MCP connections (and datagrams to MCP addresses) refused because the caller is revoked.
    pub const REFUSED_REVOKED: u32 = 5;
    /// Connections and datagrams (any destination) refused by an all-egress block.
    pub const REFUSED_EGRESS: u32 = 6;
    /// Agents' connects and datagrams to `0.0.0.0:P` (P a port some server is intercepted on)
    /// refused because the program cannot tell where they go (a socket tied to a device but
    /// bound to no address, or bound to an address that is no server's — it may be a
    /// broadcast one, sending to loopback —, or a datagram, which can pick its source per
    /// message), and datagrams to a broadcast or multicast address at such a port.
    pub const REFUSED_UNSPECIFIED: u32 = 7;
    /// Datagrams (UDP `connect` or send) refused: to an MCP server's address from an agent
    /// (the proxy serves TCP only; HTTP/3 would go past it). A revoked cgroup's count as
    /// [`REFUSED_REVOKED`], those to an unspecified, broadcast or multicast address as
    /// [`REFUSED_UNSPECIFIED`].
    pub const REFUSED_DATAGRAM: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
    /// Names, in index order, for status output.
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "refused_no_listener",
        "refused_no_record",
        "published",
        "peername_rewritten",
        "refused_revoked",
        "refused_egress",
        "refused_unspecified",
        "refused_datagram",
    ];
}

/// How many cgroup ancestors (including the caller's own cgroup) are checked against the tags.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// `AF_INET`, as the kernel reports it in `bpf_sock_addr.user_family` / `bpf_sock_ops.family`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;

/// The network-byte-order word that marks an IPv4-mapped IPv6 address (`::ffff:0:0/96`) in the
/// third 32-bit word, as loaded on a little-endian machine (bytes 00 00 ff ff).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IP address and TCP port, normalised so that IPv4 destinations and IPv4-mapped IPv6
/// destinations (`::ffff:a.b.c.d`) are the same key: a dual-stack socket must not be a way
/// around interception.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Addr {
    /// The IPv6 address (IPv4 as `::ffff:a.b.c.d`), as four words in network byte order, exactly
    /// as the kernel stores `user_ip6`.
    pub ip: [u32; 4],
    /// The port in host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl Addr {
    /// From an IPv4 address word (network byte order, as in `user_ip4`) and a host-order port.
    pub const fn from_v4(ip4: u32, port: u16) -> Self {
        Self {
            ip: [0, 0, V4_MAPPED_WORD, ip4],
            port,
            _pad: 0,
        }
    }

    /// From IPv6 words (network byte order) and a host-order port.
    pub const fn from_v6(ip6: [u32; 4], port: u16) -> Self {
        Self {
            ip: ip6,
            port,
            _pad: 0,
        }
    }

    /// True for `::ffff:a.b.c.d`.
    pub const fn is_v4_mapped(&self) -> bool {
        self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == V4_MAPPED_WORD
    }
}

/// Value of [`maps::TAGS`]. The kernel only tests presence; the path is for `status`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TagValue {
    /// Length of the valid prefix of `path`.
    pub path_len: u32,
    /// Reserved flags (0).
    pub flags: u32,
    /// The cgroup path relative to the cgroup v2 mount, as tagged (UTF-8, truncated).
    pub path: [u8; TAG_PATH_MAX],
}

/// Room for a tagged cgroup's path in [`TagValue`].
pub const TAG_PATH_MAX: usize = 256;

/// Value of [`maps::SERVERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServerValue {
    /// Index of the `[[server]]` in the daemon's config.
    pub server_id: u32,
    pub _pad: u32,
}

/// Value of [`maps::LISTENERS`]: where the proxy listens in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Listener {
    /// Port of the listener on `127.0.0.1` (0: none).
    pub port4: u16,
    /// Port of the listener on `[::1]` (0: none, e.g. IPv6 disabled).
    pub port6: u16,
    pub _pad: u32,
}

/// Key of [`maps::LISTEN_SOCKS`]: the proxy's listening socket of one address family in one
/// network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenKey {
    pub netns_cookie: u64,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    pub _pad: u32,
}

/// What the kernel knows about one redirected connection, captured in `connect*` — the only hook
/// that runs in the connecting process's context.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnRecord {
    /// The address the agent dialed.
    pub orig_dst: Addr,
    /// Which `[[server]]` that address belongs to.
    pub server_id: u32,
    /// Thread id of the caller.
    pub pid: u32,
    /// Process id (thread-group id) of the caller.
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Socket family of the agent's socket (`AF_INET` or `AF_INET6`).
    pub family: u32,
    /// The exec generation of the caller's process slot at connect (the high half of its
    /// [`names::PROC_CHANGES`] counter): if it moved by the time the proxy reads the process's
    /// executable, that executable may not be the one that connected.
    pub exec_gen: u32,
    /// cgroup v2 id of the caller's cgroup.
    pub cgroup_id: u64,
    /// Cookie of the caller's network namespace.
    pub netns_cookie: u64,
    /// Cookie of the agent's socket.
    pub socket_cookie: u64,
    /// `CLOCK_BOOTTIME` at connect, in ns: a process whose start time is later than this is not
    /// the one that connected (its pid was reused).
    pub connect_boot_ns: u64,
    /// The caller's `comm` (NUL-padded).
    pub comm: [u8; 16],
}

/// What a [`BlockKey`] names.
pub mod block {
    /// A cgroup (by id); covers its descendants.
    pub const CGROUP: u32 = 1;
    /// A uid.
    pub const UID: u32 = 2;
    /// A process (tgid).
    pub const PID: u32 = 3;
    /// A workload id (by hash) whose template the kernel cannot match: enforced by the proxy
    /// only.
    pub const WORKLOAD: u32 = 4;
    /// A workload id read back into its process's own cgroup (id): the template is built from
    /// the cgroup path only (and what follows from it).
    pub const WORKLOAD_CGROUP: u32 = 5;
    /// A workload id read back into its process's own cgroup (id) and uid (`aux`).
    pub const WORKLOAD_CGROUP_UID: u32 = 6;

    /// Flag: MCP connections are refused.
    pub const MCP: u32 = 1;
    /// Flag: every outbound connection is refused (cgroups only).
    pub const ALL_EGRESS: u32 = 2;
}

/// Key of [`maps::BLOCKS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BlockKey {
    /// One of [`block`]'s kinds.
    pub kind: u32,
    /// The uid for [`block::WORKLOAD_CGROUP_UID`]; 0 otherwise.
    pub aux: u32,
    pub id: u64,
}

/// Room for a revocation's reason and label in [`BlockValue`].
pub const BLOCK_TEXT: usize = 256;

/// Value of [`maps::BLOCKS`]. The kernel reads `flags`; the rest is for `status` and restarts.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockValue {
    /// [`block::MCP`] and/or [`block::ALL_EGRESS`].
    pub flags: u32,
    pub _pad: u32,
    /// Unix time of the revocation.
    pub since: u64,
    /// What was revoked, as given (cgroup path, pid, uid, workload id), NUL-padded UTF-8.
    pub label: [u8; BLOCK_TEXT],
    /// Why, NUL-padded UTF-8.
    pub reason: [u8; BLOCK_TEXT],
}

/// Value of [`maps::STATE`] (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// How many all-egress blocks exist; 0 lets the programs skip that check entirely.
    pub egress_blocks: u32,
    /// How many kernel-enforced MCP blocks exist; 0 skips that check.
    pub mcp_blocks: u32,
    /// The running daemon's process id (0: none). Its own upstream connections are never
    /// redirected — recognised by process *and* cgroup, which an agent cannot forge (a socket
    /// mark can be set by any process with CAP_NET_RAW, which containers get by default).
    pub daemon_tgid: u32,
    pub _pad: u32,
    /// The running daemon's cgroup id.
    pub daemon_cgroup: u64,
}

/// Key of [`maps::CONNS`]: the agent's end of a redirected connection, as the proxy sees it from
/// `accept()` (peer address and local port) in a given network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TupleKey {
    pub netns_cookie: u64,
    /// The agent's address and ephemeral port.
    pub client: Addr,
    /// The proxy's listening port.
    pub proxy_port: u16,
    pub _pad: u16,
}

// No implicit padding: a key or value with holes would hash or compare garbage.
const _: () = assert!(core::mem::size_of::<Addr>() == 20);
const _: () = assert!(core::mem::size_of::<TupleKey>() == 32);
const _: () = assert!(core::mem::size_of::<ConnRecord>() == 96);
const _: () = assert!(core::mem::size_of::<Listener>() == 8);
const _: () = assert!(core::mem::size_of::<ListenKey>() == 16);
const _: () = assert!(core::mem::size_of::<TagValue>() == 8 + TAG_PATH_MAX);
const _: () = assert!(core::mem::size_of::<BlockKey>() == 16);
const _: () = assert!(core::mem::size_of::<BlockValue>() == 16 + 2 * BLOCK_TEXT);
const _: () = assert!(core::mem::size_of::<State>() == 24);

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, Ipv6Addr, SocketAddr};

    use super::*;

    // SAFETY: all of these are #[repr(C)], Copy, and have no implicit padding.
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for TagValue {}
    unsafe impl aya::Pod for ServerValue {}
    unsafe impl aya::Pod for Listener {}
    unsafe impl aya::Pod for ListenKey {}
    unsafe impl aya::Pod for ConnRecord {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for BlockKey {}
    unsafe impl aya::Pod for BlockValue {}
    unsafe impl aya::Pod for State {}

    fn text(buf: &[u8]) -> &str {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        core::str::from_utf8(&buf[..end]).unwrap_or("?")
    }

    fn fill(s: &str) -> [u8; BLOCK_TEXT] {
        let mut end = s.len().min(BLOCK_TEXT);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut buf = [0u8; BLOCK_TEXT];
        buf[..end].copy_from_slice(&s.as_bytes()[..end]);
        buf
    }

    impl BlockValue {
        pub fn new(flags: u32, since: u64, label: &str, reason: &str) -> Self {
            Self {
                flags,
                _pad: 0,
                since,
                label: fill(label),
                reason: fill(reason),
            }
        }

        pub fn label(&self) -> &str {
            text(&self.label)
        }

        pub fn reason(&self) -> &str {
            text(&self.reason)
        }
    }

    impl From<SocketAddr> for Addr {
        fn from(sa: SocketAddr) -> Self {
            let v6 = match sa.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            Addr::from_v6([word(0), word(4), word(8), word(12)], sa.port())
        }
    }

    impl From<Addr> for SocketAddr {
        /// IPv4-mapped addresses come back as IPv4.
        fn from(a: Addr) -> Self {
            let mut o = [0u8; 16];
            for (i, w) in a.ip.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(o);
            let ip = match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            };
            SocketAddr::new(ip, a.port)
        }
    }

    impl TagValue {
        /// A tag for `path` (truncated to [`TAG_PATH_MAX`] bytes on a char boundary).
        pub fn new(path: &str) -> Self {
            let mut end = path.len().min(TAG_PATH_MAX);
            while !path.is_char_boundary(end) {
                end -= 1;
            }
            let mut buf = [0u8; TAG_PATH_MAX];
            buf[..end].copy_from_slice(&path.as_bytes()[..end]);
            Self {
                path_len: end as u32,
                flags: 0,
                path: buf,
            }
        }

        /// The tagged path.
        pub fn path(&self) -> &str {
            let len = (self.path_len as usize).min(TAG_PATH_MAX);
            core::str::from_utf8(&self.path[..len]).unwrap_or("?")
        }
    }

    impl ConnRecord {
        /// The caller's `comm` as text.
        pub fn comm(&self) -> &str {
            let end = self.comm.iter().position(|&b| b == 0).unwrap_or(16);
            core::str::from_utf8(&self.comm[..end]).unwrap_or("?")
        }
    }

    #[cfg(test)]
    mod tests {
        extern crate std;
        use std::string::ToString;

        use super::*;

        #[test]
        fn v4_and_v4_mapped_are_one_key() {
            let v4: SocketAddr = "127.0.0.2:8080".parse().unwrap();
            let mapped: SocketAddr = "[::ffff:127.0.0.2]:8080".parse().unwrap();
            assert_eq!(Addr::from(v4), Addr::from(mapped));
            assert!(Addr::from(v4).is_v4_mapped());
            assert_eq!(SocketAddr::from(Addr::from(mapped)), v4);
        }

        #[test]
        fn v4_word_matches_kernel_layout() {
            // The kernel stores user_ip4 as the address bytes in memory order.
            let ip4 = u32::from_ne_bytes([127, 0, 0, 2]);
            let a = Addr::from_v4(ip4, 8080);
            assert_eq!(SocketAddr::from(a).to_string(), "127.0.0.2:8080");
        }

        #[test]
        fn v6_round_trips() {
            let v6: SocketAddr = "[::1]:9".parse().unwrap();
            let a = Addr::from(v6);
            assert!(!a.is_v4_mapped());
            assert_eq!(SocketAddr::from(a), v6);
        }

        #[test]
        fn tag_path_truncates_on_char_boundary() {
            let long = "é".repeat(200);
            let t = TagValue::new(&long);
            assert!(t.path().len() <= TAG_PATH_MAX);
            assert!(t.path().chars().all(|c| c == 'é'));
        }
    }
}
