//! The packet device: a descriptor (Apple's utun, a Linux TUN, or a socketpair standing in for
//! utun in tests), read and written without blocking. utun puts a 4-byte big-endian address
//! family in front of every packet; RAW (Linux IFF_NO_PI) has none.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// How packets are framed on the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// utun: the platform's AF_INET / AF_INET6, 4 bytes big-endian, then the packet.
    Utun,
    /// Bare IP packets.
    Raw,
}

pub(crate) const AF_HEADER: usize = 4;

/// The address family an IP packet needs in front of it on utun (None: not IPv4 or IPv6).
pub fn family_of(pkt: &[u8]) -> Option<u32> {
    match pkt.first()? >> 4 {
        4 => Some(libc::AF_INET as u32),
        6 => Some(libc::AF_INET6 as u32),
        _ => None,
    }
}

/// The header utun wants in front of `pkt`.
pub fn header_for(pkt: &[u8]) -> Option<[u8; AF_HEADER]> {
    family_of(pkt).map(u32::to_be_bytes)
}

/// Whether a framed packet's header names the family its IP version says (a packet whose
/// header lies is dropped: the kernel would have routed it by the header).
pub fn header_matches(framed: &[u8]) -> bool {
    let Some((head, pkt)) = framed.split_first_chunk::<AF_HEADER>() else {
        return false;
    };
    family_of(pkt) == Some(u32::from_be_bytes(*head))
}

/// What one read gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Nothing,
    /// A packet whose AF header does not match its IP version.
    Dropped,
    /// A packet in `buf[at..at + len]`.
    Packet {
        at: usize,
        len: usize,
    },
}

/// The device descriptor: the library's own dup of the host's, non-blocking.
pub struct Device {
    fd: OwnedFd,
    framing: Framing,
}

impl Device {
    /// Dups `fd` (the host keeps its own) and makes the dup non-blocking.
    pub fn dup(fd: RawFd, framing: Framing) -> io::Result<Device> {
        if fd < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no descriptor given",
            ));
        }
        // SAFETY: fcntl on a caller's descriptor number; a bad one gives EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor that we own.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Device { fd, framing })
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one packet into `buf` with at least `headroom` free bytes in front of it (the AF
    /// header, if any, is read in front of the packet, so the packet lands where the engine
    /// wants it with no copy).
    pub fn read(&self, buf: &mut [u8], headroom: usize) -> io::Result<Read> {
        let at = headroom.max(AF_HEADER);
        let start = match self.framing {
            Framing::Utun => at - AF_HEADER,
            Framing::Raw => at,
        };
        let dst = &mut buf[start..];
        // SAFETY: reading into a buffer of dst.len() bytes that we borrow mutably.
        let n = unsafe { libc::read(self.raw(), dst.as_mut_ptr().cast(), dst.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Read::Nothing),
                _ => Err(e),
            };
        }
        let n = n as usize;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the device was closed",
            ));
        }
        match self.framing {
            Framing::Raw => Ok(Read::Packet { at, len: n }),
            Framing::Utun if header_matches(&dst[..n]) => Ok(Read::Packet {
                at,
                len: n - AF_HEADER,
            }),
            Framing::Utun => Ok(Read::Dropped),
        }
    }

    /// Writes one packet. Ok(false): the device's queue is full (or the packet has no IP
    /// version), so it was dropped, as a full NIC would.
    pub fn write(&self, pkt: &[u8]) -> io::Result<bool> {
        let n = match self.framing {
            Framing::Raw => {
                // SAFETY: writing pkt.len() bytes from a borrowed slice.
                unsafe { libc::write(self.raw(), pkt.as_ptr().cast(), pkt.len()) }
            }
            Framing::Utun => {
                let Some(head) = header_for(pkt) else {
                    return Ok(false);
                };
                // One writev: utun (and a SOCK_DGRAM socketpair) takes it as one packet.
                let iov = [
                    libc::iovec {
                        iov_base: head.as_ptr() as *mut libc::c_void,
                        iov_len: head.len(),
                    },
                    libc::iovec {
                        iov_base: pkt.as_ptr() as *mut libc::c_void,
                        iov_len: pkt.len(),
                    },
                ];
                // SAFETY: both iovecs point at live, borrowed memory of the stated lengths.
                unsafe { libc::writev(self.raw(), iov.as_ptr(), 2) }
            }
        };
        if n >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ENOSPC) | Some(libc::ENOBUFS) | Some(libc::EINTR) => {
                Ok(false)
            }
            _ => Err(e),
        }
    }
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: [u8; 20] = [
        0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];

    fn v6() -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = 17;
        p
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two descriptors that we then own.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: fresh descriptors.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, b: &[u8]) {
        // SAFETY: a borrowed slice.
        let n = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        assert_eq!(n as usize, b.len());
    }

    fn recv(fd: &OwnedFd) -> Vec<u8> {
        let mut b = vec![0u8; 2048];
        // SAFETY: a borrowed buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        assert!(n >= 0);
        b.truncate(n as usize);
        b
    }

    #[test]
    fn headers_are_the_platform_family_big_endian() {
        assert_eq!(header_for(&V4), Some((libc::AF_INET as u32).to_be_bytes()));
        assert_eq!(
            header_for(&v6()),
            Some((libc::AF_INET6 as u32).to_be_bytes())
        );
        assert_eq!(header_for(&[0x10, 0]), None);
        assert_eq!(header_for(&[]), None);
        assert_eq!(&header_for(&V4).unwrap(), &[0, 0, 0, 2]);
    }

    #[test]
    fn both_families_cross_a_socketpair_and_a_wrong_family_is_dropped() {
        let (ours, theirs) = pair();
        let dev = Device::dup(ours.as_raw_fd(), Framing::Utun).unwrap();
        drop(ours); // The device holds its own dup.
        let mut buf = vec![0u8; 4096];
        assert_eq!(
            dev.read(&mut buf, 1).unwrap(),
            Read::Nothing,
            "non-blocking"
        );

        for pkt in [V4.to_vec(), v6()] {
            let mut framed = header_for(&pkt).unwrap().to_vec();
            framed.extend_from_slice(&pkt);
            for headroom in [0, 1, 64] {
                send(&theirs, &framed);
                let Read::Packet { at, len } = dev.read(&mut buf, headroom).unwrap() else {
                    panic!("no packet")
                };
                assert!(at >= headroom);
                assert_eq!(&buf[at..at + len], &pkt[..]);
            }

            assert!(dev.write(&pkt).unwrap());
            assert_eq!(recv(&theirs), framed);
        }
        // An IPv4 packet that says AF_INET6, and an IPv6 one that says AF_INET.
        for (af, pkt) in [(libc::AF_INET6, V4.to_vec()), (libc::AF_INET, v6())] {
            let mut framed = (af as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(&pkt);
            assert!(!header_matches(&framed));
            send(&theirs, &framed);
            assert_eq!(dev.read(&mut buf, 1).unwrap(), Read::Dropped);
        }
        // Host byte order (Mullvad's mistake) is wrong too on a little-endian machine.
        let mut framed = (libc::AF_INET as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&V4);
        assert_eq!(header_matches(&framed), cfg!(target_endian = "big"));
        assert!(!header_matches(&[0, 0, 0]));
    }

    #[test]
    fn raw_framing_passes_packets_bare() {
        let (ours, theirs) = pair();
        let dev = Device::dup(ours.as_raw_fd(), Framing::Raw).unwrap();
        send(&theirs, &V4);
        let mut buf = vec![0u8; 4096];
        assert_eq!(
            dev.read(&mut buf, 16).unwrap(),
            Read::Packet {
                at: 16,
                len: V4.len()
            }
        );
        assert_eq!(&buf[16..16 + V4.len()], &V4);
        assert!(dev.write(&V4).unwrap());
        assert_eq!(recv(&theirs), V4);
        assert!(Device::dup(-1, Framing::Raw).is_err());
    }
}
