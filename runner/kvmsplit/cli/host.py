"""`kvmsplit probe`: the host facts that decide what to expect."""
from __future__ import annotations

import json

from kvmsplit.cli.options import host_facts
from kvmsplit.errors import EXIT_OK
from kvmsplit.host.facts import HostFacts, ModuleParam


def cmd_probe(args) -> int:
    facts = host_facts()
    print(json.dumps(facts.to_dict(), indent=1, default=str) if args.json else format_probe(facts))
    return EXIT_OK


def _param(p: ModuleParam | None) -> str:
    if p is None:
        return "absent"
    v = "Y" if p.value is True else "N" if p.value is False else p.value
    return f"{v} ({'writable' if p.writable else 'read-only'})"


def _tracing(t: dict) -> str:
    if not t.get("available"):
        return f"NOT available: {t.get('reason') or 'unknown'}"
    where = t.get("mounted") or "mounted per run"
    return f"{', '.join(t.get('events') or [])} ({where})"


def format_probe(f: HostFacts) -> str:
    rows = [
        ("kernel", f.kernel_release),
        ("cpu", f"{f.cpu_vendor} {f.cpu_model} x{f.cpu_count}"),
        ("virtualization", f"{f.hardware}; KVM is {f.kind}; paging {f.paging}; "
                           f"modules {', '.join(f.modules) or 'none'}"),
        ("kvm api", f.api_version),
    ]
    rows += [(n if "." in n else f"kvm.{n}", _param(p)) for n, p in f.params.items()]
    rows += [(f"cap {n}", v) for n, v in f.capabilities.items()]
    rows += [(f"guest {n}", "yes" if v else "no") for n, v in f.guest_features.items()]
    rows += [
        ("thp", f.thp or "absent"),
        *[(f"hugetlb {kb // 1024}M", f"{p.total} total, {p.free} free" + ("" if p.writable else " (read-only)"))
          for kb, p in f.hugetlb.items()],
        ("memory", f"{(f.mem_total or 0) / 2**30:.1f} GiB total, {(f.mem_available or 0) / 2**30:.1f} GiB available"),
        ("kernel log", "readable" if f.kernel_log_readable else "NOT readable"),
        ("tracepoints", _tracing(f.tracing)),
        ("taint", f"{f.taint} ({f.to_dict()['taint']['letters'] or 'none'})"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def add_parsers(sub) -> None:
    sp = sub.add_parser("probe", help="show the host facts that decide what to expect")
    sp.add_argument("--json", action="store_true", help="one JSON object")
    sp.set_defaults(func=cmd_probe)
