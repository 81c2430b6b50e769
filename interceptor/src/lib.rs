//! interceptor: steer AI agents' MCP connections through a node-local, identity-aware proxy.
//!
//! The pipeline, one module per stage (read `docs/architecture.md` first):
//! - [`bpf`]: load, attach and pin the kernel programs; the maps they share with us.
//! - [`accept`]: proxy listeners; per accepted connection, find the kernel's record.
//! - [`identity`]: turn the kernel record into a process identity (`/proc` enrichment).
//! - [`relay`]: the handling stage — today a byte relay to the server's upstream.
//! - [`admin`]: the root-only admin socket behind `tag`, `untag` and `status`.
//! - [`config`], [`cgroup`], [`netns`], [`telemetry`]: the supporting cast.

pub mod accept;
pub mod admin;
pub mod bpf;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod netns;
pub mod policy;
pub mod relay;
pub mod telemetry;
