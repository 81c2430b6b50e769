//! `cargo xtask setup`: the eBPF toolchain, installed idempotently on a machine that has only
//! stable Rust (and `RUSTUP_AUTO_INSTALL=0`):
//! 1. the pinned nightly with `rust-src` (for `-Z build-std=core` on `bpfel-unknown-none`);
//! 2. `bpf-linker`, built against that nightly's own LLVM (no system LLVM of that version
//!    exists here): a prefix folder whose `lib/` links to the nightly's `libLLVM.so.*`, then
//!    `LLVM_PREFIX=… cargo install bpf-linker`. The binary keeps the prefix in its rpath, so the
//!    prefix stays next to it under `$CARGO_HOME/interceptor-tools/`.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The nightly the eBPF crate builds with; keep in step with `interceptor/build.rs`.
pub const NIGHTLY: &str = "nightly-2026-10-29";
/// bpf-linker release matching that nightly's LLVM (23).
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// The official MCP Python SDK used by the integration tests (as server and client).
pub const PYTHON_MCP: &str = "mcp==2.3.0";

/// Where the tools live once set up.
pub struct Tools {
    pub bpf_linker_bin_dir: PathBuf,
    /// Python with the MCP SDK (a venv under `target/`).
    pub python: PathBuf,
}

impl Tools {
    /// PATH with bpf-linker first.
    pub fn path_env(&self) -> OsString {
        let mut paths = vec![self.bpf_linker_bin_dir.clone()];
        if let Some(p) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&p));
        }
        std::env::join_paths(paths).unwrap_or_default()
    }
}

fn step(n: usize, what: &str, outcome: &str) {
    eprintln!("[setup {n}/5] {what}: {outcome}");
}

/// Commands the tests and the demo run (network namespaces, h2c, sysctl, an organisation's CA
/// made the usual way, dropping privileges), and the Debian packages that provide them.
const SYSTEM_TOOLS: [(&str, &str); 5] = [
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("sysctl", "procps"),
    ("openssl", "openssl"),
    ("setpriv", "util-linux"),
];

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(cmd).is_file())
}

/// Installs missing system tools from Debian's packages (as root).
fn ensure_system_tools() -> Result<()> {
    let missing: Vec<&str> = SYSTEM_TOOLS
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        step(
            5,
            "system tools (ip, curl, sysctl, openssl, setpriv)",
            "present",
        );
        return Ok(());
    }
    step(
        5,
        "system tools",
        &format!("installing {}", missing.join(" ")),
    );
    output(Command::new("apt-get").arg("update").arg("-q")).with_context(|| {
        format!(
            "apt-get update failed; install {} by hand",
            missing.join(" ")
        )
    })?;
    output(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {} failed", missing.join(" ")))?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// Makes sure everything is installed; returns where it is.
pub fn setup(root: &Path) -> Result<Tools> {
    warn_if_disk_is_short(root);
    ensure_nightly()?;
    let tools_dir = cargo_home()?.join("interceptor-tools");
    let prefix = ensure_llvm_prefix(&tools_dir)?;
    let bin_dir = ensure_bpf_linker(&tools_dir, &prefix)?;
    let python = ensure_python_mcp(root)?;
    ensure_system_tools()?;
    Ok(Tools {
        bpf_linker_bin_dir: bin_dir,
        python,
    })
}

/// What a fresh `cargo xtask test` writes, measured: `target/` peaks at about 4 GiB (debug
/// builds keep line tables only, see the workspace's Cargo.toml), the nightly toolchain 0.7 GiB.
const DISK_NEEDED: u64 = 6 << 30;

/// Warns, before hours of building end in "No space left on device", when the filesystem that
/// holds `target/` has less free space than a fresh build and test run needs. Only a warning:
/// an incremental build needs much less.
fn warn_if_disk_is_short(root: &Path) {
    let Ok(stat) = nix::sys::statvfs::statvfs(root) else {
        return;
    };
    let free = stat.blocks_available().saturating_mul(stat.fragment_size());
    if free < DISK_NEEDED {
        eprintln!(
            "[setup] warning: {} has {:.1} GiB free; a fresh build and test run needs about \
             {} GiB (target/ and the nightly toolchain). Free some space (`cargo clean` removes \
             target/) if the build fails with \"No space left on device\".",
            root.display(),
            free as f64 / f64::from(1u32 << 30),
            DISK_NEEDED >> 30,
        );
    }
}

/// A virtualenv under `target/` with the official MCP Python SDK, for the integration tests
/// and the demo's MCP client and server.
fn ensure_python_mcp(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target").join("python-mcp");
    let python = venv.join("bin").join("python");
    let marker = venv.join(".installed");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == PYTHON_MCP) && python.exists() {
        step(
            4,
            &format!("python {PYTHON_MCP}"),
            &format!("present ({})", venv.display()),
        );
        return Ok(python);
    }
    step(
        4,
        &format!("python {PYTHON_MCP}"),
        "creating a virtualenv and installing from PyPI",
    );
    let system_python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
        .context("no python3 on PATH; install Python >= 3.10 (e.g. apt-get install python3 python3-venv)")?;
    output(Command::new(system_python).args(["-m", "venv"]).arg(&venv)).context(
        "creating the virtualenv failed; on Debian install python3-venv (apt-get install python3-venv)",
    )?;
    output(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        PYTHON_MCP,
    ]))
    .context("installing the MCP Python SDK from PyPI failed")?;
    std::fs::write(&marker, PYTHON_MCP).with_context(|| format!("writing {}", marker.display()))?;
    Ok(python)
}

fn ensure_nightly() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context(
        "rustup is needed to install the pinned nightly for the eBPF build; install rustup first",
    )?;
    if toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        step(1, &format!("toolchain {NIGHTLY}"), "present");
    } else {
        step(
            1,
            &format!("toolchain {NIGHTLY}"),
            "installing (minimal profile + rust-src)",
        );
        output(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        step(1, "rust-src", "adding");
        output(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

/// A folder `P` with `P/lib/libLLVM.so` (and the versioned name) pointing at the nightly's LLVM.
fn ensure_llvm_prefix(tools_dir: &Path) -> Result<PathBuf> {
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{NIGHTLY}"))
            .args(["--print", "sysroot"]),
    )?;
    let lib = Path::new(sysroot.trim()).join("lib");
    // The real library is `libLLVM.so.<ver>-rust-…`; `libLLVM-<major>-rust-….so` beside it is a
    // linker script, not the library.
    let real = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}; is {NIGHTLY} installed completely? Try `rustup toolchain \
                 uninstall {NIGHTLY}` and `cargo xtask setup` again",
                lib.display()
            )
        })?;
    let prefix = tools_dir.join(format!("llvm-{NIGHTLY}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let file_name = real.file_name().context("library without a file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(file_name)] {
        let link = prefix_lib.join(name);
        if std::fs::read_link(&link).ok().as_deref() == Some(real.as_path()) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), real.display()))?;
    }
    step(
        2,
        "LLVM prefix",
        &format!("{} -> {}", prefix.display(), real.display()),
    );
    Ok(prefix)
}

fn ensure_bpf_linker(tools_dir: &Path, prefix: &Path) -> Result<PathBuf> {
    let root = tools_dir.join(format!("bpf-linker-{BPF_LINKER_VERSION}-{NIGHTLY}"));
    let bin_dir = root.join("bin");
    let bin = bin_dir.join("bpf-linker");
    if bin.is_file()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        step(
            3,
            &format!("bpf-linker {BPF_LINKER_VERSION}"),
            &format!("present ({})", bin.display()),
        );
        return Ok(bin_dir);
    }
    step(
        3,
        &format!("bpf-linker {BPF_LINKER_VERSION}"),
        "building against the nightly's LLVM (about a minute)",
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--root",
        ])
        .arg(&root)
        .env("LLVM_PREFIX", prefix)
        // Build with the stable toolchain whatever directory we are called from.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!(
            "building bpf-linker failed ({status}); it needs the crates.io registry and a C \
             compiler (gcc). Re-run `cargo xtask setup` once those are available"
        );
    }
    Ok(bin_dir)
}
