//! Every rejection rule of the strict parser and the HTTP layer, sent by a real process in a
//! tagged cgroup through the kernel redirect. Each malicious form must be refused with the right
//! status and JSON-RPC code, and the upstream must never receive it.

use interceptor_tests::{
    ClientResult, LabelServer, ServerSpec, TestEnv, eventually, h2c_post, privileged, send_raw,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe-client");

const POLICY: &str = r#"
[[role]]
name = "reader"
servers = ["notes"]
allow_tools = ["search", "read_*"]
deny_tools = ["delete_*"]

[proxy]
max_body_bytes = 4096
max_json_depth = 16
max_json_values = 300
max_batch = 4
body_timeout = "1s"
"#;

struct World {
    env: TestEnv,
    upstream: LabelServer,
    dir: std::path::PathBuf,
}

fn world(label: &str) -> World {
    world_with(label, LabelServer::start("127.0.0.3", "upstream"))
}

fn world_with(label: &str, upstream: LabelServer) -> World {
    world_edited(label, upstream, |config| config)
}

/// [`world_with`], its config file edited by `edit` before the daemon starts.
fn world_edited(label: &str, upstream: LabelServer, edit: impl Fn(String) -> String) -> World {
    let mut env = TestEnv::new(label);
    let agents = env.cgroup("agents");
    let binding = format!("\n[[binding]]\nrole = \"reader\"\ncgroup = \"{agents}\"\n");
    env.write_config_with(
        &[ServerSpec {
            name: "notes".into(),
            // Agents dial the server's real address; the proxy reaches the same address
            // (its own sockets are never redirected).
            intercept: vec![upstream.addr.to_string()],
            upstream: upstream.addr.to_string(),
        }],
        &[&agents],
        &format!("{POLICY}{binding}"),
    );
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    std::fs::write(&env.config_path, edit(text)).expect("config");
    env.start_daemon();
    let dir = env.dir(&agents);
    World { env, upstream, dir }
}

/// A world whose config has `from` replaced by `to` (once).
/// The world with `lines` added to its role (after its `deny_tools`).
fn world_with_role(label: &str, lines: &str) -> World {
    const DENY: &str = "deny_tools = [\"delete_*\"]";
    world_replacing(label, DENY, &format!("{DENY}\n{lines}"))
}

fn world_replacing(label: &str, from: &str, to: &str) -> World {
    world_edited(
        label,
        LabelServer::start("127.0.0.3", "upstream"),
        |config| {
            assert!(
                config.contains(from),
                "{from:?} is not in the world's config"
            );
            config.replacen(from, to, 1)
        },
    )
}

/// The first audit event called `event` that `pred` accepts, waited for (events about a
/// response are written after it).
fn audit_event(w: &World, event: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually(
        std::time::Duration::from_secs(10),
        || {
            w.env
                .audit_events()
                .into_iter()
                .find(|e| e["event"] == event && pred(e))
        },
        || format!("no matching {event}: {:#?}", w.env.audit_events()),
    )
}

fn post(body: &[u8], extra_headers: &str) -> Vec<u8> {
    request("POST", body, extra_headers)
}

fn request(method: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
    request_to(method, "/mcp", body, extra_headers)
}

fn request_to(method: &str, target: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut r = format!(
        "{method} {target} HTTP/1.1\r\nHost: notes\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn error_code(reply: &str) -> Option<i64> {
    let v: Value = serde_json::from_str(reply).ok()?;
    v["error"]["code"].as_i64()
}

#[test]
fn malicious_forms_are_refused_and_never_forwarded() {
    if !privileged() {
        return;
    }
    let w = world("strict");
    let addr = w.upstream.addr.to_string();
    let call = |name: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}"}}}}"#)
    };
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"search","arguments":{{"q":{}1{}}}}}}}"#,
        "[".repeat(20),
        "]".repeat(20)
    );
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"search","arguments":{{"q":"{}"}}}}}}"#,
        "x".repeat(5000)
    );
    let many_values = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"search","arguments":{{"q":[{}]}}}}}}"#,
        vec![r#"{"":0}"#; 120].join(",")
    );
    let pings = |n: usize| {
        let items: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"ping"}}"#))
            .collect();
        format!("[{}]", items.join(","))
    };
    let long_id = format!(
        r#"{{"jsonrpc":"2.0","id":"{}","method":"ping"}}"#,
        "i".repeat(300)
    );
    let long_session = format!("Mcp-Session-Id: {}\r\n", "s".repeat(1100));
    // A head announcing 100 bytes, then 12 of them: the rest never comes.
    let mut trickled = post(&[b' '; 100], "");
    trickled.truncate(trickled.len() - 88);
    let cases: Vec<(&str, Vec<u8>, u16, i64)> = vec![
        ("duplicate key", post(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","name":"delete_note"}}"#, ""), 400, -32600),
        ("escaped duplicate key", post(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","n\u0061me":"delete_note"}}"#, ""), 400, -32600),
        ("case-variant Name", post(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"delete_note","name":"search"}}"#, ""), 400, -32600),
        ("case-variant Method", post(br#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call"}"#, ""), 400, -32600),
        ("case-variant Params", post(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","Params":{"name":"delete_note"},"params":{"name":"search"}}"#, ""), 400, -32600),
        ("non-object params", post(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["delete_note"]}"#, ""), 400, -32600),
        ("invalid UTF-8", post(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"se\xffarch\"}}", ""), 400, -32700),
        ("too deep", post(deep.as_bytes(), ""), 400, -32600),
        ("too large", post(big.as_bytes(), ""), 413, -32600),
        ("denied tool", post(call("delete_note").as_bytes(), ""), 200, -32602),
        ("unknown tool", post(call("write_note").as_bytes(), ""), 200, -32602),
        ("look-alike tool name", post(call("se\u{0430}rch").as_bytes(), ""), 200, -32602),
        ("unknown method", post(br#"{"jsonrpc":"2.0","id":1,"method":"tools/exec","params":{}}"#, ""), 200, -32601),
        ("header/body mismatch", post(call("search").as_bytes(), "MCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: delete_note\r\n"), 400, -32020),
        ("missing Mcp-Name (2026-07-28)", post(call("search").as_bytes(), "MCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\n"), 400, -32020),
        ("repeated Mcp-Name", post(call("search").as_bytes(), "MCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: search\r\nMcp-Name: delete_note\r\n"), 400, -32020),
        ("Unicode case variant (long s)", post("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"search\",\"arguments\":{},\"argument\u{17f}\":{\"q\":1}}}".as_bytes(), ""), 400, -32600),
        ("duplicate ids in a batch", post(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#, ""), 400, -32600),
        ("PUT with a call", request("PUT", call("search").as_bytes(), ""), 405, -32600),
        ("GET with a body", request("GET", call("search").as_bytes(), ""), 400, -32600),
        ("plain body labelled gzip", post(call("search").as_bytes(), "Content-Encoding: gzip\r\n"), 415, -32600),
        ("more JSON values than max_json_values", post(many_values.as_bytes(), ""), 400, -32600),
        ("a batch longer than max_batch", post(pings(5).as_bytes(), ""), 400, -32600),
        ("an id over 256 bytes", post(long_id.as_bytes(), ""), 400, -32600),
        ("a protocol version that is not a revision", post(call("search").as_bytes(), "MCP-Protocol-Version: latest\r\n"), 400, -32600),
        ("a session id over 1 KiB", post(call("search").as_bytes(), &long_session), 400, -32600),
        ("a body not sent within body_timeout", trickled, 408, -32600),
    ];
    for (what, request, status, code) in cases {
        let r = send_raw(PROBE, &w.dir, &addr, &request);
        assert_eq!(r.status, Some(status), "{what}: {r:?}");
        let reply = r.reply.as_deref().unwrap_or("");
        assert_eq!(error_code(reply), Some(code), "{what}: {reply}");
        assert!(
            w.upstream.bodies().is_empty(),
            "{what} reached the upstream: {:?}",
            w.upstream.bodies()
        );
    }

    // Requests refused before any policy decision are in the audit log too, denied with why.
    let refused = eventually(
        std::time::Duration::from_secs(10),
        || {
            let events = w.env.audit_events();
            let found: Vec<Value> = events
                .into_iter()
                .filter(|e| {
                    e["event"] == "mcp.request"
                        && e["rule"]
                            .as_str()
                            .is_some_and(|r| r.starts_with("refused before policy"))
                })
                .collect();
            (found.len() >= 3).then_some(found)
        },
        || format!("no refused requests audited: {:#?}", w.env.audit_events()),
    );
    assert!(
        refused.iter().all(|e| e["decision"] == "deny"),
        "{refused:#?}"
    );
    assert!(
        refused.iter().any(
            |e| e["tool"] == "search" && e["rule"].as_str().is_some_and(|r| r.contains("Mcp-"))
        ),
        "{refused:#?}"
    );

    // A batch hiding a denied call is refused whole, with an error for each element.
    let batch = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_note"}}]"#;
    let r = send_raw(PROBE, &w.dir, &addr, &post(batch, ""));
    let v: Value = serde_json::from_str(r.reply.as_deref().unwrap_or("")).expect("batch answer");
    let errors = v.as_array().expect("array of errors");
    assert_eq!(errors.len(), 2, "{v}");
    assert_eq!(errors[0]["id"], 1);
    assert_eq!(errors[0]["error"]["code"], -32600);
    assert_eq!(errors[1]["id"], 2);
    assert_eq!(errors[1]["error"]["code"], -32602);
    assert!(w.upstream.bodies().is_empty());
    // The allowed call it carried is recorded as answered with that error; the denied one has
    // its decision and no response.
    let response = audit_event(&w, "mcp.response", |e| {
        e["tool"] == "search" && e["id"] == 1
    });
    let events = w.env.audit_events();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "mcp.response" && e["tool"] == "delete_note"),
        "{events:#?}"
    );
    assert_eq!(response["outcome"], "error", "{response}");
    assert_eq!(response["error_code"], -32600, "{response}");

    // Ambiguous framing never reaches the JSON layer, let alone the upstream.
    let body = call("search");
    for (what, head) in [
        (
            "CL + TE",
            format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                body.len()
            ),
        ),
        (
            "duplicate CL",
            format!("Content-Length: {0}\r\nContent-Length: {0}\r\n", body.len()),
        ),
        (
            "obfuscated TE",
            "Transfer-Encoding: xchunked\r\n".to_owned(),
        ),
        (
            // Past what the framing watch follows (hyper takes heads up to ~400 KiB), whether
            // it arrives in one read or in many.
            "head over 64 KiB",
            format!(
                "X-Pad: {}\r\nContent-Length: {}\r\n",
                "a".repeat(70_000),
                body.len()
            ),
        ),
        (
            "head far over 64 KiB",
            format!(
                "X-Pad: {}\r\nContent-Length: {}\r\n",
                "a".repeat(150_000),
                body.len()
            ),
        ),
    ] {
        let request = format!(
            "POST /mcp HTTP/1.1\r\nHost: notes\r\nContent-Type: application/json\r\n{head}Connection: close\r\n\r\n{body}"
        );
        let r = send_raw(PROBE, &w.dir, &addr, request.as_bytes());
        assert!(
            r.status.is_none_or(|s| s == 400),
            "{what} must be refused (400 or connection closed): {r:?}"
        );
        assert!(
            w.upstream.bodies().is_empty(),
            "{what} reached the upstream"
        );
    }

    // A chunk size hyper takes but the framing watch cannot parse (over 16 hex digits, with
    // leading zeros): the watch can no longer vouch for the connection, so the request
    // pipelined after it is refused, not served.
    let denied = call("delete_note");
    let allowed = call("search");
    let pipelined = format!(
        "POST /mcp HTTP/1.1\r\nHost: notes\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n0000000000000000{:04x}\r\n{denied}\r\n0\r\n\r\n\
         POST /mcp HTTP/1.1\r\nHost: notes\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{allowed}",
        denied.len(),
        allowed.len()
    );
    let r = send_raw(PROBE, &w.dir, &addr, pipelined.as_bytes());
    let reply = r.reply.as_deref().unwrap_or("");
    assert!(reply.contains("could not be followed"), "{r:?}");
    assert!(w.upstream.bodies().is_empty(), "{:?}", w.upstream.bodies());

    // Control: the allowed call goes through, re-serialised canonically, so the path works and
    // every refusal above was the proxy's doing.
    let tricky = br#"{ "params": {"name": "search", "arguments": {"q": "x"}}, "id": 9, "method": "tools/call", "jsonrpc": "2.0" }"#;
    let r = send_raw(PROBE, &w.dir, &addr, &post(tricky, ""));
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(
        w.upstream.bodies(),
        vec![r#"{"id":9,"jsonrpc":"2.0","method":"tools/call","params":{"arguments":{"q":"x"},"name":"search"}}"#.to_owned()]
    );
    let status = w.env.status();
    assert!(
        status["counters"]["proxy"]["requests_rejected"].as_u64() >= Some(12),
        "{status}"
    );
    assert!(
        status["counters"]["proxy"]["requests_denied"].as_u64() >= Some(5),
        "{status}"
    );
}

#[test]
fn h2c_prior_knowledge_is_served_and_judged_the_same() {
    if !privileged() {
        return;
    }
    let w = world("h2c");
    let url = format!("http://{}/mcp", w.upstream.addr);
    let curl = |body: &str| {
        h2c_post(
            &w.dir,
            &url,
            body,
            &["-w", "\n%{http_version} %{http_code}"],
        )
        .output()
        .expect("run curl")
    };
    let out =
        curl(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_note"}}"#);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-32602") && text.ends_with("2 200"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(w.upstream.bodies().is_empty());
    let out = curl(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"search"}}"#);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("upstream:") && text.ends_with("2 200"),
        "{text}"
    );
    assert_eq!(w.upstream.bodies().len(), 1);
}

#[test]
fn an_identity_without_a_role_gets_errors_not_silence() {
    if !privileged() {
        return;
    }
    let mut w = world("unbound");
    // A tagged cgroup no binding names.
    let other = w.env.cgroup("other");
    let dir = w.env.dir(&other);
    let out = w.env.cli(&["tag", &other]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"x","version":"1"}}}"#;
    let r = send_raw(PROBE, &dir, &w.upstream.addr.to_string(), &post(init, ""));
    assert_eq!(r.status, Some(200), "{r:?}");
    let v: Value = serde_json::from_str(r.reply.as_deref().unwrap_or("")).expect("JSON-RPC error");
    assert_eq!(v["id"], 1);
    assert_eq!(v["error"]["code"], -32601);
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused by policy")),
        "{v}"
    );
    // Nothing else reaches the server either: not an answer to a server's request (no method
    // to judge, but the server is not granted), not a stream.
    let answer = br#"{"jsonrpc":"2.0","id":"srv-1","result":{"action":"accept"}}"#;
    let r = send_raw(PROBE, &dir, &w.upstream.addr.to_string(), &post(answer, ""));
    assert_eq!(r.status, Some(403), "{r:?}");
    let r = send_raw(
        PROBE,
        &dir,
        &w.upstream.addr.to_string(),
        &request("GET", b"", ""),
    );
    assert_eq!(r.status, Some(403), "{r:?}");
    assert!(w.upstream.bodies().is_empty());
    assert_eq!(
        w.upstream.count(),
        0,
        "nothing may reach an ungranted server"
    );
    let get = audit_event(&w, "http.request", |e| e["method"] == "GET");
    assert_eq!(get["decision"], "deny", "{get}");
    assert_eq!(get["path"], "/mcp", "{get}");
    assert_eq!(get["identity"]["cgroup"], other.as_str(), "{get}");
    let line = w
        .env
        .wait_log("mcp request", |v| v["mcp.method"] == "initialize");
    assert_eq!(
        line["authz.rule"],
        "default deny: no binding matches this identity"
    );
}

/// What an agent of the reader role gets for `tools/list` from an upstream that answers every
/// request with `body` (JSON).
fn tools_list_answered_with(label: &str, body: &'static [u8]) -> interceptor_tests::ClientResult {
    tools_list_answered_as(label, "application/json", body)
}

/// Like [`tools_list_answered_with`], the answer of type `content_type`.
fn tools_list_answered_as(
    label: &str,
    content_type: &'static str,
    body: &'static [u8],
) -> interceptor_tests::ClientResult {
    let w = world_with(
        label,
        LabelServer::start_fixed_as("127.0.0.3", content_type, body),
    );
    let list = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    send_raw(PROBE, &w.dir, &w.upstream.addr.to_string(), &post(list, ""))
}

/// A list with a tool the reader may use and one it may not.
macro_rules! listing {
    ($prefix:literal, $suffix:literal) => {
        concat!(
            $prefix,
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_note"}]"#,
            $suffix,
            "}}"
        )
        .as_bytes()
    };
}

#[test]
fn a_cgroup_over_its_request_rate_is_told_when_to_come_back() {
    if !privileged() {
        return;
    }
    let mut w = world_replacing(
        "rate",
        "body_timeout = \"1s\"",
        "body_timeout = \"1s\"\nmax_requests_per_second_per_cgroup = 1\nrequest_burst_per_cgroup = 2",
    );
    let addr = w.upstream.addr.to_string();
    let ping = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let started = std::time::Instant::now();
    let replies: Vec<ClientResult> = (0..6)
        .map(|_| send_raw(PROBE, &w.dir, &addr, &post(ping, "")))
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    let served = replies.iter().filter(|r| r.status == Some(200)).count();
    let limited: Vec<&ClientResult> = replies.iter().filter(|r| r.status == Some(429)).collect();
    assert_eq!(served + limited.len(), 6, "{replies:?}");
    // The burst, and one more a second since.
    assert!(
        served >= 2 && served as f64 <= 2.0 + elapsed + 1.0,
        "{served} in {elapsed}s"
    );
    assert!(
        !limited.is_empty(),
        "none refused in {elapsed}s: {replies:?}"
    );
    for r in &limited {
        let head = r.head.as_deref().unwrap_or("").to_ascii_lowercase();
        assert!(head.lines().any(|l| l.trim() == "retry-after: 1"), "{r:?}");
        assert_eq!(
            error_code(r.reply.as_deref().unwrap_or("")),
            Some(-32603),
            "{r:?}"
        );
        assert!(
            r.reply
                .as_deref()
                .unwrap_or("")
                .contains("max_requests_per_second_per_cgroup"),
            "{r:?}"
        );
    }
    assert_eq!(
        w.env.status()["counters"]["proxy"]["over_rate"].as_u64(),
        Some(limited.len() as u64)
    );
    // Another tagged cgroup has its own: answered by the proxy (an error: no role binds it),
    // not limited.
    let other = w.env.cgroup("others");
    let out = w.env.cli(&["tag", &other]);
    assert!(out.status.success(), "{out:?}");
    let r = send_raw(PROBE, &w.env.dir(&other), &addr, &post(ping, ""));
    assert_eq!(r.status, Some(200), "{r:?}");
    assert!(
        error_code(r.reply.as_deref().unwrap_or("")).is_some(),
        "{r:?}"
    );
}

#[test]
fn mirrored_tool_parameters_must_agree_with_the_arguments() {
    if !privileged() {
        return;
    }
    // The server mirrors `search`'s `region` argument into `Mcp-Param-Region` (2026-07-28's
    // `x-mcp-header`); it answers every request with that list.
    const LIST: &[u8] = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search","inputSchema":{"type":"object","properties":{"q":{"type":"string"},"region":{"type":"string","x-mcp-header":"Region"}}}}]}}"#;
    let w = world_with("mirrored", LabelServer::start_fixed("127.0.0.3", LIST));
    let addr = w.upstream.addr.to_string();
    let send = |body: &[u8], headers: &str| send_raw(PROBE, &w.dir, &addr, &post(body, headers));
    let listed = send(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#, "");
    assert_eq!(listed.status, Some(200), "{listed:?}");
    let call = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"search","arguments":{"q":"x","region":"us-west1"}}}"#;
    let modern =
        "MCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: search\r\n";
    let calls = || {
        w.upstream
            .bodies()
            .iter()
            .filter(|b| b.contains("tools/call"))
            .count()
    };
    for (what, headers) in [
        (
            "another region",
            format!("{modern}Mcp-Param-Region: eu-west1\r\n"),
        ),
        ("no header", modern.to_owned()),
        (
            "a malformed value",
            format!("{modern}Mcp-Param-Region: =?base64?***?=\r\n"),
        ),
    ] {
        let r = send(call, &headers);
        assert_eq!(r.status, Some(400), "{what}: {r:?}");
        assert_eq!(
            error_code(r.reply.as_deref().unwrap_or("")),
            Some(-32020),
            "{what}: {r:?}"
        );
    }
    assert_eq!(calls(), 0, "a refused call reached the server");
    // Agreeing (here in the base64 form), it is forwarded.
    let agreeing = format!("{modern}Mcp-Param-Region: =?base64?dXMtd2VzdDE=?=\r\n");
    let r = send(call, &agreeing);
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(calls(), 1);
}

#[test]
fn list_results_behind_a_byte_order_mark_are_filtered_too() {
    if !privileged() {
        return;
    }
    // Python's json reads a body that starts with a UTF-8 BOM; so must the filter.
    let r = tools_list_answered_with("bom", listing!("\u{feff}", ""));
    assert_eq!(r.status, Some(200), "{r:?}");
    let v: Value = serde_json::from_str(r.reply.as_deref().unwrap_or("")).expect("plain JSON");
    assert_eq!(
        v["result"]["tools"],
        serde_json::json!([{"name": "search"}]),
        "{v}"
    );
}

#[test]
fn an_answer_only_a_lenient_reader_takes_for_json_is_refused() {
    if !privileged() {
        return;
    }
    // Python's json reads NaN; the filter's strict parser does not: never passed on.
    let r = tools_list_answered_with("nan", listing!("", r#","x":NaN"#));
    let reply = r.reply.as_deref().unwrap_or("");
    assert!(!reply.contains("delete_note"), "{r:?}");
    assert_ne!(r.status, Some(200), "{r:?}");
    assert!(reply.contains("not strict JSON"), "{r:?}");
    // In an SSE stream the stream ends there, the request answered with an error.
    let stream = concat!(
        "event: message\ndata: ",
        r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"delete_note"}],"x":NaN}}"#,
        "\n\nevent: message\ndata: ",
        r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_note"}]}}"#,
        "\n\n"
    );
    let r = tools_list_answered_as("nan-sse", "text/event-stream", stream.as_bytes());
    let reply = r.reply.as_deref().unwrap_or("");
    assert_eq!(r.status, Some(200), "{r:?}");
    assert!(!reply.contains("delete_note"), "{r:?}");
    assert!(
        !reply.contains(r#""name":"search""#),
        "nothing after it: {r:?}"
    );
    assert!(
        reply.contains(r#""id":1"#) && reply.contains("an event of the upstream was refused"),
        "{r:?}"
    );
}

#[test]
fn answers_are_read_as_lenient_clients_read_them() {
    if !privileged() {
        return;
    }
    let filtered = |r: &interceptor_tests::ClientResult| {
        let reply = r.reply.as_deref().unwrap_or("");
        assert_eq!(r.status, Some(200), "{r:?}");
        assert!(!reply.contains("delete_note"), "{r:?}");
        assert!(reply.contains(r#""name":"search""#), "{r:?}");
    };
    let refused = |r: &interceptor_tests::ClientResult| {
        assert_eq!(r.status, Some(502), "{r:?}");
        assert!(
            !r.reply.as_deref().unwrap_or("").contains("delete_note"),
            "{r:?}"
        );
    };
    // A case variant a case-insensitive client (C#, Go) would read instead.
    filtered(&tools_list_answered_with(
        "variant",
        listing!("", r#","Tools":[{"name":"delete_note"}]"#),
    ));
    // An event stream whose Content-Type only contains the stream's type (TypeScript SDK,
    // httpx-sse) is one.
    let stream = concat!(
        "data: ",
        r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search"},{"name":"delete_note"}]}}"#,
        "\n\n"
    );
    filtered(&tools_list_answered_as(
        "sse-param",
        "application/json; profile=text/event-stream",
        stream.as_bytes(),
    ));
    // A duplicated list: the last is filtered (most clients keep it), the answer passed on
    // re-serialised (readers that keep the first would see the one never judged).
    filtered(&tools_list_answered_with(
        "duplicate",
        listing!("", r#","tools":[{"name":"search"}]"#),
    ));
    // JSON under such a Content-Type (the Python SDK reads it as JSON): filtered as JSON.
    filtered(&tools_list_answered_as(
        "json-param",
        "application/json; profile=text/event-stream",
        listing!("", ""),
    ));
    // Events in a body declared as something else: refused, not passed unread.
    refused(&tools_list_answered_as(
        "sse-plain",
        "text/plain",
        stream.as_bytes(),
    ));
    // UTF-16 JSON, which Python's json.loads(bytes) reads.
    refused(&tools_list_answered_with(
        "utf16",
        b"\xff\xfe{\x00\"\x00r\x00\"\x00:\x001\x00}\x00",
    ));
}

#[test]
fn answers_to_server_requests_and_a_calls_other_params_are_audited() {
    if !privileged() {
        return;
    }
    let w = world("client-response");
    let answer = br#"{"jsonrpc":"2.0","id":"srv-3","result":{"action":"accept","content":{"password":"hunter2","confirm":true}}}"#;
    let r = send_raw(
        PROBE,
        &w.dir,
        &w.upstream.addr.to_string(),
        &post(answer, ""),
    );
    assert!(r.status.is_some_and(|s| s < 300), "{r:?}");
    assert_eq!(w.upstream.bodies().len(), 1, "the answer was not forwarded");
    let event = audit_event(&w, "mcp.client_response", |_| true);
    assert_eq!(event["id"], "srv-3", "{event}");
    assert_eq!(event["server"], "notes", "{event}");
    assert_eq!(event["outcome"], "result", "{event}");
    assert_eq!(event["body"]["result"]["action"], "accept", "{event}");
    assert_ne!(
        event["body"]["result"]["content"]["password"], "hunter2",
        "not redacted: {event}"
    );
    assert_eq!(event["identity"]["kind"], "agent", "{event}");
    assert_eq!(event["batch_refused"], false, "{event}");

    // A tools/call's params beyond name and arguments reach the server too: recorded.
    let call = br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"search","arguments":{},"_meta":{"step":5,"token":"s3cret"},"x":1}}"#;
    let r = send_raw(PROBE, &w.dir, &w.upstream.addr.to_string(), &post(call, ""));
    assert_eq!(r.status, Some(200), "{r:?}");
    let event = audit_event(&w, "mcp.request", |e| e["id"] == 9);
    assert_eq!(event["other_params"]["_meta"]["step"], 5, "{event}");
    assert_eq!(event["other_params"]["x"], 1, "{event}");
    assert_ne!(event["other_params"]["_meta"]["token"], "s3cret", "{event}");

    // A sampling result asking the server to run tools (sampling with tools): each is judged
    // as this identity's call of that tool. A refused answer reaches the server as an error
    // for its request (so its call fails at once), recorded as the agent sent it, refused.
    let uses = |id: &str, tool: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":"{id}","result":{{"role":"assistant","model":"m","stopReason":"toolUse","content":[{{"type":"text","text":"ok"}},{{"type":"tool_use","id":"u1","name":"{tool}","input":{{"name":"n"}}}}]}}}}"#
        )
    };
    let addr = w.upstream.addr.to_string();
    let forwarded_error = |id: &str| {
        let bodies = w.upstream.bodies();
        let last: Value = serde_json::from_str(bodies.last().expect("forwarded")).expect("JSON");
        assert_eq!(last["id"], id, "{last}");
        assert!(
            last.get("result").is_none(),
            "the refused answer reached the server: {last}"
        );
        assert_eq!(last["error"]["code"], -32600, "{last}");
    };
    let before = w.upstream.bodies().len();
    let r = send_raw(
        PROBE,
        &w.dir,
        &addr,
        &post(uses("srv-4", "delete_note").as_bytes(), ""),
    );
    assert!(r.status.is_some_and(|s| s < 300), "{r:?}");
    assert_eq!(w.upstream.bodies().len(), before + 1);
    forwarded_error("srv-4");
    let refused = audit_event(&w, "mcp.client_response", |e| e["id"] == "srv-4");
    assert_eq!(refused["decision"], "deny", "{refused}");
    assert!(
        refused["rule"]
            .as_str()
            .is_some_and(|r| r.contains("deny_tools")),
        "{refused}"
    );
    assert_eq!(
        refused["body"]["result"]["content"][1]["name"], "delete_note",
        "recorded as the agent sent it: {refused}"
    );
    let r = send_raw(
        PROBE,
        &w.dir,
        &addr,
        &post(uses("srv-5", "search").as_bytes(), ""),
    );
    assert!(r.status.is_some_and(|s| s < 300), "{r:?}");
    assert!(
        w.upstream
            .bodies()
            .last()
            .is_some_and(|b| b.contains("\"result\""))
    );
    // Keys spelled as a lenient server still reads them, and a decoy spelling beside the member
    // the server reads (keys are kept sorted: `_type` comes first): refused the same.
    let variant = br#"{"jsonrpc":"2.0","id":"srv-6","result":{"Content":{"Type":"tool_use","Name":"delete_note","Input":{}}}}"#;
    let decoy = br#"{"jsonrpc":"2.0","id":"srv-7","result":{"content":{"_type":"text","type":"tool_use","name":"delete_note","input":{}}}}"#;
    for (id, body) in [("srv-6", &variant[..]), ("srv-7", &decoy[..])] {
        let r = send_raw(PROBE, &w.dir, &addr, &post(body, ""));
        assert!(r.status.is_some_and(|s| s < 300), "{r:?}");
        forwarded_error(id);
    }
    // (2026-07-28) The sampling results a request carries in params.inputResponses: the
    // request is denied, not forwarded.
    let sent = w.upstream.bodies().len();
    let carried = br#"{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{"name":"search","arguments":{},"inputResponses":{"s1":{"role":"assistant","content":[{"type":"tool_use","name":"delete_note","input":{}}]}}}}"#;
    let r = send_raw(PROBE, &w.dir, &addr, &post(carried, ""));
    assert_eq!(
        error_code(r.reply.as_deref().unwrap_or("")),
        Some(-32602),
        "{r:?}"
    );
    assert!(
        r.reply
            .as_deref()
            .is_some_and(|b| b.contains("sampling result") && !b.contains("\"search\"")),
        "the request's own tool is not what was refused: {r:?}"
    );
    assert_eq!(w.upstream.bodies().len(), sent, "forwarded");
    let denied = audit_event(&w, "mcp.request", |e| e["id"] == 12);
    assert_eq!(denied["decision"], "deny", "{denied}");
    // A refused batch answers the agent's requests only, not the answers it carried to the
    // server's (their ids are the server's).
    let batch = br#"[{"jsonrpc":"2.0","id":13,"method":"tools/call","params":{"name":"delete_note"}},{"jsonrpc":"2.0","id":"srv-8","result":{}}]"#;
    let r = send_raw(PROBE, &w.dir, &addr, &post(batch, ""));
    let v: Value = serde_json::from_str(r.reply.as_deref().unwrap_or("")).expect("batch answer");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["id"], 13, "{v}");
}

#[test]
fn subscriptions_listen_is_judged_per_resource_it_subscribes_to() {
    if !privileged() {
        return;
    }
    let w = world("listen");
    let addr = w.upstream.addr.to_string();
    // Resource subscriptions ride on subscriptions/listen (2026-07-28): each is judged as a
    // resources/subscribe, which no role here grants.
    let subscribe = br#"{"jsonrpc":"2.0","id":3,"method":"subscriptions/listen","params":{"notifications":{"toolsListChanged":true,"resourceSubscriptions":["notes://secret"]}}}"#;
    let r = send_raw(PROBE, &w.dir, &addr, &post(subscribe, ""));
    assert!(
        error_code(r.reply.as_deref().unwrap_or("")).is_some(),
        "{r:?}"
    );
    assert!(w.upstream.bodies().is_empty(), "forwarded");
    let denied = audit_event(&w, "mcp.request", |e| e["method"] == "subscriptions/listen");
    assert_eq!(denied["decision"], "deny", "{denied}");
    // Spelled as the Python SDK also reads it (snake_case field names), or in another case:
    // refused, never taken for a listen without subscriptions.
    for variant in [
        &br#"{"jsonrpc":"2.0","id":5,"method":"subscriptions/listen","params":{"notifications":{"resource_subscriptions":["notes://secret"]}}}"#[..],
        br#"{"jsonrpc":"2.0","id":6,"method":"subscriptions/listen","params":{"Notifications":{"resourceSubscriptions":["notes://secret"]}}}"#,
        br#"{"jsonrpc":"2.0","id":7,"method":"subscriptions/listen","params":{"notifications":{"ResourceSubscriptions":["notes://secret"]}}}"#,
    ] {
        let r = send_raw(PROBE, &w.dir, &addr, &post(variant, ""));
        assert!(
            error_code(r.reply.as_deref().unwrap_or("")).is_some(),
            "{}: {r:?}",
            String::from_utf8_lossy(variant)
        );
    }
    assert!(w.upstream.bodies().is_empty(), "a variant was forwarded");
    // Without resources to subscribe to, listening is plumbing: forwarded.
    let listen = br#"{"jsonrpc":"2.0","id":4,"method":"subscriptions/listen","params":{"notifications":{"toolsListChanged":true}}}"#;
    send_raw(PROBE, &w.dir, &addr, &post(listen, ""));
    assert_eq!(w.upstream.bodies().len(), 1);
}

#[test]
fn requests_without_json_rpc_are_on_record_before_they_leave() {
    if !privileged() {
        return;
    }
    let w = world("http-audit");
    let addr = w.upstream.addr.to_string();
    // A GET is forwarded (recorded first), but its answer is relayed only as an event stream:
    // this upstream answers plain text, as an endpoint beside MCP on a server without
    // `paths` would.
    for (method, target, status) in [
        ("GET", "/export?access_token=abcdef0123456789", 502),
        ("DELETE", "/mcp", 200),
    ] {
        let r = send_raw(
            PROBE,
            &w.dir,
            &addr,
            &request_to(method, target, b"", "Mcp-Session-Id: s-1\r\n"),
        );
        assert_eq!(r.status, Some(status), "{method} {target}: {r:?}");
        if method == "GET" {
            assert!(
                !r.reply.as_deref().unwrap_or("").contains("upstream:"),
                "{r:?}"
            );
        }
    }
    assert_eq!(w.upstream.bodies().len(), 2, "not forwarded");
    // But the metadata clients fetch for OAuth discovery is relayed as it is.
    let r = send_raw(
        PROBE,
        &w.dir,
        &addr,
        &request_to("GET", "/.well-known/oauth-protected-resource", b"", ""),
    );
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(r.reply.as_deref(), Some("upstream:"), "{r:?}");
    assert_eq!(w.upstream.bodies().len(), 3);
    // A DELETE ends the session its Mcp-Session-Id names: one naming none is no MCP request.
    let r = send_raw(
        PROBE,
        &w.dir,
        &addr,
        &request_to("DELETE", "/admin/users/1", b"", ""),
    );
    assert_eq!(r.status, Some(400), "{r:?}");
    assert_eq!(w.upstream.bodies().len(), 3, "forwarded");
    // Refused, and on record as such.
    let refused = audit_event(&w, "http.request", |e| e["path"] == "/admin/users/1");
    assert_eq!(refused["decision"], "deny", "{refused}");
    let get = audit_event(&w, "http.request", |e| e["method"] == "GET");
    assert_eq!(get["decision"], "allow", "{get}");
    assert_eq!(
        get["rule"], "role reader: servers grants \"notes\"",
        "{get}"
    );
    assert_eq!(get["path"], "/export?access_token=[REDACTED]", "{get}");
    assert_eq!(get["server"], "notes", "{get}");
    let delete = audit_event(&w, "http.request", |e| e["method"] == "DELETE");
    assert_eq!(delete["session"], "s-1", "{delete}");
    assert_eq!(delete["roles"], serde_json::json!(["reader"]), "{delete}");
    // A request's events say where on the server it went (the server may serve more than
    // MCP on its port), redacted the same way.
    let ping = br#"{"jsonrpc":"2.0","id":41,"method":"ping"}"#;
    let r = send_raw(
        PROBE,
        &w.dir,
        &addr,
        &request_to("POST", "/other/mcp?api_key=abcdef0123456789", ping, ""),
    );
    assert_eq!(r.status, Some(200), "{r:?}");
    let request = audit_event(&w, "mcp.request", |e| e["id"] == 41);
    assert_eq!(
        request["path"], "/other/mcp?api_key=[REDACTED]",
        "{request}"
    );
    // A path that leaves /.well-known/ once a server resolves it is no metadata: not relayed.
    for target in [
        "/.well-known/../admin/keys",
        "/.well-known/%2e%2e/admin/keys",
        "/.well-known//admin",
    ] {
        let r = send_raw(PROBE, &w.dir, &addr, &request_to("GET", target, b"", ""));
        assert_eq!(r.status, Some(502), "{target}: {r:?}");
        assert!(
            !r.reply.as_deref().unwrap_or("").contains("upstream:"),
            "{r:?}"
        );
    }
    // A query some frameworks take for the method: refused, not forwarded.
    let before = w.upstream.bodies().len();
    for target in ["/mcp?_method=DELETE", "/mcp?X-HTTP-Method-Override=PUT"] {
        let r = send_raw(PROBE, &w.dir, &addr, &request_to("POST", target, ping, ""));
        assert_eq!(r.status, Some(400), "{target}: {r:?}");
    }
    assert_eq!(w.upstream.bodies().len(), before, "forwarded");
}

#[test]
fn credentials_in_a_resource_uri_stay_out_of_every_record() {
    if !privileged() {
        return;
    }
    let w = world_with_role("uri-secret", "allow_methods = [\"resources/read\"]");
    let addr = w.upstream.addr.to_string();
    let read = br#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"postgres://alice:hunter22@db/x"}}"#;
    let r = send_raw(PROBE, &w.dir, &addr, &post(read, ""));
    assert_eq!(r.status, Some(200), "{r:?}");
    let denied = br#"{"jsonrpc":"2.0","id":2,"method":"resources/subscribe","params":{"uri":"postgres://alice:hunter22@db/y"}}"#;
    send_raw(PROBE, &w.dir, &addr, &post(denied, ""));
    let response = audit_event(&w, "mcp.response", |e| e["method"] == "resources/read");
    assert_eq!(
        response["name"], "postgres://alice:[REDACTED]@db/x",
        "{response}"
    );
    w.env
        .wait_log("mcp request", |v| v["authz.decision"] == "deny");
    let events: Vec<String> = w.env.audit_events().iter().map(Value::to_string).collect();
    for (what, text) in [
        ("audit log", events.join("\n")),
        ("daemon log", w.env.log_text()),
    ] {
        assert!(
            !text.contains("hunter22"),
            "the password is in the {what}:\n{text}"
        );
    }
}

#[test]
fn a_server_with_paths_serves_only_those() {
    if !privileged() {
        return;
    }
    let w = world_replacing(
        "paths",
        "\nupstream = ",
        "\npaths = [\"/mcp\", \"/messages/\"]\nupstream = ",
    );
    let addr = w.upstream.addr.to_string();
    let ping = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let to = |target: &str, method: &str, body: &[u8]| {
        send_raw(PROBE, &w.dir, &addr, &request_to(method, target, body, ""))
    };
    for (target, method, body) in [
        ("/admin/reset?all=1", "GET", &b""[..]),
        ("/internal/hook", "POST", &ping[..]),
        ("/mcp/../admin", "POST", &ping[..]),
        ("//mcp", "POST", &ping[..]),
        ("/MCP", "DELETE", &b""[..]),
    ] {
        let r = to(target, method, body);
        assert_eq!(r.status, Some(404), "{method} {target}: {r:?}");
    }
    // Requests, not connections: the proxy opens one to the upstream as an agent connects.
    assert_eq!(
        w.upstream.bodies().len(),
        0,
        "a refused path reached the server"
    );
    for target in ["/mcp", "/messages/?session_id=x", "/messages"] {
        let r = to(target, "POST", ping);
        assert_eq!(r.status, Some(200), "{target}: {r:?}");
    }
    assert_eq!(w.upstream.bodies().len(), 3);
}

/// Two bodies held half-sent (then it prints "held"), then, once the file `argv[2]` exists, a
/// third from the same cgroup: the status line the third gets, written to the file `argv[3]`.
const HOLD_TWO_BODIES: &str = r#"
import os, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
go, out = sys.argv[2], sys.argv[3]
def start():
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 4000\r\n\r\n" + b" " * 3000)
    return s
held = [start(), start()]
print("held", flush=True)
deadline = time.time() + 60
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.02)
third = start()
third.settimeout(30)
line = third.recv(4096).split(b"\r\n")[0].decode()
with open(out + ".tmp", "w") as f:
    f.write(line)
os.rename(out + ".tmp", out)
time.sleep(60)
"#;

#[test]
fn bodies_held_at_once_are_bounded_per_cgroup() {
    if !privileged() {
        return;
    }
    // Bodies held for the whole test (the world's 1 s body timeout would end them).
    let w = world_replacing(
        "budget",
        "max_body_bytes = 4096\nmax_json_depth = 16\nmax_json_values = 300\nmax_batch = 4\n\
         body_timeout = \"1s\"\n",
        "max_body_bytes = 4096\nmax_response_bytes = 4096\nmax_buffered_bytes_per_cgroup = 8192\n\
         max_json_depth = 16\nmax_json_values = 300\nmax_batch = 4\nbody_timeout = \"60s\"\n",
    );
    let addr = w.upstream.addr.to_string();
    let files = tempfile::tempdir().expect("tempdir");
    let (go, out) = (files.path().join("go"), files.path().join("out"));
    let (held, holder) = interceptor_tests::python_in_cgroup(
        &w.dir,
        HOLD_TWO_BODIES,
        &[&addr, &go.to_string_lossy(), &out.to_string_lossy()],
    );
    assert_eq!(held, "held");
    // The third starts once the proxy holds both bodies' bytes.
    eventually(
        std::time::Duration::from_secs(30),
        || (w.env.status()["counters"]["proxy"]["buffered_bytes"] == 6000).then_some(()),
        || format!("bodies not held: {}", w.env.status()["counters"]["proxy"]),
    );
    std::fs::write(&go, "").expect("write the go file");
    let status = eventually(
        std::time::Duration::from_secs(30),
        || std::fs::read_to_string(&out).ok(),
        || "the third request got no answer".to_owned(),
    );
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    let counters = &w.env.status()["counters"]["proxy"];
    assert_eq!(counters["over_budget"], 1, "{counters}");
    assert_eq!(counters["buffered_bytes"], 6000, "{counters}");
    // The held bodies' bytes are given back when they go (their connections closed).
    drop(holder);
    eventually(
        std::time::Duration::from_secs(5),
        || (w.env.status()["counters"]["proxy"]["buffered_bytes"] == 0).then_some(()),
        || format!("bytes still held: {}", w.env.status()["counters"]["proxy"]),
    );
    let r = send_raw(
        PROBE,
        &w.dir,
        &addr,
        &post(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#, ""),
    );
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(
        w.upstream.bodies().len(),
        1,
        "only the last request was forwarded"
    );
}

#[test]
fn requests_of_the_server_to_the_agent_are_on_record() {
    if !privileged() {
        return;
    }
    // A sampling request on the stream that answers the agent's ping: the prompt the server
    // has the agent's model run (its secret redacted), before the agent answers it.
    let upstream = LabelServer::start_fixed_as(
        "127.0.0.3",
        "text/event-stream",
        b"data: {\"jsonrpc\":\"2.0\",\"id\":\"srv-1\",\"method\":\"sampling/createMessage\",\"params\":{\"messages\":[{\"role\":\"user\",\"content\":{\"type\":\"text\",\"text\":\"use api_key=sk-abcdefghijklmnop\"}}],\"temperature\":0.5}}\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n",
    );
    let w = world_with("server-request", upstream);
    let r = send_raw(
        PROBE,
        &w.dir,
        &w.upstream.addr.to_string(),
        &post(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#, ""),
    );
    assert_eq!(r.status, Some(200), "{r:?}");
    let event = audit_event(&w, "mcp.server_request", |_| true);
    assert_eq!(event["method"], "sampling/createMessage", "{event}");
    assert_eq!(event["id"], "srv-1", "{event}");
    assert_eq!(event["server"], "notes", "{event}");
    assert_eq!(event["params"]["temperature"], 0.5, "{event}");
    let text = event["params"]["messages"][0]["content"]["text"]
        .as_str()
        .unwrap_or("");
    assert!(
        text.starts_with("use api_key=") && !text.contains("sk-abc"),
        "{event}"
    );
}

/// A world whose upstream is `upstream`, and an agent's `ping` through it.
fn ping_answered_by(label: &str, upstream: LabelServer) -> (World, ClientResult) {
    let w = world_with(label, upstream);
    let r = send_raw(
        PROBE,
        &w.dir,
        &w.upstream.addr.to_string(),
        &post(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#, ""),
    );
    (w, r)
}

#[test]
fn messages_beside_the_response_in_a_json_answer_are_treated_as_in_a_stream() {
    if !privileged() {
        return;
    }
    // A JSON batch answer (2025-03-26): a sampling request to the agent, another identity's
    // task notification, and the response. Clients hand every message of it to their
    // handlers, as they do a stream's events: the request goes on record, the notification
    // is not passed on.
    let upstream = LabelServer::start_fixed_as(
        "127.0.0.3",
        "application/json",
        b"[{\"jsonrpc\":\"2.0\",\"id\":\"srv-2\",\"method\":\"sampling/createMessage\",\"params\":{\"maxTokens\":7}},{\"jsonrpc\":\"2.0\",\"method\":\"notifications/tasks/status\",\"params\":{\"taskId\":\"not-yours\",\"status\":\"completed\"}},{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}]",
    );
    let (w, r) = ping_answered_by("json-batch-answer", upstream);
    assert_eq!(r.status, Some(200), "{r:?}");
    let reply = r.reply.as_deref().unwrap_or("");
    assert!(
        reply.contains("srv-2") && reply.contains("\"id\":1") && !reply.contains("not-yours"),
        "{r:?}"
    );
    let event = audit_event(&w, "mcp.server_request", |_| true);
    assert_eq!(event["method"], "sampling/createMessage", "{event}");
    assert_eq!(event["id"], "srv-2", "{event}");
    assert_eq!(event["params"]["maxTokens"], 7, "{event}");
}

#[test]
fn a_json_answer_left_with_no_response_answers_the_request_with_an_error() {
    if !privileged() {
        return;
    }
    // All the answer holds is another identity's task notification: not passed on, and the
    // request still gets an answer (a 202 would leave the client waiting for one).
    let upstream = LabelServer::start_fixed_as(
        "127.0.0.3",
        "application/json",
        b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/tasks/status\",\"params\":{\"taskId\":\"not-yours\",\"status\":\"completed\"}}",
    );
    let (_w, r) = ping_answered_by("json-answer-emptied", upstream);
    assert_eq!(r.status, Some(502), "{r:?}");
    let reply = r.reply.as_deref().unwrap_or("");
    assert!(
        reply.contains("\"id\":1") && reply.contains("no response") && !reply.contains("not-yours"),
        "{r:?}"
    );
}

/// An upstream (argv[1] = port on 127.0.0.3) that answers every POST with an event stream
/// whose first event never ends: 3,000 bytes of `data:` and then nothing.
const HALF_EVENT_UPSTREAM: &str = r#"
import socket, sys, threading, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.3", int(sys.argv[1])))
srv.listen(16)
print("ready", flush=True)
def serve(c):
    data = b""
    while b"\r\n\r\n" not in data:
        data += c.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    n = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0]
    while len(rest) < n:
        rest += c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    part = b"data: " + b"x" * 3000
    c.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    time.sleep(30)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Three pings to argv[1], each on its own connection, their answers read for 1 s: how many
/// were ended for the buffer budget.
const THREE_STREAMS: &str = r#"
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
conns = []
for _ in range(3):
    c = socket.create_connection((host, int(port)))
    c.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    conns.append(c)
    time.sleep(0.3)
ended = 0
for c in conns:
    c.settimeout(1)
    got = b""
    try:
        while b"max_buffered_bytes_per_cgroup" not in got:
            chunk = c.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    ended += b"max_buffered_bytes_per_cgroup" in got
print("ended", ended, flush=True)
time.sleep(5)
"#;

#[test]
fn event_streams_holding_unfinished_events_are_bounded_too() {
    if !privileged() {
        return;
    }
    let port = interceptor_tests::free_port();
    let mut upstream = std::process::Command::new(interceptor_tests::python())
        .args(["-c", HALF_EVENT_UPSTREAM, &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the upstream");
    let ready = upstream.stdout.take().expect("stdout");
    let _upstream = interceptor_tests::KillOnDrop(upstream);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(ready), &mut line).expect("ready");
    // The world's own upstream stands aside: its address in the config becomes this one's.
    let addr = format!("127.0.0.3:{port}");
    let unused = LabelServer::start("127.0.0.3", "unused");
    let unused_addr = unused.addr.to_string();
    let w = world_edited("sse-budget", unused, |config| {
        config
            .replace(
                "max_body_bytes = 4096\n",
                "max_body_bytes = 4096\nmax_response_bytes = 4096\n\
                 max_buffered_bytes_per_cgroup = 8192\n",
            )
            .replace(&unused_addr, &addr)
    });
    // Two streams hold 3,000 bytes each of an unfinished event (and the third ping's body
    // is held while its answer is read): the third stream's event goes over.
    let (out, _agent) = interceptor_tests::python_in_cgroup(&w.dir, THREE_STREAMS, &[&addr]);
    assert_eq!(out, "ended 1");
    assert_eq!(w.env.status()["counters"]["proxy"]["over_budget"], 1);
}

#[test]
fn a_role_bounds_the_resources_it_reads() {
    if !privileged() {
        return;
    }
    let w = world_with_role(
        "resources",
        "allow_methods = [\"resources/read\"]\nallow_resources = [\"notes://public/*\"]",
    );
    let addr = w.upstream.addr.to_string();
    let read = |id: u32, uri: &str| {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"resources/read","params":{{"uri":"{uri}"}}}}"#
        );
        send_raw(PROBE, &w.dir, &addr, &post(body.as_bytes(), ""))
    };
    let r = read(1, "notes://public/a");
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(
        w.upstream.bodies().len(),
        1,
        "the allowed read was not forwarded"
    );
    for (id, uri) in [(2, "notes://private/a"), (3, "notes://public/%2e%2e")] {
        let r = read(id, uri);
        let reply = r.reply.as_deref().unwrap_or("");
        assert_eq!(error_code(reply), Some(-32602), "{uri}: {r:?}");
        assert_eq!(w.upstream.bodies().len(), 1, "{uri} was forwarded");
    }
    let denied = audit_event(&w, "mcp.request", |e| e["id"] == 2);
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(denied["name"], "notes://private/a", "{denied}");
}

#[test]
fn a_completion_is_bounded_by_what_it_completes_for() {
    if !privileged() {
        return;
    }
    let w = world_with_role(
        "completion",
        "allow_methods = [\"completion/complete\"]\n\
         allow_prompts = [\"summary*\"]\nallow_resources = [\"notes://public/*\"]",
    );
    let addr = w.upstream.addr.to_string();
    let complete = |id: u32, reference: &str| {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"completion/complete","params":{{"ref":{reference},"argument":{{"name":"topic","value":"a"}}}}}}"#
        );
        send_raw(PROBE, &w.dir, &addr, &post(body.as_bytes(), ""))
    };
    let mut forwarded = 0;
    for (id, reference) in [
        (1, r#"{"type":"ref/prompt","name":"summary"}"#),
        (
            2,
            r#"{"type":"ref/resource","uri":"notes://public/{name}"}"#,
        ),
    ] {
        let r = complete(id, reference);
        assert_eq!(r.status, Some(200), "{reference}: {r:?}");
        forwarded += 1;
        assert_eq!(
            w.upstream.bodies().len(),
            forwarded,
            "{reference} not forwarded"
        );
    }
    for (id, reference) in [
        (3, r#"{"type":"ref/prompt","name":"export_all"}"#),
        (
            4,
            r#"{"type":"ref/resource","uri":"notes://private/{name}"}"#,
        ),
        (5, r#"{"type":"ref/tool","name":"summary"}"#),
    ] {
        let r = complete(id, reference);
        let reply = r.reply.as_deref().unwrap_or("");
        // The method is allowed: what it completes for is refused (invalid params).
        assert_eq!(error_code(reply), Some(-32602), "{reference}: {r:?}");
        assert_eq!(
            w.upstream.bodies().len(),
            forwarded,
            "{reference} was forwarded"
        );
    }
    let denied = audit_event(&w, "mcp.request", |e| e["id"] == 3);
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(denied["name"], "export_all", "{denied}");
    assert!(
        denied["rule"]
            .as_str()
            .is_some_and(|r| r.contains("prompt")),
        "{denied}"
    );
}

#[test]
fn an_upstreams_reason_phrase_and_session_cookies_do_not_reach_the_agent() {
    if !privileged() {
        return;
    }
    let files = tempfile::tempdir().expect("tempdir");
    let token = files.path().join("token");
    std::fs::write(&token, "upstream-secret\n").expect("write the credential");
    // An upstream that quotes the key it was sent in its status line and opens a session for
    // it (a cookie minted from the injected credential).
    let upstream = LabelServer::start_with_head(
        "127.0.0.3",
        "HTTP/1.1 200 key upstream-secret accepted\r\nContent-Type: application/json\r\n\
         Set-Cookie: session=minted-for-the-key\r\n",
        br#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
    );
    let w = world_edited("reason-cookie", upstream, |config| {
        let inject = format!(
            "name = \"notes\"\ninject_headers = {{ X-Api-Key = {{ file = \"{}\" }} }}\n",
            token.display()
        );
        config.replacen("name = \"notes\"\n", &inject, 1)
    });
    let r = send_raw(
        PROBE,
        &w.dir,
        &w.upstream.addr.to_string(),
        &post(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#, ""),
    );
    assert_eq!(r.status, Some(200), "{r:?}");
    assert_eq!(w.upstream.bodies().len(), 1, "not forwarded");
    let head = r.head.clone().unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(!head.contains("upstream-secret"), "{head}");
    assert!(r.header("set-cookie").is_none(), "{head}");
}
