"""The `kvmsplit` command line.

User errors print one line and exit with the code of their class (see
errors.py); only bugs in kvmsplit itself show a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from kvmsplit import __version__
from kvmsplit.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, NoKvmError, UsageError,
                     UserError)
from kvmsplit.vmm.kvm import KvmUnavailable


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code 2 would read as "no /dev/kvm"
        raise UsageError(f"{self.prog}: {message}")


def _facts():
    from kvmsplit.host.facts import probe
    try:
        return probe()
    except KvmUnavailable as e:
        raise NoKvmError(str(e)) from None


# -- probe -----------------------------------------------------------------------------
def cmd_probe(args) -> int:
    facts = _facts()
    if args.json:
        print(json.dumps(facts, indent=1, default=str))
        return EXIT_OK
    print(format_probe(facts))
    return EXIT_OK


def format_probe(f: dict) -> str:
    def yn(p):
        if p is None:
            return "absent"
        v = p["value"]
        v = "Y" if v is True else "N" if v is False else v
        return f"{v} ({'writable' if p['writable'] else 'read-only'})"
    virt = f["virtualization"]
    mem = f["memory"]
    rows = [
        ("kernel", f["kernel"]["release"]),
        ("cpu", f"{f['cpu']['vendor']} {f['cpu']['model']} x{f['cpu']['count']}"),
        ("virtualization", f"{virt['hardware']}; KVM is {virt['kind']}; paging {virt['paging']}; "
                           f"modules {', '.join(virt['modules']) or 'none'}"),
        ("kvm api", f["kvm"]["api_version"]),
    ]
    rows += [(f"kvm.{n}", yn(p)) for n, p in f["kvm"]["params"].items()]
    rows += [(f"cap {n}", v) for n, v in f["kvm"]["capabilities"].items()]
    rows += [(f"guest {n}", "yes" if v else "no") for n, v in f["kvm"].get("guest_features", {}).items()]
    rows += [
        ("thp", f["thp"] or "absent"),
        *[(f"hugetlb {kb // 1024}M", f"{p['total']} total, {p['free']} free"
           + ("" if p["writable"] else " (read-only)")) for kb, p in f["hugetlb"].items()],
        ("memory", f"{(mem['total'] or 0) / 2**30:.1f} GiB total, "
                   f"{(mem['available'] or 0) / 2**30:.1f} GiB available"),
        ("kernel log", "readable" if f["kernel_log_readable"] else "NOT readable"),
        ("taint", f"{f['taint']['value']} ({f['taint']['letters'] or 'none'})"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


# -- list / run ----------------------------------------------------------------------------
def _scenarios(args, facts: dict | None):
    """Scenario files are read before anything touches the host, so bad input
    is reported even where /dev/kvm is missing."""
    from kvmsplit.scenario.model import default_suite, load_file, select
    base = []
    for f in args.scenario or []:
        base += load_file(f)
    if not args.scenario:
        base = default_suite(facts)
    chosen = select(base, args.k)
    if not chosen:
        raise UsageError(f"no scenario matches -k {' '.join(args.k or [])}")
    return chosen


def cmd_list(args) -> int:
    from kvmsplit.scenario.expectation import expect
    chosen = _scenarios(args, None) if args.scenario else None
    facts = _facts()
    for s in chosen or _scenarios(args, facts):
        e = expect(s, facts, args.expect)
        when = f"@{e.when}" if e.when else ""
        print(f"{s.name:44} {s.size >> 20:>6}M vcpus={s.vcpus} slots={s.memslots} "
              f"{s.pattern}/{s.percent}% passes={s.passes}  expect {e.split}{when}")
    return EXIT_OK


def cmd_run(args) -> int:
    from kvmsplit.scenario.engine import RunOptions
    from kvmsplit.cli.console import Progress, table
    from kvmsplit.scenario.model import check_fits_host
    from kvmsplit.runs.loop import run_suite

    scenarios = _scenarios(args, None) if args.scenario else None
    facts = _facts()
    scenarios = scenarios or _scenarios(args, facts)
    check_fits_host(scenarios, facts)
    out = Path(args.output or Path("results") / time.strftime("%Y%m%d-%H%M%S"))
    progress = Progress(len(scenarios), verbose=args.verbose)
    opts = RunOptions(expect=args.expect, accept_user_log=args.accept_user_log,
                      phase_timeout=args.phase_timeout, inject_eio=args.inject_eio,
                      inject_hang=args.inject_hang, on_phase=progress.phase)
    print(f"kvmsplit {__version__}: {len(scenarios)} scenario(s) on {facts['kernel']['release']}, "
          f"paging {facts['virtualization']['paging']}, tdp_mmu="
          f"{_pv(facts, 'tdp_mmu')}, eager_page_split={_pv(facts, 'eager_page_split')}; "
          f"results in {out}/", file=sys.stderr)
    from kvmsplit.cli.report import default_sinks
    rr = run_suite(scenarios, facts, out, options=opts, allow_host_changes=not args.no_host_changes,
                   argv=sys.argv, on_result=lambda i, r: progress.result(r),
                   sinks=default_sinks(args))
    human = sys.stderr if args.ktap else sys.stdout      # --ktap owns stdout
    print(table(rr, tty=human.isatty()), file=human)
    print(f"\nresults: {out / 'results.json'}", file=human)
    return EXIT_OK if rr.ok else EXIT_FAILED


def _pv(facts, name):
    from kvmsplit.host.facts import param_value
    v = param_value(facts, name)
    return "Y" if v is True else "N" if v is False else v


# -- vm ----------------------------------------------------------------------------------------
def cmd_vm(args) -> int:
    """Boot a kernel under test with virtme-ng and run a kvmsplit command inside."""
    from kvmsplit.kernel import vm as virtme
    from kvmsplit.runs.history import History, HistorySink
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    kernel = virtme.KernelUnderTest.resolve(args.kernel, args.kernel_tree)
    accel = virtme.choose_accel(None if args.accel == "auto" else args.accel)
    out = Path(virtme.output_dir_of(command) or Path("results") / time.strftime("vm-%Y%m%d-%H%M%S"))
    print(f"kvmsplit vm: booting {kernel.image} with {accel.reason}; results in {out}/", file=sys.stderr)
    # one CPU under TCG: with several, multi-threaded TCG races the kernel's own
    # code patching (seen: 6.12 oopsing in __schedule mid-NOP); guest vCPUs
    # are threads of the kernel under test's KVM either way
    cpus = args.cpus or (1 if accel.name == "tcg" else 2)
    outcome = virtme.boot_and_run(kernel, command, out.resolve(), accel=accel, cpus=cpus,
                                  memory=args.memory, timeout=args.timeout, append=args.append,
                                  boot_attempts=args.boot_attempts,
                                  panic_after=args.inject_panic_after,
                                  echo=lambda line: print(line, file=sys.stderr))
    rr = virtme.record(outcome, kernel, accel, out, sys.argv)
    sink = HistorySink(History(args.db))      # the VM's own history was on its tmpfs
    sink.started(rr, out)
    for i in range(len(rr.scenarios)):
        sink.scenario_done(rr, i, out)
    sink.finished(rr, out)
    if outcome.state != "done":
        why = next((s.reasons[0] for s in rr.scenarios if s.verdict in ("ERROR", "MISS") and s.reasons),
                   outcome.state)
        print(f"kvmsplit vm: {why}; last console lines:", file=sys.stderr)
        for line in outcome.console[-15:]:
            print(f"  {line}", file=sys.stderr)
        return EXIT_FAILED
    print(f"kvmsplit vm: {outcome.release} booted in {outcome.boot_s:.1f}s; command exited {outcome.rc}",
          file=sys.stderr)
    return outcome.rc


# -- kernel build -------------------------------------------------------------------------------
def cmd_kernel_build(args) -> int:
    from kvmsplit.kernel.build import build
    k = build(args.tree, list(args.patch or []) + list(args.mbox or []), force=args.force)
    if args.json:
        print(json.dumps(k.to_dict(), indent=1))
    else:
        print(k.image)
        print(f"kvmsplit: {k.release or 'kernel'} {'from the cache' if k.cached else 'built'}; "
              f"boot it with: kvmsplit vm --kernel {k.image} -- kvmsplit run", file=sys.stderr)
    return EXIT_OK


# -- kernellog ------------------------------------------------------------------------------
def cmd_kernellog(args) -> int:
    """Scan a saved kernel log (dmesg, console, /dev/kmsg dump) for reports."""
    from kvmsplit.errors import read_input
    from kvmsplit.kernellog import parse_log_text, parse_reports
    text = sys.stdin.read() if args.file == "-" else read_input(args.file, errors="replace")
    reports = parse_reports(parse_log_text(text))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    else:
        for r in reports:
            print(f"{r.title}\n  " + "\n  ".join(r.frames[:8]) if r.frames else r.title)
        print(f"{len(reports)} report(s) in {args.file}")
    return EXIT_FAILED if reports else EXIT_OK


# -- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from kvmsplit.cli.report import add_parsers as add_report_parsers
    from kvmsplit.cli.report import add_run_options
    from kvmsplit.cli.selftests import add_parser as add_selftests_parser

    p = _Parser(prog="kvmsplit", description="Real-hardware tests of KVM dirty logging and huge-page splitting.")
    p.add_argument("--version", action="version", version=f"kvmsplit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    sp = sub.add_parser("probe", help="show the host facts that decide what to expect")
    sp.add_argument("--json", action="store_true", help="one JSON object")
    sp.set_defaults(func=cmd_probe)

    def selection(sp):
        sp.add_argument("-k", action="append", metavar="PATTERN",
                        help="only scenarios whose name contains PATTERN (glob allowed; repeatable)")
        sp.add_argument("--scenario", action="append", metavar="FILE.toml",
                        help="scenarios from a TOML file instead of the default suite")
        sp.add_argument("--expect", choices=("eager", "lazy", "none"),
                        help="override the host rule's split expectation")

    sp = sub.add_parser("list", help="list the scenarios a run would run, with their expectation")
    selection(sp)
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("run", help="run scenarios and judge them")
    selection(sp)
    sp.add_argument("--output", "-o", metavar="DIR", help="write results.json here (default results/<time>)")
    sp.add_argument("-v", "--verbose", action="store_true", help="a line per phase, also when not on a terminal")
    sp.add_argument("--no-host-changes", action="store_true",
                    help="never grow hugetlb pools; skip scenarios that would need it")
    sp.add_argument("--phase-timeout", type=float, metavar="S",
                    help="seconds a guest may take in one phase before the scenario is an ERROR")
    sp.add_argument("--accept-user-log", action="store_true",
                    help="also treat user-written /dev/kmsg lines as kernel reports (for testing kvmsplit)")
    sp.add_argument("--inject-eio", metavar="IOCTL", help=argparse.SUPPRESS)
    sp.add_argument("--inject-hang", metavar="PHASE", help=argparse.SUPPRESS)
    add_run_options(sp)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("vm", help="boot a kernel under test (virtme-ng) and run a kvmsplit command inside",
                        description="kvmsplit vm --kernel /boot/vmlinuz-... -- kvmsplit run --output DIR")
    sp.add_argument("--kernel", metavar="IMAGE", help="a bzImage/vmlinuz to boot")
    sp.add_argument("--kernel-tree", metavar="PATH", help="a built kernel tree (its arch/x86/boot/bzImage)")
    sp.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                    help="auto: nested KVM where the host has vmx/svm, else TCG with SVM+NPT emulated")
    sp.add_argument("--cpus", type=int, help="VM CPUs (default: 1 under TCG, 2 with nested KVM)")
    sp.add_argument("--memory", default="2G")
    sp.add_argument("--timeout", type=float, default=1800, metavar="S", help="for boot and command together")
    sp.add_argument("--append", metavar="ARGS",
                    help="kernel command line options for the kernel under test, e.g. kvm.eager_page_split=0")
    sp.add_argument("--boot-attempts", type=int, default=2, metavar="N",
                    help="boot again if the kernel dies before the command starts (default 2)")
    sp.add_argument("--db", metavar="PATH", help="history database to record the run in")
    sp.add_argument("--inject-panic-after", type=float, metavar="S", help=argparse.SUPPRESS)
    sp.add_argument("command", nargs=argparse.REMAINDER, help="-- kvmsplit COMMAND ... (default: kvmsplit run)")
    sp.set_defaults(func=cmd_vm)

    sp = sub.add_parser("kernel", help="build a small KVM host kernel to test with `kvmsplit vm`")
    ksub = sp.add_subparsers(dest="kcmd", required=True, parser_class=_Parser)
    kb = ksub.add_parser("build", help="build (or reuse) a kernel with KVM, optionally patched",
                         description="Applies patches to the tree's HEAD (mbox: git am; diff: git apply), "
                                     "builds with virtme-ng's minimal config plus KVM and THP, puts the tree "
                                     "back, and caches the image by commit, patches and config.")
    kb.add_argument("--tree", metavar="PATH", help="a kernel git tree (default: Debian's linux-source-*)")
    kb.add_argument("--patch", action="append", metavar="FILE.patch", help="a patch to apply (repeatable)")
    kb.add_argument("--mbox", action="append", metavar="FILE.mbx", help="a series as mbox (repeatable)")
    kb.add_argument("--force", action="store_true", help="rebuild even if the cache has this image")
    kb.add_argument("--json", action="store_true")
    kb.set_defaults(func=cmd_kernel_build)

    sp = sub.add_parser("kernellog", help="list the kernel reports (WARNING, BUG, KASAN...) in a saved log")
    sp.add_argument("file", help="dmesg output, a console log or a /dev/kmsg dump; - for stdin")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_kernellog)

    add_report_parsers(sub, _Parser)     # history, compare, rerun, report
    add_selftests_parser(sub, _Parser)   # selftests build|list|run|parse
    return p


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"kvmsplit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nkvmsplit: interrupted; host settings restored, partial results kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
