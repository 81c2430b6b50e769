//! Who dialed: the kernel's record (captured in `connect()`, in the caller's context) enriched
//! from `/proc` in userspace. aya has no CO-RE, so the kernel side does not walk `task_struct`;
//! everything beyond pid/uid/gid/comm/cgroup id is read here, and checked against the record so a
//! reused pid is reported rather than trusted.

use std::{fmt, net::SocketAddr, path::Path};

use interceptor_common::ConnRecord;
use serde::Serialize;

use crate::{
    config::Naming,
    workload::{self, Placement, placement},
};

/// Whether the process that connected is still the one behind `pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Liveness {
    /// The process exists and started before the connect.
    Alive,
    /// `/proc/<pid>` is gone: the process exited before we looked.
    Exited,
    /// A process with that pid exists but started after the connect: the pid was reused, and
    /// the enrichment below (exe, cgroup path) is withheld.
    PidReused,
}

impl fmt::Display for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Liveness::Alive => "alive",
            Liveness::Exited => "exited",
            Liveness::PidReused => "pid-reused",
        })
    }
}

/// The identity of the process behind one redirected connection.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    /// Process id (thread-group id).
    pub pid: u32,
    /// Thread id that called `connect()`.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    /// cgroup v2 id at connect time.
    pub cgroup_id: u64,
    /// cgroup v2 path (relative to the mount), if the process could be inspected.
    pub cgroup: Option<String>,
    /// Executable path, if the process could be inspected.
    pub exe: Option<String>,
    /// Process start time, ns since boot (`/proc/<pid>/stat` field 22).
    pub start_time_ns: Option<u64>,
    pub liveness: Liveness,
    /// Network namespace cookie of the caller.
    pub netns_cookie: u64,
    /// The address the agent dialed.
    pub original_dst: SocketAddr,
    /// Container and pod, parsed from the cgroup path.
    pub placement: Placement,
    /// The stable workload id (from `[identity] workload_id`); none when the process could
    /// not be inspected (its cgroup path is unknown).
    pub workload_id: Option<String>,
}

impl Identity {
    /// Builds the identity for `record`, reading `/proc` under `proc_root` (normally `/proc`).
    pub fn from_record(record: &ConnRecord, proc_root: &Path, naming: &Naming) -> Self {
        let pid = record.tgid;
        let dir = proc_root.join(pid.to_string());
        let start_time_ns = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| start_time_ticks(&stat))
            .map(ticks_to_ns);
        let liveness = match start_time_ns {
            None => Liveness::Exited,
            // One tick of slack: start times are only tick-precise.
            Some(start) if start > record.connect_boot_ns + ticks_to_ns(1) => Liveness::PidReused,
            Some(_) => Liveness::Alive,
        };
        let (exe, cgroup) = if liveness == Liveness::Alive {
            (
                std::fs::read_link(dir.join("exe"))
                    .ok()
                    .map(|p| p.to_string_lossy().into_owned()),
                std::fs::read_to_string(dir.join("cgroup"))
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("0::").map(|p| p.trim_end().to_owned()))
                    }),
            )
        } else {
            (None, None)
        };
        let placement = cgroup.as_deref().map(placement).unwrap_or_default();
        let comm = record.comm().to_owned();
        let workload_id = cgroup.as_deref().map(|cgroup_path| {
            workload::render(
                &naming.template,
                &workload::Fields {
                    trust_domain: &naming.trust_domain,
                    node: &naming.node,
                    cgroup_path,
                    uid: record.uid,
                    gid: record.gid,
                    exe: exe.as_deref().unwrap_or(""),
                    comm: &comm,
                    container: placement.container.as_deref().unwrap_or(""),
                    pod: placement.pod.as_deref().unwrap_or(""),
                },
            )
        });
        Self {
            placement,
            workload_id,
            pid,
            tid: record.pid,
            uid: record.uid,
            gid: record.gid,
            comm,
            cgroup_id: record.cgroup_id,
            cgroup,
            exe,
            start_time_ns,
            liveness,
            netns_cookie: record.netns_cookie,
            original_dst: record.orig_dst.into(),
        }
    }
}

impl Identity {
    /// The `identity` object of audit events.
    pub fn audit_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": self.pid,
            "tid": self.tid,
            "uid": self.uid,
            "gid": self.gid,
            "comm": self.comm,
            "exe": self.exe,
            "cgroup": self.cgroup,
            "cgroup_id": self.cgroup_id,
            "container": self.placement.container,
            "runtime": self.placement.runtime,
            "pod": self.placement.pod,
            "qos": self.placement.qos,
            "workload_id": self.workload_id,
            "process": self.liveness,
        })
    }
}

/// Field 22 (`starttime`, clock ticks since boot) of a `/proc/<pid>/stat` line. `comm` (field 2)
/// may contain spaces and parentheses, so fields are counted after its last `)`.
fn start_time_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3 (state), 4, ...; field 22 is the 20th of them.
    after.split_whitespace().nth(19)?.parse().ok()
}

fn ticks_to_ns(ticks: u64) -> u64 {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&v| v > 0)
        .unwrap_or(100) as u64;
    ticks.saturating_mul(1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_hostile_comm() {
        let stat = "4242 (evil) (x y) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time_ticks(stat), Some(987654));
        assert_eq!(start_time_ticks("garbage"), None);
    }

    fn record_for_self(connect_boot_ns: u64) -> ConnRecord {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"test");
        ConnRecord {
            tgid: std::process::id(),
            pid: std::process::id(),
            connect_boot_ns,
            comm,
            orig_dst: "127.0.0.2:8080".parse::<SocketAddr>().unwrap().into(),
            ..Default::default()
        }
    }

    fn naming() -> Naming {
        Naming {
            trust_domain: "example.org".into(),
            node: "n1".into(),
            template: workload::DEFAULT_TEMPLATE.into(),
            assertion_header: "interceptor-identity".into(),
            assertion_ttl: std::time::Duration::from_secs(60),
        }
    }

    #[test]
    fn own_process_is_alive_and_enriched() {
        let id = Identity::from_record(
            &record_for_self(u64::MAX / 2),
            Path::new("/proc"),
            &naming(),
        );
        assert_eq!(id.liveness, Liveness::Alive);
        assert!(id.exe.is_some());
        assert!(id.cgroup.as_deref().is_some_and(|c| c.starts_with('/')));
        assert_eq!(id.original_dst, "127.0.0.2:8080".parse().unwrap());
        assert_eq!(id.comm, "test");
        let wid = id.workload_id.expect("workload id");
        assert!(
            wid.starts_with("spiffe://example.org/node/n1/cgroup/"),
            "{wid}"
        );
        assert!(wid.ends_with(&format!("/uid/{}", id.uid)), "{wid}");
    }

    #[test]
    fn a_process_younger_than_the_connect_is_a_reused_pid() {
        // Connect "happened" at boot: our process started later, so the pid cannot be the caller.
        let id = Identity::from_record(&record_for_self(0), Path::new("/proc"), &naming());
        assert_eq!(id.liveness, Liveness::PidReused);
        assert!(id.exe.is_none() && id.cgroup.is_none());
    }

    #[test]
    fn a_vanished_process_is_exited() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::from_record(&record_for_self(1), dir.path(), &naming());
        assert_eq!(id.liveness, Liveness::Exited);
    }
}
