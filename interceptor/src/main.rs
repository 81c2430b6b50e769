//! The `interceptor` command: the daemon (`run`) and the operator's tools.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use interceptor::{
    admin::{self, Request},
    audit, bpf,
    cgroup::Hierarchy,
    config::{Config, DEFAULT_CONFIG_PATH},
    daemon,
    policy::{Call, Reference, Subject},
    telemetry::{self, LogFormat},
};
use serde_json::Value;

/// The daemon's allocator. With glibc's, each idle agent connection kept ~4 KiB more resident:
/// its buffers sit between allocator headers that touch their pages, while jemalloc packs
/// same-size buffers page-aligned, so their untouched pages stay off RSS (benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation: a background thread hands freed memory
/// back to the kernel within a second (start-up parses the kernel's BTF, several MiB, and
/// frees it; without the thread that memory stayed resident until later allocations purged
/// it). `_RJEM_MALLOC_CONF` in the environment still overrides.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: ConfString =
    ConfString(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc reads: a thin pointer, as `const char *malloc_conf` is.
#[repr(transparent)]
struct ConfString(*const std::ffi::c_char);

// SAFETY: it points to an immutable static string.
unsafe impl Sync for ConfString {}

/// Hands what start-up freed (the kernel's BTF, parsed to load the programs: several MiB) back
/// to the kernel now instead of over jemalloc's decay time.
fn release_freed_memory() {
    /// jemalloc's `MALLCTL_ARENAS_ALL`: the control applies to every arena.
    const ALL_ARENAS: &std::ffi::CStr = c"arena.4096.purge";
    // SAFETY: a valid control name; this control reads and writes nothing (all null / 0).
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            ALL_ARENAS.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(
            rc,
            "jemalloc purge failed; freed memory returns over its decay time"
        );
    }
}

/// Transparently steer AI agents' MCP connections through an identity-aware proxy.
///
/// An eBPF program redirects connections from tagged cgroups to configured MCP server addresses
/// to a node-local proxy, which knows which process dialed and relays to the real server.
#[derive(Debug, Parser)]
#[command(name = "interceptor", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The daemon's TOML config [default: /etc/interceptor/interceptor.toml]; what the command
    /// needs is read from it (admin socket, bpffs folder, audit log, policy). With no file at
    /// the default path, the commands that only talk to the daemon or its pins (`status`,
    /// `tag`, `revoke`, `reload`, `uninstall`, …) and `audit tail` use the built-in defaults;
    /// `run`, `check`, `policy` and `ca jwks` need the file. Those that read one section still
    /// refuse a file with an unknown top-level key (a misspelt `[deamon]`, daemon keys above
    /// the `[daemon]` header).
    #[arg(long = "config", value_name = "FILE")]
    given: Option<PathBuf>,
}

impl ConfigArg {
    /// The config file: as given, or the default path.
    fn file(&self) -> PathBuf {
        self.given
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }

    /// The `[daemon]` section the commands that talk to the daemon need: from the file given,
    /// else from the default path, else (no file there) the built-in defaults, which a daemon
    /// started from another file may well use.
    fn daemon(&self) -> Result<interceptor::config::DaemonPaths, interceptor::config::Error> {
        let file = self.file();
        if self.given.is_none() && !file.exists() {
            return Config::default_daemon_paths();
        }
        Config::load_daemon_paths(&file)
    }

    /// The `[audit]` section (`audit tail`), read the same way: the built-in defaults when no
    /// file is at the default path and none was given.
    fn audit(&self) -> Result<interceptor::audit::RawAudit, interceptor::config::Error> {
        let file = self.file();
        if self.given.is_none() && !file.exists() {
            return Ok(interceptor::audit::RawAudit::default());
        }
        Config::load_audit(&file)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (root): attach the programs, tag the configured cgroups, serve the proxy.
    /// SIGTERM/SIGINT stop it (exit 0); it exits non-zero when its listeners or admin socket
    /// end under it, or when a connection worker's event loop panics (after draining as on
    /// SIGTERM; fail closed). One daemon per node (per bpffs folder: a second one on the same
    /// pins is refused, as is one where another's programs run at, above or below its
    /// cgroup_root).
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Log line format on stderr.
        #[arg(long, value_enum, default_value = "plain")]
        log_format: LogFormat,
    },
    /// Validate a config file and print what it resolves to (addresses, where programs attach).
    Check {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Tag a cgroup (path relative to the cgroup v2 mount, e.g. /agents): its processes' MCP
    /// connections, and those of its descendants, are redirected from now on.
    Tag {
        /// The cgroup, e.g. /agents.
        cgroup: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a cgroup's tag: new connections from it are no longer redirected.
    Untag {
        /// The cgroup, e.g. /agents.
        cgroup: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show the running daemon's tags, servers, attached programs and counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Re-read the config and apply its policy to the running daemon (also on SIGHUP). An invalid
    /// file is refused and the current policy stays active.
    Reload {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate and explain the policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Cut an identity off now: live connections closed (in-flight requests answered with the
    /// revocation), new MCP connections refused at connect() by the kernel. Persists across
    /// restarts until `unrevoke`.
    Revoke {
        #[command(flatten)]
        who: Who,
        /// Why (recorded in status and the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        /// Refuse every outbound connection and datagram of the cgroup, not only MCP ones (with
        /// --cgroup).
        #[arg(long)]
        all_egress: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Lift a revocation.
    Unrevoke {
        #[command(flatten)]
        who: Who,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Inspect the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The node CA: client certificates for upstream mTLS and identity assertions.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Stop the daemon (SIGTERM; it drains first: waited for up to its drain_grace and 30 s
    /// more), detach the programs and remove every pin (maps, links, tags, revocations: those
    /// in force are named on stderr). This is the only way interception stops for tagged
    /// cgroups. A daemon whose admin socket is gone, whose pins are held by another process, or
    /// that is pid 1 here (run inside its container) must be stopped by hand first.
    Uninstall {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Exactly one identity selector.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Who {
    /// A cgroup (relative to the cgroup v2 mount) and everything below it.
    #[arg(long)]
    cgroup: Option<String>,
    /// A process id.
    #[arg(long)]
    pid: Option<u32>,
    /// A user id.
    #[arg(long)]
    uid: Option<u32>,
    /// A workload id.
    #[arg(long)]
    workload_id: Option<String>,
}

impl Who {
    fn selector(self) -> interceptor::revoke::Selector {
        use interceptor::revoke::Selector;
        match (self.cgroup, self.pid, self.uid, self.workload_id) {
            (Some(c), ..) => Selector::Cgroup(c),
            (_, Some(p), ..) => Selector::Pid(p),
            (_, _, Some(u), _) => Selector::Uid(u),
            (_, _, _, Some(w)) => Selector::WorkloadId(w),
            // clap's group guarantees one of them.
            (None, None, None, None) => Selector::Pid(0),
        }
    }
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a node CA (ECDSA P-256): DIR/ca.pem and DIR/ca-key.pem (mode 0600). Point
    /// `[ca] cert` and `key` at them.
    Init {
        /// Where to write the files (created if missing; existing files are never replaced).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print the JSON Web Key Set that verifies the identity assertions and the audit
    /// checkpoints (`interceptor audit verify --jwks`).
    Jwks {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit files (oldest first; rotated files before the live one).
    /// Exits non-zero on any edit, deletion, reordering or truncation in the middle; a torn
    /// last line (a crash mid-write) is reported but is not a failure, nor is a start that an
    /// `audit.pruned` event names (files deleted by `[audit] max_files`). With `--jwks`, also
    /// the signature of every `audit.checkpoint`: the chain up to the last one was written by
    /// the holder of the node CA key.
    Verify {
        /// Audit files (the live one and rotated ones, any order: they are put in chain order).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Fail when the chain given starts after seq 1 and no `audit.pruned` event in it says
        /// why (without it, that is a note when other files beside the log may hold the
        /// records before: deleting the oldest files is then noticed only by this flag); with
        /// `--jwks`, also on a chain with no checkpoint, on records after the last one (a live
        /// log has up to `[audit] checkpoint_interval` of them: verify a copy made after a
        /// stop), on records a start signed as found (adopted) and on checkpoints naming more
        /// than one node. Also fails when the files hold no audit event (an empty file, or
        /// not the audit log).
        #[arg(long)]
        strict: bool,
        /// Verify the checkpoints' signatures with this JSON Web Key Set (what `interceptor ca
        /// jwks` prints; keep the keys of earlier node CAs in it to verify older files). Fails
        /// on a checkpoint that does not verify or is not at its place, on a file that does
        /// not end in one once signing has begun (unless a later one adopts its end), and on a
        /// chain with none that cannot be a live file's first moments (several files, a stop,
        /// a pruning, over an hour of records since the last start); prints the node the
        /// checkpoints name. See `--strict` for what else fails with it.
        #[arg(long, value_name = "FILE")]
        jwks: Option<PathBuf>,
    },
    /// Print audit events readably (the file from `[audit] path` of the config; without a
    /// config file at the default path, the default log).
    Tail {
        #[command(flatten)]
        config: ConfigArg,
        /// Keep printing new events as they are written, across rotations of the file (records
        /// no file holds any more, pruned by `[audit] max_files`, are named on stderr). With or
        /// without it, a line that is not a JSON record and a `seq` gap within a file are named
        /// on stderr.
        #[arg(long)]
        follow: bool,
        /// Only agents' events whose identity (pid, cgroup, exe, comm, uid, workload id)
        /// contains this.
        #[arg(long)]
        identity: Option<String>,
        /// Only events about this tool.
        #[arg(long)]
        tool: Option<String>,
        /// Only events with this decision.
        #[arg(long, value_parser = ["allow", "deny"])]
        decision: Option<String>,
        /// Print the raw JSON lines.
        #[arg(long)]
        json: bool,
    },
}

// Parsed once per invocation: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate the config's roles and bindings and list them.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the decision and the rule for one request by one identity.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        /// Server name.
        #[arg(long)]
        server: String,
        /// Tool name (a tools/call).
        #[arg(long, conflicts_with_all = ["method", "prompt", "resource"])]
        tool: Option<String>,
        /// Another MCP method, e.g. resources/read (default: prompts/get with --prompt,
        /// resources/read with --resource).
        #[arg(long)]
        method: Option<String>,
        /// The prompt the method names (prompts/get), or completes for (completion/complete).
        #[arg(long, conflicts_with = "resource")]
        prompt: Option<String>,
        /// The resource URI the method names (resources/read, resources/subscribe), or the
        /// resource template it completes for (completion/complete).
        #[arg(long, value_name = "URI")]
        resource: Option<String>,
        /// The tool's arguments, a JSON object (for argument constraints), parsed as the proxy
        /// parses a request: one it would refuse before any policy (a duplicated key, too
        /// deep) prints `decision: deny` and `rule: refused before policy …`.
        #[arg(long, value_name = "JSON")]
        arguments: Option<String>,
        /// The caller's cgroup path (relative to the cgroup v2 mount).
        #[arg(long)]
        cgroup: Option<String>,
        /// The caller's uid (without it, bindings that select on uid do not match).
        #[arg(long)]
        uid: Option<u32>,
        /// The caller's gid (without it, bindings that select on gid do not match).
        #[arg(long)]
        gid: Option<u32>,
        /// The caller's executable path.
        #[arg(long)]
        exe: Option<String>,
        /// The caller's comm (left out: unknown, so bindings on `comm` do not match).
        #[arg(long)]
        comm: Option<String>,
        /// The caller's workload id.
        #[arg(long)]
        workload_id: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A command whose reader goes away (`audit tail | head -1`) ends quietly, as other
        // command-line tools do, instead of panicking on the write (Rust ignores SIGPIPE).
        // The daemon keeps ignoring it: a peer's closed socket is an error to handle there.
        // SAFETY: restores the default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("interceptor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, log_format } => {
            telemetry::init(log_format);
            // Absolute: `reload` re-reads it, and names it to a CLI in another folder.
            let file = config.file();
            let config = Config::load(&std::path::absolute(&file).unwrap_or(file))?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let ran = runtime.block_on(daemon::run(config, release_freed_memory));
            // An admin request or reload still running past the stop's wait for them (a name
            // lookup that does not end) does not hold the exit up.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            ran?;
            Ok(())
        }
        Command::Check { json, config } => {
            let config = Config::load(&config.file())?;
            // The node CA is read at start: a missing file or a key others can read would stop
            // the daemon, so it is checked here too.
            let mut ca_unread = None;
            if let Some(raw) = &config.ca {
                // Run as a user who may not read the key (it is root's, mode 0600): said, not
                // taken for a broken config.
                match std::fs::File::open(&raw.key) {
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                        // What can be told without reading it: its mode.
                        use std::os::unix::fs::PermissionsExt as _;
                        let mode = std::fs::metadata(&raw.key).map(|m| m.permissions().mode());
                        if let Ok(mode) = mode.as_ref().map(|m| m & 0o777)
                            && mode & 0o077 != 0
                        {
                            bail!(
                                "{}: [ca] key {} is readable by group or others (mode {mode:o}); \
                                 the node CA key must be private: chmod 600 {}",
                                config.path.display(),
                                raw.key.display(),
                                raw.key.display()
                            );
                        }
                        ca_unread = Some(raw.key.clone());
                    }
                    _ => {
                        interceptor::ca::NodeCa::load(raw).with_context(|| {
                            format!(
                                "{}: [ca] cannot be loaded (cert {}, key {}); fix the paths, \
                                 or make a node CA with `interceptor ca init --dir DIR`",
                                config.path.display(),
                                raw.cert.display(),
                                raw.key.display()
                            )
                        })?;
                    }
                }
            }
            // Where the programs would attach; a host without cgroup v2 is reported, not fatal.
            let mount = Hierarchy::discover().map(|h| h.mount);
            // What is valid but likely a mistake (printed, and in the JSON).
            let mut warnings = Vec::new();
            if let Some(key) = &ca_unread {
                warnings.push(format!(
                    "the [ca] key {} is not readable by this user: not checked (run check as \
                     the daemon's user, root)",
                    key.display()
                ));
            }
            // The metrics token is read at start as well.
            if let Some(path) = &config.daemon.metrics_token_file {
                match interceptor::metrics::load_token(path) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                        warnings.push(format!(
                            "daemon.metrics_token_file {} is not readable by this user: not \
                             checked (run check as the daemon's user, root)",
                            path.display()
                        ));
                    }
                    Err(e) => bail!("{}: {e}", config.path.display()),
                }
            }
            warnings.extend(config.warnings());
            match &mount {
                Ok(m) => {
                    let root = m.join(config.daemon.cgroup_root.trim_start_matches('/'));
                    if !root.is_dir() {
                        warnings.push(format!(
                            "{} does not exist (daemon.cgroup_root): the daemon cannot attach \
                             there until it does",
                            root.display()
                        ));
                    }
                }
                Err(e) => warnings.push(e.to_string()),
            }
            if json {
                let servers: Vec<Value> = config
                    .servers
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "name": s.name,
                            "intercept": s.intercept.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            "upstream": s.upstream,
                            "upstream_addrs": s.upstream_addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            "upstream_intercepted": s.upstream_intercepted(),
                        })
                    })
                    .collect();
                let out = serde_json::json!({
                    "config": config.path,
                    "cgroup_mount": mount.as_ref().ok(),
                    "attach_cgroup": config.daemon.cgroup_root,
                    "listen_port": config.daemon.listen_port,
                    "bpffs_dir": config.daemon.bpffs_dir,
                    "admin_socket": config.daemon.admin_socket,
                    "audit_path": config.audit.path,
                    "tags": config.tags,
                    "servers": servers,
                    "warnings": warnings,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            println!("{} is valid", config.path.display());
            for warning in &warnings {
                println!("  warning: {warning}");
            }
            if let Ok(m) = &mount {
                println!(
                    "  programs attach at {} ({} under the cgroup v2 mount {})",
                    m.join(config.daemon.cgroup_root.trim_start_matches('/'))
                        .display(),
                    config.daemon.cgroup_root,
                    m.display()
                );
            }
            println!(
                "  proxy on 127.0.0.1:{0} and [::1]:{0} (or, where another process holds it, a \
                 port the kernel picks); pins in {1}; admin socket {2}",
                config.daemon.listen_port,
                config.daemon.bpffs_dir.display(),
                config.daemon.admin_socket.display()
            );
            for s in &config.servers {
                let intercept: Vec<String> = s.intercept.iter().map(ToString::to_string).collect();
                println!(
                    "  server {}: intercept {} -> upstream {}{}",
                    s.name,
                    intercept.join(", "),
                    s.upstream,
                    if s.upstream_intercepted() {
                        " (its addresses intercepted too: intercept_upstream)"
                    } else {
                        ""
                    }
                );
            }
            for t in &config.tags {
                println!("  tag {t}");
            }
            Ok(())
        }
        Command::Tag { cgroup, config } => {
            let daemon = config.daemon()?;
            let r = admin::request(&daemon.admin_socket, &Request::Tag { cgroup })?;
            println!(
                "tagged {} (cgroup id {})",
                r["cgroup"].as_str().unwrap_or("?"),
                r["id"]
            );
            if let Some(w) = r["warning"].as_str() {
                eprintln!("warning: {w}");
            }
            Ok(())
        }
        Command::Untag { cgroup, config } => {
            let daemon = config.daemon()?;
            let r = admin::request(&daemon.admin_socket, &Request::Untag { cgroup })?;
            println!(
                "untagged {} (cgroup id {})",
                r["cgroup"].as_str().unwrap_or("?"),
                r["id"]
            );
            Ok(())
        }
        Command::Status { json, config } => {
            let daemon = config.daemon()?;
            let status = admin::request(&daemon.admin_socket, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Reload { config } => {
            let daemon = config.daemon()?;
            let r = admin::request(&daemon.admin_socket, &Request::Reload)?;
            // The daemon re-reads the file it was started with, whatever file found its socket.
            let reread = r["config"].as_str().map(PathBuf::from);
            println!(
                "policy reloaded from {}: {} role(s), {} binding(s){}; {} server stream(s) notified",
                reread
                    .as_ref()
                    .map_or_else(|| "the daemon's config".into(), |p| p.display().to_string()),
                r["roles"],
                r["bindings"],
                if r["policy_changed"] == Value::Bool(true) {
                    ", changed"
                } else {
                    ", unchanged"
                },
                r["notified_streams"]
            );
            if let Some(list) = r["not_applied"].as_array().filter(|l| !l.is_empty()) {
                let names: Vec<String> = list
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                println!(
                    "changed but applied only at the next start: {}",
                    names.join(", ")
                );
            }
            for warning in r["warnings"].as_array().into_iter().flatten() {
                println!("  warning: {}", warning.as_str().unwrap_or_default());
            }
            let same = |a: &std::path::Path, b: &std::path::Path| {
                a.canonicalize()
                    .ok()
                    .zip(b.canonicalize().ok())
                    .is_some_and(|(a, b)| a == b)
            };
            if let Some(reread) = &reread
                && config.file().exists()
                && !same(reread, &config.file())
            {
                println!(
                    "  warning: the daemon re-read {}, the file it was started with, not {}; \
                     edit that file (or restart the daemon with --config {})",
                    reread.display(),
                    config.file().display(),
                    config.file().display()
                );
            }
            Ok(())
        }
        Command::Policy(PolicyCommand::Check { config }) => {
            let config = Config::load(&config.file())?;
            let roles = config.policy.role_names();
            println!(
                "{}: policy is valid: {} role(s) ({}), {} binding(s)",
                config.path.display(),
                roles.len(),
                roles.join(", "),
                config.policy.binding_count()
            );
            for warning in config.warnings() {
                println!("  warning: {warning}");
            }
            Ok(())
        }
        Command::Policy(PolicyCommand::Explain {
            config,
            server,
            tool,
            method,
            prompt,
            resource,
            arguments,
            cgroup,
            uid,
            gid,
            exe,
            comm,
            workload_id,
        }) => {
            let config = Config::load(&config.file())?;
            if config.server_id(&server).is_none() {
                bail!(
                    "unknown server {server:?}; the config defines: {}",
                    config
                        .servers
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let arguments = arguments
                .map(|a| {
                    let value: Value = serde_json::from_str(&a)
                        .with_context(|| format!("--arguments is not JSON: {a}"))?;
                    if !value.is_object() {
                        bail!("--arguments must be a JSON object, as a tools/call's arguments are: {a}");
                    }
                    Ok((a, value))
                })
                .transpose()?
                .map(|(text, value)| {
                    // Parsed as the proxy parses a request (duplicate keys, depth, size): what
                    // it refuses before any policy is said so, not judged on one reading.
                    let body = format!(
                        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{text}}}}}"#
                    );
                    match interceptor::mcp::jsonrpc::parse(body.as_bytes(), &config.proxy.limits()) {
                        Ok(_) => Ok(value),
                        // (Its position would be in the request the proxy would see.)
                        Err(e) => Err(e.message.split(" at line ").next().unwrap_or_default().to_owned()),
                    }
                });
            let arguments = match arguments {
                Some(Err(why)) => {
                    println!("decision: deny");
                    println!("rule: refused before policy (the proxy's request parser): {why}");
                    return Ok(());
                }
                Some(Ok(v)) => Some(v),
                None => None,
            };
            let method = match (&tool, &method) {
                (Some(_), _) => "tools/call".to_owned(),
                (None, Some(m)) => m.clone(),
                (None, None) if prompt.is_some() => "prompts/get".to_owned(),
                (None, None) if resource.is_some() => "resources/read".to_owned(),
                (None, None) => {
                    bail!("give --tool NAME, --prompt NAME, --resource URI or --method METHOD")
                }
            };
            // What a completion completes for is the prompt or resource given.
            let reference =
                (method == "completion/complete").then_some(match (&prompt, &resource) {
                    (Some(_), _) => Reference::Prompt,
                    (None, Some(_)) => Reference::Resource,
                    (None, None) => Reference::Other,
                });
            let subject = Subject {
                cgroup: cgroup.as_deref(),
                uid,
                gid,
                exe: exe.as_deref(),
                comm: comm.as_deref(),
                workload_id: workload_id.as_deref(),
            };
            let call = Call {
                method: &method,
                name: tool
                    .as_deref()
                    .or(prompt.as_deref())
                    .or(resource.as_deref()),
                arguments: arguments.as_ref(),
                reference,
            };
            let bound = config.policy.bound_roles(&subject);
            if bound.is_empty() {
                println!("bound roles: none");
            } else {
                let names: Vec<String> = bound
                    .iter()
                    .map(|(r, i)| format!("{r} (binding[{i}])"))
                    .collect();
                println!("bound roles: {}", names.join(", "));
            }
            let d = config.policy.check(&subject, &server, &call);
            println!("decision: {}", if d.allow { "allow" } else { "deny" });
            println!("rule: {}", d.rule);
            Ok(())
        }
        Command::Revoke {
            who,
            reason,
            all_egress,
            config,
        } => {
            if all_egress && who.cgroup.is_none() {
                // clap's `requires` does not reach into the flattened selector group.
                use clap::CommandFactory as _;
                let cli = Cli::command();
                // The usage shown is revoke's.
                let mut revoke = cli
                    .find_subcommand("revoke")
                    .map_or_else(|| cli.clone(), |c| c.clone().bin_name("interceptor revoke"));
                revoke
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "--all-egress applies to a cgroup: give --cgroup P",
                    )
                    .exit();
            }
            let daemon = config.daemon()?;
            let r = admin::request(
                &daemon.admin_socket,
                &Request::Revoke {
                    selector: who.selector(),
                    reason,
                    all_egress,
                },
            )?;
            println!(
                "revoked {} ({}); {} live connection(s) closed; new connects refused by the {}",
                r["revocation"]["selector"],
                r["revocation"]["reason"],
                r["closed_connections"],
                r["revocation"]["enforced_by"].as_str().unwrap_or("proxy"),
            );
            if let Some(w) = r["warning"].as_str() {
                eprintln!("warning: {w}");
            }
            Ok(())
        }
        Command::Unrevoke { who, config } => {
            let daemon = config.daemon()?;
            let r = admin::request(
                &daemon.admin_socket,
                &Request::Unrevoke {
                    selector: who.selector(),
                },
            )?;
            println!("unrevoked {}", r["selector"]);
            Ok(())
        }
        Command::Ca(CaCommand::Init { dir }) => {
            let (cert, key) = interceptor::ca::init(&dir, &interceptor::workload::host_name())?;
            // Absolute in the snippet: the daemon's working directory is not the shell's.
            let absolute = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
            let (cert, key) = (absolute(cert), absolute(key));
            println!(
                "node CA created:\n  cert {}\n  key  {} (mode 0600)",
                cert.display(),
                key.display()
            );
            println!(
                "add to the config:\n[ca]\ncert = \"{}\"\nkey = \"{}\"\nleaf_ttl = \"1h\"",
                cert.display(),
                key.display()
            );
            Ok(())
        }
        Command::Ca(CaCommand::Jwks { config }) => {
            let file = config.file();
            let Some(raw) = Config::load_ca(&file)? else {
                bail!(
                    "{} has no [ca] section; create the node CA with `interceptor ca init --dir \
                     DIR` and add the [ca] section it prints",
                    file.display()
                );
            };
            let ca = interceptor::ca::NodeCa::load(&raw).with_context(|| {
                format!(
                    "{}: [ca] cannot be loaded (cert {}, key {}); fix the paths, or make a node \
                     CA with `interceptor ca init --dir DIR`",
                    file.display(),
                    raw.cert.display(),
                    raw.key.display()
                )
            })?;
            println!("{}", serde_json::to_string_pretty(&ca.jwks())?);
            Ok(())
        }
        Command::Audit(AuditCommand::Verify {
            paths,
            strict,
            jwks,
        }) => {
            let keys = jwks
                .as_ref()
                .map(|file| {
                    let text = std::fs::read_to_string(file)
                        .with_context(|| format!("cannot read the key set {}", file.display()))?;
                    interceptor::ca::Jwks::parse(&text).map_err(|why| {
                        anyhow::anyhow!(
                            "{} is not a usable JSON Web Key Set ({why}); pass what \
                             `interceptor ca jwks` prints",
                            file.display()
                        )
                    })
                })
                .transpose()?;
            let v = audit::verify(&paths, keys.as_ref())?;
            if let Some((path, line, why)) = v.broken {
                let read = if v.broken_as_a_whole {
                    format!("{} valid event(s) read", v.events)
                } else {
                    format!("{} valid event(s) before it", v.events)
                };
                bail!(
                    "audit chain broken at {}:{line}: {why} ({read})",
                    path.display()
                );
            }
            if strict && v.events == 0 {
                bail!(
                    "the files given hold no audit event (--strict): an empty file, or not the \
                     audit log ([audit] path, and its rotated files beside it)"
                );
            }
            if strict
                && v.pruned_through.is_none()
                && let Some(seq) = v.starts_at
            {
                bail!(
                    "audit chain starts at seq {seq} and nothing in it says why the records \
                     before are missing (--strict): pass the rotated files that hold them, \
                     or verify without --strict if they are kept elsewhere"
                );
            }
            // No checkpoint at all is a note only for what can be a live file in its first
            // moments (one file, no stop, no pruning, records within the longest
            // checkpoint_interval); a copy stripped of them fails.
            let longer = v
                .span
                .is_some_and(|d| d > std::time::Duration::from_secs(3600));
            if let Some(file) = &jwks
                && v.signed_through.is_none()
                && (strict || paths.len() > 1 || v.lifecycle || longer)
            {
                bail!(
                    "no audit.checkpoint in the chain given, so nothing in it is signed (and \
                     it is more than a live file's first moments: several files, a stop, a \
                     pruning, or over an hour of records since the last start, or --strict): \
                     the daemon had no [ca], or the checkpoints were removed ({} verifies \
                     nothing)",
                    file.display()
                );
            }
            if jwks.is_some()
                && strict
                && let Some(through) = v.signed_through
            {
                // (`nodes` lists each change of node: two entries are two nodes.)
                if v.nodes.len() > 1 {
                    bail!(
                        "the checkpoints name more than one node ({}) (--strict): a log is one \
                         node's; a node renamed, or a key set holding several nodes' keys and \
                         one node's key signing another's log",
                        v.nodes.join(", ")
                    );
                }
                if let Some((after, through)) = v.adopted.first() {
                    bail!(
                        "the records from seq {} through {through} were signed as found when a \
                         daemon started, not by the run that wrote them (--strict): records \
                         from before signing began (a log from before [ca] was set, or from an \
                         earlier version), a killed daemon's last records, or a log altered \
                         while no daemon ran",
                        after + 1
                    );
                }
                let unsigned = v.unsigned();
                if unsigned > 0 {
                    bail!(
                        "{unsigned} record(s) after seq {through} follow the last checkpoint, so \
                         nothing signs them (--strict): they were written less than [audit] \
                         checkpoint_interval before this copy, the daemon was killed, or they \
                         were altered"
                    );
                }
            }
            println!(
                "audit chain intact: {} event(s) in {} file(s){}",
                v.events,
                paths.len(),
                if v.events == 0 {
                    " (they hold no events: is this the audit log?)"
                } else {
                    ""
                }
            );
            match (&jwks, v.signed_through) {
                (Some(file), Some(through)) => {
                    let by = match v.nodes.as_slice() {
                        [] => String::new(),
                        nodes => format!(
                            ", by node {}",
                            nodes
                                .iter()
                                .map(|n| format!("{n:?}"))
                                .collect::<Vec<_>>()
                                .join(" then ")
                        ),
                    };
                    println!(
                        "signed: {} checkpoint(s) verify with {}; the records through seq \
                         {through} are signed{by}",
                        v.checkpoints,
                        file.display(),
                    );
                    if v.nodes.len() > 1 {
                        println!(
                            "note: the checkpoints name more than one node: a node renamed, or \
                             one node's key signing another's log (use a key set per node); \
                             --strict fails this"
                        );
                    }
                    for (after, through) in &v.adopted {
                        println!(
                            "note: the records from seq {} through {through} were signed as found \
                             when a daemon started, not by the run that wrote them (records from \
                             before signing began, a killed daemon's last records, or a log \
                             altered while no daemon ran; --strict fails this)",
                            after + 1
                        );
                    }
                    let unsigned = v.unsigned();
                    if unsigned > 0 {
                        println!(
                            "note: {unsigned} record(s) after seq {through} follow the last \
                             checkpoint and are not signed: written less than [audit] \
                             checkpoint_interval before this copy, or the daemon was killed \
                             (its next start signs them), or altered"
                        );
                    }
                }
                (Some(file), None) => println!(
                    "note: no audit.checkpoint in the chain given, so nothing in it is signed \
                     ({} verifies nothing): the daemon had no [ca], the files end within [audit] \
                     checkpoint_interval of its start or of a rotation, or the checkpoints were \
                     removed; --strict fails this",
                    file.display()
                ),
                _ if v.checkpoints > 0 => println!(
                    "note: {} signed checkpoint(s) not checked; pass --jwks with what \
                     `interceptor ca jwks` prints to verify who wrote the chain",
                    v.checkpoints
                ),
                _ => {}
            }
            if v.order != paths {
                let order: Vec<String> = v.order.iter().map(|p| p.display().to_string()).collect();
                println!("note: verified in chain order: {}", order.join(", "));
            }
            if let Some(through) = v.pruned_through {
                println!(
                    "note: the records up to seq {through} were deleted by [audit] max_files, as \
                     an audit.pruned event in the chain records; the chain starts at seq {}",
                    through + 1
                );
            } else if let Some(seq) = v.starts_at {
                println!(
                    "note: the chain given starts at seq {seq}; the records before it are in \
                     rotated files not given (pass them too to verify from the start)"
                );
            }
            for (path, line) in &v.repairs {
                println!(
                    "note: {}:{line} records a repair at a daemon start: a torn last line cut \
                     off, or a missing line break added (see the event)",
                    path.display()
                );
            }
            if let Some((path, line)) = v.unterminated {
                println!(
                    "note: {}:{line}, the last record, lacks its line break (the writer stopped \
                     just before it); the daemon adds it at its next start",
                    path.display()
                );
            }
            if let Some((path, line)) = v.torn_tail {
                println!(
                    "note: {}:{line} is a torn last line (the writer stopped mid-line); the daemon \
                     cuts it off and records the repair at its next start",
                    path.display()
                );
            }
            Ok(())
        }
        Command::Audit(AuditCommand::Tail {
            config,
            follow,
            identity,
            tool,
            decision,
            json,
        }) => {
            let audit = config.audit()?;
            let filter = TailFilter {
                identity,
                tool,
                decision,
            };
            tail(&audit.path, follow, &filter, json)
        }
        Command::Uninstall { config } => {
            let daemon = config.daemon()?;
            stop_for_uninstall(&daemon)?;
            let removed = bpf::uninstall(&daemon.bpffs_dir)?;
            if removed.links.is_empty() && removed.maps.is_empty() {
                println!("nothing installed under {}", daemon.bpffs_dir.display());
            } else {
                println!(
                    "detached {} program(s) ({}) and removed {} map pin(s) under {}",
                    removed.links.len(),
                    removed.links.join(", "),
                    removed.maps.len(),
                    daemon.bpffs_dir.display()
                );
            }
            if !removed.revocations.is_empty() {
                eprintln!(
                    "warning: {} revocation(s) no longer hold (they lived in the removed maps; \
                     revoke again after the next start): {}",
                    removed.revocations.len(),
                    removed.revocations.join("; ")
                );
            }
            Ok(())
        }
    }
}

/// Stops the daemon that answers on the admin socket and holds the pins, for `uninstall`:
/// SIGTERM (it drains, up to its `drain_grace`), then waits until it has let go of the pins and
/// exited. Only a process that is both is signalled, through a pidfd taken while it holds the
/// lock: a pid from the socket alone may be another pid namespace's, and one read from
/// `/proc/locks` another process's once the holder exits.
fn stop_for_uninstall(daemon: &interceptor::config::DaemonPaths) -> anyhow::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    let socket = &daemon.admin_socket;
    let Ok(status) = admin::request(socket, &Request::Status) else {
        // No daemon answers: the pins are free, or uninstall says who holds them.
        return Ok(());
    };
    let dir = &daemon.bpffs_dir;
    let holder = || {
        bpf::pins_holder(dir).with_context(|| {
            format!(
                "cannot tell which process holds the pins under {}",
                dir.display()
            )
        })
    };
    let answering = status["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
    let pid = match (answering, holder()?) {
        (Some(a), Some(h)) if a == h => h,
        (_, None) => bail!(
            "a daemon answers on {} but no process this command can see holds the pins under \
             {}: it runs from another bpffs_dir (give uninstall its config file, --config) or \
             in another pid namespace (stop it there); then run uninstall again",
            socket.display(),
            dir.display()
        ),
        (a, Some(h)) => bail!(
            "the pins under {} are held by pid {h}, the daemon answering on {} says it is pid \
             {}: stop the daemon (SIGTERM), then run uninstall again",
            dir.display(),
            socket.display(),
            a.map_or_else(|| "unknown".to_owned(), |a| a.to_string())
        ),
    };
    if pid == 1 {
        bail!(
            "the daemon is pid 1 here, its container's main process: stopping it would end \
             this command with it; stop the daemon's container (or run uninstall from the host \
             with its config), then run uninstall again"
        );
    }
    let pidfd = libc::pid_t::try_from(pid)
        .map_err(std::io::Error::other)
        .and_then(admin::pidfd_open)
        .with_context(|| format!("cannot hold the daemon's process (pid {pid})"))?;
    if holder()? != Some(pid) {
        bail!("the daemon (pid {pid}) let go of the pins meanwhile; run uninstall again");
    }
    admin::pidfd_signal(pidfd.as_fd(), libc::SIGTERM)
        .with_context(|| format!("cannot stop the daemon (pid {pid}) with SIGTERM"))?;
    let grace = Duration::from_millis(status["drain_grace_ms"].as_u64().unwrap_or(10_000));
    let patience = grace + Duration::from_secs(30);
    eprintln!(
        "stopping the daemon (pid {pid}, SIGTERM): it drains its connections (up to {}), then \
         exits; a supervisor that restarts it must be stopped instead",
        humantime::format_duration(grace)
    );
    let deadline = std::time::Instant::now() + patience;
    let exited = || {
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, no wait. A pidfd reads as ready once its process has exited.
        unsafe { libc::poll(&mut poll, 1, 0) == 1 }
    };
    loop {
        match holder()? {
            Some(other) if other != pid => bail!(
                "the daemon was started again (now pid {other}; by its supervisor?) and holds \
                 the pins under {}: stop it there, then run uninstall again",
                dir.display()
            ),
            None if exited() => return Ok(()),
            _ => {}
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the daemon (pid {pid}) has not exited {}s after SIGTERM; stop it, then run \
                 uninstall again",
                patience.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct TailFilter {
    identity: Option<String>,
    tool: Option<String>,
    decision: Option<String>,
}

impl TailFilter {
    fn keeps(&self, v: &Value) -> bool {
        let text = |x: &Value| {
            x.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| x.to_string())
        };
        if let Some(want) = &self.identity {
            let id = &v["identity"];
            // Agents' identities only, not the admin client's or the daemon's (older logs
            // have identities without a kind, and only on agents' events).
            let agent = matches!(id["kind"].as_str(), None | Some("agent"));
            let hit = agent
                && ["pid", "uid", "cgroup", "exe", "comm", "workload_id"]
                    .iter()
                    .any(|k| !id[*k].is_null() && text(&id[*k]).contains(want.as_str()));
            if !hit {
                return false;
            }
        }
        if let Some(want) = &self.tool
            && v["tool"].as_str() != Some(want.as_str())
        {
            return false;
        }
        if let Some(want) = &self.decision
            && v["decision"].as_str() != Some(want.as_str())
        {
            return false;
        }
        true
    }
}

/// Whether `c` could forge or hide output on a terminal: control characters (line breaks,
/// escape sequences) and the bidirectional overrides that reorder what is shown.
fn deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{061c}'
                | '\u{feff}'
        )
}

/// A record's JSON line with the characters a terminal may act on or show deceptively
/// ([`deceptive`]: C1 controls such as U+009B, which some terminals take for CSI, DEL,
/// bidirectional overrides) written as `\uXXXX` escapes: the same JSON to any reader, but
/// not the same bytes (so only for a terminal).
fn terminal_safe_json(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.chars().any(deceptive) {
        return line.into();
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        if deceptive(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// One event as a line a person reads. Text from agents and servers (a method, a rule quoting
/// a name, a process name) is quoted with escapes when it holds [`deceptive`] characters, `=`
/// or anything but ASCII (a look-alike `꞊`, a zero-width or line-separator character): a
/// method of `"x\n2026-… decision=allow"` must not print as a line of its own, nor one of
/// `"x decision꞊allow"` as a field of its own.
fn render(v: &Value) -> String {
    let s = |x: &Value| match x.as_str() {
        Some(t) if !t.is_ascii() || t.chars().any(|c| deceptive(c) || c == '=') => {
            format!("{t:?}")
        }
        Some(t) => t.to_owned(),
        None => x.to_string(),
    };
    let who = &v["identity"];
    let who = match who["kind"].as_str() {
        // Who asked (an admin client or the daemon), apart from the event's own members.
        Some(kind @ ("admin" | "daemon")) => {
            format!(
                " by={kind}:{}[{}] uid={}",
                s(&who["comm"]),
                who["pid"],
                who["uid"]
            )
        }
        _ if who.is_object() => format!(
            " pid={} uid={} comm={} cgroup={}",
            who["pid"],
            who["uid"],
            s(&who["comm"]),
            s(&who["cgroup"])
        ),
        _ => String::new(),
    };
    let mut line = format!("{} #{} {}{who}", s(&v["ts"]), v["seq"], s(&v["event"]));
    for key in [
        "server",
        "method",
        "tool",
        "name",
        "path",
        "decision",
        "rule",
        "outcome",
        "error_code",
        "latency_us",
        "cgroup",
        "reason",
    ] {
        // `name` is the tool's for a tools/call: shown once.
        let shown_as_tool = key == "name" && v["name"] == v["tool"];
        if !v[key].is_null() && !shown_as_tool {
            line.push_str(&format!(" {key}={}", s(&v[key])));
        }
    }
    // JSON text: serde_json escapes control characters below 0x20 only; `=` (only ever inside
    // its strings) is escaped too, so no `key=value` of an agent's reads as a field.
    for key in ["arguments", "other_params", "body"] {
        if !v[key].is_null() {
            let text = v[key].to_string();
            let text: String = if text.chars().any(|c| deceptive(c) || c == '=') {
                text.chars()
                    .map(|c| match c {
                        c if deceptive(c) || c == '=' => format!("\\u{:04x}", u32::from(c)),
                        c => c.to_string(),
                    })
                    .collect()
            } else {
                text
            };
            line.push_str(&format!(" {key}={text}"));
        }
    }
    line
}

/// How long `audit tail --follow` reads on in a file after another one appeared at its path:
/// the daemon goes on writing to a log renamed away until it next checks its path (at most
/// every 100 ms).
const ROTATION_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

fn tail(
    path: &std::path::Path,
    follow: bool,
    filter: &TailFilter,
    json: bool,
) -> anyhow::Result<()> {
    use std::{
        io::{BufRead, Seek, SeekFrom},
        os::unix::fs::MetadataExt,
    };
    let open = || {
        if path.is_dir() {
            anyhow::bail!(
                "the audit log {} ([audit] path) is a directory; [audit] path names the log file",
                path.display()
            );
        }
        std::fs::File::open(path).with_context(|| {
            format!(
                "cannot open the audit log {} ([audit] path)",
                path.display()
            )
        })
    };
    let mut reader = std::io::BufReader::new(open()?);
    // Bytes: a line torn inside a multi-byte character, or garbled, is not fatal: it is named
    // on stderr (the records around it are shown).
    let mut buf: Vec<u8> = Vec::new();
    let mut last_seq: Option<u64> = None;
    // When another file was first seen at the path (rotated, or re-created).
    let mut replaced_at: Option<std::time::Instant> = None;
    // Reading the first event of a file followed after another: a `seq` gap there means
    // files rotated away meanwhile.
    let mut switched = false;
    // The raw lines, byte for byte (a copy verifies: each record's hash is of its bytes),
    // but on a terminal, which some of their characters could drive.
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let emit = |v: &Value, line: &str| {
        if filter.keeps(v) {
            if json && on_terminal {
                println!("{}", terminal_safe_json(line.trim_end()));
            } else if json {
                println!("{line}");
            } else {
                println!("{}", render(v));
            }
        }
    };
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            if !follow {
                return Ok(());
            }
            // Back to the start of the unfinished line, dropping what was buffered, so that
            // it is read from the file again.
            reader.seek(SeekFrom::Current(-(buf.len() as i64)))?;
            let at = reader.stream_position()?;
            let file = reader.get_ref().metadata()?;
            if file.len() < at {
                // Cut below what was read (a torn line cut at the daemon's start, a failed
                // write rolled back): go on from its new end.
                eprintln!(
                    "audit tail: {} was truncated to {} bytes; following from there",
                    path.display(),
                    file.len()
                );
                reader.seek(SeekFrom::Start(file.len()))?;
            }
            let replaced = std::fs::metadata(path)
                .is_ok_and(|now| (now.dev(), now.ino()) != (file.dev(), file.ino()));
            match replaced_at {
                None if replaced => replaced_at = Some(std::time::Instant::now()),
                Some(t) if t.elapsed() >= ROTATION_GRACE => {
                    if let Ok(new) = open() {
                        if n > 0 {
                            eprintln!(
                                "audit tail: the previous file ended in an unfinished line \
                                 ({n} bytes); following the new one"
                            );
                        }
                        reader = std::io::BufReader::new(new);
                        replaced_at = None;
                        switched = true;
                        continue;
                    }
                }
                _ => {}
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        }
        let line = String::from_utf8_lossy(&buf);
        let Ok(v) = serde_json::from_str::<Value>(line.trim_end()) else {
            let after = last_seq.map_or("the file's start".to_owned(), |s| format!("seq {s}"));
            eprintln!(
                "audit tail: {}: a line after {after} is not a JSON record ({} bytes: edited or \
                 corrupted; `interceptor audit verify` checks the chain); skipped",
                path.display(),
                buf.len()
            );
            continue;
        };
        if let Some(seq) = v["seq"].as_u64() {
            let switched = std::mem::take(&mut switched);
            if let Some(last) = last_seq
                && seq > last.saturating_add(1)
            {
                if switched {
                    for (from, to) in rotated_between(path, last, seq, &emit) {
                        eprintln!(
                            "audit tail: the records from seq {from} to {to} are no longer \
                             beside the log (pruned by [audit] max_files, or moved away); \
                             continuing after them"
                        );
                    }
                } else {
                    eprintln!(
                        "audit tail: {}: seq {seq} follows seq {last}: the records between are \
                         not in the file (edited; `interceptor audit verify` checks the chain)",
                        path.display()
                    );
                }
            }
            last_seq = Some(seq);
        }
        emit(&v, line.trim_end());
    }
}

/// Emits the events with `after < seq < before` from the rotated files of the log at `path`
/// (regular files named `<path>.<…>`, in chain order: by their first record), oldest first:
/// from the first that holds `after + 1` (or the oldest left), each read line by line, each
/// record once. Returns the ranges of those records that none of the files holds (gone:
/// pruned, or moved away).
fn rotated_between(
    path: &std::path::Path,
    after: u64,
    before: u64,
    emit: &dyn Fn(&Value, &str),
) -> Vec<(u64, u64)> {
    use std::io::BufRead;
    // Regular files only (a FIFO would block), placed by their first record (one bounded line
    // each: not a scan of a compressed file); the times in the names can be disordered.
    let mut files: Vec<(Option<u64>, std::path::PathBuf)> = audit::named_after(path)
        .map(|(p, _, _)| p)
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
        .map(|p| (audit::first_seq(&p), p))
        .collect();
    files.sort();
    let lines = |file: &std::path::Path| {
        std::fs::File::open(file)
            .map(|f| {
                std::io::BufReader::new(f)
                    .split(b'\n')
                    .map_while(Result::ok)
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
            })
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|l| Some((serde_json::from_str::<Value>(&l).ok()?, l)))
    };
    // From the first file of those starting latest at or before `after + 1` (a copy starting
    // alike, `<path>.bak`, must not hide the file it copies).
    let start = files
        .iter()
        .rev()
        .find(|(first, _)| first.is_none_or(|s| s <= after + 1))
        .map(|(first, _)| *first);
    let from = files
        .iter()
        .position(|(first, _)| Some(*first) == start)
        .unwrap_or(0);
    // The next record expected, and the ranges found missing.
    let (mut next, mut gaps) = (after + 1, Vec::new());
    let mut missing = |upto: u64, next: u64| {
        if upto > next {
            gaps.push((next, upto - 1));
        }
    };
    'files: for (_, file) in &files[from..] {
        for (v, l) in lines(file) {
            match v["seq"].as_u64() {
                Some(s) if s >= before => break 'files,
                Some(s) if s >= next => {
                    missing(s, next);
                    emit(&v, &l);
                    next = s + 1;
                }
                _ => {}
            }
        }
    }
    missing(before, next);
    gaps
}

fn print_status(s: &Value) {
    let str_of = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    // Absent from a daemon older than this command.
    let files = s["open_files_limit"]
        .as_u64()
        .map(|n| format!(", open files up to {n}"))
        .unwrap_or_default();
    let busy = match s["busy_poll_us"].as_u64() {
        Some(0) => " (busy polling off)".to_owned(),
        Some(us) => format!(" (busy polling {us} µs)"),
        None => String::new(),
    };
    let workers = match s["workers"].as_u64() {
        Some(1) => "1 connection worker".to_owned(),
        _ => format!("{} connection workers", s["workers"]),
    };
    println!(
        "daemon pid {} up {}s, {workers}{busy}{files}, config {}",
        s["pid"],
        s["uptime_s"],
        str_of(&s["config"])
    );
    println!(
        "cgroup v2 mount {}, programs attached at {}, pins in {}",
        str_of(&s["cgroup_mount"]),
        str_of(&s["attach_cgroup"]),
        str_of(&s["bpffs_dir"])
    );
    for l in s["listeners"].as_array().into_iter().flatten() {
        println!(
            "listener netns {}: 127.0.0.1:{} [::1]:{}",
            l["netns_cookie"], l["port4"], l["port6"]
        );
    }
    println!("programs:");
    for p in s["programs"].as_array().into_iter().flatten() {
        println!(
            "  {:<13} link {} prog {}{}",
            str_of(&p["program"]),
            p["link_id"],
            p["program_id"],
            if p["adopted"] == Value::Bool(true) {
                " (re-adopted)"
            } else {
                ""
            }
        );
    }
    for t in s["tracepoints"].as_array().into_iter().flatten() {
        println!(
            "  {:<13} link {} prog {} ({})",
            str_of(&t["program"]),
            t["link_id"],
            t["program_id"],
            str_of(&t["tracepoint"])
        );
    }
    let cache = &s["identity_cache"];
    if cache["enabled"] == Value::Bool(true) {
        println!(
            "identity cache: {} hits, {} misses, {} processes",
            cache["stats"]["hits"], cache["stats"]["misses"], cache["stats"]["entries"]
        );
    } else {
        println!(
            "identity cache: off (no process-change tracepoints; every connection reads /proc)"
        );
    }
    println!("tags:");
    let tags = s["tags"].as_array().cloned().unwrap_or_default();
    if tags.is_empty() {
        println!("  (none)");
    }
    for t in tags {
        let id = t["id"].as_u64().unwrap_or(0);
        if id & interceptor::daemon::PENDING_TAG != 0 {
            println!(
                "  {} (pending: tagged once the cgroup is created)",
                str_of(&t["cgroup"])
            );
            continue;
        }
        let gone = if t["exists"] == Value::Bool(true) {
            ""
        } else {
            " (cgroup gone or re-created: the tag follows the path)"
        };
        println!("  {} (id {id}){gone}", str_of(&t["cgroup"]));
        if let Some(w) = t["warning"].as_str() {
            println!("    warning: {w}");
        }
    }
    println!("revocations:");
    let revs = s["revocations"].as_array().cloned().unwrap_or_default();
    if revs.is_empty() {
        println!("  (none)");
    }
    for r in revs {
        println!(
            "  {}{} since {} (enforced by the {}): {}",
            r["selector"],
            if r["all_egress"] == Value::Bool(true) {
                " (all egress)"
            } else {
                ""
            },
            r["since"],
            str_of(&r["enforced_by"]),
            str_of(&r["reason"])
        );
    }
    println!("maps:");
    for m in s["maps"].as_array().into_iter().flatten() {
        println!(
            "  {:<15} {}/{}",
            str_of(&m["name"]),
            m["entries"],
            m["capacity"]
        );
    }
    println!("servers:");
    for sv in s["servers"].as_array().into_iter().flatten() {
        let intercept: Vec<String> = sv["intercept"]
            .as_array()
            .into_iter()
            .flatten()
            .map(str_of)
            .collect();
        // Absent from a daemon older than this command.
        let ahead = &sv["connections_ahead"];
        let ahead = match (ahead["opened"].as_u64(), ahead["used"].as_u64()) {
            (Some(opened), Some(used)) => {
                format!(" (upstream connections opened ahead {opened}, used {used})")
            }
            _ => String::new(),
        };
        let also = if sv["upstream_intercepted"] == true {
            " (intercepted too)"
        } else {
            ""
        };
        println!(
            "  {}: {} -> {}{also}{ahead}",
            str_of(&sv["name"]),
            intercept.join(", "),
            str_of(&sv["upstream"])
        );
    }
    let a = &s["audit"];
    let syncs = a["syncs"].as_u64().unwrap_or(0);
    let mean_sync = a["sync_us"]
        .as_u64()
        .and_then(|us| us.checked_div(syncs))
        .map(|us| format!(", mean {us} µs"))
        .unwrap_or_default();
    // `writes` is absent from a daemon older than this command.
    let writes = a["writes"]
        .as_u64()
        .map(|w| format!(" in {w} write(s)"))
        .unwrap_or_default();
    let signed = match a["signed_through"].as_u64() {
        Some(seq) => format!(", signed through seq {seq}"),
        None if a["checkpoints"].is_u64() && s["ca"].is_null() => ", not signed (no [ca])".into(),
        None => String::new(),
    };
    println!(
        "audit: {} ({}), {}, {} event(s){writes}, {} failure(s), {syncs} sync(s){mean_sync}{signed}",
        str_of(&a["path"]),
        str_of(&a["durability"]),
        if a["healthy"] == Value::Bool(true) {
            "healthy"
        } else {
            "FAILING"
        },
        a["events"],
        a["failures"],
    );
    println!("counters:");
    for scope in ["kernel", "proxy"] {
        if let Some(map) = s["counters"][scope].as_object() {
            let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("  {scope}: {}", parts.join(" "));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{render, terminal_safe_json};

    #[test]
    fn a_json_line_for_a_terminal_is_the_same_json_without_what_drives_one() {
        let value = json!({"seq": 1, "method": "x\u{9b}31m\u{202e}y\u{7f}", "ok": "plain"});
        let line = value.to_string();
        let safe = terminal_safe_json(&line);
        assert!(
            !safe
                .chars()
                .any(|c| matches!(c, '\u{9b}' | '\u{202e}' | '\u{7f}')),
            "{safe}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&safe).unwrap(),
            value
        );
        assert_eq!(terminal_safe_json(r#"{"a":"b"}"#), r#"{"a":"b"}"#);
    }

    #[test]
    fn a_tail_line_cannot_be_forged_by_what_agents_send() {
        let line = render(&json!({
            "ts": "2026-11-27T00:00:00Z", "seq": 7, "event": "mcp.request",
            "method": "x\n2026-11-27T00:00:01Z #8 mcp.request decision=allow\u{1b}[2K",
            "name": "file:///etc/\u{202e}txt.exe", "decision": "deny",
            "rule": "no role grants the method", "other_params": {"_meta": {"k": "v\n"}},
            "arguments": {"cmd": "rm -rf /\u{202e}gpj.txt\u{7f}"},
        }));
        assert!(
            !line.contains('\n') && !line.contains('\u{1b}') && !line.contains('\u{202e}'),
            "{line}"
        );
        assert!(
            line.contains(r#"method="x\n2026-11-27T00:00:01Z"#),
            "{line}"
        );
        assert!(
            line.contains(r#"name="file:///etc/\u{202e}txt.exe""#),
            "{line}"
        );
        assert!(
            line.contains("rule=no role grants the method"),
            "plain text stays plain: {line}"
        );
        assert!(
            line.contains(r#"other_params={"_meta":{"k":"v\n"}}"#),
            "{line}"
        );
        assert!(
            line.contains(r#"arguments={"cmd":"rm -rf /\u202egpj.txt\u007f"}"#),
            "{line}"
        );
        assert!(!line.contains('\u{7f}'), "{line}");
        // A value with `=` cannot pass for fields of its own, in JSON text neither.
        let forged = render(&json!({
            "ts": "t", "seq": 2, "event": "mcp.request",
            "method": "x decision=allow rule=role:admin", "decision": "deny",
            "arguments": {"q": "x decision=allow"},
        }));
        assert!(
            forged.contains(r#"method="x decision=allow rule=role:admin" decision=deny"#),
            "{forged}"
        );
        assert!(
            forged.contains(r#"arguments={"q":"x decision\u003dallow"}"#),
            "{forged}"
        );
        // A call's name is its tool: shown once.
        let call = render(
            &json!({"ts": "t", "seq": 1, "event": "mcp.request", "tool": "read", "name": "read"}),
        );
        assert!(
            call.contains("tool=read") && !call.contains("name="),
            "{call}"
        );
    }
}
