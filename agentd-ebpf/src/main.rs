//! agentd's BPF programs. Entry points are thin: each calls a `try_*` function in the module
//! of its hook family and turns its result into the hook's return value.
//!
//! - `net`: cgroup programs (connect4/6, sendmsg4/6, bind4/6, sock_create) that decide each
//!   agent's network access, attached to the agent's own cgroup;
//! - `file`: per-syscall tracepoints that observe write-side file operations, execs and
//!   canary opens with the kernel's verdict, and the refusals of dangerous calls (at their
//!   exit only), and SIGKILL processes of a killed agent;
//! - `proc`: fork and exit of agent processes (`tp_btf`);
//! - `gate`: every system call's entry and exit, to SIGKILL the processes of an agent
//!   whose breaker tripped;
//! - `lsm`: BPF LSM programs, where the kernel accepts them: the `protect` list, memfd
//!   exec;
//! - `signal`: the signals an agent was refused (kill and its siblings);
//! - `maps`: the maps they share and the agent lookup each program starts with;
//! - `vfs`: the current task's open files and working directory, dentry walks (canary
//!   inodes, the directory of a relative path), with struct offsets from BTF;
//! - `probe`: the do-nothing programs `agentd doctor` loads to learn what the kernel allows.
#![no_std]
#![no_main]

mod file;
mod gate;
mod lsm;
mod maps;
mod net;
mod probe;
mod proc;
mod signal;
mod vfs;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_send_signal and bpf_probe_read_* are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
