//! Operating it: revocation (kernel block map + live connections), all-egress containment,
//! persistence across restarts, and draining on SIGTERM.

use std::time::{Duration, Instant};

use interceptor_tests::{
    LabelServer, McpServer, ServerSpec, TestEnv, eventually, privileged, read_stream, run_client,
    run_client_as, send_datagram, send_raw, send_raw_env,
};
use nix::sys::signal::Signal;

const PROBE: &str = env!("CARGO_BIN_EXE_probe-client");
const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

/// An MCP `ping` POST on a connection the client closes after the answer.
fn ping_request() -> String {
    let body = r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#;
    format!(
        "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn world(label: &str, upstream: &LabelServer) -> (TestEnv, String, String) {
    let mut env = TestEnv::new(label);
    let a = env.cgroup("agents/a");
    let b = env.cgroup("agents/b");
    let agents = format!("{}/agents", env.root);
    write_config(&env, upstream, &agents, None);
    env.start_daemon();
    (env, a, b)
}

/// Writes the config of `env`: `upstream`, intercepted at its own address, with `tag` tagged
/// and `policy` (`None`: the default, open to the tagged cgroups).
fn write_config(env: &TestEnv, upstream: &LabelServer, tag: &str, policy: Option<&str>) {
    let servers = [ServerSpec {
        name: "notes".into(),
        intercept: vec![upstream.addr.to_string()],
        upstream: upstream.addr.to_string(),
    }];
    match policy {
        Some(p) => env.write_config_with(&servers, &[tag], p),
        None => env.write_config(&servers, &[tag]),
    }
}

fn cli_ok(env: &TestEnv, args: &[&str]) -> String {
    let out = env.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pins, at `path`, a per-CPU array of `entries` u64 counters: the counter map an older
/// daemon (fewer counters) left.
fn pin_counter_map(path: &std::path::Path, entries: u32) {
    use std::os::unix::ffi::OsStrExt;
    const BPF_MAP_CREATE: nix::libc::c_long = 0;
    const BPF_OBJ_PIN: nix::libc::c_long = 6;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, entries]);
    // SAFETY: bpf(2) with an attribute buffer of the size given.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), 128) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut pin = [0u64; 16];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: as above; the path outlives the call.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), 128) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: the map's own descriptor, closed once (the pin keeps the map).
    unsafe { nix::libc::close(fd as i32) };
}

#[test]
fn root_without_privileges_may_read_status_but_not_change_tags_or_revocations() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let (env, a, _b) = world("unprivileged-admin", &upstream);
    // uid 0 with every capability dropped: an agent running as root in a sandbox.
    let dropped = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--bounding-set=-all", "--inh-caps=-all", "--"])
            .arg(interceptor_tests::interceptor_bin())
            .args(args)
            .arg("--config")
            .arg(&env.config_path)
            .output()
            .expect("run setpriv")
    };
    let status = dropped(&["status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for args in [
        &["untag", &format!("{}/agents", env.root)][..],
        &["revoke", "--uid", "4242"],
        &["reload"],
    ] {
        let out = dropped(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was allowed");
        assert!(err.contains("lacks CAP_SYS_ADMIN"), "{args:?}: {err}");
    }
    // Root keeping CAP_SETUID may make a user namespace of its own, where it holds every
    // capability: not the daemon's, so still refused.
    let own_ns = std::process::Command::new("setpriv")
        .args([
            "--bounding-set=-all,+setuid,+setgid,+setfcap",
            "--",
            "unshare",
            "--user",
            "--map-root-user",
            "--",
        ])
        .arg(interceptor_tests::interceptor_bin())
        .args(["untag", &format!("{}/agents", env.root), "--config"])
        .arg(&env.config_path)
        .output()
        .expect("run setpriv and unshare");
    let err = String::from_utf8_lossy(&own_ns.stderr);
    assert!(
        !own_ns.status.success() && err.contains("another user namespace"),
        "{err}"
    );
    // Nothing changed; with privileges it is allowed.
    assert_eq!(env.status()["tags"][0]["exists"], true);
    assert!(
        env.status()["revocations"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    cli_ok(&env, &["revoke", "--cgroup", &a]);
}

#[test]
fn an_older_daemons_counter_map_is_replaced() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let mut env = TestEnv::new("old-stats");
    let a = env.cgroup("agents/a");
    write_config(&env, &upstream, &a, None);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&env.bpffs_dir)
            .expect("bpffs folder");
    }
    let pin = env.bpffs_dir.join("ICPT_STATS");
    pin_counter_map(&pin, 7);
    env.start_daemon();
    // As many entries as the daemon has counters (all but the `refused` sum).
    let status = env.status();
    let counters = status["counters"]["kernel"]
        .as_object()
        .map_or(0, |c| c.keys().filter(|k| *k != "refused").count());
    let entries = aya::maps::MapInfo::from_pin(&pin).map(|m| m.max_entries());
    assert_eq!(entries.ok(), Some(counters as u32), "{status}");
    assert!(counters > 7);
    // And it counts: a redirected connect.
    let r = run_client(PROBE, &env.dir(&a), &upstream.addr.to_string());
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
    assert_eq!(env.status()["counters"]["kernel"]["redirected"], 1);
}

/// A socket connected with `TCP_FASTOPEN_CONNECT` (no SYN before the first write), by the
/// script or (`child`) by a child that exits; the script writes once `go` exists, and puts
/// what it got in `result`.
const DEFERRED_CONNECT: &str = r#"
import os, socket, sys, time
addr, go, result = sys.argv[1], sys.argv[2], sys.argv[3]
host, port = addr.rsplit(":", 1)
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, 30, 1)  # TCP_FASTOPEN_CONNECT
s.setsockopt(socket.IPPROTO_TCP, 34, 1)  # TCP_FASTOPEN_NO_COOKIE
if sys.argv[4] == "child":
    pid = os.fork()
    if pid == 0:
        s.connect((host, int(port)))
        os._exit(0)
    os.waitpid(pid, 0)
else:
    s.connect((host, int(port)))
print("connected", flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
try:
    s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    s.settimeout(5)
    got = s.recv(4096).split(b"\r\n\r\n")[-1].decode(errors="replace")
except OSError as e:
    got = "error %d" % e.errno
with open(result + ".tmp", "w") as f:
    f.write(got)
os.rename(result + ".tmp", result)
"#;

#[test]
fn a_connect_deferred_past_a_revocation_is_not_served() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let mut env = TestEnv::new("revoke-deferred");
    let a = env.cgroup("agents/a");
    let parent = format!("{}/agents", env.root);
    // Bound by uid: a process whose cgroup the proxy cannot tell still has its role.
    write_config(
        &env,
        &upstream,
        &a,
        Some(
            "\n[[role]]\nname = \"open\"\nservers = [\"*\"]\nallow_methods = [\"*\"]\n\
             \n[[binding]]\nrole = \"open\"\nuid = 0\n",
        ),
    );
    env.start_daemon();
    let dir = env.dir(&a);
    let addr = upstream.addr.to_string();
    let run = |go: &std::path::Path, result: &std::path::Path, by: &str| {
        let (first, agent) = interceptor_tests::python_in_cgroup(
            &dir,
            DEFERRED_CONNECT,
            &[&addr, &go.to_string_lossy(), &result.to_string_lossy(), by],
        );
        assert_eq!(first, "connected");
        agent
    };
    let wait = |result: &std::path::Path| {
        interceptor_tests::eventually(
            Duration::from_secs(10),
            || std::fs::read_to_string(result).ok(),
            || "no result".to_owned(),
        )
    };
    let files = |i: usize| {
        (
            env.tmp.path().join(format!("go{i}")),
            env.tmp.path().join(format!("result{i}")),
        )
    };
    // Not revoked: served (the deferred connect works at all).
    let (go, result) = files(0);
    let _agent = run(&go, &result, "self");
    std::fs::write(&go, "").expect("go");
    let got = wait(&result);
    assert!(got.starts_with("upstream:"), "{got}");
    // Connected (the redirect decided, the record made), then revoked, then the first write
    // sends the SYN: not served, the upstream never reached; also when the process that
    // connected has exited (the proxy cannot tell its cgroup any more).
    let agents: Vec<_> = ["self", "child"]
        .iter()
        .enumerate()
        .map(|(i, by)| {
            let (go, result) = files(i + 1);
            let agent = run(&go, &result, by);
            (go, result, agent)
        })
        .collect();
    // The revocation names the agents' parent cgroup: the kernel, at the SYN, knows only the
    // cgroup the connect came from; the proxy tells the rest by the caller's cgroup path, and
    // refuses a caller whose cgroup it cannot tell (the child has exited) while cgroup
    // revocations are in force.
    cli_ok(&env, &["revoke", "--cgroup", &parent]);
    let seen = upstream.count();
    for (go, result, _agent) in &agents {
        std::fs::write(go, "").expect("go");
        let got = wait(result);
        assert!(!got.starts_with("upstream:"), "{got}");
    }
    assert_eq!(
        upstream.count(),
        seen,
        "the revoked agent reached the upstream"
    );
}

#[test]
fn revocation_is_immediate_kernel_enforced_persistent_and_reversible() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let (mut env, a, b) = world("revoke", &upstream);
    let (dir_a, dir_b) = (env.dir(&a), env.dir(&b));
    let addr = upstream.addr.to_string();
    assert!(
        run_client(PROBE, &dir_a, &addr)
            .expect_reply()
            .starts_with("upstream:")
    );

    // Revoke /agents/a: the kernel refuses its next connect, the upstream sees nothing.
    let out = cli_ok(&env, &["revoke", "--cgroup", &a, "--reason", "incident 42"]);
    assert!(out.contains("revoked"), "{out}");
    let seen = upstream.count();
    let r = run_client(PROBE, &dir_a, &addr);
    assert_eq!(r.errno, Some(ECONNREFUSED), "{r:?}");
    assert_eq!(upstream.count(), seen);
    // Other agents are unaffected.
    assert!(
        run_client(PROBE, &dir_b, &addr)
            .expect_reply()
            .starts_with("upstream:")
    );
    let status = env.status();
    assert_eq!(
        status["revocations"][0]["selector"]["cgroup"],
        a.as_str(),
        "{status}"
    );
    assert_eq!(status["revocations"][0]["reason"], "incident 42");
    assert!(status["counters"]["kernel"]["refused_revoked"].as_u64() >= Some(1));
    assert!(
        status["counters"]["kernel"]["refused"].as_u64()
            >= status["counters"]["kernel"]["refused_revoked"].as_u64()
    );
    assert!(status["maps"].as_array().is_some_and(|m| {
        m.iter()
            .any(|x| x["name"] == "ICPT_BLOCKS" && x["entries"] == 1)
    }));

    // Persists across a restart (also a crash).
    env.stop_daemon(Signal::SIGKILL);
    env.start_daemon();
    assert_eq!(
        env.status()["revocations"][0]["selector"]["cgroup"],
        a.as_str()
    );
    assert_eq!(run_client(PROBE, &dir_a, &addr).errno, Some(ECONNREFUSED));

    // Unrevoke restores.
    cli_ok(&env, &["unrevoke", "--cgroup", &a]);
    assert!(
        run_client(PROBE, &dir_a, &addr)
            .expect_reply()
            .starts_with("upstream:")
    );
    let out = env.cli(&["unrevoke", "--cgroup", &a]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is not revoked")
    );

    // By uid: every agent of that user (here root) is refused in the kernel.
    cli_ok(&env, &["revoke", "--uid", "0"]);
    assert_eq!(run_client(PROBE, &dir_b, &addr).errno, Some(ECONNREFUSED));
    cli_ok(&env, &["unrevoke", "--uid", "0"]);

    // Tagged or not: a revoked cgroup that no tag covers (say, an agent untagged after its
    // revocation) reaches no MCP server directly either.
    let untagged = env.cgroup("untagged");
    let dir_untagged = env.dir(&untagged);
    let seen = upstream.count();
    assert!(
        run_client(PROBE, &dir_untagged, &addr)
            .expect_reply()
            .starts_with("upstream:")
    );
    assert_eq!(
        upstream.count(),
        seen + 1,
        "not intercepted: straight there"
    );
    cli_ok(&env, &["revoke", "--cgroup", &untagged]);
    let r = run_client(PROBE, &dir_untagged, &addr);
    assert_eq!(r.errno, Some(ECONNREFUSED), "{r:?}");
    assert_eq!(upstream.count(), seen + 1);
    cli_ok(&env, &["unrevoke", "--cgroup", &untagged]);
    // A uid names no population of its own: its untagged processes (a health checker, say)
    // are no agents, and reach the server as before.
    cli_ok(&env, &["revoke", "--uid", "65534"]);
    let r = run_client_as(PROBE, &dir_untagged, &addr, 65534);
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
    assert_eq!(
        run_client_as(PROBE, &dir_b, &addr, 65534).errno,
        Some(ECONNREFUSED)
    );
    cli_ok(&env, &["unrevoke", "--uid", "65534"]);

    // A cgroup outside the attach point is never intercepted: nothing to revoke there.
    let out = env.cli(&["revoke", "--cgroup", "/"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("outside daemon.cgroup_root"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A revoked cgroup removed meanwhile is still found by its path, and unrevoked.
    let gone = env.cgroup("agents/gone");
    cli_ok(&env, &["revoke", "--cgroup", &gone]);
    std::fs::remove_dir(env.dir(&gone)).expect("remove the revoked cgroup");
    cli_ok(&env, &["unrevoke", "--cgroup", &gone]);
    assert_eq!(env.status()["revocations"], serde_json::json!([]));

    // By workload id: the default template is the cgroup path and uid, which the kernel
    // matches: refused at connect().
    let wid = |cgroup: &str| {
        format!(
            "spiffe://interceptor.local/node/{}/cgroup{cgroup}/uid/0",
            hostname()
        )
    };
    let out = cli_ok(&env, &["revoke", "--workload-id", &wid(&b)]);
    assert!(out.contains("refused by the kernel"), "{out}");
    let seen = upstream.count();
    assert_eq!(run_client(PROBE, &dir_b, &addr).errno, Some(ECONNREFUSED));
    assert_eq!(upstream.count(), seen);
    // Another uid in the same cgroup is another workload.
    let r = run_client_as(PROBE, &dir_b, &addr, 65534);
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
    assert_eq!(env.status()["revocations"][0]["enforced_by"], "kernel");
    cli_ok(&env, &["unrevoke", "--workload-id", &wid(&b)]);

    // A workload whose cgroup does not exist yet is enforced by the proxy (the kernel matches
    // cgroups by id): its connect succeeds, every request is refused.
    let later = format!("{}/agents/later", env.root);
    cli_ok(
        &env,
        &[
            "revoke",
            "--workload-id",
            &wid(&later),
            "--reason",
            "rotated",
        ],
    );
    assert_eq!(env.status()["revocations"][0]["enforced_by"], "proxy");
    env.cgroup("agents/later");
    let seen = upstream.count();
    let r = run_client(PROBE, &env.dir(&later), &addr);
    assert_eq!(r.status, Some(403), "{r:?}");
    assert!(
        r.reply
            .as_deref()
            .unwrap_or("")
            .contains("access revoked: rotated"),
        "{r:?}"
    );
    assert_eq!(upstream.count(), seen);
    cli_ok(&env, &["unrevoke", "--workload-id", &wid(&later)]);
    assert!(
        run_client(PROBE, &env.dir(&later), &addr)
            .expect_reply()
            .starts_with("upstream:")
    );

    let events = env.audit_events();
    let revoke = events
        .iter()
        .find(|e| e["event"] == "revoke" && e["reason"] == "incident 42")
        .expect("revoke event");
    // Who revoked: the CLI process that asked, not the daemon.
    assert_eq!(revoke["identity"]["comm"], "interceptor", "{revoke}");
    assert_ne!(
        revoke["identity"]["pid"],
        env.daemon_pid().expect("daemon running"),
        "{revoke}"
    );
    assert!(events.iter().any(|e| e["event"] == "unrevoke"));
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn revocation_closes_live_streams() {
    if !privileged() {
        return;
    }
    let mut env = TestEnv::new("revoke-live");
    let server = McpServer::start("sse");
    let a = env.cgroup("agents");
    env.write_config(
        &[ServerSpec {
            name: "notes".into(),
            intercept: vec![server.addr.to_string()],
            upstream: server.addr.to_string(),
        }],
        &[&a],
    );
    env.start_daemon();
    let addr = server.addr.to_string();
    let request = format!("GET /sse HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    let dir = env.dir(&a);
    let reader = std::thread::spawn(move || {
        let started = Instant::now();
        let r = read_stream(PROBE, &dir, &addr, request.as_bytes(), 20_000);
        (r, started.elapsed())
    });
    env.wait_log("legacy SSE session registered", |_| true);
    // A connection that has not sent a byte yet is closed by the revocation too.
    let idle = {
        let (dir, addr) = (env.dir(&a), server.addr.to_string());
        std::thread::spawn(move || {
            let started = Instant::now();
            let r = read_stream(PROBE, &dir, &addr, b"", 20_000);
            (r, started.elapsed())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while env
        .logs()
        .iter()
        .filter(|v| v["message"] == "connection redirected")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "{}", env.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let revoked_at = Instant::now();
    cli_ok(&env, &["revoke", "--cgroup", &a, "--reason", "cut off"]);
    let (r, total) = reader.join().expect("reader");
    let (idle, idle_total) = idle.join().expect("idle reader");
    let after_revoke = revoked_at.elapsed();
    assert!(r.reply.unwrap_or_default().contains("event: endpoint"));
    // The stream ended because of the revocation, long before the reader's own 20 s limit
    // (generous bounds: a loaded machine is slow, never that slow).
    assert!(
        total < Duration::from_secs(18),
        "stream still open after the revocation"
    );
    assert!(
        idle_total < Duration::from_secs(18),
        "idle connection still open after the revocation: {:?}",
        idle.error
    );
    assert!(after_revoke < Duration::from_secs(10), "{after_revoke:?}");
}

#[test]
fn all_egress_contains_a_cgroup() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let other = LabelServer::start("127.0.0.4", "other");
    let (env, a, b) = world("egress", &upstream);
    let (dir_a, dir_b) = (env.dir(&a), env.dir(&b));
    let other_addr = other.addr.to_string();
    assert!(
        run_client(PROBE, &dir_a, &other_addr)
            .expect_reply()
            .starts_with("other:")
    );
    cli_ok(
        &env,
        &[
            "revoke",
            "--cgroup",
            &a,
            "--all-egress",
            "--reason",
            "contain",
        ],
    );
    // Not only MCP: any destination, and datagrams too (sent or connected).
    assert_eq!(
        run_client(PROBE, &dir_a, &other_addr).errno,
        Some(ECONNREFUSED)
    );
    let udp = std::net::UdpSocket::bind("127.0.0.4:0").expect("bind UDP");
    let udp_addr = udp.local_addr().expect("address").to_string();
    assert_eq!(send_datagram(PROBE, &dir_a, &udp_addr, "send"), Err(EPERM));
    assert_eq!(
        send_datagram(PROBE, &dir_a, &udp_addr, "connect"),
        Err(EPERM)
    );
    assert!(send_datagram(PROBE, &dir_b, &udp_addr, "send").is_ok());
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    assert!(udp.recv_from(&mut buf).is_ok(), "b's datagram arrives");
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    assert!(udp.recv_from(&mut buf).is_err(), "a's datagrams never left");
    assert!(
        run_client(PROBE, &dir_b, &other_addr)
            .expect_reply()
            .starts_with("other:")
    );
    assert_eq!(other.count(), 2);
    // A contained cgroup removed and made again (a service restarted) stays contained.
    std::fs::remove_dir(&dir_a).expect("remove the contained cgroup");
    std::fs::create_dir(&dir_a).expect("make it again");
    env.wait_log(
        "revoked cgroup (re)created: refused under its new id",
        |_| true,
    );
    assert_eq!(
        run_client(PROBE, &dir_a, &other_addr).errno,
        Some(ECONNREFUSED)
    );
    assert_eq!(other.count(), 2);
    cli_ok(&env, &["unrevoke", "--cgroup", &a]);
    assert!(
        run_client(PROBE, &dir_a, &other_addr)
            .expect_reply()
            .starts_with("other:")
    );
    // Revoked (MCP only), made again, and revoked again with --all-egress before or after
    // the daemon followed the first: one revocation stands, the newer, containing it.
    cli_ok(&env, &["revoke", "--cgroup", &a]);
    std::fs::remove_dir(&dir_a).expect("remove");
    std::fs::create_dir(&dir_a).expect("make again");
    cli_ok(&env, &["revoke", "--cgroup", &a, "--all-egress"]);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let revocations = env.status()["revocations"].clone();
    assert_eq!(
        revocations.as_array().map(Vec::len),
        Some(1),
        "{revocations}"
    );
    assert_eq!(revocations[0]["all_egress"], true, "{revocations}");
    assert_eq!(
        run_client(PROBE, &dir_a, &other_addr).errno,
        Some(ECONNREFUSED)
    );
}

/// With `upstream` slow to answer (5 s), two requests of cgroup `a` held in flight: a third
/// of `a` is refused with HTTP 503 and an answer naming `limit` (returned), never reaching the
/// upstream, while cgroup `b` is served; then the two are answered.
fn third_refused_while_two_held(
    env: &TestEnv,
    upstream: &LabelServer,
    (a, b): (&str, &str),
    limit: &str,
) -> interceptor_tests::ClientResult {
    let (addr, request) = (upstream.addr.to_string(), ping_request());
    // The probes wait up to 30 s for their answers: both requests are still held while the
    // third and the other cgroup's are sent on a loaded machine.
    let patient = ["PROBE_READ_TIMEOUT_MS=30000"];
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (dir, addr, request) = (env.dir(a), addr.clone(), request.clone());
            std::thread::spawn(move || {
                send_raw_env(PROBE, &dir, &addr, request.as_bytes(), &patient)
            })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        || (upstream.bodies().len() >= 2).then_some(()),
        || "the two requests never reached the upstream".into(),
    );
    // A third from the same cgroup is refused, with an answer that says why and what to do…
    let refused = send_raw(PROBE, &env.dir(a), &addr, request.as_bytes());
    assert_eq!(refused.status, Some(503), "{refused:?}");
    let reply = refused.reply.clone().unwrap_or_default();
    assert!(
        reply.contains(limit) && reply.contains("\"jsonrpc\""),
        "{refused:?}"
    );
    assert_eq!(
        upstream.bodies().len(),
        2,
        "the refused request reached the upstream"
    );
    // …while another cgroup is served meanwhile.
    let other = send_raw_env(PROBE, &env.dir(b), &addr, request.as_bytes(), &patient);
    assert_eq!(other.status, Some(200), "{other:?}");
    for h in held {
        let r = h.join().expect("client");
        assert_eq!(r.status, Some(200), "{r:?}");
    }
    refused
}

#[test]
fn a_cgroup_with_as_many_requests_in_flight_as_it_may_is_refused_more() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start_slow("127.0.0.3", "slow", Duration::from_millis(5000));
    let mut env = TestEnv::new("in-flight");
    let a = env.cgroup("agents/a");
    let b = env.cgroup("agents/b");
    env.write_config_with(
        &[ServerSpec::direct("notes", upstream.addr)],
        &[&format!("{}/agents", env.root)],
        &format!(
            "\n[proxy]\nmax_requests_in_flight_per_cgroup = 2\n\
             [[role]]\nname = \"open\"\nservers = [\"*\"]\nallow_methods = [\"*\"]\n\
             [[binding]]\nrole = \"open\"\ncgroup = \"{}/**\"\n",
            env.root
        ),
    );
    env.start_daemon();
    let refused = third_refused_while_two_held(
        &env,
        &upstream,
        (&a, &b),
        "max_requests_in_flight_per_cgroup",
    );
    assert_eq!(refused.header("retry-after"), Some("1"), "{refused:?}");
    let (addr, request) = (upstream.addr.to_string(), ping_request());
    let patient = ["PROBE_READ_TIMEOUT_MS=30000"];
    // Their places are given back with their answers' last bytes.
    let again = send_raw_env(PROBE, &env.dir(&a), &addr, request.as_bytes(), &patient);
    assert_eq!(again.status, Some(200), "{again:?}");
    let status = env.status();
    assert_eq!(status["counters"]["proxy"]["over_in_flight"], 1, "{status}");
}

#[test]
fn a_cgroup_over_its_connection_limit_is_refused_until_one_closes() {
    if !privileged() {
        return;
    }
    // Slow enough that both requests are still held while the third and the other cgroup's
    // are sent on a loaded machine; the probes wait up to 30 s for their answers.
    let upstream = LabelServer::start_slow("127.0.0.3", "slow", Duration::from_millis(5000));
    let mut env = TestEnv::new("conn-limit");
    env.daemon_extra = "max_connections_per_cgroup = 2\n".into();
    let a = env.cgroup("agents/a");
    let b = env.cgroup("agents/b");
    env.write_config(
        &[ServerSpec::direct("notes", upstream.addr)],
        &[&format!("{}/agents", env.root)],
    );
    env.start_daemon();
    third_refused_while_two_held(&env, &upstream, (&a, &b), "max_connections_per_cgroup");
    let (addr, request) = (upstream.addr.to_string(), ping_request());
    // Once they closed (the proxy's side too: the clients may see the answer first), cgroup a
    // is served again.
    eventually(
        Duration::from_secs(10),
        || (env.status()["counters"]["proxy"]["active"] == 0).then_some(()),
        || format!("connections still open: {}", env.status()),
    );
    let again = send_raw(PROBE, &env.dir(&a), &addr, request.as_bytes());
    assert_eq!(again.status, Some(200), "{again:?}");
    let status = env.status();
    assert_eq!(status["counters"]["proxy"]["over_limit"], 1, "{status}");
    assert!(status["open_files_limit"].as_u64() > Some(0), "{status}");
    // The operator's view says so too.
    let text = cli_ok(&env, &["status"]);
    assert!(
        text.contains("over_limit=1")
            && text.contains("(intercepted too)")
            && text.contains("open files up to")
            && text.contains("upstream connections opened ahead"),
        "{text}"
    );
    assert!(
        env.log_text()
            .contains("connection refused: its cgroup has"),
        "{}",
        env.log_text()
    );
}

#[test]
fn sigterm_drains_in_flight_requests() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start_slow("127.0.0.3", "slow", Duration::from_millis(1500));
    let (mut env, a, _) = world("drain", &upstream);
    let dir = env.dir(&a);
    let addr = upstream.addr.to_string();
    let request = ping_request();
    let in_flight = std::thread::spawn(move || send_raw(PROBE, &dir, &addr, request.as_bytes()));
    // Wait until the request is at the upstream, then stop the daemon.
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.bodies().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    env.stop_daemon(Signal::SIGTERM);
    let r = in_flight.join().expect("client");
    assert_eq!(
        r.status,
        Some(200),
        "the in-flight request must finish: {r:?}"
    );
    assert!(r.reply.unwrap_or_default().starts_with("slow:"));
    assert!(env.log_text().contains("drained"));
    // And new connects are refused (fail closed) now that the daemon is gone.
    let dir = env.dir(&a);
    assert_eq!(
        run_client(PROBE, &dir, &upstream.addr.to_string()).errno,
        Some(ECONNREFUSED)
    );
}

/// The numbers of epoll_wait, epoll_pwait and epoll_pwait2 (`/proc/<pid>/task/<tid>/syscall`).
#[cfg(target_arch = "x86_64")]
const EPOLL_WAITS: [u32; 3] = [232, 281, 441];
#[cfg(target_arch = "aarch64")]
const EPOLL_WAITS: [u32; 2] = [22, 441];

/// Stops one thread of another process (ptrace: the rest of the process runs on); lets it go
/// when dropped, and the kernel does if this test dies.
struct ThreadStop(nix::unistd::Pid);

impl ThreadStop {
    fn new(tid: i32) -> Self {
        use nix::sys::{ptrace, wait};
        let tid = nix::unistd::Pid::from_raw(tid);
        ptrace::seize(tid, ptrace::Options::empty()).expect("ptrace seize");
        let stop = Self(tid);
        ptrace::interrupt(tid).expect("ptrace interrupt");
        wait::waitpid(tid, Some(wait::WaitPidFlag::__WALL)).expect("thread stopped");
        stop
    }
}

impl Drop for ThreadStop {
    fn drop(&mut self) {
        let _ = nix::sys::ptrace::detach(self.0, None);
    }
}

#[test]
fn a_stalled_worker_does_not_hold_up_new_connections() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start("127.0.0.3", "served");
    let mut env = TestEnv::new("stall");
    env.daemon_extra = "workers = 2\n".into();
    let a = env.cgroup("agents");
    env.write_config(&[ServerSpec::direct("notes", upstream.addr)], &[&a]);
    env.start_daemon();
    let addr = upstream.addr.to_string();
    let request = ping_request();
    let served = send_raw(PROBE, &env.dir(&a), &addr, request.as_bytes());
    assert_eq!(served.status, Some(200), "{served:?}");
    // The first worker accepts on the IPv4 listener (listeners go to workers round robin).
    // Stopped, as by a long synchronous step: new connections are still served, by the other.
    let daemon = env.daemon_pid().expect("daemon running");
    let tid = std::fs::read_dir(format!("/proc/{daemon}/task"))
        .expect("daemon threads")
        .filter_map(Result::ok)
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "worker-1")
        })
        .and_then(|t| t.file_name().to_str()?.parse::<i32>().ok())
        .expect("thread worker-1");
    // Stopped while it waits for work (in epoll_wait), so that it holds nothing the other
    // worker needs (the audit log's turn, a lock).
    let idle = || {
        std::fs::read_to_string(format!("/proc/{daemon}/task/{tid}/syscall"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .is_some_and(|nr| EPOLL_WAITS.contains(&nr))
    };
    eventually(
        Duration::from_secs(10),
        || idle().then_some(()),
        || format!("worker-1 ({tid}) never waited for work"),
    );
    {
        let _stopped = ThreadStop::new(tid);
        for _ in 0..2 {
            let r = send_raw(PROBE, &env.dir(&a), &addr, request.as_bytes());
            assert_eq!(r.status, Some(200), "{r:?}");
        }
        let status = env.status();
        assert!(
            status["counters"]["proxy"]["stall_takeovers"].as_u64() >= Some(1),
            "{status}"
        );
    }
    assert!(
        env.log_text().contains("left new connections waiting"),
        "{}",
        env.log_text()
    );
    // Going again, it accepts its listener's connections itself: three in a row without a
    // takeover. (It is marked stalled until it next goes idle, so a connection that comes
    // before may still be taken over: a few rounds are allowed for that.)
    let takeovers = || env.status()["counters"]["proxy"]["stall_takeovers"].clone();
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let before = takeovers();
        for _ in 0..3 {
            let r = send_raw(PROBE, &env.dir(&a), &addr, request.as_bytes());
            assert_eq!(r.status, Some(200), "{r:?}");
        }
        let after = takeovers();
        if after == before {
            return;
        }
        rounds.push((before, after));
    }
    panic!("connections still taken over from the worker going again: {rounds:?}");
}

/// Starts `env`'s daemon, which must refuse to start (within 20 s) because another daemon's
/// connect program already runs for its cgroups, having installed nothing; its error.
fn refused_beside_another(env: &TestEnv) -> String {
    let mut child = std::process::Command::new(interceptor_tests::interceptor_bin())
        .args(["run", "--config"])
        .arg(&env.config_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn interceptor");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a second daemon at {} started beside the first", env.root);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("another interceptor daemon's connect program")
            && stderr.contains("interceptor uninstall"),
        "{stderr}"
    );
    assert!(!env.bpffs_dir.exists(), "nothing installed for it");
    stderr
}

#[test]
fn a_daemon_where_another_already_redirects_refuses_to_start() {
    if !privileged() {
        return;
    }
    let mut outer = TestEnv::new("outer");
    outer.write_config(&[], &[]);
    outer.start_daemon();
    let below = outer.cgroup("inner");
    let mut second = TestEnv::new("second");
    // With other pins, attached below the first daemon's attach point, or at it: both would
    // redirect the same processes' connections. Refused before anything is installed.
    for root in [below, outer.root.clone()] {
        second.root = root.clone();
        second.write_config(&[], &[]);
        let stderr = refused_beside_another(&second);
        assert!(stderr.contains("attached there or above"), "{stderr}");
    }
    // The first one goes on serving, its own restart included.
    outer.stop_daemon(Signal::SIGTERM);
    outer.start_daemon();
    assert_eq!(outer.status()["programs"].as_array().map(Vec::len), Some(8));
}

#[test]
fn a_daemon_above_one_that_already_redirects_refuses_to_start() {
    if !privileged() {
        return;
    }
    // The first daemon is attached below the second's attach point: found by walking the
    // second's subtree, which the kernel's effective list at its own cgroup does not show.
    let mut above = TestEnv::new("above");
    let mut first = TestEnv::new("below");
    first.root = above.cgroup("team/agents");
    first.write_config(&[], &[]);
    first.start_daemon();
    above.write_config(&[], &[]);
    let stderr = refused_beside_another(&above);
    assert!(
        stderr.contains(&format!("attached to {} below it", first.root)),
        "{stderr}"
    );
    // Gone, the first no longer keeps the second from starting.
    first.stop_daemon(Signal::SIGTERM);
    let out = first.cli(&["uninstall"]);
    assert!(out.status.success(), "{out:?}");
    above.start_daemon();
    assert_eq!(above.status()["programs"].as_array().map(Vec::len), Some(8));
}

/// Holds argv[2] connections to argv[1] (`ip:port`), opened without a request; prints "held".
const HOLD_CONNECTIONS: &str = r#"
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((host, int(port)))
    except BlockingIOError:
        pass
    held.append(s)
time.sleep(1)
print("held", flush=True)
time.sleep(120)
"#;

#[test]
fn out_of_descriptors_the_daemon_backs_off_quietly_and_recovers() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start("127.0.0.3", "fd");
    let mut env = TestEnv::new("fds");
    let agents = env.cgroup("agents");
    write_config(&env, &upstream, &agents, None);
    // ~50 descriptors at rest: room for a few dozen agent connections.
    env.open_files = Some(128);
    env.start_daemon();
    let lines = |needle: &str| {
        env.logs()
            .iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(needle)))
            .count()
    };
    let (before_accept, before_stall) = (lines("accept failed"), lines("left new connections"));
    let (held, holder) = interceptor_tests::python_in_cgroup(
        &env.dir(&agents),
        HOLD_CONNECTIONS,
        &[&upstream.addr.to_string(), "200"],
    );
    assert_eq!(held, "held");
    std::thread::sleep(Duration::from_secs(2));
    // The worker backs off its accept errors, logged at most once a second; it is not taken
    // for a stalled one (whose queue the control plane would take over, failing the same way
    // and warning every 100 ms).
    let accept_failed = lines("accept failed") - before_accept;
    assert!(
        (1..=5).contains(&accept_failed),
        "{accept_failed} accept failures logged in ~3 s:\n{}",
        env.log_text()
    );
    assert_eq!(
        lines("left new connections") - before_stall,
        0,
        "{}",
        env.log_text()
    );
    // Descriptors back: served again.
    drop(holder);
    let r = eventually(
        Duration::from_secs(20),
        || {
            let r = send_raw(
                PROBE,
                &env.dir(&agents),
                &upstream.addr.to_string(),
                ping_request().as_bytes(),
            );
            (r.status == Some(200)).then_some(r)
        },
        || format!("not served again:\n{}", env.log_text()),
    );
    assert!(r.expect_reply().contains("\"id\":7"), "{r:?}");
}
