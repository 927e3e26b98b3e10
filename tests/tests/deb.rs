//! The Debian package (`cargo xtask deb`, docs/packaging.md) on this host: installed with
//! dpkg, its program, manuals and completions used from where they were installed; its
//! daemon, started by hand as the unit starts it, stopped by the installed prerm run as
//! under systemd (SIGINT: nothing left behind); a daemon that handed its agent over
//! (SIGTERM) cleaned up by the purge, which must leave the host as it was. The package is
//! $AGENTD_DEB (`cargo xtask test` builds one of the debug build and sets it). Host only
//! (xtask/src/vm.rs).
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
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use agentd_tests::{
    DEFAULT_LIMITS, agent_dir, assert_no_cgroup, process_gone, profile_file, repo_root, require,
    require_root, stderr, stdout, test_profile, wait_until,
};
use serde_json::Value;
use sha2::Digest as _;

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
/// The unit's daemon (dist/agentd.service), started by hand on the same paths: its pins
/// are where the purge looks for them.
const DAEMON_ARGS: [&str; 9] = [
    "daemon",
    "--socket",
    "/run/agentd/agentd.sock",
    "--state-dir",
    "/var/lib/agentd",
    "--audit-log",
    "/var/log/agentd/audit.log",
    "--group",
    "agentd",
];
const SOCKET: &str = "/run/agentd/agentd.sock";
/// Where every daemon pins its kernel watch, one directory per state directory.
const PIN_ROOT: &str = "/sys/fs/bpf/agentd";
/// Stand-ins for systemd's tools in the prerm's test: `agentd.service` is the process
/// $DAEMON_PID; every call is appended to $CALLS.
const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$DAEMON_PID/status" 2>/dev/null)
echo "systemctl $*" >>"$CALLS"
case "$*" in
"--quiet is-active agentd.service") [ -n "$state" ] && [ "$state" != Z ] ;;
"kill --kill-whom=main --signal=INT agentd.service") kill -INT "$DAEMON_PID" ;;
*) exit 1 ;;
esac
"#;
const FAKE_INVOKE: &str = r#"#!/bin/sh
state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$DAEMON_PID/status" 2>/dev/null)
running=no
[ -n "$state" ] && [ "$state" != Z ] && running=yes
echo "deb-systemd-invoke $* (daemon running: $running)" >>"$CALLS"
"#;

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

/// The package's daemon's pin directory (`pin_dir` in agentd/src/daemon/mod.rs).
fn package_pins() -> PathBuf {
    let digest = sha2::Sha256::digest(b"/var/lib/agentd");
    let tag: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Path::new(PIN_ROOT).join(tag)
}

/// The installed daemon, started by hand as the unit would start it; SIGINT (no handover)
/// on drop if it still runs.
struct PackagedDaemon {
    child: Child,
    log: PathBuf,
}

impl PackagedDaemon {
    fn start(dir: &Path, name: &str, grace_s: u32) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).unwrap();
        let mut cmd = Command::new("/usr/bin/agentd");
        // Its own session, as systemd starts it.
        // SAFETY: setsid is async-signal-safe and takes no arguments.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .args(DAEMON_ARGS)
            .args(["--handover-grace", &grace_s.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut d = PackagedDaemon { child, log };
        let started = Instant::now();
        loop {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("the packaged daemon exited: {st}\n{}", d.log());
            }
            if UnixStream::connect(SOCKET).is_ok()
                && run("/usr/bin/agentd", &["ps"], &[]).status.success()
            {
                return d;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the packaged daemon did not answer\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory arguments; the pid is our child's, not yet reaped.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits for it to exit (it was told to).
    fn exited(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the packaged daemon did not stop\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PackagedDaemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGINT);
            let _ = self.child.wait();
        }
    }
}

/// `agentd run` of the installed program (as nobody, through the package's daemon), with
/// an agent that sleeps; killed (SIGKILL), with the supervisor it names, on drop.
struct Agent {
    client: Child,
    supervisor: Option<u32>,
}

impl Agent {
    fn launch(profile: &Path, ws: &Path) -> Self {
        let client = Command::new("/usr/bin/agentd")
            .arg("run")
            .arg("--profile")
            .arg(profile)
            .arg("--workspace")
            .arg(ws)
            .args(["--", "/bin/sleep", "600"])
            .env("SUDO_UID", "65534")
            .env("SUDO_GID", "65534")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Agent {
            client,
            supervisor: None,
        }
    }

    /// Its row in `agentd ps`, once it runs.
    fn running(&mut self, profile: &str) -> Value {
        let mut found = None;
        wait_until(Duration::from_secs(60), "the agent running", || {
            assert!(
                self.client.try_wait().unwrap().is_none(),
                "agentd run exited early"
            );
            let ps = ok("/usr/bin/agentd", &["ps", "--json"], &[]);
            let rows: Vec<Value> = serde_json::from_str(&ps).unwrap();
            found = rows
                .into_iter()
                .find(|r| r["profile"] == profile && r["state"] == "running");
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(pid) = self.supervisor
            && !process_gone(pid)
        {
            // SAFETY: kill has no memory arguments; the supervisor our daemon started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}

/// Runs the installed prerm with `action` as if systemd ran `daemon` as agentd.service:
/// in a mount namespace of its own, /run/systemd/system exists, policy-rc.d exits
/// `policy`, and systemctl and deb-systemd-invoke are stand-ins that act on `daemon`.
/// Returns the calls they got.
fn prerm_under_systemd(action: &str, policy: u8, daemon: &PackagedDaemon, dir: &Path) -> String {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let policy_rc_d = dir.join("policy-rc.d");
    let calls = dir.join("calls");
    let _ = fs::remove_file(&calls);
    for (path, text) in [
        (bin.join("systemctl"), FAKE_SYSTEMCTL.to_owned()),
        (bin.join("deb-systemd-invoke"), FAKE_INVOKE.to_owned()),
        (
            policy_rc_d.clone(),
            format!("#!/bin/sh\necho \"policy-rc.d $*\" >>\"$CALLS\"\nexit {policy}\n"),
        ),
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let pid = daemon.pid().to_string();
    ok(
        "unshare",
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-ec",
            "mount -t tmpfs agentd-deb-test /run\n\
             mkdir -p /run/systemd/system\n\
             mount --bind \"$1\" /usr/sbin/policy-rc.d\n\
             exec /var/lib/dpkg/info/agentd.prerm \"$2\"",
            "sh",
            &policy_rc_d.display().to_string(),
            action,
        ],
        &[
            ("PATH", &path),
            ("CALLS", &calls.display().to_string()),
            ("DAEMON_PID", &pid),
        ],
    );
    fs::read_to_string(&calls).unwrap_or_default()
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
        UnixStream::connect(SOCKET).is_err(),
        "a daemon serves {SOCKET}: the purge would delete its runtime directory; stop it \
         first"
    );
    let pins = package_pins();
    assert!(
        !exists(&pins),
        "{} exists: a daemon on /var/lib/agentd pinned its kernel watch there, and the \
         purge would remove it",
        pins.display()
    );
    if !require(
        Path::new("/usr/bin/unshare").exists(),
        "unshare (util-linux), to run the prerm as under systemd",
    ) {
        return;
    }

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

    // The manuals --help names as docs/NAME.md, byte for byte.
    for name in [
        "daemon.md",
        "ui.md",
        "export.md",
        "metrics.md",
        "packaging.md",
    ] {
        let installed = Path::new("/usr/share/doc/agentd").join(name);
        assert_eq!(
            fs::read(&installed).ok(),
            fs::read(agentd_tests::repo_root().join("docs").join(name)).ok(),
            "{} is not docs/{name}",
            installed.display()
        );
    }

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

    // The daemon as the unit runs it, started by hand (PID 1 here is not systemd), with an
    // agent; the prerm's `remove` run as under systemd, with stand-ins for systemctl.
    let scratch = agent_dir(false);
    let (_p, profile) = profile_file(&test_profile("deb-remove", "invoker", DEFAULT_LIMITS, ""));
    let ws = agent_dir(true);
    let mut daemon = PackagedDaemon::start(scratch.path(), "remove", 60);
    let mut agent = Agent::launch(&profile, ws.path());
    let row = agent.running("deb-remove");
    let agent_pid = row["pid"].as_u64().unwrap() as u32;
    let started = Instant::now();
    // policy-rc.d forbids it: nothing is signalled or stopped.
    let calls = prerm_under_systemd("remove", 101, &daemon, scratch.path());
    assert_eq!(calls, "policy-rc.d agentd.service stop\n");
    // An upgrade leaves the daemon running (the new postinst restarts it: a handover).
    let calls = prerm_under_systemd("upgrade", 0, &daemon, scratch.path());
    assert_eq!(calls, "");
    assert!(daemon.child.try_wait().unwrap().is_none());
    assert!(!process_gone(agent_pid));
    // A removal: SIGINT, waited for, then `stop`.
    let calls = prerm_under_systemd("remove", 0, &daemon, scratch.path());
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(
        lines[..3],
        [
            "policy-rc.d agentd.service stop",
            "systemctl --quiet is-active agentd.service",
            "systemctl kill --kill-whom=main --signal=INT agentd.service",
        ],
        "{calls}"
    );
    assert_eq!(
        lines.last(),
        Some(&"deb-systemd-invoke stop agentd.service (daemon running: no)"),
        "{calls}"
    );
    let status = daemon.exited();
    eprintln!(
        "prerm remove stopped the daemon in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(status.success(), "{status}\n{}", daemon.log());
    // SIGINT: the agent is killed, nothing is handed over, nothing stays pinned.
    wait_until(Duration::from_secs(10), "the agent killed", || {
        process_gone(agent_pid)
    });
    assert!(
        !exists(Path::new("/var/lib/agentd/handover.json")),
        "{}",
        daemon.log()
    );
    assert!(!exists(&pins), "{} stays\n{}", pins.display(), daemon.log());
    drop(agent);
    drop(daemon);

    // A daemon that stopped with SIGTERM (`systemctl stop`, or the prerm before it used
    // SIGINT) with an agent running: it hands the agent over to a successor that never
    // comes, its kernel watch pinned and attached. The purge removes that, killing the
    // agent first.
    let (_p, profile) = profile_file(&test_profile("deb-purge", "invoker", DEFAULT_LIMITS, ""));
    let mut daemon = PackagedDaemon::start(scratch.path(), "purge", 60);
    let mut agent = Agent::launch(&profile, ws.path());
    let row = agent.running("deb-purge");
    let agent_pid = row["pid"].as_u64().unwrap() as u32;
    let cgroup = PathBuf::from(row["cgroup"].as_str().unwrap());
    let cgroup_id = fs::metadata(&cgroup).unwrap().ino();
    daemon.signal(libc::SIGTERM);
    assert!(daemon.exited().success(), "{}", daemon.log());
    let handover: Value =
        serde_json::from_str(&fs::read_to_string("/var/lib/agentd/handover.json").unwrap())
            .unwrap();
    agent.supervisor = handover["agents"][0]["supervisor_pid"]
        .as_u64()
        .map(|p| p as u32);
    assert!(
        fs::read_dir(pins.join("watch-links")).unwrap().count() > 0,
        "{}",
        daemon.log()
    );
    assert!(exists(&pins.join(cgroup_id.to_string())));
    assert!(
        !process_gone(agent_pid),
        "the handed-over agent is not running"
    );

    // What a daemon would have left: the purge removes it.
    let listed = ok("dpkg", &["-L", PACKAGE], &[]);
    for file in DAEMON_FILES {
        let file = Path::new(file);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(file, "left by a daemon\n").unwrap();
    }

    let started = Instant::now();
    let out = run("dpkg", &["--purge", PACKAGE], &[]);
    eprintln!("purged in {:.1}s", started.elapsed().as_secs_f64());
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "dpkg --purge failed: {said}");
    eprint!("{said}");

    // The handed-over agent killed, its cgroup removed, the watch unpinned.
    assert!(
        said.contains("agentd postrm: killing agent deb-purge-"),
        "{said}"
    );
    assert!(
        said.contains("agentd postrm: removed the kernel watch"),
        "{said}"
    );
    wait_until(Duration::from_secs(5), "the agent killed", || {
        process_gone(agent_pid)
    });
    assert_no_cgroup(row["id"].as_str().unwrap());
    assert!(!exists(&pins), "the purge left {}", pins.display());
    drop(agent);
    drop(daemon);

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
