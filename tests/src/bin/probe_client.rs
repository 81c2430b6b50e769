//! An ordinary HTTP client, unaware of interceptor.
//!
//! `probe-client ADDR`: connect to ADDR, POST a JSON-RPC `ping`, read the response until EOF.
//! `probe-client ADDR --raw FILE`: send FILE's bytes verbatim as the request (for malformed and
//! malicious requests), then read the response until EOF.
//! `probe-client ADDR --udp send|connect|send-mapped|broadcast`: one UDP datagram
//! (`probe <pid>`) to ADDR: `sendto` from an unconnected socket, `connect` then `send`, (IPv4
//! ADDR) `sendto` its `::ffff:` form from an IPv6 socket, or `sendto` with `SO_BROADCAST` set;
//! prints `sent` (bytes) or the error.
//!
//! `PROBE_READ_TIMEOUT_MS` (default 5000): how long a read may wait; a stream that stays open
//! longer ends the read there and what arrived is reported.
//!
//! `PROBE_CONNECTIONS` (default 1): send the request that many times, each on a new connection.
//! `PROBE_DELAY_MS` (default 0): wait that long between connecting and sending.
//! `PROBE_BIND=IP`: bind the socket to IP (any port) before connecting.
//! `PROBE_THEN_EXEC=PATH`: afterwards, become PATH (same pid) with the same arguments.
//! `PROBE_EXEC_BEFORE_SEND=PATH`: connect with `TCP_FASTOPEN_CONNECT` (nothing is sent until
//! the first write), then become PATH (same pid), which sends the request on that socket
//! (handed over in `PROBE_FD`).
//!
//! Prints one JSON line per connection with what happened: its pid, what `getpeername()` said,
//! the response status and body, or the error.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(addr) = args.next() else {
        eprintln!("usage: probe-client ADDR [--raw FILE]");
        std::process::exit(2);
    };
    let (flag, value) = (args.next(), args.next());
    if let (Some("--udp"), Some(mode)) = (flag.as_deref(), value.as_deref()) {
        datagram(&addr, mode);
        return;
    }
    let raw = match (flag.as_deref(), value) {
        (Some("--raw"), Some(file)) => match std::fs::read(&file) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("cannot read {file}: {e}");
                std::process::exit(2);
            }
        },
        (None, _) => None,
        _ => {
            eprintln!("usage: probe-client ADDR [--raw FILE]");
            std::process::exit(2);
        }
    };
    let connections: usize = std::env::var("PROBE_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if let Some(fd) = std::env::var("PROBE_FD").ok().and_then(|v| v.parse().ok()) {
        // SAFETY: the descriptor the previous image of this process left open for us.
        let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        probe(&addr, raw, Some(stream));
        return;
    }
    if let Some(next) = std::env::var_os("PROBE_EXEC_BEFORE_SEND") {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        let stream = match fastopen_connect(&addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot connect to {addr}: {e}");
                std::process::exit(2);
            }
        };
        let e = std::process::Command::new(&next)
            .args(std::env::args_os().skip(1))
            .env_remove("PROBE_EXEC_BEFORE_SEND")
            .env("PROBE_FD", stream.as_raw_fd().to_string())
            .exec();
        eprintln!("cannot exec {}: {e}", next.to_string_lossy());
        std::process::exit(2);
    }
    for _ in 0..connections {
        probe(&addr, raw.clone(), None);
    }
    if let Some(next) = std::env::var_os("PROBE_THEN_EXEC") {
        use std::os::unix::process::CommandExt;
        let e = std::process::Command::new(&next)
            .args(std::env::args_os().skip(1))
            .env_remove("PROBE_THEN_EXEC")
            .exec();
        eprintln!("cannot exec {}: {e}", next.to_string_lossy());
        std::process::exit(2);
    }
}

fn parse_addr(addr: &str) -> std::io::Result<SocketAddr> {
    addr.parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))
}

/// A socket connected with `TCP_FASTOPEN_CONNECT`: `connect()` returns at once and the
/// handshake starts with the first write. Inherited across `exec` (no close-on-exec).
fn fastopen_connect(addr: &str) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, connect, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let target = parse_addr(addr)?;
    let family = if target.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::empty(), None)?;
    setsockopt(&fd, sockopt::TcpFastOpenConnect, &true)?;
    // Without a cookie cached for the destination the kernel would send the SYN at once;
    // `TCP_FASTOPEN_NO_COOKIE` (any process may set it) defers it to the first write.
    const TCP_FASTOPEN_NO_COOKIE: nix::libc::c_int = 34;
    let on: nix::libc::c_int = 1;
    // SAFETY: a valid socket and a pointer to an int of the length given.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            TCP_FASTOPEN_NO_COOKIE,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of_val(&on) as nix::libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    connect(fd.as_raw_fd(), &SockaddrStorage::from(target))?;
    Ok(TcpStream::from(fd))
}

/// A TCP connection to `addr` from a socket bound to `ip` (any port) first.
fn bound_connect(ip: &str, addr: &str) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket,
    };
    use std::os::fd::AsRawFd;
    let target = parse_addr(addr)?;
    let local = parse_addr(&format!("{ip}:0"))?;
    let family = if target.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::empty(), None)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(target))?;
    Ok(TcpStream::from(fd))
}

/// One connection (`connected`, or a new one): send the request, print what happened.
fn probe(addr: &str, raw: Option<Vec<u8>>, connected: Option<TcpStream>) {
    let pid = std::process::id();
    let result = (|| -> std::io::Result<(String, String)> {
        let mut stream = match connected {
            Some(s) => s,
            None => match std::env::var("PROBE_BIND") {
                Ok(ip) => bound_connect(&ip, addr)?,
                Err(_) => TcpStream::connect_timeout(&parse_addr(addr)?, Duration::from_secs(5))?,
            },
        };
        let timeout_ms = std::env::var("PROBE_READ_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000);
        stream.set_read_timeout(Some(Duration::from_millis(timeout_ms)))?;
        if let Some(ms) = std::env::var("PROBE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let request = raw.unwrap_or_else(|| {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{pid},"method":"ping"}}"#);
            format!(
                "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        });
        stream.write_all(&request)?;
        let mut response = Vec::new();
        if let Err(e) = stream.read_to_end(&mut response) {
            // A stream that is still open: report what arrived.
            let timed_out = matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            );
            if !timed_out || response.is_empty() {
                return Err(e);
            }
        }
        // After the exchange: a fast-open socket is connected only once its SYN was answered.
        let peer = stream.peer_addr()?.to_string();
        Ok((peer, String::from_utf8_lossy(&response).into_owned()))
    })();
    let out = match result {
        Ok((peer, response)) => {
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u16>().ok());
            serde_json::json!({"pid": pid, "peer": peer, "status": status, "head": head, "reply": body})
        }
        Err(e) => serde_json::json!({
            "pid": pid,
            "error": e.to_string(),
            "errno": e.raw_os_error(),
        }),
    };
    println!("{out}");
}

/// One UDP datagram to `addr` as `mode` says (see the module documentation).
fn datagram(addr: &str, mode: &str) {
    use std::net::{IpAddr, UdpSocket};
    let pid = std::process::id();
    let result = (|| -> std::io::Result<usize> {
        let target = parse_addr(addr)?;
        let payload = format!("probe {pid}");
        let any = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        match mode {
            "send" => UdpSocket::bind(any)?.send_to(payload.as_bytes(), target),
            "broadcast" => {
                let socket = UdpSocket::bind(any)?;
                socket.set_broadcast(true)?;
                socket.send_to(payload.as_bytes(), target)
            }
            "connect" => {
                let socket = UdpSocket::bind(any)?;
                socket.connect(target)?;
                socket.send(payload.as_bytes())
            }
            "send-mapped" => {
                let IpAddr::V4(v4) = target.ip() else {
                    return Err(std::io::Error::other("send-mapped needs an IPv4 ADDR"));
                };
                let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), target.port());
                UdpSocket::bind("[::]:0")?.send_to(payload.as_bytes(), mapped)
            }
            other => Err(std::io::Error::other(format!(
                "unknown --udp mode {other:?} (send, connect, send-mapped, broadcast)"
            ))),
        }
    })();
    let out = match result {
        Ok(sent) => serde_json::json!({"pid": pid, "sent": sent}),
        Err(e) => {
            serde_json::json!({"pid": pid, "error": e.to_string(), "errno": e.raw_os_error()})
        }
    };
    println!("{out}");
}
