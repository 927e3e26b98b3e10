//! Who the agent runs as, and the switch to it.
//!
//! Three sources (`[identity] run_as`):
//! - `invoker`: the user who ran agentd: `SUDO_UID`/`SUDO_GID` under sudo, else the real
//!   uid. Root is refused: an agent never runs as root, and "the invoker" of a root shell is
//!   root.
//! - `user`: a named account from the password database (not root).
//! - `transient`: a uid no account and no process uses, picked per agent from
//!   [`TRANSIENT_FIRST`]..[`TRANSIENT_FIRST`]+[`TRANSIENT_COUNT`], with the same number as
//!   its gid. The range lies in the block systemd documents as unused
//!   (1879048192–2147352575: above the container ranges, below the "foreign" range, far
//!   from DynamicUser's 61184–65519), so it collides with no allocator on a systemd host.
//!   The start is a hash of the agent id; the first candidate that has no passwd entry, no
//!   group entry and no running process (real, effective, saved or filesystem id, from
//!   /proc/*/status) is taken. Two agentd processes choosing at the same instant could pick
//!   the same uid only if their random agent ids hash to the same candidate.
//!
//! The agent gets one group, its primary gid: supplementary groups of the invoker (docker,
//! adm, wheel...) would hand it access the profile never granted.
//!
//! In the child (root until then), [`drop_bounding_and_inheritable`] runs while
//! CAP_SETPCAP is still held, then [`switch`] changes ids (which clears the permitted and
//! effective sets), then [`clear_and_verify`] clears what is left and checks every set is
//! empty and that root cannot be regained.

use std::path::PathBuf;

use caps::CapSet;
use serde::Serialize;

use crate::profile::{Identity, RunAs};

/// First uid of the transient range.
pub const TRANSIENT_FIRST: u32 = 0x7700_0000;
/// Size of the transient range.
pub const TRANSIENT_COUNT: u32 = 0x1_0000;

/// Whether `uid` is one of the transient uids agentd hands out.
pub fn is_transient(uid: u32) -> bool {
    (TRANSIENT_FIRST..TRANSIENT_FIRST + TRANSIENT_COUNT).contains(&uid)
}
/// Candidates tried before giving up.
const TRANSIENT_TRIES: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "identity: the invoking user is root, and the profile runs the agent as the invoker: agentd never runs an agent as root (start agentd with sudo from your own account, or set `run_as = \"transient\"` in [identity])"
    )]
    InvokerIsRoot,
    #[error("identity: {var}={value:?} is not a numeric id")]
    BadSudoId { var: &'static str, value: String },
    #[error("identity: uid {0} has no passwd entry and SUDO_GID is not set: cannot tell its group")]
    NoGroup(u32),
    #[error("identity.user: no user named `{0}` on this host")]
    NoSuchUser(String),
    #[error(
        "identity.user: `{0}` is root (uid 0): name an unprivileged user, or use `run_as = \"transient\"`"
    )]
    UserIsRoot(String),
    #[error(
        "identity: the agent's group would be root (gid 0): agentd never runs an agent with gid 0"
    )]
    RootGroup,
    #[error("identity: no free transient uid after {TRANSIENT_TRIES} tries in {TRANSIENT_FIRST}..{}", TRANSIENT_FIRST + TRANSIENT_COUNT)]
    TransientExhausted,
}

/// A password-database account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The seam under account lookups, so resolution is tested without a real passwd file.
pub trait UserDb {
    fn by_uid(&self, uid: u32) -> Option<Account>;
    fn by_name(&self, name: &str) -> Option<Account>;
    fn group_exists(&self, gid: u32) -> bool;
    /// Whether any process runs with `id` as one of its uids or gids.
    fn id_in_use(&self, id: u32) -> bool;
}

/// The host's password and group databases and /proc.
#[derive(Debug, Clone, Copy)]
pub struct SystemUserDb;

fn account(u: nix::unistd::User) -> Account {
    Account {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        home: u.dir,
    }
}

impl UserDb for SystemUserDb {
    fn by_uid(&self, uid: u32) -> Option<Account> {
        nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(account)
    }

    fn by_name(&self, name: &str) -> Option<Account> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(account)
    }

    fn group_exists(&self, gid: u32) -> bool {
        // An error reading the database counts as "exists": the id is not taken.
        !matches!(nix::unistd::Group::from_gid(gid.into()), Ok(None))
    }

    fn id_in_use(&self, id: u32) -> bool {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return true;
        };
        let id = id.to_string();
        dir.flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
            .any(|status| {
                status.lines().any(|l| {
                    (l.starts_with("Uid:") || l.starts_with("Gid:"))
                        && l.split_whitespace().skip(1).any(|v| v == id)
                })
            })
    }
}

/// What agentd knows about whoever started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoker {
    pub sudo_uid: Option<String>,
    pub sudo_gid: Option<String>,
    pub uid: u32,
    pub gid: u32,
}

impl Invoker {
    pub fn current() -> Invoker {
        Invoker {
            sudo_uid: std::env::var("SUDO_UID").ok(),
            sudo_gid: std::env::var("SUDO_GID").ok(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }
}

/// The identity the agent will run as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolved {
    pub run_as: RunAs,
    pub uid: u32,
    pub gid: u32,
    /// Account name, or `uid N` when there is none.
    pub user: String,
    /// The account's home (`{home}` in the profile); `/nonexistent` without one.
    pub home: PathBuf,
    /// How the identity was chosen.
    pub how: String,
}

fn parse_id(var: &'static str, value: &str) -> Result<u32, IdentityError> {
    value.trim().parse().map_err(|_| IdentityError::BadSudoId {
        var,
        value: value.to_owned(),
    })
}

/// Resolves the profile's identity. Never returns uid 0 or gid 0.
pub fn resolve(
    identity: &Identity,
    invoker: &Invoker,
    agent_id: &str,
    db: &dyn UserDb,
) -> Result<Resolved, IdentityError> {
    let nonexistent = || PathBuf::from("/nonexistent");
    let resolved = match identity.run_as {
        RunAs::Invoker => {
            let (uid, how) = match &invoker.sudo_uid {
                Some(v) => (parse_id("SUDO_UID", v)?, "the invoking user (SUDO_UID)"),
                None => (invoker.uid, "the invoking user (real uid)"),
            };
            if uid == 0 {
                return Err(IdentityError::InvokerIsRoot);
            }
            let acct = db.by_uid(uid);
            let gid = match (&invoker.sudo_gid, &acct, &invoker.sudo_uid) {
                (Some(g), _, Some(_)) => parse_id("SUDO_GID", g)?,
                (_, Some(a), _) => a.gid,
                (_, None, None) => invoker.gid,
                (None, None, Some(_)) => return Err(IdentityError::NoGroup(uid)),
            };
            Resolved {
                run_as: RunAs::Invoker,
                uid,
                gid,
                user: acct
                    .as_ref()
                    .map_or_else(|| format!("uid {uid}"), |a| a.name.clone()),
                home: acct.map_or_else(nonexistent, |a| a.home),
                how: how.to_owned(),
            }
        }
        RunAs::User => {
            let name = identity.user.clone().unwrap_or_default();
            let acct = db
                .by_name(&name)
                .ok_or_else(|| IdentityError::NoSuchUser(name.clone()))?;
            if acct.uid == 0 {
                return Err(IdentityError::UserIsRoot(name));
            }
            Resolved {
                run_as: RunAs::User,
                uid: acct.uid,
                gid: acct.gid,
                user: acct.name,
                home: acct.home,
                how: "the profile's identity.user".to_owned(),
            }
        }
        RunAs::Transient => {
            let uid = transient_uid(agent_id, |id| {
                db.by_uid(id).is_none() && !db.group_exists(id) && !db.id_in_use(id)
            })
            .ok_or(IdentityError::TransientExhausted)?;
            Resolved {
                run_as: RunAs::Transient,
                uid,
                gid: uid,
                user: format!("uid {uid}"),
                home: nonexistent(),
                how: format!(
                    "transient: free uid from {TRANSIENT_FIRST}..{} (no passwd or group entry, no process)",
                    TRANSIENT_FIRST + TRANSIENT_COUNT
                ),
            }
        }
    };
    if resolved.gid == 0 {
        return Err(IdentityError::RootGroup);
    }
    Ok(resolved)
}

/// FNV-1a, 32 bits: a stable, dependency-free hash to spread agents over the range.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The first free uid of the transient range, starting at a hash of the agent id.
pub fn transient_uid(agent_id: &str, is_free: impl Fn(u32) -> bool) -> Option<u32> {
    let start = fnv1a(agent_id) % TRANSIENT_COUNT;
    (0..TRANSIENT_TRIES)
        .map(|i| TRANSIENT_FIRST + (start + i) % TRANSIENT_COUNT)
        .find(|uid| is_free(*uid))
}

/// Why the identity switch failed, beyond an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyFailure {
    /// A capability set is not empty (index into [`CAP_SETS`]).
    CapsRemain(usize),
    /// The real/effective/saved ids or the groups are not the requested ones.
    IdsMismatch,
    /// `setuid(0)` or `setgid(0)` succeeded.
    RegainedRoot,
    /// A call failed with this errno.
    Errno(i32),
}

/// Capability sets, in the order [`VerifyFailure::CapsRemain`] indexes them.
pub const CAP_SETS: [&str; 5] = [
    "effective",
    "permitted",
    "inheritable",
    "ambient",
    "bounding",
];

/// Highest capability number probed with raw `prctl`/`capget`, beyond what the `caps`
/// crate knows (it stops at the newest capability it was released with).
const CAP_PROBE_LAST: u32 = 63;

/// While still root: empties the bounding set (needs CAP_SETPCAP, which the id switch
/// drops), the ambient set and the inheritable set.
pub fn drop_bounding_and_inheritable() -> Result<(), VerifyFailure> {
    let errno = |_| VerifyFailure::Errno(nix::Error::last_raw());
    caps::clear(None, CapSet::Ambient).map_err(errno)?;
    caps::clear(None, CapSet::Bounding).map_err(errno)?;
    // Capabilities newer than the crate: drop by number. EINVAL marks the end.
    for cap in 0..=CAP_PROBE_LAST {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 && nix::Error::last() == nix::Error::EINVAL {
            break;
        }
        if rc != 0 {
            return Err(VerifyFailure::Errno(nix::Error::last_raw()));
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(errno)?;
    Ok(())
}

/// Which step of [`switch`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchStep {
    Setgroups,
    Setresgid,
    Setresuid,
}

/// setgroups([gid]), setresgid(gid ×3), setresuid(uid ×3), in that order (groups and gid
/// can only be changed while still root).
pub fn switch(uid: u32, gid: u32) -> Result<(), (SwitchStep, nix::Error)> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setgroups(&[g]).map_err(|e| (SwitchStep::Setgroups, e))?;
    setresgid(g, g, g).map_err(|e| (SwitchStep::Setresgid, e))?;
    setresuid(u, u, u).map_err(|e| (SwitchStep::Setresuid, e))?;
    Ok(())
}

/// After the switch: clears the effective and permitted sets (the kernel already did when
/// the uids left 0; this states it), then checks that every set is empty, that the ids
/// are exactly `uid`/`gid` with `gid` the only group, and that root cannot be regained.
pub fn clear_and_verify(uid: u32, gid: u32) -> Result<(), VerifyFailure> {
    let errno = |_| VerifyFailure::Errno(nix::Error::last_raw());
    caps::clear(None, CapSet::Effective).map_err(errno)?;
    caps::clear(None, CapSet::Permitted).map_err(errno)?;

    let sets = [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
        CapSet::Bounding,
    ];
    for (i, set) in sets.into_iter().enumerate() {
        let held = caps::read(None, set).map_err(errno)?;
        if !held.is_empty() {
            return Err(VerifyFailure::CapsRemain(i));
        }
    }
    // The same, by number, for capabilities the crate does not know.
    let raw = raw_caps().map_err(|e| VerifyFailure::Errno(e as i32))?;
    for (i, bits) in raw.into_iter().enumerate() {
        if bits != 0 {
            return Err(VerifyFailure::CapsRemain(i));
        }
    }
    for cap in 0..=CAP_PROBE_LAST {
        // SAFETY: PR_CAPBSET_READ takes a capability number and no pointers.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc > 0 {
            return Err(VerifyFailure::CapsRemain(4));
        }
        if rc < 0 {
            break;
        }
    }

    let ru = nix::unistd::getresuid().map_err(|e| VerifyFailure::Errno(e as i32))?;
    let rg = nix::unistd::getresgid().map_err(|e| VerifyFailure::Errno(e as i32))?;
    let ids_ok = [ru.real, ru.effective, ru.saved]
        .iter()
        .all(|u| u.as_raw() == uid)
        && [rg.real, rg.effective, rg.saved]
            .iter()
            .all(|g| g.as_raw() == gid);
    let groups = nix::unistd::getgroups().map_err(|e| VerifyFailure::Errno(e as i32))?;
    if !ids_ok || groups.iter().any(|g| g.as_raw() != gid) {
        return Err(VerifyFailure::IdsMismatch);
    }

    // SAFETY: setuid/setgid take an id and no pointers; success here is the failure case.
    let regained = unsafe { libc::setuid(0) == 0 || libc::setgid(0) == 0 };
    if regained {
        return Err(VerifyFailure::RegainedRoot);
    }
    Ok(())
}

/// Effective, permitted and inheritable sets as 64-bit masks, from `capget` (version 3).
fn raw_caps() -> Result<[u64; 3], nix::Error> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and data are valid for writes and sized as capget(2) requires for
    // version 3 (two data structs).
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(nix::Error::last());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
    Ok([
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::BTreeSet, path::Path};

    #[derive(Default)]
    struct FakeDb {
        accounts: Vec<Account>,
        groups: BTreeSet<u32>,
        running: BTreeSet<u32>,
    }

    impl UserDb for FakeDb {
        fn by_uid(&self, uid: u32) -> Option<Account> {
            self.accounts.iter().find(|a| a.uid == uid).cloned()
        }
        fn by_name(&self, name: &str) -> Option<Account> {
            self.accounts.iter().find(|a| a.name == name).cloned()
        }
        fn group_exists(&self, gid: u32) -> bool {
            self.groups.contains(&gid)
        }
        fn id_in_use(&self, id: u32) -> bool {
            self.running.contains(&id)
        }
    }

    fn db() -> FakeDb {
        FakeDb {
            accounts: vec![
                Account {
                    name: "root".into(),
                    uid: 0,
                    gid: 0,
                    home: "/root".into(),
                },
                Account {
                    name: "alice".into(),
                    uid: 1000,
                    gid: 1000,
                    home: "/home/alice".into(),
                },
            ],
            ..FakeDb::default()
        }
    }

    fn id(run_as: RunAs, user: Option<&str>) -> Identity {
        Identity {
            run_as,
            user: user.map(str::to_owned),
        }
    }

    fn root_shell(sudo: Option<(&str, &str)>) -> Invoker {
        Invoker {
            sudo_uid: sudo.map(|s| s.0.to_owned()),
            sudo_gid: sudo.map(|s| s.1.to_owned()),
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn invoker_under_sudo_is_the_sudo_user() {
        let r = resolve(
            &id(RunAs::Invoker, None),
            &root_shell(Some(("1000", "1000"))),
            "a",
            &db(),
        )
        .unwrap();
        assert_eq!((r.uid, r.gid, r.user.as_str()), (1000, 1000, "alice"));
        assert_eq!(r.home, Path::new("/home/alice"));
        // an id with no account still works, with no home
        let r = resolve(
            &id(RunAs::Invoker, None),
            &root_shell(Some(("65534", "65534"))),
            "a",
            &db(),
        )
        .unwrap();
        assert_eq!((r.uid, r.gid), (65534, 65534));
        assert_eq!(r.home, Path::new("/nonexistent"));
    }

    #[test]
    fn root_is_refused_every_way() {
        let e = resolve(&id(RunAs::Invoker, None), &root_shell(None), "a", &db()).unwrap_err();
        assert!(matches!(e, IdentityError::InvokerIsRoot));
        assert!(e.to_string().contains("transient") && e.to_string().contains("sudo"));
        assert!(matches!(
            resolve(
                &id(RunAs::Invoker, None),
                &root_shell(Some(("0", "0"))),
                "a",
                &db()
            ),
            Err(IdentityError::InvokerIsRoot)
        ));
        assert!(matches!(
            resolve(
                &id(RunAs::User, Some("root")),
                &root_shell(None),
                "a",
                &db()
            ),
            Err(IdentityError::UserIsRoot(_))
        ));
        assert!(matches!(
            resolve(
                &id(RunAs::Invoker, None),
                &root_shell(Some(("1000", "0"))),
                "a",
                &db()
            ),
            Err(IdentityError::RootGroup)
        ));
        assert!(matches!(
            resolve(
                &id(RunAs::Invoker, None),
                &root_shell(Some(("x", "1"))),
                "a",
                &db()
            ),
            Err(IdentityError::BadSudoId {
                var: "SUDO_UID",
                ..
            })
        ));
    }

    #[test]
    fn named_user() {
        let r = resolve(
            &id(RunAs::User, Some("alice")),
            &root_shell(None),
            "a",
            &db(),
        )
        .unwrap();
        assert_eq!(r.uid, 1000);
        assert!(matches!(
            resolve(&id(RunAs::User, Some("bob")), &root_shell(None), "a", &db()),
            Err(IdentityError::NoSuchUser(n)) if n == "bob"
        ));
    }

    #[test]
    fn transient_uids_are_free_stable_and_in_range() {
        let a = transient_uid("agent-1", |_| true).unwrap();
        assert_eq!(transient_uid("agent-1", |_| true), Some(a));
        assert!((TRANSIENT_FIRST..TRANSIENT_FIRST + TRANSIENT_COUNT).contains(&a));
        // taken ids are skipped
        let b = transient_uid("agent-1", |u| u != a).unwrap();
        assert_ne!(a, b);
        assert!(transient_uid("agent-1", |_| false).is_none());

        let mut fake = db();
        fake.running.insert(a);
        let r = resolve(
            &id(RunAs::Transient, None),
            &root_shell(None),
            "agent-1",
            &fake,
        )
        .unwrap();
        assert_eq!((r.uid, r.gid), (b, b));
        fake.groups.insert(b);
        let r = resolve(
            &id(RunAs::Transient, None),
            &root_shell(None),
            "agent-1",
            &fake,
        )
        .unwrap();
        assert!(r.uid != a && r.uid != b);
    }
}
