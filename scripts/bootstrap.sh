#!/usr/bin/env bash
# Set up kvmsplit on a fresh Debian/Ubuntu machine: the OS packages that are
# missing (installed only as root), then a virtualenv in .venv with kvmsplit
# installed editable plus its test extra. Safe to run again; fast when
# nothing is missing.
#   scripts/bootstrap.sh run    what `kvmsplit run` needs
#   scripts/bootstrap.sh test   that, plus what the whole test suite uses
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-run}

# guests are built with gcc/binutils; <linux/kvm.h> checks the ioctl layer
packages=(make gcc libc6-dev binutils linux-libc-dev git python3 python3-venv python3-pip)
if [ "$profile" = test ]; then
    packages+=(
        tar xz-utils linux-source-6.12          # the kernel's KVM selftests, and the kernels we build
        flex bison bc libelf-dev libssl-dev cpio # building those kernels
        qemu-system-x86 busybox-static           # kvmsplit vm (virtme-ng)
        linux-image-amd64                        # a kernel under test to boot
        chromium                                 # screenshots of the HTML report
        openssh-server b4                        # kvmsplit remote's boxes (real sshd); series by message-id
        lava-common lava-dispatcher              # contrib/'s LAVA templates: LAVA's validator, and lava-run
        kexec-tools                              # `remote boot`'s kexec, run for real inside a VM
    )
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "kvmsplit: please install: ${missing[*]}" >&2
        exit 69
    fi
    echo "kvmsplit: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # kexec-tools would otherwise turn this machine's own reboots into kexecs (Debian's default)
    echo "kexec-tools kexec-tools/load_kexec boolean false" | debconf-set-selections 2>/dev/null || true
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.kvmsplit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
# byte-compile kvmsplit's own modules (an editable install leaves them as source, and
# with PYTHONDONTWRITEBYTECODE set, or a read-only tree under `kvmsplit vm`, every
# command would compile them again: 0.1-0.4 s of start-up here, minutes under TCG)
.venv/bin/python -m compileall -q -j0 runner >/dev/null || true
