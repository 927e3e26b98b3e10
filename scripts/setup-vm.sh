#!/usr/bin/env bash
# Installs what `cargo xtask vm-test` needs to boot stock Debian kernels under qemu, and
# nothing that is already there. Idempotent; needs root. Called by `cargo xtask vm-test`.
#
#   qemu-system-x86   the emulator (TCG: /dev/kvm on these machines is not hardware-backed)
#   busybox-static    the guest's /bin/sh and userland (mount, ip, timeout, poweroff, ...)
#   xz-utils, zstd    unpack the uncompressed vmlinux from a kernel image (6.1 is xz, 6.12 zstd)
#   python3           the tests' agents run it; the guest gets the host's copy with its libraries
#
# Debian packages come through a private apt configuration in $AGENTD_VM_CACHE/apt (default
# ~/.cache/agentd-vm/apt) that adds bookworm-backports; /etc/apt is never changed. xtask uses
# the same configuration to download kernel packages (never installed). Why backports for
# qemu: this image carries qemu-utils 10.x from bookworm-backports, which Breaks bookworm's
# qemu-system-common 7.2, so a plain `apt-get install qemu-system-x86` would remove it.
#
# The private package lists are refreshed when older than a day (or missing); without a
# network the existing lists are used, with a warning.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
CACHE=${AGENTD_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agentd-vm}
APT=$CACHE/apt
MIRROR=http://deb.debian.org/debian
t0=$SECONDS
say() { printf '[setup-vm] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "[setup-vm] error: must run as root (installs Debian packages)" >&2
    exit 1
fi

# apt-get/apt-cache with the private sources list, lists and download directory. xtask's
# vm.rs passes the same options: keep them in step.
apt_private() {
    local tool=$1
    shift
    "$tool" -o Dir::Etc::sourcelist="$APT/sources.list" -o Dir::Etc::sourceparts=- \
        -o Dir::State::lists="$APT/lists" -o Dir::Cache::archives="$APT/archives" \
        -o APT::Sandbox::User=root "$@"
}

mkdir -p "$APT/lists/partial" "$APT/archives/partial"
sources="deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $MIRROR bookworm-backports main
deb http://deb.debian.org/debian-security bookworm-security main"
if [ "$(cat "$APT/sources.list" 2>/dev/null)" != "$sources" ]; then
    say "writing the private apt sources list $APT/sources.list"
    printf '%s\n' "$sources" >"$APT/sources.list"
    rm -f "$APT/updated"
fi

if [ -z "$(find "$APT/updated" -mmin -1440 2>/dev/null)" ]; then
    say "apt-get update (private lists: bookworm, -updates, -security, -backports)"
    if apt_private apt-get update -qq; then
        touch "$APT/updated"
    elif [ -e "$APT/updated" ]; then
        say "warning: apt-get update failed; using the lists from $(date -r "$APT/updated")"
    else
        echo "[setup-vm] error: apt-get update failed and there are no earlier lists" >&2
        exit 1
    fi
else
    say "private apt lists are fresh (updated $(date -r "$APT/updated" '+%F %T'))"
fi

missing_pkgs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s ' "$p"
    done
}

pkgs=(qemu-system-x86 busybox-static xz-utils zstd python3)
need=$(missing_pkgs "${pkgs[@]}")
if [ -z "$need" ]; then
    say "packages present: ${pkgs[*]}"
else
    say "installing: $need(qemu from bookworm-backports)"
    # --no-remove: fail rather than remove anything installed to make room.
    # shellcheck disable=SC2086 # word splitting intended
    apt_private apt-get install -y -qq --no-install-recommends --no-remove \
        -t bookworm-backports $need >/dev/null
fi
say "$(qemu-system-x86_64 --version | head -1)"
say "done in $((SECONDS - t0))s"
