//! Writes agentd's man pages and shell completions from its command-line definition
//! (`agentd::cli::command()`), for the Debian package that `cargo xtask deb` builds:
//!
//! ```text
//! cargo run -p agentd --example gen-docs -- OUT_DIR
//! ```
//!
//! writes `OUT_DIR/man1/agentd.1` and one page per visible subcommand, named after its
//! path (`agentd-daemon.1`, `agentd-profile-check.1`; hidden ones get none), uncompressed,
//! and `OUT_DIR/completions/{agentd.bash,_agentd,agentd.fish}` for bash, zsh and fish.
//! Each file written is printed, one path a line.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap_complete::Shell;

/// The page's section: user commands.
const SECTION: &str = "1";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!("usage: gen-docs OUT_DIR (writes OUT_DIR/man1 and OUT_DIR/completions)");
    };
    let out = PathBuf::from(out);

    let man_dir = out.join(format!("man{SECTION}"));
    create_dir(&man_dir)?;
    // `help` is clap's, not agentd's: no page for it. Building fills in each subcommand's
    // display name (`agentd-daemon`), which names its page and its NAME section.
    let mut cmd = agentd::cli::command().disable_help_subcommand(true);
    cmd.build();
    // Every page's footer names the program and its version, as `agentd --version` does.
    let source = format!("agentd {}", cmd.get_version().unwrap_or_default());
    let mut pages = Vec::new();
    man_pages(&cmd, &source, &man_dir, &mut pages)?;

    let comp_dir = out.join("completions");
    create_dir(&comp_dir)?;
    let mut written = Vec::new();
    for (shell, file) in [
        (Shell::Bash, "agentd.bash"),
        (Shell::Zsh, "_agentd"),
        (Shell::Fish, "agentd.fish"),
    ] {
        let path = comp_dir.join(file);
        let mut f =
            fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        // A fresh definition each time: the generator rebuilds it for its shell.
        clap_complete::generate(shell, &mut agentd::cli::command(), "agentd", &mut f);
        written.push(path);
    }

    for path in pages.iter().chain(&written) {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes the page of `cmd` and of each of its visible subcommands, depth first.
fn man_pages(
    cmd: &clap::Command,
    source: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, source, dir, written)?;
    }
    let page = clap_mangen::Man::new(cmd.clone())
        .section(SECTION)
        .source(source)
        .manual("agentd manual");
    let path = page.generate_to(dir).with_context(|| {
        format!(
            "cannot write the man page of `{}` in {}",
            cmd.get_name(),
            dir.display()
        )
    })?;
    written.push(path);
    Ok(())
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
