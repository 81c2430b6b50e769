//! The way to the real MCP server: an HTTP/1.1 client per server with keep-alive pooling. Its
//! sockets carry [`BYPASS_MARK`] so the connect hooks never redirect the proxy's own traffic.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use interceptor_common::BYPASS_MARK;
use tokio::net::{TcpSocket, TcpStream};

use crate::config::Server;

/// How long to wait for the upstream's TCP handshake before trying the next address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP client for one server.
pub type UpstreamClient = Client<MarkedConnector, Full<Bytes>>;

/// Builds the client for `server`.
pub fn client(server: &Server) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(MarkedConnector {
            addrs: server.upstream_addrs.clone().into(),
            upstream: server.upstream.clone().into(),
        })
}

/// Connects to the server's resolved upstream addresses (whatever the request URI says).
#[derive(Clone, Debug)]
pub struct MarkedConnector {
    addrs: Arc<[SocketAddr]>,
    upstream: Arc<str>,
}

impl tower_service::Service<http::Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let addrs = self.addrs.clone();
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for &addr in addrs.iter() {
                match connect_marked(addr).await {
                    Ok(s) => return Ok(TokioIo::new(s)),
                    Err(e) => last = e,
                }
            }
            Err(io::Error::new(
                last.kind(),
                format!("cannot connect to upstream {upstream}: {last}"),
            ))
        })
    }
}

/// A TCP connection carrying [`BYPASS_MARK`].
pub async fn connect_marked(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket2::SockRef::from(&socket).set_mark(BYPASS_MARK)?;
    socket.set_nodelay(true)?;
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })?
}
