//! Who is on the other end of a loopback connection: the user id that owns the peer's socket,
//! as the kernel recorded it when the socket was made. On Linux one exact `sock_diag` netlink
//! lookup by the connection's four-tuple (what `ss -e` shows); elsewhere unknown.
//!
//! Why a user and not a process: a process id is not sound for sharing out connections. A
//! process forks new ids at will, so a share per process is as many shares as an attacker
//! likes; a socket can be inherited or passed to another process, so "the socket's process" is
//! not one thing; and the kernel offers no lookup from a TCP socket to a process short of
//! scanning every process's file descriptors, per connection, which an attacker could make the
//! daemon do at will (and which fails for other users' processes). The owning uid is recorded by
//! the kernel at `socket()`, cannot be forged or multiplied without another account, and costs
//! one netlink round trip.

use std::net::SocketAddr;

/// The uid owning the client's end of a connection accepted on `local` from `peer`, if the
/// kernel says.
#[cfg(target_os = "linux")]
pub fn peer_uid(local: SocketAddr, peer: SocketAddr) -> Option<u32> {
    linux::lookup(local, peer).ok().flatten()
}

#[cfg(not(target_os = "linux"))]
pub fn peer_uid(_local: SocketAddr, _peer: SocketAddr) -> Option<u32> {
    None
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::mem::size_of;
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    // Linux uapi: <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>.
    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const INET_DIAG_NOCOOKIE: u32 = !0;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct NlMsgHdr {
        len: u32,
        kind: u16,
        flags: u16,
        seq: u32,
        pid: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct InetDiagSockId {
        sport: u16, // network byte order
        dport: u16,
        src: [u32; 4],
        dst: [u32; 4],
        interface: u32,
        cookie: [u32; 2],
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct InetDiagReqV2 {
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: InetDiagSockId,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct InetDiagMsg {
        family: u8,
        state: u8,
        timer: u8,
        retrans: u8,
        id: InetDiagSockId,
        expires: u32,
        rqueue: u32,
        wqueue: u32,
        uid: u32,
        inode: u32,
    }

    #[repr(C)]
    struct Request {
        header: NlMsgHdr,
        body: InetDiagReqV2,
    }

    fn words(ip: IpAddr) -> [u32; 4] {
        match ip {
            IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            IpAddr::V6(v6) => {
                let o = v6.octets();
                std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
            }
        }
    }

    /// Asks for the one TCP socket whose source is `peer` and destination `local`: the client's.
    pub fn lookup(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
        let family = if peer.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let request = Request {
            header: NlMsgHdr { len: size_of::<Request>() as u32, kind: SOCK_DIAG_BY_FAMILY, flags: NLM_F_REQUEST, seq: 1, pid: 0 },
            body: InetDiagReqV2 {
                family: family as u8,
                protocol: libc::IPPROTO_TCP as u8,
                states: !0,
                id: InetDiagSockId {
                    sport: peer.port().to_be(),
                    dport: local.port().to_be(),
                    src: words(peer.ip()),
                    dst: words(local.ip()),
                    interface: 0,
                    cookie: [INET_DIAG_NOCOOKIE; 2],
                },
                ..InetDiagReqV2::default()
            },
        };
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: the request is a plain repr(C) value of the size passed; the address is a
        // zeroed sockaddr_nl naming the kernel.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                (&request as *const Request).cast(),
                size_of::<Request>(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        // A reply never comes when the kernel lacks sock_diag support: do not wait for it.
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        // SAFETY: setsockopt with a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let mut buf = [0u8; 1024];
        // SAFETY: recv into a buffer of the length passed.
        let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = got as usize;
        if got < size_of::<NlMsgHdr>() {
            return Ok(None);
        }
        // SAFETY: at least a header's worth of bytes were received; read_unaligned copies them.
        let header: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        if header.kind == NLMSG_ERROR || header.kind != SOCK_DIAG_BY_FAMILY {
            return Ok(None);
        }
        if got < size_of::<NlMsgHdr>() + size_of::<InetDiagMsg>() {
            return Ok(None);
        }
        // SAFETY: as above, for the message that follows the header.
        let msg: InetDiagMsg = unsafe { std::ptr::read_unaligned(buf[size_of::<NlMsgHdr>()..].as_ptr().cast()) };
        // The kernel matched on the four-tuple; check it answered about the socket asked for.
        let same = msg.id.sport == peer.port().to_be() && msg.id.dport == local.port().to_be();
        Ok(same.then_some(msg.uid))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_names_our_own_uid_for_our_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        assert_eq!(peer_uid(listener.local_addr().unwrap(), peer), Some(me));
        // A four-tuple that is not a connection names nobody.
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(peer_uid(listener.local_addr().unwrap(), nobody), None);
    }
}
