//! CompiledPolicy -> the binary map entries the BPF programs read. Pure; each encoder says
//! the byte layout it produces (the types live in agentd-common, shared with the kernel
//! side).

use std::{
    os::unix::ffi::OsStrExt as _,
    path::{Component, Path},
};

use agentd_common::{
    AGENT_FLAG_CANARIES, AGENT_FLAG_INET, AGENT_FLAG_INET6, AGENT_FLAG_KILL_ON_LOSS,
    AGENT_FLAG_MONITOR, AGENT_FLAG_NETLINK_ROUTE, AGENT_FLAG_PROTECT, AGENT_FLAG_TRIP_BIND,
    AGENT_FLAG_TRIP_CANARY, AGENT_FLAG_TRIP_CONNECT, AGENT_FLAG_TRIP_EXEC, AGENT_FLAG_TRIP_READ,
    AGENT_FLAG_TRIP_SOCKET, AGENT_FLAG_TRIP_SYSCALL, AGENT_FLAG_TRIP_WRITE, AgentState, BindKey,
    CanaryInode, CanaryKey, CanaryPath, GuardedName, MAX_CANARIES, MAX_CGROUP_LEVEL,
    NET_KEY_FIXED_BITS, NetKey, PATH_LEN,
};

use crate::profile::{
    Action, BindRule, BreakerPolicy, CompiledPolicy, Mode, NetEntry, OnEventLoss, SocketFamily,
    ViolationKind,
};

/// Every map entry of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEntries {
    pub state: AgentState,
    /// `NET_ALLOW` LPM-trie keys: (prefix length in bits, data).
    pub net: Vec<(u32, NetKey)>,
    pub bind: Vec<BindKey>,
    pub canaries: Vec<(CanaryKey, CanaryPath)>,
    /// `CANARY_INODES` entries (key, canary index): filled by `Watch::add_agent`, which
    /// stats the canaries (see [`canary_inode_keys`]).
    pub canary_inodes: Vec<(CanaryInode, u32)>,
    /// `GUARDED` entries (key, `GUARD_*` bits) and `GUARDED_NAMES` entries (key,
    /// `NAME_*` bits): filled by `Watch::add_agent`, which finds the protected paths and
    /// the directories of the allowed unix sockets on disk (see [`guard_plan`]).
    pub guarded: Vec<(CanaryInode, u32)>,
    pub guarded_names: Vec<(GuardedName, u8)>,
}

/// A `NET_ALLOW` key for one connect rule.
///
/// Bytes: `policy_id` big-endian (4) | proto (1) | 0 (1) | port big-endian (2) | IPv6
/// address (16, IPv4 as ::ffff:a.b.c.d). The trie matches the first `prefixlen` bits in
/// that order, so `prefixlen = 64 + the rule's IPv6 prefix`: policy, protocol and port
/// always match exactly, the address by prefix. Port 0 is the rule for every port; the
/// program looks up the real port, then 0.
pub fn net_key(policy_id: u32, e: &NetEntry) -> (u32, NetKey) {
    (
        NET_KEY_FIXED_BITS + u32::from(e.prefix),
        NetKey {
            policy_id_be: policy_id.to_be(),
            proto: e.proto,
            _pad: 0,
            port_be: e.port.to_be(),
            addr: e.addr.octets(),
        },
    )
}

/// A `BIND_ALLOW` key: `policy_id` (native endian, 4) | proto (1) | 0 (1) | port (native
/// endian, 2): an exact-match hash key, compared as bytes with what the program builds.
pub fn bind_key(policy_id: u32, r: &BindRule) -> BindKey {
    BindKey {
        policy_id,
        proto: r.proto.number(),
        _pad: 0,
        port: r.port,
    }
}

/// A `CANARIES` value: the path's length, then its bytes zero-padded to [`PATH_LEN`] and
/// packed little-endian into words (byte `i` in bits `8 * (i % 8)` of word `i / 8`),
/// which is what the program's eight-bytes-at-a-time compare reads from its path buffer.
pub fn canary_path(path: &Path) -> Result<CanaryPath, String> {
    let bytes = path.as_os_str().as_bytes();
    if !path.is_absolute() {
        return Err(format!("canary {} is not absolute", path.display()));
    }
    if bytes.len() >= PATH_LEN {
        return Err(format!(
            "canary {} is {} bytes long; the kernel compares at most {}",
            path.display(),
            bytes.len(),
            PATH_LEN - 1
        ));
    }
    if bytes.contains(&0) {
        return Err(format!("canary {} contains a NUL byte", path.display()));
    }
    // Trailing slashes would never match the component-boundary test.
    let trimmed = match bytes {
        [rest @ .., b'/'] if !rest.is_empty() => rest,
        other => other,
    };
    let mut padded = [0u8; PATH_LEN];
    padded[..trimmed.len()].copy_from_slice(trimmed);
    let mut words = [0u64; PATH_LEN / 8];
    for (w, chunk) in words.iter_mut().zip(padded.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
    Ok(CanaryPath {
        len: trimmed.len() as u32,
        _pad: 0,
        words,
    })
}

/// The kernel's internal `dev_t`, which `super_block.s_dev` holds: `MKDEV(major, minor)`
/// = `major << 20 | minor` (12 bits of major, 20 of minor). stat(2)'s `st_dev` encodes the
/// same numbers differently (glibc: `minor & 0xff | major << 8 | (minor & !0xff) << 12`,
/// more bits); `libc::major`/`libc::minor` split it. So device 254:0 is `st_dev` 0xfe00
/// and kernel 0x0fe0_0000. `None` when the numbers do not fit the kernel's encoding.
pub fn kernel_dev(major: u64, minor: u64) -> Option<u32> {
    if major >= 1 << 12 || minor >= 1 << 20 {
        return None;
    }
    Some(((major << 20) | minor) as u32)
}

/// [`kernel_dev`] of a stat(2) `st_dev`.
pub fn kernel_dev_of_st_dev(st_dev: u64) -> Option<u32> {
    kernel_dev(
        u64::from(libc::major(st_dev)),
        u64::from(libc::minor(st_dev)),
    )
}

/// Filesystems whose inode numbers repeat under one superblock (one per subvolume), and
/// whose stat(2) reports a per-subvolume `st_dev` instead of the superblock's: a key
/// with the superblock's device could match another subvolume's inode, so only the
/// `st_dev` one is kept, which the kernel never sees. Canaries on them are matched by
/// path string only.
pub const PER_SUBVOLUME_INODES: [&str; 2] = ["btrfs", "bcachefs"];

/// A canary as found on disk when its agent was added, for [`canary_inode_keys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryStat {
    /// Its `CanaryKey::index`.
    pub index: u32,
    /// stat(2) of the path (symlinks followed: what an open reaches).
    pub st_dev: u64,
    pub st_ino: u64,
    /// Its mount's superblock device, `(major, minor)` as /proc/self/mountinfo shows it
    /// (that is `s_dev`), and the filesystem type; `None` when unknown.
    pub mount: Option<((u64, u64), String)>,
}

/// `CANARY_INODES` entries for one canary: `(st_dev, st_ino)` in the kernel's encoding,
/// and, where the mount's superblock device differs from `st_dev` (overlayfs reports the
/// underlying filesystem's device for files), `(s_dev, st_ino)` too: the program reads
/// `i_sb->s_dev`. The value is the canary's index, for the event. Empty when the device
/// does not fit the kernel encoding.
pub fn canary_inode_keys(policy_id: u32, c: &CanaryStat) -> Vec<(CanaryInode, u32)> {
    let key = |dev| CanaryInode {
        ino: c.st_ino,
        dev,
        policy_id,
    };
    let mut out: Vec<(CanaryInode, u32)> = kernel_dev_of_st_dev(c.st_dev)
        .map(|d| (key(d), c.index))
        .into_iter()
        .collect();
    if let Some(((major, minor), fstype)) = &c.mount
        && !PER_SUBVOLUME_INODES.contains(&fstype.as_str())
        && let Some(sb) = kernel_dev(*major, *minor)
        && out.iter().all(|(k, _)| k.dev != sb)
    {
        out.push((key(sb), c.index));
    }
    out
}

/// Whether the kernel can match canary `c` by inode: some key of it carries the device
/// `i_sb->s_dev` will show (the mount's superblock device, when known).
pub fn inode_matchable(c: &CanaryStat, keys: &[(CanaryInode, u32)]) -> bool {
    match &c.mount {
        Some(((major, minor), _)) => {
            kernel_dev(*major, *minor).is_some_and(|sb| keys.iter().any(|(k, _)| k.dev == sb))
        }
        None => !keys.is_empty(),
    }
}

/// The superblock device `(major, minor)` and filesystem type of mount `mnt_id` in
/// /proc/self/mountinfo text (see proc(5): `id parent major:minor root mountpoint ... -
/// fstype source options`).
pub fn mountinfo_dev(mountinfo: &str, mnt_id: u64) -> Option<((u64, u64), String)> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mut f = pre.split(' ');
        if f.next()?.parse::<u64>().ok()? != mnt_id {
            return None;
        }
        let (major, minor) = f.nth(1)?.split_once(':')?;
        let fstype = post.split(' ').next()?;
        Some((
            (major.parse().ok()?, minor.parse().ok()?),
            fstype.to_owned(),
        ))
    })
}

/// `AGENT_FLAG_*` for a policy: monitor mode, the socket families it may create, whether
/// it has canaries, whether a lost event kills it.
pub fn agent_flags(policy: &CompiledPolicy) -> u32 {
    let mut flags = 0;
    if policy.mode == Mode::Monitor {
        flags |= AGENT_FLAG_MONITOR;
    }
    for f in &policy.network.families {
        flags |= match f {
            SocketFamily::Unix => 0,
            SocketFamily::Inet => AGENT_FLAG_INET,
            SocketFamily::Inet6 => AGENT_FLAG_INET6,
            SocketFamily::NetlinkRoute => AGENT_FLAG_NETLINK_ROUTE,
        };
    }
    if !policy.canaries.is_empty() {
        flags |= AGENT_FLAG_CANARIES;
    }
    if !policy.protect.is_empty() {
        flags |= AGENT_FLAG_PROTECT;
    }
    if policy.breaker.enforce && policy.breaker.on_event_loss == OnEventLoss::Kill {
        flags |= AGENT_FLAG_KILL_ON_LOSS;
    }
    // In force from the agent's first exec (the kernel sets AGENT_FLAG_ARMED).
    flags | trip_flags(&policy.breaker)
}

/// `AGENT_FLAG_TRIP_*` for the kinds a breaker that kills trips on at once: the kernel
/// acts on them in the violating call itself. None when the breaker only reports (monitor
/// mode) or only denies: then nothing is done in the kernel beyond the refusal.
pub fn trip_flags(breaker: &BreakerPolicy) -> u32 {
    if !breaker.enforce || breaker.action != Action::Kill {
        return 0;
    }
    breaker.trip_on.iter().fold(0, |flags, kind| {
        flags
            | match kind {
                ViolationKind::Canary => AGENT_FLAG_TRIP_CANARY,
                ViolationKind::Exec => AGENT_FLAG_TRIP_EXEC,
                ViolationKind::Connect => AGENT_FLAG_TRIP_CONNECT,
                ViolationKind::Bind => AGENT_FLAG_TRIP_BIND,
                ViolationKind::Write => AGENT_FLAG_TRIP_WRITE,
                ViolationKind::Read => AGENT_FLAG_TRIP_READ,
                ViolationKind::Socket => AGENT_FLAG_TRIP_SOCKET,
                ViolationKind::Syscall => AGENT_FLAG_TRIP_SYSCALL,
                // Decided by agentd's resolver, in user space, before it answers.
                ViolationKind::Dns => 0,
                // Decided in user space: a held call's denial, timeout or cap.
                ViolationKind::Denied => 0,
            }
    })
}

pub fn agent_entries(policy_id: u32, policy: &CompiledPolicy) -> Result<AgentEntries, String> {
    if policy.canaries.len() > MAX_CANARIES as usize {
        return Err(format!(
            "{} canaries; the kernel checks at most {MAX_CANARIES}",
            policy.canaries.len()
        ));
    }
    let canaries = policy
        .canaries
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok((
                CanaryKey {
                    policy_id,
                    index: i as u32,
                },
                canary_path(p)?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut bind: Vec<BindKey> = policy
        .network
        .bind
        .iter()
        .map(|r| bind_key(policy_id, r))
        .collect();
    bind.dedup();
    Ok(AgentEntries {
        state: AgentState {
            policy_id,
            flags: agent_flags(policy),
            dns_port: 0,
            _pad: 0,
        },
        net: policy
            .network
            .connect_entries
            .iter()
            .map(|e| net_key(policy_id, e))
            .collect(),
        bind,
        canaries,
        canary_inodes: Vec::new(),
        guarded: Vec::new(),
        guarded_names: Vec::new(),
    })
}

/// What protecting one path means on disk (see [`guard_plan`]).
#[derive(Debug, PartialEq, Eq)]
pub struct GuardPlan {
    /// Files and directories to flag, with their `GUARD_*` bits.
    pub inodes: Vec<(std::path::PathBuf, u32)>,
    /// A name that may not be created: (directory, name).
    pub forbid: Option<(std::path::PathBuf, Vec<u8>)>,
}

/// What protecting one path means, given the deepest part of it that exists: `real` is
/// that part with its symbolic links resolved (the path itself when it exists),
/// `missing` the components of the path below it (empty when it exists).
/// - the path exists: it is protected and pinned, each ancestor pinned;
/// - it does not: its first missing component may not be created in `real`, which is
///   pinned, as is each ancestor.
pub fn guard_plan(real: &Path, missing: &[std::ffi::OsString]) -> GuardPlan {
    use agentd_common::{GUARD_PIN, GUARD_PROTECT};
    let mut inodes: Vec<(std::path::PathBuf, u32)> = real
        .ancestors()
        .map(|a| (a.to_path_buf(), GUARD_PIN))
        .collect();
    let forbid = match missing.first() {
        None => {
            if let Some((_, f)) = inodes.first_mut() {
                *f |= GUARD_PROTECT;
            }
            None
        }
        Some(first) => Some((real.to_path_buf(), first.as_bytes().to_vec())),
    };
    GuardPlan { inodes, forbid }
}

/// The `GUARDED_NAMES` key forbidding `name` in the directory of `dir` key.
pub fn guarded_name(dir: CanaryInode, name: &[u8]) -> Option<GuardedName> {
    let mut key = GuardedName {
        dir,
        name: [0; agentd_common::GUARDED_NAME_LEN],
    };
    if name.is_empty() || name.len() >= agentd_common::GUARDED_NAME_LEN - 1 {
        return None;
    }
    key.name[..name.len()].copy_from_slice(name);
    Some(key)
}

/// Level of cgroup directory `dir` in the cgroup v2 hierarchy mounted at `mount` (the
/// root is level 0): what `bpf_get_current_ancestor_cgroup_id(level)` needs to return the
/// agent's cgroup for any task in or below it. Both paths must be canonical.
pub fn cgroup_level(mount: &Path, dir: &Path) -> Result<u32, String> {
    let rel = dir.strip_prefix(mount).map_err(|_| {
        format!(
            "{} is not below the cgroup v2 mount {}",
            dir.display(),
            mount.display()
        )
    })?;
    let mut level = 0u32;
    for c in rel.components() {
        match c {
            Component::Normal(_) => level += 1,
            Component::CurDir
            | Component::ParentDir
            | Component::RootDir
            | Component::Prefix(_) => {
                return Err(format!("{} is not a canonical path", dir.display()));
            }
        }
    }
    if level == 0 {
        return Err("an agent cannot be the root cgroup".into());
    }
    if level > MAX_CGROUP_LEVEL {
        return Err(format!(
            "{} is {level} levels deep; the programs look at most {MAX_CGROUP_LEVEL} down",
            dir.display()
        ));
    }
    Ok(level)
}

#[cfg(test)]
mod tests {

    use std::net::Ipv6Addr;

    use super::*;
    use crate::profile::{CompileContext, compile, parse};

    fn compiled(text: &str) -> CompiledPolicy {
        let p = parse("test", text).unwrap();
        compile(
            &p,
            &CompileContext {
                workspace: "/w".into(),
                home: "/home/u".into(),
            },
        )
    }

    #[test]
    fn the_kernel_trips_only_what_a_killing_breaker_trips_on_at_once() {
        let base = "[agent]\nname = \"t\"\n";
        let kill = compiled(&format!(
            "{base}[breaker]\ntrip_on = [\"canary\", \"connect\", \"read\"]\naction = \"kill\"\n"
        ));
        let flags = agent_flags(&kill);
        assert_eq!(
            flags & agentd_common::AGENT_FLAG_ARMED,
            0,
            "the kernel arms it at the first exec"
        );
        assert_eq!(
            flags & (AGENT_FLAG_TRIP_CANARY | AGENT_FLAG_TRIP_CONNECT | AGENT_FLAG_TRIP_READ),
            AGENT_FLAG_TRIP_CANARY | AGENT_FLAG_TRIP_CONNECT | AGENT_FLAG_TRIP_READ
        );
        for bit in [
            AGENT_FLAG_TRIP_EXEC,
            AGENT_FLAG_TRIP_BIND,
            AGENT_FLAG_TRIP_WRITE,
            AGENT_FLAG_TRIP_SOCKET,
            AGENT_FLAG_TRIP_SYSCALL,
        ] {
            assert_eq!(flags & bit, 0, "{bit:#x} is not in trip_on");
        }
        let deny = compiled(&format!(
            "{base}[breaker]\ntrip_on = [\"canary\"]\naction = \"deny\"\n"
        ));
        assert_eq!(trip_flags(&deny.breaker), 0, "a breaker that only denies");
        let monitor = compiled(&format!(
            "{base}mode = \"monitor\"\n[breaker]\ntrip_on = [\"canary\"]\n"
        ));
        assert_eq!(trip_flags(&monitor.breaker), 0, "monitor mode never acts");
    }

    #[test]
    fn the_kernel_trips_on_a_lost_event_only_when_the_profile_says_kill() {
        let base = "[agent]\nname = \"t\"\n";
        let kill = compiled(&format!("{base}[breaker]\non_event_loss = \"kill\"\n"));
        assert_ne!(agent_flags(&kill) & AGENT_FLAG_KILL_ON_LOSS, 0);
        // Whatever the breaker does with violations: the loss is its own decision.
        let deny = compiled(&format!(
            "{base}[breaker]\naction = \"deny\"\non_event_loss = \"kill\"\n"
        ));
        assert_ne!(agent_flags(&deny) & AGENT_FLAG_KILL_ON_LOSS, 0);
        for report in [
            compiled(base),
            compiled(&format!("{base}[breaker]\non_event_loss = \"report\"\n")),
        ] {
            assert_eq!(agent_flags(&report) & AGENT_FLAG_KILL_ON_LOSS, 0);
        }
    }

    #[test]
    fn net_key_bytes_are_what_the_trie_compares() {
        let e = NetEntry {
            addr: Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x0a00, 0]),
            prefix: 96 + 8,
            proto: 6,
            port: 443,
        };
        let (prefix, k) = net_key(0x0102_0304, &e);
        assert_eq!(prefix, 64 + 104);
        // SAFETY: NetKey is repr(C) plain data with no padding (asserted in agentd-common).
        let bytes: [u8; 24] = unsafe { std::mem::transmute(k) };
        assert_eq!(&bytes[..8], &[1, 2, 3, 4, 6, 0, 0x01, 0xbb]);
        assert_eq!(&bytes[8..], &e.addr.octets());
        assert_eq!(&bytes[18..20], &[0xff, 0xff]);
        assert_eq!(bytes[20], 10);
    }

    #[test]
    fn canary_words_little_endian_and_trimmed() {
        let c = canary_path(Path::new("/home/u/.ssh/")).unwrap();
        assert_eq!(c.len, 12);
        assert_eq!(c.words[0], u64::from_le_bytes(*b"/home/u/"));
        assert_eq!(c.words[1], u64::from_le_bytes(*b".ssh\0\0\0\0"));
        assert!(c.words[2..].iter().all(|&w| w == 0));
        assert!(canary_path(Path::new("rel")).is_err());
        let long = format!("/{}", "a".repeat(PATH_LEN));
        assert!(
            canary_path(Path::new(&long))
                .unwrap_err()
                .contains("at most 255")
        );
    }

    #[test]
    fn entries_of_a_policy() {
        let p = compiled(
            r#"
[agent]
name = "t"
mode = "monitor"
[filesystem]
canaries = ["{home}/.ssh", "{home}/.aws"]
[network]
connect = ["127.0.0.1/32:8080", "10.0.0.0/8:*/udp"]
bind = [9000, "5353/udp"]
"#,
        );
        let e = agent_entries(7, &p).unwrap();
        assert_eq!(e.state.policy_id, 7);
        assert_eq!(
            e.state.flags,
            AGENT_FLAG_MONITOR
                | AGENT_FLAG_INET
                | AGENT_FLAG_INET6
                | AGENT_FLAG_NETLINK_ROUTE
                | AGENT_FLAG_CANARIES
        );
        assert_eq!(e.net.len(), 2);
        let any_port = e.net.iter().find(|(_, k)| k.proto == 17).unwrap();
        assert_eq!(any_port.0, 64 + 96 + 8);
        assert_eq!(any_port.1.port_be, 0);
        assert_eq!(e.bind.len(), 2);
        assert!(e.bind.contains(&BindKey {
            policy_id: 7,
            proto: 17,
            _pad: 0,
            port: 5353
        }));
        assert_eq!(e.canaries.len(), 2);
        assert_eq!(
            e.canaries[1].0,
            CanaryKey {
                policy_id: 7,
                index: 1
            }
        );
    }

    #[test]
    fn no_network_rules_inet_sockets_and_empty_allow_lists() {
        let p = compiled("[agent]\nname = \"t\"\n");
        let e = agent_entries(1, &p).unwrap();
        assert_eq!(
            e.state.flags & !trip_flags(&p.breaker),
            AGENT_FLAG_INET | AGENT_FLAG_INET6
        );
        assert!(e.net.is_empty() && e.bind.is_empty() && e.canaries.is_empty());
    }

    #[test]
    fn kernel_dev_is_mkdev_not_st_dev() {
        // 254:0 (virtio disk): st_dev 0xfe00.
        assert_eq!(kernel_dev_of_st_dev(libc::makedev(254, 0)), Some(254 << 20));
        assert_eq!(kernel_dev_of_st_dev(0xfe00), Some(0x0fe0_0000));
        // Anonymous devices (tmpfs, overlayfs): major 0.
        assert_eq!(kernel_dev_of_st_dev(libc::makedev(0, 27)), Some(27));
        // Minor numbers above 255 use the high st_dev bits.
        assert_eq!(
            kernel_dev_of_st_dev(libc::makedev(8, 0x12345)),
            Some((8 << 20) | 0x12345)
        );
        assert_eq!(kernel_dev(1 << 12, 0), None);
        assert_eq!(kernel_dev(0, 1 << 20), None);
    }

    #[test]
    fn canary_inode_keys_by_filesystem() {
        let stat = |mount: Option<((u64, u64), &str)>| CanaryStat {
            index: 3,
            st_dev: libc::makedev(254, 0),
            st_ino: 1234,
            mount: mount.map(|(d, t)| (d, t.to_owned())),
        };
        let k = |dev| CanaryInode {
            ino: 1234,
            dev,
            policy_id: 9,
        };
        // ext4: stat and the superblock agree, one key.
        let c = stat(Some(((254, 0), "ext4")));
        let keys = canary_inode_keys(9, &c);
        assert_eq!(keys, [(k(254 << 20), 3)]);
        assert!(inode_matchable(&c, &keys));
        // overlayfs file: stat shows the lower filesystem, the superblock is overlay's.
        let c = stat(Some(((0, 51), "overlay")));
        let keys = canary_inode_keys(9, &c);
        assert_eq!(keys, [(k(254 << 20), 3), (k(51), 3)]);
        assert!(inode_matchable(&c, &keys));
        // btrfs: inode numbers repeat across subvolumes under one superblock; only the
        // stat key, which the kernel never sees.
        let c = stat(Some(((0, 40), "btrfs")));
        let keys = canary_inode_keys(9, &c);
        assert_eq!(keys, [(k(254 << 20), 3)]);
        assert!(!inode_matchable(&c, &keys));
        // Mount unknown: the stat key, assumed right.
        let c = stat(None);
        assert!(inode_matchable(&c, &canary_inode_keys(9, &c)));
    }

    #[test]
    fn mountinfo_dev_finds_the_mount() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(mountinfo_dev(text, 27), Some(((254, 0), "ext4".into())));
        assert_eq!(mountinfo_dev(text, 41), Some(((0, 38), "cgroup2".into())));
        assert_eq!(mountinfo_dev(text, 4), None);
    }

    #[test]
    fn levels() {
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(cgroup_level(m, &m.join("a")), Ok(1));
        assert_eq!(cgroup_level(m, &m.join("agentd/a-1")), Ok(2));
        assert!(cgroup_level(m, m).is_err());
        assert!(cgroup_level(m, Path::new("/tmp/x")).is_err());
        assert!(cgroup_level(m, &m.join("a/../b")).is_err());
    }

    #[test]
    fn protecting_a_path_protects_it_and_pins_its_ancestors() {
        use agentd_common::{GUARD_PIN, GUARD_PROTECT};
        let plan = guard_plan(Path::new("/w/.git/hooks"), &[]);
        assert_eq!(
            plan.inodes,
            [
                ("/w/.git/hooks".into(), GUARD_PROTECT | GUARD_PIN),
                ("/w/.git".into(), GUARD_PIN),
                ("/w".into(), GUARD_PIN),
                ("/".into(), GUARD_PIN),
            ]
        );
        assert_eq!(plan.forbid, None);
        // `.git` missing: it may not be created in /w; nothing is protected.
        let plan = guard_plan(Path::new("/w"), &[".git".into(), "hooks".into()]);
        assert_eq!(
            plan.inodes,
            [("/w".into(), GUARD_PIN), ("/".into(), GUARD_PIN)]
        );
        assert_eq!(plan.forbid, Some(("/w".into(), b".git".to_vec())));
    }

    #[test]
    fn guarded_names_are_nul_padded_and_bounded() {
        let dir = CanaryInode {
            ino: 5,
            dev: 7,
            policy_id: 1,
        };
        let key = guarded_name(dir, b".git").unwrap();
        assert_eq!(&key.name[..5], b".git\0");
        assert!(key.name[4..].iter().all(|&b| b == 0));
        // The kernel's copy of a name of GUARDED_NAME_LEN - 1 bytes or more is cut, so
        // no such name is ever a key.
        let max = vec![b'x'; agentd_common::GUARDED_NAME_LEN - 2];
        assert!(guarded_name(dir, &max).is_some());
        let cut = vec![b'x'; agentd_common::GUARDED_NAME_LEN - 1];
        assert!(guarded_name(dir, &cut).is_none());
        assert!(guarded_name(dir, b"").is_none());
    }

    #[test]
    fn a_protect_list_sets_the_protect_flag() {
        let p = compiled(
            "[agent]\nname = \"t\"\n[filesystem]\nwrite = [\"{workspace}\"]\nprotect = [\"{workspace}/.git/hooks\"]\n",
        );
        assert_ne!(agent_flags(&p) & agentd_common::AGENT_FLAG_PROTECT, 0);
        let p = compiled("[agent]\nname = \"t\"\n");
        assert_eq!(agent_flags(&p) & agentd_common::AGENT_FLAG_PROTECT, 0);
    }
}
