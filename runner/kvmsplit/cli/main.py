"""The `kvmsplit` command line.

User errors print one line and exit with the code of their class (see
errors.py); only bugs in kvmsplit itself show a traceback.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

from kvmsplit import __version__
from kvmsplit.cli.options import Parser
from kvmsplit.errors import EXIT_FAILED, EXIT_INTERRUPTED, UserError

# Each command and the kvmsplit.cli module (command group) that defines it, in --help's
# order. Only the group of the command named on the command line is imported: all of
# them pull in the whole package (QEMU, SSH, selftests, reports), which would be most of
# every command's start-up. tests/test_cli.py checks this table against the groups.
COMMANDS = {"probe": "host", "list": "scenarios", "run": "scenarios", "vm": "kernel", "kernel": "kernel",
            "history": "report", "compare": "report", "report": "report", "kernellog": "report",
            "rerun": "rerun", "selftests": "selftests", "trace": "trace", "remote": "remote", "series": "series"}


def command_groups(argv: list[str]) -> list[str]:
    """The groups to load: the named command's, or all of them (--help, a typo, nothing)."""
    group = COMMANDS.get(argv[0]) if argv else None
    return [group] if group else list(dict.fromkeys(COMMANDS.values()))


def build_parser(argv: list[str] | None = None) -> Parser:
    p = Parser(prog="kvmsplit", description="Real-hardware tests of KVM dirty logging and huge-page splitting.")
    p.add_argument("--version", action="version", version=f"kvmsplit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for name in command_groups(sys.argv[1:] if argv is None else argv):
        importlib.import_module(f"kvmsplit.cli.{name}").add_parsers(sub)
    return p


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        args = build_parser(argv).parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"kvmsplit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # what was given back to the host has been said where it was done (host/changes.py)
        print("\nkvmsplit: interrupted; the results of what finished are kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
