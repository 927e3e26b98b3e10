//! Micro-benchmarks of what the kernel watch costs a process: tight loops of the syscalls
//! the programs hook (and one they do not), timed in the calling process. `agentd-harness
//! watch-test bench` runs them with and without the programs loaded, outside and inside
//! an agent's cgroup; `cargo xtask bench` can call the same.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path, time::Instant};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct LoopResult {
    pub name: &'static str,
    pub iterations: u32,
    /// Best of the rounds, nanoseconds per iteration.
    pub ns_per_op: f64,
}

const ROUNDS: u32 = 5;

fn best_of(iterations: u32, mut body: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..iterations {
            body();
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(iterations.max(1));
        best = best.min(ns);
    }
    best
}

/// Runs each loop `iterations` times (best of five rounds). `dir` is a writable directory
/// for the create-and-write loop.
pub fn run_loops(iterations: u32, dir: &Path) -> anyhow::Result<Vec<LoopResult>> {
    let read_path = CString::new("/etc/hostname")?;
    let write_path = CString::new(dir.join("agentd-bench.tmp").as_os_str().as_bytes())?;
    let mut out = Vec::new();
    let mut push = |name, ns| {
        out.push(LoopResult {
            name,
            iterations,
            ns_per_op: ns,
        });
    };

    // A syscall none of the programs hooks: the noise floor.
    push(
        "getppid",
        best_of(iterations, || {
            // SAFETY: no arguments, cannot fail.
            unsafe { libc::getppid() };
        }),
    );
    push(
        "openat_read_close",
        best_of(iterations, || {
            // SAFETY: valid NUL-terminated path; the fd is closed at once.
            unsafe {
                let fd = libc::openat(libc::AT_FDCWD, read_path.as_ptr(), libc::O_RDONLY);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
        }),
    );
    push(
        "openat_create_write_close",
        best_of(iterations, || {
            // SAFETY: as above.
            unsafe {
                let fd = libc::openat(
                    libc::AT_FDCWD,
                    write_path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                    0o600,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
            }
        }),
    );
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = 9u16.to_be();
    sin.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    push(
        "udp_socket_connect_close",
        best_of(iterations, || {
            // SAFETY: `sin` is a valid sockaddr_in of the given length; the fd is closed.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                if fd >= 0 {
                    libc::connect(
                        fd,
                        (&raw const sin).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                    libc::close(fd);
                }
            }
        }),
    );
    let _ = std::fs::remove_file(dir.join("agentd-bench.tmp"));
    Ok(out)
}
