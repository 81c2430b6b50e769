//! `cargo xtask`: everything the project needs beyond plain cargo — toolchain setup for the
//! eBPF side, build, the full test suite (unit, lint, privileged integration), running the
//! daemon, and the demo.

mod bench;
mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "interceptor's project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the build needs (pinned nightly with rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object and the interceptor binary (the object is embedded).
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Unit tests, fmt and clippy checks, and the privileged integration tests (root).
    Test {
        /// Skip the privileged integration tests (they need root, BPF and cgroup v2). Without
        /// this flag, or INTERCEPTOR_SKIP_PRIVILEGED=1, a machine without them fails the run.
        #[arg(long)]
        skip_privileged: bool,
    },
    /// Build and run the daemon as root: `cargo xtask run -- run --config FILE`.
    Run {
        /// Optimised build.
        #[arg(long)]
        release: bool,
        /// Arguments for the interceptor binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, start the daemon with examples/demo.toml, and show a tagged and an untagged client.
    Demo,
    /// Measure every cost against a baseline in the same run (release build, root); prints a
    /// table with the targets and writes target/bench/results.json.
    Bench {
        /// Fewer rounds and requests: finishes in under 3 minutes once built.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run_task(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[xtask] error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(cli: Cli) -> Result<()> {
    let root = workspace_root()?;
    match cli.command {
        Task::Setup => {
            setup::setup(&root)?;
        }
        Task::Build { release } => {
            build(&root, release)?;
        }
        Task::Test { skip_privileged } => test(&root, skip_privileged)?,
        Task::Run { release, args } => {
            let bin = build(&root, release)?;
            let mut cmd = as_root(&bin);
            cmd.args(&args);
            let status = cmd
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            if !status.success() {
                bail!("interceptor exited with {status}");
            }
        }
        Task::Bench { quick } => {
            let started = std::time::Instant::now();
            let tools = setup::setup(&root)?;
            // The daemon and the criterion benches in one build: with the benches' dev-
            // dependencies in the same feature resolution, `cargo bench` below reuses it
            // instead of rebuilding the library with other features.
            run(cargo(&root, &tools).args([
                "build",
                "--release",
                "--package",
                "interceptor",
                "--bins",
                "--benches",
                "--package",
                "interceptor-tests",
                "--bin",
                "bench-peer",
            ]))?;
            let bin = root.join("target/release/interceptor");
            let plan = bench::Plan::new(quick);
            // Micro-benchmarks first (criterion writes target/criterion; bench::run reads it).
            // The same packages as the build (interceptor-tests' dependencies widen shared
            // crates' features): otherwise half the dependency tree is built again.
            let _ = std::fs::remove_dir_all(root.join("target/criterion"));
            let (warm, measure) = plan.criterion_secs;
            run(cargo(&root, &tools).args([
                "bench",
                "--profile",
                "release",
                "--package",
                "interceptor",
                "--package",
                "interceptor-tests",
                "--bench",
                "micro",
                "--",
                "--warm-up-time",
                warm,
                "--measurement-time",
                measure,
            ]))?;
            bench::run(
                &root,
                &bin,
                &root.join("target/release/bench-peer"),
                plan,
                started,
            )?;
        }
        Task::Demo => {
            let bin = build(&root, false)?;
            let tools = setup::setup(&root)?;
            demo::run(&root, &bin, &tools.python)?;
        }
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// A cargo command with the eBPF tools on PATH.
fn cargo(root: &Path, tools: &setup::Tools) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).env("PATH", tools.path_env());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("[xtask] {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Builds the daemon (and with it the eBPF object); returns the binary's path.
fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let tools = setup::setup(root)?;
    let mut cmd = cargo(root, &tools);
    cmd.args(["build", "--package", "interceptor"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(root
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("interceptor"))
}

/// Whether the daemon of `config` answers on its admin socket.
fn daemon_answers(bin: &Path, config: &Path) -> bool {
    Command::new(bin)
        .args(["status", "--json", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `program` run as a process of the cgroup directory `dir`: the shell moves itself into the
/// cgroup, then becomes the program (same pid), so the kernel attributes its connections to it.
fn in_cgroup(dir: &Path, program: &Path) -> Command {
    let script = format!(
        "echo $$ > '{}' && exec \"$@\"",
        dir.join("cgroup.procs").display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, "sh"]).arg(program);
    cmd
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `bin` run directly when we are root, else through `sudo -E`.
fn as_root(bin: &Path) -> Command {
    if is_root() {
        Command::new(bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(bin);
        c
    }
}

fn test(root: &Path, skip_privileged: bool) -> Result<()> {
    let skip_privileged =
        skip_privileged || std::env::var("INTERCEPTOR_SKIP_PRIVILEGED").is_ok_and(|v| v == "1");
    let tools = setup::setup(root)?;
    eprintln!("[xtask] step 1/5: formatting");
    run(cargo(root, &tools).args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted; run `cargo fmt --all`")?;
    eprintln!("[xtask] step 2/5: clippy (userspace crates; the eBPF crate builds in step 3)");
    run(cargo(root, &tools).args([
        "clippy",
        "--workspace",
        "--exclude",
        "interceptor-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    eprintln!("[xtask] step 3/5: build");
    let bin = build(root, false)?;
    eprintln!("[xtask] step 4/5: unit tests");
    run(cargo(root, &tools).args([
        "test",
        "--workspace",
        "--exclude",
        "interceptor-ebpf",
        "--exclude",
        "interceptor-tests",
    ]))?;
    eprintln!("[xtask] step 5/5: privileged integration tests");
    if skip_privileged {
        eprintln!("[xtask] SKIPPED as asked (--skip-privileged / INTERCEPTOR_SKIP_PRIVILEGED=1)");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the integration tests load eBPF programs and create cgroups: run `cargo xtask test` \
             as root, or pass --skip-privileged to skip them explicitly"
        );
    }
    run(cargo(root, &tools)
        .args(["test", "--package", "interceptor-tests"])
        .env("INTERCEPTOR_BIN", &bin)
        .env("INTERCEPTOR_PYTHON", &tools.python))?;
    Ok(())
}
