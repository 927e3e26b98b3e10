//! The seccomp user-notification listener, and reading a held call's arguments out of the
//! calling process.
//!
//! A notified call sleeps in the kernel until the listener answers: continue (the kernel
//! runs the call, and every later check still applies) or fail with an errno. What the
//! call points at (a sockaddr, a path) lives in the caller's memory, which another thread
//! of the caller can change at any moment: what is read here is only used to *describe*
//! the call and to decide whether to hold it. What the call then does is decided again by
//! the kernel on its own copy (see `ask` for how an approval is bound to it).
//!
//! Reads use `process_vm_readv` and are followed by `SECCOMP_IOCTL_NOTIF_ID_VALID`: if the
//! notification is no longer valid, the thread died and its id may name another process,
//! so what was read is thrown away.

use std::{
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use nix::{
    sys::uio::{RemoteIoVec, process_vm_readv},
    unistd::Pid,
};

pub use crate::sandbox::seccomp::{Listener, Notif};

/// Reads `len` bytes at `addr` of process `tid`'s memory.
pub fn read_mem(tid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let pid = Pid::from_raw(i32::try_from(tid).map_err(|_| io::ErrorKind::InvalidInput)?);
    let base = usize::try_from(addr).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; len];
    let n = process_vm_readv(
        pid,
        &mut [IoSliceMut::new(&mut buf)],
        &[RemoteIoVec { base, len }],
    )?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads a NUL-terminated string of at most `max` bytes at `addr`, a page at a time (the
/// string may end just before an unmapped page).
pub fn read_cstr(tid: u32, addr: u64, max: usize) -> io::Result<Vec<u8>> {
    const PAGE: u64 = 4096;
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < max {
        let to_page_end = usize::try_from(PAGE - at % PAGE).unwrap_or(1);
        let want = to_page_end.min(max - out.len());
        let chunk = read_mem(tid, at, want)?;
        if chunk.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(end) = chunk.iter().position(|b| *b == 0) {
            out.extend_from_slice(&chunk[..end]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
        at += chunk.len() as u64;
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("longer than {max} bytes"),
    ))
}

/// An AF_INET or AF_INET6 sockaddr as (address, port); None for any other family (or
/// too short to be one).
pub fn inet_sockaddr(bytes: &[u8]) -> Option<(IpAddr, u16)> {
    let family = u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]);
    let port = u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]);
    match i32::from(family) {
        libc::AF_INET => {
            let a: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
            Some((IpAddr::V4(Ipv4Addr::from(a)), port))
        }
        libc::AF_INET6 => {
            let a: [u8; 16] = bytes.get(8..24)?.try_into().ok()?;
            let v6 = Ipv6Addr::from(a);
            // An IPv4-mapped destination is IPv4 to the rules.
            Some((v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4), port))
        }
        _ => None,
    }
}

/// The thread group (process) of thread `tid`.
pub fn tgid_of(tid: u32) -> io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Tgid in status"))
}

/// A copy of process `pid`'s descriptor `fd` (`pidfd_getfd`, close-on-exec).
pub fn pidfd_getfd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: pidfd_open takes no pointers.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new descriptor this function owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: pidfd_getfd takes no pointers.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0u32) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd returned a new descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as RawFd) })
}

/// The IPPROTO of the socket `fd` of process `tgid` (a copy of the descriptor is taken with
/// `pidfd_getfd` and asked); None when `fd` is not an inet socket.
pub fn socket_protocol(tgid: u32, fd: u64) -> io::Result<Option<u8>> {
    let fd = i32::try_from(fd).map_err(|_| io::ErrorKind::InvalidInput)?;
    let copy = pidfd_getfd(tgid, fd)?;
    let domain = sockopt(&copy, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Ok(None);
    }
    let proto = sockopt(&copy, libc::SO_PROTOCOL)?;
    Ok(u8::try_from(proto).ok())
}

fn sockopt(fd: &OwnedFd, opt: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to `v`, an int of that size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// A process's command line, arguments joined by spaces, at most `max` bytes, lossy.
pub fn cmdline(pid: u32, max: usize) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut s: String = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// A process's parent (from /proc/PID/stat; the field after the parenthesised name).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_sockaddrs_are_read_v4_v6_and_mapped() {
        // AF_INET, port 443, 93.184.216.34
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&443u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[93, 184, 216, 34]);
        assert_eq!(
            inet_sockaddr(&v4),
            Some(("93.184.216.34".parse().unwrap(), 443))
        );
        let mut v6 = vec![0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&80u16.to_be_bytes());
        v6[8..24].copy_from_slice(&"::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(inet_sockaddr(&v6), Some(("10.1.2.3".parse().unwrap(), 80)));
        v6[8..24].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        assert_eq!(inet_sockaddr(&v6), Some(("::1".parse().unwrap(), 80)));
        let unix = (libc::AF_UNIX as u16).to_ne_bytes();
        assert_eq!(inet_sockaddr(&unix), None);
        assert_eq!(inet_sockaddr(&v4[..6]), None, "too short");
    }

    #[test]
    fn own_memory_and_process_are_read() {
        let s = b"hello\0world";
        let me = std::process::id();
        let got = read_cstr(me, s.as_ptr() as u64, 64).unwrap();
        assert_eq!(got, b"hello");
        assert!(read_cstr(me, s.as_ptr() as u64, 3).is_err(), "too long");
        assert_eq!(tgid_of(me).unwrap(), me);
        assert!(parent_of(me).is_some());
        assert!(!cmdline(me, 4096).is_empty());
        assert!(cmdline(me, 3).len() <= 3 + '…'.len_utf8());
    }

    #[test]
    fn a_socket_says_its_protocol() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let me = std::process::id();
        assert_eq!(
            socket_protocol(me, l.as_raw_fd() as u64).unwrap(),
            Some(libc::IPPROTO_TCP as u8)
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(socket_protocol(me, a.as_raw_fd() as u64).unwrap(), None);
    }
}
