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

/// Whether the network namespace open as `ns` is the one scanned (`inode`): its process may
/// have exited, and its pid gone to a process elsewhere, since.
pub fn check_scanned(ns: &std::fs::File, inode: u64) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let opened = ns.metadata()?.ino();
    if opened != inode {
        return Err(io::Error::other(format!(
            "the namespace changed under its process (inode {opened}, scanned {inode})"
        )));
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
    fn a_namespace_is_taken_only_under_its_scanned_inode() {
        use std::os::unix::fs::MetadataExt;
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let inode = ns.metadata().unwrap().ino();
        super::check_scanned(&ns, inode).unwrap();
        let e = super::check_scanned(&ns, inode + 1).unwrap_err();
        assert!(e.to_string().contains("changed under its process"), "{e}");
    }
}
