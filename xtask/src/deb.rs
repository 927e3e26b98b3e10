//! `cargo xtask deb`: agentd as a Debian package, built with `dpkg-deb` from a tree staged
//! under target/deb/PROFILE/ (what goes where, and what install, removal and purge do:
//! docs/packaging.md). No cargo-deb: dpkg-deb is on every Debian host, and every file of
//! the package is placed here, in [`stage`].

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};

/// The control template, the maintainer scripts and the copyright file.
const DIST: &str = "dist/deb";
/// The maintainer scripts, installed into DEBIAN/ as they are.
const SCRIPTS: [&str; 3] = ["postinst", "prerm", "postrm"];
/// Where each completion script the generator writes goes, for bash-completion, zsh and
/// fish to find it (their Debian packages' vendor directories).
const COMPLETIONS: [(&str, &str); 3] = [
    (
        "agentd.bash",
        "usr/share/bash-completion/completions/agentd",
    ),
    ("_agentd", "usr/share/zsh/vendor-completions/_agentd"),
    (
        "agentd.fish",
        "usr/share/fish/vendor_completions.d/agentd.fish",
    ),
];
/// The unit's program path in dist/agentd.service (a manual install) and in the package.
const UNIT_EXEC_FROM: &str = "ExecStart=/usr/local/bin/agentd ";
const UNIT_EXEC_TO: &str = "ExecStart=/usr/bin/agentd ";
/// Replaces dist/agentd.service's leading comment, which tells how to install by hand.
const UNIT_HEADER: &str = "\
# agentd daemon: one eBPF watch for every agent on this host, a control socket for
# `agentd run`, `ps`, `events`, `kill` and `stats`, and the audit log.
#
# Installed by the agentd package, not enabled: `systemctl enable --now agentd`. Members of
# the agentd group may launch and watch agents. Change it with `systemctl edit agentd`,
# not here: an upgrade replaces this file.
";

#[derive(Debug, clap::Args)]
pub struct DebArgs {
    /// Package the debug build (target/debug/agentd) instead of a release build: quicker
    /// to build and to compress; CI installs such a package in tests/tests/deb.rs
    #[arg(long)]
    debug: bool,
}

/// Which build of agentd goes into the package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    /// Its directory under target/.
    fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }

    fn cargo_args(self) -> &'static [&'static str] {
        match self {
            Self::Release => &["--release"],
            Self::Debug => &[],
        }
    }

    /// dpkg-deb's compression: xz for a release (about 5 s, a package of 3 MB); fast gzip
    /// for the test package (the debug build is 30 MB stripped: xz takes 12 s over it,
    /// gzip -9 5 s, gzip -1 half a second for a package of 10 MB).
    fn compression(self) -> &'static [&'static str] {
        match self {
            Self::Release => &["-Zxz"],
            Self::Debug => &["-Zgzip", "-z1"],
        }
    }
}

/// `cargo xtask deb [--debug]`: builds the package, runs lintian on it if installed, and
/// prints its path (the only line on stdout).
pub fn deb(root: &Path, args: &DebArgs) -> anyhow::Result<()> {
    let profile = if args.debug {
        Profile::Debug
    } else {
        Profile::Release
    };
    let deb = build(root, profile)?;
    lintian(&deb)?;
    println!("{}", deb.display());
    Ok(())
}

/// Builds agentd and its package: target/deb/PROFILE/agentd_VERSION_ARCH.deb, returned.
pub fn build(root: &Path, profile: Profile) -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    let mut args = vec!["build", "--locked", "--package", "agentd"];
    args.extend(profile.cargo_args());
    crate::run(root, "cargo", &args, &[])?;

    let work = root.join("target/deb").join(profile.dir());
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clean {}", work.display()))?;
    }
    let generated = work.join("generated");
    let tree = work.join("tree");

    // The man pages and completions, from the CLI definition of the same sources (its
    // list of files goes to the log, not to stdout).
    let mut args: Vec<&OsStr> = ["run", "--locked", "--quiet", "--package", "agentd"]
        .iter()
        .map(OsStr::new)
        .collect();
    args.extend(profile.cargo_args().iter().map(OsStr::new));
    args.extend([
        OsStr::new("--example"),
        OsStr::new("gen-docs"),
        OsStr::new("--"),
        generated.as_os_str(),
    ]);
    capture(root, "cargo", &args, &[])?;

    let version = version(root)?;
    let arch = capture(root, "dpkg", &["--print-architecture"], &[])?
        .trim()
        .to_owned();
    let epoch = source_date_epoch(root)?;

    let template = read(&root.join(DIST).join("control.in"))?;
    stage(root, profile, &generated, &tree, &template, &version, epoch)?;
    let shlibs = shlib_depends(&tree.join("usr/bin/agentd"))?;
    let installed_size = installed_size_kib(&tree)?;
    let control = control(&template, &version, &arch, &shlibs, installed_size)?;
    write(&tree.join("DEBIAN/control"), control.as_bytes(), 0o644)?;
    md5sums(&tree)?;

    let deb = work.join(format!("agentd_{version}_{arch}.deb"));
    let (tree_s, deb_s) = (utf8(&tree)?, utf8(&deb)?);
    let mut args = vec!["--root-owner-group"];
    args.extend(profile.compression());
    args.extend(["--build", tree_s, deb_s]);
    // dpkg-deb dates the archive's members no later than this.
    let epoch_s = epoch.to_string();
    crate::run(root, "dpkg-deb", &args, &[("SOURCE_DATE_EPOCH", &epoch_s)])?;
    eprintln!(
        "[xtask] {} ({} KiB installed, Depends: adduser, {shlibs}) in {:.1}s",
        deb.display(),
        installed_size,
        started.elapsed().as_secs_f64()
    );
    Ok(deb)
}

/// Puts every file of the package in `tree`, with the modes it installs with (owners are
/// dpkg-deb's `--root-owner-group`).
fn stage(
    root: &Path,
    profile: Profile,
    generated: &Path,
    tree: &Path,
    template: &str,
    version: &str,
    epoch: u64,
) -> anyhow::Result<()> {
    // The program, stripped as dh_strip strips one: no symbols, no debug information (there
    // is no -dbgsym package).
    let bin = tree.join("usr/bin/agentd");
    mkdir(bin.parent().context("no parent")?)?;
    let built = root.join("target").join(profile.dir()).join("agentd");
    capture(
        root,
        "strip",
        &[
            OsStr::new("--remove-section=.comment"),
            OsStr::new("--remove-section=.note"),
            OsStr::new("-o"),
            bin.as_os_str(),
            built.as_os_str(),
        ],
        &[],
    )?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", bin.display()))?;

    // The unit, where Debian 12's packages put theirs (/lib is /usr/lib on a merged /usr).
    let unit = packaged_unit(&read(&root.join("dist/agentd.service"))?)?;
    write(
        &tree.join("lib/systemd/system/agentd.service"),
        unit.as_bytes(),
        0o644,
    )?;

    // The built-in profiles (the binary embeds profiles/*.toml), as examples to copy into
    // /etc/agentd/profiles and edit.
    let examples = tree.join("usr/share/agentd/profiles");
    for path in sorted_entries(&root.join("profiles"))? {
        if path.extension() == Some(OsStr::new("toml")) {
            let name = path.file_name().context("no file name")?;
            write(&examples.join(name), &read_bytes(&path)?, 0o644)?;
        }
    }

    // The manual pages, gzipped as Debian ships them (-n: no name or time inside).
    let man1 = tree.join("usr/share/man/man1");
    let mut pages: Vec<PathBuf> = Vec::new();
    for page in sorted_entries(&generated.join("man1"))? {
        let to = man1.join(page.file_name().context("no file name")?);
        write(&to, &read_bytes(&page)?, 0o644)?;
        pages.push(to);
    }
    ensure!(
        pages.iter().any(|p| p.ends_with("agentd.1")),
        "gen-docs wrote no agentd.1 in {}",
        generated.join("man1").display()
    );
    let mut gzip: Vec<&OsStr> = vec![OsStr::new("-9n"), OsStr::new("--")];
    gzip.extend(pages.iter().map(|p| p.as_os_str()));
    capture(root, "gzip", &gzip, &[])?;

    for (from, to) in COMPLETIONS {
        let text = read_bytes(&generated.join("completions").join(from))?;
        write(&tree.join(to), &text, 0o644)?;
    }

    // What Debian's policy asks of every package: its copyright and its changelog.
    let doc = tree.join("usr/share/doc/agentd");
    write(
        &doc.join("copyright"),
        &read_bytes(&root.join(DIST).join("copyright"))?,
        0o644,
    )?;
    // The manuals the man pages and --help point to (docs/daemon.md...), as
    // /usr/share/doc/agentd/daemon.md..., with the README and the security model.
    for path in sorted_entries(&root.join("docs"))? {
        if path.extension() == Some(OsStr::new("md")) {
            let name = path.file_name().context("no file name")?;
            write(&doc.join(name), &read_bytes(&path)?, 0o644)?;
        }
    }
    for name in ["README.md", "SECURITY.md", "ARCHITECTURE.md"] {
        write(&doc.join(name), &read_bytes(&root.join(name))?, 0o644)?;
    }
    let maintainer = template
        .lines()
        .find_map(|l| l.strip_prefix("Maintainer: "))
        .context("dist/deb/control.in has no Maintainer field")?;
    let date = capture(
        root,
        "date",
        &["--rfc-email", "--utc", &format!("--date=@{epoch}")],
        &[],
    )?;
    let changelog = format!(
        "agentd ({version}) unstable; urgency=medium\n\n  \
         * Packaged by `cargo xtask deb`; the project's history has the changes.\n\n \
         -- {maintainer}  {}\n",
        date.trim()
    );
    let changelog_path = doc.join("changelog");
    write(&changelog_path, changelog.as_bytes(), 0o644)?;
    capture(
        root,
        "gzip",
        &[OsStr::new("-9n"), changelog_path.as_os_str()],
        &[],
    )?;

    for script in SCRIPTS {
        let text = read_bytes(&root.join(DIST).join(script))?;
        write(&tree.join("DEBIAN").join(script), &text, 0o755)?;
    }

    // Directories as dpkg-deb takes them: 0755 whatever the umask.
    for (path, is_dir) in walk(tree)? {
        if is_dir {
            fs::set_permissions(tree.join(&path), fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot chmod {}", path.display()))?;
        }
    }
    Ok(())
}

/// dist/agentd.service as the package installs it: the program at /usr/bin, and a header
/// that says how to enable it instead of how to install it by hand.
fn packaged_unit(text: &str) -> anyhow::Result<String> {
    let start = text
        .find("\n[Unit]")
        .context("dist/agentd.service has no [Unit] section")?;
    let body = &text[start + 1..];
    ensure!(
        body.matches(UNIT_EXEC_FROM).count() == 1,
        "dist/agentd.service: expected one `{UNIT_EXEC_FROM}...` line to point at the \
         packaged program; update UNIT_EXEC_FROM in xtask/src/deb.rs along with the unit"
    );
    Ok(format!(
        "{UNIT_HEADER}{}",
        body.replace(UNIT_EXEC_FROM, UNIT_EXEC_TO)
    ))
}

/// The agentd crate's version, as a Debian version: a pre-release (`1.0.0-rc.1`) sorts
/// before its release with `~`, as it does in Cargo.
fn version(root: &Path) -> anyhow::Result<String> {
    let json = capture(
        root,
        "cargo",
        &["metadata", "--locked", "--no-deps", "--format-version", "1"],
        &[],
    )?;
    let meta: serde_json::Value =
        serde_json::from_str(&json).context("cannot parse `cargo metadata`")?;
    let version = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "agentd"))
        .and_then(|p| p["version"].as_str())
        .context("`cargo metadata` names no agentd package with a version")?;
    debian_version(version)
}

fn debian_version(cargo: &str) -> anyhow::Result<String> {
    let v = cargo.replacen('-', "~", 1);
    ensure!(
        v.starts_with(|c: char| c.is_ascii_digit())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~')),
        "version {cargo} does not make a Debian version (digits first, then letters, \
         digits and . + ~ only)"
    );
    Ok(v)
}

/// Seconds since the epoch for the changelog's date and the archive's timestamps:
/// $SOURCE_DATE_EPOCH, else the last commit's time, else now.
fn source_date_epoch(root: &Path) -> anyhow::Result<u64> {
    if let Some(s) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let s = s.to_string_lossy();
        return s
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={s}: not a number of seconds"));
    }
    let from_git = Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok());
    match from_git {
        Some(t) => Ok(t),
        None => Ok(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_secs()),
    }
}

/// The `Depends` entries for the shared libraries `bin` links to: each library's package,
/// at least at the newest symbol version the binary asks of it. dpkg-shlibdeps finds the
/// same from the libraries' symbols files (e.g. `libc6 (>= 2.34), libgcc-s1 (>= 4.2)`),
/// but needs dpkg-dev; this needs only the binary.
fn shlib_depends(bin: &Path) -> anyhow::Result<String> {
    let bytes = read_bytes(bin)?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .with_context(|| format!("cannot parse {} as ELF", bin.display()))?;
    let mut versions = Vec::new();
    if let Some(verneed) = &elf.verneed {
        for file in verneed.iter() {
            let lib = elf
                .dynstrtab
                .get_at(file.vn_file)
                .with_context(|| format!("{}: a version need names no file", bin.display()))?;
            for aux in file.iter() {
                let name = elf.dynstrtab.get_at(aux.vna_name).with_context(|| {
                    format!("{}: a version {lib} needs has no name", bin.display())
                })?;
                versions.push((lib, name));
            }
        }
    }
    depends_of(&elf.libraries, &versions)
        .with_context(|| format!("cannot compute the Depends of {}", bin.display()))
}

/// The Debian package of a shared library (by soname) and the prefix of its symbol
/// versions. Another library is an error: add it here with its package.
fn shlib_package(soname: &str) -> anyhow::Result<(&'static str, &'static str)> {
    Ok(match soname {
        "libc.so.6" | "libm.so.6" | "libpthread.so.0" | "libdl.so.2" | "librt.so.1"
        | "libutil.so.1" => ("libc6", "GLIBC_"),
        s if s.starts_with("ld-linux") => ("libc6", "GLIBC_"),
        "libgcc_s.so.1" => ("libgcc-s1", "GCC_"),
        other => bail!(
            "agentd links to {other}, whose Debian package xtask/src/deb.rs does not know: \
             add it to shlib_package"
        ),
    })
}

/// `libraries`: the binary's DT_NEEDED; `versions`: (soname, symbol version) it needs.
fn depends_of(libraries: &[&str], versions: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut newest: BTreeMap<&str, Option<Vec<u32>>> = BTreeMap::new();
    for lib in libraries {
        newest.entry(shlib_package(lib)?.0).or_insert(None);
    }
    for (lib, name) in versions {
        let (package, prefix) = shlib_package(lib)?;
        let parsed = name
            .strip_prefix(prefix)
            .and_then(|v| {
                v.split('.')
                    .map(|n| n.parse().ok())
                    .collect::<Option<Vec<u32>>>()
            })
            .with_context(|| format!("{lib}: symbol version {name} is not {prefix}N.N..."))?;
        let entry = newest.entry(package).or_insert(None);
        if entry.as_ref().is_none_or(|v| parsed > *v) {
            *entry = Some(parsed);
        }
    }
    ensure!(
        newest.contains_key("libc6"),
        "no libc among the libraries linked to: is it a static binary?"
    );
    Ok(newest
        .into_iter()
        .map(|(package, version)| match version {
            Some(v) => {
                let v: Vec<String> = v.iter().map(u32::to_string).collect();
                format!("{package} (>= {})", v.join("."))
            }
            None => package.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", "))
}

/// DEBIAN/control from dist/deb/control.in: each placeholder filled once.
fn control(
    template: &str,
    version: &str,
    arch: &str,
    shlibs: &str,
    installed_size: u64,
) -> anyhow::Result<String> {
    let mut text = template.to_owned();
    for (key, value) in [
        ("@VERSION@", version),
        ("@ARCH@", arch),
        ("@SHLIBS_DEPENDS@", shlibs),
        ("@INSTALLED_SIZE@", &installed_size.to_string()),
    ] {
        ensure!(
            text.matches(key).count() == 1,
            "dist/deb/control.in: expected {key} once"
        );
        text = text.replace(key, value);
    }
    let unfilled = text.match_indices('@').find(|(i, _)| {
        let rest = &text[i + 1..];
        let name = rest
            .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .unwrap_or(rest.len());
        name > 0 && rest[name..].starts_with('@')
    });
    if let Some((i, _)) = unfilled {
        let line = text[i..].lines().next().unwrap_or_default();
        bail!("dist/deb/control.in: a placeholder deb.rs does not fill: {line}");
    }
    Ok(text)
}

/// Installed-Size as dpkg-gencontrol counts it: KiB per file, rounded up, and one per
/// directory.
fn installed_size_kib(tree: &Path) -> anyhow::Result<u64> {
    let mut kib = 0;
    for (path, is_dir) in walk(tree)? {
        if path.starts_with("DEBIAN") {
            continue;
        }
        kib += if is_dir {
            1
        } else {
            let full = tree.join(&path);
            let len = fs::metadata(&full)
                .with_context(|| format!("cannot stat {}", full.display()))?
                .len();
            len.div_ceil(1024)
        };
    }
    Ok(kib)
}

/// DEBIAN/md5sums: `debsums` and `dpkg --verify` check the installed files against it.
fn md5sums(tree: &Path) -> anyhow::Result<()> {
    let files: Vec<PathBuf> = walk(tree)?
        .into_iter()
        .filter(|(p, is_dir)| !is_dir && !p.starts_with("DEBIAN"))
        .map(|(p, _)| p)
        .collect();
    let mut args: Vec<&OsStr> = vec![OsStr::new("--")];
    args.extend(files.iter().map(|p| p.as_os_str()));
    let sums = capture_cmd(Command::new("md5sum"), tree, "md5sum", &args)?;
    write(&tree.join("DEBIAN/md5sums"), sums.as_bytes(), 0o644)
}

/// Runs lintian on the package when it is installed (CI does not install it). Its findings
/// are printed, not fatal.
fn lintian(deb: &Path) -> anyhow::Result<()> {
    eprintln!("[xtask] $ lintian {}", deb.display());
    match Command::new("lintian").arg(deb).status() {
        Ok(s) if s.success() => eprintln!("[xtask]   lintian: nothing to report"),
        Ok(s) => eprintln!("[xtask]   lintian: findings above ({s}); not fatal"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("[xtask]   lintian is not installed: not run");
        }
        Err(e) => return Err(e).context("cannot run lintian"),
    }
    Ok(())
}

/// Every entry below `dir`, relative to it, sorted, with whether it is a directory.
fn walk(dir: &Path) -> anyhow::Result<Vec<(PathBuf, bool)>> {
    fn visit(base: &Path, dir: &Path, out: &mut Vec<(PathBuf, bool)>) -> anyhow::Result<()> {
        for path in sorted_entries(dir)? {
            let is_dir = fs::symlink_metadata(&path)
                .with_context(|| format!("cannot stat {}", path.display()))?
                .is_dir();
            let rel = path.strip_prefix(base).context("outside the tree")?;
            out.push((rel.to_path_buf(), is_dir));
            if is_dir {
                visit(base, &path, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    visit(dir, dir, &mut out)?;
    Ok(out)
}

fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    paths.sort();
    Ok(paths)
}

fn mkdir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    mkdir(path.parent().context("no parent directory")?)?;
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn utf8(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

/// Runs a command in the workspace root, echoing it, failing on a non-zero exit; returns
/// its stdout.
fn capture<S: AsRef<OsStr>>(
    root: &Path,
    program: &str,
    args: &[S],
    envs: &[(&str, &str)],
) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.envs(envs.iter().copied());
    capture_cmd(cmd, root, program, args)
}

fn capture_cmd<S: AsRef<OsStr>>(
    mut cmd: Command,
    dir: &Path,
    program: &str,
    args: &[S],
) -> anyhow::Result<String> {
    let shown: Vec<_> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    // md5sum and gzip get many paths: the log shows the start.
    let shown = format!("{program} {}", shown.join(" "));
    let mut short: String = shown.chars().take(200).collect();
    if short.len() < shown.len() {
        short.push_str(" ...");
    }
    eprintln!("[xtask] $ {short}");
    let out = cmd
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {program}"))?;
    if !out.status.success() {
        bail!("`{short}` failed: {}", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{short}` printed non-UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_runs_the_packaged_program() {
        let unit = packaged_unit(include_str!("../../dist/agentd.service")).unwrap();
        assert!(unit.starts_with(UNIT_HEADER));
        assert!(unit.contains("\n[Unit]\n"));
        assert!(!unit.contains("/usr/local/bin"), "{unit}");
        assert_eq!(
            unit.lines()
                .filter(|l| l.starts_with("ExecStart=/usr/bin/agentd daemon "))
                .count(),
            1,
            "{unit}"
        );
        assert!(packaged_unit("[Unit]\nExecStart=/opt/agentd daemon\n").is_err());
    }

    #[test]
    fn cargo_versions_become_debian_versions() {
        assert_eq!(debian_version("0.1.0").unwrap(), "0.1.0");
        assert_eq!(debian_version("1.0.0-rc.1").unwrap(), "1.0.0~rc.1");
        assert_eq!(debian_version("1.0.0+git5").unwrap(), "1.0.0+git5");
        assert!(debian_version("v1").is_err());
        assert!(debian_version("1.0_1").is_err());
    }

    #[test]
    fn depends_name_each_library_package_at_its_newest_symbol_version() {
        let libs = ["libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2"];
        let versions = [
            ("libc.so.6", "GLIBC_2.2.5"),
            ("libc.so.6", "GLIBC_2.34"),
            ("libc.so.6", "GLIBC_2.9"),
            ("libc.so.6", "GLIBC_2.3.4"),
            ("libgcc_s.so.1", "GCC_3.0"),
            ("libgcc_s.so.1", "GCC_4.2.0"),
        ];
        assert_eq!(
            depends_of(&libs, &versions).unwrap(),
            "libc6 (>= 2.34), libgcc-s1 (>= 4.2.0)"
        );
        assert_eq!(depends_of(&["libc.so.6"], &[]).unwrap(), "libc6");
        assert!(depends_of(&["libc.so.6", "libssl.so.3"], &[]).is_err());
        assert!(depends_of(&["libc.so.6"], &[("libc.so.6", "GLIBC_PRIVATE")]).is_err());
        assert!(depends_of(&["libgcc_s.so.1"], &[]).is_err());
    }

    #[test]
    fn the_control_template_is_filled_completely() {
        let template = include_str!("../../dist/deb/control.in");
        let filled = control(template, "0.1.0", "amd64", "libc6 (>= 2.34)", 1234).unwrap();
        assert!(filled.contains("\nVersion: 0.1.0\n"), "{filled}");
        assert!(filled.contains("\nArchitecture: amd64\n"), "{filled}");
        assert!(filled.contains("\nInstalled-Size: 1234\n"), "{filled}");
        assert!(
            filled.contains("\nDepends: adduser, libc6 (>= 2.34)\n"),
            "{filled}"
        );
        assert!(filled.ends_with('\n'));
        assert!(control("Version: @VERSION@ @VERSION@", "1", "a", "d", 1).is_err());
        let extra = format!("{template}Homepage: @HOMEPAGE@\n");
        assert!(control(&extra, "1", "a", "d", 1).is_err());
    }
}
