//! The agent's command: resolved through the agent's (scrubbed) PATH in the supervisor,
//! checked against `filesystem.exec`, and turned into the `execve` arguments before fork.

use std::{
    ffi::{CString, OsStr, OsString},
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::env::Var;
use crate::profile::CompiledPolicy;

/// Search path when the profile gives the agent no PATH (as a shell without PATH would).
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command: no command given (agentd run [OPTIONS] -- CMD [ARGS...])")]
    Empty,
    #[error("{0}: command not found (searched the agent's PATH: {1})")]
    NotFound(String, String),
    #[error("{}: not an executable file", .0.display())]
    NotExecutable(PathBuf),
    #[error(
        "{} is outside the profile's `filesystem.exec` ({profile}): add its directory to `exec`, or run a program that is under it",
        path.display()
    )]
    NotAllowed { path: PathBuf, profile: String },
    #[error("command: an argument or variable contains a NUL byte")]
    Nul,
}

impl CommandError {
    /// Shell conventions: 127 not found, 126 found but not runnable, 125 refused.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::NotFound(..) => 127,
            CommandError::NotExecutable(_) => 126,
            CommandError::Empty | CommandError::NotAllowed { .. } | CommandError::Nul => 125,
        }
    }
}

/// The command, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolved {
    /// As given, `argv[0]` first.
    pub argv: Vec<String>,
    /// The file `execve` is given.
    pub path: PathBuf,
    /// `path` with symlinks resolved: what Landlock checks.
    pub real_path: PathBuf,
}

fn is_executable_file(p: &Path) -> Option<bool> {
    let m = std::fs::metadata(p).ok()?;
    Some(m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `cmd` like a shell: a name with a `/` is taken as a path (relative to `cwd`, the
/// agent's working directory); a bare name is looked up in `path_var` (empty entries are
/// skipped, not taken as the current directory).
pub fn find(cmd: &OsStr, path_var: Option<&OsStr>, cwd: &Path) -> Result<PathBuf, CommandError> {
    if cmd.is_empty() {
        return Err(CommandError::Empty);
    }
    if cmd.as_bytes().contains(&b'/') {
        let p = cwd.join(cmd);
        return match is_executable_file(&p) {
            Some(true) => Ok(p),
            Some(false) => Err(CommandError::NotExecutable(p)),
            None => Err(CommandError::NotFound(
                cmd.to_string_lossy().into_owned(),
                "not searched: the name contains /".into(),
            )),
        };
    }
    let search = path_var.unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut not_executable = None;
    for dir in search
        .as_bytes()
        .split(|b| *b == b':')
        .filter(|d| !d.is_empty())
    {
        let p = Path::new(OsStr::from_bytes(dir)).join(cmd);
        match is_executable_file(&p) {
            Some(true) => return Ok(p),
            Some(false) => {
                not_executable.get_or_insert(p);
            }
            None => {}
        }
    }
    match not_executable {
        Some(p) => Err(CommandError::NotExecutable(p)),
        None => Err(CommandError::NotFound(
            cmd.to_string_lossy().into_owned(),
            search.to_string_lossy().into_owned(),
        )),
    }
}

/// Resolves `argv[0]` for the agent and checks the program is under `filesystem.exec`.
pub fn resolve(
    argv: &[OsString],
    env: &[Var],
    policy: &CompiledPolicy,
    profile_origin: &str,
) -> Result<Resolved, CommandError> {
    let cmd = argv.first().ok_or(CommandError::Empty)?;
    let path_var = super::env::path_of(env).map(OsString::as_os_str);
    let path = find(cmd, path_var, &policy.workspace)?;
    let real_path = path
        .canonicalize()
        .map_err(|_| CommandError::NotFound(cmd.to_string_lossy().into_owned(), String::new()))?;
    if !policy.fs_allows(&real_path, |a| a.exec) {
        return Err(CommandError::NotAllowed {
            path: real_path,
            profile: profile_origin.to_owned(),
        });
    }
    Ok(Resolved {
        argv: argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        path,
        real_path,
    })
}

/// `execve`'s arguments, built before fork so the child allocates nothing to exec.
#[derive(Debug)]
pub struct Exec {
    path: CString,
    /// Owners of the strings `argv_ptrs` and `envp_ptrs` point into (heap buffers that do
    /// not move when the vectors do).
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

impl Exec {
    pub fn new(path: &Path, argv: &[OsString], env: &[Var]) -> Result<Exec, CommandError> {
        let c = |b: &[u8]| CString::new(b).map_err(|_| CommandError::Nul);
        let path = c(path.as_os_str().as_bytes())?;
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<Result<_, _>>()?;
        let envp: Vec<CString> = env
            .iter()
            .map(|v| {
                let mut kv = v.name.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.value.as_bytes());
                c(&kv)
            })
            .collect::<Result<_, _>>()?;
        let nul_terminated = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(Exec {
            argv_ptrs: nul_terminated(&argv),
            envp_ptrs: nul_terminated(&envp),
            path,
            _argv: argv,
            _envp: envp,
        })
    }

    /// `execve`; returns only on failure, with its errno.
    pub fn exec(&self) -> nix::Error {
        // SAFETY: path, argv and envp are NUL-terminated strings and NULL-terminated
        // pointer arrays owned by `self`, alive for the call.
        unsafe {
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            )
        };
        nix::Error::last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("agentd-cmd-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn file(&self, name: &str, mode: u32) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn path_search_like_a_shell() {
        let d = TempDir::new("search");
        let tool = d.file("tool", 0o755);
        d.file("data", 0o644);
        let path = format!("::/nonexistent:{}", d.0.display());
        let path = OsStr::new(&path);
        assert_eq!(
            find(OsStr::new("tool"), Some(path), Path::new("/")).unwrap(),
            tool
        );
        assert!(matches!(
            find(OsStr::new("data"), Some(path), Path::new("/")),
            Err(CommandError::NotExecutable(_))
        ));
        let e = find(OsStr::new("missing"), Some(path), Path::new("/")).unwrap_err();
        assert_eq!(e.exit_code(), 127);
        // with a slash: relative to the agent's working directory, no search
        assert_eq!(
            find(OsStr::new("./tool"), None, &d.0).unwrap(),
            d.0.join("./tool")
        );
        assert!(matches!(
            find(OsStr::new("./missing"), None, &d.0),
            Err(CommandError::NotFound(..))
        ));
        assert!(matches!(
            find(OsStr::new(""), None, &d.0),
            Err(CommandError::Empty)
        ));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(CommandError::NotExecutable("/x".into()).exit_code(), 126);
        assert_eq!(
            CommandError::NotAllowed {
                path: "/x".into(),
                profile: "p".into()
            }
            .exit_code(),
            125
        );
    }

    #[test]
    fn exec_args_are_nul_terminated_and_reject_nul() {
        let vars = vec![Var {
            name: "A".into(),
            value: "b".into(),
            source: super::super::env::Source::Set,
        }];
        let e = Exec::new(Path::new("/bin/true"), &["true".into()], &vars).unwrap();
        assert_eq!(e.argv_ptrs.len(), 2);
        assert!(e.argv_ptrs[1].is_null() && e.envp_ptrs[1].is_null());
        assert!(matches!(
            Exec::new(Path::new("/bin/true"), &[OsString::from("a\0b")], &vars),
            Err(CommandError::Nul)
        ));
    }
}
