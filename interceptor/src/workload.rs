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
///
/// The outermost match counts: a process allowed to make cgroups below its own (systemd
/// delegation, rootless or nested containers) could otherwise name a pod and container of
/// its choice by nesting `…/pod<uid>/docker-<id>.scope` under its own. A pod is taken only
/// under the `kubepods` hierarchy at the top (its QoS level between), a container only as the
/// first container-shaped segment (in Kubernetes nested in a container, as kind runs it, the
/// node's container).
pub fn placement(cgroup: &str) -> Placement {
    let mut p = Placement::default();
    // Segments of the kubepods hierarchy seen so far from the top, with nothing else between.
    let mut in_kubepods = false;
    for (depth, seg) in cgroup.split('/').filter(|s| !s.is_empty()).enumerate() {
        if p.container.is_some() {
            break;
        }
        if p.pod.is_none() {
            let qos_level = [("burstable", "burstable"), ("besteffort", "besteffort")]
                .into_iter()
                .find(|(name, _)| {
                    (in_kubepods && seg == *name) || seg.starts_with(&format!("kubepods-{name}"))
                });
            if let Some((_, qos)) = qos_level {
                p.qos = Some(qos);
            }
            // Pods: "pod<uid>" (cgroupfs driver) or
            // "kubepods[-<qos>]-pod<uid_with_underscores>.slice".
            let pod_part = seg
                .strip_suffix(".slice")
                .and_then(|s| s.rsplit_once("-pod").map(|(_, uid)| uid))
                .or_else(|| seg.strip_prefix("pod"));
            let uid = pod_part.map(|uid| uid.replace('_', "-")).filter(|uid| {
                uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
            });
            let kubepods_level = seg.starts_with("kubepods") && (depth == 0 || in_kubepods);
            if let Some(uid) = uid
                && (in_kubepods || kubepods_level)
            {
                p.pod = Some(uid);
                continue;
            }
            in_kubepods = kubepods_level || (in_kubepods && qos_level.is_some());
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
        // CRI-O under the cgroupfs driver: "crio-<id>" without ".scope".
        let scoped = scoped.or_else(|| seg.strip_prefix("crio-").map(|id| (id, "crio")));
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
            // A pod's container is the segment right below it, or none.
            _ if p.pod.is_some() => break,
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

/// Longest workload id given (bytes): longer ones (an agent's deep cgroup or executable path,
/// each byte encoded as three) would be kept per workload in several caches and sent in
/// every assertion.
pub const MAX_ID_BYTES: usize = 2048;

/// Fills `template`; `None` when a placeholder it uses has no value (a process with no known
/// executable, a cgroup with no pod), or when the id would be no usable SPIFFE id: a path
/// segment `.` or `..` (an agent may name itself `..`; a consumer normalising the URI would
/// read another id), or longer than [`MAX_ID_BYTES`]. (The root cgroup's `//` stays: no
/// agent chooses it.)
pub fn render(template: &str, f: &Fields<'_>) -> Option<String> {
    let optional = [
        ("{exe}", f.exe),
        ("{comm}", f.comm),
        ("{container}", f.container),
        ("{pod}", f.pod),
    ];
    if optional
        .iter()
        .any(|(name, value)| value.is_empty() && template.contains(name))
    {
        return None;
    }
    let id = template
        .replace("{trust_domain}", &encode(f.trust_domain, false))
        .replace("{node}", &encode(f.node, false))
        .replace("{cgroup_path}", &encode(f.cgroup_path, true))
        .replace("{uid}", &f.uid.to_string())
        .replace("{gid}", &f.gid.to_string())
        .replace("{exe}", &encode(f.exe, true))
        .replace("{comm}", &encode(f.comm, false))
        .replace("{container}", &encode(f.container, false))
        .replace("{pod}", &encode(f.pod, false));
    // The path: after the scheme and the trust domain.
    let path = id.split_once("://").map_or(id.as_str(), |(_, rest)| {
        rest.split_once('/').map_or("", |(_, p)| p)
    });
    let usable = id.len() <= MAX_ID_BYTES && path.split('/').all(|seg| !matches!(seg, "." | ".."));
    usable.then_some(id)
}

/// What the kernel can match a workload id on: its process's own cgroup and, when the
/// template names it, its uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelMatch {
    /// Relative to the cgroup v2 mount.
    pub cgroup_path: String,
    pub uid: Option<u32>,
}

/// Reads workload id `id` back into what the kernel can match, when `template` is built from
/// the cgroup path (and the uid) alone: `{trust_domain}`, `{node}`, `{cgroup_path}`, `{uid}`,
/// and `{container}` / `{pod}`, which follow from the cgroup path. `None` when the template
/// needs what the kernel is not told (`{gid}` is, but not `{exe}` or `{comm}`; kept to the
/// cgroup path and uid), lacks `{cgroup_path}`, or does not render `id` at all. Every reading
/// is checked by rendering it again: only a cgroup and uid whose processes have exactly this
/// workload id are returned.
pub fn kernel_match(
    template: &str,
    trust_domain: &str,
    node: &str,
    id: &str,
) -> Option<KernelMatch> {
    let mut pattern = String::from("^");
    // Which placeholder each capture group is.
    let mut groups: Vec<&str> = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        pattern.push_str(&regex::escape(&rest[..open]));
        let close = rest[open..].find('}')? + open;
        let name = &rest[open + 1..close];
        match name {
            "trust_domain" => pattern.push_str(&regex::escape(&encode(trust_domain, false))),
            "node" => pattern.push_str(&regex::escape(&encode(node, false))),
            "cgroup_path" => {
                pattern.push_str("([A-Za-z0-9._/%-]*)");
                groups.push(name);
            }
            "uid" => {
                pattern.push_str("([0-9]+)");
                groups.push(name);
            }
            "container" | "pod" => pattern.push_str("[A-Za-z0-9._%-]*"),
            _ => return None,
        }
        rest = &rest[close + 1..];
    }
    pattern.push_str(&regex::escape(rest));
    pattern.push('$');
    let caps = regex::Regex::new(&pattern).ok()?.captures(id)?;
    let captured = |which: &str| {
        let i = groups.iter().position(|g| *g == which)?;
        caps.get(i + 1).map(|m| m.as_str())
    };
    let cgroup_path = decode(captured("cgroup_path")?)?;
    // Only a path as the kernel reports a process's cgroup: an alias (`..`, `//`, a trailing
    // `/`) of another cgroup renders a workload id no process has, and must not resolve to
    // that cgroup.
    if crate::config::normalize_cgroup_path(&cgroup_path).ok()? != cgroup_path {
        return None;
    }
    let uid = match captured("uid") {
        Some(u) => Some(u.parse().ok()?),
        None => None,
    };
    let placement = placement(&cgroup_path);
    let again = render(
        template,
        &Fields {
            trust_domain,
            node,
            cgroup_path: &cgroup_path,
            uid: uid.unwrap_or(0),
            gid: 0,
            exe: "",
            comm: "",
            container: placement.container.as_deref().unwrap_or(""),
            pod: placement.pod.as_deref().unwrap_or(""),
        },
    )?;
    (again == id).then_some(KernelMatch { cgroup_path, uid })
}

/// Undoes [`encode`]'s percent-encoding.
fn decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
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
    const OTHER: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    const OTHER_POD: &str = "99999999-8888-7777-6666-555555555555";

    /// (cgroup path, container, runtime, pod, qos)
    type Case = (
        String,
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
    );

    #[test]
    fn workload_ids_are_read_back_for_the_kernel_when_the_template_allows() {
        let id = |cgroup: &str, uid: u32, t: &str| {
            let p = placement(cgroup);
            render(
                t,
                &Fields {
                    trust_domain: "example.org",
                    node: "n 1",
                    cgroup_path: cgroup,
                    uid,
                    gid: 7,
                    exe: "/bin/agent",
                    comm: "agent",
                    container: p.container.as_deref().unwrap_or(""),
                    pod: p.pod.as_deref().unwrap_or(""),
                },
            )
            .expect("an id")
        };
        let read = |t: &str, w: &str| kernel_match(t, "example.org", "n 1", w);
        let pod_cgroup = format!("/kubepods/pod{POD}/{ID}");
        for (cgroup, uid) in [
            ("/agents/a", 1000),
            ("/agents/with space/uid/5", 0),
            (pod_cgroup.as_str(), 65534),
        ] {
            let w = id(cgroup, uid, DEFAULT_TEMPLATE);
            assert_eq!(
                read(DEFAULT_TEMPLATE, &w),
                Some(KernelMatch {
                    cgroup_path: cgroup.to_owned(),
                    uid: Some(uid)
                }),
                "{w}"
            );
        }
        // Without the uid; with what follows from the cgroup path.
        let t = "spiffe://{trust_domain}/pod/{pod}/c/{container}{cgroup_path}";
        assert_eq!(
            read(t, &id(&pod_cgroup, 3, t)),
            Some(KernelMatch {
                cgroup_path: pod_cgroup.clone(),
                uid: None
            })
        );
        // A pod that does not follow from the cgroup read back: not this template's id.
        let forged = id(&pod_cgroup, 3, t).replacen(
            &format!("/pod/{POD}/"),
            "/pod/00000000-0000-0000-0000-000000000000/",
            1,
        );
        assert_ne!(forged, id(&pod_cgroup, 3, t));
        assert_eq!(read(t, &forged), None);
        // What the kernel is not told, or no cgroup path: the proxy's alone.
        for t in [
            "spiffe://{trust_domain}/exe{exe}{cgroup_path}",
            "spiffe://{trust_domain}/{comm}{cgroup_path}",
            "spiffe://{trust_domain}/uid/{uid}",
        ] {
            assert_eq!(read(t, &id("/agents/a", 1, t)), None, "{t}");
        }
        // Aliases of a cgroup's path name no process's workload.
        for alias in [
            "/agents/a/",
            "/agents/x/../a",
            "/agents//a",
            "/agents/./a",
            "",
        ] {
            let w = format!("spiffe://example.org/node/n%201/cgroup{alias}/uid/1");
            assert_eq!(read(DEFAULT_TEMPLATE, &w), None, "{w}");
        }
        let root = id("/", 0, DEFAULT_TEMPLATE);
        assert_eq!(
            read(DEFAULT_TEMPLATE, &root),
            Some(KernelMatch {
                cgroup_path: "/".into(),
                uid: Some(0)
            }),
            "{root}"
        );
        // Another trust domain or node, or garbage.
        assert_eq!(
            read(
                DEFAULT_TEMPLATE,
                &id("/a", 1, DEFAULT_TEMPLATE).replace("example.org", "x.org")
            ),
            None
        );
        assert_eq!(read(DEFAULT_TEMPLATE, "spiffe://nope"), None);
    }

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
                // CRI-O with the cgroupfs driver.
                format!("/kubepods/burstable/pod{POD}/crio-{ID}"),
                Some(ID),
                Some("crio"),
                Some(POD),
                Some("burstable"),
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
            // Cgroups a workload made below its own (nested containers, delegation) cannot
            // name another pod or container: the outermost match counts, a pod only under
            // kubepods, a pod's container only right below it.
            (
                format!("/kubepods/pod{POD}/{ID}/mine/pod{OTHER_POD}/docker-{OTHER}.scope"),
                Some(ID),
                Some("containerd"),
                Some(POD),
                Some("guaranteed"),
            ),
            (
                format!("/kubepods/besteffort/pod{POD}/mine/{OTHER}"),
                None,
                None,
                Some(POD),
                Some("besteffort"),
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/app.slice/pod{OTHER_POD}/burstable/kubepods-x"
                ),
                None,
                None,
                None,
                None,
            ),
            // kubepods only at the top: a delegated subtree cannot start one of its own.
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/x.service/kubepods/pod{OTHER_POD}/{OTHER}"
                ),
                Some(OTHER),
                Some("containerd"),
                None,
                None,
            ),
            (
                format!(
                    "/app.slice/kubepods-pod{}.slice",
                    OTHER_POD.replace('-', "_")
                ),
                None,
                None,
                None,
                None,
            ),
            (
                format!("/system.slice/docker-{ID}.scope/inner/docker-{OTHER}.scope"),
                Some(ID),
                Some("docker"),
                None,
                None,
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
    fn no_workload_id_without_a_value_for_the_template_or_with_a_dot_segment() {
        let f = |exe: &'static str, comm: &'static str, cgroup_path: &'static str| Fields {
            trust_domain: "example.org",
            node: "n",
            cgroup_path,
            uid: 1,
            gid: 1,
            exe,
            comm,
            container: "",
            pod: "",
        };
        let with_exe = "spiffe://{trust_domain}/cgroup{cgroup_path}/exe{exe}";
        let with_comm = "spiffe://{trust_domain}/cgroup{cgroup_path}/comm/{comm}";
        assert!(render(with_exe, &f("/usr/bin/agent", "agent", "/a")).is_some());
        // No executable known (exec'd after connecting, another user namespace): no id, not
        // one that leaves it out.
        assert_eq!(render(with_exe, &f("", "agent", "/a")), None);
        assert_eq!(render(with_comm, &f("/x", "", "/a")), None);
        assert_eq!(
            render("spiffe://{trust_domain}/pod/{pod}", &f("/x", "a", "/a")),
            None
        );
        // An agent naming itself `..` (or `.`) would make an id a normalising reader shortens.
        for comm in ["..", "."] {
            assert_eq!(render(with_comm, &f("/x", comm, "/a")), None, "{comm}");
        }
        assert!(render(with_comm, &f("/x", "..a", "/a")).is_some());
        // Deep paths, encoded three bytes to one, are no id past MAX_ID_BYTES.
        let deep: &'static str = Box::leak(format!("/{}", "%".repeat(700)).into_boxed_str());
        assert_eq!(render(DEFAULT_TEMPLATE, &f("/x", "a", deep)), None);
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
            render(DEFAULT_TEMPLATE, &f).as_deref(),
            Some("spiffe://example.org/node/node-1/cgroup/agents/team%20a/x%40y/uid/1000")
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
