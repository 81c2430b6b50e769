//! Micro-benchmarks of the per-request hot path (criterion; `cargo xtask bench` runs them and
//! reads the medians from `target/criterion`).
//!
//! - `parse_reserialise`: strict JSON-RPC parse + canonical re-serialisation of a typical
//!   `tools/call`, and of one with 1 KiB arguments (the request of the end-to-end benchmark).
//! - `policy_decision`: one `tools/call` decision with 100 roles and 1,000 tool patterns
//!   (globs, regexes, denies), all bound to the caller, as a request makes it (the identity's
//!   roles resolved once per connection); `policy_decision_denied` the same for a tool no
//!   pattern allows; `policy_decision_first` includes the resolution.
//! - `filter_500_tools`: filtering a 500-tool `tools/list` result under that policy.
//! - `audit_request_event`: the `mcp.request` event of the 1 KiB call: redaction and
//!   building the event text, then sealing it into a chained line (SHA-256).
//! - `assertion_sign`: one ES256 identity assertion (JWS) with the node CA key.
//! - `mint_leaf`: a new workload's client certificate (P-256 key generated, certificate signed
//!   by the node CA, kept), the daemon's cache of them full of other workloads.

use criterion::{Criterion, criterion_group, criterion_main};
use interceptor::{
    audit::{Event, RawAudit, Redactor},
    mcp::jsonrpc,
    policy::{Call, Ids, Policy, RawBinding, RawPolicyOptions, RawRole, Subject},
};
use serde_json::{Value, json};
use std::hint::black_box;

fn policy() -> Policy {
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
            allow_resources: vec![],
            allow_prompts: vec![],
            tool_args: vec![],
        })
        .collect();
    let bindings: Vec<RawBinding> = (0..100)
        .map(|r| RawBinding {
            role: format!("r{r}"),
            cgroup: None,
            uid: Some(Ids::One(1000)),
            gid: None,
            exe: None,
            comm: None,
            workload_id: None,
        })
        .collect();
    Policy::compile(
        &roles,
        &bindings,
        &RawPolicyOptions::default(),
        &["notes".into()],
    )
    .expect("the benchmark policy compiles")
}

fn call(arguments: Value) -> String {
    json!({"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"read_file","arguments":arguments}}).to_string()
}

fn micro(c: &mut Criterion) {
    let typical = call(json!({"path": "/srv/notes/a.txt", "limit": 100}));
    let kib = call(json!({"text": "x".repeat(1024)}));
    c.bench_function("parse_reserialise", |b| {
        b.iter(|| {
            let body =
                jsonrpc::parse(black_box(typical.as_bytes()), &Default::default()).expect("parses");
            black_box(body.to_bytes())
        })
    });
    c.bench_function("parse_reserialise_1kib", |b| {
        b.iter(|| {
            let body =
                jsonrpc::parse(black_box(kib.as_bytes()), &Default::default()).expect("parses");
            black_box(body.to_bytes())
        })
    });

    let policy = policy();
    let subject = Subject {
        uid: Some(1000),
        ..Default::default()
    };
    // Per request: tier 1 (bindings, servers) is resolved once per connection.
    let grant = policy.grant(&subject, "notes");
    c.bench_function("policy_decision", |b| {
        b.iter(|| {
            black_box(policy.check_granted(
                black_box(&grant),
                "notes",
                &Call::tool(black_box("tool_99_7_x"), None),
            ))
        })
    });
    // A tool no pattern allows: every role's globs and regexes looked at, then denied.
    c.bench_function("policy_decision_denied", |b| {
        b.iter(|| {
            black_box(policy.check_granted(
                black_box(&grant),
                "notes",
                &Call::tool(black_box("drop_database"), None),
            ))
        })
    });
    // A connection's first request also binds the identity (100 bindings).
    c.bench_function("policy_decision_first", |b| {
        b.iter(|| {
            black_box(policy.check(
                black_box(&subject),
                "notes",
                &Call::tool(black_box("tool_99_7_x"), None),
            ))
        })
    });
    let tools: Vec<Value> = (0..500)
        .map(|i| json!({"name": format!("tool_{}_{}_x", i % 100, i % 9), "description": "d", "inputSchema": {"type":"object"}}))
        .collect();
    let list = json!({"jsonrpc":"2.0","id":1,"result":{"tools": tools}});
    c.bench_function("filter_500_tools", |b| {
        b.iter_batched(
            || list.clone(),
            |mut v| {
                black_box(interceptor::mcp::filter::filter(
                    &policy,
                    &subject,
                    "notes",
                    &|_| false,
                    &mut v,
                ))
            },
            criterion::BatchSize::LargeInput,
        )
    });

    let redactor = Redactor::new(&RawAudit::default());
    let parsed = jsonrpc::parse(kib.as_bytes(), &Default::default()).expect("parses");
    let who = json!({"pid": 4242, "uid": 1000, "comm": "agent", "cgroup": "/agents/a", "workload_id": "spiffe://example.org/node/n/cgroup/agents/a/uid/1000"}).to_string();
    c.bench_function("audit_request_event", |b| {
        b.iter(|| {
            let m = &parsed.messages[0];
            let args = m.arguments().map(|a| redactor.redact(a));
            let e = Event::new("mcp.request")
                .raw("identity", &who)
                .field("server", "notes")
                .field("method", "tools/call")
                .field("tool", &m.target())
                .field("id", &m.id())
                .raw("arguments", args.as_deref().unwrap_or("null"))
                .field("decision", "allow");
            black_box(interceptor::audit::seal_line(
                1,
                interceptor::audit::GENESIS,
                &e,
            ))
        })
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = interceptor::ca::init(dir.path(), "bench-node").expect("ca init");
    let ca = interceptor::ca::NodeCa::load(&interceptor::ca::RawCa {
        cert,
        key,
        leaf_ttl: "1h".into(),
    })
    .expect("ca load");
    let claims = json!({"iss": "bench-node", "sub": "spiffe://example.org/w", "aud": "notes", "iat": 1, "exp": 61, "jti": "0123456789abcdef0123456789abcdef", "uid": 1000, "roles": ["r1"]});
    c.bench_function("assertion_sign", |b| b.iter(|| black_box(ca.sign(&claims))));
    // Full of other workloads' certificates, as on a node where many came and went.
    for i in 0..interceptor::ca::MAX_WORKLOADS {
        ca.leaf(&format!("spiffe://example.org/full/{i}"))
            .expect("mint");
    }
    let mut n = 0u64;
    c.bench_function("mint_leaf", |b| {
        b.iter(|| {
            n += 1;
            black_box(
                ca.leaf(&format!("spiffe://example.org/w/{n}"))
                    .expect("mint"),
            )
        })
    });
}

criterion_group!(benches, micro);
criterion_main!(benches);
