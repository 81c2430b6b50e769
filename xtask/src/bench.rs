//! `cargo xtask bench`: every cost against a baseline measured in the same run, alternating
//! A and B rounds to cancel drift on a shared, noisy machine. Prints a table and writes
//! `target/bench/results.json`.
//!
//! Measured:
//! 1. `tools/call` round trips (1 KiB arguments, keep-alive) at concurrency 1 and 16: direct
//!    (client in an untagged cgroup) vs through the kernel redirect and the proxy (parse, policy,
//!    audit in `write` mode), and with `fsync` audit.
//! 2. `connect()` to a non-MCP address: from a tagged cgroup with the programs attached vs from a
//!    cgroup with no program.
//! 3. Daemon RSS idle and per idle agent connection (1,000 keep-alive connections).
//! 4. Audit events/s with 16 writers, `write` and `fsync`, and events per `fdatasync`.
//! 5. Micro: parse + re-serialise, policy decision (100 roles, 1,000 patterns), 500-tool filter.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

const ROUNDS: usize = 5;

struct Kill(Vec<Child>, Vec<PathBuf>, PathBuf, PathBuf);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let _ = Command::new(&self.2)
            .args(["uninstall", "--config"])
            .arg(&self.3)
            .stdout(Stdio::null())
            .status();
        for d in self.1.iter().rev() {
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(20));
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs `program args…` in the cgroup `dir` and parses the JSON line it prints last.
fn run_in(dir: &Path, program: &Path, args: &[&str]) -> Result<Value> {
    let out = crate::in_cgroup(dir, program).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).with_context(|| {
        format!(
            "{} {args:?} printed no JSON: {text} {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

struct Cfg<'a> {
    port: u16,
    root: &'a str,
    bpffs: &'a Path,
    sock: &'a Path,
    upstream: SocketAddr,
    audit: &'a Path,
    durability: &'a str,
}

fn write_config(path: &Path, c: &Cfg<'_>) -> Result<()> {
    let Cfg {
        port,
        root,
        bpffs,
        sock,
        upstream,
        audit,
        durability,
    } = c;
    std::fs::write(
        path,
        format!(
            r#"[daemon]
listen_port = {port}
cgroup_root = "{root}"
bpffs_dir = "{bpffs}"
admin_socket = "{sock}"

[[tag]]
cgroup = "{root}/tagged"

[[server]]
name = "bench"
intercept = ["{upstream}"]
upstream = "{upstream}"

[[role]]
name = "bench"
servers = ["bench"]
allow_tools = ["echo"]

[[binding]]
role = "bench"
cgroup = "{root}/tagged/**"

[audit]
path = "{audit}"
durability = "{durability}"
"#,
            bpffs = bpffs.display(),
            sock = sock.display(),
            audit = audit.display(),
        ),
    )?;
    Ok(())
}

fn start_daemon(bin: &Path, config: &Path, log: &Path) -> Result<Child> {
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if crate::daemon_answers(bin, config) {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("daemon did not start; see {}", log.display())
}

pub fn run(root: &Path, bin: &Path, peer: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks load eBPF programs and create cgroups: run them as root");
    }
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let name = format!("interceptor-bench-{}", std::process::id());
    let rel = format!("/{name}");
    let config = out_dir.join("bench.toml");
    let probe_addr: SocketAddr = "127.0.0.3:9".parse()?;
    write_config(
        &config,
        &Cfg {
            port: 1,
            root: &rel,
            bpffs: Path::new("/sys/fs/bpf/x"),
            sock: Path::new("/run/x"),
            upstream: probe_addr,
            audit: Path::new("/tmp/x"),
            durability: "write",
        },
    )?;
    let mount = cgroup_mount(bin, &config)?;
    let attach = mount.join(&name);
    let dirs = vec![
        attach.clone(),
        attach.join("tagged"),
        attach.join("direct"),
        mount.join(format!("{name}-noprog")),
    ];
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let mut guard = Kill(Vec::new(), dirs.clone(), bin.to_owned(), config.clone());
    let up_port = free_port()?;
    let upstream: SocketAddr = format!("127.0.0.3:{up_port}").parse()?;
    guard.0.push(
        Command::new(peer)
            .args(["upstream", &upstream.to_string()])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let other_port = free_port()?;
    guard.0.push(
        Command::new(peer)
            .args(["upstream", &format!("127.0.0.4:{other_port}")])
            .stdout(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let port = free_port()?;
    let bpffs = PathBuf::from("/sys/fs/bpf").join(&name);
    let sock = out_dir.join("admin.sock");
    let url = format!("http://{upstream}/mcp");
    let mut results = json!({});

    for (mode, durability) in [("write", "write"), ("fsync", "fsync")] {
        let audit = out_dir.join(format!("audit-{mode}.jsonl"));
        let _ = std::fs::remove_file(&audit);
        write_config(
            &config,
            &Cfg {
                port,
                root: &rel,
                bpffs: &bpffs,
                sock: &sock,
                upstream,
                audit: &audit,
                durability,
            },
        )?;
        let daemon = start_daemon(bin, &config, &out_dir.join(format!("daemon-{mode}.log")))?;
        let pid = daemon.id();
        guard.0.push(daemon);
        if mode == "write" {
            results["memory"]["idle_rss_kib"] = json!(rss_kib(pid));
        }
        for conc in [1u64, 16] {
            let n = if conc == 1 { 2000 } else { 8000 };
            let (mut d50, mut i50, mut d99, mut i99, mut drps, mut irps) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for _ in 0..ROUNDS {
                let d = run_in(
                    &attach.join("direct"),
                    peer,
                    &["client", &url, &n.to_string(), &conc.to_string()],
                )?;
                let i = run_in(
                    &attach.join("tagged"),
                    peer,
                    &["client", &url, &n.to_string(), &conc.to_string()],
                )?;
                if i["errors"].as_u64() != Some(0) {
                    bail!("intercepted run had errors: {i}");
                }
                d50.push(d["p50_us"].as_f64().unwrap_or(0.0));
                d99.push(d["p99_us"].as_f64().unwrap_or(0.0));
                drps.push(d["rps"].as_f64().unwrap_or(0.0));
                i50.push(i["p50_us"].as_f64().unwrap_or(0.0));
                i99.push(i["p99_us"].as_f64().unwrap_or(0.0));
                irps.push(i["rps"].as_f64().unwrap_or(0.0));
            }
            let (d50m, i50m, d99m, i99m, drm, irm) = (
                median(&mut d50),
                median(&mut i50),
                median(&mut d99),
                median(&mut i99),
                median(&mut drps),
                median(&mut irps),
            );
            results["requests"][mode][format!("c{conc}")] = json!({
                "direct_p50_us": d50m, "interceptor_p50_us": i50m, "added_p50_us": i50m - d50m,
                "direct_p99_us": d99m, "interceptor_p99_us": i99m, "added_p99_us": i99m - d99m,
                "direct_rps": drm, "interceptor_rps": irm, "throughput_ratio": if drm > 0.0 { irm / drm } else { 0.0 },
            });
        }
        if mode == "write" {
            // Memory per idle agent connection.
            let before = rss_kib(pid);
            let mut holder = crate::in_cgroup(&attach.join("tagged"), peer)
                .args(["hold", &url, "1000", "5"])
                .stdout(Stdio::piped())
                .spawn()?;
            std::thread::sleep(Duration::from_millis(3500));
            let after = rss_kib(pid);
            let _ = holder.wait();
            results["memory"]["per_idle_connection_kib"] =
                json!((after.saturating_sub(before)) as f64 / 1000.0);
            // connect() cost of the hook on a non-MCP destination.
            let other = format!("127.0.0.4:{other_port}");
            let (mut tagged, mut none) = (vec![], vec![]);
            for _ in 0..ROUNDS {
                let t = run_in(&attach.join("tagged"), peer, &["connect", &other, "5000"])?;
                let n = run_in(&dirs[3], peer, &["connect", &other, "5000"])?;
                tagged.push(t["ns_per_connect"].as_f64().unwrap_or(0.0));
                none.push(n["ns_per_connect"].as_f64().unwrap_or(0.0));
            }
            let (t, n) = (median(&mut tagged), median(&mut none));
            results["connect"] = json!({"tagged_ns": t, "no_program_ns": n, "ratio": if n > 0.0 { t / n } else { 0.0 }});
        }
        if let Some(mut d) = guard.0.pop() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = d.wait();
        }
    }
    for mode in ["write", "fsync"] {
        let out = Command::new(peer)
            .args([
                "audit",
                &out_dir.display().to_string(),
                mode,
                "16",
                if mode == "write" { "100000" } else { "4000" },
            ])
            .output()?;
        let _ = std::fs::remove_file(out_dir.join(format!("bench-{mode}.jsonl")));
        results["audit"][mode] = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    }
    let out = Command::new(peer).arg("micro").output()?;
    results["micro"] = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    drop(guard);

    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    print_table(&results);
    println!("\nwritten to {}", out_dir.join("results.json").display());
    Ok(())
}

fn print_table(r: &Value) {
    let f = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "\n{:<44} {:>12} {:>12} {:>12}",
        "measure", "baseline", "interceptor", "difference"
    );
    for mode in ["write", "fsync"] {
        for c in ["c1", "c16"] {
            let x = &r["requests"][mode][c];
            println!(
                "{:<44} {:>12} {:>12} {:>12}",
                format!("tools/call p50 µs ({mode} audit, {c})"),
                f(&x["direct_p50_us"]),
                f(&x["interceptor_p50_us"]),
                f(&x["added_p50_us"])
            );
            println!(
                "{:<44} {:>12} {:>12} {:>12}",
                format!("tools/call p99 µs ({mode} audit, {c})"),
                f(&x["direct_p99_us"]),
                f(&x["interceptor_p99_us"]),
                f(&x["added_p99_us"])
            );
            println!(
                "{:<44} {:>12} {:>12} {:>12}",
                format!("requests/s ({mode} audit, {c})"),
                f(&x["direct_rps"]),
                f(&x["interceptor_rps"]),
                format!("x{}", f(&x["throughput_ratio"]))
            );
        }
    }
    let c = &r["connect"];
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "connect()+close ns, non-MCP",
        f(&c["no_program_ns"]),
        f(&c["tagged_ns"]),
        format!("x{}", f(&c["ratio"]))
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "daemon RSS idle KiB",
        "",
        f(&r["memory"]["idle_rss_kib"])
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "KiB per idle agent connection",
        "",
        f(&r["memory"]["per_idle_connection_kib"])
    );
    for mode in ["write", "fsync"] {
        let a = &r["audit"][mode];
        println!(
            "{:<44} {:>12} {:>12} {:>12}",
            format!("audit events/s, 16 writers ({mode})"),
            "",
            f(&a["events_per_s"]),
            format!("{}/fsync", f(&a["events_per_fsync"]))
        );
    }
    let m = &r["micro"];
    for k in [
        "parse_reserialize_ns",
        "policy_decision_ns",
        "filter_500_tools_ns",
    ] {
        println!("{:<44} {:>12} {:>12}", k, "", f(&m[k]));
    }
}

/// The cgroup v2 mount, as the daemon finds it (`interceptor check --json`).
fn cgroup_mount(bin: &Path, config: &Path) -> Result<PathBuf> {
    let out = Command::new(bin)
        .args(["check", "--json", "--config"])
        .arg(config)
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    v["cgroup_mount"]
        .as_str()
        .map(PathBuf::from)
        .context("no cgroup v2 mount on this machine")
}
