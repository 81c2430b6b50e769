//! Agents in their own network namespaces (`ip netns add` + veth): the daemon opens a listener
//! inside each namespace where a tagged process lives; identical tuples in two namespaces never
//! collide, and each request is attributed to the right process.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use interceptor_tests::{LabelServer, ServerSpec, TestEnv, privileged};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe-client");

/// A network namespace this test made; deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        // Both namespaces draw source ports from a single port, so their tuples are identical.
        run(&[
            "ip",
            "netns",
            "exec",
            &name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_local_port_range=40000 40000",
        ]);
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `args`, which must succeed; its standard output.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `program args…` inside cgroup directory `cg` and namespace `ns`. The cgroup is joined first:
/// `ip netns exec` mounts a fresh /sys, without the cgroup hierarchy. (It execs without
/// forking, so the pid, and with it the cgroup, stays.)
fn in_ns(ns: &str, cg: &std::path::Path, program: &str, args: &[&str]) -> Command {
    let script = format!(
        "echo $$ > '{}' && exec \"$@\"",
        cg.join("cgroup.procs").display()
    );
    let mut c = Command::new("sh");
    c.args(["-c", &script, "sh", "ip", "netns", "exec", ns, program])
        .args(args);
    c
}

#[test]
fn agents_in_two_namespaces_are_intercepted_and_told_apart() {
    if !privileged() {
        return;
    }
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let mut env = TestEnv::new("netns");
    let a = env.cgroup("agents/a");
    let b = env.cgroup("agents/b");
    env.write_config(
        &[ServerSpec {
            name: "notes".into(),
            intercept: vec!["127.0.0.2:8080".into()],
            upstream: upstream.addr.to_string(),
        }],
        &[&format!("{}/agents", env.root)],
    );
    let base = format!("icpt-{}-{}", std::process::id(), env.port);
    let (na, nb) = (
        Netns::new(format!("{base}-a")),
        Netns::new(format!("{base}-b")),
    );
    // A veth pair between them, as container namespaces have.
    run(&[
        "ip", "link", "add", "icpt-va", "netns", &na.0, "type", "veth", "peer", "name", "icpt-vb",
        "netns", &nb.0,
    ]);
    env.start_daemon();

    let (dir_a, dir_b) = (env.dir(&a), env.dir(&b));
    let _holders = [
        Holder(
            in_ns(&na.0, &dir_a, "sleep", &["60"])
                .spawn()
                .expect("holder a"),
        ),
        Holder(
            in_ns(&nb.0, &dir_b, "sleep", &["60"])
                .spawn()
                .expect("holder b"),
        ),
    ];
    // The daemon finds both namespaces and opens a listener in each.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let listeners = env.status()["listeners"].as_array().map_or(0, Vec::len);
        if listeners == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "listeners not opened: {}",
            env.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let probe = |ns: &str, dir: &std::path::Path| -> Value {
        let out = in_ns(ns, dir, PROBE, &["127.0.0.2:8080"])
            .stderr(Stdio::piped())
            .output()
            .expect("probe");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "probe printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let ra = probe(&na.0, &dir_a);
    let rb = probe(&nb.0, &dir_b);
    for r in [&ra, &rb] {
        assert!(
            r["reply"]
                .as_str()
                .is_some_and(|s| s.starts_with("upstream:")),
            "{r}"
        );
        assert_eq!(r["peer"], "127.0.0.2:8080");
    }
    // Each request attributed to its own process and cgroup, despite identical tuples.
    let la = env.wait_log("connection redirected", |v| v["client.pid"] == ra["pid"]);
    let lb = env.wait_log("connection redirected", |v| v["client.pid"] == rb["pid"]);
    assert_eq!(la["client.cgroup"], a.as_str());
    assert_eq!(lb["client.cgroup"], b.as_str());
    assert_eq!(
        la["client.addr"], lb["client.addr"],
        "the tuples were meant to be identical"
    );
    assert_eq!(upstream.count(), 2);

    // A listener closed under the daemon (anyone owning the namespace can `ss -K` it) ends its
    // accept loop instead of spinning on it, and the namespace scan opens it again.
    let killed = run(&[
        "ip",
        "netns",
        "exec",
        &na.0,
        "ss",
        "-K",
        "-tl",
        &format!("sport = :{}", env.port),
    ]);
    assert!(
        killed.contains(&env.port.to_string()),
        "ss -K closed nothing: {killed}"
    );
    env.wait_log(
        "the proxy listener no longer accepts; its accept loop ends",
        |_| true,
    );
    env.wait_log(
        "the listener in this network namespace ended; opening it again",
        |_| true,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = probe(&na.0, &dir_a);
        if r["reply"]
            .as_str()
            .is_some_and(|s| s.starts_with("upstream:"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "namespace a not served again: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let accept_failures = env
        .logs()
        .iter()
        .filter(|v| v["message"] == "accept failed")
        .count();
    assert!(
        accept_failures < 10,
        "{accept_failures} accept failures logged"
    );

    // An agent that may make network namespaces (here root, as in a container; an
    // unprivileged one in a user namespace of its own) gets listeners for at most 8 of them
    // in its cgroup: otherwise it could fill the node's 1,024 listener entries.
    let crowded = env.cgroup("agents/crowded");
    let script = format!(
        "echo $$ > '{}' && exec unshare --net sh -c 'ip link set lo up && exec sleep 60'",
        env.dir(&crowded).join("cgroup.procs").display()
    );
    let _crowd: Vec<Holder> = (0..10)
        .map(|_| {
            Holder(
                Command::new("sh")
                    .args(["-c", &script])
                    .spawn()
                    .expect("netns"),
            )
        })
        .collect();
    env.wait_log(
        "more network namespaces in this cgroup than get a listener (8); the others' MCP connects stay refused (logged once while it lasts)",
        |v| v["namespaces"].as_u64() > Some(8) && v["cgroup"].as_str().is_some_and(|c| c.ends_with("/agents/crowded")),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let listeners = env.status()["listeners"].as_array().map_or(0, Vec::len);
        if listeners == 3 + 8 {
            break;
        }
        assert!(listeners < 3 + 8, "{listeners} listeners");
        assert!(
            Instant::now() < deadline,
            "crowded namespaces not served: {}",
            env.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And stays so (the two left over are not opened later).
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        env.status()["listeners"].as_array().map_or(0, Vec::len),
        3 + 8
    );
    assert_eq!(upstream.count(), 3);
}

/// A thread that enters network namespace `argv[1]` (a path), moves itself into the threaded
/// cgroup `argv[2]` (its `cgroup.threads`), then dials `argv[3]` until served (up to 20 s):
/// prints the reply's first line, or what went wrong.
const THREAD_AGENT: &str = r#"
import ctypes, os, socket, sys, threading, time
ns, cg, dialed = sys.argv[1], sys.argv[2], sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
out = []
def agent():
    fd = os.open(ns, os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        out.append("setns failed: %d" % ctypes.get_errno()); return
    with open(os.path.join(cg, "cgroup.threads"), "w") as f:
        f.write(str(threading.get_native_id()))
    host, port = dialed.rsplit(":", 1)
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    deadline = time.time() + 20
    while True:
        try:
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            out.append(reply.split(b"\r\n\r\n", 1)[-1].decode()); return
        except OSError as e:
            if time.time() > deadline:
                out.append("never served: %s" % e); return
            time.sleep(0.1)
t = threading.Thread(target=agent)
t.start()
t.join()
print(out[0] if out else "no result", flush=True)
"#;

#[test]
fn a_tagged_threaded_cgroups_namespace_is_served() {
    if !privileged() {
        return;
    }
    // Only a thread of the process is in the tagged cgroup, a threaded one: its cgroup.procs
    // cannot be listed (EOPNOTSUPP), its cgroup.threads can.
    let upstream = LabelServer::start("127.0.0.3", "upstream");
    let mut env = TestEnv::new("threaded");
    let domain = env.cgroup("agents");
    let threaded = env.cgroup("agents/t");
    std::fs::write(env.dir(&threaded).join("cgroup.type"), "threaded")
        .expect("make the cgroup threaded");
    env.write_config(
        &[ServerSpec {
            name: "notes".into(),
            intercept: vec!["127.0.0.2:8080".into()],
            upstream: upstream.addr.to_string(),
        }],
        &[&threaded],
    );
    let ns = Netns::new(format!("icpt-{}-{}-thr", std::process::id(), env.port));
    env.start_daemon();
    let script = format!(
        "echo $$ > '{}' && exec \"$@\"",
        env.dir(&domain).join("cgroup.procs").display()
    );
    let out = Command::new("sh")
        .args(["-c", &script, "sh"])
        .arg(interceptor_tests::python())
        .args(["-c", THREAD_AGENT])
        .arg(format!("/var/run/netns/{}", ns.0))
        .arg(env.dir(&threaded))
        .arg("127.0.0.2:8080")
        .output()
        .expect("run the agent");
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.trim().starts_with("upstream:"),
        "{reply} / {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.log_text()
    );
    assert_eq!(upstream.count(), 1);
}
