//! The `interceptor` command: the daemon (`run`) and the operator's tools.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use interceptor::{
    admin::{self, Request},
    bpf,
    cgroup::Hierarchy,
    config::{Config, DEFAULT_CONFIG_PATH},
    daemon,
    policy::{Call, Subject},
    telemetry::{self, LogFormat},
};
use serde_json::Value;

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
    /// The daemon's TOML config; the admin socket and bpffs folder are read from it.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (root): attach the programs, tag the configured cgroups, serve the proxy.
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
    /// Detach the programs and remove every pin (maps, links, tags). The daemon must be stopped.
    /// This is the only way interception stops for tagged cgroups.
    Uninstall {
        #[command(flatten)]
        config: ConfigArg,
    },
}

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
        #[arg(long, conflicts_with = "method")]
        tool: Option<String>,
        /// Another MCP method, e.g. resources/read.
        #[arg(long)]
        method: Option<String>,
        /// The tool's arguments as JSON (for argument constraints).
        #[arg(long, value_name = "JSON")]
        arguments: Option<String>,
        /// The caller's cgroup path (relative to the cgroup v2 mount).
        #[arg(long)]
        cgroup: Option<String>,
        #[arg(long, default_value_t = 0)]
        uid: u32,
        #[arg(long, default_value_t = 0)]
        gid: u32,
        /// The caller's executable path.
        #[arg(long)]
        exe: Option<String>,
        /// The caller's comm.
        #[arg(long, default_value = "")]
        comm: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            let config = Config::load(&config.config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(config))?;
            Ok(())
        }
        Command::Check { json, config } => {
            let config = Config::load(&config.config)?;
            // Where the programs would attach; a host without cgroup v2 is reported, not fatal.
            let mount = Hierarchy::discover().map(|h| h.mount);
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
                    "tags": config.tags,
                    "servers": servers,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            println!("{} is valid", config.path.display());
            match &mount {
                Ok(m) => println!(
                    "  programs attach at {} ({} under the cgroup v2 mount {})",
                    m.join(config.daemon.cgroup_root.trim_start_matches('/'))
                        .display(),
                    config.daemon.cgroup_root,
                    m.display()
                ),
                Err(e) => println!("  warning: {e}"),
            }
            println!(
                "  proxy on 127.0.0.1:{0} and [::1]:{0}; pins in {1}; admin socket {2}",
                config.daemon.listen_port,
                config.daemon.bpffs_dir.display(),
                config.daemon.admin_socket.display()
            );
            for s in &config.servers {
                let intercept: Vec<String> = s.intercept.iter().map(ToString::to_string).collect();
                println!(
                    "  server {}: intercept {} -> upstream {}",
                    s.name,
                    intercept.join(", "),
                    s.upstream
                );
            }
            for t in &config.tags {
                println!("  tag {t}");
            }
            Ok(())
        }
        Command::Tag { cgroup, config } => {
            let daemon = Config::load_daemon(&config.config)?;
            let r = admin::request(&daemon.admin_socket, &Request::Tag { cgroup })?;
            println!(
                "tagged {} (cgroup id {})",
                r["cgroup"].as_str().unwrap_or("?"),
                r["id"]
            );
            Ok(())
        }
        Command::Untag { cgroup, config } => {
            let daemon = Config::load_daemon(&config.config)?;
            let r = admin::request(&daemon.admin_socket, &Request::Untag { cgroup })?;
            println!(
                "untagged {} (cgroup id {})",
                r["cgroup"].as_str().unwrap_or("?"),
                r["id"]
            );
            Ok(())
        }
        Command::Status { json, config } => {
            let daemon = Config::load_daemon(&config.config)?;
            let status = admin::request(&daemon.admin_socket, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Reload { config } => {
            let daemon = Config::load_daemon(&config.config)?;
            let r = admin::request(&daemon.admin_socket, &Request::Reload)?;
            println!(
                "policy reloaded: {} role(s), {} binding(s){}; {} server stream(s) notified",
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
            Ok(())
        }
        Command::Policy(PolicyCommand::Check { config }) => {
            let config = Config::load(&config.config)?;
            let roles = config.policy.role_names();
            println!(
                "{}: policy is valid: {} role(s) ({}), {} binding(s)",
                config.path.display(),
                roles.len(),
                roles.join(", "),
                config.policy.binding_count()
            );
            Ok(())
        }
        Command::Policy(PolicyCommand::Explain {
            config,
            server,
            tool,
            method,
            arguments,
            cgroup,
            uid,
            gid,
            exe,
            comm,
        }) => {
            let config = Config::load(&config.config)?;
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
            let arguments: Option<Value> = arguments
                .map(|a| {
                    serde_json::from_str(&a)
                        .with_context(|| format!("--arguments is not JSON: {a}"))
                })
                .transpose()?;
            let method = match (&tool, &method) {
                (Some(_), _) => "tools/call".to_owned(),
                (None, Some(m)) => m.clone(),
                (None, None) => bail!("give --tool NAME or --method METHOD"),
            };
            let subject = Subject {
                cgroup: cgroup.as_deref(),
                uid,
                gid,
                exe: exe.as_deref(),
                comm: &comm,
            };
            let call = Call {
                method: &method,
                name: tool.as_deref(),
                arguments: arguments.as_ref(),
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
        Command::Uninstall { config } => {
            let daemon = Config::load_daemon(&config.config)?;
            let socket = &daemon.admin_socket;
            if admin::request(socket, &Request::Status).is_ok() {
                bail!(
                    "the daemon is running (it answers on {}); stop it first (SIGTERM), then \
                     run uninstall again",
                    socket.display()
                );
            }
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
            Ok(())
        }
    }
}

fn print_status(s: &Value) {
    let str_of = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    println!(
        "daemon pid {} up {}s, config {}",
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
    println!("tags:");
    let tags = s["tags"].as_array().cloned().unwrap_or_default();
    if tags.is_empty() {
        println!("  (none)");
    }
    for t in tags {
        let gone = if t["exists"] == Value::Bool(true) {
            ""
        } else {
            " (cgroup gone)"
        };
        println!("  {} (id {}){gone}", str_of(&t["cgroup"]), t["id"]);
    }
    println!("servers:");
    for sv in s["servers"].as_array().into_iter().flatten() {
        let intercept: Vec<String> = sv["intercept"]
            .as_array()
            .into_iter()
            .flatten()
            .map(str_of)
            .collect();
        println!(
            "  {}: {} -> {}",
            str_of(&sv["name"]),
            intercept.join(", "),
            str_of(&sv["upstream"])
        );
    }
    println!("counters:");
    for scope in ["kernel", "proxy"] {
        if let Some(map) = s["counters"][scope].as_object() {
            let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("  {scope}: {}", parts.join(" "));
        }
    }
}
