//! interceptor: steer AI agents' MCP connections through a node-local, identity-aware proxy.
//!
//! The pipeline, one module per stage (read `docs/architecture.md` first):
//! - [`bpf`]: load, attach and pin the kernel programs; the maps they share with us.
//! - [`accept`]: proxy listeners; per accepted connection, find the kernel's record.
//! - [`identity`]: turn the kernel record into a process identity (`/proc` enrichment).
//! - [`mcp`]: the handling stage — HTTP, strict JSON-RPC, policy, list filtering, SSE.
//! - [`policy`]: two-tier RBAC as a pure function.
//! - [`upstream`]: the HTTP client towards the real server.
//! - [`audit`]: the hash-chained, write-ahead audit log.
//! - [`admin`]: the root-only admin socket behind `tag`, `untag` and `status`.
//! - [`config`], [`cgroup`], [`netns`], [`telemetry`]: the supporting cast.

pub mod accept;
pub mod admin;
pub mod audit;
pub mod bpf;
pub mod ca;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod mcp;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod revoke;
pub mod telemetry;
pub mod upstream;
pub mod workers;
pub mod workload;
