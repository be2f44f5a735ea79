"""`kvmsplit trace`: the KVM ioctls of a command or a running process, with
python-ptrace; memslot dirty-logging windows and per-call times."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvmsplit.errors import EXIT_INTERRUPTED, UsageError
from kvmsplit.syscalls import EVENTS_CAP, Tracer, TraceResult, describe


def _print_summary(r: TraceResult, out) -> None:
    d = r.to_dict()
    s = d["summary"]
    w = lambda line="": print(line, file=out)
    w()
    if r.interrupted:
        end = "detached; the process goes on untraced"
    elif r.exit_code is None:
        end = "ended"
    else:
        end = f"exit code {r.exit_code}" + (f" ({r.signal})" if r.signal else "")
    w(f"trace: {end}; {d['wall_s']} s, {r.syscalls} syscalls seen, {r.kvm_ioctls} KVM ioctls")
    w("counts: " + ", ".join(f"{k.removeprefix('KVM_')}={v}" for k, v in s["counts"].items()))
    for m in s["memslots"]:
        head = (f"memslot pid {m['pid']} vm fd {m['vm_fd']} slot {m['slot']}: gpa {m['guest_phys_addr']:#x} "
                f"size {m['memory_size'] >> 20}M, GET_DIRTY_LOG {m['get_dirty_log']}, "
                f"CLEAR_DIRTY_LOG {m['clear_dirty_log']} ({m['cleared_pages']} pages)")
        w(head)
        for win in m["dirty_log_windows"]:
            off = (f"off at {win['disabled_ms']} ms ({win['ended_by']}, ioctl {win['disable_ioctl_us']} us), "
                   f"{win['duration_ms']} ms on" if win["disabled_ms"] is not None else "still on at the end")
            w(f"  dirty logging on at {win['enabled_ms']} ms (ioctl {win['enable_ioctl_us']} us), {off}")
    for v in s["vcpu_threads"]:
        exits = ", ".join(f"{k} {n}" for k, n in v["exits"].items())
        w(f"{v['vcpu']} on tid {v['tid']}: KVM_RUN x{v['runs']}, {v['run_ms']} ms in the kernel; exits: {exits}")
    for c in s["caps_enabled"]:
        w(f"KVM_ENABLE_CAP {c['cap']} args {c['args'][:1]} on {c['on']} fd {c['fd']} = {c['ret']}")


def cmd_trace(args) -> int:
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if bool(command) == (args.pid is not None):
        raise UsageError("trace: give either a command (after --) or --pid PID")
    if args.max_events < 0:
        raise UsageError("trace: --max-events must be >= 0")
    as_json = args.json or args.output is not None
    on_event = None if as_json or args.quiet else (lambda ev: print(f"trace: {describe(ev)}", file=sys.stderr))
    tracer = Tracer(on_event=on_event, events_cap=args.max_events)
    result = tracer.attach(args.pid) if args.pid is not None else tracer.run(command)
    if as_json:
        doc: dict[str, Any] = {"command": command or None, "pid": args.pid if args.pid is not None else tracer.root,
                               **result.to_dict()}
        text = json.dumps(doc, indent=1)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        else:
            print(text)
    if (not as_json or args.output) and not args.no_summary:
        _print_summary(result, sys.stderr)
    if result.interrupted:
        return EXIT_INTERRUPTED
    return result.exit_code if result.exit_code is not None else 0


def add_parsers(sub) -> None:
    sp = sub.add_parser("trace", help="the KVM ioctls of a command or process (ptrace): dirty-logging windows, times",
                        description="Follow a command (or --pid) with its threads and children under ptrace; "
                                    "decode its KVM ioctls. Exits with the command's exit code.")
    sp.add_argument("--pid", type=int, metavar="PID", help="attach to a running process instead (^C detaches)")
    sp.add_argument("--json", action="store_true", help="print the events and summary as JSON on stdout at the end")
    sp.add_argument("-o", "--output", metavar="FILE", help="write the JSON to FILE (the text summary goes to stderr)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no line per KVM ioctl, only the summary")
    sp.add_argument("--no-summary", action="store_true",
                    help="with -o: no text summary either (the traced command's own output stays as it was)")
    sp.add_argument("--max-events", type=int, default=EVENTS_CAP, metavar="N",
                    help=f"events kept in the JSON (default {EVENTS_CAP}; all are counted)")
    sp.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    sp.set_defaults(func=cmd_trace)
