//! `cargo xtask demo`: the whole story on one machine, cleaned up afterwards.
//!
//! 1. A real MCP server (official Python SDK, `tests/peers/mcp_server.py`) listens on the
//!    config's upstream address.
//! 2. The daemon starts with `examples/demo.toml`: programs attach at `/interceptor-demo`, which
//!    the demo creates (never the machine's root cgroup), and `/interceptor-demo/agents` is tagged
//!    and bound to a role that may read and search but never delete.
//! 3. An unmodified MCP client (official Python SDK) dials the intercepted address from the
//!    tagged cgroup: it lists tools, calls an allowed one and a denied one. The same client in an
//!    untagged sibling is not redirected.
//! 4. It prints what happened, the identity and the policy decisions the daemon logged, then
//!    stops everything, uninstalls the pins and removes the cgroups.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

struct Cleanup {
    bin: PathBuf,
    config: PathBuf,
    daemon: Option<Child>,
    upstream: Option<Child>,
    cgroups: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        eprintln!("[demo] cleaning up");
        if let Some(mut child) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut child) = self.upstream.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(&self.bin)
            .args(["uninstall", "--config"])
            .arg(&self.config)
            .status();
        // Children first.
        for dir in self.cgroups.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

pub fn run(root: &Path, bin: &Path, python: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo loads eBPF programs and creates cgroups: run it as root");
    }
    let config_path = root.join("examples/demo.toml");
    let out = Command::new(bin)
        .args(["check", "--json", "--config"])
        .arg(&config_path)
        .output()
        .context("running interceptor check")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let check: Value = serde_json::from_slice(&out.stdout).context("parsing check --json")?;
    let mount = PathBuf::from(
        check["cgroup_mount"]
            .as_str()
            .context("no cgroup v2 mount on this machine")?,
    );
    let attach = check["attach_cgroup"]
        .as_str()
        .unwrap_or("/interceptor-demo");
    let tagged = check["tags"][0]
        .as_str()
        .context("demo config has no tag")?;
    let server = &check["servers"][0];
    let dialed = server["intercept"][0]
        .as_str()
        .context("no intercept address")?;
    let upstream: SocketAddr = server["upstream_addrs"][0]
        .as_str()
        .context("no upstream")?
        .parse()?;

    let cg = |rel: &str| mount.join(rel.trim_start_matches('/'));
    let attach_dir = cg(attach);
    let tagged_dir = cg(tagged);
    let untagged_dir = attach_dir.join("untagged");
    let mut cleanup = Cleanup {
        bin: bin.to_owned(),
        config: config_path.clone(),
        daemon: None,
        upstream: None,
        cgroups: Vec::new(),
    };
    for dir in [&attach_dir, &tagged_dir, &untagged_dir] {
        if !dir.exists() {
            std::fs::create_dir(dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            cleanup.cgroups.push(dir.clone());
        }
    }

    let calls = root.join("target/demo-upstream-calls.txt");
    let _ = std::fs::remove_file(&calls);
    let upstream_log = std::fs::File::create(root.join("target/demo-upstream.log"))?;
    cleanup.upstream = Some(
        Command::new(python)
            .arg(root.join("tests/peers/mcp_server.py"))
            .args(["--transport", "streamable-http", "--host"])
            .arg(upstream.ip().to_string())
            .args(["--port", &upstream.port().to_string(), "--calls"])
            .arg(&calls)
            .stdout(upstream_log.try_clone()?)
            .stderr(upstream_log)
            .spawn()
            .context("starting the demo MCP server")?,
    );
    wait_port(upstream)?;
    println!("[demo] real MCP server (official Python SDK) listening on {upstream}");

    let log_path = root.join("target/demo-daemon.log");
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(bin)
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "info,interceptor::mcp=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the daemon")?;
    cleanup.daemon = Some(child);
    wait_ready(bin, &config_path, &log_path, &mut cleanup)?;
    println!(
        "[demo] daemon up: programs attached at {}, tagged {tagged}",
        attach_dir.display()
    );

    let url = format!("http://{dialed}/mcp");
    let client = root.join("tests/peers/mcp_client.py");
    let calls_args = [
        r#"search={"query":"roadmap"}"#,
        r#"delete_note={"name":"roadmap"}"#,
    ];
    println!("\n[demo] 1) unmodified MCP client in the TAGGED cgroup {tagged} connects to {url}");
    println!("    it lists tools, calls search (allowed) and delete_note (denied)");
    let (ok, out) = mcp_client_in(&tagged_dir, python, &client, &url, &calls_args)?;
    if let Some(v) = &out {
        println!("    tools it sees: {}", v["tools"]);
        for (name, result) in v["calls"].as_object().into_iter().flatten() {
            println!("    {name:<12} -> {result}");
        }
    }

    let untagged_rel = format!("{attach}/untagged");
    println!("\n[demo] 2) the same client in the UNTAGGED cgroup {untagged_rel}");
    let (ok2, out2) = mcp_client_in(&untagged_dir, python, &client, &url, &calls_args)?;
    println!(
        "    -> {}",
        if ok2 {
            "reached something directly?"
        } else {
            "NOT redirected: it dialed 127.0.0.2:8080 itself, where nothing listens"
        }
    );
    if let Some(v) = out2 {
        println!("    client said: {}", v["fatal"]);
    }

    std::thread::sleep(Duration::from_millis(200));
    println!("\n[demo] what the daemon saw:");
    let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut seen = false;
    let mut denied = false;
    for line in logs.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["message"] == "connection redirected" && !seen {
            seen = true;
            println!("    connection from:");
            for key in [
                "client.pid",
                "client.uid",
                "client.comm",
                "client.exe",
                "client.cgroup",
                "dst.original",
                "server.name",
            ] {
                println!("      {key:<14} {}", v[key]);
            }
        }
        if v["message"] == "mcp request" && v["mcp.method"] == "tools/call" {
            denied |= v["authz.decision"] == "deny";
            println!(
                "    tools/call {:<12} {:<5} rule: {}",
                v["mcp.name"].as_str().unwrap_or("?"),
                v["authz.decision"].as_str().unwrap_or("?"),
                v["authz.rule"].as_str().unwrap_or("?")
            );
        }
    }
    let executed = std::fs::read_to_string(&calls).unwrap_or_default();
    println!(
        "\n[demo] tool calls the MCP server actually executed: {:?}",
        executed.lines().collect::<Vec<_>>()
    );
    println!(
        "\n[demo] the audit log (interceptor audit tail), every request written before it was forwarded:"
    );
    let _ = Command::new(bin)
        .args(["audit", "tail", "--config"])
        .arg(&config_path)
        .status();
    let audit_path = check["audit_path"]
        .as_str()
        .unwrap_or("/run/interceptor-demo/audit.jsonl");
    println!("\n[demo] interceptor audit verify {audit_path}:");
    let verified = Command::new(bin)
        .args(["audit", "verify", audit_path])
        .status()
        .is_ok_and(|s| s.success());
    println!("\n[demo] interceptor status:");
    let _ = Command::new(bin)
        .args(["status", "--config"])
        .arg(&config_path)
        .status();
    if !(ok && !ok2 && seen && denied && verified && !executed.contains("delete_note")) {
        bail!(
            "the demo did not behave as expected; daemon log: {}",
            log_path.display()
        );
    }
    Ok(())
}

fn wait_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the demo MCP server did not listen on {addr} within 30 s (see target/demo-upstream.log)"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs the MCP client inside `cgroup_dir`; returns (success, what it printed as JSON).
fn mcp_client_in(
    cgroup_dir: &Path,
    python: &Path,
    client: &Path,
    url: &str,
    calls: &[&str],
) -> Result<(bool, Option<Value>)> {
    let mut cmd = crate::in_cgroup(cgroup_dir, python);
    cmd.arg(client).args([
        "--url",
        url,
        "--transport",
        "streamable-http",
        "--mode",
        "legacy",
    ]);
    for c in calls {
        cmd.args(["--call", c]);
    }
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok((out.status.success(), serde_json::from_str(text.trim()).ok()))
}

fn wait_ready(bin: &Path, config: &Path, log: &Path, cleanup: &mut Cleanup) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(child) = cleanup.daemon.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!(
                "the daemon exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if crate::daemon_answers(bin, config) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the daemon did not become ready; log: {}", log.display())
}
