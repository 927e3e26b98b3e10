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

# apt_install for packages whose postinst would start a service (rsyslog...): under a
# policy-rc.d that lets invoke-rc.d start nothing (the tests start these programs
# themselves, with their own configuration), the machine's own policy-rc.d put back after.
apt_install_no_start() {
    if [ -z "$(missing_pkgs "$@")" ]; then
        say "packages present: $*"
        return
    fi
    local policy=/usr/sbin/policy-rc.d saved="" rc=0
    if [ -e "$policy" ]; then
        saved=$(mktemp /usr/sbin/policy-rc.d.agentd-setup.XXXXXX)
        cp -p "$policy" "$saved"
    fi
    printf '#!/bin/sh\n# agentd setup: no service starts during this install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    apt_install "$@" || rc=$?
    if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
    return "$rc"
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
# man-db: tests/tests/deb.rs reads the Debian package's manuals with `man` (its timer is
# not started). binutils: `cargo xtask deb` strips the packaged program (g++ brings it too).
apt_install_no_start man-db
apt_install binutils
# rsyslog: the syslog export's test (tests/tests/export.rs) sends events to a real rsyslogd
# that it starts with its own configuration; the package's service is not started.
apt_install_no_start rsyslog
# prometheus and promtool: the metrics test (tests/tests/metrics.rs) starts a real Prometheus
# on a loopback port to scrape the daemon, and lints the text with `promtool check metrics`;
# the package's service is not started.
apt_install_no_start prometheus
# The official OpenTelemetry protobuf definitions (PyPI, pinned) for the OTLP export's test
# receiver (tests/support/otlp_receiver.py), under root's cache dir, for the python3 the
# tests run. tests/tests/export.rs names the same directory: change both together.
OTEL_PROTO_VERSION=1.45.2
PROTOBUF_VERSION=7.36.2
otel_proto="${XDG_CACHE_HOME:-$HOME/.cache}/agentd/python/opentelemetry-proto-$OTEL_PROTO_VERSION"
if [ -f "$otel_proto/opentelemetry/proto/collector/logs/v1/logs_service_pb2.py" ] &&
    PYTHONPATH="$otel_proto" python3 -c 'import opentelemetry.proto.collector.logs.v1.logs_service_pb2' 2>/dev/null; then
    say "opentelemetry-proto $OTEL_PROTO_VERSION present in $otel_proto"
else
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    say "installing opentelemetry-proto $OTEL_PROTO_VERSION and protobuf $PROTOBUF_VERSION into $otel_proto (pip)"
    rm -rf "$otel_proto"
    python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore \
        --target "$otel_proto" "opentelemetry-proto==$OTEL_PROTO_VERSION" "protobuf==$PROTOBUF_VERSION"
fi

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

# The web view's browser test (tests/tests/web_ui.rs): Debian's Chromium (a program, no
# service), driven by playwright-core (Apache-2.0; pinned, from the npm registry, about
# 14 MB; it downloads no browser of its own), cached under root's cache dir.
apt_install chromium
PLAYWRIGHT_CORE_VERSION=1.65.1
playwright_prefix=${AGENTD_PLAYWRIGHT:-${XDG_CACHE_HOME:-$HOME/.cache}/agentd/playwright}
playwright_pkg="$playwright_prefix/node_modules/playwright-core/package.json"
if [ -f "$playwright_pkg" ] && grep -q "\"version\": \"$PLAYWRIGHT_CORE_VERSION\"" "$playwright_pkg"; then
    say "playwright-core $PLAYWRIGHT_CORE_VERSION present in $playwright_prefix"
else
    say "installing playwright-core $PLAYWRIGHT_CORE_VERSION into $playwright_prefix (npm)"
    mkdir -p "$playwright_prefix"
    npm install --prefix "$playwright_prefix" --no-save --no-audit --no-fund --loglevel=error \
        "playwright-core@$PLAYWRIGHT_CORE_VERSION"
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
