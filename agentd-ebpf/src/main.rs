//! agentd's BPF programs. Entry points are thin: each calls a `try_*` function in the module
//! of its hook family and turns its result into the hook's return value.
#![no_std]
#![no_main]

mod probe;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_send_signal and bpf_probe_read_* are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
