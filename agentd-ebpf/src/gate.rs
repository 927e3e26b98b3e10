//! The kill gate: a program on every system call's entry and exit (the raw `sys_enter` and
//! `sys_exit` tracepoints, host-wide) that SIGKILLs any process of an agent whose kill flag
//! is set. With the flag set in the violating call itself (`maps::trip`), no process of a
//! tripped agent runs another system call: one entering a call is sent SIGKILL before the
//! call's body runs (blocking calls and file writes then give up: they check for a fatal
//! signal), and one inside a call (asleep in `wait4`, `read`, `nanosleep`) dies at its
//! exit, before it returns to user space. `cgroup.kill` from user space follows.
//!
//! User space attaches these programs only while it watches agents. For every other
//! process on the host, each is then one array read (`gate_open`) while no agent is
//! tripped; the gate closes again when user space has removed the tripped agents.

use agentd_common::AGENT_FLAG_KILLED;
use aya_ebpf::{helpers::bpf_send_signal, macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::maps::{current_agent, gate_open};

const SIGKILL: u32 = 9;

/// TP_PROTO(struct pt_regs *regs, long id)
#[btf_tracepoint(function = "sys_enter")]
pub fn gate_sys_enter(_ctx: BtfTracePointContext) -> i32 {
    gate();
    0
}

/// TP_PROTO(struct pt_regs *regs, long ret)
#[btf_tracepoint(function = "sys_exit")]
pub fn gate_sys_exit(_ctx: BtfTracePointContext) -> i32 {
    gate();
    0
}

#[inline(always)]
fn gate() {
    if !gate_open() {
        return;
    }
    let Some((_, state)) = current_agent() else {
        return;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    if unsafe { (*state).flags } & AGENT_FLAG_KILLED != 0 {
        // SAFETY: the helper has no memory preconditions; it signals the current process.
        unsafe { bpf_send_signal(SIGKILL) };
    }
}
