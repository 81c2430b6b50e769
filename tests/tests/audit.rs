//! The audit log, end to end: real clients (official Python SDK) in tagged cgroups calling a real
//! server through the redirect; the events, their fields, the hash chain, crash safety, secrets,
//! and fail-closed behaviour when the log cannot be written.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use interceptor_tests::{
    BackgroundClient, KillOnDrop, LabelServer, McpServer, ServerSpec, TestEnv, eventually,
    interceptor_bin, json_lines, mcp_client, privileged,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const POLICY: &str = r#"
[[role]]
name = "reader"
servers = ["notes"]
allow_tools = ["read_*", "search"]
deny_tools = ["delete_*"]
"#;

struct World {
    env: TestEnv,
    server: McpServer,
    agents: PathBuf,
    url: String,
}

fn world(label: &str, audit: Option<&str>) -> World {
    world_with(label, audit, "")
}

fn world_with(label: &str, audit: Option<&str>, daemon_extra: &str) -> World {
    world_on(
        label,
        audit,
        daemon_extra,
        McpServer::start("streamable-http"),
        "mcp",
    )
}

/// A world whose server (on `transport`) also offers `read_slowly`.
fn slow_world(label: &str, transport: &str, daemon_extra: &str) -> World {
    let server = McpServer::start_with(transport, &["--with-slow-tool"]);
    let path = if transport == "sse" { "sse" } else { "mcp" };
    world_on(label, None, daemon_extra, server, path)
}

fn world_on(
    label: &str,
    audit: Option<&str>,
    daemon_extra: &str,
    server: McpServer,
    path: &str,
) -> World {
    let mut env = TestEnv::new(label);
    env.daemon_extra = daemon_extra.to_owned();
    let agents_rel = env.cgroup("agents");
    let mut extra =
        format!("{POLICY}\n[[binding]]\nrole = \"reader\"\ncgroup = \"{agents_rel}\"\n");
    if let Some(a) = audit {
        extra.push_str(a);
    }
    env.write_config_with(
        &[ServerSpec {
            name: "notes".into(),
            intercept: vec![server.addr.to_string()],
            upstream: server.addr.to_string(),
        }],
        &[&agents_rel],
        &extra,
    );
    env.start_daemon();
    World {
        agents: env.dir(&agents_rel),
        url: format!("http://{}/{path}", server.addr),
        env,
        server,
    }
}

/// The `mcp.response` event of the `read_slowly` call, once written (deferred events follow
/// their request shortly), checked against its `mcp.request`.
fn slow_call_response(env: &TestEnv) -> Value {
    call_response(env, "read_slowly")
}

/// The `mcp.response` event of the call of `tool`, once written, checked against its
/// `mcp.request`.
fn call_response(env: &TestEnv, tool: &str) -> Value {
    let find = |events: &[Value], name: &str| {
        events
            .iter()
            .find(|e| e["event"] == name && e["tool"] == tool)
            .cloned()
    };
    let (request, response) = eventually(
        Duration::from_secs(10),
        || {
            let events = env.audit_events();
            find(&events, "mcp.request").zip(find(&events, "mcp.response"))
        },
        || {
            format!(
                "no mcp.request and mcp.response pair for {tool} in {:#?}",
                env.audit_events()
            )
        },
    );
    assert_eq!(request["decision"], "allow", "{request}");
    assert_eq!(response["id"], request["id"], "{response}");
    assert_eq!(response["identity"], request["identity"], "{response}");
    assert!(response["seq"].as_u64() > request["seq"].as_u64());
    response
}

const SLOW_CALL: &str = r#"read_slowly={"name":"n","seconds":60}"#;

#[test]
fn a_call_its_server_drops_midway_gets_an_upstream_error_response_event() {
    if !privileged() {
        return;
    }
    // Legacy SSE: the answer would come on the session's stream; Streamable HTTP: on the
    // POST's own event stream. Either stream breaks when the server dies mid-call.
    for transport in ["sse", "streamable-http"] {
        let mut w = slow_world(&format!("cutoff-{transport}"), transport, "");
        let client = BackgroundClient::start(&w.agents, &w.url, transport, &[SLOW_CALL]);
        w.server.wait_call("read_slowly", Duration::from_secs(30));
        w.server.kill();
        let response = slow_call_response(&w.env);
        assert_eq!(
            response["outcome"], "upstream_error",
            "{transport}: {response}"
        );
        drop(client);
        let (ok, report) = verify(&[&w.env.audit_path()]);
        assert!(ok, "{report}");
    }
}

#[test]
fn an_http2_call_the_agent_abandons_is_cancelled_before_its_connection_closes() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start_slow("127.0.0.3", "slow", Duration::from_secs(5));
    let mut env = TestEnv::new("h2-cancel");
    let agents = env.cgroup("agents");
    env.write_config_with(
        &[ServerSpec::direct("notes", upstream.addr)],
        &[&agents],
        &format!("{POLICY}\n[[binding]]\nrole = \"reader\"\ncgroup = \"{agents}\"\n"),
    );
    env.start_daemon();
    // curl is killed while the call waits for the upstream: its connection goes, with the
    // stream on it. On HTTP/2 the call runs as a task of its own, apart from the connection's.
    let mut curl = interceptor_tests::h2c_post(
        &env.dir(&agents),
        &format!("http://{}/mcp", upstream.addr),
        r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"search"}}"#,
        &[],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("start curl");
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.bodies().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = curl.kill();
    let _ = curl.wait();
    assert_eq!(
        upstream.bodies().len(),
        1,
        "the call never reached the upstream"
    );
    let (response, close) = eventually(
        Duration::from_secs(10),
        || {
            let events = env.audit_events();
            let find = |name: &str| events.iter().find(|e| e["event"] == name).cloned();
            find("mcp.response").zip(find("connection.close"))
        },
        || {
            format!(
                "no mcp.response and connection.close: {:#?}",
                env.audit_events()
            )
        },
    );
    assert_eq!(response["outcome"], "cancelled", "{response}");
    assert_eq!(response["tool"], "search", "{response}");
    assert!(
        response["seq"].as_u64() < close["seq"].as_u64(),
        "connection.close came first: {close}"
    );
}

#[test]
fn a_call_in_flight_when_the_daemon_stops_gets_a_cancelled_response_event() {
    if !privileged() {
        return;
    }
    let mut w = slow_world("cancelled", "streamable-http", "drain_grace = \"300ms\"\n");
    let client = BackgroundClient::start(&w.agents, &w.url, "streamable-http", &[SLOW_CALL]);
    w.server.wait_call("read_slowly", Duration::from_secs(30));
    w.env.stop_daemon(Signal::SIGTERM);
    drop(client);
    let response = slow_call_response(&w.env);
    assert_eq!(response["outcome"], "cancelled", "{response}");
    // Recorded before the daemon's own last word.
    let events = w.env.audit_events();
    let stop = events
        .iter()
        .find(|e| e["event"] == "daemon.stop")
        .expect("daemon.stop recorded");
    assert!(
        response["seq"].as_u64() < stop["seq"].as_u64(),
        "{events:#?}"
    );
    // The client's connections, cut when the workers stopped, are closed in the log too: after
    // the cancelled call, before daemon.stop.
    let mine = |name: &str| -> Vec<u64> {
        events
            .iter()
            .filter(|e| e["event"] == name && e["identity"] == response["identity"])
            .filter_map(|e| e["seq"].as_u64())
            .collect()
    };
    let (opens, closes) = (mine("connection.open"), mine("connection.close"));
    assert!(!opens.is_empty(), "{events:#?}");
    assert_eq!(opens.len(), closes.len(), "{events:#?}");
    let response_seq = response["seq"].as_u64().unwrap_or(0);
    let stop_seq = stop["seq"].as_u64().unwrap_or(0);
    assert!(
        closes.iter().any(|&c| c > response_seq) && closes.iter().all(|&c| c < stop_seq),
        "{events:#?}"
    );
    let (ok, report) = verify(&[&w.env.audit_path()]);
    assert!(ok, "{report}");
}

fn verify(paths: &[&Path]) -> (bool, String) {
    let out = Command::new(interceptor_bin())
        .args(["audit", "verify"])
        .args(paths)
        .output()
        .expect("run audit verify");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A legacy SSE session, initialised; then a `read_slowly` call (2 s) with id argv[2] and a
/// ping with id argv[3], each posted on its own connection; prints "done" once the stream has
/// carried both answers (or 5 s passed).
const LEGACY_CALLS: &str = r#"
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
stream = socket.create_connection((host, int(port)))
stream.sendall(b"GET /sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
got = b""
while b"/messages/" not in got:
    got += stream.recv(4096)
endpoint = got[got.index(b"/messages/"):].split(b"\r\n")[0].split(b"\n")[0]
def post(body):
    c = socket.create_connection((host, int(port)))
    c.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (endpoint, len(body), body))
    c.recv(4096)
    c.close()
def wait_for(text, seconds):
    global got
    stream.settimeout(seconds)
    try:
        while text not in got:
            got += stream.recv(4096)
    except OSError:
        pass
post(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}')
wait_for(b'"id":1', 5)
post(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
post(b'{"jsonrpc":"2.0","id":%s,"method":"tools/call","params":{"name":"read_slowly","arguments":{"name":"n","seconds":2}}}' % sys.argv[2].encode())
post(b'{"jsonrpc":"2.0","id":%s,"method":"ping"}' % sys.argv[3].encode())
wait_for(b"read_slowly-never", 4)
print("done", flush=True)
"#;

#[test]
fn integer_ids_a_javascript_server_reads_as_one_are_not_answered_for_each_other() {
    if !privileged() {
        return;
    }
    let w = slow_world("rounded-ids", "sse", "");
    // 2^53 + 1, then 2^53 (one number to a reader holding numbers as doubles) in one session
    // while the first is unanswered: the first is displaced as a reused id would be
    // (recorded without an answer, its late answer not taken for the other's), the second
    // answered.
    let server = w
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/sse")
        .to_owned();
    let (out, _agent) = interceptor_tests::python_in_cgroup(
        &w.agents,
        LEGACY_CALLS,
        &[&server, "9007199254740993", "9007199254740992"],
    );
    assert_eq!(out, "done");
    let response = |id: u64| {
        eventually(
            Duration::from_secs(10),
            || {
                w.env
                    .audit_events()
                    .into_iter()
                    .find(|e| e["event"] == "mcp.response" && e["id"].as_u64() == Some(id))
            },
            || format!("no mcp.response for {id}: {:#?}", w.env.audit_events()),
        )
    };
    assert_eq!(response(9_007_199_254_740_993)["outcome"], "no_response");
    assert_eq!(response(9_007_199_254_740_992)["outcome"], "result");
    // One response event each: the slow call's late answer is not recorded for either.
    let responses = w
        .env
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "mcp.response" && e["id"].as_u64().is_some_and(|i| i > 1))
        .count();
    assert_eq!(responses, 2);
}

#[test]
fn every_request_yields_the_expected_events() {
    if !privileged() {
        return;
    }
    let w = world("audit-events", None);
    let out = mcp_client(
        &w.agents,
        &w.url,
        "streamable-http",
        "legacy",
        &[
            r#"search={"query":"q","api_key":"sk-NEVER-IN-THE-LOG","nested":{"password":"hunter2"},"note":"curl -H 'Authorization: Bearer NEVER0IN0THE0LOG0'"}"#,
            r#"delete_note={"name":"n"}"#,
        ],
    );
    assert_eq!(out["calls"]["search"]["ok"], true, "{out}");
    let pid = out["pid"].as_u64().expect("client pid");
    let cgroup = format!("{}/agents", w.env.root);
    // mcp.response and connection.close events are written after the answer: wait until every
    // connection opened has closed and the log has stopped growing.
    let events = eventually(
        Duration::from_secs(15),
        || {
            let events = w.env.audit_events();
            let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
            let settled = count("connection.open") > 0
                && count("connection.open") == count("connection.close");
            std::thread::sleep(Duration::from_millis(200));
            (settled && w.env.audit_events().len() == events.len()).then_some(events)
        },
        || format!("the log did not settle: {:#?}", w.env.audit_events()),
    );
    let find = |event: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        events
            .iter()
            .find(|e| e["event"] == event && pred(e))
            .cloned()
            .unwrap_or_else(|| panic!("no {event} event matched in {events:#?}"))
    };
    let start = find("daemon.start", &|_| true);
    assert_eq!(start["seq"], 1);
    assert_eq!(start["v"], 1);
    // Every event says who: the agent for its connection's events, the daemon for its own.
    let daemon_pid = w.env.daemon_pid().expect("daemon running");
    assert_eq!(start["identity"]["pid"], daemon_pid, "{start}");
    assert_eq!(start["identity"]["comm"], "interceptor", "{start}");
    assert_eq!(start["identity"]["uid"], 0, "{start}");
    for e in &events {
        for key in ["pid", "uid", "gid", "comm", "workload_id", "cgroup", "exe"] {
            assert!(e["identity"].get(key).is_some(), "no identity.{key} in {e}");
        }
    }

    let allow = find("mcp.request", &|e| e["tool"] == "search");
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["rule"], "role reader: allow_tools \"search\"");
    assert_eq!(allow["server"], "notes");
    assert_eq!(allow["method"], "tools/call");
    assert_eq!(allow["identity"]["pid"], pid);
    assert_eq!(allow["identity"]["uid"], 0);
    assert_eq!(allow["identity"]["cgroup"], cgroup.as_str());
    assert!(
        allow["identity"]["exe"]
            .as_str()
            .is_some_and(|e| e.contains("python"))
    );
    assert_eq!(allow["arguments"]["query"], "q");
    assert_eq!(allow["arguments"]["api_key"], "[REDACTED]");
    assert_eq!(allow["arguments"]["nested"]["password"], "[REDACTED]");
    // A secret recognised by its shape, under a key that says nothing.
    assert_eq!(
        allow["arguments"]["note"],
        "curl -H 'Authorization: Bearer [REDACTED]'"
    );
    assert!(allow["session"].is_string(), "{allow}");
    assert_eq!(allow["protocol"], "2025-11-25");
    for key in ["ts", "seq", "prev_hash", "hash"] {
        assert!(!allow[key].is_null(), "{key} missing: {allow}");
    }

    let deny = find("mcp.request", &|e| e["tool"] == "delete_note");
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["rule"], "role reader: deny_tools \"delete_*\"");

    let response = find("mcp.response", &|e| e["tool"] == "search");
    assert_eq!(response["outcome"], "result");
    assert!(response["latency_us"].as_u64().is_some());
    assert_eq!(response["id"], allow["id"]);
    // The initialize handshake and the list are requests too.
    find("mcp.request", &|e| e["method"] == "initialize");
    find("mcp.request", &|e| e["method"] == "tools/list");

    // `audit tail`: readable lines, filtered by the agent's identity, decision and tool.
    let tail = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["audit", "tail"];
        all.extend_from_slice(args);
        let out = w.env.cli(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let everything = tail(&[]);
    assert_eq!(everything.len(), events.len(), "{everything:#?}");
    assert!(
        everything[0].contains(" daemon.start by=daemon:interceptor["),
        "{}",
        everything[0]
    );
    let denied = tail(&["--identity", &cgroup, "--decision", "deny"]);
    assert_eq!(denied.len(), 1, "{denied:#?}");
    assert!(
        denied[0].contains(" mcp.request pid=")
            && denied[0].contains("tool=delete_note")
            && denied[0].contains("decision=deny"),
        "{}",
        denied[0]
    );
    let search = tail(&["--identity", &pid.to_string(), "--tool", "search"]);
    assert!(
        search.iter().any(|l| l.contains(" mcp.request "))
            && search.iter().any(|l| l.contains(" mcp.response ")),
        "{search:#?}"
    );
    assert!(
        search.iter().all(|l| l.contains("tool=search")),
        "{search:#?}"
    );
    // The daemon's own events are not an agent's: uid 0 matches the agent's events only.
    assert!(
        tail(&["--identity", "0"])
            .iter()
            .all(|l| !l.contains(" by=")),
        "daemon events matched an agent filter"
    );
    let bad = w.env.cli(&["audit", "tail", "--decision", "maybe"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("allow"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    find("connection.open", &|e| e["identity"]["pid"] == pid);

    let text = std::fs::read_to_string(w.env.audit_path()).expect("audit file");
    assert!(!text.contains("sk-NEVER-IN-THE-LOG") && !text.contains("hunter2"));
    assert!(
        !text.contains("NEVER0IN0THE0LOG0"),
        "a bearer token in the log"
    );
    let (ok, report) = verify(&[&w.env.audit_path()]);
    assert!(ok, "{report}");

    // Edit one line: verify fails and names it.
    let edited = text.replacen("\"tools/list\"", "\"tools/lisT\"", 1);
    let copy = w.env.tmp.path().join("edited.jsonl");
    std::fs::write(&copy, edited).expect("write copy");
    let (ok, report) = verify(&[&copy]);
    assert!(!ok, "{report}");
    assert!(
        report.contains("edited.jsonl:") && report.contains("hash mismatch"),
        "{report}"
    );

    // Its first records cut off, with another file beside it that could hold them: a note,
    // and a failure with --strict.
    let cut_dir = w.env.tmp.path().join("cut");
    std::fs::create_dir(&cut_dir).expect("mkdir");
    let cut = cut_dir.join("audit.jsonl");
    let rest: Vec<&str> = text.lines().skip(2).collect();
    std::fs::write(&cut, rest.join("\n") + "\n").expect("write cut log");
    std::fs::write(cut_dir.join("audit.jsonl.old"), "kept elsewhere\n").expect("write");
    let (ok, report) = verify(&[&cut]);
    assert!(ok && report.contains("starts at seq 3"), "{report}");
    let strict = Command::new(interceptor_bin())
        .args(["audit", "verify", "--strict"])
        .arg(&cut)
        .output()
        .expect("run audit verify --strict");
    let err = String::from_utf8_lossy(&strict.stderr);
    assert!(
        !strict.status.success() && err.contains("starts at seq 3"),
        "{err}"
    );
}

#[test]
fn sigkill_loses_no_forwarded_call_and_the_chain_holds() {
    if !privileged() {
        return;
    }
    let mut w = world("audit-crash", None);
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let dir = w.agents.clone();
            let url = w.url.clone();
            std::thread::spawn(move || {
                let calls: Vec<String> = (0..4)
                    .map(|j| format!(r#"search={{"query":"c{i}-{j}"}}"#))
                    .collect();
                let refs: Vec<&str> = calls.iter().map(String::as_str).collect();
                mcp_client(&dir, &url, "streamable-http", "legacy", &refs)
            })
        })
        .collect();
    // Kill while calls are flowing: once the server has executed a couple.
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.server.calls().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    w.env.stop_daemon(Signal::SIGKILL);
    for c in clients {
        let _ = c.join();
    }
    w.env.start_daemon();
    let (ok, report) = verify(&[&w.env.audit_path()]);
    assert!(ok, "{report}");
    // Every call the server executed was recorded (write-ahead) as an allowed request.
    let executed = w.server.calls().len();
    let recorded = w
        .env
        .audit_events()
        .iter()
        .filter(|e| {
            e["event"] == "mcp.request" && e["tool"] == "search" && e["decision"] == "allow"
        })
        .count();
    assert!(
        executed > 0,
        "nothing ran before the kill; the test proves nothing"
    );
    assert!(
        recorded >= executed,
        "{recorded} recorded < {executed} executed"
    );
}

#[test]
fn an_unwritable_log_refuses_allowed_calls_until_repaired() {
    if !privileged() {
        return;
    }
    // A tiny filesystem the test owns, so "disk full" is real and repairable.
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = dir.path().join("fs");
    std::fs::create_dir(&mount).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &mount,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        // Root only, as an audit folder must be.
        Some("size=256k,mode=0700"),
    )
    .expect("mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(mount.clone());
    let log = mount.join("audit.jsonl");
    let audit = format!(
        "\n[audit]\npath = \"{}\"\ndurability = \"fsync\"\n",
        log.display()
    );
    let w = world("audit-full", Some(&audit));

    let out = mcp_client(
        &w.agents,
        &w.url,
        "streamable-http",
        "legacy",
        &[r#"search={"query":"before"}"#],
    );
    assert_eq!(out["calls"]["search"]["ok"], true, "{out}");
    // fsync mode: the call waited for an fdatasync, which status counts and times.
    let status = w.env.status();
    assert!(
        status["audit"]["syncs"].as_u64().unwrap_or(0) >= 1 && status["audit"]["sync_us"].is_u64(),
        "{status}"
    );

    // Fill the filesystem.
    let filler = mount.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 512 * 1024]);
    let out = mcp_client(
        &w.agents,
        &w.url,
        "streamable-http",
        "legacy",
        &[r#"search={"query":"during"}"#],
    );
    let text = out.to_string();
    assert!(
        out.get("fatal").is_some() || out["calls"]["search"]["ok"] == false,
        "{out}"
    );
    assert!(
        text.contains("audit log unavailable") || text.contains("503"),
        "{out}"
    );
    assert!(!w.server.calls().iter().any(|c| c == "search") || w.server.calls().len() == 1);
    let status = w.env.status();
    assert_eq!(status["audit"]["healthy"], false, "{status}");

    // Repair: calls flow again, and the chain is intact.
    std::fs::remove_file(&filler).expect("remove filler");
    let out = mcp_client(
        &w.agents,
        &w.url,
        "streamable-http",
        "legacy",
        &[r#"search={"query":"after"}"#],
    );
    assert_eq!(out["calls"]["search"]["ok"], true, "{out}");
    assert_eq!(w.server.calls(), vec!["search", "search"]);
    let (ok, report) = verify(&[&log]);
    assert!(ok, "{report}");
    assert_eq!(w.env.status()["audit"]["healthy"], json!(true));
    // What was recorded without a caller waiting (connections opened and closed while the
    // disk was full) was kept for a later write, not lost with the failed one.
    let count = |events: &[Value], name: &str| events.iter().filter(|e| e["event"] == name).count();
    eventually(
        std::time::Duration::from_secs(5),
        || {
            let events = json_lines(&log);
            let (open, close) = (
                count(&events, "connection.open"),
                count(&events, "connection.close"),
            );
            (open == close && open >= 3).then_some(())
        },
        || {
            format!(
                "connections opened and closed do not match: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        },
    );
    // status names the last seq written: what the log's last line carries.
    eventually(
        std::time::Duration::from_secs(5),
        || {
            let last = json_lines(&log).pop()?;
            (w.env.status()["audit"]["seq"] == last["seq"]).then_some(())
        },
        || {
            format!(
                "status audit.seq is not the last line's: {}",
                w.env.status()
            )
        },
    );
}

/// A world whose audit log (in a folder of its own) rotates past 4 KiB, with `more` in its
/// `[audit]` section.
fn rotating_world(label: &str, more: &str) -> (tempfile::TempDir, PathBuf, World) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    let audit = format!(
        "\n[audit]\npath = \"{}\"\nmax_file_bytes = 4096\n{more}",
        log.display()
    );
    let w = world(label, Some(&audit));
    (dir, log, w)
}

/// Three client runs of one search each: several KiB of events each, more than one rotation
/// with `max_file_bytes = 4096`.
fn search_three_times(w: &World) {
    for query in ["one", "two", "three"] {
        let out = mcp_client(
            &w.agents,
            &w.url,
            "streamable-http",
            "legacy",
            &[&format!(r#"search={{"query":"{query}"}}"#)],
        );
        assert_eq!(out["calls"]["search"]["ok"], true, "{out}");
    }
}

#[test]
fn audit_tail_follows_the_log_across_rotations() {
    if !privileged() {
        return;
    }
    let (dir, _log, w) = rotating_world("audit-follow", "");
    let (_follow, lines) = follow_tail(&w.env.config_path);
    let rx = {
        let (tx, rx) = std::sync::mpsc::channel::<Value>();
        std::thread::spawn(move || {
            for line in lines {
                if tx
                    .send(serde_json::from_str(&line).expect("JSON line"))
                    .is_err()
                {
                    break;
                }
            }
        });
        rx
    };
    search_three_times(&w);
    let rotated = std::fs::read_dir(dir.path())
        .expect("log dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl."))
        })
        .count();
    assert!(rotated >= 2, "the log rotated {rotated} times");
    // Every event once, in order, from the first file to the current one.
    let mut seen: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen
        .iter()
        .filter(|e| e["event"] == "mcp.response" && e["tool"] == "search")
        .count()
        < 3
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) => seen.push(e),
            Err(_) => panic!("tail --follow stopped short: {seen:#?}"),
        }
    }
    let seqs: Vec<u64> = seen.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs.len(), seen.len());
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "events missed or repeated across rotations");
}

#[test]
fn max_files_keeps_the_newest_files_and_verify_accepts_the_chain_they_hold() {
    if !privileged() {
        return;
    }
    let (dir, log, mut w) = rotating_world("audit-prune", "max_files = 2\n");
    // The log rotates, and older files go.
    search_three_times(&w);
    // Stopped: nothing more is written (a later event could rotate and prune while the files
    // are looked at).
    w.env.stop_daemon(Signal::SIGTERM);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p != &log)
        .collect();
    assert_eq!(
        files.len(),
        1,
        "max_files = 2 keeps one rotated file: {files:?}"
    );
    let pruned = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .chain(std::fs::read_to_string(&files[0]).expect("rotated").lines())
        .filter(|l| l.contains("\"event\":\"audit.pruned\""))
        .count();
    assert!(pruned >= 1, "no audit.pruned event in the files kept");
    files.push(log.clone());
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, report) = verify(&paths);
    assert!(ok, "{report}");
    assert!(report.contains("deleted by [audit] max_files"), "{report}");
}

#[test]
fn audit_tail_follows_a_log_cut_below_what_it_read() {
    // No daemon needed: the log is written here, as the daemon would: a torn last line cut off
    // at its start, then a write that failed rolled back below lines already read.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    let config = dir.path().join("interceptor.toml");
    std::fs::write(&config, format!("[audit]\npath = \"{}\"\n", log.display())).expect("config");
    let line = |seq: u64, event: &str| format!("{{\"event\":\"{event}\",\"seq\":{seq}}}\n");
    let cut_to = |len: usize| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .expect("open log");
        file.set_len(len as u64).expect("cut the log");
    };
    let append = |text: &str| {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("open log");
        std::io::Write::write_all(&mut file, text.as_bytes()).expect("append");
    };
    let (first, second) = (line(1, "a"), line(2, "a-long-event-name-to-be-rolled-back"));
    std::fs::write(&log, format!("{first}{second}{{\"event\":\"torn")).expect("log");
    let (_follow, rx, errors) = follow_tail_and_errors(&config);
    let next = || rx.recv_timeout(Duration::from_secs(10)).expect("a line");
    assert_eq!(next(), first.trim_end());
    assert_eq!(next(), second.trim_end());
    // Let it wait at the unfinished line each time before the log changes under it.
    let settle = || std::thread::sleep(Duration::from_millis(500));
    settle();
    cut_to(first.len() + second.len());
    append(&line(3, "b"));
    assert_eq!(next(), line(3, "b").trim_end());
    settle();
    cut_to(first.len());
    // Appended once the tail has seen the cut (else it finds the log longer again, and takes
    // the new line for the rest of one it read).
    let notice = errors
        .recv_timeout(Duration::from_secs(30))
        .expect("a notice of the cut");
    assert!(
        notice.contains(&format!("was truncated to {} bytes", first.len())),
        "{notice}"
    );
    append(&line(4, "c"));
    assert_eq!(next(), line(4, "c").trim_end());
}

/// `interceptor audit tail --follow --json` with `config`, running, and its lines as printed.
fn follow_tail(config: &Path) -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    let (follow, out, _) = follow_tail_and_errors(config);
    (follow, out)
}

/// [`follow_tail`], and what it writes to stderr, line by line.
fn follow_tail_and_errors(
    config: &Path,
) -> (
    KillOnDrop,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<String>,
) {
    let mut follow = KillOnDrop(
        Command::new(interceptor_bin())
            .args(["audit", "tail", "--follow", "--json", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start audit tail --follow"),
    );
    let lines = |pipe: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            // Read to the end whether or not anyone listens (a full pipe would stall it).
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    };
    let out = lines(Box::new(follow.0.stdout.take().expect("stdout")));
    let err = lines(Box::new(follow.0.stderr.take().expect("stderr")));
    (follow, out, err)
}

#[test]
fn audit_tail_says_which_records_it_could_not_find_after_a_rotation() {
    // No daemon needed: the files are written here as the daemon leaves them when the tail
    // fell behind by more rotations than max_files keeps.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    let config = dir.path().join("interceptor.toml");
    std::fs::write(&config, format!("[audit]\npath = \"{}\"\n", log.display())).expect("config");
    let line = |seq: u64| format!("{{\"event\":\"e\",\"seq\":{seq}}}\n");
    std::fs::write(&log, format!("{}{}", line(1), line(2))).expect("log");
    let (_follow, out, err) = follow_tail_and_errors(&config);
    let next = || out.recv_timeout(Duration::from_secs(10)).expect("a line");
    assert_eq!(next(), line(1).trim_end());
    assert_eq!(next(), line(2).trim_end());
    // Rotated away, and 3..4 pruned: 5..6 are in the one rotated file left, 7 in the new log.
    std::fs::rename(&log, dir.path().join("moved-away")).expect("move");
    std::fs::write(
        dir.path().join("audit.jsonl.2026-11-28T000000.000000Z"),
        format!("{}{}", line(5), line(6)),
    )
    .expect("rotated");
    // An operator's shorter copy starting alike must not hide the file it copies.
    std::fs::write(dir.path().join("audit.jsonl.bak"), line(5)).expect("copy");
    std::fs::write(&log, line(7)).expect("new log");
    assert_eq!(next(), line(5).trim_end());
    assert_eq!(next(), line(6).trim_end());
    assert_eq!(next(), line(7).trim_end());
    let notice = err
        .recv_timeout(Duration::from_secs(10))
        .expect("a notice on stderr");
    assert!(notice.contains("from seq 3 to 4"), "{notice}");
}

#[test]
fn metrics_count_requests_denials_and_kernel_redirects() {
    if !privileged() {
        return;
    }
    let port = interceptor_tests::free_port();
    let w = world_with(
        "metrics",
        None,
        &format!("metrics_addr = \"127.0.0.1:{port}\"\n"),
    );
    let out = mcp_client(
        &w.agents,
        &w.url,
        "streamable-http",
        "legacy",
        &[
            r#"search={"query":"q"}"#,
            r#"delete_note={"name":"n"}"#,
            r#"made_up_tool_7f3a={}"#,
        ],
    );
    assert_eq!(out["calls"]["search"]["ok"], true, "{out}");
    assert_ne!(out["calls"]["made_up_tool_7f3a"]["ok"], true, "{out}");
    let text = interceptor_tests::scrape_metrics(port);
    for needle in [
        "interceptor_requests_total{server=\"notes\",method=\"tools/call\",decision=\"allow\"} 1",
        "interceptor_requests_total{server=\"notes\",method=\"tools/call\",decision=\"deny\"} 2",
        "interceptor_denials_total{server=\"notes\",rule=\"role reader: deny_tools \\\"delete_*\\\"\"} 1",
        "interceptor_upstream_latency_seconds_bucket",
        "interceptor_connections_total",
        "interceptor_kernel_events_total{event=\"redirected\"}",
        "interceptor_audit_events_total",
        "interceptor_audit_healthy 1",
        "interceptor_audit_fsync_seconds_bucket",
        // No [ca] here: nothing minted.
        "interceptor_certificate_mints_total 0",
        // A name the agent made up is not a label value.
        "interceptor_denials_total{server=\"notes\",rule=\"default deny: no role allows the tool\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(!text.contains("made_up_tool_7f3a"), "{text}");

    // Anyone on the node may connect: idle connections beyond 32 are closed at once (they
    // would use up the daemon's file descriptors), and scrapes work again once they go.
    let idle: Vec<std::net::TcpStream> = (0..32)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let closed_at_once = || {
        use std::io::Read;
        let mut extra = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        extra
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        // EOF (or a reset), not a timeout.
        match extra.read(&mut [0u8; 16]) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    assert!(closed_at_once(), "a 33rd scrape connection was kept");
    drop(idle);
    interceptor_tests::eventually(
        std::time::Duration::from_secs(5),
        || {
            interceptor_tests::try_scrape_metrics(port)
                .is_ok_and(|t| t.contains("interceptor_connections_total"))
                .then_some(())
        },
        || "no scrape after the idle connections closed".to_owned(),
    );
}

#[test]
fn an_answer_on_a_resumed_stream_is_recorded_as_the_calls_response() {
    if !privileged() {
        return;
    }
    // The server closes the POST's event stream after its priming event (SSE polling); the
    // official client resumes it with a GET and Last-Event-ID, where the answer comes.
    let server = McpServer::start_with("streamable-http", &["--resumable"]);
    let w = world_on("resumed", None, "", server, "mcp");
    let out = mcp_client(
        &w.agents,
        &w.url,
        "streamable-http",
        "legacy",
        &[r#"read_polled={"name":"n"}"#],
    );
    assert_eq!(out["calls"]["read_polled"]["ok"], true, "{out}");
    let response = call_response(&w.env, "read_polled");
    assert_eq!(response["outcome"], "result", "{response}");
    // Recorded once.
    let events = w.env.audit_events();
    let responses = events
        .iter()
        .filter(|e| e["event"] == "mcp.response" && e["tool"] == "read_polled")
        .count();
    assert_eq!(responses, 1, "{events:#?}");
    // The GET that resumed the stream is on record with the event id it resumed after.
    assert!(
        events.iter().any(|e| e["event"] == "http.request"
            && e["method"] == "GET"
            && e["last_event_id"].is_string()),
        "{events:#?}"
    );
}

#[test]
fn metrics_answer_only_the_token_holder_when_one_is_configured() {
    if !privileged() {
        return;
    }
    let port = interceptor_tests::free_port();
    let files = tempfile::tempdir().expect("tempdir");
    let token = files.path().join("metrics-token");
    std::fs::write(&token, "s3cret-scrape-token\n").expect("write token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod token");
    let w = world_with(
        "metrics-token",
        None,
        &format!(
            "metrics_addr = \"127.0.0.1:{port}\"\nmetrics_token_file = \"{}\"\n",
            token.display()
        ),
    );
    let scrape = |auth: Option<&str>| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let header = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n"
        )
        .expect("send");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read");
        text
    };
    for refused in [None, Some("Bearer wrong-token"), Some("Basic czNjcmV0")] {
        let text = scrape(refused);
        assert!(
            text.starts_with("HTTP/1.1 401") && !text.contains("interceptor_"),
            "{refused:?}: {text}"
        );
    }
    let text = scrape(Some("Bearer s3cret-scrape-token"));
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("interceptor_audit_events_total"),
        "{text}"
    );
    // A token file others may read is refused, by `check` as by the daemon.
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod token");
    let out = w.env.cli(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("readable by group or others"),
        "{err}"
    );
}
