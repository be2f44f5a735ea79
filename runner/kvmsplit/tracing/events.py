"""The kvmmmu tracepoints as typed events, and one phase's summary.

Pure: text in, events and counts out, so it is tested on sample text as well
as on what a real kernel wrote. Both of the kernel's output formats parse:

- the event's own print format (the default), e.g.
  `kvm_mmu_get_page: sp gen 0 gfn 40000 l1 8-byte q0 direct wux nxe ad root 0 sync new`
- the `fields` trace option, e.g.
  `kvm_mmu_get_page: mmu_valid_gen=(0) gfn=0x40000 (262144) role=0x3781 (14209) ... created=(1)`,
  which carries the raw role word and so `guest_mode` (not in the print format).

Each line must carry the TGID column (`options/record-tgid`): only lines of
the process asked for become events; the rest are counted, never guessed at.
"""
from __future__ import annotations

import errno
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SPLIT = "kvm_mmu_split_huge_page"
GET_PAGE = "kvm_mmu_get_page"
SET_SPTE = "kvm_mmu_set_spte"

ERRNO_CAP = 16          # nonzero split errnos kept per phase (the count is kept whole)

# union kvm_mmu_page_role (arch/x86/include/asm/kvm_host.h), the same low bits since 5.x
ROLE_LEVEL_MASK = 0xF
ROLE_DIRECT = 1 << 7
ROLE_GUEST_MODE = 1 << 17


@dataclass(frozen=True)
class SplitHugePage:
    """kvm_mmu_split_huge_page: a huge SPTE at `level` broken into the next level down."""
    gfn: int
    level: int
    errno: int


@dataclass(frozen=True)
class GetPage:
    """kvm_mmu_get_page: a shadow page looked up (created=False) or made (created=True)."""
    gfn: int
    level: int
    direct: bool
    created: bool
    guest_mode: bool | None = None      # None: print format, the role word is not in it


@dataclass(frozen=True)
class SetSpte:
    """kvm_mmu_set_spte: a leaf SPTE installed at `level` (>1: a huge mapping)."""
    gfn: int
    level: int


Event = SplitHugePage | GetPage | SetSpte

# `  comm-TID  (  TGID) [CPU] flags  TIMESTAMP: event: body`; comm may hold spaces and dashes,
# the flags column is absent without irq-info, TGID reads (-------) when the kernel lost it.
_LINE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<tid>\d+)\s+\(\s*(?P<tgid>\d+|-+)\)\s+\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>\S+)\s+)?(?P<ts>\d+(?:\.\d+)?):\s+(?P<event>\w+):\s?(?P<body>.*)$")
_LOST = re.compile(r"^CPU:(?P<cpu>\d+) \[LOST (?P<n>\d+) EVENTS\]")
_HEADER = re.compile(r"^#\s*entries-in-buffer/entries-written:\s*(?P<a>\d+)/(?P<b>\d+)")
# `fields` option values: 0xHEX (DEC) for 2/4/8-byte fields, (DEC) or 'c'(DEC) for one byte
_FIELD = re.compile(r"(?P<k>\w+)=(?:0x(?P<hex>[0-9a-fA-F]+) \((?P<dec>-?\d+)\)|(?:'.')?\((?P<byte>-?\d+)\))")
_SPLIT_TEXT = re.compile(r"gfn (?P<gfn>[0-9a-f]+) spte [0-9a-f]+ level (?P<level>-?\d+) errno (?P<errno>-?\d+)")
_SET_SPTE_TEXT = re.compile(r"gfn (?P<gfn>[0-9a-f]+) spte [0-9a-f]+ \([^)]*\) level (?P<level>\d+)")
_GET_PAGE_TEXT = re.compile(r"sp gen \d+ gfn (?P<gfn>[0-9a-f]+) l(?P<level>\d+) \d-byte q\d+(?P<direct> direct)? .*"
                            r"\b(?P<created>new|existing)\s*$")


class _Fields:
    """The name=value pairs of a `fields` line."""

    def __init__(self, body: str):
        self.hex: dict[str, int] = {}
        self.dec: dict[str, int] = {}
        for m in _FIELD.finditer(body):
            if m["hex"] is not None:
                self.hex[m["k"]] = int(m["hex"], 16)
                self.dec[m["k"]] = int(m["dec"])
            else:
                self.dec[m["k"]] = int(m["byte"])

    def u(self, name: str) -> int:
        """Unsigned: the hex form (the decimal one is printed signed)."""
        return self.hex[name] if name in self.hex else self.dec[name]

    def s(self, name: str) -> int:
        return self.dec[name]


def _parse_body(event: str, body: str) -> Event | None:
    """One event's text, either format; None if it does not parse."""
    body = body.replace("\0", "")       # get_page's print format ends its role with a %c of 0
    try:
        if "=" in body:
            f = _Fields(body)
            if event == SPLIT:
                return SplitHugePage(f.u("gfn"), f.s("level"), f.s("errno"))
            if event == SET_SPTE:
                return SetSpte(f.u("gfn"), f.s("level"))
            if event == GET_PAGE:
                role = f.u("role")
                return GetPage(f.u("gfn"), role & ROLE_LEVEL_MASK, bool(role & ROLE_DIRECT),
                               bool(f.s("created")), bool(role & ROLE_GUEST_MODE))
            return None
        if event == SPLIT and (m := _SPLIT_TEXT.search(body)):
            return SplitHugePage(int(m["gfn"], 16), int(m["level"]), int(m["errno"]))
        if event == SET_SPTE and (m := _SET_SPTE_TEXT.search(body)):
            return SetSpte(int(m["gfn"], 16), int(m["level"]))
        if event == GET_PAGE and (m := _GET_PAGE_TEXT.search(body)):
            return GetPage(int(m["gfn"], 16), int(m["level"]), m["direct"] is not None, m["created"] == "new")
    except KeyError:
        return None
    return None


@dataclass
class ParsedTrace:
    """Everything one read of a trace said, sorted: events of the tgid and counts of the rest."""
    events: list[Event] = field(default_factory=list)
    foreign: int = 0        # well-formed lines of another process
    unattributed: int = 0   # well-formed lines whose TGID the kernel did not know: (-------)
    other: int = 0          # lines of this process from events this parser does not type
    unparsed: int = 0       # lines that are none of the above (format drift, garbage)
    lost: int = 0           # from `[LOST N EVENTS]` markers and entries-written minus entries-in-buffer


def parse(text: str, tgid: int) -> ParsedTrace:
    out = ParsedTrace()
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            if h := _HEADER.match(line):
                out.lost += max(0, int(h["b"]) - int(h["a"]))
            continue
        if lost := _LOST.match(line):
            out.lost += int(lost["n"])
            continue
        m = _LINE.match(line)
        if not m:
            out.unparsed += 1
            continue
        if m["tgid"].startswith("-"):
            out.unattributed += 1
            continue
        if int(m["tgid"]) != tgid:
            out.foreign += 1
            continue
        if m["event"] not in (SPLIT, GET_PAGE, SET_SPTE):
            out.other += 1
            continue
        ev = _parse_body(m["event"], m["body"])
        if ev is None:
            out.unparsed += 1
        else:
            out.events.append(ev)
    return out


def parse_trace(text: str, tgid: int) -> list[Event]:
    """The typed events of process `tgid` in tracefs `trace`/`trace_pipe` text."""
    return parse(text, tgid).events


def lost_in_text(text: str) -> int:
    """Events the text itself says were lost (see ParsedTrace.lost)."""
    return parse(text, -1).lost


def _levels(c: Counter[int]) -> dict[int, int]:
    return {k: c[k] for k in sorted(c)}


def _region(gfn: int, level: int) -> tuple[int, int]:
    """The huge region (base gfn, level) a gfn lies in."""
    return gfn & ~((1 << (9 * (level - 1))) - 1), level


@dataclass(frozen=True)
class PhaseTrace:
    """What the kvmmmu tracepoints said about one phase of one process: counts only.

    regions_dismantled counts huge regions (base gfn, level) that lost their
    huge mapping: split events, and direct level-1 shadow pages created for a
    2M region (how the shadow MMU maps it at 4K). The shadow MMU's eager split
    gives both for one region; it counts once.
    """
    splits_by_level: dict[int, int] = field(default_factory=dict)       # splits that happened (errno 0)
    split_errnos: tuple[tuple[int, int], ...] = ()     # (gfn, errno) with errno != 0, first ERRNO_CAP
    split_errors: int = 0                              # all splits with errno != 0 (but EAGAIN)
    split_retries: int = 0                             # EAGAIN: restarted after a cache top-up
    split_gfns: int = 0                                # distinct gfns split
    new_direct_l1: int = 0                             # created direct level-1 shadow pages
    new_direct_l1_gfns: int = 0                        # their distinct gfns
    new_direct_l1_guest_mode: int | None = None        # of those, for an L2 (None: role word not traced)
    regions_dismantled: int = 0
    huge_mapped_by_level: dict[int, int] = field(default_factory=dict)   # set_spte with level > 1
    events: int = 0             # typed events of this process
    lost: int = 0               # events the kernel dropped (any process: the buffer is shared)
    foreign: int = 0            # lines of other processes, not counted above
    unparsed: int = 0           # lines that did not parse, not counted above

    @classmethod
    def from_events(cls, events: list[Event], *, lost: int = 0, foreign: int = 0,
                    unparsed: int = 0) -> PhaseTrace:
        splits: Counter[int] = Counter()
        errnos: list[tuple[int, int]] = []
        n_errors = retries = 0
        split_gfns: set[int] = set()
        l1_gfns: set[int] = set()
        n_l1 = 0
        gm: int | None = 0
        regions: set[tuple[int, int]] = set()
        huge: Counter[int] = Counter()
        for ev in events:
            if isinstance(ev, SplitHugePage):
                if ev.errno == -errno.EAGAIN:
                    # not a failure: the shadow MMU dropped mmu_lock to top up its split caches
                    # and restarts the walk; the same huge page is split (and traced) again
                    retries += 1
                    continue
                if ev.errno:
                    n_errors += 1
                    if len(errnos) < ERRNO_CAP:
                        errnos.append((ev.gfn, ev.errno))
                    continue        # not split: the huge page stays (the stats will say so)
                splits[ev.level] += 1
                split_gfns.add(ev.gfn)
                if ev.level > 1:
                    regions.add(_region(ev.gfn, ev.level))
            elif isinstance(ev, GetPage):
                if ev.created and ev.direct and ev.level == 1:
                    n_l1 += 1
                    l1_gfns.add(ev.gfn)
                    regions.add(_region(ev.gfn, 2))
                    if ev.guest_mode is None:
                        gm = None
                    elif gm is not None:
                        gm += ev.guest_mode
            elif isinstance(ev, SetSpte):
                if ev.level > 1:
                    huge[ev.level] += 1
        return cls(splits_by_level=_levels(splits), split_errnos=tuple(errnos), split_errors=n_errors,
                   split_gfns=len(split_gfns), split_retries=retries, new_direct_l1=n_l1,
                   new_direct_l1_gfns=len(l1_gfns),
                   new_direct_l1_guest_mode=gm if n_l1 else None, regions_dismantled=len(regions),
                   huge_mapped_by_level=_levels(huge), events=len(events), lost=lost,
                   foreign=foreign, unparsed=unparsed)

    @classmethod
    def from_text(cls, text: str, tgid: int, *, lost: int = 0) -> PhaseTrace:
        """Summarise trace text; `lost` adds what the caller measured elsewhere (per-CPU stats)."""
        p = parse(text, tgid)
        return cls.from_events(p.events, lost=max(lost, p.lost), foreign=p.foreign + p.unattributed,
                               unparsed=p.unparsed)

    @property
    def splits(self) -> int:
        return sum(self.splits_by_level.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "splits_by_level": {str(k): v for k, v in self.splits_by_level.items()},
            "split_errnos": [[g, e] for g, e in self.split_errnos],
            "split_errors": self.split_errors,
            "split_retries": self.split_retries,
            "split_gfns": self.split_gfns,
            "new_direct_l1": self.new_direct_l1,
            "new_direct_l1_gfns": self.new_direct_l1_gfns,
            "new_direct_l1_guest_mode": self.new_direct_l1_guest_mode,
            "regions_dismantled": self.regions_dismantled,
            "huge_mapped_by_level": {str(k): v for k, v in self.huge_mapped_by_level.items()},
            "events": self.events,
            "lost": self.lost,
            "foreign": self.foreign,
            "unparsed": self.unparsed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseTrace:
        return cls(
            splits_by_level={int(k): int(v) for k, v in d.get("splits_by_level", {}).items()},
            split_errnos=tuple((int(g), int(e)) for g, e in d.get("split_errnos", [])),
            split_errors=int(d.get("split_errors", 0)),
            split_retries=int(d.get("split_retries", 0)),
            split_gfns=int(d.get("split_gfns", 0)),
            new_direct_l1=int(d.get("new_direct_l1", 0)),
            new_direct_l1_gfns=int(d.get("new_direct_l1_gfns", 0)),
            new_direct_l1_guest_mode=d.get("new_direct_l1_guest_mode"),
            regions_dismantled=int(d.get("regions_dismantled", 0)),
            huge_mapped_by_level={int(k): int(v) for k, v in d.get("huge_mapped_by_level", {}).items()},
            events=int(d.get("events", 0)),
            lost=int(d.get("lost", 0)),
            foreign=int(d.get("foreign", 0)),
            unparsed=int(d.get("unparsed", 0)),
        )
