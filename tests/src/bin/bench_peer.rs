//! Load and measurement tools for `cargo xtask bench` (prints one JSON object per run).
//!
//! - `bench-peer upstream ADDR`: a minimal, fast MCP-ish upstream answering every POST with a
//!   JSON-RPC result for the request's id (so the proxy, not the server, dominates).
//! - `bench-peer client URL REQUESTS CONCURRENCY`: `tools/call` round trips with 1 KiB
//!   arguments over keep-alive connections; latency percentiles and throughput.
//! - `bench-peer connect ADDR COUNT`: connect+close loop; mean ns per connect.
//! - `bench-peer hold URL COUNT SECONDS`: opens COUNT keep-alive connections, one request each,
//!   and keeps them idle for SECONDS.
//! - `bench-peer audit DIR MODE WRITERS EVENTS`: audit events/s with concurrent writers.
//! - `bench-peer micro`: parse + re-serialise, policy decision, list filtering (ns per op).

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

async fn upstream(addr: &str) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
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
                let out = json!({"jsonrpc":"2.0","id":id,"result":{"content":[{"type":"text","text":"ok"}]}});
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(out.to_string())))
                        .unwrap_or_default(),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
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

async fn connection(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

async fn client(url: &str, requests: u64, concurrency: u64) -> Value {
    let uri: hyper::Uri = url.parse().expect("url");
    let addr: SocketAddr = uri
        .authority()
        .expect("authority")
        .as_str()
        .parse()
        .expect("ip:port");
    let per = requests / concurrency.max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let uri = uri.clone();
        tasks.push(tokio::spawn(async move {
            let mut send = connection(addr).await;
            let mut lat = Vec::with_capacity(per as usize);
            let mut errors = 0u64;
            for i in 0..per {
                let body = call_body(w * per + i + 1);
                let req = Request::post(uri.clone())
                    .header("host", addr.to_string())
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .body(Full::new(Bytes::from(body)))
                    .expect("request");
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
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    json!({
        "n": all.len(), "errors": errors,
        "p50_us": percentile(&all, 0.5), "p99_us": percentile(&all, 0.99),
        "mean_us": if all.is_empty() { 0 } else { all.iter().sum::<u64>() / all.len() as u64 },
        "rps": all.len() as f64 / secs,
    })
}

fn connect_loop(addr: &str, count: u64) -> Value {
    let addr: SocketAddr = addr.parse().expect("addr");
    let started = Instant::now();
    let mut ok = 0;
    for _ in 0..count {
        if std::net::TcpStream::connect(addr).is_ok() {
            ok += 1;
        }
    }
    let ns = started.elapsed().as_nanos() as u64 / count.max(1);
    json!({"connects": ok, "ns_per_connect": ns})
}

async fn hold(url: &str, count: u64, seconds: u64) -> Value {
    let uri: hyper::Uri = url.parse().expect("url");
    let addr: SocketAddr = uri
        .authority()
        .expect("authority")
        .as_str()
        .parse()
        .expect("ip:port");
    let mut held = Vec::new();
    let mut ok = 0;
    for i in 0..count {
        let mut send = connection(addr).await;
        let req = Request::post(uri.clone())
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(call_body(i + 1))))
            .expect("request");
        if let Ok(resp) = send.send_request(req).await {
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

async fn audit_bench(dir: &str, mode: &str, writers: u64, events: u64) -> Value {
    use interceptor::audit::{Audit, Durability, RawAudit};
    let durability = match mode {
        "fsync" => Durability::Fsync,
        "async" => Durability::Async,
        _ => Durability::Write,
    };
    let audit = Arc::new(
        Audit::open(RawAudit {
            path: std::path::Path::new(dir).join(format!("bench-{mode}.jsonl")),
            durability,
            ..Default::default()
        })
        .expect("audit"),
    );
    let per = events / writers.max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let audit = audit.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let e = interceptor::audit::event(
                    "mcp.request",
                    json!({"server": "notes", "method": "tools/call", "tool": "echo", "id": w * per + i, "decision": "allow"}),
                );
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

/// Median ns per call of `f` over batches of about 20 ms each.
fn time_ns(mut f: impl FnMut()) -> u64 {
    // Calibrate: how many calls fill ~20 ms.
    let t = Instant::now();
    f();
    let one = t.elapsed().as_nanos().max(1) as u64;
    let n = (20_000_000 / one).clamp(1, 100_000);
    let mut batches = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        batches.push(t.elapsed().as_nanos() as u64 / n);
    }
    batches.sort_unstable();
    batches[batches.len() / 2]
}

fn micro() -> Value {
    use interceptor::{
        mcp::jsonrpc,
        policy::{Call, Policy, RawBinding, RawPolicyOptions, RawRole, Subject},
    };
    let body = json!({"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/srv/notes/a.txt","limit":100}}}).to_string();
    let parse_ns = time_ns(|| {
        let b = jsonrpc::parse(body.as_bytes(), 64).expect("parse");
        std::hint::black_box(b.to_bytes());
    });
    // 100 roles with 10 patterns each (1,000 patterns), every role bound to the subject.
    let roles: Vec<RawRole> = (0..100)
        .map(|r| RawRole {
            name: format!("r{r}"),
            servers: vec!["notes".into()],
            allow_tools: (0..8)
                .map(|p| format!("tool_{r}_{p}_*"))
                .chain([format!("^t{r}_[a-z]+$")])
                .collect(),
            deny_tools: vec![format!("deny_{r}")],
            allow_methods: vec![],
            tool_args: vec![],
        })
        .collect();
    let bindings: Vec<RawBinding> = (0..100)
        .map(|r| RawBinding {
            role: format!("r{r}"),
            cgroup: None,
            uid: Some(vec![1000]),
            gid: None,
            exe: None,
            comm: None,
            workload_id: None,
        })
        .collect();
    let policy = Policy::compile(
        &roles,
        &bindings,
        &RawPolicyOptions::default(),
        &["notes".into()],
    )
    .expect("policy");
    let subject = Subject {
        uid: 1000,
        ..Default::default()
    };
    let decide_ns = time_ns(|| {
        std::hint::black_box(policy.check(&subject, "notes", &Call::tool("tool_99_7_x", None)));
    });
    let tools: Vec<Value> = (0..500)
        .map(|i| json!({"name": format!("tool_{}_{}_x", i % 100, i % 9), "description": "d", "inputSchema": {"type":"object"}}))
        .collect();
    let list = json!({"jsonrpc":"2.0","id":1,"result":{"tools": tools}});
    let filter_ns = time_ns(|| {
        let mut v = list.clone();
        std::hint::black_box(interceptor::mcp::filter::filter(
            &policy, &subject, "notes", &mut v,
        ));
    });
    json!({"parse_reserialize_ns": parse_ns, "policy_decision_ns": decide_ns, "filter_500_tools_ns": filter_ns})
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
        "hold" => hold(&arg(1), num(2), num(3)).await,
        "audit" => audit_bench(&arg(1), &arg(2), num(3), num(4)).await,
        "micro" => micro(),
        _ => {
            eprintln!("usage: see the module documentation");
            std::process::exit(2);
        }
    };
    println!("{out}");
}
