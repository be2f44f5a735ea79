"""What a scenario is, how scenario files are read, and the default suite.

A Scenario is immutable and fully explicit (seed included), so its dict in
results.json is enough to run exactly the same thing again.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from kvmsplit.errors import BadInputError, UnavailableError, read_toml
from kvmsplit.host.facts import HostFacts
from kvmsplit.vmm.guest.ucall import PAGE_SHIFTS, PATTERNS
from kvmsplit.vmm.memory import GB, MB, Backing

GUEST_MAX_CPUS = 64   # MAX_CPUS in guests/Makefile


class DirtyMode(StrEnum):
    BITMAP = "bitmap"              # KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG
    MANUAL = "manual"              # MANUAL_DIRTY_LOG_PROTECT2 + KVM_CLEAR_DIRTY_LOG
    MANUAL_INIT_SET = "manual-init-set"   # ... with KVM_DIRTY_LOG_INITIALLY_SET
    RING = "ring"                  # KVM_CAP_DIRTY_LOG_RING
    RING_ACQ_REL = "ring-acq-rel"  # KVM_CAP_DIRTY_LOG_RING_ACQ_REL

    @property
    def manual(self) -> bool:
        return self in (DirtyMode.MANUAL, DirtyMode.MANUAL_INIT_SET)

    @property
    def ring(self) -> bool:
        return self in (DirtyMode.RING, DirtyMode.RING_ACQ_REL)

    @property
    def capability(self) -> str | None:
        return {"manual": "MANUAL_DIRTY_LOG_PROTECT2", "manual-init-set": "MANUAL_DIRTY_LOG_PROTECT2",
                "ring": "DIRTY_LOG_RING", "ring-acq-rel": "DIRTY_LOG_RING_ACQ_REL"}.get(self.value)


class WriteVia(StrEnum):
    """How the guest's dirty passes write: natively (page faults through KVM's
    MMU) or through KVM's instruction emulator (kvm_vcpu_write_guest ->
    mark_page_dirty_in_slot), one store per page or with rep-string
    instructions that write several pages each."""
    NATIVE = "native"
    EMULATED = "emulated"                  # one emulated mov per page
    EMULATED_STRING = "emulated-string"    # rep stosq/movsq over up to ucall.STRING_PAGES pages, then the movs

    @property
    def emulated(self) -> bool:
        return self is not WriteVia.NATIVE

    @property
    def string(self) -> bool:
        return self is WriteVia.EMULATED_STRING


EXPECTATIONS = ("auto", "eager", "lazy", "none")
BACKENDS = ("kvm", "qemu")            # kvmsplit's own VMM on /dev/kvm, or qemu-system-x86_64 -accel kvm
# how the QEMU backend drives dirty logging: the way QEMU users meet it
QEMU_FLOWS = ("migrate", "migrate-cancel", "dirty-rate")
NESTED = ("none", "svm", "auto")      # auto: the nested flavour this host offers (SVM today; VMX: see README)
GUEST_PAGE_SIZES = {k: 1 << v for k, v in PAGE_SHIFTS.items()}


@dataclass(frozen=True)
class Scenario:
    name: str
    backing: Backing = Backing.THP
    guest_page: str = "2m"
    size: int = 256 * MB
    vcpus: int = 1
    memslots: int = 1
    dirty_mode: DirtyMode = DirtyMode.BITMAP
    pattern: str = "seq"
    percent: int = 100
    seed: int = 1
    passes: int = 2
    expect: str = "auto"
    ring_size: int = 64 * 1024        # bytes per vCPU ring
    clear_chunk: int = 64 * MB        # KVM_CLEAR_DIRTY_LOG granularity, bytes
    phase_timeout: float | None = None
    nested: str = "none"              # none, svm or auto: the writes come from an L2 under L1's NPT
    l2_page: str = "2m"               # page size of L1's nested page tables for L2's test region
    backend: str = "kvm"              # kvm: kvmsplit's VMM; qemu: qemu-system-x86_64 -accel kvm
    qemu_flow: str = "migrate"        # backend qemu: migrate, migrate-cancel or dirty-rate
    write_via: WriteVia = WriteVia.NATIVE   # the dirty passes' writes: native, or through KVM's emulator

    @property
    def is_nested(self) -> bool:
        return self.nested != "none"

    @property
    def npages(self) -> int:
        return self.size >> 12

    @property
    def slot_size(self) -> int:
        return self.size // self.memslots

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["backing"] = self.backing.value
        d["dirty_mode"] = self.dirty_mode.value
        if not self.is_nested:
            # a plain scenario's parameters stay what they were: the history
            # matches "the same scenario" across versions by them
            del d["nested"], d["l2_page"]
        if self.backend == "kvm":
            del d["backend"], d["qemu_flow"]
        if self.write_via is WriteVia.NATIVE:
            del d["write_via"]
        else:
            d["write_via"] = self.write_via.value
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "scenario") -> Scenario:
        return _build(dict(d), where)

    def timeout_for(self, phase: str) -> float:
        """Per-phase guest timeout. Generous: a nested TCG host is ~100x slower
        than this box, and a hang is caught by it either way."""
        if self.phase_timeout:
            return self.phase_timeout
        return 60.0 + 120.0 * self.size / GB


# -- parsing and validation -------------------------------------------------------
_FIELDS = {f.name: f for f in dataclasses.fields(Scenario)}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_size(v, key: str = "size") -> int:
    if isinstance(v, bool):
        raise ValueError(f"{key}: expected a size like 256M, got {v!r}")
    if isinstance(v, int):
        return v
    m = _SIZE_RE.match(str(v))
    if not m:
        raise ValueError(f"{key}: expected a size like 256M or 1G, got {v!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def _fmt_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _build(d: dict, where: str) -> Scenario:
    unknown = [k for k in d if k not in _FIELDS]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(_FIELDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(_FIELDS)})"
        raise BadInputError(f"{where}: unknown key {k!r}{hint}")
    if "name" not in d:
        raise BadInputError(f"{where}: missing 'name'")
    try:
        for k in ("name", "guest_page", "pattern", "expect", "nested", "l2_page", "backing", "dirty_mode",
                  "backend", "qemu_flow", "write_via"):
            if k in d and not isinstance(d[k], str):
                raise ValueError(f"{k}: expected a string, got {d[k]!r}")
        if "backing" in d:
            d["backing"] = _enum(Backing, d["backing"], "backing")
        if "dirty_mode" in d:
            d["dirty_mode"] = _enum(DirtyMode, d["dirty_mode"], "dirty_mode")
        if "write_via" in d:
            d["write_via"] = _enum(WriteVia, d["write_via"], "write_via")
        for k in ("size", "ring_size", "clear_chunk"):
            if k in d:
                d[k] = parse_size(d[k], k)
        for k in ("vcpus", "memslots", "percent", "seed", "passes"):
            if k in d and (not isinstance(d[k], int) or isinstance(d[k], bool)):
                raise ValueError(f"{k}: expected an integer, got {d[k]!r}")
        if d.get("phase_timeout") is not None and not isinstance(d["phase_timeout"], (int, float)):
            raise ValueError(f"phase_timeout: expected seconds, got {d['phase_timeout']!r}")
        s = Scenario(**d)
        validate(s)
    except (ValueError, TypeError) as e:
        raise BadInputError(f"{where} {d.get('name')!r}: {e}") from None
    return s


def _enum(cls, v, key):
    try:
        return cls(v)
    except ValueError:
        raise ValueError(f"{key}: unknown value {v!r} (one of: {', '.join(m.value for m in cls)})") from None


def validate(s: Scenario) -> None:
    """Reject what can never run, whatever the host. Raises ValueError."""
    if s.guest_page not in GUEST_PAGE_SIZES:
        raise ValueError(f"guest_page: unknown value {s.guest_page!r} (one of: 4k, 2m, 1g)")
    if s.pattern not in PATTERNS:
        raise ValueError(f"pattern: unknown value {s.pattern!r} (one of: {', '.join(PATTERNS)})")
    if s.nested not in NESTED:
        raise ValueError(f"nested: unknown value {s.nested!r} (one of: {', '.join(NESTED)})")
    if s.backend not in BACKENDS:
        raise ValueError(f"backend: unknown value {s.backend!r} (one of: {', '.join(BACKENDS)})")
    if s.qemu_flow not in QEMU_FLOWS:
        raise ValueError(f"qemu_flow: unknown value {s.qemu_flow!r} (one of: {', '.join(QEMU_FLOWS)})")
    if s.backend == "qemu" and s.vcpus != 1:
        raise ValueError(f"vcpus: the QEMU backend runs one vCPU (one COM1 for the protocol), got {s.vcpus}")
    if s.backend == "qemu" and s.memslots != 1:
        raise ValueError(f"memslots: the QEMU backend maps the test region as one DIMM, got {s.memslots}")
    if s.write_via.emulated and s.is_nested:
        raise ValueError(f"write_via: {s.write_via.value} writes come from kvmsplit's own guest; a nested "
                         "scenario's L2 writes natively")
    if s.write_via.emulated and s.backend != "kvm":
        raise ValueError(f"write_via: {s.write_via.value} needs backend kvm")
    if s.l2_page not in GUEST_PAGE_SIZES:
        raise ValueError(f"l2_page: unknown value {s.l2_page!r} (one of: 4k, 2m, 1g)")
    if s.is_nested and s.vcpus != 1:
        raise ValueError(f"vcpus: a nested scenario runs one L2 on one vCPU, got {s.vcpus}")
    if s.is_nested and s.size % GUEST_PAGE_SIZES[s.l2_page]:
        raise ValueError(f"size {_fmt_size(s.size)} is not whole {s.l2_page} L2 pages")
    if s.expect not in EXPECTATIONS:
        raise ValueError(f"expect: unknown value {s.expect!r} (one of: {', '.join(EXPECTATIONS)})")
    if not 1 <= s.vcpus <= GUEST_MAX_CPUS:
        raise ValueError(f"vcpus: must be 1..{GUEST_MAX_CPUS}, got {s.vcpus}")
    if not 1 <= s.memslots <= 256:
        raise ValueError(f"memslots: must be 1..256, got {s.memslots}")
    if not 1 <= s.percent <= 100:
        raise ValueError(f"percent: must be 1..100, got {s.percent} (a pass that writes nothing tests nothing)")
    if not 1 <= s.passes <= 1000:
        raise ValueError(f"passes: must be 1..1000, got {s.passes}")
    if not 0 <= s.seed < 1 << 63:
        raise ValueError(f"seed: must be 0..2^63-1, got {s.seed}")
    if s.size <= 0 or s.size > 512 * GB:
        raise ValueError(f"size: must be between 4K and 512G, got {_fmt_size(s.size)}")
    gran = max(GUEST_PAGE_SIZES[s.guest_page], s.backing.page_size)
    if s.slot_size * s.memslots != s.size or s.slot_size % gran:
        raise ValueError(f"size {_fmt_size(s.size)} does not split into {s.memslots} memslot(s) "
                         f"of whole {_fmt_size(gran)} pages ({s.backing.value} backing, "
                         f"{s.guest_page} guest pages)")
    if s.npages % s.vcpus:
        raise ValueError(f"{s.npages} pages do not split evenly over {s.vcpus} vCPUs")
    if s.ring_size & (s.ring_size - 1) or s.ring_size < 4096:
        raise ValueError(f"ring_size: must be a power of two >= 4K, got {s.ring_size}")
    if s.clear_chunk % (64 * 4096) or s.clear_chunk <= 0:
        raise ValueError("clear_chunk: must be a positive multiple of 256K (64 pages)")


def load_file(path: str | Path) -> list[Scenario]:
    """Scenarios from a TOML file: optional [defaults] and [[scenario]] tables."""
    p = Path(path)
    doc = read_toml(p, "scenario file")
    extra = [k for k in doc if k not in ("defaults", "scenario")]
    if extra:
        raise BadInputError(f"{p}: unknown top-level key {extra[0]!r} (expected [defaults] and [[scenario]])")
    defaults = doc.get("defaults", {})
    items = doc.get("scenario", [])
    if not isinstance(defaults, dict):
        raise BadInputError(f"{p}: [defaults] must be a table")
    if not isinstance(items, list) or not items:
        raise BadInputError(f"{p}: no [[scenario]] tables")
    out, seen = [], set()
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise BadInputError(f"{p}: scenario #{i} is not a table")
        s = _build({**defaults, **item}, f"{p}: scenario #{i}")
        if s.name in seen:
            raise BadInputError(f"{p}: scenario #{i}: duplicate name {s.name!r}")
        seen.add(s.name)
        out.append(s)
    return out


def to_toml(scenarios: list[Scenario], header: Sequence[str] = ()) -> str:
    """A scenario file load_file() reads back as the same scenarios; `header`
    lines go first as comments."""
    lines = [f"# {line}".rstrip() for h in header for line in str(h).splitlines() or [""]]
    for sc in scenarios:
        lines += ["", "[[scenario]]"]
        for k, v in sc.to_dict().items():
            if v is None:
                continue
            val = ("true" if v else "false") if isinstance(v, bool) else \
                json.dumps(v) if isinstance(v, str) else repr(v)
            lines.append(f"{k} = {val}")
    return "\n".join(lines) + "\n"


# Left out of the default suite, in the full one (`run --full`; -k picks from it too):
# 4K guest pages over 1G host pages in the modes the other 4K scenarios already cover
# (nothing is huge for KVM there, and 1 GiB of 4K faults is 40 % of the default suite).
FULL_ONLY = ("hugetlb-1g/4k/manual", "hugetlb-1g/4k/manual-init-set", "hugetlb-1g/4k/ring-acq-rel")


def default_suite(facts: HostFacts | None = None, full: bool = False) -> list[Scenario]:
    """Each backing x each dirty mode x each guest page size, a few hundred
    MiB each (1 GiB where 1G pages are involved; half of `base` with 4K guest
    pages, which have nothing to split and cost a fault per page), plus
    multi-vCPU, multi-slot and random-pattern variants. Sized down on hosts
    with little memory. full: also FULL_ONLY."""
    avail = (facts.mem_available if facts else None) or 8 * GB
    base = 256 * MB if avail >= 4 * GB else 64 * MB
    out = []
    for backing in Backing:
        for gp in ("4k", "2m", "1g"):
            if gp == "1g" and backing is not Backing.HUGETLB_1G:
                continue    # a 1G guest page maps huge only over 1G host pages
            size = GB if (gp == "1g" or backing is Backing.HUGETLB_1G) else base // 2 if gp == "4k" else base
            if size > avail // 2:
                continue
            for mode in DirtyMode:
                name = f"{backing.value}/{gp}/{mode.value}"
                if full or name not in FULL_ONLY:
                    out.append(Scenario(name=name, backing=backing, guest_page=gp, size=size, dirty_mode=mode))
    out += nested_suite(base)
    out += emulated_suite(facts)
    out += [
        Scenario(name="thp/2m/bitmap/2vcpu-2slot-random", backing=Backing.THP, guest_page="2m",
                 size=2 * base, vcpus=2, memslots=2, pattern="random", percent=50, seed=7, passes=3),
        Scenario(name="hugetlb-2m/2m/ring/2vcpu-random", backing=Backing.HUGETLB_2M, guest_page="2m",
                 size=base, vcpus=2, dirty_mode=DirtyMode.RING, pattern="random", percent=30, seed=11,
                 passes=3),
        Scenario(name="hugetlb-2m/2m/manual/4slot-seq50", backing=Backing.HUGETLB_2M, guest_page="2m",
                 size=base, memslots=4, dirty_mode=DirtyMode.MANUAL, percent=50, clear_chunk=16 * MB),
    ]
    return out


def nested_suite(base: int) -> list[Scenario]:
    """L2 writing through L1's nested page tables, where the shadow MMU maps
    it: each dirty mode over huge L2 pages (what eager splitting splits),
    and 4K L2 pages once (nothing huge for the shadow MMU to hold). Small:
    under a TCG-emulated SVM host every L2 write is slow."""
    size = min(base, 64 * MB)
    out = [Scenario(name=f"nested/{b.value}/l2-2m/{mode.value}", backing=b, guest_page="2m", size=size,
                    dirty_mode=mode, nested="auto", l2_page="2m")
           for b in (Backing.THP, Backing.HUGETLB_2M) for mode in DirtyMode]
    out.append(Scenario(name="nested/hugetlb-2m/l2-4k/bitmap", backing=Backing.HUGETLB_2M, guest_page="2m",
                        size=size, nested="auto", l2_page="4k"))
    return out


def emulated_suite(facts: HostFacts | None) -> list[Scenario]:
    """Writes through KVM's instruction emulator in every dirty mode, one mov per
    page and with rep-string instructions over several pages, rings at the
    smallest size KVM accepts (so ring-full exits come in the middle of emulated
    instructions). Small: emulated writes are slow. Only where the host has a
    route into the emulator (PVM, or kvm.force_emulation_prefix); a scenario
    file's write_via = "emulated" elsewhere SKIPs with the reason."""
    if facts is None or facts.emulation_route()[0] is None:
        return []
    ring = facts.dirty_ring_min or 4096
    out = []
    for via, size, pattern, pct in ((WriteVia.EMULATED, 8 * MB, "seq", 100),
                                    (WriteVia.EMULATED_STRING, 4 * MB, "random", 50)):
        out += [Scenario(name=f"{via.value}/anon/4k/{mode.value}", backing=Backing.ANON, guest_page="4k",
                         size=size, dirty_mode=mode, write_via=via, pattern=pattern, percent=pct, seed=17,
                         ring_size=ring)
                for mode in DirtyMode]
    out.append(Scenario(name=f"{WriteVia.EMULATED.value}/thp/2m/bitmap", backing=Backing.THP, guest_page="2m",
                        size=16 * MB, write_via=WriteVia.EMULATED))
    return out


def select(scenarios: list[Scenario], patterns: list[str] | None) -> list[Scenario]:
    """-k: keep scenarios whose name contains any pattern (globs allowed)."""
    if not patterns:
        return scenarios
    def hit(name: str, pat: str) -> bool:
        return fnmatch.fnmatchcase(name, pat) if any(c in pat for c in "*?[") else pat in name
    return [s for s in scenarios if any(hit(s.name, p) for p in patterns)]


def check_fits_host(scenarios: list[Scenario], facts: HostFacts) -> None:
    """Refuse up front what this host can never run (before anything starts)."""
    total = facts.mem_total
    ncpu = facts.cap("MAX_VCPUS")
    for s in scenarios:
        if total and s.size > total:
            raise UnavailableError(f"scenario '{s.name}' needs {_fmt_size(s.size)} of guest memory "
                                   f"but this host has {total / GB:.1f} GiB of RAM")
        if ncpu and s.vcpus > ncpu:
            raise UnavailableError(f"scenario '{s.name}' needs {s.vcpus} vCPUs; KVM allows {ncpu}")


__all__ = ["Scenario", "DirtyMode", "WriteVia", "Backing", "load_file", "default_suite", "nested_suite",
           "emulated_suite", "select", "to_toml",
           "check_fits_host", "parse_size"]
