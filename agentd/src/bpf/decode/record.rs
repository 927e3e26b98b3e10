//! The record's raw fields as values: C strings, addresses, the layer and verdict a BPF
//! program wrote, and the directory the kernel read for a relative path.

use std::{
    net::{IpAddr, Ipv6Addr},
    os::unix::ffi::OsStrExt as _,
    path::PathBuf,
};

use agentd_common::{EVENT_FLAG_DIR, RawEvent};

use crate::event::{Layer, Verdict};

/// The bytes of a NUL-terminated buffer before the NUL, lossily as UTF-8.
pub(super) fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The directory the kernel read for a relative path of this event ([`EVENT_FLAG_DIR`]:
/// `RawEvent::dir`, components innermost first), as an absolute path. `None` without the
/// flag, or when the record does not hold `dir_parts` plain components.
pub(super) fn kernel_dir(raw: &RawEvent) -> Option<PathBuf> {
    if raw.flags & EVENT_FLAG_DIR == 0 {
        return None;
    }
    let mut parts: Vec<&[u8]> = raw.dir.split(|&b| b == 0).collect();
    let n = usize::try_from(raw.dir_parts).ok()?;
    // n components, then what follows the last NUL (at least an empty piece).
    if parts.len() <= n {
        return None;
    }
    parts.truncate(n);
    let mut dir = PathBuf::from("/");
    for part in parts.iter().rev() {
        if part.is_empty() || *part == b"." || *part == b".." || part.contains(&b'/') {
            return None;
        }
        dir.push(std::ffi::OsStr::from_bytes(part));
    }
    Some(dir)
}

pub(super) fn layer_of_raw(raw: u8) -> Option<Layer> {
    match raw {
        x if x == agentd_common::Layer::Observed as u8 => None,
        x if x == agentd_common::Layer::Landlock as u8 => Some(Layer::Landlock),
        x if x == agentd_common::Layer::Seccomp as u8 => Some(Layer::Seccomp),
        x if x == agentd_common::Layer::Bpf as u8 => Some(Layer::Bpf),
        x if x == agentd_common::Layer::BpfLsm as u8 => Some(Layer::BpfLsm),
        _ => None,
    }
}

pub(super) fn verdict_of_raw(raw: u8) -> Verdict {
    match raw {
        x if x == agentd_common::Verdict::Allow as u8 => Verdict::Allow,
        x if x == agentd_common::Verdict::Killed as u8 => Verdict::Killed,
        // Deny, and anything unknown: never report an unknown verdict as allowed.
        _ => Verdict::Deny,
    }
}

/// An event's address: IPv4-mapped IPv6 shown as IPv4.
pub(super) fn ip_of(raw: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(raw);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use agentd_common::EventKind;

    use super::{
        super::fixtures::{raw, set_dir},
        *,
    };

    #[test]
    fn kernel_dir_reverses_the_components() {
        let mut r = raw(EventKind::Exec);
        assert_eq!(kernel_dir(&r), None);
        set_dir(&mut r, "/home/u/project");
        assert_eq!(kernel_dir(&r), Some(PathBuf::from("/home/u/project")));
        // Stale bytes after the last component are ignored.
        r.dir[20] = b'x';
        assert_eq!(kernel_dir(&r), Some(PathBuf::from("/home/u/project")));
        let mut root = raw(EventKind::Exec);
        set_dir(&mut root, "/");
        assert_eq!(kernel_dir(&root), Some(PathBuf::from("/")));
        // More components claimed than the buffer holds, or odd ones: not trusted.
        r.dir_parts = 200;
        assert_eq!(kernel_dir(&r), None);
        let mut dots = raw(EventKind::Exec);
        set_dir(&mut dots, "/a/../b");
        assert_eq!(kernel_dir(&dots), None);
    }
}
