//! Harness for the privileged integration tests: a test's own cgroup tree, bpffs folder, config
//! and daemon, all removed by [`TestEnv`]'s `Drop` (also when the test fails), plus small TCP
//! servers that say who they are.
//!
//! Tests run the real `interceptor` binary (path in `INTERCEPTOR_BIN`, set by `cargo xtask
//! test`) and attach only below a cgroup they created.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

/// Set to `1` to skip privileged tests explicitly; otherwise a machine without root or BPF fails
/// them loudly.
pub const SKIP_ENV: &str = "INTERCEPTOR_SKIP_PRIVILEGED";

/// True when the privileged tests should run; panics when they cannot and nobody asked to skip.
pub fn privileged() -> bool {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("skipping privileged test: {SKIP_ENV}=1");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged integration tests need root (they load eBPF programs and create cgroups); \
         run them via `cargo xtask test` as root, or set {SKIP_ENV}=1 to skip them"
    );
    assert!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "this kernel has no BTF (/sys/kernel/btf/vmlinux); interceptor needs Linux >= 6.1 with \
         BTF. Set {SKIP_ENV}=1 to skip these tests"
    );
    true
}

/// The daemon binary under test.
pub fn interceptor_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("INTERCEPTOR_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/interceptor");
    assert!(
        p.exists(),
        "no interceptor binary at {}; run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// Python with the official MCP SDK (set up by `cargo xtask setup`).
pub fn python() -> PathBuf {
    let p = std::env::var_os("INTERCEPTOR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/python-mcp/bin/python")
        });
    assert!(
        p.exists(),
        "no Python with the MCP SDK at {}; run the tests with `cargo xtask test` (it installs it)",
        p.display()
    );
    p
}

/// A peer script under `tests/peers/`.
pub fn peer(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A real MCP server (official Python SDK) on 127.0.0.1, killed on drop.
pub struct McpServer {
    pub addr: SocketAddr,
    child: Child,
    calls: tempfile::NamedTempFile,
    log: tempfile::NamedTempFile,
}

impl McpServer {
    /// Starts `tests/peers/mcp_server.py` with `transport` (`streamable-http` or `sse`).
    pub fn start(transport: &str) -> Self {
        Self::start_with(transport, &[])
    }

    /// Like [`McpServer::start`], with more arguments for the script (`--with-slow-tool`).
    pub fn start_with(transport: &str, args: &[&str]) -> Self {
        let port = free_port();
        let calls = tempfile::NamedTempFile::new().expect("calls file");
        let mut cmd = Command::new(python());
        cmd.arg(peer("mcp_server.py"))
            .args([
                "--transport",
                transport,
                "--port",
                &port.to_string(),
                "--calls",
            ])
            .arg(calls.path())
            .args(args);
        Self::spawn(cmd, port, calls)
    }

    /// Kills the server now (SIGKILL: its connections drop mid-exchange).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `limit` until the server has executed a call of `tool`.
    pub fn wait_call(&self, tool: &str, limit: Duration) {
        eventually(
            limit,
            || self.calls().iter().any(|c| c == tool).then_some(()),
            || {
                format!(
                    "the server executed no {tool} call within {limit:?}: {}",
                    self.log_text()
                )
            },
        );
    }

    /// Starts the `rmcp-peer` binary (official Rust SDK) as a Streamable HTTP server.
    pub fn start_rmcp(rmcp_peer: &str) -> Self {
        let port = free_port();
        let calls = tempfile::NamedTempFile::new().expect("calls file");
        let mut cmd = Command::new(rmcp_peer);
        cmd.args(["server", &format!("127.0.0.1:{port}")])
            .arg(calls.path());
        Self::spawn(cmd, port, calls)
    }

    /// Starts an arbitrary server command listening on 127.0.0.1:`port`.
    pub fn spawn_cmd(cmd: Command, port: u16) -> Self {
        Self::spawn(
            cmd,
            port,
            tempfile::NamedTempFile::new().expect("calls file"),
        )
    }

    fn spawn(mut cmd: Command, port: u16, calls: tempfile::NamedTempFile) -> Self {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = cmd
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("start the MCP server");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut server = Self {
            addr,
            child,
            calls,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("MCP server exited ({status}): {}", server.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "MCP server not listening after 30 s: {}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Tool calls the server executed, in order.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.calls.path())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command line of the official-SDK MCP client (`tests/peers/mcp_client.py`).
fn mcp_client_args(url: &str, transport: &str, mode: &str, calls: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        peer("mcp_client.py").as_str(),
        "--url",
        url,
        "--transport",
        transport,
        "--mode",
        mode,
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    for c in calls {
        args.push("--call".into());
        args.push((*c).to_owned());
    }
    args
}

/// Runs the official-SDK MCP client (`tests/peers/mcp_client.py`) inside `cgroup_dir` and
/// returns what it printed.
pub fn mcp_client(
    cgroup_dir: &Path,
    url: &str,
    transport: &str,
    mode: &str,
    calls: &[&str],
) -> Value {
    let python = python().to_string_lossy().into_owned();
    let args = mcp_client_args(url, transport, mode, calls);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_in_cgroup(cgroup_dir, &python, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "MCP client printed no JSON ({e}): stdout={stdout:?} stderr={}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The JSON objects of a JSON-lines file (an audit log, what a test upstream saw): none if
/// it cannot be read, unreadable lines left out.
pub fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs the official-SDK Rust client (`rmcp-peer client`) inside `cgroup_dir`.
pub fn rmcp_client(rmcp_peer: &str, cgroup_dir: &Path, url: &str, calls: &[&str]) -> Value {
    let mut args = vec!["client", url];
    args.extend_from_slice(calls);
    let out = run_in_cgroup(cgroup_dir, rmcp_peer, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "rmcp client printed no JSON ({e}): stdout={stdout:?} stderr={}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// What `probe` gives first, asked every 20 ms for up to `limit`; a failure saying `why()`
/// (asked then, so it can show the state that never came) otherwise.
pub fn eventually<T>(
    limit: Duration,
    mut probe: impl FnMut() -> Option<T>,
    why: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        if Instant::now() >= deadline {
            panic!("{}", why());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// curl speaking HTTP/2 without negotiation (h2c prior knowledge) from inside `cgroup_dir`:
/// POSTs `body` as JSON to `url`, with `extra` curl arguments.
pub fn h2c_post(cgroup_dir: &Path, url: &str, body: &str, extra: &[&str]) -> Command {
    let mut args = vec![
        "-sS",
        "--http2-prior-knowledge",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
    ];
    args.extend_from_slice(extra);
    args.push(url);
    in_cgroup(cgroup_dir, "curl", &args)
}

/// The daemon's metrics page (`daemon.metrics_addr` = 127.0.0.1:`port`), HTTP head included.
pub fn scrape_metrics(port: u16) -> String {
    try_scrape_metrics(port).expect("metrics endpoint")
}

/// Like [`scrape_metrics`], the error when it fails.
pub fn try_scrape_metrics(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// A node CA made with `interceptor ca init --dir ca_dir` (`ca.pem`, `ca-key.pem`).
pub fn node_ca(ca_dir: &Path) {
    let out = Command::new(interceptor_bin())
        .args(["ca", "init", "--dir"])
        .arg(ca_dir)
        .output()
        .expect("ca init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port free on 127.0.0.1 and [::1] when picked, for something bound later (the daemon's
/// listener, a Python server). Taken from just below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), which `bind(…:0)` and `connect()` never pick from, and
/// handed out in turn within this process (test files run one at a time): a port picked here
/// cannot be taken meanwhile by another test's kernel-chosen port.
pub fn free_port() -> u16 {
    use std::sync::{OnceLock, atomic::AtomicU32};
    static POOL: OnceLock<(u32, u32)> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SIZE: u32 = 8000;
    let &(start, size) = POOL.get_or_init(|| {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("read net.ipv4.ip_local_port_range");
        let mut bounds = range.split_whitespace().map(|n| n.parse::<u32>());
        let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else {
            panic!("net.ipv4.ip_local_port_range is not two numbers: {range:?}");
        };
        let start = if low >= SIZE + 1024 {
            low - SIZE
        } else if high + SIZE <= 65535 {
            high + 1
        } else {
            panic!(
                "net.ipv4.ip_local_port_range {low}-{high} leaves no {SIZE} ports outside it \
                 for the tests"
            );
        };
        // Where this process starts in the pool: another suite run meanwhile starts elsewhere.
        NEXT.store(std::process::id() % SIZE, Ordering::Relaxed);
        (start, SIZE)
    });
    for _ in 0..size {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % size;
        let port = u16::try_from(start + n).expect("port in range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
        {
            return port;
        }
    }
    panic!(
        "no port free on both 127.0.0.1 and [::1] in {start}..{}",
        start + size
    );
}

/// A minimal HTTP server that answers every request with the body `<label>:<request body>` and
/// counts connections.
pub struct LabelServer {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    /// Every request body received, in order.
    pub bodies: Arc<std::sync::Mutex<Vec<String>>>,
}

impl LabelServer {
    /// Listens on `ip` (port chosen by the kernel).
    pub fn start(ip: &str, label: &'static str) -> Self {
        Self::start_slow(ip, label, Duration::ZERO)
    }

    /// Like [`LabelServer::start`], answering each request after `delay`.
    pub fn start_slow(ip: &str, label: &'static str, delay: Duration) -> Self {
        Self::serve(ip, delay, move |body| {
            (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n".to_owned(),
                format!("{label}:{body}").into_bytes(),
            )
        })
    }

    /// Answers every request with `body` as `application/json` (bytes as given).
    pub fn start_fixed(ip: &str, body: &'static [u8]) -> Self {
        Self::start_fixed_as(ip, "application/json", body)
    }

    /// Answers every request with `body` as `content_type` (bytes as given).
    pub fn start_fixed_as(ip: &str, content_type: &'static str, body: &'static [u8]) -> Self {
        Self::serve(ip, Duration::ZERO, move |_| {
            (
                format!("HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"),
                body.to_vec(),
            )
        })
    }

    /// Answers every request with `head` (its status line and headers, each line ended by
    /// CRLF; `Content-Length` and `Connection` are added) and `body`.
    pub fn start_with_head(ip: &str, head: &'static str, body: &'static [u8]) -> Self {
        Self::serve(ip, Duration::ZERO, move |_| {
            (head.to_owned(), body.to_vec())
        })
    }

    fn serve(
        ip: &str,
        delay: Duration,
        answer: impl Fn(&str) -> (String, Vec<u8>) + Send + Sync + 'static,
    ) -> Self {
        let answer = Arc::new(answer);
        let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let count = connections.clone();
        let seen = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                let answer = answer.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    // One request per connection (answered with Connection: close).
                    let mut len = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
                        return;
                    }
                    let body = String::from_utf8_lossy(&body).into_owned();
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(body.clone());
                    std::thread::sleep(delay);
                    let (head, reply) = answer(&body);
                    let _ = write!(
                        stream,
                        "{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
                        reply.len()
                    );
                    let _ = stream.write_all(&reply);
                });
            }
        });
        Self {
            addr,
            connections,
            bodies,
        }
    }

    /// Request bodies received so far.
    pub fn bodies(&self) -> Vec<String> {
        self.bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// What `probe-client` reported.
#[derive(Debug)]
pub struct ClientResult {
    pub pid: u32,
    /// `getpeername()` as the client saw it.
    pub peer: Option<String>,
    pub reply: Option<String>,
    /// HTTP status of the response.
    pub status: Option<u16>,
    /// The response's status line and headers.
    pub head: Option<String>,
    pub error: Option<String>,
    pub errno: Option<i32>,
}

impl ClientResult {
    /// The value of response header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.as_deref()?.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The reply, or a panic that shows what happened instead.
    pub fn expect_reply(&self) -> &str {
        self.reply
            .as_deref()
            .unwrap_or_else(|| panic!("client got no reply: {self:?}"))
    }
}

/// Runs `probe` (the probe-client binary) against `addr` inside the cgroup directory `cgroup_dir`.
pub fn run_client(probe: &str, cgroup_dir: &Path, addr: &str) -> ClientResult {
    parse_client(run_in_cgroup(cgroup_dir, probe, &[addr]))
}

/// Like [`run_client`], as user and group `uid` (it joins the cgroup as root first). The
/// probe runs from a copy in a world-readable folder: the checkout may not be.
pub fn run_client_as(probe: &str, cgroup_dir: &Path, addr: &str, uid: u32) -> ClientResult {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    let copy = dir.path().join("probe-client");
    std::fs::copy(probe, &copy).expect("copy the probe");
    let id = uid.to_string();
    let copy = copy.to_string_lossy().into_owned();
    parse_client(run_in_cgroup(
        cgroup_dir,
        "setpriv",
        &[
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            &copy,
            addr,
        ],
    ))
}

/// One UDP datagram to `addr` from inside `cgroup_dir` (`mode`: `send`, `connect`,
/// `send-mapped` or `broadcast`, see `probe-client`): `Ok(bytes sent)` or `Err(errno)`.
pub fn send_datagram(probe: &str, cgroup_dir: &Path, addr: &str, mode: &str) -> Result<u64, i32> {
    let out = run_in_cgroup(cgroup_dir, probe, &[addr, "--udp", mode]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("probe-client printed no JSON ({e}): {stdout:?}"));
    match (v["sent"].as_u64(), v["errno"].as_i64()) {
        (Some(sent), _) => Ok(sent),
        (None, Some(errno)) => Err(errno as i32),
        _ => panic!("probe-client --udp {mode}: {v}"),
    }
}

/// A Streamable HTTP POST of `body` to `/mcp`, whole, as [`send_raw`] sends it.
pub fn json_post(body: &str) -> String {
    format!(
        "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json, \
         text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Sends the raw HTTP request `request` to `addr` from inside `cgroup_dir`.
pub fn send_raw(probe: &str, cgroup_dir: &Path, addr: &str, request: &[u8]) -> ClientResult {
    send_raw_env(probe, cgroup_dir, addr, request, &[])
}

/// Like [`send_raw`], with `VAR=value` settings in the probe's environment (`env` execs it:
/// same pid).
pub fn send_raw_env(
    probe: &str,
    cgroup_dir: &Path,
    addr: &str,
    request: &[u8],
    env: &[&str],
) -> ClientResult {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), request).expect("write request");
    let path = file.path().to_string_lossy().into_owned();
    let mut args = env.to_vec();
    args.extend([probe, addr, "--raw", &path]);
    parse_client(run_in_cgroup(cgroup_dir, "env", &args))
}

/// Like [`send_raw`] for a response that stays open (a stream): reads for `read_ms`
/// and reports what arrived.
pub fn read_stream(
    probe: &str,
    cgroup_dir: &Path,
    addr: &str,
    request: &[u8],
    read_ms: u64,
) -> ClientResult {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), request).expect("write request");
    let script = format!(
        "echo $$ > '{}' && exec \"$@\"",
        cgroup_dir.join("cgroup.procs").display()
    );
    let out = Command::new("sh")
        .args(["-c", &script, "sh", probe, addr, "--raw"])
        .arg(file.path())
        .env("PROBE_READ_TIMEOUT_MS", read_ms.to_string())
        .output()
        .unwrap_or_else(|e| panic!("run {probe}: {e}"));
    parse_client(out)
}

/// Runs `program args…` as a process of the cgroup `cgroup_dir`: the shell moves itself into
/// the cgroup and then becomes the program (same pid), so the kernel attributes its
/// connections to it.
pub fn run_in_cgroup(cgroup_dir: &Path, program: &str, args: &[&str]) -> Output {
    in_cgroup(cgroup_dir, program, args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// The command that runs `program args…` as a process of the cgroup `cgroup_dir` (the shell
/// `exec`s it: the child's pid is the program's).
fn in_cgroup(cgroup_dir: &Path, program: &str, args: &[&str]) -> Command {
    let script = format!(
        "echo $$ > '{}' && exec \"$@\"",
        cgroup_dir.join("cgroup.procs").display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, "sh", program]).args(args);
    cmd
}

/// A process a test started: killed and reaped however the test ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Python `script` (with `args`) started inside `cgroup_dir`, once it has printed its first
/// line: that line, and the process (killed on drop).
pub fn python_in_cgroup(cgroup_dir: &Path, script: &str, args: &[&str]) -> (String, KillOnDrop) {
    let python = python().to_string_lossy().into_owned();
    let mut args_all = vec!["-c", script];
    args_all.extend_from_slice(args);
    let mut child = KillOnDrop(
        in_cgroup(cgroup_dir, &python, &args_all)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the Python script"),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("the script's first line");
    (line.trim().to_owned(), child)
}

/// The official-SDK MCP client started in the background inside `cgroup_dir` (for calls a
/// test cuts off); killed and reaped on drop.
pub struct BackgroundClient {
    _process: KillOnDrop,
}

impl BackgroundClient {
    pub fn start(cgroup_dir: &Path, url: &str, transport: &str, calls: &[&str]) -> Self {
        let python = python().to_string_lossy().into_owned();
        let args = mcp_client_args(url, transport, "legacy", calls);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = in_cgroup(cgroup_dir, &python, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the MCP client");
        Self {
            _process: KillOnDrop(child),
        }
    }
}

fn parse_client(out: Output) -> ClientResult {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "probe-client printed no JSON ({e}): stdout={stdout:?} stderr={:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    ClientResult {
        pid: v["pid"].as_u64().unwrap_or(0) as u32,
        peer: v["peer"].as_str().map(str::to_owned),
        reply: v["reply"].as_str().map(str::to_owned),
        status: v["status"].as_u64().map(|s| s as u16),
        head: v["head"].as_str().map(str::to_owned),
        error: v["error"].as_str().map(str::to_owned),
        errno: v["errno"].as_i64().map(|e| e as i32),
    }
}

/// One `[[server]]` of a test config.
pub struct ServerSpec {
    pub name: String,
    pub intercept: Vec<String>,
    pub upstream: String,
}

impl ServerSpec {
    /// Server `name` whose agents dial the upstream's own address `addr` (the proxy reaches
    /// the same address: its own sockets are never redirected).
    pub fn direct(name: &str, addr: impl ToString) -> Self {
        Self {
            name: name.into(),
            intercept: vec![addr.to_string()],
            upstream: addr.to_string(),
        }
    }
}

/// A test's private world: cgroup tree, bpffs folder, config, admin socket, daemon.
pub struct TestEnv {
    pub name: String,
    pub mount: PathBuf,
    /// The attach cgroup, relative to the mount (`/icpt-it-…`).
    pub root: String,
    pub bpffs_dir: PathBuf,
    pub port: u16,
    pub tmp: tempfile::TempDir,
    pub config_path: PathBuf,
    created: Vec<PathBuf>,
    daemon: Option<Child>,
    log_path: PathBuf,
    /// Extra `key = value` lines for the `[daemon]` table.
    pub daemon_extra: String,
    /// The daemon's open-files limit (soft and hard), when a test sets one.
    pub open_files: Option<u64>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Daemons start one at a time: the first one on a fresh machine mounts bpffs, and two racing
/// mounts would stack and hide each other's pins. (Production runs one daemon per node.)
static START: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl TestEnv {
    /// Creates the test's attach cgroup.
    pub fn new(label: &str) -> Self {
        let mount = interceptor::cgroup::cgroup2_mount().expect("cgroup v2 mount");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("icpt-it-{}-{n}-{label}", std::process::id());
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut env = Self {
            root: format!("/{name}"),
            bpffs_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            port: free_port(),
            config_path: tmp.path().join("interceptor.toml"),
            log_path: tmp.path().join("daemon.log"),
            tmp,
            mount,
            name,
            created: Vec::new(),
            daemon: None,
            daemon_extra: String::new(),
            open_files: None,
        };
        let root = env.root.clone();
        env.mkdir(&root);
        env
    }

    fn mkdir(&mut self, rel: &str) -> PathBuf {
        let dir = self.dir(rel);
        if !dir.exists() {
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            self.created.push(dir.clone());
        }
        dir
    }

    /// The directory of a cgroup path relative to the mount.
    pub fn dir(&self, rel: &str) -> PathBuf {
        self.mount.join(rel.trim_start_matches('/'))
    }

    /// Creates `<root>/<sub>` (each level) and returns its path relative to the mount.
    pub fn cgroup(&mut self, sub: &str) -> String {
        let mut rel = self.root.clone();
        for part in sub.split('/').filter(|p| !p.is_empty()) {
            rel = format!("{rel}/{part}");
            self.mkdir(&rel);
        }
        rel
    }

    /// Writes the config: servers, cgroups tagged at start, and a role granting every server
    /// and method to everything under the test's cgroup.
    pub fn write_config(&self, servers: &[ServerSpec], tags: &[&str]) {
        let open = format!(
            "\n[[role]]\nname = \"open\"\nservers = [\"*\"]\nallow_tools = [\"*\"]\nallow_methods = [\"*\"]\n\
             \n[[binding]]\nrole = \"open\"\ncgroup = \"{}/**\"\n",
            self.root
        );
        self.write_config_with(servers, tags, &open);
    }

    /// Writes the config with `extra` TOML (roles, bindings, …) appended.
    pub fn write_config_with(&self, servers: &[ServerSpec], tags: &[&str], extra: &str) {
        let mut text = format!(
            "[daemon]\nlisten_port = {}\ncgroup_root = \"{}\"\nbpffs_dir = \"{}\"\nadmin_socket = \"{}\"\n",
            self.port,
            self.root,
            self.bpffs_dir.display(),
            self.tmp.path().join("admin.sock").display()
        );
        text.push_str(&self.daemon_extra);
        for t in tags {
            text.push_str(&format!("\n[[tag]]\ncgroup = \"{t}\"\n"));
        }
        for s in servers {
            let intercept: Vec<String> = s.intercept.iter().map(|a| format!("\"{a}\"")).collect();
            text.push_str(&format!(
                "\n[[server]]\nname = \"{}\"\nintercept = [{}]\nupstream = \"{}\"\n",
                s.name,
                intercept.join(", "),
                s.upstream
            ));
        }
        text.push_str(extra);
        if !extra.contains("[audit]") {
            text.push_str(&format!(
                "\n[audit]\npath = \"{}\"\n",
                self.audit_path().display()
            ));
        }
        std::fs::write(&self.config_path, text).expect("write config");
    }

    /// Starts the daemon and waits until it is ready (or panics with its log).
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        let _serial = START.lock().unwrap_or_else(|p| p.into_inner());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let mut cmd = Command::new(interceptor_bin());
        cmd.args(["run", "--log-format", "json", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info,interceptor=debug")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(limit) = self.open_files {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: only setrlimit(2) runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        limit,
                        limit,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().expect("spawn interceptor");
        self.daemon = Some(child);
        let ready_before = self.count_logs("interceptor ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.count_logs("interceptor ready") > ready_before {
                return;
            }
            if let Some(status) = self
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.daemon = None;
                panic!(
                    "daemon exited ({status}) before ready:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready after 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How the daemon ended, once it has (it is then no longer running); `None` while it runs.
    pub fn daemon_exit(&mut self) -> Option<std::process::ExitStatus> {
        let status = self
            .daemon
            .as_mut()?
            .try_wait()
            .expect("wait for the daemon")?;
        self.daemon = None;
        Some(status)
    }

    /// Stops the daemon with `signal` and waits for it to exit.
    pub fn stop_daemon(&mut self, signal: Signal) {
        let mut child = self.daemon.take().expect("daemon running");
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
        // SIGTERM drains for up to drain_grace (10 s by default) first.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("daemon did not exit on {signal}");
    }

    /// Waits up to `limit` for the daemon to exit on its own: its exit status, or `None` (it
    /// still runs, and is stopped with the environment).
    pub fn wait_daemon_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let child = self.daemon.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.daemon = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The audit log of this environment's daemon.
    pub fn audit_path(&self) -> PathBuf {
        self.tmp.path().join("audit.jsonl")
    }

    /// The audit events written so far.
    pub fn audit_events(&self) -> Vec<Value> {
        json_lines(&self.audit_path())
    }

    /// The running daemon's pid.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// The daemon's JSON log lines.
    pub fn logs(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn count_logs(&self, message: &str) -> usize {
        self.logs()
            .iter()
            .filter(|v| v["message"] == message)
            .count()
    }

    /// Waits for a log line with `message` satisfying `pred`.
    pub fn wait_log(&self, message: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self
                .logs()
                .into_iter()
                .find(|v| v["message"] == message && pred(v))
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} log line matched:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `interceptor <args> --config <this env's config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(interceptor_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("run interceptor")
    }

    /// `interceptor status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = interceptor::bpf::uninstall(&self.bpffs_dir) {
            eprintln!("cleanup: uninstall {}: {e}", self.bpffs_dir.display());
        }
        for dir in self.created.iter().rev() {
            // Processes left behind (a failed test) would keep the cgroup busy.
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        for dir in self.created.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            eprintln!("daemon log of {}:\n{}", self.name, self.log_text());
        }
    }
}

/// The PEM blocks of `path` (panics with the path when unreadable: test set-up).
pub fn pem_items(path: &Path) -> Vec<pem::Pem> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    pem::parse_many(bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Writes a CA (`upstream-ca.pem`) and a server certificate it issued (`server.pem`,
/// `server-key.pem`) for `dns`, `ips` and an optional URI SAN into `dir`, as an upstream MCP
/// server would hold them.
pub fn write_server_pki(dir: &Path, dns: &str, ips: &[&str], uri: Option<&str>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    std::fs::create_dir_all(dir).expect("PKI directory");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    std::fs::write(dir.join("upstream-ca.pem"), ca_cert.pem()).expect("write CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec![dns.to_owned()]).expect("server params");
    for ip in ips {
        params
            .subject_alt_names
            .push(SanType::IpAddress(ip.parse().expect("IP SAN")));
    }
    if let Some(uri) = uri {
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().expect("URI SAN")));
    }
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write certificate");
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).expect("write key");
}

/// A TLS 1.3 acceptor serving `cert`/`key` that requires a client certificate issued by
/// `client_ca` (the node CA), as an upstream behind mTLS does.
pub fn mtls_acceptor(cert: &Path, key: &Path, client_ca: &Path) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for item in pem_items(client_ca) {
        roots
            .add(CertificateDer::from(item.into_contents()))
            .expect("client CA certificate");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("client certificate verifier");
    let chain: Vec<CertificateDer<'static>> = pem_items(cert)
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        pem_items(key).remove(0).into_contents(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server TLS configuration");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
