//! `cargo xtask vm-test`: the privileged test suite on stock Debian kernels, each booted
//! under qemu.
//!
//! The host's kernel is one configuration out of many: hardened, with BPF LSM refused and
//! cgroup v2 in hybrid mode. Stock distribution kernels have BPF LSM active, cgroup v2 with
//! every controller and older Landlock ABIs. For each kernel asked for:
//!
//! 1. `scripts/setup-vm.sh` installs qemu, busybox-static, xz, zstd and python3 when
//!    missing, and keeps a private apt configuration with bookworm-backports in the cache
//!    directory;
//! 2. the kernel package that Debian's `linux-image-amd64` metapackage depends on is
//!    downloaded (never installed) and its uncompressed `vmlinux` extracted, once per
//!    package version (booting vmlinux instead of vmlinuz saves ~3 s of decompression
//!    under TCG);
//! 3. agentd and the test binaries of `agentd-tests` are built static into `target/vm`
//!    (its own target directory, so host builds stay valid) and packed with
//!    `xtask/vm/init`, busybox, and the host's dash, coreutils and python3 with their
//!    shared libraries (what the tests' agents run) into an uncompressed initramfs, while
//!    step 2 downloads;
//! 4. qemu boots the kernel with TCG (`/dev/kvm` on these machines is not
//!    hardware-backed); the guest's /init runs `agentd doctor --json` and every test
//!    binary with `AGENTD_TEST_MUST_RUN=1 --test-threads=1`, printing `VMTEST-` marker
//!    lines on the serial console, which qemu writes to `target/vm/logs/<kernel>.log`;
//! 5. the log decides: qemu exits 0 whatever happens in the guest, so a run passes only
//!    when the guest's last marker says `pass` and every test binary exited 0.
//!
//! The cache is `$AGENTD_VM_CACHE`, else `$XDG_CACHE_HOME/agentd-vm`, else
//! `~/.cache/agentd-vm`: outside the work tree, so that fresh clones (as CI makes) and
//! `cargo clean` keep it, and several checkouts share one copy. It holds `apt/` (private
//! sources list, package lists) and `kernels/<package>_<version>/{vmlinux,config}`. The
//! .deb itself (70-110 MB, nearly all modules the guest never loads) is deleted once
//! vmlinux is out of it: the version in the directory name says what it came from.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{BufWriter, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

/// Seconds a guest may run, boot to power-off, before it is stopped.
const DEFAULT_TIMEOUT_SECS: u64 = 900;
/// The guest's own deadline for its tests ends this much earlier, so that it still reports.
const GUEST_DEADLINE_MARGIN_SECS: u64 = 30;
/// The static builds' target directory, under the workspace root.
const TARGET_DIR: &str = "target/vm";
/// Where busybox-static puts its binary.
const BUSYBOX: &str = "/bin/busybox";
/// Debian packages whose programs (in /bin, /usr/bin) the guest gets from the host, with
/// the shared libraries they load: the tests' agents run `/bin/sh -c` (dash), coreutils
/// and python3 as they would on a Debian host. busybox provides everything else.
const HOST_PACKAGES: &[&str] = &["coreutils", "dash"];
/// Single host programs the guest gets the same way (util-linux is mostly what busybox
/// already does; the tests run `unshare` to prove it fails).
const HOST_PROGRAMS: &[&str] = &[
    "/usr/bin/sh",
    "/usr/bin/unshare",
    "/usr/bin/python3",
    // The ask tests' person signs approvals with it.
    "/usr/bin/ssh-keygen",
];
/// Loaded by glibc at run time (thread cancellation), so ldd does not list it.
const HOST_LIBRARIES: &[&str] = &["/lib/x86_64-linux-gnu/libgcc_s.so.1"];
/// Parts of Python's standard library no test needs (`config-*` holds the 25 MB static
/// libpython).
const PYTHON_SKIP: &[&str] = &[
    "config-",
    "distutils",
    "ensurepip",
    "idlelib",
    "lib2to3",
    "pydoc_data",
    "test",
    "tkinter",
    "turtledemo",
];
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Test binaries only the newest guest kernel runs: agentd's own logic (the breaker's
/// rules, a run's signals, exit codes and limits, the daemon's protocol and its crash,
/// what a profile's `on_event_loss` does once the ring buffer is full) over mechanisms
/// both guest kernels have; what differs between the kernels (Landlock's ABI, the BPF
/// programs the verifier must accept, BPF LSM, the kernel-side breaker, the restart's
/// pinned attachments) the other suites test on both. Keeping them off 6.1 keeps `cargo
/// xtask ci` within its hour.
const NEWEST_KERNEL_ONLY_TESTS: &[&str] = &["breaker", "daemon", "event_loss", "run_lifecycle"];

/// Test binaries the guests do not run: the real agent CLIs (agent_clis.rs) need Node.js,
/// their npm packages, git and tmux, which the initramfs does not carry; the others are
/// user space through and through (the daemon's and the terminal's asking flows, the
/// pseudo-terminal relay and its job control, the transaction's commit and undo), and
/// what they rely on from the kernel the other suites test in the guests; the 100-agent
/// storm is more than a guest's memory and time. Keeping them out keeps `cargo xtask ci`
/// within its hour.
const HOST_ONLY_TESTS: &[&str] = &[
    "agent_clis",
    "ask_flows",
    "deb",
    "export",
    "metrics",
    "storm",
    "terminal",
    "transaction",
    "web_ui",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// Debian 12's kernel, 6.1 (Landlock ABI 2)
    #[value(name = "6.1")]
    Debian,
    /// bookworm-backports' kernel, 6.12 (Landlock ABI 6)
    #[value(name = "6.12")]
    Backports,
    /// Both, one after the other
    All,
}

#[derive(Debug, clap::Args)]
pub struct VmTestArgs {
    /// Which kernel to boot
    #[arg(long, value_enum, default_value = "all")]
    kernel: KernelChoice,
    /// Seconds each guest may run, boot to power-off, before it is stopped
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout: u64,
    /// Print the guest's whole serial console as it runs (by default: progress lines, and
    /// the whole log only when a run fails)
    #[arg(long, short)]
    verbose: bool,
    /// Arguments for every test binary, e.g. a name filter: `vm-test -- doctor`
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// Seconds each guest may run under `cargo xtask ci`: alone, 6.12's suite took 1394 s
/// and 6.1's 1042 s under TCG on this project's 2-core machines; side by side each takes
/// longer; a slower CI machine must not fail on time.
const CI_TIMEOUT_SECS: u64 = 2700;

impl VmTestArgs {
    /// What `cargo xtask ci` runs: every kernel, the whole suite.
    pub fn ci() -> VmTestArgs {
        VmTestArgs {
            kernel: KernelChoice::All,
            timeout: CI_TIMEOUT_SECS,
            verbose: false,
            test_args: Vec::new(),
        }
    }
}

/// A kernel the suite runs on, as Debian's archive names it.
#[derive(Debug)]
struct Kernel {
    choice: KernelChoice,
    /// The name `--kernel` takes.
    label: &'static str,
    /// Test binaries this kernel's guest does not run.
    skip: &'static [&'static str],
    /// The apt selector of the metapackage that depends on the current kernel package.
    metapackage: &'static str,
    /// The release must start with this (the metapackage could move to another series).
    series: &'static str,
}

const KERNELS: [Kernel; 2] = [
    Kernel {
        choice: KernelChoice::Debian,
        label: "6.1",
        skip: NEWEST_KERNEL_ONLY_TESTS,
        // The candidate: bookworm-security's build when it is newer than the point release.
        metapackage: "linux-image-amd64",
        series: "6.1.",
    },
    Kernel {
        choice: KernelChoice::Backports,
        label: "6.12",
        skip: &[],
        metapackage: "linux-image-amd64/bookworm-backports",
        series: "6.12.",
    },
];

pub fn vm_test(root: &Path, args: &VmTestArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| args.kernel == KernelChoice::All || args.kernel == k.choice)
        .collect();
    ensure!(
        args.timeout > GUEST_DEADLINE_MARGIN_SECS,
        "--timeout must be more than {GUEST_DEADLINE_MARGIN_SECS} s"
    );
    let cache = cache_dir(root);
    eprintln!("[vm] cache: {}", cache.display());
    let cache_str = cache.to_str().context("non-UTF-8 cache directory")?;
    crate::run(
        root,
        "bash",
        &["scripts/setup-vm.sh"],
        &[("AGENTD_VM_CACHE", cache_str)],
    )?;

    // Download while the static build runs: one waits on the network, the other on CPU.
    let (images, guest) = thread::scope(|s| {
        let fetch = s.spawn(|| {
            kernels
                .iter()
                .map(|k| fetch_kernel(&cache, k))
                .collect::<anyhow::Result<Vec<_>>>()
        });
        let guest = build_guest(root, args);
        let images = fetch
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the kernel download thread panicked")));
        (images, guest)
    });
    let (images, guest) = (images?, guest?);

    let logs = root.join(TARGET_DIR).join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    // The guests boot side by side: each runs its tests one at a time, so one guest
    // alone leaves much of the two cores idle under TCG. Each reports when both are done.
    let booted: Vec<anyhow::Result<Outcome>> = thread::scope(|s| {
        let runs: Vec<_> = images
            .iter()
            .map(|image| {
                let log = logs.join(format!("{}.log", image.label));
                let guest = &guest;
                s.spawn(move || boot(image, guest, &log, args))
            })
            .collect();
        runs.into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a guest's thread panicked")))
            })
            .collect()
    });
    let mut outcomes = Vec::new();
    for (image, outcome) in images.iter().zip(booted) {
        let outcome = outcome?;
        let log = logs.join(format!("{}.log", image.label));
        report(image, &guest, &outcome, &log, args.verbose);
        outcomes.push((
            image.label,
            outcome.passed(&guest, image.skip),
            outcome.wall,
        ));
    }

    let summary: Vec<String> = outcomes
        .iter()
        .map(|(label, passed, wall)| {
            let verdict = if *passed { "PASS" } else { "FAIL" };
            format!("{label} {verdict} ({:.0} s)", wall.as_secs_f64())
        })
        .collect();
    eprintln!(
        "[vm] {} — {:.0} s in all",
        summary.join(", "),
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|(_, passed, _)| !passed)
        .map(|(label, _, _)| *label)
        .collect();
    if !failed.is_empty() {
        bail!(
            "the privileged suite failed on kernel {}",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `$AGENTD_VM_CACHE`, `$XDG_CACHE_HOME/agentd-vm`, `~/.cache/agentd-vm`, or, with no home,
/// `target/vm-cache` (scripts/setup-vm.sh gets the answer through AGENTD_VM_CACHE).
fn cache_dir(root: &Path) -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(dir) = var("AGENTD_VM_CACHE") {
        return dir;
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return dir.join("agentd-vm");
    }
    if let Some(home) = var("HOME") {
        return home.join(".cache/agentd-vm");
    }
    root.join("target/vm-cache")
}

// ---------------------------------------------------------------------------------------
// Kernels

/// A kernel ready to boot.
#[derive(Debug)]
struct KernelImage {
    label: &'static str,
    skip: &'static [&'static str],
    package: String,
    version: String,
    vmlinux: PathBuf,
}

/// apt-get or apt-cache with the private configuration scripts/setup-vm.sh keeps in
/// `<cache>/apt` (keep the options in step with its `apt_private`).
fn apt(cache: &Path, tool: &str) -> Command {
    let apt = cache.join("apt");
    let mut cmd = Command::new(tool);
    for (key, path) in [
        ("Dir::Etc::sourcelist", apt.join("sources.list")),
        ("Dir::State::lists", apt.join("lists")),
        ("Dir::Cache::archives", apt.join("archives")),
    ] {
        cmd.arg("-o").arg(format!("{key}={}", path.display()));
    }
    cmd.args([
        "-o",
        "Dir::Etc::sourceparts=-",
        "-o",
        "APT::Sandbox::User=root",
    ]);
    cmd
}

/// Runs `cmd` and returns its stdout; on failure the error carries its stderr.
fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{what} printed non-UTF-8"))
}

/// The kernel package the metapackage depends on, and its version, from
/// `Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)`.
fn resolve_kernel(cache: &Path, kernel: &Kernel) -> anyhow::Result<(String, String)> {
    let what = format!("apt-cache show {}", kernel.metapackage);
    let text = output(
        apt(cache, "apt-cache").args(["show", "--no-all-versions", kernel.metapackage]),
        &what,
    )?;
    let depends = text
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .with_context(|| format!("{what}: no Depends line in\n{text}"))?;
    let (package, rest) = depends
        .split_once(" (= ")
        .with_context(|| format!("{what}: unexpected Depends line `{depends}`"))?;
    let version = rest.split_once(')').map(|(v, _)| v).unwrap_or(rest);
    let release = package.strip_prefix("linux-image-").unwrap_or_default();
    ensure!(
        release.starts_with(kernel.series) && !version.is_empty(),
        "{what}: expected a {}x kernel package, found `{depends}`",
        kernel.series
    );
    Ok((package.to_owned(), version.to_owned()))
}

/// The kernel's vmlinux from the cache, or downloaded and extracted into it.
fn fetch_kernel(cache: &Path, kernel: &Kernel) -> anyhow::Result<KernelImage> {
    let started = Instant::now();
    let (package, version) = resolve_kernel(cache, kernel)?;
    let kernels = cache.join("kernels");
    let dir = kernels.join(format!("{package}_{version}"));
    let image = KernelImage {
        label: kernel.label,
        skip: kernel.skip,
        vmlinux: dir.join("vmlinux"),
        package,
        version,
    };
    if image.vmlinux.is_file() {
        eprintln!(
            "[vm] {}: {} {} cached in {}",
            kernel.label,
            image.package,
            image.version,
            dir.display()
        );
        return Ok(image);
    }

    // Unpack into a scratch directory and rename it into place, so that an interrupted
    // run never leaves a half-written kernel behind.
    let scratch = kernels.join(format!(
        ".partial-{}_{}-{}",
        image.package,
        image.version,
        std::process::id()
    ));
    if scratch.exists() {
        fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot remove {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    eprintln!(
        "[vm] {}: downloading {} {}",
        kernel.label, image.package, image.version
    );
    let spec = format!("{}={}", image.package, image.version);
    output(
        apt(cache, "apt-get")
            .args(["download", "-qq", &spec])
            .current_dir(&scratch),
        &format!("apt-get download {spec}"),
    )?;
    let deb = fs::read_dir(&scratch)
        .with_context(|| format!("cannot read {}", scratch.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {spec} left no .deb"))?;

    let release = image.package.trim_start_matches("linux-image-");
    let vmlinuz = format!("./boot/vmlinuz-{release}");
    let config = format!("./boot/config-{release}");
    unpack_deb(&deb, &scratch, &[&vmlinuz, &config])?;
    extract_vmlinux(&scratch.join(&vmlinuz), &scratch.join("vmlinux"))?;
    let rename = |from: &Path, to: &Path| {
        fs::rename(from, to)
            .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
    };
    rename(&scratch.join(&config), &scratch.join("config"))?;
    fs::remove_file(&deb).with_context(|| format!("cannot remove {}", deb.display()))?;
    fs::remove_dir_all(scratch.join("boot"))
        .with_context(|| format!("cannot remove {}/boot", scratch.display()))?;
    if dir.exists() {
        // Another run got there first; its copy is the same package version.
        fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot remove {}", scratch.display()))?;
    } else {
        rename(&scratch, &dir)?;
    }
    // Older builds of the same series are not needed again.
    let series = format!("linux-image-{}", kernel.series);
    for entry in fs::read_dir(&kernels).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(&series) && entry.path() != dir {
            eprintln!(
                "[vm] {}: removing the older {}",
                kernel.label,
                entry.path().display()
            );
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    eprintln!(
        "[vm] {}: kernel ready in {:.1} s: {}",
        kernel.label,
        started.elapsed().as_secs_f64(),
        image.vmlinux.display()
    );
    Ok(image)
}

/// `dpkg-deb --fsys-tarfile DEB | tar -x -C DIR MEMBERS...`
fn unpack_deb(deb: &Path, dir: &Path, members: &[&str]) -> anyhow::Result<()> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start dpkg-deb")?;
    let tar_in = dpkg.stdout.take().context("dpkg-deb has no stdout")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .args(members)
        .stdin(tar_in)
        .status()
        .context("cannot start tar");
    let dpkg = dpkg.wait().context("cannot wait for dpkg-deb")?;
    let tar = tar?;
    ensure!(
        dpkg.success() && tar.success(),
        "unpacking {} from {} failed (dpkg-deb: {dpkg}, tar: {tar})",
        members.join(" "),
        deb.display()
    );
    Ok(())
}

/// Extracts the uncompressed ELF vmlinux from a bzImage, for a PVH boot (Debian's
/// kernels have CONFIG_PVH=y): the boot protocol header (Documentation/arch/x86/boot.rst)
/// locates the compressed payload, whose last 4 bytes hold the uncompressed size.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> anyhow::Result<()> {
    let image = fs::read(bzimage).with_context(|| format!("cannot read {}", bzimage.display()))?;
    let bad = || {
        format!(
            "{} is not a bzImage this code understands",
            bzimage.display()
        )
    };
    ensure!(image.get(0x202..0x206) == Some(b"HdrS".as_slice()), bad());
    let le32 = |at: usize| -> anyhow::Result<usize> {
        let bytes = image.get(at..at + 4).with_context(bad)?;
        let word = u32::from_le_bytes(bytes.try_into().with_context(bad)?);
        usize::try_from(word).with_context(bad)
    };
    // setup_sects: 0 means 4; the protected-mode code starts after them and the boot sector.
    let setup_sects = match image.get(0x1f1).copied().with_context(bad)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + le32(0x248)?; // payload_offset
    let len = le32(0x24c)?; // payload_length
    let payload = image.get(start..start + len).with_context(bad)?;
    let (stream, size) = payload.split_at(len.checked_sub(4).with_context(bad)?);
    let size = u64::from(u32::from_le_bytes(size.try_into().with_context(bad)?));
    let (tool, args): (&str, &[&str]) = match stream {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => ("xz", &["-dc"]),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => ("zstd", &["-dcq"]),
        [0x1f, 0x8b, ..] => ("gzip", &["-dc"]),
        _ => bail!(
            "{}: unknown payload compression (magic {:02x?})",
            bzimage.display(),
            stream.get(..6)
        ),
    };
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .with_context(|| format!("cannot start {tool}"))?;
    // The output goes to a file, so writing all of stdin before waiting cannot deadlock.
    let mut stdin = child.stdin.take().context("no stdin")?;
    let written = stdin.write_all(stream);
    drop(stdin);
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for {tool}"))?;
    written.with_context(|| format!("cannot feed {tool}"))?;
    ensure!(status.success(), "{tool} failed on {}", bzimage.display());
    let mut magic = [0u8; 4];
    File::open(out)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("cannot read {}", out.display()))?;
    let got = fs::metadata(out)?.len();
    ensure!(
        magic == *b"\x7fELF" && got == size,
        "{}: the payload did not decompress to an ELF of {size} bytes (got {got} bytes)",
        bzimage.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The guest: static binaries and the initramfs

#[derive(Debug)]
struct Guest {
    initramfs: PathBuf,
    /// The test binaries' names, as the guest's markers name them.
    tests: Vec<String>,
}

/// Builds agentd and the privileged test binaries static, and packs the initramfs.
fn build_guest(root: &Path, args: &VmTestArgs) -> anyhow::Result<Guest> {
    let started = Instant::now();
    let built = cargo_static(root, &["build", "--package", "agentd"])?;
    let program = |name: &str| {
        built
            .iter()
            .find(|a| a.name == name && !a.test)
            .with_context(|| format!("cargo built no {name} binary"))
    };
    let agentd = program("agentd")?;
    // The test harnesses' program (tests/src/lib.rs finds it beside agentd).
    let harness = program("agentd-harness")?;
    let mut tests: Vec<Artifact> =
        cargo_static(root, &["test", "--no-run", "--package", "agentd-tests"])?
            .into_iter()
            .filter(|a| a.test && !HOST_ONLY_TESTS.contains(&a.name.as_str()))
            .collect();
    // The order the guest runs them in (its shell sorts /vm/tests/*).
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    ensure!(!tests.is_empty(), "agentd-tests has no test binaries");
    for bin in [agentd, harness].into_iter().chain(&tests) {
        ensure_static(&bin.path)?;
    }
    ensure_static(Path::new(BUSYBOX))
        .context("busybox-static provides /bin/busybox: run scripts/setup-vm.sh")?;

    let userland = host_userland()?;

    let out = root.join(TARGET_DIR).join("initramfs.cpio");
    let mut cpio = Cpio::create(&out)?;
    // The host's merged-/usr links (/bin -> usr/bin, ...), so that host paths resolve alike.
    for top in ["bin", "sbin", "lib", "lib64"] {
        if let Ok(target) = fs::read_link(Path::new("/").join(top)) {
            cpio.symlink(top, &target)?;
        }
    }
    cpio.file("init", 0o755, &read(&root.join("xtask/vm/init"))?)?;
    cpio.host_path(Path::new(BUSYBOX))?;
    for path in &userland {
        cpio.host_path(path)?;
    }
    cpio.file("usr/bin/agentd", 0o755, &read(&agentd.path)?)?;
    cpio.file("usr/bin/agentd-harness", 0o755, &read(&harness.path)?)?;
    let mut names = Vec::new();
    for t in &tests {
        cpio.file(&format!("vm/tests/{}", t.name), 0o755, &read(&t.path)?)?;
        names.push(t.name.clone());
    }
    // Where `busybox --install` puts applets (bin and sbin are links to usr/ on a merged
    // /usr, and then already written), and the mount points /init uses.
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root", "home",
        "etc", "var/tmp",
    ] {
        cpio.dir(dir)?;
    }
    cpio.char_device("dev/console", 5, 1)?;
    cpio.file(
        "etc/passwd",
        0o644,
        // agentd-test: a user with a home, for `{home}` rules (tests/src/lib.rs `TestUser`,
        // which adds it with useradd on a host that lacks it).
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
          agentd-test:x:64123:64123:agentd tests:/home/agentd-test:/bin/false\n",
    )?;
    cpio.file(
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\nagentd-test:x:64123:\n",
    )?;
    cpio.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    // The test binaries find the repository through CARGO_MANIFEST_DIR, an absolute path
    // baked in at build time (tests/src/lib.rs `repo_root`): recreate it with what they read.
    let workdir = root.join("tests");
    let workdir_str = workdir.to_str().context("non-UTF-8 workspace path")?;
    cpio.dir(workdir_str.trim_start_matches('/'))?;
    cpio.tree(&root.join("profiles"))?;
    let deadline = args.timeout - GUEST_DEADLINE_MARGIN_SECS;
    let quoted: Vec<String> = args.test_args.iter().map(|a| shell_quote(a)).collect();
    let config = format!(
        "WORKDIR={}\nDEADLINE={deadline}\nset -- {}\n",
        shell_quote(workdir_str),
        quoted.join(" ")
    );
    cpio.file("vm/config.sh", 0o644, config.as_bytes())?;
    let size = cpio.finish()?;
    eprintln!(
        "[vm] guest: initramfs {} ({} MiB: busybox, {} host files, agentd, {} test binaries: {}) in {:.1} s",
        out.display(),
        size >> 20,
        userland.len(),
        names.len(),
        names.join(" "),
        started.elapsed().as_secs_f64()
    );
    Ok(Guest {
        initramfs: out,
        tests: names,
    })
}

/// The host files the guest gets besides busybox: [`HOST_PACKAGES`], [`HOST_PROGRAMS`],
/// Python's standard library, and every shared library these ELF files load.
fn host_userland() -> anyhow::Result<Vec<PathBuf>> {
    let mut paths = BTreeSet::new();
    for package in HOST_PACKAGES {
        let list = output(
            Command::new("dpkg-query").args(["--listfiles", package]),
            &format!("dpkg-query --listfiles {package}"),
        )?;
        paths.extend(
            list.lines()
                .filter(|l| l.starts_with("/bin/") || l.starts_with("/usr/bin/"))
                .map(PathBuf::from)
                .filter(|p| p.is_file()),
        );
    }
    for program in HOST_PROGRAMS.iter().chain(HOST_LIBRARIES) {
        let path = Path::new(program);
        if path.exists() {
            paths.insert(path.to_owned());
        } else {
            eprintln!("[vm] warning: {program} is not on this host; the guest will not have it");
        }
    }
    // /usr/bin/python3 -> python3.11: its standard library is /usr/lib/python3.11.
    if let Ok(python) = fs::canonicalize("/usr/bin/python3") {
        let name = python.file_name().context("python3 has no file name")?;
        let stdlib = Path::new("/usr/lib").join(name);
        if stdlib.is_dir() {
            walk(&stdlib, PYTHON_SKIP, &mut paths)?;
        }
    }
    let elves: Vec<&PathBuf> = paths.iter().filter(|p| is_elf(p)).collect();
    let mut libraries = BTreeSet::new();
    for chunk in elves.chunks(256) {
        // ldd exits 1 when one of them is static; the rest of its answer still holds.
        let out = Command::new("ldd")
            .args(chunk)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .context("cannot start ldd")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            if line.ends_with("=> not found") {
                eprintln!("[vm] warning: ldd: {line}");
            }
            // `libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`; not the `/usr/bin/cat:` headers.
            let Some((lib, _)) = line.split_once(" (0x") else {
                continue;
            };
            let lib = lib.split_once("=> ").map_or(lib, |(_, l)| l);
            if lib.starts_with('/') {
                libraries.insert(PathBuf::from(lib));
            }
        }
    }
    paths.extend(libraries);
    Ok(paths.into_iter().collect())
}

/// Every file and symlink under `dir`, leaving out directories whose names start with an
/// entry of `skip`.
fn walk(dir: &Path, skip: &[&str], out: &mut BTreeSet<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if kind.is_dir() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !skip.iter().any(|s| name.starts_with(s)) {
                walk(&path, skip, out)?;
            }
        } else {
            out.insert(path);
        }
    }
    Ok(())
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// A binary cargo built.
#[derive(Debug)]
struct Artifact {
    name: String,
    path: PathBuf,
    /// A test harness binary (`profile.test`).
    test: bool,
}

/// Runs `cargo ARGS` for the host target with static linking into target/vm and returns
/// the executables it built, from its JSON messages.
fn cargo_static(root: &Path, args: &[&str]) -> anyhow::Result<Vec<Artifact>> {
    eprintln!(
        "[vm] $ cargo {} (static, into {TARGET_DIR})",
        args.join(" ")
    );
    let started = Instant::now();
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        if std::env::var_os(var).is_some() {
            eprintln!("[vm] note: ignoring {var} (it would override the static link flags)");
        }
    }
    let out = Command::new("cargo")
        .args(args)
        .args(["--locked", "--target", TRIPLE, "--target-dir", TARGET_DIR])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        // crt-static for the host target only: the nested BPF build (aya-build, in
        // agentd/build.rs) is not affected.
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // No debug info: the binaries are 3-4x smaller, and a smaller initramfs boots faster
        // under TCG. Panic messages keep their file:line.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start cargo")?;
    if !out.status.success() {
        bail!("`cargo {}` failed: {}", args.join(" "), out.status);
    }
    let mut artifacts = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(path) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"]
            .as_str()
            .context("cargo artifact without a target name")?;
        artifacts.push(Artifact {
            name: name.to_owned(),
            path: PathBuf::from(path),
            test: msg["profile"]["test"] == true,
        });
    }
    eprintln!("[vm]   ok in {:.1} s", started.elapsed().as_secs_f64());
    Ok(artifacts)
}

/// Fails unless `path` is an ELF executable without a program interpreter (PT_INTERP):
/// the guest has no dynamic loader and no libc.
fn ensure_static(path: &Path) -> anyhow::Result<()> {
    const PT_INTERP: u32 = 3;
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut header = [0u8; 64];
    f.read_exact(&mut header)
        .with_context(|| format!("cannot read {}", path.display()))?;
    ensure!(
        header.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into()?);
    let phentsize = u16::from_le_bytes(header[0x36..0x38].try_into()?);
    let phnum = u16::from_le_bytes(header[0x38..0x3a].try_into()?);
    let mut table = vec![0u8; usize::from(phentsize) * usize::from(phnum)];
    f.seek(SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut table))
        .with_context(|| format!("cannot read the program headers of {}", path.display()))?;
    let dynamic = table
        .chunks(usize::from(phentsize).max(4))
        .any(|ph| ph.get(..4) == Some(PT_INTERP.to_le_bytes().as_slice()));
    ensure!(
        !dynamic,
        "{} is dynamically linked (it has a program interpreter); the guest needs static binaries",
        path.display()
    );
    Ok(())
}

/// `'...'` for /bin/sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A writer of the kernel's initramfs format: cpio "newc" (070701), uncompressed, every
/// entry owned by root with mtime 0 (Documentation/driver-api/early-userspace/
/// buffer-format.rst). Uncompressed, because under TCG the kernel unpacks it faster than
/// it would decompress it.
#[derive(Debug)]
struct Cpio {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
    ino: u32,
    /// Every name written so far.
    names: BTreeSet<String>,
}

impl Cpio {
    fn create(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(file),
            written: 0,
            ino: 0,
            names: BTreeSet::new(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.out
            .write_all(bytes)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> anyhow::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.write(&[0; 3][..usize::try_from(n)?])
    }

    /// One entry: header, NUL-terminated name and data, each padded to 4 bytes.
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) -> anyhow::Result<()> {
        self.ino += 1;
        let size = u32::try_from(data.len()).with_context(|| format!("{name} is over 4 GiB"))?;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let namesize = u32::try_from(name.len() + 1)?;
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    /// A directory and its missing parents.
    fn dir(&mut self, name: &str) -> anyhow::Result<()> {
        let mut path = String::new();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
            if self.names.insert(path.clone()) {
                let mode = if path == "tmp" || path == "var/tmp" {
                    0o041777
                } else {
                    0o040755
                };
                self.entry(&path.clone(), mode, &[], (0, 0))?;
            }
        }
        Ok(())
    }

    fn parent(&mut self, name: &str) -> anyhow::Result<()> {
        match name.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> anyhow::Result<()> {
        self.parent(name)?;
        ensure!(
            self.names.insert(name.to_owned()),
            "{name} is in the initramfs twice"
        );
        self.entry(name, 0o100000 | perm, data, (0, 0))
    }

    fn symlink(&mut self, name: &str, target: &Path) -> anyhow::Result<()> {
        self.parent(name)?;
        ensure!(
            self.names.insert(name.to_owned()),
            "{name} is in the initramfs twice"
        );
        let target = target.to_str().context("non-UTF-8 symlink target")?;
        self.entry(name, 0o120777, target.as_bytes(), (0, 0))
    }

    /// A host file at the same path, once: its directories' symlinks resolved (a merged
    /// /usr puts /lib/x/libc.so.6 in usr/lib/x), a symlink kept as one, with its target.
    fn host_path(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut path = path.to_owned();
        for _ in 0..16 {
            let (Some(parent), Some(file_name)) = (path.parent(), path.file_name()) else {
                bail!("{} is not a file", path.display());
            };
            let real = fs::canonicalize(parent)
                .with_context(|| format!("cannot resolve {}", parent.display()))?
                .join(file_name);
            let name = real.to_str().context("non-UTF-8 path")?;
            let name = name.trim_start_matches('/').to_owned();
            if self.names.contains(&name) {
                return Ok(());
            }
            let meta = fs::symlink_metadata(&real)
                .with_context(|| format!("cannot stat {}", real.display()))?;
            if !meta.file_type().is_symlink() {
                ensure!(meta.is_file(), "{} is not a regular file", real.display());
                return self.file(&name, meta.permissions().mode() & 0o7777, &read(&real)?);
            }
            let target = fs::read_link(&real)
                .with_context(|| format!("cannot read the link {}", real.display()))?;
            self.symlink(&name, &target)?;
            path = real
                .parent()
                .map_or_else(|| target.clone(), |p| p.join(&target));
        }
        bail!("{}: too many levels of symbolic links", path.display())
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) -> anyhow::Result<()> {
        self.parent(name)?;
        self.entry(name, 0o020600, &[], (major, minor))
    }

    /// A host directory's regular files and subdirectories, at the same absolute path.
    fn tree(&mut self, dir: &Path) -> anyhow::Result<()> {
        let name = dir
            .to_str()
            .context("non-UTF-8 path")?
            .trim_start_matches('/');
        self.dir(name)?;
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot read {}", dir.display()))?;
        entries.sort();
        for path in entries {
            let meta =
                fs::metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
            if meta.is_dir() {
                self.tree(&path)?;
            } else if meta.is_file() {
                let name = path.to_str().context("non-UTF-8 path")?;
                self.file(name.trim_start_matches('/'), 0o644, &read(&path)?)?;
            }
        }
        Ok(())
    }

    /// Writes the trailer; returns the archive's size.
    fn finish(mut self) -> anyhow::Result<u64> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        self.out
            .flush()
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(self.written)
    }
}

// ---------------------------------------------------------------------------------------
// Booting and reading the serial log

/// What one guest run left in its serial log.
#[derive(Debug, Default)]
struct Outcome {
    wall: Duration,
    timed_out: bool,
    qemu_status: Option<ExitStatus>,
    /// qemu's own stderr (warnings, a refused option).
    qemu_stderr: String,
    /// The serial log's lines before the first test binary, and after the last one.
    before: Vec<String>,
    after: Vec<String>,
    kernel: Option<String>,
    booted_at: Option<String>,
    lsm: Option<String>,
    /// `agentd doctor --json`'s exit status and output.
    doctor: Option<(String, String)>,
    tests: Vec<TestRun>,
    /// The final marker: Some(true) for `VMTEST-RESULT pass`.
    result: Option<bool>,
}

#[derive(Debug, Default)]
struct TestRun {
    name: String,
    /// None while the binary runs (or when the guest died during it).
    rc: Option<String>,
    secs: Option<String>,
    /// libtest's `test result: ...` line.
    summary: Option<String>,
    /// The failed tests' names.
    failed: Vec<String>,
    /// The indented names after libtest's last `failures:` line: the failed tests, also
    /// when a kernel message split a `test NAME ... FAILED` line.
    listed: Vec<String>,
    /// It ended without starting: the guest's deadline had passed.
    not_started: bool,
    /// The binary's lines of the serial log, its markers included.
    lines: Vec<String>,
}

impl Outcome {
    /// The final marker says pass, and every test binary the guest was given, but those
    /// its kernel skips, ran and exited 0: qemu's exit status says nothing.
    fn passed(&self, guest: &Guest, skip: &[&str]) -> bool {
        let expected: Vec<&String> = guest
            .tests
            .iter()
            .filter(|name| !skip.contains(&name.as_str()))
            .collect();
        self.result == Some(true)
            && !self.timed_out
            && self.tests.len() == expected.len()
            && expected.iter().all(|name| {
                self.tests
                    .iter()
                    .any(|t| &t.name == *name && t.rc.as_deref() == Some("0"))
            })
    }

    /// Takes one line of the serial log (without line ending).
    fn parse_line(&mut self, line: &str) {
        self.parse_markers(line);
        match self.tests.last_mut() {
            Some(t) if t.rc.is_none() || line.contains("VMTEST-END") => {
                t.lines.push(line.to_owned());
            }
            Some(_) => self.after.push(line.to_owned()),
            None => self.before.push(line.to_owned()),
        }
    }

    fn parse_markers(&mut self, line: &str) {
        let Some(marker) = line.find("VMTEST-").map(|at| &line[at..]) else {
            if let Some(t) = self.tests.last_mut().filter(|t| t.rc.is_none()) {
                if line == "failures:" {
                    t.listed.clear();
                } else if let Some(name) = line.strip_prefix("    ").filter(|n| !n.starts_with(' '))
                {
                    t.listed.push(name.to_owned());
                } else if let Some(summary) = line.strip_prefix("test result: ") {
                    t.summary = Some(summary.to_owned());
                    for name in std::mem::take(&mut t.listed) {
                        if !t.failed.contains(&name) {
                            t.failed.push(name);
                        }
                    }
                } else if let Some(name) = line
                    .strip_prefix("test ")
                    .and_then(|l| l.strip_suffix(" ... FAILED"))
                {
                    t.failed.push(name.to_owned());
                }
            }
            return;
        };
        let (tag, rest) = marker.split_once(' ').unwrap_or((marker, ""));
        let field = |key: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        match tag {
            "VMTEST-BOOTED" => {
                self.kernel = field("kernel");
                self.booted_at = field("uptime");
            }
            "VMTEST-INFO" => {
                if let Some(lsm) = rest.strip_prefix("lsm=") {
                    self.lsm = Some(lsm.to_owned());
                }
            }
            "VMTEST-DOCTOR" => {
                let (rc, json) = rest.split_once(' ').unwrap_or((rest, ""));
                let rc = rc.trim_start_matches("rc=").to_owned();
                self.doctor = Some((rc, json.to_owned()));
            }
            "VMTEST-BEGIN" => self.tests.push(TestRun {
                name: rest.trim().to_owned(),
                ..TestRun::default()
            }),
            "VMTEST-END" => {
                let name = rest.split_whitespace().next().unwrap_or_default();
                if self.tests.last().is_none_or(|t| t.name != name) {
                    // Not started (the deadline had passed).
                    self.tests.push(TestRun {
                        name: name.to_owned(),
                        ..TestRun::default()
                    });
                }
                if let Some(t) = self.tests.last_mut() {
                    t.rc = field("rc");
                    t.secs = field("secs");
                    t.not_started = rest.contains("(not started");
                }
            }
            "VMTEST-RESULT" => {
                self.result = Some(rest.split_whitespace().next() == Some("pass"));
            }
            _ => {}
        }
    }
}

/// The progress lines shown while a guest runs (all of them with --verbose).
fn progress_line(line: &str) -> Option<String> {
    if let Some(at) = line.find("VMTEST-DOCTOR") {
        let rc = line[at..].split_whitespace().nth(1).unwrap_or_default();
        return Some(format!("VMTEST-DOCTOR {rc} (report below)"));
    }
    // Markers and libtest's progress at the start of a line; the kernel's worst news
    // anywhere (its lines start with a timestamp).
    let starts = ["VMTEST-", "running ", "test "];
    let anywhere = [
        "Kernel panic",
        "BUG: ",
        "Oops: ",
        "WARNING: ",
        "Killed process",
    ];
    (starts.iter().any(|p| line.starts_with(p)) || anywhere.iter().any(|p| line.contains(p)))
        .then(|| line.to_owned())
}

/// Boots `image` with the guest's initramfs and follows the serial log until qemu exits
/// or the timeout stops it.
fn boot(
    image: &KernelImage,
    guest: &Guest,
    log: &Path,
    args: &VmTestArgs,
) -> anyhow::Result<Outcome> {
    let label = image.label;
    File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let qemu_err_path = log.with_extension("qemu-stderr");
    let qemu_err = File::create(&qemu_err_path)
        .with_context(|| format!("cannot create {}", qemu_err_path.display()))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    // TCG: /dev/kvm on these machines is not hardware-backed and fails on stock kernels.
    // -M pc, not microvm (panics under TCG). -no-reboot with panic=-1: a guest panic ends
    // qemu instead of looping.
    cmd.args([
        "-M", "pc", "-accel", "tcg", "-cpu", "max", "-m", "1G", "-smp", "2",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .arg("-kernel")
    .arg(&image.vmlinux)
    .arg("-initrd")
    .arg(&guest.initramfs)
    // The kernel's own CONFIG_LSM list, as a stock install boots it.
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 quiet agentd.skip={}",
        image.skip.join(",")
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(qemu_err);
    eprintln!(
        "[vm] {label}: booting {} {} under qemu (TCG, timeout {} s); serial log {}",
        image.package,
        image.version,
        args.timeout,
        log.display()
    );
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let mut outcome = Outcome::default();
    let result = follow(&mut child, &mut outcome, log, args, label, started);
    if result.is_err() || outcome.qemu_status.is_none() {
        // Never leave a qemu behind; errors here only mean it has already gone.
        let _ = child.kill();
        let _ = child.wait();
    }
    result?;
    outcome.wall = started.elapsed();
    outcome.qemu_stderr = fs::read_to_string(&qemu_err_path).unwrap_or_default();
    Ok(outcome)
}

/// Polls qemu and the serial log: shows progress, parses markers, enforces the timeout.
fn follow(
    child: &mut Child,
    outcome: &mut Outcome,
    log: &Path,
    args: &VmTestArgs,
    label: &str,
    started: Instant,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    let mut reader = File::open(log).with_context(|| format!("cannot open {}", log.display()))?;
    let mut pending = Vec::new();
    loop {
        let exited = child.try_wait().context("cannot wait for qemu")?;
        // Read after try_wait: once qemu has exited, this read gets everything.
        let mut chunk = Vec::new();
        reader
            .read_to_end(&mut chunk)
            .with_context(|| format!("cannot read {}", log.display()))?;
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
            outcome.parse_line(&line);
            let shown = if args.verbose {
                Some(line.clone())
            } else {
                progress_line(&line)
            };
            if let Some(shown) = shown {
                eprintln!("[vm {label}] {shown}");
            }
        }
        if let Some(status) = exited {
            outcome.qemu_status = Some(status);
            let rest = String::from_utf8_lossy(&pending).into_owned();
            outcome.parse_line(&rest);
            return Ok(());
        }
        if started.elapsed() > timeout {
            outcome.timed_out = true;
            eprintln!(
                "[vm {label}] timeout: stopping qemu after {} s",
                args.timeout
            );
            child.kill().context("cannot stop qemu")?;
            outcome.qemu_status = Some(child.wait().context("cannot wait for qemu")?);
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Prints what the run found: kernel, Landlock ABI, BPF LSM, each test binary's result,
/// and on failure the whole serial log.
fn report(image: &KernelImage, guest: &Guest, outcome: &Outcome, log: &Path, verbose: bool) {
    let label = image.label;
    let passed = outcome.passed(guest, image.skip);
    if !passed && !verbose {
        // What explains the failure: boot and doctor, the failing binaries' output, and
        // the end (where a guest that died says why).
        eprintln!(
            "[vm] {label}: ---- guest serial log, the failing part (all of it: {}) ----",
            log.display()
        );
        let failing = outcome
            .tests
            .iter()
            .filter(|t| t.rc.as_deref() != Some("0"))
            .flat_map(|t| &t.lines);
        for line in outcome.before.iter().chain(failing).chain(&outcome.after) {
            eprintln!("  guest| {line}");
        }
        eprintln!("[vm] {label}: ---- end of the guest serial log ----");
    }
    if !outcome.qemu_stderr.trim().is_empty() {
        eprintln!("[vm] {label}: qemu said: {}", outcome.qemu_stderr.trim());
    }
    let verdict = if passed { "PASS" } else { "FAIL" };
    eprintln!(
        "[vm] ==== {label}: {verdict} in {:.1} s (guest booted at {} s of uptime)",
        outcome.wall.as_secs_f64(),
        outcome.booted_at.as_deref().unwrap_or("?")
    );
    eprintln!(
        "[vm]   kernel   {} ({} {})",
        outcome.kernel.as_deref().unwrap_or("did not boot"),
        image.package,
        image.version
    );
    if let Some(lsm) = &outcome.lsm {
        eprintln!("[vm]   lsm      {lsm}");
    }
    match &outcome.doctor {
        Some((rc, json)) => eprintln!("[vm]   doctor   exit {rc}: {}", doctor_summary(json)),
        None => eprintln!("[vm]   doctor   did not run"),
    }
    for t in &outcome.tests {
        let state = match t.rc.as_deref() {
            _ if t.not_started => "NOT STARTED (the guest's deadline had passed)".to_owned(),
            Some("0") => "ok".to_owned(),
            Some(rc) => format!("FAILED (exit {rc})"),
            None => "DID NOT FINISH".to_owned(),
        };
        eprintln!(
            "[vm]   test     {:<20} {state} in {} s: {}",
            t.name,
            t.secs.as_deref().unwrap_or("?"),
            t.summary.as_deref().unwrap_or("no libtest summary")
        );
        for name in &t.failed {
            eprintln!("[vm]              failed: {name}");
        }
    }
    for name in &guest.tests {
        if !outcome.tests.iter().any(|t| &t.name == name) {
            eprintln!("[vm]   test     {name:<20} NOT RUN");
        }
    }
    if outcome.timed_out {
        eprintln!("[vm]   the guest was stopped by the timeout (--timeout)");
    } else if outcome.result.is_none() {
        eprintln!(
            "[vm]   no VMTEST-RESULT marker: the guest died or never booted (qemu: {})",
            outcome
                .qemu_status
                .map_or_else(|| "?".to_owned(), |s| s.to_string())
        );
    }
    eprintln!("[vm]   log      {}", log.display());
}

/// Landlock ABI, BPF LSM and the verdict from `agentd doctor --json`.
fn doctor_summary(json: &str) -> String {
    let Ok(report) = serde_json::from_str::<Value>(json) else {
        return format!("no JSON: {json}");
    };
    let status = |v: &Value| {
        if v["usable"] == true {
            "usable".to_owned()
        } else {
            format!(
                "unusable ({})",
                v["error"].as_str().unwrap_or("no error given")
            )
        }
    };
    let verdict = if report["enforcement_ready"] == true {
        "ready to enforce".to_owned()
    } else {
        format!("NOT ready, missing {}", report["missing"])
    };
    let controller = |v: &Value| match (v["hierarchy"].as_str(), v["enabled"].as_bool()) {
        (Some("v2"), Some(true)) => "v2".to_owned(),
        (Some("v2"), _) => "v2, not enabled".to_owned(),
        (Some("v1"), _) => format!("v1 at {}", v["mount"].as_str().unwrap_or("?")),
        (other, _) => other.unwrap_or("?").to_owned(),
    };
    format!(
        "landlock ABI {}, bpf lsm {}, cgroup v2 at {} (pids {}, memory {}), {verdict}",
        report["landlock"]["abi"],
        status(&report["bpf"]["lsm"]),
        report["cgroup"]["mount"].as_str().unwrap_or("?"),
        controller(&report["cgroup"]["pids"]),
        controller(&report["cgroup"]["memory"]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(tests: &[&str]) -> Guest {
        Guest {
            initramfs: PathBuf::new(),
            tests: tests.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn parse(log: &str) -> Outcome {
        let mut outcome = Outcome::default();
        for line in log.lines() {
            outcome.parse_line(line);
        }
        outcome
    }

    const PASSING: &str = "\
VMTEST-BOOTED uptime=2.44 kernel=6.1.0-56-amd64
VMTEST-INFO lsm=lockdown,capability,landlock,yama,bpf
VMTEST-DOCTOR rc=0 {  \"landlock\": {    \"abi\": 2,    \"usable\": true  }}
VMTEST-BEGIN doctor

running 1 test
test doctor_json_matches_what_the_host_does ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 8.67s

VMTEST-END doctor rc=0 secs=8.8
VMTEST-RESULT pass uptime=14.49
[   15.551081] reboot: Power down
";

    #[test]
    fn a_run_passes_on_the_final_marker_with_every_binary_at_zero() {
        let o = parse(PASSING);
        assert!(o.passed(&guest(&["doctor"]), &[]));
        assert_eq!(o.kernel.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(
            o.lsm.as_deref(),
            Some("lockdown,capability,landlock,yama,bpf")
        );
        assert_eq!(o.tests[0].secs.as_deref(), Some("8.8"));
        assert!(
            o.tests[0]
                .summary
                .as_deref()
                .is_some_and(|s| s.starts_with("ok. 1 passed"))
        );
        assert!(o.tests[0].lines.iter().any(|l| l.contains("test result")));
        assert!(o.after.iter().any(|l| l.starts_with("VMTEST-RESULT")));
        let doctor = o
            .doctor
            .as_ref()
            .map(|(rc, json)| (rc.as_str(), doctor_summary(json)));
        assert!(doctor.is_some_and(|(rc, s)| rc == "0" && s.starts_with("landlock ABI 2,")));
    }

    #[test]
    fn a_run_fails_without_the_marker_with_a_missing_binary_or_after_a_timeout() {
        // The guest died after its tests: no final marker.
        let died = PASSING.replace("VMTEST-RESULT pass uptime=14.49\n", "");
        assert!(!parse(&died).passed(&guest(&["doctor"]), &[]));
        // A test binary the guest was given never reported...
        assert!(!parse(PASSING).passed(&guest(&["doctor", "profiles"]), &[]));
        // ...unless its kernel skips it; a skipped binary that ran anyway is one too many.
        assert!(parse(PASSING).passed(&guest(&["doctor", "profiles"]), &["profiles"]));
        assert!(!parse(PASSING).passed(&guest(&["doctor"]), &["doctor"]));
        let mut timed_out = parse(PASSING);
        timed_out.timed_out = true;
        assert!(!timed_out.passed(&guest(&["doctor"]), &[]));
        // The marker alone is not enough: every binary must have exited 0.
        let failed = PASSING.replace("rc=0 secs", "rc=101 secs");
        assert!(!parse(&failed).passed(&guest(&["doctor"]), &[]));
    }

    #[test]
    fn failed_tests_are_found_even_when_a_kernel_message_splits_the_line() {
        let o = parse(
            "VMTEST-BEGIN run_lifecycle
test a_test ... FAILED
test oom_test ... [   28.09] Memory cgroup out of memory: Killed process 301 (python3)
FAILED

failures:

---- a_test stdout ----
    indented output of the test, not a name

failures:
    a_test
    oom_test

test result: FAILED. 0 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out
VMTEST-END run_lifecycle rc=101 secs=3.4
VMTEST-END run_attacks rc=124 secs=0 (not started: the guest's deadline has passed)
VMTEST-RESULT fail uptime=29.58
",
        );
        assert_eq!(o.tests[0].failed, ["a_test", "oom_test"]);
        assert_eq!(o.tests[0].rc.as_deref(), Some("101"));
        assert_eq!(o.tests[1].name, "run_attacks");
        assert!(o.tests[1].not_started);
        assert_eq!(o.result, Some(false));
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("run_tcp"), "'run_tcp'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        let path = dir.join("t.cpio");
        let mut cpio = Cpio::create(&path)?;
        cpio.file("a/b", 0o755, b"hello")?;
        cpio.symlink("c", Path::new("a/b"))?;
        assert!(cpio.file("a/b", 0o644, b"again").is_err(), "a name twice");
        let size = cpio.finish()?;
        let data = fs::read(&path)?;
        fs::remove_dir_all(&dir)?;
        assert_eq!(size, data.len() as u64);
        assert_eq!(data.len() % 4, 0);
        // The first entry is the directory "a", made for "a/b".
        assert!(data.starts_with(b"070701"));
        let header = std::str::from_utf8(&data[..110])?;
        assert_eq!(&header[14..22], "000041ed", "mode of a directory 0755");
        assert_eq!(&data[110..112], b"a\0");
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("a/b\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
        Ok(())
    }
}
