"""Fixtures for the kernel-log tests: real lines written into the real /dev/kmsg.

Lines that root writes to /dev/kmsg get the user facility, so a guard counts
them only with accept_user=True. Without a usable /dev/kmsg the tests that need
it skip, except under KVMSPLIT_REQUIRE_KVM=1 (CI on a KVM host), where a skip
would hide a broken environment, so they fail instead.
"""
from __future__ import annotations

import os
import shutil
import uuid

import pytest

from conftest import need  # the one in tests/: skip, or fail under KVMSPLIT_REQUIRE_KVM=1

KMSG = "/dev/kmsg"


def kmsg_problem() -> str | None:
    """Why /dev/kmsg cannot be both read and written here, or None."""
    for flags, what in ((os.O_RDONLY | os.O_NONBLOCK, "read"), (os.O_WRONLY, "written")):
        try:
            fd = os.open(KMSG, flags)
        except OSError as e:
            return f"{KMSG} cannot be {what}: {e.strerror}"
        os.close(fd)
    return None


class KmsgWriter:
    def write(self, lines: list[str], level: int = 4) -> None:
        """One record per line, at log level `level`.

        /dev/kmsg rate-limits each open file to 10 lines per 5 seconds
        (printk_devkmsg=ratelimit, the default), so each line gets its own open.
        """
        for line in lines:
            fd = os.open(KMSG, os.O_WRONLY)
            try:
                os.write(fd, f"<{level}>{line}\n".encode())
            finally:
                os.close(fd)


@pytest.fixture
def kmsg() -> KmsgWriter:
    why = kmsg_problem()
    need(why is None, why or "")
    return KmsgWriter()


@pytest.fixture
def marker() -> str:
    """A token unique to the test, so other kernel chatter cannot be mistaken for ours.

    Letters only: titles have hex runs rewritten to ADDR and numbers to NUM.
    """
    return uuid.uuid4().hex.translate(str.maketrans("0123456789abcdef", "ghijklmnopqrstuv"))


@pytest.fixture
def dmesg() -> str:
    """The dmesg program, for the guard's fallback."""
    path = shutil.which("dmesg")
    need(path is not None, "dmesg is not installed")
    return path
