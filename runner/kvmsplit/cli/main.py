"""The `kvmsplit` command line.

User errors print one line and exit with the code of their class (see
errors.py); only bugs in kvmsplit itself show a traceback.
"""
from __future__ import annotations

import os
import signal
import sys

from kvmsplit import __version__
from kvmsplit.cli import host, kernel, remote, report, rerun, scenarios, selftests, series, trace
from kvmsplit.cli.options import Parser
from kvmsplit.errors import EXIT_FAILED, EXIT_INTERRUPTED, UserError

COMMAND_GROUPS = (host, scenarios, kernel, report, rerun, selftests, trace, remote, series)


def build_parser() -> Parser:
    p = Parser(prog="kvmsplit", description="Real-hardware tests of KVM dirty logging and huge-page splitting.")
    p.add_argument("--version", action="version", version=f"kvmsplit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
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
        # what was given back to the host has been said where it was done (host/changes.py)
        print("\nkvmsplit: interrupted; the results of what finished are kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
