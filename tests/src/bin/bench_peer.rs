//! Load and measurement tools for `cargo xtask bench` (prints one JSON object per run).
//!
//! - `bench-peer upstream ADDR`: a minimal, fast MCP-ish upstream answering every POST with a
//!   JSON-RPC result for the request's id (so the proxy, not the server, dominates).
//! - `bench-peer client URL REQUESTS CONCURRENCY`: `tools/call` round trips with 1 KiB
//!   arguments over keep-alive connections; latency percentiles and throughput. Each connection
//!   first makes [`WARM_UP`] untimed calls, and the clock starts when all of them have (the
//!   proxy's upstream connections open, the workload's certificate minted): steady keep-alive
//!   traffic, not set-up.
//! - `bench-peer connect ADDR COUNT`: connect+close loop; ns per connect (median, mean, p99).
//! - `bench-peer hold URL COUNT SECONDS`: opens COUNT keep-alive connections, one request each,
//!   and keeps them idle for SECONDS.
//! - `bench-peer audit DIR MODE WRITERS EVENTS`: audit events/s with concurrent writers; each
//!   event has the size and shape of the daemon's `mcp.request` for the 1 KiB call (~1.8 KB).
//! - `bench-peer fdatasync DIR COUNT`: this device's `fdatasync` time: COUNT times, a 1.8 KB
//!   append to a file in DIR and its `fdatasync` (timed alone); median and mean.
//! - `bench-peer pki DIR`: a CA and a server certificate for `bench.test` / 127.0.0.0/8 peers
//!   (`upstream-ca.pem`, `server.pem`, `server-key.pem`).
//! - `bench-peer upstream-tls ADDR DIR CLIENT_CA [close]`: the same upstream behind TLS 1.3
//!   requiring a client certificate issued by CLIENT_CA (the node CA); with `close`, every
//!   answer says `Connection: close`, so a client never reuses a connection (each request of
//!   the proxy's finds its pool cold).
//! - `bench-peer relay LISTEN TARGET`: a byte relay (no parsing at all): the cost of any extra
//!   hop on this machine, for reference.
//! - `bench-peer hook-stats BPFFS_DIR`: run count and total run time (ns) of the programs
//!   attached by the links pinned under `BPFFS_DIR/links` (the kernel counts them while
//!   `kernel.bpf_stats_enabled` is 1).
//! - `bench-peer fresh URL COUNT`: COUNT times: a new connection and its first request; latency
//!   percentiles of connect + first response.
//! - `bench-peer fresh-mtls ADDR PKI_DIR CA_DIR COUNT`: the floor of a new workload's first
//!   request: COUNT times, a new key and certificate from the node CA in CA_DIR (as the daemon
//!   mints them), a TLS 1.3 handshake with it to the `upstream-tls` peer at ADDR (trusting
//!   PKI_DIR's CA, name `bench.test`), and one request; percentiles of the whole (`p50_us`)
//!   and of the handshake and request alone (`handshake_p50_us`).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Answers every POST with a JSON-RPC result for the request's id (with `close`, and
/// `Connection: close`).
async fn serve<I>(io: I, close: bool)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let id = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("id").cloned())
            .unwrap_or(Value::Null);
        let out =
            json!({"jsonrpc":"2.0","id":id,"result":{"content":[{"type":"text","text":"ok"}]}});
        let mut answer = Response::builder().header("content-type", "application/json");
        if close {
            answer = answer.header("connection", "close");
        }
        Ok::<_, std::convert::Infallible>(
            answer
                .body(Full::new(Bytes::from(out.to_string())))
                .unwrap_or_default(),
        )
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

async fn upstream(addr: &str) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, false));
    }
}

fn pki(dir: &str) -> Value {
    interceptor_tests::write_server_pki(
        std::path::Path::new(dir),
        "bench.test",
        &["127.0.0.3", "127.0.0.5"],
        None,
    );
    json!({"pki": dir})
}

async fn upstream_tls(addr: &str, dir: &str, client_ca: &str, close: bool) {
    let dir = std::path::Path::new(dir);
    let acceptor = interceptor_tests::mtls_acceptor(
        &dir.join("server.pem"),
        &dir.join("server-key.pem"),
        std::path::Path::new(client_ca),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            // A client without a certificate from the node CA fails here.
            if let Ok(tls) = acceptor.accept(stream).await {
                serve(tls, close).await;
            }
        });
    }
}

async fn relay(listen: &str, target: &str) {
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    let target: SocketAddr = target.parse().expect("target ip:port");
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

fn call_body(id: u64) -> String {
    json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "x".repeat(1024)}}
    })
    .to_string()
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn try_connection(addr: SocketAddr) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(send)
}

async fn connection(addr: SocketAddr) -> Sender {
    try_connection(addr).await.expect("connect")
}

fn target(url: &str) -> (hyper::Uri, SocketAddr) {
    let uri: hyper::Uri = url.parse().expect("url");
    let addr: SocketAddr = uri
        .authority()
        .expect("authority")
        .as_str()
        .parse()
        .expect("ip:port");
    (uri, addr)
}

fn call_request(uri: &hyper::Uri, addr: SocketAddr, id: u64) -> Request<Full<Bytes>> {
    Request::post(uri.clone())
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from(call_body(id))))
        .expect("request")
}

/// A new workload's first request straight to the mTLS upstream, without the proxy: mint,
/// handshake, request. What any per-workload mTLS costs here.
async fn fresh_mtls(addr: SocketAddr, pki: &str, ca: &str, count: u64) -> Value {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let ca = std::path::Path::new(ca);
    let ca_pem = std::fs::read_to_string(ca.join("ca.pem")).expect("node CA certificate");
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(ca.join("ca-key.pem")).expect("node CA key"),
    )
    .expect("node CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("node CA");
    let ca_der = CertificateDer::from(pem::parse(&ca_pem).expect("CA PEM").into_contents());
    let mut roots = rustls::RootCertStore::empty();
    for item in interceptor_tests::pem_items(&std::path::Path::new(pki).join("upstream-ca.pem")) {
        roots
            .add(CertificateDer::from(item.into_contents()))
            .expect("upstream CA");
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let uri: hyper::Uri = format!("http://{addr}/mcp").parse().expect("uri");
    let (mut whole, mut handshake) = (Vec::new(), Vec::new());
    let mut errors = 0u64;
    for i in 0..count {
        let t = Instant::now();
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names.push(rcgen::SanType::URI(
            format!("spiffe://bench.test/workload/{i}")
                .try_into()
                .expect("URI SAN"),
        ));
        let leaf = params.signed_by(&key, &issuer).expect("leaf");
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(
                vec![leaf.der().clone(), ca_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("client configuration");
        let minted = Instant::now();
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("bench.test").expect("name");
        let Ok(tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
        else {
            errors += 1;
            continue;
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP handshake");
        tokio::spawn(conn);
        match send.send_request(call_request(&uri, addr, i + 1)).await {
            Ok(resp) if resp.status().is_success() => {
                let _ = resp.into_body().collect().await;
                whole.push(t.elapsed().as_micros() as u64);
                handshake.push(minted.elapsed().as_micros() as u64);
            }
            _ => errors += 1,
        }
    }
    whole.sort_unstable();
    handshake.sort_unstable();
    json!({"n": whole.len(), "errors": errors, "p50_us": percentile(&whole, 0.5), "handshake_p50_us": percentile(&handshake, 0.5)})
}

/// Connect + first request on fresh connections, one after another.
async fn fresh(url: &str, count: u64) -> Value {
    let (uri, addr) = target(url);
    let mut lat = Vec::new();
    let mut errors = 0u64;
    for i in 0..count {
        let t = Instant::now();
        let mut send = connection(addr).await;
        match send.send_request(call_request(&uri, addr, i + 1)).await {
            Ok(resp) if resp.status().is_success() => {
                let _ = resp.into_body().collect().await;
                lat.push(t.elapsed().as_micros() as u64);
            }
            _ => errors += 1,
        }
    }
    lat.sort_unstable();
    json!({"n": lat.len(), "errors": errors, "p50_us": percentile(&lat, 0.5), "p99_us": percentile(&lat, 0.99), "first_us": lat.first()})
}

/// Untimed calls each connection makes before the clock starts.
const WARM_UP: u64 = 20;

async fn client(url: &str, requests: u64, concurrency: u64) -> Value {
    let (uri, addr) = target(url);
    let concurrency = concurrency.max(1);
    let per = requests / concurrency;
    let ready = Arc::new(tokio::sync::Barrier::new(concurrency as usize));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let uri = uri.clone();
        let ready = ready.clone();
        tasks.push(tokio::spawn(async move {
            // Every task reaches the barrier, or the others would wait for it for good.
            let Some(mut send) = try_connection(addr).await else {
                ready.wait().await;
                let now = Instant::now();
                return (Vec::new(), per.max(1), now, now);
            };
            let mut warm_errors = 0u64;
            for i in 0..WARM_UP {
                let req = call_request(&uri, addr, u64::MAX / 2 + w * WARM_UP + i);
                match send.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        warm_errors += u64::from(!ok);
                    }
                    Err(_) => match try_connection(addr).await {
                        Some(s) => {
                            warm_errors += 1;
                            send = s;
                        }
                        None => {
                            ready.wait().await;
                            let now = Instant::now();
                            return (Vec::new(), per.max(1), now, now);
                        }
                    },
                }
            }
            ready.wait().await;
            let started = Instant::now();
            let mut lat = Vec::with_capacity(per as usize);
            let mut errors = warm_errors;
            for i in 0..per {
                let req = call_request(&uri, addr, w * per + i + 1);
                let t = Instant::now();
                match send.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        if ok {
                            lat.push(t.elapsed().as_micros() as u64);
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        send = connection(addr).await;
                    }
                }
            }
            (lat, errors, started, Instant::now())
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for t in tasks {
        match t.await {
            Ok((l, e, started, ended)) => {
                all.extend(l);
                errors += e;
                first = Some(first.map_or(started, |f| f.min(started)));
                last = Some(last.map_or(ended, |x| x.max(ended)));
            }
            // A task that panicked (a reconnect after the clock started failed): its share of
            // the requests failed.
            Err(_) => errors += per,
        }
    }
    let secs = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    all.sort_unstable();
    json!({
        "n": all.len(), "errors": errors,
        "p50_us": percentile(&all, 0.5), "p99_us": percentile(&all, 0.99),
        "mean_us": if all.is_empty() { 0 } else { all.iter().sum::<u64>() / all.len() as u64 },
        "rps": if secs > 0.0 { all.len() as f64 / secs } else { 0.0 },
    })
}

fn hook_stats(bpffs: &str) -> Value {
    use aya::programs::links::{FdLink, PinnedLink};
    let links = std::path::Path::new(bpffs).join("links");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&links).expect("links folder") {
        let path = entry.expect("link pin").path();
        let link = FdLink::from(PinnedLink::from_pin(&path).expect("pinned link"));
        ids.push(link.info().expect("link info").program_id());
    }
    let (mut run_ns, mut runs) = (0u64, 0u64);
    let mut by_program = serde_json::Map::new();
    for info in aya::programs::loaded_programs().flatten() {
        if ids.contains(&info.id()) {
            let (ns, n) = (info.run_time().as_nanos() as u64, info.run_count());
            run_ns += ns;
            runs += n;
            let name = info.name_as_str().unwrap_or("?").to_owned();
            by_program.insert(name, json!({"run_ns": ns, "runs": n}));
        }
    }
    json!({"programs": ids.len(), "run_ns": run_ns, "runs": runs, "by_program": by_program})
}

fn connect_loop(addr: &str, count: u64) -> Value {
    let addr: SocketAddr = addr.parse().expect("addr");
    let started = Instant::now();
    let mut ok = 0;
    let mut took = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = Instant::now();
        // Connected and closed (the socket dropped at the end of the block): timed; a failed
        // connect is not (it would pull the median down).
        let connected = std::net::TcpStream::connect(addr).is_ok_and(|s| {
            // Close with RST: no TIME_WAIT piles up, so later runs do not pay a longer
            // ephemeral-port search than earlier ones (that drowned the hook's cost).
            let linger = nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger);
            true
        });
        if connected {
            took.push(t.elapsed().as_nanos() as u64);
            ok += 1;
        }
    }
    let ns = started.elapsed().as_nanos() as u64 / count.max(1);
    took.sort_unstable();
    // The median: a connect now and then waits ~1 s for a retransmitted SYN here (one of
    // 5,000 took 1.02 s in a loop whose median was 30 µs), which swamps a mean.
    json!({
        "connects": ok, "ns_per_connect": ns, "p50_ns": percentile(&took, 0.5),
        "p99_ns": percentile(&took, 0.99), "max_ns": took.last(),
    })
}

async fn hold(url: &str, count: u64, seconds: u64) -> Value {
    let (uri, addr) = target(url);
    let mut held = Vec::new();
    let mut ok = 0;
    for i in 0..count {
        let mut send = connection(addr).await;
        if let Ok(resp) = send.send_request(call_request(&uri, addr, i + 1)).await {
            let _ = resp.into_body().collect().await;
            ok += 1;
        }
        held.push(send);
    }
    println!("{}", json!({"held": ok}));
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    drop(held);
    json!({"held": ok, "done": true})
}

/// The fields of the daemon's `mcp.request` event for the end-to-end benchmark's call (1 KiB
/// arguments): the audit benchmark writes events of that size (~1.8 KB a line).
fn request_event(id: u64) -> Value {
    json!({
        "identity": {
            "cgroup": "/interceptor-bench/tagged", "cgroup_id": 36923, "comm": "tokio-rt-worker",
            "container": null, "exe": "/usr/local/bin/agent", "gid": 1000, "kind": "agent",
            "pid": 3406, "pod": null, "process": "alive", "qos": null, "runtime": null,
            "tid": 3408, "uid": 1000,
            "workload_id": "spiffe://interceptor.local/node/vm/cgroup/interceptor-bench/tagged/uid/1000",
        },
        "server": "bench", "method": "tools/call", "tool": "echo", "name": "echo", "id": id,
        "arguments": {"text": "x".repeat(1024)}, "other_params": null,
        "decision": "allow", "rule": "role bench: allow_tools \"echo\"", "roles": ["bench"],
        "session": null, "protocol": "unspecified",
    })
}

/// This device's `fdatasync`: a line like an audit event appended, then synced (timed).
fn fdatasync_loop(dir: &str, count: u64) -> Value {
    use std::io::Write;
    let path = std::path::Path::new(dir).join("fdatasync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .expect("probe file");
    let mut line = request_event(0).to_string().into_bytes();
    line.push(b'\n');
    let mut took = Vec::with_capacity(count as usize);
    for _ in 0..count {
        file.write_all(&line).expect("append");
        let t = Instant::now();
        file.sync_data().expect("fdatasync");
        took.push(t.elapsed().as_micros() as u64);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    took.sort_unstable();
    json!({
        "n": took.len(), "bytes_per_append": line.len(),
        "p50_us": percentile(&took, 0.5), "p99_us": percentile(&took, 0.99),
        "mean_us": if took.is_empty() { 0 } else { took.iter().sum::<u64>() / took.len() as u64 },
    })
}

async fn audit_bench(dir: &str, mode: &str, writers: u64, events: u64) -> Value {
    use interceptor::audit::{Audit, Durability, RawAudit};
    let durability = match mode {
        "fsync" => Durability::Fsync,
        "async" => Durability::Async,
        _ => Durability::Write,
    };
    let audit = Arc::new(
        Audit::open(
            RawAudit {
                path: std::path::Path::new(dir).join(format!("bench-{mode}.jsonl")),
                durability,
                // No rotation within a run (a full run writes ~180 MB): every run measures
                // the same thing.
                max_file_bytes: 1 << 40,
                ..Default::default()
            },
            r#"{"comm":"bench-peer"}"#,
        )
        .expect("audit"),
    );
    let per = events / writers.max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let audit = audit.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let e = interceptor::audit::event("mcp.request", request_event(w * per + i));
                audit.record(e).await.expect("record");
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let syncs = audit.stats.syncs.load(std::sync::atomic::Ordering::Relaxed);
    let sync_us = audit
        .stats
        .sync_micros
        .load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "events": per * writers,
        "events_per_s": (per * writers) as f64 / secs,
        "fsyncs": syncs,
        "events_per_fsync": if syncs == 0 { 0.0 } else { (per * writers) as f64 / syncs as f64 },
        "mean_fsync_us": sync_us.checked_div(syncs).unwrap_or(0),
    })
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| a.get(i).cloned().unwrap_or_default();
    let num = |i: usize| arg(i).parse::<u64>().unwrap_or(0);
    let out = match arg(0).as_str() {
        "upstream" => {
            upstream(&arg(1)).await;
            return;
        }
        "client" => client(&arg(1), num(2), num(3)).await,
        "connect" => connect_loop(&arg(1), num(2)),
        "hook-stats" => hook_stats(&arg(1)),
        "hold" => hold(&arg(1), num(2), num(3)).await,
        "audit" => audit_bench(&arg(1), &arg(2), num(3), num(4)).await,
        "fdatasync" => fdatasync_loop(&arg(1), num(2)),
        "pki" => pki(&arg(1)),
        "upstream-tls" => {
            upstream_tls(&arg(1), &arg(2), &arg(3), arg(4) == "close").await;
            return;
        }
        "relay" => {
            relay(&arg(1), &arg(2)).await;
            return;
        }
        "fresh" => fresh(&arg(1), num(2)).await,
        "fresh-mtls" => {
            let addr = arg(1).parse().expect("ADDR ip:port");
            fresh_mtls(addr, &arg(2), &arg(3), num(4)).await
        }
        _ => {
            eprintln!("usage: see the module documentation");
            std::process::exit(2);
        }
    };
    println!("{out}");
}
