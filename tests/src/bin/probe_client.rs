//! An ordinary TCP client, unaware of interceptor: connect to ADDR, say hello, read the reply
//! until EOF, and print one JSON line with what happened (its pid, what `getpeername()` said,
//! the reply, or the error).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
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
        writeln!(stream, "hello from {pid}")?;
        stream.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
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
