//! Builds the eBPF object (`interceptor-ebpf`) with the pinned nightly toolchain and leaves it in
//! OUT_DIR, where `src/bpf.rs` embeds it. `cargo xtask build` prepares the toolchain and puts
//! `bpf-linker` on PATH; a plain `cargo build` works too once `cargo xtask setup` has run.
use anyhow::{Context as _, anyhow, bail};

/// The nightly the eBPF crate is built with; keep in step with xtask's `NIGHTLY`.
const NIGHTLY: &str = "nightly-2026-10-29";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    // aya-build watches the eBPF crate; the types it shares with the daemon live here too.
    println!("cargo:rerun-if-changed=../interceptor-common/src");
    if which_bpf_linker().is_none() {
        bail!(
            "bpf-linker is not on PATH, so the eBPF programs cannot be built.\n\
             Run `cargo xtask setup` once, then build with `cargo xtask build` \
             (it puts the linker on PATH)."
        );
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "interceptor-ebpf")
        .ok_or_else(|| anyhow!("interceptor-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(NIGHTLY)).with_context(|| {
        format!(
            "building the eBPF programs with toolchain {NIGHTLY} failed; \
             if the toolchain is missing, run `cargo xtask setup`"
        )
    })
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}
