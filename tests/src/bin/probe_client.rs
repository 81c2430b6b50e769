//! An ordinary HTTP client, unaware of interceptor: connect to ADDR, POST a JSON-RPC `ping`,
//! read the response until EOF, and print one JSON line with what happened (its pid, what
//! `getpeername()` said, the response body, or the error).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn main() {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: probe-client ADDR");
        std::process::exit(2);
    };
    let pid = std::process::id();
    let result = (|| -> std::io::Result<(String, String)> {
        let target: SocketAddr = addr
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let peer = stream.peer_addr()?.to_string();
        let body = format!(r#"{{"jsonrpc":"2.0","id":{pid},"method":"ping"}}"#);
        write!(
            stream,
            "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let reply = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((peer, reply))
    })();
    let out = match result {
        Ok((peer, reply)) => serde_json::json!({"pid": pid, "peer": peer, "reply": reply}),
        Err(e) => serde_json::json!({
            "pid": pid,
            "error": e.to_string(),
            "errno": e.raw_os_error(),
        }),
    };
    println!("{out}");
}
