//! Policy reload: a valid new policy applies to the next request on every connection, an
//! invalid one is refused and the old one stays, agents holding a server stream are told to
//! re-list their tools, and server streams the new policy no longer allows end.

use std::time::Duration;

use interceptor_tests::{
    ClientResult, McpServer, ServerSpec, TestEnv, eventually, mcp_client, privileged, read_stream,
};
use nix::sys::signal::{Signal, kill};
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_probe-client");

fn policy(allow_tools: &str) -> String {
    format!("\n[[role]]\nname = \"reader\"\nservers = [\"notes\"]\nallow_tools = [{allow_tools}]\n")
}

struct World {
    env: TestEnv,
    server: McpServer,
    agents: std::path::PathBuf,
    spec: Vec<ServerSpec>,
    agents_rel: String,
}

impl World {
    /// Starts the daemon and opens a legacy SSE session's stream from the agents' cgroup, read
    /// for `read_ms` in a thread; returns once the proxy has registered the session.
    fn open_legacy_stream(&mut self, read_ms: u64) -> std::thread::JoinHandle<ClientResult> {
        self.env.start_daemon();
        let addr = self.server.addr.to_string();
        let request =
            format!("GET /sse HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        let agents = self.agents.clone();
        let reader = std::thread::spawn(move || {
            read_stream(PROBE, &agents, &addr, request.as_bytes(), read_ms)
        });
        self.env.wait_log("legacy SSE session registered", |_| true);
        reader
    }

    /// Writes `policy`, reloads, and waits for a server stream to end: the reason it gives.
    fn reload_ending_a_stream(&self, policy: &str) -> String {
        self.write(policy);
        let r = self.env.cli(&["reload"]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let log = self.env.wait_log(
            "server stream ended: the reloaded policy no longer allows it",
            |_| true,
        );
        log["reason"].as_str().unwrap_or_default().to_owned()
    }

    fn new(label: &str, transport: &str) -> Self {
        let mut env = TestEnv::new(label);
        let server = McpServer::start(transport);
        let agents_rel = env.cgroup("agents");
        let spec = vec![ServerSpec {
            name: "notes".into(),
            intercept: vec![server.addr.to_string()],
            upstream: server.addr.to_string(),
        }];
        let w = Self {
            agents: env.dir(&agents_rel),
            env,
            server,
            spec,
            agents_rel,
        };
        w.write(&policy(r#""search""#));
        w
    }

    fn write(&self, policy: &str) {
        let binding = format!(
            "\n[[binding]]\nrole = \"reader\"\ncgroup = \"{}\"\n",
            self.agents_rel
        );
        self.env.write_config_with(
            &self.spec,
            &[&self.agents_rel],
            &format!("{policy}{binding}"),
        );
    }
}

#[test]
fn reload_applies_valid_policies_and_refuses_invalid_ones() {
    if !privileged() {
        return;
    }
    let mut w = World::new("reload", "streamable-http");
    w.env.start_daemon();
    let url = format!("http://{}/mcp", w.server.addr);
    let out = mcp_client(
        &w.agents,
        &url,
        "streamable-http",
        "legacy",
        &[r#"read_note={"name":"a"}"#],
    );
    assert_eq!(out["tools"], json!(["search"]), "{out}");
    assert_eq!(out["calls"]["read_note"]["code"], -32602, "{out}");

    // Valid: applies to the next request.
    w.write(&policy(r#""search", "read_*""#));
    let r = w.env.cli(&["reload"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(said.contains("changed"), "{said}");
    // It names the file the daemon re-read: the one it was started with, whichever file
    // found its socket (a copy edited elsewhere is not it, and that is said).
    assert!(
        said.contains(&format!(
            "policy reloaded from {}",
            w.env.config_path.display()
        )),
        "{said}"
    );
    let copy = w.env.tmp.path().join("edited-copy.toml");
    std::fs::copy(&w.env.config_path, &copy).expect("copy the config");
    let r = std::process::Command::new(interceptor_tests::interceptor_bin())
        .args(["reload", "--config"])
        .arg(&copy)
        .output()
        .expect("run interceptor");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(
        said.contains("warning: the daemon re-read") && said.contains("edited-copy.toml"),
        "{said}"
    );
    let out = mcp_client(
        &w.agents,
        &url,
        "streamable-http",
        "legacy",
        &[r#"read_note={"name":"a"}"#],
    );
    assert_eq!(out["tools"], json!(["read_note", "search"]), "{out}");
    assert_eq!(out["calls"]["read_note"]["ok"], true, "{out}");

    // Sections that apply only at the next start are reported, not silently ignored.
    w.write(&format!(
        "{}\n[identity]\ntrust_domain = \"elsewhere.test\"\n",
        policy(r#""search", "read_*""#)
    ));
    let r = w.env.cli(&["reload"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(
        said.contains("applied only at the next start: [identity]"),
        "{said}"
    );

    // Invalid: refused with the reason; the current policy stays.
    w.write(&policy(r#""^(broken$""#));
    let r = w.env.cli(&["reload"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("reload refused") && err.contains("role[0].allow_tools[0]"),
        "{err}"
    );
    let out = mcp_client(
        &w.agents,
        &url,
        "streamable-http",
        "legacy",
        &[r#"read_note={"name":"b"}"#],
    );
    assert_eq!(out["calls"]["read_note"]["ok"], true, "{out}");

    // SIGHUP reloads too.
    w.write(&policy(r#""search""#));
    let pid = w.env.daemon_pid().expect("daemon running");
    kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGHUP).expect("SIGHUP");
    w.env.wait_log("policy reloaded", |v| {
        v["policy_changed"] == true && v["roles"] == 1
    });
    let out = mcp_client(
        &w.agents,
        &url,
        "streamable-http",
        "legacy",
        &[r#"read_note={"name":"c"}"#],
    );
    assert_eq!(out["calls"]["read_note"]["code"], -32602, "{out}");
    assert_eq!(w.server.calls(), vec!["read_note", "read_note"]);

    // Each reload is audited with who asked: the CLI (its process, from the admin socket) or
    // the daemon itself for SIGHUP; the refused one with its reason.
    let reloads = eventually(
        Duration::from_secs(5),
        || {
            let reloads: Vec<Value> = w
                .env
                .audit_events()
                .into_iter()
                .filter(|e| e["event"] == "policy.reload")
                .collect();
            (reloads.len() == 5).then_some(reloads)
        },
        || format!("not five policy.reload events: {:#?}", w.env.audit_events()),
    );
    let [by_cli, by_copy, later, refused, by_signal] = &reloads[..] else {
        unreachable!()
    };
    for (event, outcome) in [
        (by_cli, "applied"),
        (by_copy, "applied"),
        (later, "applied"),
        (refused, "refused"),
        (by_signal, "applied"),
    ] {
        assert_eq!(event["outcome"], outcome, "{event}");
    }
    assert_eq!(later["not_applied"], json!(["[identity]"]), "{later}");
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("role[0].allow_tools[0]")),
        "{refused}"
    );
    for event in [by_cli, refused] {
        assert_eq!(event["identity"]["comm"], "interceptor", "{event}");
        assert_eq!(event["identity"]["uid"], 0, "{event}");
        assert_ne!(
            event["identity"]["pid"], pid,
            "the CLI's, not the daemon's: {event}"
        );
    }
    assert_eq!(by_signal["identity"]["pid"], pid, "{by_signal}");
}

#[test]
fn reload_tells_open_server_streams_to_relist_tools() {
    if !privileged() {
        return;
    }
    let mut w = World::new("reload-stream", "sse");
    // The reader stops after 6 s without a byte: the reload comes well within that.
    let reader = w.open_legacy_stream(6000);
    std::thread::sleep(Duration::from_millis(100));
    w.write(&policy(r#""search", "write_note""#));
    let r = w.env.cli(&["reload"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("1 server stream(s) notified"));
    let got = reader.join().expect("reader thread");
    let body = got.reply.unwrap_or_default();
    assert!(body.contains("event: endpoint"), "{body}");
    assert!(body.contains("notifications/tools/list_changed"), "{body}");
    // Still allowed: the stream went on (no last chunk) until the reader stopped.
    assert!(!body.ends_with(LAST_CHUNK), "{body:?}");
}

/// The end of a chunked HTTP/1.1 body: the proxy ended the stream.
const LAST_CHUNK: &str = "\r\n0\r\n\r\n";

#[test]
fn reload_ends_server_streams_the_new_policy_no_longer_allows() {
    if !privileged() {
        return;
    }
    let mut w = World::new("reload-end", "sse");
    let reader = w.open_legacy_stream(5000);
    // The reader's role now reaches another server only: the stream it holds to this one,
    // judged when it opened, ends.
    let reason = w.reload_ending_a_stream(
        "\n[[role]]\nname = \"reader\"\nservers = [\"notes-*\"]\nallow_tools = [\"search\"]\n",
    );
    assert!(
        reason.contains("grants server \"notes\" any more"),
        "{reason}"
    );
    let got = reader.join().expect("reader thread");
    let body = got.reply.unwrap_or_default();
    assert!(body.contains("event: endpoint"), "{body}");
    assert!(
        body.ends_with(LAST_CHUNK),
        "the stream was not ended: {body:?}"
    );
    // A new stream is refused under the new policy.
    let request = format!(
        "GET /sse HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n",
        w.server.addr
    );
    let again = read_stream(
        PROBE,
        &w.agents,
        &w.server.addr.to_string(),
        request.as_bytes(),
        2000,
    );
    assert_eq!(again.status, Some(403), "{again:?}");
}

/// A raw 2026-07-28 `subscriptions/listen` (the server stream of that generation).
fn listen(addr: &str, notifications: &str) -> String {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{{"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}},"notifications":{notifications}}}}}"#
    );
    format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nMCP-Protocol-Version: 2026-07-28\r\n\
         Mcp-Method: subscriptions/listen\r\nAccept: application/json, text/event-stream\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn reload_ends_listen_streams_whose_subscriptions_are_no_longer_allowed() {
    if !privileged() {
        return;
    }
    let mut w = World::new("reload-listen", "streamable-http");
    let with_subscribe = "\n[[role]]\nname = \"reader\"\nservers = [\"notes\"]\nallow_tools = [\"search\"]\nallow_methods = [\"resources/subscribe\"]\n";
    w.write(with_subscribe);
    w.env.start_daemon();
    let addr = w.server.addr.to_string();
    let open = |notifications: &str| {
        let request = listen(&addr, notifications);
        let (agents, addr) = (w.agents.clone(), addr.clone());
        std::thread::spawn(move || read_stream(PROBE, &agents, &addr, request.as_bytes(), 8000))
    };
    let subscribed = open(r#"{"resourceSubscriptions":["notes://a"]}"#);
    let plain = open(r#"{"toolsListChanged":true}"#);
    // Both streams open (their requests allowed and forwarded), then subscribing is withdrawn.
    eventually(
        Duration::from_secs(10),
        || {
            let n = w
                .env
                .audit_events()
                .iter()
                .filter(|e| e["method"] == "subscriptions/listen" && e["decision"] == "allow")
                .count();
            (n == 2).then_some(())
        },
        || format!("listen requests not allowed: {:#?}", w.env.audit_events()),
    );
    std::thread::sleep(Duration::from_millis(300));
    let reason = w.reload_ending_a_stream(&policy(r#""search""#));
    assert!(reason.contains("subscription to notes://a"), "{reason}");
    let ended = subscribed.join().expect("reader").reply.unwrap_or_default();
    assert!(ended.contains("subscriptions/acknowledged"), "{ended}");
    assert!(ended.contains("stream ended by a policy reload"), "{ended}");
    assert!(ended.ends_with(LAST_CHUNK), "not ended: {ended:?}");
    let open = plain.join().expect("reader").reply.unwrap_or_default();
    assert!(open.contains("subscriptions/acknowledged"), "{open}");
    assert!(!open.ends_with(LAST_CHUNK), "ended: {open:?}");
    // The listen request's answer is recorded as ended by the reload.
    let response = eventually(
        Duration::from_secs(10),
        || {
            w.env.audit_events().into_iter().find(|e| {
                e["event"] == "mcp.response"
                    && e["method"] == "subscriptions/listen"
                    && e["outcome"] == "policy_changed"
            })
        },
        || format!("no policy_changed response: {:#?}", w.env.audit_events()),
    );
    assert_eq!(response["id"], 1, "{response}");
}
