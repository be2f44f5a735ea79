"""Host facts that decide what a scenario should expect (`kvmsplit probe`).

Everything is read from /proc, /sys and /dev/kvm; nothing is changed. The
facts travel as one immutable HostFacts; `to_dict()` is the `host` object of
results.json (its shape is pinned by the results schema).
"""
from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvmsplit import tracing
from kvmsplit.kernellog.taint import decode_taint, read_taint
from kvmsplit.vmm.guest.ucall import WriteRoute
from kvmsplit.vmm.kvm import Kvm, KvmIoctlError, KvmUnavailable, uapi

KVM_PARAMS = ("tdp_mmu", "eager_page_split", "nx_huge_pages", "force_emulation_prefix")
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


@dataclass(frozen=True)
class ModuleParam:
    """One /sys/module/MODULE/parameters/NAME. `writable` comes from the mode
    bits too: root's os.access() says yes to a 0444 file."""
    value: bool | int | str | None
    raw: str = ""
    writable: bool = False
    path: str = ""

    def to_dict(self) -> dict:
        return {"value": self.value, "raw": self.raw, "writable": self.writable, "path": self.path}


def module_param(module: str, name: str) -> ModuleParam | None:
    p = SYS_MODULE / module / "parameters" / name
    raw = _read(p)
    if raw is None:
        return None
    writable = bool(p.stat().st_mode & 0o222) and os.access(p, os.W_OK)
    return ModuleParam(_param_value(raw), raw, writable, str(p))


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
                tdp = v.value
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


def hugetlb_pools() -> dict[int, HugetlbPool]:
    pools = {}
    for d in sorted(HUGEPAGES.glob("hugepages-*kB")):
        kb = int(d.name[len("hugepages-"):-2])
        pools[kb] = HugetlbPool(kb, int(_read(d / "nr_hugepages") or 0), int(_read(d / "free_hugepages") or 0),
                                os.access(d / "nr_hugepages", os.W_OK))
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


def guest_features(kvm: Kvm) -> dict[str, bool]:
    """CPU features KVM can give a guest that decide which guest page sizes
    work: without PDPE1GB a 1G guest page is a reserved-bit fault (PVM, for
    one, does not offer it even where the host CPU has it)."""
    feats = {"pdpe1gb": False, "svm": False, "npt": False, "vmx": False}
    for e in kvm.supported_cpuid():
        if e.function == 0x80000001:
            feats["pdpe1gb"] = bool(e.edx >> 26 & 1)
            feats["svm"] = bool(e.ecx >> 2 & 1)       # what an L1 hypervisor needs ...
        elif e.function == 0x8000000A:
            feats["npt"] = bool(e.edx & 1)            # ... and nested paging for its L2
        elif e.function == 1:
            feats["vmx"] = bool(e.ecx >> 5 & 1)
    return feats


def dirty_ring_min(kvm: Kvm) -> int | None:
    """The smallest dirty ring (bytes per vCPU) KVM accepts: a power of two of at
    least a page that holds KVM's reserved entries (64 plus the CPU's dirty-log
    buffer, e.g. 512 with Intel PML). Found by asking a scratch VM; None without
    dirty rings."""
    if not kvm.check_extension(uapi.CAPABILITIES["DIRTY_LOG_RING"]):
        return None
    try:
        vm = kvm.create_vm()
    except KvmIoctlError:
        return None         # no VM to ask (resources); the scenarios' own VMs will say why
    try:
        for shift in range(12, 21):
            try:
                vm.enable_cap(uapi.CAP_DIRTY_LOG_RING, 1 << shift)
                return 1 << shift
            except KvmIoctlError:
                continue
        return None
    finally:
        vm.close()


@dataclass(frozen=True)
class HugetlbPool:
    size_kb: int
    total: int = 0
    free: int = 0
    writable: bool = False

    def to_dict(self) -> dict:
        return {"size_kb": self.size_kb, "total": self.total, "free": self.free, "writable": self.writable}


@dataclass(frozen=True)
class HostFacts:
    """What kvmsplit knows of the host. Every field has an "unknown" default,
    so a test can state just the facts its case depends on."""
    kernel_release: str = "unknown"
    kernel_version: str = ""
    machine: str = ""
    hostname: str = ""
    cpu_vendor: str | None = None
    cpu_model: str | None = None
    cpu_count: int | None = None
    hardware: str = "none"          # what the CPU offers KVM: vmx, svm or none
    modules: tuple[str, ...] = ()
    kind: str = "unknown"           # bare metal, nested, paravirtual (PVM)
    paging: str = "unknown"         # tdp, shadow or unknown: decides split expectations
    under_hypervisor: bool = False
    api_version: int | None = None
    capabilities: dict[str, int] = field(default_factory=dict)
    guest_features: dict[str, bool] = field(default_factory=dict)
    params: dict[str, ModuleParam | None] = field(default_factory=dict)
    mem_total: int | None = None
    mem_available: int | None = None
    thp: str | None = None
    hugetlb: dict[int, HugetlbPool] = field(default_factory=dict)
    kernel_log_readable: bool = False
    taint: int = 0
    tracing: dict[str, Any] = field(default_factory=dict)   # tracing.probe(): the tracepoint witness
    dirty_ring_min: int | None = None   # the smallest dirty ring KVM accepts, bytes per vCPU

    @property
    def pvm(self) -> bool:
        """KVM is PVM: guest CPL0 code runs in KVM's instruction emulator."""
        return "kvm_pvm" in self.modules

    def emulation_route(self) -> tuple[WriteRoute | None, str]:
        """How a guest's writes can be made to go through KVM's instruction
        emulator here, and why; (None, why not) where they cannot."""
        if self.pvm:
            return WriteRoute.CPL0, "PVM emulates guest CPL0 code: the write pass runs at CPL0"
        fep = self.param("force_emulation_prefix")
        if fep not in (None, False, 0):
            return WriteRoute.FEP, f"kvm.force_emulation_prefix={fep}: every store behind the prefix"
        return None, ("no route into KVM's instruction emulator here: KVM does not emulate guest CPL0 "
                      "code (not PVM) and kvm.force_emulation_prefix is "
                      + ("absent" if fep is None else "off")
                      + " (boot with kvm.force_emulation_prefix=1, or in `kvmsplit vm` --append it)")

    def param(self, name: str) -> bool | int | str | None:
        """A kvm module parameter's value; None when this kernel lacks it."""
        p = self.params.get(name)
        return None if p is None else p.value

    def nested_svm(self) -> str | None:
        """Why an L1 guest cannot run an SVM L2 here, or None when it can."""
        if self.guest_features.get("svm") and self.guest_features.get("npt"):
            return None
        nested = self.param("kvm_amd.nested")
        if self.guest_features.get("vmx") or self.hardware == "vmx":
            return ("this host offers VMX, not SVM; kvmsplit's L1 speaks SVM only (on Intel the kernel's "
                    "dirty_log_perf_test -n covers nested dirty logging: "
                    "kvmsplit selftests run -k dirty_log_perf_test/-n)")
        if self.guest_features.get("svm"):
            return "KVM offers SVM but not nested paging (NPT) to its guests"
        why = "no SVM in KVM_GET_SUPPORTED_CPUID"
        if self.hardware != "svm":
            why += f"; the CPU offers {self.hardware} and KVM is {self.kind}"
        elif nested in (False, 0):
            why += "; kvm_amd.nested=0"
        return f"KVM does not offer SVM to its guests here ({why})"

    def cap(self, name: str) -> int:
        return self.capabilities.get(name, 0)

    def with_params(self, **values: bool | None) -> HostFacts:
        """The same host with kvm parameters set (None: absent); for rule tables in tests."""
        params = dict(self.params)
        for k, v in values.items():
            params[k] = None if v is None else ModuleParam(v)
        return replace(self, params=params)

    def to_dict(self) -> dict[str, Any]:
        """results.json's `host` object."""
        params = {n: (p.to_dict() if p else None) for n, p in self.params.items()}
        return {
            "kernel": {"release": self.kernel_release, "version": self.kernel_version,
                       "machine": self.machine},
            "cpu": {"vendor": self.cpu_vendor, "model": self.cpu_model, "count": self.cpu_count},
            "virtualization": {"hardware": self.hardware, "modules": list(self.modules),
                               "kind": self.kind, "paging": self.paging,
                               "running_under_hypervisor": self.under_hypervisor},
            "kvm": {"api_version": self.api_version, "capabilities": dict(self.capabilities),
                    "guest_features": dict(self.guest_features), "params": params},
            # the params again at top level, by name: what scripts look for first
            **params,
            "memory": {"total": self.mem_total, "available": self.mem_available},
            "thp": self.thp,
            "hugetlb": {kb: p.to_dict() for kb, p in self.hugetlb.items()},
            "kernel_log_readable": self.kernel_log_readable,
            "taint": {"value": self.taint, "letters": decode_taint(self.taint)},
            "hostname": self.hostname,
            "tracing": dict(self.tracing),
            "dirty_ring_min": self.dirty_ring_min,
        }


def probe(kvm: Kvm | None = None) -> HostFacts:
    """All host facts. Raises KvmUnavailable when /dev/kvm cannot be opened."""
    own = kvm is None
    kvm = kvm or Kvm()
    try:
        caps = {name: kvm.check_extension(num) for name, num in uapi.CAPABILITIES.items()}
        api, feats, ring_min = kvm.api_version(), guest_features(kvm), dirty_ring_min(kvm)
    finally:
        if own:
            kvm.close()
    cpu = cpu_info()
    virt = virtualization(cpu["flags"])
    mem = memory_info()
    return HostFacts(
        kernel_release=platform.release(), kernel_version=platform.version(),
        machine=platform.machine(), hostname=socket.gethostname(),
        cpu_vendor=cpu["vendor"], cpu_model=cpu["model"], cpu_count=os.cpu_count(),
        hardware=virt["hardware"], modules=tuple(virt["modules"]), kind=virt["kind"],
        paging=virt["paging"], under_hypervisor=virt["running_under_hypervisor"],
        api_version=api, capabilities=caps, guest_features=feats,
        params={**{name: module_param("kvm", name) for name in KVM_PARAMS},
                **{f"{m}.nested": module_param(m, "nested") for m in ("kvm_amd", "kvm_intel")}},
        mem_total=mem["total"], mem_available=mem["available"], thp=thp_mode(),
        hugetlb=hugetlb_pools(), kernel_log_readable=kernel_log_readable(), taint=_taint(),
        tracing=tracing.probe(), dirty_ring_min=ring_min)


def _taint() -> int:
    try:
        return read_taint()
    except (OSError, ValueError):
        return 0


__all__ = ["probe", "HostFacts", "ModuleParam", "HugetlbPool", "KvmUnavailable", "module_param",
           "hugetlb_pools", "memory_info", "thp_mode"]
