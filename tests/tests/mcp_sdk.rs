//! The official MCP SDKs on both ends, through the kernel redirect: unmodified clients in
//! tagged cgroups dial the server's real address; policy decides per identity, per tool.
//! Python (`mcp`) over all three wire generations — Streamable HTTP with the initialize
//! handshake, the 2026-07-28 stateless protocol, the 2024-11-05 HTTP+SSE transport — and Rust
//! (`rmcp`) over Streamable HTTP, also across SDKs.

use interceptor_tests::{
    KillOnDrop, McpServer, ServerSpec, TestEnv, eventually, mcp_client, privileged,
    python_in_cgroup, rmcp_client, send_raw,
};

const RMCP_PEER: &str = env!("CARGO_BIN_EXE_rmcp-peer");
const PROBE: &str = env!("CARGO_BIN_EXE_probe-client");
use serde_json::{Value, json};

const POLICY: &str = r#"
[[role]]
name = "reader"
servers = ["notes"]
allow_tools = ["read_*", "search"]
deny_tools = ["delete_*"]

[[role]]
name = "writer"
servers = ["notes", "notes-admin"]
allow_tools = ["*"]
deny_tools = ["delete_*"]
"#;

struct World {
    env: TestEnv,
    server: McpServer,
    readers: std::path::PathBuf,
    writers: std::path::PathBuf,
}

/// Where agents dial the second config entry of `server` (see [`world_with`]).
fn admin_addr(server: &McpServer) -> String {
    format!("127.0.0.9:{}", server.addr.port())
}

fn world(label: &str, transport: &str) -> World {
    world_with(label, McpServer::start(transport))
}

fn world_with(label: &str, server: McpServer) -> World {
    world_with_extra(label, server, "")
}

/// [`world_with`], with `extra` TOML (a `[proxy]` table, say) in its config.
fn world_with_extra(label: &str, server: McpServer, extra: &str) -> World {
    let mut env = TestEnv::new(label);
    let readers = env.cgroup("readers");
    let writers = env.cgroup("writers");
    let bindings = format!(
        "\n[[binding]]\nrole = \"reader\"\ncgroup = \"{readers}\"\n\
         \n[[binding]]\nrole = \"writer\"\ncgroup = \"{writers}\"\n"
    );
    env.write_config_with(
        &[
            ServerSpec {
                name: "notes".into(),
                intercept: vec![server.addr.to_string()],
                upstream: server.addr.to_string(),
            },
            // A second entry for the same server (another address, other roles).
            ServerSpec {
                name: "notes-admin".into(),
                intercept: vec![admin_addr(&server)],
                upstream: server.addr.to_string(),
            },
        ],
        &[&env.root.clone()],
        &format!("{POLICY}{bindings}{extra}"),
    );
    env.start_daemon();
    let readers = env.dir(&readers);
    let writers = env.dir(&writers);
    World {
        env,
        server,
        readers,
        writers,
    }
}

fn assert_denied(out: &Value, tool: &str) {
    let call = &out["calls"][tool];
    assert_eq!(call["ok"], false, "{tool}: {out}");
    assert_eq!(call["code"], -32602, "{tool}: {out}");
    assert!(
        call["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused by policy")),
        "{tool}: {out}"
    );
}

fn check_reader_and_writer(w: &World, url: &str, transport: &str, mode: &str, protocol: &str) {
    let out = mcp_client(
        &w.readers,
        url,
        transport,
        mode,
        &[
            r#"search={"query":"q"}"#,
            r#"delete_note={"name":"n"}"#,
            r#"write_note={"name":"n","text":"t"}"#,
        ],
    );
    assert!(
        out.get("fatal").is_none(),
        "{out}\nserver log: {}",
        w.server.log_text()
    );
    assert_eq!(out["tools"], json!(["read_note", "search"]), "{out}");
    assert_eq!(out["calls"]["search"]["ok"], true, "{out}");
    assert_eq!(out["calls"]["search"]["text"], "results for q");
    assert_denied(&out, "delete_note");
    assert_denied(&out, "write_note");

    // Another identity, another role, another tool set.
    let out = mcp_client(
        &w.writers,
        url,
        transport,
        mode,
        &[
            r#"write_note={"name":"n","text":"t"}"#,
            r#"delete_note={"name":"n"}"#,
        ],
    );
    assert_eq!(
        out["tools"],
        json!(["read_note", "search", "write_note"]),
        "{out}"
    );
    assert_eq!(out["calls"]["write_note"]["ok"], true, "{out}");
    assert_denied(&out, "delete_note");

    // The server executed exactly the allowed calls; denied ones never reached it.
    assert_eq!(w.server.calls(), vec!["search", "write_note"]);
    let line = w.env.wait_log("mcp request", |v| {
        v["authz.decision"] == "deny" && v["mcp.name"] == "delete_note"
    });
    assert_eq!(line["authz.rule"], "role reader: deny_tools \"delete_*\"");
    assert_eq!(line["mcp.protocol"], protocol, "{line}");
}

#[test]
fn streamable_http_with_initialize_handshake() {
    if !privileged() {
        return;
    }
    let w = world("sdk-streamable", "streamable-http");
    let url = format!("http://{}/mcp", w.server.addr);
    check_reader_and_writer(&w, &url, "streamable-http", "legacy", "2025-11-25");
}

#[test]
fn stateless_2026_07_28_protocol() {
    if !privileged() {
        return;
    }
    let w = world("sdk-stateless", "streamable-http");
    let url = format!("http://{}/mcp", w.server.addr);
    check_reader_and_writer(&w, &url, "streamable-http", "2026-07-28", "2026-07-28");
}

#[test]
fn legacy_http_sse_denials_arrive_on_the_stream() {
    if !privileged() {
        return;
    }
    let w = world("sdk-sse", "sse");
    let url = format!("http://{}/sse", w.server.addr);
    check_reader_and_writer(&w, &url, "sse", "legacy", "2024-11-05");
}

/// Holds a 2024-11-05 SSE stream open from a process in `cgroup_dir`: the endpoint URL its
/// `endpoint` event named, and the process (killed on drop).
fn hold_legacy_stream(cgroup_dir: &std::path::Path, addr: &str) -> (String, KillOnDrop) {
    const HOLD: &str = r#"
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
s.sendall(b"GET /sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
buf = b""
while b"event: endpoint" not in buf or not buf.split(b"event: endpoint", 1)[1].split(b"data: ", 1)[-1].count(b"\n"):
    chunk = s.recv(4096)
    if not chunk:
        sys.exit("stream ended before its endpoint event: " + repr(buf))
    buf += chunk
print(buf.split(b"event: endpoint", 1)[1].split(b"data: ", 1)[1].split(b"\n", 1)[0].decode().strip(), flush=True)
time.sleep(30)
"#;
    let (line, child) = python_in_cgroup(cgroup_dir, HOLD, &[addr]);
    assert!(line.contains("session_id="), "no endpoint: {line:?}");
    (line, child)
}

/// Posts `body` to the legacy session `endpoint` from a Python process in the readers' cgroup
/// (the session's owner is its workload and executable, as the stream's holder): the status,
/// its Retry-After (`-` when none) and the body, a line each.
fn post_legacy(w: &World, addr: &str, endpoint: &str, body: &str) -> Vec<String> {
    const POST: &str = r#"
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
endpoint, body = sys.argv[2], sys.argv[3].encode()
s = socket.create_connection((host, int(port)))
s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (endpoint.encode(), len(body), body))
reply = b""
while chunk := s.recv(65536):
    reply += chunk
head, _, rest = reply.partition(b"\r\n\r\n")
lines = head.decode().split("\r\n")
retry = [l.split(":", 1)[1].strip() for l in lines if l.lower().startswith("retry-after:")]
print(lines[0].split(" ")[1], retry[0] if retry else "-", rest.decode().replace("\n", " "), sep="\n", flush=True)
"#;
    let python = interceptor_tests::python().to_string_lossy().into_owned();
    let out =
        interceptor_tests::run_in_cgroup(&w.readers, &python, &["-c", POST, addr, endpoint, body]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_owned).collect()
}

#[test]
fn requests_awaited_on_an_unread_legacy_stream_count_against_the_cgroups_buffers() {
    if !privileged() {
        return;
    }
    // A small budget: a request's records awaiting their answers on the session's stream
    // (which the agent does not read) are charged to it.
    let w = world_with_extra(
        "sse-budget",
        McpServer::start("sse"),
        "\n[proxy]\nmax_body_bytes = 4096\nmax_response_bytes = 4096\n\
         max_buffered_bytes_per_cgroup = 8192\n",
    );
    let addr = w.server.addr.to_string();
    let (endpoint, _stream) = hold_legacy_stream(&w.readers, &addr);
    let post = |body: &str| post_legacy(&w, &addr, &endpoint, body);
    let r = post(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#);
    assert_eq!(r[0], "202", "{r:?}");
    // Forty at once: each record holds a few hundred bytes, together over 8 KiB.
    let pings: Vec<String> = (100..140)
        .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"ping"}}"#))
        .collect();
    let r = post(&format!("[{}]", pings.join(",")));
    assert_eq!((r[0].as_str(), r[1].as_str()), ("503", "1"), "{r:?}");
    assert!(
        r[2].contains("max_buffered_bytes_per_cgroup") && r[2].contains("\"id\":139"),
        "{r:?}"
    );
    let status = w.env.status();
    assert_eq!(status["counters"]["proxy"]["over_budget"], 1, "{status}");
}

#[test]
fn a_legacy_answer_is_recorded_under_the_process_that_posted_its_request() {
    if !privileged() {
        return;
    }
    let w = world("sse-poster", "sse");
    let addr = w.server.addr.to_string();
    let (endpoint, stream) = hold_legacy_stream(&w.readers, &addr);
    let holder = u64::from(stream.0.id());
    // Another process of the same workload (and executable) posts to the session.
    let r = post_legacy(
        &w,
        &addr,
        &endpoint,
        r#"{"jsonrpc":"2.0","id":77,"method":"ping"}"#,
    );
    assert_eq!(r[0], "202", "{r:?}");
    let (request, response) = eventually(
        std::time::Duration::from_secs(15),
        || {
            let events = w.env.audit_events();
            let find = |name: &str| {
                events
                    .iter()
                    .find(|e| e["event"] == name && e["id"] == 77)
                    .cloned()
            };
            Some((find("mcp.request")?, find("mcp.response")?))
        },
        || {
            format!(
                "no request and answer on record: {:#?}",
                w.env.audit_events()
            )
        },
    );
    let poster = &request["identity"]["pid"];
    assert_ne!(poster, &Value::from(holder), "{request}");
    assert_eq!(&response["identity"]["pid"], poster, "{response}");
    assert_eq!(response["outcome"], "result", "{response}");
}

#[test]
fn a_legacy_session_belongs_to_the_identity_that_opened_it() {
    if !privileged() {
        return;
    }
    let w = world("sse-owner", "sse");
    let addr = w.server.addr.to_string();
    let (endpoint, _stream) = hold_legacy_stream(&w.readers, &addr);
    let post = |target: &str| {
        let body = r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#;
        format!(
            "POST {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let (path, id) = endpoint.split_once("session_id=").expect("session_id");
    // The session's URL from another identity: refused by the owner check.
    let r = send_raw(PROBE, &w.writers, &addr, &post(&endpoint));
    assert_eq!(r.status, Some(403), "{r:?}");
    // The same session reached through another URL (the server reads only `session_id`, and
    // parses it leniently): refused, not forwarded unchecked.
    for other in [
        format!("{endpoint}&x=1"),
        format!("{path}session_id={}", id.to_uppercase()),
        format!("{path}session_id={{{id}}}"),
        // Another path the server routes to the same handler (a mount takes any below).
        format!("{}x?session_id={id}", path.trim_end_matches('?')),
        format!("{}/?session_id={id}", path.trim_end_matches('?')),
        // The id as Python's UUID(hex=…) also reads it.
        format!("{}x?session_id=uuid:{id}", path.trim_end_matches('?')),
        format!("{}x?session_id[]={id}", path.trim_end_matches('?')),
        // As servers of other frameworks match paths and names (without case).
        format!("/MESSAGES?SESSION_ID={}", id.to_uppercase()),
    ] {
        let r = send_raw(PROBE, &w.writers, &addr, &post(&other));
        assert_eq!(r.status, Some(400), "{other}: {r:?}");
        assert!(
            r.reply
                .as_deref()
                .is_some_and(|b| b.contains("no legacy SSE session has this URL")),
            "not refused by the proxy: {other}: {r:?}"
        );
    }
    // Nor is it reached with another HTTP method (the server's message handler may not look
    // at the method; the owner check judges POSTs): a message URL takes POSTs only.
    for method in ["GET", "DELETE"] {
        let request = format!(
            "{method} {endpoint} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
             Mcp-Session-Id: own\r\nConnection: close\r\n\r\n"
        );
        let r = send_raw(PROBE, &w.writers, &addr, request.as_bytes());
        assert_eq!(r.status, Some(400), "{method}: {r:?}");
        assert!(
            r.reply
                .as_deref()
                .is_some_and(|b| b.contains("takes POSTs only")),
            "{method}: {r:?}"
        );
    }
    // A request naming no session is not the check's business.
    let r = send_raw(
        PROBE,
        &w.writers,
        &addr,
        &post("/elsewhere?tenant=acme-production"),
    );
    assert!(
        !r.reply
            .as_deref()
            .unwrap_or("")
            .contains("no legacy SSE session has this URL"),
        "{r:?}"
    );
}

/// Same checks with the Rust SDK as the client, against a server of either SDK.
fn check_rmcp_client(w: &World) {
    let url = format!("http://{}/mcp", w.server.addr);
    let out = rmcp_client(
        RMCP_PEER,
        &w.readers,
        &url,
        &[
            r#"search={"query":"q"}"#,
            r#"delete_note={"name":"n"}"#,
            r#"write_note={"name":"n","text":"t"}"#,
        ],
    );
    assert!(
        out.get("fatal").is_none(),
        "{out}\nserver log: {}",
        w.server.log_text()
    );
    assert_eq!(out["tools"], json!(["read_note", "search"]), "{out}");
    assert_eq!(out["calls"]["search"]["ok"], true, "{out}");
    assert_denied(&out, "delete_note");
    assert_denied(&out, "write_note");
    let out = rmcp_client(
        RMCP_PEER,
        &w.writers,
        &url,
        &[r#"write_note={"name":"n","text":"t"}"#],
    );
    assert_eq!(
        out["tools"],
        json!(["read_note", "search", "write_note"]),
        "{out}"
    );
    assert_eq!(out["calls"]["write_note"]["ok"], true, "{out}");
    assert_eq!(w.server.calls(), vec!["search", "write_note"]);
}

#[test]
fn rust_sdk_client_and_server() {
    if !privileged() {
        return;
    }
    let w = world_with("rmcp", McpServer::start_rmcp(RMCP_PEER));
    check_rmcp_client(&w);
}

#[test]
fn rust_sdk_client_against_python_server() {
    if !privileged() {
        return;
    }
    let w = world("rmcp-py", "streamable-http");
    check_rmcp_client(&w);
}

#[test]
fn python_sdk_client_against_rust_server() {
    if !privileged() {
        return;
    }
    let w = world_with("py-rmcp", McpServer::start_rmcp(RMCP_PEER));
    let url = format!("http://{}/mcp", w.server.addr);
    let out = mcp_client(
        &w.readers,
        &url,
        "streamable-http",
        "legacy",
        &[r#"search={"query":"q"}"#, r#"delete_note={"name":"n"}"#],
    );
    assert!(
        out.get("fatal").is_none(),
        "{out}\nserver log: {}",
        w.server.log_text()
    );
    assert_eq!(out["tools"], json!(["read_note", "search"]), "{out}");
    assert_eq!(out["calls"]["search"]["ok"], true, "{out}");
    assert_denied(&out, "delete_note");
    assert_eq!(w.server.calls(), vec!["search"]);
}

#[test]
fn a_session_belongs_to_the_identity_that_opened_it() {
    if !privileged() {
        return;
    }
    let w = world_with("session-owner", McpServer::start_rmcp(RMCP_PEER));
    let addr = w.server.addr.to_string();
    let request = |method: &str, session: Option<&str>, body: &str| {
        let session = session
            .map(|s| format!("Mcp-Session-Id: {s}\r\n"))
            .unwrap_or_default();
        format!(
            "{method} /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\n{session}Content-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"probe","version":"1"}}}"#;
    let r = send_raw(PROBE, &w.readers, &addr, &request("POST", None, init));
    assert_eq!(r.status, Some(200), "{r:?}");
    let session = r.header("mcp-session-id").expect("a session id").to_owned();
    assert_eq!(w.env.status()["counters"]["proxy"]["bound_sessions"], 1);
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let r = send_raw(
        PROBE,
        &w.readers,
        &addr,
        &request("POST", Some(&session), initialized),
    );
    assert_eq!(r.status, Some(202), "{r:?}");

    // Another identity (granted the same server) that learns the id can neither post into
    // the session, attach to its stream, nor end it.
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    for (method, body) in [("POST", list), ("GET", ""), ("DELETE", "")] {
        let r = send_raw(
            PROBE,
            &w.writers,
            &addr,
            &request(method, Some(&session), body),
        );
        assert_eq!(r.status, Some(403), "{method}: {r:?}");
        assert!(
            r.reply
                .as_deref()
                .unwrap_or("")
                .contains("belongs to another identity"),
            "{method}: {r:?}"
        );
    }
    // The attempts are on record (the POST's as mcp.request, the GET's and DELETE's as
    // http.request), denied before any policy rule.
    for method in ["GET", "DELETE"] {
        let event = eventually(
            std::time::Duration::from_secs(10),
            || {
                w.env.audit_events().into_iter().find(|e| {
                    e["event"] == "http.request" && e["method"] == method && e["decision"] == "deny"
                })
            },
            || format!("no refused {method} on record: {:#?}", w.env.audit_events()),
        );
        assert_eq!(
            event["rule"], "refused before policy: the session belongs to another identity",
            "{event}"
        );
    }
    // An id with a space in it is no id: refused before anything is looked up.
    let spaced = format!("{session} x");
    let r = send_raw(
        PROBE,
        &w.writers,
        &addr,
        &request("POST", Some(&spaced), list),
    );
    assert_eq!(r.status, Some(400), "{r:?}");
    // Nor through another config entry for the same server: sessions live at the server.
    let r = send_raw(
        PROBE,
        &w.writers,
        &admin_addr(&w.server),
        &request("POST", Some(&session), list),
    );
    assert_eq!(r.status, Some(403), "{r:?}");
    // Its owner still can, and ends it; the id is then nobody's: not taken by the next
    // identity that names it (a server that keeps a session it answered DELETE for must not
    // hand it over), answered as an ended session.
    let r = send_raw(
        PROBE,
        &w.readers,
        &addr,
        &request("POST", Some(&session), list),
    );
    assert_eq!(r.status, Some(200), "{r:?}");
    let r = send_raw(
        PROBE,
        &w.readers,
        &addr,
        &request("DELETE", Some(&session), ""),
    );
    assert!(r.status.is_some_and(|s| (200..300).contains(&s)), "{r:?}");
    let r = send_raw(
        PROBE,
        &w.writers,
        &addr,
        &request("POST", Some(&session), list),
    );
    assert_eq!(r.status, Some(404), "{r:?}");
    assert!(
        r.reply.as_deref().unwrap_or("").contains("session ended"),
        "{r:?}"
    );
}

/// `rmcp-peer task-call` / `task-get` from inside `cgroup_dir`, parsed.
fn rmcp_task(cgroup_dir: &std::path::Path, mode: &str, url: &str, arg: &str) -> Value {
    let out = interceptor_tests::run_in_cgroup(cgroup_dir, RMCP_PEER, &[mode, url, arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "rmcp-peer {mode} printed no JSON ({e}): {stdout:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn a_task_is_reachable_only_by_the_identity_that_started_it() {
    if !privileged() {
        return;
    }
    // The Rust SDK's server keeps tasks for every session alike (bound to no caller): what
    // tells two agents' tasks apart is the proxy.
    let server = McpServer::start_rmcp(RMCP_PEER);
    let mut env = TestEnv::new("tasks");
    let starters = env.cgroup("starters");
    let others = env.cgroup("others");
    env.write_config_with(
        &[ServerSpec {
            name: "notes".into(),
            intercept: vec![server.addr.to_string()],
            upstream: server.addr.to_string(),
        }],
        &[&env.root.clone()],
        &format!(
            r#"
[[role]]
name = "starter"
servers = ["notes"]
allow_tools = ["search"]
allow_methods = ["tasks/*"]

[[role]]
name = "other"
servers = ["notes"]
allow_tools = ["read_*"]
allow_methods = ["tasks/*"]

[[binding]]
role = "starter"
cgroup = "{starters}"

[[binding]]
role = "other"
cgroup = "{others}"
"#
        ),
    );
    env.start_daemon();
    let (starters, others) = (env.dir(&starters), env.dir(&others));
    let url = format!("http://{}/mcp", server.addr);

    let started = rmcp_task(&starters, "task-call", &url, "search");
    let task = started["task_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no task: {started}\n{}", server.log_text()))
        .to_owned();
    let own = interceptor_tests::eventually(
        std::time::Duration::from_secs(5),
        || {
            let got = rmcp_task(&starters, "task-get", &url, &task);
            (got["task"]["status"] == "completed").then_some(got)
        },
        || "the task never completed for its starter".into(),
    );
    assert_eq!(
        own["task"]["result"]["content"][0]["text"], "search done (task)",
        "{own}"
    );
    // Another identity, granted tasks/* but not the tool, that learns the id gets nothing
    // (the server alone would hand it the result); nor an id the proxy never saw start.
    let theirs = rmcp_task(&others, "task-get", &url, &task);
    assert_eq!(theirs["code"], -32601, "{theirs}");
    assert!(
        theirs["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused by policy")),
        "{theirs}"
    );
    let unknown = rmcp_task(&starters, "task-get", &url, "no-such-task");
    assert!(
        unknown["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused by policy")),
        "{unknown}"
    );
    assert_eq!(env.status()["counters"]["proxy"]["tasks"], 1);
    // Nor by subscribing to the task's notifications, which carry its result.
    let listen = format!(
        r#"{{"jsonrpc":"2.0","id":9,"method":"subscriptions/listen","params":{{"notifications":{{"taskIds":["{task}"]}}}}}}"#
    );
    let r = send_raw(
        PROBE,
        &others,
        &server.addr.to_string(),
        interceptor_tests::json_post(&listen).as_bytes(),
    );
    assert!(
        r.reply
            .as_deref()
            .is_some_and(|t| t.contains("refused by policy")),
        "{r:?}"
    );

    let events = env.audit_events();
    let created = events
        .iter()
        .find(|e| e["event"] == "mcp.response" && e["method"] == "tools/call")
        .expect("the task's tools/call answer");
    assert_eq!(created["task_id"], task.as_str(), "{created}");
    let request = |pred: &dyn Fn(&Value) -> bool, what: &str| {
        events
            .iter()
            .find(|e| e["event"] == "mcp.request" && pred(e))
            .unwrap_or_else(|| panic!("{what} not on record"))
            .clone()
    };
    let says = |e: &Value, why: &str| {
        assert!(e["rule"].as_str().is_some_and(|r| r.contains(why)), "{e}");
    };
    let refused = request(
        &|e| e["method"] == "tasks/get" && e["decision"] == "deny" && e["name"] == task.as_str(),
        "the other identity's tasks/get",
    );
    assert_eq!(refused["tool"], "search", "{refused}");
    says(&refused, "started by another identity");
    let listened = request(
        &|e| e["method"] == "subscriptions/listen",
        "the subscription",
    );
    says(&listened, "started by another identity");
    let never = request(
        &|e| e["name"] == "no-such-task",
        "the unknown task's request",
    );
    says(&never, "not started by this identity");
}
