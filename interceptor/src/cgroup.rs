//! cgroup v2 paths and ids.
//!
//! The cgroup v2 mount is found from `/proc/self/mountinfo` (hybrid hosts mount it at
//! `/sys/fs/cgroup/unified`, unified ones at `/sys/fs/cgroup`). A cgroup's id — what
//! `bpf_get_current_cgroup_id()` returns — is the inode number of its directory.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Errors finding or resolving cgroups.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/proc/self/mountinfo` has no cgroup2 mount.
    #[error(
        "no cgroup v2 filesystem is mounted (looked in /proc/self/mountinfo); mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    /// Reading `/proc/self/mountinfo` failed.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(io::Error),
    /// The cgroup directory does not exist or cannot be read.
    #[error(
        "cgroup {cgroup} ({dir}) cannot be used: {error}; create it first (mkdir) or fix the path"
    )]
    Missing {
        cgroup: String,
        dir: PathBuf,
        error: io::Error,
    },
}

/// The cgroup v2 mount point of this host.
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(Error::Mountinfo)?;
    parse_mountinfo(&text).ok_or(Error::NoCgroup2)
}

fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a [`Hierarchy::delegation_warning`] is about.
#[derive(Debug, Clone, Copy)]
pub enum Act {
    Tag,
    Revoke,
}

/// A cgroup v2 hierarchy rooted at its mount point.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    pub mount: PathBuf,
}

impl Hierarchy {
    /// The host's cgroup v2 hierarchy.
    pub fn discover() -> Result<Self, Error> {
        Ok(Self {
            mount: cgroup2_mount()?,
        })
    }

    /// The directory of `cgroup` (a path relative to the mount, starting with `/`).
    pub fn dir(&self, cgroup: &str) -> PathBuf {
        self.mount.join(cgroup.trim_start_matches('/'))
    }

    /// The id of `cgroup`, which must exist.
    pub fn id(&self, cgroup: &str) -> Result<u64, Error> {
        let dir = self.dir(cgroup);
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(m.ino()),
            Ok(_) => Err(Error::Missing {
                cgroup: cgroup.to_owned(),
                dir,
                error: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            }),
            Err(error) => Err(Error::Missing {
                cgroup: cgroup.to_owned(),
                dir,
                error,
            }),
        }
    }

    /// Why a tag on `cgroup` may not hold: the highest of its ancestors (below the root) that
    /// a user other than root may move processes in and out of (its `cgroup.procs` that
    /// user's, or writable by group or others: a delegated subtree, systemd's `Delegate=yes`
    /// or a user's `user@UID.service`). That user's processes in `cgroup` can move to a
    /// cgroup of that ancestor outside `cgroup`, away from the tag.
    pub fn delegation_warning(&self, cgroup: &str, act: Act) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let mut highest = None;
        let mut path = cgroup.trim_end_matches('/');
        while let Some((parent, _)) = path.rsplit_once('/') {
            if parent.is_empty() {
                break;
            }
            if let Ok(m) = std::fs::metadata(self.dir(parent).join("cgroup.procs"))
                && (m.uid() != 0 || m.permissions().mode() & 0o022 != 0)
            {
                highest = Some((parent.to_owned(), m.uid()));
            }
            path = parent;
        }
        let (ancestor, uid) = highest?;
        let (done, verb) = match act {
            Act::Tag => ("tagged", "tag"),
            Act::Revoke => ("revoked", "revoke"),
        };
        Some(format!(
            "{ancestor}, above {done} {cgroup}, is delegated (uid {uid} may move processes \
             within it): that user's processes can leave {cgroup} for a cgroup below \
             {ancestor} that is not {done}; {verb} {ancestor} instead"
        ))
    }

    /// Opens `cgroup`'s directory (to attach programs to it).
    pub fn open(&self, cgroup: &str) -> Result<std::fs::File, Error> {
        let dir = self.dir(cgroup);
        std::fs::File::open(&dir).map_err(|error| Error::Missing {
            cgroup: cgroup.to_owned(),
            dir,
            error,
        })
    }
}

/// The cgroup v2 path of process `pid` (from `/proc/<pid>/cgroup`, the `0::` line).
pub fn process_cgroup(pid: u32) -> io::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 entry"))
}

/// Is `path` on a mounted bpffs?
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as u64 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_with_optional_fields_and_escapes() {
        let text = "29 23 0:26 / /sys/fs/my\\040cg rw,nosuid shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_mountinfo(text), Some(PathBuf::from("/sys/fs/my cg")));
        assert_eq!(parse_mountinfo("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn process_cgroup_of_self() {
        let p = process_cgroup(std::process::id()).expect("own cgroup");
        assert!(p.starts_with('/'), "{p}");
    }
}
