//! Tests against synthetic upper trees and workspaces in temporary directories (as root:
//! whiteouts are `mknod`, the opaque xattr is `trusted.*`, owners are set).

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    os::{
        fd::AsFd as _,
        unix::{
            ffi::OsStrExt as _,
            fs::{MetadataExt as _, PermissionsExt as _, symlink},
        },
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use nix::sys::stat::{Mode as FileMode, SFlag, mknod};
use sha2::Digest as _;

use super::*;

static N: AtomicU32 = AtomicU32::new(0);

struct Fx {
    root: PathBuf,
    ws: PathBuf,
    up: PathBuf,
    store: Store,
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn fx(name: &str) -> Fx {
    let root = std::env::temp_dir().join(format!(
        "agentd-tx-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("ws")).unwrap();
    std::fs::create_dir_all(root.join("up")).unwrap();
    let store = Store::open(&root.join("state")).unwrap();
    let ws = root.join("ws").canonicalize().unwrap();
    Fx {
        up: root.join("up"),
        ws,
        store,
        root,
    }
}

fn now() -> (i64, u32) {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).unwrap();
    (t.tv_sec(), u32::try_from(t.tv_nsec()).unwrap())
}

fn put(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, data).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn whiteout(p: &Path) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    mknod(p, SFlag::S_IFCHR, FileMode::empty(), 0).unwrap();
}

fn opaque(p: &Path) {
    std::fs::create_dir_all(p).unwrap();
    let d = std::fs::File::open(p).unwrap();
    fsx::set_opaque(d.as_fd()).unwrap();
}

impl Fx {
    fn meta(&self, id: &str) -> Meta {
        Meta {
            id: id.to_string(),
            owner_uid: 1000,
            profile: "coding-agent".to_string(),
            workspace: self.ws.clone(),
            mode: Mode::Transaction,
            limit_bytes: 1 << 30,
            launched: (0, 0),
            supervisor_pid: i32::try_from(std::process::id()).unwrap(),
            state: State::Running,
            exit: None,
            bytes: 0,
            commits: 0,
            protect: Vec::new(),
            workspace_id: None,
        }
    }

    /// Records the launch now (the workspace is set up before), then persists `up` once
    /// `after_launch` (changes to the real workspace) ran.
    fn launch_with(&self, after_launch: impl FnOnce(&Path)) -> Transaction {
        std::thread::sleep(Duration::from_millis(30));
        let mut meta = self.meta("coding-agent-1a2b3c");
        meta.launched = now();
        let mut tx = self.store.create(meta).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        after_launch(&self.ws);
        tx.persist(&self.up, "exit 0").unwrap();
        assert_eq!(tx.meta().state, State::Pending);
        tx
    }

    fn launch(&self) -> Transaction {
        self.launch_with(|_| {})
    }
}

/// Type, mode, owner, contents or target, and (files) mtime of every entry below `dir`.
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().to_path_buf();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(base, &p, out);
                "dir".to_string()
            } else if !m.is_file() {
                format!("node {:o} rdev {}", m.mode(), m.rdev())
            } else {
                let data = std::fs::read(&p).unwrap();
                format!(
                    "file {} mtime {}.{}",
                    fsx::hex(&sha2::Sha256::digest(&data)),
                    m.mtime(),
                    m.mtime_nsec()
                )
            };
            out.insert(
                rel,
                format!(
                    "{what} mode {:o} {}:{}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ),
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A workspace and an upper with one of everything.
fn everything(f: &Fx) {
    let (ws, up) = (&f.ws, &f.up);
    put(&ws.join("a.txt"), b"one\n");
    put(&ws.join("b.txt"), b"bye\n");
    put(&ws.join("mv_src.txt"), b"rename me\n");
    put(&ws.join("script.sh"), b"#!/bin/sh\n");
    chmod(&ws.join("script.sh"), 0o644);
    put(&ws.join("same.txt"), b"same\n");
    chmod(&ws.join("same.txt"), 0o644);
    put(&ws.join("bin.dat"), b"\x00\x01\x02");
    symlink("a.txt", ws.join("link")).unwrap();
    put(&ws.join("d/x"), b"x\n");
    put(&ws.join("opq/old1"), b"old\n");
    put(&ws.join("opq/sub/deep"), b"deep\n");
    put(&ws.join("opq/keep"), b"k\n");
    chmod(&ws.join("opq/keep"), 0o644);
    put(&ws.join("gone/g1"), b"g\n");

    put(&up.join("a.txt"), b"one\ntwo\n");
    whiteout(&up.join("b.txt"));
    put(&up.join("new.txt"), b"hello\n");
    whiteout(&up.join("mv_src.txt"));
    put(&up.join("mv_dst.txt"), b"rename me\n");
    symlink("b.txt", up.join("link")).unwrap();
    symlink("a.txt", up.join("newlink")).unwrap();
    put(&up.join("script.sh"), b"#!/bin/sh\n");
    chmod(&up.join("script.sh"), 0o755);
    put(&up.join("same.txt"), b"same\n");
    chmod(&up.join("same.txt"), 0o644);
    put(&up.join("bin.dat"), b"\x00\x01\x03\x04");
    std::fs::create_dir_all(up.join("emptydir")).unwrap();
    put(&up.join("d/y"), b"y\n");
    opaque(&up.join("opq"));
    put(&up.join("opq/keep"), b"k\n");
    chmod(&up.join("opq/keep"), 0o644);
    whiteout(&up.join("gone"));
    // Directories copied up keep the real ones' modes.
    for d in ["d", "opq"] {
        let m = std::fs::metadata(ws.join(d)).unwrap().mode();
        chmod(&up.join(d), m & 0o7777);
    }
}

fn kinds(changes: &[Change]) -> BTreeMap<String, ChangeKind> {
    changes
        .iter()
        .map(|c| (c.path.display().to_string(), c.kind.clone()))
        .collect()
}

#[test]
fn transaction_changes_of_every_kind() {
    let f = fx("kinds");
    everything(&f);
    let tx = f.launch();
    let changes = tx.changes(&[]).unwrap();
    let k = kinds(&changes);
    let expect: BTreeMap<String, ChangeKind> = [
        ("a.txt", ChangeKind::Modified),
        ("b.txt", ChangeKind::Deleted),
        ("bin.dat", ChangeKind::Modified),
        ("emptydir", ChangeKind::Added),
        ("d/y", ChangeKind::Added),
        ("gone", ChangeKind::Deleted),
        ("gone/g1", ChangeKind::Deleted),
        ("link", ChangeKind::Modified),
        (
            "mv_dst.txt",
            ChangeKind::Renamed {
                from: PathBuf::from("mv_src.txt"),
            },
        ),
        ("new.txt", ChangeKind::Added),
        ("newlink", ChangeKind::Added),
        ("opq/old1", ChangeKind::Deleted),
        ("opq/sub", ChangeKind::Deleted),
        ("opq/sub/deep", ChangeKind::Deleted),
        (
            "script.sh",
            ChangeKind::ModeChanged {
                from: 0o644,
                to: 0o755,
            },
        ),
    ]
    .into_iter()
    .map(|(p, k)| (p.to_string(), k))
    .collect();
    assert_eq!(k, expect, "{changes:#?}");
    for c in &changes {
        assert_eq!(c.conflict, None, "{}", c.path.display());
    }
    let a = changes
        .iter()
        .find(|c| c.path == Path::new("a.txt"))
        .unwrap();
    assert_eq!((a.insertions, a.deletions), (Some(1), Some(0)));
    let dir = changes
        .iter()
        .find(|c| c.path == Path::new("emptydir"))
        .unwrap();
    assert_eq!(dir.file_type, FileType::Dir);

    // `only`, relative or absolute.
    let only = tx.changes(&[PathBuf::from("opq")]).unwrap();
    assert_eq!(only.len(), 3);
    let only = tx.changes(&[f.ws.join("a.txt")]).unwrap();
    assert_eq!(only.len(), 1);
    assert!(tx.changes(&[PathBuf::from("../x")]).is_err());
    assert!(tx.changes(&[PathBuf::from("/etc")]).is_err());

    let stat = render_stat(&changes);
    assert!(stat.contains(" M a.txt"), "{stat}");
    assert!(stat.contains("mv_src.txt => mv_dst.txt"), "{stat}");
    assert!(stat.contains("15 paths changed, "), "{stat}");
    let diff = render_diff(&tx, &changes).unwrap();
    assert!(
        diff.contains("--- a/a.txt\n+++ b/a.txt\n@@ -1 +1,2 @@\n one\n+two\n"),
        "{diff}"
    );
    assert!(diff.contains("binary: 3 bytes sha256 "), "{diff}");
    assert!(
        diff.contains("-symlink to a.txt\n+symlink to b.txt\n"),
        "{diff}"
    );
    assert!(diff.contains("old mode 644\nnew mode 755"), "{diff}");
    assert!(diff.contains("new directory mode"), "{diff}");
    assert!(
        diff.contains("rename from mv_src.txt\nrename to mv_dst.txt"),
        "{diff}"
    );
    let json = serde_json::to_string(&changes).unwrap();
    assert!(
        json.contains(r#""kind":"renamed","from":"mv_src.txt""#),
        "{json}"
    );
}

#[test]
fn transaction_commit_then_undo_restores_the_tree() {
    let f = fx("roundtrip");
    everything(&f);
    let before = tree(&f.ws);
    let mut tx = f.launch();
    let report = tx.commit(&[]).unwrap();
    assert!(report.conflicts.is_empty(), "{report:#?}");
    assert_eq!(report.state, State::Committed);
    assert_eq!(report.commit, Some(1));
    assert_eq!(std::fs::read(f.ws.join("a.txt")).unwrap(), b"one\ntwo\n");
    assert!(!f.ws.join("b.txt").exists());
    assert!(!f.ws.join("mv_src.txt").exists());
    assert!(!f.ws.join("gone").exists());
    assert!(!f.ws.join("opq/old1").exists() && !f.ws.join("opq/sub").exists());
    assert_eq!(std::fs::read(f.ws.join("opq/keep")).unwrap(), b"k\n");
    assert_eq!(
        std::fs::read_link(f.ws.join("link")).unwrap(),
        Path::new("b.txt")
    );
    assert_eq!(
        std::fs::metadata(f.ws.join("script.sh")).unwrap().mode() & 0o777,
        0o755
    );
    assert!(f.ws.join("emptydir").is_dir());
    assert_eq!(std::fs::read(f.ws.join("d/y")).unwrap(), b"y\n");
    assert!(tx.changes(&[]).unwrap().is_empty());
    // No temporary names left behind.
    assert!(
        !tree(&f.ws)
            .keys()
            .any(|p| p.to_string_lossy().contains(".agentd-commit-"))
    );
    // Upper is empty.
    assert_eq!(
        std::fs::read_dir(tx.dir().join("upper")).unwrap().count(),
        0
    );
    let committed = tree(&f.ws);

    let undo = tx.undo().unwrap();
    assert!(undo.refused.is_empty(), "{undo:#?}");
    assert_eq!(undo.state, State::Undone);
    assert_eq!(tree(&f.ws), before);
    assert!(tx.undo().is_err(), "nothing left to undo");
    assert_ne!(committed, before);

    // The store's reading: discard removes it.
    let id = tx.meta().id.clone();
    tx.discard().unwrap();
    assert!(matches!(f.store.get(&id), Err(TxError::Unknown(_))));
}

#[test]
fn transaction_conflicts_are_left_alone() {
    let f = fx("conflict");
    put(&f.ws.join("a.txt"), b"one\n");
    put(&f.ws.join("d/keep"), b"k\n");
    put(&f.ws.join("e/keep"), b"k\n");
    put(&f.up.join("a.txt"), b"agent\n");
    put(&f.up.join("new.txt"), b"new\n");
    put(&f.up.join("d/new"), b"n\n");
    put(&f.up.join("e/new"), b"n\n");
    whiteout(&f.up.join("e/keep"));
    let mut tx = f.launch_with(|ws| {
        put(&ws.join("a.txt"), b"user\n");
        // The user adds next to d/new: its directory changed.
        put(&ws.join("d/user"), b"u\n");
        // The user edits a file the agent deleted.
        put(&ws.join("e/keep"), b"edited\n");
    });
    let changes = tx.changes(&[]).unwrap();
    let conflicted: Vec<_> = changes
        .iter()
        .filter(|c| c.conflict.is_some())
        .map(|c| c.path.display().to_string())
        .collect();
    assert_eq!(conflicted, ["a.txt", "d/new", "e/keep"], "{changes:#?}");
    let report = tx.commit(&[]).unwrap();
    let paths: Vec<_> = report.conflict_paths();
    assert_eq!(
        paths,
        [
            PathBuf::from("a.txt"),
            PathBuf::from("d/new"),
            PathBuf::from("e/keep")
        ],
        "{report:#?}"
    );
    assert_eq!(report.state, State::Pending);
    assert_eq!(std::fs::read(f.ws.join("a.txt")).unwrap(), b"user\n");
    assert_eq!(std::fs::read(f.ws.join("e/keep")).unwrap(), b"edited\n");
    assert!(!f.ws.join("d/new").exists());
    assert_eq!(std::fs::read(f.ws.join("new.txt")).unwrap(), b"new\n");
    assert_eq!(std::fs::read(f.ws.join("e/new")).unwrap(), b"n\n");
    // The rest stays, still in conflict; committing again changes nothing.
    assert_eq!(tx.changes(&[]).unwrap().len(), 3);
    let again = tx.commit(&[]).unwrap();
    assert_eq!(again.conflicts.len(), 3);
    assert_eq!(again.commit, None);
}

#[test]
fn transaction_partial_commit_then_the_rest() {
    let f = fx("partial");
    put(&f.ws.join("src/old.rs"), b"old\n");
    put(&f.up.join("src/a.rs"), b"a\n");
    put(&f.up.join("src/b.rs"), b"b\n");
    put(&f.up.join("newdir/c.rs"), b"c\n");
    put(&f.up.join("README"), b"r\n");
    let mut tx = f.launch();
    let r = tx
        .commit(&[PathBuf::from("src/a.rs"), PathBuf::from("newdir/c.rs")])
        .unwrap();
    assert!(r.conflicts.is_empty(), "{r:#?}");
    assert_eq!(r.state, State::Pending);
    assert!(f.ws.join("src/a.rs").exists() && f.ws.join("newdir/c.rs").exists());
    assert!(!f.ws.join("src/b.rs").exists() && !f.ws.join("README").exists());
    // src/ and the workspace root changed, by agentd: the rest is no conflict.
    let left = tx.changes(&[]).unwrap();
    assert_eq!(left.len(), 2, "{left:#?}");
    assert!(left.iter().all(|c| c.conflict.is_none()), "{left:#?}");
    let r = tx.commit(&[]).unwrap();
    assert!(r.conflicts.is_empty(), "{r:#?}");
    assert_eq!(r.state, State::Committed);
    assert_eq!(tx.meta().commits, 2);
    // Undo the second commit only.
    let u = tx.undo().unwrap();
    assert!(u.refused.is_empty(), "{u:#?}");
    assert_eq!(u.state, State::Committed);
    assert!(!f.ws.join("src/b.rs").exists() && f.ws.join("src/a.rs").exists());
}

#[test]
fn transaction_undo_refuses_what_changed_since_the_commit() {
    let f = fx("undo-changed");
    put(&f.ws.join("a.txt"), b"one\n");
    put(&f.up.join("a.txt"), b"two\n");
    put(&f.up.join("b.txt"), b"b\n");
    let mut tx = f.launch();
    tx.commit(&[]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    put(&f.ws.join("a.txt"), b"three\n");
    let u = tx.undo().unwrap();
    assert_eq!(u.refused.len(), 1, "{u:#?}");
    assert_eq!(u.refused.first().unwrap().path, Path::new("a.txt"));
    assert!(!f.ws.join("b.txt").exists());
    assert_eq!(std::fs::read(f.ws.join("a.txt")).unwrap(), b"three\n");
    assert_eq!(tx.meta().commits, 1, "the commit keeps the refused path");
}

#[test]
fn transaction_type_changes_commit_and_undo() {
    let f = fx("types");
    put(&f.ws.join("was_file"), b"f\n");
    put(&f.ws.join("was_dir/inner"), b"i\n");
    symlink("/etc", f.ws.join("was_link")).unwrap();
    let before = tree(&f.ws);
    opaque(&f.up.join("was_file"));
    put(&f.up.join("was_file/now"), b"n\n");
    put(&f.up.join("was_dir"), b"now a file\n");
    put(&f.up.join("was_link/x"), b"x\n");
    opaque(&f.up.join("was_link"));
    let mut tx = f.launch();
    let k = kinds(&tx.changes(&[]).unwrap());
    assert_eq!(
        k.get("was_file"),
        Some(&ChangeKind::TypeChanged {
            from: FileType::File
        })
    );
    assert_eq!(
        k.get("was_dir"),
        Some(&ChangeKind::TypeChanged {
            from: FileType::Dir
        })
    );
    assert_eq!(k.get("was_dir/inner"), Some(&ChangeKind::Deleted));
    let r = tx.commit(&[]).unwrap();
    assert!(r.conflicts.is_empty(), "{r:#?}");
    assert_eq!(std::fs::read(f.ws.join("was_file/now")).unwrap(), b"n\n");
    assert_eq!(
        std::fs::read(f.ws.join("was_dir")).unwrap(),
        b"now a file\n"
    );
    assert!(
        std::fs::symlink_metadata(f.ws.join("was_link"))
            .unwrap()
            .is_dir()
    );
    assert!(!Path::new("/etc/x").exists());
    let u = tx.undo().unwrap();
    assert!(u.refused.is_empty(), "{u:#?}");
    assert_eq!(tree(&f.ws), before);
}

/// A symlink planted in the workspace after launch (workspace/dir -> a directory outside)
/// must not let commit write outside: the entry is refused.
#[test]
fn transaction_symlink_planted_in_the_workspace_is_not_followed() {
    for ignore_ctimes in [false, true] {
        let f = fx("planted");
        let outside = f.root.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        put(&f.ws.join("dir/file"), b"real\n");
        put(&f.up.join("dir/evil.txt"), b"pwned\n");
        put(&f.up.join("dir/file"), b"changed\n");
        // Elsewhere in the workspace, unaffected.
        std::fs::create_dir_all(f.ws.join("other")).unwrap();
        put(&f.up.join("other/ok.txt"), b"fine\n");
        for d in ["dir", "other"] {
            let mode = std::fs::metadata(f.ws.join(d)).unwrap().mode();
            chmod(&f.up.join(d), mode & 0o7777);
        }
        let mut tx = f.launch_with(|ws| {
            std::fs::remove_dir_all(ws.join("dir")).unwrap();
            symlink(&outside, ws.join("dir")).unwrap();
        });
        if ignore_ctimes {
            // Even with every ctime looking old, nothing is followed.
            tx.meta.launched = (i64::MAX / 4, 0);
            tx.save_meta().unwrap();
        }
        let changes = tx.changes(&[]).unwrap();
        assert!(!changes.is_empty());
        let r = tx.commit(&[]).unwrap();
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "{r:#?}");
        assert_eq!(std::fs::read(f.ws.join("other/ok.txt")).unwrap(), b"fine\n");
        if ignore_ctimes {
            // The symlink was replaced by a directory (saved for undo), never followed.
            assert!(
                std::fs::symlink_metadata(f.ws.join("dir"))
                    .unwrap()
                    .is_dir()
            );
        } else {
            assert!(
                r.conflicts.iter().any(|c| c.path == Path::new("dir")),
                "{r:#?}"
            );
            assert!(
                r.conflicts
                    .iter()
                    .any(|c| c.path == Path::new("dir/evil.txt")),
                "{r:#?}"
            );
            assert!(
                std::fs::symlink_metadata(f.ws.join("dir"))
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );
        }
    }
}

#[test]
fn transaction_resolution_refuses_symlinks_dotdot_and_absolute() {
    let f = fx("resolve");
    std::fs::create_dir_all(f.ws.join("real")).unwrap();
    symlink("/etc", f.ws.join("link")).unwrap();
    symlink("real", f.ws.join("rel_link")).unwrap();
    let ws = plan::open_workspace(&f.ws, None).unwrap();
    let flags = nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY;
    assert!(fsx::open_beneath(ws.as_fd(), Path::new("real"), flags).is_ok());
    for bad in ["link", "link/ssl", "rel_link", "../", "real/../..", "/etc"] {
        assert!(
            fsx::open_beneath(ws.as_fd(), Path::new(bad), flags).is_err(),
            "{bad} resolved"
        );
    }
    // A workspace path through a symlink is refused too.
    assert!(plan::open_workspace(&f.ws.join("rel_link"), None).is_err());
}

#[test]
fn transaction_hostile_names_are_printed_escaped() {
    let f = fx("hostile");
    let evil = OsStr::from_bytes(b"a\n+++ b/x");
    let esc = OsStr::from_bytes(b"\x1b[31mred");
    let bad = OsStr::from_bytes(b"bad\xff\\name");
    put(&f.up.join(evil), b"line\n");
    put(&f.up.join(esc), b"text \x1b]0;title\x07 and \x1b[2J\n");
    put(&f.up.join(bad), b"x\n");
    symlink(OsStr::from_bytes(b"\x1b[1mt\nx"), f.up.join("link")).unwrap();
    let tx = f.launch();
    let changes = tx.changes(&[]).unwrap();
    // "a\n+++ b" is a directory holding "x".
    assert_eq!(changes.len(), 5);
    for out in [render_stat(&changes), render_diff(&tx, &changes).unwrap()] {
        assert!(!out.contains('\x1b'), "{out}");
        assert!(!out.contains('\x07'), "{out}");
        assert!(!out.lines().any(|l| l.starts_with("+++ b/x")), "{out}");
        assert!(out.contains(r"a\n+++ b/x"), "{out}");
        assert!(out.contains(r"\x1b[31mred"), "{out}");
        assert!(out.contains(r"bad\xff\\name"), "{out}");
        assert!(out.contains(r"\x1b[1mt\nx"), "{out}");
    }
    let diff = render_diff(&tx, &changes).unwrap();
    assert!(
        diff.contains(r"+text \x1b]0;title\x07 and \x1b[2J"),
        "{diff}"
    );
    assert_eq!(
        printable(b"tab\there\r\x7f\xc2\x9b\\"),
        r"tab\there\r\x7f\u{9b}\\"
    );
    assert_eq!(printable("é ✓".as_bytes()), "é ✓");
    // JSON keeps names losslessly.
    let json = serde_json::to_string(&changes).unwrap();
    assert!(json.contains(r#""path":"a\n+++ b/x""#), "{json}");
}

#[test]
fn transaction_ten_thousand_files() {
    let f = fx("many");
    for d in 0..10 {
        for i in 0..1000 {
            put(
                &f.up.join(format!("d{d}/f{i}")),
                format!("{d}/{i}\n").as_bytes(),
            );
        }
    }
    let mut tx = f.launch();
    let r = tx.commit(&[]).unwrap();
    assert!(r.conflicts.is_empty());
    assert_eq!(r.committed.len(), 10_010);
    assert_eq!(r.state, State::Committed);
    for d in 0..10 {
        assert_eq!(
            std::fs::read_dir(f.ws.join(format!("d{d}")))
                .unwrap()
                .count(),
            1000
        );
    }
    assert_eq!(std::fs::read(f.ws.join("d7/f123")).unwrap(), b"7/123\n");
}

#[test]
fn transaction_persist_copies_without_following() {
    let f = fx("persist");
    put(&f.up.join("file"), b"data");
    chmod(&f.up.join("file"), 0o751);
    std::os::unix::fs::lchown(f.up.join("file"), Some(1234), Some(4321)).unwrap();
    symlink("/etc/passwd", f.up.join("pw")).unwrap();
    symlink("/etc", f.up.join("etcdir")).unwrap();
    whiteout(&f.up.join("wh"));
    opaque(&f.up.join("opq"));
    put(&f.up.join("opq/in"), b"i");
    let src = tree(&f.up);
    let tx = f.launch();
    let up = tx.dir().join("upper");
    assert_eq!(tree(&up), src);
    let wh = std::fs::symlink_metadata(up.join("wh")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &wh.file_type()
    ));
    assert_eq!(wh.rdev(), 0);
    let d = std::fs::File::open(up.join("opq")).unwrap();
    assert!(fsx::is_opaque(d.as_fd()).unwrap());
    assert_eq!(tx.meta().bytes, 4 + 1 + 11 + 4);
    assert_eq!(tx.meta().exit.as_deref(), Some("exit 0"));
    // The store is root's alone.
    for p in [f.store.root.clone(), tx.dir().to_path_buf()] {
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
    }
}

#[test]
fn transaction_store_ids_list_and_reap() {
    let f = fx("store");
    for bad in ["", ".", "..", "a/b", "../x", ".hidden"] {
        assert!(matches!(f.store.get(bad), Err(TxError::BadId(_))), "{bad}");
    }
    let e = f.store.get("nope-123").unwrap_err().to_string();
    assert!(e.contains("agentd transactions"), "{e}");
    f.store.create(f.meta("alive-1")).unwrap();
    assert!(matches!(
        f.store.create(f.meta("alive-1")),
        Err(TxError::Exists(_))
    ));
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = i32::try_from(child.id()).unwrap();
    let mut dead = f.meta("dead-1");
    dead.supervisor_pid = dead_pid;
    f.store.create(dead).unwrap();
    // A zombie counts as gone.
    std::thread::sleep(Duration::from_millis(100));
    let removed = f.store.reap_stale().unwrap();
    child.wait().unwrap();
    assert_eq!(removed, ["dead-1"]);
    let ids: Vec<_> = f.store.list().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["alive-1"]);
    let m = f.store.get("alive-1").unwrap();
    assert!(may_act(m.meta(), 0) && may_act(m.meta(), 1000) && !may_act(m.meta(), 1001));
}

#[test]
fn transaction_cli_parses() {
    use clap::{CommandFactory as _, Parser};
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: cmd::TxCommand,
    }
    Cli::command().debug_assert();
    let c = Cli::try_parse_from(["agentd", "diff", "x-1", "--stat", "src", "README"]).unwrap();
    assert!(
        matches!(c.cmd, cmd::TxCommand::Diff { stat: true, ref paths, .. } if paths.len() == 2)
    );
    let c = Cli::try_parse_from(["agentd", "commit", "x-1", "--state-dir", "/tmp/s"]).unwrap();
    assert!(
        matches!(c.cmd, cmd::TxCommand::Commit { ref state, .. } if state.state_dir == Path::new("/tmp/s"))
    );
    assert!(Cli::try_parse_from(["agentd", "transactions", "--json"]).is_ok());
}
