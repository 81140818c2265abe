//! Connected IPv4 UDP sockets through the kernel's sock_diag netlink
//! interface: list them (`SOCK_DIAG_BY_FAMILY`) and abort one
//! (`SOCK_DESTROY`, which needs `CONFIG_INET_DIAG_DESTROY`). A
//! [`DiagSocket`] sees the network namespace of the thread that opened it.
//!
//! Hand-written rather than through a netlink crate: the crates of the
//! field list sockets but none sends `SOCK_DESTROY`, and the two messages
//! needed here are fixed-size structures.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// A connected UDP socket's `sk_state`.
const TCP_ESTABLISHED: u32 = 1;

const HEADER_LEN: usize = 16;
/// `struct inet_diag_sockid`.
const SOCK_ID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQUEST_LEN: usize = 8 + SOCK_ID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans, the id, then
/// five u32 (expires, rqueue, wqueue, uid, inode).
const MESSAGE_LEN: usize = 4 + SOCK_ID_LEN + 20;

/// One connected UDP socket as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectedUdp {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// The socket cookie (what `bpf_get_socket_cookie` returns).
    pub cookie: u64,
    /// `struct inet_diag_sockid` as listed, sent back to destroy it.
    id: [u8; SOCK_ID_LEN],
}

impl ConnectedUdp {
    /// The identity of a socket of this process, to destroy it (the
    /// start-up probe).
    pub fn of_own(local: SocketAddrV4, remote: SocketAddrV4, cookie: u64) -> Self {
        let mut id = [0u8; SOCK_ID_LEN];
        id[0..2].copy_from_slice(&local.port().to_be_bytes());
        id[2..4].copy_from_slice(&remote.port().to_be_bytes());
        id[4..8].copy_from_slice(&local.ip().octets());
        id[20..24].copy_from_slice(&remote.ip().octets());
        // The interface (36..40) stays 0: any.
        id[40..44].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id[44..48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        Self {
            local,
            remote,
            cookie,
            id,
        }
    }

    fn from_id(id: [u8; SOCK_ID_LEN]) -> Self {
        let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
        let address = |at: usize| Ipv4Addr::new(id[at], id[at + 1], id[at + 2], id[at + 3]);
        let word = |at: usize| u32::from_ne_bytes([id[at], id[at + 1], id[at + 2], id[at + 3]]);
        Self {
            local: SocketAddrV4::new(address(4), port(0)),
            remote: SocketAddrV4::new(address(20), port(2)),
            cookie: u64::from(word(40)) | (u64::from(word(44)) << 32),
            id,
        }
    }
}

/// A NETLINK_SOCK_DIAG socket, bound to the network namespace it was
/// opened in.
pub struct DiagSocket {
    fd: OwnedFd,
    sequence: u32,
}

impl DiagSocket {
    pub fn open() -> io::Result<Self> {
        // SAFETY: socket() has no memory preconditions; the descriptor is
        // owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A reply that never comes must not hang the caller.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: the option value is a timeval of the size passed.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, sequence: 0 })
    }

    /// Every connected IPv4 UDP socket of this namespace.
    pub fn connected_udp(&mut self) -> io::Result<Vec<ConnectedUdp>> {
        let sequence = self.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            1 << TCP_ESTABLISHED,
            &[0u8; SOCK_ID_LEN],
        )?;
        let mut sockets = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let received = self.receive(&mut buffer)?;
            for message in messages(&buffer[..received]) {
                let (kind, seq, body) = message?;
                if seq != sequence {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(sockets),
                    NLMSG_ERROR => match error_code(body)? {
                        0 => {}
                        code => return Err(io::Error::from_raw_os_error(code)),
                    },
                    SOCK_DIAG_BY_FAMILY => sockets.push(parse_message(body)?),
                    _ => {}
                }
            }
        }
    }

    /// Aborts `socket`: its owner's next call fails with ECONNABORTED and
    /// the socket is no longer connected. ENOENT: it is gone already;
    /// EOPNOTSUPP: the kernel lacks CONFIG_INET_DIAG_DESTROY.
    pub fn destroy(&mut self, socket: &ConnectedUdp) -> io::Result<()> {
        let sequence = self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 0, &socket.id)?;
        let mut buffer = vec![0u8; 4096];
        loop {
            let received = self.receive(&mut buffer)?;
            for message in messages(&buffer[..received]) {
                let (kind, seq, body) = message?;
                if seq == sequence && kind == NLMSG_ERROR {
                    return match error_code(body)? {
                        0 => Ok(()),
                        code => Err(io::Error::from_raw_os_error(code)),
                    };
                }
            }
        }
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        states: u32,
        id: &[u8; SOCK_ID_LEN],
    ) -> io::Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut request = Vec::with_capacity(HEADER_LEN + REQUEST_LEN);
        request.extend_from_slice(&((HEADER_LEN + REQUEST_LEN) as u32).to_ne_bytes());
        request.extend_from_slice(&kind.to_ne_bytes());
        request.extend_from_slice(&flags.to_ne_bytes());
        request.extend_from_slice(&self.sequence.to_ne_bytes());
        request.extend_from_slice(&0u32.to_ne_bytes());
        request.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_UDP as u8, 0, 0]);
        request.extend_from_slice(&states.to_ne_bytes());
        request.extend_from_slice(id);
        // SAFETY: a zeroed sockaddr_nl is valid (the kernel, pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffer and the address are valid for the lengths
        // passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.sequence)
    }

    fn receive(&self, buffer: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for writes of its length.
        let received = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(received as usize)
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed sock_diag reply: {what}"),
    )
}

/// The netlink messages of one datagram: (type, sequence, body).
fn messages(datagram: &[u8]) -> impl Iterator<Item = io::Result<(u16, u32, &[u8])>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.len() < HEADER_LEN {
            return None;
        }
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if length < HEADER_LEN || length > rest.len() {
            rest = &[];
            return Some(Err(malformed("message length")));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let sequence = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let body = &rest[HEADER_LEN..length];
        // Messages are 4-byte aligned within the datagram.
        let next = length.next_multiple_of(4).min(rest.len());
        rest = &rest[next..];
        Some(Ok((kind, sequence, body)))
    })
}

/// The (positive) errno of an NLMSG_ERROR body; 0 is an acknowledgement.
fn error_code(body: &[u8]) -> io::Result<i32> {
    let bytes: [u8; 4] = body
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed("short error message"))?;
    Ok(-i32::from_ne_bytes(bytes))
}

fn parse_message(body: &[u8]) -> io::Result<ConnectedUdp> {
    if body.len() < MESSAGE_LEN {
        return Err(malformed("short inet_diag_msg"));
    }
    let id: [u8; SOCK_ID_LEN] = body[4..4 + SOCK_ID_LEN]
        .try_into()
        .map_err(|_| malformed("socket id"))?;
    Ok(ConnectedUdp::from_id(id))
}

/// The cookie of one of this process's sockets.
pub fn socket_cookie(socket: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut length = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the value buffer is a u64 of the length passed.
    let got = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut length,
        )
    };
    if got != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn a_socket_id_reads_back_as_written() {
        let local = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 40_000);
        let remote = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 7), 53);
        let cookie = 0x1234_5678_9abc_def0;
        let written = ConnectedUdp::of_own(local, remote, cookie);
        assert_eq!(ConnectedUdp::from_id(written.id), written);
    }

    #[test]
    fn messages_are_split_at_their_aligned_lengths_and_a_bad_length_stops() {
        let mut datagram = Vec::new();
        for (kind, body_len) in [(20u16, 5usize), (3, 4)] {
            let length = HEADER_LEN + body_len;
            datagram.extend_from_slice(&(length as u32).to_ne_bytes());
            datagram.extend_from_slice(&kind.to_ne_bytes());
            datagram.extend_from_slice(&0u16.to_ne_bytes());
            datagram.extend_from_slice(&7u32.to_ne_bytes());
            datagram.extend_from_slice(&0u32.to_ne_bytes());
            datagram.extend(std::iter::repeat_n(0xaa, body_len));
            datagram.resize(datagram.len().next_multiple_of(4), 0);
        }
        let parsed: Vec<_> = messages(&datagram).map(|m| m.unwrap()).collect();
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[0].0, parsed[0].1, parsed[0].2.len()), (20, 7, 5));
        assert_eq!((parsed[1].0, parsed[1].2.len()), (3, 4));

        datagram[0] = 200;
        assert!(messages(&datagram).next().unwrap().is_err());
    }

    /// Against the kernel of this machine (needs CAP_NET_ADMIN): a
    /// connected socket of ours is listed with its cookie, and destroying
    /// it makes its next call fail with ECONNABORTED.
    #[test]
    fn a_connected_socket_is_listed_and_destroyed() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect("127.0.0.1:9").unwrap();
        let cookie = socket_cookie(&socket).unwrap();
        let mut diag = DiagSocket::open().unwrap();
        let listed = diag.connected_udp().unwrap();
        let ours = listed
            .iter()
            .find(|s| s.cookie == cookie)
            .expect("our socket is listed");
        assert_eq!(ours.remote, "127.0.0.1:9".parse().unwrap());
        assert_eq!(SocketAddr::V4(ours.local), socket.local_addr().unwrap());
        diag.destroy(ours).unwrap();
        let error = socket.take_error().unwrap().expect("an error is pending");
        assert_eq!(error.raw_os_error(), Some(libc::ECONNABORTED));
        assert!(
            !diag
                .connected_udp()
                .unwrap()
                .iter()
                .any(|s| s.cookie == cookie),
            "a destroyed socket is no longer connected"
        );
        assert_eq!(
            diag.destroy(ours).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
    }
}
