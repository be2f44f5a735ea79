"""User-facing errors and the process exit codes they map to.

A UserError is printed as one line (`kvmsplit: error: ...`) and never as a
traceback. Each class has its own exit code so scripts and CI can tell a
failed test (1) from input they got wrong (64/65/66) or a host that cannot run
the request (2/69).
"""
from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1          # something ran and did not pass (FAIL, ERROR, or a scenario that never ran)
EXIT_NO_KVM = 2          # /dev/kvm missing or inaccessible
EXIT_UNCONFIRMED = 3     # nothing failed, but a witness was missing (see --allow-unchecked)
EXIT_NOTHING_TESTED = 4  # everything was skipped or wrote nothing: no evidence either way (KSFT_SKIP)
EXIT_USAGE = 64          # bad command line (sysexits EX_USAGE)
EXIT_BAD_INPUT = 65      # malformed input data: scenario file, kernel log, KTAP (EX_DATAERR)
EXIT_NO_INPUT = 66       # an input file does not exist (EX_NOINPUT)
EXIT_UNAVAILABLE = 69    # the host cannot provide what was asked: memory, toolchain (EX_UNAVAILABLE)
EXIT_INTERNAL = 70       # a bug in kvmsplit itself; the scenario's traceback is in the results (EX_SOFTWARE)
EXIT_INTERRUPTED = 130   # Ctrl-C / SIGTERM; partial results are still written


class UserError(Exception):
    exit_code = EXIT_USAGE


class UsageError(UserError):
    exit_code = EXIT_USAGE


class BadInputError(UserError):
    """Input that does not parse or validate. Say where (file:line) and what."""
    exit_code = EXIT_BAD_INPUT


class NoInputError(UserError):
    exit_code = EXIT_NO_INPUT


class UnavailableError(UserError):
    """The host cannot satisfy the request (more memory than it has, no compiler...)."""
    exit_code = EXIT_UNAVAILABLE


class NoKvmError(UserError):
    exit_code = EXIT_NO_KVM


def read_input(path, what: str = "file", errors: str = "strict") -> str:
    """The text of a file the user named, or a one-line NoInputError."""
    try:
        return Path(path).read_text(encoding="utf-8", errors=errors)
    except FileNotFoundError:
        raise NoInputError(f"{path}: no such {what}") from None
    except OSError as e:
        raise NoInputError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_parsed(path, what: str, loads: Callable[[str], Any], fmt: str) -> Any:
    """A file the user named, parsed by `loads` (tomllib.loads, json.loads), or
    one line saying where and why it is not valid `fmt`."""
    text = read_input(path, what)
    try:
        return loads(text)
    except RecursionError:
        raise BadInputError(f"{path}: not valid {fmt}: nested too deeply") from None
    except ValueError as e:     # the decoders' errors, and a number past int()'s digit limit
        line = getattr(e, "lineno", None)
        msg = getattr(e, "msg", None) or str(e).split(";")[0]
        raise BadInputError(f"{path}{f':{line}' if line else ''}: not valid {fmt}: {msg}") from None


def read_toml(path, what: str = "file") -> dict:
    return read_parsed(path, what, tomllib.loads, "TOML")
