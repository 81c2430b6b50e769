//! The admin socket: a Unix socket (mode 0600, root peers only) speaking one JSON request and
//! one JSON response per line. `interceptor tag|untag|status` are its clients.

use std::{
    io::{self, BufRead, BufReader},
    os::unix::{
        fs::{DirBuilderExt, PermissionsExt},
        net::UnixStream as StdUnixStream,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{Instrument, debug, info_span, warn};

use crate::{daemon::Daemon, identity::Actor};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// A request to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Tag a cgroup (path relative to the cgroup v2 mount).
    Tag { cgroup: String },
    /// Remove a cgroup's tag.
    Untag { cgroup: String },
    /// Everything `status` shows.
    Status,
    /// Re-read the config file and apply its policy.
    Reload,
    /// Revoke an identity.
    Revoke {
        selector: crate::revoke::Selector,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        all_egress: bool,
    },
    /// Lift a revocation.
    Unrevoke { selector: crate::revoke::Selector },
}

/// The listening admin socket.
pub struct AdminServer {
    listener: UnixListener,
}

impl AdminServer {
    /// Binds `path` (mode 0600). A leftover socket file from a dead daemon is replaced; a live
    /// daemon answering on it is an error.
    pub fn bind(path: &Path) -> io::Result<Self> {
        if path.exists() {
            if StdUnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another interceptor daemon answers on {}; stop it first, or give this \
                         one its own daemon.admin_socket",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            if crate::audit::writable_by_others(dir) {
                warn!(folder = %dir.display(), "the admin socket's folder is writable by others \
                    than the daemon's user: while the daemon is down, anyone there may put a \
                    socket of their own at daemon.admin_socket for the CLI to talk to; give it \
                    a folder of root's (the default /run/interceptor)");
            }
        }
        let folder = path.parent().unwrap_or(Path::new("."));
        if !crate::audit::writable_by_others(folder) {
            // Only root can put anything at the path meanwhile.
            let listener = UnixListener::bind(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot bind admin socket {}: {e}", path.display()),
                )
            })?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            return Ok(Self { listener });
        }
        // In a folder others may write: bound and made 0600 in a folder of its own (0700, a
        // fresh name) and then renamed into place: a chmod at the final path would follow a
        // link planted there meanwhile, and `rename` replaces a link itself.
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
        let staging = folder.join(format!(
            ".i{}",
            nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create {} to bind the admin socket in: {e}",
                        staging.display()
                    ),
                )
            })?;
        let staged = staging.join("s");
        let bound = UnixListener::bind(&staged)
            .and_then(|l| {
                std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
                std::fs::rename(&staged, path)?;
                Ok(l)
            })
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot bind admin socket {}: {e}", path.display()),
                )
            });
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&staging);
        Ok(Self { listener: bound? })
    }

    /// Serves requests until the future is dropped.
    pub async fn run(self, daemon: Arc<Daemon>) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let daemon = daemon.clone();
                    tokio::spawn(serve(stream, daemon).instrument(info_span!("admin")));
                }
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn serve(stream: UnixStream, daemon: Arc<Daemon>) {
    // The socket is 0600 already; checking the peer too keeps a mis-set mode from opening it.
    // Its credentials also say who caused the audit events of what it asks.
    let cred = stream.peer_cred().ok();
    let peer_pid = cred.and_then(|c| c.pid()).unwrap_or(0);
    let peer = cred.map(|c| Actor::admin(c.pid(), c.uid(), c.gid()));
    // Judged now, before anything is read: the process that connected, not one given its pid
    // later (confirmed through a pidfd where the kernel gives one).
    let may = may_change(Path::new("/proc"), peer_pid, &stream);
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = TokioBufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    let response = match peer {
        Some(peer) if peer.uid() == 0 => {
            match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
                // Off the async threads: a reload resolves names, tag and revoke read /proc
                // and update maps.
                Ok(Ok(_)) => daemon
                    .change(move |d| handle(d, &line, peer, may))
                    .await
                    .await
                    .unwrap_or_else(
                        |e| json!({"ok": false, "error": format!("the request failed: {e}")}),
                    ),
                Ok(Err(e)) => json!({"ok": false, "error": format!("reading request: {e}")}),
                Err(_) => json!({"ok": false, "error": "no request within 10 s"}),
            }
        }
        _ => json!({"ok": false, "error": "the admin socket is for root only"}),
    };
    let mut out = response.to_string();
    out.push('\n');
    if let Err(e) = write.write_all(out.as_bytes()).await {
        debug!(error = %e, "admin client went away");
    }
}

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers one request of `peer`; `may` says whether it may change what is enforced.
fn handle(daemon: &Daemon, line: &str, peer: Actor, may: Result<(), String>) -> Value {
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    if !matches!(request, Request::Status)
        && let Err(why) = may
    {
        return json!({"ok": false, "error": why});
    }
    // Who asked, for the audit events of what changes (read from /proc when needed).
    let by = || daemon.identity_of(peer);
    let result = match request {
        Request::Tag { cgroup } => daemon.tag(&cgroup, &by()).map(|t| json!(t)),
        Request::Untag { cgroup } => daemon.untag(&cgroup, &by()).map(|t| json!(t)),
        Request::Status => Ok(daemon.status()),
        Request::Reload => daemon.reload(&by()).map(|r| json!(r)),
        Request::Revoke {
            selector,
            reason,
            all_egress,
        } => {
            // A revoked cgroup below a delegated one: its processes can move out of it.
            let warning = match &selector {
                crate::revoke::Selector::Cgroup(p) => {
                    crate::config::normalize_cgroup_path(p).ok().and_then(|p| {
                        daemon
                            .hierarchy
                            .delegation_warning(&p, crate::cgroup::Act::Revoke)
                    })
                }
                _ => None,
            };
            daemon
                .revoke(selector, &reason, all_egress, &by())
                .map(|(r, closed)| {
                    json!({"revocation": r, "closed_connections": closed, "warning": warning})
                })
        }
        Request::Unrevoke { selector } => daemon
            .unrevoke(selector, &by())
            .map(|s| json!({"selector": s})),
    };
    match result {
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

/// CAP_SYS_ADMIN, as a bit of `CapEff`.
const CAP_SYS_ADMIN: u32 = 21;

/// Whether process `pid`, the peer of `stream`, may change what the daemon enforces (tags,
/// revocations, the policy): it holds CAP_SYS_ADMIN (what detaching the programs itself would
/// take) in the daemon's user namespace. Root with its capabilities dropped (a sandboxed
/// service, an agent running as root) or root of another user namespace (one it made to hold
/// every capability there) may read `status` only. The user namespace is the caller's
/// `ns/user` link (reading it takes ptrace access to the caller: a daemon without
/// CAP_SYS_PTRACE is refused it for callers with more capabilities than its own, and refuses
/// them). Where the kernel gives a pidfd of the peer (Linux 6.5+), the reading is confirmed
/// to be of the process that connected, not one given its pid since.
fn may_change(proc_root: &Path, pid: i32, stream: &UnixStream) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let refused = |why: &str| {
        Err(format!(
            "refused: {why}; changing tags, revocations or the policy takes CAP_SYS_ADMIN in the \
             daemon's user namespace, from a process the daemon can see (its pid namespace)"
        ))
    };
    if pid <= 0 {
        return refused("the caller's process is not visible from the daemon's pid namespace");
    }
    let pidfd = match peer_pidfd(stream) {
        Ok(fd) => fd,
        Err(e) => return refused(&format!("the caller's process could not be held ({e})")),
    };
    let dir = proc_root.join(pid.to_string());
    let ns = |p: &Path| std::fs::metadata(p.join("ns/user")).map(|m| (m.dev(), m.ino()));
    match (ns(&dir), ns(&proc_root.join("self"))) {
        (Ok(theirs), Ok(ours)) if theirs == ours => {}
        (Ok(_), Ok(_)) => return refused("the caller is in another user namespace"),
        _ => {
            return refused(
                "the caller's user namespace could not be read (the daemon needs \
                 CAP_SYS_PTRACE for a caller with more capabilities than its own)",
            );
        }
    }
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    if let Some(fd) = &pidfd {
        // Signal 0: existence only. Gone: what was read may be another process's. (EPERM:
        // there, but not ours to signal.)
        use std::os::fd::AsFd;
        if pidfd_signal(fd.as_fd(), 0).is_err_and(|e| e.raw_os_error() == Some(libc::ESRCH)) {
            return refused("the caller exited before it could be judged");
        }
    }
    match effective {
        Some(caps) if caps & (1 << CAP_SYS_ADMIN) != 0 => Ok(()),
        Some(_) => refused("the caller lacks CAP_SYS_ADMIN"),
        None => refused("the caller's capabilities could not be read"),
    }
}

/// A pidfd of process `pid` (`pidfd_open(2)`): signals sent through it reach that process
/// only, never one given its pid later.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open(pid, 0) returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the call just opened, owned from here.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Sends `signal` (0: checks existence) to the process of `pidfd`.
pub fn pidfd_signal(pidfd: std::os::fd::BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a signal to a pidfd, no info struct, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd of the peer of `stream` (`SO_PEERPIDFD`); `None` where the kernel has no such
/// option (before Linux 6.5). Any other failure (the peer already reaped) is an error: its pid
/// may be another process's by now.
fn peer_pidfd(stream: &UnixStream) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // The asm-generic value (x86-64, arm64, …).
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into an int of the length given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            std::ptr::from_mut(&mut fd).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: a descriptor the kernel just gave this process, owned here alone.
    Ok((fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
}

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not reachable.
    #[error(
        "cannot reach the interceptor daemon at {socket}: {error}; is `interceptor run --config …` \
         running with this config (daemon.admin_socket)?"
    )]
    Connect { socket: PathBuf, error: io::Error },
    /// The exchange broke or the answer was not JSON.
    #[error("talking to the daemon at {socket}: {message}")]
    Protocol { socket: PathBuf, message: String },
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the `result` of a successful answer.
pub fn request(socket: &Path, request: &Request) -> Result<Value, ClientError> {
    let protocol = |message: String| ClientError::Protocol {
        socket: socket.to_owned(),
        message,
    };
    let stream = StdUnixStream::connect(socket).map_err(|error| ClientError::Connect {
        socket: socket.to_owned(),
        error,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| protocol(e.to_string()))?;
    let mut line = serde_json::to_string(request).map_err(|e| protocol(e.to_string()))?;
    line.push('\n');
    // MSG_NOSIGNAL: the command runs with SIGPIPE's default action (see main), and a daemon
    // that closes the socket before reading must give an error, not end the command mute.
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        use std::os::fd::AsRawFd as _;
        let sent = nix::sys::socket::send(
            stream.as_raw_fd(),
            rest,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(|e| protocol(format!("sending the request: {e}")))?;
        rest = &rest[sent..];
    }
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => protocol(
                "no answer within 10 s; the request may or may not have been applied: see \
                 `interceptor status`"
                    .into(),
            ),
            _ => protocol(e.to_string()),
        })?;
    let value: Value =
        serde_json::from_str(&answer).map_err(|e| protocol(format!("bad answer: {e}")))?;
    if value["ok"] == Value::Bool(true) {
        Ok(value["result"].clone())
    } else {
        Err(ClientError::Refused(
            value["error"]
                .as_str()
                .unwrap_or("unknown error")
                .to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[tokio::test]
    async fn the_socket_is_made_private_before_it_takes_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A folder others may write (as /tmp is).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod folder");
        let path = dir.path().join("admin.sock");
        // A link planted at the path: replaced, its target's mode untouched.
        let target = dir.path().join("precious");
        std::fs::write(&target, "x").expect("write");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let _server = AdminServer::bind(&path).expect("bind");
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        assert!(meta.file_type().is_socket(), "{meta:?}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let precious = std::fs::metadata(&target).expect("stat target");
        assert_eq!(precious.permissions().mode() & 0o777, 0o644);
        // Nothing of the staging is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }
}
