"""The manifest: which KVM selftests run as kvmsplit scenarios, with what
arguments, for how long, and what they need from the host.

    [defaults]
    timeout = 120                     # seconds, per scenario

    [[test]]
    test = "dirty_log_perf_test"      # binary under the selftests' build dir
    about = "why it is here"
    args = ["-i", "2", "-b", "32M"]   # given to every combination
    timeout = 60
    requires = ["vmx_or_svm"]         # see REQUIREMENTS
    hugepages = { "2M" = 40 }         # free hugetlb pages to provide (pools grown, restored after)
    [test.matrix]                     # one scenario per combination, in this order
    "-s" = ["anonymous", "anonymous_thp"]
    "-g" = [false, true]              # true: the bare flag; false: left out

A combination is named after the test and its matrix arguments, e.g.
`dirty_log_perf_test/-s anonymous_thp -g`; names must be unique.
"""
from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kvmsplit.errors import BadInputError, read_toml
from kvmsplit.host.facts import HostFacts, module_param
from kvmsplit.paths import REPO_ROOT

DEFAULT_MANIFEST = REPO_ROOT / "kselftests" / "manifest.toml"
ENTRY_KEYS = ("test", "about", "args", "matrix", "timeout", "requires", "hugepages")
DEFAULT_KEYS = ("timeout",)
HUGEPAGE_SIZES = {"2M": 2048, "1G": 1048576}
MAX_COMBINATIONS = 10_000   # scenarios one [[test]] may expand to


def _hw(facts: HostFacts) -> str:
    return facts.hardware


def _pool(size_kb: int, label: str):
    def check(facts: HostFacts) -> str | None:
        return None if size_kb in facts.hugetlb else f"this kernel has no {label} hugetlb pool"
    return check


def _param(name: str):
    def check(facts: HostFacts) -> str | None:
        v = facts.param(name)
        return None if v is True else f"kvm.{name} is {'N' if v is False else 'absent'}"
    return check


def _nx_recovery(facts: HostFacts) -> str | None:
    # nx_huge_pages_test -p 100 waits 500 ms and expects every split page
    # recovered by then: what nx_huge_pages_test.sh sets up (ratio 1, 100 ms)
    ratio, period = (getattr(module_param("kvm", n), "value", None)
                     for n in ("nx_huge_pages_recovery_ratio", "nx_huge_pages_recovery_period_ms"))
    if ratio == 1 and isinstance(period, int) and 0 < period <= 100:
        return None
    return (f"kvm.nx_huge_pages_recovery_ratio={ratio} and _period_ms={period}; "
            "the test needs 1 and at most 100")


# name -> facts -> None when met, else the reason the scenario is skipped
REQUIREMENTS = {
    "vmx": lambda f: None if _hw(f) == "vmx" else f"needs Intel VMX; the CPU offers {_hw(f)}",
    "svm": lambda f: None if _hw(f) == "svm" else f"needs AMD SVM; the CPU offers {_hw(f)}",
    "vmx_or_svm": lambda f: None if _hw(f) in ("vmx", "svm") else
    "needs VMX or SVM for a nested (L2) guest; the CPU offers neither",
    "hugetlb_2m": _pool(2048, "2M"),
    "hugetlb_1g": _pool(1048576, "1G"),
    "thp": lambda f: None if f.thp in ("always", "madvise") else
    f"transparent hugepages are {f.thp or 'absent'}",
    "tdp_mmu": _param("tdp_mmu"),
    "eager_page_split": _param("eager_page_split"),
    "nx_huge_pages": _param("nx_huge_pages"),
    "nx_huge_pages_recovery": _nx_recovery,
    "root": lambda f: None if os.geteuid() == 0 else "needs root",
}


@dataclass
class SelftestCase:
    name: str
    test: str                   # relative to the build's bindir, e.g. x86_64/vmx_dirty_log_test
    args: list[str]
    timeout: float
    requires: list[str] = field(default_factory=list)
    hugepages: dict[str, int] = field(default_factory=dict)     # "2M"/"1G" -> pages
    about: str = ""

    def unmet(self, facts: HostFacts) -> str | None:
        """Why this host cannot run it, or None."""
        for req in self.requires:
            why = REQUIREMENTS[req](facts)
            if why:
                return f"requires {req}: {why}"
        return None

    def to_dict(self) -> dict:
        return {"kind": "kselftest", "test": self.test, "args": list(self.args),
                "timeout": self.timeout, "requires": list(self.requires),
                "hugepages": dict(self.hugepages), "about": self.about}


def load(path: Path | str | None = None) -> list[SelftestCase]:
    p = Path(path) if path is not None else DEFAULT_MANIFEST
    return expand(read_toml(p, "manifest"), str(p))


def expand(doc: dict, where: str) -> list[SelftestCase]:
    """The cases of a parsed manifest, every matrix combination one case."""
    extra = [k for k in doc if k not in ("defaults", "test")]
    if extra:
        raise BadInputError(f"{where}: unknown top-level key {extra[0]!r} (expected [defaults] and [[test]])")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise BadInputError(f"{where}: [defaults] must be a table")
    bad = [k for k in defaults if k not in DEFAULT_KEYS]
    if bad:
        raise BadInputError(f"{where}: [defaults]: unknown key {bad[0]!r} (expected {', '.join(DEFAULT_KEYS)})")
    entries = doc.get("test", [])
    if not isinstance(entries, list) or not entries:
        raise BadInputError(f"{where}: no [[test]] tables")
    out: list[SelftestCase] = []
    first_at: dict[str, int] = {}
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise BadInputError(f"{where}: test #{i} must be a [[test]] table, got {entry!r}")
        for case in _entry({**defaults, **entry}, f"{where}: test #{i}"):
            if case.name in first_at:
                raise BadInputError(f"{where}: test #{i}: scenario '{case.name}' already comes from "
                                    f"test #{first_at[case.name]}; give them different matrices")
            first_at[case.name] = i
            out.append(case)
    return out


def _entry(e: dict, where: str) -> list[SelftestCase]:
    bad = [k for k in e if k not in ENTRY_KEYS]
    if bad:
        raise BadInputError(f"{where}: unknown key {bad[0]!r} (expected {', '.join(ENTRY_KEYS)})")
    test = e.get("test")
    if not isinstance(test, str) or not re.fullmatch(r"[\w./-]+", test) or test.startswith("/") \
            or ".." in test.split("/"):
        raise BadInputError(f"{where}: 'test' must be a selftest path like \"x86_64/vmx_dirty_log_test\", "
                            f"got {test!r}")
    where = f"{where} ({test})"
    args = e.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, (str, int)) and not isinstance(a, bool)
                                             for a in args):
        raise BadInputError(f"{where}: 'args' must be a list of strings, got {args!r}")
    timeout = e.get("timeout")
    if timeout is None:
        raise BadInputError(f"{where}: no 'timeout' (and none in [defaults])")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise BadInputError(f"{where}: 'timeout' must be a positive number of seconds, got {timeout!r}")
    requires = e.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise BadInputError(f"{where}: 'requires' must be a list of names, got {requires!r}")
    unknown = [r for r in requires if r not in REQUIREMENTS]
    if unknown:
        raise BadInputError(f"{where}: unknown requirement {unknown[0]!r} "
                            f"(known: {', '.join(REQUIREMENTS)})")
    hugepages = e.get("hugepages", {})
    if not isinstance(hugepages, dict) or any(
            k not in HUGEPAGE_SIZES or isinstance(v, bool) or not isinstance(v, int) or v <= 0
            for k, v in hugepages.items()):
        raise BadInputError(f"{where}: 'hugepages' must map \"2M\"/\"1G\" to a page count, got {hugepages!r}")
    about = e.get("about", "")
    if not isinstance(about, str):
        raise BadInputError(f"{where}: 'about' must be a string")
    base = [str(a) for a in args]
    base_name = test.rsplit("/", 1)[-1]
    cases = []
    for combo in _combinations(e.get("matrix", {}), where):
        name = f"{base_name}/{' '.join(combo)}" if combo else base_name
        cases.append(SelftestCase(name, test, base + combo, float(timeout), list(requires),
                                  dict(hugepages), about.strip()))
    return cases


def _combinations(matrix, where: str) -> list[list[str]]:
    if not isinstance(matrix, dict):
        raise BadInputError(f"{where}: 'matrix' must be a table of option = [values]")
    axes = []
    for opt, values in matrix.items():
        if not opt.startswith("-"):
            raise BadInputError(f"{where}: matrix key {opt!r} is not an option (it must start with '-')")
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (str, int, bool)) for v in values):
            raise BadInputError(f"{where}: matrix {opt!r} must be a non-empty list of values "
                                f"(strings, numbers, or true/false for a bare flag)")
        axes.append([[] if v is False else [opt] if v is True else [opt, str(v)] for v in values])
    if math.prod(len(a) for a in axes) > MAX_COMBINATIONS:
        raise BadInputError(f"{where}: the matrix makes {math.prod(len(a) for a in axes)} combinations "
                            f"(at most {MAX_COMBINATIONS})")
    return [list(itertools.chain.from_iterable(c)) for c in itertools.product(*axes)]
