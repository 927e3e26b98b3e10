//! The Debian package (`cargo xtask deb`, docs/packaging.md) on this host: installed with
//! dpkg, its program, manuals and completions used from where they were installed, then
//! purged, which must leave the host as it was. The package is $AGENTD_DEB (`cargo xtask
//! test` builds one of the debug build and sets it). Host only (xtask/src/vm.rs).
//!
//! It refuses to run where it would touch the operator's own agentd: an installed (or
//! removed, not purged) agentd package, a file the package ships already there, an agentd
//! group, a daemon serving /run/agentd. What a purge deletes and the host already has (an
//! audit log in /var/log/agentd from a daemon started by hand, /run/agentd from other
//! tests' agents) is moved aside for the test and put back after it: run it alone, as
//! `cargo xtask test` does, not beside other agentd tests.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use agentd_tests::{repo_root, require, require_root, stderr, stdout};
use serde_json::Value;

const PACKAGE: &str = "agentd";
/// What the daemon creates (the unit's StateDirectory, RuntimeDirectory and LogsDirectory,
/// the defaults of `agentd daemon` and `agentd run`); a purge removes them.
const DAEMON_DIRS: [&str; 3] = ["/var/lib/agentd", "/run/agentd", "/var/log/agentd"];
/// A file in each, as a daemon would leave them.
const DAEMON_FILES: [&str; 3] = [
    "/var/lib/agentd/agents/agent-1.json",
    "/run/agentd/agents/agent-1.pid",
    "/var/log/agentd/audit.log",
];
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
/// Where deb-systemd-helper (init-system-helpers) keeps the unit's enable links, for the
/// purge to remove them.
const DSH_STATE: &str = "/var/lib/systemd/deb-systemd-helper-enabled/agentd.service.dsh-also";

fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn ok(program: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = run(program, args, envs);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// dpkg's state of the agentd package: `None` when dpkg has never heard of it.
fn package_status() -> Option<String> {
    let out = run(
        "dpkg-query",
        &["-W", "-f=${db:Status-Status}", PACKAGE],
        &[],
    );
    out.status.success().then(|| stdout(&out).trim().to_owned())
}

fn not_installed() -> bool {
    matches!(package_status().as_deref(), None | Some("not-installed"))
}

fn group_exists() -> bool {
    run("getent", &["group", PACKAGE], &[]).status.success()
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The paths in the package's data archive, absolute, with whether each is a directory.
fn package_contents(deb: &str) -> Vec<(PathBuf, bool)> {
    let listing = ok(
        "bash",
        &[
            "-o",
            "pipefail",
            "-c",
            "dpkg-deb --fsys-tarfile \"$1\" | tar -t",
            "bash",
            deb,
        ],
        &[],
    );
    listing
        .lines()
        .filter_map(|l| {
            let is_dir = l.ends_with('/');
            let rel = l.trim_start_matches('.').trim_end_matches('/');
            (!rel.is_empty()).then(|| (PathBuf::from(rel), is_dir))
        })
        .collect()
}

fn dpkg_info_entries() -> Vec<String> {
    fs::read_dir("/var/lib/dpkg/info")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("agentd.") || n.starts_with("agentd:"))
        .collect()
}

/// The NAME section of a manual page as `man` prints it, on one line.
fn man_name(page: &str) -> String {
    let text = ok(
        "man",
        &[page],
        &[
            ("MANPAGER", "cat"),
            ("PAGER", "cat"),
            ("MANWIDTH", "200"),
            ("LC_ALL", "C"),
        ],
    );
    let section: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "NAME")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .collect();
    section
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The host's own state a purge would delete, moved aside, and a policy-rc.d that lets
/// no maintainer script start or stop a service: all put back when dropped.
struct Host {
    set_aside: Vec<(PathBuf, PathBuf)>,
    policy_created: bool,
}

impl Host {
    fn prepare() -> Self {
        let mut host = Host {
            set_aside: Vec::new(),
            policy_created: false,
        };
        for dir in DAEMON_DIRS {
            let dir = PathBuf::from(dir);
            if exists(&dir) {
                let aside =
                    PathBuf::from(format!("{}.deb-test-{}", dir.display(), std::process::id()));
                fs::rename(&dir, &aside)
                    .unwrap_or_else(|e| panic!("cannot move {} aside: {e}", dir.display()));
                host.set_aside.push((dir, aside));
            }
        }
        // The package's scripts start nothing on a first install; this makes sure of it
        // (deb-systemd-invoke asks policy-rc.d). A policy-rc.d of the host's own stays.
        if !exists(Path::new(POLICY_RC_D)) {
            use std::os::unix::fs::PermissionsExt as _;
            fs::write(
                POLICY_RC_D,
                "#!/bin/sh\n# agentd's tests/tests/deb.rs: no service starts or stops now\nexit 101\n",
            )
            .unwrap();
            fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755)).unwrap();
            host.policy_created = true;
        }
        host
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for (dir, aside) in &self.set_aside {
            // Whatever is there now came during the test (the purge failed to remove it).
            if exists(dir)
                && let Err(e) = fs::remove_dir_all(dir)
            {
                eprintln!("*** cannot remove {}: {e}", dir.display());
            }
            if let Err(e) = fs::rename(aside, dir) {
                eprintln!(
                    "*** cannot put {} back from {}: {e}",
                    dir.display(),
                    aside.display()
                );
            }
        }
        if self.policy_created
            && let Err(e) = fs::remove_file(POLICY_RC_D)
        {
            eprintln!("*** cannot remove {POLICY_RC_D}: {e}");
        }
    }
}

/// Purges the package when dropped, also after a failed assertion.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if not_installed() {
            return;
        }
        let out = run("dpkg", &["--purge", PACKAGE], &[]);
        if !out.status.success() {
            eprintln!(
                "*** dpkg --purge {PACKAGE} failed ({}):\n{}\n{}",
                out.status,
                stdout(&out),
                stderr(&out)
            );
        }
    }
}

#[test]
fn the_deb_installs_works_and_purges_without_a_trace() {
    if !require_root() {
        return;
    }
    let deb = std::env::var("AGENTD_DEB").ok();
    if !require(
        deb.is_some(),
        "AGENTD_DEB, the package to test (`cargo xtask test` builds one and sets it; \
         `cargo xtask deb --debug` prints the path of one)",
    ) {
        return;
    }
    let deb = deb.unwrap_or_default();
    assert!(Path::new(&deb).is_file(), "AGENTD_DEB={deb} is not a file");
    if !require(
        Path::new("/usr/bin/dpkg").exists() && Path::new("/usr/bin/man").exists(),
        "dpkg and man (man-db: scripts/setup.sh installs it)",
    ) {
        return;
    }

    // Nothing of the operator's own agentd may be overwritten or purged.
    assert!(
        not_installed(),
        "a package named {PACKAGE} is on this host (dpkg status {:?}): this test installs \
         and purges its own; remove it first (dpkg --purge {PACKAGE})",
        package_status()
    );
    assert!(
        !group_exists(),
        "the group {PACKAGE} exists: the purge would delete it; this test runs only where \
         the package would create it"
    );
    let contents = package_contents(&deb);
    for (path, is_dir) in &contents {
        assert!(
            *is_dir || !exists(path),
            "{} exists, and the package would overwrite it: this test runs only where \
             agentd is not installed by hand",
            path.display()
        );
    }
    assert!(
        !exists(Path::new("/etc/systemd/system/agentd.service")),
        "an agentd.service of the operator's is in /etc/systemd/system"
    );
    assert!(
        UnixStream::connect("/run/agentd/agentd.sock").is_err(),
        "a daemon serves /run/agentd/agentd.sock: the purge would delete its runtime \
         directory; stop it first"
    );

    // The control fields CI and apt rely on.
    let field = |name: &str| {
        ok("dpkg-deb", &["--field", &deb, name], &[])
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), PACKAGE);
    assert_eq!(
        field("Architecture"),
        ok("dpkg", &["--print-architecture"], &[]).trim()
    );
    let depends = field("Depends");
    assert!(
        depends.starts_with("adduser, libc6 (>= 2."),
        "Depends: {depends}"
    );
    let version = field("Version");

    // Which of the package's directories the host has already: those stay after the purge,
    // the others go.
    let existed_before: BTreeMap<PathBuf, bool> = contents
        .iter()
        .map(|(p, _)| (p.clone(), exists(p)))
        .collect();

    // Dropped in reverse order: the purge first, then the host's own state put back.
    let _host = Host::prepare();
    let _installed = Installed;

    let started = Instant::now();
    // --path-include: where dpkg is told to leave out manuals (minimal images), this
    // package's are installed all the same: they are what the test reads.
    ok("dpkg", &["--path-include=/usr/share/*", "-i", &deb], &[]);
    eprintln!("installed in {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(package_status().as_deref(), Some("installed"));
    // Every file is as the package's md5sums say.
    ok("dpkg", &["--verify", PACKAGE], &[]);

    // The group, a system one.
    let group = ok("getent", &["group", PACKAGE], &[]);
    let gid: u32 = group.split(':').nth(2).unwrap().parse().unwrap();
    assert!(
        gid < 1000,
        "the agentd group is not a system group: {group}"
    );

    // The program, from where the package put it.
    assert_eq!(
        ok("/usr/bin/agentd", &["--version"], &[]).trim(),
        format!("agentd {}", version.replacen('~', "-", 1))
    );
    // doctor: 0 when the host can enforce, 1 when something is missing (doctor/mod.rs);
    // tests/tests/doctor.rs requires this host to be ready, so must the packaged program.
    let out = run("/usr/bin/agentd", &["doctor", "--json"], &[]);
    let report: Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {}", stderr(&out)));
    assert_eq!(
        out.status.code(),
        Some(0),
        "the packaged agentd doctor says this host cannot enforce: {}\n{}",
        report["missing"],
        stderr(&out)
    );
    assert_eq!(report["enforcement_ready"], true);
    let out = run("/usr/bin/agentd", &["doctor"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("agentd doctor"),
        "{}",
        stdout(&out)
    );

    // The manuals: found by man where the package put them, named after the command, with
    // the command's own description.
    assert_eq!(
        ok("man", &["-w", "agentd"], &[]).trim(),
        "/usr/share/man/man1/agentd.1.gz"
    );
    for (page, args) in [
        ("agentd", &["-h"][..]),
        ("agentd-daemon", &["daemon", "-h"]),
    ] {
        let help = ok("/usr/bin/agentd", args, &[]);
        let about = help.lines().next().unwrap();
        assert_eq!(man_name(page), format!("{page} - {about}"));
    }
    for page in ["daemon", "run", "profile-check", "audit-verify"] {
        assert!(
            Path::new(&format!("/usr/share/man/man1/agentd-{page}.1.gz")).exists(),
            "no manual page agentd-{page}(1)"
        );
    }

    // The completions: bash loads its own and completes a subcommand; zsh's and fish's
    // are where those shells look.
    let bash = ok(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/agentd && complete -p agentd && \
             COMP_WORDS=(agentd dae) COMP_CWORD=1 && _agentd agentd dae agentd && \
             echo \"reply: ${COMPREPLY[*]}\"",
        ],
        &[],
    );
    assert!(
        bash.lines().next().unwrap().contains("-F _agentd") && bash.contains(" agentd\n"),
        "{bash}"
    );
    assert!(bash.contains("reply: daemon\n"), "{bash}");
    let zsh = fs::read_to_string("/usr/share/zsh/vendor-completions/_agentd").unwrap();
    assert!(zsh.starts_with("#compdef agentd"), "{zsh:.200}");
    let fish = fs::read_to_string("/usr/share/fish/vendor_completions.d/agentd.fish").unwrap();
    assert!(fish.contains("complete -c agentd"), "{fish:.200}");

    // The unit, running the packaged program, not enabled.
    let unit = fs::read_to_string("/lib/systemd/system/agentd.service").unwrap();
    assert!(
        unit.lines()
            .any(|l| l.starts_with("ExecStart=/usr/bin/agentd daemon ")),
        "{unit}"
    );
    assert!(
        !exists(Path::new(
            "/etc/systemd/system/multi-user.target.wants/agentd.service"
        )),
        "the install enabled the service"
    );
    assert!(
        exists(Path::new(DSH_STATE)),
        "the postinst did not record the unit's links with deb-systemd-helper"
    );

    // The examples: the built-in profiles, byte for byte, and valid.
    let examples = Path::new("/usr/share/agentd/profiles");
    let mut names: Vec<String> = fs::read_dir(examples)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let builtin: Value =
        serde_json::from_str(&ok("/usr/bin/agentd", &["profile", "list", "--json"], &[])).unwrap();
    let mut expected: Vec<String> = builtin
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["source"] == "built-in")
        .map(|p| format!("{}.toml", p["name"].as_str().unwrap()))
        .collect();
    expected.sort();
    assert_eq!(names, expected);
    for name in &names {
        assert_eq!(
            fs::read(examples.join(name)).unwrap(),
            fs::read(repo_root().join("profiles").join(name)).unwrap(),
            "{name}"
        );
    }
    let paths: Vec<String> = names
        .iter()
        .map(|n| examples.join(n).display().to_string())
        .collect();
    let mut args = vec!["profile", "check"];
    args.extend(paths.iter().map(String::as_str));
    ok("/usr/bin/agentd", &args, &[]);

    // What a daemon would have left: the purge removes it.
    let listed = ok("dpkg", &["-L", PACKAGE], &[]);
    for file in DAEMON_FILES {
        let file = Path::new(file);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(file, "left by a daemon\n").unwrap();
    }

    let started = Instant::now();
    ok("dpkg", &["--purge", PACKAGE], &[]);
    eprintln!("purged in {:.1}s", started.elapsed().as_secs_f64());

    assert!(not_installed(), "{:?}", package_status());
    for path in listed.lines().map(|l| if l == "/." { "/" } else { l }) {
        let path = Path::new(path);
        match existed_before.get(path) {
            Some(true) => assert!(exists(path), "the purge removed {}", path.display()),
            Some(false) => assert!(!exists(path), "the purge left {}", path.display()),
            None if path == Path::new("/") => {}
            None => panic!("dpkg -L lists {}, not in the package", path.display()),
        }
    }
    assert!(!group_exists(), "the purge left the group {PACKAGE}");
    // The files, not their directories: an `agentd run` elsewhere on a shared host may
    // make /run/agentd again at any time.
    for file in DAEMON_FILES {
        assert!(!exists(Path::new(file)), "the purge left {file}");
    }
    assert!(!exists(Path::new(DSH_STATE)), "the purge left {DSH_STATE}");
    assert_eq!(dpkg_info_entries(), Vec::<String>::new());
}
