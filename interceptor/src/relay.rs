//! The handling stage for an identified connection. Today: relay bytes both ways to the server's
//! upstream. The MCP-aware proxy replaces this stage; `accept` hands it the same inputs.

use std::{io, net::SocketAddr, time::Duration};

use interceptor_common::BYPASS_MARK;
use tokio::net::{TcpSocket, TcpStream};

use crate::config::Server;

/// How long to wait for the upstream's TCP handshake before giving up on an address.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors reaching or talking to the upstream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No upstream address accepted the connection.
    #[error("cannot connect to upstream {upstream} of server {server}: {last}")]
    Connect {
        server: String,
        upstream: String,
        last: io::Error,
    },
    /// The relay broke mid-stream.
    #[error("relay with upstream {upstream} failed: {error}")]
    Relay { upstream: String, error: io::Error },
}

/// Bytes moved by one relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Relayed {
    /// Agent → upstream.
    pub up: u64,
    /// Upstream → agent.
    pub down: u64,
}

/// Opens a connection to the first reachable upstream address. The socket carries
/// [`BYPASS_MARK`] so the connect hooks never redirect the proxy's own traffic.
pub async fn connect_upstream(server: &Server) -> Result<TcpStream, Error> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for &addr in &server.upstream_addrs {
        match connect_marked(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(Error::Connect {
        server: server.name.clone(),
        upstream: server.upstream.clone(),
        last,
    })
}

async fn connect_marked(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket2::SockRef::from(&socket).set_mark(BYPASS_MARK)?;
    socket.set_nodelay(true)?;
    tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Relays until both directions are closed.
pub async fn relay(
    mut agent: TcpStream,
    mut upstream: TcpStream,
    server: &Server,
) -> Result<Relayed, Error> {
    let (up, down) = tokio::io::copy_bidirectional(&mut agent, &mut upstream)
        .await
        .map_err(|error| Error::Relay {
            upstream: server.upstream.clone(),
            error,
        })?;
    Ok(Relayed { up, down })
}
