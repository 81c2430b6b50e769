//! Proxy listeners and the per-connection pipeline: accept → find the kernel record → identity →
//! handle (the MCP-aware HTTP proxy in [`crate::mcp`]). Listeners bind in [`Proxy::bind`], so a taken port fails at start-up.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use interceptor_common::{Addr, Listener, TupleKey};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{audit, bpf::lock, daemon::Daemon, identity::Identity};

/// The proxy's listening sockets in one network namespace.
pub struct Proxy {
    /// Non-blocking; each is registered with the event loop of the worker that accepts on it.
    listeners: Vec<socket2::Socket>,
    /// What the kernel needs to know to redirect here.
    pub entry: Listener,
    /// Cookie of the namespace the listeners live in (the kernel keys its records by it).
    pub netns_cookie: u64,
}

/// Binds `127.0.0.1:port` and, where IPv6 is available, `[::1]:port`, in the calling thread's
/// network namespace.
fn bind_std(port: u16, in_agent_ns: bool) -> io::Result<(Vec<std::net::TcpListener>, Listener)> {
    // Where another process holds the port (any user may bind an unprivileged port on the
    // host, root in an agent's namespace), another port is taken: the programs redirect to
    // the port registered, so a squatter cannot keep the daemon from starting (and with it
    // every tagged agent from its MCP servers). A second daemon on the same pins is refused
    // by their lock, not by the port.
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v4 = bind_or_any(v4, !in_agent_ns)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on 127.0.0.1: {e}")))?;
    listen_options(&v4)?;
    let mut entry = Listener {
        port4: v4.local_addr()?.port(),
        ..Default::default()
    };
    let mut listeners = vec![v4];
    match bind_or_any(SocketAddr::from((Ipv6Addr::LOCALHOST, port)), !in_agent_ns) {
        Ok(v6) => {
            listen_options(&v6)?;
            entry.port6 = v6.local_addr()?.port();
            listeners.push(v6);
        }
        // No IPv6 here: the kernel refuses IPv6 MCP connections rather than letting them go
        // direct (port6 = 0).
        Err(e) => {
            warn!(error = %e, "no IPv6 listener on [::1]:{port}; IPv6 MCP connections will be refused")
        }
    }
    Ok((listeners, entry))
}

/// Non-blocking, and `TCP_NODELAY`, which the connections it accepts inherit (one system call
/// fewer per connection than setting it on each): each event of a server stream goes out when
/// it comes, not held back (Nagle) until the agent acknowledges the previous one.
fn listen_options(listener: &std::net::TcpListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
}

/// Binds `addr`; when another process holds its port (any user may bind an unprivileged port,
/// say `[::1]` while the daemon restarts, or root in an agent's namespace), a port the kernel
/// picks instead: the programs redirect to the port the daemon registers, not to a fixed one,
/// so a squatted port costs nothing but a log line (a warning when `loud`: in an agent's
/// namespace, whose listener its root may close again and again, a debug line).
fn bind_or_any(addr: SocketAddr, loud: bool) -> io::Result<std::net::TcpListener> {
    match std::net::TcpListener::bind(addr) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && addr.port() != 0 => {
            let any = std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))?;
            let listening = any.local_addr()?;
            if loud {
                warn!(taken = %addr, %listening, "daemon.listen_port is held by another process; listening on a port the kernel chose instead (redirects follow it)");
            } else {
                debug!(taken = %addr, %listening, "daemon.listen_port is held in this namespace; listening on a port the kernel chose instead");
            }
            Ok(any)
        }
        r => r,
    }
}

impl Proxy {
    /// Binds in the daemon's own network namespace.
    pub async fn bind(port: u16) -> io::Result<Self> {
        let (listeners, entry) = bind_std(port, false)?;
        Self::from_std(listeners, entry)
    }

    /// Binds inside the network namespace `ns` (e.g. `/proc/<pid>/ns/net`): a short-lived thread
    /// enters it, binds, and ends; the sockets stay in that namespace, the daemon does not.
    pub async fn bind_in(ns: &std::path::Path, inode: u64, port: u16) -> io::Result<Self> {
        let ns = ns.to_owned();
        let (listeners, entry) = tokio::task::spawn_blocking(move || {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let file = std::fs::File::open(&ns)?;
                        crate::netns::check_scanned(&file, inode)?;
                        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                            |e| io::Error::other(format!("entering {}: {e}", ns.display())),
                        )?;
                        bind_std(port, true)
                    })
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("binding thread panicked")))
            })
        })
        .await
        .map_err(io::Error::other)??;
        Self::from_std(listeners, entry)
    }

    fn from_std(listeners: Vec<std::net::TcpListener>, entry: Listener) -> io::Result<Self> {
        let netns_cookie = crate::netns::cookie_of(&listeners[0])?;
        Ok(Self {
            listeners: listeners.into_iter().map(socket2::Socket::from).collect(),
            entry,
            netns_cookie,
        })
    }

    /// Starts accepting: each listener is registered with the event loop of a connection
    /// worker (round robin), whose task accepts on it and serves what it accepts, or hands it to
    /// a less loaded worker ([`crate::workers::Workers::spawn_connection`]). The returned
    /// future, run on the control plane, takes over connections that a stalled worker (a long
    /// synchronous step) leaves waiting on its listener (see [`STALL_CHECK`]); the
    /// accepting stops when it is dropped. Fails if a listener cannot be registered.
    pub fn start(
        self,
        daemon: &Arc<Daemon>,
    ) -> io::Result<impl Future<Output = ()> + Send + 'static> {
        daemon
            .kernel
            .register_listen_sockets(self.netns_cookie, &self.listeners)?;
        let mut accepting = Vec::with_capacity(self.listeners.len());
        for listener in self.listeners {
            // Every accepted connection has the listener's port as its own (no getsockname
            // each).
            let port = listener
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("a proxy listener has no local IP address"))?
                .port();
            let at = Local {
                netns_cookie: self.netns_cookie,
                port,
            };
            // The same listening socket, for the control plane's stall check.
            let spare = listener.try_clone()?;
            let (worker, handle) = daemon.workers.next();
            let listener = {
                let _on_worker = handle.enter();
                // SAFETY: the socket owns its descriptor, which stays open and the same until
                // the AsyncFd drops the socket.
                unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
                    .map_err(|e| io::Error::other(format!("registering a proxy listener: {e}")))?
            };
            let accepted = Arc::new(AtomicU64::new(0));
            let task = handle.spawn(accept_loop(listener, daemon.clone(), at, accepted.clone()));
            accepting.push(Accepting {
                spare,
                at,
                worker,
                accepted,
                task: AbortOnDrop(task),
            });
        }
        Ok(watch_for_stalls(accepting, daemon.clone()))
    }
}

/// How often the control plane looks for connections a stalled worker leaves waiting on its
/// listener while it finds some waiting; they are accepted for it at the second look that
/// finds them waiting with no accept by the worker in between.
pub const STALL_CHECK: Duration = Duration::from_millis(100);

/// The longest pause between two looks: while no connection is found waiting the pause
/// doubles from [`STALL_CHECK`] up to this, so that an idle daemon with listeners in many
/// namespaces does not wake ten times a second for each. A stall is noticed 0.1–1.7 s after
/// the first connection it holds up.
const STALL_CHECK_IDLE: Duration = Duration::from_millis(1600);

/// Connections the control plane accepts per listener and look at most.
const STALL_TAKEOVER: usize = 256;

/// A listener accepted on by a worker.
struct Accepting {
    spare: socket2::Socket,
    at: Local,
    worker: usize,
    /// Accepts its worker made so far that took a connection or failed (out of descriptors:
    /// it backs off and tries again; such a worker is not stalled, and taking its queue over
    /// would fail the same way): its progress.
    accepted: Arc<AtomicU64>,
    task: AbortOnDrop,
}

/// What the stall check saw of a listener at its last look.
#[derive(Debug, Default, Clone, Copy)]
struct Look {
    waiting: bool,
    accepted: u64,
}

impl Look {
    /// Takes a look: whether connections wait on the listener, and how many its worker has
    /// accepted so far. True when its worker is stalled: connections waited at both looks and
    /// the worker accepted none in between. (A busy worker that keeps accepting may leave the
    /// queue non-empty at every look; that is no stall.)
    fn stalled(&mut self, waiting: bool, accepted: u64) -> bool {
        let stalled = waiting && self.waiting && accepted == self.accepted;
        *self = Self { waiting, accepted };
        stalled
    }
}

/// Looks at each listener (see [`STALL_CHECK`]); connections that a stalled worker leaves
/// waiting are accepted here and served by the other workers, and the stalled worker gets no
/// new connections until it next goes idle ([`crate::workers::Workers::set_stalled`]); while
/// it is marked, its listener's connections are taken at the first look that finds them. Ends
/// when an accept loop ends (its listener is dead). With one worker there is no other to
/// serve them: it only waits for the accept loops. (Only workers that accept on a listener are
/// looked at; a worker stalled in the audit log's `write(2)` holds the log's turn, so requests
/// on the other workers wait for it too.)
async fn watch_for_stalls(accepting: Vec<Accepting>, daemon: Arc<Daemon>) {
    let mut pause = STALL_CHECK;
    let mut looks = vec![Look::default(); accepting.len()];
    loop {
        tokio::time::sleep(pause).await;
        if let Some(a) = accepting.iter().find(|a| a.task.0.is_finished()) {
            warn!(
                port = a.at.port,
                worker = a.worker + 1,
                "a proxy accept loop ended"
            );
            return;
        }
        let workers = &daemon.workers;
        if workers.count() < 2 {
            pause = STALL_CHECK_IDLE;
            continue;
        }
        let mut any_waiting = false;
        for (a, look) in accepting.iter().zip(&mut looks) {
            let waiting = has_waiting(&a.spare);
            any_waiting |= waiting;
            let stalled = look.stalled(waiting, a.accepted.load(Ordering::Relaxed));
            if !(stalled || waiting && workers.is_stalled(a.worker)) {
                continue;
            }
            if !workers.set_stalled(a.worker) {
                warn!(
                    worker = a.worker + 1,
                    port = a.at.port,
                    "a connection worker left new connections waiting for {STALL_CHECK:?} \
                     without accepting any; accepting them for it, and giving new connections \
                     to the other workers until it is idle again"
                );
            }
            let taken = take_waiting(&a.spare, STALL_TAKEOVER);
            daemon
                .counters
                .stall_takeovers
                .fetch_add(taken.len() as u64, Ordering::Relaxed);
            for (stream, peer) in taken {
                dispatch(stream, peer, &daemon, a.at);
            }
        }
        pause = if any_waiting {
            STALL_CHECK
        } else {
            (pause * 2).min(STALL_CHECK_IDLE)
        };
    }
}

/// Accepts up to `max` connections waiting on `listener`.
fn take_waiting(listener: &socket2::Socket, max: usize) -> Vec<(std::net::TcpStream, SocketAddr)> {
    let mut taken = Vec::new();
    while taken.len() < max {
        match accept_one(listener) {
            Ok(conn) => taken.push(conn),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                warn!(error = %e, "accept failed");
                break;
            }
        }
    }
    taken
}

/// Whether connections wait to be accepted on `listener`.
fn has_waiting(listener: &socket2::Socket) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        listener.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// Aborts a task (here: a listener's accept loop on its worker) when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts a connection: `accept4(2)` gives the socket non-blocking, close-on-exec, and its
/// peer's address in one call, unregistered: it goes straight to a worker's event loop (a
/// `tokio::net::TcpListener` would register it with this runtime first, two `epoll_ctl`
/// calls on the path of every new connection).
fn accept_one(listener: &socket2::Socket) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let (socket, addr) = listener.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection with no IP peer address"))?;
    Ok((socket.into(), peer))
}

/// Has an accepted connection served: on the least loaded worker, the current one unless it
/// serves more than [`crate::workers::BALANCE_SLACK`] more (see
/// [`crate::workers::Workers::spawn_connection`]).
fn dispatch(stream: std::net::TcpStream, peer: SocketAddr, daemon: &Arc<Daemon>, at: Local) {
    let id = daemon.counters.accepted.fetch_add(1, Ordering::Relaxed) + 1;
    let task = {
        let daemon = daemon.clone();
        async move {
            // TCP_NODELAY comes from the listener (`listen_options`).
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream, peer, daemon, id, at).await,
                Err(e) => {
                    warn!(error = %e, client.addr = %peer, "cannot register the accepted socket with its worker; closing it");
                    // Its record goes too: left, it would serve whoever binds the same source
                    // port and dials the proxy port as this agent.
                    let _ = daemon.kernel.take_conn(&tuple_key(peer, at));
                }
            }
        }
    };
    daemon
        .workers
        .spawn_connection(task.instrument(info_span!("conn", id)));
}

async fn accept_loop(
    listener: AsyncFd<socket2::Socket>,
    daemon: Arc<Daemon>,
    at: Local,
    accepted: Arc<AtomicU64>,
) {
    // Failures are logged at most once a second (with how many went unlogged): descriptors
    // run out on every listener at once.
    let mut warned: Option<std::time::Instant> = None;
    let mut unlogged = 0u64;
    loop {
        // Waits for readiness and retries on WouldBlock itself, within the task's cooperative
        // budget (a burst of connects cannot hold the thread, nor delay an abort).
        match listener.async_io(Interest::READABLE, accept_one).await {
            Ok((stream, peer)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                dispatch(stream, peer, &daemon, at);
            }
            // The listener itself is gone (closed under the daemon: `ss -K` in a namespace an
            // agent owns): end, rather than spin on an error that readiness keeps reporting.
            // Its namespace's listener is opened again by the namespace scan; the host's ends
            // the daemon (fail closed: the kernel refuses tagged connects without it).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EBADF | libc::ENOTSOCK | libc::EOPNOTSUPP)
                ) =>
            {
                warn!(error = %e, port = at.port, netns.cookie = at.netns_cookie, "the proxy listener no longer accepts; its accept loop ends");
                return;
            }
            Err(e) => {
                // Out of descriptors or memory, or refused by a security module (before the
                // connection left the queue: the same error would come at once): back off
                // instead of spinning. Anything else concerns that one connection (aborted,
                // refused by a firewall rule, …).
                let back_off = matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EMFILE
                            | libc::ENFILE
                            | libc::ENOBUFS
                            | libc::ENOMEM
                            | libc::EACCES
                            | libc::EPERM
                    )
                );
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    warn!(error = %e, unlogged, "accept failed{}", if back_off { "; retrying shortly" } else { "" });
                    warned = Some(std::time::Instant::now());
                    unlogged = 0;
                } else {
                    unlogged += 1;
                }
                if back_off {
                    // Attending to the listener, not stalled (see `Accepting::accepted`).
                    accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Where a connection was accepted: the namespace's cookie and the listener's port, the proxy's
/// half of the tuple the kernel published the record under.
#[derive(Clone, Copy)]
struct Local {
    netns_cookie: u64,
    port: u16,
}

/// One agent connection through the pipeline. The work before and after serving is done by
/// synchronous functions: their locals (kernel record, identity, log fields) would otherwise
/// take room in this future for as long as the connection stays open.
async fn serve(stream: TcpStream, peer: SocketAddr, daemon: Arc<Daemon>, id: u64, at: Local) {
    let (conn, admission) = match open(peer, &daemon, id, at) {
        Opened::Conn(conn, admission) => (conn, admission),
        Opened::Closed => return,
        // On the heap: its buffers would otherwise take room in every connection's future.
        Opened::OverLimit => return Box::pin(refuse_over_limit(stream, daemon)).await,
    };
    // Unregisters the connection however the task ends: served to the end, or dropped with
    // its worker when the daemon stops after the grace period. (Its `connection.close` is
    // recorded when the last reference to it goes: HTTP/2 streams run as tasks of their own
    // and may finish later.)
    let _closing = Closing {
        conn: conn.clone(),
        id,
        _admission: admission,
    };
    conn.warm_upstream();
    crate::mcp::serve(stream, conn).await;
}

/// Unregisters a connection when dropped: see [`close`].
struct Closing {
    conn: Arc<crate::mcp::Conn>,
    id: u64,
    _admission: Admission,
}

impl Drop for Closing {
    fn drop(&mut self) {
        close(&self.conn, self.id);
    }
}

/// What becomes of an accepted connection.
enum Opened {
    Conn(Arc<crate::mcp::Conn>, Admission),
    /// Closed unserved (the reason is logged).
    Closed,
    /// Its cgroup has `daemon.max_connections_per_cgroup` open already.
    OverLimit,
}

/// The key of the kernel record of the connection from `peer` accepted at `at`.
fn tuple_key(peer: SocketAddr, at: Local) -> TupleKey {
    TupleKey {
        netns_cookie: at.netns_cookie,
        client: Addr::from(peer),
        proxy_port: at.port,
        _pad: 0,
    }
}

/// Finds the kernel record of an accepted connection and builds its identity; registers the
/// connection as live.
fn open(peer: SocketAddr, daemon: &Arc<Daemon>, id: u64, at: Local) -> Opened {
    let counters = &daemon.counters;
    let key = tuple_key(peer, at);
    let Some(record) = daemon.kernel.take_conn(&key) else {
        let closed = counters.no_record.fetch_add(1, Ordering::Relaxed) + 1;
        // At most once a second, as over-limit refusals: a client dialling the proxy port in
        // a loop cannot flood the log.
        let now = crate::ca::unix_now();
        if counters.no_record_logged.swap(now, Ordering::Relaxed) != now {
            warn!(
                client.addr = %peer,
                closed_so_far = closed,
                "no kernel record for this connection; closing it. Only connections the kernel \
                 redirected are served (a direct connection to the proxy port has no identity; \
                 logged at most once a second, closed_so_far counts all)"
            );
        }
        return Opened::Closed;
    };
    let Some(admission) = Admission::new(daemon, record.cgroup_id) else {
        let refused = counters.over_limit.fetch_add(1, Ordering::Relaxed) + 1;
        daemon.metrics.refused_connections.inc();
        // At most once a second: a client retrying in a loop cannot flood the log.
        let now = crate::ca::unix_now();
        if counters.over_limit_logged.swap(now, Ordering::Relaxed) != now {
            warn!(
                client.addr = %peer,
                client.pid = record.tgid,
                cgroup.id = record.cgroup_id,
                limit = daemon.config.daemon.max_connections_per_cgroup,
                refused_so_far = refused,
                "connection refused: its cgroup has daemon.max_connections_per_cgroup agent \
                 connections open; close idle ones in the agent or raise the limit (logged \
                 at most once a second; refused_so_far counts all)"
            );
        }
        return Opened::OverLimit;
    };
    let identity = Identity::from_record_cached(
        &record,
        std::path::Path::new("/proc"),
        &daemon.config.naming,
        &daemon.proc_cache,
        |tgid| {
            daemon
                .kernel
                .process_changes_since(tgid, record.connect_boot_ns)
        },
        |path| daemon.hierarchy.id(path).ok(),
    );
    let Some(server) = daemon.config.server(record.server_id) else {
        warn!(
            server.id = record.server_id,
            "record names an unknown server; closing"
        );
        return Opened::Closed;
    };
    info!(
        client.pid = identity.pid,
        client.tid = identity.tid,
        client.uid = identity.uid,
        client.gid = identity.gid,
        // Quoted: the process names itself (a line break would forge a log line).
        client.comm = identity.comm.as_str(),
        client.exe = identity.exe.as_deref().unwrap_or("?"),
        client.cgroup = identity.cgroup.as_deref().unwrap_or("?"),
        client.cgroup_id = identity.cgroup_id,
        client.process = %identity.liveness,
        client.container = identity.placement.container.as_deref().unwrap_or(""),
        client.pod = identity.placement.pod.as_deref().unwrap_or(""),
        client.workload_id = identity.workload_id.as_deref().unwrap_or("?"),
        client.addr = %peer,
        dst.original = %identity.original_dst,
        server.name = %server.name,
        server.upstream = %server.upstream,
        "connection redirected"
    );
    counters.active.fetch_add(1, Ordering::Relaxed);
    let server_id = record.server_id as usize;
    let conn = Arc::new(crate::mcp::Conn::new(daemon.clone(), identity, server_id));
    daemon.audit.record_later(
        audit::Event::new("connection.open")
            .raw("identity", &conn.who)
            .field("server", &server.name)
            .field("client", &peer.to_string())
            .field("dst_original", &conn.identity.original_dst.to_string()),
    );
    // Registered before the check, so a revocation made in between still finds it.
    lock(&daemon.live).insert(id, conn.clone());
    if let Some(reason) = daemon.revocation_for(&conn.identity) {
        // Revoked after connect() passed (a workload-id revocation, or a race): every request
        // on this connection is answered with the revocation.
        conn.revoke(reason);
    }
    daemon.metrics.connections.inc();
    daemon.metrics.active_connections.inc();
    Opened::Conn(conn, admission)
}

/// A connection counted against its cgroup's `daemon.max_connections_per_cgroup` (the
/// process's own cgroup: each container of a pod is one); counted out when dropped, however
/// the connection ends.
struct Admission {
    daemon: Arc<Daemon>,
    cgroup_id: u64,
}

impl Admission {
    /// Counts a connection of cgroup `cgroup_id` in, unless the cgroup already has the limit
    /// open (one agent cannot take all of the daemon's memory and descriptors).
    fn new(daemon: &Arc<Daemon>, cgroup_id: u64) -> Option<Self> {
        let limit = daemon.config.daemon.max_connections_per_cgroup;
        let mut open = lock(&daemon.per_cgroup);
        let n = open.entry(cgroup_id).or_insert(0);
        if limit != 0 && *n >= limit {
            return None;
        }
        *n += 1;
        Some(Self {
            daemon: daemon.clone(),
            cgroup_id,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut open = lock(&self.daemon.per_cgroup);
        if let Some(n) = open.get_mut(&self.cgroup_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.cgroup_id);
            }
        }
    }
}

/// How long a refused connection's request is read and dropped after the answer, so that
/// closing does not reset the connection before the agent has read why.
const LINGER: Duration = Duration::from_millis(500);
/// Most refused connections lingering at once; beyond, they are closed at once (a client
/// retrying in a loop cannot pin the daemon's descriptors with them).
const MAX_LINGERING: u64 = 64;

/// Answers a connection over its cgroup's limit with HTTP 503 and a JSON-RPC error saying
/// why, then closes it.
async fn refuse_over_limit(mut stream: TcpStream, daemon: Arc<Daemon>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lingering = Lingering::count(&daemon.counters.lingering);
    if lingering.before >= MAX_LINGERING {
        return;
    }
    let limit = daemon.config.daemon.max_connections_per_cgroup;
    let body = crate::mcp::jsonrpc::error_response(
        None,
        crate::mcp::jsonrpc::code::INTERNAL_ERROR,
        &format!(
            "interceptor: this cgroup has {limit} MCP connections open, the most \
             daemon.max_connections_per_cgroup allows; close idle ones and retry"
        ),
    )
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // Bounded in time: an agent that reads nothing does not hold this task.
    let _ = tokio::time::timeout(LINGER, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// One refused connection being answered, counted while it lasts.
struct Lingering<'a> {
    count: &'a AtomicU64,
    /// How many there were before this one.
    before: u64,
}

impl<'a> Lingering<'a> {
    fn count(count: &'a AtomicU64) -> Self {
        let before = count.fetch_add(1, Ordering::Relaxed);
        Self { count, before }
    }
}

impl Drop for Lingering<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Unregisters a connection that was served.
fn close(conn: &crate::mcp::Conn, id: u64) {
    let daemon = &conn.daemon;
    daemon.metrics.active_connections.dec();
    lock(&daemon.live).remove(&id);
    daemon.counters.active.fetch_sub(1, Ordering::Relaxed);
    let (up, down, requests) = conn.totals();
    debug!(
        bytes.up = up,
        bytes.down = down,
        requests,
        "connection closed"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_squatted_port_gives_way_to_one_the_kernel_picks_where_it_may() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = squatter.local_addr().unwrap().port();
        // In the daemon's own namespace as in an agent's: another port, the one registered
        // for the kernel (a squatter cannot keep the daemon from starting).
        for in_agent_ns in [false, true] {
            let (listeners, entry) = super::bind_std(port, in_agent_ns).unwrap();
            let bound = listeners[0].local_addr().unwrap().port();
            assert_ne!(bound, port);
            assert_eq!(entry.port4, bound);
        }
    }

    use super::*;

    #[test]
    fn accepted_connections_have_nagle_off_from_their_listener() {
        let (listeners, _) = bind_std(0, false).expect("bind");
        for listener in listeners {
            let addr = listener.local_addr().expect("address");
            let _client = std::net::TcpStream::connect(addr).expect("connect");
            let listener = socket2::Socket::from(listener);
            let (stream, _) = accept_one(&listener).expect("accept");
            assert!(stream.nodelay().expect("TCP_NODELAY"), "{addr}");
        }
    }

    #[test]
    fn a_worker_is_stalled_when_connections_wait_twice_with_no_accept_between() {
        let mut look = Look::default();
        // Nothing waiting, or waiting at one look only: fine.
        assert!(!look.stalled(false, 0));
        assert!(!look.stalled(true, 0));
        // Waiting again and no accept since: stalled.
        assert!(look.stalled(true, 0));
        // A busy worker that keeps accepting while the queue is never empty: fine.
        let mut busy = Look::default();
        for accepted in [5, 9, 14, 20] {
            assert!(!busy.stalled(true, accepted));
        }
        // It stops accepting with connections waiting: stalled at the next look.
        assert!(busy.stalled(true, 20));
        // Drained (by the control plane) and nothing new: fine again.
        assert!(!busy.stalled(false, 20));
    }

    #[test]
    fn waiting_connections_are_taken_up_to_a_limit() {
        let listener =
            socket2::Socket::from(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("IP");
        assert!(!has_waiting(&listener));
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        assert!(has_waiting(&listener));
        let first = take_waiting(&listener, 2);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].1, clients[0].local_addr().expect("client address"));
        assert!(has_waiting(&listener));
        assert_eq!(take_waiting(&listener, 2).len(), 1);
        assert!(!has_waiting(&listener));
        assert!(take_waiting(&listener, 2).is_empty());
    }
}
