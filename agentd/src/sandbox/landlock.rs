//! Landlock: the ruleset is built in the supervisor before fork (paths opened, rules added,
//! one ruleset fd); the child only calls `landlock_restrict_self`.
//!
//! Rights per profile key (the mapping `CompiledPolicy` documents):
//! - read  = READ_FILE | READ_DIR
//! - write = WRITE_FILE | TRUNCATE | MAKE_REG | MAKE_DIR | MAKE_SYM | MAKE_FIFO | MAKE_SOCK |
//!   REMOVE_FILE | REMOVE_DIR | REFER | IOCTL_DEV
//! - exec  = EXECUTE | READ_FILE
//!
//! Every filesystem right up to [`TARGET_ABI`] is handled (denied unless a rule grants it),
//! so MAKE_CHAR and MAKE_BLOCK are never granted. Signals and abstract unix sockets are
//! scoped to the agent's own domain.
//!
//! The network rights (TCP bind and connect, ABI 4) are not handled: the cgroup programs
//! decide every connect, datagram and bind by address, port and protocol, on every ABI
//! alike, and report each decision. Landlock's socket hooks run before the cgroup hooks
//! and know TCP ports only; handling them would take those decisions first, with less
//! to go on and no address in the event.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, PathFdError,
    RestrictionStatus, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetError,
    RulesetStatus, Scope, make_bitflags,
};
use serde::Serialize;

use crate::profile::{FsAccess, LandlockPolicy};

/// The newest ABI whose rights agentd's policy model expresses. V7 and V8 add no access
/// right (audit-log flags, thread sync); V9's RESOLVE_UNIX and V10's UDP rights need
/// profile keys first: handling them without would refuse every pathname unix socket and
/// every UDP datagram, including the DNS rules a profile allows.
pub const TARGET_ABI: ABI = ABI::V8;

/// Landlock features by the ABI that introduced them, for reporting what a kernel lacks.
const FEATURES: [(&str, i32); 4] = [
    ("refer (cross-directory rename and link)", 2),
    ("truncate", 3),
    ("device ioctl", 5),
    ("signal and abstract-unix-socket scoping", 6),
];

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("landlock: cannot build the ruleset: {0}")]
    Ruleset(#[from] RulesetError),
    #[error("landlock: cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: PathFdError,
    },
    #[error(
        "landlock is not available on this kernel (ABI {0}): agentd cannot confine the agent's files (check `lsm=` on the kernel command line; see `agentd doctor`)"
    )]
    Unavailable(i32),
}

/// One filesystem rule as it will be applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RulePlan {
    pub path: PathBuf,
    /// `read write exec` as in the profile.
    pub access: String,
    /// Paths that do not exist grant nothing and are skipped.
    pub exists: bool,
    /// The Landlock rights, e.g. `ReadFile|ReadDir`.
    pub rights: String,
}

/// What the Landlock step will do on this kernel: shown by `--dry-run`, put in the start
/// event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The kernel's Landlock ABI (0 or negative: none).
    pub kernel_abi: i32,
    pub target_abi: i32,
    /// Features the policy uses that this kernel lacks (enforcement is partial).
    pub missing: Vec<&'static str>,
    pub rules: Vec<RulePlan>,
    pub scope_signals: bool,
    pub scope_abstract_unix: bool,
}

impl Plan {
    pub fn skipped(&self) -> Vec<&Path> {
        self.rules
            .iter()
            .filter(|r| !r.exists)
            .map(|r| r.path.as_path())
            .collect()
    }
}

/// The Landlock ABI of the running kernel (`landlock_create_ruleset(NULL, 0, VERSION)`);
/// 0 or negative when Landlock is missing or disabled.
pub fn kernel_abi() -> i32 {
    // SAFETY: with a NULL attribute, size 0 and LANDLOCK_CREATE_RULESET_VERSION the call
    // only returns a number; it reads and writes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    i32::try_from(v).unwrap_or(-1)
}

/// Landlock rights for a profile grant. Files (not directories) take only the rights that
/// apply to files: Landlock refuses directory rights on a file rule.
pub fn rights(access: FsAccess, is_dir: bool) -> BitFlags<AccessFs> {
    let mut r = BitFlags::EMPTY;
    if access.read {
        r |= make_bitflags!(AccessFs::{ReadFile | ReadDir});
    }
    if access.write {
        r |= make_bitflags!(AccessFs::{
            WriteFile | Truncate | MakeReg | MakeDir | MakeSym | MakeFifo | MakeSock
            | RemoveFile | RemoveDir | Refer | IoctlDev
        });
    }
    if access.exec {
        r |= make_bitflags!(AccessFs::{Execute | ReadFile});
    }
    if !is_dir {
        r &= AccessFs::from_file(TARGET_ABI);
    }
    r & AccessFs::from_all(TARGET_ABI)
}

fn access_words(a: FsAccess) -> String {
    let mut w = Vec::new();
    if a.read {
        w.push("read");
    }
    if a.write {
        w.push("write");
    }
    if a.exec {
        w.push("exec");
    }
    w.join(" ")
}

fn rights_words(r: BitFlags<AccessFs>) -> String {
    r.iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join("|")
}

/// Features of [`FEATURES`] newer than `kernel_abi` that the policy uses (scoping only
/// when asked for).
pub fn missing_features(kernel_abi: i32, policy: &LandlockPolicy) -> Vec<&'static str> {
    let scoped = policy.scope_signals || policy.scope_abstract_unix;
    FEATURES
        .iter()
        .filter(|(_, abi)| kernel_abi < *abi && (*abi != 6 || scoped))
        .map(|(name, _)| *name)
        .collect()
}

/// The plan for `policy` on this host: checks which rule paths exist. No side effects.
pub fn plan(policy: &LandlockPolicy) -> Plan {
    plan_with(policy, kernel_abi(), |p| {
        std::fs::metadata(p).ok().map(|m| m.is_dir())
    })
}

/// [`plan`] with the kernel ABI and the filesystem given (`stat` returns `Some(is_dir)`).
pub fn plan_with(
    policy: &LandlockPolicy,
    kernel_abi: i32,
    stat: impl Fn(&Path) -> Option<bool>,
) -> Plan {
    let rules = policy
        .rules
        .iter()
        .map(|r| {
            let st = stat(&r.path);
            RulePlan {
                path: r.path.clone(),
                access: access_words(r.access),
                exists: st.is_some(),
                rights: rights_words(rights(r.access, st.unwrap_or(true))),
            }
        })
        .collect();
    Plan {
        kernel_abi,
        target_abi: TARGET_ABI as i32,
        missing: missing_features(kernel_abi, policy),
        rules,
        scope_signals: policy.scope_signals,
        scope_abstract_unix: policy.scope_abstract_unix,
    }
}

/// Builds the ruleset (in the supervisor, before fork): opens every rule path (`O_PATH`),
/// skipping those that do not exist, and adds the rules. Nothing is enforced yet.
pub fn prepare(policy: &LandlockPolicy) -> Result<RulesetCreated, LandlockError> {
    let abi = kernel_abi();
    if abi < 1 {
        return Err(LandlockError::Unavailable(abi));
    }
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))?;
    let mut scopes = BitFlags::<Scope>::EMPTY;
    if policy.scope_signals {
        scopes |= Scope::Signal;
    }
    if policy.scope_abstract_unix {
        scopes |= Scope::AbstractUnixSocket;
    }
    if !scopes.is_empty() {
        ruleset = ruleset.scope(scopes)?;
    }
    let mut created = ruleset.create()?;
    for rule in &policy.rules {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            Err(source) if not_found(&rule.path) => {
                tracing::info!(path = %rule.path.display(), %source, "landlock rule skipped: no such path");
                continue;
            }
            Err(source) => {
                return Err(LandlockError::Open {
                    path: rule.path.clone(),
                    source,
                });
            }
        };
        let is_dir = std::fs::metadata(&rule.path).is_ok_and(|m| m.is_dir());
        let r = rights(rule.access, is_dir);
        if r.is_empty() {
            continue;
        }
        created = created.add_rule(PathBeneath::new(fd, r))?;
    }
    Ok(created)
}

fn not_found(path: &Path) -> bool {
    matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
        || matches!(std::fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// How far the kernel enforces the ruleset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    Full,
    /// The kernel lacks some features the policy uses ([`Plan::missing`]).
    Partial,
}

/// Why `restrict` failed, as the child reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestrictFailure {
    /// The kernel enforces nothing of the ruleset.
    NotEnforced,
    /// `landlock_restrict_self` (or `prctl`) failed with this errno.
    Errno(i32),
}

/// Enforces the ruleset on the calling thread (the child, after `no_new_privs`).
/// `NotEnforced` is an error: the agent never runs without Landlock.
pub fn restrict(ruleset: RulesetCreated) -> Result<Enforcement, RestrictFailure> {
    match ruleset.restrict_self() {
        Ok(RestrictionStatus {
            ruleset: status, ..
        }) => match status {
            RulesetStatus::FullyEnforced => Ok(Enforcement::Full),
            RulesetStatus::PartiallyEnforced => Ok(Enforcement::Partial),
            RulesetStatus::NotEnforced => Err(RestrictFailure::NotEnforced),
        },
        Err(_) => Err(RestrictFailure::Errno(nix::Error::last_raw())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::FsRule;

    fn a(read: bool, write: bool, exec: bool) -> FsAccess {
        FsAccess { read, write, exec }
    }

    #[test]
    fn rights_follow_the_documented_mapping() {
        assert_eq!(
            rights(a(true, false, false), true),
            make_bitflags!(AccessFs::{ReadFile | ReadDir})
        );
        assert_eq!(
            rights(a(false, false, true), true),
            make_bitflags!(AccessFs::{Execute | ReadFile})
        );
        let w = rights(a(false, true, false), true);
        for r in [
            AccessFs::WriteFile,
            AccessFs::Truncate,
            AccessFs::MakeReg,
            AccessFs::MakeDir,
            AccessFs::MakeSym,
            AccessFs::MakeFifo,
            AccessFs::MakeSock,
            AccessFs::RemoveFile,
            AccessFs::RemoveDir,
            AccessFs::Refer,
            AccessFs::IoctlDev,
        ] {
            assert!(w.contains(r), "{r:?}");
        }
        for never in [AccessFs::MakeChar, AccessFs::MakeBlock, AccessFs::ReadFile] {
            assert!(!w.contains(never), "{never:?}");
        }
    }

    #[test]
    fn file_rules_drop_directory_rights() {
        let r = rights(a(true, true, false), false);
        assert!(r.contains(AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate));
        assert!(!r.contains(AccessFs::ReadDir));
        assert!(!r.contains(AccessFs::MakeReg));
        assert!(!r.contains(AccessFs::RemoveFile));
    }

    #[test]
    fn target_abi_handles_no_right_the_policy_cannot_express() {
        // V9 adds RESOLVE_UNIX: handling it would refuse every pathname unix socket.
        assert_eq!(AccessFs::from_all(TARGET_ABI), AccessFs::from_all(ABI::V6));
    }

    #[test]
    fn plan_marks_missing_paths_and_kernel_gaps() {
        let policy = LandlockPolicy {
            rules: vec![
                FsRule {
                    path: "/usr".into(),
                    access: a(true, false, true),
                },
                FsRule {
                    path: "/nope".into(),
                    access: a(true, false, false),
                },
            ],
            optional: Vec::new(),
            scope_signals: true,
            scope_abstract_unix: true,
        };
        let p = plan_with(&policy, 7, |p| (p == Path::new("/usr")).then_some(true));
        assert!(p.rules[0].exists);
        assert!(!p.rules[1].exists);
        assert_eq!(p.skipped(), vec![Path::new("/nope")]);
        assert!(p.missing.is_empty());
        let old = plan_with(&policy, 3, |_| Some(true));
        assert_eq!(
            old.missing,
            vec!["device ioctl", "signal and abstract-unix-socket scoping"]
        );
    }
}
