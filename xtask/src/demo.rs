//! `cargo xtask demo`: the whole story on one machine, cleaned up afterwards.
//!
//! 1. A small upstream (the "real MCP server") listens on the config's upstream address.
//! 2. The daemon starts with `examples/demo.toml`: programs attach at `/interceptor-demo`, which
//!    the demo creates (never the machine's root cgroup), and `/interceptor-demo/agents` is tagged.
//! 3. An unmodified client (curl, or python3 if curl is missing) dials the intercepted address
//!    from the tagged cgroup — and again from an untagged sibling.
//! 4. It prints what happened and the identity the daemon saw, then stops the daemon, uninstalls
//!    the pins and removes the cgroups.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
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

pub fn run(root: &Path, bin: &Path) -> Result<()> {
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
        cgroups: Vec::new(),
    };
    for dir in [&attach_dir, &tagged_dir, &untagged_dir] {
        if !dir.exists() {
            std::fs::create_dir(dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            cleanup.cgroups.push(dir.clone());
        }
    }

    start_upstream(upstream)?;
    println!("[demo] upstream MCP server stand-in listening on {upstream}");

    let log_path = root.join("target/demo-daemon.log");
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(bin)
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config_path)
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

    let url = format!("http://{dialed}/");
    println!("\n[demo] 1) unmodified client in the TAGGED cgroup {tagged} dials {dialed}");
    let (ok, text) = client_in(&tagged_dir, &url)?;
    println!(
        "    -> {}",
        if ok {
            "REDIRECTED through the proxy"
        } else {
            "FAILED"
        }
    );
    println!("    reply: {}", text.trim());

    let untagged_rel = format!("{attach}/untagged");
    println!("\n[demo] 2) the same client in the UNTAGGED cgroup {untagged_rel} dials {dialed}");
    let (ok2, text2) = client_in(&untagged_dir, &url)?;
    println!(
        "    -> {}",
        if ok2 {
            "reached something directly?"
        } else {
            "NOT redirected: it went to the dialed address, where nothing listens"
        }
    );
    println!("    client said: {}", text2.trim());

    std::thread::sleep(Duration::from_millis(200));
    println!("\n[demo] identity the daemon saw for the redirected connection:");
    let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut seen = false;
    for line in logs.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["message"] == "connection redirected" {
            seen = true;
            for key in [
                "client.pid",
                "client.uid",
                "client.gid",
                "client.comm",
                "client.exe",
                "client.cgroup",
                "client.process",
                "dst.original",
                "server.name",
                "server.upstream",
            ] {
                println!("    {key:<16} {}", v[key]);
            }
        }
    }
    if !seen {
        println!("    (none logged; see {})", log_path.display());
    }
    println!("\n[demo] interceptor status:");
    let _ = Command::new(bin)
        .args(["status", "--config"])
        .arg(&config_path)
        .status();
    if !(ok && !ok2 && seen) {
        bail!(
            "the demo did not behave as expected; daemon log: {}",
            log_path.display()
        );
    }
    Ok(())
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
        let ok = Command::new(bin)
            .args(["status", "--json", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the daemon did not become ready; log: {}", log.display())
}

/// Runs an unmodified HTTP client inside `cgroup_dir`; returns (success, what it printed).
fn client_in(cgroup_dir: &Path, url: &str) -> Result<(bool, String)> {
    let procs = cgroup_dir.join("cgroup.procs");
    let client = if which("curl") {
        format!("exec curl -sS -m 5 '{url}'")
    } else {
        format!(
            "exec python3 -c \"import urllib.request,sys; print(urllib.request.urlopen('{url}', timeout=5).read().decode())\""
        )
    };
    // The shell moves itself into the cgroup, then becomes the client: same pid, so the kernel
    // attributes the connection to the client process.
    let script = format!("echo $$ > '{}' && {client}", procs.display());
    let out = Command::new("sh").args(["-c", &script]).output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// A tiny HTTP server standing in for the real MCP server.
fn start_upstream(addr: SocketAddr) -> Result<()> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding the demo upstream on {addr}"))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read(&mut buf);
            let peer = stream
                .peer_addr()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let body = format!(
                "hello from the upstream at {addr}; this connection came from {peer} (the proxy)\n"
            );
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}
