"""Host facts that decide what a scenario should expect (`kvmsplit probe`).

Everything is read from /proc, /sys and /dev/kvm; nothing is changed. The
facts are a plain dict so they go into results.json unchanged.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

from kvmsplit.vmm.kvm import Kvm, KvmUnavailable, uapi

KVM_PARAMS = ("tdp_mmu", "eager_page_split", "nx_huge_pages")
SYS_MODULE = Path("/sys/module")
HUGEPAGES = Path("/sys/kernel/mm/hugepages")
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _read(path: Path | str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _param_value(raw: str | None):
    if raw in ("Y", "y"):
        return True
    if raw in ("N", "n"):
        return False
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return raw


def module_param(module: str, name: str) -> dict | None:
    """{'value', 'writable', 'path'} for /sys/module/MODULE/parameters/NAME."""
    p = SYS_MODULE / module / "parameters" / name
    raw = _read(p)
    if raw is None:
        return None
    writable = bool(p.stat().st_mode & 0o222) and os.access(p, os.W_OK)
    return {"value": _param_value(raw), "raw": raw, "writable": writable, "path": str(p)}


def cpu_info() -> dict:
    vendor = model = None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "vendor_id" and vendor is None:
                    vendor = v.strip()
                elif k == "model name" and model is None:
                    model = v.strip()
                elif k == "flags" and not flags:
                    flags = set(v.split())
                if vendor and model and flags:
                    break
    except OSError:
        pass
    return {"vendor": vendor, "model": model, "flags": flags}


def virtualization(flags: set[str]) -> dict:
    """What the host offers for KVM and how KVM itself is hosted.

    `paging` is what decides split expectations: with shadow paging KVM maps a
    guest page no larger than the guest's own page size, and eager splitting
    (a TDP MMU feature) never happens.
    """
    hw = "vmx" if "vmx" in flags else "svm" if "svm" in flags else "none"
    modules = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if (SYS_MODULE / m).exists()]
    nested_under = "hypervisor" in flags
    if "kvm_pvm" in modules:
        kind, paging = "paravirtual (PVM)", "shadow"
    else:
        tdp = None
        for mod, p in (("kvm_intel", "ept"), ("kvm_amd", "npt")):
            v = module_param(mod, p)
            if v is not None:
                tdp = v["value"]
        paging = "tdp" if tdp else "shadow" if tdp is False else "unknown"
        kind = "nested (L1 under a hypervisor)" if nested_under else "bare metal"
    return {"hardware": hw, "modules": modules, "kind": kind, "paging": paging,
            "running_under_hypervisor": nested_under}


def memory_info() -> dict:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("MemTotal", "MemAvailable", "AnonHugePages"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return {"total": out.get("MemTotal"), "available": out.get("MemAvailable")}


def hugetlb_pools() -> dict:
    pools = {}
    for d in sorted(HUGEPAGES.glob("hugepages-*kB")):
        kb = int(d.name[len("hugepages-"):-2])
        total = _read(d / "nr_hugepages")
        free = _read(d / "free_hugepages")
        pools[kb] = {"size_kb": kb, "total": int(total or 0), "free": int(free or 0),
                     "writable": os.access(d / "nr_hugepages", os.W_OK)}
    return pools


def thp_mode() -> str | None:
    raw = _read(THP_ENABLED)
    if raw is None:
        return None
    for word in raw.split():
        if word.startswith("["):
            return word.strip("[]")
    return raw


def kernel_log_readable() -> bool:
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


def kvm_facts(kvm: Kvm) -> dict:
    caps = {name: kvm.check_extension(num) for name, num in uapi.CAPABILITIES.items()}
    return {"api_version": kvm.api_version(), "capabilities": caps,
            "guest_features": guest_features(kvm)}


def guest_features(kvm: Kvm) -> dict:
    """CPU features KVM can give a guest that decide which guest page sizes
    work: without PDPE1GB a 1G guest page is a reserved-bit fault (PVM, for
    one, does not offer it even where the host CPU has it)."""
    feats = {"pdpe1gb": False}
    for e in kvm.supported_cpuid():
        if e.function == 0x80000001:
            feats["pdpe1gb"] = bool(e.edx >> 26 & 1)
    return feats


def probe(kvm: Kvm | None = None) -> dict:
    """All host facts. Raises KvmUnavailable when /dev/kvm cannot be opened."""
    from kvmsplit.kernellog.taint import decode_taint, read_taint

    own = kvm is None
    kvm = kvm or Kvm()
    try:
        kf = kvm_facts(kvm)
    finally:
        if own:
            kvm.close()
    cpu = cpu_info()
    params = {}
    for name in KVM_PARAMS:
        params[name] = module_param("kvm", name)
    taint = read_taint()
    return {
        "kernel": {"release": platform.release(), "version": platform.version(),
                   "machine": platform.machine()},
        "cpu": {"vendor": cpu["vendor"], "model": cpu["model"], "count": os.cpu_count()},
        "virtualization": virtualization(cpu["flags"]),
        "kvm": {**kf, "params": params},
        # the params again at top level, by name: what scripts look for first
        **params,
        "memory": memory_info(),
        "thp": thp_mode(),
        "hugetlb": hugetlb_pools(),
        "kernel_log_readable": kernel_log_readable(),
        "taint": {"value": taint, "letters": decode_taint(taint)},
    }


def param_value(facts: dict, name: str):
    p = facts.get(name) or facts.get("kvm", {}).get("params", {}).get(name)
    return None if p is None else p["value"]


__all__ = ["probe", "KvmUnavailable", "param_value", "hugetlb_pools", "memory_info", "thp_mode"]
