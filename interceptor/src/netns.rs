//! Network-namespace cookies: the kernel keys its records by them so that identical tuples in
//! two namespaces never collide.

use std::{io, os::fd::AsRawFd};

/// `SO_NETNS_COOKIE` (Linux >= 5.14; not yet in the libc crate).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace `socket` lives in.
pub fn cookie_of(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and an out-buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `NS_GET_USERNS` (`_IO(0xb7, 0x1)`): the user namespace that owns a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;
/// `NS_GET_OWNER_UID` (`_IO(0xb7, 0x4)`): the uid that made a user namespace.
const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;

/// Whether the network namespace open as `ns` is the one scanned (`inode`: its process may
/// have exited and its pid gone to a process elsewhere since) and one the daemon serves: owned
/// by the daemon's own user namespace, or by one root made (a container runtime's, for a pod
/// with user namespaces). A namespace an unprivileged agent made for itself (`unshare -rn`:
/// owned by a user namespace its own uid made) gets no listener, so its MCP connects stay
/// refused; served, an agent could make a thousand of them and fill the listener map for
/// every other namespace on the node.
pub fn check_served(ns: &std::fs::File, inode: u64) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let opened = ns.metadata()?.ino();
    if opened != inode {
        return Err(io::Error::other(format!(
            "the namespace changed under its process (inode {opened}, scanned {inode})"
        )));
    }
    // SAFETY: an ioctl without argument on a valid descriptor; a descriptor it returns is ours.
    let owner = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS) };
    if owner < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, owned by nothing else.
    let owner = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(owner) };
    let own = std::fs::metadata("/proc/self/ns/user")?;
    let meta = owner.metadata()?;
    let mut made_by: libc::uid_t = libc::uid_t::MAX;
    // SAFETY: a valid user-namespace descriptor and a pointer to a uid_t.
    let rc = unsafe { libc::ioctl(owner.as_raw_fd(), NS_GET_OWNER_UID, &mut made_by) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (meta.dev(), meta.ino()) != (own.dev(), own.ino()) && made_by != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "it belongs to a user namespace uid {made_by} made (without privilege, e.g. \
                 `unshare -rn`); only namespaces of the host's user namespace, or of one root \
                 made, get a listener"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sockets_in_one_namespace_share_a_cookie() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ca = super::cookie_of(&a).unwrap();
        assert_ne!(ca, 0);
        assert_eq!(ca, super::cookie_of(&b).unwrap());
    }

    #[test]
    fn the_own_namespace_is_served_and_only_under_its_inode() {
        use std::os::unix::fs::MetadataExt;
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let inode = ns.metadata().unwrap().ino();
        super::check_served(&ns, inode).unwrap();
        let e = super::check_served(&ns, inode + 1).unwrap_err();
        assert!(e.to_string().contains("changed under its process"), "{e}");
    }
}
