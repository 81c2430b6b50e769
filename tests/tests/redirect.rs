//! The kernel redirect end to end: real programs attached below a test cgroup, real processes
//! in tagged and untagged cgroups, a real daemon relaying to a real upstream.

use std::{net::SocketAddr, time::Duration};

use interceptor_tests::{
    LabelServer, ServerSpec, TestEnv, eventually, privileged, run_client, send_datagram,
};
use nix::sys::signal::Signal;

const PROBE: &str = env!("CARGO_BIN_EXE_probe-client");
const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

/// An upstream, a "direct" server on the intercepted address (so a connection that is not
/// redirected gets an answer that says so), and a config intercepting that address.
struct World {
    env: TestEnv,
    upstream: LabelServer,
    direct: LabelServer,
}

fn world(label: &str, tags_at_start: &[&str]) -> World {
    let mut env = TestEnv::new(label);
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let direct = LabelServer::start("127.0.0.2", "direct");
    let tags: Vec<String> = tags_at_start.iter().map(|t| env.cgroup(t)).collect();
    let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    env.write_config(
        &[ServerSpec {
            name: "notes".into(),
            intercept: vec![direct.addr.to_string()],
            upstream: upstream.addr.to_string(),
        }],
        &tag_refs,
    );
    World {
        env,
        upstream,
        direct,
    }
}

#[test]
fn a_process_holding_the_proxy_port_does_not_keep_the_daemon_from_serving() {
    if !privileged() {
        return;
    }
    let mut w = world("port-squatted", &["agents"]);
    // Any user may bind an unprivileged port on the host.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", w.env.port)).expect("squat");
    w.env.start_daemon();
    let own = w.env.status()["listeners"][0].clone();
    assert_eq!(own["own"], true, "{own}");
    assert_ne!(own["port4"], w.env.port, "{own}");
    assert!(
        w.env
            .log_text()
            .contains("daemon.listen_port is held by another process"),
        "{}",
        w.env.log_text()
    );
    // Agents are redirected to the port the daemon listens on, never to the squatter.
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    let r = run_client(PROBE, &agents, &w.direct.addr.to_string());
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
    squatter.set_nonblocking(true).expect("nonblocking");
    assert!(squatter.accept().is_err(), "the squatter got a connection");
}

#[test]
fn tagged_client_reaches_upstream_and_daemon_knows_who_dialed() {
    if !privileged() {
        return;
    }
    let mut w = world("tagged", &["agents"]);
    w.env.start_daemon();
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    let dialed = w.direct.addr.to_string();

    let r = run_client(PROBE, &agents, &dialed);
    let reply = r.expect_reply();
    // The upstream got the proxy's canonical re-serialisation of the authorised message.
    assert_eq!(
        reply,
        format!(
            r#"upstream:{{"id":{},"jsonrpc":"2.0","method":"ping"}}"#,
            r.pid
        ),
        "{r:?}"
    );
    assert_eq!(
        w.direct.count(),
        0,
        "the dialed address must not be reached"
    );
    assert_eq!(w.upstream.count(), 1);
    // The redirect is invisible to the agent.
    assert_eq!(r.peer.as_deref(), Some(dialed.as_str()));

    let line = w.env.wait_log("connection redirected", |v| {
        v["client.pid"].as_u64() == Some(u64::from(r.pid))
    });
    assert_eq!(line["client.uid"], 0);
    assert_eq!(line["client.gid"], 0);
    assert_eq!(line["client.comm"], "probe-client");
    assert_eq!(line["client.exe"], PROBE);
    assert_eq!(line["client.cgroup"], format!("{}/agents", w.env.root));
    assert_eq!(line["dst.original"], dialed);
    assert_eq!(line["server.name"], "notes");

    let status = w.env.status();
    assert_eq!(status["counters"]["kernel"]["redirected"], 1, "{status}");
    assert_eq!(status["counters"]["proxy"]["accepted"], 1, "{status}");
    let down = status["counters"]["proxy"]["relayed_bytes_down"].as_u64();
    assert!(down.is_some_and(|b| b > 0), "{status}");
    let up = status["counters"]["proxy"]["relayed_bytes_up"].as_u64();
    assert_eq!(
        status["counters"]["proxy"]["relayed_bytes"].as_u64(),
        up.zip(down).map(|(u, d)| u + d),
        "{status}"
    );
    assert_eq!(status["counters"]["kernel"]["refused"], 0, "{status}");
    assert_eq!(status["programs"].as_array().map(Vec::len), Some(8));
    assert_eq!(
        status["tags"][0]["cgroup"],
        format!("{}/agents", w.env.root)
    );

    // Dialling the real server (the upstream) directly is no way around policy: it is
    // intercepted too, as the same server.
    let upstream = w.upstream.addr.to_string();
    let r = run_client(PROBE, &agents, &upstream);
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
    let line = w.env.wait_log("connection redirected", |v| {
        v["client.pid"].as_u64() == Some(u64::from(r.pid))
    });
    assert_eq!(line["dst.original"], upstream);
    assert_eq!(line["server.name"], "notes");
}

#[test]
fn untagged_cgroups_and_other_destinations_are_untouched() {
    if !privileged() {
        return;
    }
    let mut w = world("untouched", &["agents"]);
    let other = w.env.cgroup("other");
    let other_mcp = LabelServer::start("127.0.0.2", "not-mcp");
    w.env.start_daemon();
    let agents = w.env.dir(&format!("{}/agents", w.env.root));

    // Untagged sibling under the same attach point: the programs run, but leave it alone.
    let r = run_client(PROBE, &w.env.dir(&other), &w.direct.addr.to_string());
    assert!(r.expect_reply().starts_with("direct:"), "{r:?}");
    // Tagged, but the destination is not an MCP server address.
    let r = run_client(PROBE, &agents, &other_mcp.addr.to_string());
    assert!(r.expect_reply().starts_with("not-mcp:"), "{r:?}");
    assert_eq!(r.peer.as_deref(), Some(other_mcp.addr.to_string().as_str()));
    assert_eq!(w.upstream.count(), 0);
    let status = w.env.status();
    assert_eq!(status["counters"]["kernel"]["redirected"], 0);
    // daemon.workers = 0: one connection worker per CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    assert_eq!(status["workers"].as_u64(), Some(cpus), "{status}");
}

/// The datagrams waiting on `socket` (each read waits up to 300 ms).
fn datagrams(socket: &std::net::UdpSocket) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    while let Ok((n, _)) = socket.recv_from(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

#[test]
fn datagrams_to_mcp_addresses_are_refused_for_agents() {
    if !privileged() {
        return;
    }
    let mut w = world("datagram", &["agents"]);
    let other = w.env.cgroup("other");
    w.env.start_daemon();
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    let untagged = w.env.dir(&other);
    // Where an HTTP/3 (QUIC) server of the intercepted address would listen, and a UDP
    // service that is no MCP server's.
    let quic = std::net::UdpSocket::bind(w.direct.addr).expect("bind UDP on the MCP address");
    let plain = std::net::UdpSocket::bind("127.0.0.4:0").expect("bind UDP");
    let dialed = w.direct.addr.to_string();
    let upstream = w.upstream.addr.to_string();

    // An agent's datagram to an MCP server's address never leaves: sent from an unconnected
    // socket, a connected one, or as an IPv4-mapped address from an IPv6 socket; to the
    // plain upstream's address too (intercepted as the same server).
    for mode in ["send", "connect", "send-mapped"] {
        assert_eq!(
            send_datagram(PROBE, &agents, &dialed, mode),
            Err(EPERM),
            "{mode}"
        );
    }
    assert_eq!(send_datagram(PROBE, &agents, &upstream, "send"), Err(EPERM));
    // Other destinations, and other cgroups, are untouched.
    let plain_addr = plain.local_addr().expect("address").to_string();
    assert!(send_datagram(PROBE, &agents, &plain_addr, "send").is_ok());
    assert!(send_datagram(PROBE, &untagged, &dialed, "send").is_ok());
    assert_eq!(datagrams(&plain).len(), 1);
    assert_eq!(
        datagrams(&quic).len(),
        1,
        "only the untagged datagram arrives"
    );
    let status = w.env.status();
    assert_eq!(
        status["counters"]["kernel"]["refused_datagram"], 4,
        "{status}"
    );

    // A revoked cgroup is refused whether or not a tag covers it.
    let out = w.env.cli(&["revoke", "--cgroup", &other]);
    assert!(out.status.success(), "{out:?}");
    for mode in ["send", "connect"] {
        assert_eq!(
            send_datagram(PROBE, &untagged, &dialed, mode),
            Err(EPERM),
            "{mode}"
        );
    }
    assert!(send_datagram(PROBE, &untagged, &plain_addr, "send").is_ok());
    assert!(datagrams(&quic).is_empty());
    assert_eq!(datagrams(&plain).len(), 1);
}

#[test]
fn tags_cover_descendants_created_later_and_untag_stops_new_connections() {
    if !privileged() {
        return;
    }
    let mut w = world("descendants", &[]);
    let agents = w.env.cgroup("agents");
    w.env.start_daemon();

    let out = w.env.cli(&["tag", &agents]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Created after tagging, two levels down.
    let grandchild = w.env.cgroup("agents/team/worker");
    let dir = w.env.dir(&grandchild);
    let dialed = w.direct.addr.to_string();

    let r = run_client(PROBE, &dir, &dialed);
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
    let line = w.env.wait_log("connection redirected", |v| {
        v["client.pid"].as_u64() == Some(u64::from(r.pid))
    });
    assert_eq!(line["client.cgroup"], grandchild);

    let out = w.env.cli(&["untag", &agents]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = run_client(PROBE, &dir, &dialed);
    assert!(r.expect_reply().starts_with("direct:"), "{r:?}");
    assert_eq!(w.upstream.count(), 1);

    // Untagging again is an error that says so.
    let out = w.env.cli(&["untag", &agents]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not tagged"));
    // A tag below a cgroup delegated to a user (its cgroup.procs theirs): that user's
    // processes can move out of the tagged cgroup, so tagging says so (and status too).
    let delegated = w.env.cgroup("delegated");
    let inner = w.env.cgroup("delegated/agent");
    let procs = w.env.dir(&delegated).join("cgroup.procs");
    nix::unistd::chown(&procs, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    // Its warning on stderr (the command succeeds).
    let warned = |args: &[&str]| {
        let out = w.env.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = warned(&["tag", &inner]);
    assert!(
        err.contains(&format!(
            "{delegated}, above tagged {inner}, is delegated (uid 65534"
        )) && err.contains(&format!("tag {delegated} instead")),
        "{err}"
    );
    // Revoking it says the same (its processes can leave the revoked cgroup).
    let err = warned(&["revoke", "--cgroup", &inner]);
    assert!(
        err.contains(&format!("above revoked {inner}"))
            && err.contains(&format!("revoke {delegated} instead")),
        "{err}"
    );
    let out = w.env.cli(&["unrevoke", "--cgroup", &inner]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = w.env.status();
    let tag = status["tags"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["cgroup"] == inner.as_str()))
        .cloned()
        .unwrap_or_default();
    assert!(
        tag["warning"]
            .as_str()
            .is_some_and(|w| w.contains("is delegated")),
        "{status}"
    );
    // A tag with no delegated cgroup above it has no warning.
    assert!(
        status["tags"].as_array().is_some_and(|t| t
            .iter()
            .filter(|t| t["warning"].is_string())
            .count()
            == 1),
        "{status}"
    );
    // Tagging a cgroup that does not exist is refused with the path.
    let missing = format!("{}/nope", w.env.root);
    let out = w.env.cli(&["tag", &missing]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nope"));
}

#[test]
fn tags_follow_their_path_and_stay_inside_the_attach_point() {
    if !privileged() {
        return;
    }
    // Configured before its cgroup exists: the daemon starts, and tags it once it appears.
    let mut w = world("follow", &[]);
    let agents = format!("{}/agents", w.env.root);
    w.env.write_config(
        &[ServerSpec {
            name: "notes".into(),
            intercept: vec![w.direct.addr.to_string()],
            upstream: w.upstream.addr.to_string(),
        }],
        &[&agents],
    );
    w.env.start_daemon();
    assert_eq!(w.env.status()["tags"][0]["exists"], false);
    let created = w.env.cgroup("agents");
    assert_eq!(created, agents);
    let dir = w.env.dir(&agents);
    let dialed = w.direct.addr.to_string();
    let redirected = || {
        eventually(
            Duration::from_secs(5),
            || {
                let r = run_client(PROBE, &dir, &dialed);
                r.reply
                    .as_deref()
                    .is_some_and(|t| t.starts_with("upstream:"))
                    .then_some(())
            },
            || format!("{agents} is not redirected: {}", w.env.status()),
        )
    };
    redirected();
    // Removed and made again (a new cgroup id): still tagged.
    std::fs::remove_dir(&dir).expect("rmdir the tagged cgroup");
    std::fs::create_dir(&dir).expect("mkdir it again");
    redirected();
    assert_eq!(w.env.status()["tags"][0]["exists"], true);
    // Untagged, it stays so however often it is made again (no entry of its path is left).
    let out = w.env.cli(&["untag", &agents]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir(&dir).expect("rmdir");
    std::fs::create_dir(&dir).expect("mkdir");
    std::thread::sleep(Duration::from_millis(1200));
    let r = run_client(PROBE, &dir, &dialed);
    assert!(r.expect_reply().starts_with("direct:"), "{r:?}");
    assert_eq!(w.env.status()["tags"], serde_json::json!([]));

    // A cgroup outside daemon.cgroup_root is never seen by the programs: refused, with why.
    let out = w.env.cli(&["tag", "/"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outside daemon.cgroup_root"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ipv6_and_v4_mapped_destinations_are_intercepted() {
    if !privileged() {
        return;
    }
    let mut env = TestEnv::new("ipv6");
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let direct6 = LabelServer::start("::1", "direct6");
    let direct4 = LabelServer::start("127.0.0.2", "direct4");
    let local = LabelServer::start("127.0.0.1", "local");
    let agents = env.cgroup("agents");
    env.write_config(
        &[ServerSpec {
            name: "notes".into(),
            intercept: vec![
                direct6.addr.to_string(),
                direct4.addr.to_string(),
                local.addr.to_string(),
            ],
            upstream: upstream.addr.to_string(),
        }],
        &[&agents],
    );
    env.start_daemon();
    let dir = env.dir(&agents);

    let v6 = direct6.addr.to_string();
    let r = run_client(PROBE, &dir, &v6);
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
    assert_eq!(r.peer.as_deref(), Some(v6.as_str()));
    // Datagrams to the IPv6 server, and to the unspecified address standing for loopback,
    // never leave.
    let quic6 = std::net::UdpSocket::bind(direct6.addr).expect("bind UDP on the IPv6 address");
    let any4 = format!("0.0.0.0:{}", local.addr.port());
    for (to, mode) in [(&v6, "send"), (&v6, "connect"), (&any4, "send")] {
        assert_eq!(
            send_datagram(PROBE, &dir, to, mode),
            Err(EPERM),
            "{to} {mode}"
        );
    }
    assert!(datagrams(&quic6).is_empty());

    // A dual-stack (AF_INET6) socket dialing the IPv4 server as ::ffff:a.b.c.d.
    let mapped = SocketAddr::new(
        std::net::IpAddr::V6(match direct4.addr.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        }),
        direct4.addr.port(),
    )
    .to_string();
    let r = run_client(PROBE, &dir, &mapped);
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
    assert_eq!(r.peer.as_deref(), Some(mapped.as_str()));
    let line = env.wait_log("connection redirected", |v| {
        v["client.pid"].as_u64() == Some(u64::from(r.pid))
    });
    assert_eq!(line["dst.original"], direct4.addr.to_string());

    // The unspecified address reaches loopback (the kernel fills it in): intercepted like the
    // loopback address it stands for.
    for dialed in [
        format!("0.0.0.0:{}", local.addr.port()),
        format!("[::]:{}", direct6.addr.port()),
    ] {
        let r = run_client(PROBE, &dir, &dialed);
        assert!(r.expect_reply().starts_with("upstream:"), "{dialed}: {r:?}");
    }
    // [::]:P from an IPv6 socket bound to a v4-mapped address goes to 127.0.0.1:P.
    const MAPPED_ANY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6)
s.bind(("::ffff:127.0.0.1", 0))
body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
try:
    s.connect(("::", int(sys.argv[1])))
    s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    print(s.recv(4096).split(b"\r\n\r\n")[-1].decode(errors="replace"))
except OSError as e:
    print("error", e.errno)
"#;
    let (reply, _agent) =
        interceptor_tests::python_in_cgroup(&dir, MAPPED_ANY, &[&local.addr.port().to_string()]);
    assert!(!reply.starts_with("local:"), "{reply}");
    // 0.0.0.0:P from a socket bound to an address goes to that address (the kernel makes the
    // source the destination): the server there, intercepted, not reached directly; also on
    // a dual-stack socket. From a socket tied to a device but bound to no address it would
    // go to the device's address: refused.
    const BOUND_ANY: &str = r#"
import socket, sys
family, bind, dial, device = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET)
if bind:
    s.bind((bind, 0))
if device:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
try:
    s.connect((dial, int(sys.argv[5])))
    s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    print(s.recv(4096).split(b"\r\n\r\n")[-1].decode(errors="replace"))
except OSError as e:
    print("error", e.errno)
"#;
    let port = direct4.addr.port().to_string();
    for (family, bind, dial) in [
        ("4", "127.0.0.2", "0.0.0.0"),
        ("6", "::ffff:127.0.0.2", "::ffff:0.0.0.0"),
    ] {
        let (reply, _agent) =
            interceptor_tests::python_in_cgroup(&dir, BOUND_ANY, &[family, bind, dial, "", &port]);
        assert!(reply.starts_with("upstream:"), "{bind} -> {dial}: {reply}");
    }
    let (reply, _agent) =
        interceptor_tests::python_in_cgroup(&dir, BOUND_ANY, &["4", "", "0.0.0.0", "lo", &port]);
    assert_eq!(reply, "error 111", "device-bound");
    // A socket bound to a broadcast (or multicast) address sends from no address: 0.0.0.0:P
    // from it goes to 127.0.0.1:P, which the bound address does not tell. Refused for an
    // agent (unless the bound address is itself a server's, as above).
    let local_port = local.addr.port().to_string();
    for bind in ["255.255.255.255", "224.0.0.1"] {
        let (reply, _agent) = interceptor_tests::python_in_cgroup(
            &dir,
            BOUND_ANY,
            &["4", bind, "0.0.0.0", "", &local_port],
        );
        assert_eq!(reply, "error 111", "bound to {bind}");
    }
    // A datagram to the limited broadcast address at an intercepted port reaches a server
    // bound to the wildcard address: refused for an agent.
    assert_eq!(
        send_datagram(
            PROBE,
            &dir,
            &format!("255.255.255.255:{local_port}"),
            "broadcast"
        ),
        Err(EPERM)
    );
    // Not an agent's: none of ours (a VRF's sockets are all tied to a device).
    let outsider = env.cgroup("outsider");
    let (reply, _other) = interceptor_tests::python_in_cgroup(
        &env.dir(&outsider),
        BOUND_ANY,
        &["4", "", "0.0.0.0", "lo", &port],
    );
    assert_eq!(reply, "error 111", "nothing listens at 127.0.0.1:{port}");
    // Device-bound, broadcast- and multicast-bound, the datagrams to 0.0.0.0 and to the
    // broadcast address.
    assert_eq!(
        env.status()["counters"]["kernel"]["refused_unspecified"],
        5,
        "{}",
        env.status()
    );
    assert_eq!(direct6.count() + direct4.count() + local.count(), 0);
    assert_eq!(upstream.count(), 6);
}

#[test]
fn without_a_listener_tagged_connects_fail_closed_and_a_restart_readopts() {
    if !privileged() {
        return;
    }
    let mut w = world("failclosed", &["agents"]);
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    let dialed = w.direct.addr.to_string();
    w.env.start_daemon();
    let first = w.env.status();

    // Clean stop: the daemon withdraws its listener; pins (and tags) stay.
    w.env.stop_daemon(Signal::SIGTERM);
    let r = run_client(PROBE, &agents, &dialed);
    assert_eq!(r.errno, Some(ECONNREFUSED), "{r:?}");

    // Crash: the listener entry is still there, but nothing listens behind it.
    w.env.start_daemon();
    w.env.stop_daemon(Signal::SIGKILL);
    let r = run_client(PROBE, &agents, &dialed);
    assert_eq!(r.errno, Some(ECONNREFUSED), "{r:?}");
    assert_eq!(
        w.direct.count(),
        0,
        "a tagged connection must never go direct"
    );
    assert_eq!(w.upstream.count(), 0);
    // Whoever binds the freed proxy port meanwhile (any user may) receives nothing: the kernel
    // redirects only to the daemon's own listening socket.
    {
        let squatter = std::net::TcpListener::bind(("127.0.0.1", w.env.port))
            .expect("the crashed daemon's port is free");
        squatter.set_nonblocking(true).expect("non-blocking");
        let r = run_client(PROBE, &agents, &dialed);
        assert_eq!(r.errno, Some(ECONNREFUSED), "{r:?}");
        assert_eq!(
            squatter.accept().map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock),
            "a tagged connection reached a listener that is not the daemon's"
        );
    }

    // Restart: the same links are re-adopted (no second attachment) and traffic flows again.
    w.env.start_daemon();
    let again = w.env.status();
    let ids = |s: &serde_json::Value, which: &str| -> Vec<u64> {
        s["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p[which].as_u64().unwrap_or(0))
            .collect()
    };
    assert_eq!(
        ids(&first, "link_id"),
        ids(&again, "link_id"),
        "links must be re-adopted, not re-attached"
    );
    // Each link now runs the restarted daemon's program (an upgrade takes effect in place).
    let (before, after) = (ids(&first, "program_id"), ids(&again, "program_id"));
    assert!(
        before.iter().zip(&after).all(|(b, a)| b != a),
        "{before:?} → {after:?}"
    );
    assert!(
        again["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|p| p["adopted"] == true)
    );
    let r = run_client(PROBE, &agents, &dialed);
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
    assert!(again["counters"]["kernel"]["refused_no_listener"].as_u64() >= Some(1));
}

#[test]
fn direct_connections_to_the_proxy_port_are_not_served() {
    if !privileged() {
        return;
    }
    let mut w = world("direct-proxy", &["agents"]);
    w.env.start_daemon();
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    // Dialing the proxy itself carries no kernel record: no identity, no relay.
    let r = run_client(PROBE, &agents, &format!("127.0.0.1:{}", w.env.port));
    assert_eq!(r.reply.as_deref().unwrap_or(""), "", "{r:?}");
    assert_eq!(w.upstream.count(), 0);
    w.env.wait_log("no kernel record for this connection; closing it. Only connections the kernel redirected are served (a direct connection to the proxy port has no identity; logged at most once a second, closed_so_far counts all)", |v| v["closed_so_far"].as_u64() >= Some(1));
    assert_eq!(w.env.status()["counters"]["proxy"]["no_record"], 1);
}

#[test]
fn uninstall_detaches_and_removes_every_pin() {
    if !privileged() {
        return;
    }
    let mut w = world("uninstall", &["agents"]);
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    w.env.start_daemon();

    // The revocations in force are named when uninstall removes them (below).
    let other = w.env.cgroup("other");
    let out = w
        .env
        .cli(&["revoke", "--cgroup", &other, "--reason", "incident 7"]);
    assert!(out.status.success(), "{out:?}");
    // Refused when its admin socket is gone: the daemon holds the pins, and uninstall does
    // not know it to stop it.
    std::fs::remove_file(w.env.tmp.path().join("admin.sock")).expect("remove the admin socket");
    let out = w.env.cli(&["uninstall"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another interceptor daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(w.env.bpffs_dir.join("links").exists());
    w.env.stop_daemon(Signal::SIGTERM);
    w.env.start_daemon();

    // A link this version does not know (a newer daemon's program, after a downgrade) goes
    // too: pinned here as another name of one of the links.
    let links = w.env.bpffs_dir.join("links");
    let link = aya::programs::links::PinnedLink::from_pin(links.join("connect4"))
        .expect("the pinned connect4 link");
    aya::programs::links::FdLink::from(link)
        .pin(links.join("from-a-newer-daemon"))
        .expect("pin it under another name");
    // With the daemon running, uninstall stops it first (SIGTERM: it drains and exits).
    let daemon_pid = w.env.status()["pid"].as_u64().expect("the daemon's pid");
    let out = w.env.cli(&["uninstall"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("stopping the daemon (pid {daemon_pid}, SIGTERM)")),
        "{stderr}"
    );
    let exit = w
        .env
        .daemon_exit()
        .expect("the daemon exited before uninstall went on");
    assert!(exit.success(), "the daemon ended with {exit}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("from-a-newer-daemon"), "{stdout}");
    assert!(
        stderr.contains("1 revocation(s) no longer hold")
            && stderr.contains(&format!("{other} (incident 7)")),
        "{stderr}"
    );
    assert!(!w.env.bpffs_dir.exists(), "pins left behind");
    // Interception has stopped: the tagged cgroup reaches the dialed address again.
    let r = run_client(PROBE, &agents, &w.direct.addr.to_string());
    assert!(r.expect_reply().starts_with("direct:"), "{r:?}");
    assert_eq!(w.upstream.count(), 0);
}

#[test]
fn identity_follows_exec_and_is_cached_until_the_process_changes() {
    if !privileged() {
        return;
    }
    let mut w = world("exec", &["agents"]);
    w.env.start_daemon();
    let status = w.env.status();
    let tracepoints: Vec<&str> = status["tracepoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["tracepoint"].as_str())
        .collect();
    // sched_prepare_exec is Linux 6.10's (attached when the kernel has it).
    let has_prepare = std::fs::read_to_string("/proc/kallsyms")
        .is_ok_and(|k| k.contains(" __traceiter_sched_prepare_exec\n"));
    let expected: &[&str] = if has_prepare {
        &[
            "sched_process_exec",
            "sched_process_exit",
            "sched_prepare_exec",
        ]
    } else {
        &["sched_process_exec", "sched_process_exit"]
    };
    assert_eq!(tracepoints, expected, "{status}");
    assert_eq!(status["identity_cache"]["enabled"], true, "{status}");

    // One process: two connections as the probe, then it execs another executable (same pid)
    // and makes two more. Each second connection may take its identity from the cache; the
    // third must name the new executable.
    let bin = tempfile::tempdir().expect("temp dir");
    let other = bin.path().join("other-agent");
    std::fs::copy(PROBE, &other).expect("copy the probe");
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    let dialed = w.direct.addr.to_string();
    let script = format!(
        "echo $$ > '{}' && exec \"$@\"",
        agents.join("cgroup.procs").display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script, "sh", PROBE, &dialed])
        .env("PROBE_CONNECTIONS", "2")
        .env("PROBE_THEN_EXEC", &other)
        .output()
        .expect("run the probe");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("probe output"))
        .collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    let pid = lines[0]["pid"].as_u64().expect("pid");
    for l in &lines {
        assert_eq!(l["pid"].as_u64(), Some(pid), "one process: {lines:?}");
        assert!(
            l["reply"]
                .as_str()
                .is_some_and(|r| r.starts_with("upstream:")),
            "{lines:?}"
        );
    }

    let other = other.to_string_lossy().into_owned();
    let exes = || -> Vec<String> {
        w.env
            .logs()
            .iter()
            .filter(|v| {
                v["message"] == "connection redirected" && v["client.pid"].as_u64() == Some(pid)
            })
            .map(|v| v["client.exe"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while exes().len() < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let exes = exes();
    assert_eq!(exes, [PROBE, PROBE, other.as_str(), other.as_str()]);
    let cache = &w.env.status()["identity_cache"]["stats"];
    assert!(cache["hits"].as_u64() >= Some(2), "{cache}");
    assert!(cache["misses"].as_u64() >= Some(2), "{cache}");
}

#[test]
fn an_exec_between_connect_and_the_first_byte_names_no_executable() {
    if !privileged() {
        return;
    }
    let mut w = world("tfo-exec", &["agents"]);
    w.env.start_daemon();
    // The probe connects with TCP_FASTOPEN_CONNECT (no SYN leaves before the first write, so
    // the proxy sees nothing yet), then execs a copy of itself that sends the request: the
    // executable /proc names when the proxy accepts did not make the connect.
    let bin = tempfile::tempdir().expect("temp dir");
    let other = bin.path().join("trusted-agent");
    std::fs::copy(PROBE, &other).expect("copy the probe");
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    let script = format!(
        "echo $$ > '{}' && exec \"$@\"",
        agents.join("cgroup.procs").display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script, "sh", PROBE, &w.direct.addr.to_string()])
        .env("PROBE_EXEC_BEFORE_SEND", &other)
        .output()
        .expect("run the probe");
    let line: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("probe output: {out:?}"));
    assert!(
        line["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("upstream:")),
        "{line}"
    );
    let pid = line["pid"].as_u64().expect("pid");
    let log = w.env.wait_log("connection redirected", |v| {
        v["client.pid"].as_u64() == Some(pid)
    });
    assert_eq!(log["client.exe"], "?", "{log}");
    assert_eq!(log["client.comm"], "probe-client", "{log}");
}

#[test]
fn a_second_daemon_on_the_same_pins_is_refused() {
    if !privileged() {
        return;
    }
    let mut w = world("two-daemons", &["agents"]);
    w.env.start_daemon();
    // Another configuration (own port, admin socket and audit log) on the same pin folder:
    // it would drop the first daemon's connection records and intercept addresses.
    let text = std::fs::read_to_string(&w.env.config_path).expect("read the config");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let tmp = tempfile::tempdir().expect("temp dir");
    let second = text
        .replace(
            &format!("listen_port = {}", w.env.port),
            &format!("listen_port = {port}"),
        )
        .replace(
            &w.env.tmp.path().display().to_string(),
            &tmp.path().display().to_string(),
        );
    assert!(second.contains(&w.env.bpffs_dir.display().to_string()));
    let config = tmp.path().join("second.toml");
    std::fs::write(&config, &second).expect("write the config");
    let mut child = std::process::Command::new(interceptor_tests::interceptor_bin())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run a second daemon");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().expect("wait").is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("a second daemon runs on the same pins");
    }
    let out = child.wait_with_output().expect("its output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("in use by another interceptor daemon"),
        "{stderr}"
    );
    // The first one is untouched.
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    let r = run_client(PROBE, &agents, &w.direct.addr.to_string());
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
}

#[test]
fn a_daemon_whose_listeners_were_closed_under_it_exits_with_an_error() {
    if !privileged() {
        return;
    }
    let mut w = world("listeners-killed", &["agents"]);
    w.env.start_daemon();
    // Root can close the daemon's listening sockets (`ss -K`): it then serves nothing, so it
    // stops, and says so in its exit status (a supervisor restarts a failed service only).
    let out = std::process::Command::new("ss")
        .args(["-K", "-tl", &format!("sport = :{}", w.env.port)])
        .output()
        .expect("run ss");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&w.env.port.to_string()),
        "ss -K closed nothing: {out:?}"
    );
    let status = w
        .env
        .wait_daemon_exit(Duration::from_secs(10))
        .expect("the daemon keeps running without listeners");
    assert!(!status.success(), "{status:?}");
    assert!(
        w.env.log_text().contains("the proxy listeners stopped"),
        "{}",
        w.env.log_text()
    );
}

/// A world whose daemon started and was then stopped (SIGSTOP: it accepts nothing, while
/// the kernel still redirects to its listener): the world, the tagged cgroup's directory, the
/// intercepted address, the daemon's pid.
fn world_not_accepting(label: &str) -> (World, std::path::PathBuf, String, nix::unistd::Pid) {
    let mut w = world(label, &["agents"]);
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    let dialed = w.direct.addr.to_string();
    w.env.start_daemon();
    let pid = nix::unistd::Pid::from_raw(w.env.daemon_pid().expect("daemon") as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("stop the daemon");
    (w, agents, dialed, pid)
}

/// Another process (untagged: the test's own) binds an agent's source port (argv[1]) and
/// dials the proxy port (argv[2]) directly: prints how many bytes it was answered, or
/// `in-use` when the port is taken. It must never be served as the agent.
const IMPOSTOR: &str = r#"
import errno, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    if e.errno == errno.EADDRINUSE:
        print("in-use")
        sys.exit(0)
    raise
s.connect(("127.0.0.1", int(sys.argv[2])))
body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
s.settimeout(5)
reply = b""
try:
    while chunk := s.recv(4096):
        reply += chunk
except OSError:
    pass
print(len(reply))
"#;

/// Runs [`IMPOSTOR`] from an agent's source `port` to the proxy port: what it was answered
/// (the number of bytes) and its stderr; `None` when the port is taken and `attempt` is not
/// the last of 3 (the scenario is then played again).
fn impostor(port: &str, proxy_port: u16, attempt: usize) -> Option<(String, String)> {
    let out = std::process::Command::new(interceptor_tests::python())
        .args(["-c", IMPOSTOR, port, &proxy_port.to_string()])
        .output()
        .expect("run the impostor");
    let received = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if received == "in-use" && attempt < 3 {
        return None;
    }
    Some((received, String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[test]
fn a_served_connections_record_is_consumed_and_serves_no_impostor_on_its_port() {
    if !privileged() {
        return;
    }
    let mut w = world("consumed-record", &["agents"]);
    let agents = w.env.dir(&format!("{}/agents", w.env.root));
    let dialed = w.direct.addr.to_string();
    w.env.start_daemon();
    // Served through the redirect, closed gracefully by the proxy first (`Connection:
    // close`): the kernel leaves the record to the proxy, and no TIME_WAIT on the agent's side
    // holds its source port.
    const AGENT: &str = r#"
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
s.settimeout(5)
reply = b""
while chunk := s.recv(4096):
    reply += chunk
source = s.getsockname()[1]
s.close()
print(source, b"upstream" in reply, flush=True)
"#;
    // The source port may be taken meanwhile by another test's connection (tests run in
    // parallel): then the scenario is played again.
    for attempt in 1..=3 {
        let (said, _agent) = interceptor_tests::python_in_cgroup(&agents, AGENT, &[&dialed]);
        let (port, served) = said.split_once(' ').expect("port and verdict");
        assert_eq!(served, "True", "the agent was not served: {said}");
        let Some((received, stderr)) = impostor(port, w.env.port, attempt) else {
            continue;
        };
        assert_eq!(
            received, "0",
            "served as the agent on its record: {received} / {stderr}"
        );
        assert_eq!(
            w.upstream.count(),
            attempt,
            "the impostor's request was relayed"
        );
        break;
    }
}

#[test]
fn a_connection_record_no_daemon_took_serves_nobody_later() {
    if !privileged() {
        return;
    }
    // The daemon stops accepting; an agent's connection is redirected and waits in its accept
    // queue (the kernel published its record); then the daemon dies, which resets it.
    let (mut w, agents, dialed, _) = world_not_accepting("stale-record");
    const AGENT: &str = r#"
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
print(s.getsockname()[1], flush=True)
try:
    s.recv(1)
except OSError:
    pass
"#;
    // The source port may be taken meanwhile by another test's connection (tests run in
    // parallel): then the scenario is played again.
    for attempt in 1..=3 {
        if attempt > 1 {
            let daemon = nix::unistd::Pid::from_raw(w.env.daemon_pid().expect("daemon") as i32);
            nix::sys::signal::kill(daemon, Signal::SIGSTOP).expect("stop the daemon");
        }
        let (port, mut agent) = interceptor_tests::python_in_cgroup(&agents, AGENT, &[&dialed]);
        let port: u16 = port.parse().expect("a port");
        w.env.stop_daemon(Signal::SIGKILL);
        eventually(
            Duration::from_secs(5),
            || agent.0.try_wait().ok().flatten(),
            || "the agent's connection was not reset".into(),
        );
        w.env.start_daemon();
        let Some((received, stderr)) = impostor(&port.to_string(), w.env.port, attempt) else {
            continue;
        };
        assert_eq!(received, "0", "served as the agent: {received} / {stderr}");
        break;
    }
    assert_eq!(w.upstream.count(), 0, "the impostor's request was relayed");
}

#[test]
fn a_request_sent_and_closed_before_the_daemon_accepts_it_is_still_served() {
    if !privileged() {
        return;
    }
    // The daemon does not accept for a while; the agent sends a notification and closes at
    // once (its socket is gone before the proxy accepts: the kernel keeps the connection,
    // request and FIN, in the accept queue).
    let (w, agents, dialed, pid) = world_not_accepting("send-and-close");
    const AGENT: &str = r#"
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
body = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
s.close()
time.sleep(0.3)
print("closed", flush=True)
"#;
    let (said, _agent) = interceptor_tests::python_in_cgroup(&agents, AGENT, &[&dialed]);
    assert_eq!(said, "closed");
    nix::sys::signal::kill(pid, Signal::SIGCONT).expect("resume the daemon");
    eventually(
        Duration::from_secs(10),
        || (w.upstream.count() == 1).then_some(()),
        || format!("the request was not served:\n{}", w.env.log_text()),
    );
    assert_eq!(w.direct.count(), 0);
}

/// A connect that fails after the kernel recorded it and before its handshake starts (an
/// IPv4-mapped MCP address on an `IPV6_V6ONLY` socket: `ENETUNREACH`) leaves no record once
/// its socket is closed: left to the LRU, an agent could push every other agent's records out.
#[test]
fn records_of_connects_that_never_started_go_with_their_socket() {
    if !privileged() {
        return;
    }
    let mut env = TestEnv::new("sockrel");
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let direct4 = LabelServer::start("127.0.0.2", "direct4");
    let agents = env.cgroup("agents");
    env.write_config(
        &[ServerSpec {
            name: "notes".into(),
            intercept: vec![direct4.addr.to_string()],
            upstream: upstream.addr.to_string(),
        }],
        &[&agents],
    );
    env.start_daemon();
    let dir = env.dir(&agents);
    let socks = |env: &TestEnv| {
        env.status()["maps"]
            .as_array()
            .expect("maps")
            .iter()
            .find(|m| m["name"] == "ICPT_SOCKS")
            .and_then(|m| m["entries"].as_u64())
            .expect("ICPT_SOCKS in status")
    };
    let before = socks(&env);
    let script = "import errno, socket, sys\n\
        n = 0\n\
        for _ in range(200):\n\
        \x20   s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
        \x20   s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n\
        \x20   try:\n\
        \x20       s.connect((sys.argv[1], int(sys.argv[2])))\n\
        \x20   except OSError as e:\n\
        \x20       n += e.errno == errno.ENETUNREACH\n\
        \x20   s.close()\n\
        print(n)\n";
    let mapped = match direct4.addr.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().to_string(),
        std::net::IpAddr::V6(v6) => v6.to_string(),
    };
    let python = interceptor_tests::python().to_string_lossy().into_owned();
    let port = direct4.addr.port().to_string();
    let out = interceptor_tests::run_in_cgroup(&dir, &python, &["-c", script, &mapped, &port]);
    assert!(out.status.success(), "{out:?}");
    // Every connect failed where the record was already made (the kernel redirected it).
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200",
        "{out:?}"
    );
    let after = socks(&env);
    assert!(
        after <= before + 2,
        "records left behind by closed sockets: {before} before, {after} after"
    );
    // And connections still work (their records made and taken as before).
    let r = run_client(PROBE, &dir, &direct4.addr.to_string());
    assert!(r.expect_reply().starts_with("upstream:"), "{r:?}");
}
