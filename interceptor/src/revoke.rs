//! Revocation, the kill switch: by cgroup (and its descendants), process, uid or workload id.
//!
//! A revocation is a row in the pinned `ICPT_BLOCKS` map, so it survives restarts and the kernel
//! enforces it at `connect()` (cgroup, pid, uid, and a workload id read back into its cgroup and
//! uid where the template allows; other workload ids only the proxy can compute, so the proxy
//! enforces those). The daemon also closes every live connection of a
//! matching identity, answering in-flight requests with an error that names the revocation.

use interceptor_common::{BlockKey, BlockValue, block};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{cgroup::Hierarchy, config, identity::Identity};

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// A cgroup path (relative to the cgroup v2 mount) and everything below it.
    Cgroup(String),
    /// A process (tgid).
    Pid(u32),
    /// A user.
    Uid(u32),
    /// A workload id (`[identity] workload_id`).
    WorkloadId(String),
}

impl Selector {
    /// The text stored with the block (and parsed back at start).
    pub fn label(&self) -> String {
        match self {
            Selector::Cgroup(p) => format!("cgroup:{p}"),
            Selector::Pid(p) => format!("pid:{p}"),
            Selector::Uid(u) => format!("uid:{u}"),
            Selector::WorkloadId(w) => format!("workload_id:{w}"),
        }
    }

    /// Parses [`Selector::label`].
    pub fn from_label(s: &str) -> Option<Self> {
        let (kind, v) = s.split_once(':')?;
        Some(match kind {
            "cgroup" => Selector::Cgroup(v.to_owned()),
            "pid" => Selector::Pid(v.parse().ok()?),
            "uid" => Selector::Uid(v.parse().ok()?),
            "workload_id" => Selector::WorkloadId(v.to_owned()),
            _ => return None,
        })
    }

    /// The selector in the form revocations are stored under (a cgroup path normalised).
    pub fn normalized(self) -> Result<Self, String> {
        Ok(match self {
            Selector::Cgroup(p) => Selector::Cgroup(config::normalize_cgroup_path(&p)?),
            other => other,
        })
    }

    /// Normalises the selector and computes its map key. A workload id gets a key the kernel
    /// matches (its process's own cgroup, and uid) when the template is built from those and
    /// the cgroup exists; otherwise a hash only the proxy acts on.
    pub fn key(
        self,
        hierarchy: &Hierarchy,
        naming: &config::Naming,
    ) -> Result<(Self, BlockKey), String> {
        let key = |kind, id| BlockKey { kind, aux: 0, id };
        Ok(match self.normalized()? {
            Selector::Cgroup(p) => {
                let id = hierarchy.id(&p).map_err(|e| e.to_string())?;
                (Selector::Cgroup(p), key(block::CGROUP, id))
            }
            Selector::Pid(p) => (Selector::Pid(p), key(block::PID, u64::from(p))),
            Selector::Uid(u) => (Selector::Uid(u), key(block::UID, u64::from(u))),
            Selector::WorkloadId(w) => {
                if w.is_empty() {
                    return Err("empty workload id".into());
                }
                if w.chars().any(char::is_control) {
                    return Err(format!(
                        "workload id {w:?} holds a control character; no workload id has one"
                    ));
                }
                let in_kernel = crate::workload::kernel_match(
                    &naming.template,
                    &naming.trust_domain,
                    &naming.node,
                    &w,
                )
                .and_then(|m| Some((hierarchy.id(&m.cgroup_path).ok()?, m.uid)));
                if let Some((cgroup_id, uid)) = in_kernel {
                    let k = match uid {
                        Some(uid) => BlockKey {
                            kind: block::WORKLOAD_CGROUP_UID,
                            aux: uid,
                            id: cgroup_id,
                        },
                        None => key(block::WORKLOAD_CGROUP, cgroup_id),
                    };
                    return Ok((Selector::WorkloadId(w), k));
                }
                let digest = Sha256::digest(w.as_bytes());
                let mut id = [0u8; 8];
                id.copy_from_slice(&digest[..8]);
                let k = key(block::WORKLOAD, u64::from_le_bytes(id));
                (Selector::WorkloadId(w), k)
            }
        })
    }

    /// Whether `identity` falls under this selector.
    pub fn matches(&self, identity: &Identity) -> bool {
        match self {
            Selector::Cgroup(p) => identity.cgroup.as_deref().is_some_and(|c| {
                p == "/"
                    || c == p
                    || c.strip_prefix(p.as_str())
                        .is_some_and(|r| r.starts_with('/'))
            }),
            Selector::Pid(p) => identity.pid == *p,
            Selector::Uid(u) => identity.uid == *u,
            Selector::WorkloadId(w) => identity.workload_id.as_deref() == Some(w.as_str()),
        }
    }
}

/// One revocation in force.
#[derive(Debug, Clone, Serialize)]
pub struct Revocation {
    pub selector: Selector,
    /// Every outbound connection is refused, not only MCP ones.
    pub all_egress: bool,
    pub reason: String,
    /// Unix time it was made.
    pub since: u64,
    /// Shown as `enforced_by`: `kernel` (connects refused at `connect()`, and the proxy) or
    /// `proxy` (a workload id whose template the kernel cannot match, or whose cgroup did not
    /// exist when revoked): what the key's kind says.
    #[serde(rename = "enforced_by", serialize_with = "enforcement")]
    pub key: BlockKey,
}

fn enforcement<S: serde::Serializer>(key: &BlockKey, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if key.kind == block::WORKLOAD {
        "proxy"
    } else {
        "kernel"
    })
}

impl Revocation {
    /// Whether the kernel refuses the revoked identity's connects.
    pub fn in_kernel(&self) -> bool {
        self.key.kind != block::WORKLOAD
    }

    /// Rebuilds a revocation from its map row (at start).
    pub fn from_row(key: BlockKey, value: &BlockValue) -> Option<Self> {
        Some(Self {
            selector: Selector::from_label(value.label())?,
            all_egress: value.flags & block::ALL_EGRESS != 0,
            reason: value.reason().to_owned(),
            since: value.since,
            key,
        })
    }

    pub fn row(&self) -> BlockValue {
        let flags = block::MCP
            | if self.all_egress {
                block::ALL_EGRESS
            } else {
                0
            };
        BlockValue::new(flags, self.since, &self.selector.label(), &self.reason)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{identity::Liveness, workload::Placement};

    fn identity(cgroup: &str) -> Identity {
        Identity {
            pid: 42,
            tid: 42,
            uid: 1000,
            gid: 1000,
            comm: "agent".into(),
            cgroup_id: 1,
            cgroup: Some(cgroup.into()),
            exe: Some("/usr/bin/agent".into()),
            start_time_ns: None,
            liveness: Liveness::Alive,
            netns_cookie: 1,
            original_dst: "127.0.0.2:80".parse::<SocketAddr>().unwrap(),
            placement: Placement::default(),
            workload_id: Some("spiffe://x/agents/a".into()),
        }
    }

    #[test]
    fn selectors_match_descendants_not_siblings() {
        let id = identity("/agents/a/worker");
        assert!(Selector::Cgroup("/agents".into()).matches(&id));
        assert!(Selector::Cgroup("/agents/a/worker".into()).matches(&id));
        assert!(!Selector::Cgroup("/agents/ab".into()).matches(&id));
        assert!(!Selector::Cgroup("/agent".into()).matches(&id));
        assert!(Selector::Pid(42).matches(&id) && !Selector::Pid(43).matches(&id));
        assert!(Selector::Uid(1000).matches(&id));
        assert!(Selector::WorkloadId("spiffe://x/agents/a".into()).matches(&id));
        for s in [
            Selector::Cgroup("/a b".into()),
            Selector::Pid(7),
            Selector::Uid(0),
            Selector::WorkloadId("spiffe://x/y".into()),
        ] {
            assert_eq!(Selector::from_label(&s.label()), Some(s));
        }
    }
}
