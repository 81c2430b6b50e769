//! Kernel half of interceptor.
//!
//! - `connect4`/`connect6` (cgroup/connect*): when the caller's cgroup or an ancestor is tagged
//!   and the destination is an MCP server address, record who dialed what (by socket cookie) and
//!   rewrite the destination to the proxy listener in the caller's network namespace; refuse the
//!   connection (`ECONNREFUSED`) when there is no listener — never let it go direct.
//! - `sock_ops`: when the redirected socket starts its handshake, publish the record under the
//!   connection tuple the proxy will see from `accept()`.
//! - `getpeername4`/`getpeername6`: give the agent back the address it dialed.
//! - `sock_release` (cgroup/sock_release): drop a closed socket's record, whatever became of
//!   its connect (one that failed before its handshake started gets no `sock_ops` callback).
//! - `sendmsg4`/`sendmsg6` (and `connect*` on a datagram socket): refuse a datagram from a
//!   tagged (or revoked) cgroup to an MCP server's address — the proxy serves TCP only, and
//!   HTTP/3 (QUIC, over UDP) to the server would go past it — and every datagram of a cgroup
//!   under an all-egress block.
//! - `proc_exec`/`proc_exit` (raw tracepoints `sched_process_exec`/`sched_process_exit`): count
//!   each process's changes of image and of tasks, so the daemon knows when what it read from
//!   `/proc` about a process may be out of date.
//!
//! All decisions come from maps the daemon fills; see `interceptor-common` for their layout.
#![no_std]
#![no_main]
// The bpf target has no atomic read-modify-write in `core::sync::atomic`; the intrinsic lowers
// to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock,
        bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_map_lookup_elem, bpf_set_retval,
            bpf_sk_release,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, raw_tracepoint, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{RawTracePointContext, SockAddrContext, SockContext, SockOpsContext},
};
use interceptor_common::{
    AF_INET, AF_INET6, Addr, BlockKey, BlockValue, ConnRecord, ListenKey, Listener,
    MAX_CGROUP_DEPTH, PROC_EXEC_STEP, ServerValue, State, TagValue, TupleKey, V4_MAPPED_WORD,
    block, capacity, exec_gen, stats,
};

#[map(name = "ICPT_TAGS")]
static TAGS: HashMap<u64, TagValue> = HashMap::pinned(capacity::TAGS, 0);

#[map(name = "ICPT_SERVERS")]
static SERVERS: HashMap<Addr, ServerValue> = HashMap::pinned(capacity::SERVERS, 0);

#[map(name = "ICPT_PORTS")]
static PORTS: Array<u64> = Array::pinned(capacity::PORT_WORDS, 0);

#[map(name = "ICPT_LISTENERS")]
static LISTENERS: HashMap<u64, Listener> = HashMap::pinned(capacity::LISTENERS, 0);

#[map(name = "ICPT_LISTEN_SK")]
static LISTEN_SOCKS: SockHash<ListenKey> = SockHash::pinned(capacity::LISTEN_SOCKS, 0);

#[map(name = "ICPT_SOCKS")]
static SOCKS: LruHashMap<u64, ConnRecord> = LruHashMap::pinned(capacity::SOCKS, 0);

#[map(name = "ICPT_CONNS")]
static CONNS: LruHashMap<TupleKey, ConnRecord> = LruHashMap::pinned(capacity::CONNS, 0);

#[map(name = "ICPT_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

#[map(name = "ICPT_BLOCKS")]
static BLOCKS: HashMap<BlockKey, BlockValue> = HashMap::pinned(capacity::BLOCKS, 0);

#[map(name = "ICPT_STATE")]
static STATE: Array<State> = Array::pinned(1, 0);

#[map(name = "ICPT_PROC_CHANGES")]
static PROC_CHANGES: Array<u64> = Array::with_max_entries(capacity::PROC_SLOTS, 0);

/// Return value of a cgroup sock_addr program that lets the call proceed.
const PROCEED: i32 = 1;
/// Return value that fails the call; the errno is what `bpf_set_retval` set (default EPERM).
const REJECT: i32 = 0;

const SOCK_STREAM: u32 = 1;
const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
/// 127.0.0.1 as the kernel stores `user_ip4` (network byte order in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as four network-order words.
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match try_connect::<false>(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match try_connect::<true>(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// Unconnected UDP sends (`sendto`/`sendmsg` with an address; a connected socket was judged by
/// `connect4`). An IPv4-mapped destination of an IPv6 socket comes here too: the kernel hands
/// such a send to the IPv4 path before the IPv6 hook.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    match try_sendmsg::<false>(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    match try_sendmsg::<true>(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername::<false>(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername::<true>(&ctx);
    PROCEED
}

/// A socket of the attach cgroup is closed: its record goes (a connect that failed after
/// `connect*` recorded it and before the handshake started — an IPv4-mapped address on an
/// `IPV6_V6ONLY` socket, a source port already in use, a `TCP_FASTOPEN_CONNECT` socket closed
/// before its first write — gets no `sock_ops` callback; left to the LRU, such records would
/// push other agents' out). A connection that reached the proxy has its tuple record, which
/// `sock_ops` drops when it dies.
///
/// Only sockets such a record can be left on are looked up (every socket of the cgroup is
/// closed through here, and non-MCP connect+close loops must stay within a few percent): a
/// TCP socket still in `SYN_SENT` (a deferred SYN, or a connect in progress), or closed with
/// no destination kept (a connect that failed before its SYN resets it). A published one, in
/// any other state, has the state callbacks of `sock_ops`, which drop its record.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: fields of the context's socket.
    let (type_, state, dst_port) =
        unsafe { ((*ctx.sock).type_, (*ctx.sock).state, (*ctx.sock).dst_port) };
    if type_ == SOCK_STREAM && (state == TCP_SYN_SENT || (state == TCP_CLOSE && dst_port == 0)) {
        // SAFETY: the helper reads the context's socket.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = SOCKS.remove(&cookie);
    }
    PROCEED
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    // sock_ops return values are ignored for the callbacks we use.
    0
}

/// An `exec` replaced the calling process's image (its executable, hence its identity).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn proc_exec(_ctx: RawTracePointContext) -> i32 {
    process_changed(PROC_EXEC_STEP);
    0
}

/// An exec is about to replace the calling process's image: counted before its executable
/// changes, so a reading of `/proc/<pid>/exe` in between is known to be unsure.
#[raw_tracepoint(tracepoint = "sched_prepare_exec")]
pub fn proc_prepare_exec(_ctx: RawTracePointContext) -> i32 {
    process_changed(PROC_EXEC_STEP);
    0
}

/// A task exited. Any exit counts, not only the thread-group leader's: the leader may end
/// before its other threads, and only the last exit frees the process id for reuse.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn proc_exit(_ctx: RawTracePointContext) -> i32 {
    process_changed(1);
    0
}

/// Adds `step` to the change counter of the calling process's slot.
#[inline(always)]
fn process_changed(step: u64) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(slot) = PROC_CHANGES.get_ptr_mut(tgid % capacity::PROC_SLOTS) {
        // SAFETY: an aligned u64 inside the map's value area, which other CPUs update only
        // atomically too. Atomic so that no concurrent bump is lost: a lost one could bring
        // the counter back to a value the daemon has seen.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, step,
            )
        };
    }
}

/// The exec generation of process `tgid`'s slot (see [`ConnRecord::exec_gen`]).
#[inline(always)]
fn exec_gen_of(tgid: u32) -> u32 {
    match PROC_CHANGES.get(tgid % capacity::PROC_SLOTS) {
        Some(changes) => exec_gen(*changes),
        None => 0,
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

/// Fail the `connect()` with `ECONNREFUSED`, as if nothing listened: the agent sees an ordinary
/// refusal and its traffic never leaves towards the real server.
#[inline(always)]
fn refuse(counter: u32) -> Result<i32, i32> {
    refuse_with(counter, ECONNREFUSED)
}

/// Fail the call with `errno`, counted under `counter`.
#[inline(always)]
fn refuse_with(counter: u32, errno: i32) -> Result<i32, i32> {
    count(counter);
    // SAFETY: helper call with a plain integer.
    unsafe { bpf_set_retval(-errno) };
    Err(REJECT)
}

/// Is the current task's cgroup, or one of its ancestors, tagged?
#[inline(always)]
fn caller_is_tagged() -> bool {
    // Bounded loop (the verifier accepts it on >= 5.3); level 0 is the root, and the helper
    // returns 0 past the caller's own level.
    for level in 0..MAX_CGROUP_DEPTH {
        // SAFETY: helper call with a plain integer.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        if TAGS.get_ptr(id).is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn block_flags(kind: u32, aux: u32, id: u64) -> u32 {
    let key = BlockKey { kind, aux, id };
    match BLOCKS.get_ptr(key) {
        // SAFETY: a map value pointer, valid for this call.
        Some(v) => unsafe { (*v).flags },
        None => 0,
    }
}

/// The block flags that apply to the caller: its cgroup or an ancestor, its uid, its process,
/// its workload (own cgroup, and uid).
#[inline(always)]
fn caller_blocks() -> u32 {
    caller_process_blocks() | caller_cgroup_blocks()
}

/// The block flags of the caller's uid and process.
#[inline(always)]
fn caller_process_blocks() -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid = bpf_get_current_uid_gid() as u32;
    block_flags(block::UID, 0, u64::from(uid)) | block_flags(block::PID, 0, pid_tgid >> 32)
}

/// The block flags the caller's cgroups name: its cgroup or an ancestor, its workload (own
/// cgroup, and uid). These hold whether or not a tag covers the caller: the revocation named
/// the cgroup itself (untagging it must not open a direct path). A uid or a pid names no
/// population of its own: they apply to tagged callers only (the untagged processes of a
/// revoked uid, a health checker say, are no agents).
#[inline(always)]
fn caller_cgroup_blocks() -> u32 {
    let uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: helper without arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    let mut flags = block_flags(block::WORKLOAD_CGROUP, 0, own)
        | block_flags(block::WORKLOAD_CGROUP_UID, uid, own);
    for level in 0..MAX_CGROUP_DEPTH {
        // SAFETY: helper call with a plain integer.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        flags |= block_flags(block::CGROUP, 0, id);
    }
    flags
}

/// `TCP_LISTEN` (`include/net/tcp_states.h`).
const TCP_LISTEN: u32 = 10;

/// Whether the daemon still holds its listening socket of `family` in the namespace, and it
/// still listens. Its port alone proves nothing once the daemon is gone: any process may bind
/// it then. Nor does the socket's presence in the map: one closed under the daemon (`ss -K`
/// by whoever owns the namespace) stays there until the daemon closes its descriptor, while
/// another process may bind and listen on the port.
#[inline(always)]
fn daemon_listens(netns_cookie: u64, family: u32) -> bool {
    let key = ListenKey {
        netns_cookie,
        family,
        _pad: 0,
    };
    // SAFETY: a map lookup with a pointer to a key on the stack; a socket map hands out a
    // referenced socket (or null), whose state is read (a field the verifier allows for a
    // socket pointer) before it is released.
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::from_ref(&LISTEN_SOCKS).cast_mut().cast(),
            core::ptr::from_ref(&key).cast(),
        );
        if sk.is_null() {
            return false;
        }
        let listening = (*sk.cast::<bpf_sock>()).state == TCP_LISTEN;
        bpf_sk_release(sk);
        listening
    }
}

/// Global switches (userspace keeps the block counts so the common case skips the lookups).
#[inline(always)]
fn state() -> State {
    match STATE.get(0) {
        Some(s) => *s,
        None => State::default(),
    }
}

// V6 is a const parameter, not a runtime flag: with a runtime flag the compiler merges the v4
// and v6 paths into one computed context offset, which the verifier rejects ("dereference of
// modified ctx ptr").
#[inline(always)]
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let v6 = V6;
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the program's context pointer, valid for the whole call.
    let sock_type = unsafe { (*sa).type_ };
    let st = state();
    // Containment: an all-egress block refuses every outbound connection of the cgroup (a
    // datagram socket's with EPERM, as every refused datagram).
    if st.egress_blocks != 0 && caller_blocks() & block::ALL_EGRESS != 0 {
        let errno = if sock_type == SOCK_STREAM {
            ECONNREFUSED
        } else {
            EPERM
        };
        return refuse_with(stats::REFUSED_EGRESS, errno);
    }
    if sock_type != SOCK_STREAM {
        return judge_datagram::<V6>(ctx, &st);
    }
    let Some((dst, server)) = mcp_server::<V6, false>(ctx, &st, ECONNREFUSED)? else {
        return Ok(PROCEED);
    };
    if !agent_may_reach_mcp(&st, ECONNREFUSED)? {
        return Ok(PROCEED);
    }
    // SAFETY: helpers that take the context pointer.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(listener) = (unsafe { LISTENERS.get(netns_cookie) }) else {
        return refuse(stats::REFUSED_NO_LISTENER);
    };
    // A v4-mapped destination on a dual-stack socket becomes an IPv4 connection: it needs the
    // IPv4 listener, addressed as ::ffff:127.0.0.1.
    let mapped = v6 && dst.is_v4_mapped();
    let proxy_port = if v6 && !mapped {
        listener.port6
    } else {
        listener.port4
    };
    if proxy_port == 0
        || !daemon_listens(netns_cookie, if v6 && !mapped { AF_INET6 } else { AF_INET })
    {
        return refuse(stats::REFUSED_NO_LISTENER);
    }

    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let record = ConnRecord {
        orig_dst: dst,
        server_id: unsafe { (*server).server_id },
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        family: if v6 { AF_INET6 } else { AF_INET },
        exec_gen: exec_gen_of((pid_tgid >> 32) as u32),
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie,
        socket_cookie,
        connect_boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    // Without a record the proxy could not tell who connected: refuse rather than redirect.
    if SOCKS.insert(socket_cookie, record, 0).is_err() {
        return refuse(stats::REFUSED_NO_RECORD);
    }

    let be_port = u32::from(proxy_port.to_be());
    unsafe {
        if v6 {
            let target = if mapped {
                [0, 0, V4_MAPPED_WORD, LOOPBACK4]
            } else {
                LOOPBACK6
            };
            // Word-sized stores only: the verifier rejects wider writes to user_ip6.
            (*sa).user_ip6[0] = target[0];
            (*sa).user_ip6[1] = target[1];
            (*sa).user_ip6[2] = target[2];
            (*sa).user_ip6[3] = target[3];
        } else {
            (*sa).user_ip4 = LOOPBACK4;
        }
        (*sa).user_port = be_port;
    }
    count(stats::REDIRECTED);
    Ok(PROCEED)
}

/// The MCP server the destination of `ctx` is an intercepted address of, with that address;
/// `None` for any other destination (and for the daemon's own connections). `Err` when the
/// call is refused here, with `errno`: an agent's (or a revoked cgroup's) to the unspecified
/// address at an intercepted port where this program cannot tell where the kernel sends it
/// (see below). `DATAGRAM`: a UDP connect or send.
#[inline(always)]
fn mcp_server<const V6: bool, const DATAGRAM: bool>(
    ctx: &SockAddrContext,
    st: &State,
    errno: i32,
) -> Result<Option<(Addr, *const ServerValue)>, i32> {
    let v6 = V6;
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the program's context pointer, valid for the whole call.
    let user_port = unsafe { (*sa).user_port };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(user_port as u16);
    // Most connects go to a port no server is intercepted on: one array read settles them.
    let word = PORTS.get(u32::from(port >> 6)).copied().unwrap_or(0);
    if word & (1 << (port & 63)) == 0 {
        return Ok(None);
    }
    // The daemon's own upstream connections, recognised by process and cgroup.
    if st.daemon_tgid != 0
        && (bpf_get_current_pid_tgid() >> 32) as u32 == st.daemon_tgid
        // SAFETY: helper without arguments.
        && unsafe { bpf_get_current_cgroup_id() } == st.daemon_cgroup
    {
        return Ok(None);
    }
    let dst = if v6 {
        // user_ip6 must be read one word at a time (the verifier rejects wider loads).
        let ip = unsafe {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        };
        Addr::from_v6(ip, port)
    } else {
        Addr::from_v4(unsafe { (*sa).user_ip4 }, port)
    };

    // The unspecified IPv4 address (`0.0.0.0`, or `::ffff:0.0.0.0` on a dual-stack socket)
    // goes where the socket's source address is (`ip_route_output_key_hash_rcu`: a zero
    // destination becomes the source), or to 127.0.0.1 from a socket without one: judged as
    // that address. `SERVERS` holds `0.0.0.0:P` for every port P a server is intercepted on.
    // Where this program cannot tell the source, an agent's (or a revoked cgroup's) is
    // refused rather than let through; anyone else's is none of ours:
    // - a socket tied to a device (a VRF) but bound to no address: the device's address;
    // - one bound to an address that is no server's: it may be a broadcast or multicast
    //   address (the limited one, or a subnet's: any process may bind one), whose socket
    //   sends from no address, so to 127.0.0.1 — and `src_ip4` is the bound address;
    // - a datagram: a send can pick its source and interface per message (`IP_PKTINFO`,
    //   `IP_UNICAST_IF`), which this program does not see.
    // A datagram to a broadcast or multicast address at an intercepted port likewise: it
    // reaches a server bound to the wildcard address.
    let dst = if dst.is_v4_mapped() && dst.ip[3] == 0 {
        if SERVERS.get_ptr(dst).is_none() {
            return Ok(None);
        }
        // SAFETY: a sock_addr program's context always has its socket.
        let (src, device) = unsafe {
            let sk = (*sa).__bindgen_anon_1.sk;
            ((*sk).src_ip4, (*sk).bound_dev_if)
        };
        let bound = Addr::from_v4(src, port);
        if !DATAGRAM && src == 0 && device == 0 {
            Addr::from_v4(LOOPBACK4, port)
        } else if !DATAGRAM && src != 0 && SERVERS.get_ptr(bound).is_some() {
            bound
        } else {
            return unknown_destination(st, errno);
        }
    } else if DATAGRAM && fans_out(&dst) {
        return unknown_destination(st, errno);
    } else {
        dst
    };
    Ok(SERVERS.get_ptr(dst).map(|server| (dst, server)))
}

/// A destination at an intercepted port whose address this program cannot tell (see
/// [`mcp_server`]): refused with `errno` for an agent or a revoked cgroup, anyone else's goes
/// on (`Ok(None)`).
#[inline(always)]
fn unknown_destination(st: &State, errno: i32) -> Result<Option<(Addr, *const ServerValue)>, i32> {
    let revoked =
        st.mcp_blocks != 0 && caller_cgroup_blocks() & (block::MCP | block::ALL_EGRESS) != 0;
    if revoked || caller_is_tagged() {
        return refuse_with(stats::REFUSED_UNSPECIFIED, errno).map(|_| None);
    }
    Ok(None)
}

/// IPv4 limited broadcast or multicast (`224.0.0.0/4`), IPv6 multicast (`ff00::/8`): a
/// datagram there reaches every listener of the port, a wildcard-bound server's included.
/// (A subnet's broadcast address cannot be told from the address alone.)
#[inline(always)]
fn fans_out(dst: &Addr) -> bool {
    if dst.is_v4_mapped() {
        let first = dst.ip[3].to_ne_bytes()[0];
        dst.ip[3] == u32::MAX || (224..=239).contains(&first)
    } else {
        dst.ip[0].to_ne_bytes()[0] == 0xff
    }
}

/// Whether the caller is an agent that may reach an MCP server (through the proxy): tagged
/// and not revoked. `Ok(false)` for a caller that is none of ours; `Err` when refused here
/// (with `errno`). Revoked: refused at the kernel, not only at the proxy. A revoked cgroup
/// tagged or not, so that untagging it (or revoking one no tag covers) never opens a direct
/// path.
#[inline(always)]
fn agent_may_reach_mcp(st: &State, errno: i32) -> Result<bool, i32> {
    let revoked = block::MCP | block::ALL_EGRESS;
    let cgroup_blocks = if st.mcp_blocks != 0 {
        caller_cgroup_blocks()
    } else {
        0
    };
    if cgroup_blocks & revoked != 0 {
        return refuse_with(stats::REFUSED_REVOKED, errno).map(|_| false);
    }
    if !caller_is_tagged() {
        return Ok(false);
    }
    if st.mcp_blocks != 0 && caller_process_blocks() & revoked != 0 {
        return refuse_with(stats::REFUSED_REVOKED, errno).map(|_| false);
    }
    Ok(true)
}

/// An unconnected UDP send: refused under an all-egress block, else judged as
/// [`judge_datagram`] judges it.
#[inline(always)]
fn try_sendmsg<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let st = state();
    if st.egress_blocks != 0 && caller_blocks() & block::ALL_EGRESS != 0 {
        return refuse_with(stats::REFUSED_EGRESS, EPERM);
    }
    judge_datagram::<V6>(ctx, &st)
}

/// A datagram (a UDP `connect` or send) to an MCP server's address from an agent, or from a
/// revoked cgroup, is refused with `EPERM` (every refusal of a datagram is): the proxy serves
/// TCP only, and HTTP/3 (QUIC) to the
/// server would go past it. A client that tries QUIC first falls back to TCP, which is
/// redirected. Anyone else's goes on.
#[inline(always)]
fn judge_datagram<const V6: bool>(ctx: &SockAddrContext, st: &State) -> Result<i32, i32> {
    if mcp_server::<V6, true>(ctx, st, EPERM)?.is_none() || !agent_may_reach_mcp(st, EPERM)? {
        return Ok(PROCEED);
    }
    refuse_with(stats::REFUSED_DATAGRAM, EPERM)
}

#[inline(always)]
fn try_getpeername<const V6: bool>(ctx: &SockAddrContext) {
    let v6 = V6;
    let sa = ctx.sock_addr;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = (unsafe { SOCKS.get(cookie) }) else {
        return;
    };
    let dst = record.orig_dst;
    let be_port = u32::from(dst.port.to_be());
    unsafe {
        if v6 {
            (*sa).user_ip6[0] = dst.ip[0];
            (*sa).user_ip6[1] = dst.ip[1];
            (*sa).user_ip6[2] = dst.ip[2];
            (*sa).user_ip6[3] = dst.ip[3];
        } else {
            (*sa).user_ip4 = dst.ip[3];
        }
        (*sa).user_port = be_port;
    }
    count(stats::PEERNAME_REWRITTEN);
}

fn try_sock_ops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if op == BPF_SOCK_OPS_STATE_CB {
        // args[0] is the old state, args[1] the new one; the agent's socket is gone, and so is
        // getpeername's need. Its tuple record goes too when the connection died without a
        // graceful close (reset from an open state, or a connect that never completed: e.g.
        // reset in the accept queue when the daemon stopped), so the proxy never will take
        // it: another process that bound the same source port and dialled the proxy port
        // directly would otherwise be served as it. Not after a graceful close: an agent that
        // sends and closes at once leaves its connection, data and FIN, in the accept queue,
        // while its own socket closes (FIN_WAIT2 handed to a timewait socket) — the proxy
        // still serves it. (This runs before the socket releases its port, so no new
        // connection can have published a record under the tuple yet.)
        let old = ctx.arg(0);
        if ctx.arg(1) == TCP_CLOSE {
            // FIN_WAIT1 too: a graceful close leaves it for FIN_WAIT2 (or CLOSING) first.
            let died = matches!(
                old,
                TCP_ESTABLISHED | TCP_SYN_SENT | TCP_FIN_WAIT1 | TCP_CLOSE_WAIT
            );
            // Only published sockets ask for state callbacks. Their record may be gone already
            // (`sock_release` runs at `close()`, before the states that follow it): the key is
            // built from the socket, in its own namespace (the one `connect*` recorded).
            if died {
                // SAFETY: the helper reads the context's socket.
                let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
                let key = if ctx.family() == AF_INET6 {
                    tuple_key::<true>(ctx, netns_cookie)
                } else {
                    tuple_key::<false>(ctx, netns_cookie)
                };
                // This socket's own (a socket disconnected and connected elsewhere from the
                // same port keeps its callbacks: it must not drop another's record).
                // SAFETY: a map lookup; the value is read at once.
                if unsafe { CONNS.get(&key) }.is_some_and(|r| r.socket_cookie == cookie) {
                    let _ = CONNS.remove(&key);
                }
            }
            let _ = SOCKS.remove(cookie);
        }
        return;
    }
    // TCP_CONNECT_CB runs after the source port is chosen and before the SYN leaves, so the
    // record is in place before the proxy can accept the connection.
    let Some(record) = (unsafe { SOCKS.get(cookie) }) else {
        return;
    };
    // Published only for a connection to the proxy listener of the record's namespace (a
    // socket disconnected with AF_UNSPEC keeps its record into its next connect, redirected
    // or not), and only while the caller may still connect: with TCP_FASTOPEN_CONNECT the SYN
    // waits for the first write, which may come after a revocation. Otherwise the record
    // goes, and the proxy serves no connection without one.
    let v6 = ctx.family() == AF_INET6;
    let (to_proxy, key) = if v6 {
        (
            to_proxy::<true>(ctx, record),
            tuple_key::<true>(ctx, record.netns_cookie),
        )
    } else {
        (
            to_proxy::<false>(ctx, record),
            tuple_key::<false>(ctx, record.netns_cookie),
        )
    };
    let revoked = block::MCP | block::ALL_EGRESS;
    if !to_proxy || (state().mcp_blocks != 0 && record_blocks(record) & revoked != 0) {
        let _ = SOCKS.remove(cookie);
        return;
    }
    publish(ctx, key, record);
}

/// The block flags that name what `record` recorded of its caller: its own cgroup (not its
/// ancestors: sock_ops programs have no helpers for the current task's cgroups before Linux
/// 6.16, and the current task need not be the caller), its workload, uid and process. The
/// proxy judges the rest (a revoked ancestor cgroup, by the caller's cgroup path, failing
/// closed when it cannot tell it).
#[inline(always)]
fn record_blocks(record: &ConnRecord) -> u32 {
    let (cgroup, uid) = (record.cgroup_id, record.uid);
    block_flags(block::CGROUP, 0, cgroup)
        | block_flags(block::WORKLOAD_CGROUP, 0, cgroup)
        | block_flags(block::WORKLOAD_CGROUP_UID, uid, cgroup)
        | block_flags(block::UID, 0, u64::from(uid))
        | block_flags(block::PID, 0, u64::from(record.tgid))
}

/// Whether the socket of `ctx` is connecting to the proxy listener of `record`'s namespace
/// (loopback, at the listener's port). One copy per family, not inlined: see [`tuple_key`].
#[inline(never)]
fn to_proxy<const V6: bool>(ctx: &SockOpsContext, record: &ConnRecord) -> bool {
    // SAFETY: a map lookup; the value is read at once.
    let Some(listener) = (unsafe { LISTENERS.get(record.netns_cookie) }) else {
        return false;
    };
    let port = remote_port(ctx);
    if V6 {
        // SAFETY: the context's own field.
        let ip = unsafe { ip6_words(&(*ctx.ops).remote_ip6) };
        (ip == LOOPBACK6 && port == listener.port6)
            || (ip == [0, 0, V4_MAPPED_WORD, LOOPBACK4] && port == listener.port4)
    } else {
        ctx.remote_ip4() == LOOPBACK4 && port == listener.port4
    }
}

/// The remote port of a sock_ops socket, host order: the kernel gives the network-order port,
/// shifted into the upper 16 bits on little-endian machines.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    let raw = ctx.remote_port();
    u16::from_be(if raw >> 16 != 0 { raw >> 16 } else { raw } as u16)
}

/// An IPv6 address field of the sock_ops context, one volatile 4-byte load per word: the
/// verifier rejects the 8-byte loads the compiler would otherwise combine them into.
///
/// # Safety
/// `words` must be a field of the program's context.
#[inline(always)]
unsafe fn ip6_words(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: per the caller, a readable context field.
    unsafe {
        [
            read_volatile(&words[0]),
            read_volatile(&words[1]),
            read_volatile(&words[2]),
            read_volatile(&words[3]),
        ]
    }
}

/// Publishes `record` under the connection's tuple `key` and asks for state callbacks.
fn publish(ctx: &SockOpsContext, key: TupleKey, record: &ConnRecord) {
    if CONNS.insert(key, *record, 0).is_ok() {
        count(stats::PUBLISHED);
    }
    // Ask for state callbacks so the records are dropped when the socket closes.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
}

/// The key the proxy finds the agent socket's record by: its namespace, its address, and the
/// proxy's port (where the connection was redirected).
// Not inlined, one copy per family: inlined, the compiler merges the v4 and v6 address loads
// into one load from a computed context offset, which the verifier rejects ("dereference of
// modified ctx ptr"), volatile or not.
#[inline(never)]
fn tuple_key<const V6: bool>(ctx: &SockOpsContext, netns_cookie: u64) -> TupleKey {
    // local_port is in host byte order (remote_port: see `remote_port`).
    let local_port = ctx.local_port() as u16;
    let proxy_port = remote_port(ctx);
    let client = if V6 {
        // SAFETY: the context's own field.
        let ip = unsafe { ip6_words(&(*ctx.ops).local_ip6) };
        Addr::from_v6(ip, local_port)
    } else {
        Addr::from_v4(ctx.local_ip4(), local_port)
    };
    TupleKey {
        netns_cookie,
        client,
        proxy_port,
        _pad: 0,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
