//! An ordinary HTTP client, unaware of interceptor.
//!
//! `probe-client ADDR`: connect to ADDR, POST a JSON-RPC `ping`, read the response until EOF.
//! `probe-client ADDR --raw FILE`: send FILE's bytes verbatim as the request (for malformed and
//! malicious requests), then read the response until EOF.
//!
//! `PROBE_READ_TIMEOUT_MS` (default 5000): how long a read may wait; a stream that stays open
//! longer ends the read there and what arrived is reported.
//!
//! `PROBE_CONNECTIONS` (default 1): send the request that many times, each on a new connection.
//! `PROBE_THEN_EXEC=PATH`: afterwards, become PATH (same pid) with the same arguments.
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
    let raw = match (args.next().as_deref(), args.next()) {
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
    for _ in 0..connections {
        probe(&addr, raw.clone());
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

/// One connection: send the request, print what happened.
fn probe(addr: &str, raw: Option<Vec<u8>>) {
    let pid = std::process::id();
    let result = (|| -> std::io::Result<(String, String)> {
        let target: SocketAddr = addr
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
        let timeout_ms = std::env::var("PROBE_READ_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000);
        stream.set_read_timeout(Some(Duration::from_millis(timeout_ms)))?;
        let peer = stream.peer_addr()?.to_string();
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
