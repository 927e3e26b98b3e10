//! Minimal programs `agentd doctor` loads to learn which program types this kernel accepts.
//! They do nothing: a probe answers "does the verifier and the kernel's policy let this
//! type load and attach", which reading config files cannot tell (a kernel may list `bpf`
//! among its LSMs and still refuse LSM programs).

use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_sock, cgroup_sock_addr, lsm, map, tracepoint},
    maps::RingBuf,
    programs::{BtfTracePointContext, LsmContext, SockAddrContext, SockContext, TracePointContext},
};

/// Created at load time: proves ring buffers are available.
#[map]
static PROBE_RING: RingBuf = RingBuf::with_byte_size(4096, 0);

/// cgroup/connect4 that allows everything.
#[cgroup_sock_addr(connect4)]
pub fn probe_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

/// cgroup/sock_create that allows everything (the hook that decides socket families).
#[cgroup_sock(sock_create)]
pub fn probe_sock_create(_ctx: SockContext) -> i32 {
    1
}

/// A classic tracepoint program (attached to sched/sched_process_fork by the probe).
#[tracepoint]
pub fn probe_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

/// A BTF-typed tracepoint (`tp_btf`), the same event as `probe_tracepoint`.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn probe_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// An LSM program that decides nothing: returns the previous hook's verdict.
#[lsm(hook = "file_open")]
pub fn probe_lsm(ctx: LsmContext) -> i32 {
    // file_open's BPF-LSM context is (struct file *file, int ret): index 1 is the verdict
    // of the programs before this one.
    ctx.arg(1)
}
