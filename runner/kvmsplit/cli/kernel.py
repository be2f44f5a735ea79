"""`kvmsplit vm` and `kvmsplit kernel build`: the kernel under test."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvmsplit.cli.options import add_db
from kvmsplit.errors import EXIT_FAILED, EXIT_OK
from kvmsplit.kernel import vm as virtme
from kvmsplit.kernel.build import build
from kvmsplit.runs.history import History, HistorySink
from kvmsplit.runs.loop import replay
from kvmsplit.runs.results import Verdict


# -- vm ----------------------------------------------------------------------------------------
def cmd_vm(args) -> int:
    """Boot a kernel under test with virtme-ng and run a kvmsplit command inside."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    kernel = virtme.KernelUnderTest.resolve(args.kernel, args.kernel_tree)
    accel = virtme.choose_accel(None if args.accel == "auto" else args.accel)
    out = Path(virtme.output_dir_of(command) or Path("results") / time.strftime("vm-%Y%m%d-%H%M%S"))
    virtme.check_shareable(out)
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
    replay(rr, out, [HistorySink(History(args.db))])      # the VM's own history was on its tmpfs
    # a "vm" entry: record() found the VM run broken, or the command's results missing
    if outcome.state is not virtme.VmState.DONE or any(s.name == "vm" for s in rr.scenarios):
        why = next((s.reasons[0] for s in rr.scenarios if s.verdict in (Verdict.ERROR, Verdict.MISS)
                    and s.reasons), outcome.state)
        print(f"kvmsplit vm: {why}; last console lines:", file=sys.stderr)
        for line in outcome.console[-15:]:
            print(f"  {line}", file=sys.stderr)
        return EXIT_FAILED
    print(f"kvmsplit vm: {outcome.release} booted in {outcome.boot_s:.1f}s; command exited {outcome.rc}",
          file=sys.stderr)
    return outcome.rc


# -- kernel build -------------------------------------------------------------------------------
def cmd_kernel_build(args) -> int:
    k = build(args.tree, list(args.patch or []) + list(args.mbox or []), force=args.force)
    if args.json:
        print(json.dumps(k.to_dict(), indent=1))
    else:
        print(k.image)
        print(f"kvmsplit: {k.release or 'kernel'} {'from the cache' if k.cached else 'built'}; "
              f"boot it with: kvmsplit vm --kernel {k.image} -- kvmsplit run", file=sys.stderr)
    return EXIT_OK


def add_parsers(sub) -> None:
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
    add_db(sp)
    sp.add_argument("--inject-panic-after", type=float, metavar="S", help=argparse.SUPPRESS)
    sp.add_argument("command", nargs=argparse.REMAINDER, help="-- kvmsplit COMMAND ... (default: kvmsplit run)")
    sp.set_defaults(func=cmd_vm)

    sp = sub.add_parser("kernel", help="build a small KVM host kernel to test with `kvmsplit vm`")
    ksub = sp.add_subparsers(dest="kcmd", required=True, parser_class=type(sp))
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

