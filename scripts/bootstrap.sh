#!/usr/bin/env bash
# Set up kvmsplit on a fresh Debian/Ubuntu machine: OS packages (only those
# missing, only as root), then a virtualenv in .venv with kvmsplit installed
# editable plus its test extra. Safe to run again; fast when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
declare -A NEED=([gcc]=gcc [make]=make [ld]=binutils [objcopy]=binutils [python3]=python3)
missing=()
for cmd in "${!NEED[@]}"; do command -v "$cmd" >/dev/null || missing+=("${NEED[$cmd]}"); done
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
[ -e /usr/include/linux/kvm.h ] || missing+=(linux-libc-dev)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "kvmsplit: please install: $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')" >&2
        exit 69
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
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
