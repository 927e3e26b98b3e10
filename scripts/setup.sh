#!/usr/bin/env bash
# Installs what agentd needs to build and test on a Debian 12 host, and nothing that is
# already there. Idempotent; needs root. Called by `cargo xtask setup` and by .ci/run.
#
# Why these pieces: rustup cannot download a toolchain here, so the BPF programs are built
# by Debian's rustc-web (which ships a precompiled `core` for bpfel-unknown-none) and
# linked by bpf-linker, built from crates.io against the Debian LLVM whose major version
# matches rustc-web's. The user-space crates build with rustup's stable toolchain.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
TOOLCHAIN_NAME=debian-bpf
export DEBIAN_FRONTEND=noninteractive
t0=$SECONDS
say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "[setup] error: must run as root (installs Debian packages, mounts bpffs/tracefs)" >&2
    exit 1
fi

missing_pkgs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s ' "$p"
    done
}

apt_updated=0
apt_install() {
    local need
    need=$(missing_pkgs "$@")
    if [ -z "$need" ]; then
        say "packages present: $*"
        return
    fi
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    say "installing: $need"
    # shellcheck disable=SC2086 # word splitting intended
    apt-get install -y -qq --no-install-recommends $need >/dev/null
}

# rustc-web, cargo-web and the BPF core library must come from one transaction: their
# versions are locked to each other.
apt_install rustc-web cargo-web libstd-rust-web-dev-bpf
LLVM_MAJOR=$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
say "Debian rustc for BPF: $(/usr/bin/rustc -V), LLVM $LLVM_MAJOR"
# llvm-N-dev: what bpf-linker links against. The privileged tests run agents that are
# shell scripts and python3 programs, with util-linux tools (setsid, unshare).
apt_install "llvm-$LLVM_MAJOR-dev" python3-minimal python3 util-linux
# g++: libfuzzer-sys compiles libFuzzer (C++) for `cargo xtask fuzz`.
apt_install g++
# ssh-keygen: the person of the ask tests and of the demo signs approvals with it.
apt_install openssh-client

if rustup toolchain list | grep -q "^$TOOLCHAIN_NAME"; then
    say "rustup toolchain $TOOLCHAIN_NAME present"
else
    say "linking Debian's toolchain into rustup as $TOOLCHAIN_NAME (stable stays the default)"
    rustup toolchain link "$TOOLCHAIN_NAME" /usr
fi

if command -v bpf-linker >/dev/null && bpf-linker --version | grep -q "$BPF_LINKER_VERSION"; then
    say "bpf-linker $BPF_LINKER_VERSION present"
else
    say "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR (about a minute)"
    LLVM_PREFIX="/usr/lib/llvm-$LLVM_MAJOR" cargo install --locked --quiet bpf-linker \
        --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$LLVM_MAJOR"
fi

# Real agent CLIs for the end-to-end tests (tests/tests/agent_clis.rs), pinned, from the npm
# registry, cached under root's cache dir: OpenAI's Codex CLI (Apache-2.0; a 172 MB
# download, 424 MB installed). git for the agent's commits, tmux to drive its TUI.
apt_install git tmux
# Node.js may come from elsewhere (NodeSource's nodejs carries npm): only when npm is missing.
command -v npm >/dev/null || apt_install nodejs npm
CODEX_VERSION=0.171.0
AGENT_CLIS=${AGENTD_AGENT_CLIS:-${XDG_CACHE_HOME:-$HOME/.cache}/agentd/agent-clis}
codex_prefix="$AGENT_CLIS/codex-$CODEX_VERSION"
if [ -x "$codex_prefix/node_modules/@openai/codex/bin/codex.js" ] &&
    [ -d "$codex_prefix/node_modules/@openai/codex-linux-x64" ]; then
    say "codex $CODEX_VERSION present in $codex_prefix"
else
    say "installing codex $CODEX_VERSION into $codex_prefix (npm, about 170 MB)"
    mkdir -p "$codex_prefix"
    npm install --prefix "$codex_prefix" --no-save --no-audit --no-fund --loglevel=error \
        "@openai/codex@$CODEX_VERSION"
fi

# Pseudo-filesystems agentd and its tests use. agentd mounts them itself when it needs
# them; mounting here makes doctor's first report and manual debugging match.
for spec in tracefs:/sys/kernel/tracing bpf:/sys/fs/bpf securityfs:/sys/kernel/security; do
    fstype=${spec%%:*}
    dir=${spec#*:}
    if mountpoint -q "$dir"; then
        say "$fstype mounted at $dir"
    else
        say "mounting $fstype at $dir"
        mount -t "$fstype" "$fstype" "$dir"
    fi
done
say "done in $((SECONDS - t0))s"
