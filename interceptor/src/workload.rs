//! Workload naming: container and pod ids parsed from cgroup paths (systemd slices and scopes,
//! Docker, containerd, CRI-O, Podman, Kubernetes kubepods of every QoS class), and the stable
//! workload id built from a template (`[identity] workload_id`), SPIFFE-style by default.

use serde::{Deserialize, Serialize};

/// Default `[identity] workload_id` template.
pub const DEFAULT_TEMPLATE: &str =
    "spiffe://{trust_domain}/node/{node}/cgroup{cgroup_path}/uid/{uid}";
/// Default `[identity] trust_domain`.
pub const DEFAULT_TRUST_DOMAIN: &str = "interceptor.local";

/// What a cgroup path says about the container and pod a process runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// Container id (64 hex digits).
    pub container: Option<String>,
    /// `docker`, `containerd`, `crio` or `podman`.
    pub runtime: Option<&'static str>,
    /// Kubernetes pod UID.
    pub pod: Option<String>,
    /// Kubernetes QoS class: `guaranteed`, `burstable` or `besteffort`.
    pub qos: Option<&'static str>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses a cgroup path (relative to the cgroup v2 mount).
pub fn placement(cgroup: &str) -> Placement {
    let mut p = Placement::default();
    for seg in cgroup.split('/').filter(|s| !s.is_empty()) {
        // Pods: "pod<uid>" (cgroupfs driver) or "kubepods[-<qos>]-pod<uid_with_underscores>.slice".
        let pod_part = seg
            .strip_suffix(".slice")
            .and_then(|s| s.rsplit_once("-pod").map(|(_, uid)| uid))
            .or_else(|| seg.strip_prefix("pod"));
        if let Some(uid) = pod_part {
            let uid = uid.replace('_', "-");
            if uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                p.pod = Some(uid);
            }
        }
        for (qos_name, qos) in [("burstable", "burstable"), ("besteffort", "besteffort")] {
            if seg == qos_name || seg.starts_with(&format!("kubepods-{qos_name}")) {
                p.qos = Some(qos);
            }
        }
        // Containers: "<runtime>-<id>.scope" (systemd driver) or a bare id (cgroupfs driver).
        let scoped = seg.strip_suffix(".scope").and_then(|s| {
            [
                ("cri-containerd-", "containerd"),
                ("crio-conmon-", "crio"),
                ("crio-", "crio"),
                ("docker-", "docker"),
                ("libpod-conmon-", "podman"),
                ("libpod-", "podman"),
            ]
            .into_iter()
            .find_map(|(prefix, rt)| s.strip_prefix(prefix).map(|id| (id, rt)))
        });
        match scoped {
            Some((id, rt)) if is_container_id(id) => {
                p.container = Some(id.to_owned());
                p.runtime = Some(rt);
            }
            _ if is_container_id(seg) => {
                p.container = Some(seg.to_owned());
                p.runtime = Some(if cgroup.contains("kubepods") {
                    "containerd"
                } else if cgroup.contains("/docker/") || cgroup.starts_with("/docker") {
                    "docker"
                } else {
                    "containerd"
                });
            }
            _ => {}
        }
    }
    if p.pod.is_some() && p.qos.is_none() {
        p.qos = Some("guaranteed");
    }
    p
}

/// `[identity]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdentity {
    /// Trust domain of workload ids.
    pub trust_domain: String,
    /// This node's name; "" = the host name.
    pub node: String,
    /// Template of the workload id; placeholders: {trust_domain} {node} {cgroup_path} {uid}
    /// {gid} {exe} {comm} {container} {pod}.
    pub workload_id: String,
    /// Header carrying the signed identity assertion on forwarded requests.
    pub assertion_header: String,
    /// Lifetime of an assertion, e.g. "60s".
    pub assertion_ttl: String,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            node: String::new(),
            workload_id: DEFAULT_TEMPLATE.into(),
            assertion_header: "Interceptor-Identity".into(),
            assertion_ttl: "60s".into(),
        }
    }
}

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 9] = [
    "trust_domain",
    "node",
    "cgroup_path",
    "uid",
    "gid",
    "exe",
    "comm",
    "container",
    "pod",
];

/// Checks a template's placeholders; returns the unknown one.
pub fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            return Err(format!("unclosed '{{' in {template:?}"));
        };
        let name = &rest[start + 1..start + len];
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{name}}}; use {}",
                PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(" ")
            ));
        }
        rest = &rest[start + len + 1..];
    }
    Ok(())
}

/// Percent-encodes what a SPIFFE path segment does not allow (`A-Z a-z 0-9 . _ -` stay), keeping
/// `/` as the segment separator when `keep_slash`.
fn encode(value: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The values a workload id is built from.
pub struct Fields<'a> {
    pub trust_domain: &'a str,
    pub node: &'a str,
    pub cgroup_path: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub exe: &'a str,
    pub comm: &'a str,
    pub container: &'a str,
    pub pod: &'a str,
}

/// Fills `template`.
pub fn render(template: &str, f: &Fields<'_>) -> String {
    template
        .replace("{trust_domain}", &encode(f.trust_domain, false))
        .replace("{node}", &encode(f.node, false))
        .replace("{cgroup_path}", &encode(f.cgroup_path, true))
        .replace("{uid}", &f.uid.to_string())
        .replace("{gid}", &f.gid.to_string())
        .replace("{exe}", &encode(f.exe, true))
        .replace("{comm}", &encode(f.comm, false))
        .replace("{container}", &encode(f.container, false))
        .replace("{pod}", &encode(f.pod, false))
}

/// This host's name (for `node = ""`).
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const POD: &str = "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718";

    /// (cgroup path, container, runtime, pod, qos)
    type Case = (
        String,
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
    );

    #[test]
    fn real_world_cgroup_shapes() {
        let pod_us = POD.replace('-', "_");
        let cases: Vec<Case> = vec![
            ("/system.slice/sshd.service".into(), None, None, None, None),
            (
                "/user.slice/user-1000.slice/session-3.scope".into(),
                None,
                None,
                None,
                None,
            ),
            (
                format!("/system.slice/docker-{ID}.scope"),
                Some(ID),
                Some("docker"),
                None,
                None,
            ),
            (
                format!("/docker/{ID}"),
                Some(ID),
                Some("docker"),
                None,
                None,
            ),
            (
                format!("/machine.slice/libpod-{ID}.scope"),
                Some(ID),
                Some("podman"),
                None,
                None,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_us}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                Some("containerd"),
                Some(POD),
                Some("burstable"),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_us}.slice/crio-{ID}.scope"
                ),
                Some(ID),
                Some("crio"),
                Some(POD),
                Some("besteffort"),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{pod_us}.slice/cri-containerd-{ID}.scope"),
                Some(ID),
                Some("containerd"),
                Some(POD),
                Some("guaranteed"),
            ),
            (
                format!("/kubepods/burstable/pod{POD}/{ID}"),
                Some(ID),
                Some("containerd"),
                Some(POD),
                Some("burstable"),
            ),
            (
                format!("/kubepods/pod{POD}/{ID}"),
                Some(ID),
                Some("containerd"),
                Some(POD),
                Some("guaranteed"),
            ),
        ];
        for (path, container, runtime, pod, qos) in cases {
            let p = placement(&path);
            assert_eq!(p.container.as_deref(), container, "{path}");
            assert_eq!(p.runtime, runtime, "{path}");
            assert_eq!(p.pod.as_deref(), pod, "{path}");
            assert_eq!(p.qos, qos, "{path}");
        }
    }

    #[test]
    fn workload_ids_are_encoded_for_spiffe() {
        let f = Fields {
            trust_domain: "example.org",
            node: "node-1",
            cgroup_path: "/agents/team a/x@y",
            uid: 1000,
            gid: 1000,
            exe: "/usr/bin/python3",
            comm: "python3",
            container: "",
            pod: "",
        };
        assert_eq!(
            render(DEFAULT_TEMPLATE, &f),
            "spiffe://example.org/node/node-1/cgroup/agents/team%20a/x%40y/uid/1000"
        );
        assert!(check_template(DEFAULT_TEMPLATE).is_ok());
        assert!(
            check_template("spiffe://{trust_domain}/{nope}")
                .unwrap_err()
                .contains("{nope}")
        );
        assert!(check_template("spiffe://{trust_domain").is_err());
    }
}
